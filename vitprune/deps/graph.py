"""The dependency graph: run the op rules over a traced graph and collect coupled channel groups."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch.fx as fx

from vitprune.deps.dims import PROD, AxisTable, DimMismatch
from vitprune.deps.groups import ChannelGroup, GroupMember, classify
from vitprune.deps.rules import RULES, RuleContext, op_key
from vitprune.report import natural_key

# Ops whose non-tensor results are sizes (sym_size(x, 0)) or arithmetic on them (B * N, ...).
_SIZE_OPS = {"sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "getitem", "add", "sub", "mul",
             "floordiv", "truediv", "mod", "eq", "ne", "lt", "le", "gt", "ge", "neg", "pow"}


@dataclass
class UnsupportedOp:
    node: str
    op: str
    reason: str

    def __str__(self) -> str:
        return f"{self.op} at `{self.node}`: {self.reason}"


@dataclass
class DependencyGraph:
    """Coupled channel groups of a traced, shape-propagated GraphModule.

    ``node_dims[node]`` holds the axes of each tensor dim of the node's output; ``param_dims[name]``
    the axes of each parameter/buffer; ``groups`` every leaf axis that owns parameter channels.
    """

    gm: fx.GraphModule
    table: AxisTable
    node_dims: dict[fx.Node, Any]
    param_dims: dict[str, list[int]]
    groups: list[ChannelGroup] = field(default_factory=list)
    unsupported: list[UnsupportedOp] = field(default_factory=list)

    @classmethod
    def build(cls, gm: fx.GraphModule) -> "DependencyGraph":
        table = AxisTable()
        ctx = RuleContext(gm, table)
        param_dims: dict[str, list[int]] = {}
        unsupported: list[UnsupportedOp] = []
        for node in gm.graph.nodes:
            ctx.node_dims[node] = _node_dims(ctx, node, param_dims, unsupported)
        dg = cls(gm, table, ctx.node_dims, _in_use_order(gm, param_dims), unsupported=unsupported)
        dg.groups = dg._collect_groups(ctx.param_roles, ctx.contracted)
        return dg

    # -- queries ------------------------------------------------------------------------------
    def prunable_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def group_by_name(self, name: str) -> ChannelGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    @property
    def batch_axis(self) -> int:
        """The leaf axis of the model input's batch dim (kept dynamic in rewritten shapes)."""
        placeholder = next(n for n in self.gm.graph.nodes if n.op == "placeholder")
        return self.table.leaves(self.node_dims[placeholder][0])[0]

    def dim_mask(self, axis: int, keep: dict[int, np.ndarray]) -> np.ndarray:
        return self.table.mask(axis, keep)

    # -- internals ----------------------------------------------------------------------------
    def _collect_groups(self, roles: dict[tuple[str, int], set[str]], contracted: list[int]) -> list[ChannelGroup]:
        t = self.table
        summed = {leaf for axis in contracted for leaf in t.leaves(axis)}
        members: dict[int, list[GroupMember]] = {}
        positions: dict[int, set[str]] = {}
        for name, axes in self.param_dims.items():
            for dim, axis in enumerate(axes):
                coords = t.coords(axis)
                factors = _nontrivial_factors(t, axis)
                for leaf, c in coords.items():
                    if t.size(leaf) < 1 or not (c >= 0).any():
                        continue
                    members.setdefault(leaf, []).append(
                        GroupMember(name, dim, c, tuple(sorted(roles.get((name, dim), ())))))
                    if leaf in factors and len(factors) > 1:
                        positions.setdefault(leaf, set()).add("inner" if leaf == factors[-1] else "outer")
        groups = []
        for leaf, ms in members.items():
            g = ChannelGroup(axis=leaf, size=t.size(leaf), members=ms,
                             kind=classify(ms, positions.get(leaf, set()), leaf in summed),
                             frozen=t.frozen_reason(leaf))
            groups.append(g)
        for g in groups:
            if g.kind == "head":
                g.granularity = _head_width(t, g)
        groups.sort(key=lambda g: (g.frozen is not None, natural_key(g.members[0].param), g.members[0].dim, g.axis))
        seen: dict[str, int] = {}
        for g in groups:  # names are keys in recipes: make repeats unique, deterministically
            base = g.name
            seen[base] = seen.get(base, 0) + 1
            if seen[base] > 1:
                g.suffix = f"#{seen[base] - 1}"
        return groups


def _in_use_order(gm: fx.GraphModule, param_dims: dict[str, list[int]]) -> dict[str, list[int]]:
    """Parameters ordered by their first use in the graph, not by where export lists them (all
    ``get_attr`` nodes first): group names then come from the first parameter the data meets
    (``residual:patch_embed.proj.weight[0]``), whatever the frontend."""
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    first_use: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.users:
            at = min(position[u] for u in node.users)
            first_use[str(node.target)] = min(first_use.get(str(node.target), at), at)
    end = len(position)
    return dict(sorted(param_dims.items(), key=lambda kv: first_use.get(kv[0], end)))


def _nontrivial_factors(t: AxisTable, axis: int) -> list[int]:
    """Prunable (unfrozen, size > 1) leaves of ``axis`` when it is a pure product, outer first."""
    sp = t.refinement(axis)
    if sp is None or sp[0] != PROD:
        return []
    leaves = t.leaves(axis)
    return [l for l in leaves if t.size(l) > 1 and t.frozen_reason(l) is None]


def _head_width(t: AxisTable, g: ChannelGroup) -> int:
    """Channels per head: the product of the factors inside the head factor in a member dim."""
    for m in g.members:
        n = int((m.coords == 0).sum())
        if n > 1:
            return n // max(1, _outer_repeats(m))
    return 1


def _outer_repeats(m: GroupMember) -> int:
    """How many times the head pattern repeats outside the head factor (3 for fused q, k, v)."""
    idx = np.nonzero(m.coords == 0)[0]
    gaps = np.diff(idx)
    return 1 + int((gaps > 1).sum()) if len(idx) else 1


def _node_dims(ctx: RuleContext, node: fx.Node, param_dims: dict[str, list[int]],
               unsupported: list[UnsupportedOp]) -> Any:
    t = ctx.t
    tm = node.meta.get("tensor_meta")
    if node.op == "placeholder":
        return ctx.fresh(ctx.shape(node), frozen="model input") if _is_tensor_meta(tm) else None
    if node.op == "get_attr":
        if not _is_tensor_meta(tm):
            return None
        # integer tensors are indices (relative-position tables, ...): data, never channels
        frozen = None if tm.dtype.is_floating_point else "integer tensor (indices)"
        dims = ctx.fresh(ctx.shape(node), frozen=frozen)
        param_dims.setdefault(str(node.target), dims)
        for a, b in zip(param_dims[str(node.target)], dims):
            t.unify(a, b)
        return dims
    if node.op == "output":
        for dims in _flatten_dims([ctx.node_dims.get(a) for a in _flat_nodes(node.args)]):
            for a in dims:
                t.freeze(a, "model output")
        return None
    key = op_key(node, ctx.gm)
    inputs = [ctx.node_dims.get(a) for a in _flat_nodes((node.args, node.kwargs))]
    has_tensor_in = any(d is not None for d in inputs)
    if not has_tensor_in and not _is_tensor_meta(tm) and not _is_tuple_meta(tm):
        return None  # pure size arithmetic
    if key in _SIZE_OPS and not _is_tensor_meta(tm) and not _is_tuple_meta(tm) and key != "getitem":
        return None  # x.shape, x.size(1): reading sizes never couples channels
    if not has_tensor_in and _is_tensor_meta(tm):
        return ctx.fresh(ctx.shape(node), frozen=f"tensor created by {key}")
    rule = RULES.get(key)
    reason = f"no rule for op `{key}`"
    if rule is not None:
        try:
            return rule(ctx, node)
        except (DimMismatch, KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            reason = f"rule for `{key}` failed: {e}"
    unsupported.append(UnsupportedOp(node.format_node(), key, reason))
    for dims in _flatten_dims(inputs):
        for a in dims:
            t.freeze(a, f"touched by unsupported op `{key}`")
    return _fresh_like(ctx, tm, f"output of unsupported op `{key}`")


def _is_tensor_meta(tm: Any) -> bool:
    return tm is not None and hasattr(tm, "shape")


def _is_tuple_meta(tm: Any) -> bool:
    return isinstance(tm, (tuple, list)) and len(tm) > 0 and all(_is_tensor_meta(x) for x in tm)


def _fresh_like(ctx: RuleContext, tm: Any, reason: str) -> Any:
    if _is_tensor_meta(tm):
        return ctx.fresh(tuple(tm.shape), frozen=reason)
    if _is_tuple_meta(tm):
        return [ctx.fresh(tuple(x.shape), frozen=reason) for x in tm]
    return None


def _flat_nodes(args: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(args, out.append)
    return out


def _flatten_dims(items: list[Any]) -> list[list[int]]:
    out = []
    for d in items:
        if d is None:
            continue
        if d and isinstance(d[0], list):
            out.extend(d)
        else:
            out.append(d)
    return out
