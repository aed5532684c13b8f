"""What a change costs after a short recovery: the probes of the recovery-aware joint planner.

Removing a layer and recovering from it are two different prices. BoundaryDPT's observation is that
the two kinds of layer differ exactly there: an attention branch costs little right after it is
removed and recovers slowly, an activation costs more at first and recovers fast (HetDPT's stage 1
fine-tunes every single-layer removal before ranking it for that reason). A planner that ranks moves
by the loss *before* recovery removes too much attention.

A :class:`RecoveryProbe` prices a change by what is left of it after ``steps`` distillation steps
from the original model: a copy of the graph is rewritten by the change's passes, trained on the
probe's batches (the same batches, in the same order, for every change of one event, so two changes
differ only in what they removed), and its ``KL(original ‖ copy)`` is measured on the held-out
calibration batches. The price of a change is that divergence minus the divergence of the unchanged
graph after the same recovery (the *base* probe), so damage left by earlier events, which recovery
repairs in every probe alike, is not charged to the change. Every optimizer step is counted
(:attr:`RecoveryProbe.steps`): a planner's training is part of the budget it is compared under.
"""
from __future__ import annotations

import copy
from typing import Any, Iterator, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from passes.manager import PassManager
from vitprune.frontend.capture import first_tensor
from vitprune.train.finetune import FinetuneConfig, distillation_loss


def kl(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``KL(reference ‖ softmax(logits))`` per image; ``reference`` are log-probabilities."""
    return F.kl_div(F.log_softmax(logits.float(), -1), reference, reduction="batchmean", log_target=True)


def divergence(model: nn.Module, batches: Sequence, references: Sequence[torch.Tensor]) -> float:
    """Mean ``KL(reference ‖ model)`` per image over ``batches``."""
    with torch.no_grad():
        total = sum(float(kl(first_tensor(model(images)), ref)) for (images, _), ref in zip(batches, references))
    return total / max(1, len(batches))


def recover(gm: nn.Module, teacher: nn.Module | None, batches: Iterator, steps: int, lr: float) -> int:
    """``steps`` of distillation from ``teacher`` (labels when there is none) with a fresh AdamW whose
    learning rate warms up linearly over the first third of the steps (Adam's first steps move every
    weight by about ``lr`` whatever its gradient: at full rate they would damage the model before
    they repair it); returns the number of optimizer steps taken."""
    config = FinetuneConfig(kd_weight=1.0 if teacher is not None else 0.0,
                            label_weight=0.0 if teacher is not None else 1.0)
    params = [p for p in gm.parameters() if p.requires_grad]
    if not params or steps <= 0:
        return 0
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / warmup))
    gm.train()
    for _ in range(steps):
        images, labels = next(batches)
        with torch.no_grad():
            t = first_tensor(teacher(images)) if teacher is not None else None
        loss = distillation_loss(first_tensor(gm(images)), t, labels, config)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    gm.eval()
    return steps


class RecoveryProbe:
    """Prices changes of one graph after ``steps`` recovery steps (see the module docstring).

    ``held_out``/``references``: the calibration batches and the original's log-probabilities on them;
    ``data``: the training stream the probe batches of each event are drawn from."""

    def __init__(self, teacher: nn.Module | None, data: Iterator, steps: int, lr: float,
                 held_out: Sequence, references: Sequence[torch.Tensor]) -> None:
        self.teacher, self.data, self.lr = teacher, data, lr
        self.held_out, self.references = list(held_out), list(references)
        self.batch_steps = steps
        self.batches: list[Any] = []
        self.steps = 0  # optimizer steps taken by every probe so far
        self.probes = 0

    def new_event(self) -> None:
        """Draw this event's probe batches: every change of the event recovers on the same ones."""
        self.batches = [next(self.data) for _ in range(self.batch_steps)]

    def loss(self, gm: fx.GraphModule, passes: Sequence) -> float:
        """``KL(original ‖ ·)`` on the held-out batches of a copy of ``gm`` rewritten by ``passes``
        and recovered on this event's batches (``gm`` is not changed)."""
        probe = copy.deepcopy(gm)
        if passes:
            probe, _ = PassManager().apply_all(list(passes), probe)
        for p in probe.parameters():
            p.requires_grad_(True)
        self.steps += recover(probe, self.teacher, iter(self.batches), len(self.batches), self.lr)
        self.probes += 1
        return divergence(probe.eval(), self.held_out, self.references)
