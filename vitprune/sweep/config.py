"""What a sweep runs: its configuration, the method registry, and the types a method exchanges.

A :class:`Method` turns ``(model, target, ctx)`` into a :class:`Pruned` (the pruned module, not yet
fine-tuned, and a JSON *architecture* that :attr:`Method.scale` can rebuild on another model). The
built-in methods register themselves when :mod:`vitprune.sweep` is imported; more can be added with
:func:`register` (benchmarks/pareto.py adds block dropping).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from torch import nn

from vitprune.errors import InputError

#: Integer settings and the smallest value each accepts.
_AT_LEAST = {"epochs": 0, "batch_size": 1, "threads": 1, "runs": 1, "round_to": 1, "calib_batches": 1,
             "scale_runs": 1}
_IMPORTANCES = ("l2", "taylor")


@dataclass
class SweepConfig:
    """What to sweep and with which (shared) budget.

    ``steps`` (the equal budget): every point gets the same number of optimizer steps on the same
    training data, at ``lr`` with batch ``batch_size``. A method that trains while it plans (the
    gated depth search, the joint planner's probes and recovery) may spend up to ``plan_share`` of
    them and the fine-tune after pruning (distillation from the original) gets the rest, so the
    total is the same for every row; ``label`` names the budget in the results ("short", "long").
    Without ``steps``: ``epochs`` of fine-tuning after pruning, and methods plan from the
    calibration batches only."""

    targets: Sequence[float] = (0.9, 0.7, 0.5, 0.3)
    methods: Sequence[str] = ("width", "boundarydpt", "boundarydpt+", "cpvit")
    seeds: Sequence[int] = (0,)
    epochs: int = 1
    steps: int | None = None
    plan_share: float = 0.4
    label: str | None = None
    lr: float = 5e-4
    batch_size: int = 64
    importance: str = "l2"          # vitprune width importance (l2 | taylor)
    tp_importance: str = "l2"       # Torch-Pruning importance (l2 | taylor)
    round_to: int = 8               # vitprune width rounding at the swept model's size
    calib_batches: int = 4
    cpvit_heads: float | None = None  # cpvit: fraction of heads kept (None: tokens only)
    combo_tokens: str = "keep=0.7,start=2"
    threads: int = 1
    runs: int = 30
    warmup: int = 5
    scale_runs: int = 10
    scale_warmup: int = 2
    kd_weight: float = 1.0
    label_weight: float = 0.0
    progress: bool = True

    def __post_init__(self) -> None:
        self.targets = tuple(float(t) for t in self.targets)
        self.methods = tuple(self.methods)
        self.seeds = tuple(int(s) for s in self.seeds)
        if not self.targets or any(not (0.0 < t <= 1.0) for t in self.targets):
            raise InputError(f"sweep targets must be FLOPs fractions in (0, 1], got {list(self.targets)}")
        if not self.methods:
            raise InputError("sweep needs at least one method")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise InputError(f"unknown sweep method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
        if not self.seeds:
            raise InputError("sweep needs at least one seed")
        for name, least in _AT_LEAST.items():
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= least):
                raise InputError(f"sweep {name} must be an integer >= {least}, got {value!r}")
        if self.steps is not None and not (isinstance(self.steps, int) and not isinstance(self.steps, bool)
                                           and self.steps >= 1):
            raise InputError(f"sweep steps must be None or an integer >= 1, got {self.steps!r}")
        if not (isinstance(self.plan_share, (int, float)) and 0.0 <= self.plan_share < 1.0):
            raise InputError(f"sweep plan_share must be in [0, 1), got {self.plan_share!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise InputError(f"sweep lr must be > 0, got {self.lr!r}")
        if self.importance not in _IMPORTANCES or self.tp_importance not in _IMPORTANCES:
            raise InputError("sweep importance / tp_importance must be l2 or taylor")

    def budget(self) -> dict[str, Any]:
        """The training budget every point shares (recorded with the results)."""
        common = {"lr": self.lr, "batch_size": self.batch_size, "kd_weight": self.kd_weight,
                  "label_weight": self.label_weight}
        if self.steps is None:
            return {"epochs": self.epochs, **common}
        return {"steps": self.steps, "plan_share": self.plan_share, "label": self.label, **common}

    @property
    def plan_steps(self) -> int:
        """The optimizer steps a method may spend while it plans (0 without a step budget)."""
        return 0 if self.steps is None else int(self.plan_share * self.steps)


@dataclass
class ScaleModel:
    """Another model to rebuild each compressed architecture on, for latency only (random weights)."""

    name: str
    factory: Callable[[], nn.Module]
    input_size: tuple[int, int, int]


@dataclass
class PointContext:
    """What a method may use to prune: calibration batches (images, labels), the seed, the config,
    and with a step budget the training data and the steps it may train for while it plans
    (``plan_steps``; it reports the steps it took in ``Pruned.info["train_steps"]``)."""

    input_size: tuple[int, int, int]
    seed: int
    calib: list
    config: SweepConfig
    source: dict | None = None
    train: Any = None
    plan_steps: int = 0


@dataclass
class Pruned:
    """A method's output: the pruned module (not fine-tuned), its architecture (JSON) and what else
    it says (``info``; ``info["train_steps"]``: the optimizer steps it took, by phase)."""

    model: nn.Module
    arch: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Method:
    """A sweep row. ``prune(model, target, ctx) -> Pruned`` (raise PlanError when the target cannot be
    planned); ``scale(arch, src_model, src_size, dst_model, dst_size, config) -> nn.Module`` rebuilds
    the architecture on another model (None: no scaled latency for this method)."""

    name: str
    label: str
    prune: Callable[[nn.Module, float, PointContext], Pruned]
    scale: Callable[..., nn.Module] | None = None


#: Every sweep row by name, in registration order (the built-ins first).
METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add (or replace) a sweep method; returns it."""
    METHODS[method.name] = method
    return method
