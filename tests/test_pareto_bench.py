"""benchmarks/pareto.py's settings and outputs: the committed results are written only when asked for."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pareto():
    spec = importlib.util.spec_from_file_location("pareto_bench_settings", os.path.join(ROOT, "benchmarks", "pareto.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_state() -> dict:
    point = {"method": "width", "target": 0.5, "status": "done", "top1": 81.25, "speedup": 1.7,
             "scaled": {"speedup": 1.91234567, "flops_ratio": 0.5, "latency_ms": 10.0}}
    return {"original": {"top1": 86.4}, "config": {}, "points": {
        "width@0.5#1": dict(point, seed=1, top1=80.5),
        "width@0.5#0": dict(point, seed=0),
        "tp_width@0.5#0": dict(point, method="tp_width", seed=0, scaled=None),
        "cpvit@0.3#0": {"method": "cpvit", "target": 0.3, "seed": 0, "status": "skipped"}}}


def test_full_run_is_the_mosaic_task_with_three_seeds_and_quick_is_digits(pareto):
    full = pareto.parse_args([]).settings
    assert full["task"] == "mosaic" and len(full["seeds"]) >= 3 and full["scale"] and full["test_images"] >= 2000
    quick = pareto.parse_args(["--quick"]).settings
    assert quick["task"] == "digits" and quick["embed_dim"] == 48 and not quick["scale"]
    sub = pareto.parse_args(["--methods", "width,tp_width", "--task", "digits"]).settings
    assert sub["methods"] == ("width", "tp_width") and sub["task"] == "digits" and sub["patch_size"] == 4
    assert pareto.parse_args(["--write-results"]).settings["task"] == "mosaic"


@pytest.mark.parametrize("argv", [["--quick", "--write-results"], ["--seeds", "0,1", "--write-results"],
                                  ["--no-scale", "--write-results"], ["--task", "digits", "--write-results"],
                                  ["--methods", "width,nope"], ["--seeds", "a"]])
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


def test_results_json_has_every_finished_point_with_the_deit_s_speedup(pareto):
    s = pareto.parse_args([]).settings
    r = pareto.results_json(fake_state(), s)
    assert r["task"] == {"name": "mosaic", "test_images": 2000} and r["base_top1"] == 86.4
    assert [(p["method"], p["seed"]) for p in r["points"]] == [("tp_width", 0), ("width", 0), ("width", 1)]
    assert r["points"][1] == {"method": "width", "target": 0.5, "seed": 0, "top1": 81.25, "speedup": 1.9123}
    assert r["points"][0]["speedup"] is None  # no DeiT-S measurement: no number made up


def test_outputs_stay_under_out_unless_write_results(pareto, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    committed = {ext: str(tmp_path / "committed" / f"pareto.{ext}") for ext in ("md", "json", "png")}
    os.makedirs(tmp_path / "committed")
    monkeypatch.setattr(pareto, "RESULTS", committed)
    args = pareto.parse_args(["--no-md", "--out", str(tmp_path / "run")])
    args.out = str(tmp_path / "run")
    os.makedirs(args.out)
    pareto.write_outputs(fake_state(), args, args.settings, {}, 1.0)
    assert sorted(os.listdir(args.out)) == ["pareto.json", "pareto.png"]
    assert os.listdir(tmp_path / "committed") == []
    with open(os.path.join(args.out, "pareto.json")) as f:
        assert len(json.load(f)["points"]) == 3
    args.write_results = True
    pareto.write_outputs(fake_state(), args, args.settings, {}, 1.0)
    assert sorted(os.listdir(tmp_path / "committed")) == ["pareto.json", "pareto.png"]
