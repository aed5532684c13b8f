"""--target-latency: plan by measured ONNX Runtime latency, report every round and the fastest
thread count."""
import json

import pytest

from conftest import randomize, tiny
from vitprune import CompressSpec, compress
from vitprune.errors import SpecError
from vitprune.deploy.bench import default_threads
from vitprune.driver.latency import compress_to_latency


def test_latency_target_measures_and_reports_rounds():
    model = tiny("deit_small_patch16_224", img_size=64, depth=3)
    result = compress_to_latency(model, CompressSpec(target_latency=0.6), (3, 64, 64), runs=8, max_rounds=3,
                                 tolerance=0.01)
    plan = result.report["latency_plan"]
    assert 1 <= len(plan["rounds"]) <= 3
    assert plan["target_latency"] == 0.6
    first = plan["rounds"][0]
    assert first["flops_target"] == 0.6 and first["compressed_ms"] > 0 and first["original_ms"] > 0
    assert first["cost"] == "latency"  # width planned to the latency model, not to FLOPs
    # a later round's FLOPs target moves against the measured miss
    for before, after in zip(plan["rounds"], plan["rounds"][1:]):
        if before["latency_ratio"] > 0.6:
            assert after["flops_target"] < before["flops_target"] + 1e-9
        else:
            assert after["flops_target"] > before["flops_target"] - 1e-9
    # the result is the round whose measured latency came closest to the target
    best = min(plan["rounds"], key=lambda r: abs(r["latency_ratio"] - 0.6))
    assert plan["measured_latency_ratio"] == best["latency_ratio"]
    assert result.report["flops_ratio"] == best["flops_ratio"]
    # the thread count to deploy with: measured once at the end, for both models, at batch 1
    sweep = plan["thread_sweep"]
    assert sweep["batch"] == 1 and sweep["threads"] == sorted({*default_threads(), 1})
    for label in ("original", "compressed"):
        medians = {int(t): ms for t, ms in sweep[label]["median_ms_by_threads"].items()}
        assert sorted(medians) == sweep["threads"]
        assert sweep[label]["best_threads"] == min(medians, key=lambda t: (medians[t], t))
    assert plan["best_threads"] == sweep["compressed"]["best_threads"]
    assert type(plan["best_threads"]) is int and plan["best_threads_ms"] == sweep["compressed"]["best_ms"]
    assert plan["speedup_at_best_threads"] == pytest.approx(
        sweep["original"]["best_ms"] / sweep["compressed"]["best_ms"])
    slower = [(label, t) for label in ("original", "compressed")
              for t, ms in sweep[label]["median_ms_by_threads"].items()
              if any(int(u) < int(t) and v < ms for u, v in sweep[label]["median_ms_by_threads"].items())]
    notes = [n for n in plan["thread_notes"] if not n.startswith("timings were noisy")]
    assert len(notes) == len(slower) and len(plan["thread_notes"]) - len(notes) <= 1
    for (label, t), note in zip(slower, notes):
        assert note.startswith((f"{label}: {t} threads slower than ", f"{label}: {t} threads no faster than "))
    json.dumps(plan)  # the report is written as JSON


def test_latency_target_plans_boundarydpt_plus_on_the_latency_model(op_timer):
    """BoundaryDPT+ to a latency target: the joint planner spends estimated ORT time, so its moves
    (layers and widths) land the first round on the latency model's fraction, and the round's
    measured ratio is what the report keeps. The tables come from ``op_timer`` (the rewritten
    graph's entries are measured after the planner's, and must agree with them); the round's
    latency is measured in ONNX Runtime."""
    model = randomize(tiny("deit_small_patch16_224", img_size=64, depth=4, num_classes=10))
    spec = CompressSpec(method="boundarydpt+", target_latency=0.5, calib_batches=1, batch_size=2)
    result = compress_to_latency(model, spec, (3, 64, 64), runs=5, max_rounds=1)
    plan = result.report["latency_plan"]
    (first,) = plan["rounds"]
    assert first["cost"] == "latency" and first["flops_target"] == 0.5
    joint = result.report["stages"]["joint"]
    assert joint["within_tolerance"] and abs(joint["planned_cost_ratio"] - 0.5) <= 0.02
    assert joint["attention"] or joint["activation"] or joint["planned_flops_ratio"] < 0.9
    assert plan["measured_latency_ratio"] == first["latency_ratio"] and 0 < first["latency_ratio"] < 1
    assert result.report["flops_ratio"] == first["flops_ratio"] == pytest.approx(joint["planned_flops_ratio"])


def test_compress_dispatches_on_target_latency(monkeypatch):
    """The latency target is a layer above the FLOPs pipeline: compress hands the request to it, and it
    steers the pipeline itself (it never re-enters compress)."""
    import vitprune.api as api
    import vitprune.driver.latency as latency

    seen = {}
    monkeypatch.setattr(api, "compress_to_latency",
                        lambda model, spec, size, **kw: seen.update(spec=spec, size=size) or spec)
    spec = CompressSpec(target_latency=0.5)
    assert compress(tiny(), spec) is spec and seen["spec"] is spec and len(seen["size"]) == 3
    assert not hasattr(latency, "compress") and latency.compress_to_flops is api.compress_to_flops


def test_latency_and_flops_targets_are_exclusive():
    with pytest.raises(SpecError, match="not both"):
        CompressSpec(target_flops=0.5, target_latency=0.5)
    with pytest.raises(SpecError, match="target_latency"):
        CompressSpec(target_latency=1.5)
