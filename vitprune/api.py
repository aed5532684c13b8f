"""The driver: load → capture → analyse → plan → rewrite → export, as one Python call.

``compress(model, spec)`` returns a :class:`CompressResult` whose ``model`` is a GraphModule with
physically smaller parameters. ``save_compressed`` writes it as a ``.pt2`` (``torch.export.save``):
plain torch reloads it with ``torch.export.load(path).module()``, with no model code from anywhere.
The result also carries a *recipe* (the passes and their arguments): :func:`replay` re-applies it to
a fresh capture of the original model.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from passes import PASSES, Cleanup, PassManager

from .deps import DependencyGraph
from .errors import InputError, LoadError, PlanError, UnsupportedModelError, VitpruneError
from .flops import FlopModel, count_flops, count_params, flops_by_block, params_by_block
from .latency import compress_to_latency
from . import methods
from .spec import CompressSpec
from .capture import capture, example_input_for, export_program
from .load import check_weights
from .outputs import OutputSet, atomic_write, check_destination, output_paths


@dataclass
class CompressResult:
    model: fx.GraphModule
    report: dict[str, Any]
    recipe: list[dict[str, Any]] = field(default_factory=list)
    source: dict[str, Any] | None = None
    input_size: tuple[int, int, int] = (3, 224, 224)


def resolve_input_size(model: nn.Module, spec_size: tuple[int, int, int] | None = None,
                       given: tuple[int, int, int] | None = None) -> tuple[int, int, int]:
    if spec_size:
        return tuple(spec_size)
    if given:
        return tuple(given)
    from .load import input_size_of

    return input_size_of(model)


def analyse(model: nn.Module, input_size: tuple[int, int, int]) -> tuple[fx.GraphModule, DependencyGraph]:
    """Trace a copy of ``model`` and build its dependency graph; refuse models with no attention."""
    gm = capture(model, example_input_for(input_size))
    dg = DependencyGraph.build(gm)
    if not _has_attention(dg):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no attention (no scaled_dot_product_attention and no "
            "matmul → softmax → matmul): vitprune compiles Vision Transformers")
    return gm, dg


def _has_attention(dg: DependencyGraph) -> bool:
    from .deps.branches import is_attention_core

    return any(is_attention_core(n, dg.gm) for n in dg.gm.graph.nodes
               if n.op in ("call_function", "call_method", "call_module"))


def compress(model: nn.Module, spec: CompressSpec | None = None, *,
             example_input_size: tuple[int, int, int] | None = None,
             source: dict[str, Any] | None = None,
             calib_data: Iterable[tuple[torch.Tensor, torch.Tensor | None]] | None = None,
             train_data: Any = None, val_data: Any = None,
             finetune_config: Any = None) -> CompressResult:
    """Compress ``model`` as ``spec`` asks; the original model is left untouched.

    Stages (see :mod:`vitprune.methods`): depth → width → tokens, each through graph passes, then
    recovery fine-tuning with distillation from the original when ``train_data`` is given and
    ``spec.epochs > 0``. ``calib_data`` (an iterable of ``(images, labels)``) feeds importance scores,
    one-shot depth selection and CP-ViT calibration; random images are used without it.
    """
    spec = spec or CompressSpec()
    t0 = time.perf_counter()
    input_size = resolve_input_size(model, spec.input_size, example_input_size)
    spec.check_data(train_data is not None)
    check_weights(model)
    check_input_size(model, input_size)
    if spec.target_latency is not None:
        return compress_to_latency(model, spec, compress, example_input_size=input_size, source=source,
                                   calib_data=calib_data)
    gm, dg = analyse(model, input_size)
    x = gm.meta["example_input"]
    flop_model = FlopModel(dg)  # per-node FLOPs from torch's counter: the base count and the planner's model
    base_flops, base_params = flop_model.flops(), count_params(gm)
    groups_before = {g.name: g.size for g in dg.groups}
    teacher = methods.copy_teacher(model) if methods.needs_teacher(spec, train_data) else None
    gm, recipe, stages = _run_stages(gm, teacher, spec, flop_model, calib_data, train_data)
    flops, params = count_flops(gm, x), count_params(gm)
    if spec.method != "width" or spec.tokens or spec.remove_attention or spec.remove_activation:
        _check_target(spec, flops / base_flops)
    recovery = None
    if train_data is not None and spec.epochs > 0:
        recovery = _recover(gm, teacher, spec, train_data, val_data, finetune_config)
    dg_after = DependencyGraph.build(gm)
    report = {
        "method": spec.method,
        "spec": spec.to_dict(),
        "input_size": list(input_size),
        "flops_before": base_flops,
        "flops_after": flops,
        "flops_ratio": flops / base_flops,
        "params_before": base_params,
        "params_after": params,
        "params_ratio": params / base_params,
        "plan": stages.get("width", {}),
        "stages": stages,
        "groups": _group_widths(dg, dg_after, groups_before),
        "unsupported_ops": [str(u) for u in dg.unsupported],
        "recovery": recovery,
        "compile_seconds": round(time.perf_counter() - t0, 3),
    }
    return CompressResult(gm.eval(), report, recipe, source, tuple(input_size))


def _run_stages(gm: fx.GraphModule, teacher: nn.Module | None, spec: CompressSpec, flop_model: FlopModel,
                calib_data: Any, train_data: Any) -> tuple[fx.GraphModule, list[dict[str, Any]], dict[str, Any]]:
    """Depth → width → tokens, every pass through one PassManager (a failure names the passes
    before it), then a value-preserving cleanup. Returns (graph, recipe, per-stage report)."""
    if spec.target_flops is not None and spec.target_flops >= 1.0:
        return gm, [], {}
    base_flops = flop_model.flops()
    input_size = tuple(gm.meta["example_input"].shape[1:])
    batches = methods.calibration(spec, input_size, calib_data)
    search_data = train_data if spec.depth_selection == "search" else None
    manager = PassManager()
    stages: dict[str, Any] = {}
    gm, depth, stages["depth"] = methods.depth_stage(gm, teacher, spec, base_flops, batches, search_data, manager)
    unchanged = flop_model if not depth else None  # depth changed the graph: the model must be rebuilt
    gm, width, stages["width"] = methods.width_stage(gm, spec, base_flops, batches, calib_data is not None,
                                                     manager, unchanged)
    gm, tokens, stages["tokens"] = methods.token_stage(gm, spec, base_flops, batches, manager)
    cleanup = manager.apply(Cleanup(), gm)
    return cleanup.graph_module, depth + width + tokens + ([cleanup.recipe] if cleanup.modified else []), stages


def _check_target(spec: CompressSpec, achieved: float) -> None:
    """Methods other than width land on discrete FLOPs steps; say so when far from the target."""
    if spec.target_flops is not None and achieved > spec.target_flops + 0.01:
        raise PlanError(f"{spec.method} reached {achieved:.3f} of the original FLOPs, above the target "
                        f"{spec.target_flops}; allow more (e.g. --method boundarydpt+)")


def _recover(gm: fx.GraphModule, teacher: nn.Module, spec: CompressSpec, train_data: Any, val_data: Any,
             config: Any) -> dict[str, Any]:
    from .train import FinetuneConfig, finetune

    config = config or FinetuneConfig(epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size,
                                      seed=spec.seed, progress=False)
    return finetune(gm, teacher, train_data, val_data, config)


def _group_widths(before: DependencyGraph, after: DependencyGraph, sizes: dict[str, int]) -> list[dict]:
    now = {g.name: g.size for g in after.groups}
    return [
        {"name": g.name, "kind": g.kind, "before": g.size, "after": now.get(g.name, g.size)}
        for g in before.groups if g.prunable
    ]


# -- inspection ----------------------------------------------------------------------------------
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
def replay(model: nn.Module, recipe: list[dict[str, Any]], input_size: tuple[int, int, int]) -> fx.GraphModule:
    """Trace ``model`` and re-apply the passes of ``recipe`` (shapes only; weights come after)."""
    gm = capture(model, example_input_for(tuple(input_size)))
    for step in recipe:
        cls = PASSES.get(step.get("pass"))
        if cls is None:
            raise LoadError(f"unknown pass {step.get('pass')!r} in recipe (written by a newer vitprune?)")
        gm = cls.from_recipe(step)(gm).graph_module
    return gm


def exported_program(model: nn.Module, input_size: tuple[int, int, int]) -> torch.export.ExportedProgram:
    """The compressed model as an ExportedProgram with a dynamic batch (what ``PREFIX.pt2`` holds)."""
    return export_program(model, example_input_for(tuple(input_size)))


def save_compressed(result: CompressResult, path: str | os.PathLike) -> None:
    """Write ``result.model`` to ``path`` as a ``.pt2`` (``torch.export.save``), atomically.

    ``torch.export.load(path).module()`` runs it with plain torch: no vitprune, timm or transformers
    import, no pickled model class. The report rides along as ``vitprune.json`` in the archive."""
    atomic_write(path, lambda f: _save_pt2(result, f))


def _save_pt2(result: CompressResult, f: Any) -> None:
    program = exported_program(result.model, result.input_size)
    meta = json.dumps({"input_size": list(result.input_size), "recipe": result.recipe,
                       "source": result.source, "report": result.report}, default=str)
    torch.export.save(program, f, extra_files={"vitprune.json": meta})


def load_compressed(path: str | os.PathLike) -> nn.Module:
    """Reload a ``.pt2`` written by :func:`save_compressed` (or any ``torch.export.save`` file).

    ``torch.export.load`` may run code stored in the archive (torch's own warning), so only load
    files you trust; ``vitprune.load_model(path, trust_pickle=True)`` is the checked entry point."""
    from .load import load_model

    return load_model(os.fspath(path), trust_pickle=True).model


def export_model(model: nn.Module, path: str | os.PathLike, *, input_size: tuple[int, int, int] | None = None,
                 opset: int = 18) -> dict[str, Any]:
    """The (unpruned) model as a checked ONNX file, captured exactly as ``compress`` captures it, so
    the original and the compressed model go through one IR and one exporter path. The file
    appears only when every check passed (an :class:`~vitprune.outputs.OutputSet` of one)."""
    from .export import check_opset, export_onnx

    check_opset(opset)
    check_destination([path])  # before the capture, which is the slow part
    size = resolve_input_size(model, None, input_size)
    check_input_size(model, size)
    gm = capture(model, example_input_for(size))
    with OutputSet({"onnx": path}) as out:
        info = export_onnx(gm, example_input_for(size, batch=1), out.path("onnx"), opset=opset)
        out.commit()
    info["path"] = os.fspath(path)
    return info


def write_outputs(result: CompressResult, prefix: str | os.PathLike, *, export: bool = True,
                  opset: int = 18) -> dict[str, str]:
    """Write PREFIX.onnx (unless ``export=False``), PREFIX.pt2 and PREFIX.json as one set.

    All or nothing (:class:`~vitprune.outputs.OutputSet`): the files are staged in a hidden folder
    beside PREFIX and swapped in together; on any failure or signal the old files stay as they were.
    A kind this run does not write (PREFIX.onnx under ``export=False``) is removed with the swap, so
    the files at PREFIX always describe one model. Returns ``{kind: path}`` of the files written."""
    from .export import check_opset, export_onnx

    if export:
        check_opset(opset)
    files, stale = output_paths(prefix, export)
    report = dict(result.report)
    with OutputSet(files, stale=stale) as out:
        if export:
            report["onnx"] = export_onnx(result.model, example_input_for(result.input_size, batch=1),
                                         out.path("onnx"), opset=opset)
            report["onnx"]["path"] = files["onnx"]
        _save_pt2(dataclasses.replace(result, report=report), out.path("pt2"))
        with open(out.path("json"), "w") as f:
            json.dump(report, f, indent=2)
        out.commit()
    result.report = report
    return files


# -- input checks ---------------------------------------------------------------------------------
def check_input_size(model: nn.Module, input_size: Sequence[int]) -> None:
    """Refuse an input size the model's first convolution cannot take, before any capture.

    The convolution is the first ``nn.Conv2d`` the forward reaches (found by running the model at
    its own input size up to that call; the first one registered when that does not work): the
    patch embedding of a ViT, or the stem of a hybrid. Its ``in_channels`` must equal C, and for a
    patchifying convolution (kernel = stride, no padding) H and W must be multiples of the patch."""
    found = first_conv(model)
    if found is None:
        return  # e.g. a .pt2 module: its input size is fixed and checked when it is loaded
    name, conv = found
    c, h, w = (int(v) for v in input_size)
    if c != conv.in_channels:
        raise InputError(f"the model expects {conv.in_channels} input channels (its first convolution, {name}, "
                         f"takes {conv.in_channels}) but the input size {c}x{h}x{w} has {c}")
    if conv.padding == "same":
        return  # any size fits
    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    pads = conv.padding if isinstance(conv.padding, tuple) else (0, 0)  # "valid" is no padding
    reach = [conv.dilation[i] * (conv.kernel_size[i] - 1) + 1 - 2 * pads[i] for i in (0, 1)]
    patchify = (kh, kw) == (sh, sw) and pads == (0, 0) and conv.dilation == (1, 1)
    px = f"{kh} px" if kh == kw else f"{kh}x{kw} px"
    what = f"the model's patch is {px}" if patchify else f"the model's first convolution is {px}"
    if h < reach[0] or w < reach[1]:
        raise InputError(f"{what} ({name}, stride {sh}x{sw}) and the input {c}x{h}x{w} is smaller than that")
    if patchify and (h % sh or w % sw):
        raise InputError(f"{what} ({name}) and the input {c}x{h}x{w} is not a multiple of it: the border "
                         f"would be cut off; use a multiple of {sh}, e.g. {max(sh, h // sh * sh)}")


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """``(name, conv)`` of the first ``nn.Conv2d`` the model applies to its input, or None."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        return None
    reached = _first_called(model, convs)
    return reached if reached is not None else convs[0]


class _Reached(Exception):
    """Stops the probe forward at the first convolution."""


def _first_called(model: nn.Module, convs: list[tuple[str, nn.Conv2d]]) -> tuple[str, nn.Conv2d] | None:
    """Run the model on a zero image of its own input size until the first Conv2d is called."""
    try:
        size = resolve_input_size(model)
    except VitpruneError:
        return None
    names = {id(m): n for n, m in convs}

    def hook(module: nn.Module, args: Any) -> None:
        raise _Reached(names[id(module)], module)

    param = next(iter(model.parameters()), None)
    like = {"device": param.device, "dtype": param.dtype} if param is not None and param.is_floating_point() else {}
    handles = [m.register_forward_pre_hook(hook) for _, m in convs]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *size, **like))
    except _Reached as e:
        return e.args[0], e.args[1]
    except Exception:  # the model's own checks refused the probe: fall back to registration order
        return None
    finally:
        for h in handles:
            h.remove()
    return None
