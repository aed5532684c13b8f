"""ORT latency of width-pruned DeiT-S / DeiT-B against the original, in one interleaved run.

For each model: export the original, compress to each FLOPs target (L2 importance, global ranking,
``--round-to``), export, then time every ONNX file round-robin in ONNX Runtime (CPU, fixed threads).
Prints a Markdown table with FLOPs ratio, median/p90 latency, speedup and the latency efficiency
``speedup ÷ (original FLOPs / pruned FLOPs)`` (1.0 = latency falls exactly as FLOPs do).

    python benchmarks/latency.py --models deit_small_patch16_224,deit_base_patch16_224 \\
        --targets 0.75,0.5,0.3 --batches 1,8 --threads 1 --runs 20
Random weights (no hub access here): latency depends on shapes only.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import onnxruntime as ort
import timm
import torch

from vitprune import CompressSpec, compress
from vitprune.deploy.bench import compare
from vitprune.deploy.onnx import export_onnx
from vitprune.deps.flops import count_flops
from vitprune.frontend.capture import capture, example_input_for


def run(model_name: str, targets: list[float], batches: list[int], threads: int, runs: int,
        round_to: int, workdir: str) -> list[dict]:
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).eval()
    x = example_input_for((3, 224, 224), batch=1)
    base_flops = count_flops(model, x)
    paths = [os.path.join(workdir, f"{model_name}_orig.onnx")]
    export_onnx(capture(model, example_input_for((3, 224, 224))), x, paths[0], parity_batches=(1,))
    info = [{"target": 1.0, "flops": base_flops, "params": sum(p.numel() for p in model.parameters()),
             "compile_s": 0.0}]
    for target in targets:
        t0 = time.perf_counter()
        result = compress(model, CompressSpec(target_flops=target, round_to=round_to))
        compile_s = time.perf_counter() - t0
        path = os.path.join(workdir, f"{model_name}_{target}.onnx")
        export_onnx(result.model, x, path, parity_batches=(1,))
        paths.append(path)
        info.append({"target": target, "flops": result.report["flops_after"],
                     "params": result.report["params_after"], "compile_s": compile_s})
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
        })
    return out


def table(rows: list[dict]) -> str:
    head = ("| model | target | batch | FLOPs ratio | params (M) | median ms | p90 ms | speedup | "
            "efficiency | compile s |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['target']:.2f} | {r['batch']} | {r['flops_ratio']:.3f} | "
                     f"{r['params_M']:.1f} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | "
                     f"{r['speedup']:.2f}× | {r['efficiency']:.2f} | {r['compile_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="deit_small_patch16_224,deit_base_patch16_224")
    p.add_argument("--targets", default="0.75,0.5,0.3")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--round-to", type=int, default=16)
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models.split(","):
            rows += run(name, [float(t) for t in args.targets.split(",")],
                        [int(b) for b in args.batches.split(",")], args.threads, args.runs,
                        args.round_to, workdir)
    print(f"ORT {ort.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, threads={args.threads}, round_to={args.round_to}\n")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
