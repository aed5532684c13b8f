"""The accuracy/speedup Pareto sweep: every method × FLOPs target × seed, measured the same way.

For each point: prune (method registry) → top-1 before recovery → fine-tune (the same budget for
every method, distillation from the original) → top-1 → ONNX export → ORT latency interleaved with
the original's ONNX in the same run (speedup = original median / point median); with a *scale
model* (e.g. DeiT-S at 224×224, random weights) the same compressed **architecture** is rebuilt on
it and timed against it too (see :func:`scale_recipe`).

Outputs in ``out_dir``: ``sweep.json`` (every point, written atomically after each one: the sweep is
resumable), ``sweep.md`` (a table, mean ± std over seeds) and ``sweep.png`` (top-1 vs ORT speedup,
the Pareto frontier highlighted). A point that cannot be planned is recorded as ``skipped``.

One idea per module:

* :mod:`~vitprune.sweep.config`: :class:`SweepConfig`, :class:`ScaleModel`, :class:`PointContext`,
  :class:`Pruned`, :class:`Method`, the registry :data:`METHODS` / :func:`register`;
* :mod:`~vitprune.sweep.methods`: the vitprune rows ``width``, ``boundarydpt``, ``boundarydpt+``,
  ``cpvit``, ``tome``, ``attention`` / ``activation`` (one kind of depth removal only) and ``combo``;
* :mod:`~vitprune.sweep.baseline`: ``tp_width``, Torch-Pruning's timm ViT recipe (needs
  ``torch-pruning``);
* :mod:`~vitprune.sweep.scaling`: an architecture mapped onto a scale model;
* :mod:`~vitprune.sweep.state`: ``sweep.json``; :mod:`~vitprune.sweep.runner`: running the points;
* :mod:`~vitprune.sweep.report`: rows, Pareto frontier, Markdown and plot.

Importing the package registers the built-in methods.

    from vitprune.sweep import SweepConfig, run_sweep
    result = run_sweep(model, train_loader, val_loader, SweepConfig(targets=(0.7, 0.5), epochs=2),
                       "out/sweep", input_size=(3, 32, 32))
"""
from __future__ import annotations

# methods before baseline: the registry lists the vitprune rows first
from vitprune.sweep.config import METHODS, Method, PointContext, Pruned, ScaleModel, SweepConfig, register
from vitprune.sweep import methods as _methods  # noqa: F401  (registers the vitprune rows)
from vitprune.sweep.methods import compress_point
from vitprune.sweep.baseline import tp_prune
from vitprune.sweep.report import format_markdown, pareto_front, plot_sweep, summarize, write_reports
from vitprune.plan.joint import probe_sizes
from vitprune.sweep.runner import rebench, rescale, retime, run_sweep
from vitprune.sweep.scaling import block_map, rebuild, recipe_scale, recipe_shapes, scale_recipe
from vitprune.sweep.state import SWEEP_FORMAT, SWEEP_VERSION, arch_key, merge_states, point_key

__all__ = ["METHODS", "compress_point", "probe_sizes", "Method", "Pruned", "PointContext", "ScaleModel", "SweepConfig", "SWEEP_FORMAT",
           "SWEEP_VERSION", "arch_key", "block_map", "format_markdown", "merge_states", "pareto_front", "plot_sweep",
           "point_key", "rebench", "rebuild", "rescale", "retime", "recipe_scale", "recipe_shapes", "register", "run_sweep", "scale_recipe",
           "summarize", "tp_prune", "write_reports"]
