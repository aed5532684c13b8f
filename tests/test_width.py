"""Width pass: exact zero-mask oracle, shape constants rewritten, iterative pruning, no patching."""
import copy

import numpy as np
import pytest
import torch

from conftest import MODELS, randomize, random_keep, tiny, traced, zero_masked
from passes.width import WidthPruning
from passes import PassError
from vitprune.deps import DependencyGraph
from vitprune.deps.flops import FlopModel, count_flops

ATOL = 1e-5


def prune_kinds(model, kinds, fraction=0.5, seed=0):
    randomize(model, seed)
    gm = traced(model)
    dg = DependencyGraph.build(gm)
    rng = np.random.default_rng(seed)
    keep = {g.name: random_keep(g.size, fraction, rng) for g in dg.prunable_groups() if g.kind in kinds}
    assert keep, f"no {kinds} groups"
    oracle = zero_masked(gm, dg, keep)
    WidthPruning(keep)(gm)
    return gm, oracle, dg


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "matmul_softmax"])
@pytest.mark.parametrize("kinds", [{"hidden"}, {"head"}, {"head_dim"}, {"hidden", "head", "head_dim"}],
                         ids=["mlp", "heads", "head_dim", "all_internal"])
@pytest.mark.parametrize("name", ["deit_tiny", "deit3_small", "dinov2_reg4", "vit_medium_gap"])
def test_pruned_equals_zero_masked(name, kinds, fused):
    model = MODELS[name](fused=fused)
    gm, oracle, _ = prune_kinds(model, kinds)
    x = torch.randn(3, *gm.meta["example_input"].shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(gm(x), oracle(x), atol=ATOL, rtol=0)


def test_pruning_really_changes_the_function():
    """Guards the oracle test: removing channels is not a no-op."""
    model = MODELS["deit_tiny"]()
    original = copy.deepcopy(randomize(model))
    gm, _, _ = prune_kinds(model, {"hidden"})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (gm(x) - original(x)).abs().max() > 1e-3


def test_keep_all_is_identity():
    model = randomize(MODELS["deit3_small"]())
    gm = traced(model)
    dg = DependencyGraph.build(gm)
    keep = {g.name: list(range(g.size)) for g in dg.prunable_groups()}
    result = WidthPruning(keep)(gm)
    assert not result.modified
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), atol=ATOL, rtol=0)


def test_parameters_shrink_and_shape_constants_are_rewritten():
    model = MODELS["deit_tiny"]()
    gm = traced(model)
    dg = DependencyGraph.build(gm)
    by_kind = {}
    for g in dg.prunable_groups():
        by_kind.setdefault(g.kind, []).append(g)
    keep = {by_kind["head"][0].name: [0, 2], by_kind["head_dim"][0].name: list(range(48)),
            by_kind["residual"][0].name: list(range(160)), by_kind["hidden"][0].name: list(range(500))}
    WidthPruning(keep)(gm)
    assert gm.get_submodule("blocks.0.attn.qkv").weight.shape == (3 * 2 * 48, 160)
    assert gm.get_submodule("blocks.0.attn.proj").weight.shape == (160, 2 * 48)
    assert gm.get_submodule("blocks.0.mlp.fc1").weight.shape == (500, 160)
    assert gm.pos_embed.shape[-1] == gm.cls_token.shape[-1] == 160
    reshapes = [n.args[1] for n in gm.graph.nodes if n.target is torch.ops.aten.reshape.default]
    assert (3, 2, 48) in [tuple(a[-3:]) for a in reshapes]  # reshape(B, N, 3, heads, head_dim)
    assert 96 in [a[-1] for a in reshapes]                   # reshape(B, N, heads*head_dim)
    norms = [n.args[1] for n in gm.graph.nodes if n.target is torch.ops.aten.layer_norm.default]
    assert norms and all(list(s) == [160] for s in norms)
    assert gm(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_head_dim_pruning_keeps_the_original_attention_scale():
    model = MODELS["deit_tiny"]()
    gm = traced(model)
    dg = DependencyGraph.build(gm)
    g = next(g for g in dg.prunable_groups() if g.kind == "head_dim")
    WidthPruning({g.name: list(range(32))})(gm)
    sdpa = [n for n in gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert sdpa[0].kwargs["scale"] == pytest.approx(64 ** -0.5)
    assert "scale" not in sdpa[1].kwargs  # block 1 untouched


def test_iterative_pruning_runs_forward_and_backward():
    """USERS.md #1: heads −50% and head-dim −25% in several steps, then forward and backward."""
    model = tiny("deit_small_patch16_224")  # 6 heads
    gm = traced(model)
    for head_dim in (59, 53, 48):  # one head and a few head-dims fewer at each step
        dg = DependencyGraph.build(gm)
        keep = {}
        for g in dg.prunable_groups():
            if g.kind == "head":
                keep[g.name] = list(range(1, g.size))
            elif g.kind == "head_dim":
                keep[g.name] = list(range(g.size - head_dim, g.size))
        WidthPruning(keep)(gm)
    attn = gm.get_submodule("blocks.0.attn")
    assert attn.qkv.weight.shape[0] == 3 * 3 * 48
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    gm.train()
    gm(x).sum().backward()
    assert x.grad is not None and attn.qkv.weight.grad.shape == attn.qkv.weight.shape


def test_flop_model_matches_counter_after_pruning(model_name):
    model = MODELS[model_name]()
    gm = traced(model)
    dg = DependencyGraph.build(gm)
    fm = FlopModel(dg)
    x = gm.meta["example_input"]
    assert fm.flops() == count_flops(gm, x)
    rng = np.random.default_rng(1)
    keep, counts = {}, {}
    for g in dg.prunable_groups():
        keep[g.name] = random_keep(g.size, 0.6, rng)
        counts[g.axis] = len(keep[g.name])
    predicted, predicted_params = fm.flops(counts), fm.num_params(counts)
    WidthPruning(keep)(gm)
    assert count_flops(gm, x) == predicted < fm.flops()
    assert sum(p.numel() for p in gm.parameters()) == predicted_params


def test_bad_keep_is_refused():
    gm = traced(MODELS["deit_tiny"]())
    dg = DependencyGraph.build(gm)
    hidden = next(g for g in dg.prunable_groups() if g.kind == "hidden")
    with pytest.raises(PassError, match="no channel group"):
        WidthPruning({"nope": [0]})(gm)
    with pytest.raises(PassError, match="at least one"):
        WidthPruning({hidden.name: []})(gm)
    with pytest.raises(PassError, match="in \\[0"):
        WidthPruning({hidden.name: [hidden.size]})(gm)
    frozen = next(g for g in dg.groups if not g.prunable and g.size > 1)
    with pytest.raises(PassError, match="cannot be pruned"):
        WidthPruning({frozen.name: [0]})(gm)


def test_dynamic_sizes_read_from_other_tensors_become_constants():
    """``x.reshape(B, N, C)`` with C read from the residual stream (timm EVA/relpos attention): after
    pruning the residual, C no longer equals the attention width, so it must become a constant."""
    from timm.models.vision_transformer import VisionTransformer

    class ReshapeFromInput(torch.nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.qkv = torch.nn.Linear(dim, dim * 3)
            self.proj = torch.nn.Linear(dim, dim)

        def forward(self, x, attn_mask=None, is_causal=False):
            B, N, C = x.shape
            q, k, v = self.qkv(x).reshape(B, N, 3, 2, C // 2).permute(2, 0, 3, 1, 4).unbind(0)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return self.proj(y.transpose(1, 2).reshape(B, N, C))

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, num_classes=10).eval()
    model.blocks[0].attn = ReshapeFromInput(64)
    gm = traced(model)
    dg = DependencyGraph.build(gm)
    residual = next(g for g in dg.prunable_groups() if g.kind == "residual")
    WidthPruning({residual.name: list(range(48))})(gm)
    assert gm(torch.randn(3, 3, 32, 32)).shape == (3, 10)  # batch stays dynamic


def test_index_buffers_are_never_pruned():
    """Relative-position index tables are data: indexing freezes both source and index."""
    import timm

    model = timm.create_model("vit_relpos_small_patch16_224", pretrained=False, depth=1, img_size=32,
                              num_classes=10).eval()
    gm = traced(model)
    dg = DependencyGraph.build(gm)
    assert not any("relative_position_index" in m.param for g in dg.prunable_groups() for m in g.members)
    keep = {g.name: list(range(0, g.size, 2)) for g in dg.prunable_groups()}
    WidthPruning(keep)(gm)
    assert gm(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_pruning_a_trace_never_touches_the_callers_model():
    model = MODELS["deit_tiny"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = traced(model)
    hidden = next(g for g in DependencyGraph.build(gm).prunable_groups() if g.kind == "hidden")
    WidthPruning({hidden.name: list(range(100))})(gm)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_traced_at_batch_one_stays_batch_dynamic():
    model = MODELS["deit_tiny"]()
    from vitprune.frontend.capture import capture

    gm = capture(model, torch.randn(1, 3, 32, 32))
    hidden = next(g for g in DependencyGraph.build(gm).prunable_groups() if g.kind == "hidden")
    WidthPruning({hidden.name: list(range(384))})(gm)
    assert gm(torch.randn(3, 3, 32, 32)).shape == (3, 1000)


def test_width_after_token_pruning():
    """topk/gather have rules: the residual stream stays prunable after tokens are cut."""
    from passes.tokens import TokenPruning

    model = randomize(tiny("deit_tiny_patch16_224", depth=3, img_size=64))
    gm = traced(model)
    TokenPruning([None, 8, 4])(gm)
    dg = DependencyGraph.build(gm)
    assert dg.unsupported == []
    residual = next(g for g in dg.prunable_groups() if g.kind == "residual")
    WidthPruning({residual.name: list(range(0, 192, 2))})(gm)
    assert gm(torch.randn(3, 3, 64, 64)).shape == (3, 1000)


def test_batch_merged_sizes_stay_dynamic():
    """``x.reshape(B * N, C)``: the batch-dependent size is inferred, not baked in."""
    class Merged(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)

        def forward(self, x):
            B, N, C = x.shape
            return self.b(torch.relu(self.a(x.reshape(B * N, C)))).reshape(B, N, C)

    from vitprune.frontend.capture import capture

    gm = capture(Merged(), torch.randn(2, 5, 4))
    hidden = next(g for g in DependencyGraph.build(gm).prunable_groups() if g.kind == "hidden")
    WidthPruning({hidden.name: [0, 2, 4, 6]})(gm)
    for batch in (1, 3):
        assert gm(torch.randn(batch, 5, 4)).shape == (batch, 5, 4)


def test_group_names_are_unique():
    import timm

    model = timm.create_model("vit_dpwee_patch16_reg1_gap_256", pretrained=False, depth=1, img_size=64,
                              num_classes=10).eval()
    dg = DependencyGraph.build(traced(model))
    names = [g.name for g in dg.groups]
    assert len(names) == len(set(names))


# -- planner: round_to for every kind, head_dim policy, cost models ---------------------------------
from types import SimpleNamespace

from vitprune.errors import InputError
from vitprune.plan.budget import Budget
from vitprune.plan.importance import l2_importance
from vitprune.plan.width import eligible_groups, kept_importance, plan_width, unit_size

ALL_KINDS = {"residual", "hidden", "head", "head_dim"}


def planner_inputs(model, kinds=ALL_KINDS):
    dg = DependencyGraph.build(traced(randomize(model)))
    groups = eligible_groups(dg, kinds)
    return dg, FlopModel(dg), groups, l2_importance(dg, groups)


def widths(plan, groups, kind):
    return [plan.detail["counts"].get(g.axis, g.size) for g in groups if g.kind == kind]


def test_unit_size_holds_round_to_for_head_dim():
    group = lambda kind, size: SimpleNamespace(kind=kind, size=size)  # noqa: E731
    assert unit_size(group("head_dim", 64), 16) == 16
    assert unit_size(group("head_dim", 64), 64) == 64   # was 1: round_to=64 gave head_dim 46
    assert unit_size(group("head_dim", 46), 16) == 1    # impossible: channel by channel
    assert unit_size(group("head", 12), 16) == 1
    assert unit_size(group("hidden", 1536), 64) == 64


@pytest.mark.parametrize("round_to", [16, 64])
def test_shrink_policy_rounds_head_dim(round_to):
    dg, fm, groups, scores = planner_inputs(tiny("deit_small_patch16_224"))
    plan = plan_width(dg, fm, scores, groups, Budget(fm.flops(), 0.5), round_to=round_to,
                      head_dim_policy="shrink")
    head_dims = widths(plan, groups, "head_dim")
    assert all(w % round_to == 0 for w in head_dims), head_dims
    if round_to == 64:
        assert head_dims == [64, 64]
    else:
        assert min(head_dims) < 64  # the FLOPs plan does narrow heads when allowed to
    assert plan.detail["head_dim_policy"] == "shrink"


def test_keep_policy_removes_whole_heads_only():
    dg, fm, groups, scores = planner_inputs(tiny("deit_small_patch16_224"))
    budget = Budget(fm.flops(), 0.3)
    plan = plan_width(dg, fm, scores, groups, budget, round_to=16)  # the default policy
    assert plan.detail["head_dim_policy"] == "keep"
    assert widths(plan, groups, "head_dim") == [64, 64]
    assert min(widths(plan, groups, "head")) < 6
    assert plan.within_tolerance and any("head_dim kept whole" in n for n in plan.notes)
    pruned = copy.deepcopy(dg.gm)
    plan.passes[0](pruned)
    assert count_flops(pruned, dg.gm.meta["example_input"]) == plan.flops


def test_keep_policy_still_narrows_head_dim_when_heads_are_not_eligible():
    dg, fm, groups, scores = planner_inputs(tiny("deit_small_patch16_224"), ALL_KINDS - {"head"})
    plan = plan_width(dg, fm, scores, groups, Budget(fm.flops(), 0.5), round_to=16, head_dim_policy="keep")
    assert min(widths(plan, groups, "head_dim")) < 64


def test_head_dim_that_round_to_cannot_divide_is_noted():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=96, depth=2, num_heads=2, num_classes=10).eval()
    dg, fm, groups, scores = planner_inputs(model, {"head_dim"})  # head_dim 48: not a multiple of 32
    plan = plan_width(dg, fm, scores, groups, Budget(fm.flops(), 0.9), round_to=32, head_dim_policy="shrink")
    notes = [n for n in plan.notes if "head_dim group" in n]
    assert any(w % 32 for w in widths(plan, groups, "head_dim"))
    assert notes and "channel by channel" in notes[0] and "head_dim_policy='keep'" in notes[0]


def test_bad_head_dim_policy_is_refused():
    dg, fm, groups, scores = planner_inputs(tiny())
    with pytest.raises(InputError, match="head_dim_policy must be one of keep, shrink"):
        plan_width(dg, fm, scores, groups, Budget(fm.flops(), 0.5), head_dim_policy="drop")


def test_plans_to_any_cost_model():
    """The planner asks ``cost(counts)``: a model that charges heads triple spends less on them."""
    dg, fm, groups, scores = planner_inputs(tiny("deit_small_patch16_224"))
    head_axes = {g.axis for g in groups if g.kind == "head"}

    class HeadsExpensive:
        def cost(self, counts=None):
            counts = counts or {}
            heads = sum(counts.get(a, 6) for a in head_axes)
            return fm.flops(counts) + 2e6 * heads

    model = HeadsExpensive()
    flop_plan = plan_width(dg, fm, scores, groups, Budget(fm.flops(), 0.5), round_to=16)
    cost_plan = plan_width(dg, model, scores, groups, Budget(model.cost(), 0.5), round_to=16)
    assert Budget(model.cost(), 0.5).met(cost_plan.flops)
    assert sum(widths(cost_plan, groups, "head")) < sum(widths(flop_plan, groups, "head"))


def test_kept_importance_counts_kept_normalised_scores():
    dg, fm, groups, scores = planner_inputs(tiny())
    total = sum(g.size for g in groups)
    assert kept_importance(scores, {}, groups) == pytest.approx(total)
    hidden = next(g for g in groups if g.kind == "hidden")
    best = np.argsort(-scores[hidden.name])[:10].tolist()
    worst = np.argsort(scores[hidden.name])[:10].tolist()
    assert kept_importance(scores, {hidden.name: best}, groups) > kept_importance(scores, {hidden.name: worst}, groups)
