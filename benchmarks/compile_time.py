"""Compile time: vitprune's whole ``compress()`` (and its capture → groups → plan → width pass core)
vs Torch-Pruning, DeiT-B.

Both sides prune the same model to the same widths: half of every coupled group (residual stream
768 → 384, MLP hidden 3072 → 1536, heads 12 → 6, head-dim 64 → 32), ranking channels by the L2 norm of
their parameters, with ``pretrained=False`` weights. Each timed run starts from a freshly built model
(model construction is not timed) and ends with a pruned model; each side then runs one forward.

* vitprune compress(): the public call a user makes, ``compress(model, CompressSpec(target_flops=0.5))``:
  torch.export capture, dependency graph, L2 importance, the global FLOPs planner (±1%), the width
  pass with its shape re-check, the cleanup pass, FLOPs and params before/after (no ONNX). Its
  widths differ from a uniform half (the planner ranks globally), so its params column differs.
* vitprune core: ``capture`` + ``DependencyGraph.build`` + a plan (this script's own: per group, the
  L2 norm of each channel's parameter slices over all members; keep the top half) + ``WidthPruning``
  (which re-checks its result by shape propagation): the same widths as Torch-Pruning.
* Torch-Pruning: ``BasePruner`` (``MetaPruner``) with ``GroupMagnitudeImportance(p=2)``,
  ``pruning_ratio=0.5``, its ViT recipe (``examples/transformers/prune_timm_vit.py``): ``num_heads``
  hints, the classifier in ``ignored_layers``, ``round_to=2``; heads and head-dims both pruned
  (``prune_num_heads=True``, ``prune_head_dims=True``, ``head_pruning_ratio=0.5``) to reach our widths.
  The timed part is the pruner's construction (dependency graph) + ``step()`` + patching the
  attention attributes TP leaves stale (``num_heads``, ``head_dim``, and on timm ≥ 1.0.2x
  ``attn_dim``), which its example does by hand after pruning.

Prints a Markdown table (median of ``--runs`` runs per side) and exits 1 if ``compress()`` misses its
target (≤ 5 s and no slower than Torch-Pruning).

    python benchmarks/compile_time.py [--model deit_base_patch16_224] [--runs 3]
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import timm
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from passes.width import WidthPruning  # noqa: E402
from vitprune.deps import DependencyGraph  # noqa: E402
from vitprune import CompressSpec, compress  # noqa: E402
from vitprune.frontend.capture import example_input_for, capture  # noqa: E402

RATIO = 0.5
TARGET_S = 5.0


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


def input_for(model: nn.Module) -> torch.Tensor:
    return example_input_for(tuple(model.pretrained_cfg["input_size"]), batch=1)


# -- vitprune -----------------------------------------------------------------------------------------
def l2_plan(dg: DependencyGraph, ratio: float = RATIO) -> dict[str, list[int]]:
    """Keep the ``1 - ratio`` share of each prunable group with the largest parameter L2 norm.

    A channel's score is the squared L2 norm of every parameter slice it owns, summed over the
    group's members (a head owns its qkv rows and proj columns in every block it touches).
    """
    per_dim: dict[tuple[str, int], np.ndarray] = {}

    def position_sq(param: str, dim: int) -> np.ndarray:
        if (param, dim) not in per_dim:
            t = _tensor(dg.gm, param).detach()
            other = [d for d in range(t.ndim) if d != dim]
            norms = torch.linalg.vector_norm(t, dim=other) if other else t.abs()
            per_dim[(param, dim)] = norms.double().square().numpy()
        return per_dim[(param, dim)]

    keep = {}
    with torch.no_grad():
        for g in dg.prunable_groups():
            score = np.zeros(g.size)
            for m in g.members:
                valid = m.coords >= 0
                np.add.at(score, m.coords[valid], position_sq(m.param, m.dim)[valid])
            n = max(1, int(round(g.size * (1 - ratio))))
            keep[g.name] = sorted(int(i) for i in np.argsort(-score, kind="stable")[:n])
    return keep


def _tensor(gm: nn.Module, name: str) -> torch.Tensor:
    path, _, attr = name.rpartition(".")
    return getattr(gm.get_submodule(path) if path else gm, attr)


def run_compress(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, dict[str, float]]:
    t0 = time.perf_counter()
    result = compress(model, CompressSpec(target_flops=RATIO), example_input_size=tuple(x.shape[1:]))
    return result.model, {"total": time.perf_counter() - t0}


def run_vitprune(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, dict[str, float]]:
    t = {}
    t0 = time.perf_counter()
    gm = capture(model, x)
    t["capture"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    dg = DependencyGraph.build(gm)
    t["deps"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    keep = l2_plan(dg)
    t["plan"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    pruned = WidthPruning(keep)(gm).graph_module
    t["width"] = time.perf_counter() - t3
    t["total"] = time.perf_counter() - t0
    return pruned, t


# -- Torch-Pruning ------------------------------------------------------------------------------------
def run_torch_pruning(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, dict[str, float]]:
    import torch_pruning as tp
    from timm.models.vision_transformer import Attention

    t = {}
    t0 = time.perf_counter()
    attention = [m for m in model.modules() if isinstance(m, Attention)]
    num_heads = {m.qkv: m.num_heads for m in attention}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.BasePruner(
            model, x,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=RATIO,
            ignored_layers=[model.head],
            num_heads=num_heads,
            prune_num_heads=True,
            prune_head_dims=True,
            head_pruning_ratio=RATIO,
            round_to=2,
        )
        t["deps"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        pruner.step()
    for m in attention:  # TP leaves these stale; its example patches them by hand
        m.num_heads = pruner.num_heads[m.qkv]
        m.head_dim = m.qkv.out_features // (3 * m.num_heads)
        if hasattr(m, "attn_dim"):
            m.attn_dim = m.num_heads * m.head_dim
    t["prune"] = time.perf_counter() - t1
    t["total"] = time.perf_counter() - t0
    return model, t


# -- measurement ------------------------------------------------------------------------------------------
def forward_ok(model: nn.Module, x: torch.Tensor) -> str:
    try:
        with torch.no_grad():
            y = model(x)
        return "yes" if y.shape == (x.shape[0], 1000) and torch.isfinite(y).all() else f"bad output {tuple(y.shape)}"
    except Exception as e:
        return f"**no**: {type(e).__name__}: {' '.join(str(e).split())[:120]}"


def widths(model: nn.Module) -> str:
    """Residual / hidden / qkv rows / proj inputs of block 0 (both sides use the same parameter names)."""
    sd = dict(model.named_parameters())
    return (f"{sd['blocks.0.norm1.weight'].shape[0]} / {sd['blocks.0.mlp.fc1.weight'].shape[0]} / "
            f"{sd['blocks.0.attn.qkv.weight'].shape[0]} / {sd['blocks.0.attn.proj.weight'].shape[1]}")


def measure(name: str, runs: int, sides: list[str]) -> list[dict]:
    """Runs interleaved (ours, TP, ours, TP, ...) so load changes on the machine hit both alike."""
    fns = {"vitprune compress()": run_compress, "vitprune core": run_vitprune, "torch-pruning": run_torch_pruning}
    times: dict[str, list[dict]] = {s: [] for s in sides}
    last: dict[str, tuple] = {}
    for _ in range(runs):
        for side in sides:
            model = make_model(name)
            x = input_for(model)
            pruned, t = fns[side](model, x)
            times[side].append(t)
            last[side] = (pruned, x)
    out = []
    for side in sides:
        pruned, x = last[side]
        ts = times[side]
        out.append({
            "side": side,
            "median": {k: statistics.median(t[k] for t in ts) for k in ts[0]},
            "all": [t["total"] for t in ts],
            "forward": forward_ok(pruned, x),
            "params": sum(p.numel() for p in pruned.parameters()),
            "widths": widths(pruned),
        })
    return out


def table(name: str, results: list[dict], runs: int) -> str:
    lines = [f"Compile time, {name} (pretrained=False), prune 50% of every group; median of {runs} runs; "
             f"runs interleaved; torch {torch.__version__}, {torch.get_num_threads()} threads.", "",
             "| tool | total (s), median | runs (s) | breakdown (median, s) | forward runs? | params after "
             "| block-0 widths: residual / hidden / qkv rows / proj in |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        breakdown = ", ".join(f"{k} {v:.2f}" for k, v in r["median"].items() if k != "total")
        lines.append(f"| {r['side']} | {r['median']['total']:.2f} | {', '.join(f'{t:.2f}' for t in r['all'])} "
                     f"| {breakdown} | {r['forward']} | {r['params'] / 1e6:.2f} M | {r['widths']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="deit_base_patch16_224")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    sides = ["vitprune compress()", "vitprune core"]
    if importlib.util.find_spec("torch_pruning") is not None:
        sides.append("torch-pruning")
    else:
        print("torch-pruning is not installed: vitprune only", file=sys.stderr)
    results = measure(args.model, args.runs, sides)
    print(table(args.model, results, args.runs))
    ours = results[0]["median"]["total"]
    theirs = results[-1]["median"]["total"] if results[-1]["side"] == "torch-pruning" else float("inf")
    met = ours <= TARGET_S and ours <= theirs and results[0]["forward"] == "yes"
    print(f"target (≤ {TARGET_S:.0f} s, no slower than Torch-Pruning, forward runs): {'met' if met else 'MISSED'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
