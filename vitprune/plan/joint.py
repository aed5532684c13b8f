"""BoundaryDPT+ beyond the paper: one planner that trades depth against width, move by move.

The paper's BoundaryDPT+ removes a fixed share of each kind of layer first and leaves the rest of
the budget to width pruning. Here every step picks the cheapest next move among

* remove one attention branch (its block keeps the residual and, for ``identity_norm``, the norm),
* remove one activation (GELU → identity; fc2∘fc1 merged when cheaper),
* shrink one channel group by a unit (a head, or ``round_to`` channels),

by **estimated loss increase per unit of cost saved** (:class:`Move.ratio`): FLOPs by default, or
estimated ORT milliseconds when a latency target is given (``cost`` builds a
:class:`~vitprune.plan.cost.LatencyModel`: a width unit is priced by its ``cost(counts)``
difference, a layer by the measured op times of the nodes its removal deletes). The loss is the
distillation loss ``KL(original ‖ model)`` on the calibration batches, which recovery minimises and which is 0
for the original. A layer removal is a large change, so its increase is *measured*: the layer is
switched off by a gate and the batches run again. A width unit is a small change, so its increase
is estimated to second order (:func:`channel_loss_estimates`: the gradient term plus the Fisher
curvature, since at the original the gradient vanishes). Both are in the same unit (nats per image),
which is what lets the two kinds of move be compared at all; the paper's observation that attention
and activation *gradients* differ by orders of magnitude is why layers are not priced by gradients.

The budget is spent in ``events``: each event re-estimates every move on the model as it now is,
takes moves until it has saved its share of what is left, applies them through the passes, and,
with training data, recovers for a window of distillation steps from the original model (as the
gated search recovers between its events). A last width plan lands the cost on the budget exactly.
``cap_share`` (BoundaryDPT+'s ``depth_share``) optionally caps the share of each kind removed.

**Pricing after recovery** (with training data and ``probe_steps > 0``). The loss right after a
change is not what the final model pays: attention removal costs little at first and recovers
slowly, activation removal the opposite (BoundaryDPT's recovery asymmetry). Each event then prices
moves by their loss after ``probe_steps`` of recovery (:class:`~vitprune.plan.probe.RecoveryProbe`):
the ``probe_layers`` cheapest layers of each open kind are each removed on a copy, recovered and
measured; every other layer of that kind is priced by its loss before recovery times the kind's
measured ratio after/before (the median over its probes); and the width units the event would take
on their own are removed on a copy, recovered and measured, which scales every width estimate by
after/before. The kinds' ratios carry over to later events until measured again. Every probe step
and every recovery step is counted in ``detail["steps"]``; ``detail["pricing"]`` says which pricing
ran.
"""
from __future__ import annotations

import contextlib
import copy
import heapq
import itertools
import statistics
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from passes.activation import ActivationRemoval
from vitprune import progress
from passes.manager import PassManager
from passes.width import WidthPruning
from vitprune.deps import ChannelGroup, DependencyGraph
from vitprune.deps.branches import find_activations, find_attention_branches, removed_layers
from vitprune.deps.flops import FlopModel
from vitprune.errors import InputError
from vitprune.frontend.capture import first_tensor, param_tensor
from vitprune.plan.budget import Budget, Plan
from vitprune.plan.cost import LatencyModel
from vitprune.plan.depth import _insert_gates, depth_passes
from vitprune.plan.importance import group_scores
from vitprune.plan.probe import RecoveryProbe, divergence as _divergence, kl as _kl, recover
from vitprune.plan.width import eligible_groups, floor_width, plan_width, planned_groups, unit_size

KINDS = ("attention", "activation")

CostModel = FlopModel | LatencyModel
#: Builds the cost model of a graph: ``FlopModel``, or e.g. ``functools.partial(LatencyModel, table=t)``.
CostBuilder = Callable[[DependencyGraph], CostModel]
#: The most width plans the landing takes (see :func:`_land`).
LANDINGS = 3


@dataclass
class Move:
    """One candidate step: ``kind`` "attention"/"activation" (``target`` a block) or "width"
    (``target`` a group name), its estimated ``loss`` increase and the cost (FLOPs or ms) it ``saved``;
    a layer's ``price`` gives what it saves at the widths chosen so far (``counts``)."""

    kind: str
    target: Any
    loss: float
    saved: float
    price: Callable[[dict[int, int]], float] | None = field(default=None, compare=False, repr=False)

    @property
    def ratio(self) -> float:
        return self.loss / self.saved

    def __lt__(self, other: "Move") -> bool:
        # cheapest per unit saved first; on a tie the larger saving (a free layer before a free channel)
        return (self.ratio, -self.saved) < (other.ratio, -other.saved)


@dataclass
class JointSettings:
    """How the joint planner may change the model (the spec's width and depth options)."""

    kinds: set[str]                       # channel-group kinds width moves may shrink
    round_to: int = 32
    head_dim_policy: str = "keep"         # "keep": attention narrows by whole heads only
    min_keep: float = 0.1
    variant: str = "identity_norm"
    merge: str = "auto"
    fold_norm: bool = False
    cap_share: float | None = None        # at most this share of each kind's layers removed
    events: int = 4
    depth_batches: int = 2                # calibration batches the layer removals are measured on
    recovery_steps: int = 0               # distillation steps after each event (with training data)
    probe_steps: int = 0                  # recovery steps of each probe (with training data; 0: price before recovery)
    probe_layers: int = 2                 # layers of each kind probed per event (the cheapest by the current price)
    lr: float = 5e-4


#: ``detail["pricing"]`` of a plan: layer moves priced by the loss right after the change, or after
#: a short recovery (see the module docstring).
PRICING_BEFORE = "before recovery (KL on the calibration batches)"
#: The least share of its loss before recovery a kind's after/before ratio keeps: a probe that
#: recovered fully (or past its base, by noise) must not make every unprobed move of its kind free.
MIN_FACTOR = 0.01
PRICING_AFTER = "after recovery ({steps} distillation steps per probe, {layers} layers of each kind probed per event)"


def probe_sizes(steps: int, events: int = 4, probe_layers: int = 2) -> tuple[int, int]:
    """``(probe_steps, recovery_steps)`` that spend at most ``steps`` optimizer steps in the joint
    planner's ``events``: each event runs at most ``2 + 2·probe_layers`` probes (the base, each
    probed layer, the width units) and one recovery window, twice as long as a probe."""
    per_event = 2 + 2 * probe_layers + 2  # probes, then the recovery window in probe lengths
    probe = steps // (events * per_event)
    return probe, 2 * probe


def plan_joint(gm: fx.GraphModule, budget: Budget, batches: list, settings: JointSettings, *,
               teacher: nn.Module | None = None, train_batches: Iterable | None = None,
               manager: PassManager | None = None, cost: CostBuilder = FlopModel) -> Plan:
    """Spend ``budget`` (the original model's cost, in the unit ``cost`` counts: FLOPs, or ms with a
    :class:`LatencyModel` and a ``Budget.latency``) on the cheapest moves, event by event. Returns a
    :class:`Plan` whose ``graph`` is the rewritten (and, with ``train_batches``, recovered) model and
    whose ``flops`` are its FLOPs whatever the cost and whose ``cost`` is in the budget's unit
    (``Plan.ratio``, ``Plan.within_tolerance``); ``detail`` names the ``cost``."""
    manager = manager if manager is not None else PassManager()
    counts = {kind: len(_layers(gm, kind, settings.variant)) for kind in KINDS}
    caps = {k: (n if settings.cap_share is None else round(settings.cap_share * n)) for k, n in counts.items()}
    recipe: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    stream = _cycle(train_batches) if train_batches is not None else None
    train_iter = stream if settings.recovery_steps else None
    probe = _probe(gm, batches, settings, teacher, stream)
    factors = {"attention": 1.0, "activation": 1.0, "width": 1.0}
    recovery_steps = 0
    for event in range(settings.events):
        cost_model = _cost_model(cost, gm, budget)
        now = cost_model.cost()
        if budget.met(now):
            break
        quota = (now - budget.limit) / (settings.events - event)
        # no move may take the model below the budget's lower edge: a whole layer can save more
        # than is left to save, and a width unit then serves better
        room = now - (budget.limit - budget.tolerance * budget.base)
        left = {k: caps[k] - len(removed_layers(gm, k)) for k in KINDS}  # layers each kind may still lose
        moves, states = _rank_moves(gm, cost_model, batches, settings, left, teacher)
        probed = None
        if probe is not None:
            moves, probed = _price_after_recovery(gm, moves, states, cost_model, (quota, room), settings, probe,
                                                  factors)
        chosen, void = _choose(moves, states, cost_model, (quota, room), gm, settings, left)
        gm, steps = _apply(gm, chosen, void, states, settings, manager)
        recipe += steps
        events.append(_describe(event, chosen, budget, _cost_model(cost, gm, budget).cost(), probed))
        progress.say(_event_line(events[-1], budget, settings.events, budget.ratio(now)))
        if train_iter is not None:
            recovery_steps += recover(gm, teacher, train_iter, settings.recovery_steps, settings.lr)
    gm, steps, landing, final = _land(gm, budget, batches, settings, manager, teacher, cost)
    recipe += steps
    flops = final.flops() if isinstance(final, FlopModel) else FlopModel(final.dg).flops()
    detail = {"events": events, "attention": removed_layers(gm, "attention"),
              "activation": removed_layers(gm, "activation"), "landing": landing,
              "cap_share": settings.cap_share, "recovery_steps": settings.recovery_steps if train_iter else 0,
              "cost": budget.unit,
              "pricing": PRICING_BEFORE if probe is None else
              PRICING_AFTER.format(steps=settings.probe_steps, layers=settings.probe_layers),
              "steps": {"probes": probe.steps if probe is not None else 0, "recovery": recovery_steps}}
    return Plan("joint", [], flops, budget, detail, graph=gm, recipe=recipe, cost=final.cost())


def _probe(gm: fx.GraphModule, batches: list, settings: JointSettings, teacher: nn.Module | None,
           stream: Iterator | None) -> RecoveryProbe | None:
    """The recovery probe of this plan: with training data and ``probe_steps``; None otherwise."""
    if stream is None or settings.probe_steps <= 0:
        return None
    held_out = batches[:settings.depth_batches]
    return RecoveryProbe(teacher, stream, settings.probe_steps, settings.lr, held_out,
                         _references(gm, held_out, teacher))


def _cost_model(cost: CostBuilder, gm: fx.GraphModule, budget: Budget) -> CostModel:
    """``cost``'s model of ``gm`` as it is now; refused when it counts another unit than ``budget``."""
    model = cost(DependencyGraph.build(gm))
    unit = "latency" if isinstance(model, LatencyModel) else "flops"
    if unit != budget.unit:
        raise InputError(f"the joint planner's budget is in {budget.unit} but its cost model counts {unit}; "
                         f"pass a budget in the cost model's unit (Budget.latency for a LatencyModel)")
    return model


# -- estimating moves ------------------------------------------------------------------------------
def _layers(gm: fx.GraphModule, kind: str, variant: str) -> list:
    if kind == "attention":
        return [b for b in find_attention_branches(gm) if variant == "drop" or b.norm is not None]
    return [s for s in find_activations(gm) if s.kind in ("gelu", "relu", "silu")]


def _references(gm: fx.GraphModule, batches: Sequence, teacher: nn.Module | None) -> list[torch.Tensor]:
    """What every move is scored against: the original model's output distribution (the current
    model's when there is no original), as log-probabilities. The loss is ``KL(reference ‖ model)``,
    the distillation loss recovery minimises, which is 0 for the original itself."""
    reference = teacher if teacher is not None else gm
    with torch.no_grad():
        return [F.log_softmax(first_tensor(reference(images)).float(), -1) for images, _ in batches]


def _rank_moves(gm: fx.GraphModule, cost_model: CostModel, batches: list, settings: JointSettings,
                left: dict[str, int], teacher: nn.Module | None) -> tuple[list[Move], dict[str, "_GroupState"]]:
    """Every move open now (``left``: layers each kind may still lose), and the width groups'
    removal orders (by group name)."""
    references = _references(gm, batches, teacher)
    moves = _depth_moves(gm, cost_model, batches[:settings.depth_batches], references, settings, left)
    states = _group_states(cost_model, batches, references, settings)
    _calibrate(gm, states, batches[:settings.depth_batches], references)
    moves += [m for m in (s.next_move(cost_model, {}) for s in states.values()) if m is not None]
    return moves, states


def _depth_moves(gm: fx.GraphModule, cost_model: CostModel, batches: list, references: list,
                 settings: JointSettings, left: dict[str, int]) -> list[Move]:
    """Every removable layer of a kind that may still lose one (``left``), its loss increase
    measured with the layer switched off by a gate."""
    open_kinds = [k for k in KINDS if left[k] > 0]
    if not open_kinds:
        return []
    prices = _layer_prices(gm, cost_model, settings)
    probe = copy.deepcopy(gm).eval()
    layers = {k: (_layers(probe, k, settings.variant) if k in open_kinds else []) for k in KINDS}
    gates = _insert_gates(probe, layers["attention"], layers["activation"], settings.variant)
    base = _divergence(probe, batches, references)
    moves = []
    for (kind, block), gate in gates.items():
        price = prices[kind].get(block)
        cut = price({}) if price is not None else 0
        if cut <= 0:
            continue  # a factorised activation saves no FLOPs: never a move when counting FLOPs
        gate.alive.fill_(0.0)
        loss = _divergence(probe, batches, references) - base
        gate.alive.fill_(1.0)
        moves.append(Move(kind, block, loss, cut, price))
    return moves


def _layer_prices(gm: fx.GraphModule, cost_model: CostModel,
                  settings: JointSettings) -> dict[str, dict[int, Callable[[dict[int, int]], float]]]:
    """Per kind and block, what removing the layer saves in the cost model's unit, given the widths
    chosen so far (``counts``: :class:`~vitprune.deps.flops.RemovalPrices`, one rule for FLOPs and
    latency). Priced at ``counts``, a layer whose channels were narrowed earlier in the same event
    saves only what is left of it, so the event does not count those channels twice. A factorised
    activation saves no FLOPs (its GELU's time in ms, less as its width shrinks)."""
    rule = ActivationRemoval([], settings.merge)
    return {"attention": {b.index: partial(cost_model.attention_saving, b, settings.variant)
                          for b in _layers(gm, "attention", settings.variant)},
            "activation": {s.index: partial(cost_model.activation_saving, s, rule.merges(s))
                           for s in _layers(gm, "activation", settings.variant)}}


def _group_states(cost_model: CostModel, batches: list, references: list,
                  settings: JointSettings) -> dict[str, "_GroupState"]:
    """Every eligible group, its channels ordered by estimated loss increase (cheapest first)."""
    dg = cost_model.dg
    groups = planned_groups(eligible_groups(dg, settings.kinds), settings.head_dim_policy)
    scores = channel_loss_estimates(dg, groups, batches, references)
    return {g.name: _GroupState.start(g, scores[g.name], settings) for g in groups}


def _calibrate(gm: fx.GraphModule, states: dict[str, "_GroupState"], batches: list, references: list) -> None:
    """Put every group's estimates on the measured scale of the layer moves: the first unit of each
    group is really removed (zeroed in place, then restored) and the group's estimates are scaled by
    measured / estimated. The quadratic estimate ranks a group's channels well but misjudges how much
    a whole head costs (it overestimates by a few times on random ViTs); the layer moves are measured."""
    base = _divergence(gm, batches, references)
    for state in states.values():
        channels = state.order[:state.unit]
        estimated = float(state.scores[channels].sum())
        with _zeroed(gm, state.group, channels):
            measured = max(0.0, _divergence(gm, batches, references) - base)
        if estimated > 0:
            state.scores = state.scores * (measured / estimated)


@contextlib.contextmanager
def _zeroed(gm: fx.GraphModule, group: ChannelGroup, channels: np.ndarray) -> Iterator[None]:
    """The group's weights at ``channels`` set to 0 for the duration (no copy of the model)."""
    saved = []
    with torch.no_grad():
        for m in group.members:
            tensor = param_tensor(gm, m.param)
            index = [slice(None)] * tensor.dim()
            index[m.dim] = torch.as_tensor(np.nonzero(np.isin(m.coords, channels))[0])
            saved.append((tensor, tuple(index), tensor[tuple(index)].clone()))
            tensor[tuple(index)] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            for p, index, value in saved:
                p[index] = value


def channel_loss_estimates(dg: DependencyGraph, groups: list[ChannelGroup], batches: list,
                           references: list, seed: int = 0) -> dict[str, np.ndarray]:
    """Per channel, the increase of ``KL(reference ‖ model)`` when the channel is removed (its weights
    ``w`` set to 0, a step ``δ = −w``), to second order:

    ``|Σ w·ḡ| + ½ · mean_n (Σ w·g_n)²``

    with ``ḡ`` the gradient of the mean KL (zero while the model *is* the reference) and ``g_n`` the
    gradient of image ``n``'s log-likelihood of a label drawn from the model's own prediction: the
    empirical Fisher, the KL's curvature (Theis et al. 2018's Fisher pruning, per channel). Sums run
    over every weight the channel owns, so a head is priced with everything that goes with it."""
    gm = dg.gm
    params = {n: p for n, p in gm.named_parameters() if n in dg.param_dims}
    first = {n: torch.zeros_like(p) for n, p in params.items()}
    cache: dict = {}
    curvature = {g.name: np.zeros(g.size) for g in groups}
    generator = torch.Generator().manual_seed(seed)
    images_seen = 0
    for (images, _), ref in zip(batches, references):
        gm.zero_grad(set_to_none=True)
        _kl(first_tensor(gm(images)), ref).backward()
        _accumulate(first, params, 1.0 / len(batches))
        for n in range(images.shape[0]):
            gm.zero_grad(set_to_none=True)
            logits = first_tensor(gm(images[n:n + 1])).float()
            label = torch.multinomial(F.softmax(logits.detach(), -1), 1, generator=generator)[:, 0]
            F.cross_entropy(logits, label).backward()
            grads = {k: p.detach() * p.grad for k, p in params.items() if p.grad is not None}
            for g in groups:
                curvature[g.name] += group_scores(dg, g, grads, "none", {}) ** 2
            images_seen += 1
    gm.zero_grad(set_to_none=True)
    return {g.name: np.abs(group_scores(dg, g, first, "none", cache)) + 0.5 * curvature[g.name] / max(1, images_seen)
            for g in groups}


def _accumulate(into: dict[str, torch.Tensor], params: dict[str, nn.Parameter], weight: float) -> None:
    for name, p in params.items():
        if p.grad is not None:
            into[name] += p.detach() * p.grad * weight


@dataclass
class _GroupState:
    """One group's removal order (cheapest channels first) and how many units it has given up."""

    group: ChannelGroup
    order: np.ndarray          # channels, cheapest to remove first
    scores: np.ndarray
    unit: int
    floor: int
    kept: int

    @classmethod
    def start(cls, group: ChannelGroup, scores: np.ndarray, settings: JointSettings) -> "_GroupState":
        unit = unit_size(group, settings.round_to)
        return cls(group, np.argsort(scores, kind="stable"), scores, unit,
                   floor_width(group, unit, settings.min_keep), group.size)

    def next_move(self, cost_model: CostModel, counts: dict[int, int]) -> Move | None:
        if self.kept - self.unit < self.floor:
            return None
        removed = self.group.size - self.kept
        loss = float(self.scores[self.order[removed:removed + self.unit]].sum())
        before = cost_model.cost(counts)
        saved = before - cost_model.cost({**counts, self.group.axis: self.kept - self.unit})
        if saved <= 0:
            return None
        return Move("width", self.group.name, loss, saved)

    def keep(self) -> list[int]:
        return sorted(self.order[self.group.size - self.kept:].tolist())


# -- pricing after recovery ------------------------------------------------------------------------
def _price_after_recovery(gm: fx.GraphModule, moves: list[Move], states: dict[str, _GroupState],
                          cost_model: CostModel, limits: tuple[float, float], settings: JointSettings,
                          probe: RecoveryProbe, factors: dict[str, float]) -> tuple[list[Move], dict[str, Any]]:
    """The event's moves priced by their loss after recovery (module docstring): probed layers by
    what their probe measured, the other layers by their loss before recovery times their kind's
    after/before ratio, width units by their estimates times the width probe's ratio. ``factors``
    (per kind and "width") is updated in place and carries over to later events. Returns the moves
    (width moves re-derived from the rescaled group states) and what was measured."""
    probe.new_event()
    base = probe.loss(gm, [])
    layers = {kind: _probe_layers(gm, [m for m in moves if m.kind == kind], factors[kind], settings, probe, base)
              for kind in KINDS}
    for kind, measured in layers.items():
        ratios = [m["after"] / m["before"] for m in measured.values() if m["before"] > 0]
        if ratios:
            factors[kind] = max(MIN_FACTOR, statistics.median(ratios))
    width = _probe_width(gm, [m for m in moves if m.kind == "width"], states, cost_model, limits, settings, probe,
                         base)
    if width is not None and width["before"] > 0:
        factors["width"] = max(MIN_FACTOR, width["after"] / width["before"])
    priced = [replace(m, loss=layers[m.kind][m.target]["after"] if m.target in layers[m.kind]
                      else m.loss * factors[m.kind]) for m in moves if m.kind != "width"]
    for state in states.values():
        state.scores = state.scores * factors["width"]
    priced += [m for m in (s.next_move(cost_model, {}) for s in states.values()) if m is not None]
    return priced, {"base": base, "layers": {k: {str(b): v for b, v in m.items()} for k, m in layers.items()},
                    "width": width, "factors": dict(factors), "probe_steps": probe.batch_steps}


def _probe_layers(gm: fx.GraphModule, moves: list[Move], factor: float, settings: JointSettings,
                  probe: RecoveryProbe, base: float) -> dict[int, dict[str, float]]:
    """The ``probe_layers`` cheapest layer moves of one kind (by the current price), each removed
    alone on a copy and recovered: ``{block: {"before": loss, "after": loss after recovery}}``."""
    cheapest = sorted(moves, key=lambda m: (m.loss * factor / m.saved, m.target))[:settings.probe_layers]
    out = {}
    for move in cheapest:
        one = [move.target]
        passes = depth_passes(one if move.kind == "attention" else [], one if move.kind == "activation" else [],
                              settings.variant, settings.merge, settings.fold_norm)
        out[move.target] = {"before": move.loss, "after": max(0.0, probe.loss(gm, passes) - base)}
    return out


def _probe_width(gm: fx.GraphModule, moves: list[Move], states: dict[str, _GroupState], cost_model: CostModel,
                 limits: tuple[float, float], settings: JointSettings, probe: RecoveryProbe,
                 base: float) -> dict[str, Any] | None:
    """The width units this event would take with width moves alone, removed together on a copy and
    recovered: ``{"units", "before": their estimated loss, "after": loss after recovery}`` (None when
    no width move is open)."""
    trial = {name: replace(state) for name, state in states.items()}  # _choose narrows the copies
    chosen, _ = _choose(moves, trial, cost_model, limits, gm, settings, {k: 0 for k in KINDS})
    if not chosen:
        return None
    keep = {name: trial[name].keep() for name in sorted({m.target for m in chosen})}
    return {"units": len(chosen), "before": sum(m.loss for m in chosen),
            "after": max(0.0, probe.loss(gm, [WidthPruning(keep)]) - base)}


# -- choosing and applying -------------------------------------------------------------------------
def _choose(moves: list[Move], states: dict[str, _GroupState], cost_model: CostModel,
            limits: tuple[float, float], gm: fx.GraphModule, settings: JointSettings,
            left: dict[str, int]) -> tuple[list[Move], set[str]]:
    """Greedy by loss per unit of cost saved until the event's quota is saved, never saving more than
    ``room`` (``limits = (quota, room)``) nor removing more layers of a kind than ``left`` allows (the
    cap_share left after earlier events). A move's saving depends on the widths chosen before it (the
    residual stream feeds every linear), so it is re-priced when it comes up. Returns the moves and
    the groups that leave with a removed layer (their width moves, even earlier ones, are void)."""
    quota, room = limits
    left = dict(left)
    heap = list(moves)
    heapq.heapify(heap)
    counts: dict[int, int] = {}
    dead = set()
    chosen, saved = [], 0.0
    while heap and saved < quota:
        move = heapq.heappop(heap)
        if saved + move.saved > room or (move.kind == "width" and move.target in dead) \
                or (move.kind != "width" and left[move.kind] <= 0):
            continue
        fresh = _repriced(move, states, cost_model, counts)
        if fresh is None:
            continue
        if fresh.ratio > move.ratio * (1 + 1e-9) and heap and fresh.ratio > heap[0].ratio:
            heapq.heappush(heap, fresh)  # re-priced: wait for its turn
            continue
        move = fresh
        if move.kind == "width":
            state = states[move.target]
            state.kept -= state.unit
            counts[state.group.axis] = state.kept
            nxt = state.next_move(cost_model, counts)
            if nxt is not None:
                heapq.heappush(heap, nxt)
        else:
            left[move.kind] -= 1
            dead |= _groups_of_layer(gm, move, states, settings)
        chosen.append(move)
        saved += move.saved
    return chosen, dead


def _repriced(move: Move, states: dict[str, _GroupState], cost_model: CostModel,
              counts: dict[int, int]) -> Move | None:
    """``move`` priced at the widths chosen so far (None: it saves nothing there)."""
    if move.kind == "width":
        return states[move.target].next_move(cost_model, counts)
    saved = move.price(counts)
    return replace(move, saved=saved) if saved > 0 else None


def _groups_of_layer(gm: fx.GraphModule, move: Move, states: dict[str, _GroupState],
                     settings: JointSettings) -> set[str]:
    """The channel groups that leave the model with a removed layer (its width moves are void)."""
    if move.kind == "attention":
        layer = next(b for b in find_attention_branches(gm) if b.index == move.target)
        owned = set(layer.params)
    else:
        site = next(s for s in find_activations(gm) if s.index == move.target)
        if not ActivationRemoval([], settings.merge).merges(site):
            return set()
        owned = {site.fc1_weight, site.fc1_bias, site.fc2_weight} - {None}
    return {name for name, s in states.items() if all(m.param in owned for m in s.group.members)}


def _apply(gm: fx.GraphModule, chosen: list[Move], void: set[str], states: dict[str, _GroupState],
           settings: JointSettings, manager: PassManager) -> tuple[fx.GraphModule, list[dict[str, Any]]]:
    """Width first (the groups exist in this graph), then the layer removals."""
    layers = {k: sorted(m.target for m in chosen if m.kind == k) for k in KINDS}
    shrunk = sorted({m.target for m in chosen if m.kind == "width"} - void)
    passes = [WidthPruning({name: states[name].keep() for name in shrunk})] if shrunk else []
    if layers["attention"] or layers["activation"]:
        passes += depth_passes(layers["attention"], layers["activation"], settings.variant, settings.merge,
                               settings.fold_norm)
    return manager.apply_all(passes, gm)


Landing = tuple[fx.GraphModule, list[dict[str, Any]], dict[str, Any], CostModel]


def _land(gm: fx.GraphModule, budget: Budget, batches: list, settings: JointSettings, manager: PassManager,
          teacher: nn.Module | None, cost: CostBuilder) -> Landing:
    """Width plans for whatever the events left above the budget, so the cost lands on it; returns
    the graph, its recipes, the account and the cost model of the graph as it ends. FLOPs land with
    one plan; an estimated latency is estimated again on the rewritten graph (from sweeps through its
    new shapes), which can put it a little above the plan's estimate: then up to :data:`LANDINGS`."""
    recipe: list[dict[str, Any]] = []
    landing: dict[str, Any] = {"width_plan": False}
    cost_model = _cost_model(cost, gm, budget)
    for _ in range(LANDINGS):
        if budget.met(cost_model.cost()):
            break
        dg = cost_model.dg
        groups = eligible_groups(dg, settings.kinds)
        scores = channel_loss_estimates(dg, groups, batches, _references(gm, batches, teacher))
        plan = plan_width(dg, cost_model, scores, groups, budget, round_to=settings.round_to,
                          min_keep=settings.min_keep, head_dim_policy=settings.head_dim_policy)
        gm, steps = manager.apply_all(plan.passes, gm)
        recipe += steps
        landing = {"width_plan": True, "notes": landing.get("notes", []) + plan.notes}
        cost_model = _cost_model(cost, gm, budget)
    return gm, recipe, landing, cost_model


def _event_line(event: dict[str, Any], budget: Budget, events: int, before: float) -> str:
    """The progress line of one event: where the cost went, what it removed, the kinds' ratios."""
    factors = (event.get("probes") or {}).get("factors")
    return (f"boundarydpt+ event {event['event'] + 1}/{events}: {budget.unit} {before:.3f} -> "
            f"{event[budget.unit + '_ratio']:.3f} (target {budget.goal}); removed attention {event['attention']}, "
            f"activation {event['activation']}, {event['width_units']} width units"
            + ("" if not factors else "; after/before " + ", ".join(f"{k} {v:.2f}" for k, v in factors.items())))


def _describe(event: int, chosen: list[Move], budget: Budget, spent: float,
              probed: dict[str, Any] | None) -> dict[str, Any]:
    """The event's moves and where they left the cost (``flops_ratio``, or ``latency_ratio``), and
    what its probes measured (with pricing after recovery)."""
    out = {"event": event, f"{budget.unit}_ratio": budget.ratio(spent),
           "attention": sorted(m.target for m in chosen if m.kind == "attention"),
           "activation": sorted(m.target for m in chosen if m.kind == "activation"),
           "width_units": sum(1 for m in chosen if m.kind == "width")}
    if probed is not None:
        out["probes"] = probed
    return out


# -- recovery between events -------------------------------------------------------------------------
def _cycle(batches: Iterable) -> Iterator:
    return itertools.cycle(batches) if isinstance(batches, (list, tuple)) else _repeat(batches)


def _repeat(batches: Iterable) -> Iterator:
    while True:
        yield from batches
