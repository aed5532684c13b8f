"""Model loading: timm names, checkpoints (+ arch), wrapped/DDP state dicts, class-count inference,
untrusted and trusted pickles, compressed models, and the input-size rules. Tiny models only."""
import argparse
import os
import sys

import pytest
import timm
import torch
from torch import nn

from vitprune.errors import InputError, LoadError
from vitprune.frontend.load import LoadedModel, check_weights, input_size_of, load_model

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


# ------------------------------------------------------------------------------------------ seeds
def test_random_weights_follow_the_seed():
    state = torch.get_rng_state()
    a = load_model(f"timm:{ARCH}").model.state_dict()
    b = load_model(f"timm:{ARCH}", seed=0).model.state_dict()
    c = load_model(f"timm:{ARCH}", seed=1).model.state_dict()
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("seed", [-1, 1.5, True, 2**64])
def test_bad_seed(seed):
    with pytest.raises(InputError, match="--seed"):
        load_model(f"timm:{ARCH}", seed=seed)


# ------------------------------------------------------------------------------------------ torchvision
TV_VIT = "vit_b_32"  # the smallest torchvision ViT builder (its depth and width are fixed)


@pytest.fixture(scope="module")
def tv_vit():
    return load_model(f"torchvision:{TV_VIT}", img_size=32, num_classes=10)


def test_torchvision_ref(tv_vit):
    assert tv_vit.source == {"kind": "torchvision", "arch": TV_VIT, "kwargs": {"image_size": 32, "num_classes": 10}}
    assert tv_vit.input_size == (3, 32, 32) and not tv_vit.model.training
    assert tv_vit.model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_torchvision_cnn_takes_img_size_as_input_size_only():
    lm = load_model("torchvision:resnet18", img_size=64, num_classes=3)
    assert lm.source == {"kind": "torchvision", "arch": "resnet18", "kwargs": {"num_classes": 3}}
    assert lm.input_size == (3, 64, 64)
    with pytest.raises(LoadError, match="--img-size"):  # a CNN states no input size
        load_model("torchvision:resnet18")


def test_torchvision_seed():
    a, b = (load_model("torchvision:resnet18", img_size=32, seed=5).model.state_dict() for _ in range(2))
    c = load_model("torchvision:resnet18", img_size=32, seed=6).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("ref, needle", [
    ("torchvision:vit_b_17", "vit_b_16"),
    ("torchvision:resnt50", "resnet50"),
    ("torchvision:", "list_models"),
    ("torchvision:fasterrcnn_resnet50_fpn", "not an image classifier"),
])
def test_torchvision_unknown_name(ref, needle):
    with pytest.raises(LoadError) as e:
        load_model(ref)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_torchvision_bad_image_size():
    with pytest.raises(LoadError, match="image_size=30"):
        load_model(f"torchvision:{TV_VIT}", img_size=30)  # not a multiple of the patch size


def test_torchvision_state_dict_with_inferred_classes(tmp_path, tv_vit):
    """The ViT classifier is heads.head (no get_classifier()): found as the last Linear with 1000 outputs."""
    p = tmp_path / "tv.pth"
    torch.save({"model": tv_vit.model.state_dict()}, p)
    lm = load_model(str(p), arch=f"torchvision:{TV_VIT}", img_size=32)
    assert lm.source == tv_vit.source
    assert _same_outputs(tv_vit.model, lm.model, size=(2, 3, 32, 32))
    with pytest.raises(LoadError) as e:  # without --img-size the position embedding does not fit
        load_model(str(p), arch=f"torchvision:{TV_VIT}")
    assert "does not fit torchvision vit_b_32" in str(e.value) and "encoder.pos_embedding" in str(e.value)


def test_torchvision_cnn_state_dict(tmp_path):
    torch.manual_seed(0)
    import torchvision

    m = torchvision.models.resnet18(num_classes=7).eval()
    p = tmp_path / "r.pth"
    torch.save(m.state_dict(), p)
    lm = load_model(str(p), arch="torchvision:resnet18", img_size=32)
    assert lm.source["kwargs"] == {"num_classes": 7}
    assert _same_outputs(m, lm.model, size=(2, 3, 32, 32))
    assert load_model(str(p), arch="resnet18").source["kind"] == "timm"  # a bare --arch is a timm name


# ------------------------------------------------------------------------------------------ Hugging Face
transformers = pytest.importorskip("transformers")

_HF_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
HF_MODELS = {
    "ViTForImageClassification": lambda: transformers.ViTConfig(intermediate_size=64, num_labels=5, **_HF_SMALL),
    "DeiTForImageClassificationWithTeacher": lambda: transformers.DeiTConfig(intermediate_size=64, num_labels=5,
                                                                              **_HF_SMALL),
    "BeitForImageClassification": lambda: transformers.BeitConfig(intermediate_size=64, num_labels=5, **_HF_SMALL),
    "Dinov2Model": lambda: transformers.Dinov2Config(mlp_ratio=2, **_HF_SMALL),
    "Dinov2WithRegistersModel": lambda: transformers.Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=4,
                                                                                **_HF_SMALL),
    "CLIPVisionModel": lambda: transformers.CLIPVisionConfig(intermediate_size=64, **_HF_SMALL),
}


def _hf_model(cls_name, config=None):
    torch.manual_seed(0)
    return getattr(transformers, cls_name)(config or HF_MODELS[cls_name]()).eval()


def _hf_same(a, b, size=(2, 3, 32, 32)):
    x = torch.randn(*size)
    with torch.no_grad():
        return torch.equal(a(pixel_values=x)[0], b(pixel_values=x)[0])


@pytest.mark.parametrize("cls_name", sorted(HF_MODELS))
def test_hf_dir_round_trip(tmp_path, cls_name):
    m = _hf_model(cls_name)
    m.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path))
    assert type(lm.model) is type(m) and not lm.model.training
    assert lm.source == {"kind": "hf", "path": str(tmp_path), "class": cls_name, "kwargs": {}}
    assert lm.input_size == (3, 32, 32)
    assert _hf_same(m, lm.model)


def test_hf_sharded_and_bin_weights(tmp_path):
    m = _hf_model("ViTForImageClassification")
    m.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert _hf_same(m, load_model(str(tmp_path / "sharded")).model)
    m.config.save_pretrained(tmp_path / "bin")
    torch.save(m.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    assert _hf_same(m, load_model(str(tmp_path / "bin")).model)
    (tmp_path / "sharded" / "model.safetensors.index.json").unlink()  # shards without their index
    with pytest.raises(LoadError, match="model-00001-of"):
        load_model(str(tmp_path / "sharded"))


def test_hf_config_only_gives_seeded_random_weights(tmp_path):
    HF_MODELS["ViTForImageClassification"]().save_pretrained(tmp_path)
    state = torch.get_rng_state()
    a, b = (load_model(str(tmp_path), seed=3).model.state_dict() for _ in range(2))
    c = load_model(str(tmp_path), seed=4).model.state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)
    lm = load_model(str(tmp_path), img_size=48, num_classes=7)
    assert lm.input_size == (3, 48, 48)
    assert lm.source["kwargs"] == {"image_size": 48, "num_labels": 7}
    assert lm.model(pixel_values=torch.randn(1, 3, 48, 48)).logits.shape == (1, 7)


def test_hf_overrides_that_do_not_fit_the_weights(tmp_path):
    _hf_model("ViTForImageClassification").save_pretrained(tmp_path)
    with pytest.raises(LoadError) as e:
        load_model(str(tmp_path), num_classes=3)
    assert "classifier.weight is [5, 32] in the file, [3, 32] in the model" in str(e.value)
    with pytest.raises(LoadError, match="position_embeddings"):
        load_model(str(tmp_path), img_size=48)


def test_hf_num_classes_needs_a_classifier(tmp_path):
    _hf_model("Dinov2Model").save_pretrained(tmp_path)
    with pytest.raises(LoadError, match="Dinov2Model has no classifier"):
        load_model(str(tmp_path), num_classes=3)


def test_hf_weights_of_another_class(tmp_path):
    """config.json says ViTModel but the weights are a classifier's: missing weights are an error, not random."""
    m = _hf_model("ViTForImageClassification")
    m.save_pretrained(tmp_path)
    cfg = (tmp_path / "config.json").read_text().replace('"ViTForImageClassification"', '"ViTModel"')
    (tmp_path / "config.json").write_text(cfg)
    with pytest.raises(LoadError, match="does not fit ViTModel: missing"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("config, needle", [
    ('{"model_type": "nosuchmodel", "architectures": ["NoSuchModel"]}', "nosuchmodel"),
    ('{"model_type": "vit", "architectures": ["ViTForImageClassificatoin"]}', "ViTForImageClassification"),
    ('{"architectures": ["ViTModel"]}', "model_type"),
    ("{not json", "config.json"),
])
def test_hf_unknown_architecture(tmp_path, config, needle):
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(LoadError) as e:
        load_model(str(tmp_path))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(LoadError, match="is a directory but has no config.json; a Hugging Face model directory"):
        load_model(str(tmp_path))


def test_hf_without_transformers(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text('{"model_type": "vit"}')
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    with pytest.raises(LoadError, match=r"pip install 'vitprune\[hf\]'"):
        load_model(str(tmp_path))


# ------------------------------------------------------------------------------------------ .pt2
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10).eval()
    ep = torch.export.export(m, (torch.randn(2, 3, 32, 32),), strict=False,
                             dynamic_shapes=({0: torch.export.Dim("batch")},))
    p = tmp_path_factory.mktemp("pt2") / "vit.pt2"
    torch.export.save(ep, p)
    return m, p


def _same_exported(m, loaded, batch):
    """An exported module has no eval(); it keeps the mode it was exported in."""
    x = torch.randn(batch, 3, 32, 32)
    with torch.no_grad():
        return torch.equal(m(x), loaded(x))


def test_pt2_round_trip(exported):
    m, p = exported
    lm = load_model(str(p), trust_pickle=True)
    assert lm.source == {"kind": "pt2", "path": str(p)} and lm.input_size == (3, 32, 32)
    for batch in (1, 3):
        assert _same_exported(m, lm.model, batch)
    assert load_model(str(p), trust_pickle=True, img_size=32, num_classes=10).input_size == (3, 32, 32)


def test_pt2_by_content(tmp_path, exported, capfd):
    m, p = exported
    q = tmp_path / "vit.bin"
    q.write_bytes(p.read_bytes())
    assert _same_exported(m, load_model(str(q), trust_pickle=True).model, 2)
    assert "Unable to load package" not in capfd.readouterr().err


def test_pt2_needs_trust(exported):
    with pytest.raises(LoadError) as e:
        load_model(str(exported[1]))
    assert "--trust-pickle" in str(e.value) and "\n" not in str(e.value)


def test_pt2_code_does_not_run_untrusted(tmp_path, exported, monkeypatch):
    """The exported module execs the guard expressions stored in the archive: a crafted one is code."""
    import json
    import zipfile

    monkeypatch.delenv("VITPRUNE_PT2_RAN", raising=False)
    bad = tmp_path / "crafted.pt2"
    with zipfile.ZipFile(exported[1]) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("models/model.json"):
                d = json.loads(data)
                d["guards_code"] = ["__import__('os').environ.setdefault('VITPRUNE_PT2_RAN', '1') == '1'"]
                data = json.dumps(d).encode()
            dst.writestr(info, data)
    with pytest.raises(LoadError, match="--trust-pickle"):
        load_model(str(bad))
    assert "VITPRUNE_PT2_RAN" not in os.environ
    lm = load_model(str(bad), trust_pickle=True)
    lm.model(torch.randn(2, 3, 32, 32))  # vitprune drops the input guards (the capture derives its own) ...
    assert "VITPRUNE_PT2_RAN" not in os.environ
    with open(bad, "rb") as f:  # ... but plain torch runs them: the code in the file is why trust is asked for
        torch.export.load(f).module()(torch.randn(2, 3, 32, 32))
    assert os.environ.get("VITPRUNE_PT2_RAN") == "1"


def test_pt2_fixed_sizes(exported):
    with pytest.raises(LoadError, match="exported for 32x32 inputs"):
        load_model(str(exported[1]), trust_pickle=True, img_size=64)
    with pytest.raises(LoadError, match="exported with 10 classes"):
        load_model(str(exported[1]), trust_pickle=True, num_classes=5)


@pytest.mark.parametrize("trust", [False, True])
@pytest.mark.parametrize("make", [
    lambda p: torch.save({"w": torch.zeros(3)}, p),
    lambda p: p.write_bytes(os.urandom(4096)),
    lambda p: p.write_bytes(b""),
], ids=["state_dict", "random", "empty"])
def test_pt2_that_is_not_an_exported_program(tmp_path, make, trust):
    p = tmp_path / "x.pt2"
    make(p)
    with pytest.raises(LoadError) as e:
        load_model(str(p), arch=ARCH, trust_pickle=trust)
    assert ("not a torch.export" in str(e.value)) and "\n" not in str(e.value)


def test_pt2_damaged_inside(tmp_path, exported, capfd):
    """A pt2 archive whose graph is garbage: one LoadError line, no traceback logged by torch."""
    import zipfile

    bad = tmp_path / "bad.pt2"
    with zipfile.ZipFile(exported[1]) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = b"{garbage" if info.filename.endswith("models/model.json") else src.read(info.filename)
            dst.writestr(info, data)
    with pytest.raises(LoadError, match="not a loadable torch.export archive") as e:
        load_model(str(bad), trust_pickle=True)
    assert "\n" not in str(e.value) and "Traceback" not in capfd.readouterr().err


# ------------------------------------------------------------------------------------------ damaged weights
def _flip_byte_of_largest_member(path):
    """Change one byte inside the largest zip member's data: the archive still opens, its CRC fails."""
    import struct
    import zipfile

    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0x40
    path.write_bytes(bytes(data))
    return info.filename


def test_checkpoint_with_a_bad_crc_is_refused(tmp_path, ref_model):
    """torch.load reads the damaged tensor without complaint; the CRC check refuses the file."""
    p = tmp_path / "w.pth"
    torch.save(ref_model.state_dict(), p)
    member = _flip_byte_of_largest_member(p)
    torch.load(p, weights_only=True)  # what vitprune must not rely on
    with pytest.raises(LoadError, match="CRC-32") as e:
        load_model(str(p), arch=ARCH)
    assert member in str(e.value) and "\n" not in str(e.value)


def test_pt2_with_a_bad_crc_is_refused(tmp_path, exported):
    p = tmp_path / "bad.pt2"
    p.write_bytes(exported[1].read_bytes())
    _flip_byte_of_largest_member(p)
    with pytest.raises(LoadError, match="damaged torch.export .pt2 archive"):
        load_model(str(p), trust_pickle=True)


@pytest.mark.parametrize("value,kind", [(float("nan"), "1 NaN and 0 infinite"), (float("-inf"), "0 NaN and 1 infinite")])
def test_non_finite_weights_are_refused(tmp_path, ref_model, value, kind):
    sd = {k: v.clone() for k, v in ref_model.state_dict().items()}
    sd["blocks.0.attn.proj.weight"][1, 2] = value
    sd["blocks.1.mlp.fc2.weight"][0, 0] = value  # later in the model: the first one is named
    p = tmp_path / "w.pth"
    torch.save(sd, p)
    with pytest.raises(LoadError, match=f"blocks.0.attn.proj.weight .* has {kind}"):
        load_model(str(p), arch=ARCH)


def test_check_weights_allows_a_minus_inf_mask_buffer():
    m = nn.Linear(2, 2)
    m.register_buffer("mask", torch.tensor([0.0, float("-inf")]))
    check_weights(m)
    m.mask[0] = float("nan")
    with pytest.raises(LoadError, match="buffer mask"):
        check_weights(m)
