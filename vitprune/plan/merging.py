"""ToMe planning: how many tokens each block merges (for :class:`passes.merging.TokenMerging`).

* :func:`parse_merge` — the explicit form ``"merge=8"`` (8 tokens in every block, as ToMe's ``r``) or
  ``"merge=8,start=4"`` (from block 4 on);
* :func:`tome_plan` — ``--method tome``: the merge count meeting a FLOPs target within ±1%.

A constant ``r`` moves the FLOPs in steps of several percent (on DeiT-S one more token per block
removes ~3% of them), so a constant alone cannot always land within ±1%. The planner therefore
searches the schedules "``r`` in every block from ``start`` on, ``r + 1`` in the last ``m`` of them"
(``m = 0`` is plain ToMe ``r``): one more merge in one more block moves the FLOPs by at most the cost of
one token through the remaining blocks. The FLOPs fall monotonically along that order, so bisection
finds the schedule closest to the target; the report gives ``r`` and ``m``.

:class:`MergeFlops` predicts the FLOPs of any schedule exactly (the number
:func:`vitprune.deps.flops.count_flops` reports for the merged graph): each block is split at its
attention's residual add into a part that sees the tokens entering it and a part (the MLP) that sees
the tokens left after its merge, each a quadratic in its token count (interpolated from three probe
graphs, as :class:`vitprune.plan.tokens.TokenFlops` does), plus the matching's one counted product,
``(B, |A|, d) @ (B, d, |B|)``.
"""
from __future__ import annotations

import re
from typing import Sequence

import torch.fx as fx

from passes.merging import TokenMerging, merge_layout, token_counts
from vitprune.deps.tokens import attention_keys
from vitprune.errors import PlanError, SpecError
from vitprune.plan.budget import Budget, Plan
from vitprune.plan.tokens import _interpolate, _segment_flops

__all__ = ["MergeFlops", "merge_schedule", "parse_merge", "tome_plan"]


def merge_schedule(num_blocks: int, r: int, start: int = 0, extra: int = 0) -> list[int]:
    """``r`` merges in every block from ``start`` on, ``r + 1`` in the last ``extra`` of them."""
    if not (isinstance(r, int) and r >= 0):
        raise SpecError(f"tokens: merge must be an integer >= 0, got {r!r}")
    if not (isinstance(start, int) and 0 <= start < num_blocks):
        raise SpecError(f"tokens: start must be a block index in [0, {num_blocks - 1}], got {start!r}")
    return [0 if b < start else r + (1 if b >= num_blocks - extra else 0) for b in range(num_blocks)]


def parse_merge(spec: str, gm: fx.GraphModule) -> list[int]:
    """``"merge=R[,start=N]"`` → merge counts per attention block of ``gm``."""
    parts = {}
    for part in filter(None, (p.strip() for p in str(spec).split(","))):
        m = re.fullmatch(r"(merge|start)\s*=\s*([0-9]+)", part)
        if m is None:
            raise SpecError(f"tokens: cannot read {part!r} in {spec!r}; expected merge=R[,start=N]")
        parts[m.group(1)] = int(m.group(2))
    if "merge" not in parts:
        raise SpecError(f"tokens: {spec!r} needs merge= (e.g. merge=8)")
    return merge_schedule(len(merge_layout(gm).blocks), parts["merge"], parts.get("start", 0))


class MergeFlops:
    """FLOPs (batch 1, as :func:`vitprune.deps.flops.count_flops`) of ``gm`` merged by any schedule."""

    def __init__(self, gm: fx.GraphModule):
        self.layout = merge_layout(gm)
        n = self.layout.num_patches
        self.points = sorted({n, max(1, -(-n // 2)), max(1, -(-n // 4))}, reverse=True)
        probes = [_segment_flops(gm, self.layout, p, split=True) for p in self.points]
        self._values = [[probe[s] for probe in probes] for s in range(2 * len(self.layout.blocks) + 1)]
        self._dims = [_key_dim(gm, b) for b in self.layout.blocks]
        self.base = self.flops([0] * len(self.layout.blocks))

    def flops(self, r: Sequence[int]) -> int:
        """FLOPs of the merged graph (``r`` capped as the pass caps it)."""
        r = TokenMerging(r).schedule(self.layout)
        counts, p = token_counts(self.layout, r), self.layout.prefix
        total = self._values[0][0]
        for b, x in enumerate(r):
            total += _interpolate(self.points, self._values[1 + 2 * b], counts[b] - p)
            total += _interpolate(self.points, self._values[2 + 2 * b], counts[b + 1] - p)
            if x:  # the similarity product of the bipartite matching
                patches, first = counts[b] - p, p % 2
                total += 2 * ((patches - first + 1) // 2) * ((patches - (1 - first) + 1) // 2) * self._dims[b]
        return int(total)

    def ratio(self, r: Sequence[int]) -> float:
        return self.flops(r) / self.base


def _key_dim(gm: fx.GraphModule, block) -> int:
    keys = attention_keys(gm, block)
    shape = keys.key.meta["tensor_meta"].shape
    return int(shape[-2] if keys.transposed else shape[-1])


def tome_plan(gm: fx.GraphModule, budget: Budget, *, start: int = 0,
              flop_model: MergeFlops | None = None) -> Plan:
    """The merge schedule meeting ``budget`` (the original model's FLOPs; ``gm`` may already be
    pruned) within its tolerance: ``r`` from ``start`` on, ``r + 1`` in the last ``m`` blocks. The
    plan's one pass is a :class:`TokenMerging`; ``detail`` holds ``r``, ``extra`` (m) and ``schedule``."""
    model = flop_model or MergeFlops(gm)
    blocks = len(model.layout.blocks)
    span = blocks - start
    if not 0 <= start < blocks:
        raise PlanError(f"tome: start must be in [0, {blocks - 1}], got {start}")

    def at(step: int) -> tuple[list[int], int]:
        r = merge_schedule(blocks, step // span, start, step % span)
        return r, model.flops(r)

    top = span * (model.layout.seq_len // 2 + 1)  # beyond every cap: the fewest tokens merging reaches
    lo, hi = 0, top
    while hi - lo > 1:  # flops(step) is non-increasing: bisect to the boundary
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if at(mid)[1] > budget.limit else (lo, mid)
    (_, r, flops, step) = min((abs(f - budget.limit), r, f, s) for s in (lo, hi) for r, f in [at(s)])
    capped = TokenMerging(r).schedule(model.layout)
    plan = Plan("merge", [TokenMerging(capped)], flops, budget,
                detail={"r": step // span, "extra": step % span, "start": start, "schedule": capped})
    if not plan.within_tolerance:
        floor = budget.ratio(at(top)[1])
        raise PlanError(f"tome: no merge schedule reaches {budget.goal:.3f} × FLOPs within ±{budget.tolerance:.0%} "
                        f"(closest {plan.ratio:.3f}; merging all it can from block {start} on gives {floor:.3f})")
    return plan
