"""The dependency graph finds every coupled group from the graph alone, on both attention paths."""
import pytest
import torch

from conftest import MODELS, set_fused_attention, tiny, tiny_vit, traced
from vitprune.deps import DependencyGraph


def groups_by_kind(dg):
    out = {}
    for g in dg.prunable_groups():
        out.setdefault(g.kind, []).append(g)
    return out


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "matmul_softmax"])
def test_every_group_kind_found(model_name, fused):
    model = MODELS[model_name](fused=fused)
    dg = DependencyGraph.build(traced(model))
    assert dg.unsupported == []
    kinds = groups_by_kind(dg)
    depth = len(model.blocks)
    assert len(kinds["residual"]) == 1
    assert len(kinds["hidden"]) == depth
    assert len(kinds["head"]) == depth
    assert len(kinds["head_dim"]) == depth
    heads = model.blocks[0].attn.num_heads
    assert all(g.size == heads for g in kinds["head"])
    assert all(g.size == model.blocks[0].attn.head_dim for g in kinds["head_dim"])


def test_residual_group_members_deit3():
    """Residual stream: patch embed out, tokens, pos_embed, every norm, proj/fc2 outputs, layer-scale
    gammas, head input — and nothing else."""
    model = tiny("deit3_small_patch16_224")
    dg = DependencyGraph.build(traced(model))
    residual = next(g for g in dg.prunable_groups() if g.kind == "residual")
    members = {(m.param, m.dim) for m in residual.members}
    expected = {("patch_embed.proj.weight", 0), ("patch_embed.proj.bias", 0), ("cls_token", 2),
                ("pos_embed", 2), ("norm.weight", 0), ("norm.bias", 0), ("head.weight", 1)}
    for i in range(2):
        b = f"blocks.{i}"
        expected |= {(f"{b}.norm1.weight", 0), (f"{b}.norm1.bias", 0), (f"{b}.norm2.weight", 0),
                     (f"{b}.norm2.bias", 0), (f"{b}.attn.qkv.weight", 1), (f"{b}.attn.proj.weight", 0),
                     (f"{b}.attn.proj.bias", 0), (f"{b}.mlp.fc1.weight", 1), (f"{b}.mlp.fc2.weight", 0),
                     (f"{b}.mlp.fc2.bias", 0), (f"{b}.ls1.gamma", 0), (f"{b}.ls2.gamma", 0)}
    assert members == expected


def test_heads_and_head_dim_are_factors_of_qkv_rows():
    model = tiny()
    dg = DependencyGraph.build(traced(model))
    head = next(g for g in dg.prunable_groups() if g.kind == "head")
    qkv = next(m for m in head.members if m.param == "blocks.0.attn.qkv.weight")
    heads, head_dim = 3, 64
    # row r of qkv = (s, h, d) row-major: the head coordinate is (r // head_dim) % heads
    rows = torch.arange(3 * heads * head_dim)
    assert (torch.as_tensor(qkv.coords) == (rows // head_dim) % heads).all()
    assert head.granularity == head_dim


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "matmul_softmax"])
def test_one_head_attention_is_a_head_dim_and_keeps_its_name(fused):
    """With one head no reshape splits heads out of q/k/v; q·k still sums over the channels, so the
    group is the attention's head-dim (not an MLP-like "hidden"), under the name it had with two heads
    (names are keys in recipes: a block pruned to one head must not be renamed)."""
    two = DependencyGraph.build(traced(tiny_vit(num_heads=2, depth=1, embed_dim=64)))
    model = tiny_vit(num_heads=1, depth=1, embed_dim=64)
    set_fused_attention(model, fused)
    one = DependencyGraph.build(traced(model))
    kinds = groups_by_kind(one)
    assert "head" not in kinds and len(kinds["hidden"]) == 1 and len(kinds["head_dim"]) == 1
    assert kinds["hidden"][0].members[0].param == "blocks.0.mlp.fc1.weight"
    assert kinds["head_dim"][0].size == 64
    assert {m.param for m in kinds["head_dim"][0].members} >= {"blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight"}
    assert kinds["head_dim"][0].name == next(g.name for g in two.groups if g.kind == "head_dim")


def test_qk_norm_weights_join_head_dim():
    from conftest import tiny_qknorm

    dg = DependencyGraph.build(traced(tiny_qknorm()))
    head_dim = next(g for g in dg.prunable_groups() if g.kind == "head_dim")
    params = {m.param for m in head_dim.members}
    assert {"blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.weight"} <= params


def test_backbone_output_is_frozen():
    """No classifier: the features are the output, so the residual stream may not shrink."""
    model = tiny("vit_small_patch14_reg4_dinov2", img_size=28, num_classes=0)
    dg = DependencyGraph.build(traced(model))
    assert not any(g.kind == "residual" for g in dg.prunable_groups())


class Weird(torch.nn.Module):
    def forward(self, x):
        return torch.cumsum(x, dim=-1)


def test_unknown_op_freezes_and_is_reported():
    model = tiny()
    model.blocks[0].mlp.act = Weird()
    dg = DependencyGraph.build(traced(model))
    assert [u.op for u in dg.unsupported] == ["cumsum"]
    kinds = groups_by_kind(dg)
    assert len(kinds["hidden"]) == 1  # block 0's hidden dim is frozen, block 1's is not
    assert "residual" in kinds


def test_blocks_are_listed_in_natural_order():
    """Groups (and so inspect, reports and planner notes) list blocks.2 before blocks.10."""
    import re

    from vitprune.api import format_inspect, inspect_model

    model = tiny("deit_tiny_patch16_224", depth=12)
    d = inspect_model(model, (3, 32, 32))
    blocks = [int(re.search(r"blocks\.(\d+)\.", g["name"]).group(1)) for g in d["groups"] if "blocks." in g["name"]]
    assert blocks == sorted(blocks) and blocks[-1] == 11
    text = format_inspect(d)
    assert text.index("blocks.2 ") < text.index("blocks.10 ")
