"""ORT latency of width-pruned DeiT-S / DeiT-B against the original, in one interleaved run.

For each model: export the original, compress to each FLOPs target (L2 importance, global ranking,
``--round-to``), export, then time every ONNX file round-robin in ONNX Runtime (CPU, fixed threads).
Prints a Markdown table with FLOPs ratio, median/p90 latency, speedup and the latency efficiency
``speedup ÷ (original FLOPs / pruned FLOPs)`` (1.0 = latency falls exactly as FLOPs do).

    python benchmarks/latency.py --models deit_small_patch16_224,deit_base_patch16_224 \\
        --targets 0.75,0.5,0.3 --batches 1,8 --threads 1 --runs 20
Random weights (no hub access here): latency depends on shapes only.

``--variants`` adds, at each target, width plans of the same graph timed in the same run (issue 13):
``shrink`` (head_dim narrowed too, the old default), ``keep`` (whole heads only, the new default),
``latency`` (``keep`` planned against the measured per-op ORT cost model of vitprune.plan.cost at
batch 1 and the run's threads, to the same fraction of the model's estimated latency), and ``ref``
(hand-built uniform: the same head count in every block, head_dim whole, residual a multiple of 32,
MLP hidden a multiple of 64). ``proxy`` is the summed normalised L2 importance kept, relative to
``shrink``; for ``latency`` also relative to ``keep`` planned to the latency plan's FLOPs (the
issue's "at equal FLOPs"). ``est. ms`` is the cost model's estimate at batch 1 and the run's threads.

    python benchmarks/latency.py --targets 0.5 --variants --threads 1,2 --batches 1,8 --runs 10

``--keep-round-to 16,64`` adds the ``keep`` plan at those ``round_to`` values (``keep@16``, ...) to the
same interleaved run: how the default ``round_to`` was chosen.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import copy

import numpy as np
import onnxruntime as ort
import timm
import torch

from vitprune import CompressSpec, compress
from vitprune.deploy.bench import compare
from vitprune.deploy.onnx import export_onnx
from vitprune.deps.flops import FlopModel, count_flops
from vitprune.driver.pipeline import analyse
from vitprune.frontend.capture import capture, example_input_for
from vitprune.plan.budget import Budget
from vitprune.plan.cost import LatencyModel, LatencyTable
from vitprune.plan.importance import l2_importance
from vitprune.plan.width import eligible_groups, kept_importance, plan_width
from passes.width import WidthPruning

KINDS = {"residual", "hidden", "head", "head_dim"}


def uniform_reference(dg, fm: FlopModel, groups, scores, goal: float) -> dict[str, list[int]]:
    """Same head count everywhere, head_dim whole, residual a multiple of 32 and hidden of 64, heads
    in proportion to the residual: the largest such shape within ``goal`` FLOPs (best channels by L2)."""
    by_kind = {k: [g for g in groups if g.kind == k] for k in KINDS}
    width, heads = by_kind["residual"][0].size, by_kind["head"][0].size
    hidden_full = by_kind["hidden"][0].size
    best = None
    for r in range(width // 4 // 32 * 32, width + 1, 32):
        h = max(1, round(heads * r / width))
        for hid in range(hidden_full, 0, -64):
            n = {"residual": r, "head": h, "hidden": hid}
            counts = {g.axis: n[g.kind] for g in groups if g.kind in n}
            flops = fm.flops(counts)
            if flops <= goal:
                if best is None or abs(hid / r - hidden_full / width) + (goal - flops) / goal < best[0]:
                    best = (abs(hid / r - hidden_full / width) + (goal - flops) / goal, n)
                break
    n = best[1]
    return {g.name: sorted(np.argsort(-scores[g.name])[:n[g.kind]].tolist()) for g in groups if g.kind in n}


def variant_rows(model, name: str, target: float, threads: int, round_to: int, workdir: str,
                 notes: list[str], keep_round_to: tuple[int, ...] = ()) -> list[tuple]:
    """(label, path, flops, params, proxy, plan seconds, estimated ms, equal-FLOPs proxy) per width
    plan at ``target`` (the last: the ``latency`` plan's importance kept over that of the default
    ``keep`` plan planned to the same FLOPs, the issue's accuracy proxy; None on other rows);
    the latency table's notes (e.g. measured on a busy machine, not cached) go to ``notes``.
    ``keep_round_to`` adds a ``keep@N`` plan per value: the default plan at another ``round_to``."""
    gm, dg = analyse(model, (3, 224, 224))
    fm = FlopModel(dg)
    groups = eligible_groups(dg, KINDS)
    scores = l2_importance(dg, groups)
    budget = Budget(fm.flops(), target)
    keeps, times = {}, {}
    for policy in ("shrink", "keep"):
        t0 = time.perf_counter()
        keeps[policy] = plan_width(dg, fm, scores, groups, budget, round_to=round_to,
                                   head_dim_policy=policy).detail["keep"]
        times[policy] = time.perf_counter() - t0
    for n in keep_round_to:
        t0 = time.perf_counter()
        keeps[f"keep@{n}"] = plan_width(dg, fm, scores, groups, budget, round_to=n).detail["keep"]
        times[f"keep@{n}"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    lm = LatencyModel(dg, LatencyTable(threads, 1))
    keeps["latency"] = plan_width(dg, lm, scores, groups, Budget.latency(lm.cost(), target),
                                  round_to=round_to).detail["keep"]
    times["latency"] = time.perf_counter() - t0
    notes += [f"{name} at {target}, {threads} thread(s): {n}" for n in lm.table.notes]
    latency_flops = fm.flops({g.axis: len(keeps["latency"].get(g.name, range(g.size))) for g in groups})
    same_flops = plan_width(dg, fm, scores, groups, Budget(fm.flops(), latency_flops / fm.flops()),
                            round_to=round_to).detail["keep"]
    equal_flops_proxy = kept_importance(scores, keeps["latency"], groups) / kept_importance(scores, same_flops, groups)
    keeps["ref"], times["ref"] = uniform_reference(dg, fm, groups, scores, budget.limit), 0.0
    x = example_input_for((3, 224, 224), batch=1)
    out = []
    for label, keep in keeps.items():
        pruned = copy.deepcopy(gm)
        WidthPruning(keep)(pruned)
        path = os.path.join(workdir, f"{name}_{target}_{label}_t{threads}.onnx")
        export_onnx(pruned, x, path, parity_batches=(1,))
        out.append((label, path, count_flops(pruned, x), sum(p.numel() for p in pruned.parameters()),
                    kept_importance(scores, keep, groups) / kept_importance(scores, keeps["shrink"], groups),
                    times[label], lm.cost({g.axis: len(keep.get(g.name, range(g.size))) for g in groups}),
                    equal_flops_proxy if label == "latency" else None))
    return out


def run(model_name: str, targets: list[float], batches: list[int], threads: int, runs: int,
        round_to: int, workdir: str, variants: bool = False, notes: list[str] | None = None,
        keep_round_to: tuple[int, ...] = ()) -> list[dict]:
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).eval()
    x = example_input_for((3, 224, 224), batch=1)
    base_flops = count_flops(model, x)
    paths = [os.path.join(workdir, f"{model_name}_orig.onnx")]
    export_onnx(capture(model, example_input_for((3, 224, 224))), x, paths[0], parity_batches=(1,))
    info = [{"target": 1.0, "flops": base_flops, "params": sum(p.numel() for p in model.parameters()),
             "compile_s": 0.0, "plan": "original"}]
    for target in targets:
        if variants:
            for label, path, flops, params, proxy, secs, est, eq in variant_rows(model, model_name, target, threads,
                                                                              round_to, workdir,
                                                                              notes if notes is not None else [],
                                                                              keep_round_to):
                paths.append(path)
                info.append({"target": target, "flops": flops, "params": params, "compile_s": secs,
                             "plan": label, "proxy": proxy, "estimate_ms": est, "proxy_equal_flops": eq})
            continue
        t0 = time.perf_counter()
        result = compress(model, CompressSpec(target_flops=target, round_to=round_to))
        compile_s = time.perf_counter() - t0
        path = os.path.join(workdir, f"{model_name}_{target}.onnx")
        export_onnx(result.model, x, path, parity_batches=(1,))
        paths.append(path)
        info.append({"target": target, "flops": result.report["flops_after"],
                     "params": result.report["params_after"], "compile_s": compile_s, "plan": "compress"})
    rows = compare(paths, batch_sizes=batches, threads=threads, runs=runs, warmup=3)
    out = []
    for row in rows:
        i = paths.index(row["model"])
        flops_ratio = info[i]["flops"] / base_flops
        out.append({
            "model": model_name, "target": info[i]["target"], "batch": row["batch"],
            "flops_ratio": flops_ratio, "params_M": info[i]["params"] / 1e6,
            "median_ms": row["median_ms"], "p90_ms": row["p90_ms"], "speedup": row["speedup"],
            "efficiency": row["speedup"] * flops_ratio, "compile_s": info[i]["compile_s"],
            "plan": info[i]["plan"], "proxy": info[i].get("proxy"), "estimate_ms": info[i].get("estimate_ms"),
            "proxy_equal_flops": info[i].get("proxy_equal_flops"),
            "threads": threads, "others_cores": row["others_cores"],
        })
    return out


def table(rows: list[dict]) -> str:
    head = ("| model | plan | target | threads | batch | FLOPs ratio | params (M) | median ms | p90 ms | "
            "speedup | efficiency | est. ms | proxy | proxy vs keep, same FLOPs | compile s |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        proxy = "" if r.get("proxy") is None else f"{r['proxy']:.4f}"
        equal = "" if r.get("proxy_equal_flops") is None else f"{r['proxy_equal_flops']:.4f}"
        est = "" if r.get("estimate_ms") is None else f"{r['estimate_ms']:.1f}"
        lines.append(f"| {r['model']} | {r['plan']} | {r['target']:.2f} | {r['threads']} | {r['batch']} | "
                     f"{r['flops_ratio']:.3f} | {r['params_M']:.1f} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | "
                     f"{r['speedup']:.2f}× | {r['efficiency']:.2f} | {est} | {proxy} | {equal} | {r['compile_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="deit_small_patch16_224,deit_base_patch16_224")
    p.add_argument("--targets", default="0.75,0.5,0.3")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--threads", default="1", help="comma-separated: one interleaved run per count")
    p.add_argument("--variants", action="store_true",
                   help="time the shrink/keep/latency/ref width plans instead of compress() at each target")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--round-to", type=int, default=CompressSpec().round_to)
    p.add_argument("--keep-round-to", default="", metavar="N,N",
                   help="with --variants: also time the keep plan at these round_to values (keep@N)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = p.parse_args()
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as workdir:
        for threads in [int(t) for t in args.threads.split(",")]:
            for name in args.models.split(","):
                rows += run(name, [float(t) for t in args.targets.split(",")],
                            [int(b) for b in args.batches.split(",")], threads, args.runs,
                            args.round_to, workdir, args.variants, notes,
                            tuple(int(n) for n in args.keep_round_to.split(",") if n))
    print(f"ORT {ort.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, threads={args.threads}, round_to={args.round_to}\n")
    print(table(rows))
    busy = {(r["model"], r["threads"]): r["others_cores"] for r in rows if r["others_cores"] is not None}
    if busy:
        print("\nCPU other processes took while timing (cores): "
              + ", ".join(f"{m} {t} thread(s) {c:.2f}" for (m, t), c in busy.items()))
    for note in notes:
        print(f"- {note}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
