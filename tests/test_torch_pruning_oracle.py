"""Torch-Pruning (TP) as an independent oracle for our channel groups on DeiT.

TP finds coupled channels by tracing autograd and propagating index mappings through every op; we
find them with explicit per-op rules over a torch.fx graph. Two independent implementations that
agree on which parameter slices move together are strong evidence that both are right.

How the comparison works. Each side is reduced to the same currency: *elements*
``(parameter name, dim, position)``.

* A TP group (``get_all_groups`` with Linear/LayerNorm/Conv2d roots) is a list of (dependency,
  indices, root indices); the dependencies that own parameters are mapped to parameter dims
  (Linear/Conv2d out → ``weight[0]``/``bias[0]``, in → ``weight[1]``; LayerNorm → ``weight[0]``,
  ``bias[0]``; unwrapped ``nn.Parameter`` → its TP pruning dim). Elements that share a root index
  are one TP *unit* (removed together).
* One of our ``ChannelGroup`` members gives, for each position of a parameter dim, the group channel
  it belongs to. An element's *key* is the set of (group, channel) over every prunable group that
  touches it; elements with equal keys are one unit (no prune of ours can separate them).

Both of timm's attention spellings are compared (``fused_attn`` True: one SDPA call; False: matmul →
softmax → matmul); TP finds the same groups for both. Then, at the coarsest common level:

1. every TP group's set of parameter dims is exactly one connected component of ours (parameter
   dims linked by sharing one of our groups, frozen or not), and every component of ours that holds a
   prunable group is exactly one TP group's parameter-dim set (nothing missing, nothing extra:
   e.g. the residual group must hold every norm weight, ``cls_token`` and ``pos_embed``);
2. on the residual stream and each MLP hidden group the element partitions are identical;
3. on attention, TP's partition refines ours and becomes identical once TP's units ``r``, ``r + C``,
   ``r + 2C`` of the fused qkv output (``C`` = qkv rows / 3) are merged.

Deliberate differences from TP (asserted, not hidden):

* attention: TP sees the fused qkv output as 3·dim free rows. Without its ``num_heads`` hints it
  couples only the v rows with ``proj`` input columns and leaves each q row and k row a unit of its
  own (pruning q row c but not k row c would break ``q @ k^T``). We read the row-major factorisation
  ``reshape(B, N, 3, heads, head_dim)``: the rows are split into a frozen "3" factor (q/k/v, never
  pruned), a ``head`` group and a ``head_dim`` group, so q, k and v lose the same (head, dim) together
  with the proj column. TP gets that coupling only from ``num_heads`` plus ``prune_num_heads`` /
  ``prune_head_dims`` in its pruner. Hence relation 3 instead of equality.
* the classifier output (``head.weight[0]``, ``head.bias[0]``) is a TP group (users must list the
  head in ``ignored_layers``); ours is the same parameter-dim set but frozen ("model output").
* TP has no group for dims it never prunes (patch-embed kernel and input channels, pos_embed's token
  dim, the frozen q/k/v factor); ours reports those as frozen groups. Only components of ours that
  hold a prunable group must have a TP counterpart.
"""
from __future__ import annotations

import warnings
from collections import Counter, defaultdict

import pytest
from conftest import tiny
import torch
from torch import nn

from vitprune.deps import DependencyGraph
from vitprune.frontend.capture import example_input_for, capture

tp = pytest.importorskip("torch_pruning")

Element = tuple[str, int, int]  # (parameter, dim, position)
ParamDim = tuple[str, int]


# -- reducing both sides to elements ------------------------------------------------------------
def _model(depth: int | None = 2, fused_attn: bool = True) -> nn.Module:
    """DeiT-tiny at its own 224×224 (Torch-Pruning's example size), ``depth`` blocks (None: all 12)."""
    return tiny("deit_tiny_patch16_224", fused=fused_attn, depth=depth or 12, img_size=224)


def tp_units(model: nn.Module, x: torch.Tensor) -> list[list[set[Element]]]:
    """TP's groups, each as its list of units (sets of elements removed together)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)
    names = {m: n for n, m in model.named_modules()}
    unwrapped_dim = {id(u.parameters): u.pruning_dim for u in dg.unwrapped_parameters}
    groups = []
    for group in dg.get_all_groups(root_module_types=[nn.Linear, nn.LayerNorm, nn.Conv2d]):
        units: dict[int, set[Element]] = defaultdict(set)
        for item in group:
            for param, dim in _tp_param_dims(dg, item.dep, names, unwrapped_dim):
                for idx, root in zip(item.idxs, item.root_idxs):
                    units[root].add((param, dim, int(idx)))
        groups.append([units[r] for r in sorted(units)])
    return groups


def _tp_param_dims(dg, dep, names, unwrapped_dim) -> list[ParamDim]:
    mod = dep.target.module
    if isinstance(mod, nn.Parameter):
        return [(dg._param_to_name[mod], unwrapped_dim[id(mod)] % mod.dim())]
    if isinstance(mod, (nn.Linear, nn.Conv2d)):
        prefix = names[mod]
        if not dg.is_out_channel_pruning_fn(dep.handler):
            return [(f"{prefix}.weight", 1)]
        return [(f"{prefix}.weight", 0)] + ([(f"{prefix}.bias", 0)] if mod.bias is not None else [])
    if isinstance(mod, nn.LayerNorm):
        return [(f"{names[mod]}.{p}", 0) for p in ("weight", "bias") if getattr(mod, p) is not None]
    return []  # reshapes, elementwise ops, ...: no parameters


def our_units(dg: DependencyGraph) -> dict[Element, frozenset]:
    """Element → key (set of (group axis, channel) over the prunable groups touching it)."""
    keys: dict[Element, set] = defaultdict(set)
    for g in dg.prunable_groups():
        for m in g.members:
            for pos, c in enumerate(m.coords):
                if c >= 0:
                    keys[(m.param, m.dim, pos)].add((g.axis, int(c)))
    return {e: frozenset(k) for e, k in keys.items()}


def our_components(dg: DependencyGraph) -> list[tuple[set[ParamDim], bool]]:
    """Parameter dims linked by sharing any of our groups; with 'holds a prunable group'."""
    parent: dict[ParamDim, ParamDim] = {}

    def find(a):
        parent.setdefault(a, a)
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    prunable_dims = set()
    for g in dg.groups:
        dims = [(m.param, m.dim) for m in g.members]
        for d in dims:
            find(d)
        for d in dims[1:]:
            parent[find(d)] = find(dims[0])
        if g.prunable:
            prunable_dims.update(dims)
    comps: dict[ParamDim, set[ParamDim]] = defaultdict(set)
    for d in parent:
        comps[find(d)].add(d)
    return [(c, bool(c & prunable_dims)) for c in comps.values()]


def partition(units: list[set[Element]]) -> set[frozenset[Element]]:
    """Connected components of units that share elements."""
    parent: dict[Element, Element] = {}

    def find(a):
        parent.setdefault(a, a)
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for u in units:
        u = list(u)
        for e in u:
            find(e)
        for e in u[1:]:
            parent[find(e)] = find(u[0])
    comps: dict[Element, set[Element]] = defaultdict(set)
    for e in parent:
        comps[find(e)].add(e)
    return {frozenset(c) for c in comps.values()}


def our_partition(keys: dict[Element, frozenset], dims: set[ParamDim]) -> set[frozenset[Element]]:
    by_key: dict[frozenset, set[Element]] = defaultdict(set)
    for e, k in keys.items():
        if e[:2] in dims:
            by_key[k].add(e)
    return {frozenset(v) for v in by_key.values()}


def param_dims(units: list[set[Element]]) -> set[ParamDim]:
    return {e[:2] for u in units for e in u}


# -- the comparison -------------------------------------------------------------------------------
def compare(dg: DependencyGraph, tp_groups: list[list[set[Element]]]) -> list[str]:
    """Every disagreement between TP and us (empty list: they agree). See the module docstring."""
    problems: list[str] = []
    comps = our_components(dg)
    comp_sets = [frozenset(c) for c, _ in comps]
    tp_sets = [frozenset(param_dims(g)) for g in tp_groups]
    for s in tp_sets:
        if s not in comp_sets:
            problems.append(f"TP group {sorted(s)} is no component of ours")
    for c, prunable in comps:
        if prunable and frozenset(c) not in tp_sets:
            problems.append(f"our component {sorted(c)} is no TP group")
    keys = our_units(dg)
    kinds: dict[ParamDim, set[str]] = defaultdict(set)
    for g in dg.prunable_groups():
        for m in g.members:
            kinds[(m.param, m.dim)].add(g.kind)
    for units, s in zip(tp_groups, tp_sets):
        group_kinds = set().union(*(kinds.get(d, set()) for d in s))
        if not group_kinds:
            continue  # frozen on our side (classifier output): relation 1 covered it
        ours = our_partition(keys, set(s))
        if group_kinds <= {"residual", "hidden"}:
            theirs = partition(units)
        elif group_kinds == {"head", "head_dim"}:
            theirs = partition(_merge_qkv_sections(units))
            if not _refines(partition(units), ours):
                problems.append(f"TP's attention units do not refine ours on {sorted(s)}")
        else:
            problems.append(f"unexpected kinds {sorted(group_kinds)} on {sorted(s)}")
            continue
        if theirs != ours:
            problems.append(f"element partitions differ on {sorted(s)[:3]}...: TP {len(theirs)} "
                            f"units vs ours {len(ours)}")
    return problems


def _merge_qkv_sections(units: list[set[Element]]) -> list[set[Element]]:
    """TP's units r, r + C, r + 2C of a fused qkv output merged (C = rows / 3): the coupling TP
    leaves to its num_heads hints and we derive from the reshape and q @ k^T."""
    n = len(units)
    assert n % 3 == 0, n
    c = n // 3
    return [units[r] | units[r + c] | units[r + 2 * c] for r in range(c)]


def _refines(fine: set[frozenset], coarse: set[frozenset]) -> bool:
    return all(any(f <= c for c in coarse) for f in fine)


# -- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[True, False], ids=["fused_attn", "matmul_attn"])
def both(request):
    model = _model(depth=2, fused_attn=request.param)
    x = example_input_for((3, 224, 224), batch=1)
    dg = DependencyGraph.build(capture(model, x))
    return dg, tp_units(_model(depth=2, fused_attn=request.param), x)


# -- tests -------------------------------------------------------------------------------------------
def test_tp_and_we_agree_on_deit_tiny(both):
    dg, tp_groups = both
    assert not dg.unsupported
    assert compare(dg, tp_groups) == []


def test_group_inventory_matches_tp(both):
    """Same count per kind: 1 residual, one hidden per block, one attention group per block
    (TP: one qkv group; ours: a head and a head_dim group over the same parameter dims)."""
    dg, tp_groups = both
    kinds = defaultdict(int)
    for g in dg.prunable_groups():
        kinds[g.kind] += 1
    assert dict(kinds) == {"residual": 1, "hidden": 2, "head": 2, "head_dim": 2}
    sizes = sorted(len(g) for g in tp_groups)
    assert sizes == [192, 576, 576, 768, 768, 1000]
    residual = next(g for g in dg.prunable_groups() if g.kind == "residual")
    tp_residual = next(g for g in tp_groups if len(g) == 192)
    assert {(m.param, m.dim) for m in residual.members} == param_dims(tp_residual)
    assert {("pos_embed", 2), ("cls_token", 2), ("norm.weight", 0), ("head.weight", 1)} <= param_dims(tp_residual)


def test_attention_difference_is_exactly_the_qkv_sections(both):
    """Without merging the q/k/v sections TP's attention partition is strictly finer than ours:
    each of our (head, head_dim) units = TP's {q row}, {k row} and {v row, proj column}."""
    dg, tp_groups = both
    keys = our_units(dg)
    qkv = next(g for g in tp_groups if len(g) == 576 and ("blocks.0.attn.qkv.weight", 0) in param_dims(g))
    ours = our_partition(keys, param_dims(qkv))
    theirs = partition(qkv)
    assert len(ours) == 192 and len(theirs) == 3 * 192
    unit = next(u for u in ours if ("blocks.0.attn.proj.weight", 1, 70) in u)  # head 1, dim 6
    assert {e for e in unit if e[0] == "blocks.0.attn.qkv.weight"} == {
        ("blocks.0.attn.qkv.weight", 0, r) for r in (70, 192 + 70, 384 + 70)}


def test_comparison_can_fail(both):
    """The oracle catches a residual group that lost pos_embed, a hidden group that lost fc2's input
    dim, and a member whose channels are coupled in the wrong order."""
    dg, tp_groups = both
    baseline = set(compare(dg, tp_groups))
    for kind, victim in (("residual", "pos_embed"), ("hidden", "blocks.1.mlp.fc2.weight")):
        g = next(g for g in dg.prunable_groups() if g.kind == kind and victim in g.params())
        saved = list(g.members)
        g.members = [m for m in g.members if m.param != victim]
        try:
            assert set(compare(dg, tp_groups)) - baseline, f"dropping {victim} from {kind} went unnoticed"
        finally:
            g.members = saved
    # a wrong channel order inside one member (fc2 column c coupled to fc1 row 767 - c)
    g = next(g for g in dg.prunable_groups() if g.kind == "hidden")
    m = next(m for m in g.members if m.dim == 1)
    saved_coords = m.coords
    m.coords = saved_coords[::-1].copy()
    try:
        assert set(compare(dg, tp_groups)) - baseline, "a reversed channel order went unnoticed"
    finally:
        m.coords = saved_coords
    assert set(compare(dg, tp_groups)) == baseline


def test_full_depth_deit_tiny_agrees():
    """All 12 blocks, SDPA path (about 3 s: both tools on the full model)."""
    x = example_input_for((3, 224, 224), batch=1)
    dg = DependencyGraph.build(capture(_model(depth=None), x))
    assert compare(dg, tp_units(_model(depth=None), x)) == []
    assert Counter(g.kind for g in dg.prunable_groups()) == {"residual": 1, "hidden": 12, "head": 12, "head_dim": 12}
