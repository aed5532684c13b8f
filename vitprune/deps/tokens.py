"""Where the tokens are: the attention blocks, the prefix tokens and the patch grid of a captured ViT.

Analysis only (the token pass and the CP-ViT planner read it; nothing here changes a graph):

* **blocks**: each attention core (``scaled_dot_product_attention``, or ``matmul → softmax →
  [dropout] → matmul``) and the residual ``add`` its branch ends in; the add's other operand is the
  residual stream *entering* the block. Blocks are ordered along the graph.
* **prefix tokens**: the ``cat`` along the token dim nearest before the first block; its inputs
  before the one computed from the image (the patch tokens) are the prefix. No such ``cat`` (global
  average pooling models without a class token): no prefix. Tokens appended *after* the patches are
  refused.
* **sequence lengths written as constants** (``reshape(B, 197, 3, H, D)``): which constant is the
  sequence length comes from the dependency graph (its axis is the stream's token axis).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch.fx as fx

from vitprune.deps.branches import BranchError, ancestors, is_attention_core, residual_add
from vitprune.deps.graph import DependencyGraph
from vitprune.deps.rules import op_key
from vitprune.errors import UnsupportedModelError
from vitprune.frontend.capture import tensor_shape


class TokenLayoutError(UnsupportedModelError):
    """The token layout of a model cannot be read (names the node)."""


#: ``node.meta`` key under which the nodes this pass inserts are tagged: ``(role, block)`` with role
#: ``"scores"`` (cumulative score after the block's attention, (B, patches)), ``"indices"`` (sorted kept
#: positions in the incoming patch sequence, (B, K)), ``"tokens"`` (the shortened residual stream
#: entering the block) or ``"kept_scores"`` (the cumulative score gathered along with the tokens).
META_KEY = "vitprune_tokens"



# -- graph analysis ---------------------------------------------------------------------------
@dataclass
class AttentionBlock:
    """One transformer block, found from its attention core and the residual add it feeds."""

    index: int
    stream: fx.Node       # the residual stream entering the block, (B, N, C)
    residual_add: fx.Node  # stream + attention branch
    core: fx.Node          # the SDPA node, or the softmax node of an explicit attention
    fused: bool


@dataclass
class TokenLayout:
    """Where the tokens are: the blocks, how many prefix tokens lead the sequence, and the patch grid."""

    blocks: list[AttentionBlock]
    prefix: int
    num_patches: int
    grid: tuple[int, int] | None  # (rows, cols) of the patch grid when a conv2d patch embedding is found

    @property
    def seq_len(self) -> int:
        return self.prefix + self.num_patches


def analyse_tokens(gm: fx.GraphModule) -> TokenLayout:
    """Find the blocks, the prefix-token count and the patch grid of a traced ViT."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    cores = [(n, op_key(n, gm) == "scaled_dot_product_attention") for n in gm.graph.nodes
             if n.op in ("call_function", "call_method", "call_module") and is_attention_core(n, gm)]
    if not cores:
        raise TokenLayoutError("tokens: no attention found (no scaled_dot_product_attention and no "
                        "matmul → softmax → matmul)")
    blocks = []
    for core, fused in cores:
        add, stream = _residual_add(core, gm, order)
        blocks.append((order[stream], stream, add, core, fused))
    blocks.sort(key=lambda b: b[0])
    out = [AttentionBlock(i, s, a, c, f) for i, (_, s, a, c, f) in enumerate(blocks)]
    shapes = {tensor_shape(b.stream) for b in out}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise TokenLayoutError(f"tokens: blocks do not share one (batch, tokens, channels) stream shape: {shapes}")
    seq = next(iter(shapes))[1]
    prefix, grid = _prefix_and_grid(gm, out[0].stream, order)
    if prefix >= seq:
        raise TokenLayoutError(f"tokens: found {prefix} prefix tokens in a sequence of {seq}")
    return TokenLayout(out, prefix, seq - prefix, grid)


def _residual_add(core: fx.Node, gm: fx.GraphModule, order: dict[fx.Node, int]) -> tuple[fx.Node, fx.Node]:
    """The block's residual add (:func:`~vitprune.deps.branches.residual_add`) and the stream entering
    the block, which must feed the core and be (batch, tokens, channels) for tokens to be cut there."""
    try:
        add, stream, _ = residual_add(gm, core, order)
    except BranchError as e:
        raise TokenLayoutError(f"tokens: {e}") from e
    if stream not in ancestors(core) or not _is_stream(stream):
        raise TokenLayoutError(f"tokens: the residual add `{add.format_node()}` after `{core.format_node()}` "
                               "does not add the attention to the (batch, tokens, channels) stream it read")
    return add, stream


def _is_stream(node: fx.Node) -> bool:
    shape = tensor_shape(node)
    return shape is not None and len(shape) == 3


def _prefix_and_grid(gm: fx.GraphModule, stream: fx.Node,
                     order: dict[fx.Node, int]) -> tuple[int, tuple[int, int] | None]:
    image = next(n for n in gm.graph.nodes if n.op == "placeholder")
    upstream = _tensor_ancestors(stream) | {stream}
    convs = [n for n in upstream if op_key(n, gm) == "conv2d" and image in _tensor_ancestors(n) | {n}]
    grid = None
    if convs:
        shape = tensor_shape(max(convs, key=order.__getitem__))
        grid = (shape[2], shape[3]) if shape is not None and len(shape) == 4 else None
    cats = [n for n in upstream if op_key(n, gm) == "cat" and _is_stream(n) and _cat_dim(n) == 1]
    if not cats:
        return 0, grid
    cat = max(cats, key=order.__getitem__)
    items = list(cat.args[0] if cat.args else cat.kwargs["tensors"])
    from_image = [i for i, t in enumerate(items) if image in _tensor_ancestors(t) | {t}]
    if len(from_image) != 1:
        raise TokenLayoutError(f"tokens: cannot tell the patch tokens in `{cat.format_node()}` "
                        f"({len(from_image)} inputs are computed from the image)")
    at = from_image[0]
    if at != len(items) - 1:
        raise TokenLayoutError(f"tokens: `{cat.format_node()}` appends tokens after the patch tokens; only "
                        "prefix tokens (class, distillation, registers) are supported")
    return sum(tensor_shape(t)[1] for t in items[:at]), grid


def _cat_dim(node: fx.Node) -> int:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim % 3


def _tensor_ancestors(node: fx.Node) -> set[fx.Node]:
    """Ancestors through tensor-valued arguments only (``expand(cls, x.shape[0])`` is not from x)."""
    return ancestors(node, follow=_carries_tensor)


def _carries_tensor(node: fx.Node) -> bool:
    tm = node.meta.get("tensor_meta")
    return tm is not None and (hasattr(tm, "shape") or isinstance(tm, (tuple, list)))


_SIZE_OPS = {"reshape", "view", "expand"}


def size_args(node: fx.Node) -> tuple[list[Any], Callable[[list[Any]], None]]:
    """The size arguments of a reshape/view/expand, and a setter writing them back in the same form."""
    for key in ("shape", "size"):
        if key in node.kwargs:
            return list(node.kwargs[key]), lambda sizes, key=key: node.update_kwarg(key, tuple(sizes))
    if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)):
        return list(node.args[1]), lambda sizes: setattr(node, "args", (node.args[0], list(sizes)))
    return list(node.args[1:]), lambda sizes: setattr(node, "args", (node.args[0], *sizes))


def find_length_constants(gm: fx.GraphModule, layout: TokenLayout) -> dict[fx.Node, list[int]]:
    """Reshape/view/expand nodes that write the sequence length as a constant: {node: [arg positions]}.

    timm reads the length from ``x.shape`` (it follows the shorter sequence by itself), but a width
    pass or a model may bake it in (``reshape(B, 197, 3, 6, 64)``). Which constant is the sequence
    length comes from the dependency graph: the size sits on an axis made of the stream's token axis.
    """
    seq = layout.seq_len
    candidates = [n for n in gm.graph.nodes if n.op in ("call_method", "call_function")
                  and op_key(n, gm) in _SIZE_OPS and seq in size_args(n)[0]]
    if not candidates:
        return {}
    dg = DependencyGraph.build(gm)
    token = sorted(dg.table.leaves(dg.node_dims[layout.blocks[0].stream][1]))
    out = {}
    for node in candidates:
        axes = dg.node_dims.get(node)
        sizes = size_args(node)[0]
        if not axes or isinstance(axes[0], list):
            continue
        offset = len(axes) - len(sizes)
        hits = [i for i, s in enumerate(sizes) if isinstance(s, int) and s == seq and i + offset >= 0
                and sorted(dg.table.leaves(axes[i + offset])) == token]
        if hits:
            out[node] = hits
    return out


def keep_counts(keep: Sequence[int | None], num_patches: int) -> list[int]:
    """The number of patch tokens entering each block under ``keep`` (``None`` carries the last)."""
    out, current = [], num_patches
    for k in keep:
        current = current if k is None else k
        out.append(current)
    return out


# -- what token merging reads from an attention block ----------------------------------------------
#: ops that add a bias or mask to attention logits when both operands are tensors
_BIAS_OPS = {"add", "add_", "sub", "masked_fill", "where"}
#: ops that may sit between q·kᵀ and the softmax (scales, casts, views, biases)
_LOGIT_OPS = {"mul", "div", "to", "clone", "view", "reshape", "dropout", "neg"} | _BIAS_OPS


@dataclass
class AttentionKeys:
    """Where a block's keys and logits are: ``key`` holds the keys as (batch, heads, tokens, dim),
    or transposed (..., dim, tokens) when ``transposed``; ``bias`` is a tensor added to the logits
    (a relative position table, a window mask) or None; ``tokens`` the keys' token count."""

    key: fx.Node
    transposed: bool
    bias: fx.Node | None
    tokens: int


def attention_keys(gm: fx.GraphModule, block: AttentionBlock) -> AttentionKeys:
    """The keys and logit bias of ``block``'s attention (SDPA, or q·kᵀ by ``matmul``). Attention
    written as ``einsum`` or on other than 4-D (batch, heads, tokens, dim) keys is refused."""
    core = block.core
    if block.fused:
        key, mask = core.args[1], (core.args[3] if len(core.args) > 3 else core.kwargs.get("attn_mask"))
        return _keys(core, key, False, mask)
    frontier, seen, bias = [core.args[0]], set(), None
    while frontier:
        n = frontier.pop(0)
        if not isinstance(n, fx.Node) or n in seen or len(seen) > 16:
            continue
        seen.add(n)
        key = op_key(n, gm)
        if key in ("matmul", "bmm"):
            return _keys(core, n.args[1], True, bias)
        if key not in _LOGIT_OPS:
            break
        tensors = [a for a in n.all_input_nodes if _carries_tensor(a)]
        if key in _BIAS_OPS and len(tensors) > 1:
            bias = bias or n
        frontier.extend(tensors)
    raise TokenLayoutError(f"tokens: cannot find q·kᵀ (a matmul) before `{core.format_node()}`; attention "
                           "written another way (einsum) is not supported by token merging")


def _keys(core: fx.Node, key: Any, transposed: bool, bias: Any) -> AttentionKeys:
    shape = tensor_shape(key) if isinstance(key, fx.Node) else None
    if shape is None or len(shape) != 4:
        raise TokenLayoutError(f"tokens: the keys of `{core.format_node()}` are not (batch, heads, tokens, dim) "
                               f"(shape {shape})")
    return AttentionKeys(key, transposed, bias if isinstance(bias, fx.Node) else None,
                         shape[-1] if transposed else shape[-2])
