"""Token Merging (ToMe, Bolya et al., ICLR 2023, arXiv 2210.09461) as a static-shape rewrite.

In every block ``l`` with ``r[l] > 0``, between the attention branch's residual add and the MLP, the
``r[l]`` most similar patch-token pairs are merged; the sequence entering the MLP (and every later
block) is ``r[l]`` tokens shorter. Where the paper leaves a detail open we follow its public code
(facebookresearch/ToMe ``tome/merge.py``, ``tome/patch/timm.py``):

* **metric**: the block's attention keys averaged over heads, ``k.mean(1)`` (batch, tokens, dim),
  L2-normalised (cosine similarity);
* **bipartite soft matching**: tokens alternate between sets A (even positions) and B (odd positions),
  each A token finds its most similar B token, and the ``r`` A tokens whose best edge is strongest are
  merged into their B partner (``argsort`` descending, the top ``r`` edges);
* **size-weighted average**: each token carries its size (how many patches it stands for);
  ``x ← merge(x · s) / merge(s)`` with sums, so a merged token is the size-weighted mean;
* **proportional attention**: in every block after the first merge ``log(s)`` is added to the
  attention logits along the key axis (SDPA: as its float ``attn_mask``; explicit attention: an
  ``add`` before the softmax), so a merged token weighs as much as the patches it stands for;
* **protected tokens**: the prefix tokens (class, distillation, registers) never merge and stay in
  front, in order. Matching runs on the patch tokens only, with A/B parity taken from their position in
  the whole sequence — exactly ToMe's ``-inf`` masking of the class row and distillation column for
  one or two prefix tokens, and the same rule for registers;
* **order**: the output is ``[prefix, unmerged A (ascending position), B]``; without prefix tokens the
  unmerged A tokens stay in descending-similarity order, as ToMe does without a class token;
* ``r[l]`` is capped at ``(tokens - prefix) // 2`` as ToMe caps it.

Invariant: the token count of every tensor is static (``prefix + patches`` minus the merges so far),
only the batch stays symbolic; with every ``r[l] = 0`` the graph is left untouched (outputs identical).
The matching indices are data dependent (``max``, ``sort``, ``gather``, ``scatter_reduce``), the shapes
are not. Sequence lengths baked into reshapes are rewritten to the length where they sit.

Refused, with the reason: no token layout (windowed attention as in Swin/SAM: blocks do not share
one (batch, tokens, channels) stream), attention over fewer tokens than the stream (windows), and a
bias on the attention logits (relative position tables, masks) in any block after the first merge —
such a bias is indexed by token position, which merging no longer preserves.
"""
from __future__ import annotations

import operator
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx

from vitprune.deps.tokens import (AttentionBlock, TokenLayout, TokenLayoutError, analyse_tokens, attention_keys,
                                  find_length_constants)
from vitprune.errors import UnsupportedModelError
from vitprune.frontend.capture import eliminate_dead_code, tensor_shape

from .base import Pass, PassError, PassResult
from .tensors import rewrite_lengths

aten = torch.ops.aten

#: ``node.meta`` tag of the nodes this pass inserts: ``(role, block)``, role ``"merged"`` (the stream
#: after the merge), ``"size"`` (the token sizes after it) or ``"bias"`` (the log-size logit bias).
MERGE_KEY = "vitprune_merging"


class MergeRefused(UnsupportedModelError):
    """Token merging is undefined on this model (the message says why)."""


# -- building blocks --------------------------------------------------------------------------------
class _Emit:
    """Appends nodes before ``anchor``, each tagged with the module stack of ``like``."""

    def __init__(self, g: fx.Graph, anchor: fx.Node, like: fx.Node):
        self.g, self.anchor, self.stack = g, anchor, dict(like.meta.get("nn_module_stack", {}))

    def __call__(self, op: Any, *args: Any) -> fx.Node:
        with self.g.inserting_before(self.anchor):
            node = self.g.call_function(op, args)
        node.meta["nn_module_stack"] = dict(self.stack)
        return node

    def item(self, node: fx.Node, i: int) -> fx.Node:
        return self(operator.getitem, node, i)


def _halves(e: _Emit, t: fx.Node, prefix: int) -> tuple[fx.Node, fx.Node]:
    """Sets A and B of the patch tokens of ``t`` (batch, tokens, c): even / odd sequence positions."""
    patches = e(aten.slice.Tensor, t, 1, prefix) if prefix else t
    first = prefix % 2  # the first patch is in A when its position is even
    return (e(aten.slice.Tensor, patches, 1, first, None, 2),
            e(aten.slice.Tensor, patches, 1, 1 - first, None, 2))


def _match(e: _Emit, metric: fx.Node, prefix: int, r: int) -> tuple[fx.Node, fx.Node, fx.Node]:
    """Bipartite soft matching: (unmerged A, merged A, their B partners), each (batch, n, 1)."""
    norm = e(aten.linalg_vector_norm.default, metric, 2, [-1], True)
    unit = e(aten.div.Tensor, metric, norm)
    a, b = _halves(e, unit, prefix)
    scores = e(aten.matmul.default, a, e(aten.transpose.int, b, -1, -2))
    best = e(aten.max.dim, scores, -1)
    node_max, node_idx = e.item(best, 0), e.item(best, 1)
    edges = e(aten.unsqueeze.default, e.item(e(aten.sort.default, node_max, -1, True), 1), -1)
    unmerged = e(aten.slice.Tensor, edges, 1, r)
    merged = e(aten.slice.Tensor, edges, 1, 0, r)
    partners = e(aten.gather.default, e(aten.unsqueeze.default, node_idx, -1), 1, merged)
    if prefix:  # keep the unmerged tokens in sequence order behind the prefix, as ToMe does
        unmerged = e.item(e(aten.sort.default, unmerged, 1), 0)
    return unmerged, merged, partners


def _merge(e: _Emit, t: fx.Node, match: tuple[fx.Node, fx.Node, fx.Node], prefix: int,
           single: bool = False) -> fx.Node:
    """``[prefix, unmerged A, B + merged A summed in]`` of ``t`` (batch, tokens, c); ``single``: c is 1
    (the sizes), where the (batch, n, 1) indices need no expand."""
    a, b = _halves(e, t, prefix)
    along = list(match)
    if not single:
        width = e(aten.sym_size.int, t, 2)
        along = [e(aten.expand.default, idx, [-1, -1, width]) for idx in match]
    kept = e(aten.gather.default, a, 1, along[0])
    src = e(aten.gather.default, a, 1, along[1])
    dst = e(aten.scatter_reduce.two, b, 1, along[2], src, "sum")
    parts = [e(aten.slice.Tensor, t, 1, 0, prefix)] if prefix else []
    return e(aten.cat.default, parts + [kept, dst], 1)


def _insert_merge(gm: fx.GraphModule, block: AttentionBlock, prefix: int, r: int,
                  size: fx.Node | None) -> tuple[fx.Node, fx.Node]:
    """Merge ``r`` tokens of the stream after ``block``'s attention; return (stream, sizes)."""
    add, g = block.residual_add, gm.graph
    users = list(add.users)
    e = _Emit(g, add.next, add)
    keys = attention_keys(gm, block)
    k = e(aten.transpose.int, keys.key, -2, -1) if keys.transposed else keys.key
    match = _match(e, e(aten.mean.dim, k, [1]), prefix, r)
    if size is None:  # every token stands for one patch before the first merge: x · 1 = x
        size, weighted = e(aten.ones_like.default, e(aten.slice.Tensor, add, 2, 0, 1)), add
    else:
        weighted = e(aten.mul.Tensor, add, size)
    new_size = _merge(e, size, match, prefix, single=True)
    stream = e(aten.div.Tensor, _merge(e, weighted, match, prefix), new_size)
    stream.meta[MERGE_KEY] = ("merged", block.index)
    new_size.meta[MERGE_KEY] = ("size", block.index)
    for u in users:
        u.replace_input_with(add, stream)
    return stream, new_size


def _proportional_attention(gm: fx.GraphModule, block: AttentionBlock, size: fx.Node) -> None:
    """Add ``log(size)`` to ``block``'s attention logits along the key axis."""
    core, g = block.core, gm.graph
    e = _Emit(g, core, core)
    bias = e(aten.unsqueeze.default, e(aten.transpose.int, e(aten.log.default, size), 1, 2), 1)  # (B,1,1,N)
    bias.meta[MERGE_KEY] = ("bias", block.index)
    if not block.fused:
        logits = core.args[0]
        core.replace_input_with(logits, e(aten.add.Tensor, logits, bias))
        return
    names = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    extra = dict(zip(names, core.args[3:]), **core.kwargs)
    if extra.get("dropout_p") or extra.get("is_causal") or extra.get("enable_gqa"):
        raise MergeRefused(f"merging: cannot weight `{core.format_node()}` by token size: causal, dropout or "
                           "GQA attention")
    extra["attn_mask"] = bias
    core.args, core.kwargs = tuple(core.args[:3]), extra


# -- the pass -----------------------------------------------------------------------------------------
class TokenMerging(Pass):
    """Merge ``r[l]`` tokens after the attention of attention block ``l`` (ToMe; see the module).

    ``r`` has one entry per attention block, in graph order (0: no merge there); entries above ToMe's
    cap ``(tokens - prefix) // 2`` are capped, and the recipe records the capped schedule.
    """

    name = "merging"

    def __init__(self, r: Sequence[int]):
        self.r = [int(x) for x in r]

    @classmethod
    def from_recipe(cls, recipe: Mapping[str, Any]) -> "TokenMerging":
        return cls(recipe["r"])

    def schedule(self, layout: TokenLayout) -> list[int]:
        """The capped merge count of every block (validated against ``layout``)."""
        if len(self.r) != len(layout.blocks):
            raise PassError(f"merging: r has {len(self.r)} entries, the model has {len(layout.blocks)} "
                            "attention blocks")
        if any(x < 0 for x in self.r):
            raise PassError(f"merging: merge counts must be >= 0, got {self.r}")
        out, tokens = [], layout.seq_len
        for x in self.r:
            x = min(x, (tokens - layout.prefix) // 2)
            out.append(x)
            tokens -= x
        return out

    def requires(self, gm: fx.GraphModule) -> None:
        super().requires(gm)
        if any(MERGE_KEY in n.meta for n in gm.graph.nodes):
            raise PassError("merging: this graph is already merged; apply TokenMerging once, with the whole "
                            "schedule")

    def call(self, gm: fx.GraphModule) -> PassResult:
        layout = merge_layout(gm)
        r = self.schedule(layout)
        if not any(r):
            return PassResult(gm, modified=False)
        check_mergeable(gm, layout, r)
        constants = find_length_constants(gm, layout)
        size, lengths, tokens = None, {}, layout.seq_len
        for block in layout.blocks:
            if size is not None:
                _proportional_attention(gm, block, size)
            if r[block.index]:
                tokens -= r[block.index]
                stream, size = _insert_merge(gm, block, layout.prefix, r[block.index], size)
                lengths[stream] = tokens
        rewrite_lengths(gm, layout.seq_len, lengths, constants)
        eliminate_dead_code(gm.graph)
        gm.graph.lint()
        gm.recompile()
        counts = token_counts(layout, r)
        removed = {"merged_tokens": {f"block{b}": [counts[b], counts[b + 1]] for b, x in enumerate(r) if x}}
        return PassResult(gm, modified=True, removed=removed, recipe={"pass": self.name, "r": r},
                          expect={"tokens": {n.name: t for n, t in lengths.items()}})

    def ensures(self, result: PassResult) -> None:
        """The graph runs and each merged stream has exactly the scheduled token count."""
        super().ensures(result)
        for node in result.graph_module.graph.nodes:
            want = result.expect["tokens"].get(node.name)
            if want is not None and tensor_shape(node)[1] != want:
                raise RuntimeError(f"merging: `{node.format_node()}` has {tensor_shape(node)[1]} tokens, "
                                   f"expected {want}")


# -- where merging is defined ---------------------------------------------------------------------------
def merge_layout(gm: fx.GraphModule) -> TokenLayout:
    """The token layout, or :class:`MergeRefused` saying why merging is undefined here."""
    try:
        return analyse_tokens(gm)
    except TokenLayoutError as e:
        raise MergeRefused(f"merging needs blocks of global attention over one (batch, tokens, channels) "
                           f"stream (windowed attention, as in Swin or SAM, has none): {e}") from e


def check_mergeable(gm: fx.GraphModule, layout: TokenLayout, r: Sequence[int]) -> None:
    """Refuse windowed attention and logit biases indexed by token position where tokens are merged."""
    first = next(i for i, x in enumerate(r) if x)
    biased = []
    for block in layout.blocks[first:]:
        try:
            keys = attention_keys(gm, block)
        except TokenLayoutError as e:
            raise MergeRefused(f"merging: {e}") from e
        if keys.tokens != layout.seq_len:
            raise MergeRefused(f"merging: block {block.index} attends over {keys.tokens} tokens of a "
                               f"{layout.seq_len}-token stream (windowed attention); ToMe needs global attention")
        if keys.bias is not None and block.index > first:
            biased.append((block.index, keys.bias.name))
    if biased:
        (b, name), last = biased[0], biased[-1][0]
        raise MergeRefused(f"merging: block {b} adds `{name}` to its attention logits (a relative position bias "
                           "or mask, indexed by token position), which is undefined once tokens merge; merge "
                           f"from block {last} on (start={last}) or use token pruning")


def token_counts(layout: TokenLayout, r: Sequence[int]) -> list[int]:
    """Tokens (prefix included) entering each block's attention, then after the last block."""
    out = [layout.seq_len]
    for x in r:
        out.append(out[-1] - x)
    return out


__all__ = ["MERGE_KEY", "MergeRefused", "TokenMerging", "check_mergeable", "merge_layout", "token_counts"]
