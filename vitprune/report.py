"""What a compression produces: the result object, and the one report schema every face reads.

:class:`CompressReport` is the report's single definition: the pipeline builds it, the latency layer
and the ONNX writer add to it, ``PREFIX.json`` is its :meth:`~CompressReport.to_dict`, and the CLI's
summary reads it back with :meth:`~CompressReport.from_dict`. ``CompressResult.report`` stays the
plain JSON-able dict (what ``PREFIX.json`` holds).
"""
from __future__ import annotations

import dataclasses
import re
import resource
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from vitprune.errors import InputError

def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (``ru_maxrss`` is KiB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def natural_key(name: str) -> tuple:
    """Sort key that orders numbered parts by number: ``blocks.2`` before ``blocks.10``."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name))


#: What a depth-choosing stage's ``scored_on`` says when layers were chosen without real images
#: (:func:`vitprune.plan.stages.depth_stage`, ``joint_stage``).
RANDOM_SCORING = "random images labelled by the model itself"


@dataclass
class CompressReport:
    """The report of one compression. ``flops_ratio``, ``params_ratio`` and ``plan`` (the width stage's
    report) are derived, written to the JSON for readers, and ignored when read back.

    >>> r = CompressReport("width", {}, (3, 32, 32), 200, 100, 50, 40, {"width": {"notes": []}}, [], [])
    >>> r.to_dict()["flops_ratio"], CompressReport.from_dict(r.to_dict()) == r
    (0.5, True)
    """

    method: str
    spec: dict[str, Any]
    input_size: tuple[int, int, int]
    flops_before: int
    flops_after: int
    params_before: int
    params_after: int
    stages: dict[str, Any]  # {stage name: that stage's report}, in the order the stages ran
    groups: list[dict[str, Any]]  # {"name", "kind", "before", "after"} per prunable channel group
    unsupported_ops: list[str]
    recovery: dict[str, Any] | None = None  # fine-tuning history, when it ran
    #: optimizer steps the compression took, by phase: the planners' ("candidates" and "search" of the
    #: gated search, "probes" and "recovery" of the joint planner) and the recovery fine-tune ("finetune")
    train_steps: dict[str, int] = field(default_factory=dict)
    #: wall seconds by step: "capture", each stage by name, "cleanup", "recovery", and when the outputs
    #: are written "onnx" (export and checks) and "pt2"
    timings: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: float | None = None  # the process's peak resident memory so far (MiB)
    compile_seconds: float = 0.0
    latency_plan: dict[str, Any] | None = None  # the measured-latency rounds (vitprune.driver.latency)
    onnx: dict[str, Any] | None = None  # the ONNX export's checks (vitprune.api.write_outputs)
    #: how the inputs were read: the weight set of a checkpoint holding several ("weights_key",
    #: "weight_sets"), images left out as unreadable ("skipped_images": count, "skipped_examples"),
    #: and "notes" saying so (vitprune.commands; the summary prints them)
    inputs: dict[str, Any] | None = None

    @property
    def flops_ratio(self) -> float:
        return self.flops_after / self.flops_before

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before

    @property
    def plan(self) -> dict[str, Any]:
        """The width stage's report ({} when width pruning did not run)."""
        return self.stages.get("width") or {}

    @property
    def notes(self) -> list[str]:
        """The inputs' notes (a weight set chosen, images skipped), the planners' (e.g. a round_to
        that could not be met) in stage order, and the recovery's (no validation data)."""
        out: list[str] = [n for n in (self.inputs or {}).get("notes") or [] if isinstance(n, str)]
        for info in [*self.stages.values(), self.recovery]:
            if isinstance(info, dict):
                out += [info["note"]] if isinstance(info.get("note"), str) else []
                out += [n for n in info.get("notes") or [] if isinstance(n, str)]
        return out

    @property
    def depth_scored_on_random_images(self) -> bool:
        """Depth layers were chosen on random images (no ``--data``): a weaker signal than real ones."""
        return any((self.stages.get(stage) or {}).get("scored_on") == RANDOM_SCORING
                   for stage in ("depth", "joint"))

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``PREFIX.json``; the optional parts appear only when present."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["input_size"] = list(self.input_size)
        derived = {"flops_ratio": self.flops_ratio, "params_ratio": self.params_ratio, "plan": self.plan}
        order = ["method", "spec", "input_size", "flops_before", "flops_after", "flops_ratio", "params_before",
                 "params_after", "params_ratio", "plan", "stages", "groups", "unsupported_ops", "recovery",
                 "train_steps", "timings", "peak_rss_mib", "compile_seconds", "latency_plan", "onnx", "inputs"]
        d.update(derived)
        return {k: d[k] for k in order if not (k in _OPTIONAL and d[k] is None)}

    @classmethod
    def from_dict(cls, d: Any) -> "CompressReport":
        """Read back what :meth:`to_dict` wrote; anything else raises :class:`InputError` naming the
        first key that is missing, unknown or of the wrong type."""
        if not isinstance(d, dict):
            raise InputError(f"a compression report must be a mapping, got {type(d).__name__}")
        hints = typing.get_type_hints(cls)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in d and f.name not in _DEFAULTED]
        unknown = sorted(str(k) for k in d if k not in hints and k not in _DERIVED)
        if missing:
            raise InputError(f"not a vitprune compression report: it has no {', '.join(missing)}")
        if unknown:
            raise InputError(f"not a vitprune compression report: unknown key(s) {', '.join(unknown)}")
        for name, hint in hints.items():
            if name in d and not _matches(d[name], hint):
                raise InputError(f"not a vitprune compression report: {name} is {d[name]!r}, expected {hint}")
        values = {name: d[name] for name in hints if name in d}
        values["input_size"] = tuple(values["input_size"])
        return cls(**values)


_OPTIONAL = frozenset({"latency_plan", "onnx", "inputs"})
_DEFAULTED = frozenset(f.name for f in dataclasses.fields(CompressReport)
                       if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING)
_DERIVED = frozenset({"flops_ratio", "params_ratio", "plan"})


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field's type (a tuple arrives as a list; an int is a float)."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and len(value) == len(typing.get_args(hint)) and \
            all(_matches(v, a) for v, a in zip(value, typing.get_args(hint)))
    if origin is list:
        return isinstance(value, list) and all(_matches(v, typing.get_args(hint)[0]) for v in value)
    return isinstance(value, origin or hint)


@dataclass
class CompressResult:
    """The compressed graph, its report (JSON-able: :meth:`CompressReport.to_dict`), the recipe that
    replays it, where the original came from, and the input size it was captured at."""

    model: fx.GraphModule
    report: dict[str, Any]
    recipe: list[dict[str, Any]] = field(default_factory=list)
    source: dict[str, Any] | None = None
    input_size: tuple[int, int, int] = (3, 224, 224)
