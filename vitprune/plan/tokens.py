"""CP-ViT planning: which patch tokens each block keeps, and which heads survive.

Three ways to a keep list for :class:`passes.tokens.TokenPruning` (one count of patch tokens
entering each block, non-increasing):

* :func:`parse_tokens` — the explicit form ``"keep=0.5,start=4"`` (a one-step cut: 50% of the patches
  from block 4 on) or ``"keep=0.7,start=3,every=3"`` (EViT-style: ×0.7 at blocks 3, 6, 9);
* :func:`cpvit_schedule` — CP-ViT's progressive, *layer-aware* schedule meeting a FLOPs target: the
  attention range of each block, measured on calibration images, sets how fast pruning grows behind it;
* a list written by hand.

:class:`TokenFlops` predicts the FLOPs of any keep list exactly (the number
:func:`vitprune.deps.flops.count_flops` reports for the pruned graph), so schedules are searched without
building graphs. :func:`cpvit_head_scores` / :func:`cpvit_head_keep` score heads for static removal
through :class:`passes.width.WidthPruning` (apply it *before* token pruning).

Definitions (documented choices; the paper, Song et al. 2022 arXiv 2203.04570, gives the ideas, its
public code ok858ok/CP-ViT the patch score and nothing for heads or the range-driven ratio):

* **attention range** of block ``l``: the attention-weighted mean distance, on the patch grid, between
  a patch query and the patch keys it attends to (prefix tokens excluded, rows renormalised), averaged
  over heads, queries and calibration images, divided by the mean pairwise patch distance (uniform
  attention → 1.0, purely local attention → near 0). The public code computes a related local/global
  count (arg-max key within ±10 sequence positions of the query) but never uses it.
* **progressive, layer-aware ratio**: the fraction of patches pruned entering block ``l ≥ start`` is
  ``p_l = min(max_prune, α · Σ_{j=start-1}^{l-1} r̂_j)`` with ``r̂`` the ranges normalised to mean 1:
  pruning grows with depth, faster behind blocks that attend globally (their information has already
  been spread across tokens) and slower behind local ones. ``α`` is found by bisection so the FLOPs
  land on the target (±1% of the original FLOPs, :data:`vitprune.plan.budget.TOLERANCE`).
* **cumulative head score** of head ``h`` in block ``l``: ``Σ_p ŵ_l[p] · max_i A_l[h, i, p]`` averaged
  over images, where ``ŵ_l`` is the cumulative patch score after block ``l`` normalised to mean 1 — a
  head matters when its attention peaks on patches that are informative across the model so far. The
  lowest-scoring heads of each block are removed (at least ``min_heads`` stay).
"""
from __future__ import annotations

import copy
import math
import operator
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.fx as fx

from passes.tokens import TokenPruning, explicit_attention, rewrite_length_constants
from vitprune.deps.tokens import META_KEY, TokenLayout, analyse_tokens, find_length_constants, keep_counts

from vitprune.deps import DependencyGraph
from vitprune.deps.flops import node_flops
from vitprune.deps.branches import ancestors
from vitprune.errors import PlanError, SpecError
from vitprune.plan.budget import Budget, Plan

__all__ = ["Calibration", "TokenFlops", "calibrate", "cpvit_head_keep", "cpvit_head_scores",
           "cpvit_plan", "cpvit_schedule", "kept_token_ids", "parse_tokens", "token_keep"]


# -- the explicit form ------------------------------------------------------------------------
def token_keep(num_blocks: int, num_patches: int, keep: float, start: int,
               every: int | None = None) -> list[int]:
    """Patch tokens entering each block: ``keep`` × the patches from block ``start`` on (compounded
    every ``every`` blocks when given). Counts round half up and never drop below 1."""
    if not (isinstance(keep, (int, float)) and 0.0 < keep <= 1.0):
        raise SpecError(f"tokens: keep must be a fraction in (0, 1], got {keep!r}")
    if not (isinstance(start, int) and 1 <= start < num_blocks):
        raise SpecError(f"tokens: start must be a block index in [1, {num_blocks - 1}] (block 0 has no "
                        f"attention score yet), got {start!r}")
    if every is not None and not (isinstance(every, int) and every >= 1):
        raise SpecError(f"tokens: every must be an integer >= 1, got {every!r}")
    out = []
    for block in range(num_blocks):
        steps = 0 if block < start else (1 if every is None else 1 + (block - start) // every)
        out.append(max(1, math.floor(num_patches * keep ** steps + 0.5)))
    return out


def parse_tokens(spec: str, gm: fx.GraphModule) -> list[int]:
    """``"keep=0.5,start=4"`` (optionally ``",every=3"``) → patch tokens entering each block of ``gm``."""
    fields_ = {}
    for part in filter(None, (p.strip() for p in str(spec).split(","))):
        m = re.fullmatch(r"(keep|start|every)\s*=\s*([0-9.eE+-]+)", part)
        if m is None:
            raise SpecError(f"tokens: cannot read {part!r} in {spec!r}; expected keep=F,start=N[,every=M]")
        fields_[m.group(1)] = m.group(2)
    if "keep" not in fields_ or "start" not in fields_:
        raise SpecError(f"tokens: {spec!r} needs both keep= and start= (e.g. keep=0.5,start=4)")
    try:
        keep = float(fields_["keep"])
        start = int(fields_["start"])
        every = int(fields_["every"]) if "every" in fields_ else None
    except ValueError as e:
        raise SpecError(f"tokens: {spec!r}: {e}") from None
    layout = analyse_tokens(gm)
    return token_keep(len(layout.blocks), layout.num_patches, keep, start, every)


# -- exact FLOPs of any keep list -------------------------------------------------------------
class TokenFlops:
    """FLOPs (batch 1, as :func:`vitprune.deps.flops.count_flops`) of ``gm`` under any keep list.

    Every block's FLOPs are a quadratic in the tokens it processes (linear layers ∝ n, attention ∝ n²,
    pooled heads constant). Three probe graphs, each truncating the sequence entering *every* block to
    one length, are counted node by node under FlopCounterMode on fake tensors; each block's quadratic
    is interpolated exactly (rational arithmetic) from them. Nodes are attributed to the block whose
    residual stream they follow; nodes before the first block are a constant.
    """

    def __init__(self, gm: fx.GraphModule):
        self.layout = analyse_tokens(gm)
        np_ = self.layout.num_patches
        self.points = sorted({np_, max(1, -(-np_ // 2)), max(1, -(-np_ // 4))}, reverse=True)
        per_probe = [_segment_flops(gm, self.layout, n) for n in self.points]
        self._values = [[probe[seg] for probe in per_probe] for seg in range(len(self.layout.blocks) + 1)]
        self.base = self.flops([np_] * len(self.layout.blocks))

    def flops(self, keep: Sequence[int | None]) -> int:
        counts = keep_counts(keep, self.layout.num_patches)
        if len(counts) != len(self.layout.blocks):
            raise PlanError(f"keep has {len(counts)} entries, the model has {len(self.layout.blocks)} blocks")
        total = self._values[0][0]  # before the first block: the same in every probe
        for block, n in enumerate(counts):
            total += _interpolate(self.points, self._values[block + 1], n)
        return int(total)

    def ratio(self, keep: Sequence[int | None]) -> float:
        return self.flops(keep) / self.base


def _interpolate(xs: list[int], ys: list[int], x: int) -> Fraction:
    total = Fraction(0)
    for i, (xi, yi) in enumerate(zip(xs, ys)):
        term = Fraction(yi)
        for j, xj in enumerate(xs):
            if j != i:
                term *= Fraction(x - xj, xi - xj)
        total += term
    return total


def _shares_params(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule over a copy of ``gm``'s graph that shares its parameters (no weight copy)."""
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    new.meta.update(gm.meta)
    return new


def _segment_flops(gm: fx.GraphModule, layout: TokenLayout, n_patches: int, split: bool = False) -> list[int]:
    """FLOPs per segment (0: before block 0, 1 + l: block l) with ``n_patches`` entering every block;
    with ``split`` each block is two segments (1 + 2l: up to its attention's residual add, 2 + 2l:
    the rest, the MLP), where token merging changes the length in the middle of a block."""
    probe = _shares_params(gm)
    probe_layout = analyse_tokens(probe)
    g = probe.graph
    segment_of: dict[str, int] = {}
    per = 2 if split else 1
    starts = {b.stream.name: 1 + per * b.index for b in probe_layout.blocks}
    adds = {b.residual_add.name: 2 + 2 * b.index for b in probe_layout.blocks} if split else {}
    seg = 0
    for node in g.nodes:
        seg = starts.get(node.name, seg)
        segment_of[node.name] = seg
        seg = adds.get(node.name, seg)  # the MLP part starts after the residual add
    if n_patches != layout.num_patches:
        constants = find_length_constants(probe, probe_layout)
        for b in probe_layout.blocks:
            users = list(b.stream.users)
            head = (slice(None), slice(None, layout.prefix + n_patches))
            with g.inserting_before(b.stream.next):
                cut = g.call_function(operator.getitem, (b.stream, head))
            segment_of[cut.name] = 1 + per * b.index
            for u in users:
                u.replace_input_with(b.stream, cut)
        rewrite_length_constants(probe, probe_layout, {b.index: n_patches for b in probe_layout.blocks},
                                 constants)
        probe.recompile()
    out = [0] * (per * len(layout.blocks) + 1)
    for node, flops in node_flops(probe, gm.meta["example_input"]).items():
        out[segment_of[node.name]] += flops
    return out


# -- calibration ------------------------------------------------------------------------------
@dataclass
class Calibration:
    """Per-block statistics of the unpruned model's attention on calibration images."""

    ranges: list[float]                 # attention range per block (uniform attention = 1.0)
    head_scores: list[np.ndarray]       # cumulative head score per block, one value per head
    patch_scores: np.ndarray            # mean cumulative patch score after the last block, (patches,)
    images: int


def _with_attention_outputs(gm: fx.GraphModule) -> tuple[fx.GraphModule, TokenLayout]:
    """A copy of ``gm`` (parameters shared) that also returns every block's attention probabilities."""
    probe = _shares_params(gm)
    layout = analyse_tokens(probe)
    probs = [explicit_attention(probe, b) for b in layout.blocks]
    output = next(n for n in probe.graph.nodes if n.op == "output")
    output.args = ((output.args[0], tuple(probs)),)
    probe.graph.lint()
    probe.recompile()
    return probe, layout


def _grid_distances(layout: TokenLayout) -> torch.Tensor:
    n = layout.num_patches
    if layout.grid is not None and layout.grid[0] * layout.grid[1] == n:
        rows, cols = layout.grid
        yy, xx = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        pos = torch.stack([yy.flatten(), xx.flatten()], dim=1).double()
    else:  # no patch grid found: distance along the sequence
        pos = torch.arange(n).double()[:, None]
    return torch.cdist(pos, pos)


def calibrate(gm: fx.GraphModule, batches: Iterable[torch.Tensor]) -> Calibration:
    """Run ``batches`` (image tensors (B, C, H, W)) through ``gm`` unpruned and measure its attention."""
    probe, layout = _with_attention_outputs(gm)
    p = layout.prefix
    dist = _grid_distances(layout)
    mean_dist = float(dist.mean()) if dist.numel() > 1 and float(dist.mean()) > 0 else 1.0
    blocks = len(layout.blocks)
    range_sum = [0.0] * blocks
    head_sum: list[np.ndarray | None] = [None] * blocks
    patch_sum = np.zeros(layout.num_patches)
    images = 0
    with torch.no_grad():
        for x in batches:
            if isinstance(x, (tuple, list)):
                x = x[0]
            _, probs = probe(x)
            b = x.shape[0]
            cumulative = torch.zeros(b, layout.num_patches, dtype=torch.float64)
            for l, a in enumerate(probs):
                a = a.double()
                pp = a[:, :, p:, p:]
                reach = (pp * dist).sum(-1) / pp.sum(-1).clamp_min(1e-30)
                range_sum[l] += float(reach.mean(dim=(1, 2)).sum()) / mean_dist
                peak = a.amax(dim=-2)[:, :, p:]                      # (B, H, patches)
                cumulative = cumulative + peak.sum(1)
                weight = cumulative / cumulative.mean(-1, keepdim=True)
                heads = (weight[:, None, :] * peak).sum(-1).sum(0).numpy()
                head_sum[l] = heads if head_sum[l] is None else head_sum[l] + heads
            patch_sum += cumulative.sum(0).numpy()
            images += b
    if not images:
        raise PlanError("calibration needs at least one batch of images")
    return Calibration([r / images for r in range_sum], [h / images for h in head_sum],
                       patch_sum / images, images)


# -- the CP-ViT schedule ----------------------------------------------------------------------
def mean_pruned(keep: Sequence[int]) -> float:
    """Fraction of patch-token × block slots removed (CP-ViT's "patches pruned")."""
    return 1.0 - sum(keep) / (keep[0] * len(keep))


def progressive_keep(num_patches: int, ranges: Sequence[float], alpha: float, start: int,
                     max_prune: float) -> list[int]:
    """Patch tokens entering each block for ``p_l = min(max_prune, alpha · Σ_{start-1 ≤ j < l} r̂_j)``."""
    r = np.asarray(ranges, dtype=float)
    r = r / r.mean() if r.mean() > 0 else np.ones_like(r)
    out, acc = [], 0.0
    for block in range(len(r)):
        if block >= start:
            acc += r[block - 1]
        pruned = min(max_prune, alpha * acc) if block >= start else 0.0
        k = max(1, math.floor(num_patches * (1.0 - pruned) + 0.5))
        out.append(min(k, out[-1]) if out else k)
    return out


def cpvit_plan(gm: fx.GraphModule, batches: Iterable[torch.Tensor] | Calibration, budget: Budget, *,
               start: int = 1, max_prune: float = 0.9, flop_model: TokenFlops | None = None) -> Plan:
    """The CP-ViT progressive schedule meeting ``budget`` (the original model's FLOPs; ``gm`` may be
    an already pruned graph) within its tolerance. The plan's one pass is a :class:`TokenPruning`;
    ``detail`` holds ``keep`` (patch tokens entering each attention block), ``alpha`` and ``ranges``."""
    calib = batches if isinstance(batches, Calibration) else calibrate(gm, batches)
    model = flop_model or TokenFlops(gm)
    n, blocks = model.layout.num_patches, len(model.layout.blocks)
    if not 1 <= start < blocks:
        raise PlanError(f"start must be in [1, {blocks - 1}], got {start}")

    def at(alpha: float) -> tuple[list[int], int]:
        keep = progressive_keep(n, calib.ranges, alpha, start, max_prune)
        return keep, model.flops(keep)

    goal = budget.limit
    lo, hi = 0.0, 1.0
    while at(hi)[1] > goal and hi < 1e6:
        lo, hi = hi, hi * 2
    for _ in range(60):  # flops(alpha) is non-increasing: bisect to the boundary
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if at(mid)[1] > goal else (lo, mid)
    candidates = [(abs(f - goal), keep, f, a) for a in (lo, hi) for keep, f in [at(a)]]
    _, keep, flops, alpha = min(candidates, key=lambda c: c[0])
    plan = Plan("tokens", [TokenPruning(keep)], flops, budget,
                detail={"keep": keep, "alpha": alpha, "ranges": list(calib.ranges)})
    if not plan.within_tolerance:
        floor = budget.ratio(at(1e6)[1])
        raise PlanError(f"cpvit: no schedule reaches {budget.goal:.3f} × FLOPs within ±{budget.tolerance:.0%} "
                        f"(closest {plan.ratio:.3f}; pruning {max_prune:.0%} of the patches from block "
                        f"{start} on gives {floor:.3f})")
    return plan


def cpvit_schedule(gm: fx.GraphModule, batches: Iterable[torch.Tensor] | Calibration, target_flops: float,
                   **kwargs: Any) -> list[int]:
    """Patch tokens entering each block under the CP-ViT schedule meeting ``target_flops`` × the
    FLOPs of ``gm`` itself (±1%)."""
    model = kwargs.pop("flop_model", None) or TokenFlops(gm)
    return cpvit_plan(gm, batches, Budget(model.base, target_flops), flop_model=model, **kwargs).detail["keep"]


def _head_groups_by_block(gm: fx.GraphModule, layout: TokenLayout) -> dict[int, str]:
    dg = DependencyGraph.build(gm)
    out: dict[int, str] = {}
    for block in layout.blocks:
        before = ancestors(block.stream) | {block.stream}
        params = {str(n.target) for n in ancestors(block.core) - before if n.op == "get_attr"}
        for g in dg.groups:
            if g.kind == "head" and g.prunable and params & set(g.params()):
                out[block.index] = g.name
                break
    return out


def cpvit_head_scores(gm: fx.GraphModule, batches: Iterable[torch.Tensor] | Calibration) -> dict[str, np.ndarray]:
    """``{head_group_name: score per head}`` (the cumulative head score; higher = keep)."""
    calib = batches if isinstance(batches, Calibration) else calibrate(gm, batches)
    layout = analyse_tokens(gm)
    groups = _head_groups_by_block(gm, layout)
    out = {}
    for block, name in groups.items():
        scores = calib.head_scores[block]
        out[name] = np.asarray(scores, dtype=float)
    return out


def cpvit_head_keep(gm: fx.GraphModule, batches: Iterable[torch.Tensor] | Calibration, keep: float, *,
                    min_heads: int = 1) -> dict[str, list[int]]:
    """``{head_group_name: kept head indices}`` keeping ``round(keep × heads)`` (≥ ``min_heads``) of
    each block's heads, the highest cumulative head scores; feed it to ``WidthPruning``."""
    if not 0.0 < keep <= 1.0:
        raise PlanError(f"head keep must be in (0, 1], got {keep!r}")
    out = {}
    for name, scores in cpvit_head_scores(gm, batches).items():
        k = min(len(scores), max(min_heads, math.floor(len(scores) * keep + 0.5)))
        order = np.argsort(-scores, kind="stable")[:k]
        out[name] = sorted(int(i) for i in order)
    return out


# -- inspection -------------------------------------------------------------------------------
def kept_token_ids(gm: fx.GraphModule, x: torch.Tensor) -> dict[int, torch.Tensor]:
    """For a token-pruned ``gm``: ``{block: original patch ids kept entering it}`` (B, K), ascending."""
    captured: dict[int, torch.Tensor] = {}

    class _Capture(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            tag = n.meta.get(META_KEY)
            if tag is not None and tag[0] == "indices":
                captured[tag[1]] = out
            return out

    with torch.no_grad():
        _Capture(gm).run(x)
    out, ids = {}, None
    for block in sorted(captured):
        idx = captured[block]
        ids = idx if ids is None else torch.gather(ids, 1, idx)
        out[block] = ids
    return out
