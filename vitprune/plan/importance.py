"""Channel importance, aggregated over every parameter slice a group owns.

* ``l2``: the L2 norm of all weights a channel owns (rows of qkv/fc1, columns of proj/fc2, norm
  weights, tokens ...), so a head is scored by everything that disappears with it.
* ``taylor``: first-order Taylor, sum over owned weights of ``|w · dL/dw|`` on calibration batches
  (the loss change when that weight is zeroed, to first order). Labels come from the data when given,
  else from the model's own predictions (a distillation-free pseudo-label loss: the KL to itself is 0
  and has no gradient).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from vitprune.deps import ChannelGroup, DependencyGraph
from vitprune.frontend.capture import param_tensor


def _per_position(t: torch.Tensor, dim: int, squared: bool = False) -> np.ndarray:
    """Sum (of squares, when ``squared``) over every dim but ``dim``, with no temporary copy."""
    others = [d for d in range(t.dim()) if d != dim]
    t = t.detach().float()
    if not others:
        return (t * t if squared else t).cpu().numpy()
    if squared:
        return torch.linalg.vector_norm(t, 2, dim=others).square().cpu().numpy()
    return t.sum(others).cpu().numpy()


def group_scores(dg: DependencyGraph, group: ChannelGroup, tensors: dict[str, torch.Tensor],
                 transform: str, cache: dict | None = None, squared: bool = False) -> np.ndarray:
    """Sum, over the group's members, of a per-element statistic (its square when ``squared``)
    gathered per channel."""
    cache = {} if cache is None else cache
    total = np.zeros(group.size)
    for m in group.members:
        values = tensors.get(m.param)
        if values is None:
            continue
        if (m.param, m.dim) not in cache:  # qkv rows serve the head and head-dim groups alike
            cache[m.param, m.dim] = _per_position(values, m.dim, squared)
        per_pos = cache[m.param, m.dim]
        valid = m.coords >= 0
        total += np.bincount(m.coords[valid], weights=per_pos[valid], minlength=group.size)
    return np.sqrt(total) if transform == "sqrt" else total


def l2_importance(dg: DependencyGraph, groups: list[ChannelGroup]) -> dict[str, np.ndarray]:
    names = {m.param for g in groups for m in g.members}
    weights = {name: param_tensor(dg.gm, name) for name in names}
    cache: dict = {}
    return {g.name: group_scores(dg, g, weights, "sqrt", cache, squared=True) for g in groups}


def taylor_importance(dg: DependencyGraph, groups: list[ChannelGroup],
                      batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]]) -> dict[str, np.ndarray]:
    gm = dg.gm
    params = dict(gm.named_parameters())
    saliency = {name: torch.zeros_like(p) for name, p in params.items()}
    was_training = gm.training
    gm.eval()  # deterministic (no dropout) while still computing gradients
    try:
        for images, labels in batches:
            gm.zero_grad(set_to_none=True)
            logits = gm(images)
            if labels is None:
                labels = logits.detach().argmax(-1)
            F.cross_entropy(logits, labels).backward()
            for name, p in params.items():
                if p.grad is not None:
                    saliency[name] += (p.detach() * p.grad).abs()
    finally:
        gm.zero_grad(set_to_none=True)
        gm.train(was_training)
    tensors = {name: saliency[name] for name in dg.param_dims if name in saliency}
    cache: dict = {}
    return {g.name: group_scores(dg, g, tensors, "none", cache) for g in groups}


def random_calibration(input_size: tuple[int, int, int], batches: int, batch_size: int,
                       seed: int) -> list[tuple[torch.Tensor, None]]:
    """Gaussian images when the user gives no data: enough to rank by Taylor, say so in reports."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn((batch_size, *input_size), generator=g), None) for _ in range(batches)]
