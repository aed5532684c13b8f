"""HetDPT checkpoint compatibility: a random-weight state dict in the key layout of HetDPT's released
hetdpt/models_pruned.py (and merge_mlp.py), checked against a plain-torch transcription of their
forward; the extra GELU as an option; capture and compression; refusals naming the key."""
import argparse

import pytest
import timm
import torch
import torch.nn.functional as F

from vitprune.api import compress
from vitprune.errors import InputError, LoadError
from vitprune.frontend.capture import capture, example_input_for
from vitprune.frontend.hetdpt import HetDPTOptions, HetDPTViT, load_hetdpt, parse_layers
from vitprune.frontend.load import load_model
from vitprune.spec import CompressSpec

from conftest import assert_bad_input, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

DEPTH, DIM, HEADS, HIDDEN, CLASSES, PATCH, IMG = 4, 64, 4, 256, 10, 16, 32
ATTN = (0, 2)  # block 0: attention only; block 1: activation only; block 2: both; block 3: neither
ACT = (1, 2)


def hetdpt_state_dict(attn=ATTN, act=ACT, *, merged=False, distilled=True, seed=0) -> dict:
    """Their DistilledVisionTransformer's keys, block by block as their Block / Block_attn /
    Block_act_compensation / Block_no_act_no_attn declare them; merged MLPs as merge_mlp_model leaves them."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2, base=0.0):
        return base + scale * torch.randn(*shape, generator=g)

    tokens = 2 if distilled else 1
    sd = {"cls_token": r(1, 1, DIM), "pos_embed": r(1, (IMG // PATCH) ** 2 + tokens, DIM),
          "patch_embed.proj.weight": r(DIM, 3, PATCH, PATCH, scale=0.05), "patch_embed.proj.bias": r(DIM)}
    if distilled:
        sd["dist_token"] = r(1, 1, DIM)
    for i in range(DEPTH):
        p = f"blocks.{i}."
        for n in ("norm1", "norm2"):
            sd[p + n + ".weight"], sd[p + n + ".bias"] = r(DIM, base=1.0), r(DIM)
        if i not in attn:
            sd.update({p + "attn.qkv.weight": r(3 * DIM, DIM), p + "attn.qkv.bias": r(3 * DIM),
                       p + "attn.proj.weight": r(DIM, DIM), p + "attn.proj.bias": r(DIM)})
        if merged and i in act:
            sd.update({p + "mlp.weight": r(DIM, DIM), p + "mlp.bias": r(DIM)})
        else:
            sd.update({p + "mlp.fc1.weight": r(HIDDEN, DIM), p + "mlp.fc1.bias": r(HIDDEN),
                       p + "mlp.fc2.weight": r(DIM, HIDDEN, scale=0.1), p + "mlp.fc2.bias": r(DIM)})
    sd.update({"norm.weight": r(DIM, base=1.0), "norm.bias": r(DIM), "head.weight": r(CLASSES, DIM),
               "head.bias": r(CLASSES)})
    if distilled:
        sd.update({"head_dist.weight": r(CLASSES, DIM), "head_dist.bias": r(CLASSES)})
    return sd


def reference(sd: dict, x: torch.Tensor, attn=ATTN, act=ACT, *, gelu_after_both=True) -> torch.Tensor:
    """HetDPT's eval-mode forward, transcribed from models_pruned.py in plain torch."""
    ln = lambda t, n: F.layer_norm(t, (DIM,), sd[n + ".weight"], sd[n + ".bias"], eps=1e-6)  # noqa: E731
    lin = lambda t, n: F.linear(t, sd[n + ".weight"], sd[n + ".bias"])  # noqa: E731
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    b, n = x.shape[0], x.shape[1]
    extra = [sd["cls_token"].expand(b, -1, -1)] + ([sd["dist_token"].expand(b, -1, -1)] if "dist_token" in sd else [])
    x = torch.cat(extra + [x], dim=1) + sd["pos_embed"]
    n = x.shape[1]
    for i in range(DEPTH):
        p = f"blocks.{i}."
        if i in attn:  # Block_attn / Block_no_act_no_attn: x + norm1(x)
            x = x + ln(x, p + "norm1")
        else:  # Attention.forward
            qkv = lin(ln(x, p + "norm1"), p + "attn.qkv").reshape(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
            a = ((qkv[0] @ qkv[1].transpose(-2, -1)) * (DIM // HEADS) ** -0.5).softmax(dim=-1)
            x = x + lin((a @ qkv[2]).transpose(1, 2).reshape(b, n, DIM), p + "attn.proj")
        h = ln(x, p + "norm2")
        if p + "mlp.weight" in sd:  # merge_mlp_model's single Linear
            h = lin(h, p + "mlp")
        else:  # Mlp (with GELU) or MLP_no_act
            h = lin(h, p + "mlp.fc1")
            h = lin(h if i in act else F.gelu(h), p + "mlp.fc2")
        x = x + h
        if gelu_after_both and i in attn and i in act:  # Block_no_act_no_attn's self.act
            x = F.gelu(x)
    x = ln(x, "norm")
    if "head_dist.weight" in sd:  # DistilledVisionTransformer in eval mode
        return (lin(x[:, 0], "head") + lin(x[:, 1], "head_dist")) / 2
    return lin(x[:, 0], "head")


def _images(seed=1, batch=3):
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def _load(sd, **kw) -> HetDPTViT:
    kw = {"removed_activation": ACT, "num_heads": HEADS, **kw}
    return load_hetdpt(sd, **kw)


# ------------------------------------------------------------------------------------------ (a) their forward
@pytest.mark.parametrize("merged", [False, True], ids=["train_stage2_layout", "merged_layout"])
@pytest.mark.parametrize("distilled", [True, False], ids=["distilled", "plain"])
@pytest.mark.parametrize("merge_mlp", [True, False], ids=["merge", "keep_fc1_fc2"])
def test_forward_is_hetdpt_forward_with_extra_gelu(merged, distilled, merge_mlp):
    sd = hetdpt_state_dict(merged=merged, distilled=distilled)
    model = _load(sd, extra_gelu=True, merge_mlp=merge_mlp)
    x = _images()
    with torch.no_grad():
        got, want = model(x), reference(sd, x)
    assert got.shape == (3, CLASSES)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_module_keeps_their_parameter_names():
    sd = hetdpt_state_dict()
    model = _load(sd, merge_mlp=False)
    assert set(model.state_dict()) == set(sd)
    assert model.blocks[0].attn is None and model.blocks[2].attn is None and model.blocks[1].attn is not None
    merged = _load(sd)  # activation-free fc2∘fc1 folded as their evaluate.py does (merge_mlp_model)
    assert {k for k in merged.state_dict() if ".mlp." in k and ".fc" not in k} == {
        f"blocks.{i}.mlp.{w}" for i in ACT for w in ("weight", "bias")}


def test_unpruned_deit_checkpoint_is_the_timm_deit():
    """No block pruned: the function is plain DeiT (timm's classes share the key names)."""
    torch.manual_seed(0)
    deit = timm.create_model("deit_tiny_distilled_patch16_224", img_size=IMG, depth=2).eval()
    model = load_hetdpt(deit.state_dict(), removed_activation="[]", extra_gelu=True)
    x = _images()
    with torch.no_grad():
        assert torch.equal(model(x), deit(x))


# ------------------------------------------------------------------------------------------ (b) the GELU option
def test_default_differs_only_by_the_gelu_after_fully_removed_blocks():
    sd = hetdpt_state_dict()
    theirs, ours = _load(sd, extra_gelu=True), _load(sd)
    assert [b.out_gelu for b in theirs.blocks] == [False, False, True, False]
    assert not any(b.out_gelu for b in ours.blocks)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(sd, x, gelu_after_both=False), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(ours(x), theirs(x), atol=1e-3)
        tokens = torch.randn(3, 6, DIM, generator=torch.Generator().manual_seed(2))
        for i, (a, b) in enumerate(zip(theirs.blocks, ours.blocks)):
            want = F.gelu(b(tokens)) if i == 2 else b(tokens)
            assert torch.equal(a(tokens), want), f"block {i}"


def test_without_a_fully_removed_block_the_option_changes_nothing():
    attn, act = (0, 2), (1, 3)
    sd = hetdpt_state_dict(attn, act)
    x = _images()
    with torch.no_grad():
        a = load_hetdpt(sd, removed_activation=act, num_heads=HEADS, extra_gelu=True)(x)
        b = load_hetdpt(sd, removed_activation=act, num_heads=HEADS)(x)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, reference(sd, x, attn, act), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ (c) capture, compress
@pytest.mark.parametrize("extra_gelu", [True, False])
def test_captures_and_compresses(extra_gelu):
    model = _load(hetdpt_state_dict(), extra_gelu=extra_gelu)
    x = _images(batch=2)
    gm = capture(model, example_input_for((3, IMG, IMG)))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), atol=1e-6, rtol=1e-6)
    result = compress(model, CompressSpec(target_flops=0.8), example_input_size=(3, IMG, IMG))
    assert result.model(x).shape == (2, CLASSES)
    assert 0.5 < result.report["flops_ratio"] <= 0.8 + 0.01  # round_to=16 steps are coarse at dim 64
    assert result.report["params_after"] < result.report["params_before"]


# ------------------------------------------------------------------------------------------ load_model, files
def test_load_model_reads_a_checkpoint_file(tmp_path):
    sd = hetdpt_state_dict()
    path = tmp_path / "hetdpt_base.pth"
    torch.save({"model": sd, "model_ema": sd, "epoch": 3}, path)
    opts = HetDPTOptions(removed_activation="[1,2]", extra_gelu=True, num_heads=HEADS)
    lm = load_model(str(path), arch="hetdpt", hetdpt_options=opts)
    assert lm.input_size == (3, IMG, IMG)
    assert lm.source == {"kind": "hetdpt", "arch": "", "kwargs": {
        "removed_attention": [0, 2], "removed_activation": [1, 2], "extra_gelu": True, "merge_mlp": True,
        "num_heads": HEADS}}
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(lm.model(x), reference(sd, x), atol=1e-5, rtol=1e-5)


def test_merged_checkpoint_needs_no_lists(tmp_path):
    sd = hetdpt_state_dict(merged=True)
    path = tmp_path / "merged.pth"
    torch.save(sd, path)
    lm = load_model(str(path), arch="hetdpt", hetdpt_options=HetDPTOptions(num_heads=HEADS, extra_gelu=True))
    assert lm.source["kwargs"]["removed_activation"] == [1, 2]
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(lm.model(x), reference(sd, x), atol=1e-5, rtol=1e-5)


def test_lists_pickled_in_args_are_read_with_trust(tmp_path):
    """Their training scripts save {'model', ..., 'args': Namespace(prune_layer_act='[1,2]', ...)}."""
    sd = hetdpt_state_dict()
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": sd, "args": argparse.Namespace(prune_layer_attn="[0,2]", prune_layer_act="[1,2]")}, path)
    opts = HetDPTOptions(num_heads=HEADS, extra_gelu=True)
    with pytest.raises(LoadError, match="Namespace"):
        load_model(str(path), arch="hetdpt", hetdpt_options=opts)
    lm = load_model(str(path), arch="hetdpt", hetdpt_options=opts, trust_pickle=True)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(lm.model(x), reference(sd, x), atol=1e-5, rtol=1e-5)
    clash = HetDPTOptions(num_heads=HEADS, removed_activation="1")
    with pytest.raises(LoadError, match="--prune-layer-act 1 differs"):
        load_model(str(path), arch="hetdpt", hetdpt_options=clash, trust_pickle=True)


def test_named_arch_gives_heads_and_checks_the_dim(tmp_path):
    path = tmp_path / "ck.pth"
    torch.save(hetdpt_state_dict(), path)
    with pytest.raises(LoadError, match="embed dim 64 .* not deit_base's 768"):
        load_model(str(path), arch="hetdpt:deit_base", hetdpt_options=HetDPTOptions(removed_activation=ACT))
    with pytest.raises(InputError, match="unknown HetDPT architecture 'deit_huge'"):
        load_model(str(path), arch="hetdpt:deit_huge", hetdpt_options=HetDPTOptions(removed_activation=ACT))


def test_size_flags_may_only_restate_the_checkpoint(tmp_path):
    path = tmp_path / "ck.pth"
    torch.save(hetdpt_state_dict(), path)
    opts = HetDPTOptions(removed_activation=ACT, num_heads=HEADS)
    assert load_model(str(path), arch="hetdpt", hetdpt_options=opts, img_size=IMG, num_classes=CLASSES)
    with pytest.raises(LoadError, match="32x32 inputs"):
        load_model(str(path), arch="hetdpt", hetdpt_options=opts, img_size=64)
    with pytest.raises(LoadError, match="10 classes"):
        load_model(str(path), arch="hetdpt", hetdpt_options=opts, num_classes=5)


def test_options_need_the_hetdpt_arch(tmp_path):
    with pytest.raises(InputError, match="--arch hetdpt"):
        load_model("timm:test_vit", hetdpt_options=HetDPTOptions(extra_gelu=True))


# ------------------------------------------------------------------------------------------ (d) refusals
def _drop(key):
    return lambda sd: {k: v for k, v in sd.items() if k != key}


def _add(key, value):
    return lambda sd: {**sd, key: value}


@pytest.mark.parametrize("mutate, needle", [
    (_drop("pos_embed"), "missing key pos_embed"),
    (_drop("blocks.1.norm2.weight"), "missing key blocks.1.norm2.weight"),
    (_drop("blocks.3.attn.proj.bias"), "missing key blocks.3.attn.proj.bias"),
    (_drop("head_dist.bias"), "missing key head_dist.bias"),
    (_add("blocks.3.attn.q_norm.weight", torch.ones(16)), "unexpected key blocks.3.attn.q_norm.weight"),
    (_add("blocks.0.ls1.gamma", torch.ones(DIM)), "unexpected key blocks.0.ls1.gamma"),
    (_add("reg_token", torch.ones(1, 4, DIM)), "unexpected key reg_token"),
    (_add("blocks.3.mlp.fc2.weight", torch.ones(DIM, 8)), "blocks.3.mlp.fc2.weight is \\[64, 8\\]"),
    (lambda sd: {k.replace("mlp.fc", "mlp.lin"): v for k, v in sd.items()}, "missing key blocks.0.mlp.fc1.weight"),
], ids=["pos_embed", "norm2", "proj_bias", "head_dist", "q_norm", "layer_scale", "reg_token", "shape", "renamed"])
def test_wrong_layout_names_the_key(mutate, needle):
    with pytest.raises(LoadError, match=needle):
        _load(mutate(hetdpt_state_dict()))


def test_removal_lists_must_agree_with_the_keys():
    sd = hetdpt_state_dict()
    with pytest.raises(LoadError, match="unexpected key blocks.3.attn.qkv.weight: --prune-layer-attn lists block 3"):
        _load(sd, removed_attention=(0, 2, 3))
    with pytest.raises(LoadError, match="missing key blocks.2.attn.qkv.weight \\(block 2 is not in"):
        _load(sd, removed_attention=(0,))
    with pytest.raises(LoadError, match="has 4 blocks \\(0-3\\), but --prune-layer-act lists block 7"):
        _load(sd, removed_activation=(1, 7))
    with pytest.raises(LoadError, match="unexpected key blocks.1.mlp.weight"):
        _load(hetdpt_state_dict(merged=True), removed_activation=(2,))


def test_unmerged_checkpoint_without_the_activation_list_is_refused():
    with pytest.raises(LoadError, match="pass --prune-layer-act"):
        load_hetdpt(hetdpt_state_dict(), num_heads=HEADS)


def test_heads_must_divide_the_dim():
    with pytest.raises(LoadError, match="cannot split embed dim 64"):
        _load(hetdpt_state_dict(), num_heads=5)


@pytest.mark.parametrize("text, want", [("[0,3,7,8,11]", (0, 3, 7, 8, 11)), ("11, 2", (2, 11)), ("", ()),
                                        ("[]", ()), ([4, 1], (1, 4)), (None, None)])
def test_parse_layers(text, want):
    assert parse_layers(text, "--prune-layer-act") == want


@pytest.mark.parametrize("bad", ["[0,a]", "1;2", [1, 1], [-1], "__import__('os')"])
def test_parse_layers_refuses(bad):
    with pytest.raises(InputError, match="--prune-layer-attn"):
        parse_layers(bad, "--prune-layer-attn")


# ------------------------------------------------------------------------------------------ the CLI
def test_cli_compresses_and_exports_a_merged_checkpoint(tmp_path, capsys):
    """A merged checkpoint says everything itself (heads: dim // 64 = 1 here): no HetDPT flags needed."""
    path = tmp_path / "hetdpt.pth"
    torch.save({"model": hetdpt_state_dict(merged=True)}, path)
    rc, _, err = run_cli(capsys, "compress", path, "--arch", "hetdpt", "--target-flops", "0.8",
                         "--out", tmp_path / "small")
    assert rc == 0, err
    assert {p.name for p in tmp_path.iterdir()} >= {"small.onnx", "small.pt2", "small.json"}


def test_cli_unmerged_checkpoint_without_the_list_is_bad_input(tmp_path, capsys):
    path = tmp_path / "hetdpt.pth"
    torch.save({"model": hetdpt_state_dict()}, path)
    rc, _, err = run_cli(capsys, "inspect", path, "--arch", "hetdpt")
    assert_bad_input(rc, err, "--prune-layer-act", "HetDPT")
