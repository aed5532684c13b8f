"""ONNX Runtime benchmarking: sane rows, round-robin comparison (same model ≈ 1.0×, half the depth
faster), the Markdown table, and InputError for bad input. Small models, few runs."""
from __future__ import annotations

import onnx
import pytest
import timm
import torch
from onnx import TensorProto, helper

from vitprune.deploy import bench
from vitprune.errors import InputError
from vitprune.deploy.onnx import export_onnx
from vitprune.frontend.capture import capture, example_input_for

IMG = 96  # 37 tokens: long enough that depth dominates latency, short enough to stay quick
KEYS = {"model", "batch", "threads", "median_ms", "p90_ms", "mean_ms", "runs"}


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
    # twice the images cost more than one (it would not, if the batch were silently ignored)
    assert rows[1]["median_ms"] > rows[0]["median_ms"]


def test_compare_same_model_twice_is_about_one(vits):
    full, _ = vits
    rows = bench.compare([full, full], warmup=3, runs=15)
    assert len(rows) == 2 and all(set(r) == KEYS | {"speedup"} for r in rows)
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
                         batch_sizes=(1, 3))
    assert len(rows) == 2 and not any("speedup" in r for r in rows)


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
