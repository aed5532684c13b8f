"""CP-ViT token pruning: identity at keep=1, a plain eager reference for the kept tokens, the cascade
property, shrinking shapes, exact FLOPs, ONNX export with ORT parity, head scores, composition with
width/head pruning, schedules and recipe replay."""
import copy
import json
import re

import numpy as np
import onnx
import pytest
import torch
import torch.fx as fx

from conftest import randomize, set_fused_attention, tiny, traced, zero_masked
from passes import PASSES, PassError
from passes.tokens import TokenPruning, explicit_attention
from vitprune.deps.tokens import META_KEY, analyse_tokens
from vitprune.plan.budget import Budget
from passes.width import WidthPruning
from vitprune.deps import DependencyGraph
from vitprune.errors import PlanError, SpecError
from vitprune.deploy.onnx import export_onnx
from vitprune.deps.flops import count_flops
from vitprune.plan.tokens import (Calibration, TokenFlops, calibrate, cpvit_head_keep, cpvit_head_scores,
                             cpvit_plan, cpvit_schedule, kept_token_ids, parse_tokens, progressive_keep)

ATOL = 1e-5

# 16 patches each; prefix: 1 (class), 2 (class + distillation), 1 + layer-scale, 5 (class + 4 registers),
# 0 (global average pooling, no class token)
ARCHS = {
    "deit_tiny": ("deit_tiny_patch16_224", {"img_size": 64}),
    "deit_small_distilled": ("deit_small_distilled_patch16_224", {"img_size": 64}),
    "deit3_small": ("deit3_small_patch16_224", {"img_size": 64}),
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", {"img_size": 56, "num_classes": 10}),
    "vit_medium_gap": ("vit_medium_patch16_gap_256", {"img_size": 64}),
}
PREFIX = {"deit_tiny": 1, "deit_small_distilled": 2, "deit3_small": 1, "dinov2_reg4": 5, "vit_medium_gap": 0}
KEEP4 = [16, 12, None, 6]  # cuts entering blocks 1 and 3; None carries 12 through block 2


def make(name: str, fused: bool = True, depth: int = 4) -> torch.nn.Module:
    arch, kwargs = ARCHS[name]
    model = randomize(tiny(arch, fused=fused, depth=depth, **kwargs))
    with torch.no_grad():  # sharper attention than the random init's near-uniform one: no near-ties
        for blk in model.blocks:
            blk.attn.qkv.weight[: 2 * blk.attn.qkv.out_features // 3] *= 4.0
    return model


def images(model: torch.nn.Module, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, 3, *model.patch_embed.img_size), generator=g)


# -- the plain reference: eager timm, attention read by hooks, tokens removed in Python --------------
def reference(model, x, keep, heads=None):
    """Logits and {block: original patch ids kept entering it}, computed the slow, obvious way.

    Score of patch p after block l: for every head, the largest attention any query gives p, summed
    over heads (``heads[l]`` only, when given), added up over blocks. Entering a block with a smaller
    keep count, the patches with the highest scores stay, in their original order.
    """
    m = copy.deepcopy(model).eval()
    set_fused_attention(m, False)
    probs = {}
    for l, blk in enumerate(m.blocks):
        blk.attn.attn_drop.register_forward_hook(lambda mod, inp, out, l=l: probs.__setitem__(l, inp[0]))
    p = m.num_prefix_tokens
    kept = {}
    with torch.no_grad():
        t = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        batch, n = t.shape[0], t.shape[1] - p
        ids = [list(range(n)) for _ in range(batch)]
        score = [[0.0] * n for _ in range(batch)]
        for l, blk in enumerate(m.blocks):
            if keep[l] is not None and keep[l] < len(ids[0]):
                rows, new_ids, new_score = [], [], []
                for b in range(batch):
                    ranked = sorted(range(len(ids[b])), key=lambda i: -score[b][i])[: keep[l]]
                    pos = sorted(ranked)
                    rows.append(torch.cat([t[b, :p], t[b, p:][pos]]))
                    new_ids.append([ids[b][i] for i in pos])
                    new_score.append([score[b][i] for i in pos])
                t, ids, score = torch.stack(rows), new_ids, new_score
                kept[l] = torch.tensor(ids)
            t = blk(t)
            a = probs[l]
            for b in range(batch):
                for i in range(len(ids[b])):
                    for h in (heads[l] if heads else range(a.shape[1])):
                        score[b][i] += float(a[b, h, :, p + i].max())
        logits = m.forward_head(m.norm(t))
    return logits, kept


def prune(model, keep, batch=2):
    gm = traced(model, batch=batch)
    result = TokenPruning(keep)(gm)
    return result


# -- identity --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "matmul_softmax"])
def test_keep_all_is_identity(fused):
    model = make("deit_small_distilled", fused)
    gm = traced(model)
    before = gm.code
    x = images(model, 3)
    for keep in ([None] * 4, [16] * 4, parse_tokens("keep=1.0,start=1", gm)):
        result = TokenPruning(keep)(gm)
        assert not result.modified and result.graph_module.code == before
        with torch.no_grad():
            torch.testing.assert_close(result.graph_module(x), model(x), atol=ATOL, rtol=0)


def test_explicit_attention_is_numerically_equal_to_sdpa():
    model = make("deit3_small", fused=True)
    gm = traced(model)
    x = images(model, 3)
    with torch.no_grad():
        want = gm(x)
    layout = analyse_tokens(gm)
    for block in layout.blocks:
        explicit_attention(gm, block)
    gm.recompile()
    assert not any("scaled_dot_product_attention" in str(n.target) for n in gm.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), want, atol=ATOL, rtol=0)
    assert count_flops(gm, x) == count_flops(traced(model), x)


# -- the reference --------------------------------------------------------------------------------
@pytest.mark.parametrize("name,fused", [(n, True) for n in sorted(ARCHS)]
                         + [("deit_tiny", False), ("vit_medium_gap", False)],
                         ids=[f"{n}-sdpa" for n in sorted(ARCHS)] + ["deit_tiny-matmul_softmax",
                                                                     "vit_medium_gap-matmul_softmax"])
def test_kept_tokens_and_outputs_equal_the_reference(name, fused):
    model = make(name, fused)
    pruned = prune(model, KEEP4).graph_module
    x = images(model)
    want_logits, want_kept = reference(model, x, KEEP4)
    got = kept_token_ids(pruned, x)
    assert sorted(got) == sorted(want_kept) == [1, 3]
    for block in want_kept:
        assert torch.equal(got[block], want_kept[block]), f"block {block}"
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), want_logits, atol=ATOL, rtol=0)
    assert analyse_tokens(traced(model)).prefix == PREFIX[name]


def test_reference_guard_pruning_changes_the_output():
    """The reference comparison is not vacuous: pruning changes logits, and a wrong score would be
    caught (ranking by the *lowest* score keeps different tokens)."""
    model = make("deit_tiny")
    x = images(model)
    pruned = prune(model, KEEP4).graph_module
    with torch.no_grad():
        assert (pruned(x) - model(x)).abs().max() > 1e-3
    _, kept = reference(model, x, KEEP4)
    flipped = copy.deepcopy(model)
    with torch.no_grad():  # negate q: attention changes, so do the scores
        for blk in flipped.blocks:
            blk.attn.qkv.weight[: blk.attn.qkv.out_features // 3] *= -1
    _, other = reference(flipped, x, KEEP4)
    assert any(not torch.equal(kept[b], other[b]) for b in kept)


# -- cascade and shapes ---------------------------------------------------------------------------
def _run_all(gm: fx.GraphModule, x: torch.Tensor) -> dict[fx.Node, torch.Tensor]:
    interp = fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        interp.run(x)
    return interp.env


@pytest.mark.parametrize("name", ["deit_small_distilled", "vit_medium_gap"])
def test_cascade_removed_tokens_never_return(name):
    model = make(name, depth=6)
    keep = [16, 14, 11, 11, 7, 3]
    pruned = prune(model, keep).graph_module
    x = images(model, 3)
    env = _run_all(pruned, x)
    p = PREFIX[name]
    cuts = sorted((n.meta[META_KEY][1], n) for n in pruned.graph.nodes
                  if n.meta.get(META_KEY, ("",))[0] == "tokens")
    idx_nodes = {n.meta[META_KEY][1]: n for n in pruned.graph.nodes if n.meta.get(META_KEY, ("",))[0] == "indices"}
    assert [b for b, _ in cuts] == [1, 2, 4, 5]
    ids = torch.arange(16).repeat(3, 1)
    removed: set[tuple[int, int]] = set()
    for block, tokens in cuts:
        kept = tokens.args[0][1] if p else tokens          # cat([prefix, gathered]) or gathered
        stream = kept.args[0].args[0]                      # gather(stream[:, p:], 1, index)
        idx = env[idx_nodes[block]]
        before, after = env[stream], env[tokens]
        assert idx.shape == (3, keep[block])
        assert (idx.diff(dim=1) > 0).all() and idx.min() >= 0 and idx.max() < before.shape[1] - p
        assert torch.equal(after[:, :p], before[:, :p])    # prefix tokens always kept, unchanged
        for b in range(3):
            assert torch.equal(after[b, p:], before[b, p:][idx[b]])
        new_ids = torch.gather(ids, 1, idx)
        for b in range(3):
            assert not ({(b, int(i)) for i in new_ids[b]} & removed), "a removed token came back"
            removed |= {(b, int(i)) for i in ids[b]} - {(b, int(i)) for i in new_ids[b]}
        ids = new_ids
        assert tokens.meta["tensor_meta"].shape[1] == p + keep[block]
    assert torch.equal(ids, kept_token_ids(pruned, x)[5])


def test_sequence_length_really_shrinks_in_every_later_block():
    model = make("deit_tiny", depth=6)
    keep = [16, 14, 11, 11, 7, 3]
    pruned = prune(model, keep).graph_module
    lengths = [n.meta["tensor_meta"].shape[1] for n in pruned.graph.nodes
               if n.op == "call_function" and n.target is torch.ops.aten.layer_norm.default]
    # norm1 and norm2 of each block, then the final norm
    assert lengths == [1 + k for k in keep for _ in range(2)] + [1 + keep[-1]]
    qkv = [n for n in pruned.graph.nodes if n.op == "get_attr" and str(n.target).endswith("attn.qkv.weight")]
    for node, k in zip(qkv, keep):
        (linear,) = node.users
        assert linear.meta["tensor_meta"].shape[1] == 1 + k


def test_sequence_length_baked_into_reshapes_is_rewritten():
    """A graph that writes the sequence length as a constant (a width pass or a model may) is
    rewritten block by block; the dependency graph tells the token dim from an equal-sized other."""
    model = make("deit_tiny")
    x = images(model)
    baked = traced(model)  # torch.export writes the sequence length (17) into every reshape
    reshape = torch.ops.aten.reshape.default
    assert sum(17 in n.args[1] for n in baked.graph.nodes if n.target is reshape) == 8
    predicted = TokenFlops(baked).flops(KEEP4)  # its probes shorten the sequence: same rewrite
    pruned = TokenPruning(KEEP4)(baked).graph_module
    assert count_flops(pruned, x) == predicted
    lengths = [n.args[1][1] for n in pruned.graph.nodes if n.target is reshape]  # (B, N, ...)
    assert lengths == [17, 17, 13, 13, 13, 13, 7, 7]  # qkv and output reshapes of blocks 0..3
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), prune(model, KEEP4).graph_module(x), atol=ATOL, rtol=0)


def test_attention_materialised_only_where_a_score_is_needed():
    model = make("deit_tiny", fused=True, depth=6)
    pruned = prune(model, [16, 16, 12, 12, 12, 12]).graph_module  # one cut, entering block 2
    sdpa = [n for n in pruned.graph.nodes if "scaled_dot_product_attention" in str(n.target)]
    softmax = [n for n in pruned.graph.nodes if n.target is torch.ops.aten.softmax.int]
    assert len(softmax) == 2 and len(sdpa) == 4  # blocks 0 and 1 scored; 2..5 keep the fused call
    assert sum(1 for n in pruned.graph.nodes if n.target is torch.ops.aten.topk.default) == 1


# -- FLOPs and ONNX on DeiT-S ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def deit_s():
    model = randomize(tiny("deit_small_patch16_224", depth=12, img_size=64))
    gm = traced(model)
    return model, gm, TokenFlops(gm)


def test_flops_drop_as_computed(deit_s):
    model, gm, flop_model = deit_s
    x = gm.meta["example_input"]
    base = count_flops(gm, x)
    assert flop_model.base == base
    c, n_full = 384, 17
    for keep in (parse_tokens("keep=0.5,start=4", gm), [16, 15, 13, 13, 10, 9, 9, 6, 5, 5, 3, 1]):
        pruned = TokenPruning(keep)(copy.deepcopy(gm)).graph_module
        got = count_flops(pruned, x)
        # per block with n tokens: qkv, proj, fc1, fc2 = 2·n·12·C², q·kᵀ and attn·v = 2·2·n²·C
        drop = sum(24 * c * c * (n_full - (1 + k)) + 4 * c * (n_full ** 2 - (1 + k) ** 2) for k in keep)
        assert base - got == drop
        assert flop_model.flops(keep) == got
    assert parse_tokens("keep=0.5,start=4", gm) == [16] * 4 + [8] * 8


def test_onnx_export_of_token_pruned_deit_s(deit_s, tmp_path):
    model, gm, flop_model = deit_s
    x = gm.meta["example_input"]
    keep = cpvit_schedule(gm, [images(model, 4)], 0.6, flop_model=flop_model)
    assert keep[0] == 16 and keep[-1] < 16 and all(a >= b for a, b in zip(keep, keep[1:]))
    pruned = TokenPruning(keep)(copy.deepcopy(gm)).graph_module
    assert abs(count_flops(pruned, x) / count_flops(gm, x) - 0.6) <= 0.01
    info = export_onnx(pruned, x, tmp_path / "deit_s_tokens.onnx", opset=18)  # checker, strict shapes, ORT
    assert set(info["parity_max_abs_err"]) == {"1", "4"}
    assert max(info["parity_max_abs_err"].values()) <= 1e-4
    cuts = sum(1 for a, b in zip(keep, keep[1:]) if b < a)
    assert info["op_counts"]["TopK"] == 2 * cuts and info["op_counts"]["GatherElements"] >= cuts
    proto = onnx.shape_inference.infer_shapes(onnx.load(info["path"]), strict_mode=True)
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
              for v in list(proto.graph.value_info) + list(proto.graph.output)}
    qkv = [shapes[n.output[0]] for n in proto.graph.node
           if n.op_type == "MatMul" and shapes.get(n.output[0], [None])[-1] == 3 * 384]
    assert qkv == [["batch", 1 + k, 3 * 384] for k in keep]  # every block sees fewer tokens, statically
    scored = [shapes[n.output[0]] for n in proto.graph.node if n.op_type == "Softmax"][: len(keep) - 1]
    assert scored == [["batch", 6, 1 + k, 1 + k] for k in keep[:-1]]  # materialised attention, static


# -- heads ----------------------------------------------------------------------------------------
def test_head_scores_equal_a_plain_reference():
    model = make("deit_small_distilled", depth=3)
    gm = traced(model)
    x = images(model, 3)
    got = cpvit_head_scores(gm, [x])
    m = copy.deepcopy(model)
    set_fused_attention(m, False)
    probs = {}
    for l, blk in enumerate(m.blocks):
        blk.attn.attn_drop.register_forward_hook(lambda mod, inp, out, l=l: probs.__setitem__(l, inp[0]))
    with torch.no_grad():
        m(x)
    p = 2
    cumulative = torch.zeros(3, 16, dtype=torch.float64)
    for l in range(3):
        peak = probs[l].double().amax(dim=2)[:, :, p:]
        cumulative = cumulative + peak.sum(1)
        weight = cumulative / cumulative.mean(1, keepdim=True)
        want = np.array([float((weight * peak[:, h]).sum(1).mean()) for h in range(peak.shape[1])])
        (name,) = [k for k in got if re.search(rf"blocks\.{l}\.", k)]
        np.testing.assert_allclose(got[name], want, rtol=1e-6)
    assert len(got) == 3 and all(n.startswith("head:") for n in got)


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "matmul_softmax"])
def test_composes_with_head_and_width_pruning(fused):
    model = make("deit3_small", fused, depth=3)
    gm = traced(copy.deepcopy(model))  # the width pass slices parameters of the modules gm shares
    x = images(model, 3)
    dg = DependencyGraph.build(gm)
    heads = cpvit_head_keep(gm, [x], 0.5)                 # 3 of 6 heads per block
    rng = np.random.default_rng(0)
    hidden = {g.name: sorted(rng.choice(g.size, g.size // 2, replace=False).tolist())
              for g in dg.prunable_groups() if g.kind == "hidden"}
    assert len(heads) == 3 and all(len(v) == 3 for v in heads.values()) and hidden
    WidthPruning({**heads, **hidden})(gm)
    keep = [16, 10, 5]
    pruned = TokenPruning(keep)(gm).graph_module
    assert tuple(pruned.get_parameter("blocks.0.attn.qkv.weight").shape) == (3 * 3 * 64, 384)
    assert sum(p.numel() for p in pruned.parameters()) < 0.8 * sum(p.numel() for p in model.parameters())
    # oracle: removed heads and hidden units zero-masked in eager timm; the score sums kept heads only
    masked = zero_masked(model, dg, {**heads, **hidden})
    kept_heads = {int(re.search(r"blocks\.(\d+)\.", k).group(1)): v for k, v in heads.items()}
    want_logits, want_kept = reference(masked, x, keep, heads=kept_heads)
    got = kept_token_ids(pruned, x)
    for block in want_kept:
        assert torch.equal(got[block], want_kept[block])
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), want_logits, atol=ATOL, rtol=0)


# -- schedules ------------------------------------------------------------------------------------
def test_parse_tokens_forms_and_errors():
    gm = traced(make("deit_tiny", depth=6))
    assert parse_tokens("keep=0.5,start=4", gm) == [16] * 4 + [8] * 2
    assert parse_tokens("keep=0.7, start=1, every=2", gm) == [16, 11, 11, 8, 8, 5]
    for bad in ("keep=0.5", "start=2", "keep=1.5,start=2", "keep=0.5,start=0", "keep=0.5,start=6",
                "keep=0.5,start=2,every=0", "keep=half,start=2", "ratio=0.5,start=2"):
        with pytest.raises(SpecError):
            parse_tokens(bad, gm)


def test_progressive_keep_follows_the_attention_range():
    flat = progressive_keep(100, [1.0] * 6, 0.1, 1, 0.9)
    assert flat == [100, 90, 80, 70, 60, 50]
    # a block that attends more globally makes pruning grow faster behind it
    wide = progressive_keep(100, [1.0, 1.0, 4.0, 1.0, 1.0, 1.0], 0.1, 1, 0.9)
    steps = [a - b for a, b in zip(wide, wide[1:])]
    assert steps[2] == max(steps) and steps[2] > 2 * steps[1]
    assert progressive_keep(100, [1.0] * 6, 10.0, 2, 0.9) == [100, 100, 10, 10, 10, 10]


def test_cpvit_plan_meets_the_target_and_refuses_the_impossible():
    model = make("deit_tiny", depth=6)
    gm = traced(model)
    calib = calibrate(gm, [images(model, 2), images(model, 2, seed=2)])
    assert calib.images == 4 and len(calib.ranges) == 6 and all(0 < r < 2 for r in calib.ranges)
    flop_model = TokenFlops(gm)
    for target in (0.85, 0.7):
        plan = cpvit_plan(gm, calib, Budget(flop_model.base, target), flop_model=flop_model)
        keep = plan.detail["keep"]
        assert plan.within_tolerance and keep[0] == 16 and plan.passes[0].keep == keep
        assert all(a >= b for a, b in zip(keep, keep[1:]))
        pruned = TokenPruning(keep)(copy.deepcopy(gm)).graph_module
        x = gm.meta["example_input"]
        assert abs(count_flops(pruned, x) / count_flops(gm, x) - target) <= 0.01
    with pytest.raises(PlanError, match="no schedule reaches"):
        cpvit_plan(gm, calib, Budget(flop_model.base, 0.05), flop_model=flop_model)
    uniform = Calibration([1.0] * 6, [np.ones(3)] * 6, np.ones(16), 1)
    assert cpvit_schedule(gm, uniform, 0.7, start=3)[:3] == [16, 16, 16]


# -- contract -------------------------------------------------------------------------------------
def test_bad_keep_lists_are_refused():
    gm = traced(make("deit_tiny"))
    for keep, needle in (([16, 8], "4 attention blocks"), ([8, 8, 8, 8], "block 0"),
                         ([16, 8, 12, 8], "never increase"), ([16, 0, 0, 0], "never increase")):
        with pytest.raises(PassError, match=needle):
            TokenPruning(keep)(copy.deepcopy(gm))
    pruned = TokenPruning(KEEP4)(gm).graph_module
    with pytest.raises(PassError, match="already token-pruned"):
        TokenPruning(KEEP4)(pruned)


def test_recipe_replays_from_json_and_from_a_saved_file(tmp_path):
    from vitprune.api import CompressResult, load_compressed, save_compressed

    torch.manual_seed(0)
    import timm

    source = {"kind": "timm", "arch": "deit_tiny_patch16_224", "kwargs": {"img_size": 64, "depth": 3}}
    model = timm.create_model(source["arch"], pretrained=False, **source["kwargs"]).eval()
    gm = traced(copy.deepcopy(model))
    x = images(model)
    heads = cpvit_head_keep(gm, [x], 0.67)
    steps = [WidthPruning(heads)(gm).recipe]
    result = TokenPruning([16, 9, 4])(gm)
    steps.append(result.recipe)
    recipe = json.loads(json.dumps(steps))
    assert recipe[1] == {"pass": "tokens", "keep": [16, 9, 4]} and PASSES["tokens"] is TokenPruning
    fresh = traced(copy.deepcopy(model))
    for step in recipe:
        fresh = PASSES[step["pass"]].from_recipe(step)(fresh).graph_module
    fresh.load_state_dict(gm.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), gm(x), atol=ATOL, rtol=0)
    path = tmp_path / "tokens.pt2"
    save_compressed(CompressResult(gm, {}, recipe, source, (3, 64, 64)), path)
    loaded = load_compressed(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), gm(x), atol=ATOL, rtol=0)
