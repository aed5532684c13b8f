"""Attention removal (BoundaryDPT): delete whole attention branches; no tensor dimension changes.

Invariant, per removed block (``add = x + ls(attn(LN1(x)))`` in the original):

* ``variant="identity_norm"`` (the paper's): the function is the original's with the attention
  module — everything between LN1's output and the layer-scale — replaced by the identity, i.e.
  ``x ← x + γ·LN1(x)`` (``x ← x + LN1(x)`` without layer-scale). LN1 is kept; γ is folded into LN1's
  affine (``LN1.weight·γ``, ``LN1.bias·γ``: exact) so no layer-scale parameter is left, unless LN1 has
  no affine or is shared, in which case the ``mul`` by γ stays.
* ``variant="drop"``: the branch is deleted, ``x ← x``; LN1 goes too when nothing else reads it.

qkv, proj, q/k-norm, layer-scale and every other node or parameter that only the branch used are
*deleted* from the GraphModule (not multiplied by zero): ``named_parameters()`` shrinks by exactly
:meth:`AttentionBranch.num_params` per block (γ included when folded).

Blocks are the original model's attention-branch indices (graph order, see
:mod:`vitprune.deps.branches`); removed blocks are recorded in ``gm.meta["removed_layers"]`` so the
indices stay stable across passes and in replayed recipes. Recipe:
``{"pass": "attention", "blocks": [...], "variant": ...}``.

Where the HetDPT code differs: its released ``Block_no_act_no_attn`` (attention *and* activation
removed) applies an extra GELU to the block output; that is not part of either removal and is not
reproduced here.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch.fx as fx

from vitprune.deps.branches import (AttentionBranch, UnknownShapeError, find_attention_branches, record_removed,
                                    removed_layers)
from vitprune.frontend.capture import eliminate_dead_code, param_tensor

from .base import Pass, PassError, PassResult
from .tensors import delete_unreferenced, set_tensor

VARIANTS = ("identity_norm", "drop")


class AttentionRemoval(Pass):
    """Remove the attention branches of ``blocks`` (original block indices); see the module docstring."""

    name = "attention"
    preserves_computation = False

    def __init__(self, blocks: Sequence[int], variant: str = "identity_norm"):
        if variant not in VARIANTS:
            raise PassError(f"attention: variant must be one of {VARIANTS}, got {variant!r}")
        self.blocks = sorted(int(b) for b in blocks)
        if len(set(self.blocks)) != len(self.blocks):
            raise PassError(f"attention: blocks listed twice in {list(blocks)}")
        self.variant = variant

    @classmethod
    def from_recipe(cls, recipe: Mapping[str, Any]) -> "AttentionRemoval":
        return cls(recipe["blocks"], recipe.get("variant", "identity_norm"))

    def requires(self, gm: fx.GraphModule) -> None:
        super().requires(gm)
        branches = {b.index: b for b in find_attention_branches(gm)}
        gone = set(removed_layers(gm, "attention"))
        for block in self.blocks:
            if block in gone:
                raise PassError(f"attention: block {block} was already removed")
            if block not in branches:
                raise PassError(f"attention: no attention branch {block} (the graph has "
                                f"{sorted(branches)})")
            b = branches[block]
            if self.variant == "identity_norm":
                if b.norm is None:
                    raise PassError(f"attention: block {block} has no LayerNorm on the residual feeding "
                                    "its attention; use variant='drop'")
                _check_same_shape(b)

    def call(self, gm: fx.GraphModule) -> PassResult:
        if not self.blocks:
            return PassResult(gm, modified=False)
        branches = {b.index: b for b in find_attention_branches(gm)}
        before = {name: t.numel() for name, t in (*gm.named_parameters(), *gm.named_buffers())}
        candidates: set[str] = set()
        folded: list[int] = []
        for block in self.blocks:
            b = branches[block]
            candidates.update(b.params)
            if self.variant == "drop":
                _drop(gm, b)
                if b.norm is not None:
                    candidates.update(_norm_params(b.norm))
            elif _identity_norm(gm, b):
                folded.append(block)
        eliminate_dead_code(gm.graph)
        deleted = delete_unreferenced(gm, candidates)
        gm.recompile()
        record_removed(gm, "attention", self.blocks)
        removed = {"blocks": self.blocks, "parameters": {n: before[n] for n in deleted},
                   "layer_scale_folded": folded}
        recipe = {"pass": self.name, "blocks": self.blocks, "variant": self.variant}
        return PassResult(gm, modified=True, removed=removed, recipe=recipe,
                          expect={"remaining": len(branches) - len(self.blocks)})

    def ensures(self, result: PassResult) -> None:
        """The graph runs, and exactly the requested branches are gone."""
        super().ensures(result)
        left, want = find_attention_branches(result.graph_module), result.expect["remaining"]
        if len(left) != want or any(b.index in self.blocks for b in left):
            raise RuntimeError(f"attention: expected {want} attention branches after removing "
                               f"{self.blocks}, found {[b.index for b in left]}")


def _check_same_shape(b: AttentionBranch) -> None:
    for n in (b.norm, b.out):
        if "tensor_meta" not in n.meta:
            raise UnknownShapeError(f"attention: no propagated shape at `{n.format_node()}`; trace with "
                                    "vitprune.frontend.capture before removing attention")
    if tuple(b.norm.meta["tensor_meta"].shape) != tuple(b.out.meta["tensor_meta"].shape):
        raise PassError(f"attention: the branch output `{b.out.format_node()}` and its normalised input "
                        f"`{b.norm.format_node()}` differ in shape; identity_norm needs them equal")


def _drop(gm: fx.GraphModule, b: AttentionBranch) -> None:
    b.add.replace_all_uses_with(b.residual)
    gm.graph.erase_node(b.add)


def _identity_norm(gm: fx.GraphModule, b: AttentionBranch) -> bool:
    """x + γ·LN1(x); returns whether γ was folded into LN1's affine."""
    if b.scale is None:
        b.add.replace_input_with(b.branch, b.norm)
        return False
    b.scale.replace_input_with(b.out, b.norm)
    if not _can_fold(gm, b):
        return False
    gamma = param_tensor(gm, b.gamma).detach()
    weight, bias = _norm_affine(b.norm)
    for node in (weight, bias):
        if node is not None:
            target = str(node.target)
            set_tensor(gm, target, param_tensor(gm, target).detach() * gamma)
    b.add.replace_input_with(b.scale, b.norm)
    return True


def _can_fold(gm: fx.GraphModule, b: AttentionBranch) -> bool:
    """γ can move into LN1's affine when LN1 has a weight, and LN1 and its parameters serve only
    this branch (after rewiring: its only user is the layer-scale mul)."""
    weight, bias = _norm_affine(b.norm)
    members = set(b.nodes)  # the branch's own nodes die with it; nothing else may read LN1
    if weight is None or any(u not in members for u in b.norm.users):
        return False
    for node in (weight, bias):
        if node is not None and (len(node.users) != 1 or param_tensor(gm, str(node.target)).ndim != 1):
            return False
    gamma = param_tensor(gm, b.gamma)
    return gamma.ndim <= 1 and gamma.numel() in (1, param_tensor(gm, str(weight.target)).numel())


def _norm_affine(norm: fx.Node) -> tuple[fx.Node | None, fx.Node | None]:
    weight = norm.args[2] if len(norm.args) > 2 else norm.kwargs.get("weight")
    bias = norm.args[3] if len(norm.args) > 3 else norm.kwargs.get("bias")
    ok = lambda n: n if isinstance(n, fx.Node) and n.op == "get_attr" else None  # noqa: E731
    return ok(weight), ok(bias)


def _norm_params(norm: fx.Node) -> list[str]:
    return [str(n.target) for n in _norm_affine(norm) if n is not None]


__all__ = ["AttentionRemoval", "VARIANTS"]
