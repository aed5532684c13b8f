"""Planning: choose how many (and which) channels each group keeps to meet a FLOPs target.

Global ranking: every group's channel scores are divided by the group's mean (so a head and an MLP
channel are compared on one scale), sorted, and cut into *units* of ``round_to`` channels (one head for
head groups, whose width is already a multiple of head_dim). Units are taken best-first — each group's
own units in its own order — until the FLOP model says the target is met; a final pass fills with any
remaining unit that still fits, so rounding of one group does not make the whole plan miss the target.
Floors (``min_keep``) are taken first and are never removed: no group ever drops to zero.
Uniform ranking keeps the same fraction of every group (bisection on that fraction).

``round_to`` holds for every kind but heads: a group whose size it divides is cut in units of
``round_to`` (a group of exactly ``round_to`` channels, e.g. head_dim 64 at ``round_to=64``, is kept
whole); one whose size it does not divide is cut channel by channel, and the plan's notes say so.

``head_dim_policy``: ``"keep"`` (the default) plans whole heads and leaves every head_dim whole
wherever that block's heads are planned too; ``"shrink"`` also narrows head_dim. Why keep: ONNX
Runtime runs attention in blocks of 16 head_dim columns, and a narrower head saves little time per
FLOP (issue 13: head_dim 32/48 plans ran at 0.77–0.83 latency efficiency, whole heads at 0.98);
benchmarks/README.md has the measurement.

The cost is FLOPs (:class:`FlopModel`) or estimated ORT latency (:class:`vitprune.plan.cost.
LatencyModel`, with a ``Budget`` whose base is its ``cost()``): the planner only asks ``cost(counts)``.
"""
from __future__ import annotations

from math import ceil

import numpy as np

from passes.width import WidthPruning
from vitprune.deps import ChannelGroup, DependencyGraph
from vitprune.deps.flops import FlopModel
from vitprune.errors import InputError, PlanError
from vitprune.plan.budget import Budget, Plan
from vitprune.plan.cost import LatencyModel
from vitprune.spec import HEAD_DIM_POLICIES

#: "keep": remove whole heads and leave head_dim whole; "shrink": narrow head_dim as well.
DEFAULT_HEAD_DIM_POLICY = "keep"


def eligible_groups(dg: DependencyGraph, kinds: set[str]) -> list[ChannelGroup]:
    return [g for g in dg.prunable_groups() if g.kind in kinds]


def unit_size(group: ChannelGroup, round_to: int) -> int:
    """Channels per pruning unit: 1 head, or ``round_to`` channels when ``round_to`` divides the group
    (every kept width is then a multiple of it; a group of exactly ``round_to`` stays whole), else 1."""
    if group.kind == "head" or round_to <= 1:
        return 1
    return round_to if group.size % round_to == 0 else 1


def planned_groups(groups: list[ChannelGroup], head_dim_policy: str) -> list[ChannelGroup]:
    """The groups the planner cuts: under ``"keep"`` every head_dim group whose attention also has
    its head group in ``groups`` is left whole (with heads not eligible, head_dim is the only way
    to narrow that attention, so it stays)."""
    if head_dim_policy not in HEAD_DIM_POLICIES:
        raise InputError(f"head_dim_policy must be one of {', '.join(HEAD_DIM_POLICIES)}, got {head_dim_policy!r}")
    if head_dim_policy == "shrink":
        return list(groups)
    head_params = {p for g in groups if g.kind == "head" for p in g.params()}
    return [g for g in groups if g.kind != "head_dim" or not head_params & set(g.params())]


def kept_importance(scores: dict[str, np.ndarray], keep: dict[str, list[int]],
                    groups: list[ChannelGroup]) -> float:
    """The accuracy proxy of a plan: over ``groups``, the sum of kept channels' scores, each group's
    scores divided by their mean (the planner's scale; a group absent from ``keep`` is kept whole)."""
    total = 0.0
    for g in groups:
        s = scores[g.name] / (scores[g.name].mean() + 1e-12)
        total += float(s[keep[g.name]].sum()) if g.name in keep else float(s.sum())
    return total


def plan_width(dg: DependencyGraph, cost_model: FlopModel | LatencyModel, scores: dict[str, np.ndarray],
               groups: list[ChannelGroup], budget: Budget, *, round_to: int = 1, min_keep: float = 0.1,
               ranking: str = "global", head_dim_policy: str = DEFAULT_HEAD_DIM_POLICY) -> Plan:
    """Per-group keeps whose cost meets ``budget`` (the original model's; ``cost_model`` counts the
    graph as it is now, after any depth stage), within its tolerance when units allow. The plan's
    one pass is a :class:`WidthPruning`; ``detail`` holds ``keep``, ``counts`` and ``cost`` (the unit
    of ``plan.flops``: "flops", or "ms" for a latency model)."""
    goal = budget.limit
    whole = [g for g in groups if g not in planned_groups(groups, head_dim_policy)]
    groups = planned_groups(groups, head_dim_policy)
    orders = {g.name: np.argsort(-scores[g.name], kind="stable") for g in groups}
    units = {g.name: unit_size(g, round_to) for g in groups}
    floors = {g.name: floor_width(g, units[g.name], min_keep) for g in groups}

    def counts_of(kept: dict[str, int]) -> dict[int, int]:
        return {g.axis: kept[g.name] for g in groups}

    def cost(kept: dict[str, int]) -> float:
        return cost_model.cost(counts_of(kept))

    if ranking == "uniform":
        kept = _uniform(groups, units, floors, cost, goal)
    else:
        kept = _global(groups, units, floors, scores, orders, cost, goal)
    counts = counts_of(kept)
    keep = {g.name: sorted(orders[g.name][:kept[g.name]].tolist()) for g in groups}
    unit = "ms" if isinstance(cost_model, LatencyModel) else "flops"
    spent = cost(kept)
    plan = Plan("width", [WidthPruning(keep)], spent if unit == "flops" else None, budget,
                detail={"keep": keep, "counts": counts, "cost": unit, "head_dim_policy": head_dim_policy}, cost=spent)
    if not budget.met(spent) and not budget.met(cost(floors)):
        raise PlanError(f"target {budget.unit} {budget.goal:.3f} is below what the floors allow "
                        f"({budget.ratio(cost(floors)):.3f} with min_keep={min_keep}); lower min_keep or raise the target")
    if not plan.within_tolerance:
        plan.notes.append(f"nearest achievable {budget.unit} ratio with round_to={round_to} is {plan.ratio:.4f} "
                          f"(target {budget.goal:.4f})")
    if whole:
        plan.notes.append(f"head_dim kept whole in {len(whole)} attention(s) (head_dim_policy='keep'): "
                          f"whole heads are removed instead")
    plan.notes.extend(rounding_notes(groups, kept, round_to))
    return plan


def rounding_notes(groups: list[ChannelGroup], kept: dict[str, int], round_to: int) -> list[str]:
    """Say where a pruned width is not a multiple of ``round_to``: a group whose size ``round_to``
    does not divide is pruned channel by channel (:func:`unit_size`), and a request that silently
    did nothing would be worse than an unrounded width. head_dim gets its own note: an odd head_dim
    is the shape ORT runs slowest, and removing whole heads avoids it."""
    if round_to <= 1:
        return []
    off = [g for g in groups if g.kind != "head" and kept[g.name] < g.size and kept[g.name] % round_to]
    notes = []
    for kinds, hint in (({"head_dim"}, "; head_dim_policy='keep' removes whole heads instead"), (None, "")):
        some = [g for g in off if (g.kind in kinds if kinds else g.kind != "head_dim")]
        if not some:
            continue
        shown = ", ".join(f"{g.name} {g.size}->{kept[g.name]}" for g in some[:3])
        more = f" and {len(some) - 3} more" if len(some) > 3 else ""
        why = ("it is larger than their sizes" if all(round_to > g.size for g in some)
               else "it does not divide their sizes")
        what = "head_dim group(s)" if kinds else "pruned group(s)"
        notes.append(f"round_to={round_to} cannot be met by {len(some)} {what} ({why}); they were pruned "
                     f"channel by channel: {shown}{more}{hint}")
    return notes


def floor_width(group: ChannelGroup, unit: int, min_keep: float) -> int:
    """The fewest channels ``group`` keeps: ``min_keep`` of it, in whole units, at least one unit."""
    n = max(unit, ceil(min_keep * group.size / unit) * unit)
    return min(n, group.size)


def _global(groups, units, floors, scores, orders, cost, goal) -> dict[str, int]:
    # Candidate units beyond the floors, scored by the mean normalised score of their channels.
    candidates: list[tuple[float, str, int]] = []
    for g in groups:
        s = scores[g.name]
        norm = s[orders[g.name]] / (s.mean() + 1e-12)
        u = units[g.name]
        for start in range(floors[g.name], g.size, u):
            candidates.append((float(norm[start:start + u].mean()), g.name, start))
    # Within a group unit scores are non-increasing, so a stable sort keeps each group in order.
    candidates.sort(key=lambda c: -c[0])

    def kept_after(k: int) -> dict[str, int]:
        kept = dict(floors)
        for _, name, _start in candidates[:k]:
            kept[name] += units[name]
        return kept

    lo, hi = 0, len(candidates)  # largest k with flops(k) <= goal
    if cost(kept_after(hi)) <= goal:
        return kept_after(hi)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(kept_after(mid)) <= goal:
            lo = mid
        else:
            hi = mid - 1
    kept = kept_after(lo)
    # Fill: later units that still fit (a finer group can use what a coarse unit could not).
    # Cost only grows as units are added, so a group whose next unit overshoots once is done.
    done: set[str] = set()
    for _, name, _start in candidates[lo:]:
        if name in done or kept[name] + units[name] > _group_size(groups, name):
            continue
        trial = dict(kept)
        trial[name] += units[name]
        f = cost(trial)
        if f <= goal:
            kept = trial
        else:
            done.add(name)
    return kept


def _group_size(groups: list[ChannelGroup], name: str) -> int:
    return next(g.size for g in groups if g.name == name)


def _uniform(groups, units, floors, cost, goal) -> dict[str, int]:
    def kept_at(ratio: float) -> dict[str, int]:
        out = {}
        for g in groups:
            u = units[g.name]
            n = int(round(ratio * g.size / u)) * u
            out[g.name] = min(g.size, max(floors[g.name], n))
        return out

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if cost(kept_at(mid)) <= goal:
            lo = mid
        else:
            hi = mid
    return kept_at(lo)
