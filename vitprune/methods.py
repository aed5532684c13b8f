"""The compression stages ``compress`` runs, in order: depth → width → tokens → recovery.

Each stage takes the current GraphModule and the FLOPs still to remove, rewrites through passes, and
returns the new graph, its pass recipes (for replay) and a JSON-able account of what it decided.

How the methods map onto stages (``--target-flops r`` is always a fraction of the *original* FLOPs):

* ``width``: width pruning to ``r``.
* ``boundarydpt``: depth only. Attention and activation removals alternate (one event of each kind
  in turn, as in the published schedule) until the FLOPs reach ``r``; which blocks is chosen per kind
  by the one-shot scores or the gated search (``depth_selection``). Explicit
  ``remove_attention``/``remove_activation`` lists bypass selection.
* ``boundarydpt+``: depth first, at most ``depth_share`` of each kind's layers (the released DeiT-B
  configuration removes 5 of 12 of each: 0.42), then width pruning takes the rest of the budget.
* ``cpvit``: heads scored by the cumulative head score (``prune_heads_cpvit`` = fraction kept), then
  the progressive token schedule meeting ``r`` (or the explicit ``tokens`` form).
Explicit ``tokens`` / depth lists compose with every method.
"""
from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch import nn

from passes.manager import PassManager
from passes.tokens import TokenPruning
from passes.width import WidthPruning

from .deps import DependencyGraph
from .errors import PlanError
from .flops import FlopModel, count_flops
from .importance import l2_importance, random_calibration, taylor_importance
from .plan import eligible_groups, plan_width
from .spec import CompressSpec

_KIND_FLAGS = {"residual": "prune_residual", "hidden": "prune_mlp", "head": "prune_heads",
               "head_dim": "prune_head_dim", "other": "prune_mlp"}

Stage = tuple[fx.GraphModule, list[dict[str, Any]], dict[str, Any]]


def images_only(batches: Iterable) -> list[torch.Tensor]:
    return [b[0] if isinstance(b, (tuple, list)) else b for b in batches]


def calibration(spec: CompressSpec, input_size: tuple[int, int, int], calib_data: Any) -> list:
    if calib_data is not None:
        return [b for _, b in zip(range(spec.calib_batches), calib_data)]
    return random_calibration(input_size, spec.calib_batches, spec.batch_size, spec.seed)


# -- depth -------------------------------------------------------------------------------------
def depth_stage(gm: fx.GraphModule, teacher: nn.Module, spec: CompressSpec, base_flops: int,
                batches: list, train_batches: Any, manager: PassManager) -> Stage:
    from .depth import apply_depth, depth_flops_options, event_order, one_shot_scores, select_depth

    info: dict[str, Any] = {}
    explicit = spec.remove_attention is not None or spec.remove_activation is not None
    if explicit:
        gm, recipe = apply_depth(gm, spec.remove_attention or [], spec.remove_activation or [],
                                 variant=spec.attention_variant, merge=spec.merge, fold_norm=spec.fold_norm,
                                 manager=manager)
        info.update(attention=sorted(spec.remove_attention or []),
                    activation=sorted(spec.remove_activation or []), selection="explicit")
        return gm, recipe, info
    if spec.method not in ("boundarydpt", "boundarydpt+") or spec.target_flops is None:
        return gm, [], info
    attn_scores, act_scores = one_shot_scores(gm, batches, variant=spec.attention_variant)
    attn_order = sorted(attn_scores, key=lambda b: (attn_scores[b], b))
    act_order = sorted(act_scores, key=lambda b: (act_scores[b], b))
    options = depth_flops_options(gm, attention_order=attn_order, activation_order=act_order,
                                  merge=spec.merge, variant=spec.attention_variant)
    cap_a, cap_j = len(attn_order), len(act_order)
    if spec.method == "boundarydpt+":
        cap_a, cap_j = round(spec.depth_share * cap_a), round(spec.depth_share * cap_j)
    goal = spec.target_flops * base_flops
    n_a = n_j = 0
    for kind in event_order(cap_a, cap_j):  # alternate kinds, as the published schedule does
        if options[(n_a, n_j)] <= goal:
            break
        n_a, n_j = (n_a + 1, n_j) if kind == "attention" else (n_a, n_j + 1)
    if spec.method == "boundarydpt" and options[(n_a, n_j)] > goal * (1 + 0.01):
        raise PlanError(f"depth alone reaches {options[(n_a, n_j)] / base_flops:.3f} of the FLOPs at best "
                        f"(target {spec.target_flops}); use --method boundarydpt+ to add width pruning")
    if n_a == n_j == 0:
        return gm, [], {"attention": [], "activation": [], "selection": spec.depth_selection}
    mode = spec.depth_selection if train_batches is not None else "one_shot"
    search = {"steps_per_event": spec.search_steps, "lr": spec.lr} if mode == "search" else {}
    selection = select_depth(gm, n_a, n_j, mode=mode, batches=train_batches if mode == "search" else batches,
                             teacher=teacher, variant=spec.attention_variant, merge=spec.merge,
                             fold_norm=spec.fold_norm, **search)
    info.update(attention=selection.attention, activation=selection.activation, selection=mode,
                planned_flops_ratio=options[(n_a, n_j)] / base_flops)
    return selection.model, selection.recipe, info


# -- width -------------------------------------------------------------------------------------
def width_stage(gm: fx.GraphModule, spec: CompressSpec, base_flops: int, batches: list,
                user_data: bool, manager: PassManager, flop_model: FlopModel | None = None) -> Stage:
    """Width pruning to what is left of the FLOPs target. ``flop_model``: the FLOP model of ``gm``
    as it is (when no earlier stage changed it), which saves re-counting and re-analysing."""
    if spec.target_flops is None or spec.method not in ("width", "boundarydpt+"):
        return gm, [], {}
    if flop_model is None:
        flop_model = FlopModel(DependencyGraph.build(gm))
    dg, current = flop_model.dg, flop_model.flops()
    relative = spec.target_flops * base_flops / current
    if relative >= 1.0:
        return gm, [], {"note": "the target was already met before width pruning"}
    kinds = {kind for kind, flag in _KIND_FLAGS.items() if getattr(spec, flag)}
    groups = eligible_groups(dg, kinds)
    if not groups:
        detail = f"; unsupported ops froze channels: {', '.join(sorted({u.op for u in dg.unsupported}))}" \
            if dg.unsupported else ""
        raise PlanError(f"no prunable channel group of the kinds {sorted(kinds)}{detail}")
    scores = taylor_importance(dg, groups, batches) if spec.importance == "taylor" else l2_importance(dg, groups)
    plan = plan_width(dg, flop_model, scores, groups, relative, round_to=spec.round_to,
                      min_keep=spec.min_keep, ranking=spec.ranking)
    result = manager.apply(WidthPruning(plan.keep), gm)
    info = {
        "target_flops": spec.target_flops,
        "planned_flops_ratio": plan.flops / base_flops,
        "within_tolerance": abs(plan.flops / base_flops - spec.target_flops) <= 0.01,
        "importance": spec.importance,
        "calibration": "user data" if user_data else ("random images" if spec.importance == "taylor" else "none"),
        "notes": plan.notes,
    }
    return result.graph_module, [result.recipe] if result.recipe else [], info


# -- tokens and heads (CP-ViT) ---------------------------------------------------------------------
def token_stage(gm: fx.GraphModule, spec: CompressSpec, base_flops: int, batches: list,
                manager: PassManager) -> Stage:
    from .tokens import cpvit_head_keep, cpvit_plan, parse_tokens

    recipe: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    if spec.method != "cpvit" and spec.tokens is None:
        return gm, recipe, info
    images = images_only(batches)
    if spec.method == "cpvit" and spec.prune_heads_cpvit is not None and spec.prune_heads_cpvit < 1.0:
        heads = cpvit_head_keep(gm, images, spec.prune_heads_cpvit)
        result = manager.apply(WidthPruning(heads), gm)
        gm = result.graph_module
        recipe += [result.recipe] if result.recipe else []
        info["heads_kept"] = {name: len(kept) for name, kept in heads.items()}
    if spec.tokens is not None:
        keep = parse_tokens(spec.tokens, gm)
        info["schedule"] = f"explicit: {spec.tokens}"
    elif spec.target_flops is not None:
        current = count_flops(gm, gm.meta["example_input"])
        relative = spec.target_flops * base_flops / current
        if relative >= 1.0:
            return gm, recipe, info
        plan = cpvit_plan(gm, images, relative)
        keep = plan.keep
        info["schedule"] = "cp-vit progressive (attention range)"
    else:
        return gm, recipe, info
    result = manager.apply(TokenPruning(keep), gm)
    info["keep"] = keep
    return result.graph_module, recipe + ([result.recipe] if result.recipe else []), info


def needs_teacher(spec: CompressSpec, train_data: Any) -> bool:
    """Whether any stage runs the original model: depth selection by score or search (not explicit
    lists) and recovery fine-tuning. Copying a ViT-B costs ~0.4 s, so it is skipped otherwise."""
    explicit = spec.remove_attention is not None or spec.remove_activation is not None
    selects_depth = spec.method in ("boundarydpt", "boundarydpt+") and not explicit
    return selects_depth or (train_data is not None and spec.epochs > 0)


def copy_teacher(model: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
