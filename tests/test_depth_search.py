"""Depth selection: FLOPs options held to the counter, one-shot scores find redundant layers, the gated
search prunes the requested counts (alternating kinds, gates folded away) and, on a small ViT trained
here on scikit-learn's digits, a short fine-tune recovers accuracy."""
import copy
import itertools
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from conftest import MODELS, randomize, random_keep, traced
from passes.activation import ActivationRemoval
from passes.attention import AttentionRemoval
from passes.width import WidthPruning
from vitprune.api import replay
from vitprune.deps import DependencyGraph
from vitprune.deps.branches import find_activations, find_attention_branches
from vitprune.plan.depth import (DepthGate, apply_depth, depth_flops_options, event_order, gated_search,
                                 one_shot_scores, select_depth, stage_lengths, SearchLoss)
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


class _Mixed(nn.Module):
    """The released gate, written independently of vitprune: ``m·inner(u) + (1 − m)·u`` around a
    timm attention module (``u`` = LN1 output) or activation (``u`` = fc1 output), ``m`` settable."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.m = inner, 1.0

    def forward(self, u, **kwargs):
        return self.m * self.inner(u, **kwargs) + (1 - self.m) * u


def _labelled(n, batch=4, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n)]


def _adam(grads, lr):
    """Plain Adam on one scalar fed ``grads`` (the score's optimizer, weight decay 0 on 0-d params)."""
    p = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([p], lr=lr)
    for g in grads:
        p.grad = torch.tensor(float(g), dtype=torch.float64)
        opt.step()
    return p.item()


def test_stage_lengths_grow_as_the_released_multi_stage():
    assert stage_lengths(4, 3) == [3, 5, 7, 9, 11]  # train_stage1_step2.py --multi_stage [3, 5, 7, 9, ...]
    assert stage_lengths(2, 30) == [30, 50, 70]
    assert stage_lengths(3, 10, stage_growth=0) == [10, 10, 10, 10]


def test_score_is_the_signed_gradient_stepped_by_adam():
    """The score after the warm-up equals Adam run on ∂L/∂m measured by finite differences on an eager
    copy of the model with the released gate written out (float64), for every gate of both kinds."""
    model = randomize(MODELS["deit_tiny"](depth=2, num_classes=10))
    data = _labelled(2, batch=3)
    ref = copy.deepcopy(model).double().eval()
    mixed = {}
    for b, blk in enumerate(ref.blocks):
        blk.attn, blk.mlp.act = _Mixed(blk.attn), _Mixed(blk.mlp.act)
        mixed[("attention", b)], mixed[("activation", b)] = blk.attn, blk.mlp.act

    def dl_dm(gate, x, y, h=1e-4):
        losses = []
        for m in (1 + h, 1 - h):
            gate.m = m
            with torch.no_grad():
                losses.append(F.cross_entropy(ref(x.double()), y, label_smoothing=0.1).item())
        gate.m = 1.0
        return (losses[0] - losses[1]) / (2 * h)

    logs, lr = [], 1e-8  # weights move by ~lr: the second step's ∂L/∂m is measured on the same model
    sel = gated_search(traced(model), None, data, 0, 1, steps_per_event=2, lr=lr, candidate_share=1.0,
                       recovery_steps=0, log=logs.append)
    steps = [entry for entry in logs if "grads" in entry]
    assert len(steps) == 2 and sel.history[0]["step"] == 2
    for (kind, block), gate in mixed.items():
        want = [dl_dm(gate, x, y) for x, y in data]
        got = [s["grads"][kind][block] for s in steps]
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6)
        score = sel.history[0]["scores"][kind][block]
        assert np.sign(score) == np.sign(_adam(want, 1.0)) != 0  # moves against ∂L/∂m: up if the loss wants m
        np.testing.assert_allclose(score, _adam(want, lr), rtol=1e-3)


def test_scores_accumulate_over_the_whole_search_in_growing_windows():
    gm = traced(randomize(MODELS["deit_tiny"](depth=3, num_classes=10)))
    logs, lr = [], 1e-3
    sel = gated_search(gm, None, _labelled(3), n_attention=1, n_activation=2, steps_per_event=3, lr=lr,
                       candidate_share=1.0, log=logs.append)
    steps = [entry for entry in logs if "grads" in entry]
    # warm-up 3 steps, then 5 and 7 between events and 9 after the last: multi_stage [3, 5, 7, ...]
    assert [h["step"] for h in sel.history] == [3, 8, 15]
    assert Counter(s["window"] for s in steps) == {0: 3, 1: 5, 2: 7, 3: 9}
    assert [h["kind"] for h in sel.history] == event_order(1, 2)
    for h in sel.history + [{"step": len(steps), "scores": sel.scores}]:
        for kind, scores in h["scores"].items():
            for block, score in scores.items():
                grads = [s["grads"][kind][block] for s in steps[:h["step"]]]
                np.testing.assert_allclose(score, _adam(grads, lr), rtol=1e-4, atol=1e-9)
    since = {(k, b): _adam([s["grads"][k][b] for s in steps[8:15]], lr) for k, b in itertools.product(
        ("attention", "activation"), range(3))}  # what a reset at the second event would have left
    last = sel.history[2]["scores"]
    assert max(abs(last[k][b] - v) for (k, b), v in since.items()) > lr  # a reset: equal to ~1e-9
    pruned = {"attention": [], "activation": []}
    for h in sel.history:  # each event: the lowest accumulated score of its kind not yet pruned
        left = [b for b in range(3) if b not in pruned[h["kind"]]]
        assert h["block"] == min(left, key=lambda b: (h["scores"][h["kind"]][b], b))
        pruned[h["kind"]].append(h["block"])
    first = sel.history[0]  # a pruned gate's score keeps moving, as the released learn_mask does
    assert sel.scores["activation"][first["block"]] != first["scores"]["activation"][first["block"]]
    assert tuple(sel) == (sorted(pruned["attention"]), sorted(pruned["activation"]))


def test_first_stage_keeps_the_cheapest_single_removals_per_kind():
    """Stage 1 with lr=0: each layer's candidate loss is exactly the held-out loss of the model with
    only that layer removed (by the real passes, from the original weights); per kind, the lowest
    ``candidate_share`` become the candidates and the events prune only among them. Soft distillation
    (KL ≥ 0, 0 for a free removal) makes the redundant layers the unique cheapest ones."""
    gm = _with_redundant_layers()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(3)]
    kd = SearchLoss(ce_weight=0.0, kd_weight=1.0)
    sel = gated_search(gm, None, data, 1, 1, steps_per_event=1, lr=0.0, variant="drop", candidate_share=1 / 3,
                       candidate_steps=(2, 1), candidate_eval_batches=2, loss=kd)
    held_out = data[:2]  # drawn before any fine-tune
    for kind in ("attention", "activation"):
        losses = sel.candidate_losses[kind]
        assert sorted(losses) == [0, 1, 2]
        for block, loss in losses.items():
            one = ([block], []) if kind == "attention" else ([], [block])
            alone, _ = apply_depth(copy.deepcopy(gm), *one, variant="drop")
            with torch.no_grad():
                want = np.mean([kd(alone(x), gm(x), None).item() for x in held_out])
            np.testing.assert_allclose(loss, want, rtol=1e-4, atol=1e-7)
        assert sel.candidates[kind] == [min(losses, key=lambda b: (losses[b], b))]
    assert max(sel.candidate_losses["attention"][1], sel.candidate_losses["activation"][2]) < 1e-6
    assert sel.candidates == {"attention": [1], "activation": [2]}
    # lr=0: every score stays 0 and the tie would go to block 0; only candidates can be pruned
    assert all(v == 0 for s in sel.scores.values() for v in s.values())
    assert tuple(sel) == ([1], [2])


def test_gated_search_invariants():
    gm = traced(randomize(MODELS["deit_tiny"](depth=3)))
    code = gm.code
    data = _labelled(3, classes=1000)
    sel = gated_search(gm, None, data, n_attention=1, n_activation=2, steps_per_event=2, lr=1e-4)
    attention, activation = sel
    assert len(attention) == 1 and len(activation) == 2
    assert [h["kind"] for h in sel.history] == event_order(1, 2)
    # default stage 1: 2 of 3 layers per kind (8 of 12 in the released scripts); events stay inside
    assert {k: len(v) for k, v in sel.candidates.items()} == {"attention": 2, "activation": 2}
    assert set(attention) <= set(sel.candidates["attention"]) and set(activation) <= set(sel.candidates["activation"])
    assert gm.code == code  # the input graph is untouched
    model = sel.model
    assert not any(isinstance(m, DepthGate) or "gate" in n for n, m in model.named_modules())
    assert not any("gate" in str(n.target) for n in model.graph.nodes)
    assert len(find_attention_branches(model)) == 2 and len(find_activations(model)) == 1
    rebuilt = replay(MODELS["deit_tiny"](depth=3), sel.recipe, (3, 32, 32))
    rebuilt.load_state_dict(model.state_dict(), strict=True)

    given = gated_search(gm, None, data, 0, 1, steps_per_event=1, candidates_activation=[0], estimator="abs")
    assert tuple(given) == ([], [0]) and given.candidate_losses["activation"] == {}
    assert min(min(s.values()) for s in given.scores.values()) > 0  # Σ|∂L_i/∂m|, no optimizer
    for kwargs, match in [(dict(n_attention=4, n_activation=0), "candidates"),
                          (dict(n_attention=1, n_activation=0, estimator="adam"), "estimator"),
                          (dict(n_attention=1, n_activation=0, candidate_share=0), "candidate_share"),
                          (dict(n_attention=1, n_activation=0, candidate_steps=(3,)), "candidate_steps"),
                          (dict(n_attention=1, n_activation=0, candidates_attention=[7]), "attention")]:
        with pytest.raises(InputError, match=match):
            gated_search(gm, None, data, steps_per_event=1, **kwargs)
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

    sel = gated_search(gm, None, _batches(*train), n_attention=2, n_activation=2, steps_per_event=12, lr=1e-3)
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
