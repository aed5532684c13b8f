"""Activation removal (BoundaryDPT): the activation between two linears becomes the identity, and
``fc2 ∘ fc1`` is merged into one linear when that is cheaper.

Invariant, per removed block (``y = fc2(drop(act(fc1(x))))`` in the original): the function is the
original's with ``act`` replaced by the identity (dropout between the linears is an inference
identity and is dropped when merging). Then, for ``fc1: d_in → h`` and ``fc2: h → d_out``:

* merged (``merge="always"``, or ``"auto"`` when ``d_in·d_out < h·(d_in + d_out)``, i.e. fewer
  multiply-adds): one linear ``W = W2·W1``, ``b = W2·b1 + b2`` (computed in float64, stored in the
  original dtype) named ``<common prefix of fc1/fc2>.merged.weight`` / ``.bias`` — deterministic, so
  a saved state dict loads into a replayed recipe. fc1/fc2 parameters are deleted.
* factorised (``"never"``, or ``"auto"`` when h < d_in·d_out/(d_in+d_out), e.g. after pruning the
  hidden dim below d/2 for d_in = d_out = d): ``fc2(drop(fc1(x)))`` without the activation.

``fold_norm=True`` also folds the affine of the LayerNorm feeding fc1 (when fc1 is its only reader)
into the following linear — ``W' = W·diag(w)``, ``b' = W·b_ln + b`` — exact; the LayerNorm keeps no
affine and its parameters are deleted. Nothing else changes (layer-scale, residual add stay).

Blocks are the original model's activation indices (graph order, see :mod:`vitprune.deps.branches`);
removals are recorded in ``gm.meta["removed_layers"]``. Recipe:
``{"pass": "activation", "blocks": [...], "merge": ..., "fold_norm": ...}``.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn

from vitprune.deps.branches import ActivationSite, find_activations, record_removed, removed_layers
from vitprune.frontend.capture import eliminate_dead_code, param_tensor

from .base import Pass, PassError, PassResult
from .tensors import delete_unreferenced, own_module, set_tensor

MERGE_MODES = ("auto", "always", "never")


class ActivationRemoval(Pass):
    """Remove the activations of ``blocks`` (original indices); see the module docstring."""

    name = "activation"
    preserves_computation = False

    def __init__(self, blocks: Sequence[int], merge: str = "auto", fold_norm: bool = False):
        if merge not in MERGE_MODES:
            raise PassError(f"activation: merge must be one of {MERGE_MODES}, got {merge!r}")
        self.blocks = sorted(int(b) for b in blocks)
        if len(set(self.blocks)) != len(self.blocks):
            raise PassError(f"activation: blocks listed twice in {list(blocks)}")
        self.merge = merge
        self.fold_norm = bool(fold_norm)

    @classmethod
    def from_recipe(cls, recipe: Mapping[str, Any]) -> "ActivationRemoval":
        return cls(recipe["blocks"], recipe.get("merge", "auto"), recipe.get("fold_norm", False))

    def requires(self, gm: fx.GraphModule) -> None:
        super().requires(gm)
        sites = {s.index for s in find_activations(gm)}
        gone = set(removed_layers(gm, "activation"))
        for block in self.blocks:
            if block in gone:
                raise PassError(f"activation: block {block} was already removed")
            if block not in sites:
                raise PassError(f"activation: no activation between linears with index {block} "
                                f"(the graph has {sorted(sites)})")

    def merges(self, site: ActivationSite) -> bool:
        """Whether this pass merges ``site`` (the FLOPs rule for ``merge="auto"``)."""
        return self.merge == "always" or (self.merge == "auto" and site.merge_is_cheaper)

    def call(self, gm: fx.GraphModule) -> PassResult:
        if not self.blocks:
            return PassResult(gm, modified=False)
        sites = {s.index: s for s in find_activations(gm)}
        before = {name: t.numel() for name, t in (*gm.named_parameters(), *gm.named_buffers())}
        candidates: set[str] = set()
        merged, folded = [], []
        for block in self.blocks:
            s = sites[block]
            norm = s.norm if self.fold_norm and _foldable(gm, s.norm) else None
            if self.merges(s):
                _merge(gm, s, norm)
                merged.append(block)
                candidates.update(p for p in (s.fc1_weight, s.fc1_bias, s.fc2_weight, s.fc2_bias) if p)
            else:
                _bypass(gm, s, norm)
            if norm is not None:
                candidates.update(_strip_affine(norm))
                folded.append(block)
        eliminate_dead_code(gm.graph)
        deleted = delete_unreferenced(gm, candidates)
        gm.recompile()
        record_removed(gm, "activation", self.blocks)
        removed = {"blocks": self.blocks, "merged": merged, "norm_folded": folded,
                   "parameters": {n: before[n] for n in deleted}}
        recipe = {"pass": self.name, "blocks": self.blocks, "merge": self.merge,
                  "fold_norm": self.fold_norm}
        return PassResult(gm, modified=True, removed=removed, recipe=recipe,
                          expect={"remaining": len(sites) - len(self.blocks)})

    def ensures(self, result: PassResult) -> None:
        """The graph runs, and exactly the requested activations are gone."""
        super().ensures(result)
        left, want = find_activations(result.graph_module), result.expect["remaining"]
        if len(left) != want or any(s.index in self.blocks for s in left):
            raise RuntimeError(f"activation: expected {want} activations after removing "
                               f"{self.blocks}, found {[s.index for s in left]}")


# -- rewrites -----------------------------------------------------------------------------------
def _bypass(gm: fx.GraphModule, s: ActivationSite, norm: fx.Node | None) -> None:
    """Factorised: fc2(drop(fc1(x))) — the activation node is simply skipped."""
    s.act.replace_all_uses_with(s.fc1)
    gm.graph.erase_node(s.act)
    if norm is not None:
        w1, b1 = _fold_affine(gm, norm, _t(gm, s.fc1_weight), _t(gm, s.fc1_bias), s.d_in)
        set_tensor(gm, s.fc1_weight, w1.to(param_tensor(gm, s.fc1_weight).dtype))
        if s.fc1_bias is not None:
            set_tensor(gm, s.fc1_bias, b1.to(param_tensor(gm, s.fc1_bias).dtype))
        elif b1 is not None:
            owner, attr = _owner(gm, s.fc1_weight)
            bias_target = f"{owner}.bias" if owner else "bias"
            _register(gm, bias_target, b1.to(param_tensor(gm, s.fc1_weight).dtype))
            with gm.graph.inserting_before(s.fc1):
                node = gm.graph.get_attr(bias_target)
            if len(s.fc1.args) > 2:
                s.fc1.update_arg(2, node)
            elif len(s.fc1.args) == 2:
                s.fc1.args = (*s.fc1.args, node)
            else:
                s.fc1.update_kwarg("bias", node)


def _merge(gm: fx.GraphModule, s: ActivationSite, norm: fx.Node | None) -> None:
    """One linear W2·W1 on fc1's input (the LN affine folded in when ``norm`` is given)."""
    w1, b1 = _t(gm, s.fc1_weight), _t(gm, s.fc1_bias)
    w2, b2 = _t(gm, s.fc2_weight), _t(gm, s.fc2_bias)
    if norm is not None:
        w1, b1 = _fold_affine(gm, norm, w1, b1, s.d_in)
    weight = w2 @ w1
    bias = None
    if b1 is not None:
        bias = w2 @ b1
    if b2 is not None:
        bias = b2 if bias is None else bias + b2
    dtype = param_tensor(gm, s.fc2_weight).dtype
    prefix = _merged_prefix(s)
    _register(gm, f"{prefix}.weight", weight.to(dtype))
    if bias is not None:
        _register(gm, f"{prefix}.bias", bias.to(dtype))
    with gm.graph.inserting_before(s.fc2):
        w = gm.graph.get_attr(f"{prefix}.weight")
        b = gm.graph.get_attr(f"{prefix}.bias") if bias is not None else None
        new = gm.graph.call_function(torch.ops.aten.linear.default, (_input(s.fc1), w, b))
    new.meta = {k: v for k, v in s.fc2.meta.items() if k != "tensor_meta"}
    s.fc2.replace_all_uses_with(new)
    for n in [s.fc2, *reversed(s.between), s.act, s.fc1]:
        gm.graph.erase_node(n)


def _fold_affine(gm: fx.GraphModule, norm: fx.Node, w: torch.Tensor, b: torch.Tensor | None,
                 d_in: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W·(n·g + β) + b = (W·diag(g))·n + (W·β + b)."""
    g_node, beta_node = _affine_nodes(norm)
    g = _t(gm, str(g_node.target)) if g_node is not None else torch.ones(d_in, dtype=torch.float64)
    new_w = w * g.reshape(1, -1)
    new_b = b
    if beta_node is not None:
        shift = w @ _t(gm, str(beta_node.target))
        new_b = shift if b is None else b + shift
    return new_w, new_b


def _foldable(gm: fx.GraphModule, norm: fx.Node | None) -> bool:
    if norm is None:
        return False
    nodes = [n for n in _affine_nodes(norm) if n is not None]
    return bool(nodes) and all(len(n.users) == 1 and param_tensor(gm, str(n.target)).ndim == 1
                               for n in nodes)


def _strip_affine(norm: fx.Node) -> list[str]:
    """Drop the LayerNorm's weight/bias arguments; returns their targets."""
    targets = [str(n.target) for n in _affine_nodes(norm) if n is not None]
    eps = norm.args[4] if len(norm.args) > 4 else norm.kwargs.get("eps", 1e-5)
    norm.args = (norm.args[0], norm.args[1], None, None, eps, *norm.args[5:])
    norm.kwargs = {k: v for k, v in norm.kwargs.items() if k not in ("weight", "bias", "eps")}
    return targets


def _affine_nodes(norm: fx.Node) -> tuple[fx.Node | None, fx.Node | None]:
    weight = norm.args[2] if len(norm.args) > 2 else norm.kwargs.get("weight")
    bias = norm.args[3] if len(norm.args) > 3 else norm.kwargs.get("bias")
    ok = lambda n: n if isinstance(n, fx.Node) and n.op == "get_attr" else None  # noqa: E731
    return ok(weight), ok(bias)


def _input(node: fx.Node) -> fx.Node:
    return node.args[0] if node.args else node.kwargs["input"]


# -- parameters ---------------------------------------------------------------------------------
def _t(gm: fx.GraphModule, target: str | None) -> torch.Tensor | None:
    return None if target is None else param_tensor(gm, target).detach().to(torch.float64)


def _owner(gm: fx.GraphModule, target: str) -> tuple[str, str]:
    module_path, _, attr = target.rpartition(".")
    return module_path, attr


def _merged_prefix(s: ActivationSite) -> str:
    a = _owner(None, s.fc1_weight)[0].split(".")
    b = _owner(None, s.fc2_weight)[0].split(".")
    common = []
    for x, y in zip(a, b):
        if x != y:
            break
        common.append(x)
    return ".".join(common + ["merged"]) if common else f"merged_activation_{s.index}"


def _register(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    module_path, _, attr = target.rpartition(".")
    try:
        owner = own_module(gm, module_path)
    except AttributeError:
        gm.add_submodule(module_path, nn.Module())
        owner = gm.get_submodule(module_path)
    if attr in owner._parameters and owner._parameters[attr] is not None:
        raise PassError(f"activation: cannot create parameter {target}: the name is taken")
    owner.register_parameter(attr, nn.Parameter(value.detach().clone()))


__all__ = ["ActivationRemoval", "MERGE_MODES"]
