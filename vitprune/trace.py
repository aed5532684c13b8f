"""Tracing: ``torch.fx.symbolic_trace`` + graph normalisation + shape propagation.

Normalisation makes every later step see one spelling of each op:

* parameterised leaf modules (``nn.Linear``, ``nn.Conv2d``, ``nn.LayerNorm``) become ``F.linear`` /
  ``F.conv2d`` / ``F.layer_norm`` calls on ``get_attr`` parameters, so every parameter in the graph is
  a ``get_attr`` node and the passes slice parameters in one way;
* ``nn.Identity`` calls and tracing-time input asserts are removed.

Shape propagation uses :class:`torch.fx.passes.shape_prop.ShapeProp` and additionally records the
concrete value of non-tensor nodes (``x.shape[1]`` → 197) in ``node.meta["value"]`` so rules can read
sizes that reach ``reshape`` through the graph.
"""
from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp

from .errors import UnsupportedModelError

_ASSERTS = {torch._assert, getattr(fx._symbolic_trace, "_assert_is_none", None)} - {None}


def trace_model(model: nn.Module, example_input: torch.Tensor) -> fx.GraphModule:
    """Trace a copy of ``model`` (eval mode) into a normalised GraphModule with shapes in ``node.meta``.

    The GraphModule owns its parameters: passes that slice them never touch the caller's model.
    """
    model = copy.deepcopy(model).eval()
    if isinstance(model, fx.GraphModule):
        gm = model
    else:
        concrete = _default_args(model)
        try:
            gm = fx.symbolic_trace(model, concrete_args=concrete or None)
        except Exception as e:  # tracing errors come in many types; the message names the construct
            raise UnsupportedModelError(
                f"torch.fx cannot trace {type(model).__name__}: {type(e).__name__}: {_one_line(e)}"
                f"{_model_frame(e)}"
            ) from e
    normalize(gm)
    if example_input.shape[0] < 2:
        # at batch 1 the batch dim looks like any size-1 dim; batch 2 keeps it recognisable, so the
        # passes leave it dynamic when they rewrite shape constants
        example_input = example_input.expand(2, *example_input.shape[1:]).clone()
    propagate_shapes(gm, example_input)
    gm.meta["example_input"] = example_input
    return gm


def _default_args(model: nn.Module) -> dict[str, Any]:
    """Specialise optional forward arguments (timm: ``attn_mask=None``) to their defaults."""
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    return {
        p.name: p.default
        for p in params
        if p.default is not inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _model_frame(e: BaseException) -> str:
    """Where in the model's own code tracing stopped (the innermost frame outside torch)."""
    import traceback

    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/torch/" not in f.filename
              and "/vitprune/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {f.filename.rsplit('site-packages/', 1)[-1]}:{f.lineno}: `{(f.line or '').strip()}`)"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:400]


def normalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite leaf modules into functional calls and drop asserts/identities (in place)."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and _is_wrapped_python_function(node.target):
            _inline_function(graph, node)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _ASSERTS:
            graph.erase_node(node)
        elif node.op == "call_module":
            _functionalize_module(gm, node)
    graph.eliminate_dead_code()
    _drop_unused_placeholders(graph)
    graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm


def _is_wrapped_python_function(fn: Any) -> bool:
    """A plain Python function kept opaque by ``torch.fx.wrap`` (timm: ``maybe_add_mask``)."""
    module = getattr(fn, "__module__", "") or ""
    return inspect.isfunction(fn) and not module.startswith(("torch", "operator", "builtins"))


def _inline_function(graph: fx.Graph, node: fx.Node) -> None:
    """Trace a wrapped helper with its constant arguments baked in and splice its graph in place.

    ``maybe_add_mask(scores, None)`` becomes ``scores``; helpers whose control flow depends on a
    traced value stay opaque (the dependency graph then reports them as unsupported ops).
    """
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
        bound.apply_defaults()
    except (TypeError, ValueError):
        return
    constants = {k: v for k, v in bound.arguments.items() if not isinstance(v, fx.Node)}
    if any(isinstance(v, (list, tuple, dict)) for v in constants.values()):
        return
    try:
        sub = fx.symbolic_trace(node.target, concrete_args=constants)
    except Exception:  # data-dependent control flow on a traced value: keep the call opaque
        return
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    output = next(n for n in sub.graph.nodes if n.op == "output")
    if (len(placeholders) != len(bound.arguments) or isinstance(output.args[0], (tuple, list, dict))
            or any(n.op in ("get_attr", "call_module") for n in sub.graph.nodes)):
        return
    env: dict[fx.Node, Any] = dict(zip(placeholders, bound.arguments.values()))
    with graph.inserting_before(node):
        for n in sub.graph.nodes:
            if n.op not in ("placeholder", "output"):
                env[n] = graph.node_copy(n, lambda a: env[a])
    value = fx.node.map_arg(output.args[0], lambda a: env[a])
    if isinstance(value, fx.Node):
        node.replace_all_uses_with(value)
    else:  # the helper folded to a constant (None for "no mask")
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda a: value if a is node else a)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda a: value if a is node else a)
    graph.erase_node(node)


def _drop_unused_placeholders(graph: fx.Graph) -> None:
    """Specialised optional inputs (defaults baked in by tracing) are removed from the signature."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node in placeholders[1:]:
        if not node.users:
            graph.erase_node(node)


def _functionalize_module(gm: fx.GraphModule, node: fx.Node) -> None:
    module = gm.get_submodule(node.target)
    graph = gm.graph
    if isinstance(module, nn.Identity):
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
        return
    prefix = node.target

    def attr(name: str) -> fx.Node | None:
        return graph.get_attr(f"{prefix}.{name}") if getattr(module, name, None) is not None else None

    with graph.inserting_before(node):
        if type(module) is nn.Linear:
            new = graph.call_function(F.linear, (node.args[0], attr("weight"), attr("bias")))
        elif type(module) is nn.Conv2d and module.padding_mode == "zeros":
            new = graph.call_function(
                F.conv2d,
                (node.args[0], attr("weight"), attr("bias"), module.stride, module.padding,
                 module.dilation, module.groups),
            )
        elif type(module) is nn.LayerNorm:
            new = graph.call_function(
                F.layer_norm,
                (node.args[0], tuple(module.normalized_shape)),
                {"weight": attr("weight"), "bias": attr("bias"), "eps": module.eps},
            )
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.training \
                and module.track_running_stats:
            # eval-mode batch norm is a per-channel affine over running statistics
            new = graph.call_function(
                F.batch_norm,
                (node.args[0], attr("running_mean"), attr("running_var"), attr("weight"), attr("bias"),
                 False, 0.0, module.eps),
            )
        else:
            return  # parameter-free leaf modules (GELU, Dropout, ...) stay; rules know them by class
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


class _ShapeAndValueProp(ShapeProp):
    """ShapeProp that also keeps small non-tensor results (ints, sizes) in ``meta['value']``."""

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as e:
            raise UnsupportedModelError(
                f"shape propagation failed at `{n.format_node()}`: {type(e).__name__}: {_one_line(e)}"
            ) from e
        if not isinstance(result, torch.Tensor) and _is_small_value(result):
            n.meta["value"] = result
        else:
            n.meta.pop("value", None)
        return result


def _is_small_value(v: Any) -> bool:
    if isinstance(v, (int, float, bool, str, type(None), torch.Size, torch.dtype, torch.device)):
        return True
    if isinstance(v, (tuple, list)):
        return all(_is_small_value(x) for x in v)
    return False


def propagate_shapes(gm: fx.GraphModule, example_input: torch.Tensor) -> None:
    """Fill ``node.meta['tensor_meta']`` (and ``meta['value']``) for ``example_input``'s shape.

    Runs on fake tensors (shapes and dtypes only, no arithmetic), so it costs milliseconds even for
    ViT-B while still failing on any shape inconsistency.
    """
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with torch.no_grad():
        _ShapeAndValueProp(gm, fake_mode=fake_mode).propagate(example_input)


def tensor_shape(node: fx.Node) -> tuple[int, ...] | None:
    """The propagated shape of a tensor-valued node, or None."""
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def example_input_for(input_size: tuple[int, int, int], batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A deterministic example image batch of shape ``(batch, *input_size)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *input_size), generator=g)
