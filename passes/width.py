"""Width pruning: physically remove channels of coupled channel groups.

Invariant: the function is the original's with the removed channels deleted. For groups that do not
feed a normalisation's statistics (MLP hidden, heads, head-dim) that is exactly the original model
with those channels zero-masked; for the residual stream, LayerNorm then normalises over the kept
channels only (what residual pruning means). The graph is left consistent: every parameter is sliced
along every dim a pruned group reaches, and every shape constant that names a pruned dim —
``reshape(B, N, 3, heads, head_dim)``, ``reshape(B, N, C)``, ``layer_norm((C,))``, ``expand``, ``split``
sizes, depthwise ``groups`` — is rewritten, so nothing (``num_heads``, ``head_dim``) is left to patch.
When the head-dim shrinks, ``scaled_dot_product_attention`` gets the original ``scale`` explicitly,
since its default (1/sqrt(head_dim)) would silently change.

Safe because groups come from :class:`vitprune.deps.DependencyGraph`: every op's channel coupling is
given by an explicit rule and ops without a rule freeze what they touch.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.fx as fx

from vitprune.frontend.capture import eliminate_dead_code, param_tensor
from vitprune.deps import DependencyGraph
from vitprune.deps.rules import op_key

from .base import Pass, PassError, PassResult
from .tensors import set_tensor


class WidthPruning(Pass):
    """Keep only ``keep[group_name]`` channels of each named group (sorted, unique, non-empty)."""

    name = "width"

    def __init__(self, keep: Mapping[str, Sequence[int]]):
        self.keep = {name: sorted(int(i) for i in idx) for name, idx in keep.items()}

    @classmethod
    def from_recipe(cls, recipe: Mapping[str, Any]) -> "WidthPruning":
        return cls(recipe["keep"])

    def call(self, gm: fx.GraphModule) -> PassResult:
        dg = DependencyGraph.build(gm)
        masks = self._leaf_masks(dg)
        if not masks:
            return PassResult(gm, modified=False)
        predicted = {
            node.name: [int(dg.dim_mask(a, masks).sum()) for a in dims]
            for node, dims in dg.node_dims.items()
            if dims and not isinstance(dims[0], list)
        }
        removed = self._slice_parameters(gm, dg, masks)
        self._rewrite_shapes(gm, dg, masks)
        eliminate_dead_code(gm.graph)
        gm.recompile()
        recipe = {"pass": self.name, "keep": {k: v for k, v in self.keep.items()}}
        return PassResult(gm, modified=True, removed=removed, recipe=recipe, expect={"shapes": predicted})

    def ensures(self, result: PassResult) -> None:
        """The graph runs, and every tensor has exactly the shape the dependency graph predicted."""
        super().ensures(result)
        gm, predicted = result.graph_module, result.expect["shapes"]
        for node in gm.graph.nodes:
            want = predicted.get(node.name)
            tm = node.meta.get("tensor_meta")
            if want is not None and tm is not None and hasattr(tm, "shape") and list(tm.shape) != want:
                raise RuntimeError(f"width: `{node.format_node()}` has shape {list(tm.shape)}, "
                                   f"the dependency graph predicted {want}")

    # -- steps --------------------------------------------------------------------------------
    def _leaf_masks(self, dg: DependencyGraph) -> dict[int, np.ndarray]:
        masks: dict[int, np.ndarray] = {}
        for name, idx in self.keep.items():
            try:
                group = dg.group_by_name(name)
            except KeyError:
                raise PassError(f"width: no channel group named {name!r}") from None
            if not group.prunable:
                if len(idx) == group.size:
                    continue
                raise PassError(f"width: group {name} cannot be pruned ({group.frozen or 'size 1'})")
            if not idx or len(set(idx)) != len(idx) or idx[0] < 0 or idx[-1] >= group.size:
                raise PassError(f"width: keep indices for {name} must be unique, in [0, {group.size}), "
                                "and at least one")
            if len(idx) == group.size:
                continue
            mask = np.zeros(group.size, dtype=bool)
            mask[idx] = True
            masks[group.axis] = mask
        return masks

    def _slice_parameters(self, gm: fx.GraphModule, dg: DependencyGraph,
                          masks: dict[int, np.ndarray]) -> dict[str, Any]:
        removed: dict[str, Any] = {}
        for name, axes in dg.param_dims.items():
            tensor = param_tensor(gm, name)
            new = tensor
            for dim, axis in enumerate(axes):
                m = dg.dim_mask(axis, masks)
                if not m.all():
                    new = new.index_select(dim, torch.as_tensor(np.nonzero(m)[0], device=new.device))
            if new is not tensor:
                set_tensor(gm, name, new)
                removed[name] = [list(tensor.shape), list(new.shape)]
        return removed

    def _rewrite_shapes(self, gm: fx.GraphModule, dg: DependencyGraph, masks: dict[int, np.ndarray]) -> None:
        def new_size(axis: int) -> int:
            return int(dg.dim_mask(axis, masks).sum())

        for node in list(gm.graph.nodes):
            if node.op not in ("call_function", "call_method"):
                continue
            rewrite = SHAPE_REWRITES.get(op_key(node, gm))
            if rewrite is not None and dg.node_dims.get(node) is not None:
                rewrite(node, dg, new_size)


# -- shape-constant rewrites, one per op kind ------------------------------------------------------
Rewrite = Callable[[fx.Node, DependencyGraph, Callable[[int], int]], None]


def _old_shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["tensor_meta"].shape)


def _rewrite_size_args(node: fx.Node, dg: DependencyGraph, new_size: Callable[[int], int]) -> None:
    """reshape/view/expand: replace each size argument whose dim changed with the new constant."""
    out_axes, old = dg.node_dims[node], _old_shape(node)
    packed = len(node.args) == 2 and isinstance(node.args[1], (tuple, list))
    sizes = list(node.args[1] if packed else node.args[1:])
    if "shape" in node.kwargs or "size" in node.kwargs:
        key = "shape" if "shape" in node.kwargs else "size"
        sizes = list(node.kwargs[key])
    changed = False
    offset = len(old) - len(sizes)  # expand may add leading dims
    batch = dg.table.find(dg.batch_axis)
    infer_used = any(isinstance(s, int) and s == -1 for s in sizes)
    for i, s in enumerate(sizes):
        axis = out_axes[i + offset] if i + offset >= 0 else None
        if axis is None or (isinstance(s, int) and s == -1):
            continue
        n = new_size(axis)
        # A size read from a tensor (``C = x.shape[-1]``) is stale when that tensor's dim changed,
        # even if this dim did not (attention width read from the residual stream).
        stale = n != old[i + offset] or (isinstance(s, fx.Node) and _reads_changed_dim(s, dg, new_size))
        if not stale:
            continue
        if batch in dg.table.leaves(axis):
            # batch-dependent (B*N): cannot be a constant; let reshape infer it
            if not infer_used and op_key(node) in ("reshape", "view"):
                sizes[i], infer_used, changed = -1, True, True
            continue
        sizes[i] = n
        changed = True
    if not changed:
        return
    if "shape" in node.kwargs or "size" in node.kwargs:
        key = "shape" if "shape" in node.kwargs else "size"
        node.update_kwarg(key, tuple(sizes))
    elif packed:
        node.args = (node.args[0], tuple(sizes))
    else:
        node.args = (node.args[0], *sizes)


def _reads_changed_dim(arg: fx.Node, dg: DependencyGraph, new_size: Callable[[int], int]) -> bool:
    """Whether a size computed in the graph reads a tensor dim whose width the pruning changes."""
    stack, seen = [arg], set()
    while stack:
        n = stack.pop()
        if n in seen or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        source = _shape_source(n)
        if source is not None:
            tensor, dim = source
            dims = dg.node_dims.get(tensor)
            shape = tensor.meta.get("tensor_meta")
            if dims is None or shape is None or not hasattr(shape, "shape"):
                return True  # unknown provenance: treat as stale (a constant is always right)
            dim %= len(dims)
            if new_size(dims[dim]) != shape.shape[dim]:
                return True
            continue
        if "tensor_meta" in n.meta and hasattr(n.meta["tensor_meta"], "shape"):
            continue  # a tensor feeding a size computation other than by its shape: not a size read
        stack.extend(n.all_input_nodes)
    return False


def _shape_source(n: fx.Node) -> tuple[fx.Node, int] | None:
    """``aten.sym_size.int(x, i)`` (what ``x.shape[i]`` captures to) → (x, i)."""
    if n.op == "call_function" and op_key(n) == "sym_size" and isinstance(n.args[1], int):
        return n.args[0], n.args[1]
    return None


def _rewrite_norm_shape(node: fx.Node, dg: DependencyGraph, new_size: Callable[[int], int]) -> None:
    axes = dg.node_dims[node]
    k = len(node.args[1])
    node.args = (node.args[0], tuple(new_size(a) for a in axes[-k:]), *node.args[2:])


def _rewrite_unflatten(node: fx.Node, dg: DependencyGraph, new_size: Callable[[int], int]) -> None:
    axes = dg.node_dims[node]
    dim, sizes = node.args[1], node.args[2]
    dim = dim % (len(axes) - len(sizes) + 1)
    node.args = (node.args[0], dim, tuple(new_size(a) for a in axes[dim:dim + len(sizes)]))


def _rewrite_split(node: fx.Node, dg: DependencyGraph, new_size: Callable[[int], int]) -> None:
    pieces = dg.node_dims[node]
    dim_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    dim = dim_arg % len(pieces[0])
    sizes = [new_size(p[dim]) for p in pieces]
    first = node.args[1]
    node.args = (node.args[0], sizes[0] if isinstance(first, int) else sizes, *node.args[2:])


def _rewrite_sdpa_scale(node: fx.Node, dg: DependencyGraph, new_size: Callable[[int], int]) -> None:
    q = node.args[0]
    old_e = q.meta["tensor_meta"].shape[-1]
    if new_size(dg.node_dims[q][-1]) == old_e:
        return
    if len(node.args) > 6 or node.kwargs.get("scale") is not None:
        return  # an explicit scale stays what it was
    node.update_kwarg("scale", float(old_e) ** -0.5)


def _rewrite_conv_groups(node: fx.Node, dg: DependencyGraph, new_size: Callable[[int], int]) -> None:
    if len(node.args) < 7 or node.args[6] == 1:
        return
    channels = new_size(dg.node_dims[node][1])
    if node.args[6] == _old_shape(node)[1]:  # depthwise: one group per channel
        node.args = (*node.args[:6], channels, *node.args[7:])


SHAPE_REWRITES: dict[str, Rewrite] = {
    "reshape": _rewrite_size_args,
    "view": _rewrite_size_args,
    "expand": _rewrite_size_args,
    "layer_norm": _rewrite_norm_shape,
    "rms_norm": _rewrite_norm_shape,
    "unflatten": _rewrite_unflatten,
    "split": _rewrite_split,
    "scaled_dot_product_attention": _rewrite_sdpa_scale,
    "conv2d": _rewrite_conv_groups,
}
