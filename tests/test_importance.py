"""Importance scores: L2 of every weight a channel owns, aggregated over the group's members."""
import numpy as np
import torch

from conftest import MODELS, traced
from vitprune.deps import DependencyGraph
from vitprune.plan.importance import l2_importance


def test_l2_scores_sum_every_owned_weight():
    gm = traced(MODELS["deit_tiny"]())
    dg = DependencyGraph.build(gm)
    groups = [g for g in dg.prunable_groups() if g.kind in ("head", "hidden")]
    scores = l2_importance(dg, groups)
    p = dict(gm.named_parameters())
    head = next(g for g in groups if g.kind == "head" and "blocks.0." in g.name)
    qkv_w = p["blocks.0.attn.qkv.weight"].detach().view(3, 3, 64, -1)
    qkv_b = p["blocks.0.attn.qkv.bias"].detach().view(3, 3, 64)
    proj_w = p["blocks.0.attn.proj.weight"].detach().view(-1, 3, 64)
    want = [float((qkv_w[:, h] ** 2).sum() + (qkv_b[:, h] ** 2).sum() + (proj_w[:, h] ** 2).sum()) ** 0.5
            for h in range(3)]
    np.testing.assert_allclose(scores[head.name], want, rtol=1e-5)
    hidden = next(g for g in groups if g.kind == "hidden" and "blocks.1." in g.name)
    fc1_w, fc1_b = p["blocks.1.mlp.fc1.weight"].detach(), p["blocks.1.mlp.fc1.bias"].detach()
    fc2_w = p["blocks.1.mlp.fc2.weight"].detach()
    want = torch.sqrt((fc1_w ** 2).sum(1) + fc1_b ** 2 + (fc2_w ** 2).sum(0)).numpy()
    np.testing.assert_allclose(scores[hidden.name], want, rtol=1e-5)
