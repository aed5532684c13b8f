"""Model loading: timm names, checkpoints (+ arch), wrapped/DDP state dicts, class-count inference,
untrusted and trusted pickles, compressed models, and the input-size rules. Tiny models only."""
import argparse
import os
import sys
import types

import pytest
import timm
import torch
from torch import nn

from vitprune.errors import InputError, LoadError
from vitprune.load import LoadedModel, input_size_of, load_model

ARCH = "test_vit"  # timm's own tiny ViT (0.4M params)


def _model(**kw):
    torch.manual_seed(0)
    return timm.create_model(ARCH, pretrained=False, **kw).eval()


def _same_outputs(a, b, size=(2, 3, 160, 160)):
    x = torch.randn(*size)
    with torch.no_grad():
        return torch.equal(a(x), b.eval()(x))


@pytest.fixture(scope="module")
def ref_model():
    return _model()


# ------------------------------------------------------------------------------------------ timm:
def test_timm_ref():
    lm = load_model(f"timm:{ARCH}")
    assert isinstance(lm, LoadedModel) and not lm.model.training
    assert lm.source == {"kind": "timm", "arch": ARCH, "kwargs": {}}
    assert lm.input_size == (3, 160, 160)


def test_timm_kwargs():
    lm = load_model("timm:deit_tiny_patch16_224", img_size=32, num_classes=7)
    assert lm.source == {"kind": "timm", "arch": "deit_tiny_patch16_224",
                         "kwargs": {"img_size": 32, "num_classes": 7}}
    assert lm.input_size == (3, 32, 32)
    assert lm.model(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_unknown_arch_suggests_close_names():
    with pytest.raises(LoadError) as e:
        load_model("timm:deit_tinyy")
    assert "deit_tinyy" in str(e.value) and "deit_tiny_patch16_224" in str(e.value)


def test_kwargs_the_model_does_not_take():
    with pytest.raises(LoadError, match="img_size"):
        load_model("timm:test_resnet", img_size=64)


@pytest.mark.parametrize("kw", [{"img_size": 0}, {"img_size": -3}, {"num_classes": -1}])
def test_bad_sizes(kw):
    with pytest.raises(InputError):
        load_model(f"timm:{ARCH}", **kw)


# ------------------------------------------------------------------------------------------ state dicts
@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"model": sd},
        lambda sd: {"state_dict": sd, "epoch": 3, "optimizer": {"lr": torch.tensor(0.1)}},
        lambda sd: {"state_dict_ema": sd, "arch": "test_vit"},
        lambda sd: {"module." + k: v for k, v in sd.items()},  # DDP
        lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}},
    ],
    ids=["plain", "model", "state_dict", "state_dict_ema", "ddp", "ddp_in_state_dict"],
)
def test_state_dict_round_trip(tmp_path, ref_model, wrap):
    p = tmp_path / "ckpt.pth"
    torch.save(wrap(ref_model.state_dict()), p)
    lm = load_model(str(p), arch=ARCH)
    assert lm.source == {"kind": "timm", "arch": ARCH, "kwargs": {}}
    assert lm.input_size == (3, 160, 160) and not lm.model.training
    assert _same_outputs(ref_model, lm.model)


def test_arch_may_carry_timm_prefix(tmp_path, ref_model):
    p = tmp_path / "ckpt.pth"
    torch.save(ref_model.state_dict(), p)
    assert load_model(str(p), arch=f"timm:{ARCH}").source["arch"] == ARCH


def test_state_dict_needs_arch(tmp_path, ref_model):
    p = tmp_path / "ckpt.pth"
    torch.save({"model": ref_model.state_dict()}, p)
    with pytest.raises(LoadError, match="holds a state dict; pass --arch"):
        load_model(str(p))


def test_num_classes_inferred(tmp_path):
    m = _model(num_classes=10)
    p = tmp_path / "c10.pth"
    torch.save(m.state_dict(), p)
    lm = load_model(str(p), arch=ARCH)
    assert lm.source["kwargs"] == {"num_classes": 10}
    assert lm.model.get_classifier().out_features == 10
    assert _same_outputs(m, lm.model)


def test_headless_checkpoint_gives_num_classes_0(tmp_path):
    m = _model(num_classes=0)
    p = tmp_path / "c0.pth"
    torch.save(m.state_dict(), p)
    lm = load_model(str(p), arch=ARCH)
    assert lm.source["kwargs"] == {"num_classes": 0}
    assert _same_outputs(m, lm.model)


def test_explicit_num_classes_is_not_overridden(tmp_path):
    p = tmp_path / "c10.pth"
    torch.save(_model(num_classes=10).state_dict(), p)
    with pytest.raises(LoadError, match="head.weight"):
        load_model(str(p), arch=ARCH, num_classes=5)


def test_distilled_num_classes_inferred(tmp_path):
    """get_classifier() returns (head, head_dist) here: both must be accepted as the classifier."""
    full = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, num_classes=10)
    p = tmp_path / "d.pth"
    torch.save(full.state_dict(), p)
    lm = load_model(str(p), arch="deit_tiny_distilled_patch16_224", img_size=32)
    assert lm.source["kwargs"] == {"img_size": 32, "num_classes": 10}
    assert _same_outputs(full.eval(), lm.model, size=(1, 3, 32, 32))


def test_img_size(tmp_path):
    m = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=10).eval()
    p = tmp_path / "s32.pth"
    torch.save(m.state_dict(), p)
    with pytest.raises(LoadError) as e:  # without --img-size the pos_embed does not fit
        load_model(str(p), arch="deit_tiny_patch16_224")
    assert "pos_embed" in str(e.value) and "--img-size" in str(e.value)
    lm = load_model(str(p), arch="deit_tiny_patch16_224", img_size=32)
    assert lm.input_size == (3, 32, 32)
    assert lm.source["kwargs"] == {"img_size": 32, "num_classes": 10}
    assert _same_outputs(m, lm.model, size=(2, 3, 32, 32))


def test_wrong_arch_lists_mismatches(tmp_path, ref_model):
    p = tmp_path / "ckpt.pth"
    torch.save(ref_model.state_dict(), p)
    with pytest.raises(LoadError) as e:
        load_model(str(p), arch="deit_tiny_patch16_224")
    msg = str(e.value)
    assert "does not fit timm deit_tiny_patch16_224" in msg and "more" in msg and "--arch" in msg


def test_dict_without_state_dict(tmp_path):
    p = tmp_path / "odd.pth"
    torch.save({"epoch": 3, "weights": {"a": 1}}, p)
    with pytest.raises(LoadError, match="'epoch'"):
        load_model(str(p), arch=ARCH)


def test_tensor_file(tmp_path):
    p = tmp_path / "t.pt"
    torch.save(torch.zeros(3), p)
    with pytest.raises(LoadError, match="Tensor"):
        load_model(str(p), arch=ARCH)


# ------------------------------------------------------------------------------------------ bad files
def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_model(str(tmp_path / "nope.pth"), arch=ARCH)
    with pytest.raises(InputError, match="timm:<name>"):
        load_model("deit_tiny_patch16_224")
    with pytest.raises(InputError, match="directory"):
        load_model(str(tmp_path))


def test_empty_file(tmp_path):
    p = tmp_path / "empty.pth"
    p.write_bytes(b"")
    with pytest.raises(LoadError, match="is not a PyTorch checkpoint"):
        load_model(str(p), arch=ARCH)


@pytest.mark.parametrize("content", [os.urandom(4096), b"hello world\n", b"PK\x03\x04" + os.urandom(500)],
                         ids=["random", "text", "broken_zip"])
def test_corrupt_file(tmp_path, content):
    p = tmp_path / "bad.pth"
    p.write_bytes(content)
    with pytest.raises(LoadError, match="is not a PyTorch checkpoint"):
        load_model(str(p), arch=ARCH)


def test_truncated_checkpoint(tmp_path, ref_model):
    p = tmp_path / "t.pth"
    torch.save(ref_model.state_dict(), p)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(LoadError, match="is not a PyTorch checkpoint"):
        load_model(str(p), arch=ARCH)


# ------------------------------------------------------------------------------------------ pickles
@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_pickled_module_needs_trust(tmp_path, ref_model, zipfile):
    p = tmp_path / "whole.pt"
    torch.save(ref_model, p, _use_new_zipfile_serialization=zipfile)
    with pytest.raises(LoadError) as e:
        load_model(str(p))
    msg = str(e.value)
    assert "--trust-pickle" in msg and "arbitrary code" in msg and "\n" not in msg
    lm = load_model(str(p), trust_pickle=True)
    assert lm.source is None and lm.input_size == (3, 160, 160) and not lm.model.training
    assert _same_outputs(ref_model, lm.model)


def test_trusted_pickle_that_is_not_a_module(tmp_path):
    p = tmp_path / "ns.pt"
    torch.save(argparse.Namespace(a=1), p)
    with pytest.raises(LoadError, match="--trust-pickle"):
        load_model(str(p))
    with pytest.raises(LoadError, match="Namespace"):
        load_model(str(p), trust_pickle=True)


def test_trusted_checkpoint_with_pickled_extras(tmp_path, ref_model):
    """timm's train.py saves args as a Namespace beside the state dict."""
    p = tmp_path / "train.pth"
    torch.save({"state_dict": ref_model.state_dict(), "args": argparse.Namespace(lr=0.1)}, p)
    with pytest.raises(LoadError, match="argparse.Namespace"):
        load_model(str(p), arch=ARCH)
    assert _same_outputs(ref_model, load_model(str(p), arch=ARCH, trust_pickle=True).model)


# ------------------------------------------------------------------------------------------ compressed
def test_compressed_file_goes_through_api(tmp_path, monkeypatch):
    seen = {}
    net = nn.Linear(4, 2)

    def load_compressed_dict(obj):
        seen["obj"] = obj
        return net

    fake = types.ModuleType("vitprune.api")
    fake.load_compressed_dict = load_compressed_dict
    monkeypatch.setitem(sys.modules, "vitprune.api", fake)
    import vitprune

    monkeypatch.setattr(vitprune, "api", fake, raising=False)
    src = {"kind": "timm", "arch": ARCH, "kwargs": {}}
    p = tmp_path / "m.pt"
    torch.save({"format": "vitprune-compressed", "source": src, "input_size": [3, 48, 48],
                "weights": {"w": torch.zeros(2)}}, p)
    lm = load_model(str(p))
    assert lm.model is net and lm.source == src and lm.input_size == (3, 48, 48)
    assert seen["obj"]["format"] == "vitprune-compressed"
    assert load_model(str(p), img_size=40).input_size == (3, 40, 40)


# ------------------------------------------------------------------------------------------ input size
def test_input_size_rules():
    m = _model()
    assert input_size_of(m) == (3, 160, 160)  # patch_embed
    assert input_size_of(m, img_size=64) == (3, 64, 64)  # explicit wins
    m.patch_embed.img_size = None  # dynamic-size models: fall back to pretrained_cfg
    m.pretrained_cfg = {"input_size": (3, 96, 96)}
    assert input_size_of(m) == (3, 96, 96)
    lin = nn.Linear(3, 3)
    with pytest.raises(LoadError, match="--img-size"):
        input_size_of(lin)
    assert input_size_of(lin, img_size=16) == (3, 16, 16)
