"""The Pareto benchmark's report: ``pareto.json`` (one schema), the goal checks, ``pareto.md`` and the plot.

Everything here reads sweep states (one per budget, ``{"short": state, "long": state}``) and writes
files; nothing trains or times. Speeds are the benchmark model's own ORT speedups: ``speedup_b32``
(batch 32, what the goals are read on) and ``speedup`` (batch 1), both from one interleaved run.
"""
from __future__ import annotations

import datetime
import math
import os
import re
from typing import Any, Sequence

from vitprune import sweep as sw

ALL_METHODS = ("tp_width", "width", "blockdrop", "attention", "activation", "boundarydpt", "boundarydpt+",
               "boundarydpt+paper", "boundarydpt+pre", "cpvit", "tome", "combo")
BDPT_PLUS = ("boundarydpt+", "boundarydpt+paper")
SPEED = "speedup_b32"  # the goals' speed: batch-32 ORT speedup of the benchmark model
LETTERS = dict(zip(ALL_METHODS + ("original",), "TWBAXDPQRCMKO"))


# ---------------------------------------------------------------------------------------------- pareto.json
def results_json(states: dict[str, dict], s: dict[str, Any], tokens: int) -> dict[str, Any]:
    """Every finished point of every budget in the schema other tools read::

        {"task": {"name", "test_images", "tokens"}, "base_top1",
         "points": [{"method", "target", "seed", "budget", "steps", "top1", "speedup", "speedup_b1"}]}

    ``speedup``: batch-32 ORT speedup of the benchmark model; ``speedup_b1``: batch 1 (None where a
    point was not re-timed at that batch: no number is made up); ``steps``: the point's optimizer steps."""
    points = []
    for budget, state in states.items():
        for p in state["points"].values():
            if p["status"] != "done":
                continue
            b32 = (p.get("by_batch") or {}).get("32", {}).get("speedup")
            b1 = (p.get("by_batch") or {}).get("1", {}).get("speedup")
            points.append({"method": p["method"], "target": p["target"], "seed": p["seed"], "budget": budget,
                           "steps": p.get("total_steps"), "top1": round(p["top1"], 3),
                           "speedup": None if b32 is None else round(b32, 4),
                           "speedup_b1": None if b1 is None else round(b1, 4)})
    order = {m: i for i, m in enumerate(ALL_METHODS)}
    points.sort(key=lambda p: (p["budget"] != "short", order.get(p["method"], 99), -p["target"], p["seed"]))
    base = next(iter(states.values()))["original"]["top1"]
    return {"task": {"name": s["task"], "test_images": s["test_images"], "tokens": tokens},
            "base_top1": round(base, 3), "points": points}


# ---------------------------------------------------------------------------------------------- goals
def frontier_at(rows: list[dict], methods: Sequence[str], speed: str, x: float) -> dict | None:
    """The row with the best mean top-1 among ``methods`` whose mean speedup is ≥ ``x`` (None: none)."""
    cands = [r for r in rows if r["method"] in methods and r.get(speed) is not None and r[speed] >= x - 1e-9]
    return max(cands, key=lambda r: r["top1"]) if cands else None


def _floor2(x: float) -> float:
    return math.floor(x * 100) / 100  # a grid point never exceeds its row's speedup


def lead(rows: list[dict], speed: str, ours: Sequence[str], theirs: Sequence[str], margin: float,
         grid: Sequence[float]) -> dict[str, Any]:
    """The frontier of ``ours`` against that of ``theirs`` at each speedup of ``grid``: met when every
    speedup where both have a row that fast shows a lead of at least ``margin`` points."""
    checks = []
    for x in sorted(set(grid)):
        a, b = frontier_at(rows, ours, speed, x), frontier_at(rows, theirs, speed, x)
        checks.append({"speedup": x, "ours": a, "theirs": b,
                       "delta": None if a is None or b is None else a["top1"] - b["top1"]})
    decided = [c["delta"] for c in checks if c["delta"] is not None]
    return {"ours": "/".join(ours), "theirs": "/".join(theirs), "margin": margin, "speed": speed,
            "checks": checks, "met": bool(decided) and all(d >= margin for d in decided)}


def width_grid(rows: list[dict], speed: str, least: float = 2.0) -> list[float]:
    """Every speedup ≥ ``least`` that a width-only row reaches (and ``least`` itself)."""
    return [least] + [_floor2(r[speed]) for r in rows if r["method"] == "width" and (r.get(speed) or 0) >= least]


def depth_extends(rows: list[dict], speed: str, ours: Sequence[str], factor: float = 1.5,
                  within: float = 3.0) -> dict[str, Any]:
    """Some row of ``ours`` at least ``factor``× as fast as the fastest width-only row, and within
    ``within`` points of that row's top-1."""
    width = [r for r in rows if r["method"] == "width" and r.get(speed)]
    if not width:
        return {"met": False, "fastest_width": None, "best": None, "need_speedup": None}
    fastest = max(width, key=lambda r: r[speed])
    need = factor * fastest[speed]
    fast = [r for r in rows if r["method"] in ours and (r.get(speed) or 0) >= need]
    best = max(fast, key=lambda r: r["top1"]) if fast else None
    return {"met": best is not None and best["top1"] >= fastest["top1"] - within, "fastest_width": fastest,
            "best": best, "need_speedup": need, "factor": factor, "within": within}


def goals(rows: list[dict], speed: str = SPEED) -> dict[str, Any]:
    """Issue 19's three goals on one budget's rows (the better BoundaryDPT+ row of the two)."""
    by_row = {m: lead(rows, speed, (m,), ("width",), 1.0, width_grid(rows, speed)) for m in BDPT_PLUS}
    better = max(BDPT_PLUS, key=lambda m: (by_row[m]["met"], sum(c["delta"] or 0 for c in by_row[m]["checks"])))
    return {"over_width": by_row, "better": better,
            "over_tp": {m: lead(rows, speed, (m,), ("tp_width",), 1.0, [2.0]) for m in BDPT_PLUS},
            "extends": {m: depth_extends(rows, speed, (m,)) for m in BDPT_PLUS}}


# ---------------------------------------------------------------------------------------------- markdown
def _pm(v: Any, sd: Any, fmt: str) -> str:
    return "–" if v is None else f"{v:{fmt}}" + (f" ± {sd:{fmt}}" if sd else "")


def _cell(r: dict | None, speed: str) -> str:
    if r is None:
        return "no row this fast"
    return f"{r['top1']:.2f}" + (f" ± {r['top1_std']:.2f}" if r.get("top1_std") else "") + \
        f" ({r['method']}@{r['target']:g}, {r[speed]:.2f}×)"


def lead_lines(g: dict) -> list[str]:
    lines = [f"| speedup ≥ | {g['ours']} | {g['theirs']} | Δ points (goal ≥ +{g['margin']:g}) |", "|---:|---|---|---:|"]
    lines += [f"| {c['speedup']:.2f}× | {_cell(c['ours'], g['speed'])} | {_cell(c['theirs'], g['speed'])} | "
              + ("–" if c["delta"] is None else f"{c['delta']:+.2f}") + " |" for c in g["checks"]]
    return lines + ["", f"- {g['ours']} ≥ {g['theirs']} + {g['margin']:g}: **{'met' if g['met'] else 'NOT met'}**"]


def extends_lines(m: str, e: dict) -> list[str]:
    w = e["fastest_width"]
    if w is None:
        return [f"- {m}: no width-only row to compare with"]
    head = (f"- {m}: fastest width-only point {_cell(w, SPEED)}; needs a point ≥ {e['need_speedup']:.2f}× "
            f"with top-1 ≥ {w['top1'] - e['within']:.2f}: ")
    best = e["best"]
    return [head + ("none that fast" if best is None else _cell(best, SPEED))
            + f" → **{'met' if e['met'] else 'NOT met'}**"]


def _steps(r: dict) -> str:
    steps = r.get("steps") or {}
    return " + ".join(f"{k} {v:.0f}" for k, v in steps.items() if v) or "–"


def table(state: dict, rows: list[dict]) -> str:
    orig = state["original"]
    lines = ["| row | target | n | FLOPs ratio | params (K) | top-1 no FT | top-1 (mean ± std) | steps (planning + "
             "fine-tune) | speedup b1 | speedup b32 |", "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
             f"| original | – | – | 1.000 | {orig['params'] / 1e3:.0f} | – | {orig['top1']:.2f} | – | 1.00× | 1.00× |"]
    for r in rows:
        if r["status"] != "done":
            lines.append(f"| {r['method']} | {r['target']:g} | 0 | *{r['status']}*: {str(r.get('reason'))[:90]} "
                         "| | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['target']:g} | {r['n']} | {_pm(r['flops_ratio'], None, '.3f')} | "
                     f"{r['params'] / 1e3:.0f} | {_pm(r['top1_pruned'], r['top1_pruned_std'], '.1f')} | "
                     f"**{_pm(r['top1'], r['top1_std'], '.2f')}** | {_steps(r)} | "
                     f"{_pm(r.get('speedup'), r.get('speedup_std'), '.2f')}× | "
                     f"**{_pm(r.get(SPEED), r.get(SPEED + '_std'), '.2f')}×** |")
    return "\n".join(lines)


def ascii_plot(rows: list[dict], speed: str, orig_top1: float, width: int = 64, height: int = 16) -> str:
    """A text scatter of mean top-1 vs speedup (one letter per method) for the Markdown report."""
    pts = [(r[speed], r["top1"], r["method"]) for r in rows if r.get(speed) is not None and r.get("top1") is not None]
    pts.append((1.0, orig_top1, "original"))
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    grid = [[" "] * width for _ in range(height)]
    for x, y, m in pts:
        i = int((y1 - y) / max(1e-9, y1 - y0) * (height - 1))
        j = int((x - x0) / max(1e-9, x1 - x0) * (width - 1))
        grid[i][j] = LETTERS.get(m, "?") if grid[i][j] == " " else "*"
    lines = [f"{y1:6.1f} |" + "".join(grid[0])] + ["       |" + "".join(r) for r in grid[1:-1]]
    lines += [f"{y0:6.1f} |" + "".join(grid[-1]), "       +" + "-" * width,
              f"        {x0:.2f}×" + " " * (width - 14) + f"{x1:.2f}×   (ORT speedup, batch 32)",
              "        " + "  ".join(f"{c}={m}" for m, c in LETTERS.items()) + "  *=overlap"]
    return "\n".join(lines)


def goal_section(rows: list[dict]) -> list[str]:
    g = goals(rows)
    out = ["Each frontier is a row's best mean top-1 (3 seeds) at or above a speedup (batch-32 ORT, the benchmark "
           "model).", "", "**1. The better BoundaryDPT+ row ≥ width-only + 1 at every speedup ≥ 2× that width "
           "reaches**", ""]
    for m in BDPT_PLUS:
        out += lead_lines(g["over_width"][m]) + [""]
    out += ["**2. ≥ Torch-Pruning + 1 at 2×**", ""]
    for m in BDPT_PLUS:
        out += lead_lines(g["over_tp"][m]) + [""]
    out += ["**3. Depth extends the frontier**: a BoundaryDPT+ point ≥ 1.5× as fast as the fastest width-only "
            "point, within 3 points of its top-1", ""]
    for m in BDPT_PLUS:
        out += extends_lines(m, g["extends"][m])
    return out + [""]


def write_md(states: dict[str, dict], s: dict[str, Any], record: dict, seconds: float, path: str, command: str,
             keep_from: str) -> None:
    """The report at ``path``; the ``<!-- reading -->`` section is taken from ``keep_from`` (the
    committed report) so a regenerated report keeps the hand-written reading."""
    old = open(keep_from).read() if os.path.exists(keep_from) else ""
    m = re.search(r"<!-- reading -->.*?<!-- /reading -->", old, re.S)
    reading = m.group(0) if m else "<!-- reading -->\n(reading to be written after the run)\n<!-- /reading -->"
    first = next(iter(states.values()))
    mach, orig = first["machine"], first["original"]
    tokens = (s["image_size"] // s["patch_size"]) ** 2
    rb = first.get("rebench") or {}
    parts = [
        f"# Accuracy / ORT-speedup Pareto frontier ({s['title']}, {tokens} patch tokens; equal step budgets)", "",
        f"Generated by `{command}` on {datetime.date.today()}. Compute: base model {record['seconds']:.0f} s "
        f"({record.get('threads', 1)} torch thread(s)), points "
        + ", ".join(f"{b} {sum(p.get('seconds', 0) for p in st['points'].values()) / 60:.1f} min"
                    for b, st in states.items())
        + f" (sum of per-point wall time over every invocation; this one took {seconds / 60:.1f} min).", "",
        f"Machine: {mach['platform']}, {mach['cpus']} CPU cores shared with other jobs, Python {mach['python']}, "
        f"torch {mach['torch']}, ONNX Runtime {mach['onnxruntime']} (CPUExecutionProvider, 1 intra-op thread). "
        + (f"Speedups: median of {rb['runs']} runs, every point of every budget and the base model in one "
           f"interleaved run per batch size ({', '.join(map(str, rb.get('batch_sizes', [1])))})."
           if rb else "Speedups: pairwise batch-1 timings only (not re-timed together)."), "",
        f"Base model: `VisionTransformer(img_size={s['image_size']}, patch_size={s['patch_size']}, "
        f"embed_dim={s['embed_dim']}, depth=6, num_heads=3, num_classes=10)`, {orig['params'] / 1e6:.3f} M params, "
        f"{orig['flops'] / 1e6:.1f} MFLOPs; trained {record['epochs']} epochs (AdamW lr {s['base_lr']:g}, batch "
        f"{s['base_batch']}, label smoothing 0.1) → **{record['top1']:.2f}%** test top-1 "
        f"({s['test_images']:,} test images: one image = {100 / s['test_images']:.2f} points).", "",
    ]
    for budget, state in states.items():
        cfg = state["config"]
        rows = sw.summarize(state, ALL_METHODS)
        done = [r for r in rows if r["status"] == "done"]
        parts += [f"## {budget.capitalize()} budget: {cfg['steps']} optimizer steps per point", "",
                  f"Every point: {cfg['steps']} steps at batch {cfg['batch_size']} (AdamW lr {cfg['lr']}); a row "
                  f"that trains while it plans spends at most {cfg['plan_share']:.0%} of them there, the "
                  "fine-tune after pruning (distillation, KL at T=1) gets the rest. Seeds "
                  f"{sorted({p['seed'] for p in state['points'].values()})}; calibration {cfg['calib_batches']} "
                  f"training batches per seed.", "", table(state, rows), "", "```",
                  ascii_plot(done, SPEED, state["original"]["top1"]) if any(r.get(SPEED) for r in done)
                  else "(no batch-32 timings yet)", "```", ""]
        if budget == "long" and any(r.get(SPEED) for r in done):
            parts += ["### Goals (long budget)", ""] + goal_section(done)
        elif budget == "short":
            parts += ["(No goal is read on the short budget.)", ""]
    parts += [reading, "", "## Skipped / failed points", ""]
    bad = [(b, p) for b, st in states.items() for p in st["points"].values() if p["status"] != "done"]
    parts += [f"- {b} `{p['key']}`: {p['status']}: {p.get('reason') or p.get('error')}" for b, p in bad] or ["none"]
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(parts) + "\n")
    os.replace(path + ".tmp", path)


def plot(states: dict[str, dict], path: str, s: dict[str, Any]) -> None:
    """Top-1 vs batch-32 ORT speedup of the longest budget that has timings (batch 1 when none)."""
    budget = "long" if "long" in states else next(iter(states))
    state = states[budget]
    speed = SPEED if any(p.get(SPEED) for p in state["points"].values()) else "speedup"
    sw.plot_sweep(state, path, methods=ALL_METHODS, speed=speed,
                  title=f"top-1 ({s['title']}, {budget} budget) vs ORT speedup")
