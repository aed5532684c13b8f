"""The pass contract: every pass that claims ``preserves_computation`` keeps outputs equal (1e-5) on
several models — an honest claim, checked by comparing outputs, never by counting nodes — and the
manager names the failing pass and the passes before it."""
import copy

import pytest
import torch

from conftest import MODELS, randomize, traced
from passes import PASSES, Cleanup, PassError, PassFailure, PassManager
from passes.attention import AttentionRemoval
from passes.base import Pass, PassResult
from passes.width import WidthPruning
from vitprune.deps import DependencyGraph

ATOL = 1e-5


def _instances(cls: type[Pass], gm) -> list[Pass]:
    """Instances of a pass to hold to its claim (a pass that claims it must be constructible here)."""
    if cls is Cleanup:
        return [Cleanup()]
    raise AssertionError(f"add instances of {cls.__name__} to the contract test")


PRESERVING = sorted(name for name, cls in PASSES.items() if cls.preserves_computation)


def test_the_claims_are_what_the_passes_do():
    assert PRESERVING == ["cleanup"]  # width, depth and token passes change the function on purpose
    assert all(not PASSES[n].preserves_computation for n in ("width", "attention", "activation", "tokens",
                                                            "merging"))


@pytest.mark.parametrize("name", PRESERVING)
@pytest.mark.parametrize("model_name", ["deit_tiny", "deit3_small", "qk_norm", "dinov2_reg4"])
def test_preserving_passes_keep_outputs(name, model_name):
    model = randomize(MODELS[model_name]())
    gm = traced(model)
    # leave something for the pass to do: an identity reshape and an unread parameter
    x_node = next(n for n in gm.graph.nodes if n.op == "placeholder")
    with gm.graph.inserting_after(x_node):
        same = gm.graph.call_function(torch.ops.aten.reshape.default, (x_node, [-1, *x_node.meta["tensor_meta"].shape[1:]]))
    x_node.replace_all_uses_with(same, delete_user_cb=lambda u: u is not same)
    same.meta["tensor_meta"] = x_node.meta["tensor_meta"]
    gm.register_parameter("unread", torch.nn.Parameter(torch.ones(3)))
    gm.recompile()
    x = torch.randn(3, *gm.meta["example_input"].shape[1:])
    with torch.no_grad():
        want = gm(x)
    for p in _instances(PASSES[name], gm):
        result = p(copy.deepcopy(gm))
        assert result.modified
        with torch.no_grad():
            torch.testing.assert_close(result.graph_module(x), want, atol=ATOL, rtol=0)
        assert "unread" not in dict(result.graph_module.named_parameters())
        assert not any(n.target is torch.ops.aten.reshape.default and n.args[0].op == "placeholder"
                       for n in result.graph_module.graph.nodes)


def test_cleanup_on_a_clean_graph_changes_nothing():
    gm = traced(MODELS["deit_tiny"]())
    assert not Cleanup()(gm).modified


def test_manager_names_the_failing_pass_and_what_ran_before():
    gm = traced(MODELS["deit_tiny"]())
    manager = PassManager()
    manager.apply(AttentionRemoval([0]), gm)
    with pytest.raises(PassError, match=r"pass 'attention' \(after: attention\): .*block 0 was already removed"):
        manager.apply(AttentionRemoval([0]), gm)

    class Broken(Pass):
        name = "broken"

        def call(self, gm):
            return PassResult(gm, modified=True, expect={})

        def ensures(self, result):
            raise RuntimeError("postcondition violated")

    with pytest.raises(PassFailure, match=r"pass 'broken' \(after: attention\): RuntimeError: postcondition"):
        manager.apply(Broken(), gm)
    assert manager.ran == ["attention"]


def test_manager_applies_a_sequence_and_keeps_the_recipes_that_replay_it():
    gm = traced(MODELS["deit_tiny"]())
    manager = PassManager()
    gm, recipe = manager.apply_all([AttentionRemoval([1]), AttentionRemoval([]), Cleanup()], gm)
    assert manager.ran == ["attention", "attention", "cleanup"]
    assert recipe[0] == {"pass": "attention", "blocks": [1], "variant": "identity_norm"}
    assert all(step for step in recipe)  # a pass that changed nothing leaves no empty step


def test_passes_keep_no_state_between_call_and_ensures():
    """What ensures checks travels in the result: two graphs, one pass object, no cross-talk."""
    a, b = traced(MODELS["deit_tiny"]()), traced(MODELS["deit_tiny"]())
    group = next(g for g in DependencyGraph.build(a).prunable_groups() if g.kind == "hidden")
    p = WidthPruning({group.name: list(range(100))})
    result_a = p.call(a)
    p(b)  # a second use of the same object in between
    p.ensures(result_a)
    assert result_a.expect["shapes"] and not vars(p).keys() - {"keep"}
