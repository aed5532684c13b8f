"""Every bad input: exit 2, one line ``vitprune: error: ...`` naming the problem, nothing on stdout, and
the folder exactly as it was (no new, changed or temporary files; old outputs untouched).

One table, run in-process through ``cli.main``. Each case names the argv (``{ckpt}``-style fields
are files made by ``_make_files``), the words its message must contain and, where it matters, what
the case was before (``was``): exit 1 with a traceback, or silently ignored with exit 0. Tiny models
(``timm:test_vit`` at 32 px) and checks that run before loading keep the whole table fast.
"""
from __future__ import annotations

import hashlib
import os
import struct
import zipfile

import numpy as np
import onnx
import pytest
import timm
import torch
from onnx import TensorProto, helper, numpy_helper

from vitprune import cli
from vitprune.errors import InputError

TINY = ["timm:test_vit", "--img-size", "32"]
COMPRESS = ["compress", *TINY, "--target-flops", "0.5", "--out", "out/m"]


@pytest.fixture(scope="module")
def state_dict():
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, img_size=32).state_dict()


def _make_files(root, sd) -> None:
    """Inputs for the table, and an output folder holding an earlier run's files."""
    (root / "out").mkdir()
    for ext in ("onnx", "pt2", "json"):
        (root / "out" / f"m.{ext}").write_text(f"old {ext}")
    (root / "out" / "pdir.pt2").mkdir()
    (root / "out" / "odir.onnx").mkdir()
    (root / "data").mkdir()
    (root / "a_file.pth").write_bytes(b"x")
    (root / "empty.pth").write_bytes(b"")
    torch.save(sd, root / "good.pth")
    _flip_a_weight_byte(root / "good.pth", root / "crc.pth")
    for name, value in (("nan.pth", float("nan")), ("inf.pth", float("inf"))):
        bad = {k: v.clone() for k, v in sd.items()}
        bad["blocks.0.mlp.fc1.weight"][3, 5] = value
        torch.save(bad, root / name)
    torch.save(timm.create_model("test_vit", pretrained=False, img_size=32), root / "whole.pt")
    specs = {
        "dup.json": '{"target_flops": 0.5, "round_to": 8, "target_flops": 0.3}',
        "dup.yaml": "target_flops: 0.5\ntarget_flops: 0.3\n",
        "unknown.yaml": "target_flop: 0.5\n",
        "list.yaml": "- target_flops\n",
        "broken.yaml": "round_to: [\n",
        "spec.txt": "target_flops: 0.5\n",
        "chans.json": '{"input_size": [1, 32, 32]}',
        "size32.json": '{"input_size": [3, 32, 32]}',
    }
    for name, text in specs.items():
        (root / name).write_text(text)
    _onnx_failing_at_run_time(root / "bad_run.onnx")
    (root / "not.onnx").write_bytes(b"not onnx at all")


def _flip_a_weight_byte(src, dst) -> None:
    """A copy of a torch.save zip with one byte of its largest tensor changed (CRC-32 now fails)."""
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x40
    dst.write_bytes(bytes(data))


def _onnx_failing_at_run_time(path) -> None:
    """Loads fine, fails when run: a Reshape of (batch, 3, 4, 4) to (5,)."""
    shape = numpy_helper.from_array(np.array([5], dtype=np.int64), "shape")
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5])], initializer=[shape])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def snapshot(root) -> dict:
    """Every entry under ``root``: folders by name, files by size, mode, mtime and content."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(d, name), root)] = "dir"
        for name in files:
            p = os.path.join(d, name)
            st = os.stat(p)
            with open(p, "rb") as f:
                digest = hashlib.sha1(f.read()).hexdigest()
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mode, st.st_mtime_ns, digest)
    return out


# (id, argv, words the one-line message must contain, what it was before this table existed)
CASES = [
    # -- the spec, checked before loading
    ("target_zero", [*COMPRESS, "--target-flops", "0"], ["target_flops", "(0, 1]"], None),
    ("target_above_one", [*COMPRESS, "--target-flops", "1.5"], ["target_flops"], None),
    ("min_keep_zero", [*COMPRESS, "--min-keep", "0"], ["min_keep"], None),
    ("round_to_zero", [*COMPRESS, "--round-to", "0"], ["round_to", ">= 1"], None),
    ("seed_overflow_taylor", [*COMPRESS, "--seed", "99999999999999999999999", "--importance", "taylor"],
     ["seed", "2**64"], "exit 1 (overflow)"),
    ("seed_negative", [*COMPRESS, "--seed", "-1"], ["seed"], None),
    ("epochs_without_data", [*COMPRESS, "--epochs", "5"], ["epochs=5", "--data"], "ignored, exit 0"),
    ("search_without_data", [*COMPRESS, "--method", "boundarydpt", "--depth-selection", "search"],
     ["search", "--data"], "replaced by one_shot, exit 0"),
    ("tokens_repeated_part", [*COMPRESS, "--tokens", "keep=0.5,start=4,start=6"], ["start is given twice"],
     "last wins, exit 0"),
    ("tokens_no_start", [*COMPRESS, "--tokens", "keep=0.5"], ["keep= and start="], None),
    ("tokens_keep_range", [*COMPRESS, "--tokens", "keep=2,start=1"], ["keep", "(0, 1]"], None),
    ("tokens_unknown_part", [*COMPRESS, "--tokens", "kep=0.5,start=1"], ["cannot read 'kep=0.5'"], None),
    ("tokens_start_not_int", [*COMPRESS, "--tokens", "keep=0.5,start=x"], ["start must be an integer"], None),
    ("spec_duplicate_json", [*COMPRESS, "--spec", "dup.json"], ["dup.json", "'target_flops' is given twice"],
     "last wins, exit 0"),
    ("spec_duplicate_yaml", [*COMPRESS, "--spec", "dup.yaml"], ["dup.yaml", "lines 1 and 2"], "last wins, exit 0"),
    ("spec_unknown_key", [*COMPRESS, "--spec", "unknown.yaml"], ["target_flop", "valid keys"], None),
    ("spec_not_mapping", [*COMPRESS, "--spec", "list.yaml"], ["mapping"], None),
    ("spec_broken_yaml", [*COMPRESS, "--spec", "broken.yaml"], ["not valid YAML"], None),
    ("spec_missing", [*COMPRESS, "--spec", "nope.json"], ["cannot read spec file"], None),
    ("spec_extension", [*COMPRESS, "--spec", "spec.txt"], [".json, .yaml or .yml"], None),
    ("two_targets", [*COMPRESS, "--target-latency", "0.5"], ["not both"], None),
    ("latency_with_epochs", ["compress", *TINY, "--target-latency", "0.5", "--epochs", "2", "--data", "data",
                             "--out", "out/m"], ["target_latency does not train"], "epochs ignored, exit 0"),
    ("opset_unsupported", [*COMPRESS, "--opset", "999"], ["--opset 999 is not supported"], "exit 2 after all the work"),
    ("opset_with_no_export", [*COMPRESS, "--opset", "17", "--no-export"], ["--no-export"], "ignored"),
    ("prune_heads_without_cpvit", [*COMPRESS, "--prune-heads", "0.5"], ["--prune-heads", "--method cpvit"], "ignored"),
    ("depth_share_without_dpt", [*COMPRESS, "--depth-share", "0.3"], ["--depth-share", "boundarydpt+"], "ignored"),
    ("search_steps_without_search", [*COMPRESS, "--search-steps", "5"], ["--search-steps"], "ignored"),
    ("latency_threads_without_target", [*COMPRESS, "--latency-threads", "2"], ["--target-latency"], "ignored"),
    ("lr_without_training", [*COMPRESS, "--lr", "0.1"], ["--lr", "--epochs"], "ignored"),
    ("merge_without_depth", [*COMPRESS, "--merge", "never"], ["--merge"], "ignored"),
    ("data_missing", [*COMPRESS, "--importance", "taylor", "--data", "nowhere"], ["--data", "not a directory"], None),
    # -- the output location, checked before loading
    ("out_in_proc", ["compress", *TINY, "--out", "/proc/x"], ["cannot create files in /proc"], "exit 1 after the work"),
    ("out_under_a_file", ["compress", *TINY, "--out", "a_file.pth/x"], ["a_file.pth is a file, not a folder"],
     "exit 1 after the work"),
    ("out_is_a_folder", ["compress", *TINY, "--out", "out"], ["file prefix"], None),
    ("out_pt2_is_a_folder", ["compress", *TINY, "--out", "out/pdir"], ["out/pdir.pt2 is a folder"],
     "exit 1 after the work, .onnx replaced"),
    ("stale_onnx_is_a_folder", ["compress", *TINY, "--no-export", "--out", "out/odir"], ["out/odir.onnx is a folder"],
     None),
    # -- the model and its weights
    ("img_size_below_patch", ["compress", "timm:test_vit", "--img-size", "8", "--out", "out/m"],
     ["patch is 16 px", "3x8x8"], "torch.export's assertion"),
    ("img_size_not_multiple", ["inspect", "timm:test_vit", "--img-size", "40"], ["patch is 16 px", "not a multiple"],
     None),
    ("spec_input_channels", ["compress", "timm:test_vit", "--spec", "chans.json", "--out", "out/m"],
     ["expects 3 input channels", "has 1"], "a conv error from torch"),
    ("model_missing", ["compress", "nope.pth", "--arch", "test_vit", "--out", "out/m"], ["does not exist"], None),
    ("checkpoint_empty", ["compress", "empty.pth", "--arch", "test_vit", "--out", "out/m"],
     ["not a PyTorch checkpoint"], None),
    ("checkpoint_crc", ["compress", "crc.pth", "--arch", "test_vit", "--img-size", "32", "--out", "out/m"],
     ["crc.pth", "CRC-32"], "loaded silently, exit 0"),
    ("weights_nan", ["compress", "nan.pth", "--arch", "test_vit", "--img-size", "32", "--no-export", "--out", "out/m"],
     ["blocks.0.mlp.fc1.weight", "1 NaN"], "exit 0 with --no-export"),
    ("weights_inf", ["inspect", "inf.pth", "--arch", "test_vit", "--img-size", "32"],
     ["blocks.0.mlp.fc1.weight", "1 infinite"], None),
    ("unknown_arch", ["compress", "timm:deit_tinyy", "--out", "out/m"], ["deit_tinyy", "did you mean"], None),
    ("state_dict_without_arch", ["compress", "good.pth", "--out", "out/m"], ["--arch"], None),
    ("pickle_without_trust", ["compress", "whole.pt", "--out", "out/m"], ["--trust-pickle"], None),
    ("not_a_vit", ["compress", "timm:resnet18", "--spec", "size32.json", "--no-export", "--out", "out/m"],
     ["no attention"], None),
    ("target_below_floors", [*COMPRESS, "--target-flops", "0.01", "--min-keep", "0.5", "--no-export"], ["floors"],
     None),
    # -- export and bench
    ("export_opset", ["export", *TINY, "--opset", "999", "--out", "out/e.onnx"], ["is not supported"],
     "exit 2 after the work, tracebacks logged"),
    ("export_suffix", ["export", *TINY, "--out", "out/e.pt"], [".onnx"], None),
    ("export_unwritable", ["export", *TINY, "--out", "/proc/e.onnx"], ["cannot create files in /proc"], None),
    ("export_patch", ["export", "timm:test_vit", "--img-size", "8", "--out", "out/e.onnx"], ["patch is 16 px"], None),
    ("bench_folder", ["bench", "data"], ["data is a folder"], "called it 'does not exist'"),
    ("bench_missing", ["bench", "nope.onnx"], ["does not exist"], None),
    ("bench_not_onnx", ["bench", "not.onnx", "--runs", "1"], ["not an ONNX model"], None),
    ("bench_fails_at_run_time", ["bench", "bad_run.onnx", "--runs", "1", "--warmup", "0"],
     ["cannot run this model at batch 1"], "exit 1"),
    ("bench_batch_zero", ["bench", "bad_run.onnx", "--batch", "0"], ["--batch"], None),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, state_dict):
    root = tmp_path_factory.mktemp("bad_inputs")
    _make_files(root, state_dict)
    return root


def test_enough_cases():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("argv,needles", [pytest.param(c[1], c[2], id=c[0]) for c in CASES])
def test_bad_input(workdir, monkeypatch, capsys, argv, needles):
    monkeypatch.chdir(workdir)
    before = snapshot(workdir)
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vitprune: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert out == ""
    assert snapshot(workdir) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    monkeypatch.chdir(tmp_path)
    try:
        rc = cli.main(["compress", *TINY, "--out", "ro/m"])
    finally:
        folder.chmod(0o755)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "cannot create files in" in err
    assert os.listdir(folder) == []


# ------------------------------------------------------------------------------------------ the input-size check
class _HeadFirst(torch.nn.Module):
    """Registers a 1x1 "head" convolution before the stem; the forward reaches the stem first."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Conv2d(8, 4, 1)
        self.stem = torch.nn.Conv2d(1, 8, 4, stride=4)

    def forward(self, x):
        return self.head(self.stem(x))


def test_first_conv_is_the_one_the_forward_reaches():
    from vitprune.frontend.inputs import check_input_size, first_conv

    model = _HeadFirst()
    model.pretrained_cfg = {"input_size": (1, 16, 16)}  # its own size, where the probe forward runs
    assert first_conv(model)[0] == "stem"
    check_input_size(model, (1, 32, 32))
    with pytest.raises(InputError, match=r"expects 1 input channels \(its first convolution, stem"):
        check_input_size(model, (3, 32, 32))
    with pytest.raises(InputError, match="patch is 4 px .* 1x30x30 is not a multiple of it.* e.g. 28"):
        check_input_size(model, (1, 30, 30))


def test_input_size_check_on_a_torchvision_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    from vitprune.frontend.inputs import check_input_size

    model = VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64)
    check_input_size(model, (3, 32, 32))
    with pytest.raises(InputError, match=r"patch is 8 px \(conv_proj\).*3x36x36 is not a multiple"):
        check_input_size(model, (3, 36, 36))
