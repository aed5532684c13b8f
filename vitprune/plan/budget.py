"""The one home of budgets and plans: what may be spent, and what a planner decided to spend.

A :class:`Budget` is a goal as a fraction of a base quantity (the original model's FLOPs, or its
measured ONNX Runtime latency) with the tolerance every stage judges it by. Every stage receives the
budget of the *original* model, so "0.5" means half of what the user started from whatever ran
before. A planner (depth, width, tokens) returns a :class:`Plan`: the passes to apply, the FLOPs they
lead to, and the decisions for the report.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from passes.base import Pass

#: |achieved - goal| allowed, in fractions of the original FLOPs (±1 point of the original).
TOLERANCE = 0.01
#: |measured - goal| allowed for a measured latency ratio: timing noise on a shared machine is a
#: few percent, so a FLOPs-sized tolerance would chase noise.
LATENCY_TOLERANCE = 0.03


@dataclass(frozen=True)
class Budget:
    """``goal`` × ``base`` of ``unit`` ("flops", or "latency" in ms), judged within ``tolerance``.

    >>> b = Budget(base=1000, goal=0.5)
    >>> b.limit, b.met(495), b.above(520), b.share_of(800)
    (500.0, True, True, 0.625)
    """

    base: float
    goal: float
    unit: str = "flops"
    tolerance: float = TOLERANCE

    @classmethod
    def latency(cls, base_ms: float, goal: float) -> "Budget":
        return cls(base_ms, goal, "latency", LATENCY_TOLERANCE)

    @property
    def limit(self) -> float:
        """The goal in absolute units (FLOPs or ms)."""
        return self.goal * self.base

    def ratio(self, value: float) -> float:
        return value / self.base

    def met(self, value: float) -> bool:
        """``value`` is at or below the goal (no tolerance: what planners aim for)."""
        return value <= self.limit * (1 + 1e-9)

    def close(self, value: float) -> bool:
        """``value`` lands within the tolerance of the goal, on either side."""
        return abs(self.ratio(value) - self.goal) <= self.tolerance

    def above(self, value: float) -> bool:
        """``value`` misses the goal by more than the tolerance (too large)."""
        return self.ratio(value) > self.goal + self.tolerance

    def share_of(self, current: float) -> float:
        """The fraction of ``current`` (what an earlier stage left) that meets the goal."""
        return self.limit / current


@dataclass
class Plan:
    """A planner's decision: ``passes`` to apply in order, the ``flops`` they lead to (batch 1; None when a
    latency plan does not count them), ``cost`` in the budget's unit when that is not FLOPs, the
    ``budget`` planned against (None for an explicit request), ``detail`` for the report (JSON-able: keeps, counts, scores) and
    ``notes`` for the user. ``graph``: set when planning already produced the rewritten graph (the
    gated depth search trains while it selects), with ``recipe`` the passes' recipes."""

    stage: str
    passes: list[Pass]
    flops: float | None = None
    budget: Budget | None = None  # None: an explicit request, planned against no target
    detail: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    graph: fx.GraphModule | None = None
    recipe: list[dict[str, Any]] = field(default_factory=list)
    cost: float | None = None  # in the budget's unit (ms for a latency budget); None: the same as flops

    @property
    def spent(self) -> float | None:
        """What the plan spends in the budget's unit."""
        return self.flops if self.cost is None else self.cost

    @property
    def ratio(self) -> float:
        """The planned cost as a fraction of the budget's base (the original model)."""
        return self.budget.ratio(self.spent)

    @property
    def within_tolerance(self) -> bool:
        return self.budget.close(self.spent)
