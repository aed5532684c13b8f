"""The compiler pipeline: capture → analyse → plan and rewrite (stages) → clean up → recover.

``compress_to_flops`` is the whole pipeline for a FLOPs target (or explicit removals); the latency
target (:mod:`vitprune.driver.latency`) is a layer above it, and :func:`vitprune.api.compress` picks
between the two. ``replay`` re-applies a recipe (the passes and their arguments) to a fresh capture.
"""
from __future__ import annotations

import time
from typing import Any, Iterable

import torch.fx as fx
from torch import nn

from passes import PASSES, Cleanup, PassManager
from vitprune.deps import DependencyGraph
from vitprune.deps.branches import is_attention_core
from vitprune.deps.flops import FlopModel, count_flops, count_params, flops_by_block, params_by_block
from vitprune import progress
from vitprune.errors import LoadError, PlanError, UnsupportedModelError
from vitprune.frontend.capture import capture, example_input_for
from vitprune.frontend.inputs import check_input_size, resolve_input_size
from vitprune.frontend.load import check_weights
from vitprune.plan import stages
from vitprune.plan.budget import Budget
from vitprune.report import CompressReport, CompressResult, peak_rss_mib
from vitprune.spec import CompressSpec
from vitprune.train.finetune import FinetuneConfig, finetune


def analyse(model: nn.Module, input_size: tuple[int, int, int]) -> tuple[fx.GraphModule, DependencyGraph]:
    """Trace a copy of ``model`` and build its dependency graph; refuse models with no attention.
    A graph that cannot be captured (a ``.pt2`` with a static batch, say) but shows no attention
    is refused as not a ViT first: that is the reason that holds whatever is changed."""
    try:
        gm = capture(model, example_input_for(input_size))
    except UnsupportedModelError:
        if isinstance(model, fx.GraphModule) and not _has_attention(model):
            raise _no_attention(model) from None
        raise
    dg = DependencyGraph.build(gm)
    if not _has_attention(dg.gm):
        raise _no_attention(model)
    return gm, dg


def _no_attention(model: nn.Module) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{type(model).__name__} has no attention (no scaled_dot_product_attention and no "
        "matmul → softmax → matmul): vitprune compiles Vision Transformers")


def _has_attention(gm: fx.GraphModule) -> bool:
    return any(is_attention_core(n, gm) for n in gm.graph.nodes
               if n.op in ("call_function", "call_method", "call_module"))


def prepare(model: nn.Module, spec: CompressSpec, example_input_size: tuple[int, int, int] | None,
            train_data: Any) -> tuple[int, int, int]:
    """Check everything about the request that needs no capture, and resolve the input size."""
    input_size = resolve_input_size(model, spec.input_size, example_input_size)
    spec.check_data(train_data is not None)
    check_weights(model)
    check_input_size(model, input_size)
    return input_size


def compress_to_flops(model: nn.Module, spec: CompressSpec, input_size: tuple[int, int, int], *,
                      source: dict[str, Any] | None = None, calib_data: Iterable | None = None,
                      train_data: Any = None, val_data: Any = None, finetune_config: Any = None) -> CompressResult:
    """Compress ``model`` to ``spec.target_flops`` (and/or its explicit removals) at ``input_size``.

    Stages (:mod:`vitprune.plan.stages`) through one :class:`PassManager`, then a value-preserving
    cleanup, then recovery fine-tuning with distillation from the original when ``train_data`` is
    given and ``spec.epochs > 0``. The model's inputs were checked by :func:`prepare`."""
    t0 = time.perf_counter()
    with progress.step("capture (torch.export) and dependency graph"):
        gm, dg = analyse(model, input_size)
    timings = {"capture": round(time.perf_counter() - t0, 3)}
    x = gm.meta["example_input"]
    flop_model = FlopModel(dg)  # per-node FLOPs from torch's counter: the base count and the planner's model
    base_flops, base_params = flop_model.flops(), count_params(gm)
    budget = Budget(base_flops, spec.target_flops) if spec.target_flops is not None else None
    teacher = stages.copy_teacher(model) if stages.needs_teacher(spec, train_data) else None
    gm, recipe, report = _run_stages(gm, teacher, spec, budget, flop_model, calib_data, train_data, timings)
    flops, params = count_flops(gm, x), count_params(gm)
    if budget is not None and spec.cost == "flops" and budget.above(flops):  # depth, tokens: discrete steps
        raise PlanError(f"{spec.method} reached {budget.ratio(flops):.3f} of the original FLOPs, above the "
                        f"target {spec.target_flops}; allow more (e.g. --method boundarydpt+)")
    recovery = None
    if train_data is not None and spec.epochs > 0:
        start = time.perf_counter()
        with progress.step(f"recovery fine-tuning ({spec.epochs} epochs)"):
            recovery = _recover(gm, teacher, spec, train_data, val_data, finetune_config)
        timings["recovery"] = round(time.perf_counter() - start, 3)
    report = CompressReport(
        method=spec.method, spec=spec.to_dict(), input_size=tuple(input_size),
        flops_before=base_flops, flops_after=flops, params_before=base_params, params_after=params,
        stages=report, groups=_group_widths(dg, DependencyGraph.build(gm)),
        unsupported_ops=[str(u) for u in dg.unsupported], recovery=recovery,
        train_steps=train_steps(report, recovery), timings=timings, peak_rss_mib=peak_rss_mib(),
        compile_seconds=round(time.perf_counter() - t0, 3),
    ).to_dict()
    return CompressResult(gm.eval(), report, recipe, source, tuple(input_size))


def _run_stages(gm: fx.GraphModule, teacher: nn.Module | None, spec: CompressSpec, budget: Budget | None,
                flop_model: FlopModel, calib_data: Any, train_data: Any,
                timings: dict[str, float]) -> tuple[fx.GraphModule, list, dict]:
    """The stages ``spec`` asks for, every pass through one PassManager (a failure names the passes
    before it), then a value-preserving cleanup. Returns (graph, recipe, per-stage report); each
    stage's and the cleanup's wall seconds go into ``timings``."""
    if budget is not None and budget.goal >= 1.0:
        return gm, [], {}
    input_size = tuple(gm.meta["example_input"].shape[1:])
    manager = PassManager()
    ctx = stages.StageContext(spec, budget, stages.calibration(spec, input_size, calib_data), calib_data is not None,
                              train_data, teacher, manager, flop_model, timings)
    gm, recipe, report = stages.run_stages(gm, ctx)
    start = time.perf_counter()
    with progress.step("cleanup"):
        cleanup = manager.apply(Cleanup(), gm)
    timings["cleanup"] = round(time.perf_counter() - start, 3)
    return cleanup.graph_module, recipe + ([cleanup.recipe] if cleanup.modified else []), report


def train_steps(stage_reports: dict[str, Any], recovery: dict[str, Any] | None) -> dict[str, int]:
    """Every optimizer step of one compression, by phase: what each stage reports under ``steps``
    (the gated search, the joint planner's probes and recovery) and the recovery fine-tune."""
    total: dict[str, int] = {}
    for info in stage_reports.values():
        for phase, n in ((info or {}).get("steps") or {}).items():
            total[phase] = total.get(phase, 0) + int(n)
    if recovery is not None:
        total["finetune"] = len(recovery["epochs"]) * int(recovery["steps_per_epoch"])
    return total


def _recover(gm: fx.GraphModule, teacher: nn.Module, spec: CompressSpec, train_data: Any, val_data: Any,
             config: Any) -> dict[str, Any]:
    config = config or FinetuneConfig(epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size,
                                      seed=spec.seed, progress=progress.enabled())
    history = finetune(gm, teacher, train_data, val_data, config)
    if val_data is None:
        history["note"] = (f"fine-tuned for {spec.epochs} epoch(s) without validation data (no val/ folder): "
                           f"no top-1 accuracy is reported")
    return history


def _group_widths(before: DependencyGraph, after: DependencyGraph) -> list[dict]:
    now = {g.name: g.size for g in after.groups}
    return [
        {"name": g.name, "kind": g.kind, "before": g.size, "after": now.get(g.name, g.size)}
        for g in before.groups if g.prunable
    ]


def inspect_model(model: nn.Module, example_input_size: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """Groups, FLOPs/params per block, and unsupported ops of a model (what `vitprune inspect` prints)."""
    input_size = resolve_input_size(model, None, example_input_size)
    check_input_size(model, input_size)
    gm, dg = analyse(model, input_size)
    x = gm.meta["example_input"]
    return {
        "model": type(model).__name__,
        "input_size": list(input_size),
        "flops": count_flops(gm, x),
        "params": count_params(gm),
        "flops_by_block": flops_by_block(gm, x),
        "params_by_block": params_by_block(gm),
        "groups": [g.describe() for g in dg.groups if g.prunable],
        "frozen_groups": len([g for g in dg.groups if not g.prunable]),
        "unsupported_ops": [str(u) for u in dg.unsupported],
    }


def replay(model: nn.Module, recipe: list[dict[str, Any]], input_size: tuple[int, int, int]) -> fx.GraphModule:
    """Trace ``model`` and re-apply the passes of ``recipe`` (shapes only; weights come after)."""
    gm = capture(model, example_input_for(tuple(input_size)))
    for step in recipe:
        cls = PASSES.get(step.get("pass"))
        if cls is None:
            raise LoadError(f"unknown pass {step.get('pass')!r} in recipe (written by a newer vitprune?)")
        gm = cls.from_recipe(step)(gm).graph_module
    return gm
