"""Depth selection: FLOPs options held to the counter, one-shot scores find redundant layers, the gated
search prunes the requested counts (alternating kinds, gates folded away) and, on a small ViT trained
here on scikit-learn's digits, a short fine-tune recovers accuracy."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from conftest import MODELS, randomize, random_keep, traced
from passes.activation import ActivationRemoval
from passes.attention import AttentionRemoval
from passes.width import WidthPruning
from vitprune.api import replay
from vitprune.deps import DependencyGraph
from vitprune.deps.branches import find_activations, find_attention_branches
from vitprune.plan.depth import (DepthGate, apply_depth, depth_flops_options, event_order, gated_search,
                            one_shot_scores, select_depth)
from vitprune.errors import InputError
from vitprune.deps.flops import count_flops
from vitprune.frontend.capture import capture


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def _rewritten_flops(gm, attention, activation, merge="auto"):
    g = copy.deepcopy(gm)
    AttentionRemoval(attention)(g)
    ActivationRemoval(activation, merge)(g)
    return count_flops(g, g.meta["example_input"])


@pytest.mark.parametrize("width_pruned", [False, True])
def test_depth_flops_options_match_the_counter(width_pruned):
    gm = traced(MODELS["deit3_small"](depth=3))
    if width_pruned:  # blocks of different widths: savings differ per block, and order matters
        dg = DependencyGraph.build(gm)
        rng = np.random.default_rng(0)
        keep = {g.name: random_keep(g.size, rng.uniform(0.2, 0.9), rng) for g in dg.prunable_groups()}
        WidthPruning(keep)(gm)
    order_a, order_j = [2, 0, 1], [1, 2, 0]
    options = depth_flops_options(gm, attention_order=order_a, activation_order=order_j)
    assert len(options) == 16 and options[(0, 0)] == count_flops(gm, gm.meta["example_input"])
    for k, j in [(1, 0), (0, 1), (2, 1), (3, 3), (1, 2)]:
        assert options[(k, j)] == _rewritten_flops(gm, order_a[:k], order_j[:j]), (k, j)
    never = depth_flops_options(gm, merge="never")
    assert never[(0, 3)] == never[(0, 0)]  # factorised: the linears stay, GELU costs no FLOPs


def test_event_order_alternates_kinds_the_more_numerous_first():
    assert event_order(2, 3) == ["activation", "attention", "activation", "attention", "activation"]
    assert event_order(2, 2) == ["activation", "attention", "activation", "attention"]
    assert event_order(3, 1) == ["attention", "activation", "attention", "attention"]
    assert event_order(0, 2) == ["activation", "activation"]


def _with_redundant_layers():
    """deit_tiny, 3 blocks; attention 1 outputs zeros (dropping it is free) and activation 2 sits
    where GELU(z) = z (fc1 outputs ≫ 0), so removing it changes nothing."""
    model = randomize(MODELS["deit_tiny"](depth=3))
    with torch.no_grad():
        model.blocks[1].attn.proj.weight.zero_()
        model.blocks[1].attn.proj.bias.zero_()
        model.blocks[2].mlp.fc1.bias.fill_(60.0)
    return traced(model)


def test_one_shot_scores_find_redundant_layers():
    gm = _with_redundant_layers()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]
    code = gm.code
    attn, act = one_shot_scores(gm, batches, variant="drop")
    assert gm.code == code and not any(isinstance(m, DepthGate) for m in gm.modules())
    assert sorted(attn) == sorted(act) == [0, 1, 2]
    assert attn[1] == 0.0 and min(attn[0], attn[2]) > 1e-4
    assert act[2] < 1e-3 * min(act[0], act[1])
    sel = select_depth(gm, 1, 1, mode="one_shot", batches=batches, variant="drop")
    assert tuple(sel) == ([1], [2])
    assert [b.index for b in find_attention_branches(sel.model)] == [0, 2]
    assert sel.recipe[0] == {"pass": "attention", "blocks": [1], "variant": "drop"}
    x = batches[0]
    with torch.no_grad():  # removing the redundant layers leaves the function (almost) unchanged
        torch.testing.assert_close(sel.model(x), gm(x), atol=1e-3, rtol=0)


def test_gated_search_invariants():
    gm = traced(randomize(MODELS["deit_tiny"](depth=3)))
    code = gm.code
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 1000, (4,), generator=g))
            for _ in range(3)]
    sel = gated_search(gm, None, data, n_attention=1, n_activation=2, steps_per_event=2, lr=1e-4)
    attention, activation = sel
    assert len(attention) == 1 and len(activation) == 2
    assert [h["kind"] for h in sel.history] == event_order(1, 2)
    assert gm.code == code  # the input graph is untouched
    model = sel.model
    assert not any(isinstance(m, DepthGate) or "gate" in n for n, m in model.named_modules())
    assert not any("gate" in str(n.target) for n in model.graph.nodes)
    assert len(find_attention_branches(model)) == 2 and len(find_activations(model)) == 1
    rebuilt = replay(MODELS["deit_tiny"](depth=3), sel.recipe, (3, 32, 32))
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    with pytest.raises(InputError, match="candidates"):
        gated_search(gm, None, data, n_attention=4, n_activation=0, steps_per_event=1)
    with pytest.raises(InputError, match="mode"):
        select_depth(gm, 1, 1, mode="random", batches=data)


# -- a real (tiny) dataset ---------------------------------------------------------------------------
def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = (F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False) - 0.5) / 0.5
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def _batches(x, y, size=64, seed=0):
    p = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return [(x[p[i:i + size]], y[p[i:i + size]]) for i in range(0, len(x) - size + 1, size)]


def _train(model, data, steps, lr, teacher=None):
    """Plain AdamW + cosine loop; CE, plus KL to ``teacher`` when given (stage-2 distillation)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    step = 0
    while step < steps:
        for xb, yb in _batches(*data, seed=step):
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            if teacher is not None:
                with torch.no_grad():
                    t = teacher(xb)
                loss = loss + F.kl_div(F.log_softmax(out, -1), F.log_softmax(t, -1), reduction="batchmean",
                                       log_target=True)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step == steps:
                break
    return model.eval()


def _accuracy(model, data) -> float:
    model.eval()
    with torch.no_grad():
        return (model(data[0]).argmax(-1) == data[1]).float().mean().item()


def test_gated_search_on_digits_then_fine_tune_recovers():
    train, test = _digits()
    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=4,
                              num_heads=4, mlp_ratio=4)
    _train(model, train, 300, 3e-3)
    gm = capture(model, train[0][:2])
    base = _accuracy(gm, test)
    assert base > 0.85

    sel = gated_search(gm, None, _batches(*train), n_attention=2, n_activation=2, steps_per_event=25, lr=1e-3)
    attention, activation = sel
    assert len(attention) == len(set(attention)) == 2 and len(activation) == len(set(activation)) == 2
    assert [h["kind"] for h in sel.history] == ["activation", "attention", "activation", "attention"]
    assert len(find_attention_branches(sel.model)) == 2 and len(find_activations(sel.model)) == 2
    assert not any(isinstance(m, DepthGate) for m in sel.model.modules())

    raw, _ = apply_depth(copy.deepcopy(gm), attention, activation)  # pruned, original weights
    raw_acc = _accuracy(raw, test)
    searched_acc = _accuracy(sel.model, test)  # the search trains the weights with the gates
    tuned = _train(copy.deepcopy(raw), train, 120, 1e-3, teacher=gm)  # stage 2: distillation
    tuned_acc = _accuracy(tuned, test)
    print(f"digits: base {base:.3f}, pruned {raw_acc:.3f}, search {searched_acc:.3f}, tuned {tuned_acc:.3f}, "
          f"removed attention {attention}, activation {activation}")
    assert raw_acc > 0.3, "the search removed layers the model cannot do without (see gated_search, Score)"
    assert tuned_acc > max(0.6, raw_acc + 0.05), (base, raw_acc, tuned_acc)
    assert searched_acc > max(0.6, raw_acc), (base, raw_acc, searched_acc)
