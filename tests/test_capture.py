"""One IR: torch.export capture (ATen ops, dynamic batch, first output tensor, no eval dropout), the
`.pt2` round trip through the CLI (compress a compressed model again, export it), and the bad inputs of
the new frontends (one line, exit 2, no file left behind)."""
import json
import os

import pytest
import torch
from torch import nn

from conftest import assert_bad_input, files_under, run_cli as run, tiny
from vitprune.frontend.capture import capture, example_input_for
from vitprune.errors import UnsupportedModelError

aten = torch.ops.aten


class TupleOut(nn.Module):
    """Returns (logits, features) like many research ViTs."""

    def __init__(self):
        super().__init__()
        self.vit = tiny("deit_tiny_patch16_224", num_classes=7)

    def forward(self, x):
        feats = self.vit.forward_features(x)
        return self.vit.forward_head(feats), feats


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 3)

    def forward(self, x):
        if x.sum() > 0:  # control flow on data: torch.export cannot capture this
            return self.proj(x.mean((2, 3)))
        return x.mean((2, 3))


def test_capture_gives_one_aten_graph_with_a_dynamic_batch():
    model = tiny("deit_tiny_patch16_224", drop_rate=0.1)
    gm = capture(model, example_input_for((3, 32, 32)))
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert aten.linear.default in targets and aten.scaled_dot_product_attention.default in targets
    assert all(isinstance(t, torch._ops.OpOverload) or t.__module__ == "_operator" for t in targets)
    assert aten.dropout.default not in targets  # eval-mode dropout is the identity
    assert not any(n.op == "call_module" for n in gm.graph.nodes)
    assert not gm.training
    for batch in (1, 3, 5):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), model.eval()(x), atol=1e-6, rtol=0)


def test_capture_returns_the_first_output_tensor_and_leaves_the_model_alone():
    model = TupleOut().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = capture(model, example_input_for((3, 32, 32)))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x)[0], atol=1e-6, rtol=0)
    with torch.no_grad():
        next(gm.parameters()).mul_(0)  # the graph owns its parameters
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_uncapturable_model_is_refused_naming_the_source_line():
    with pytest.raises(UnsupportedModelError, match=r"torch.export cannot capture DataDependent.*"
                                                    r"test_capture.py:\d+: `if x.sum\(\) > 0:"):
        capture(DataDependent(), example_input_for((3, 8, 8)))


def test_compressed_pt2_compresses_again_and_exports(tmp_path, capsys):
    rc, out, err = run(capsys, "compress", "timm:deit_tiny_patch16_224", "--img-size", "32",
                       "--target-flops", "0.7", "--no-export", "--out", tmp_path / "a")
    assert rc == 0, err
    assert files_under(tmp_path) == ["a.json", "a.pt2"]
    rc, _, err = run(capsys, "compress", tmp_path / "a.pt2", "--target-flops", "0.7", "--out",
                     tmp_path / "b")
    assert_bad_input(rc, err, "--trust-pickle")  # torch.export.load can run code from the file
    rc, out, err = run(capsys, "compress", tmp_path / "a.pt2", "--trust-pickle", "--target-flops", "0.7",
                       "--no-export", "--out", tmp_path / "b")
    assert rc == 0, err
    first = torch.export.load(str(tmp_path / "a.pt2")).module()
    second = torch.export.load(str(tmp_path / "b.pt2")).module()
    n_first = sum(p.numel() for p in first.parameters())
    assert sum(p.numel() for p in second.parameters()) < 0.8 * n_first
    rc, out, err = run(capsys, "export", tmp_path / "b.pt2", "--trust-pickle", "--out", tmp_path / "b.onnx")
    assert rc == 0, err
    assert os.path.getsize(tmp_path / "b.onnx") > 0


def test_random_weight_models_are_seeded(tmp_path, capsys):
    sizes = []
    for name in ("a", "b"):
        rc, out, err = run(capsys, "compress", "timm:deit_tiny_patch16_224", "--img-size", "32",
                           "--target-flops", "0.5", "--no-export", "--out", tmp_path / name)
        assert rc == 0, err
        sizes.append(json.loads((tmp_path / f"{name}.json").read_text())["params_after"])
    assert sizes[0] == sizes[1]


def _empty_dir(p):
    (p / "hf").mkdir()
    return p / "hf"


def _junk_pt2(p):
    (p / "x.pt2").write_bytes(b"not an archive")
    return p / "x.pt2"


@pytest.mark.parametrize("make, needles", [
    (_empty_dir, ["config.json"]),
    (_junk_pt2, ["x.pt2"]),
    (lambda p: "torchvision:vit_b_99", ["vit_b_99"]),
])
def test_bad_frontend_inputs_exit_2_and_write_nothing(tmp_path, capsys, make, needles):
    model = make(tmp_path)
    out = tmp_path / "out"
    before = files_under(tmp_path)
    rc, _, err = run(capsys, "compress", model, "--trust-pickle", "--target-flops", "0.5", "--out", out / "m")
    assert_bad_input(rc, err, *needles)
    assert files_under(tmp_path) == before and not out.exists()


def test_uncapturable_model_exits_2(tmp_path, capsys):
    path = tmp_path / "whole.pt"
    torch.save(DataDependent(), path)
    rc, _, err = run(capsys, "compress", path, "--trust-pickle", "--img-size", "8", "--out", tmp_path / "o" / "m")
    assert_bad_input(rc, err, "torch.export cannot capture", "if x.sum() > 0:")
    assert files_under(tmp_path) == ["whole.pt"]
