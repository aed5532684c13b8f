"""Planning to a *measured* latency target: FLOPs are a proxy, ONNX Runtime time is the goal.

``target_latency = t`` asks for an ONNX model whose batch-1 ORT latency is ``t`` × the original's,
measured on this machine with ``latency_threads`` threads. Each round compresses to a FLOPs target,
exports, and times the candidate interleaved with the original (so machine noise cancels); the next
FLOPs target follows from the measured latency/FLOPs ratio (latency is locally proportional to FLOPs,
with the measured efficiency as the constant). It stops when the measured ratio is within
``tolerance`` of ``t`` or after ``max_rounds``; the report lists every round.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any

from torch import nn

from vitprune.deploy.bench import compare
from vitprune.deploy.onnx import export_onnx
from vitprune.driver.pipeline import compress_to_flops
from vitprune.frontend.capture import capture, example_input_for
from vitprune.plan.budget import LATENCY_TOLERANCE
from vitprune.report import CompressResult
from vitprune.spec import CompressSpec


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
        for _ in range(max_rounds):
            flops_spec = dataclasses.replace(spec, target_latency=None, target_flops=flops_target)
            result = compress_to_flops(model, flops_spec, input_size, source=source, calib_data=calib_data)
            candidate = os.path.join(tmp, f"candidate{len(rounds)}.onnx")
            export_onnx(result.model, x, candidate, parity_batches=(1,))
            rows = compare([original, candidate], batch_sizes=(1,), threads=spec.latency_threads,
                           runs=runs, warmup=3)
            measured = rows[0]["median_ms"] and rows[1]["median_ms"] / rows[0]["median_ms"]
            rounds.append({"flops_target": flops_target, "flops_ratio": result.report["flops_ratio"],
                           "latency_ratio": measured, "original_ms": rows[0]["median_ms"],
                           "compressed_ms": rows[1]["median_ms"]})
            error = abs(measured - target)
            if best is None or error < best[0]:
                best = (error, result, measured)
            if error <= tolerance:
                break
            # latency ≈ efficiency⁻¹ × FLOPs locally: scale the FLOPs target by the measured miss
            flops_target = min(1.0, max(0.02, result.report["flops_ratio"] * target / measured))
    _, result, measured = best
    result.report["latency_plan"] = {
        "target_latency": target, "measured_latency_ratio": measured, "threads": spec.latency_threads,
        "within_tolerance": abs(measured - target) <= tolerance, "tolerance": tolerance, "rounds": rounds,
    }
    result.report["spec"] = spec.to_dict()
    return result
