"""The joint BoundaryDPT+ planner: depth and width moves ranked by loss increase per FLOP saved, or
per estimated ORT millisecond saved with a latency cost model."""
import copy
from functools import partial

import numpy as np
import pytest
import torch

from conftest import randomize, tiny, traced
from vitprune.api import replay
from vitprune.deps.flops import FlopModel, count_flops
from vitprune.errors import InputError
from vitprune.plan.budget import Budget
from vitprune.plan.cost import LatencyModel, LatencyTable
from passes.activation import ActivationRemoval
from passes.attention import AttentionRemoval
from passes.width import WidthPruning
from vitprune.plan.joint import (MIN_FACTOR, PRICING_BEFORE, JointSettings, _calibrate, _divergence, _GroupState,
                                 _layer_prices, _zeroed, channel_loss_estimates, plan_joint)
from vitprune.plan.probe import RecoveryProbe
from vitprune.plan.stages import copy_teacher
from vitprune.deps import DependencyGraph
from vitprune.plan.width import eligible_groups

pytestmark = pytest.mark.usefixtures("one_thread")
ALL = {"residual", "hidden", "head", "head_dim"}


def _model(depth: int = 4):
    return randomize(tiny("deit_small_patch16_224", depth=depth, img_size=64, num_classes=10))


def _batches(n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 64, 64, generator=g), None) for _ in range(n)]


def _plan(model, goal, **settings):
    gm = traced(model)
    base = count_flops(gm, gm.meta["example_input"])
    plan = plan_joint(gm, Budget(base, goal), _batches(), JointSettings(kinds=ALL, **settings),
                      teacher=copy_teacher(model))
    return plan, base


@pytest.mark.parametrize("goal", [0.7, 0.45])
def test_lands_on_the_budget_and_replays(goal):
    model = _model()
    plan, base = _plan(model, goal)
    x = plan.graph.meta["example_input"]
    assert plan.within_tolerance and abs(count_flops(plan.graph, x) / base - goal) <= 0.01
    assert plan.ratio == pytest.approx(count_flops(plan.graph, x) / base)
    again = replay(model, plan.recipe, (3, 64, 64))  # the recipe rebuilds the same architecture
    assert count_flops(again, x) == count_flops(plan.graph, x)
    assert {n: p.shape for n, p in again.named_parameters()} == {n: p.shape for n, p in plan.graph.named_parameters()}


def test_a_layer_that_does_nothing_goes_first():
    """Block 1's attention writes zeros into the residual stream: dropping it (variant "drop":
    ``x`` instead of ``x + attn``) changes no output, so its loss increase is 0 and, saving a whole
    branch of FLOPs, it is the first move."""
    model = _model()
    with torch.no_grad():
        model.blocks[1].attn.proj.weight.zero_()
        model.blocks[1].attn.proj.bias.zero_()
    plan, _ = _plan(model, 0.85, variant="drop")
    assert plan.detail["events"][0]["attention"] == [1]


def test_cap_share_limits_each_kind():
    # 4 blocks: at most one layer of each kind. At round_to 32 the first event's cheapest moves
    # include two activation layers: the cap holds within an event, not only between events
    plan, _ = _plan(_model(), 0.45, cap_share=0.25, round_to=32)
    assert len(plan.detail["attention"]) <= 1 and len(plan.detail["activation"]) <= 1
    assert plan.within_tolerance
    none, _ = _plan(_model(), 0.6, cap_share=0.0)
    assert none.detail["attention"] == [] and none.detail["activation"] == []


def _spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_channel_estimates_rank_like_measured_removals():
    """At the original (KL 0, no gradient) the estimate is the Fisher curvature term; its ranking of
    a group's channels follows the KL increase measured by really zeroing each channel."""
    model = _model(depth=2)
    gm = traced(model)
    dg = DependencyGraph.build(gm)
    group = next(g for g in eligible_groups(dg, {"hidden"}))
    batches = _batches(2)
    references = [torch.log_softmax(gm(images), -1).detach() for images, _ in batches]
    estimates = channel_loss_estimates(dg, [group], batches, references)[group.name]
    channels = range(0, group.size, group.size // 24)
    measured = []
    for channel in channels:
        with _zeroed(gm, group, np.array([channel])):
            measured.append(_divergence(gm, batches, references))
    assert min(measured) >= 0 and all(estimates >= 0)
    assert _spearman(estimates[list(channels)], measured) > 0.6


def test_the_first_unit_of_each_group_is_priced_as_measured():
    model = _model(depth=2)
    gm = traced(model)
    dg = DependencyGraph.build(gm)
    batches = _batches(1)
    references = [torch.log_softmax(gm(images), -1).detach() for images, _ in batches]
    settings = JointSettings(kinds=ALL)
    states = {g.name: _GroupState.start(g, s, settings) for g, s in
              zip(eligible_groups(dg, ALL), channel_loss_estimates(dg, eligible_groups(dg, ALL), batches,
                                                                   references).values())}
    _calibrate(gm, states, batches, references)
    for state in states.values():
        first = state.order[:state.unit]
        with _zeroed(gm, state.group, first):
            measured = _divergence(gm, batches, references)
        assert float(state.scores[first].sum()) == pytest.approx(measured, rel=1e-4, abs=1e-9)


def test_recovery_trains_between_events():
    model = _model()
    gm = traced(model)
    base = count_flops(gm, gm.meta["example_input"])
    data = [(torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))) for _ in range(2)]
    kwargs = dict(teacher=copy_teacher(model))
    still = plan_joint(copy.deepcopy(gm), Budget(base, 0.6), data, JointSettings(kinds=ALL), **kwargs)
    moved = plan_joint(copy.deepcopy(gm), Budget(base, 0.6), data, JointSettings(kinds=ALL, recovery_steps=3),
                       train_batches=data, **kwargs)
    assert moved.detail["recovery_steps"] == 3 and still.detail["recovery_steps"] == 0
    w = "patch_embed.proj.weight"
    assert not torch.equal(dict(moved.graph.named_parameters())[w], dict(still.graph.named_parameters())[w])


# -- pricing after recovery ------------------------------------------------------------------------------
class _ScriptedProbe(RecoveryProbe):
    """A recovery probe whose after-recovery losses are scripted by what the change removes: the
    planner's pricing is tested apart from how well a few training steps recover a random model."""

    def __init__(self, attention: float, activation: float, width: float) -> None:
        super().__init__(None, iter(()), 5, 1e-3, [], [])
        self.after = {AttentionRemoval: attention, ActivationRemoval: activation, WidthPruning: width}
        self.log: list[list[str]] = []

    def new_event(self) -> None:
        self.log.append([])

    def loss(self, gm, passes) -> float:
        self.steps += self.batch_steps
        self.log[-1].append(",".join(type(p).__name__ for p in passes if getattr(p, "blocks", True)))
        return 1.0 + sum(self.after[type(p)] for p in passes if getattr(p, "blocks", True))


def _zero_attention(model, block):
    with torch.no_grad():
        model.blocks[block].attn.proj.weight.zero_()
        model.blocks[block].attn.proj.bias.zero_()
    return model


def test_layers_are_priced_by_their_loss_after_recovery(monkeypatch):
    """Block 1's attention costs nothing right after removal (it writes zeros), so priced before
    recovery it goes first. Scripted probes say every attention removal leaves 1 nat after recovery
    and an activation none: priced after recovery, no attention goes and activations do; the kinds'
    measured ratios and every probe step are in the plan's detail."""
    model = _zero_attention(_model(), 1)
    before, _ = _plan(model, 0.85, variant="drop")
    assert 1 in before.detail["attention"] and before.detail["pricing"] == PRICING_BEFORE
    probe = _ScriptedProbe(attention=1.0, activation=0.0, width=0.0)
    monkeypatch.setattr("vitprune.plan.joint._probe", lambda *a: probe)
    gm = traced(model)
    base = count_flops(gm, gm.meta["example_input"])
    data = [(torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))) for _ in range(2)]
    after = plan_joint(gm, Budget(base, 0.85), data, JointSettings(kinds=ALL, variant="drop", probe_steps=5),
                       teacher=copy_teacher(model), train_batches=data)
    assert after.detail["attention"] == [] and after.detail["activation"]
    assert after.detail["pricing"].startswith("after recovery (5 distillation steps per probe")
    first = after.detail["events"][0]["probes"]
    assert first["factors"]["activation"] == MIN_FACTOR  # recovered fully: floored, never free
    assert all(v["after"] == 1.0 for v in first["layers"]["attention"].values())
    assert len(first["layers"]["attention"]) == len(first["layers"]["activation"]) == 2  # probe_layers
    probes = sum(len(event) for event in probe.log)
    assert after.detail["steps"] == {"probes": 5 * probes, "recovery": 0}
    assert probe.log[0][0] == ""  # each event starts with the base probe: the unchanged graph recovered


def test_probe_prices_a_change_against_the_same_recovery_of_the_unchanged_graph():
    """RecoveryProbe: a change is priced after the same batches of recovery as the base; the graph
    itself is never trained, and every step is counted."""
    model = _model()
    gm = traced(model)
    data = [(torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))) for _ in range(3)]
    teacher = copy_teacher(model)
    refs = [torch.log_softmax(teacher(x), -1) for x, _ in data[:1]]
    probe = RecoveryProbe(teacher, iter(data * 4), 3, 1e-4, data[:1], refs)
    probe.new_event()
    weights = {n: p.clone() for n, p in gm.named_parameters()}
    base = probe.loss(gm, [])
    again = probe.loss(gm, [])
    assert base == pytest.approx(again, abs=1e-6)  # same batches, same start: the same recovery
    assert probe.loss(gm, [AttentionRemoval([0, 1, 2, 3], "drop")]) > base
    assert probe.steps == 9 and probe.probes == 3
    assert all(torch.equal(p, weights[n]) for n, p in gm.named_parameters())


# -- a latency cost -----------------------------------------------------------------------------------
def test_plans_to_a_latency_budget(tmp_path, op_timer):
    """With a latency cost model the moves are priced in estimated ms and the planner stops on a
    latency budget: the rewritten graph's estimated latency meets it, while ``flops`` stays the real
    FLOPs. A factorised activation (``merge="never"``) saves no FLOPs but does save its GELU's time,
    so only the latency cost makes it a move."""
    model = randomize(tiny("deit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10))
    gm = traced(model)
    # timed by op_timer: the rewritten graph is re-priced on sweeps through its own widths, measured
    # after the planner's; real timing noise between the two is test_cost's business
    latency = partial(LatencyModel, table=LatencyTable(1, 1, directory=tmp_path))
    budget = Budget.latency(latency(DependencyGraph.build(gm)).cost(), 0.6)
    batches = [(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(n)), None) for n in range(2)]
    settings = JointSettings(kinds=ALL, events=2, merge="never")  # round_to 16: the tables' grid step
    prices = {name: _layer_prices(gm, cost(DependencyGraph.build(gm)), settings)["activation"]
              for name, cost in (("flops", FlopModel), ("latency", latency))}
    saved = {name: [price({}) for price in by_block.values()] for name, by_block in prices.items()}
    assert set(saved["flops"]) == {0} and min(saved["latency"]) > 0
    plan = plan_joint(copy.deepcopy(gm), budget, batches, settings, teacher=copy_teacher(model), cost=latency)
    after = latency(DependencyGraph.build(plan.graph)).cost()
    assert budget.met(after) and budget.close(after)
    assert plan.detail["cost"] == "latency"
    assert plan.ratio == pytest.approx(budget.ratio(after))
    assert plan.within_tolerance  # in the budget's unit (ms), not FLOPs against a base in ms
    assert all("latency_ratio" in e for e in plan.detail["events"])
    assert plan.flops == count_flops(plan.graph, plan.graph.meta["example_input"])
    with pytest.raises(InputError, match="budget is in flops but its cost model counts latency"):
        plan_joint(gm, Budget(plan.flops, 0.6), batches, settings, cost=latency)
