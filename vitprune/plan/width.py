"""Planning: choose how many (and which) channels each group keeps to meet a FLOPs target.

Global ranking: every group's channel scores are divided by the group's mean (so a head and an MLP
channel are compared on one scale), sorted, and cut into *units* of ``round_to`` channels (one head for
head groups, whose width is already a multiple of head_dim). Units are taken best-first — each group's
own units in its own order — until the FLOP model says the target is met; a final pass fills with any
remaining unit that still fits, so rounding of one group does not make the whole plan miss the target.
Floors (``min_keep``) are taken first and are never removed: no group ever drops to zero.
Uniform ranking keeps the same fraction of every group (bisection on that fraction).
"""
from __future__ import annotations

from math import ceil

import numpy as np

from passes.width import WidthPruning
from vitprune.deps import ChannelGroup, DependencyGraph
from vitprune.deps.flops import FlopModel
from vitprune.errors import PlanError
from vitprune.plan.budget import Budget, Plan


def eligible_groups(dg: DependencyGraph, kinds: set[str]) -> list[ChannelGroup]:
    return [g for g in dg.prunable_groups() if g.kind in kinds]


def unit_size(group: ChannelGroup, round_to: int) -> int:
    """Channels per pruning unit: 1 head, or ``round_to`` channels when the group size allows it."""
    if group.kind == "head" or round_to <= 1:
        return 1
    return round_to if group.size % round_to == 0 and group.size > round_to else 1


def plan_width(dg: DependencyGraph, flop_model: FlopModel, scores: dict[str, np.ndarray],
               groups: list[ChannelGroup], budget: Budget, *, round_to: int = 1, min_keep: float = 0.1,
               ranking: str = "global") -> Plan:
    """Per-group keeps whose FLOPs meet ``budget`` (the original model's; ``flop_model`` counts the
    graph as it is now, after any depth stage), within its tolerance when units allow. The plan's
    one pass is a :class:`WidthPruning`; ``detail`` holds ``keep`` and ``counts``."""
    goal = budget.limit
    orders = {g.name: np.argsort(-scores[g.name], kind="stable") for g in groups}
    units = {g.name: unit_size(g, round_to) for g in groups}
    floors = {g.name: _floor(g, units[g.name], min_keep) for g in groups}

    def counts_of(kept: dict[str, int]) -> dict[int, int]:
        return {g.axis: kept[g.name] for g in groups}

    if ranking == "uniform":
        kept = _uniform(groups, units, floors, flop_model, goal, counts_of)
    else:
        kept = _global(groups, units, floors, scores, orders, flop_model, goal, counts_of)
    counts = counts_of(kept)
    keep = {g.name: sorted(orders[g.name][:kept[g.name]].tolist()) for g in groups}
    plan = Plan("width", [WidthPruning(keep)], flop_model.flops(counts), budget,
                detail={"keep": keep, "counts": counts})
    floor_flops = flop_model.flops(counts_of(floors))
    if not budget.met(plan.flops) and not budget.met(floor_flops):
        raise PlanError(f"target FLOPs {budget.goal:.3f} is below what the floors allow "
                        f"({budget.ratio(floor_flops):.3f} with min_keep={min_keep}); lower min_keep or raise the target")
    if not plan.within_tolerance:
        plan.notes.append(f"nearest achievable FLOPs ratio with round_to={round_to} is {plan.ratio:.4f} "
                          f"(target {budget.goal:.4f})")
    plan.notes.extend(rounding_notes(groups, kept, round_to))
    return plan


def rounding_notes(groups: list[ChannelGroup], kept: dict[str, int], round_to: int) -> list[str]:
    """Say where a pruned width is not a multiple of ``round_to``: a group whose size ``round_to``
    does not divide (or that is no larger than it) is pruned channel by channel (:func:`unit_size`),
    and a request that silently did nothing would be worse than an unrounded width."""
    if round_to <= 1:
        return []
    off = [g for g in groups if g.kind != "head" and kept[g.name] < g.size and kept[g.name] % round_to]
    if not off:
        return []
    largest = max(g.size for g in groups if g.kind != "head")
    shown = ", ".join(f"{g.name} {g.size}->{kept[g.name]}" for g in off[:3])
    more = f" and {len(off) - 3} more" if len(off) > 3 else ""
    why = (f"it is not smaller than any group, the largest has {largest} channels" if round_to >= largest
           else "it does not divide their sizes")
    return [f"round_to={round_to} cannot be met by {len(off)} pruned group(s) ({why}); they were pruned "
            f"channel by channel: {shown}{more}"]


def _floor(group: ChannelGroup, unit: int, min_keep: float) -> int:
    n = max(unit, ceil(min_keep * group.size / unit) * unit)
    return min(n, group.size)


def _global(groups, units, floors, scores, orders, flop_model, goal, counts_of) -> dict[str, int]:
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
    if flop_model.flops(counts_of(kept_after(hi))) <= goal:
        return kept_after(hi)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if flop_model.flops(counts_of(kept_after(mid))) <= goal:
            lo = mid
        else:
            hi = mid - 1
    kept = kept_after(lo)
    # Fill: later units that still fit (a finer group can use what a coarse unit could not).
    # FLOPs only grow as units are added, so a group whose next unit overshoots once is done.
    done: set[str] = set()
    for _, name, _start in candidates[lo:]:
        if name in done or kept[name] + units[name] > _group_size(groups, name):
            continue
        trial = dict(kept)
        trial[name] += units[name]
        f = flop_model.flops(counts_of(trial))
        if f <= goal:
            kept = trial
        else:
            done.add(name)
    return kept


def _group_size(groups: list[ChannelGroup], name: str) -> int:
    return next(g.size for g in groups if g.name == name)


def _uniform(groups, units, floors, flop_model, goal, counts_of) -> dict[str, int]:
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
        if flop_model.flops(counts_of(kept_at(mid))) <= goal:
            lo = mid
        else:
            hi = mid
    return kept_at(lo)
