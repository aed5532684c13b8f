"""The accuracy/speedup Pareto benchmark: every compression method under the same fine-tuning budget.

1. Trains a base ViT (``VisionTransformer``, depth 6, 3 heads, 10 classes) on a task bundled with an
   installed package (nothing downloaded) and caches it in ``OUT/base_<hash>.pt``. Two tasks:

   ========= ==========================================================================================
   mosaic    (default; the committed results) ``vitprune.train.mosaic``: 2×2 mosaics of scikit-learn
             digits at 32×32, class = decile of 1·d_tl + 2·d_tr + 3·d_bl + 4·d_br, so every digit and
             its position count; 20,000 train / 2,000 test mosaics from disjoint digit-image pools.
             Base: patch 16 (each digit is one patch token), embed_dim 96, 12 epochs: 82.45% test
             top-1, well below saturation, so methods separate (one test image = 0.05 points).
             (Patch 8 — each digit split over 2×2 tokens — learned far slower: 60.7% after 24
             epochs, 26 s of CPU each; patch 16 reaches 82% in 12 epochs of ~10 s.)
   digits    (the smoke test, ``--quick``) ``vitprune.train.digits``: 1,797 8×8 digits upsampled to
             32×32, 1,437 train / 360 test; base: patch 4. ~97% top-1: too easy to rank methods.
   ========= ==========================================================================================

2. Sweeps the rows (the committed run: ``tp_width``, ``width``, ``blockdrop``, ``boundarydpt``,
   ``boundarydpt+`` at 0.5/0.4/0.3/0.2 of the FLOPs, 3 seeds, 3 epochs each; ``--methods`` adds the others) with :func:`vitprune.sweep.run_sweep`, each point fine-tuned with the same budget
   (distillation from the base model, same epochs / lr / batch), evaluated on the test split, exported
   to ONNX and timed in ONNX Runtime interleaved with the base model's ONNX:

   ============== ======================================================================================
   tp_width       Torch-Pruning's recommended timm ViT recipe (uniform ratio bisected to the FLOPs target)
   width          vitprune width pruning (global ranking, heads/head-dim/MLP/residual)
   blockdrop      naive depth: whole blocks dropped (defined here, see :func:`blockdrop`)
   attention      attention-branch removal only (BoundaryDPT's pass and one-shot scores)
   activation     activation removal only (fc2∘fc1 merged)
   boundarydpt    BoundaryDPT: both kinds, alternating
   boundarydpt+   BoundaryDPT+: depth, then width for the rest
   cpvit          CP-ViT progressive token pruning
   combo          BoundaryDPT+ with a static CP-ViT token cut (keep 70% from block 2)
   ============== ======================================================================================

3. Measures each compressed *architecture* also at ImageNet size: rebuilt on ``deit_small_patch16_224``
   (random weights; 12 blocks, 384 wide, 6 heads of 64, 196 patches) — block ``i`` of the base model
   maps to DeiT-S blocks ``2i`` and ``2i+1``, every width group keeps the same fraction (rounded to 16,
   heads to whole heads), every block keeps the same fraction of its patch tokens; Torch-Pruning's
   uniform ratio is applied to DeiT-S by Torch-Pruning itself (see ``vitprune.sweep.scale_recipe``).

    python benchmarks/pareto.py --write-results   # the full benchmark on mosaics, 3 seeds; updates
                                                  # benchmarks/pareto.{md,json,png} (the committed results)
    python benchmarks/pareto.py --quick --out DIR # smoke test: digits, embed_dim 48 base on 600 images,
                                                  # 3 rows, 1 target, 1 seed, 1 epoch, no DeiT-S latency
    python benchmarks/pareto.py --methods width,tp_width --out DIR   # a subset of the rows
    python benchmarks/pareto.py --out A --methods tp_width,width,blockdrop &     # one sweep on two cores:
    python benchmarks/pareto.py --out B --methods boundarydpt,boundarydpt+; wait # a process per core, then
    python benchmarks/pareto.py --out A --merge B --write-results                # one report (re-timed together)

Every run writes only under ``--out`` (default ``$TMPDIR/vitprune-pareto-<task>[-quick]``):
``sweep.json`` (every point, resumable), ``sweep.md``, ``sweep.png`` (base-model speedup),
``sweep_deit_s.png`` (DeiT-S speedup), and ``pareto.md`` / ``pareto.json`` / ``pareto.png`` (the
report, every point as ``{"task", "base_top1", "points": [{method, target, seed, top1, speedup}]}``
with the DeiT-S ORT speedup, and the DeiT-S plot). Only ``--write-results`` copies those three into
``benchmarks/`` — and only for the full kind of run (mosaic task, ≥ 3 seeds, DeiT-S latency); a
``<!-- reading -->`` … ``<!-- /reading -->`` section already in ``benchmarks/pareto.md`` is kept.
Paths do not depend on the working directory. Resumable: rerun the same command and only missing
points are computed.

Block dropping: no vitprune pass removes a whole MLP (activation removal keeps a merged linear), so
``blockdrop`` is a plain module rewrite here: ``model.blocks`` becomes a ``Sequential`` of the kept
blocks; the blocks dropped are those whose single removal changes the output least (KL to the base
model's predictions on the calibration batches), as few as meet the FLOPs target.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Any, Sequence

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout, from any cwd
from vitprune import sweep as sw  # noqa: E402
from vitprune.train.digits import digits_splits  # noqa: E402
from vitprune.train.mosaic import mosaic_splits  # noqa: E402
from vitprune.errors import PlanError  # noqa: E402
from vitprune.deps.flops import count_flops  # noqa: E402
from vitprune.train.finetune import FinetuneConfig, evaluate, finetune  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = {ext: os.path.join(HERE, f"pareto.{ext}") for ext in ("md", "json", "png")}  # the committed results
MIN_SEEDS = 3  # committed results: mean ± std over at least this many seeds per point
VITPRUNE_METHODS = ("width", "attention", "activation", "boundarydpt", "boundarydpt+", "cpvit", "combo")
ALL_METHODS = ("tp_width", "width", "blockdrop", "attention", "activation", "boundarydpt", "boundarydpt+",
               "cpvit", "combo")
SCALE_NAME = "deit_small_patch16_224"

# the tasks: data, the base model's shape and its training budget (lr, batch, epochs)
TASKS = {
    "mosaic": dict(title="digit mosaics", patch_size=16, embed_dim=96, base_epochs=12, base_batch=64, base_lr=2e-3,
                   train_images=20_000, test_images=2_000),
    "digits": dict(title="digits", patch_size=4, embed_dim=96, base_epochs=40, base_batch=32, base_lr=2e-3,
                   train_images=1_437, test_images=360),
}
# the committed run: the rows issue 10's goals name (and depth-only / naive depth for reference), the
# targets where DeiT-S runs ≥ 2× faster; the other rows run with --methods
FULL = dict(task="mosaic", targets=(0.5, 0.4, 0.3, 0.2), methods=("tp_width", "width", "blockdrop", "boundarydpt",
                                                                  "boundarydpt+"), seeds=(0, 1, 2), epochs=3,
            train_subset=None, runs=30, scale=True)
QUICK = dict(task="digits", targets=(0.5,), methods=("tp_width", "width", "boundarydpt+"), seeds=(0,), epochs=1,
             base_epochs=10, embed_dim=48, train_subset=600, runs=10, scale=False)


# ---------------------------------------------------------------------------------------------- block dropping
def drop_blocks(model: nn.Module, drop: Sequence[int]) -> nn.Module:
    m = copy.deepcopy(model)
    m.blocks = nn.Sequential(*[b for i, b in enumerate(model.blocks) if i not in set(drop)])
    return m


def blockdrop(model: nn.Module, target: float, ctx: sw.PointContext) -> sw.Pruned:
    """Drop the fewest whole blocks that meet ``target``, least harmful first (single-drop KL)."""
    x = torch.zeros(1, *ctx.input_size)
    base = count_flops(model, x)
    images = torch.cat([b[0] for b in ctx.calib])
    with torch.no_grad():
        ref = F.log_softmax(model.eval()(images), -1)
        kl = {}
        for i in range(len(model.blocks)):
            out = F.log_softmax(drop_blocks(model, [i]).eval()(images), -1)
            kl[i] = float(F.kl_div(out, ref, log_target=True, reduction="batchmean"))
    order = sorted(kl, key=lambda i: (kl[i], i))
    for n in range(len(order)):
        m = drop_blocks(model, order[:n])
        if count_flops(m, x) <= (target + 0.01) * base:
            return sw.Pruned(m, {"kind": "blocks", "drop": sorted(order[:n]), "depth": len(model.blocks)},
                             {"single_drop_kl": kl})
    raise PlanError(f"dropping {len(order) - 1} of {len(order)} blocks stays above the target {target}")


def blockdrop_scale(arch: dict, src_model, src_size, dst_model: nn.Module, dst_size, config) -> nn.Module:
    bmap = sw.block_map(arch["depth"], len(dst_model.blocks))
    return drop_blocks(dst_model, [j for j in range(len(dst_model.blocks)) if bmap[j] in arch["drop"]])


sw.register(sw.Method("blockdrop", "naive depth (whole blocks)", blockdrop, blockdrop_scale))


# ---------------------------------------------------------------------------------------------- base model
def make_model(s: dict[str, Any]) -> nn.Module:
    return VisionTransformer(img_size=32, patch_size=s["patch_size"], embed_dim=s["embed_dim"], depth=6, num_heads=3,
                             num_classes=10)


def data(s: dict[str, Any], batch_size: int, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """The task's (train, test) loaders; the data split is fixed (seed 0), ``seed`` only shuffles."""
    if s["task"] == "mosaic":
        train_ds, test_ds = mosaic_splits(image_size=32, train_size=s["train_images"], test_size=s["test_images"])
        train_ds, test_ds = train_ds.materialize(), test_ds.materialize()
    else:
        train_ds, test_ds = digits_splits(image_size=32, seed=0)
    if s["train_subset"] is not None:  # a fixed stratified-enough subset: every k-th training image
        step = max(1, len(train_ds) // s["train_subset"])
        train_ds = Subset(train_ds, list(range(0, len(train_ds), step))[:s["train_subset"]])
    g = torch.Generator().manual_seed(seed)
    return (DataLoader(train_ds, batch_size=batch_size, shuffle=True, generator=g),
            DataLoader(test_ds, batch_size=128, shuffle=False))


def base_model(out: str, s: dict[str, Any], log=print) -> tuple[nn.Module, dict]:
    """Train (or load the cached) base model; returns it and its training record."""
    recipe = [s["task"], s["patch_size"], s["embed_dim"], s["base_epochs"], s["train_subset"], s["base_lr"],
              s["base_batch"], 1.0]
    key = hashlib.sha1(json.dumps(recipe).encode()).hexdigest()[:10]
    path = os.path.join(out, f"base_{key}.pt")
    torch.manual_seed(0)
    model = make_model(s)
    if os.path.exists(path):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(obj["state_dict"])
        return model.eval(), obj["record"]
    train, test = data(s, s["base_batch"])
    t0, c0 = time.perf_counter(), time.process_time()
    log(f"training the base model ({s['base_epochs']} epochs) ...")
    hist = finetune(model, None, train, test, FinetuneConfig(
        epochs=s["base_epochs"], lr=s["base_lr"], batch_size=s["base_batch"], label_weight=1.0, kd_weight=0.0,
        warmup_epochs=min(1.0, s["base_epochs"] / 4), weight_decay=0.05, seed=0, progress=False))
    record = {"epochs": s["base_epochs"], "seconds": round(time.perf_counter() - t0, 1),
              "cpu_seconds": round(time.process_time() - c0, 1), "top1": evaluate(model, test),
              "curve": [round(e["top1"], 2) for e in hist["epochs"]]}
    fd, tmp = tempfile.mkstemp(dir=out, suffix=".pt.tmp")
    os.close(fd)
    torch.save({"state_dict": model.state_dict(), "record": record}, tmp)
    os.replace(tmp, path)
    return model.eval(), record


def results_json(state: dict, s: dict[str, Any]) -> dict[str, Any]:
    """Every finished point, one per seed: top-1 (%) and the DeiT-S-mapped ORT speedup (None without it)."""
    points = [{"method": p["method"], "target": p["target"], "seed": p["seed"], "top1": round(p["top1"], 3),
               "speedup": round(p["scaled"]["speedup"], 4) if p.get("scaled") else None}
              for p in state["points"].values() if p["status"] == "done"]
    points.sort(key=lambda p: (ALL_METHODS.index(p["method"]) if p["method"] in ALL_METHODS else 99,
                               -p["target"], p["seed"]))
    return {"task": {"name": s["task"], "test_images": s["test_images"]}, "base_top1": round(state["original"]["top1"], 3),
            "speedup": f"ORT latency of {SCALE_NAME} ÷ the same architecture rebuilt on it (batch 1, CPU)",
            "points": points}


# ---------------------------------------------------------------------------------------------- frontier analysis
def frontier_at(rows: list[dict], methods: Sequence[str], speed: str, s: float) -> dict | None:
    """The row with the best mean top-1 among ``methods`` whose mean speedup is ≥ ``s`` (None: none)."""
    cands = [r for r in rows if r["method"] in methods and r.get(speed) is not None and r[speed] >= s - 1e-9]
    return max(cands, key=lambda r: r["top1"]) if cands else None


def compare_frontiers(rows: list[dict], speed: str) -> dict[str, Any]:
    """vitprune's frontier against Torch-Pruning's at speedups ≥ 1.5× (the frontier at ``s`` = the best
    mean top-1 of any row at least ``s`` times faster than the original)."""
    tp = sorted(r[speed] for r in rows if r["method"] == "tp_width" and r.get(speed) is not None)
    tp_max = tp[-1] if tp else None
    floor2 = lambda x: math.floor(x * 100) / 100  # noqa: E731  (a grid point never exceeds its row's speedup)
    grid = {1.5, 2.0} | {floor2(x) for x in tp if x >= 1.5}
    grid |= {floor2(r[speed]) for r in rows if r["method"] in VITPRUNE_METHODS and r.get(speed)
             and 1.5 <= r[speed] <= (tp_max or 0)}
    checks = []
    for s in sorted(grid):
        vp, tpr = frontier_at(rows, VITPRUNE_METHODS, speed, s), frontier_at(rows, ("tp_width",), speed, s)
        checks.append({"speedup": s, "vitprune": vp and vp["top1"], "vitprune_row": vp and f"{vp['method']}@{vp['target']:g}",
                       "vitprune_std": vp and vp["top1_std"], "tp": tpr and tpr["top1"],
                       "tp_row": tpr and f"tp_width@{tpr['target']:g}", "tp_std": tpr and tpr["top1_std"]})
    comparable = [c for c in checks if c["tp"] is not None]
    dominated = bool(comparable) and all(c["vitprune"] is not None and c["vitprune"] >= c["tp"] for c in comparable)
    at2 = next((c for c in checks if c["speedup"] == 2.0), None)
    gap2 = None if not at2 or at2["vitprune"] is None or at2["tp"] is None else at2["vitprune"] - at2["tp"]
    beyond = frontier_at(rows, VITPRUNE_METHODS, speed, (tp_max or 0) + 1e-6)
    return {"speed": speed, "checks": checks, "dominates_where_tp_reaches": dominated, "tp_max_speedup": tp_max,
            "gap_at_2x": gap2, "at2": at2, "beyond": beyond}


def method_goal(rows: list[dict], speed: str, ours: str, theirs: str, margin: float, speeds: str = "from2") -> dict:
    """Issue 10's goals: the frontier of row ``ours`` against row ``theirs`` — at 2× only (``speeds="at2"``)
    or at 2× and at every speedup ≥ 2× that either row reaches (``"from2"``) — must lead by ``margin`` points.
    A speedup where one of the two has no row that fast is listed but decides nothing."""
    floor2 = lambda x: math.floor(x * 100) / 100  # noqa: E731
    grid = {2.0}
    if speeds == "from2":
        grid |= {floor2(r[speed]) for r in rows if r["method"] in (ours, theirs) and (r.get(speed) or 0) >= 2.0}
    checks = []
    for s in sorted(grid):
        a, b = frontier_at(rows, (ours,), speed, s), frontier_at(rows, (theirs,), speed, s)
        delta = None if a is None or b is None else a["top1"] - b["top1"]
        checks.append({"speedup": s, "ours": a, "theirs": b, "delta": delta})
    decided = [c["delta"] for c in checks if c["delta"] is not None]
    return {"ours": ours, "theirs": theirs, "margin": margin, "speed": speed, "checks": checks,
            "met": bool(decided) and all(d >= margin for d in decided)}


def goal_lines(g: dict) -> list[str]:
    """A Markdown table of one :func:`method_goal` check and its verdict."""
    def cell(r: dict | None) -> str:
        return "no row this fast" if r is None else \
            f"{r['top1']:.2f}" + (f" ± {r['top1_std']:.2f}" if r.get("top1_std") else "") + \
            f" ({r['method']}@{r['target']:g}, {r[g['speed']]:.2f}×)"

    lines = [f"| speedup ≥ | {g['ours']} | {g['theirs']} | Δ points (goal ≥ +{g['margin']:g}) |",
             "|---:|---|---|---:|"]
    lines += [f"| {c['speedup']:.2f}× | {cell(c['ours'])} | {cell(c['theirs'])} | "
              + ("–" if c["delta"] is None else f"{c['delta']:+.2f}") + " |" for c in g["checks"]]
    lines += ["", f"- goal {g['ours']} ≥ {g['theirs']} + {g['margin']:g}: **{'met' if g['met'] else 'NOT met'}**"]
    return lines


def ascii_plot(rows: list[dict], speed: str, orig_top1: float, width: int = 64, height: int = 18) -> str:
    """A text scatter of top-1 vs speedup (one letter per method) for the Markdown report."""
    pts = [(r[speed], r["top1"], r["method"]) for r in rows if r.get(speed) is not None and r.get("top1") is not None]
    pts.append((1.0, orig_top1, "original"))
    letters = {m: c for m, c in zip(ALL_METHODS + ("original",), "TWBAXDPCKO")}
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    grid = [[" "] * width for _ in range(height)]
    for x, y, m in pts:
        i = int((y1 - y) / max(1e-9, y1 - y0) * (height - 1))
        j = int((x - x0) / max(1e-9, x1 - x0) * (width - 1))
        grid[i][j] = letters.get(m, "?") if grid[i][j] == " " else "*"
    lines = [f"{y1:6.1f} |" + "".join(grid[0])] + ["       |" + "".join(r) for r in grid[1:-1]]
    lines += [f"{y0:6.1f} |" + "".join(grid[-1]), "       +" + "-" * width,
              f"        {x0:.2f}×" + " " * (width - 14) + f"{x1:.2f}×   ({'DeiT-S 224' if speed != 'speedup' else 'base model'} ORT speedup)",
              "        " + "  ".join(f"{c}={m}" for m, c in letters.items()) + "  *=overlap"]
    return "\n".join(lines)


def _pm(v, sd, fmt):
    return "–" if v is None else f"{v:{fmt}}" + (f" ± {sd:{fmt}}" if sd is not None else "")


def table(state: dict, rows: list[dict]) -> str:
    orig = state["original"]
    head = ("| row | target | n | FLOPs ratio | params (K) | top-1 no FT | top-1 FT (mean ± std) | base ORT ms | "
            "base ORT speedup | DeiT-S FLOPs ratio | DeiT-S ORT ms | DeiT-S ORT speedup |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines.append(f"| original | – | – | 1.000 | {orig['params'] / 1e3:.0f} | – | {orig['top1']:.2f} | – | 1.00× | 1.000 | "
                 f"{_first_scaled_ms(state)} | 1.00× |")
    for r in rows:
        if r["status"] != "done":
            lines.append(f"| {r['method']} | {r['target']:g} | 0 | *{r['status']}*: {str(r.get('reason'))[:90]} "
                         "| | | | | | | | |")
            continue
        lines.append(
            f"| {r['method']} | {r['target']:g} | {r['n']} | {_pm(r['flops_ratio'], None, '.3f')} | "
            f"{r['params'] / 1e3:.0f} | {_pm(r['top1_pruned'], r['top1_pruned_std'], '.1f')} | "
            f"**{_pm(r['top1'], r['top1_std'], '.2f')}** | {_pm(r['latency_ms'], None, '.3f')} | "
            f"{_pm(r['speedup'], r['speedup_std'], '.2f')}× | {_pm(r.get('scaled_flops_ratio'), None, '.3f')} | "
            f"{_pm(r.get('scaled_latency_ms'), None, '.1f')} | "
            + (f"**{_pm(r.get('scaled_speedup'), r.get('scaled_speedup_std') or None, '.2f')}×** |"
               if r.get('scaled_speedup') else "– |"))
    return "\n".join(lines)


def _first_scaled_ms(state: dict) -> str:
    vals = [s["original_ms"] for s in state.get("scaled", {}).values()]
    return f"{sorted(vals)[len(vals) // 2]:.1f} (median of runs)" if vals else "–"


def verdict(c: dict, what: str) -> str:
    def cell(v, sd, row):
        return "none this fast" if v is None else f"{v:.2f}" + (f" ± {sd:.2f}" if sd else "") + f" ({row})"

    lines = [f"**{what}** (Torch-Pruning's fastest row: "
             + (f"{c['tp_max_speedup']:.2f}×)" if c["tp_max_speedup"] else "none)"), "",
             "| speedup ≥ | vitprune frontier (row) | Torch-Pruning frontier (row) | Δ points |", "|---:|---|---|---:|"]
    for ch in c["checks"]:
        delta = "" if ch["vitprune"] is None or ch["tp"] is None else f"{ch['vitprune'] - ch['tp']:+.2f}"
        lines.append(f"| {ch['speedup']:.2f}× | {cell(ch['vitprune'], ch['vitprune_std'], ch['vitprune_row'])} | "
                     f"{cell(ch['tp'], ch['tp_std'], ch['tp_row'])} | {delta} |")
    b = c.get("beyond")
    lines += ["", "- beyond Torch-Pruning's fastest row: vitprune's best is "
              + (f"{b['top1']:.2f} ({b['method']}@{b['target']:g}, {b[c['speed']]:.2f}×)" if b else "none")]
    lines.append(f"- vitprune ≥ Torch-Pruning at every speedup ≥ 1.5× where Torch-Pruning has a row: "
                 f"**{'yes' if c['dominates_where_tp_reaches'] else 'no'}**")
    if c["gap_at_2x"] is not None:
        lines.append(f"- at 2×: vitprune − Torch-Pruning = **{c['gap_at_2x']:+.2f}** points "
                     f"(goal ≥ +2: {'met' if c['gap_at_2x'] >= 2 else 'NOT met'})")
    else:
        lines.append("- at 2×: no comparison possible (a frontier has no row this fast)")
    return "\n".join(lines)


def write_md(state: dict, args: argparse.Namespace, settings: dict, base_record: dict, seconds: float,
             path: str, keep_from: str = RESULTS["md"]) -> None:
    """The report at ``path``; the ``<!-- reading -->`` section is taken from ``keep_from`` (the
    committed report) so a regenerated report keeps the hand-written reading."""
    rows = sw.summarize(state, ALL_METHODS)
    done = [r for r in rows if r["status"] == "done"]
    old = open(keep_from).read() if os.path.exists(keep_from) else ""
    m = re.search(r"<!-- reading -->.*?<!-- /reading -->", old, re.S)
    reading = m.group(0) if m else "<!-- reading -->\n(reading to be written after the run)\n<!-- /reading -->"
    mach = state["machine"]
    cmd = "python benchmarks/pareto.py " + " ".join(sys.argv[1:])
    cfg = state["config"]
    parts = [
        f"# Accuracy / ORT-speedup Pareto frontier ({settings['title']}, DeiT-Tiny-like base; DeiT-S 224 latency)", "",
        f"Generated by `{cmd}` on {datetime.date.today()}. Compute: base model {base_record['seconds']:.0f} s, "
        f"{len(state['points'])} points {sum(p.get('seconds', 0) for p in state['points'].values()) / 60:.1f} min "
        f"(sum of per-point wall time; the sweep resumes, so this may span several invocations; this one took "
        f"{seconds / 60:.1f} min).", "",
        f"Machine: {mach['platform']}, {mach['cpus']} CPU cores shared with other engineers' jobs (load average "
        f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())} over 1/5/15 min when this report was written), Python {mach['python']}, torch {mach['torch']}, ONNX Runtime {mach['onnxruntime']} "
        f"(CPUExecutionProvider, default optimisations), intra-op threads {cfg['threads']}, batch 1; base model: "
        + (f"median of {state['rebench']['runs']} runs with all {len(state['rebench']['points'])} points and the "
           f"original in one interleaved run" if state.get("rebench") else f"median of {cfg['runs']} interleaved runs")
        + "; DeiT-S: " + (f"median of {state['rescale']['runs']} runs with all {len(state['rescale']['archs'])} "
                          "distinct architectures and the original DeiT-S in one interleaved run"
                          if state.get("rescale") else
                          f"median of {cfg['scale_runs']} runs interleaved with the original DeiT-S") + ".", "",
        f"Base model: `VisionTransformer(img_size=32, patch_size={settings['patch_size']}, "
        f"embed_dim={settings['embed_dim']}, depth=6, "
        f"num_heads=3, num_classes=10)`, {state['original']['params'] / 1e6:.3f} M params, "
        f"{state['original']['flops'] / 1e6:.1f} MFLOPs; trained {base_record['epochs']} epochs "
        f"(AdamW lr {settings['base_lr']:g}, batch {settings['base_batch']}, label smoothing 0.1) on "
        f"{settings['train_subset'] or settings['train_images']} {settings['title']} images → **{base_record['top1']:.2f}%** test top-1 "
        f"({base_record['seconds']:.0f} s).", "",
        f"Same budget for every point: {cfg['epochs']} epoch(s) of distillation from the base model "
        f"(KL, T=1), AdamW lr {cfg['lr']}, batch {cfg['batch_size']}, cosine with warm-up; seeds "
        f"{list(cfg['seeds'])}; calibration: {cfg['calib_batches']} training batches per seed; vitprune "
        f"importance {cfg['importance']}, round_to {cfg['round_to']}; Torch-Pruning importance "
        f"{cfg['tp_importance']}. Targets {list(cfg['targets'])} (fraction of FLOPs kept).", "",
        "## Table", "",
        "`top-1 no FT`: right after pruning; `FT`: after the shared fine-tuning budget (test split, "
        f"{settings['test_images']:,} images, so one image = {100 / settings['test_images']:.2f} points). "
        "Speedups are base-model ORT latency ÷ compressed, measured interleaved in "
        "the same run; DeiT-S columns: the same architecture rebuilt on DeiT-S 224 (random weights), timed "
        "against DeiT-S in the same run; measured once per distinct architecture (no ± where both seeds gave "
        "the same architecture, e.g. l2 width plans do not depend on the seed).", "",
        table(state, rows), "",
        "## Plots", "",
        "PNG plot: [pareto.png](pareto.png) (DeiT-S speedup; every point in [pareto.json](pareto.json)); "
        "`sweep.png` in the run's `--out` folder has the base-model speedup. "
        "Text rendering (mean top-1 after fine-tuning vs speedup):", "",
        "```", ascii_plot(done, "scaled_speedup", state["original"]["top1"]) if any(r.get("scaled_speedup") for r in done)
        else "(no DeiT-S points)", "```", "",
        "```", ascii_plot(done, "speedup", state["original"]["top1"]), "```", "",
        "## Goal check (computed from the table)", "",
        "vitprune's frontier = best mean top-1 over all vitprune rows (width, attention, activation, BoundaryDPT, "
        "BoundaryDPT+, CP-ViT, combo) with at least the given speedup; Torch-Pruning's = the same over `tp_width`.", "",
        "### Issue 10's goals (DeiT-S 224 ORT speedup)", "",
        "BoundaryDPT+ against width-only at 2× and at every speedup ≥ 2× either row reaches (≥ +1 point), and "
        "against Torch-Pruning at 2× (≥ +2 points); each frontier is the row's best mean top-1 at least that fast.", "",
        *goal_lines(method_goal(done, "scaled_speedup", "boundarydpt+", "width", 1.0, "from2")), "",
        *goal_lines(method_goal(done, "scaled_speedup", "boundarydpt+", "tp_width", 2.0, "at2")), "",
        "### Every vitprune row against Torch-Pruning", "",
        verdict(compare_frontiers(done, "scaled_speedup"), "DeiT-S 224 ORT speedup"), "",
        verdict(compare_frontiers(done, "speedup"), "base-model (32×32) ORT speedup"), "",
        reading, "",
        "## Skipped / failed points", "",
    ]
    bad = [p for p in state["points"].values() if p["status"] != "done"]
    parts += [f"- `{p['key']}`: {p['status']}: {p.get('reason') or p.get('error')}" for p in bad] or ["none"]
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(parts) + "\n")
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pareto.py", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test (digits): 3 rows, 1 target, 1 seed, small budget")
    p.add_argument("--task", choices=sorted(TASKS), help="mosaic (default) or digits (default with --quick)")
    p.add_argument("--out", help="results folder (default: $TMPDIR/vitprune-pareto-<task>[-quick])")
    p.add_argument("--write-results", action="store_true",
                   help="also copy pareto.md/.json/.png into benchmarks/ (the committed results; needs the full "
                        f"kind of run: mosaic task, >= {MIN_SEEDS} seeds, DeiT-S latency)")
    p.add_argument("--targets", help="comma-separated FLOPs fractions")
    p.add_argument("--methods", help=f"comma-separated rows from {','.join(ALL_METHODS)}")
    p.add_argument("--seeds", help="comma-separated seeds")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs per point")
    p.add_argument("--base-epochs", type=int, help="base model training epochs")
    p.add_argument("--runs", type=int, help="ORT timed runs per point (base model)")
    p.add_argument("--no-scale", action="store_true", help="skip the DeiT-S 224 latency")
    p.add_argument("--no-md", action="store_true", help="do not write OUT/pareto.md")
    p.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (default 1)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch threads for training (default 1: measured 4x faster than 2 on the shared 2-core box)")
    p.add_argument("--rebench-runs", type=int, default=50,
                   help="re-time every point's base-model ONNX together in one interleaved run (0: keep pairwise)")
    p.add_argument("--rescale-runs", type=int, default=10,
                   help="re-time every distinct architecture rebuilt on DeiT-S together in one interleaved run "
                        "(0: keep the per-point pairs)")
    p.add_argument("--merge", action="append", default=[], metavar="DIR",
                   help="first copy in the points of another --out folder of the same sweep (same budget) that this "
                        "one lacks: a sweep split over processes (e.g. --methods per process) becomes one report; "
                        "repeatable")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        args.settings = settings_from(args)
    except ValueError as e:
        p.error(str(e))
    return args


def _csv(text: str, kind: type, what: str) -> tuple:
    try:
        return tuple(kind(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{what} must be comma-separated {kind.__name__}s, got {text!r}") from None


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings: the preset (full or --quick), the task's model and data, then the flags."""
    preset = QUICK if args.quick else FULL
    task = args.task or preset["task"]
    s = {**TASKS[task], "task": task, **{k: v for k, v in preset.items() if k != "task"}}
    if args.targets:
        s["targets"] = _csv(args.targets, float, "--targets")
    if args.methods:
        s["methods"] = _csv(args.methods, str, "--methods")
        unknown = [m for m in s["methods"] if m not in ALL_METHODS]
        if unknown:
            raise ValueError(f"--methods: unknown row(s) {','.join(unknown)}; choose from {','.join(ALL_METHODS)}")
    if args.seeds:
        s["seeds"] = _csv(args.seeds, int, "--seeds")
    for k in ("epochs", "base_epochs", "runs"):
        if getattr(args, k) is not None:
            s[k] = getattr(args, k)
    if args.no_scale:
        s["scale"] = False
    if args.write_results:
        if task != "mosaic" or len(set(s["seeds"])) < MIN_SEEDS or not s["scale"] or s["train_subset"] is not None:
            raise ValueError(f"--write-results writes the committed results: it needs --task mosaic, >= {MIN_SEEDS} "
                             "seeds, the DeiT-S latency (no --no-scale) and no --quick")
    return s


def default_out(s: dict[str, Any], quick: bool) -> str:
    """Outside the repository, and the same from any working directory."""
    return os.path.join(tempfile.gettempdir(), f"vitprune-pareto-{s['task']}" + ("-quick" if quick else ""))


def write_outputs(state: dict, args: argparse.Namespace, s: dict[str, Any], record: dict, seconds: float) -> None:
    """``OUT/pareto.{md,json,png}``; with ``--write-results`` also copied over the committed ones."""
    out = {ext: os.path.join(args.out, f"pareto.{ext}") for ext in RESULTS}
    plot_speed = "scaled_speedup" if s["scale"] else "speedup"
    where = "on DeiT-S 224" if s["scale"] else "(base model)"
    sw.plot_sweep(state, out["png"], methods=ALL_METHODS, speed=plot_speed,
                  title=f"top-1 ({s['title']}) vs ORT speedup of the same architecture {where}")
    with open(out["json"] + ".tmp", "w") as f:
        json.dump(results_json(state, s), f, indent=1)
        f.write("\n")
    os.replace(out["json"] + ".tmp", out["json"])
    if not args.no_md:
        write_md(state, args, s, record, seconds, out["md"])
    if args.write_results:
        for ext, path in RESULTS.items():
            if os.path.exists(out[ext]):
                shutil.copyfile(out[ext], path + ".tmp")
                os.replace(path + ".tmp", path)
                print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    s = args.settings
    args.out = os.path.abspath(args.out or default_out(s, args.quick))
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    torch.set_num_threads(args.torch_threads)  # 1: on a shared 2-core machine more threads spin and stall
    model, record = base_model(args.out, s)
    print(f"base model ({s['task']}): top-1 {record['top1']:.2f}% after {record['epochs']} epochs")
    train, test = data(s, 32)
    config = sw.SweepConfig(targets=s["targets"], methods=s["methods"], seeds=s["seeds"], epochs=s["epochs"],
                            lr=5e-4, batch_size=32, importance="l2", tp_importance="l2", round_to=8,
                            threads=args.threads, runs=s["runs"], warmup=3, scale_runs=8, scale_warmup=1,
                            progress=not args.no_progress)
    if args.merge:
        added = sw.merge_states(os.path.join(args.out, "sweep.json"),
                                [os.path.join(os.path.abspath(d), "sweep.json") for d in args.merge], config)
        print(f"merged {added} point(s) from {', '.join(args.merge)}")
    scale = None
    if s["scale"]:
        scale = sw.ScaleModel(SCALE_NAME, lambda: timm.create_model(SCALE_NAME, pretrained=False), (3, 224, 224))
    state = sw.run_sweep(model, train, test, config, args.out, input_size=(3, 32, 32), scale=scale)
    if args.rebench_runs:  # all base-model ONNX files in one interleaved run: same conditions for every point
        sw.rebench(state, args.out, runs=args.rebench_runs, warmup=5, threads=args.threads)
    if scale is not None and args.rescale_runs:  # the same for the DeiT-S speedups the goals are read from
        sw.rescale(state, args.out, model, (3, 32, 32), scale, config, runs=args.rescale_runs, warmup=2)
    sw.write_reports(state, args.out, ALL_METHODS)
    if s["scale"]:
        sw.plot_sweep(state, os.path.join(args.out, "sweep_deit_s.png"), methods=ALL_METHODS, speed="scaled_speedup",
                      title=f"top-1 ({s['title']}) vs ORT speedup of the same architecture on DeiT-S 224")
    state["base_record"] = record
    write_outputs(state, args, s, record, time.perf_counter() - t0)
    print(sw.format_markdown(state, ALL_METHODS))
    print(f"results in {args.out} ({time.perf_counter() - t0:.0f} s)")
    return state


if __name__ == "__main__":
    main()
