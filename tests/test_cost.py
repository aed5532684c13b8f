"""Latency cost model: one-op ONNX models compute what they claim, the on-disk cache, interpolation,
and whole-graph estimates against measured ONNX Runtime latency (small graphs, few runs)."""
import copy
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import randomize, tiny, traced
from passes.activation import ActivationRemoval
from passes.attention import AttentionRemoval
from passes.width import WidthPruning
from vitprune import CompressSpec, compress
from vitprune.deploy.bench import compare
from vitprune.deploy.onnx import export_onnx
from vitprune.deps import DependencyGraph
from vitprune.deps.branches import find_activations, find_attention_branches
from vitprune.deps.flops import FlopModel
from vitprune.errors import InputError
from vitprune.plan.budget import Budget
from vitprune.plan.cost import (LatencyModel, LatencyTable, _interp, build_op_model, cache_dir,
                                grid, slow_entries)
from vitprune.plan.importance import l2_importance
from vitprune.plan.width import eligible_groups, plan_width

pytestmark = pytest.mark.usefixtures("one_thread")


def run(proto, x):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_attention_op_model_is_attention():
    b, t, h, d = 2, 5, 3, 8
    x = np.random.default_rng(0).standard_normal((1, b * t, 3 * h * d)).astype(np.float32)
    q, k, v = torch.from_numpy(x).reshape(b, t, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, b * t, h * d)
    np.testing.assert_allclose(run(build_op_model("attention", (b, t, h, d)), x), want.numpy(), atol=1e-5)


def test_linear_gelu_and_norm_op_models():
    x = np.random.default_rng(0).standard_normal((1, 7, 12)).astype(np.float32)
    proto = build_op_model("linear", (7, 12, 20))
    w, bias = (next(np.frombuffer(i.raw_data, np.float32).reshape(i.dims) for i in proto.graph.initializer
                    if i.name == n) for n in ("w", "b"))
    np.testing.assert_allclose(run(proto, x), x @ w + bias, atol=1e-5)
    gelu = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run(build_op_model("gelu", (7, 12)), x), gelu, atol=1e-5)
    assert run(build_op_model("norm", (7, 12)), x).shape == (1, 7, 12)
    with pytest.raises(InputError, match="unknown op kind"):
        build_op_model("conv3d", (1, 2))


def test_grid_and_interpolation():
    assert grid(64, 16) == [1, 16, 32, 48, 64]
    assert grid(40, 16) == [1, 16, 32, 40]
    xs, ys = [1, 16, 32], [1.0, 2.0, 4.0]
    assert _interp(xs, ys, 24, stepwise=False) == pytest.approx(3.0)
    assert _interp(xs, ys, 24, stepwise=True) == 4.0   # 17..32 columns cost what 32 costs
    assert _interp(xs, ys, 16, stepwise=True) == 2.0
    assert _interp(xs, ys, 99, stepwise=False) == 4.0  # never extrapolated


def test_cache_dir_honours_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "vitprune"
    assert LatencyTable(1, 1).path.parent == tmp_path / "vitprune"


def test_table_is_measured_once_and_cached(tmp_path):
    keys = [("linear", (16, 32, 32)), ("norm", (16, 32))]
    table = LatencyTable(1, 1, directory=tmp_path, runs=3, warmup=1)
    assert table.ensure(keys) == 2 and table.overhead > 0
    data = json.loads(table.path.read_text())
    assert data["machine"]["threads"] == 1 and data["machine"]["ort"] == ort.__version__
    again = LatencyTable(1, 1, directory=tmp_path)
    assert again.ensure(keys) == 0 and again.get(*keys[0]) == table.get(*keys[0])
    assert LatencyTable(2, 1, directory=tmp_path).path != table.path   # per thread count
    assert LatencyTable(1, 8, directory=tmp_path).entries == {}        # and per batch
    table.path.write_text("{not json")
    assert LatencyTable(1, 1, directory=tmp_path).entries == {}        # a broken cache is re-measured
    with pytest.raises(InputError, match="threads and batch"):
        LatencyTable(0, 1, directory=tmp_path)


def _fake_measure(slow_rounds: int):
    """A stand-in for ORT timing: ms proportional to the work, with linear (64, 256, 256) timed 5x
    slower in its first ``slow_rounds`` measurements (a burst of other work); records each call's keys."""
    calls = []

    def measure(keys, threads, *, runs=7, warmup=2, repeats=2):
        calls.append(sorted(keys))
        burst = sum(("linear", (64, 256, 256)) in c for c in calls) <= slow_rounds
        out = {k: 1e-6 * np.prod(k[1]) * (5 if burst and k == ("linear", (64, 256, 256)) else 1) for k in keys}
        return {**out, ("overhead", ()): 0.01}
    return measure, calls


LINEARS = [("linear", (64, i, o)) for i in (128, 256) for o in (128, 256)] + [("norm", (64, 256))]


def test_a_linear_timed_during_a_burst_is_measured_again(tmp_path, monkeypatch):
    measure, calls = _fake_measure(slow_rounds=1)
    monkeypatch.setattr("vitprune.plan.cost.measure", measure)
    table = LatencyTable(1, 1, directory=tmp_path)
    assert slow_entries({k: 1e-6 * np.prod(k[1]) for k in LINEARS}) == []
    assert table.ensure(LINEARS) == 5
    assert calls[1] == [("linear", (64, 256, 256))]                 # only the outlier, once more
    assert table.get("linear", (64, 256, 256)) == pytest.approx(1e-6 * 64 * 256 * 256)
    assert table.path.exists() and table.notes == []


def test_a_table_that_stays_inconsistent_is_used_but_not_cached(tmp_path, monkeypatch):
    measure, calls = _fake_measure(slow_rounds=99)
    monkeypatch.setattr("vitprune.plan.cost.measure", measure)
    table = LatencyTable(1, 1, directory=tmp_path)
    assert table.ensure(LINEARS) == 5 and len(calls) == 3          # measured, then twice more
    assert table.get("linear", (64, 256, 256)) == pytest.approx(5e-6 * 64 * 256 * 256)
    assert not table.path.exists() and "not cached" in table.notes[0] and "linear:64,256,256" in table.notes[0]


# -- whole graphs ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A DeiT-tiny-ish graph (65 tokens, width 192, 3 heads × 64, 2 blocks), its latency model
    (batch 1, one thread, grid of 32) and its L2 planner inputs."""
    model = randomize(tiny("deit_tiny_patch16_224", img_size=64, patch_size=8, num_classes=100))
    dg = DependencyGraph.build(traced(model))
    table = LatencyTable(1, 1, directory=tmp_path_factory.mktemp("cost"), runs=5, warmup=1)
    groups = eligible_groups(dg, {"residual", "hidden", "head", "head_dim"})
    return dg, LatencyModel(dg, table, step=32), groups, l2_importance(dg, groups), tmp_path_factory.mktemp("onnx")


def _pruned_onnx(dg, keep, path):
    gm = copy.deepcopy(dg.gm)
    if keep:
        WidthPruning(keep)(gm)
    export_onnx(gm, torch.randn(1, 3, 64, 64), path, parity_batches=(1,))
    return str(path)


def _counts(groups, keep):
    return {g.axis: len(keep[g.name]) for g in groups if g.name in keep}


def test_estimated_latency_ratios_match_measured_and_rank_plans(small):
    """Plans are made on ratios to the unpruned graph's estimate (``Budget.latency``), so those are
    what must match ONNX Runtime: within 0.06 of the measured ratio (seen: within 0.03 here). On this
    sub-millisecond graph the absolute estimate runs 10-17% under the measured time (the ops the table
    does not time are a larger share of it than of a real ViT's: DeiT-S/B estimates land within 3%
    in benchmarks/latency.py), hence the loose absolute bound."""
    dg, lm, groups, scores, tmp = small
    fm = FlopModel(dg)
    light = plan_width(dg, fm, scores, groups, Budget(fm.flops(), 0.4), round_to=32).detail["keep"]
    mid = plan_width(dg, fm, scores, groups, Budget(fm.flops(), 0.75), round_to=32).detail["keep"]
    paths = [_pruned_onnx(dg, k, tmp / f"{i}.onnx") for i, k in enumerate(({}, mid, light))]
    # the least of two medians from fresh sessions: the estimator the table uses (a session on a
    # loaded machine is sometimes slow for its whole life; noise only ever adds time)
    measured = np.min([[r["median_ms"] for r in compare(paths, threads=1, runs=15, warmup=3)]
                       for _ in range(2)], axis=0)
    estimates = np.array([lm.cost(_counts(groups, k)) for k in ({}, mid, light)])
    np.testing.assert_allclose(estimates / estimates[0], measured / measured[0], atol=0.06)
    np.testing.assert_allclose(estimates, measured, rtol=0.4)
    assert np.argsort(estimates).tolist() == np.argsort(measured).tolist() == [2, 1, 0]


def test_planning_to_the_latency_model(small):
    dg, lm, groups, scores, _ = small
    budget = Budget.latency(lm.cost(), 0.6)
    plan = plan_width(dg, lm, scores, groups, budget, round_to=32)
    assert plan.detail["cost"] == "ms" and budget.met(plan.cost) and plan.flops is None  # ms, not FLOPs
    assert plan.cost == pytest.approx(lm.cost(plan.detail["counts"])) and plan.ratio == budget.ratio(plan.cost)
    assert set(lm.breakdown()) >= {"linear", "attention", "norm", "gelu", "add", "overhead"}
    assert sum(lm.breakdown().values()) == pytest.approx(lm.cost())


@pytest.mark.parametrize("removal", [AttentionRemoval([1], "identity_norm"), AttentionRemoval([1], "drop"),
                                     ActivationRemoval([0], "always"), ActivationRemoval([0], "never")],
                         ids=["attention-identity_norm", "attention-drop", "activation-merged",
                              "activation-factorised"])
def test_a_removal_is_priced_as_the_graph_after_it(small, removal, op_timer, tmp_path):
    """The joint planner's price of a layer removal is what :meth:`LatencyModel.cost` says the graph
    loses when the pass really runs. Attention and a factorised activation: the rewritten graph's
    ops are a subset of the original's, timed by the same table entries, so the two agree to float
    rounding. A merged fc2∘fc1 (C → C) is priced from fc1's sweep of output widths while the rewritten
    graph times it by its own sweeps, measured after the planner's; both read the same entry, and
    only the denoising of a sweep can tell them apart: within a tenth of the merged linear's time.
    Tables from ``op_timer``: this is the pricing rule, not timing noise between the two sweeps."""
    dg = small[0]
    lm = LatencyModel(dg, LatencyTable(1, 1, directory=tmp_path), step=32)
    after = copy.deepcopy(dg.gm)
    removal(after)
    lost = lm.cost() - LatencyModel(DependencyGraph.build(after), lm.table, step=lm.step).cost()
    if isinstance(removal, AttentionRemoval):
        price = lm.attention_saving(find_attention_branches(dg.gm)[1], removal.variant)
        assert price > 0 and price == pytest.approx(lost, rel=1e-9)
        return
    site = find_activations(dg.gm)[0]
    price = lm.activation_saving(site, removal.merges(site))
    merged = lm.merged_linear_cost(site.fc1, site.fc2) if removal.merges(site) else 0.0
    assert price > 0 and price == pytest.approx(lost, rel=1e-9, abs=0.1 * merged)


@pytest.mark.parametrize("removal", [AttentionRemoval([1], "identity_norm"), AttentionRemoval([1], "drop"),
                                     ActivationRemoval([0], "always"), ActivationRemoval([0], "never")],
                         ids=["attention-identity_norm", "attention-drop", "activation-merged",
                              "activation-factorised"])
def test_a_removal_is_priced_in_flops_as_the_graph_after_it(small, removal):
    """The same rule in FLOPs (:class:`FlopModel` shares :class:`RemovalPrices` with the latency
    model): a removal's price is exactly the FLOPs the rewritten graph loses (a factorised activation:
    none, so it is never a FLOPs move)."""
    dg = small[0]
    fm = FlopModel(dg)
    after = copy.deepcopy(dg.gm)
    removal(after)
    lost = fm.flops() - FlopModel(DependencyGraph.build(after)).flops()
    if isinstance(removal, AttentionRemoval):
        price, saves = fm.attention_saving(find_attention_branches(dg.gm)[1], removal.variant), True
    else:
        site = find_activations(dg.gm)[0]
        price, saves = fm.activation_saving(site, removal.merges(site)), removal.merges(site)
    assert price == pytest.approx(lost, abs=1) and (price > 0) == saves


@pytest.mark.parametrize("unit", ["flops", "latency"])
def test_a_layer_narrowed_before_its_removal_is_not_paid_twice(small, unit):
    """In one event the joint planner may shrink a block's heads and then remove that block's
    attention: priced at the widths chosen so far, the removal saves only what the heads left, so
    the event's total is the layer's cost once."""
    dg, lm, groups, *_ = small
    model = FlopModel(dg) if unit == "flops" else lm
    branch = find_attention_branches(dg.gm)[1]
    heads = next(g for g in groups if g.kind == "head" and all(m.param in set(branch.params) for m in g.members))
    counts = {heads.axis: heads.size - 1}
    narrowed = model.cost() - model.cost(counts)
    assert narrowed > 0
    assert model.attention_saving(branch, "identity_norm", counts) + narrowed == pytest.approx(
        model.attention_saving(branch, "identity_norm"), rel=1e-9)


def test_compress_spends_a_latency_budget(monkeypatch, tmp_path):
    """``cost: latency``: the width stage plans to the estimated latency (the tables are measured into
    the cache once), reports both ratios, and keeps the FLOPs ratio honest."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model = randomize(tiny("deit_small_patch16_224", depth=2, img_size=32))
    result = compress(model, CompressSpec(target_flops=0.6, cost="latency", round_to=8))
    width = result.report["stages"]["width"]
    assert width["cost"] == "latency" and width["within_tolerance"]
    assert width["planned_flops_ratio"] == pytest.approx(result.report["flops_ratio"])
    assert list(tmp_path.glob("vitprune/latency-t1-b1-*.json"))  # the tables, cached


def test_boundarydpt_plus_spends_a_latency_budget(monkeypatch, tmp_path):
    """``cost: latency`` with method boundarydpt+: the joint stage plans to the estimated latency of
    this machine's tables and says so, while the FLOPs ratio it reports is the real one."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # a fresh table: measured here
    model = randomize(tiny("deit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10))
    result = compress(model, CompressSpec(method="boundarydpt+", target_flops=0.6, cost="latency",
                                          calib_batches=1, batch_size=2))
    joint = result.report["stages"]["joint"]
    assert joint["cost"] == "latency" and joint["within_tolerance"]
    assert abs(joint["planned_cost_ratio"] - 0.6) <= 0.03
    assert joint["planned_flops_ratio"] == pytest.approx(result.report["flops_ratio"])
