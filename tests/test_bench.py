"""ONNX Runtime benchmarking: sane rows, round-robin comparison (same model ≈ 1.0×, half the depth
faster), the fastest thread count per model and batch, the Markdown table, and InputError for bad
input. Small models, few runs."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from onnx import TensorProto, helper

from vitprune.deploy import bench
from vitprune.errors import InputError
from vitprune.deploy.onnx import export_onnx
from vitprune.frontend.capture import capture, example_input_for
from conftest import tiny

IMG = 96  # 37 tokens: long enough that depth dominates latency, short enough to stay quick
KEYS = {"model", "batch", "threads", "median_ms", "p90_ms", "mean_ms", "runs", "best_threads",
        "best_ms", "others_cores"}


def _export_vit(path, depth: int) -> str:
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=IMG,
                              depth=depth).eval()
    gm = capture(model, example_input_for((3, IMG, IMG)))
    export_onnx(gm, torch.randn(1, 3, IMG, IMG), path, parity_batches=(1,))
    return str(path)


@pytest.fixture(scope="module")
def vits(tmp_path_factory):
    """(full, half): the same ViT at depth 6 and depth 3."""
    d = tmp_path_factory.mktemp("bench")
    return _export_vit(d / "full.onnx", 6), _export_vit(d / "half.onnx", 3)


def _matmul_model(path, dims=("N", 8), name="x") -> str:
    """A one-node ONNX model (x @ W) built by hand, to test shape handling without torch."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 4], [0.1] * 32)
    node = helper.make_node("MatMul", [name, "w"], ["y"])
    x = helper.make_tensor_value_info(name, TensorProto.FLOAT, list(dims))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [dims[0], 4])
    graph = helper.make_graph([node], "mm", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def test_bench_rows_are_sane(vits):
    full, _ = vits
    rows = bench.bench_onnx(full, batch_sizes=(1, 2), threads=1, warmup=2, runs=7)
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        assert set(r) == KEYS
        assert r["model"] == full and r["threads"] == 1 and r["runs"] == 7
        assert 0 < r["median_ms"] <= r["p90_ms"] < 10_000 and r["mean_ms"] > 0
        assert r["others_cores"] is None or 0 <= r["others_cores"] <= bench.available_cores() + 0.5
    # twice the images cost more than one (it would not, if the batch were silently ignored)
    assert rows[1]["median_ms"] > rows[0]["median_ms"]


def test_compare_same_model_twice_is_about_one(vits):
    full, _ = vits
    rows = bench.compare([full, full], threads=1, warmup=3, runs=15)
    assert len(rows) == 2 and all(set(r) == KEYS | {"speedup", "best_speedup"} for r in rows)
    assert rows[0]["speedup"] == 1.0
    assert 0.5 <= rows[1]["speedup"] <= 2.0


def test_compare_half_depth_is_faster(vits):
    full, half = vits
    rows = bench.compare([full, half], batch_sizes=(1,), threads=1, warmup=3, runs=20)
    assert [r["model"] for r in rows] == [full, half]
    assert rows[1]["speedup"] == pytest.approx(rows[0]["median_ms"] / rows[1]["median_ms"])
    assert rows[1]["speedup"] > 1.0


def test_compare_single_model_has_no_speedup(tmp_path):
    rows = bench.compare([_matmul_model(tmp_path / "mm.onnx")], runs=3, warmup=0,
                         batch_sizes=(1, 3), threads=1)
    assert len(rows) == 2 and not any("speedup" in r or "best_speedup" in r for r in rows)


def test_input_shape_from_model_or_argument(tmp_path):
    static = _matmul_model(tmp_path / "static.onnx", dims=("N", 8))
    assert bench.bench_onnx(static, runs=2, warmup=0)[0]["runs"] == 2
    dynamic = _matmul_model(tmp_path / "dyn.onnx", dims=("N", "K"))
    with pytest.raises(InputError, match="input_shape"):
        bench.bench_onnx(dynamic, runs=2)
    assert bench.bench_onnx(dynamic, runs=2, warmup=0, input_shape=(8,))[0]["runs"] == 2
    with pytest.raises(InputError, match="does not match"):
        bench.bench_onnx(static, runs=2, input_shape=(9,))
    fixed = _matmul_model(tmp_path / "fixed.onnx", dims=(1, 8))
    with pytest.raises(InputError, match="fixed batch of 1"):
        bench.bench_onnx(fixed, batch_sizes=(2,), runs=2)


def test_format_table():
    rows = [{"model": "a.onnx", "batch": 1, "threads": 1, "median_ms": 2.0, "p90_ms": 2.5,
             "mean_ms": 2.1, "runs": 30, "speedup": 1.0},
            {"model": "b|c.onnx", "batch": 1, "threads": 1, "median_ms": 1.0, "p90_ms": 1.25,
             "mean_ms": 1.1, "runs": 30, "speedup": 2.0}]
    lines = bench.format_table(rows).splitlines()
    assert len(lines) == 4
    assert lines[0] == "| model | batch | threads | median_ms | p90_ms | mean_ms | runs | speedup |"
    assert set(lines[1]) <= set("|-:")
    assert lines[3] == "| b\\|c.onnx | 1 | 1 | 1.000 | 1.250 | 1.100 | 30 | 2.000 |"
    assert all(line.count("|") - line.count("\\|") == 9 for line in lines)
    no_speedup = bench.format_table([{k: v for k, v in rows[0].items() if k != "speedup"}])
    assert "speedup" not in no_speedup


@pytest.mark.parametrize("kwargs, needle", [
    (dict(batch_sizes=(0,)), "batch sizes"),
    (dict(batch_sizes=()), "batch sizes"),
    (dict(threads=0), "threads"),
    (dict(threads=()), "threads"),
    (dict(threads=[1, 0]), "threads"),
    (dict(threads=(1, -2)), "threads"),
    (dict(threads="1,2"), "threads"),
    (dict(threads=1.5), "threads"),
    (dict(threads=True), "threads"),
    (dict(threads=[1, "2"]), "threads"),
    (dict(runs=0), "runs"),
    (dict(warmup=-1), "warmup"),
])
def test_bad_settings(tmp_path, kwargs, needle):
    with pytest.raises(InputError, match=needle):
        bench.bench_onnx(_matmul_model(tmp_path / "mm.onnx"), **kwargs)


def test_bad_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        bench.bench_onnx(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_text("this is not a protobuf\n")
    with pytest.raises(InputError, match="not an ONNX model"):
        bench.bench_onnx(junk)
    with pytest.raises(InputError, match="not found"):
        bench.compare([_matmul_model(tmp_path / "ok.onnx"), tmp_path / "missing.onnx"])
    with pytest.raises(InputError, match="non-empty"):
        bench.compare([])


# -- the thread count to deploy with ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tinies(tmp_path_factory):
    """(two blocks, one block): tiny ViTs exported the way compress exports them."""
    d = tmp_path_factory.mktemp("threads")
    paths = []
    for depth in (2, 1):
        gm = capture(tiny(depth=depth), example_input_for((3, 32, 32)))
        paths.append(str(d / f"depth{depth}.onnx"))
        export_onnx(gm, torch.randn(1, 3, 32, 32), paths[-1], parity_batches=(1,))
    return paths


def test_thread_sweep_marks_the_fastest_setting(tinies):
    rows = bench.compare(tinies, batch_sizes=(1, 2), threads=(2, 1), warmup=1, runs=5)
    # batch by batch, thread count by thread count (sorted), models in the order given
    assert [(r["batch"], r["threads"], r["model"]) for r in rows] == [
        (b, t, m) for b in (1, 2) for t in (1, 2) for m in tinies]
    for model in tinies:
        for batch in (1, 2):
            group = [r for r in rows if r["model"] == model and r["batch"] == batch]
            medians = {r["threads"]: r["median_ms"] for r in group}
            argmin = min(medians, key=lambda t: (medians[t], t))
            for r in group:
                assert r["best_threads"] == argmin and type(r["best_threads"]) is int
                assert r["best_ms"] == medians[argmin]
                assert ("note" in r) == (r["threads"] == 2 and medians[2] > medians[1])
    for r in rows:
        first = next(f for f in rows if f["batch"] == r["batch"] and f["model"] == tinies[0])
        assert r["best_speedup"] == pytest.approx(first["best_ms"] / r["best_ms"])
    # the value is what ORT's session options take, unchanged
    options = ort.SessionOptions()
    options.intra_op_num_threads = rows[0]["best_threads"]
    assert options.intra_op_num_threads == rows[0]["best_threads"]
    summary = bench.best_settings(rows)
    assert [(s["model"], s["batch"]) for s in summary] == [(m, b) for b in (1, 2) for m in tinies]
    for s in summary:
        row = next(r for r in rows if (r["model"], r["batch"]) == (s["model"], s["batch"]))
        assert s["best_threads"] == row["best_threads"] and s["best_ms"] == row["best_ms"]
        assert set(s["median_ms_by_threads"]) == set(s["speedup_by_threads"]) == {"1", "2"}
        assert s["speedup_at_best"] == row["best_speedup"]
    table = bench.format_table(rows)
    assert "fastest intra-op thread count (SessionOptions.intra_op_num_threads)" in table
    for s in summary:
        assert f"| {s['model']} | {s['batch']} | {s['best_threads']} | {s['best_ms']:.3f} |" in table


def test_best_settings_keeps_a_file_compared_with_itself_apart(tinies):
    rows = bench.compare([tinies[1], tinies[1]], threads=(1, 2), warmup=0, runs=3)
    summary = bench.best_settings(rows)
    assert len(summary) == 2
    for k, s in enumerate(summary):
        mine = rows[k::2]  # rows alternate first copy, second copy
        assert s["median_ms_by_threads"] == {str(r["threads"]): r["median_ms"] for r in mine}


def test_default_threads_are_one_and_the_available_cores(tmp_path):
    cores = bench.available_cores()
    assert 1 <= cores <= os.cpu_count()
    assert bench.default_threads() == tuple(sorted({1, cores}))
    rows = bench.bench_onnx(_matmul_model(tmp_path / "mm.onnx"), warmup=0, runs=2)
    assert [r["threads"] for r in rows] == list(bench.default_threads())
    rows = bench.bench_onnx(_matmul_model(tmp_path / "mm.onnx"), threads=[2, 1, 2], warmup=0, runs=2)
    assert [r["threads"] for r in rows] == [1, 2]  # sorted, each once


def _measured(model: str, medians: dict[int, float]) -> list[dict]:
    return [{"model": model, "batch": 1, "threads": t, "median_ms": ms, "p90_ms": ms, "mean_ms": ms,
             "runs": 9} for t, ms in medians.items()]


def test_slower_thread_count_says_why(tinies, tmp_path):
    nodes = len(onnx.load(tinies[0]).graph.node)
    quiet, busy = bench._Machine(cores=2, others=0.0), bench._Machine(cores=2, others=0.8)
    # small ops on an idle machine: synchronisation is the reason, with the numbers behind it
    rows = _measured(tinies[0], {1: 0.5, 2: 0.6})
    bench._mark_best(rows, n_models=1, n_settings=2, machine=quiet)
    assert [r["best_threads"] for r in rows] == [1, 1] and "note" not in rows[0]
    assert rows[1]["note"] == (
        f"2 threads slower than 1 at batch 1 (0.60 vs 0.50 ms): per-op work too small to amortise "
        f"thread synchronisation ({nodes} ONNX nodes averaging {500 / nodes:.0f} µs each on 1 thread)")
    # a busy machine, big ops: the load is the reason given
    rows = _measured(_matmul_model(tmp_path / "mm.onnx"), {1: 18.2, 2: 22.3, 4: 30.0})
    bench._mark_best(rows, n_models=1, n_settings=3, machine=busy)
    assert rows[1]["note"].startswith("2 threads slower than 1 at batch 1 (22.3 vs 18.2 ms): other "
                                      "processes kept the cores busy (they used 0.8 of the 2 cores while timing)")
    assert "4 threads oversubscribe the 2 available cores" in rows[2]["note"]
    # an idle machine and big ops: no measured cause to cite, so the note says what was seen
    rows = _measured(_matmul_model(tmp_path / "mm.onnx"), {1: 18.2, 2: 22.3})
    bench._mark_best(rows, n_models=1, n_settings=2, machine=quiet)
    assert rows[1]["note"].endswith("the extra threads cost more in synchronisation and memory "
                                    "traffic than their share of the work saved")
    # a gap within noise is called a tie, with no cause claimed
    rows = _measured(tinies[0], {1: 40.0, 2: 40.1})
    bench._mark_best(rows, n_models=1, n_settings=2, machine=busy)
    assert rows[1]["note"] == ("2 threads no faster than 1 at batch 1 (40.1 vs 40.0 ms, within 2%): "
                               "the extra threads bought nothing")
    # faster with more threads: no note, and the table names the faster setting
    rows = _measured(tinies[0], {1: 2.0, 2: 1.2})
    bench._mark_best(rows, n_models=1, n_settings=2, machine=quiet)
    assert all(r["best_threads"] == 2 and "note" not in r for r in rows)
    lines = bench.format_table(rows).splitlines()
    assert lines[-1] == f"| {tinies[0]} | 1 | 2 | 1.200 |  |"


@pytest.mark.skipif(bench._busy_s() is None, reason="no /proc/stat: others' CPU use is not measurable")
def test_cpu_taken_by_other_processes_is_measured():
    idle = bench._CpuUse()
    time.sleep(0.6)
    before = idle.others()
    hog = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 2: pass"])
    try:
        time.sleep(0.3)  # the interpreter is up and spinning
        busy = bench._CpuUse()
        time.sleep(1.0)
        during = busy.others()
    finally:
        hog.wait()
    assert during - before > 0.5  # a spinning process is about one core, not counted as ours


def test_time_alone_times_one_model_back_to_back(vits):
    full, pruned = vits
    full_ms, pruned_ms = (bench.time_alone(p, threads=1, warmup=1, runs=5) for p in (full, pruned))
    assert 0 < pruned_ms < full_ms < 10_000  # half the depth is the cheaper one, timed alone too
    with pytest.raises(InputError, match="threads"):
        bench.time_alone(full, threads=0)
