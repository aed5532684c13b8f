"""The Python face of vitprune: what the CLI calls, and what a user scripts.

``compress(model, spec)`` returns a :class:`CompressResult` whose ``model`` is a GraphModule with
physically smaller parameters: to a FLOPs target through the pipeline
(:func:`vitprune.driver.pipeline.compress_to_flops`), or to a measured latency target through the
layer above it (:func:`vitprune.driver.latency.compress_to_latency`). ``write_outputs`` writes the
``.onnx``, ``.pt2`` and ``.json`` as one set; ``save_compressed``/``load_compressed`` the ``.pt2``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Iterable

import torch
from torch import nn

from vitprune import progress
from vitprune.deploy.onnx import check_opset, export_onnx
from vitprune.deploy.outputs import OutputSet, check_destination, output_paths
from vitprune.deploy.pt2 import load_compressed, save_compressed, write_pt2
from vitprune.driver.latency import compress_to_latency
from vitprune.driver.pipeline import analyse, compress_to_flops, inspect_model, prepare, replay
from vitprune.frontend.capture import capture, example_input_for
from vitprune.frontend.inputs import check_input_size, resolve_input_size
from vitprune.report import CompressResult, peak_rss_mib
from vitprune.spec import CompressSpec

__all__ = ["CompressResult", "analyse", "compress", "export_model", "format_inspect", "inspect_model",
           "load_compressed", "replay", "save_compressed", "write_outputs"]


def compress(model: nn.Module, spec: CompressSpec | None = None, *,
             example_input_size: tuple[int, int, int] | None = None,
             source: dict[str, Any] | None = None,
             calib_data: Iterable[tuple[torch.Tensor, torch.Tensor | None]] | None = None,
             train_data: Any = None, val_data: Any = None,
             finetune_config: Any = None) -> CompressResult:
    """Compress ``model`` as ``spec`` asks; the original model is left untouched.

    Stages (see :mod:`vitprune.plan.stages`): depth → width → heads → tokens, each through graph
    passes, then recovery fine-tuning with distillation from the original when ``train_data`` is given
    and ``spec.epochs > 0``. ``calib_data`` (an iterable of ``(images, labels)``) feeds importance
    scores, one-shot depth selection and CP-ViT calibration; random images are used without it.
    """
    spec = spec or CompressSpec()
    input_size = prepare(model, spec, example_input_size, train_data)
    if spec.target_latency is not None:
        return compress_to_latency(model, spec, input_size, source=source, calib_data=calib_data)
    return compress_to_flops(model, spec, input_size, source=source, calib_data=calib_data,
                             train_data=train_data, val_data=val_data, finetune_config=finetune_config)


# -- inspection ----------------------------------------------------------------------------------
def format_inspect(d: dict[str, Any]) -> str:
    lines = [f"{d['model']}  input {tuple(d['input_size'])}  {d['flops'] / 1e9:.3f} GFLOPs  "
             f"{d['params'] / 1e6:.2f} M params", "", "Prunable channel groups:",
             f"  {'kind':<9} {'size':>6} {'members':>7}  name"]
    for g in d["groups"]:
        lines.append(f"  {g['kind']:<9} {g['size']:>6} {len(g['members']):>7}  {g['name']}")
    lines += [f"  ({d['frozen_groups']} more groups are frozen: model input/output, indexed, spatial)", "",
              f"  {'block':<24} {'MFLOPs':>10} {'params (K)':>11}"]
    params = d.get("params_by_block", {})
    for scope in list(d["flops_by_block"]) + [s for s in params if s not in d["flops_by_block"]]:
        flops = d["flops_by_block"].get(scope, 0)
        lines.append(f"  {scope:<24} {flops / 1e6:10.1f} {params.get(scope, 0) / 1e3:11.1f}")
    if d["unsupported_ops"]:
        lines += ["", "Unsupported ops (their channels are frozen):"] + [f"  {u}" for u in d["unsupported_ops"]]
    else:
        lines += ["", "Unsupported ops: none"]
    return "\n".join(lines)


# -- saving and loading -------------------------------------------------------------------------
def export_model(model: nn.Module, path: str | os.PathLike, *, input_size: tuple[int, int, int] | None = None,
                 opset: int = 18) -> dict[str, Any]:
    """The (unpruned) model as a checked ONNX file, captured exactly as ``compress`` captures it, so
    the original and the compressed model go through one IR and one exporter path. The file
    appears only when every check passed (an :class:`~vitprune.deploy.outputs.OutputSet` of one)."""
    check_opset(opset)
    check_destination([path])  # before the capture, which is the slow part
    size = resolve_input_size(model, None, input_size)
    check_input_size(model, size)
    with progress.step("capture (torch.export)"):
        gm = capture(model, example_input_for(size))
    with OutputSet({"onnx": path}) as out, progress.step("ONNX export, checks and ORT parity"):
        info = export_onnx(gm, example_input_for(size, batch=1), out.path("onnx"), opset=opset)
        out.commit()
    info["path"] = os.fspath(path)
    return info


def write_outputs(result: CompressResult, prefix: str | os.PathLike, *, export: bool = True,
                  opset: int = 18) -> dict[str, str]:
    """Write PREFIX.onnx (unless ``export=False``), PREFIX.pt2 and PREFIX.json as one set.

    All or nothing (:class:`~vitprune.deploy.outputs.OutputSet`): the files are staged in a hidden folder
    beside PREFIX and swapped in together; on any failure or signal the old files stay as they were.
    A kind this run does not write (PREFIX.onnx under ``export=False``) is removed with the swap, so
    the files at PREFIX always describe one model. Returns ``{kind: path}`` of the files written."""
    if export:
        check_opset(opset)
    files, stale = output_paths(prefix, export)
    report = dict(result.report)
    timings = report["timings"] = dict(report.get("timings") or {})
    with OutputSet(files, stale=stale) as out:
        if export:
            start = time.perf_counter()
            with progress.step("ONNX export, checks and ORT parity"):
                report["onnx"] = export_onnx(result.model, example_input_for(result.input_size, batch=1),
                                             out.path("onnx"), opset=opset)
            report["onnx"]["path"] = files["onnx"]
            timings["onnx"] = round(time.perf_counter() - start, 3)
        start = time.perf_counter()
        with progress.step("write .pt2"):
            write_pt2(dataclasses.replace(result, report=report), out.path("pt2"))
        timings["pt2"] = round(time.perf_counter() - start, 3)
        report["peak_rss_mib"] = peak_rss_mib()
        with open(out.path("json"), "w") as f:
            json.dump(report, f, indent=2)
        out.commit()
    result.report = report
    return files


# -- input checks ---------------------------------------------------------------------------------
