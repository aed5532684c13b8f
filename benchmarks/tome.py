"""ToMe token merging: FLOPs and ONNX Runtime latency against the unmerged model, and CP-ViT at equal FLOPs.

Per model (random weights, 224×224 — latency depends on shapes only): the unmerged baseline, ``merge=R``
for each ``--r`` (ToMe's r tokens merged in every block), ``--method tome`` at ``--target`` (the
schedule :func:`vitprune.plan.merging.tome_plan` picks), and CP-ViT's progressive token pruning at the
FLOPs that tome schedule reached (equal FLOPs). Every model is exported with
``vitprune.deploy.onnx.export_onnx`` (checker, strict shape inference, ORT parity at batch 1) and the
settings of one model are timed interleaved (``vitprune.deploy.bench.compare``: round-robin, rotating
start) at batch 1, then at batch 32, at ``--threads`` intra-op threads.

    python benchmarks/tome.py                                   # DeiT-S, DeiT-B, ViT-L: hours on 2 cores
    python benchmarks/tome.py --models deit_small_patch16_224 --runs 5 --runs32 2   # a few minutes
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time

import onnxruntime as ort
import timm
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from passes.merging import TokenMerging  # noqa: E402
from passes.tokens import TokenPruning  # noqa: E402
from vitprune.deploy.bench import compare  # noqa: E402
from vitprune.deploy.onnx import export_onnx  # noqa: E402
from vitprune.deps.flops import count_flops  # noqa: E402
from vitprune.frontend.capture import capture, example_input_for  # noqa: E402
from vitprune.plan.budget import Budget  # noqa: E402
from vitprune.plan.merging import MergeFlops, merge_schedule, tome_plan  # noqa: E402
from vitprune.plan.tokens import TokenFlops, cpvit_plan  # noqa: E402

MODELS = ("deit_small_patch16_224", "deit_base_patch16_224", "vit_large_patch16_224")


def settings(gm: torch.fx.GraphModule, args: argparse.Namespace) -> list[tuple[str, str, torch.fx.GraphModule]]:
    """(name, schedule, graph) for every setting of one model."""
    flops = MergeFlops(gm)
    blocks = len(flops.layout.blocks)
    out = [("unmerged", "-", gm)]
    for r in args.r:
        sched = TokenMerging(merge_schedule(blocks, r)).schedule(flops.layout)
        out.append((f"merge={r}", _short(sched), TokenMerging(sched)(copy.deepcopy(gm)).graph_module))
    plan = tome_plan(gm, Budget(flops.base, args.target), flop_model=flops)
    sched = plan.detail["schedule"]
    out.append((f"tome @ {args.target} (r={plan.detail['r']}, +1 in last {plan.detail['extra']})", _short(sched),
                TokenMerging(sched)(copy.deepcopy(gm)).graph_module))
    if not args.no_cpvit:  # CP-ViT at the FLOPs the tome schedule reached
        g = torch.Generator().manual_seed(1)
        batches = [torch.randn(2, 3, 224, 224, generator=g)]
        keep = cpvit_plan(gm, batches, Budget(flops.base, plan.ratio), flop_model=TokenFlops(gm)).detail["keep"]
        out.append((f"cpvit @ {plan.ratio:.3f} (equal FLOPs)", "keep " + _short(keep),
                    TokenPruning(keep)(copy.deepcopy(gm)).graph_module))
    return out


def _short(values: list[int]) -> str:
    """``[8, 8, 8, 9]`` → ``8×3 9``."""
    parts, i = [], 0
    while i < len(values):
        j = i
        while j < len(values) and values[j] == values[i]:
            j += 1
        parts.append(f"{values[i]}×{j - i}" if j - i > 1 else str(values[i]))
        i = j
    return " ".join(parts)


def run_model(name: str, args: argparse.Namespace, workdir: str) -> list[dict]:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = example_input_for((3, 224, 224), batch=2)
    gm = capture(model, x)
    base = count_flops(gm, x)
    rows, paths = [], []
    for i, (setting, sched, graph) in enumerate(settings(gm, args)):
        path = os.path.join(workdir, f"{name}_{i}.onnx")
        report = export_onnx(graph, x, path, parity_batches=(1,))
        flops = count_flops(graph, x)
        rows.append({"model": name, "setting": setting, "schedule": sched, "gflops": flops / 1e9,
                     "ratio": flops / base, "parity": report["parity_max_abs_err"]["1"], "path": path})
        paths.append(path)
        print(f"built {name} {setting}: {flops / base:.3f} of the FLOPs", file=sys.stderr, flush=True)
    for batch, runs in ((1, args.runs), (32, args.runs32)):
        if runs <= 0:
            continue
        for t in compare(paths, batch_sizes=(batch,), threads=args.threads, runs=runs, warmup=args.warmup):
            row = rows[paths.index(t["model"])]
            row[f"ms{batch}"], row[f"speedup{batch}"] = t["median_ms"], t["speedup"]
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | setting | merged (or kept) per block | GFLOPs | FLOPs ratio | b1 ms | b1 speedup | "
             "b32 ms | b32 speedup | b32 efficiency | parity b1 |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = [r["model"], r["setting"], r["schedule"], f"{r['gflops']:.2f}", f"{r['ratio']:.3f}"]
        for b in (1, 32):
            cells += [f"{r[f'ms{b}']:.1f}", f"{r[f'speedup{b}']:.2f}×"] if f"ms{b}" in r else ["—", "—"]
        cells.append(f"{r['speedup32'] * r['ratio']:.2f}" if "speedup32" in r else "—")
        cells.append(f"{r['parity']:.1e}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help="timm names, comma separated")
    ap.add_argument("--r", default="8,13", help="merge counts per block, comma separated")
    ap.add_argument("--target", type=float, default=0.6, help="FLOPs target of the --method tome row")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=20, help="timed runs per setting at batch 1")
    ap.add_argument("--runs32", type=int, default=3, help="timed runs per setting at batch 32 (0: skip)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-cpvit", action="store_true", help="skip the CP-ViT row")
    args = ap.parse_args()
    args.r = [int(r) for r in args.r.split(",") if r]
    torch.set_num_threads(1)
    start, load = time.perf_counter(), os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in filter(None, args.models.split(",")):
            rows += run_model(name, args, workdir)
    print(table(rows))
    print(f"\nrandom weights, 224×224, ONNX opset 18, ONNX Runtime {ort.__version__} CPU, {args.threads} intra-op "
          f"thread(s); batch 1: {args.runs} runs, batch 32: {args.runs32} runs (+{args.warmup} warm-up), settings "
          f"of one model interleaved; {platform.machine()}, {os.cpu_count()} cores, load average {load:.1f} "
          f"before / {os.getloadavg()[0]:.1f} after; {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
