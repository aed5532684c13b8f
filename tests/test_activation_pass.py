"""Activation removal: equals the model whose GELU is replaced by the identity (plain, layer-scale,
width-pruned), merged or factorised by FLOPs, LayerNorm affine folded exactly, parameters deleted and
named deterministically (replay + load_state_dict), ONNX without Erf and with fewer MatMuls."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from conftest import MODELS, input_size, randomize, random_keep, traced
from passes import PASSES, PassError
from passes.activation import ActivationRemoval
from passes.width import WidthPruning
from vitprune.api import replay
from vitprune.deps import DependencyGraph
from vitprune.deps.branches import find_activations
from vitprune.deploy.onnx import export_onnx
from vitprune.deps.flops import count_flops

ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def identity_act_oracle(gm_or_model: nn.Module, blocks) -> nn.Module:
    """A copy whose block-``i`` activation is the identity: ``blocks.i.mlp.act`` swapped for
    ``nn.Identity`` in an eager model, the ``aten.gelu`` node bypassed in a captured graph."""
    oracle = copy.deepcopy(gm_or_model)
    if not isinstance(oracle, torch.fx.GraphModule):
        for i in blocks:
            oracle.get_submodule(f"blocks.{i}.mlp").act = nn.Identity()
        return oracle
    sites = {s.index: s for s in find_activations(oracle)}
    for i in blocks:
        act = sites[i].act
        act.replace_all_uses_with(act.args[0])
        oracle.graph.erase_node(act)
    oracle.recompile()
    return oracle


def _x(gm, n=3, seed=1):
    return torch.randn((n, *gm.meta["example_input"].shape[1:]), generator=torch.Generator().manual_seed(seed))


def _nparams(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _prune_hidden(gm, keep: int) -> dict:
    dg = DependencyGraph.build(gm)
    keep_map = {g.name: list(range(keep)) for g in dg.prunable_groups() if g.kind == "hidden"}
    return WidthPruning(keep_map)(gm).recipe


@pytest.mark.parametrize("merge", ["auto", "always", "never"])
@pytest.mark.parametrize("name", ["deit_tiny", "deit3_small", "vit_base_clip"])
def test_equals_gelu_replaced_by_identity(name, merge):
    model = randomize(MODELS[name]())
    gm = traced(model)
    n_model = _nparams(model)
    result = ActivationRemoval([1], merge)(gm)
    x = _x(gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), identity_act_oracle(model, [1])(x), atol=ATOL, rtol=0)
        assert (gm(x) - model(x)).abs().max() > 1e-3
    assert result.removed["merged"] == ([] if merge == "never" else [1])
    assert _nparams(model) == n_model  # the traced-from model is left alone
    assert [s.index for s in find_activations(gm)] == [0]


@pytest.mark.parametrize("fold_norm", [False, True])
@pytest.mark.parametrize("merge", ["auto", "never"])
def test_after_width_pruning(merge, fold_norm):
    gm = traced(randomize(MODELS["deit3_small"]()))
    dg = DependencyGraph.build(gm)
    rng = np.random.default_rng(0)
    WidthPruning({g.name: random_keep(g.size, 0.6, rng) for g in dg.prunable_groups()})(gm)
    oracle = identity_act_oracle(gm, [0, 1])
    ActivationRemoval([0, 1], merge, fold_norm)(gm)
    x = _x(gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), oracle(x), atol=ATOL, rtol=0)


def test_merged_parameters_are_the_product_and_counts_drop_exactly():
    model = randomize(MODELS["deit_tiny"]())
    gm = traced(model)
    d, h = 192, 768
    before, flops_before = _nparams(gm), count_flops(gm, gm.meta["example_input"])
    result = ActivationRemoval([0])(gm)
    assert before - _nparams(gm) == (2 * d * h + h + d) - (d * d + d)
    fc1, fc2 = model.blocks[0].mlp.fc1, model.blocks[0].mlp.fc2
    merged = gm.get_submodule("blocks.0.mlp.merged")
    torch.testing.assert_close(merged.weight, fc2.weight @ fc1.weight, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(merged.bias, fc2.weight @ fc1.bias + fc2.bias, atol=1e-6, rtol=1e-5)
    assert set(result.removed["parameters"]) == {f"blocks.0.mlp.{p}" for p in ("fc1.weight", "fc1.bias",
                                                                                  "fc2.weight", "fc2.bias")}
    assert not any(n.startswith(("blocks.0.mlp.fc1", "blocks.0.mlp.fc2")) for n, _ in gm.named_parameters())
    tokens = 1 + (32 // 16) ** 2
    assert flops_before - count_flops(gm, gm.meta["example_input"]) == 2 * tokens * (2 * d * h - d * d)


@pytest.mark.parametrize("hidden, merged", [(64, False), (96, False), (112, True), (768, True)])
def test_merge_or_factorise_is_decided_by_flops(hidden, merged):
    """d = 192: one d×d linear is cheaper than d×h + h×d exactly when h > d/2 = 96."""
    model = randomize(MODELS["deit_tiny"]())
    gm = traced(model)
    if hidden < 768:
        _prune_hidden(gm, hidden)
    oracle = identity_act_oracle(gm, [0])
    flops_before = count_flops(gm, gm.meta["example_input"])
    result = ActivationRemoval([0], "auto")(gm)
    assert result.removed["merged"] == ([0] if merged else [])
    names = {n for n, _ in gm.named_parameters()}
    assert ("blocks.0.mlp.merged.weight" in names) == merged
    assert ("blocks.0.mlp.fc1.weight" in names) == (not merged)
    saved = flops_before - count_flops(gm, gm.meta["example_input"])
    assert saved >= 0 and (saved > 0) == merged  # never more FLOPs than the factorised form
    x = _x(gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), oracle(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("merge", ["always", "never"])
def test_fold_norm_is_exact_and_strips_the_affine(merge):
    model = randomize(MODELS["deit3_small"]())
    gm = traced(model)
    ActivationRemoval([0], merge, fold_norm=True)(gm)
    x = _x(gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), identity_act_oracle(model, [0])(x), atol=ATOL, rtol=0)
    names = {n for n, _ in gm.named_parameters()}
    assert not {"blocks.0.norm2.weight", "blocks.0.norm2.bias"} & names
    assert "blocks.1.norm2.weight" in names
    norms = [n for n in gm.graph.nodes if n.target is torch.ops.aten.layer_norm.default]
    assert sum(len(n.args) > 3 and n.args[2] is None and n.args[3] is None for n in norms) == 1


def test_replay_and_load_state_dict_reproduce_outputs():
    model = randomize(MODELS["deit_tiny"](depth=3))
    gm = traced(model)
    recipe = [_prune_hidden(gm, 64)]  # h = 64 < d/2: "auto" keeps these factorised
    recipe.append(ActivationRemoval([2], "auto", fold_norm=True)(gm).recipe)
    recipe.append(ActivationRemoval([0], "always")(gm).recipe)
    assert recipe[1] == {"pass": "activation", "blocks": [2], "merge": "auto", "fold_norm": True}
    assert PASSES["activation"] is ActivationRemoval
    with torch.no_grad():
        for p in gm.parameters():
            p.mul_(1.01)
    rebuilt = replay(MODELS["deit_tiny"](depth=3), recipe, input_size(model))
    rebuilt.load_state_dict(gm.state_dict(), strict=True)
    x = _x(gm)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), gm(x), atol=ATOL, rtol=0)


def test_refusals():
    gm = traced(MODELS["deit_tiny"]())
    ActivationRemoval([1])(gm)
    with pytest.raises(PassError, match="already removed"):
        ActivationRemoval([1])(gm)
    with pytest.raises(PassError, match="index 5"):
        ActivationRemoval([5])(gm)
    with pytest.raises(PassError, match="merge"):
        ActivationRemoval([0], merge="sometimes")
    assert not ActivationRemoval([])(gm).modified


def test_onnx_has_no_erf_and_fewer_matmuls(tmp_path):
    model = randomize(MODELS["deit_tiny"]())
    gm = traced(model)
    x1 = gm.meta["example_input"][:1]
    before = export_onnx(copy.deepcopy(gm), x1, tmp_path / "a.onnx", parity_batches=(1,))["op_counts"]
    ActivationRemoval([0, 1], fold_norm=True)(gm)
    report = export_onnx(gm, x1, tmp_path / "b.onnx", opset=18, parity_batches=(1, 2))
    after = report["op_counts"]
    assert max(report["parity_max_abs_err"].values()) <= 1e-4
    assert before.get("Erf", 0) + before.get("Gelu", 0) == 2
    assert after.get("Erf", 0) + after.get("Gelu", 0) == 0
    matmuls = lambda c: c.get("MatMul", 0) + c.get("Gemm", 0)  # noqa: E731
    assert matmuls(after) == matmuls(before) - 2
