"""The external baseline row: Torch-Pruning's recommended timm ViT recipe (``tp_width``).

``torch_pruning`` is optional (``pip install torch-pruning``) and imported only when the row runs;
timm is a dependency of vitprune. Importing this module registers the row.
"""
from __future__ import annotations

import copy
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention
from torch import nn

from vitprune.deps.flops import count_flops
from vitprune.errors import PlanError
from vitprune.plan.budget import Budget
from vitprune.sweep.config import Method, PointContext, Pruned, SweepConfig, register

#: The largest uniform ratio tried, and how many bisection steps search below it.
_MAX_RATIO = 0.95
_BISECT_STEPS = 12
#: Torch-Pruning's example rounds channels to multiples of 2.
_TP_ROUND_TO = 2


def _tp_attention_forward(self: Attention, x: torch.Tensor, attn_mask: Any = None, is_causal: bool = False,
                          **_: Any) -> torch.Tensor:
    """timm's Attention.forward as Torch-Pruning's ViT example rewrites it (``reshape(B, N, -1)`` so
    the attention width may differ from the input width), plus ``scale=self.scale``: the example
    leaves SDPA's default 1/sqrt(head_dim), which changes the function once head_dim shrinks; keeping
    the original scale is the fairer baseline."""
    B, N, _ = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
    x = x.transpose(1, 2).reshape(B, N, -1)
    x = self.norm(x) if hasattr(self, "norm") else x
    x = self.proj(x)
    return self.proj_drop(x)


def _patch_attention(m: nn.Module) -> dict[nn.Module, int]:
    """Swap in the example's forward; returns Torch-Pruning's ``num_heads`` hints ``{qkv: heads}``."""
    num_heads = {}
    for mod in m.modules():
        if isinstance(mod, Attention):
            mod.forward = _tp_attention_forward.__get__(mod, Attention)
            num_heads[mod.qkv] = mod.num_heads
    return num_heads


def tp_prune(model: nn.Module, ratio: float, input_size: Sequence[int], *, importance: str = "l2",
             calib: Iterable | None = None, round_to: int = _TP_ROUND_TO) -> nn.Module:
    """Torch-Pruning's recommended timm ViT recipe (examples/transformers/prune_timm_vit.py):
    ``MetaPruner`` with a uniform (not global) ``pruning_ratio``, the classifier ignored, ``num_heads``
    hints, ``prune_head_dims=True`` / ``prune_num_heads=False`` (their default), ``round_to=2``;
    ``GroupMagnitudeImportance(p=2)`` or ``GroupTaylorImportance`` (their DeiT script) with gradients
    from ``calib``; afterwards ``num_heads``/``head_dim`` patched as the example does."""
    import torch_pruning as tp  # optional: only this row needs it

    m = copy.deepcopy(model).eval()
    if not hasattr(m, "blocks") or not any(isinstance(x, Attention) for x in m.modules()):
        raise PlanError("tp_width needs a timm VisionTransformer (Attention modules) as in Torch-Pruning's example")
    num_heads = _patch_attention(m)
    imp = tp.importance.GroupTaylorImportance() if importance == "taylor" else \
        tp.importance.GroupMagnitudeImportance(p=2)
    ignored = [m.head] if isinstance(getattr(m, "head", None), nn.Module) else []
    pruner = tp.pruner.MetaPruner(m, torch.randn(1, *input_size), global_pruning=False, importance=imp,
                                  pruning_ratio=ratio, ignored_layers=ignored, num_heads=num_heads,
                                  prune_num_heads=False, prune_head_dims=True, round_to=round_to)
    if importance == "taylor":
        m.zero_grad()
        for images, labels in calib or []:
            nn.functional.cross_entropy(m(images), labels).backward()
    pruner.step()
    m.zero_grad(set_to_none=True)
    for mod in m.modules():
        if isinstance(mod, Attention):
            mod.num_heads = pruner.num_heads[mod.qkv]
            mod.head_dim = mod.qkv.out_features // (3 * mod.num_heads)
            mod.attn_dim = mod.num_heads * mod.head_dim
    return m


def _tp_flops(model: nn.Module, ratio: float, input_size: Sequence[int]) -> int:
    """FLOPs after Torch-Pruning at ``ratio`` (shapes only: the default importance)."""
    return count_flops(tp_prune(model, ratio, input_size), torch.zeros(1, *input_size))


def _bisect_ratio(model: nn.Module, budget: Budget, input_size: Sequence[int]) -> float:
    """The uniform ratio whose FLOPs land nearest the goal (stop once within half the tolerance)."""
    if budget.above(_tp_flops(model, _MAX_RATIO, input_size)):
        raise PlanError(f"Torch-Pruning's uniform ratio {_MAX_RATIO} stays above the target {budget.goal}")
    lo, hi = 0.0, _MAX_RATIO
    best = (1.0, 0.0)  # (FLOPs ratio, pruning ratio)
    for _ in range(_BISECT_STEPS):
        mid = (lo + hi) / 2
        r = budget.ratio(_tp_flops(model, mid, input_size))
        if abs(r - budget.goal) < abs(best[0] - budget.goal):
            best = (r, mid)
        if abs(r - budget.goal) <= budget.tolerance / 2:
            break
        lo, hi = (mid, hi) if r > budget.goal else (lo, mid)
    return best[1]


def _tp_width(model: nn.Module, target: float, ctx: PointContext) -> Pruned:
    """Bisect Torch-Pruning's uniform ratio to the FLOPs target (uniform ratios give the same shapes
    whatever the importance, so the search uses magnitudes), then prune with the configured importance."""
    budget = Budget(count_flops(model, torch.zeros(1, *ctx.input_size)), target)
    ratio = _bisect_ratio(model, budget, ctx.input_size)
    m = tp_prune(model, ratio, ctx.input_size, importance=ctx.config.tp_importance, calib=ctx.calib)
    return Pruned(m, {"kind": "tp", "ratio": round(ratio, 6), "round_to": _TP_ROUND_TO},
                  {"tp_pruning_ratio": ratio, "tp_importance": ctx.config.tp_importance})


def _tp_scale(arch: dict[str, Any], src_model: nn.Module, src_size: Sequence[int], dst_model: nn.Module,
              dst_size: Sequence[int], config: SweepConfig) -> nn.Module:
    """The same uniform ratio on the scale model: identical per-layer width ratios (up to rounding)."""
    return tp_prune(dst_model, arch["ratio"], dst_size, round_to=arch.get("round_to", _TP_ROUND_TO))


register(Method("tp_width", "Torch-Pruning width (baseline)", _tp_width, _tp_scale))
