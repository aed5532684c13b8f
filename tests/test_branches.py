"""Depth candidates from the graph alone: attention branches and activations between linears.

The expectations are written from the eager timm modules (module names are fine in a test; the code
under test never reads them), and there are cases where the patterns must *not* fire."""
import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from conftest import MODELS, random_keep, traced
from passes.width import WidthPruning
from vitprune.deps import DependencyGraph
from vitprune.deps.branches import (BranchError, UnknownShapeError, find_activations,
                                    find_attention_branches, record_removed)
from vitprune.errors import UnsupportedModelError
from vitprune.frontend.capture import capture


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def _scope(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "matmul_softmax"])
def test_every_block_has_one_attention_branch_and_one_activation(model_name, fused):
    model = MODELS[model_name](fused=fused)
    gm = traced(model)
    branches, acts = find_attention_branches(gm), find_activations(gm)
    assert [b.index for b in branches] == [a.index for a in acts] == list(range(len(model.blocks)))
    for i, (b, a) in enumerate(zip(branches, acts)):
        block = model.blocks[i]
        assert _scope(b.norm) == f"blocks.{i}.norm1"
        attn_params = {f"blocks.{i}.attn.{n}" for n, _ in block.attn.named_parameters()}
        gamma = f"blocks.{i}.ls1.gamma" if hasattr(block.ls1, "gamma") else None
        assert b.gamma == gamma
        assert set(b.params) == attn_params | ({gamma} if gamma else set())
        assert b.num_params(gm) == sum(p.numel() for p in block.attn.parameters()) + (
            block.ls1.gamma.numel() if gamma else 0)
        assert b.core.target is (torch.ops.aten.scaled_dot_product_attention.default if fused
                                 else torch.ops.aten.softmax.int)
        assert _scope(a.act) == f"blocks.{i}.mlp.act" and a.kind == "gelu"
        assert (a.d_in, a.hidden, a.d_out) == (block.mlp.fc1.in_features, block.mlp.fc1.out_features,
                                               block.mlp.fc2.out_features)
        assert a.fc1_weight == f"blocks.{i}.mlp.fc1.weight" and a.fc2_weight == f"blocks.{i}.mlp.fc2.weight"
        assert _scope(a.norm) == f"blocks.{i}.norm2"


def test_candidates_after_width_pruning():
    gm = traced(MODELS["deit3_small"]())
    dg = DependencyGraph.build(gm)
    rng = np.random.default_rng(0)
    WidthPruning({g.name: random_keep(g.size, 0.5, rng) for g in dg.prunable_groups()})(gm)
    acts = find_activations(gm)
    assert [(a.d_in, a.hidden) for a in acts] == [(192, 768), (192, 768)]
    branches = find_attention_branches(gm)
    assert len(branches) == 2 and all(b.gamma for b in branches)


def test_indices_stay_those_of_the_original_blocks():
    gm = traced(MODELS["deit_tiny"](depth=4))
    record_removed(gm, "attention", [0, 2])  # as a removal pass leaves it
    # the graph still has 4 branches here; only the numbering of survivors is checked
    assert [b.index for b in find_attention_branches(gm)][:2] == [1, 3]


class _NormBetween(nn.Module):
    """fc1 → GELU → LayerNorm → fc2: not removable (LN between the linears is not linear)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(self.norm(F.gelu(self.fc1(x))))


class _Glu(nn.Module):
    """SwiGLU-style: the activation feeds a product, not a linear."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(16, 8)

    def forward(self, x):
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(a) * b)


class _Branching(nn.Module):
    """The hidden activation is read twice: removing it would change the second reader."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        return self.fc2(h) + h.sum(-1, keepdim=True)


class _Plain(nn.Module):
    """Functional ReLU and SiLU between linears, with dropout: both found."""

    def __init__(self):
        super().__init__()
        self.a1, self.a2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.b1, self.b2 = nn.Linear(8, 4), nn.Linear(4, 8)
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        x = self.a2(self.drop(F.relu(self.a1(x))))
        return self.b2(nn.functional.silu(self.b1(x)))


@pytest.mark.parametrize("module, expected", [(_NormBetween, []), (_Glu, []), (_Branching, []),
                                              (_Plain, ["relu", "silu"])])
def test_activation_pattern_fires_only_between_two_linears(module, expected):
    gm = capture(module().eval(), torch.randn(2, 8))
    assert [a.kind for a in find_activations(gm)] == expected


class _AttnNoResidual(nn.Module):
    """Attention whose output is the model output: no residual add to remove it from."""

    def __init__(self):
        super().__init__()
        self.norm, self.qkv = nn.LayerNorm(8), nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        return F.scaled_dot_product_attention(q, k, v)


def test_attention_without_residual_is_a_clear_error():
    gm = capture(_AttnNoResidual().eval(), torch.randn(2, 5, 8))
    with pytest.raises(BranchError, match="residual add") as err:
        find_attention_branches(gm)
    assert isinstance(err.value, UnsupportedModelError)
    assert "scaled_dot_product_attention" in str(err.value)


def test_no_attention_means_no_branches():
    gm = capture(_Plain().eval(), torch.randn(2, 8))
    assert find_attention_branches(gm) == []


def test_unknown_shape_names_the_node():
    gm = traced(MODELS["deit_tiny"]())
    fc1 = find_activations(gm)[1].fc1
    del fc1.meta["tensor_meta"]
    with pytest.raises(UnknownShapeError, match=fc1.name):
        find_activations(gm)
