"""Coverage survey over timm's ViT family: trace, dependency graph, width pass, FLOP model.

For every architecture timm registers in a ViT-family module (``--modules``), the script builds a
small instance (``depth=2`` and a 4×4-patch input where the constructor accepts them, 10 classes,
``pretrained=False``), then records:

* traced?            ``vitprune.trace.capture`` succeeded
* unsupported ops    op names the dependency graph has no rule for (they freeze what they touch)
* groups             prunable groups by kind (R residual, H head, D head_dim, M MLP hidden, O other)
                     and the number of frozen ones
* width OK?          ``WidthPruning`` keeping every other channel of every prunable group produced a
                     graph that runs and returns finite outputs
* FLOPs exact?       ``FlopModel`` equals ``count_flops`` on the dense and on the pruned model
* pruned = masked?   the width pass's invariant: pruning the groups that feed no normalisation
                     (MLP hidden, heads, head-dims without q/k-norm) gives the same outputs as the
                     original with those channels' parameter slices zeroed (parameters get small
                     seeded noise first, so zero biases and 1e-5 layer-scales hide nothing)
* matmul path        the same checks but the zero-mask one, with ``fused_attn = False`` on every
                     timm attention module (matmul → softmax → matmul instead of SDPA); ``n/a``
                     without such a module

Each model runs in a worker process with a time limit, so one crash, hang or out-of-memory never
stops the survey. Architectures whose small instance has the same structure as one already seen
(``_224`` vs ``_384`` variants) are run once and listed as duplicates. Architectures whose small
instance would still exceed ``--max-params`` are skipped and listed. When ``--budget`` runs out the
rest are listed as not run (the required architectures go first, then the others round-robin over
modules, so every family is sampled).

    python benchmarks/coverage.py                  # Markdown table on stdout and benchmarks/coverage.md
    python benchmarks/coverage.py --limit 20 --modules deit beit
    python benchmarks/coverage.py --json /tmp/cov.json && python benchmarks/coverage.py --resume /tmp/cov.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from itertools import zip_longest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODULES = ["vision_transformer", "deit", "beit", "eva", "vision_transformer_sam",
                   "vision_transformer_relpos", "xcit", "cait", "naflexvit", "crossvit", "pit", "tnt"]
# the architectures vitprune must support (tests/test_coverage.py holds them to it); bold in the table
REQUIRED = {"deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
            "deit_small_distilled_patch16_224", "deit3_small_patch16_224", "vit_small_patch16_224",
            "vit_base_patch32_224", "vit_base_patch16_clip_224", "vit_small_patch14_reg4_dinov2",
            "vit_medium_patch16_gap_256"}
KIND_LETTER = {"residual": "R", "head": "H", "head_dim": "D", "hidden": "M", "other": "O"}


@dataclass
class Row:
    model: str
    module: str
    config: str = ""
    status: str = "ok"  # ok | error | skipped | duplicate | timeout | not run
    traced: bool = False
    unsupported: list[str] = field(default_factory=list)
    groups: str = ""
    prunable: bool = False
    width_ok: bool | None = None
    flops_exact: bool | None = None
    equivalent: bool | None = None
    matmul: str = "n/a"
    error: str = ""
    seconds: float = 0.0
    signature: str = ""
    dup_of: str = ""
    kwargs: dict = field(default_factory=dict)
    input_size: tuple = ()


# -- one model ------------------------------------------------------------------------------------
def _create(name: str, kwargs: dict, meta: bool):
    import timm
    import torch
    if meta:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, **kwargs)
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def _pick_config(name: str) -> tuple[dict, tuple[int, int, int], object]:
    """The smallest constructor arguments the architecture accepts, tried on the meta device."""
    base = {"num_classes": 10}
    attempts = [{"depth": 2}, {}]
    last: Exception | None = None
    for extra in attempts:
        try:
            probe = _create(name, {**base, **extra}, meta=True)
        except Exception as e:  # constructors reject unknown/ill-typed kwargs in many ways
            last = e
            continue
        patch = _patch_size(probe)
        if patch:
            side = 4 * patch
            try:
                probe2 = _create(name, {**base, **extra, "img_size": side}, meta=True)
                kwargs = {**base, **extra, "img_size": side}
                return kwargs, (3, side, side), probe2
            except Exception:
                pass
        return {**base, **extra}, _default_input(probe), probe
    raise RuntimeError(f"cannot construct: {type(last).__name__}: {last}")


def _patch_size(model) -> int | None:
    pe = getattr(model, "patch_embed", None)
    p = getattr(pe, "patch_size", None)
    if isinstance(p, (tuple, list)) and p and len(set(p)) == 1:
        return int(p[0])
    return int(p) if isinstance(p, int) else None


def _default_input(model) -> tuple[int, int, int]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size", (3, 224, 224))
    return tuple(int(s) for s in size)


def _structure_signature(model, input_size) -> str:
    """Module tree, every parameter/buffer name and shape, and the plain attributes of every module
    (global_pool, num_prefix_tokens, dynamic_img_size, ...): what decides the traced graph."""
    tensors = [(n, tuple(t.shape)) for n, t in (*model.named_parameters(), *model.named_buffers())]
    attrs = [(n, sorted((k, repr(v)) for k, v in vars(m).items()
                        if not k.startswith("_") and isinstance(v, (bool, int, float, str, tuple, type(None)))))
             for n, m in model.named_modules()]
    text = repr((type(model).__qualname__, repr(model), tensors, attrs, input_size))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _set_fused(model, fused: bool) -> int:
    n = 0
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
            n += 1
    return n


def _one_path(make, x, zero_mask: bool = True) -> dict:
    """Trace → dependency graph → prune half of every prunable group → run + FLOP checks, then the
    zero-mask equivalence check. ``make()`` builds a fresh, identically initialised instance."""
    import torch
    from passes.width import WidthPruning
    from vitprune.deps import DependencyGraph
    from vitprune.flops import FlopModel, count_flops
    from vitprune.capture import capture

    out: dict = {"traced": False, "unsupported": [], "groups": "", "prunable": False,
                 "width_ok": None, "flops_exact": None, "equivalent": None, "error": ""}
    try:
        gm = capture(make(), x)
    except Exception as e:
        out["error"] = f"trace: {_short(e)}"
        return out
    out["traced"] = True
    try:
        dg = DependencyGraph.build(gm)
    except Exception as e:
        out["error"] = f"deps: {_short(e)}"
        return out
    out["unsupported"] = sorted({u.op for u in dg.unsupported})
    groups = dg.prunable_groups()
    kinds = Counter(g.kind for g in groups)
    frozen = sum(1 for g in dg.groups if not g.prunable and g.size > 1)
    out["groups"] = " ".join(f"{KIND_LETTER[k]}{kinds[k]}" for k in KIND_LETTER if kinds[k]) + f" / {frozen} frozen"
    out["prunable"] = bool(groups)
    if not groups:
        return out
    dup = sorted(n for n, c in Counter(g.name for g in groups).items() if c > 1)
    if dup:  # WidthPruning addresses groups by name: only the first of several namesakes is reachable
        out["error"] = f"{len(dup)} names shared by several prunable groups, e.g. {dup[0]} (those skipped)"
        groups = [g for g in groups if g.name not in dup]
    try:
        fm = FlopModel(dg)
        dense = (count_flops(gm, x), fm.flops())
        dense_exact = dense[0] == dense[1]
        keep = {g.name: _half(g.size) for g in groups}
        counts = {g.axis: len(keep[g.name]) for g in groups}
        predicted = fm.flops(counts)
    except Exception as e:
        out["error"] = f"flop model: {_short(e)}"
        return out
    try:
        pruned = WidthPruning(keep)(gm).graph_module
        with torch.no_grad():
            y = pruned(x)
        out["width_ok"] = all(torch.isfinite(t).all().item() for t in _tensors(y))
    except Exception as e:
        out["width_ok"] = False
        out["error"] = out["error"] + "; " * bool(out["error"]) + f"width: {_short(e)}"
    if out["width_ok"]:
        try:
            actual = count_flops(pruned, x)
            out["flops_exact"] = dense_exact and actual == predicted
            if not out["flops_exact"]:
                out["error"] = out["error"] + "; " * bool(out["error"]) + (f"flops (counter vs model): dense {dense[0]} vs {dense[1]}, "
                                f"pruned {actual} vs {predicted}")
        except Exception as e:
            out["error"] = f"count_flops: {_short(e)}"
    try:  # also when pruning everything failed: the norm-free groups alone may still work
        if not zero_mask:
            return out
        out["equivalent"], detail = _zero_mask_equivalent(make, x)
        if out["equivalent"] is False:
            out["error"] = out["error"] + "; " * bool(out["error"]) + f"zero-mask: {detail}"
    except Exception as e:
        out["equivalent"] = False
        out["error"] = out["error"] or f"zero-mask check: {_short(e)}"
    return out


def _half(size: int) -> list[int]:
    return list(range(0, size, 2))


def _tensors(y) -> list:
    import torch
    return [t for t in (y if isinstance(y, (tuple, list)) else [y]) if isinstance(t, torch.Tensor)]


def _renormalised_axes(dg) -> set[int]:
    """Leaf axes a softmax / L2-normalise / SDPA's softmax reduces over (XCiT attends over channels):
    pruning such channels renormalises over the rest, so zero-masking them is not the same function."""
    from vitprune.deps.rules import op_key
    out: set[int] = set()
    for node in dg.gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        key = op_key(node, dg.gm)
        if key not in ("softmax", "log_softmax", "normalize", "scaled_dot_product_attention"):
            continue
        src = node.args[0] if node.args else node.kwargs.get("input")
        if key == "scaled_dot_product_attention":  # its softmax runs over the keys' sequence dim
            src = node.args[1] if len(node.args) > 1 else node.kwargs.get("key")
        dims = dg.node_dims.get(src)
        if not dims or isinstance(dims[0], list):
            continue
        if key == "scaled_dot_product_attention":
            dim = -2
        elif node.op == "call_module":
            dim = getattr(dg.gm.get_submodule(node.target), "dim", -1)
        else:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else (1 if key == "normalize" else -1))
        if isinstance(dim, int):
            out.update(dg.table.find(leaf) for leaf in dg.table.leaves(dims[dim]))
    return out


def _zero_mask_equivalent(make, x) -> tuple[bool | None, str]:
    """The width pass's invariant for groups that feed no normalisation: pruning them gives exactly
    the original function with the removed channels' parameter slices set to zero.

    Groups with a norm member (the residual stream, q/k-norm head-dims), groups a softmax or
    L2-normalise reduces over, and groups with a buffer member are left out; None when none qualifies.
    """
    import numpy as np
    import torch
    from passes.width import WidthPruning
    from vitprune.deps import DependencyGraph
    from vitprune.capture import capture

    gm_pruned, gm_masked = capture(make(), x), capture(make(), x)
    dg = DependencyGraph.build(gm_masked)
    params = dict(gm_masked.named_parameters())
    names = Counter(g.name for g in dg.prunable_groups())
    renormalised = _renormalised_axes(dg)
    chosen = [g for g in dg.prunable_groups() if names[g.name] == 1
              and dg.table.find(g.axis) not in renormalised
              and all("norm" not in m.roles and m.param in params for m in g.members)]
    if not chosen:
        return None, ""
    keep = {g.name: _half(g.size) for g in chosen}
    with torch.no_grad():
        for g in chosen:
            removed = np.setdiff1d(np.arange(g.size), keep[g.name])
            for m in g.members:
                idx = torch.as_tensor(np.nonzero(np.isin(m.coords, removed))[0])
                params[m.param].index_fill_(m.dim, idx, 0.0)
        want = _tensors(gm_masked(x))
        got = _tensors(WidthPruning(keep)(gm_pruned).graph_module(x))
    err = max(float((a - b).abs().max() / (b.abs().max() + 1e-12)) for a, b in zip(got, want))
    kinds = ",".join(sorted({g.kind for g in chosen}))
    return err < 1e-4, f"pruning {kinds} groups differs from zero-masking them (relative error {err:.1e})"


def plan(name: str, module: str, max_params: float) -> Row:
    """Pick the small config on the meta device (cheap): config, structure signature, or why not."""
    row = Row(model=name, module=module)
    try:
        kwargs, input_size, probe = _pick_config(name)
    except Exception as e:
        row.status, row.error = "error", _short(e)
        return row
    row.kwargs, row.input_size = kwargs, input_size
    row.config = ", ".join(f"{k}={v}" for k, v in kwargs.items() if k != "num_classes") + f"; input {input_size[1]}"
    row.signature = _structure_signature(probe, input_size)
    n_params = sum(p.numel() for p in probe.parameters())
    if n_params > max_params:
        row.status, row.error = "skipped", f"{n_params / 1e6:.0f}M params even when small (--max-params)"
    return row


def check_model(row: Row) -> Row:
    """Run both attention paths of one planned architecture (in a worker process)."""
    import torch
    from vitprune.capture import example_input_for
    torch.set_num_threads(1)
    start = time.perf_counter()

    def make(fused: bool):
        def build():  # a fresh instance each time: the width pass may write into modules a trace shares
            model = _create(row.model, row.kwargs, meta=False)
            _randomize(model)
            _set_fused(model, fused)
            return model
        return build

    try:
        x = example_input_for(tuple(row.input_size), batch=2)
        has_attn = _set_fused(_create(row.model, row.kwargs, meta=True), True) > 0
        res = _one_path(make(True), x)
        row.traced, row.unsupported, row.groups = res["traced"], res["unsupported"], res["groups"]
        row.prunable, row.width_ok, row.flops_exact, row.equivalent, row.error = (
            res["prunable"], res["width_ok"], res["flops_exact"], res["equivalent"], res["error"])
        if has_attn:
            m = _one_path(make(False), x, zero_mask=False)  # zero-mask on the SDPA path only (time)
            row.matmul = _summary(m)
            if m["error"] and not row.error:
                row.error = f"matmul path: {m['error']}"
        row.status = "error" if row.error else "ok"
    except Exception as e:
        row.status = "error"
        row.error = _short(e)
    row.seconds = time.perf_counter() - start
    return row


def _randomize(model) -> None:
    """Small seeded noise on every float parameter: zero biases, unit norms and 1e-5 layer-scales of
    a fresh init would let a wrong rewrite pass the zero-mask check."""
    import torch
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _summary(res: dict) -> str:
    if not res["traced"]:
        return "trace fails"
    if res["unsupported"]:
        return "unsupported: " + ", ".join(_op(o) for o in res["unsupported"])
    if res["width_ok"] is False:
        return "width fails"
    if res["flops_exact"] is False:
        return "FLOPs differ"
    if res["equivalent"] is False:
        return "zero-mask differs"
    if res["error"]:
        return "error"
    return "ok" if res["width_ok"] else "no prunable group"


def _short(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:240]}"


def _op(name: str) -> str:
    return name.replace("timm.layers.", "").replace("timm.models.", "")


# -- worker pool with a time limit per model ------------------------------------------------------------
def _worker(tasks, results):
    sys.path.insert(0, str(ROOT))
    import warnings
    warnings.filterwarnings("ignore")
    while True:
        task = tasks.get()
        if task is None:
            return
        row = Row(**task)
        try:
            row = check_model(row)
        except BaseException as e:  # never let one model take the worker down silently
            row.status, row.error = "error", _short(e) + traceback.format_exc()[-200:]
        results.put(asdict(row))


class Pool:
    """``jobs`` worker processes; a model over ``timeout`` seconds gets its worker killed."""

    def __init__(self, jobs: int, timeout: float):
        self.ctx = mp.get_context("spawn")
        self.jobs, self.timeout = jobs, timeout
        self.workers: list[dict] = []

    def _start(self) -> dict:
        tasks, results = self.ctx.Queue(), self.ctx.Queue()
        p = self.ctx.Process(target=_worker, args=(tasks, results), daemon=True)
        p.start()
        return {"proc": p, "tasks": tasks, "results": results, "task": None, "since": 0.0}

    def run(self, todo: list[Row], budget: float, on_row) -> list[Row]:
        """Run until ``todo`` is empty or ``budget`` seconds passed; return what was not started."""
        deadline = time.perf_counter() + budget
        todo = list(todo)
        self.workers = [self._start() for _ in range(self.jobs)]
        while todo or any(w["task"] for w in self.workers):
            for i, w in enumerate(self.workers):
                if w["task"] is None and todo and time.perf_counter() < deadline:
                    w["task"], w["since"] = todo.pop(0), time.perf_counter()
                    w["tasks"].put(asdict(w["task"]))
                if w["task"] is None:
                    continue
                try:
                    on_row(Row(**w["results"].get(timeout=0.05)))
                    w["task"] = None
                except Exception:  # queue.Empty: still working
                    elapsed = time.perf_counter() - w["since"]
                    if elapsed > self.timeout or not w["proc"].is_alive():
                        row, dead = w["task"], not w["proc"].is_alive()
                        row.status = "error" if dead else "timeout"
                        row.error = f"worker died (exit {w['proc'].exitcode})" if dead else f"over {self.timeout:.0f} s"
                        row.seconds = elapsed
                        on_row(row)
                        w["proc"].kill()
                        w["proc"].join()
                        self.workers[i] = self._start()
            if not todo and not any(w["task"] for w in self.workers):
                break
            if time.perf_counter() >= deadline and not any(w["task"] for w in self.workers):
                break
        for w in self.workers:
            w["tasks"].put(None)
        for w in self.workers:
            w["proc"].join(timeout=5)
            if w["proc"].is_alive():
                w["proc"].kill()
        return todo


# -- listing and reporting ---------------------------------------------------------------------------------
def candidates(modules: list[str]) -> list[tuple[str, str]]:
    """(name, module): the required architectures first, then round-robin over modules, so a budget
    cut still samples every family."""
    import timm
    per_module = []
    for m in modules:
        try:
            per_module.append([(n, m) for n in timm.list_models(module=m)])
        except Exception:
            per_module.append([])
    ordered = [x for batch in zip_longest(*per_module) for x in batch if x is not None]
    return sorted(ordered, key=lambda x: x[0] not in REQUIRED)  # the must-support ones first (stable)


def _mark(v: bool | None) -> str:
    return "n/a" if v is None else ("yes" if v else "**NO**")


def markdown(rows: list[Row], header: str) -> str:
    lines = [header, "",
             "| model | module | config | traced? | unsupported ops | prunable groups / frozen | prunable? "
             "| width pass OK? | FLOP model exact? | pruned = zero-masked? | matmul attention path | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        model = f"**{r.model}**" if r.model in REQUIRED else r.model
        if r.status in ("not run", "skipped", "timeout") or (r.status == "error" and not r.traced):
            lines.append(f"| {model} | {r.module} | {r.config} | {_mark(r.traced) if r.status == 'error' else '-'} "
                         f"| | | | | | | | {r.status}: {_cell(r.error)} |")
            continue
        unsupported = ", ".join(_op(o) for o in r.unsupported) or "none"
        lines.append(f"| {model} | {r.module} | {r.config} | {_mark(r.traced)} | {unsupported} | {r.groups} "
                     f"| {_mark(r.prunable)} | {_mark(r.width_ok)} | {_mark(r.flops_exact)} | {_mark(r.equivalent)} | {r.matmul} "
                     f"| {_cell(r.error)} |")
    return "\n".join(lines) + "\n"


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")[:300]


def summary(rows: list[Row]) -> str:
    ran = [r for r in rows if r.status in ("ok", "error", "timeout") and not r.dup_of]
    dups = [r for r in rows if r.dup_of]
    covered = ran + dups
    clean = [r for r in covered if r.status == "ok" and not r.unsupported and r.matmul in ("ok", "n/a")
             and r.width_ok and r.flops_exact and r.equivalent is not False]
    by_status = Counter("duplicate" if r.dup_of else r.status for r in rows)
    ops = Counter(o for r in ran for o in r.unsupported)

    def names(rs: list[Row]) -> str:
        return ", ".join(r.model for r in rs) or "none"

    required = [r for r in covered if r.model in REQUIRED]
    lines = [
        f"- required architectures (bold) fully supported: {sum(r in clean for r in required)} of {len(required)}",
        f"- architectures listed: {len(rows)}; distinct small structures run: {len(ran)}; "
        f"duplicates of a run structure: {len(dups)} ("
        + ", ".join(f"{k}: {v}" for k, v in sorted(by_status.items())) + ")",
        f"- fully supported (no unsupported op, width pass runs, FLOP model exact, pruned = zero-masked; "
        f"both attention paths): "
        f"{len(clean)} of {len(covered)} covered architectures",
        f"- width pass produced a graph that fails to run: {names([r for r in ran if r.width_ok is False or r.matmul == 'width fails'])}",
        f"- FLOP model not exact: {names([r for r in ran if r.flops_exact is False or r.matmul == 'FLOPs differ'])}",
        f"- pruning differs from zero-masking the removed channels: "
        f"{names([r for r in ran if r.equivalent is False or r.matmul == 'zero-mask differs'])}",
        f"- several prunable groups share one name (WidthPruning reaches only the first): "
        f"{names([r for r in ran if 'names shared by several' in r.error])}",
        f"- trace fails: {names([r for r in ran if not r.traced])}",
        "- other errors: " + ("; ".join(f"{r.model} ({_cell(r.error)[:90]})" for r in ran if r.status == "error"
                                        and r.traced and r.width_ok is not False and r.flops_exact is not False
                                        and r.equivalent is not False and "names shared" not in r.error) or "none"),
        f"- no prunable group at all: {names([r for r in ran if r.traced and not r.prunable and r.groups])}",
        f"- timeouts: {names([r for r in rows if r.status == 'timeout'])}",
    ]
    if ops:
        lines.append("- unsupported ops (distinct structures): "
                     + ", ".join(f"`{_op(o)}` ({n})" for o, n in ops.most_common()))
    return "\n".join(lines) + "\n"


def _revision() -> str:
    """The commit measured, and which core files differed from it (results depend on them)."""
    import subprocess
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--name-only", "HEAD", "--", "vitprune", "passes"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return "(revision unknown)"
    return f"at {head}" + (f" with uncommitted changes to {', '.join(dirty)}" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modules", nargs="+", default=DEFAULT_MODULES)
    ap.add_argument("--limit", type=int, default=0, help="at most this many architectures (0: all)")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for the whole survey")
    ap.add_argument("--timeout", type=float, default=90.0, help="seconds per architecture")
    ap.add_argument("--max-params", type=float, default=150e6, help="skip small instances above this")
    ap.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "coverage.md"))
    ap.add_argument("--json", help="also write every row as JSON here (for --resume)")
    ap.add_argument("--resume", help="reuse the results in this --json file (same structure) and run "
                    "only the rest: one survey split over several bounded runs")
    args = ap.parse_args(argv)
    previous: dict[str, dict] = {}
    if args.resume and Path(args.resume).exists():
        previous = {r["model"]: r for r in json.loads(Path(args.resume).read_text())
                    if r["status"] in ("ok", "error", "timeout") and not r["dup_of"]}

    sys.path.insert(0, str(ROOT))
    import warnings
    warnings.filterwarnings("ignore")
    names = candidates(args.modules)
    if args.limit:
        names = names[:args.limit]
    start = time.perf_counter()
    rows: dict[str, Row] = {}
    first_of: dict[str, str] = {}  # structure signature → first architecture with it
    todo: list[Row] = []
    reused = 0
    for name, module in names:
        row = plan(name, module, args.max_params)
        rows[name] = row
        if row.status != "ok":
            continue
        if row.signature in first_of:
            row.status = "duplicate"
            continue
        first_of[row.signature] = name
        old = previous.get(name)
        if old is not None and old["signature"] == row.signature:
            rows[name] = Row(**{**old, "input_size": tuple(old["input_size"])})
            reused += 1
            continue
        todo.append(row)
    print(f"[{time.perf_counter() - start:6.1f}s] {len(names)} architectures, {len(todo)} distinct small "
          f"structures to run, {reused} reused", file=sys.stderr, flush=True)

    def on_row(row: Row) -> None:
        rows[row.model] = row
        print(f"[{time.perf_counter() - start:6.1f}s] {row.model}: {row.status} ({row.seconds:.1f}s) "
              f"{row.error[:120]}", file=sys.stderr, flush=True)

    left = Pool(args.jobs, args.timeout).run(todo, args.budget, on_row)
    for row in left:
        row.status, row.error = "not run", "survey budget spent"
    for row in rows.values():  # duplicates report the result of the first of their structure
        if row.status == "duplicate":
            first = rows[first_of[row.signature]]
            keep = {k: v for k, v in asdict(first).items() if k not in ("model", "module", "config")}
            rows[row.model] = Row(**{**asdict(row), **keep})
            rows[row.model].error = f"same small structure as {first.model}" + (f"; {first.error}" if first.error else "")
            rows[row.model].dup_of = first.model
    ordered = sorted(rows.values(), key=lambda r: (r.module, r.model))
    elapsed = time.perf_counter() - start
    import timm
    import torch
    header = (f"# vitprune coverage over timm's ViT family\n\n"
              f"vitprune {_revision()}; timm {timm.__version__}, torch {torch.__version__}; small instances (depth 2 and a 4×4-patch input "
              f"where the constructor accepts them), pretrained=False, 10 classes; width pass keeps every other "
              f"channel of every prunable group. {len(rows)} architectures from modules "
              f"{', '.join(args.modules)}; {elapsed:.0f} s with {args.jobs} workers, {args.timeout:.0f} s per model, "
              f"budget {args.budget:.0f} s" + (f"; {reused} results reused from earlier bounded runs "
                                                   f"(--resume)" if reused else "")
              + f"; {sum(r.seconds for r in ordered if not r.dup_of) / 60:.0f} worker-minutes of checks in all.\n\n"
              + summary(ordered))
    text = markdown(ordered, header)
    print(text)
    Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in ordered], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
