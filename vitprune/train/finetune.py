"""Recovery fine-tuning: distil the original (teacher) model into the pruned (student) GraphModule.

One call, CPU or GPU, one process or many under ``torchrun``::

    history = finetune(pruned_gm, original, train_loader, val_loader,
                       FinetuneConfig(epochs=10, lr=5e-4, checkpoint="ft.pt", resume=True))
    history["best_top1"], history["epochs"][-1]["top1"]

The recipe
    AdamW (``timm.optim.create_optimizer_v2``; no weight decay on biases, norms, position
    embeddings and class/register tokens), a per-step cosine schedule with linear warm-up
    (``timm.scheduler.CosineLRScheduler``), loss ``kd_weight · T² · KL(teacher_T ‖ student_T)
    + label_weight · CE(labels, label_smoothing)``. Without a teacher the loss is the CE term alone
    (``label_weight`` must then be > 0). The teacher runs frozen in eval mode under ``no_grad``; the
    student trains in train mode (its dropout modules are active) and its parameters stay the very
    objects the optimizer holds (moves and resumes copy in place).

Data
    ``train_loader``/``val_loader`` are DataLoaders or map-style datasets. A DataLoader keeps its batch
    size, workers and collate function, but finetune owns the *order*: a
    :class:`~torch.utils.data.DistributedSampler` seeded by ``config.seed`` and re-drawn each epoch
    (shuffled if the loader shuffled; datasets are always shuffled for training). That is what makes a
    resumed run identical to an uninterrupted one, and a run on N processes with batch B equal to one
    process with batch N·B (the global batch is the same set of samples).

Reproducibility and resume
    Every epoch reseeds torch/numpy/random from ``(seed, epoch, rank)``, so an epoch does not depend
    on how the process got there. After each epoch rank 0 writes ``config.checkpoint`` atomically
    (temp file, then ``os.replace``): state dicts of model, optimizer, scheduler (and AMP scaler),
    the completed epoch count and the history; loadable with ``torch.load(weights_only=True)``.
    ``resume=True`` continues after the last completed epoch (a missing file starts fresh); a
    checkpoint written by a run with a different trajectory (lr, epochs, batch, world size, ...) is
    refused rather than silently mixed.

Multi-GPU
    Launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), finetune initialises the
    process group (NCCL on GPU, Gloo on CPU) unless the caller already did, wraps the student in
    :class:`~torch.nn.parallel.DistributedDataParallel`, shards the data, all-reduces the metrics, and
    only rank 0 shows progress and writes checkpoints. ``batch_size`` is per process; the learning
    rate is not rescaled.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn.functional as F
from timm.optim import create_optimizer_v2, list_optimizers, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, RandomSampler, Sampler

from tqdm.auto import tqdm

from vitprune.deploy.outputs import atomic_write, through_memory
from vitprune.errors import InputError, VitpruneError
from vitprune.frontend.capture import first_tensor
from vitprune.train.data import image_folder, split_batch

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "vitprune-finetune"
CHECKPOINT_VERSION = 1

#: Names excluded from weight decay when neither model says (timm's ViT ``no_weight_decay()``).
_DEFAULT_NO_DECAY = ("pos_embed", "cls_token", "dist_token", "reg_token")
#: Config fields that decide the training trajectory: a checkpoint is resumed only if they match.
_TRAJECTORY = ("epochs", "lr", "weight_decay", "warmup_epochs", "warmup_lr", "min_lr", "opt", "kd_weight",
               "temperature", "label_weight", "label_smoothing", "grad_clip", "seed")


@dataclass
class FinetuneConfig:
    """Fine-tuning settings; validated on construction (:class:`InputError` names the bad field)."""

    epochs: int = 10
    batch_size: int = 64          # per process; used when a Dataset (not a DataLoader) is given
    lr: float = 5e-4              # peak learning rate, reached after warm-up
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0    # may be fractional; counted in optimizer steps
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    opt: str = "adamw"            # any name timm.optim.create_optimizer_v2 knows
    kd_weight: float = 1.0        # soft-target KL weight (ignored without a teacher)
    temperature: float = 1.0
    label_weight: float = 0.0     # hard-label CE weight (needs labels; required > 0 without a teacher)
    label_smoothing: float = 0.1
    grad_clip: float | None = None
    seed: int = 0
    amp: bool = False             # mixed precision on CUDA (bf16 where supported, else fp16 + scaler)
    device: str = "auto"          # "auto" (CUDA when available), "cpu", "cuda", "cuda:1"
    checkpoint: str | None = None
    resume: bool = False
    log_every: int = 20           # steps between progress-bar loss/lr updates
    workers: int = 0              # DataLoader workers when a Dataset is given
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def fail(name: str, what: str) -> None:
            raise InputError(f"finetune {name} must be {what}, got {getattr(self, name)!r}")

        for name, low in (("epochs", 1), ("batch_size", 1), ("log_every", 1), ("workers", 0)):
            if not _is_int(getattr(self, name)) or getattr(self, name) < low:
                fail(name, f"an integer >= {low}")
        if not (_is_real(self.lr) and self.lr > 0):
            fail("lr", "a number > 0")
        for name in ("weight_decay", "warmup_epochs", "warmup_lr", "min_lr", "kd_weight", "label_weight",
                     "label_smoothing"):
            if not (_is_real(getattr(self, name)) and getattr(self, name) >= 0):
                fail(name, "a number >= 0")
        if self.warmup_epochs > self.epochs:
            fail("warmup_epochs", f"at most epochs ({self.epochs})")
        if self.min_lr > self.lr:
            fail("min_lr", f"at most lr ({self.lr})")
        if not self.label_smoothing < 1:
            fail("label_smoothing", "in [0, 1)")
        if not (_is_real(self.temperature) and self.temperature > 0):
            fail("temperature", "a number > 0")
        if self.kd_weight == 0 and self.label_weight == 0:
            raise InputError("finetune kd_weight and label_weight are both 0: there is nothing to learn from")
        if self.grad_clip is not None and not (_is_real(self.grad_clip) and self.grad_clip > 0):
            fail("grad_clip", "None or a number > 0")
        if not _is_int(self.seed):
            fail("seed", "an integer")
        for name in ("amp", "resume", "progress"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "true or false")
        if not isinstance(self.opt, str) or self.opt.lower() not in _optimizer_names():
            fail("opt", "an optimizer name of timm.optim (e.g. adamw, sgd, lamb)")
        if not isinstance(self.device, str) or not _valid_device(self.device):
            fail("device", '"auto", "cpu", "cuda" or "cuda:N"')
        if self.checkpoint is not None and not isinstance(self.checkpoint, (str, os.PathLike)):
            fail("checkpoint", "None or a file path")
        if self.resume and self.checkpoint is None:
            raise InputError("finetune resume=True needs a checkpoint path")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _optimizer_names() -> set[str]:
    return set(list_optimizers())


def _valid_device(s: str) -> bool:
    if s == "auto":
        return True
    try:
        return torch.device(s).type in ("cpu", "cuda")
    except (RuntimeError, ValueError):
        return False


# -- distributed context ----------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    created_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum ``values`` over all processes (float64 on the training device)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()


def _setup_distributed(device: str) -> _Dist:
    """Pick the device; under ``torchrun`` (WORLD_SIZE > 1) join or start the process group."""
    want = _resolve_device(device)
    env_world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if not (dist.is_available() and (dist.is_initialized() or env_world > 1)):
        return _Dist(device=want)
    created = False
    if not dist.is_initialized():
        backend = "nccl" if want.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend=backend, init_method="env://")
        except (RuntimeError, ValueError, KeyError) as e:
            raise InputError(f"WORLD_SIZE={env_world} is set but the {backend} process group did not start "
                             f"({' '.join(str(e).split())[:200]}); launch with torchrun") from e
        created = True
    rank, world = dist.get_rank(), dist.get_world_size()
    if want.type == "cuda" and want.index is None:
        want = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
    if want.type == "cuda":
        torch.cuda.set_device(want)
    return _Dist(rank, world, want, created)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} requested but CUDA is not available; use device='auto' or 'cpu'")
    return d


# -- data ---------------------------------------------------------------------------------------------
class _Shard(Sampler[int]):
    """Indices ``rank, rank + world, ...``: evaluation shards with no padding (no sample counted twice)."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _dataset_of(data: Any, what: str) -> Dataset:
    dataset = data.dataset if isinstance(data, DataLoader) else data
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise InputError(f"{what} must be a map-style Dataset (with __len__/__getitem__) or a DataLoader over one")
    if len(dataset) == 0:
        raise InputError(f"{what} is empty")
    return dataset


def _loader_kwargs(data: Any, cfg: FinetuneConfig, ctx: _Dist, what: str) -> dict[str, Any]:
    if isinstance(data, DataLoader):
        if data.batch_size is None:
            raise InputError(f"{what}: a DataLoader with a custom batch_sampler is not supported; pass its dataset")
        return dict(batch_size=data.batch_size, num_workers=data.num_workers, collate_fn=data.collate_fn,
                    pin_memory=data.pin_memory, worker_init_fn=data.worker_init_fn,
                    persistent_workers=data.persistent_workers)
    return dict(batch_size=cfg.batch_size, num_workers=cfg.workers, pin_memory=ctx.device.type == "cuda",
                persistent_workers=cfg.workers > 0)


def _train_loader(data: Any, cfg: FinetuneConfig, ctx: _Dist) -> DataLoader:
    dataset = _dataset_of(data, "train data")
    kwargs = _loader_kwargs(data, cfg, ctx, "train data")
    shuffle = (not isinstance(data, DataLoader) or isinstance(data.sampler, RandomSampler)
               or bool(getattr(data.sampler, "shuffle", False)))
    sampler = DistributedSampler(dataset, num_replicas=ctx.world, rank=ctx.rank, shuffle=shuffle, seed=cfg.seed)
    if isinstance(data, DataLoader):
        drop_last = data.drop_last
    else:  # full batches only, unless the shard has less than one batch
        drop_last = len(sampler) >= kwargs["batch_size"]
    loader = DataLoader(dataset, sampler=sampler, drop_last=drop_last, **kwargs)
    if len(loader) == 0:
        raise InputError(f"train data ({len(dataset)} samples) gives no batch of {kwargs['batch_size']} per "
                         f"process (drop_last, {ctx.world} processes)")
    return loader


def _eval_loader(data: Any, cfg: FinetuneConfig, ctx: _Dist) -> DataLoader:
    if isinstance(data, DataLoader) and ctx.world == 1:
        return data
    dataset = _dataset_of(data, "validation data")
    kwargs = _loader_kwargs(data, cfg, ctx, "validation data")
    kwargs["persistent_workers"] = False
    return DataLoader(dataset, sampler=_Shard(len(dataset), ctx.rank, ctx.world), **kwargs)


# -- evaluation ---------------------------------------------------------------------------------------
def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def _count_correct(model: nn.Module, loader: Iterable, device: torch.device,
                   autocast: Any = nullcontext) -> tuple[int, int]:
    correct = torch.zeros((), dtype=torch.int64, device=device)
    total = 0
    for batch in loader:
        images, labels = split_batch(batch)
        if labels is None:
            raise InputError("evaluation data must give (images, labels) batches")
        with autocast():
            logits = first_tensor(model(images.to(device, non_blocking=True)))
        correct += (logits.argmax(dim=-1) == labels.to(device)).sum()
        total += len(labels)
    return int(correct), total


def evaluate(model: nn.Module, loader: Iterable, *, device: str | torch.device | None = None) -> float:
    """Top-1 accuracy in percent (0–100) of ``model`` on ``(images, labels)`` batches.

    Runs in eval mode on ``device`` (default: where the model's parameters are) and restores the
    model's training mode afterwards.
    """
    dev = torch.device(device) if device is not None else _model_device(model)
    if isinstance(loader, Dataset):  # a dataset (what folder_datasets returns) is batched here
        loader = DataLoader(loader, batch_size=256)
    was_training = model.training
    model.eval()
    try:
        correct, total = _count_correct(model, loader, dev)
    finally:
        model.train(was_training)
    if total == 0:
        raise InputError("evaluation data is empty")
    return 100.0 * correct / total



# -- optimisation -------------------------------------------------------------------------------------
def _no_decay_names(student: nn.Module, teacher: nn.Module | None) -> set[str]:
    names: set[str] = set()
    for m in (student, teacher):
        if m is not None and callable(getattr(m, "no_weight_decay", None)):
            names |= set(m.no_weight_decay())
    return names or set(_DEFAULT_NO_DECAY)


def _make_optimizer(student: nn.Module, teacher: nn.Module | None, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    groups = param_groups_weight_decay(student, cfg.weight_decay,
                                       no_weight_decay_list=_no_decay_names(student, teacher))
    if not groups:
        raise InputError("the student has no trainable parameters")
    return create_optimizer_v2(groups, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _make_scheduler(optimizer: torch.optim.Optimizer, cfg: FinetuneConfig, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    warmup = min(total - 1, int(round(cfg.warmup_epochs * steps_per_epoch)))
    return CosineLRScheduler(optimizer, t_initial=max(1, total - warmup), lr_min=cfg.min_lr,
                             warmup_t=warmup, warmup_lr_init=cfg.warmup_lr, warmup_prefix=True,
                             t_in_epochs=False)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                      labels: torch.Tensor | None, cfg: FinetuneConfig) -> torch.Tensor:
    """``kd_weight · T² · KL(softmax(t/T) ‖ softmax(s/T)) + label_weight · CE(s, labels)``."""
    s = student_logits.float()
    loss = s.new_zeros(())
    if teacher_logits is not None and cfg.kd_weight > 0:
        t = cfg.temperature
        kl = F.kl_div(F.log_softmax(s / t, dim=-1), F.log_softmax(teacher_logits.float() / t, dim=-1),
                      reduction="batchmean", log_target=True)
        loss = loss + cfg.kd_weight * t * t * kl
    if cfg.label_weight > 0:
        if labels is None:
            raise InputError("label_weight > 0 needs (images, labels) batches")
        loss = loss + cfg.label_weight * F.cross_entropy(s, labels, label_smoothing=cfg.label_smoothing)
    return loss


def _reseed(seed: int, epoch: int, rank: int) -> None:
    s = ((seed * 100_003 + epoch) * 1_009 + rank) % (2**63)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % (2**32))


class _Amp:
    """autocast + (for fp16) a GradScaler; a no-op off CUDA or when disabled."""

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled = enabled and device.type == "cuda"
        self.dtype = (torch.bfloat16 if self.enabled and torch.cuda.is_bf16_supported() else torch.float16)
        self.scaler = torch.amp.GradScaler("cuda") if self.enabled and self.dtype == torch.float16 else None

    def autocast(self):
        return torch.autocast("cuda", dtype=self.dtype) if self.enabled else nullcontext()

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
             grad_clip: float | None) -> None:
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        if grad_clip:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        self.scaler.step(optimizer)
        self.scaler.update()


def _has_unused_parameters(model: nn.Module) -> bool:
    """Whether a GraphModule holds trainable parameters its graph never reads (other modules: no)."""
    if not isinstance(model, fx.GraphModule):
        return False
    used: list[str] = []
    for node in model.graph.nodes:
        if node.op in ("get_attr", "call_module"):
            used.append(str(node.target))
    return any(not any(name == u or name.startswith(u + ".") for u in used)
               for name, p in model.named_parameters() if p.requires_grad)


# -- checkpoints --------------------------------------------------------------------------------------
def _atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` through :func:`~vitprune.deploy.outputs.atomic_write`: readers see the old
    checkpoint or the new one, never a torn one; through memory, so a full disk is an ``OSError``
    (refused in one line) rather than torch's C++ RuntimeError."""
    atomic_write(path, through_memory(lambda f: torch.save(obj, f)))


def freeze(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with no parameter requiring a gradient (a teacher): in place, returned."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a finetune checkpoint (weights only: no pickled code); :class:`InputError` if it is not one."""
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated/corrupt files raise several kinds
        raise InputError(f"cannot read checkpoint {os.fspath(path)}: {' '.join(str(e).split())[:200]}") from e
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT or ck.get("version") != CHECKPOINT_VERSION:
        raise InputError(f"{os.fspath(path)} is not a {CHECKPOINT_FORMAT} v{CHECKPOINT_VERSION} checkpoint")
    return ck


def _run_signature(cfg: FinetuneConfig, ctx: _Dist, batch_size: int, steps: int, amp: _Amp) -> dict[str, Any]:
    sig = {k: getattr(cfg, k) for k in _TRAJECTORY}
    sig.update(world_size=ctx.world, batch_size=batch_size, steps_per_epoch=steps, amp=amp.enabled)
    return sig


def _resume(cfg: FinetuneConfig, sig: dict[str, Any], student: nn.Module, optimizer, scheduler, amp: _Amp,
            device: torch.device) -> tuple[int, dict[str, Any]] | None:
    if not (cfg.resume and os.path.exists(cfg.checkpoint)):
        return None
    ck = load_checkpoint(cfg.checkpoint, map_location=device)
    differ = sorted(k for k in sig if ck["run"].get(k) != sig[k])
    if differ:
        detail = ", ".join(f"{k}: {ck['run'].get(k)!r} → {sig[k]!r}" for k in differ)
        raise InputError(f"checkpoint {cfg.checkpoint} was written by a different run ({detail}); "
                         "resume with the same settings or use a new checkpoint path")
    try:
        student.load_state_dict(ck["model"])  # copies in place: the optimizer's parameters stay the same
    except RuntimeError as e:
        raise InputError(f"checkpoint {cfg.checkpoint} does not fit this student: "
                         f"{' '.join(str(e).split())[:200]}") from e
    optimizer.load_state_dict(ck["optimizer"])
    scheduler.load_state_dict(ck["scheduler"])
    if amp.scaler is not None and ck.get("scaler"):
        amp.scaler.load_state_dict(ck["scaler"])
    return int(ck["epoch"]), ck["history"]


# -- the loop -----------------------------------------------------------------------------------------
def finetune(student: nn.Module, teacher: nn.Module | None, train_loader: DataLoader | Dataset,
             val_loader: DataLoader | Dataset | None = None, config: FinetuneConfig | None = None) -> dict[str, Any]:
    """Fine-tune ``student`` (in place) with distillation from ``teacher``; return the history.

    History::

        {"epochs": [{"epoch": 1, "loss": 0.41, "top1": 93.1, "lr": 4.9e-4, "seconds": 3.2}, ...],
         "best_top1": 93.9, "best_epoch": 4, "initial_top1": 61.0,   # top-1 values None without val data
         "device": "cpu", "world_size": 1, "steps_per_epoch": 22, "amp": False, "resumed_from": None}

    ``loss`` is the epoch's mean training loss over all processes, ``top1`` the validation top-1 in
    percent after the epoch, ``lr`` the learning rate of its last step. Both models are returned on
    their original devices and in their original training modes.
    """
    cfg = config if config is not None else FinetuneConfig()
    cfg.validate()
    if not isinstance(student, nn.Module) or (teacher is not None and not isinstance(teacher, nn.Module)):
        raise InputError("student and teacher must be torch modules (teacher may be None)")
    if teacher is student:
        raise InputError("the teacher must be a separate (original) model, not the student itself")
    if teacher is None and cfg.label_weight == 0:
        raise InputError("without a teacher finetune trains on labels: set label_weight > 0")
    ctx = _setup_distributed(cfg.device)
    homes = [(m, _model_device(m), m.training) for m in (student, teacher) if m is not None]
    try:
        return _Run(student, teacher, train_loader, val_loader, cfg, ctx).run()
    finally:
        for m, device, training in homes:
            m.to(device)
            m.train(training)
        if ctx.created_group:
            dist.destroy_process_group()


class _Run:
    def __init__(self, student, teacher, train_data, val_data, cfg: FinetuneConfig, ctx: _Dist) -> None:
        self.cfg, self.ctx, self.device = cfg, ctx, ctx.device
        self.student = student.to(self.device)  # in place: parameter objects are kept
        self.teacher = teacher.to(self.device).eval() if teacher is not None else None
        self.train_loader = _train_loader(train_data, cfg, ctx)
        self.val_loader = _eval_loader(val_data, cfg, ctx) if val_data is not None else None
        self.params = [p for p in student.parameters() if p.requires_grad]
        self.optimizer = _make_optimizer(student, teacher, cfg)
        self.steps = len(self.train_loader)
        self.scheduler = _make_scheduler(self.optimizer, cfg, self.steps)
        self.amp = _Amp(cfg.amp, self.device)
        self.signature = _run_signature(cfg, ctx, self.train_loader.batch_size, self.steps, self.amp)
        self.model = student
        if ctx.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # DDP broadcasts rank 0's weights; parameters a pass left out of the graph get no gradient
            self.model = DDP(student, device_ids=ids, find_unused_parameters=_has_unused_parameters(student))

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        start, history = 0, None
        resumed = _resume(cfg, self.signature, self.student, self.optimizer, self.scheduler, self.amp, self.device)
        if resumed is not None:
            start, history = resumed
            history["resumed_from"] = start
        else:
            history = {"epochs": [], "best_top1": None, "best_epoch": None,
                       "initial_top1": self._validate(), "device": str(self.device),
                       "world_size": self.ctx.world, "steps_per_epoch": self.steps, "amp": self.amp.enabled,
                       "resumed_from": None}
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            loss, lr = self._train_epoch(epoch)
            top1 = self._validate()
            record = {"epoch": epoch + 1, "loss": loss, "top1": top1, "lr": lr,
                      "seconds": round(time.perf_counter() - t0, 3)}
            history["epochs"].append(record)
            if top1 is not None and (history["best_top1"] is None or top1 > history["best_top1"]):
                history["best_top1"], history["best_epoch"] = top1, epoch + 1
            self._report(record)
            if cfg.checkpoint and self.ctx.main:
                self._save(epoch + 1, history)
        return history

    def _train_epoch(self, epoch: int) -> tuple[float, float]:
        cfg, device = self.cfg, self.device
        _reseed(cfg.seed, epoch, self.ctx.rank)
        self.train_loader.sampler.set_epoch(epoch)
        self.model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        seen = 0
        bar = tqdm(self.train_loader, total=self.steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not (cfg.progress and self.ctx.main), dynamic_ncols=True)
        lr = self.optimizer.param_groups[0]["lr"]
        for i, batch in enumerate(bar):
            self.scheduler.step_update(epoch * self.steps + i)  # this step's lr: stateless in the step
            lr = max(g["lr"] for g in self.optimizer.param_groups)
            images, labels = split_batch(batch)
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True) if labels is not None else None
            with self.amp.autocast():
                teacher_logits = None
                if self.teacher is not None and cfg.kd_weight > 0:
                    with torch.no_grad():
                        teacher_logits = first_tensor(self.teacher(images))
                logits = first_tensor(self.model(images))
                if teacher_logits is not None and teacher_logits.shape != logits.shape:
                    raise InputError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                                     f"{tuple(logits.shape)} differ in shape")
                loss = distillation_loss(logits, teacher_logits, labels, cfg)
            self.amp.step(loss, self.optimizer, self.params, cfg.grad_clip)
            loss_sum += loss.detach().double() * len(images)
            seen += len(images)
            if bar.disable is False and (i + 1) % cfg.log_every == 0:
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", lr=f"{lr:.2e}")
        total, count = self.ctx.all_sum([float(loss_sum), float(seen)])
        mean = total / count
        if not math.isfinite(mean):
            raise VitpruneError(f"fine-tuning diverged: the mean loss of epoch {epoch + 1} is {mean}; "
                                f"lower lr (now {cfg.lr}) or set grad_clip")
        return mean, lr

    def _validate(self) -> float | None:
        if self.val_loader is None:
            return None
        was = self.student.training
        self.student.eval()
        try:
            correct, total = _count_correct(self.student, self.val_loader, self.device, self.amp.autocast)
        finally:
            self.student.train(was)
        correct, total = self.ctx.all_sum([correct, total])
        return 100.0 * correct / total

    def _report(self, r: dict[str, Any]) -> None:
        if not self.ctx.main:
            return
        top1 = f"  top-1 {r['top1']:.2f}%" if r["top1"] is not None else ""
        line = (f"epoch {r['epoch']}/{self.cfg.epochs}  loss {r['loss']:.4f}{top1}  lr {r['lr']:.2e}  "
                f"{r['seconds']:.1f}s")
        log.info(line)
        if self.cfg.progress:
            tqdm.write(line)

    def _save(self, epoch: int, history: dict[str, Any]) -> None:
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "epoch": epoch,
            "model": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.amp.scaler.state_dict() if self.amp.scaler is not None else None,
            "history": history,
            "run": self.signature,
            "config": dataclasses.asdict(self.cfg),
        }
        _atomic_save(state, os.fspath(self.cfg.checkpoint))


# -- image folders ------------------------------------------------------------------------------------
def folder_datasets(root: str | os.PathLike, input_size: tuple[int, int, int], *,
                    augment: bool = False, skip_bad: bool = False) -> tuple[Dataset, Dataset | None]:
    """``(train, val)`` datasets from ``--data DIR`` (image folders, see :mod:`vitprune.train.data`).

    ``DIR/train`` and ``DIR/val`` (or ``validation``) when present; otherwise ``DIR`` itself is the
    training set and there is no validation set. Validation classes are labelled by their folder
    names as in the training set; a validation class the training set lacks is refused. ``augment``
    uses timm's training transform (random-resized crop, flip, colour jitter) instead of the eval
    transform for the training set; ``skip_bad`` leaves out images that cannot be decoded (listed in
    each dataset's ``skipped``) instead of refusing them.
    """
    root = os.fspath(root)
    train = image_folder(root, input_size, split="train", train=augment, skip_bad=skip_bad)
    val = None
    for name in ("val", "validation"):
        if os.path.isdir(os.path.join(root, name)):
            val = image_folder(root, input_size, split=name, train=False, class_to_idx=train.class_to_idx,
                               labels_from=train.root, skip_bad=skip_bad)
            break
    return train, val
