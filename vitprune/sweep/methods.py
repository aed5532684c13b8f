"""The vitprune rows of the sweep: every compress method, one kind of depth removal, and the combo.

Each is a ``prune(model, target, ctx) -> Pruned`` over :func:`vitprune.api.compress`; its
architecture is the recipe's shapes (:func:`~vitprune.sweep.scaling.recipe_shapes`), rebuilt on a
scale model by :func:`~vitprune.sweep.scaling.recipe_scale`. Importing this module registers them.
"""
from __future__ import annotations

import json
from typing import Any, Callable

from torch import nn

from vitprune.api import compress
from vitprune.deps.flops import count_flops
from vitprune.driver.pipeline import analyse
from vitprune.errors import PlanError
from vitprune.plan.budget import Budget
from vitprune.deps.branches import find_activations, find_attention_branches
from vitprune.plan.depth import depth_flops_options, one_shot_scores, plan_depth, share_count, steps_per_event_for
from vitprune.plan.joint import probe_sizes
from vitprune.spec import METHOD_REGISTRY, PAPER_DEPTH_SHARE, CompressSpec
from vitprune.sweep.config import Method, PointContext, Pruned, register
from vitprune.sweep.scaling import recipe_scale, recipe_shapes

PruneFn = Callable[[nn.Module, float, PointContext], Pruned]

#: How many times the combo corrects the planner's target for what the token cut removes.
_COMBO_ROUNDS = 2


def _spec(ctx: PointContext, **kw: Any) -> CompressSpec:
    base = dict(importance=ctx.config.importance, round_to=ctx.config.round_to, seed=ctx.seed,
                calib_batches=max(1, len(ctx.calib)), input_size=tuple(ctx.input_size))
    base.update(kw)
    return CompressSpec(**base)


def compress_point(model: nn.Module, ctx: PointContext, train: bool = False, **kw: Any) -> Pruned:
    """``compress`` with the sweep's settings; ``train``: the planner gets the training data."""
    result = compress(model, _spec(ctx, **kw), example_input_size=ctx.input_size, source=ctx.source,
                      calib_data=ctx.calib, train_data=ctx.train if train else None)
    stages = result.report.get("stages", {})
    return Pruned(result.model, {"kind": "recipe", "steps": recipe_shapes(result.recipe)},
                  {"stages": json.loads(json.dumps(stages, default=str)),
                   "train_steps": dict(result.report.get("train_steps", {}))})


def _vitprune_method(method: str) -> PruneFn:
    """``compress`` with ``method`` at the target (cpvit: plus the configured head keep). With a
    step budget (``ctx.plan_steps``) the depth methods train while they plan, sized to spend at most
    that many steps: boundarydpt and boundarydpt+paper choose their layers by the gated search,
    boundarydpt+ prices its moves after recovery and recovers between events."""

    def prune(model: nn.Module, target: float, ctx: PointContext) -> Pruned:
        kw: dict[str, Any] = {"method": method, "target_flops": target}
        if method == "cpvit" and ctx.config.cpvit_heads is not None:
            kw["prune_heads_cpvit"] = ctx.config.cpvit_heads
        trains = ctx.plan_steps > 0 and ctx.train is not None and METHOD_REGISTRY[method].removes_layers
        if trains:
            kw.update(_planner_steps(method, model, target, ctx))
        return compress_point(model, ctx, train=trains, **kw)

    return prune


def _planner_steps(method: str, model: nn.Module, target: float, ctx: PointContext) -> dict[str, Any]:
    """The spec fields that make ``method``'s planner spend at most ``ctx.plan_steps`` steps."""
    if method == "boundarydpt+":
        probe, recovery = probe_sizes(ctx.plan_steps)
        return {"probe_steps": probe, "search_steps": max(1, recovery)}
    gm, _ = analyse(model, ctx.input_size)
    pools = {"attention": len(find_attention_branches(gm)), "activation": len(find_activations(gm))}
    if method == "boundarydpt+paper":
        counts = {k: share_count(PAPER_DEPTH_SHARE, n) for k, n in pools.items()}
    else:  # boundarydpt: the counts its depth planner takes to reach the target (one-shot, cheap)
        plan = plan_depth(gm, Budget(count_flops(gm, gm.meta["example_input"]), target), ctx.calib)
        counts = {"attention": len(plan.detail["attention"]), "activation": len(plan.detail["activation"])}
    if not sum(counts.values()):
        return {}
    return {"depth_selection": "search", "search_steps": steps_per_event_for(ctx.plan_steps, counts, pools)}


def _fewest_removals(model: nn.Module, kind: str, target: float, ctx: PointContext) -> list[int]:
    """The blocks whose ``kind`` layer goes: the fewest, lowest one-shot scores first, that bring the
    FLOPs within the budget's tolerance of ``target``."""
    gm, _ = analyse(model, ctx.input_size)
    budget = Budget(count_flops(gm, gm.meta["example_input"]), target)
    attn, act = one_shot_scores(gm, ctx.calib)
    scores = attn if kind == "attention" else act
    order = sorted(scores, key=lambda b: (scores[b], b))
    options = depth_flops_options(gm, attention_order=order if kind == "attention" else [],
                                  activation_order=order if kind == "activation" else [])
    for n in range(len(order) + 1):
        if not budget.above(options[(n, 0) if kind == "attention" else (0, n)]):
            return sorted(order[:n])
    best = options[(len(order), 0) if kind == "attention" else (0, len(order))]
    raise PlanError(f"{kind} removal alone reaches {budget.ratio(best):.3f} of the FLOPs at best (target {target})")


def _one_kind(kind: str) -> PruneFn:
    """Remove layers of one kind only (attention branches or activations), fewest that meet the target,
    chosen by BoundaryDPT's one-shot scores on the calibration batches."""

    def prune(model: nn.Module, target: float, ctx: PointContext) -> Pruned:
        chosen = _fewest_removals(model, kind, target, ctx)
        return compress_point(model, ctx, method="width", target_flops=None, **{f"remove_{kind}": chosen})

    return prune


def _combo(model: nn.Module, target: float, ctx: PointContext) -> Pruned:
    """BoundaryDPT+ (depth then width) with a static CP-ViT token cut: the FLOPs target given to the
    depth/width planner is corrected (once) for what the token cut removes afterwards."""
    tokens = ctx.config.combo_tokens
    gm, _ = analyse(model, ctx.input_size)
    x = gm.meta["example_input"]
    budget = Budget(count_flops(gm, x), target)
    token_only = compress_point(model, ctx, target_flops=None, tokens=tokens)
    token_flops = count_flops(token_only.model, x)
    if not budget.above(token_flops):
        token_only.info["planner_target"] = None
        return token_only
    inner = target / budget.ratio(token_flops)  # < 1: the token cut alone is above the target
    best: tuple[float, Pruned] | None = None
    for round_ in range(_COMBO_ROUNDS):
        pruned = compress_point(model, ctx, method="boundarydpt+", target_flops=inner, tokens=tokens)
        flops = count_flops(pruned.model, x)
        achieved = budget.ratio(flops)
        pruned.info["planner_target"] = inner
        if best is None or abs(achieved - target) < best[0]:
            best = (abs(achieved - target), pruned)
        if budget.close(flops) or round_ == _COMBO_ROUNDS - 1:
            break
        inner *= target / achieved
        if inner >= 1.0:  # depth/width cannot cut less than nothing: the token cut alone is the other candidate
            token_only.info["planner_target"] = None
            if budget.ratio(token_flops) - target < best[0]:
                best = (budget.ratio(token_flops) - target, token_only)
            break
    return best[1]


def _register_builtins() -> None:
    for name, info in METHOD_REGISTRY.items():
        register(Method(name, info.label, _vitprune_method(name), recipe_scale))
    register(Method("attention", "attention removal only", _one_kind("attention"), recipe_scale))
    register(Method("activation", "activation removal only", _one_kind("activation"), recipe_scale))
    register(Method("combo", "BoundaryDPT+ + tokens", _combo, recipe_scale))


_register_builtins()
