"""ONNX Runtime latency: median and p90 per model and batch size, and side-by-side speedups.

Why this shape: pruning papers report FLOPs that never turn into latency (USERS.md #2), so every
claim is measured here, in plain ORT on CPU with a fixed thread count. Models are timed round-robin,
one run of each in turn (the starting model rotating every round), so a noisy neighbour on a shared
machine slows all models alike instead of whichever happened to run at that moment; speedups are
ratios of medians, which ignore the occasional outlier run.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from vitprune.errors import InputError
from vitprune.deploy.onnx import _describe, ort_session

__all__ = ["bench_onnx", "compare", "format_table", "InputMismatchWarning"]


class InputMismatchWarning(UserWarning):
    """The models compared take inputs of different sizes, so their speedups compare different work."""

_INPUT_SEED = 0
_NUMPY_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                 "tensor(double)": np.float64}


@dataclass
class _Timed:
    """One model under test: its session, what to feed it, and the times measured so far (ms)."""

    path: str
    session: ort.InferenceSession
    input_name: str
    batch_dim: int | str | None
    sample_shape: tuple[int, ...]
    dtype: type
    times_ms: list[float] = field(default_factory=list)


def bench_onnx(
    path: str | os.PathLike,
    *,
    batch_sizes: Sequence[int] = (1,),
    threads: int = 1,
    warmup: int = 5,
    runs: int = 30,
    input_shape: tuple[int, ...] | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Time one ONNX model; one row per batch size.

    Rows: {"model", "batch", "threads", "median_ms", "p90_ms", "mean_ms", "runs"}. ``input_shape`` is
    the per-sample shape (C, H, W); by default it is read from the model's input, which must then
    be static apart from the batch axis.
    """
    return _bench([path], batch_sizes=batch_sizes, threads=threads, warmup=warmup, runs=runs,
                  input_shape=input_shape, progress=progress)


def compare(
    paths: Sequence[str | os.PathLike],
    *,
    batch_sizes: Sequence[int] = (1,),
    threads: int = 1,
    warmup: int = 5,
    runs: int = 30,
    input_shape: tuple[int, ...] | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Time several ONNX models interleaved run by run; rows grouped by batch size, in ``paths`` order.

    With two or more models each row also has "speedup": the first model's median divided by this
    model's median at the same batch size (> 1 means faster than the first; the first gets 1.0).
    """
    if isinstance(paths, (str, os.PathLike)) or len(paths) == 0:
        raise InputError("compare needs a non-empty list of ONNX paths")
    rows = _bench(list(paths), batch_sizes=batch_sizes, threads=threads, warmup=warmup, runs=runs,
                  input_shape=input_shape, progress=progress)
    if len(paths) >= 2:
        for start in range(0, len(rows), len(paths)):
            group = rows[start:start + len(paths)]
            for row in group:
                row["speedup"] = group[0]["median_ms"] / row["median_ms"]
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain Markdown table of bench rows (the speedup column only when the rows have one)."""
    columns = ["model", "batch", "threads", "median_ms", "p90_ms", "mean_ms", "runs"]
    if any("speedup" in row for row in rows):
        columns.append("speedup")
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---" if c == "model" else "---:" for c in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------


def _bench(paths: list[str | os.PathLike], *, batch_sizes: Sequence[int], threads: int,
           warmup: int, runs: int, input_shape: tuple[int, ...] | None,
           progress: bool) -> list[dict[str, Any]]:
    """Validate everything first (no half-finished benchmark on bad input), then time round-robin."""
    batch_sizes = _check_settings(batch_sizes, threads, warmup, runs)
    models = [_open(p, threads, input_shape) for p in paths]
    for model in models:
        for batch in batch_sizes:
            _check_batch(model, batch)
            _time_one(model, _feed(model, batch))  # a model that cannot run fails here, not mid-table
    _warn_if_inputs_differ(models)
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(batch_sizes) * (warmup + runs), desc="bench", unit="round",
               disable=not progress, file=sys.stderr)
    with bar:
        for batch in batch_sizes:
            feeds = [_feed(model, batch) for model in models]
            for i in range(warmup + runs):
                shift = i % len(models)  # rotate who goes first, so order effects cancel too
                for k in list(range(shift, len(models))) + list(range(shift)):
                    elapsed = _time_one(models[k], feeds[k])
                    if i >= warmup:
                        models[k].times_ms.append(elapsed)
                bar.update(1)
            for model in models:
                rows.append(_row(model, batch, threads))
                model.times_ms = []
    return rows


def _check_settings(batch_sizes: Sequence[int], threads: int, warmup: int,
                    runs: int) -> tuple[int, ...]:
    if isinstance(batch_sizes, int):
        batch_sizes = (batch_sizes,)
    batch_sizes = tuple(batch_sizes)
    if not batch_sizes or any(not _is_int(b) or b < 1 for b in batch_sizes):
        raise InputError(f"batch sizes must be integers >= 1, got {batch_sizes!r}")
    if not _is_int(threads) or threads < 1:
        raise InputError(f"threads must be an integer >= 1, got {threads!r}")
    if not _is_int(warmup) or warmup < 0:
        raise InputError(f"warmup must be an integer >= 0, got {warmup!r}")
    if not _is_int(runs) or runs < 1:
        raise InputError(f"runs must be an integer >= 1, got {runs!r}")
    return batch_sizes


def _open(path: str | os.PathLike, threads: int,
          input_shape: tuple[int, ...] | None) -> _Timed:
    """Load a session and work out the sample shape and dtype it wants."""
    if os.path.isdir(path):
        raise InputError(f"{path} is a folder, not an ONNX file")
    session = ort_session(path, threads)  # InputError for a missing / non-ONNX file
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise InputError(f"{path}: bench supports single-input models, this one has {len(inputs)}")
    spec = inputs[0]
    if spec.type not in _NUMPY_DTYPES:
        raise InputError(f"{path}: input {spec.name!r} has type {spec.type}; bench feeds float "
                         f"tensors only")
    declared = list(spec.shape)
    if not declared:
        raise InputError(f"{path}: input {spec.name!r} is a scalar; expected (batch, C, H, W)")
    batch_dim, sample = declared[0], declared[1:]
    if input_shape is None:
        if not all(_is_int(d) for d in sample):
            raise InputError(f"{path}: input shape {declared} is not static apart from the batch "
                             f"axis; pass input_shape=(C, H, W)")
        shape = tuple(int(d) for d in sample)
    else:
        shape = tuple(input_shape)
        if any(not _is_int(d) or d < 1 for d in shape) or len(shape) != len(sample):
            raise InputError(f"{path}: input_shape {input_shape!r} must be {len(sample)} positive "
                             f"integers (the model's input is {declared})")
        clash = [(d, s) for d, s in zip(sample, shape) if _is_int(d) and d != s]
        if clash:
            raise InputError(f"{path}: input_shape {shape} does not match the model's input "
                             f"{declared}")
    return _Timed(str(path), session, spec.name, batch_dim, shape, _NUMPY_DTYPES[spec.type])


def _check_batch(model: _Timed, batch: int) -> None:
    if _is_int(model.batch_dim) and model.batch_dim != batch:
        raise InputError(f"{model.path}: the model has a fixed batch of {model.batch_dim}, "
                         f"cannot bench batch {batch} (export it with a dynamic batch axis)")


def _feed(model: _Timed, batch: int) -> dict[str, np.ndarray]:
    """A fixed seeded input, so every model and every run sees the same numbers."""
    rng = np.random.default_rng(_INPUT_SEED)
    return {model.input_name: rng.standard_normal((batch, *model.sample_shape)).astype(model.dtype)}


def _warn_if_inputs_differ(models: list[_Timed]) -> None:
    shapes = {m.path: m.sample_shape for m in models}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{p} {'x'.join(map(str, s))}" for p, s in shapes.items())
        warnings.warn(f"the models take inputs of different sizes ({listed}): their speedups compare "
                      f"different amounts of work", InputMismatchWarning, stacklevel=3)


def _run_options() -> ort.RunOptions:
    # a failing run is reported once, as an InputError; ORT would also log it to stderr itself
    options = ort.RunOptions()
    options.log_severity_level = 4
    return options


_QUIET_RUN = _run_options()


def _time_one(model: _Timed, feed: dict[str, np.ndarray]) -> float:
    start = time.perf_counter()
    try:
        model.session.run(None, feed, _QUIET_RUN)
    except Exception as e:  # ORT's Fail/InvalidArgument/RuntimeException: the file's fault, not ours
        batch = next(iter(feed.values())).shape[0]
        raise InputError(f"{model.path}: ONNX Runtime cannot run this model at batch {batch}: "
                         f"{_describe(e)}") from e
    return (time.perf_counter() - start) * 1e3


def _row(model: _Timed, batch: int, threads: int) -> dict[str, Any]:
    times = model.times_ms
    return {
        "model": model.path,
        "batch": batch,
        "threads": threads,
        "median_ms": float(statistics.median(times)),
        "p90_ms": float(np.percentile(times, 90)),
        "mean_ms": float(statistics.fmean(times)),
        "runs": len(times),
    }


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value).replace("|", "\\|")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
