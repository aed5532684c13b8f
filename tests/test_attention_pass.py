"""Attention removal: equals the model whose attention module is replaced by the identity on LN1(x)
(or by zero, for "drop"), on both attention paths, with layer-scale, q/k-norm, register and
distillation tokens, after width pruning; parameters really deleted; recipes replay; ONNX."""
import copy

import numpy as np
import pytest
import torch
import torch.fx as fx
from torch import nn

from conftest import MODELS, input_size, randomize, random_keep, traced
from passes import PASSES, PassError
from passes.attention import AttentionRemoval
from passes.width import WidthPruning
from vitprune.api import replay
from vitprune.deps import DependencyGraph
from vitprune.deps.branches import find_attention_branches
from vitprune.deploy.onnx import export_onnx, onnx_op_counts

ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


class _Identity(nn.Module):
    def forward(self, x, *args, **kwargs):
        return x


class _Zero(nn.Module):
    def forward(self, x, *args, **kwargs):
        return torch.zeros_like(x)


def eager_oracle(model: nn.Module, blocks, variant: str) -> nn.Module:
    """The original eager timm model with ``blocks[i].attn`` swapped out (independent of fx)."""
    oracle = copy.deepcopy(model)
    for i in blocks:
        oracle.blocks[i].attn = _Identity() if variant == "identity_norm" else _Zero()
    return oracle


def _scope(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def graph_oracle(gm: fx.GraphModule, blocks, variant: str):
    """For graphs with no eager twin (width-pruned): an interpreter that, at the last node of module
    ``blocks.i.attn``, returns the output of ``blocks.i.norm1`` (or zeros) instead."""
    frozen = copy.deepcopy(gm)
    nodes = list(frozen.graph.nodes)
    swap = {}
    for i in blocks:
        out = [n for n in nodes if f"blocks.{i}.attn" in [v[0] for v in (n.meta.get("nn_module_stack") or {}).values()]]
        norm = [n for n in nodes if _scope(n) == f"blocks.{i}.norm1" and n.op == "call_function"]
        swap[out[-1]] = norm[-1] if variant == "identity_norm" else None

    class Swap(fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if n in swap:
                return self.env[swap[n]] if swap[n] is not None else torch.zeros_like(result)
            return result

    assert len(swap) == len(blocks)
    return lambda x: Swap(frozen, garbage_collect_values=False).run(x)


def _x(gm, n=3, seed=1):
    return torch.randn((n, *gm.meta["example_input"].shape[1:]), generator=torch.Generator().manual_seed(seed))


def _nparams(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "matmul_softmax"])
@pytest.mark.parametrize("variant", ["identity_norm", "drop"])
@pytest.mark.parametrize("name", ["deit_tiny", "deit3_small", "qk_norm", "dinov2_reg4", "deit_small_distilled"])
def test_equals_attention_replaced(name, variant, fused):
    model = randomize(MODELS[name](fused=fused))
    gm = traced(model)
    before = _nparams(gm)
    result = AttentionRemoval([1], variant)(gm)
    x = _x(gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), eager_oracle(model, [1], variant)(x), atol=ATOL, rtol=0)
        assert (gm(x) - model(x)).abs().max() > 1e-3  # the oracle is not the original model
    # parameters really deleted, by exactly the attention module (+ layer-scale, + LN1 when dropped)
    block = model.blocks[1]
    expected = _nparams(block.attn) + _nparams(block.ls1)
    if variant == "drop":
        expected += _nparams(block.norm1)
    assert before - _nparams(gm) == expected
    assert sum(result.removed["parameters"].values()) == expected
    names = [n for n, _ in gm.named_parameters()] + [str(n.target) for n in gm.graph.nodes if n.op == "get_attr"]
    assert not [n for n in names if n.startswith(("blocks.1.attn.", "blocks.1.ls1."))]
    assert not any(m.startswith("blocks.1.attn") for m, _ in gm.named_modules())
    assert [b.index for b in find_attention_branches(gm)] == [0]


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "matmul_softmax"])
@pytest.mark.parametrize("variant", ["identity_norm", "drop"])
@pytest.mark.parametrize("name", ["deit3_small", "qk_norm", "dinov2_reg4"])
def test_after_width_pruning(name, variant, fused):
    model = randomize(MODELS[name](fused=fused))
    gm = traced(model)
    dg = DependencyGraph.build(gm)
    rng = np.random.default_rng(0)
    WidthPruning({g.name: random_keep(g.size, 0.6, rng) for g in dg.prunable_groups()})(gm)
    oracle = graph_oracle(gm, [0], variant)
    attn_params = _nparams(gm.get_submodule("blocks.0.attn"))
    before = _nparams(gm)
    AttentionRemoval([0], variant)(gm)
    x = _x(gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), oracle(x), atol=ATOL, rtol=0)
    assert before - _nparams(gm) >= attn_params > 0


def test_all_blocks_and_index_stability():
    """Removing blocks one pass at a time, by original index, equals removing them together."""
    model = randomize(MODELS["deit3_small"](depth=3))
    together, apart = traced(model), traced(model)
    AttentionRemoval([0, 2])(together)
    AttentionRemoval([2])(apart)
    AttentionRemoval([0])(apart)  # block 0 is still "0"; block 2 stays "2" in the record
    x = _x(together)
    with torch.no_grad():
        torch.testing.assert_close(apart(x), together(x), atol=ATOL, rtol=0)
        torch.testing.assert_close(together(x), eager_oracle(model, [0, 2], "identity_norm")(x), atol=ATOL, rtol=0)
    assert [b.index for b in find_attention_branches(apart)] == [1]
    with pytest.raises(PassError, match="already removed"):
        AttentionRemoval([2])(apart)
    with pytest.raises(PassError, match="no attention branch 7"):
        AttentionRemoval([7])(apart)
    with pytest.raises(PassError, match="variant"):
        AttentionRemoval([1], "zero")


def test_layer_scale_is_folded_into_the_norm():
    model = randomize(MODELS["deit3_small"]())
    gm = traced(model)
    result = AttentionRemoval([0])(gm)
    assert result.removed["layer_scale_folded"] == [0]
    expected = model.blocks[0].norm1.weight * model.blocks[0].ls1.gamma
    torch.testing.assert_close(gm.get_submodule("blocks.0.norm1").weight, expected)


def test_replay_and_load_state_dict_reproduce_outputs():
    model = randomize(MODELS["deit3_small"](fused=False))
    gm = traced(model)
    dg = DependencyGraph.build(gm)
    rng = np.random.default_rng(3)
    recipe = [WidthPruning({g.name: random_keep(g.size, 0.5, rng) for g in dg.prunable_groups()
                            if g.kind == "hidden"})(gm).recipe]
    recipe.append(AttentionRemoval([1], "identity_norm")(gm).recipe)
    recipe.append(AttentionRemoval([0], "drop")(gm).recipe)
    with torch.no_grad():  # train a little differently: the state dict must carry the values
        for p in gm.parameters():
            p.add_(0.01)
    assert recipe[1] == {"pass": "attention", "blocks": [1], "variant": "identity_norm"}
    assert PASSES["attention"] is AttentionRemoval
    fresh = copy.deepcopy(MODELS["deit3_small"](fused=False))
    rebuilt = replay(fresh, recipe, input_size(model))
    rebuilt.load_state_dict(gm.state_dict(), strict=True)
    x = _x(gm)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), gm(x), atol=ATOL, rtol=0)


def test_onnx_export_has_fewer_matmuls(tmp_path):
    model = randomize(MODELS["deit_tiny"]())
    gm = traced(model)
    before = onnx_op_counts(export_onnx(copy.deepcopy(gm), gm.meta["example_input"][:1], tmp_path / "a.onnx",
                                        parity_batches=(1,))["path"])
    AttentionRemoval([0])(gm)
    report = export_onnx(gm, gm.meta["example_input"][:1], tmp_path / "b.onnx", opset=18, parity_batches=(1, 2))
    after = report["op_counts"]
    assert max(report["parity_max_abs_err"].values()) <= 1e-4
    matmuls = lambda c: c.get("MatMul", 0) + c.get("Gemm", 0)  # noqa: E731
    assert matmuls(after) == matmuls(before) - 4  # qkv, q·k, attn·v, proj
    assert after.get("Softmax", 0) == before.get("Softmax", 0) - 1
