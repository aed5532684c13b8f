"""Coverage of the timm ViT family we must support, in both attention spellings.

For each model (2 blocks, small input, 10 classes, ``pretrained=False``) and each of timm's attention
paths (``fused_attn`` True: one ``scaled_dot_product_attention`` call; False: matmul → softmax →
matmul), the model traces, the dependency graph has no unsupported op, and it finds the groups
pruning needs, all prunable: one residual stream, and per block an MLP hidden group, a head group and a
head-dim group. Then about half of every prunable group is removed with ``WidthPruning``: the result
must run, its parameters must have the sizes the FLOP model predicts, and ``FlopModel`` must equal
``count_flops`` (``torch.utils.flop_counter``) exactly, before and after pruning.

The broad, never-failing survey over every timm ViT-family architecture is ``benchmarks/coverage.py``.
"""
from __future__ import annotations

from collections import Counter

import pytest
from conftest import tiny, tiny_qknorm
import torch

from passes.width import WidthPruning
from vitprune.deps import DependencyGraph
from vitprune.deps.flops import FlopModel, count_flops, count_params
from vitprune.frontend.capture import example_input_for, capture

DEPTH = 2
NUM_CLASSES = 10

# name → input side: 2×2 patches for patch-16/-14, 2×2 for patch-32 at 64
REQUIRED = {
    "deit_tiny_patch16_224": 32,
    "deit_small_patch16_224": 32,
    "deit_base_patch16_224": 32,
    "deit_small_distilled_patch16_224": 32,
    "deit3_small_patch16_224": 32,
    "vit_small_patch16_224": 32,
    "vit_base_patch32_224": 64,
    "vit_base_patch16_clip_224": 32,
    "vit_small_patch14_reg4_dinov2": 28,
    "vit_medium_patch16_gap_256": 32,
    "qk_norm": 32,  # timm VisionTransformer(qk_norm=True), small
}


def make(name: str, fused: bool) -> tuple[torch.nn.Module, torch.Tensor]:
    size = REQUIRED[name]
    if name == "qk_norm":
        model = tiny_qknorm(img_size=size, patch_size=16, depth=DEPTH, num_classes=NUM_CLASSES)
    else:
        model = tiny(name, fused=fused, depth=DEPTH, img_size=size, num_classes=NUM_CLASSES)
    attention = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert attention, "no timm attention module: the fused_attn switch would test nothing"
    for m in attention:
        m.fused_attn = fused
    return model, example_input_for((3, size, size), batch=2)


def half(size: int) -> list[int]:
    """Every other channel: about half, never none, and not a prefix (so order bugs show)."""
    return list(range(0, size, 2))


@pytest.fixture(params=sorted(REQUIRED), scope="module")
def name(request):
    return request.param


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "matmul"])
def test_required_model(name, fused):
    model, x = make(name, fused)
    gm = capture(model, x)
    ops = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert (torch.ops.aten.scaled_dot_product_attention.default in ops) == fused, "wrong attention path traced"

    dg = DependencyGraph.build(gm)
    assert dg.unsupported == [], [str(u) for u in dg.unsupported]
    prunable = Counter(g.kind for g in dg.prunable_groups())
    assert prunable == {"residual": 1, "hidden": DEPTH, "head": DEPTH, "head_dim": DEPTH}, prunable
    _check_attention_groups(dg, name)

    fm = FlopModel(dg)
    assert fm.flops() == count_flops(gm, x), "FLOP model differs from the counter on the dense model"
    keep = {g.name: half(g.size) for g in dg.prunable_groups()}
    counts = {g.axis: len(keep[g.name]) for g in dg.prunable_groups()}
    predicted_flops, predicted_params = fm.flops(counts), fm.num_params(counts)

    pruned = WidthPruning(keep)(gm).graph_module
    with torch.no_grad():
        y = pruned(x)
    assert y.shape == (2, NUM_CLASSES) and torch.isfinite(y).all()
    assert count_params(pruned) == predicted_params
    assert count_flops(pruned, x) == predicted_flops
    assert predicted_flops < 0.5 * fm.flops()


def _check_attention_groups(dg: DependencyGraph, name: str) -> None:
    """Heads and head-dims are separate groups over qkv rows + proj columns (+ q/k-norm weights)."""
    for block in range(DEPTH):
        qkv = f"blocks.{block}.attn.qkv.weight"
        for kind in ("head", "head_dim"):
            g = next(g for g in dg.prunable_groups() if g.kind == kind and qkv in g.params())
            assert f"blocks.{block}.attn.proj.weight" in g.params()
            norms = {p for p in g.params() if ".attn.q_norm." in p or ".attn.k_norm." in p}
            if name == "qk_norm" and kind == "head_dim":
                assert norms == {f"blocks.{block}.attn.{n}_norm.{w}" for n in "qk" for w in ("weight", "bias")}
            else:
                assert not norms
        head = next(g for g in dg.prunable_groups() if g.kind == "head" and qkv in g.params())
        head_dim = next(g for g in dg.prunable_groups() if g.kind == "head_dim" and qkv in g.params())
        assert head.size * head_dim.size * 3 == dg.gm.get_parameter(qkv).shape[0]
