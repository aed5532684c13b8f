"""Token merging (ToMe): the rewritten graph against an eager reference written from the paper, on
timm, Hugging Face and torchvision ViTs; r=0 is the identity; static shapes, exact FLOPs, ONNX with ORT
parity, .pt2, refusals with reasons, the spec forms, --method tome and composition."""
import copy
import math

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
import transformers
from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

from conftest import randomize, tiny, traced
import json

from vitprune.api import compress, write_outputs
from vitprune.deploy.pt2 import load_compressed
from vitprune.spec import CompressSpec
from passes import PASSES, PassError
from passes.merging import MERGE_KEY, MergeRefused, TokenMerging
from vitprune.deps.flops import count_flops
from vitprune.errors import PlanError, SpecError
from vitprune.plan.budget import Budget
from vitprune.plan.merging import MergeFlops, parse_merge, tome_plan
from vitprune.frontend.capture import capture

pytestmark = pytest.mark.usefixtures("one_thread")
ATOL = 1e-5
SIZE = 32  # 32×32 images, patch 4: 64 patch tokens


# -- the eager reference, written from the paper's description ------------------------------------------
def reference_merge(x, k, r, prefix, size):
    """One ToMe merge, the slow obvious way (a Python loop per image): ``x`` (B, N, C) the stream after
    the attention branch, ``k`` (B, H, N, D) the keys, ``size`` (B, N, 1) or None. Returns (x, size)."""
    b, n, _ = x.shape
    size = torch.ones(b, n, 1) if size is None else size
    r = min(r, (n - prefix) // 2)
    if r == 0:
        return x, size
    metric = k.mean(1)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a_pos = [i for i in range(prefix, n) if i % 2 == 0]  # sets alternate over the whole sequence
    b_pos = [i for i in range(prefix, n) if i % 2 == 1]
    xs, sizes = [], []
    for i in range(b):
        sim = metric[i, a_pos] @ metric[i, b_pos].T
        best, partner = sim.max(-1)
        order = best.argsort(descending=True).tolist()
        merged, kept = order[:r], (sorted(order[r:]) if prefix else order[r:])
        total = (x[i] * size[i])[b_pos].clone()
        weight = size[i][b_pos].clone()
        for j in merged:  # A token j joins its most similar B token: sizes add, features average
            total[partner[j]] += x[i, a_pos[j]] * size[i, a_pos[j]]
            weight[partner[j]] += size[i, a_pos[j]]
        front = [x[i, :prefix] * size[i, :prefix], (x[i] * size[i])[[a_pos[j] for j in kept]], total]
        fsize = [size[i, :prefix], size[i][[a_pos[j] for j in kept]], weight]
        xs.append(torch.cat(front) / torch.cat(fsize))
        sizes.append(torch.cat(fsize))
    return torch.stack(xs), torch.stack(sizes)


def proportional_attention(q, k, v, scale, size):
    logits = (q @ k.transpose(-2, -1)) * scale
    if size is not None:  # a token standing for s patches counts s times
        logits = logits + size.log()[:, None, None, :, 0]
    return logits.softmax(-1) @ v


def run_blocks(x, blocks, r, prefix):
    """``blocks``: (norm1, qkv(h) -> q, k, v as (B, H, N, D), attention output -> stream update,
    norm2, mlp) per block; the merge sits between the attention branch and the MLP."""
    size = None
    for (norm1, qkv, out, norm2, mlp), rl in zip(blocks, r):
        q, k, v = qkv(norm1(x))
        o = proportional_attention(q, k, v, q.shape[-1] ** -0.5, size)
        x = x + out(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))
        if rl:
            x, size = reference_merge(x, k, rl, prefix, size)
        x = x + mlp(norm2(x))
    return x


def heads(t, h):
    return t.reshape(t.shape[0], t.shape[1], h, -1).transpose(1, 2)


def timm_reference(m, x, r):
    tokens = m.norm_pre(m._pos_embed(m.patch_embed(x)))
    blocks = []
    for blk in m.blocks:
        a = blk.attn

        def qkv(h, a=a):
            q, k, v = heads(a.qkv(h), 3 * a.num_heads).chunk(3, dim=1)
            return a.q_norm(q), a.k_norm(k), v
        blocks.append((blk.norm1, qkv, lambda o, a=a, blk=blk: blk.ls1(a.proj(a.norm(o))), blk.norm2,
                       lambda h, blk=blk: blk.ls2(blk.mlp(h))))
    return m.forward_head(m.norm(run_blocks(tokens, blocks, r, m.num_prefix_tokens)))


def hf_reference(m, x, r):
    body = m.vit if hasattr(m, "vit") else m.deit
    blocks = []
    for layer in body.layers:
        a = layer.attention
        h_ = a.num_attention_heads
        blocks.append((layer.layernorm_before,
                       lambda h, a=a, h_=h_: (heads(a.q_proj(h), h_), heads(a.k_proj(h), h_), heads(a.v_proj(h), h_)),
                       a.o_proj, layer.layernorm_after, layer.mlp))
    prefix = 2 if hasattr(m, "deit") else 1
    seq = body.layernorm(run_blocks(body.embeddings(x), blocks, r, prefix))
    if hasattr(m, "deit"):
        return (m.cls_classifier(seq[:, 0]) + m.distillation_classifier(seq[:, 1])) / 2
    return m.classifier(seq[:, 0])


def torchvision_reference(m, x, r):
    tokens = m._process_input(x)
    tokens = torch.cat([m.class_token.expand(x.shape[0], -1, -1), tokens], dim=1) + m.encoder.pos_embedding
    blocks = []
    for layer in m.encoder.layers:
        att = layer.self_attention
        h_ = att.num_heads

        def qkv(h, att=att, h_=h_):
            return tuple(heads(t, h_) for t in F.linear(h, att.in_proj_weight, att.in_proj_bias).chunk(3, -1))
        blocks.append((layer.ln_1, qkv, att.out_proj, layer.ln_2, layer.mlp))
    return m.heads(m.encoder.ln(run_blocks(tokens, blocks, r, 1))[:, 0])


# -- models from three libraries --------------------------------------------------------------------------
def sharpen(linears):
    """Sharper keys than the random init's: similarities far apart, so no near-tie flips a match."""
    with torch.no_grad():
        for lin in linears:
            lin.weight.mul_(3.0)


def timm_model(arch="deit_tiny_patch16_224", fused=True, depth=4, **kw):
    m = randomize(tiny(arch, fused=fused, depth=depth, img_size=SIZE, patch_size=4, **kw))
    sharpen([b.attn.qkv for b in m.blocks])
    return m


def hf_model(cls="ViTForImageClassification", config="ViTConfig", attn="sdpa"):
    torch.manual_seed(0)
    cfg = getattr(transformers, config)(hidden_size=48, num_hidden_layers=4, num_attention_heads=3,
                                        intermediate_size=96, image_size=SIZE, patch_size=4, num_labels=10)
    m = getattr(transformers, cls)._from_config(cfg, attn_implementation=attn).eval()
    sharpen([layer.attention.k_proj for layer in (m.vit if hasattr(m, "vit") else m.deit).layers])
    return m


def torchvision_model():
    torch.manual_seed(0)
    m = TorchvisionViT(image_size=SIZE, patch_size=4, num_layers=4, num_heads=3, hidden_dim=48, mlp_dim=96,
                       num_classes=10).eval()
    with torch.no_grad():
        for layer in m.encoder.layers:
            layer.self_attention.in_proj_weight.mul_(3.0)
        m.heads.head.weight.normal_(std=0.05)  # torchvision initialises the head to zeros
    return m


ARCHS = {  # name: (builder, eager reference, prefix tokens)
    "timm_deit_sdpa": (lambda: timm_model(), timm_reference, 1),
    "timm_deit_matmul": (lambda: timm_model(fused=False), timm_reference, 1),
    "timm_deit_distilled": (lambda: timm_model("deit_small_distilled_patch16_224"), timm_reference, 2),
    "timm_deit3_layerscale": (lambda: timm_model("deit3_small_patch16_224"), timm_reference, 1),
    "timm_reg4": (lambda: timm_model("vit_small_patch14_reg4_dinov2", num_classes=10), timm_reference, 5),
    "timm_gap": (lambda: timm_model("vit_medium_patch16_gap_256"), timm_reference, 0),
    "hf_vit_sdpa": (lambda: hf_model(), hf_reference, 1),
    "hf_vit_eager": (lambda: hf_model(attn="eager"), hf_reference, 1),
    "hf_deit_teacher": (lambda: hf_model("DeiTForImageClassificationWithTeacher", "DeiTConfig"), hf_reference, 2),
    "torchvision_vit": (torchvision_model, torchvision_reference, 1),
}


def images(batch=3, seed=1):
    return torch.randn((batch, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(seed))


def logits(y):
    return y.logits if hasattr(y, "logits") else y


def merged(gm, r):
    return TokenMerging(r)(copy.deepcopy(gm))


# -- exactness ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ARCHS))
def test_graph_equals_the_eager_reference(name):
    build, reference, prefix = ARCHS[name]
    model = build()
    gm = capture(model, images(2))
    x = images(3)
    with torch.no_grad():
        assert torch.allclose(logits(reference(model, x, [0] * 4)), logits(model(x)), atol=ATOL, rtol=0)
        for r in ([8, 8, 8, 8], [0, 13, 5, 30]):  # 30 is capped at (tokens - prefix) // 2
            result = merged(gm, r)
            want = logits(reference(model, x, r))
            got = result.graph_module(x)
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
            assert (got - logits(model(x))).abs().max() > 1e-3  # merging really changed the function
    counts = [n.meta["tensor_meta"].shape[1] for n in result.graph_module.graph.nodes
              if n.meta.get(MERGE_KEY, ("",))[0] == "merged"]
    n0 = 64 + prefix
    assert counts == [n0 - 13, n0 - 18, n0 - 18 - (n0 - 18 - prefix) // 2]


@pytest.mark.parametrize("name", ["timm_deit_sdpa", "hf_vit_eager", "torchvision_vit"])
def test_r_zero_is_the_identity(name):
    model = ARCHS[name][0]()
    gm = capture(model, images(2))
    result = TokenMerging([0, 0, 0, 0])(gm)
    assert not result.modified and result.graph_module is gm


def test_prefix_tokens_pass_through_and_never_merge():
    model = ARCHS["timm_reg4"][0]()
    gm = traced(model)
    out = merged(gm, [16, 16, 16, 16]).graph_module
    env = {}

    class Run(torch.fx.Interpreter):
        def run_node(self, n):
            env[n] = super().run_node(n)
            return env[n]

    Run(out).run(images(2))
    for n in out.graph.nodes:
        if n.meta.get(MERGE_KEY, ("",))[0] == "size":
            assert torch.equal(env[n][:, :5], torch.ones(2, 5, 1))  # registers and class token: size 1
            assert env[n][:, 5:].sum(1).eq(64).all()  # every patch is counted exactly once


# -- static shapes, FLOPs, export ------------------------------------------------------------------------
def test_sequence_length_baked_into_reshapes_is_rewritten():
    model = ARCHS["timm_deit_sdpa"][0]()
    gm = traced(model)
    lengths = [n.args[1][1] for n in gm.graph.nodes if n.target is torch.ops.aten.reshape.default
               and isinstance(n.args[1], (list, tuple)) and len(n.args[1]) == 5]
    assert lengths == [65] * 4  # export bakes the static sequence length into qkv's reshape
    out = merged(gm, [8] * 4).graph_module
    lengths = [n.args[1][1] for n in out.graph.nodes if n.target is torch.ops.aten.reshape.default
               and isinstance(n.args[1], (list, tuple)) and len(n.args[1]) == 5]
    assert lengths == [65, 57, 49, 41]
    x = images(2)
    torch.testing.assert_close(out(x), timm_reference(model, x, [8] * 4), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["timm_deit_sdpa", "timm_deit_matmul", "timm_reg4", "hf_vit_eager",
                                  "torchvision_vit"])
def test_flop_model_equals_the_counter_on_merged_graphs(name):
    gm = capture(ARCHS[name][0](), images(2))
    x = gm.meta["example_input"]
    model = MergeFlops(gm)
    assert model.base == count_flops(gm, x)
    for r in ([8, 8, 8, 8], [0, 13, 5, 30], [3, 0, 7, 1]):
        assert model.flops(r) == count_flops(merged(gm, r).graph_module, x) < model.base


def test_tome_plan_lands_within_one_percent_and_refuses_the_impossible():
    gm = traced(ARCHS["timm_deit_sdpa"][0]())
    model = MergeFlops(gm)
    x = gm.meta["example_input"]
    for goal in (0.5, 0.6, 0.75, 0.9):
        plan = tome_plan(gm, Budget(model.base, goal), flop_model=model)
        r, extra = plan.detail["r"], plan.detail["extra"]
        assert plan.detail["schedule"] == [min(r + (b >= 4 - extra), c) for b, c in
                                           enumerate(plan.detail["schedule"])]
        achieved = count_flops(merged(gm, plan.detail["schedule"]).graph_module, x) / model.base
        assert abs(achieved - goal) <= 0.01 and achieved == pytest.approx(plan.ratio)
    with pytest.raises(PlanError, match="no merge schedule reaches 0.100"):
        tome_plan(gm, Budget(model.base, 0.1), flop_model=model)


def test_onnx_static_shapes_and_parity(tmp_path):
    from vitprune.deploy.onnx import export_onnx
    model = ARCHS["timm_deit_sdpa"][0]()
    gm = traced(model)
    out = merged(gm, [8] * 4).graph_module
    info = export_onnx(out, gm.meta["example_input"], tmp_path / "tome.onnx", opset=18)
    assert set(info["parity_max_abs_err"]) == {"1", "4"}
    assert max(info["parity_max_abs_err"].values()) <= 1e-4
    proto = onnx.shape_inference.infer_shapes(onnx.load(info["path"]), strict_mode=True)
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
              for v in list(proto.graph.value_info) + list(proto.graph.output)}
    fc1 = [shapes[n.output[0]] for n in proto.graph.node
           if n.op_type in ("MatMul", "Gemm") and shapes.get(n.output[0], [None])[-1] == 4 * 192]
    assert fc1 == [["batch", t, 768] for t in (57, 49, 41, 33)]  # every MLP sees fewer tokens, statically


def test_pt2_reloads_with_plain_torch(tmp_path):
    model = ARCHS["hf_vit_sdpa"][0]()
    gm = capture(model, images(2))
    out = merged(gm, [8] * 4).graph_module
    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(out, (images(2),), dynamic_shapes=({0: batch},), strict=False)
    torch.export.save(ep, tmp_path / "m.pt2")
    loaded = torch.export.load(tmp_path / "m.pt2").module()
    x = images(4)
    torch.testing.assert_close(loaded(x), out(x), atol=1e-6, rtol=0)


# -- refusals --------------------------------------------------------------------------------------------
def test_relative_position_bias_is_refused_with_the_reason():
    torch.manual_seed(0)
    cfg = transformers.BeitConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  image_size=SIZE, patch_size=8, num_labels=10, use_relative_position_bias=True)
    gm = capture(transformers.BeitForImageClassification(cfg).eval(), images(2))
    with pytest.raises(MergeRefused, match=r"relative position bias.*\(start=1\)"):
        TokenMerging([4, 4])(gm)
    assert TokenMerging([0, 4])(copy.deepcopy(gm)).modified  # merging after the last biased attention is defined


def test_windowed_attention_is_refused_with_the_reason():
    import timm
    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=SIZE, patch_size=4,
                             window_size=2, embed_dim=32, depths=(1, 1), num_heads=(2, 4)).eval()
    gm = capture(swin, images(2))
    with pytest.raises(MergeRefused, match="windowed attention"):
        TokenMerging([1, 1])(gm)


def test_bad_schedules_are_refused():
    gm = traced(ARCHS["timm_deit_sdpa"][0]())
    with pytest.raises(PassError, match="4 attention blocks"):
        TokenMerging([1, 1])(gm)
    with pytest.raises(PassError, match=">= 0"):
        TokenMerging([1, -1, 0, 0])(gm)
    once = merged(gm, [2] * 4).graph_module
    with pytest.raises(PassError, match="already merged"):
        TokenMerging([2] * 4)(once)


def test_recipe_replays():
    model = ARCHS["timm_deit_distilled"][0]()
    gm = traced(model)
    result = merged(gm, [40, 40, 40, 40])
    assert result.recipe == {"pass": "merging", "r": [32, 16, 8, 4]}  # capped as ToMe caps
    again = PASSES["merging"].from_recipe(result.recipe)(copy.deepcopy(gm)).graph_module
    x = images(2)
    torch.testing.assert_close(again(x), result.graph_module(x), atol=0, rtol=0)


# -- the spec forms, --method tome, composition --------------------------------------------------------------
def test_merge_form_parses_and_bad_forms_are_refused():
    gm = traced(ARCHS["timm_deit_sdpa"][0]())
    assert parse_merge("merge=8", gm) == [8] * 4
    assert parse_merge("merge=5, start=2", gm) == [0, 0, 5, 5]
    with pytest.raises(SpecError, match=r"start must be a block index in \[0, 3\]"):
        parse_merge("merge=5,start=4", gm)
    for bad, match in (("merge=8,keep=0.5", "mixes merging"), ("merge=-1", "merge must be an integer >= 0"),
                       ("merge=2,every=2", "mixes merging"), ("merge=2,merge=3", "merge is given twice")):
        with pytest.raises(SpecError, match=match):
            CompressSpec(tokens=bad)
    with pytest.raises(SpecError, match="method 'tome' plans its own token schedule"):
        CompressSpec(method="tome", target_flops=0.6, tokens="keep=0.5,start=2")
    with pytest.raises(SpecError, match="method 'cpvit' plans its own token schedule"):
        CompressSpec(method="cpvit", target_flops=0.6, tokens="merge=4")


def test_method_tome_meets_the_target_from_the_api_and_a_spec_file(tmp_path):
    model = ARCHS["timm_deit_sdpa"][0]()
    (tmp_path / "spec.yaml").write_text("method: tome\ntarget_flops: 0.6\n")
    result = compress(model, CompressSpec.from_file(tmp_path / "spec.yaml"))
    assert abs(result.report["flops_ratio"] - 0.6) <= 0.01
    stage = result.report["stages"]["merge"]
    assert stage["r"] >= 1 and [s["pass"] for s in result.recipe] == ["merging"]
    paths = write_outputs(result, str(tmp_path / "m"))  # ONNX (checker, shapes, ORT parity) and .pt2
    report = json.loads((tmp_path / "m.json").read_text())
    assert max(report["onnx"]["parity_max_abs_err"].values()) <= 1e-4
    x = images(2)
    torch.testing.assert_close(load_compressed(paths["pt2"])(x), result.model(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["width", "boundarydpt", "boundarydpt+"])
def test_merging_composes_with_the_other_methods(method):
    model = ARCHS["timm_deit_sdpa"][0]()
    result = compress(model, CompressSpec(method=method, target_flops=0.7, tokens="merge=4,start=1"))
    passes = [s["pass"] for s in result.recipe]
    assert passes[-1] == "merging" and len(passes) > 1
    assert result.report["flops_ratio"] < 0.69  # the width/depth plan, then merging on top
    merge = result.report["stages"]["merge"]["merge"]
    assert merge[0] == 0 and set(merge[1:]) == {4}


def test_merging_with_recovery_fine_tuning():
    model = ARCHS["timm_deit_sdpa"][0]()
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, SIZE, SIZE, generator=g),
                                          torch.randint(0, 10, (8,), generator=g))
    before = copy.deepcopy(model)
    result = compress(model, CompressSpec(tokens="merge=6", epochs=1, batch_size=4, calib_batches=1),
                      train_data=data)
    assert len(result.report["recovery"]["epochs"]) == 1
    x = images(2)
    untrained = compress(before, CompressSpec(tokens="merge=6")).model
    assert (result.model(x) - untrained(x)).abs().max() > 0  # the merged graph trained


def test_sweep_row_and_scaled_recipe():
    import vitprune.sweep as sw
    assert "tome" in sw.METHODS and callable(sw.METHODS["tome"].prune)
    src = timm_model(depth=2)
    dst = randomize(tiny("deit_tiny_patch16_224", depth=4, img_size=64, patch_size=4))
    out = sw.scale_recipe([{"pass": "merging", "r": [8, 4]}], src, (3, SIZE, SIZE), dst, (3, 64, 64))
    assert out == [{"pass": "merging", "r": [32, 32, 16, 16]}]  # the same fraction of 64 → 256 patches
    from vitprune.api import replay
    assert replay(dst, out, (3, 64, 64))(torch.randn(2, 3, 64, 64)).shape == (2, 1000)
