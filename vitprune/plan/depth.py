"""Depth selection for BoundaryDPT/HetDPT: which attention branches and which activations to remove.

Candidates are the graph's attention branches and activations between linears
(:mod:`vitprune.deps.branches`), numbered by their original block index. Two ways to choose:

* :func:`one_shot_scores` — cheap: per candidate, a first-order estimate of the loss change when it
  becomes the identity, from a few batches, no training;
* :func:`gated_search` — the published search: gates ``y = m·f(u) + (1−m)·u`` on every candidate,
  weights and scores trained together, pruning events alternating between the two kinds.

Each kind is ranked only against itself (the two kinds' gradients differ greatly in scale:
"gradient disparity"). :func:`select_depth` wraps both modes; :func:`apply_depth` runs the two passes;
:func:`depth_flops_options` tells a planner what removing k attention / j activation layers costs.

Integration (``--method boundarydpt``)::

    sel = select_depth(gm, n_attention=5, n_activation=5, mode="search", batches=loader, teacher=orig)
    gm, recipe = sel.model, sel.recipe          # pruned, merged, gates folded away
    # or, with explicit lists:  gm, recipe = apply_depth(gm, [0, 3, 7, 8, 11], [2, 7, 8, 10, 11])

The gated search (:func:`gated_search`), choice by choice, and what the HetDPT code
(``train_stage1_step2.py``, ``hetdpt/search_layers.py``) does:

* **Gates.** ``y = m·f(u) + (1−m)·u`` on every GELU (``u`` = fc1 output) and on every attention
  module (``u`` = its normalised input LN1(x), before layer-scale, like ``Learnable_Attention``
  wrapping timm's ``Attention``); for ``variant="drop"`` ``y = m·f``. ``m`` is binary in the
  forward pass and its gradient is credited to the score (straight-through, HetDPT's
  ``GetMask``). Lowest score is pruned first.
* **Score.** HetDPT's score is a parameter (``learn_mask``, init 0) stepped by the weights'
  AdamW, i.e. a running sum of (Adam-normalised) ``−∂L/∂m``. Here the score is the running sum
  of the first-order estimates themselves, per image: ``estimator="abs"`` (default) sums
  ``|∂L_i/∂m|``, ``estimator="signed"`` sums ``−∂L_i/∂m`` (the published signal without Adam's
  normalisation). Why abs: the signed first-order term says which way the loss moves for a
  *small* step towards the identity and cancels across images on a trained model. Measured on
  the 4-block digits ViT of ``tests/test_depth_search.py``, the abs scores rank both kinds
  exactly as the true single-removal losses do and the search removed the set that keeps 65%
  accuracy before any fine-tuning, while the signed scores removed attention block 0 or 1 (the
  two most important by ablation; 11% / 45% before fine-tuning).
* **Loss.** Soft distillation KL to ``teacher`` (temperature ``tau``) + ``ce_weight`` × CE to the
  labels, or to the teacher's argmax for unlabelled batches. HetDPT's search script uses CE on
  labels (distillation off) and its stage 2 hard distillation (α=0.5). Pure KL would give no
  signal at the start (the student *is* the teacher, so ∂KL/∂m = 0): the CE term provides it.
  ``teacher=None`` uses a frozen copy of ``gm``.
* **Event schedule.** :func:`event_order`: alternate kinds, the more numerous first, activation
  first on a tie (HetDPT's ``get_prune_order``). Each event hard-prunes (``m := 0``) the
  lowest-scoring remaining candidate *of that kind only* (``Flag_Get``): the kinds are never
  ranked on one scale. A warm-up window of ``steps_per_event`` precedes the first event.
* **Recovery asymmetry.** Removing an activation hurts more at first but recovers quickly;
  removing attention hurts less but recovers slowly. So the window after an attention event is
  ``attention_recovery``× longer (HetDPT instead lengthens every later stage:
  ``multi_stage=[3,5,7,...]`` epochs); and scores are reset at each event and collected only
  after the first ``score_burn_in`` fraction of the window, so the loss spike right after an
  event (largest after activation events) does not drive the next decision
  (``reset_scores=False`` keeps accumulating over the whole search, as HetDPT's ``learn_mask``).
* **Optimiser.** AdamW(``lr``, ``weight_decay``) on the weights, constant learning rate (HetDPT:
  cosine restarts aligned with the stages). The captured graph is the eval-mode function, so no
  dropout or drop-path applies.
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

from vitprune.frontend.capture import first_tensor
from vitprune.deps.branches import ActivationSite, AttentionBranch, find_activations, find_attention_branches
from vitprune.errors import InputError, PlanError
from vitprune.plan.budget import Budget, Plan
from vitprune.deps.flops import node_flops  # (importing flops also registers the CPU SDPA FLOP formula)

__all__ = ["DepthGate", "Selection", "apply_depth", "depth_flops_options", "depth_passes", "depth_savings",
           "event_order", "gated_search", "one_shot_scores", "plan_depth", "select_depth"]

GATE_ROOT = "depth_gates"
KINDS = ("attention", "activation")


# -- results -------------------------------------------------------------------------------------
class Selection(tuple):
    """``(attention_blocks, activation_blocks)``; also ``.model`` (the pruned GraphModule, gates
    folded away), ``.recipe`` (its pass recipes), ``.scores`` ({kind: {block: score}}) and
    ``.history`` (one entry per pruning event)."""

    def __new__(cls, attention: Sequence[int], activation: Sequence[int], *, model=None, recipe=None,
                scores=None, history=None):
        self = super().__new__(cls, (sorted(int(b) for b in attention), sorted(int(b) for b in activation)))
        self.model, self.recipe = model, list(recipe or [])
        self.scores, self.history = dict(scores or {}), list(history or [])
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
    recipe = []
    for p in depth_passes(attention_blocks, activation_blocks, variant, merge, fold_norm):
        result = manager.apply(p, gm)
        gm = result.graph_module
        if result.recipe:
            recipe.append(result.recipe)
    return gm, recipe


# -- gates ---------------------------------------------------------------------------------------
class DepthGate(nn.Module):
    """``y = m·f + (1−m)·u`` (``u`` is None for the "drop" variant: ``y = m·f``).

    The mask ``m`` is binary in the forward pass (``alive``: 1 until pruned, then 0); its gradient is
    credited to ``score`` unchanged — a straight-through estimator. The mask is materialised as a
    ``(B, 1, ...)`` leaf (``last_mask``) so that after ``backward`` each image's ``∂L_i/∂m`` can be
    read; their sum is exactly the gradient of a scalar mask. ``∂L/∂m = <∂L/∂y, f − u>``, so
    ``−∂L/∂m`` is the first-order estimate of ``L(m=0) − L(m=1)``: how much the loss grows when the
    layer becomes the identity. ``score`` accumulates these estimates (see :func:`gated_search`).
    """

    def __init__(self, kind: str, block: int):
        super().__init__()
        self.kind, self.block = kind, int(block)
        self.register_buffer("score", torch.zeros((), dtype=torch.float64))
        self.register_buffer("alive", torch.ones(()))
        self.last_mask: torch.Tensor | None = None

    def forward(self, f: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
        m = self.alive.to(f.dtype).expand((f.shape[0],) + (1,) * (f.dim() - 1)).clone()
        if torch.is_grad_enabled():
            m.requires_grad_(True)
            self.last_mask = m
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
def _split(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], y
    raise InputError(f"a batch must be an image tensor or (images, labels), got {type(batch).__name__}")


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
        x, y = _split(batch)
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


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None, *,
                      tau: float = 1.0, ce_weight: float = 0.5) -> torch.Tensor:
    """Soft KL(teacher‖student) at temperature ``tau`` (× tau², batch mean) + ``ce_weight`` × CE to
    ``target`` (labels, or the teacher's argmax when there are none: hard distillation)."""
    kd = F.kl_div(F.log_softmax(student / tau, -1), F.log_softmax(teacher / tau, -1),
                  reduction="batchmean", log_target=True) * tau * tau
    if ce_weight:
        target = teacher.argmax(-1) if target is None else target
        kd = kd + ce_weight * F.cross_entropy(student, target)
    return kd


def gated_search(gm: fx.GraphModule, teacher: nn.Module | None, train_batches: Iterable,
                 n_attention: int, n_activation: int, steps_per_event: int = 100, lr: float = 1e-4, *,
                 variant: str = "identity_norm", merge: str = "auto", fold_norm: bool = False,
                 ce_weight: float = 0.5, tau: float = 1.0, weight_decay: float = 0.05,
                 estimator: str = "abs", reset_scores: bool = True,
                 attention_recovery: float = 2.0, score_burn_in: float = 0.5,
                 candidates_attention: Sequence[int] | None = None,
                 candidates_activation: Sequence[int] | None = None,
                 log: Callable[[dict[str, Any]], None] | None = None) -> Selection:
    """The HetDPT search stage: gates on every candidate, weights and scores trained together,
    alternating hard-pruning events (each choice is explained in the module docstring). Returns
    :class:`Selection` ``(attention_blocks, activation_blocks)`` whose ``.model`` is the trained,
    pruned graph with the gates folded away (the removed layers rewritten by the two passes; no gate
    module or node is left). ``gm`` is not modified; ``teacher=None`` uses a frozen copy of it."""
    if n_attention < 0 or n_activation < 0 or steps_per_event < 1:
        raise InputError("n_attention and n_activation must be >= 0 and steps_per_event >= 1")
    if estimator not in ("signed", "abs"):
        raise InputError(f"estimator must be 'signed' or 'abs', got {estimator!r}")
    student = copy.deepcopy(gm)
    branches, sites = _candidates(student, candidates_attention, candidates_activation, variant)
    if n_attention > len(branches) or n_activation > len(sites):
        raise InputError(f"asked to remove {n_attention} attention / {n_activation} activation layers; "
                         f"there are {len(branches)} / {len(sites)} candidates")
    run = _SearchRun(student, _frozen(teacher if teacher is not None else copy.deepcopy(gm)),
                     _insert_gates(student, branches, sites, variant), _cycle(train_batches),
                     estimator, tau, ce_weight, log)
    run.opt = torch.optim.AdamW(_trainable(student), lr=lr, weight_decay=weight_decay)
    pruned: dict[str, list[int]] = {k: [] for k in KINDS}
    history: list[dict[str, Any]] = []
    windows = [(None, steps_per_event, 0.0)] + [
        (kind, max(1, round(steps_per_event * (attention_recovery if kind == "attention" else 1.0))),
         score_burn_in) for kind in event_order(n_attention, n_activation)]
    for i, (kind, length, burn_in) in enumerate(windows):
        if kind is not None:
            block = _prune_lowest(run.gates, kind, pruned[kind])
            pruned[kind].append(block)
            history.append({"step": run.step, "kind": kind, "block": block, "scores": _scores(run.gates)})
            if log:
                log(history[-1])
            if reset_scores:
                for g in run.gates.values():
                    g.score.zero_()
        run.train_window(length, math.floor(length * burn_in), i)
    student.eval()
    scores = _scores(run.gates)
    model, recipe = _fold(student, pruned, variant, merge, fold_norm, next(run.data))
    return Selection(pruned["attention"], pruned["activation"], model=model, recipe=recipe,
                     scores=scores, history=history)


@dataclass
class _SearchRun:
    """The state one gated search trains: the gated student, its frozen teacher, the data stream."""

    student: fx.GraphModule
    teacher: nn.Module
    gates: dict[tuple[str, int], "DepthGate"]
    data: Iterator
    estimator: str
    tau: float
    ce_weight: float
    log: Callable[[dict[str, Any]], None] | None
    opt: torch.optim.Optimizer | None = None
    step: int = 0

    def train_window(self, length: int, collect_from: int, window: int) -> None:
        """``length`` distillation steps; gate scores accumulate from step ``collect_from`` on."""
        device = _device(self.student)
        self.student.train()
        for s in range(length):
            x, y = _split(next(self.data))
            x, y = x.to(device), (y.to(device) if y is not None else None)
            with torch.no_grad():
                t = first_tensor(self.teacher(x))
            loss = distillation_loss(first_tensor(self.student(x)), t, y, tau=self.tau, ce_weight=self.ce_weight)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            for g in self.gates.values():
                est = g.estimates()
                if s >= collect_from and est is not None:
                    g.score += est.abs().sum() if self.estimator == "abs" else est.sum()
                g.clear()
            self.step += 1
        if self.log:
            self.log({"step": self.step, "loss": loss.item(), "window": window})


def _frozen(teacher: nn.Module) -> nn.Module:
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _trainable(student: nn.Module) -> list[torch.nn.Parameter]:
    weights = list(student.parameters())  # gates hold buffers only
    for p in weights:
        p.requires_grad_(True)
    return weights


def _prune_lowest(gates: dict[tuple[str, int], DepthGate], kind: str, done: list[int]) -> int:
    alive = [(g.score.detach().item(), b) for (k, b), g in gates.items() if k == kind and b not in done]
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
    x, _ = _split(batch)
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
def plan_depth(gm: fx.GraphModule, budget: Budget, batches: list, *, cap_share: float = 1.0,
               exact: bool = True, mode: str = "one_shot", train_batches: Iterable | None = None,
               teacher: nn.Module | None = None, variant: str = "identity_norm", merge: str = "auto",
               fold_norm: bool = False, search: dict[str, Any] | None = None) -> Plan:
    """How many attention branches and activations to remove to meet ``budget``, and which.

    Events alternate kinds (:func:`event_order`, as the published schedule) up to ``cap_share`` of
    each kind's layers, until the FLOPs meet the budget. ``exact``: depth alone must land within the
    budget's tolerance (BoundaryDPT), else a :class:`PlanError` says how far it gets; otherwise what
    depth cannot reach is left to a later stage. Which blocks: the lowest one-shot scores on
    ``batches`` per kind, or (``mode="search"``) the gated search on ``train_batches``, whose trained,
    pruned graph comes back as ``plan.graph``."""
    attn_scores, act_scores = one_shot_scores(gm, batches, variant=variant)
    attn_order = sorted(attn_scores, key=lambda b: (attn_scores[b], b))
    act_order = sorted(act_scores, key=lambda b: (act_scores[b], b))
    options = depth_flops_options(gm, attention_order=attn_order, activation_order=act_order,
                                  merge=merge, variant=variant)
    cap_a, cap_j = round(cap_share * len(attn_order)), round(cap_share * len(act_order))
    n_a = n_j = 0
    for kind in event_order(cap_a, cap_j):
        if budget.met(options[(n_a, n_j)]):
            break
        n_a, n_j = (n_a + 1, n_j) if kind == "attention" else (n_a, n_j + 1)
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
        detail.update(attention=chosen.attention, activation=chosen.activation)
        return Plan("depth", depth_passes(chosen.attention, chosen.activation, variant, merge, fold_norm),
                    flops, budget, detail, graph=chosen.model, recipe=chosen.recipe)
    detail["scores"] = {"attention": attn_scores, "activation": act_scores}
    return Plan("depth", depth_passes(detail["attention"], detail["activation"], variant, merge, fold_norm),
                flops, budget, detail)


def depth_passes(attention: Sequence[int], activation: Sequence[int], variant: str = "identity_norm",
                 merge: str = "auto", fold_norm: bool = False) -> list:
    """The two removal passes, attention first (what :func:`apply_depth` runs)."""
    return [AttentionRemoval(attention, variant), ActivationRemoval(activation, merge, fold_norm)]
