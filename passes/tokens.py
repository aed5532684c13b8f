"""CP-ViT cascade token pruning with static keep counts: the sequence really gets shorter.

Invariant: the prefix tokens (class, distillation, register tokens) and, at every block, the ``K``
patch tokens with the highest cumulative score pass through unchanged, in their original (spatial)
order; every other patch token is *removed from the sequence* entering that block and never comes
back (cascade). With no block pruned the graph is left untouched (outputs identical).

Where the blocks, the prefix tokens and baked-in sequence lengths are is read by
:mod:`vitprune.deps.tokens` (from the graph, never from module names).

The score (CP-ViT, Song et al. 2022, arXiv 2203.04570; where the paper is not explicit we follow
its public code, ok858ok/CP-ViT ``models/modeling.py``):

* a patch's score in block ``l`` is the largest attention probability any query gives it, summed over
  heads: ``s_l[p] = sum_h max_i A_l[h, i, p]`` (queries ``i`` are *all* tokens: prefix and patches);
* the cumulative score adds these up over blocks, ``S_l = s_0 + ... + s_{l-1}``, and is gathered with
  the tokens at each cut so it stays aligned with the shortened sequence;
* entering block ``l`` with ``keep[l] = K`` the top-``K`` patches by ``S_l`` are kept (``topk``), their
  indices sorted ascending (spatial order), then ``gather``-ed; the prefix is concatenated back in front.

Because the score is taken over all queries it needs no class token: gap models (no prefix) rank by
the attention received from all queries, exactly like class-token models. Pruning happens at block
boundaries only (the public code also zeroes tokens in front of each MLP; we do not split blocks).
Ties in ``topk`` (equal cumulative scores) are broken by the backend; with continuous scores they do
not occur in practice.

Sequence lengths written into the graph as constants (``reshape(B, 197, 3, H, D)`` — the width pass
bakes them in, some models do) are rewritten to the length of the stretch of blocks they sit in; the
dependency graph says which constant is the sequence length (its axis is the stream's token axis).

Attention probabilities are materialised only in the blocks whose score is still needed (blocks
``0 .. last cut - 1``): there the fused ``scaled_dot_product_attention`` is rewritten into
``(q * scale) @ k^T → softmax → @ v`` (numerically equal, FLOPs counted identically); every later
block keeps the fused call. ``keep`` is static, so every shape in the graph — and in the exported
ONNX model — is static apart from the batch. (ONNX shape inference still leaves a few dims unnamed
inside the *fused* blocks: that is the exporter's own SDPA lowering, pruned or not; the materialised
blocks and every tensor between blocks are fully static.)
"""
from __future__ import annotations

import operator
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx

from vitprune.deps.tokens import (META_KEY, AttentionBlock, TokenLayout, analyse_tokens, find_length_constants,
                                  keep_counts)
from vitprune.frontend.capture import eliminate_dead_code, tensor_shape

from .base import Pass, PassError, PassResult
from .tensors import rewrite_lengths

aten = torch.ops.aten

# -- rewrites ---------------------------------------------------------------------------------
def explicit_attention(gm: fx.GraphModule, block: AttentionBlock) -> fx.Node:
    """Make ``block``'s attention probabilities a node (rewriting SDPA if needed); return it.

    ``scaled_dot_product_attention(q, k, v, scale=s)`` becomes ``softmax((q * s) @ k^T) @ v`` — what
    timm computes with ``fused_attn=False`` — with ``s = q.shape[-1] ** -0.5`` when no scale is given.
    Masks, causal attention and dropout are refused (a traced eval-mode ViT has none).
    """
    if not block.fused:
        return block.core
    node, g = block.core, gm.graph
    q, k, v = node.args[:3]
    extra = dict(zip(("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"), node.args[3:]))
    extra.update(node.kwargs)
    if extra.get("attn_mask") is not None or extra.get("is_causal") or extra.get("dropout_p") \
            or extra.get("enable_gqa"):
        raise PassError(f"tokens: cannot score `{node.format_node()}`: masked, causal, dropout or GQA "
                        "attention is not supported")
    scale = extra.get("scale")
    if scale is None:
        scale = float(tensor_shape(q)[-1]) ** -0.5
    with g.inserting_before(node):
        qs = g.call_function(aten.mul.Tensor, (q, scale))
        kt = g.call_function(aten.transpose.int, (k, -2, -1))
        logits = g.call_function(aten.matmul.default, (qs, kt))
        probs = g.call_function(aten.softmax.int, (logits, -1))
        out = g.call_function(aten.matmul.default, (probs, v))
    for new in (qs, kt, logits, probs, out):
        new.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack", {}))
    node.replace_all_uses_with(out)
    g.erase_node(node)
    block.core, block.fused = probs, False
    return probs


def _insert_score(g: fx.Graph, probs: fx.Node, prefix: int, previous: fx.Node | None,
                  block: int) -> fx.Node:
    """``S += sum_h max_i A[h, i, patches]``, inserted right after the attention probabilities."""
    with g.inserting_before(probs.next):
        peak = g.call_function(aten.amax.default, (probs, [-2]))       # (B, H, N): max over queries
        per_key = g.call_function(aten.sum.dim_IntList, (peak, [1]))    # (B, N): summed over heads
        score = g.call_function(aten.slice.Tensor, (per_key, 1, prefix))
        if previous is not None:
            score = g.call_function(aten.add.Tensor, (previous, score))
    score.meta[META_KEY] = ("scores", block)
    return score


def _insert_cut(g: fx.Graph, stream: fx.Node, score: fx.Node, prefix: int, k: int,
                block: int) -> tuple[fx.Node, fx.Node]:
    """Keep the top-``k`` patches of ``stream`` by ``score``, in order; return (stream, score)."""
    users = list(stream.users)
    with g.inserting_before(stream.next):
        top = g.call_function(aten.topk.default, (score, k, 1))
        top_idx = g.call_function(operator.getitem, (top, 1))
        ordered = g.call_function(aten.sort.default, (top_idx, 1))   # spatial order
        idx = g.call_function(operator.getitem, (ordered, 0))
        patches = g.call_function(aten.slice.Tensor, (stream, 1, prefix))
        width = g.call_function(aten.sym_size.int, (stream, 2))
        column = g.call_function(aten.unsqueeze.default, (idx, -1))
        index = g.call_function(aten.expand.default, (column, [-1, -1, width]))
        kept = g.call_function(aten.gather.default, (patches, 1, index))
        if prefix:
            lead = g.call_function(aten.slice.Tensor, (stream, 1, 0, prefix))
            new_stream = g.call_function(aten.cat.default, ([lead, kept], 1))
        else:
            new_stream = kept
        new_score = g.call_function(aten.gather.default, (score, 1, idx))
    idx.meta[META_KEY] = ("indices", block)
    new_stream.meta[META_KEY] = ("tokens", block)
    new_score.meta[META_KEY] = ("kept_scores", block)
    for u in users:
        u.replace_input_with(stream, new_stream)
    return new_stream, new_score


# -- the pass ---------------------------------------------------------------------------------
class TokenPruning(Pass):
    """Keep ``keep[l]`` patch tokens entering block ``l`` (``None``: no cut there), CP-ViT scored.

    ``keep`` has one entry per attention block (in graph order); counts exclude the prefix tokens and
    must not increase along the blocks. Block 0 cannot be cut (no attention has been seen yet).
    """

    name = "tokens"

    def __init__(self, keep: Sequence[int | None]):
        self.keep = [None if k is None else int(k) for k in keep]

    @classmethod
    def from_recipe(cls, recipe: Mapping[str, Any]) -> "TokenPruning":
        return cls(recipe["keep"])

    def cuts(self, layout: TokenLayout) -> dict[int, int]:
        """{block: K} for the blocks where the sequence actually shrinks (validated)."""
        if len(self.keep) != len(layout.blocks):
            raise PassError(f"tokens: keep has {len(self.keep)} entries, the model has "
                            f"{len(layout.blocks)} attention blocks")
        current, cuts = layout.num_patches, {}
        for block, k in enumerate(self.keep):
            if k is None or k == current:
                continue
            if not 1 <= k < current:
                raise PassError(f"tokens: keep[{block}] = {k}, but {current} patch tokens enter block "
                                f"{block} (counts must be in [1, {current}] and never increase)")
            if block == 0:
                raise PassError("tokens: block 0 cannot be cut: no attention score exists before it")
            cuts[block] = current = k
        return cuts

    def requires(self, gm: fx.GraphModule) -> None:
        super().requires(gm)
        if any(META_KEY in n.meta for n in gm.graph.nodes):
            raise PassError("tokens: this graph is already token-pruned; apply TokenPruning once, with the "
                            "whole keep list")

    def call(self, gm: fx.GraphModule) -> PassResult:
        layout = analyse_tokens(gm)
        cuts = self.cuts(layout)
        if not cuts:
            return PassResult(gm, modified=False)
        g = gm.graph
        constants = find_length_constants(gm, layout)
        score: fx.Node | None = None
        last = max(cuts)
        lengths: dict[str, int] = {}
        for block in layout.blocks[:last + 1]:
            if block.index in cuts:
                k = cuts[block.index]
                stream, score = _insert_cut(g, block.stream, score, layout.prefix, k, block.index)
                lengths[stream.name] = layout.prefix + k
            if block.index < last:
                score = _insert_score(g, explicit_attention(gm, block), layout.prefix, score, block.index)
        rewrite_length_constants(gm, layout, cuts, constants)
        eliminate_dead_code(g)
        g.lint()
        gm.recompile()
        counts = keep_counts(self.keep, layout.num_patches)
        removed = {"patch_tokens": {f"block{b}": [counts[b - 1], k] for b, k in cuts.items()},
                   "explicit_attention_blocks": list(range(last))}
        recipe = {"pass": self.name, "keep": list(self.keep)}
        return PassResult(gm, modified=True, removed=removed, recipe=recipe, expect={"tokens": lengths})

    def ensures(self, result: PassResult) -> None:
        """The graph runs and each shortened stream has exactly prefix + K tokens."""
        super().ensures(result)
        for node in result.graph_module.graph.nodes:
            want = result.expect["tokens"].get(node.name)
            if want is not None and tensor_shape(node)[1] != want:
                raise RuntimeError(f"tokens: `{node.format_node()}` has {tensor_shape(node)[1]} tokens, "
                                   f"expected {want}")


# -- sequence lengths written as constants -----------------------------------------------------
def rewrite_length_constants(gm: fx.GraphModule, layout: TokenLayout, cuts: dict[int, int],
                             constants: dict[fx.Node, list[int]]) -> None:
    """Rewrite each baked-in sequence length to the length of the stretch of blocks it sits in
    (``cuts``: {block: patch tokens entering it}; ``constants`` from :func:`find_length_constants`)."""
    length_after = {layout.blocks[b].stream: layout.prefix + k for b, k in cuts.items()}
    rewrite_lengths(gm, layout.seq_len, length_after, constants)


__all__ = ["TokenPruning", "explicit_attention", "rewrite_length_constants"]
