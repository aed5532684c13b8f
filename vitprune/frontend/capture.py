"""Capture: one ATen-level FX graph for every model, through ``torch.export``.

``capture(model, example_input)`` exports a copy of the model (non-strict, batch dynamic, every other
size static from the example input) and returns the unlifted ``GraphModule``: parameters and buffers
are ``get_attr`` nodes, every op is an ATen ``OpOverload`` (``aten.linear.default``,
``aten.view.default``, ``aten.scaled_dot_product_attention.default`` ...), and sizes that depend on the
batch are ``aten.sym_size.int`` nodes. The same graph comes out whether the model is timm,
Hugging Face transformers, torchvision, einops-based, hand-written, or a ``.pt2`` someone exported.

Normalisation keeps what the passes need and nothing else:

* the graph takes the image tensor and returns the first tensor of the model's output (HF
  ``ModelOutput.logits``, the first element of a tuple) through plain FX code generation;
* export's runtime guards and metadata asserts are dropped (the passes re-check shapes themselves);
* eval-mode dropout (the identity) is dropped;
* a batch-dependent size computed in the graph (``B·heads``, ``N·B``) is the one a ``view``/``reshape``
  infers (``-1``; a static ``-1`` it displaces is written out). Otherwise a channel or token
  count would hide in SymInt arithmetic that no pass rewrites: SAM reshapes to
  ``(B·heads, N, -1)``, torchvision's attention to ``(N·B, C)``;
* ``view`` becomes ``reshape`` (the same values) unless its tensor is written in place: a pass may
  then change a layout (slice a weight, drop a ``contiguous``) without a later view failing on
  strides, as torchvision's and swin's views of transposed tensors would;
* attention masks that mask nothing are dropped: Hugging Face builds an all-true mask (an all-zero
  additive one for eager attention) from sizes alone, even for images. Found by value (the
  mask's data-free subgraph is evaluated once), they would otherwise pin the sequence length
  and block token pruning, and they cost ONNX nodes.

Shape propagation records, at a concrete batch of 2, ``node.meta["tensor_meta"]`` for tensors and
``node.meta["value"]`` for sizes (``sym_size(x, 0)`` → 2), so rules read plain integers; export's own
symbolic ``node.meta["val"]`` stays as it was captured.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import operator
import traceback
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.utils import _pytree as pytree

from vitprune.errors import UnsupportedModelError, one_line

#: export-inserted checks with no data output; the passes re-verify shapes after every rewrite
_ASSERT_OPS = frozenset({
    torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_scalar.default,
    torch.ops.aten.sym_constrain_range_for_size.default, torch.ops.aten._assert_async.msg,
})


#: dropout, out of place or in place (``nn.Dropout(inplace=True)``): the identity in eval mode
_DROPOUTS = (torch.ops.aten.dropout.default, torch.ops.aten.dropout_.default)


def capture(model: nn.Module, example_input: torch.Tensor) -> fx.GraphModule:
    """Export a copy of ``model`` (eval mode) into a normalised ATen GraphModule with shapes in
    ``node.meta``. The GraphModule owns its parameters: passes never touch the caller's model."""
    example_input = _batch_of_two(example_input)
    model = copy.deepcopy(model).eval()
    gm = export_program(model, example_input).module()
    normalize(gm)
    propagate_shapes(gm, example_input)
    if drop_neutral_masks(gm, example_input):
        propagate_shapes(gm, example_input)
    gm.meta["example_input"] = example_input
    return gm.eval()


#: The name of the dynamic batch axis, in the exported program and in the ONNX file.
BATCH_DIM = "batch"


def export_program(model: nn.Module, example_input: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` as vitprune uses it everywhere: non-strict, the batch dynamic, every other
    size static from ``example_input``; a failure is one line naming the user's source line. The one
    export call behind both the captured IR and the ``.pt2`` output."""
    x = _batch_of_two(example_input)
    batch = torch.export.Dim(BATCH_DIM, min=1)
    try:
        with torch.no_grad(), _quiet_torch_logs():
            return torch.export.export(model, (x,), strict=False, dynamic_shapes=({0: batch},))
    except Exception as e:  # export raises many types; the message and the user's line say what
        fixed = getattr(model, "meta", {}).get("vitprune_fixed_batch") if isinstance(model, fx.GraphModule) else None
        if fixed:  # a .pt2 exported with a static batch that its graph bakes in (frontend.load)
            raise UnsupportedModelError(fixed) from e
        raise UnsupportedModelError(
            f"torch.export cannot capture {type(model).__name__}: {type(e).__name__}: {_one_line(e)}"
            f"{_model_frame(e)}") from e


def _batch_of_two(x: torch.Tensor) -> torch.Tensor:
    """export specialises a batch of 1 (it would be baked in); batch 2 also keeps the batch dim
    recognisable in propagated shapes."""
    return x if x.shape[0] >= 2 else x.expand(2, *x.shape[1:]).clone()


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """export logs warnings and prints graph dumps of its own when it fails; the error we raise says
    what failed and where, in one line."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def _model_frame(e: BaseException) -> str:
    """Where in the model's own code capture stopped (the innermost frame outside torch)."""
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if "/torch/" not in f.filename and "/vitprune/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {f.filename.rsplit('site-packages/', 1)[-1]}:{f.lineno}: `{(f.line or '').strip()}`)"


def _one_line(e: BaseException) -> str:
    """export appends pages of advice after its message; the message is what the user needs."""
    return one_line(str(e).split("\n\nThe error above occurred")[0], 400)


def normalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Plain signature (image in, first output tensor out), no guards or asserts (in place)."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and not node.users and str(node.target).startswith("_guards"):
            graph.erase_node(node)
        elif node.op == "call_function" and node.target in _ASSERT_OPS and not node.users:
            graph.erase_node(node)
        elif node.target in _DROPOUTS and not node_arg(node, 2, "train", False):
            # eval-mode dropout is the identity; left in, it would also survive dead-code
            # elimination (random ops count as impure) and keep removed branches alive
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    _explicit_static_sizes(graph)
    _views_to_reshapes(graph)
    _first_tensor_output(graph)
    graph._codegen = fx.graph.CodeGen()  # positional image in, tensor out: no pytree specs to keep
    eliminate_dead_code(graph)
    graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    # ep.module() forbids train()/eval(); the captured graph is the eval-mode function either way
    # (dropout off, norms on running statistics), which is what fine-tuning a pruned ViT uses
    for attr in ("_in_spec", "_out_spec", "train", "eval"):
        gm.__dict__.pop(attr, None)
    # export's input-spec check hook reads the pytree specs dropped above
    gm._forward_pre_hooks.clear()
    gm._forward_pre_hooks_with_kwargs.clear()
    return gm


_VIEWS = frozenset({torch.ops.aten.view.default, torch.ops.aten.reshape.default,
                    torch.ops.aten._unsafe_view.default})


def _explicit_static_sizes(graph: fx.Graph) -> None:
    """``view(x, [B·H, 5, -1])`` → ``view(x, [-1, 5, 64])``: a lone *computed* batch-dependent size
    becomes the inferred one, and the static ``-1`` it displaces is written out. A plain batch read
    (``sym_size(x, 0)``) stays, so ``view(x, [B, -1, C])`` still follows the token count."""
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _VIEWS or len(node.args) != 2:
            continue
        sizes, val = node.args[1], node.meta.get("val")
        if not isinstance(sizes, (list, tuple)) or not hasattr(val, "shape") or len(val.shape) != len(sizes):
            continue
        symbolic = [i for i, v in enumerate(sizes) if isinstance(v, fx.Node)]
        if len(symbolic) != 1 or sizes[symbolic[0]].target is torch.ops.aten.sym_size.int:
            continue
        sizes = list(sizes)
        if -1 in sizes:
            static = val.shape[sizes.index(-1)]
            if type(static) is not int:  # two batch-dependent sizes: nothing to infer from
                continue
            sizes[sizes.index(-1)] = static
        sizes[symbolic[0]] = -1
        node.args = (node.args[0], sizes)


def _views_to_reshapes(graph: fx.Graph) -> None:
    """``aten.view`` → ``aten.reshape``, except for tensors that alias an in-place write (a reshape
    may copy, and the copy would not see the write)."""
    written = _aliases_of_written(graph)
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _VIEW_ONLY and node not in written:
            node.target = torch.ops.aten.reshape.default


_VIEW_ONLY = frozenset({torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default})


def _aliases_of_written(graph: fx.Graph) -> set[fx.Node]:
    """Every node sharing storage (through view-like ops) with a tensor some op writes in place."""
    parent: dict[fx.Node, fx.Node] = {}

    def root(n: fx.Node) -> fx.Node:
        while parent.get(n, n) is not n:
            n = parent[n]
        return n

    written = []
    for node in graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        if node.target is operator.getitem or (schema is not None and schema.returns
                                                and schema.returns[0].alias_info is not None):
            parent[root(node)] = root(node.args[0])  # a view (or a piece of unbind/split) of its input
        if schema is not None and schema.is_mutable:
            written += [a for a, spec in zip(node.args, schema.arguments)
                        if isinstance(a, fx.Node) and spec.alias_info is not None and spec.alias_info.is_write]
    if not written:
        return set()
    roots = {root(n) for n in written}
    return {n for n in graph.nodes if root(n) in roots}


_SDPA = torch.ops.aten.scaled_dot_product_attention.default


def drop_neutral_masks(gm: fx.GraphModule, example_input: torch.Tensor) -> bool:
    """Drop attention masks computed without the image or parameters that mask nothing: an all-true
    boolean ``attn_mask`` of SDPA, an all-zero additive one (SDPA, or ``softmax(scores + mask)``).
    In place; True if the graph changed. Needs ``tensor_meta`` (run :func:`propagate_shapes`)."""
    uses = _mask_uses(gm)
    if not uses:
        return False
    values = _evaluate(gm, {mask for _, mask in uses}, example_input)
    changed = False
    for user, mask in uses:
        value = values[mask]
        neutral = bool(value.all()) if value.dtype == torch.bool else bool((value == 0).all())
        if not neutral:
            continue
        if user.target is _SDPA:
            if len(user.args) > 3:
                user.args = (*user.args[:3], None, *user.args[4:])
            else:
                user.kwargs = {k: v for k, v in user.kwargs.items() if k != "attn_mask"}
        else:  # scores + mask, with the scores' own shape: the scores themselves
            user.replace_all_uses_with(user.args[0] if user.args[1] is mask else user.args[1])
        changed = True
    if changed:
        eliminate_dead_code(gm.graph)
        gm.graph.lint()
        gm.recompile()
    return changed


def _mask_uses(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node]]:
    """(user, mask) pairs: SDPA's ``attn_mask``, and an operand of an ``add`` feeding a softmax
    whose other operand already has the sum's shape; only data-free masks are candidates."""
    out = []
    for node in gm.graph.nodes:
        if node.target is _SDPA:
            mask = node_arg(node, 3, "attn_mask")
            if isinstance(mask, fx.Node) and _data_free(gm, mask):
                out.append((node, mask))
        elif node.target is torch.ops.aten.softmax.int and isinstance(node.args[0], fx.Node):
            add = node.args[0]
            if add.target is not torch.ops.aten.add.Tensor or len(add.args) != 2 or add.kwargs:
                continue
            for mask, other in (add.args, add.args[::-1]):
                if isinstance(mask, fx.Node) and isinstance(other, fx.Node) and _data_free(gm, mask) \
                        and tensor_shape(other) == tensor_shape(add):
                    out.append((add, mask))
                    break
    return out


def _data_free(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Computed from sizes, factories and buffers only: no image values, no parameters. Sizes
    (``sym_size(x, 0)``) read no values, so the walk does not go through them."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen or "value" in n.meta:
            continue
        seen.add(n)
        if n.op == "placeholder":
            return False
        if n.op == "get_attr" and isinstance(_attr(gm, str(n.target)), nn.Parameter):
            return False
        stack.extend(n.all_input_nodes)
    return True


def _attr(gm: fx.GraphModule, target: str) -> Any:
    module_path, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(module_path) if module_path else gm, name)


def _evaluate(gm: fx.GraphModule, targets: set[fx.Node], x: torch.Tensor) -> dict[fx.Node, Any]:
    """Real values of ``targets``, running only the nodes they depend on."""
    needed = set(targets)
    for t in targets:
        stack = [t]
        while stack:
            for a in stack.pop().all_input_nodes:
                if a not in needed:
                    needed.add(a)
                    stack.append(a)
    interp = fx.Interpreter(gm)
    with torch.no_grad():
        for n in gm.graph.nodes:
            if n in needed:
                interp.env[n] = x if n.op == "placeholder" else interp.run_node(n)
    return {t: interp.env[t] for t in targets}


def node_arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """A call's argument, given positionally (``index``) or by keyword (``name``)."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _first_tensor_output(graph: fx.Graph) -> None:
    """The first tensor among the outputs (logits of a ModelOutput, element 0 of a tuple)."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    leaves = pytree.tree_leaves(output.args[0])
    tensors = [a for a in leaves if isinstance(a, fx.Node) and _is_tensor_val(a)]
    if not tensors:
        raise UnsupportedModelError("the model returns no tensor")
    output.args = (tensors[0],)


def _is_tensor_val(node: fx.Node) -> bool:
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    return val is None or hasattr(val, "shape")


def eliminate_dead_code(graph: fx.Graph) -> bool:
    """Dead-code elimination for inference graphs.

    FX keeps every op tagged ``nondeterministic_seeded`` (SDPA, dropout: they *may* draw random
    numbers), which would keep a removed attention branch alive. In a captured eval-mode graph they
    draw none, so only in-place ops and module calls count as side effects."""
    def impure(node: fx.Node) -> bool:
        if node.op in ("placeholder", "output", "call_module"):
            return True
        schema = getattr(node.target, "_schema", None)
        return node.op == "call_function" and schema is not None and schema.is_mutable
    return graph.eliminate_dead_code(is_impure_node=impure)


class _ShapeAndValueProp(fx.Interpreter):
    """Runs the graph on fake tensors; records ``tensor_meta`` for tensors, ``value`` for sizes."""

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as e:
            raise UnsupportedModelError(
                f"shape propagation failed at `{n.format_node()}`: {type(e).__name__}: {_one_line(e)}"
            ) from e
        found = False

        def meta(obj: Any) -> Any:
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj)
            return obj

        tm = fx.node.map_aggregate(result, meta)
        if found:
            n.meta["tensor_meta"] = tm
        else:
            n.meta.pop("tensor_meta", None)
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
    with torch.no_grad(), fake_mode:
        x = fake_mode.from_tensor(example_input)
        _ShapeAndValueProp(gm).run(x)


def tensor_shape(node: fx.Node) -> tuple[int, ...] | None:
    """The propagated shape of a tensor-valued node, or None."""
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def param_tensor(gm: fx.GraphModule, target: str) -> torch.Tensor:
    """The tensor behind a ``get_attr`` target (``blocks.0.attn.qkv.weight``): the one getter every
    room reads parameters and buffers with (the setter, which rewrites, is ``passes.tensors.set_tensor``)."""
    module_path, _, attr = target.rpartition(".")
    owner = gm.get_submodule(module_path) if module_path else gm
    return getattr(owner, attr)


def example_input_for(input_size: tuple[int, int, int], batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A deterministic example image batch of shape ``(batch, *input_size)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *input_size), generator=g)


def first_tensor(output: Any) -> torch.Tensor:
    """What a model's output stands for, at run time: the first tensor leaf in pytree order (the
    tensor itself, HF ``ModelOutput.logits``, element 0 of a tuple). The same rule as the captured
    graph's output, so an eager teacher and its captured student are compared like for like."""
    for leaf in pytree.tree_leaves(output):
        if isinstance(leaf, torch.Tensor):
            return leaf
    raise UnsupportedModelError(f"the model returned no tensor (got {type(output).__name__})")
