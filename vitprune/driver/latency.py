"""Planning to a *measured* latency target: FLOPs are a proxy, ONNX Runtime time is the goal.

``target_latency = t`` asks for an ONNX model whose batch-1 ORT latency is ``t`` × the original's,
measured on this machine with ``latency_threads`` threads. For width pruning and BoundaryDPT+ the
first round plans to the *latency model* (``cost: latency``, :mod:`vitprune.plan.cost`: per-op ORT
tables measured once on this machine and cached), so the plan is already shaped for latency rather
than for FLOPs; other methods plan to a FLOPs target. Every round exports the candidate and times it
interleaved with the original (so machine noise cancels); when the measured ratio misses by more
than ``tolerance``, the next round scales its target by the measured miss (the model's error, or the
FLOPs/latency efficiency, is locally a constant). It stops within ``tolerance`` of ``t`` or after
``max_rounds``; the report lists every round.

The thread count to deploy with is measured too, once, at the end: extra threads need ops big
enough to amortise waking them, and cores that other processes leave free, so the original and the
chosen candidate are timed at 1 thread, at one per available core and at ``latency_threads``, and
the report names the fastest setting for the compressed model (``best_threads``, the int
``SessionOptions.intra_op_num_threads`` takes) with the reason whenever more threads were slower.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any

from torch import nn

from vitprune.deploy.bench import best_settings, compare, default_threads
from vitprune.deploy.onnx import export_onnx
from vitprune.driver.pipeline import compress_to_flops
from vitprune.frontend.capture import capture, example_input_for
from vitprune.plan.budget import LATENCY_TOLERANCE
from vitprune.report import CompressReport, CompressResult
from vitprune.spec import LATENCY_COST_METHODS, CompressSpec


def compress_to_latency(model: nn.Module, spec: CompressSpec, input_size: tuple[int, int, int], *,
                        source: dict | None = None, calib_data: Any = None, runs: int = 20,
                        tolerance: float = LATENCY_TOLERANCE, max_rounds: int = 5) -> CompressResult:
    """A layer above the FLOPs pipeline: FLOPs targets are tried until the measured latency fits
    (``model``'s inputs were checked by :func:`vitprune.driver.pipeline.prepare`)."""
    target = spec.target_latency
    example_input_size = input_size
    x = example_input_for(example_input_size, batch=1)
    rounds: list[dict[str, float]] = []
    best = None
    with tempfile.TemporaryDirectory(prefix="vitprune-latency-") as tmp:
        original = os.path.join(tmp, "original.onnx")
        # the original goes through the same capture as the candidates: one IR, one exporter path
        export_onnx(capture(model, example_input_for(example_input_size)), x, original, parity_batches=(1,))
        flops_target = target
        cost = "latency" if spec.method in LATENCY_COST_METHODS else "flops"
        for _ in range(max_rounds):
            flops_spec = dataclasses.replace(spec, target_latency=None, target_flops=flops_target, cost=cost,
                                             latency_threads=spec.latency_threads if cost == "latency" else 1)
            result = compress_to_flops(model, flops_spec, input_size, source=source, calib_data=calib_data)
            candidate = os.path.join(tmp, f"candidate{len(rounds)}.onnx")
            export_onnx(result.model, x, candidate, parity_batches=(1,))
            rows = compare([original, candidate], batch_sizes=(1,), threads=spec.latency_threads,
                           runs=runs, warmup=3)
            measured = rows[0]["median_ms"] and rows[1]["median_ms"] / rows[0]["median_ms"]
            rounds.append({"cost": cost, "flops_target": flops_target, "flops_ratio": result.report["flops_ratio"],
                           "latency_ratio": measured, "original_ms": rows[0]["median_ms"],
                           "compressed_ms": rows[1]["median_ms"]})
            error = abs(measured - target)
            if best is None or error < best[0]:
                best = (error, result, measured, candidate)
            if error <= tolerance:
                break
            # measured ≈ constant × planned locally: scale the planned target by the measured miss
            planned = flops_target if cost == "latency" else result.report["flops_ratio"]
            flops_target = min(1.0, max(0.02, planned * target / measured))
        _, result, measured, candidate = best
        threads = thread_sweep(original, candidate, spec.latency_threads, runs)
    report = CompressReport.from_dict(result.report)
    report.latency_plan = {
        "target_latency": target, "measured_latency_ratio": measured, "threads": spec.latency_threads,
        "within_tolerance": abs(measured - target) <= tolerance, "tolerance": tolerance, "rounds": rounds,
        **threads,
    }
    report.spec = spec.to_dict()
    result.report = report.to_dict()
    return result


def thread_sweep(original: str, compressed: str, latency_threads: int, runs: int) -> dict[str, Any]:
    """The fastest intra-op thread count for the compressed model at batch 1, from one interleaved
    run of both models at 1 thread, one per available core and ``latency_threads`` (as many runs as
    one round, at least 5: a busy machine makes fewer meaningless). When the slowest tenth of runs
    is over twice the median, a note says so: the setting was picked from noisy timings.

    Returns the report's keys: "best_threads" (an int for ``SessionOptions.intra_op_num_threads``),
    "best_threads_ms", "speedup_at_best_threads" (each model at its own fastest setting),
    "thread_notes" (why a setting with more threads was slower, either model) and "thread_sweep"
    (per model: the median and speedup at every setting)."""
    settings = tuple(sorted({*default_threads(), latency_threads}))
    rows = compare([original, compressed], batch_sizes=(1,), threads=settings, runs=max(5, runs),
                   warmup=2)
    before, after = best_settings(rows)
    spread = max(r["p90_ms"] / r["median_ms"] for r in rows)
    noisy = [f"timings were noisy (p90 up to {spread:.1f}x the median): rerun on a quiet machine "
             f"before relying on best_threads"] if spread > 2 else []
    sweep = {}
    for label, entry in (("original", before), ("compressed", after)):
        sweep[label] = {k: v for k, v in entry.items() if k not in ("model", "notes")}
    return {
        "best_threads": after["best_threads"], "best_threads_ms": after["best_ms"],
        "speedup_at_best_threads": after["speedup_at_best"],
        "thread_notes": [f"original: {n}" for n in before["notes"]]
                        + [f"compressed: {n}" for n in after["notes"]] + noisy,
        "thread_sweep": {"batch": 1, "threads": list(settings), **sweep},
    }
