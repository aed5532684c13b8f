"""benchmarks/pareto.py's settings and outputs: the committed results are written only when asked for,
and pareto.json keeps one schema."""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA_POINT = {"method", "target", "seed", "budget", "steps", "top1", "speedup", "speedup_b1"}


@pytest.fixture(scope="module")
def pareto():
    spec = importlib.util.spec_from_file_location("pareto_bench_settings", os.path.join(ROOT, "benchmarks", "pareto.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _point(method, seed, top1, b1, b32, target=0.5, steps=None):
    return {"method": method, "target": target, "seed": seed, "status": "done", "top1": top1, "speedup": b1,
            "speedup_b32": b32, "total_steps": 500, "flops_ratio": target, "params": 1000,
            "steps": steps or {"finetune": 500},
            "by_batch": {"1": {"speedup": b1}, "32": {"speedup": b32}}}


def fake_states() -> dict:
    original = {"top1": 86.4, "params": 2000, "flops": 1e6}
    short = {"original": original, "config": {}, "points": {
        "width@0.5#s1": _point("width", 1, 80.5, 1.7, 1.9),
        "width@0.5#s0": _point("width", 0, 81.25, 1.7, 1.91234567),
        "tp_width@0.5#s0": dict(_point("tp_width", 0, 79.0, 1.6, 1.8), by_batch={}),
        "cpvit@0.3#s0": {"method": "cpvit", "target": 0.3, "seed": 0, "status": "skipped"}}}
    long = {"original": original, "config": {}, "points": {
        "boundarydpt+@0.5#s0": _point("boundarydpt+", 0, 82.0, 2.0, 2.2,
                                      steps={"probes": 150, "recovery": 60, "finetune": 290})}}
    return {"short": short, "long": long}


def test_full_run_is_the_scatter_task_with_three_seeds_two_budgets_and_64_tokens(pareto):
    full = pareto.parse_args([]).settings
    assert full["task"] == "scatter" and len(full["seeds"]) >= 3 and full["test_images"] >= 2000
    assert pareto.tokens(full) >= 64 and set(full["budgets"]) == {"short", "long"}
    assert full["steps"]["long"] >= 4 * full["steps"]["short"]
    assert {"tp_width", "width", "boundarydpt", "boundarydpt+", "boundarydpt+paper", "cpvit"} <= set(full["methods"])
    quick = pareto.parse_args(["--quick"]).settings
    assert quick["task"] == "digits" and quick["embed_dim"] == 48 and not quick["scale"]
    sub = pareto.parse_args(["--methods", "width,tp_width", "--task", "digits", "--budgets", "long"]).settings
    assert sub["methods"] == ("width", "tp_width") and sub["task"] == "digits" and sub["budgets"] == ("long",)
    assert pareto.parse_args(["--write-results"]).settings["task"] == "scatter"


@pytest.mark.parametrize("argv", [["--quick", "--write-results"], ["--seeds", "0,1", "--write-results"],
                                  ["--budgets", "short", "--write-results"], ["--task", "digits", "--write-results"],
                                  ["--methods", "width,nope"], ["--seeds", "a"], ["--budgets", "medium"]])
def test_bad_flags_exit_2_with_one_line(pareto, argv, capsys):
    with pytest.raises(SystemExit) as e:
        pareto.parse_args(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("pareto.py: error: ")


def test_default_out_is_outside_the_repository_and_independent_of_cwd(pareto, tmp_path, monkeypatch):
    s = pareto.parse_args(["--quick"]).settings
    first = pareto.default_out(s, True)
    monkeypatch.chdir(tmp_path)
    assert pareto.default_out(s, True) == first and os.path.isabs(first)
    assert not os.path.abspath(first).startswith(ROOT + os.sep)
    assert pareto.RESULTS["md"] == os.path.join(ROOT, "benchmarks", "pareto.md")


def test_results_json_keeps_the_schema_other_tools_read(pareto):
    s = pareto.parse_args([]).settings
    r = pareto.report.results_json(fake_states(), s, pareto.tokens(s))
    assert set(r) == {"task", "base_top1", "points"}
    assert r["task"] == {"name": "scatter", "test_images": 2000, "tokens": 64} and r["base_top1"] == 86.4
    assert all(set(p) == SCHEMA_POINT for p in r["points"])
    assert [(p["budget"], p["method"], p["seed"]) for p in r["points"]] == [
        ("short", "tp_width", 0), ("short", "width", 0), ("short", "width", 1), ("long", "boundarydpt+", 0)]
    assert r["points"][1] == {"method": "width", "target": 0.5, "seed": 0, "budget": "short", "steps": 500,
                              "top1": 81.25, "speedup": 1.9123, "speedup_b1": 1.7}
    assert r["points"][0]["speedup"] is None  # not re-timed at batch 32: no number made up


def test_goals_are_read_on_batch_32_frontiers(pareto):
    rows = [dict(method="width", target=0.5, top1=80.0, speedup_b32=2.1), dict(method="width", target=0.3, top1=78.0,
            speedup_b32=3.0), dict(method="tp_width", target=0.5, top1=79.0, speedup_b32=2.0),
            dict(method="boundarydpt+", target=0.5, top1=81.5, speedup_b32=2.2),
            dict(method="boundarydpt+", target=0.3, top1=79.5, speedup_b32=3.1),
            dict(method="boundarydpt+", target=0.15, top1=76.0, speedup_b32=4.6),
            dict(method="boundarydpt+paper", target=0.5, top1=80.5, speedup_b32=2.2)]
    g = pareto.report.goals(rows)
    assert g["over_width"]["boundarydpt+"]["met"] and not g["over_width"]["boundarydpt+paper"]["met"]
    assert [c["speedup"] for c in g["over_width"]["boundarydpt+"]["checks"]] == [2.0, 2.1, 3.0]
    assert g["better"] == "boundarydpt+"
    assert g["over_tp"]["boundarydpt+"]["met"]  # 81.5 vs 79.0 at 2x
    ext = g["extends"]["boundarydpt+"]
    assert ext["need_speedup"] == pytest.approx(4.5) and ext["met"] and ext["best"]["target"] == 0.15
    rows[5]["top1"] = 74.9  # more than 3 points below width@0.3's 78.0
    assert not pareto.report.goals(rows)["extends"]["boundarydpt+"]["met"]


def test_outputs_stay_under_out_unless_write_results(pareto, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    committed = {ext: str(tmp_path / "committed" / f"pareto.{ext}") for ext in ("md", "json", "png")}
    os.makedirs(tmp_path / "committed")
    monkeypatch.setattr(pareto, "RESULTS", committed)
    args = pareto.parse_args(["--no-md", "--out", str(tmp_path / "run")])
    args.out = str(tmp_path / "run")
    os.makedirs(args.out)
    pareto.write_outputs(fake_states(), args, args.settings, {}, 1.0)
    assert sorted(os.listdir(args.out)) == ["pareto.json", "pareto.png"]
    assert os.listdir(tmp_path / "committed") == []
    with open(os.path.join(args.out, "pareto.json")) as f:
        assert len(json.load(f)["points"]) == 4
    args.write_results = True
    pareto.write_outputs(fake_states(), args, args.settings, {}, 1.0)
    assert sorted(os.listdir(tmp_path / "committed")) == ["pareto.json", "pareto.png"]
