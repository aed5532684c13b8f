"""Depth selection for BoundaryDPT/HetDPT: which attention branches and which activations to remove.

Candidates are the graph's attention branches and activations between linears
(:mod:`vitprune.deps.branches`), numbered by their original block index. Two ways to choose:

* :func:`one_shot_scores` — cheap: per candidate, a first-order estimate of the loss change when it
  becomes the identity, from a few batches, no training;
* :func:`gated_search` — HetDPT's stage 1: per-kind candidates from single-layer fine-tunes, then
  gates ``y = m·f(u) + (1−m)·u`` on every layer, weights and gate scores trained together, pruning
  events alternating between the two kinds in growing windows.

Each kind is ranked only against itself (the two kinds' gradients differ greatly in scale:
"gradient disparity"). :func:`select_depth` wraps both modes; :func:`apply_depth` runs the two passes;
:func:`depth_flops_options` tells a planner what removing k attention / j activation layers costs.

Integration (``--method boundarydpt``)::

    sel = select_depth(gm, n_attention=5, n_activation=5, mode="search", batches=loader, teacher=orig)
    gm, recipe = sel.model, sel.recipe          # pruned, merged, gates folded away
    # or, with explicit lists:  gm, recipe = apply_depth(gm, [0, 3, 7, 8, 11], [2, 7, 8, 10, 11])

The gated search follows HetDPT's released code (github.com/Efficient-AI-for-All/HetDPT, commit
0e0852f) where the paper is silent; step counts are scaled for a CPU, the structure is the same.
References are ``file:line`` of that commit; README.md lists what is not reproduced.

* **Stage 1, per-kind candidates** (``train_stage1_step1.py`` with ``scripts/train_stage1_step1_*.sh``:
  one run per layer, the model with only that layer removed, fine-tuned from the original weights —
  30 epochs for an attention layer, 5 for an activation — cosine LR down to ``min_lr``, then top-1
  on the validation set). The step-2 script then searches only among 8 of the 12 layers of each
  kind (``--candidate_attn``/``--candidate_act``, ``train_stage1_step2.py:353-354``; the released
  code does not include how the 8 were picked). Here: every layer of a kind is removed alone and
  fine-tuned (``candidate_steps`` = (attention, activation) steps, 6:1 as 30:5 epochs; cosine from
  ``lr`` to ``lr/10``), scored by its loss on held-out batches, and the ``candidate_share`` (8/12)
  with the lowest loss of each kind become the candidates. Explicit candidate lists skip this.
* **Gates** (``hetdpt/search_layers.py:19-79``). ``y = m·f(u) + (1−m)·u`` on every GELU (``u`` = fc1
  output, ``Learnable_Gelu_Hard``) and every attention module (``u`` = its normalised input, before
  layer-scale, ``Learnable_Attention``); for ``variant="drop"`` ``y = m·f``. ``m`` is binary in the
  forward pass (1, then 0 once pruned) and ``GetMask`` hands ``∂L/∂m`` unchanged to a scalar
  parameter ``learn_mask`` (init 0): the gate's score.
* **Score: the signed estimator, stepped by Adam** (``estimator="signed"``, default). The score
  parameter sits in the weights' optimizer (``train_stage1_step2.py:533``: timm's AdamW, same LR, no
  weight decay on 0-d parameters), so each step moves it by ``−lr·m̂/(√v̂+ε)`` of its gradient
  ``∂L/∂m`` (the batch-mean loss): the score is a running, Adam-normalised sum of the signed
  first-order estimate of ``L(m=0) − L(m=1)``. It is never reset: it accumulates over the whole
  search, keeps moving after its layer is pruned, and Adam's moments carry across events.
  ``estimator="abs"`` (vitprune's earlier choice, kept because it is cheap) instead adds the
  per-image magnitudes ``|∂L_i/∂m|`` (no optimizer), as :func:`one_shot_scores` does.
* **Events** (``Prune_Num``/``Flag_Get``, ``train_stage1_step2.py:44-152``, ``:659-673``).
  :func:`event_order` alternates kinds, the more numerous first (``get_prune_order``); each event
  hard-prunes the lowest-scoring remaining *candidate of that kind only*.
* **Growing windows** (``multi_stage``, ``:355``, default ``[3, 5, 7, …]`` epochs; ``Prune_Num``
  docstring ``:46-54``). The k-th window before an event lasts ``steps_per_event·(1 + stage_growth·k)``
  steps (``stage_growth=2/3`` keeps the released 3 : 5 : 7 : …), the first being the warm-up;
  ``recovery_steps`` (default: the next length of that series) follow the last event.
* **Learning rate.** Constant ``lr`` for weights and scores. The released schedule is constant in
  effect: ``--sched cyclecosine`` with the unset ``lr_cycle_limit`` (1) and ``--warmup-epochs 15``
  returns ``min_lr`` for every epoch (``hetdpt/cycle_scheduler.py:66-90``; ``lr_scheduler.py:96-105``).
* **Loss** (``:538-573``, ``--distillation-type none``, ``--smoothing 0.1``). Label-smoothed
  cross-entropy to the labels, no teacher (:class:`SearchLoss`); an unlabelled batch takes the
  teacher's argmax as its label (hard distillation, as HetDPT's stage 2); ``kd_weight`` adds a soft
  KL term. The captured graph is the eval-mode function: no dropout or drop-path applies.
* **Folding.** After the last window the gates are removed and :class:`AttentionRemoval`
  (``variant``) / :class:`ActivationRemoval` (``merge``, ``fold_norm``) rewrite the pruned
  layers; the folded model must reproduce the gated model's outputs (checked).
"""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from passes.activation import ActivationRemoval
from passes.attention import AttentionRemoval
from passes.manager import PassManager
from vitprune import progress

from vitprune.frontend.capture import first_tensor
from vitprune.deps.branches import ActivationSite, AttentionBranch, find_activations, find_attention_branches
from vitprune.errors import InputError, PlanError
from vitprune.plan.budget import Budget, Plan
from vitprune.train.data import split_batch
from vitprune.train.finetune import FinetuneConfig, distillation_loss, freeze
from vitprune.deps.flops import node_flops  # (importing flops also registers the CPU SDPA FLOP formula)

__all__ = ["DepthGate", "SearchLoss", "Selection", "apply_depth", "depth_flops_options", "depth_passes",
           "depth_savings", "event_order", "gated_search", "one_shot_scores", "plan_depth", "search_length",
           "select_depth", "share_count", "stage_lengths", "steps_per_event_for"]

GATE_ROOT = "depth_gates"
KINDS = ("attention", "activation")


# -- results -------------------------------------------------------------------------------------
class Selection(tuple):
    """``(attention_blocks, activation_blocks)``; also ``.model`` (the pruned GraphModule, gates
    folded away), ``.recipe`` (its pass recipes), ``.scores`` ({kind: {block: score}}),
    ``.history`` (one entry per pruning event) and, for the search, ``.candidates`` ({kind: blocks
    the events could choose from}) with ``.candidate_losses`` ({kind: {block: held-out loss after
    its single-layer fine-tune}}, empty for a kind whose candidates were given or not narrowed) and
    ``.steps`` (the optimizer steps taken: ``{"candidates": stage 1, "search": the windows}``)."""

    def __new__(cls, attention: Sequence[int], activation: Sequence[int], *, model=None, recipe=None,
                scores=None, history=None, candidates=None, candidate_losses=None, steps=None):
        self = super().__new__(cls, (sorted(int(b) for b in attention), sorted(int(b) for b in activation)))
        self.model, self.recipe, self.steps = model, list(recipe or []), dict(steps or {})
        self.scores, self.history = dict(scores or {}), list(history or [])
        self.candidates, self.candidate_losses = dict(candidates or {}), dict(candidate_losses or {})
        return self

    @property
    def attention(self) -> list[int]:
        return self[0]

    @property
    def activation(self) -> list[int]:
        return self[1]


def apply_depth(gm: fx.GraphModule, attention_blocks: Sequence[int], activation_blocks: Sequence[int], *,
                variant: str = "identity_norm", merge: str = "auto", fold_norm: bool = False,
                manager: PassManager | None = None) -> tuple[fx.GraphModule, list[dict[str, Any]]]:
    """Remove the listed attention branches and activations (in place); returns (gm, recipes).
    ``manager`` (a fresh one by default) records the passes so failures name what ran before."""
    manager = manager if manager is not None else PassManager()
    return manager.apply_all(depth_passes(attention_blocks, activation_blocks, variant, merge, fold_norm), gm)


# -- gates ---------------------------------------------------------------------------------------
class DepthGate(nn.Module):
    """``y = m·f + (1−m)·u`` (``u`` is None for the "drop" variant: ``y = m·f``).

    The mask ``m`` is binary in the forward pass (``alive``: 1 until pruned, then 0). Its gradient
    goes, unchanged, to the scalar parameter ``score`` — a straight-through estimator, HetDPT's
    ``GetMask`` into ``learn_mask`` — so an optimizer holding ``score`` steps it by ``∂L/∂m``. The
    mask is also materialised as a ``(B, 1, ...)`` leaf (``last_mask``) so that after ``backward``
    each image's ``∂L_i/∂m`` can be read; their sum is ``score.grad``. ``∂L/∂m = <∂L/∂y, f − u>``,
    so ``−∂L/∂m`` is the first-order estimate of ``L(m=0) − L(m=1)``: how much the loss grows when
    the layer becomes the identity. Higher score: keep (see :func:`gated_search`).
    """

    def __init__(self, kind: str, block: int):
        super().__init__()
        self.kind, self.block = kind, int(block)
        self.score = nn.Parameter(torch.zeros(()))
        self.register_buffer("alive", torch.ones(()))
        self.last_mask: torch.Tensor | None = None

    def forward(self, f: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
        m = self.alive.to(f.dtype)
        if torch.is_grad_enabled():
            m = m.expand((f.shape[0],) + (1,) * (f.dim() - 1)).clone().requires_grad_(True)
            self.last_mask = m
            m = m + (self.score - self.score.detach()).to(f.dtype)  # value unchanged; ∂L/∂m → score
        return m * f if u is None else u + m * (f - u)

    def estimates(self) -> torch.Tensor | None:
        """Per-image ``−∂L_i/∂m`` from the last backward pass (None if the gate got no gradient)."""
        m = self.last_mask
        if m is None or m.grad is None:
            return None
        return -m.grad.detach().reshape(m.shape[0]).to(torch.float64).cpu()

    def clear(self) -> None:
        self.last_mask = None


def _insert_gates(gm: fx.GraphModule, attention: Sequence[AttentionBranch], activation: Sequence[ActivationSite],
                  variant: str) -> dict[tuple[str, int], DepthGate]:
    gates: dict[tuple[str, int], DepthGate] = {}
    for kind, items in (("attention", attention), ("activation", activation)):
        for item in items:
            if kind == "attention":
                f, u = item.out, (item.norm if variant == "identity_norm" else None)
            else:
                f, u = item.act, item.fc1
            gate = DepthGate(kind, item.index)
            name = f"{GATE_ROOT}.{kind}_{item.index}"
            gm.add_submodule(name, gate)
            with gm.graph.inserting_after(f):
                node = gm.graph.call_module(name, (f, u))
            f.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
            gates[(kind, item.index)] = gate
    gm.recompile()
    return gates


def _remove_gates(gm: fx.GraphModule) -> None:
    """Every gate node becomes its layer's output ``f`` again; the gate modules are deleted."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith(GATE_ROOT + "."):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    if hasattr(gm, GATE_ROOT):
        delattr(gm, GATE_ROOT)
    gm.recompile()


def _candidates(gm: fx.GraphModule, attention: Sequence[int] | None, activation: Sequence[int] | None,
                variant: str) -> tuple[list[AttentionBranch], list[ActivationSite]]:
    branches = find_attention_branches(gm)
    sites = find_activations(gm)
    if variant == "identity_norm":
        branches = [b for b in branches if b.norm is not None]
    if attention is not None:
        branches = _only(branches, attention, "attention")
    if activation is not None:
        sites = _only(sites, activation, "activation")
    return branches, sites


def _only(items: list, wanted: Sequence[int], kind: str) -> list:
    have = {i.index for i in items}
    missing = sorted(set(wanted) - have)
    if missing:
        raise InputError(f"no {kind} candidate(s) {missing}; the model has {sorted(have)}")
    return [i for i in items if i.index in set(wanted)]


# -- data ----------------------------------------------------------------------------------------
def _cycle(batches: Iterable) -> Iterator:
    """Endless batches; re-iterates lists and DataLoaders (a one-shot iterator cannot restart)."""
    while True:
        empty = True
        for b in batches:
            empty = False
            yield b
        if empty:
            raise InputError("the batch source is empty")
        if iter(batches) is batches:  # an exhausted iterator: nothing more will come
            raise InputError("the batch iterator ran out; pass a list or a DataLoader")


def _device(gm: nn.Module) -> torch.device:
    p = next(gm.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# -- one-shot ------------------------------------------------------------------------------------
def _probe_loss(out: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """What a candidate's removal is scored against: cross-entropy to the labels (or to the model's
    own prediction) for class logits; for a backbone whose output is features (``(B, N, C)``, no
    classes), a fixed random projection of them, whose first-order change still says how much the
    output moves when the layer becomes the identity."""
    if out.dim() == 2:
        target = labels.to(out.device) if labels is not None else out.detach().argmax(-1)
        return F.cross_entropy(out, target, reduction="sum")
    probe = torch.randn(out.shape[1:], generator=torch.Generator().manual_seed(0)).to(out)
    return (out * probe).sum()


def one_shot_scores(gm: fx.GraphModule, batches: Iterable, *, variant: str = "identity_norm",
                    max_batches: int | None = None,
                    absolute: bool = True) -> tuple[dict[int, float], dict[int, float]]:
    """First-order estimate of the loss change when each candidate becomes the identity.

    Returns ``(attention_scores, activation_scores)``, each ``{block: score}``; a higher score means
    removal costs more. The loss is the cross-entropy to the batch labels, or to the model's own
    predictions for unlabelled batches. Per image ``i`` the estimate is ``−∂L_i/∂m`` at ``m = 1``;
    ``absolute=True`` (default) averages ``|−∂L_i/∂m|`` — on a converged model the signed terms cancel
    and a few batches give noise — ``absolute=False`` the signed mean. The scores of the two kinds are
    on different scales and must only be compared within a kind. ``gm`` is not modified.
    """
    model = copy.deepcopy(gm).eval()
    branches, sites = _candidates(model, None, None, variant)
    gates = _insert_gates(model, branches, sites, variant)
    for p in model.parameters():
        p.requires_grad_(False)
    device = _device(model)
    totals = {key: 0.0 for key in gates}
    seen = 0
    source = batches if max_batches is None else itertools.islice(batches, max_batches)
    for batch in source:
        x, y = split_batch(batch)
        x = x.to(device)
        _probe_loss(first_tensor(model(x)), y).backward()
        for key, gate in gates.items():
            est = gate.estimates()
            if est is not None:
                totals[key] += float(est.abs().sum() if absolute else est.sum())
            gate.clear()
        seen += x.shape[0]
    if not seen:
        raise InputError("one_shot_scores needs at least one batch")
    attention = {b: v / seen for (k, b), v in totals.items() if k == "attention"}
    activation = {b: v / seen for (k, b), v in totals.items() if k == "activation"}
    return attention, activation


# -- the gated search ----------------------------------------------------------------------------
def event_order(n_attention: int, n_activation: int) -> list[str]:
    """Pruning events alternate kinds, the kind with more removals first (activation on a tie), as
    HetDPT's ``Prune_Num.get_prune_order``: ``(2, 3)`` → act, attn, act, attn, act."""
    major, minor = (("activation", n_activation), ("attention", n_attention)) \
        if n_activation >= n_attention else (("attention", n_attention), ("activation", n_activation))
    order: list[str] = []
    left = minor[1]
    for _ in range(major[1]):
        order.append(major[0])
        if left:
            order.append(minor[0])
            left -= 1
    return order


def stage_lengths(n_events: int, steps_per_event: int, stage_growth: float = 2 / 3) -> list[int]:
    """Steps of the search's ``n_events + 1`` training windows: window ``k < n_events`` ends in event
    ``k`` (window 0 is the warm-up), the last one is the recovery after the final event. HetDPT's
    ``multi_stage`` grows by 2 epochs from 3 (``[3, 5, 7, …]``): removals come later and later, each
    with a longer recovery. Window ``k`` lasts ``steps_per_event·(1 + stage_growth·k)`` steps, so the
    default growth keeps the released proportions with ``steps_per_event`` steps for the warm-up."""
    return [max(1, round(steps_per_event * (1 + stage_growth * k))) for k in range(n_events + 1)]


@dataclass(frozen=True)
class SearchLoss:
    """What the search and its candidate fine-tunes train on. The released search
    (``--distillation-type none``, ``--smoothing 0.1``) uses label-smoothed cross-entropy to the labels
    (``ce_weight``) and no teacher. An unlabelled batch takes the teacher's argmax as its labels (hard
    distillation, HetDPT's stage 2); ``kd_weight`` adds ``τ²·KL(teacher ‖ student)`` at temperature
    ``tau`` (``ce_weight=0, kd_weight=1``: pure soft distillation)."""

    label_smoothing: float = 0.1
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    tau: float = 1.0

    def needs_teacher(self, labels: torch.Tensor | None) -> bool:
        return (labels is None and self.ce_weight > 0) or self.kd_weight > 0

    def __call__(self, out: torch.Tensor, teacher_out: torch.Tensor | None,
                 labels: torch.Tensor | None) -> torch.Tensor:
        """The fine-tuning loss (:func:`~vitprune.train.finetune.distillation_loss`) with these weights."""
        if self.ce_weight and labels is None:
            labels = teacher_out.argmax(-1)
        config = FinetuneConfig(kd_weight=self.kd_weight, label_weight=self.ce_weight, temperature=self.tau,
                                label_smoothing=self.label_smoothing)
        return distillation_loss(out, teacher_out if self.kd_weight else None, labels, config)


def gated_search(gm: fx.GraphModule, teacher: nn.Module | None, train_batches: Iterable,
                 n_attention: int, n_activation: int, steps_per_event: int = 100, lr: float = 1e-4, *,
                 variant: str = "identity_norm", merge: str = "auto", fold_norm: bool = False,
                 estimator: str = "signed", stage_growth: float = 2 / 3, recovery_steps: int | None = None,
                 candidate_share: float = 2 / 3, candidate_steps: Sequence[int] | None = None,
                 candidate_eval_batches: int = 2, candidates_attention: Sequence[int] | None = None,
                 candidates_activation: Sequence[int] | None = None, weight_decay: float = 0.05,
                 loss: SearchLoss | None = None,
                 log: Callable[[dict[str, Any]], None] | None = None) -> Selection:
    """HetDPT's stage 1 (each choice and its source is in the module docstring): per-kind candidates
    from single-layer fine-tunes (``candidate_steps`` = (attention, activation) steps per layer,
    default 6:1 with one third of ``steps_per_event`` for an activation; ``(0, 0)``, or explicit
    ``candidates_*``, skips it), then gates on every layer, weights and gate scores trained with one
    AdamW at constant ``lr``, alternating events in the windows of :func:`stage_lengths`.

    Returns :class:`Selection` ``(attention_blocks, activation_blocks)`` whose ``.model`` is the
    trained, pruned graph with the gates folded away (no gate module or node is left). ``log`` gets
    one dict per search step (``grads``: each gate's ``∂L/∂m``) and one per event. ``gm`` is not
    modified; ``teacher=None`` uses a frozen copy of it (needed only for unlabelled batches)."""
    counts = {"attention": n_attention, "activation": n_activation}
    steps = _check_search(counts, steps_per_event, estimator, stage_growth, recovery_steps, candidate_share,
                          candidate_steps, candidate_eval_batches)
    student = copy.deepcopy(gm)
    branches, sites = _candidates(student, None, None, variant)
    pools = {"attention": _pool(branches, candidates_attention, "attention"),
             "activation": _pool(sites, candidates_activation, "activation")}
    if any(counts[k] > len(pools[k]) for k in KINDS):
        raise InputError(f"asked to remove {n_attention} attention / {n_activation} activation layers; "
                         f"there are {len(pools['attention'])} / {len(pools['activation'])} candidates")
    run = _SearchRun(student, freeze(teacher if teacher is not None else copy.deepcopy(gm)),
                     _insert_gates(student, branches, sites, variant), _cycle(train_batches),
                     estimator, loss or SearchLoss(), lr, weight_decay, log)
    narrow = {"attention": candidates_attention is None, "activation": candidates_activation is None}
    candidates, losses = run.first_stage(pools, counts, steps, candidate_share, candidate_eval_batches, narrow)
    order = event_order(n_attention, n_activation)
    lengths = stage_lengths(len(order), steps_per_event, stage_growth)
    if recovery_steps is not None:
        lengths[-1] = recovery_steps
    pruned, history = run.search(order, lengths, candidates)
    student.eval()
    scores = _scores(run.gates)
    model, recipe = _fold(student, pruned, variant, merge, fold_norm, next(run.data))
    return Selection(pruned["attention"], pruned["activation"], model=model, recipe=recipe, scores=scores,
                     history=history, candidates=candidates, candidate_losses=losses,
                     steps={"candidates": run.candidate_steps, "search": run.step})


def search_length(steps_per_event: int, counts: dict[str, int], pools: dict[str, int],
                  candidate_share: float = 2 / 3, stage_growth: float = 2 / 3) -> int:
    """The optimizer steps :func:`gated_search` takes with its defaults: stage 1 (every layer of a
    kind whose pool ``candidate_share`` narrows is fine-tuned alone, 6 units for attention, 1 for
    an activation, a unit being a third of ``steps_per_event``), then the growing windows of the
    ``counts`` events."""
    steps = _check_search(counts, steps_per_event, "signed", stage_growth, None, candidate_share, None, 1)
    total = sum(stage_lengths(sum(counts.values()), steps_per_event, stage_growth))
    for kind in KINDS:
        keep = max(counts[kind], round(candidate_share * pools[kind]))
        if counts[kind] and keep < pools[kind]:
            total += pools[kind] * steps[kind]
    return total


def steps_per_event_for(budget: int, counts: dict[str, int], pools: dict[str, int]) -> int:
    """The largest ``steps_per_event`` whose search (:func:`search_length`) takes at most ``budget``
    optimizer steps; a :class:`PlanError` when even one step per window takes more."""
    least = search_length(1, counts, pools)
    if least > budget:
        raise PlanError(f"the gated search removing {counts['attention']} attention / {counts['activation']} "
                        f"activation layers takes at least {least} optimizer steps; the budget allows {budget}")
    low, high = 1, max(1, budget)
    while low < high:  # search_length grows with steps_per_event
        mid = (low + high + 1) // 2
        low, high = (mid, high) if search_length(mid, counts, pools) <= budget else (low, mid - 1)
    return low


def _check_search(counts: dict[str, int], steps_per_event: int, estimator: str, stage_growth: float,
                  recovery_steps: int | None, candidate_share: float, candidate_steps: Sequence[int] | None,
                  candidate_eval_batches: int) -> dict[str, int]:
    """Refuse bad search settings in one line each; returns the stage-1 steps per kind."""
    if min(counts.values()) < 0 or steps_per_event < 1:
        raise InputError("n_attention and n_activation must be >= 0 and steps_per_event >= 1")
    if estimator not in ("signed", "abs"):
        raise InputError(f"estimator must be 'signed' or 'abs', got {estimator!r}")
    if stage_growth < 0 or (recovery_steps is not None and recovery_steps < 0):
        raise InputError("stage_growth and recovery_steps must be >= 0")
    if not 0 < candidate_share <= 1 or candidate_eval_batches < 1:
        raise InputError("candidate_share must be in (0, 1] and candidate_eval_batches >= 1")
    if candidate_steps is None:
        unit = max(1, round(steps_per_event / 3))  # one released epoch: the warm-up is 3 epochs
        return {"attention": 6 * unit, "activation": unit}
    if len(candidate_steps) != 2 or min(candidate_steps) < 0:
        raise InputError(f"candidate_steps must be (attention steps, activation steps), both >= 0; "
                         f"got {candidate_steps!r}")
    return dict(zip(KINDS, (int(s) for s in candidate_steps)))


def _pool(items: list, wanted: Sequence[int] | None, kind: str) -> list[int]:
    return [i.index for i in (items if wanted is None else _only(items, wanted, kind))]


def _optimizer(model: nn.Module, lr: float, weight_decay: float, *, scores: bool) -> torch.optim.AdamW:
    """AdamW over the weights (and the gates' scores when ``scores``), grouped as timm's
    ``create_optimizer`` groups them in the released scripts: no weight decay on biases and other
    0-/1-d parameters, the scores (HetDPT's ``learn_mask``) among them; Adam's defaults otherwise."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        p.requires_grad_(scores or not name.startswith(GATE_ROOT + "."))
        if p.requires_grad:
            (plain if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": plain, "weight_decay": 0.0}], lr=lr)


@dataclass
class _SearchRun:
    """The state one gated search trains: the gated student, its frozen teacher, the data stream."""

    student: fx.GraphModule
    teacher: nn.Module
    gates: dict[tuple[str, int], DepthGate]
    data: Iterator
    estimator: str
    loss: SearchLoss
    lr: float
    weight_decay: float
    log: Callable[[dict[str, Any]], None] | None
    opt: torch.optim.Optimizer | None = None
    step: int = 0             # search steps (the windows)
    candidate_steps: int = 0  # stage-1 steps (the single-layer fine-tunes)

    def loss_on(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = split_batch(batch)
        device = _device(model)
        x, y = x.to(device), (y.to(device) if y is not None else None)
        t = None
        if self.loss.needs_teacher(y):
            with torch.no_grad():
                t = first_tensor(self.teacher(x))
        return self.loss(first_tensor(model(x)), t, y)

    def train_step(self, model: nn.Module, opt: torch.optim.Optimizer) -> float:
        loss = self.loss_on(model, next(self.data))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    def first_stage(self, pools: dict[str, list[int]], counts: dict[str, int], steps: dict[str, int],
                    share: float, n_eval: int, narrow: dict[str, bool]) -> tuple[dict, dict]:
        """Stage 1: per kind, keep the ``share`` of its layers (at least the count to remove) whose
        single removal, after a short fine-tune, costs least on the same held-out batches; a kind
        already given, not pruned, or not narrowed by ``share`` keeps its whole pool."""
        keep = {k: max(counts[k], round(share * len(pools[k]))) for k in KINDS}
        todo = [k for k in KINDS if narrow[k] and counts[k] and steps[k] and keep[k] < len(pools[k])]
        held_out = [next(self.data) for _ in range(n_eval)] if todo else []
        candidates = {k: sorted(pools[k]) for k in KINDS}
        losses: dict[str, dict[int, float]] = {k: {} for k in KINDS}
        for kind in todo:
            progress.say(f"gated search stage 1: {len(pools[kind])} {kind} layers, {steps[kind]} steps each")
            losses[kind] = {b: self.candidate_loss(kind, b, steps[kind], held_out) for b in pools[kind]}
            ranked = sorted(pools[kind], key=lambda b: (losses[kind][b], b))
            candidates[kind] = sorted(ranked[:keep[kind]])
            if self.log:
                self.log({"stage": 1, "kind": kind, "losses": losses[kind], "candidates": candidates[kind]})
        return candidates, losses

    def candidate_loss(self, kind: str, block: int, steps: int, held_out: list) -> float:
        """One stage-1 run: a copy with only this layer removed, fine-tuned from the original
        weights (cosine from ``lr`` to ``lr/10``, as the released step 1 decays to ``min_lr``), then
        its mean loss on the held-out batches (the released runs report validation top-1)."""
        model = copy.deepcopy(self.student)
        model.get_submodule(f"{GATE_ROOT}.{kind}_{block}").alive.zero_()
        opt = _optimizer(model, self.lr, self.weight_decay, scores=False)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=self.lr / 10)
        model.train()
        for _ in range(steps):
            self.train_step(model, opt)
            sched.step()
        self.candidate_steps += steps
        model.eval()
        with torch.no_grad():
            return sum(float(self.loss_on(model, b)) for b in held_out) / len(held_out)

    def search(self, order: list[str], lengths: list[int],
               candidates: dict[str, list[int]]) -> tuple[dict[str, list[int]], list[dict[str, Any]]]:
        """Warm-up window, then per event: prune the lowest score among the kind's remaining
        candidates and train the next (longer) window. Scores and Adam's moments are never reset."""
        self.opt = _optimizer(self.student, self.lr, self.weight_decay, scores=self.estimator == "signed")
        pruned: dict[str, list[int]] = {k: [] for k in KINDS}
        history: list[dict[str, Any]] = []
        self.train_window(lengths[0], 0)
        for i, kind in enumerate(order):
            block = _prune_lowest(self.gates, kind, pruned[kind], candidates[kind])
            pruned[kind].append(block)
            history.append({"step": self.step, "kind": kind, "block": block, "scores": _scores(self.gates)})
            progress.say(f"gated search event {i + 1}/{len(order)} (step {self.step}): pruned {kind} {block}; "
                         f"next window {lengths[i + 1]} steps")
            if self.log:
                self.log(history[-1])
            self.train_window(lengths[i + 1], i + 1)
        return pruned, history

    def train_window(self, length: int, window: int) -> None:
        self.student.train()
        for _ in range(length):
            loss = self.train_step(self.student, self.opt)
            grads = self.collect()
            self.step += 1
            if self.log:
                self.log({"step": self.step, "window": window, "loss": loss, "grads": grads})

    def collect(self) -> dict[str, dict[int, float]]:
        """Each gate's ``∂L/∂m`` of the last step (the signed estimator's optimizer has already
        stepped the scores with it); ``estimator="abs"`` adds ``Σ_i |∂L_i/∂m|`` to the scores."""
        grads: dict[str, dict[int, float]] = {k: {} for k in KINDS}
        for (kind, block), g in self.gates.items():
            est = g.estimates()
            if self.estimator == "abs" and est is not None:
                with torch.no_grad():
                    g.score += float(est.abs().sum())
            if g.score.grad is not None:
                grads[kind][block] = float(g.score.grad)
            elif est is not None:
                grads[kind][block] = -float(est.sum())
            g.clear()
        return grads


def _prune_lowest(gates: dict[tuple[str, int], DepthGate], kind: str, done: list[int],
                  allowed: Sequence[int]) -> int:
    """HetDPT's ``Flag_Get``: the lowest score among the kind's candidates not yet pruned (ties: the
    lower block); the kinds are never ranked on one scale."""
    alive = [(g.score.detach().item(), b) for (k, b), g in gates.items()
             if k == kind and b not in done and b in allowed]
    _, block = min(alive)
    gates[(kind, block)].alive.zero_()
    return block


def _scores(gates: dict[tuple[str, int], DepthGate]) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {k: {} for k in KINDS}
    for (k, b), g in gates.items():
        out[k][b] = g.score.detach().item()
    return out


def _fold(student: fx.GraphModule, pruned: dict[str, list[int]], variant: str, merge: str,
          fold_norm: bool, batch: Any) -> tuple[fx.GraphModule, list[dict[str, Any]]]:
    x, _ = split_batch(batch)
    x = x.to(_device(student))
    with torch.no_grad():
        gated = first_tensor(student(x))
    _remove_gates(student)
    for p in student.parameters():
        p.requires_grad_(False)
    model, recipe = apply_depth(student, pruned["attention"], pruned["activation"], variant=variant,
                                merge=merge, fold_norm=fold_norm)
    for p in model.parameters():
        p.requires_grad_(True)
    with torch.no_grad():
        folded = first_tensor(model(x))
    tol = 1e-3 * (1.0 + float(gated.abs().max()))
    if not torch.allclose(gated, folded, atol=tol, rtol=0):
        raise RuntimeError(f"gated_search: folding the gates changed the outputs by "
                           f"{float((gated - folded).abs().max()):.3g} (tolerance {tol:.3g})")
    return model, recipe


# -- selection front door ------------------------------------------------------------------------
def select_depth(gm: fx.GraphModule, n_attention: int, n_activation: int, mode: str = "search", *,
                 batches: Iterable | None = None, teacher: nn.Module | None = None,
                 variant: str = "identity_norm", merge: str = "auto", fold_norm: bool = False,
                 candidates_attention: Sequence[int] | None = None,
                 candidates_activation: Sequence[int] | None = None,
                 max_batches: int | None = 8, **search_kwargs: Any) -> Selection:
    """Choose ``n_attention`` attention branches and ``n_activation`` activations to remove.

    ``mode="search"``: :func:`gated_search` on ``batches`` (training data; ``search_kwargs`` go to
    it: ``steps_per_event``, ``lr``, ...). ``mode="one_shot"``: :func:`one_shot_scores` on up to
    ``max_batches`` batches, then the lowest-scoring candidates of each kind. Either way the result's
    ``.model`` is a pruned copy (``gm`` is not modified) and ``.recipe`` its recipes.
    """
    if batches is None:
        raise InputError("select_depth needs batches (calibration or training data)")
    if mode == "search":
        return gated_search(gm, teacher, batches, n_attention, n_activation, variant=variant, merge=merge,
                            fold_norm=fold_norm, candidates_attention=candidates_attention,
                            candidates_activation=candidates_activation, **search_kwargs)
    if mode != "one_shot":
        raise InputError(f"mode must be 'search' or 'one_shot', got {mode!r}")
    attn, act = one_shot_scores(gm, batches, variant=variant, max_batches=max_batches)
    chosen = []
    for scores, wanted, n, kind in ((attn, candidates_attention, n_attention, "attention"),
                                    (act, candidates_activation, n_activation, "activation")):
        pool = {b: s for b, s in scores.items() if wanted is None or b in set(wanted)}
        if n > len(pool):
            raise InputError(f"asked to remove {n} {kind} layers; there are {len(pool)} candidates")
        chosen.append(sorted(pool, key=lambda b: (pool[b], b))[:n])
    model, recipe = apply_depth(copy.deepcopy(gm), chosen[0], chosen[1], variant=variant, merge=merge,
                                fold_norm=fold_norm)
    return Selection(chosen[0], chosen[1], model=model, recipe=recipe,
                     scores={"attention": attn, "activation": act})


# -- FLOPs for the planner -----------------------------------------------------------------------
@dataclass
class DepthSavings:
    """FLOPs (batch 1, 2 per multiply-add) saved by removing each candidate; exactly additive."""

    base: int
    attention: dict[int, int]
    activation: dict[int, int]

    def flops(self, attention_blocks: Iterable[int] = (), activation_blocks: Iterable[int] = ()) -> int:
        return (self.base - sum(self.attention[b] for b in attention_blocks)
                - sum(self.activation[b] for b in activation_blocks))


def depth_savings(gm: fx.GraphModule, *, merge: str = "auto", variant: str = "identity_norm") -> DepthSavings:
    """Per-candidate FLOPs saved, from one counted run of ``gm`` (FlopCounterMode on fake tensors).

    Attention: every counted op of the branch (qkv, attention, proj; the kept LayerNorm and the add
    are not counted by the FLOP counter). Activation: ``fc1 + fc2 − merged`` when the pass would
    merge (``merge`` as in :class:`ActivationRemoval`), else 0 (factorised keeps both linears).
    """
    per = node_flops(gm, gm.meta["example_input"])
    base = sum(per.values())
    attention = {b.index: sum(per.get(n, 0) for n in b.nodes) for b in find_attention_branches(gm)
                 if variant == "drop" or b.norm is not None}
    rule = ActivationRemoval([], merge)
    activation = {}
    for s in find_activations(gm):
        f1, f2 = per.get(s.fc1, 0), per.get(s.fc2, 0)
        merged = f1 // s.hidden * s.d_out if s.hidden else 0  # 2·tokens·d_in·d_out
        activation[s.index] = f1 + f2 - merged if rule.merges(s) else 0
    return DepthSavings(base, attention, activation)


def depth_flops_options(gm: fx.GraphModule, *, attention_order: Sequence[int] | None = None,
                        activation_order: Sequence[int] | None = None, merge: str = "auto",
                        variant: str = "identity_norm") -> dict[tuple[int, int], int]:
    """``{(k, j): FLOPs}`` after removing the first ``k`` attention branches of ``attention_order``
    and the first ``j`` activations of ``activation_order`` (default: graph order; pass a ranking,
    e.g. from :func:`one_shot_scores`, when blocks differ in width). Exact: the savings are additive
    and held equal to ``count_flops`` of rewritten copies by the tests. Batch 1, 2 FLOPs per MAC."""
    s = depth_savings(gm, merge=merge, variant=variant)
    a_order = list(attention_order) if attention_order is not None else sorted(s.attention)
    j_order = list(activation_order) if activation_order is not None else sorted(s.activation)
    return {(k, j): s.flops(a_order[:k], j_order[:j])
            for k in range(len(a_order) + 1) for j in range(len(j_order) + 1)}



# -- the depth planner ----------------------------------------------------------------------------
def share_count(share: float, n: int) -> int:
    """How many of ``n`` layers a share removes: the nearest count, a tie going to the fewer
    (5/12 of 6 blocks: 2; of 12: 5)."""
    return max(0, min(n, math.ceil(share * n - 0.5 - 1e-9)))


def plan_depth(gm: fx.GraphModule, budget: Budget, batches: list, *, cap_share: float = 1.0,
               exact: bool = True, mode: str = "one_shot", train_batches: Iterable | None = None,
               teacher: nn.Module | None = None, variant: str = "identity_norm", merge: str = "auto",
               fold_norm: bool = False, search: dict[str, Any] | None = None, share: float | None = None) -> Plan:
    """How many attention branches and activations to remove to meet ``budget``, and which.

    Events alternate kinds (:func:`event_order`, as the published schedule) up to ``cap_share`` of
    each kind's layers, until the FLOPs meet the budget. ``exact``: depth alone must land within the
    budget's tolerance (BoundaryDPT), else a :class:`PlanError` says how far it gets; otherwise what
    depth cannot reach is left to a later stage. ``share`` (the paper's BoundaryDPT+): remove exactly
    that share of each kind (:func:`share_count`) whatever the budget, and leave the rest to a later
    stage. Which blocks: the lowest one-shot scores on ``batches`` per kind, or (``mode="search"``)
    the gated search on ``train_batches``, whose trained, pruned graph comes back as ``plan.graph``
    (``detail["steps"]``: the optimizer steps it took)."""
    attn_scores, act_scores = one_shot_scores(gm, batches, variant=variant)
    attn_order = sorted(attn_scores, key=lambda b: (attn_scores[b], b))
    act_order = sorted(act_scores, key=lambda b: (act_scores[b], b))
    options = depth_flops_options(gm, attention_order=attn_order, activation_order=act_order,
                                  merge=merge, variant=variant)
    if share is not None:
        n_a, n_j = share_count(share, len(attn_order)), share_count(share, len(act_order))
        exact = False
    else:
        n_a, n_j = _counts_for(budget, options, round(cap_share * len(attn_order)), round(cap_share * len(act_order)))
    flops = options[(n_a, n_j)]
    if exact and budget.above(flops):
        raise PlanError(f"depth alone reaches {budget.ratio(flops):.3f} of the FLOPs at best "
                        f"(target {budget.goal}); use --method boundarydpt+ to add width pruning")
    detail: dict[str, Any] = {"selection": mode, "attention": sorted(attn_order[:n_a]),
                              "activation": sorted(act_order[:n_j])}
    if (n_a, n_j) == (0, 0):
        return Plan("depth", [], flops, budget, detail)
    if mode == "search":
        chosen = gated_search(gm, teacher, train_batches, n_a, n_j, variant=variant, merge=merge,
                              fold_norm=fold_norm, **(search or {}))
        detail.update(attention=chosen.attention, activation=chosen.activation, candidates=chosen.candidates,
                      steps=chosen.steps)
        return Plan("depth", depth_passes(chosen.attention, chosen.activation, variant, merge, fold_norm),
                    flops, budget, detail, graph=chosen.model, recipe=chosen.recipe)
    detail["scores"] = {"attention": attn_scores, "activation": act_scores}
    return Plan("depth", depth_passes(detail["attention"], detail["activation"], variant, merge, fold_norm),
                flops, budget, detail)


def _counts_for(budget: Budget, options: dict[tuple[int, int], int], cap_a: int, cap_j: int) -> tuple[int, int]:
    """Removals alternating kinds (:func:`event_order`) up to the caps until the FLOPs meet the budget."""
    n_a = n_j = 0
    for kind in event_order(cap_a, cap_j):
        if budget.met(options[(n_a, n_j)]):
            break
        n_a, n_j = (n_a + 1, n_j) if kind == "attention" else (n_a, n_j + 1)
    return n_a, n_j


def depth_passes(attention: Sequence[int], activation: Sequence[int], variant: str = "identity_norm",
                 merge: str = "auto", fold_norm: bool = False) -> list:
    """The two removal passes, attention first (what :func:`apply_depth` runs)."""
    return [AttentionRemoval(attention, variant), ActivationRemoval(activation, merge, fold_norm)]
