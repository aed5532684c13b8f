"""The sweep's record on disk, ``sweep.json``: its shape, keys, and how it is read and written.

The file is rewritten atomically after every point, so a sweep is resumable: a finished point
(done, skipped or failed) is never recomputed. A file written with another fine-tuning budget is
refused rather than mixed with new points.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
from typing import Any

import onnxruntime as ort
import torch

from vitprune.deploy.outputs import atomic_write
from vitprune.errors import InputError
from vitprune.sweep.config import SweepConfig

SWEEP_FORMAT = "vitprune-sweep"
SWEEP_VERSION = 1


def point_key(method: str, target: float, seed: int) -> str:
    """The name of one point in ``state["points"]``, e.g. ``width@0.5#s0``."""
    return f"{method}@{target:g}#s{seed}"


def arch_key(arch: dict[str, Any]) -> str:
    """A short stable hash of an architecture (seeds that agree on one share its scaled timing)."""
    return hashlib.sha1(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]


def jsonable(o: Any) -> Any:
    """``json.dump``'s ``default``: sets and tuples as lists, tensors and numpy scalars as numbers."""
    if isinstance(o, (set, tuple)):
        return list(o)
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def machine_info() -> dict[str, Any]:
    """Where the latencies were measured."""
    return {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort.__version__,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count()}


def new_state(config: SweepConfig, input_size: tuple[int, ...], scale_model: str | None) -> dict[str, Any]:
    """An empty sweep record for ``config``."""
    return {"format": SWEEP_FORMAT, "version": SWEEP_VERSION, "budget": config.budget(),
            "input_size": list(input_size), "machine": machine_info(), "original": None, "points": {},
            "scaled": {}, "scale_model": scale_model, "config": dataclasses.asdict(config), "computed": []}


def load_state(path: str, config: SweepConfig) -> dict[str, Any] | None:
    """The record at ``path`` (None when there is none); refused when it is not a sweep file or was
    written with another fine-tuning budget."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path} exists but is not a readable sweep file: {e}") from e
    if not isinstance(state, dict) or state.get("format") != SWEEP_FORMAT:
        raise InputError(f"{path} is not a {SWEEP_FORMAT} file")
    if state.get("budget") != config.budget():
        raise InputError(f"{path} was written with another fine-tuning budget "
                         f"({state.get('budget')}); use a new --out to compare different budgets")
    state.setdefault("points", {})
    state.setdefault("scaled", {})
    return state


def save_state(path: str, state: dict[str, Any]) -> None:
    """Replace ``path`` with ``state`` in one rename."""
    text = json.dumps(state, indent=1, default=jsonable)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def merge_states(path: str, others: list[str], config: SweepConfig) -> int:
    """Copy into the record at ``path`` the points (and scaled timings) of the records ``others`` that
    it lacks: one sweep split over several processes, each with its own ``--out``, becomes one record.
    Every record must share ``config``'s fine-tuning budget (refused otherwise, as on resume). The
    merged points keep their own ONNX paths; re-time them together (:func:`~vitprune.sweep.rebench`)
    so their speedups come from one run. Returns how many points were added."""
    state = load_state(path, config)
    if state is None:
        raise InputError(f"{path} does not exist: run the sweep there first (its original model is measured there)")
    added = 0
    for other in others:
        if os.path.abspath(other) == os.path.abspath(path):
            continue
        theirs = load_state(other, config)
        if theirs is None:
            raise InputError(f"{other} does not exist: nothing to merge")
        if theirs.get("input_size") != state.get("input_size"):
            raise InputError(f"{other} was swept at input size {theirs.get('input_size')}, "
                             f"{path} at {state.get('input_size')}: not the same sweep")
        for key, point in theirs["points"].items():
            if key not in state["points"]:
                state["points"][key] = point
                added += 1
        for key, entry in theirs["scaled"].items():
            state["scaled"].setdefault(key, entry)
    save_state(path, state)
    return added
