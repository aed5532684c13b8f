"""compress(): targets, rounding, floors, identity at 1.0, save/reload without pickle, ONNX parity."""
import json
import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch

from conftest import MODELS, randomize, tiny
from vitprune import CompressSpec, compress
from vitprune.api import inspect_model, load_compressed, save_compressed, write_outputs
from vitprune.errors import PlanError, UnsupportedModelError
from vitprune.deps.flops import count_flops


@pytest.fixture(scope="module")
def deit_small():
    torch.manual_seed(0)
    return timm.create_model("deit_small_patch16_224", pretrained=False).eval()


@pytest.mark.parametrize("target", [0.75, 0.5, 0.3])
def test_target_flops_within_one_percent_full_size(deit_small, target):
    result = compress(deit_small, CompressSpec(target_flops=target))
    assert abs(result.report["flops_ratio"] - target) <= 0.01
    x = torch.randn(1, 3, 224, 224)
    assert count_flops(result.model, x) == result.report["flops_after"]
    assert result.model(x).shape == (1, 1000)


@pytest.mark.parametrize("ranking", ["global", "uniform"])
@pytest.mark.parametrize("importance", ["l2", "taylor"])
def test_widths_are_multiples_of_round_to(importance, ranking):
    model = tiny("deit_small_patch16_224")
    spec = CompressSpec(target_flops=0.5, round_to=16, importance=importance, ranking=ranking,
                        calib_batches=1, batch_size=2)
    result = compress(model, spec)
    assert abs(result.report["flops_ratio"] - 0.5) <= 0.01 or result.report["plan"]["notes"]
    for g in result.report["groups"]:
        assert g["after"] >= 1
        if g["kind"] != "head" and g["after"] != g["before"]:
            assert g["after"] % 16 == 0, g


def test_floors_never_empty_a_group():
    model = tiny("deit_small_patch16_224")
    result = compress(model, CompressSpec(target_flops=0.15, min_keep=0.25, round_to=1))
    for g in result.report["groups"]:
        assert g["after"] >= max(1, int(np.ceil(0.25 * g["before"]))), g


def test_unreachable_target_is_a_plan_error():
    model = tiny("deit_small_patch16_224")
    with pytest.raises(PlanError, match="floors"):
        compress(model, CompressSpec(target_flops=0.02, min_keep=0.5))


def test_compress_at_one_is_the_original(model_name):
    model = randomize(MODELS[model_name]())
    result = compress(model, CompressSpec(target_flops=1.0))
    x = torch.randn(2, *result.input_size)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), atol=1e-5, rtol=0)
    assert result.report["flops_after"] == result.report["flops_before"]


def test_non_vit_is_refused():
    model = timm.create_model("resnet18", pretrained=False)
    with pytest.raises(UnsupportedModelError, match="no attention"):
        compress(model, CompressSpec(target_flops=0.5), example_input_size=(3, 32, 32))


def test_inspect_reports_groups_and_blocks():
    d = inspect_model(tiny())
    kinds = {g["kind"] for g in d["groups"]}
    assert kinds == {"residual", "hidden", "head", "head_dim"}
    assert set(d["flops_by_block"]) >= {"blocks.0", "blocks.1", "patch_embed"}
    assert sum(d["flops_by_block"].values()) == d["flops"]
    assert sum(d["params_by_block"].values()) == d["params"]
    assert {"cls_token", "pos_embed", "blocks.0"} <= set(d["params_by_block"])


def test_saved_model_reloads_in_a_fresh_process_without_pickle(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("deit3_small_patch16_224", pretrained=False, depth=2, img_size=32,
                              num_classes=10).eval()
    randomize(model)
    source = {"kind": "timm", "arch": "deit3_small_patch16_224",
              "kwargs": {"depth": 2, "img_size": 32, "num_classes": 10}}
    result = compress(model, CompressSpec(target_flops=0.5), source=source)
    path = tmp_path / "m.pt2"
    save_compressed(result, path)
    x = torch.randn(3, 3, 32, 32)  # another batch size than the one exported with
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = result.model(x)
    # plain torch, in a fresh process: no vitprune, timm or transformers code is needed or imported
    code = (
        "import sys, torch\n"
        f"m = torch.export.load({str(path)!r}).module()\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)\n"
        f"torch.save(m(x).detach(), {str(tmp_path / 'y.pt')!r})\n"
        "leaked = sorted(n for n in ('vitprune', 'timm', 'transformers', 'passes') if n in sys.modules)\n"
        "assert not leaked, leaked\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    got = torch.load(tmp_path / "y.pt", weights_only=True)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    reloaded = load_compressed(path)  # and vitprune reads it back as a model to compress again
    torch.testing.assert_close(reloaded(x), expected, atol=1e-6, rtol=0)


def test_write_outputs_exports_a_consistent_onnx(tmp_path):
    model = randomize(tiny("deit_small_patch16_224", num_classes=10))
    source = {"kind": "timm", "arch": "deit_small_patch16_224",
              "kwargs": {"depth": 2, "img_size": 32, "num_classes": 10}}
    result = compress(model, CompressSpec(target_flops=0.5), source=source)
    paths = write_outputs(result, str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["out.json", "out.onnx", "out.pt2"]
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["onnx"]["parity_max_abs_err"]["1"] <= 1e-4
    assert report["onnx"]["parity_max_abs_err"]["4"] <= 1e-4
    session = ort.InferenceSession(paths["onnx"], providers=["CPUExecutionProvider"])
    for batch in (1, 4):
        x = torch.randn(batch, 3, 32, 32)
        (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(y, result.model(x).numpy(), atol=1e-4)
    reloaded = load_compressed(paths["pt2"])
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(reloaded(x), result.model(x), atol=1e-6, rtol=0)
