"""CompressReport: the one report schema. The pipeline writes it, PREFIX.json holds its to_dict(), and
from_dict() reads back exactly that (and refuses anything else)."""
import json

import pytest

from conftest import tiny
from vitprune import CompressSpec, compress
from vitprune.errors import InputError
from vitprune.report import CompressReport

pytestmark = pytest.mark.usefixtures("one_thread")

#: The keys of PREFIX.json, in order (latency_plan and onnx only when those ran).
KEYS = ["method", "spec", "input_size", "flops_before", "flops_after", "flops_ratio", "params_before",
        "params_after", "params_ratio", "plan", "stages", "groups", "unsupported_ops", "recovery",
        "train_steps", "timings", "peak_rss_mib", "compile_seconds"]


def _report(**kw) -> CompressReport:
    values = dict(method="width", spec=CompressSpec(target_flops=0.5).to_dict(), input_size=(3, 32, 32),
                  flops_before=400, flops_after=200, params_before=80, params_after=60,
                  stages={"width": {"notes": ["a note"]}},
                  groups=[{"name": "residual", "kind": "residual", "before": 64, "after": 48}],
                  unsupported_ops=[], compile_seconds=1.5)
    return CompressReport(**{**values, **kw})


def test_to_dict_is_the_json_with_derived_keys():
    d = _report().to_dict()
    assert list(d) == KEYS
    assert (d["flops_ratio"], d["params_ratio"], d["input_size"]) == (0.5, 0.75, [3, 32, 32])
    assert d["plan"] == {"notes": ["a note"]} and d["recovery"] is None
    assert json.loads(json.dumps(d)) == d


def test_optional_parts_appear_when_present():
    d = _report(latency_plan={"rounds": []}, onnx={"path": "m.onnx"}).to_dict()
    assert list(d) == [*KEYS, "latency_plan", "onnx"]
    assert _report(stages={}).to_dict()["plan"] == {}


def test_round_trip():
    for report in (_report(), _report(onnx={"opset": 18}, recovery={"epochs": []})):
        assert CompressReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report


@pytest.mark.parametrize("change,needle", [
    (lambda d: d.pop("flops_after"), "it has no flops_after"),
    (lambda d: d.update(flops={"before": 1}), "unknown key(s) flops"),
    (lambda d: d.update(flops_before="2G"), "flops_before is '2G'"),
    (lambda d: d.update(params_after=True), "params_after is True"),
    (lambda d: d.update(input_size=[3, 32]), "input_size"),
    (lambda d: d.update(unsupported_ops=[3]), "unsupported_ops"),
    (lambda d: d.update(onnx=[]), "onnx"),
])
def test_from_dict_refuses_what_is_not_a_report(change, needle):
    d = _report().to_dict()
    change(d)
    with pytest.raises(InputError, match="not a vitprune compression report") as e:
        CompressReport.from_dict(d)
    assert needle in str(e.value)


def test_from_dict_refuses_a_non_mapping():
    with pytest.raises(InputError, match="must be a mapping, got list"):
        CompressReport.from_dict([1, 2])


def test_the_pipeline_report_is_a_compress_report():
    result = compress(tiny(), CompressSpec(target_flops=0.6, round_to=8))
    assert list(result.report) == KEYS
    report = CompressReport.from_dict(result.report)
    assert report.to_dict() == result.report
    assert report.plan == result.report["plan"] == result.report["stages"]["width"]
    assert abs(report.flops_ratio - 0.6) <= 0.01


def test_train_steps_add_every_stage_and_the_fine_tune():
    """Every optimizer step of a compression, by phase: what the stages report under ``steps`` and
    the recovery fine-tune's epochs × steps per epoch; a report written before the field loads."""
    from vitprune.driver.pipeline import train_steps

    stages = {"depth": {"steps": {"candidates": 28, "search": 35}}, "width": {"notes": []},
              "joint": {"steps": {"probes": 12, "recovery": 8, "search": 5}}}
    recovery = {"epochs": [{}, {}], "steps_per_epoch": 7}
    assert train_steps(stages, recovery) == {"candidates": 28, "search": 40, "probes": 12, "recovery": 8,
                                             "finetune": 14}
    assert train_steps({"width": {}}, None) == {}
    old = _report().to_dict()
    del old["train_steps"]
    assert CompressReport.from_dict(old).train_steps == {}


def test_the_summary_says_where_the_time_and_memory_went(tmp_path):
    """Seconds per step (capture, each stage, cleanup; onnx and pt2 once written) and the peak RSS,
    in the report and in the summary's time line."""
    import torch

    from conftest import tiny
    from vitprune import compress
    from vitprune.api import write_outputs
    from vitprune.commands import format_summary

    torch.manual_seed(0)
    result = compress(tiny(), CompressSpec(target_flops=0.6))
    assert list(result.report["timings"]) == ["capture", "width", "cleanup"]
    write_outputs(result, tmp_path / "m")
    report = CompressReport.from_dict(json.loads((tmp_path / "m.json").read_text()))
    assert list(report.timings) == ["capture", "width", "cleanup", "onnx", "pt2"]
    assert all(s >= 0 for s in report.timings.values()) and report.peak_rss_mib > 100
    line = next(x for x in format_summary(report, None).splitlines() if x.startswith("time: "))
    assert line.startswith("time: capture ") and ", pt2 " in line and line.endswith(" GiB")
