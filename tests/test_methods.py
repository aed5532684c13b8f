"""Methods through compress(): depth, depth+width, tokens, composition, replay, ONNX, CLI with data."""
import json

import pytest
import torch

from conftest import randomize, tiny
from vitprune import CompressSpec, compress
from vitprune.api import load_compressed, write_outputs
from vitprune.cli import main
from vitprune.errors import PlanError
from vitprune.deploy.onnx import onnx_op_counts

SOURCE = {"kind": "timm", "arch": "deit_small_patch16_224", "kwargs": {"depth": 4, "img_size": 32, "num_classes": 10}}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize(tiny("deit_small_patch16_224", depth=4, num_classes=10))


def test_boundarydpt_alternates_kinds_to_the_target(model):
    result = compress(model, CompressSpec(method="boundarydpt", target_flops=0.8, calib_batches=1, batch_size=4))
    depth = result.report["stages"]["depth"]
    assert abs(len(depth["attention"]) - len(depth["activation"])) <= 1
    assert result.report["flops_ratio"] <= 0.81
    assert depth["selection"] == "one_shot"


def test_boundarydpt_alone_cannot_reach_a_deep_cut(model):
    with pytest.raises(PlanError, match="boundarydpt\\+"):
        compress(model, CompressSpec(method="boundarydpt", target_flops=0.1, calib_batches=1, batch_size=2))


def test_boundarydpt_plus_plans_depth_and_width_jointly(model):
    result = compress(model, CompressSpec(method="boundarydpt+", target_flops=0.4, depth_share=0.5,
                                          calib_batches=1, batch_size=2))
    joint = result.report["stages"]["joint"]
    assert len(joint["attention"]) <= 2 and len(joint["activation"]) <= 2  # the cap: half of 4 blocks
    assert joint["attention"] or joint["activation"]
    assert joint["planned_flops_ratio"] == pytest.approx(result.report["flops_ratio"])
    assert abs(result.report["flops_ratio"] - 0.4) <= 0.01


def test_boundarydpt_plus_paper_removes_its_share_then_prunes_width(model):
    """The paper's BoundaryDPT+: 5/12 of each kind's layers (of 4 blocks: 2, a tie going to the
    fewer), then width pruning lands the target; without data the layers are chosen one-shot, and no
    step is trained."""
    result = compress(model, CompressSpec(method="boundarydpt+paper", target_flops=0.4, calib_batches=1,
                                          batch_size=2))
    depth, width = result.report["stages"]["depth"], result.report["stages"]["width"]
    assert len(depth["attention"]) == len(depth["activation"]) == 2 and depth["share"] == pytest.approx(5 / 12)
    assert depth["selection"] == "one_shot" and width["within_tolerance"]
    assert abs(result.report["flops_ratio"] - 0.4) <= 0.01 and result.report["train_steps"] == {}
    one = compress(model, CompressSpec(method="boundarydpt+paper", target_flops=0.4, depth_share=0.25,
                                       calib_batches=1, batch_size=2))
    assert len(one.report["stages"]["depth"]["attention"]) == 1


def test_boundarydpt_plus_paper_searches_with_data_and_counts_its_steps(model):
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(3)]
    result = compress(model, CompressSpec(method="boundarydpt+paper", target_flops=0.4, depth_selection="search",
                                          search_steps=3, calib_batches=1, batch_size=4),
                      calib_data=data[:1], train_data=data)
    depth = result.report["stages"]["depth"]
    assert depth["selection"] == "search" and len(depth["attention"]) == 2
    steps = result.report["train_steps"]
    # stage 1: 4 attention layers × 6 + 4 activations × 1 (a unit = 3/3 steps); windows 3, 5, 7, 9, 11
    assert steps == {"candidates": 28, "search": 35} == depth["steps"]
    assert abs(result.report["flops_ratio"] - 0.4) <= 0.01


def test_cpvit_meets_the_target_with_heads():
    model = randomize(tiny("deit_small_patch16_224", depth=4, img_size=96, num_classes=10))  # 36 patches
    result = compress(model, CompressSpec(method="cpvit", target_flops=0.7, prune_heads_cpvit=0.5,
                                          calib_batches=1, batch_size=2))
    tokens = result.report["stages"]["tokens"]
    assert all(k == 3 for k in result.report["stages"]["heads"]["heads_kept"].values())
    assert abs(result.report["flops_ratio"] - 0.7) <= 0.01
    keep = tokens["keep"]
    assert keep == sorted(keep, reverse=True) and keep[-1] < keep[0]


def test_everything_composes_replays_and_exports(model, tmp_path):
    spec = CompressSpec(target_flops=0.6, remove_attention=[1], remove_activation=[2], tokens="keep=0.5,start=2")
    result = compress(model, spec, source=SOURCE)
    assert [r["pass"] for r in result.recipe] == ["attention", "activation", "width", "tokens"]
    paths = write_outputs(result, str(tmp_path / "m"))
    report = json.loads((tmp_path / "m.json").read_text())
    assert max(report["onnx"]["parity_max_abs_err"].values()) <= 1e-4
    ops = onnx_op_counts(paths["onnx"])
    assert ops.get("Erf", 0) + ops.get("Gelu", 0) == 3  # one of four activations gone
    assert ops.get("TopK", 0) >= 1  # the token cut (and the sort of the kept indices)
    reloaded = load_compressed(paths["pt2"])
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(reloaded(x), result.model(x), atol=1e-6, rtol=0)


def test_cli_compress_with_data_finetunes(tmp_path, capsys):
    from vitprune.train.digits import export_image_folder

    export_image_folder(tmp_path / "digits", image_size=32)
    for split, keep in (("train", 12), ("val", 4)):  # a small folder keeps the test quick
        for cls in (tmp_path / "digits" / split).iterdir():
            for extra in sorted(cls.iterdir())[keep:]:
                extra.unlink()
    rc = main(["compress", "timm:deit_tiny_patch16_224", "--img-size", "32", "--num-classes", "10",
               "--method", "boundarydpt+", "--target-flops", "0.5", "--data", str(tmp_path / "digits"),
               "--epochs", "1", "--batch-size", "32", "--calib-batches", "1", "--no-export",
               "--out", str(tmp_path / "out" / "m")])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "m.json").read_text())
    assert len(report["recovery"]["epochs"]) == 1
    assert 0.0 <= report["recovery"]["epochs"][0]["top1"] <= 100.0
    assert abs(report["flops_ratio"] - 0.5) <= 0.01
