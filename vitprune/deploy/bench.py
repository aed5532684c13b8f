"""ONNX Runtime latency: median and p90 per model, batch size and intra-op thread count, side-by-side
speedups, and the fastest thread count to deploy with.

Why this shape: pruning papers report FLOPs that never turn into latency (USERS.md #2), so every
claim is measured here, in plain ORT on CPU with fixed thread counts. Models are timed round-robin,
one run of each (model, thread count) session in turn (the starting one rotating every round), so a
noisy neighbour on a shared machine slows all of them alike instead of whichever happened to run at
that moment; speedups are ratios of medians, which ignore the occasional outlier run. Sessions stop
their pool's spinning when a run returns (:func:`vitprune.deploy.onnx.ort_session`): otherwise the
session timed last keeps a core busy while the next one runs, and every multi-thread row measures
that (issue 13's "DeiT-B at 0.093 FLOPs runs slower on 2 threads than on 1" was this: 35.8 ms on 1
thread and 20.4 ms on 2 once fixed, 9.97× the original at 2 threads).

More threads are not always faster (small ops cannot amortise waking the pool; other processes may
hold the cores), so the thread count is measured, not assumed: every row says which
setting was fastest for its model and batch (``best_threads``, an ``int`` that
``SessionOptions.intra_op_num_threads`` takes as-is, with the other options of
:func:`vitprune.deploy.onnx.ort_session`), and a setting slower than one with fewer threads says why.
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
import onnx
import onnxruntime as ort
from tqdm import tqdm

from vitprune.errors import InputError
from vitprune.deploy.onnx import _describe, ort_session

__all__ = ["bench_onnx", "compare", "time_alone", "format_table", "best_settings", "default_threads",
           "available_cores", "InputMismatchWarning"]


class InputMismatchWarning(UserWarning):
    """The models compared take inputs of different sizes, so their speedups compare different work."""

_INPUT_SEED = 0
_NUMPY_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                 "tensor(double)": np.float64}
Threads = int | Sequence[int] | None
# Below this average time per node, waking and joining a thread pool (a few µs to tens of µs per
# parallel section in ORT) is a visible share of each op, so extra threads can lose.
_SMALL_OP_US = 100.0
# Others' CPU use (in cores) from which the table says the machine was busy.
_BUSY = 0.25
# Medians closer than this are a tie on a shared machine: no cause is claimed for so small a gap.
_TIE = 0.02


@dataclass
class _Timed:
    """One session under test: its model, thread count, what to feed it, and the times so far (ms)."""

    path: str
    session: ort.InferenceSession
    input_name: str
    batch_dim: int | str | None
    sample_shape: tuple[int, ...]
    dtype: type
    threads: int = 1
    times_ms: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class _Machine:
    """What a "more threads were slower" note cites: cores free to us, and how busy others kept them."""

    cores: int
    others: float | None  # cores' worth of CPU others used while timing (None: not measurable here)


class _CpuUse:
    """CPU time other processes (and the hypervisor, as steal) took on this process's CPUs between
    :meth:`__init__` and :meth:`others`, in cores. Why not the load average: it counts waiting
    tasks, not CPU taken, and in a VM it can read 4-5 while both CPUs sit idle (seen here)."""

    def __init__(self) -> None:
        self.wall, self.busy, self.own = time.perf_counter(), _busy_s(), _own_s()

    def others(self) -> float | None:
        wall, busy = time.perf_counter() - self.wall, _busy_s()
        if busy is None or self.busy is None or wall <= 0:
            return None
        return max(0.0, (busy - self.busy) - (_own_s() - self.own)) / wall


def _busy_s() -> float | None:
    """Seconds this process's CPUs have been busy since boot (Linux ``/proc/stat``; None elsewhere)."""
    try:
        cpus = {f"cpu{c}" for c in os.sched_getaffinity(0)}
        with open("/proc/stat") as f:
            lines = [line.split() for line in f if line.startswith("cpu")]
    except (AttributeError, OSError):
        return None
    # user nice system idle iowait irq softirq steal: all but idle and iowait are busy
    ticks = sum(sum(int(v) for i, v in enumerate(f[1:9]) if i not in (3, 4)) for f in lines if f[0] in cpus)
    return ticks / os.sysconf("SC_CLK_TCK")


def _own_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def available_cores() -> int:
    """Physical cores this process may run on: its CPU affinity (which containers and ``taskset``
    narrow) with hyper-thread siblings counted once, as ORT's own default thread count does.
    Falls back to the logical count where the OS does not tell."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity call
        return max(1, os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{topology}/physical_package_id") as pkg, open(f"{topology}/core_id") as core:
                cores.add((pkg.read().strip(), core.read().strip()))
        except OSError:
            return max(1, len(cpus))
    return max(1, len(cores))


def default_threads() -> tuple[int, ...]:
    """The settings worth comparing by default: 1 thread, and one per available physical core."""
    return tuple(sorted({1, available_cores()}))


def time_alone(path: str | os.PathLike, *, threads: int = 1, warmup: int = 2, runs: int = 7) -> float:
    """Median ms of one model timed on its own: its runs back to back in one session whose pool keeps
    spinning between them. That is how an op runs inside a graph (the pool awake from the op
    before), so the per-op latency tables time their one-op models this way at 2 threads and more:
    timed round-robin with the pool stopped after each run, every run of a one-op model also pays
    for waking the pool, which at 2 threads made narrow DeiT-S plans look ~20% slower than they ran."""
    _, (threads,) = _check_settings((1,), threads, warmup, runs)
    model = _open(path, threads, None, keep_spinning=True)
    feed = _feed(model, 1 if not _is_int(model.batch_dim) else model.batch_dim)
    times = [_time_one(model, feed) for _ in range(warmup + runs)][warmup:]
    return float(statistics.median(times))


def bench_onnx(path: str | os.PathLike, **settings: Any) -> list[dict[str, Any]]:
    """Time one ONNX model (``settings`` as :func:`compare` takes them); one row per batch size and
    thread count.

    Rows: {"model", "batch", "threads", "median_ms", "p90_ms", "mean_ms", "runs", "best_threads",
    "best_ms", "others_cores"} and, on a setting slower than one with fewer threads, "note".
    "others_cores" is the CPU other processes took on our cores while timing, in cores (None where
    the OS does not say): beyond a fraction of a core the absolute times are inflated (ratios hold
    better, the models being interleaved). ``threads`` is one intra-op thread count or several
    (None: :func:`default_threads`). ``input_shape`` is the per-sample shape (C, H, W); by default
    it is read from the model's input, which must then be static apart from the batch axis.
    """
    return compare([path], **settings)


def compare(
    paths: Sequence[str | os.PathLike],
    *,
    batch_sizes: Sequence[int] = (1,),
    threads: Threads = None,
    warmup: int = 5,
    runs: int = 30,
    input_shape: tuple[int, ...] | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Time several ONNX models interleaved run by run; rows grouped by batch size, then thread
    count, in ``paths`` order within a group (one thread count: exactly one row per model and batch).

    With two or more models each row also has "speedup": the first model's median divided by this
    model's median at the same batch and thread count (> 1 means faster than the first; the first
    gets 1.0), and "best_speedup": the same ratio with each model at its own fastest thread count.
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
                row["best_speedup"] = group[0]["best_ms"] / row["best_ms"]
    return rows


def best_settings(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One JSON-ready dict per (model, batch) of bench rows: the fastest intra-op thread count
    ("best_threads", the int ``SessionOptions.intra_op_num_threads`` takes), its median ("best_ms"),
    the median at every setting ("median_ms_by_threads", keyed by the count as a string, as JSON
    keys must be), the speedup at every setting and at the model's own best when the rows come from
    :func:`compare` with two or more models, and the notes on settings that were slower."""
    seen: dict[tuple[str, int, int], int] = {}
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for row in rows:  # the same file compared with itself is two models: the k-th row is the k-th
        setting = (row["model"], row["batch"], row["threads"])
        seen[setting] = seen.get(setting, -1) + 1
        groups.setdefault((row["model"], row["batch"], seen[setting]), []).append(row)
    out = []
    for (model, batch, _), group in groups.items():
        best = min(group, key=lambda r: (r["median_ms"], r["threads"]))
        entry: dict[str, Any] = {
            "model": model, "batch": batch, "best_threads": int(best["threads"]),
            "best_ms": best["median_ms"],
            "median_ms_by_threads": {str(r["threads"]): r["median_ms"] for r in group},
        }
        if all("speedup" in r for r in group):
            entry["speedup_by_threads"] = {str(r["threads"]): r["speedup"] for r in group}
        if "best_speedup" in best:
            entry["speedup_at_best"] = best["best_speedup"]
        entry["notes"] = [r["note"] for r in group if r.get("note")]
        out.append(entry)
    return out


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain Markdown table of bench rows (the speedup column only when the rows have one), then,
    when some model and batch were timed at several thread counts, a table of the fastest setting
    with the speedup at each model's best and the notes on slower settings."""
    columns = ["model", "batch", "threads", "median_ms", "p90_ms", "mean_ms", "runs"]
    if any("speedup" in row for row in rows):
        columns.append("speedup")
    text = _markdown(rows, columns)
    best = best_settings(rows) if all("best_threads" in r for r in rows) else []
    if any(len(b["median_ms_by_threads"]) > 1 for b in best):
        columns = ["model", "batch", "best_threads", "best_ms"]
        if any("speedup_at_best" in b for b in best):
            columns.append("speedup_at_best")
        summary = [{**b, "note": "; ".join(b["notes"])} for b in best]
        text += ("\n\nfastest intra-op thread count (SessionOptions.intra_op_num_threads):\n"
                 + _markdown(summary, columns + ["note"]))
    busy = max((r["others_cores"] for r in rows if r.get("others_cores") is not None), default=None)
    if busy is not None and busy >= _BUSY:
        text += (f"\n\nother processes used {busy:.1f} of the {available_cores()} cores while timing: "
                 f"absolute times are inflated; compare the ratios")
    return text


# --------------------------------------------------------------------------------------------------


def _markdown(rows: Sequence[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---" if c in ("model", "note") else "---:" for c in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _bench(paths: list[str | os.PathLike], *, batch_sizes: Sequence[int], threads: Threads,
           warmup: int, runs: int, input_shape: tuple[int, ...] | None,
           progress: bool) -> list[dict[str, Any]]:
    """Validate everything first (no half-finished benchmark on bad input), then time round-robin.
    Every (model, thread count) gets its own session; rows come batch by batch, thread count by
    thread count, in ``paths`` order."""
    batch_sizes, settings = _check_settings(batch_sizes, threads, warmup, runs)
    cpu = _CpuUse()
    sessions = [_open(p, t, input_shape) for t in settings for p in paths]
    for model in sessions:
        for batch in batch_sizes:
            _check_batch(model, batch)
            _time_one(model, _feed(model, batch))  # a model that cannot run fails here, not mid-table
    _warn_if_inputs_differ(sessions[:len(paths)])
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(batch_sizes) * (warmup + runs), desc="bench", unit="round",
               disable=not progress, file=sys.stderr)
    with bar:
        for batch in batch_sizes:
            feeds = [_feed(model, batch) for model in sessions]
            for i in range(warmup + runs):
                shift = i % len(sessions)  # rotate who goes first, so order effects cancel too
                for k in list(range(shift, len(sessions))) + list(range(shift)):
                    elapsed = _time_one(sessions[k], feeds[k])
                    if i >= warmup:
                        sessions[k].times_ms.append(elapsed)
                bar.update(1)
            for model in sessions:
                rows.append(_row(model, batch))
                model.times_ms = []
    machine = _Machine(available_cores(), cpu.others())
    for row in rows:
        row["others_cores"] = machine.others
    _mark_best(rows, len(paths), len(settings), machine)
    return rows


def _check_settings(batch_sizes: Sequence[int], threads: Threads, warmup: int,
                    runs: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(batch sizes, thread counts), both as tuples; thread counts sorted and deduplicated."""
    if isinstance(batch_sizes, int):
        batch_sizes = (batch_sizes,)
    batch_sizes = tuple(batch_sizes)
    if not batch_sizes or any(not _is_int(b) or b < 1 for b in batch_sizes):
        raise InputError(f"batch sizes must be integers >= 1, got {batch_sizes!r}")
    settings = _check_threads(threads)
    if not _is_int(warmup) or warmup < 0:
        raise InputError(f"warmup must be an integer >= 0, got {warmup!r}")
    if not _is_int(runs) or runs < 1:
        raise InputError(f"runs must be an integer >= 1, got {runs!r}")
    return batch_sizes, settings


def _check_threads(threads: Threads) -> tuple[int, ...]:
    if threads is None:
        return default_threads()
    listed = (threads,) if _is_int(threads) else threads
    if (isinstance(listed, (str, bytes)) or not isinstance(listed, (Sequence, set, frozenset))
            or not listed or any(not _is_int(t) or t < 1 for t in listed)):
        raise InputError(f"threads must be an integer >= 1 or a non-empty list of them (e.g. "
                         f"(1, 2)), got {threads!r}")
    return tuple(sorted({int(t) for t in listed}))


def _mark_best(rows: list[dict[str, Any]], n_models: int, n_settings: int,
               machine: _Machine) -> None:
    """Give each row its model's fastest setting at that batch (ties go to fewer threads: the same
    speed for less CPU), and each setting slower than one with fewer threads a note saying why."""
    nodes: dict[str, int | None] = {}
    block = n_models * n_settings
    for start in range(0, len(rows), block):
        for k in range(n_models):
            group = rows[start + k:start + block:n_models]  # one model at every thread count
            best = min(group, key=lambda r: (r["median_ms"], r["threads"]))
            for row in group:
                row["best_threads"], row["best_ms"] = best["threads"], best["median_ms"]
                fewer = [r for r in group if r["threads"] < row["threads"]]
                faster = min(fewer, key=lambda r: r["median_ms"], default=None)
                if faster is not None and faster["median_ms"] < row["median_ms"]:
                    if row["model"] not in nodes:
                        nodes[row["model"]] = _node_count(row["model"])
                    row["note"] = _slower_note(row, faster, machine, nodes[row["model"]])


def _slower_note(row: dict[str, Any], faster: dict[str, Any], machine: _Machine,
                 nodes: int | None) -> str:
    """Why ``row``'s extra threads lost to ``faster``'s fewer, from what was measured: the cores
    free, the load other processes put on them, and the average time per ONNX node."""
    t, f = row["threads"], faster["threads"]
    if row["median_ms"] <= faster["median_ms"] * (1 + _TIE):
        return (f"{t} threads no faster than {f} at batch {row['batch']} ({_ms(row['median_ms'])} "
                f"vs {_ms(faster['median_ms'])} ms, within {_TIE:.0%}): the extra threads bought "
                f"nothing")
    head = (f"{t} threads slower than {f} at batch {row['batch']} ({_ms(row['median_ms'])} vs "
            f"{_ms(faster['median_ms'])} ms)")
    reasons = []
    if t > machine.cores:
        reasons.append(f"{t} threads oversubscribe the {machine.cores} available cores")
    elif machine.others is not None and machine.others + t > machine.cores + 0.5:
        reasons.append(f"other processes kept the cores busy (they used {machine.others:.1f} of the "
                       f"{machine.cores} cores while timing), so the threads had to share them")
    per_op_us = faster["median_ms"] * 1e3 / nodes if nodes else None
    if per_op_us is not None and per_op_us < _SMALL_OP_US:
        reasons.append(f"per-op work too small to amortise thread synchronisation ({nodes} ONNX "
                       f"nodes averaging {per_op_us:.0f} µs each on {f} thread"
                       f"{'s' if f > 1 else ''})")
    elif not reasons:
        reasons.append("the extra threads cost more in synchronisation and memory traffic than "
                       "their share of the work saved")
    return f"{head}: {'; '.join(reasons)}"


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _node_count(path: str) -> int | None:
    """Nodes in the file's graph (before ORT fuses any), read without the external weights."""
    try:
        return len(onnx.load(path, load_external_data=False).graph.node) or None
    except Exception:  # the note loses one number; the measurement stands
        return None


def _open(path: str | os.PathLike, threads: int,
          input_shape: tuple[int, ...] | None, *, keep_spinning: bool = False) -> _Timed:
    """Load a session and work out the sample shape and dtype it wants."""
    if os.path.isdir(path):
        raise InputError(f"{path} is a folder, not an ONNX file")
    session = ort_session(path, threads, keep_spinning=keep_spinning)  # InputError for a missing / non-ONNX file
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
    return _Timed(str(path), session, spec.name, batch_dim, shape, _NUMPY_DTYPES[spec.type],
                  threads)


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


def _row(model: _Timed, batch: int) -> dict[str, Any]:
    times = model.times_ms
    return {
        "model": model.path,
        "batch": batch,
        "threads": model.threads,
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
