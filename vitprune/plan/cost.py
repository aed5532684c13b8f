"""A latency cost model for planning: measured ONNX Runtime time per op, summed over the graph.

Why: FLOPs are what the planner can count, latency is what users pay. Two plans of equal FLOPs can
differ by a fifth in ORT latency (issue 13: head_dim 46 vs 64, odd widths), so the planner can plan
against :class:`LatencyModel` instead of :class:`~vitprune.deps.flops.FlopModel`; both expose
``cost(counts)`` (as :class:`~vitprune.deps.flops.FlopModel` does) with ``counts = {leaf axis: kept}``.
The joint planner (:mod:`vitprune.plan.joint`) also prices layer removals from the same tables: the
nodes a removal deletes (:meth:`LatencyModel.attention_saving`, :meth:`LatencyModel.activation_saving`).

**How the table is measured.** Every op of the captured graph that costs time is one of five kinds,
keyed by the shape that sets its time (all sizes at the table's batch; ``M`` = rows = batch × tokens):

* ``linear (M, in, out)``: MatMul + bias Add, as the exporter writes ``aten.linear`` (a patch conv
  is timed as the linear of its im2col: ``in`` = C·kh·kw);
* ``attention (B, T, heads, head_dim)``: the whole chain the exporter writes for timm's attention —
  Reshape, Transpose, Split, the scaled MatMul, Softmax, MatMul, Transpose, Reshape — from the qkv
  output to the proj input (an unfused matmul → softmax → matmul graph exports to the same chain);
* ``norm (M, C)`` LayerNormalization, ``gelu (M, C)`` (the exporter's Div/Erf/Add/Mul/Mul), and
  ``add (M, C)`` (residual adds and layer-scale muls: one read of two tensors, one write).

Each op is a tiny ONNX model built with ``onnx.helper`` (opset 18, random float32 weights), opened
and timed (median of ``runs``) in chunks that each also time a one-Add model, whose median (ORT's
per-call overhead) is subtracted from each op and added back once per graph. At one thread a chunk
is timed round-robin (:func:`vitprune.deploy.bench.compare`: each op's weights as cold as in a graph);
with more, each model on its own (:func:`vitprune.deploy.bench.time_alone`: the pool left spinning
between runs, as it spins between the ops of a graph).
Every other ATen op (reshape, slicing, concat, the patch layout; the attention's own copies are in
``attention``) is charged one kernel launch, measured as a chain of 32 tiny Adds (``chain``).

**Which sizes.** Only 1-D sweeps through each op's unpruned shape are measured, on the grid
``{1} ∪ multiples of step ∪ {full}`` (``step`` 16 by default): a linear's time at ``(in, out)`` is
``L(in, OUT) · L(IN, out) / L(IN, OUT)`` (GEMM time is close to a product of its two widths), an
attention's ``A(heads, D) · A(H, head_dim) / A(H, D)`` with every head count measured, and
between grid points time is interpolated linearly. Steps in the kernels show up as measured grid
points; a width between two grid points gets the line between them, so the model can only see an
alignment penalty at sizes it measured: plan with ``round_to`` a multiple of ``step``.

**Busy machines.** Timing noise only adds time, and a burst of other work can hit a whole chunk of
one sweep. Points are shuffled across chunks, each is the least of two medians, and a large linear
over :data:`_SLOW` × the median time per multiply-add of the table's large linears is measured again
(:func:`slow_entries`); a table that still has such entries is used, with a note in
``LatencyTable.notes``, but not cached.

**Cache.** One JSON file per machine (platform, CPU model, core count), ORT version, thread count and
batch, under ``$XDG_CACHE_HOME/vitprune/`` (default ``~/.cache/vitprune/``), written atomically
(:func:`vitprune.deploy.outputs.atomic_write`). A new model measures only the points the file does
not hold yet. Times are milliseconds.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import warnings
from collections.abc import Iterable
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.fx as fx
from onnx import TensorProto, helper, numpy_helper

from vitprune.deploy.bench import InputMismatchWarning, compare, time_alone
from vitprune.deploy.outputs import atomic_write
from vitprune.deps import DependencyGraph
from vitprune.deps.flops import RemovalPrices
from vitprune.errors import InputError

__all__ = ["LatencyTable", "LatencyModel", "cache_dir", "machine_id", "build_op_model"]

# 2: multi-thread tables time each op model on its own with the pool awake between runs; timed
# round-robin before, they carried the previous op session's spinning worker
TABLE_VERSION = 2
OPSET = 18
KINDS = ("linear", "attention", "norm", "gelu", "add")
_CHAIN = 32
_CHUNK = 24  # op models per measurement of the per-call overhead (open at once when round-robin)

Key = tuple[str, tuple[int, ...]]
aten = torch.ops.aten


# -- where the table lives ---------------------------------------------------------------------------
def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/vitprune`` (``~/.cache/vitprune`` when unset): per-user, machine-local data."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vitprune"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_id(threads: int, batch: int) -> dict[str, Any]:
    """What a measured time depends on besides the shape: times from another machine, ORT build,
    thread count or batch are not reused."""
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": _cpu_model(),
            "cores": os.cpu_count(), "ort": ort.__version__, "threads": threads, "batch": batch}


# -- one-op ONNX models ------------------------------------------------------------------------------
def _model(nodes: list, inp: list[int], out: list[int], inits: list) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "op", [helper.make_tensor_value_info("x", TensorProto.FLOAT, inp)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)


def _init(name: str, shape: list[int] | tuple[int, ...], rng: np.random.Generator, dtype=np.float32):
    value = rng.standard_normal(shape).astype(dtype) * 0.02 if dtype == np.float32 else np.asarray(shape, dtype)
    return numpy_helper.from_array(value, name)


def _const(name: str, value: Any, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype), name)


def _attention_nodes(b: int, t: int, h: int, d: int) -> tuple[list, list]:
    scale = float(d) ** -0.25  # the exporter scales q and k by sqrt(scale) each
    mk = helper.make_node
    nodes = [mk("Reshape", ["x", "s5"], ["r"]), mk("Transpose", ["r"], ["p"], perm=[2, 0, 3, 1, 4]),
             mk("Split", ["p"], ["q3", "k3", "v3"], axis=0, num_outputs=3),
             *[mk("Squeeze", [f"{n}3", "ax0"], [n]) for n in "qkv"],
             mk("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             mk("Mul", ["q", "sc"], ["qs"]), mk("Mul", ["kt", "sc"], ["ks"]),
             mk("MatMul", ["qs", "ks"], ["a"]), mk("Softmax", ["a"], ["sa"], axis=-1),
             mk("MatMul", ["sa", "v"], ["o"]), mk("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
             mk("Reshape", ["ot", "s3"], ["y"])]
    inits = [_const("s5", [b, t, 3, h, d], np.int64), _const("ax0", [0], np.int64),
             _const("sc", scale), _const("s3", [1, b * t, h * d], np.int64)]
    return nodes, inits


def build_op_model(kind: str, key: tuple[int, ...], seed: int = 0) -> onnx.ModelProto:
    """The one-op ONNX model whose time is the table entry ``(kind, key)`` (``"overhead"``: one tiny
    Add, the per-call cost every model pays once)."""
    rng = np.random.default_rng(seed)
    mk = helper.make_node
    if kind == "linear":
        m, i, o = key
        return _model([mk("MatMul", ["x", "w"], ["mm"]), mk("Add", ["mm", "b"], ["y"])], [1, m, i], [1, m, o],
                      [_init("w", (i, o), rng), _init("b", (o,), rng)])
    if kind == "attention":
        b, t, h, d = key
        nodes, inits = _attention_nodes(b, t, h, d)
        return _model(nodes, [1, b * t, 3 * h * d], [1, b * t, h * d], inits)
    if kind == "overhead":
        return _model([mk("Add", ["x", "c"], ["y"])], [1, 1], [1, 1], [_const("c", [[1.0]])])
    if kind == "chain":  # _CHAIN tiny Adds in a row: what one more kernel launch costs
        names = ["x", *[f"a{n}" for n in range(_CHAIN - 1)], "y"]
        return _model([mk("Add", [a, "c"], [b]) for a, b in zip(names, names[1:])], [1, 1], [1, 1],
                      [_const("c", [[1.0]])])
    m, c = key
    if kind == "norm":
        return _model([mk("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-6)], [1, m, c],
                      [1, m, c], [_init("g", (c,), rng), _init("b", (c,), rng)])
    if kind == "gelu":
        nodes = [mk("Div", ["x", "r2"], ["t"]), mk("Erf", ["t"], ["e"]), mk("Add", ["e", "one"], ["a"]),
                 mk("Mul", ["a", "half"], ["h"]), mk("Mul", ["x", "h"], ["y"])]
        return _model(nodes, [1, m, c], [1, m, c], [_const("r2", 2 ** 0.5), _const("one", 1.0), _const("half", 0.5)])
    if kind == "add":
        return _model([mk("Add", ["x", "w"], ["y"])], [1, m, c], [1, m, c], [_init("w", (1, m, c), rng)])
    raise InputError(f"unknown op kind {kind!r}; expected one of {KINDS}")


def _entry(kind: str, key: tuple[int, ...]) -> str:
    return f"{kind}:{','.join(map(str, key))}"


def measure(keys: list[Key], threads: int, *, runs: int = 7, warmup: int = 2,
            repeats: int = 2) -> dict[Key, float]:
    """ORT milliseconds of each ``(kind, key)`` op, less the per-call overhead (also returned, under
    ``("overhead", ())``): the least of ``repeats`` medians, each from a fresh session."""
    out: dict[Key, float] = {}
    rng = np.random.default_rng(0)
    for _ in range(repeats):
        # shuffled: a chunk shares a time window, so a burst of load must not hit a whole sweep
        order = [keys[i] for i in rng.permutation(len(keys))]
        for k, v in _measure_once(order, threads, runs, warmup).items():
            out[k] = min(v, out.get(k, v))
    return out


def _measure_once(keys: list[Key], threads: int, runs: int, warmup: int) -> dict[Key, float]:
    """One pass in chunks of :data:`_CHUNK` op models, each chunk with the overhead model, whose time
    is subtracted from the chunk's ops (see :func:`_time_chunk` for how a chunk is timed)."""
    out: dict[Key, float] = {}
    overheads: list[float] = []
    with tempfile.TemporaryDirectory(prefix="vitprune-cost-") as tmp:
        base = os.path.join(tmp, "overhead.onnx")
        onnx.save(build_op_model("overhead", ()), base)
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start:start + _CHUNK]
            paths = [base, *(os.path.join(tmp, f"{n}.onnx") for n in range(len(chunk)))]
            for (kind, key), path in zip(chunk, paths[1:]):
                onnx.save(build_op_model(kind, key), path)
            times = _time_chunk(paths, threads, runs, warmup)
            overheads.append(times[0])
            out.update({k: max(ms - times[0], 1e-4) for k, ms in zip(chunk, times[1:])})
    out["overhead", ()] = float(np.median(overheads)) if overheads else 0.0
    return out


def _time_chunk(paths: list[str], threads: int, runs: int, warmup: int) -> list[float]:
    """Median ms per model. One thread: round-robin (:func:`compare`), so each op finds its weights
    as cold as in a graph, whose other ops evict them. More threads: each model on its own
    (:func:`time_alone`), the pool awake between runs as between a graph's ops; round-robin, every
    run of a one-op model would also pay for waking the pool (2-thread DeiT-S plans overshot: 0.421
    of the FLOPs for a 0.5 latency target, measured latency ratio 0.478)."""
    if threads > 1:
        return [time_alone(p, threads=threads, warmup=warmup, runs=runs) for p in paths]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputMismatchWarning)  # different shapes on purpose
        return [r["median_ms"] for r in compare(paths, batch_sizes=(1,), threads=1, warmup=warmup, runs=runs)]


class LatencyTable:
    """Measured op times (ms) for one machine, ORT version, thread count and batch, cached on disk.

    ``get`` reads an entry; ``ensure`` measures the entries that are missing and saves the file."""

    def __init__(self, threads: int = 1, batch: int = 1, *, directory: str | os.PathLike | None = None,
                 runs: int = 7, warmup: int = 2):
        if not isinstance(threads, int) or threads < 1 or not isinstance(batch, int) or batch < 1:
            raise InputError(f"threads and batch must be integers >= 1, got {threads!r} and {batch!r}")
        self.threads, self.batch, self.runs, self.warmup = threads, batch, runs, warmup
        self.machine = machine_id(threads, batch)
        digest = hashlib.sha1(json.dumps(self.machine, sort_keys=True).encode()).hexdigest()[:12]
        self.path = Path(directory or cache_dir()) / f"latency-t{threads}-b{batch}-{digest}.json"
        self.entries: dict[str, float] = self._load()
        self.measured = 0  # entries this object measured (the rest came from the file)
        self.notes: list[str] = []  # e.g. a table measured on a busy machine, used but not cached

    def _load(self) -> dict[str, float]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # no cache yet, or an unreadable one: measure again
        if data.get("version") != TABLE_VERSION or data.get("machine") != self.machine:
            return {}
        return {k: float(v) for k, v in data.get("entries", {}).items()}

    def get(self, kind: str, key: tuple[int, ...]) -> float:
        return self.entries[_entry(kind, key)]

    def ensure(self, keys: Iterable[Key]) -> int:
        """Measure the ``(kind, key)`` entries (and the overhead) not yet known; returns how many.
        Linears far slower per multiply-add than the table's other large ones are measured
        again (:func:`slow_entries`); a table that still has some is used but not cached."""
        missing = sorted({k for k in keys if _entry(*k) not in self.entries})
        if not missing and _entry("overhead", ()) in self.entries:
            return 0
        times = measure(missing, self.threads, runs=self.runs, warmup=self.warmup)
        slow = slow_entries(times)
        for _ in range(_RETRIES):
            if not slow:
                break
            again = measure(slow, self.threads, runs=self.runs, warmup=self.warmup, repeats=1)
            times.update({k: min(times[k], again[k]) for k in slow})
            slow = slow_entries(times)
        self.entries.update({_entry(*k): v for k, v in times.items()})
        self.measured += len(missing)
        if slow:
            # a table timed while other work held the cores would mislead every later plan on this
            # machine (seen: 2-thread DeiT-B plans stopping at 0.87 of the FLOPs for a 0.5 latency
            # target, its full-width linears timed 4-5x slower per multiply-add than the rest)
            worst = max(slow, key=lambda k: times[k] / prod(k[1]))
            self.notes.append(f"{len(slow)} latency-table linears stayed over {_SLOW:g}x slower per multiply-add "
                              f"than the table's other large linears after {_RETRIES} re-measurements (e.g. "
                              f"{_entry(*worst)}: {times[worst]:.3g} ms), so other work was holding the "
                              f"cores: the table is used for this plan but not cached; rerun when the "
                              f"machine is quiet")
        else:
            self.save()
        return len(missing)

    def save(self) -> None:
        data = {"version": TABLE_VERSION, "machine": self.machine, "entries": self.entries}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda f: f.write(json.dumps(data, indent=0, sort_keys=True).encode()))

    @property
    def overhead(self) -> float:
        return self.entries.get(_entry("overhead", ()), 0.0)


#: A linear this many times slower per multiply-add than the median of the table's large linears
#: was timed while other work held the cores, and is measured again, up to _RETRIES times. On a quiet
#: machine DeiT-S's large linears span 0.87-1.58x of their median (1 and 2 threads), a GEMM's time
#: being close to proportional to its work once it is large; a busy one gave 4-5x.
_SLOW = 2.5
_RETRIES = 2
_LARGE = 1 / 4  # "large": at least this share of the largest linear's work (narrow GEMMs run slower per MAC)


def slow_entries(times: dict[Key, float]) -> list[Key]:
    """Linear entries of ``times`` (ms) over :data:`_SLOW` × the median time per multiply-add of the
    large ones (at least :data:`_LARGE` of the largest one's work; at least four of them). Linears
    are most of a ViT's time; the other kinds are too small or too few for a steady median."""
    work = {k: prod(k[1]) for k in times if k[0] == "linear"}
    large = [k for k, w in work.items() if w >= _LARGE * max(work.values(), default=0)]
    if len(large) < 4:
        return []
    median = float(np.median([times[k] / work[k] for k in large]))
    return [k for k in large if times[k] / work[k] > _SLOW * median]


# -- the model ---------------------------------------------------------------------------------------
#: The key positions a width changes, per kind, and those whose time moves in steps (see _interp).
_VARYING = {"linear": (1, 2), "attention": (2, 3)}
_STEPWISE = {("linear", 2), ("attention", 3)}
_ELEMENTWISE = {"layer_norm": "norm", "gelu": "gelu", "add": "add", "mul": "add", "sub": "add"}


def grid(n: int, step: int) -> list[int]:
    """The widths measured for a dim of ``n``: 1, every multiple of ``step`` below ``n``, and ``n``."""
    return sorted({1, n, *range(step, n, step)})


def _interp(xs: list[int], ys: list[float], x: float, stepwise: bool) -> float:
    """Through the measured points (flat beyond the ends: never extrapolated): piecewise-linear, or
    ``stepwise`` the time of the next measured size up (a GEMM's output width and attention's head_dim
    are computed in blocks of 16 columns: 36..48 cost what 48 costs)."""
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    hi = int(np.searchsorted(xs, x))
    if stepwise or xs[hi] == x:
        return ys[hi]
    lo = hi - 1
    return ys[lo] + (ys[hi] - ys[lo]) * (x - xs[lo]) / (xs[hi] - xs[lo])


def _denoise(xs: list[int], ys: list[float], growth: float = 1.5) -> list[float]:
    """Timing noise only ever adds time. A point more than ``growth`` × above what proportional
    growth from the point before predicts is capped there (a slow session; kernel steps are ~1.25×
    at most), then a running minimum from the right makes the curve monotone (a wider op is never
    cheaper, and the planner's search needs monotone costs)."""
    out = list(ys)
    for i in range(1, len(out)):
        out[i] = min(out[i], out[i - 1] * growth * xs[i] / xs[i - 1])
    return np.minimum.accumulate(out[::-1])[::-1].tolist()


def _site_kind(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """Which table an ATen node is timed by (None: taken as free)."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    name = node.target.overloadpacket.__name__
    if name in ("linear", "conv2d"):
        return name
    if name == "scaled_dot_product_attention":
        return "attention"
    if name in ("matmul", "bmm"):
        return "attention" if _is_score_matmul(node) else None
    kind = _ELEMENTWISE.get(name)
    if kind == "add" and not all(isinstance(a, fx.Node) for a in node.args[:2]):
        return None  # x + constant: folded or fused by ORT
    return kind


def _is_score_matmul(node: fx.Node) -> bool:
    """``q @ k^T`` of an unfused attention (a square tokens × tokens result); the ``attn @ v`` that
    follows and the softmax between them belong to the same ``attention`` entry."""
    meta = node.meta.get("tensor_meta")
    a = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], fx.Node) else None
    if meta is None or a is None or len(meta.shape) < 3:
        return False
    return meta.shape[-1] == meta.shape[-2] and a.shape[-2] == meta.shape[-1] and a.shape[-1] != a.shape[-2]


class LatencyModel(RemovalPrices):
    """Estimated ORT latency (ms, at ``table.batch`` and ``table.threads``) of the graph behind
    ``dg`` when leaf axis ``r`` keeps ``counts[r]`` channels. Measures what ``table`` lacks on
    construction (the 1-D sweeps through every op's unpruned shape; see the module docstring)."""

    def __init__(self, dg: DependencyGraph, table: LatencyTable, *, step: int = 16):
        if not isinstance(step, int) or step < 1:
            raise InputError(f"step must be an integer >= 1, got {step!r}")
        self.dg, self.table, self.step = dg, table, step
        self._batch = {dg.batch_axis: table.batch}
        self.sites: list[tuple[str, fx.Node]] = []
        for node in dg.gm.graph.nodes:
            kind = _site_kind(node, dg.gm)
            if kind is not None and dg.node_dims.get(node):
                self.sites.append((kind, node))
        self._kind_of = {node: kind for kind, node in self.sites}
        self._launched = {n for n in dg.gm.graph.nodes if n not in self._kind_of and n.op == "call_function"
                          and isinstance(n.target, torch._ops.OpOverload) and "sym_size" not in str(n.target)}
        self.launches = len(self._launched)
        self._full = {node: self._key(kind, node, {}) for kind, node in self.sites}
        table.ensure([("chain", ()), *(k for kind_key in self._full.values() for k in self._sweeps(*kind_key))])
        self._launch_ms = table.get("chain", ()) / _CHAIN
        self._fixed = table.overhead + self.launches * self._launch_ms
        self._curves = {key: self._curve(*key) for key in set(self._full.values())}

    def _shape(self, node: fx.Node, counts: dict[int, int]) -> list[int]:
        return [self.dg.table.kept_size(a, counts) for a in self.dg.node_dims[node]]

    def _key(self, kind: str, node: fx.Node, counts: dict[int, int]) -> Key:
        counts = {**counts, **self._batch}
        if kind == "linear":
            x, out = self._shape(node.args[0], counts), self._shape(node, counts)
            return "linear", (prod(x[:-1]), x[-1], out[-1])
        if kind == "conv2d":  # the GEMM of its im2col: rows = B·H'·W', in = C·kh·kw
            out, w = self._shape(node, counts), self._shape(node.args[1], counts)
            return "linear", (out[0] * prod(out[2:]), prod(w[1:]), out[1])
        if kind == "attention":
            q = self._shape(node.args[0], counts)
            b, h = (q[0], prod(q[1:-2])) if len(q) >= 4 else (1, prod(q[:-2]))
            return "attention", (b, q[-2], h, q[-1])
        out = self._shape(node, counts)
        return kind, (prod(out[:-1]), out[-1])

    def _sweeps(self, kind: str, key: tuple[int, ...]) -> list[Key]:
        if kind == "linear":
            m, i, o = key
            return [(kind, (m, g, o)) for g in grid(i, self.step)] + [(kind, (m, i, g)) for g in grid(o, self.step)]
        if kind == "attention":
            b, t, h, d = key
            return [(kind, (b, t, n, d)) for n in range(1, h + 1)] + \
                   [(kind, (b, t, h, g)) for g in grid(d, self.step)]
        m, c = key
        return [(kind, (m, g)) for g in grid(c, self.step)]

    def _curve(self, kind: str, key: tuple[int, ...]) -> tuple[float, list[tuple[list[int], list[float]]]]:
        """The unpruned time and, per varying dim, the measured (sizes, times) through it."""
        if kind == "linear":
            m, i, o = key
            dims = [[(m, g, o) for g in grid(i, self.step)], [(m, i, g) for g in grid(o, self.step)]]
            at = [1, 2]
        elif kind == "attention":
            b, t, h, d = key
            dims = [[(b, t, n, d) for n in range(1, h + 1)], [(b, t, h, g) for g in grid(d, self.step)]]
            at = [2, 3]
        else:
            dims, at = [[(key[0], g) for g in grid(key[1], self.step)]], [1]
        curves = [([k[a] for k in ks], _denoise([k[a] for k in ks], [self.table.get(kind, k) for k in ks]))
                  for ks, a in zip(dims, at)]
        return min(c[1][-1] for c in curves), curves

    def _site_cost(self, full_key: Key, key: Key) -> float:
        full, curves = self._curves[full_key]
        varying = _VARYING.get(key[0], (1,))
        same = all(key[1][a] == full_key[1][a] for a in range(len(key[1])) if a not in varying)
        # rows or tokens changed (not a width): time taken as proportional to them
        out = full if same else full * prod(key[1]) / prod(full_key[1])
        for (xs, ys), a in zip(curves, varying):
            out *= _interp(xs, ys, key[1][a], (key[0], a) in _STEPWISE) / full if full > 0 else 1.0
        return out

    def _node_cost(self, node: fx.Node, counts: dict[int, int]) -> float:
        """One node's share of :meth:`cost`: a timed op's table time, another op's kernel launch, else 0."""
        if node in self._kind_of:
            return self._site_cost(self._full[node], self._key(self._kind_of[node], node, counts))
        return self._launch_ms if node in self._launched else 0.0

    def cost(self, counts: dict[int, int] | None = None) -> float:
        """Estimated latency in ms when leaf ``r`` keeps ``counts[r]`` channels (default: all)."""
        counts = counts or {}
        return sum((self._node_cost(node, counts) for _, node in self.sites), self._fixed)

    def breakdown(self, counts: dict[int, int] | None = None) -> dict[str, float]:
        """Estimated ms per op kind, and ``overhead`` (the call and the other ops' launches)."""
        counts = counts or {}
        out = {"overhead": self._fixed}
        for kind, node in self.sites:
            key = self._key(kind, node, counts)
            out[key[0]] = out.get(key[0], 0.0) + self._site_cost(self._full[node], key)
        return out

    # -- what a removal saves (the joint planner's layer moves, priced from the same tables) --------
    def nodes_cost(self, nodes: Iterable[fx.Node], counts: dict[int, int] | None = None) -> float:
        """Estimated ms of ``nodes`` of this graph, as :meth:`cost` counts them: what deleting them saves."""
        counts = counts or {}
        return sum(self._node_cost(n, counts) for n in dict.fromkeys(nodes))  # each node once, in order

    def merged_linear_cost(self, first: fx.Node, second: fx.Node, counts: dict[int, int] | None = None) -> float:
        """Estimated ms of the one linear that replaces ``second ∘ first`` (fc2∘fc1 merged): ``first``'s
        rows and input width, ``second``'s output width, by ``first``'s product rule (its measured sweep
        of output widths; a ViT's merged ``C → C`` is a point of fc1's ``C → 4C`` sweep)."""
        if self._kind_of.get(first) != "linear" or self._kind_of.get(second) != "linear":
            raise InputError(f"merged_linear_cost needs two timed linears of this graph, got "
                             f"`{first.format_node()}` and `{second.format_node()}`")
        counts = counts or {}
        _, (rows, d_in, _) = self._key("linear", first, counts)
        d_out = self._key("linear", second, counts)[1][2]
        return self._site_cost(self._full[first], ("linear", (rows, d_in, d_out)))
