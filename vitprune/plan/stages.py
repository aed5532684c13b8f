"""The compression stages, and which ones each method runs: depth → width → heads → tokens.

Every stage receives the graph as the stages before it left it and the :class:`Budget` of the
*original* model, asks its planner for a :class:`Plan`, and applies the plan's passes through the
one :class:`PassManager`. A stage returns the new graph, the recipes of the passes it ran (for replay)
and a JSON-able account of what it decided.

:data:`METHOD_STAGES` says which stages plan to the FLOPs target for each method:

* ``width``: width pruning to the target.
* ``boundarydpt``: depth only; attention and activation removals alternate until the FLOPs meet the
  target (which blocks: one-shot scores or the gated search, ``depth_selection``).
* ``boundarydpt+``: the joint planner (:mod:`vitprune.plan.joint`): move by move, the cheapest of
  removing an attention branch, removing an activation or shrinking a channel group, by estimated
  loss increase per FLOP saved (per estimated ORT millisecond saved with ``cost: latency``), with
  recovery between events when there is training data; ``depth_share`` optionally caps the share of
  each kind's layers removed.
* ``boundarydpt+paper``: the paper's BoundaryDPT+: a fixed share of each kind's layers (``depth_share``,
  default 5/12) chosen by ``depth_selection`` (the gated search with training data), then width
  pruning to the target.
* ``cpvit``: heads kept by the cumulative head score (``prune_heads_cpvit``), then the progressive
  token schedule meeting the target.
* ``tome``: token merging (ToMe), the merge count per block meeting the target (training-free).

Explicit requests compose with every method: ``remove_attention``/``remove_activation`` run the depth
stage with those blocks, ``tokens`` runs the token stage with that schedule (``keep=``: pruning,
``merge=``: the merge stage).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch.fx as fx
from torch import nn

from passes.manager import PassManager
from vitprune import progress
from passes.merging import TokenMerging
from passes.tokens import TokenPruning
from passes.width import WidthPruning
from vitprune.deps import DependencyGraph
from vitprune.deps.flops import FlopModel
from vitprune.errors import PlanError
from vitprune.plan.budget import Budget, Plan
from vitprune.plan.cost import LatencyModel, LatencyTable
from vitprune.plan.depth import depth_passes, plan_depth
from vitprune.plan.joint import CostBuilder, CostModel, JointSettings, plan_joint
from vitprune.plan.importance import l2_importance, random_calibration, taylor_importance
from vitprune.plan.merging import MergeFlops, parse_merge, tome_plan
from vitprune.plan.tokens import TokenFlops, cpvit_head_keep, cpvit_plan, parse_tokens
from vitprune.plan.width import eligible_groups, plan_width
from vitprune.report import RANDOM_SCORING
from vitprune.spec import METHOD_REGISTRY, PAPER_DEPTH_SHARE, CompressSpec, token_parts
from vitprune.train.data import images_only
from vitprune.train.finetune import freeze

#: The stages that plan to the FLOPs target, per method (in the order they run).
METHOD_STAGES: dict[str, tuple[str, ...]] = {name: m.stages for name, m in METHOD_REGISTRY.items()}
ORDER: tuple[str, ...] = ("depth", "joint", "width", "heads", "tokens", "merge")

_KIND_FLAGS = {"residual": "prune_residual", "hidden": "prune_mlp", "head": "prune_heads",
               "head_dim": "prune_head_dim", "other": "prune_mlp"}

Stage = tuple[fx.GraphModule, list[dict[str, Any]], dict[str, Any]]


@dataclass
class StageContext:
    """What every stage may read: the request, the original model's budget (None without a FLOPs
    target), calibration batches and whether they are the user's, training data for the depth
    search, the frozen original (teacher) and the one pass manager."""

    spec: CompressSpec
    budget: Budget | None
    batches: list
    user_data: bool
    train_batches: Any
    teacher: nn.Module | None
    manager: PassManager
    flop_model: FlopModel | None = None  # of the graph as captured, valid until a stage changes it
    timings: dict[str, float] = field(default_factory=dict)  # wall seconds per stage run


def explicit_depth(spec: CompressSpec) -> bool:
    return spec.remove_attention is not None or spec.remove_activation is not None


def stages_for(spec: CompressSpec) -> list[str]:
    """The stages ``spec`` runs, in order: its method's planned stages plus the explicit requests."""
    wanted = set(METHOD_STAGES[spec.method]) if spec.target_flops is not None else set()
    if spec.method == "cpvit" and spec.prune_heads_cpvit is not None:
        wanted.add("heads")
    if explicit_depth(spec):
        wanted.add("depth")
    if spec.tokens is not None:
        wanted.add("merge" if merges(spec) else "tokens")
    return [s for s in ORDER if s in wanted]


def merges(spec: CompressSpec) -> bool:
    """Whether ``spec.tokens`` is the merging form (``merge=R``) rather than pruning (``keep=F``)."""
    return spec.tokens is not None and "merge" in token_parts(spec.tokens)


def needs_teacher(spec: CompressSpec, train_data: Any) -> bool:
    """Whether any stage runs the original model: depth selection by score or search (not explicit
    lists) and recovery fine-tuning. Copying a ViT-B costs ~0.4 s, so it is skipped otherwise."""
    selects_depth = bool({"depth", "joint"} & set(METHOD_STAGES[spec.method])) and not explicit_depth(spec)
    return selects_depth or (train_data is not None and spec.epochs > 0)


def copy_teacher(model: nn.Module) -> nn.Module:
    """A frozen copy of the original model (distillation target and depth-search reference)."""
    return freeze(copy.deepcopy(model))


def calibration(spec: CompressSpec, input_size: tuple[int, int, int], calib_data: Any) -> list:
    if calib_data is not None:
        return [b for _, b in zip(range(spec.calib_batches), calib_data)]
    return random_calibration(input_size, spec.calib_batches, spec.batch_size, spec.seed)


def run_stages(gm: fx.GraphModule, ctx: StageContext) -> tuple[fx.GraphModule, list[dict[str, Any]], dict]:
    """Run every stage ``ctx.spec`` asks for; returns (graph, recipe, {stage: report})."""
    recipe: list[dict[str, Any]] = []
    report: dict[str, Any] = {}
    for name in stages_for(ctx.spec):
        if recipe:
            ctx.flop_model = None  # an earlier stage rewrote the graph: its FLOP model is stale
        start = time.perf_counter()
        with progress.step(f"{name} stage ({ctx.spec.method})"):
            gm, steps, report[name] = STAGES[name](gm, ctx)
        ctx.timings[name] = round(time.perf_counter() - start, 3)
        recipe += steps
    return gm, recipe, report


def _apply(plan: Plan, gm: fx.GraphModule, manager: PassManager) -> tuple[fx.GraphModule, list[dict[str, Any]]]:
    if plan.graph is not None:  # the planner already rewrote (and trained) the graph
        return plan.graph, plan.recipe
    return manager.apply_all(plan.passes, gm)


# -- depth -------------------------------------------------------------------------------------
def depth_stage(gm: fx.GraphModule, ctx: StageContext) -> Stage:
    spec = ctx.spec
    if explicit_depth(spec):
        attention, activation = sorted(spec.remove_attention or []), sorted(spec.remove_activation or [])
        plan = Plan("depth", depth_passes(attention, activation, spec.attention_variant, spec.merge,
                                          spec.fold_norm))
        gm, recipe = _apply(plan, gm, ctx.manager)
        return gm, recipe, {"attention": attention, "activation": activation, "selection": "explicit"}
    mode = spec.depth_selection if ctx.train_batches is not None else "one_shot"
    share = None
    if spec.method == "boundarydpt+paper":  # a fixed share of each kind; width prunes the rest
        share = spec.depth_share if spec.depth_share is not None else PAPER_DEPTH_SHARE
    plan = plan_depth(gm, ctx.budget, ctx.batches, mode=mode, train_batches=ctx.train_batches, teacher=ctx.teacher,
                      variant=spec.attention_variant, merge=spec.merge, fold_norm=spec.fold_norm,
                      search={"steps_per_event": spec.search_steps, "lr": spec.lr}, share=share)
    gm, recipe = _apply(plan, gm, ctx.manager)
    info = {k: plan.detail[k] for k in ("attention", "activation", "selection")}
    if share is not None:
        info["share"] = share
    if plan.detail.get("steps"):
        info["steps"] = plan.detail["steps"]
    info["scored_on"] = _scored_on(ctx, mode)
    if plan.passes:
        info["planned_flops_ratio"] = plan.ratio
    return gm, recipe, info


def _scored_on(ctx: StageContext, mode: str) -> str:
    if mode == "search":
        return "training data (gated search)"
    return "calibration data" if ctx.user_data else RANDOM_SCORING


# -- depth and width together (BoundaryDPT+) -----------------------------------------------------
def joint_stage(gm: fx.GraphModule, ctx: StageContext) -> Stage:
    spec = ctx.spec
    flop_model = ctx.flop_model or FlopModel(DependencyGraph.build(gm))
    build, cost_model, budget = _cost(spec, flop_model, ctx.budget)
    settings = JointSettings(kinds=_width_kinds(spec), round_to=spec.round_to, head_dim_policy=spec.head_dim_policy,
                             min_keep=spec.min_keep,
                             variant=spec.attention_variant, merge=spec.merge, fold_norm=spec.fold_norm,
                             cap_share=spec.depth_share, lr=spec.lr,
                             recovery_steps=spec.search_steps if ctx.train_batches is not None else 0,
                             probe_steps=spec.probe_steps if ctx.train_batches is not None else 0)
    plan = plan_joint(gm, budget, ctx.batches, settings, teacher=ctx.teacher,
                      train_batches=ctx.train_batches, manager=ctx.manager, cost=build)
    gm, recipe = _apply(plan, gm, ctx.manager)
    # plan.flops is FLOPs whatever the cost: the FLOPs ratio is against the original's FLOPs
    info = dict(plan.detail, planned_flops_ratio=ctx.budget.ratio(plan.flops), planned_cost_ratio=plan.ratio,
                within_tolerance=plan.within_tolerance, scored_on=_scored_on(ctx, "one_shot"))
    info["notes"] = [f"boundarydpt+ priced layer removals {plan.detail['pricing']}"
                     + ("" if ctx.train_batches is not None else "; with --data they are priced after recovery")]
    if isinstance(cost_model, LatencyModel):
        info["notes"] += cost_model.table.notes
    return gm, recipe, info


def _width_kinds(spec: CompressSpec) -> set[str]:
    return {kind for kind, flag in _KIND_FLAGS.items() if getattr(spec, flag)}


# -- width -------------------------------------------------------------------------------------
def width_stage(gm: fx.GraphModule, ctx: StageContext) -> Stage:
    """Width pruning to what is left of the budget."""
    spec, budget = ctx.spec, ctx.budget
    flop_model = ctx.flop_model or FlopModel(DependencyGraph.build(gm))
    if budget.met(flop_model.flops()):
        return gm, [], {"note": "the target was already met before width pruning"}
    dg = flop_model.dg
    kinds = _width_kinds(spec)
    groups = eligible_groups(dg, kinds)
    if not groups:
        detail = f"; unsupported ops froze channels: {', '.join(sorted({u.op for u in dg.unsupported}))}" \
            if dg.unsupported else ""
        raise PlanError(f"no prunable channel group of the kinds {sorted(kinds)}{detail}")
    scores = taylor_importance(dg, groups, ctx.batches) if spec.importance == "taylor" else l2_importance(dg, groups)
    _, cost_model, budget = _cost(spec, flop_model, budget)
    plan = plan_width(dg, cost_model, scores, groups, budget, round_to=spec.round_to, min_keep=spec.min_keep,
                      ranking=spec.ranking, head_dim_policy=spec.head_dim_policy)
    if isinstance(cost_model, LatencyModel):
        plan.notes += cost_model.table.notes
    gm, recipe = _apply(plan, gm, ctx.manager)
    info = {
        "target_flops": spec.target_flops,
        "planned_flops_ratio": ctx.budget.ratio(flop_model.flops(plan.detail["counts"])),
        "within_tolerance": plan.within_tolerance,
        "cost": spec.cost,
        "head_dim_policy": spec.head_dim_policy,
        "importance": spec.importance,
        "calibration": "user data" if ctx.user_data else ("random images" if spec.importance == "taylor" else "none"),
        "notes": plan.notes,
    }
    return gm, recipe, info


def _cost(spec: CompressSpec, flop_model: FlopModel, budget: Budget) -> tuple[CostBuilder, CostModel, Budget]:
    """What a planning stage spends: FLOPs, or ORT latency estimated from the per-op tables of this
    machine (spec ``cost``), whose target is then a fraction of the captured model's estimated latency
    (the width or joint stage is the only one that plans). Returns the cost model's builder (the
    joint planner rebuilds it as it rewrites the graph), the model of ``flop_model``'s graph, and
    the budget in its unit."""
    if spec.cost == "flops":
        return FlopModel, flop_model, budget
    build = partial(LatencyModel, table=LatencyTable(spec.latency_threads, 1))
    latency = build(flop_model.dg)
    return build, latency, Budget.latency(latency.cost(), budget.goal)


# -- heads and tokens (CP-ViT) -------------------------------------------------------------------
def head_stage(gm: fx.GraphModule, ctx: StageContext) -> Stage:
    """Keep ``prune_heads_cpvit`` of each block's heads, by the cumulative head score."""
    keep = ctx.spec.prune_heads_cpvit
    if keep is None or keep >= 1.0:
        return gm, [], {}
    heads = cpvit_head_keep(gm, images_only(ctx.batches), keep)
    gm, recipe = _apply(Plan("heads", [WidthPruning(heads)]), gm, ctx.manager)
    return gm, recipe, {"heads_kept": {name: len(kept) for name, kept in heads.items()}}


def token_stage(gm: fx.GraphModule, ctx: StageContext) -> Stage:
    """The explicit token schedule, or the CP-ViT progressive one meeting the budget."""
    spec = ctx.spec
    if spec.tokens is not None:
        keep = parse_tokens(spec.tokens, gm)
        plan = Plan("tokens", [TokenPruning(keep)], detail={"keep": keep})
        info = {"schedule": f"explicit: {spec.tokens}"}
    else:
        flop_model = TokenFlops(gm)
        if ctx.budget.met(flop_model.base):
            return gm, [], {}
        plan = cpvit_plan(gm, images_only(ctx.batches), ctx.budget, flop_model=flop_model)
        info = {"schedule": "cp-vit progressive (attention range)"}
    gm, recipe = _apply(plan, gm, ctx.manager)
    info["keep"] = plan.detail["keep"]
    return gm, recipe, info


def merge_stage(gm: fx.GraphModule, ctx: StageContext) -> Stage:
    """The explicit merge schedule (``tokens: merge=R``), or ToMe's merge count meeting the budget."""
    spec = ctx.spec
    if merges(spec):
        r = parse_merge(spec.tokens, gm)
        plan = Plan("merge", [TokenMerging(r)], detail={"schedule": r})
        info = {"schedule_from": f"explicit: {spec.tokens}"}
    else:
        flop_model = MergeFlops(gm)
        if ctx.budget.met(flop_model.base):
            return gm, [], {}
        plan = tome_plan(gm, ctx.budget, flop_model=flop_model)
        info = {"schedule_from": "tome: r per block meeting the FLOPs target (r + 1 in the last `extra` blocks)",
                "r": plan.detail["r"], "extra": plan.detail["extra"],
                "planned_flops_ratio": plan.ratio}
    gm, recipe = _apply(plan, gm, ctx.manager)
    info["merge"] = recipe[0]["r"] if recipe else plan.detail["schedule"]
    return gm, recipe, info


STAGES: dict[str, Callable[[fx.GraphModule, StageContext], Stage]] = {
    "depth": depth_stage, "joint": joint_stage, "width": width_stage, "heads": head_stage, "tokens": token_stage,
    "merge": merge_stage,
}
