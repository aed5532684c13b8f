"""What a sweep state says: rows (mean ± std over seeds), the Pareto frontier, a Markdown table and
a plot (top-1 vs ORT speedup), written beside ``sweep.json`` as ``sweep.md`` and ``sweep.png``."""
from __future__ import annotations

import os
import statistics
from typing import Any, Sequence

from vitprune.deploy.outputs import atomic_write
from vitprune.sweep.config import METHODS

#: Quantities averaged over seeds, and those of the scaled measurement.
_MEASURED = ("flops_ratio", "params", "top1_pruned", "top1", "speedup", "latency_ms", "latency_p90_ms",
             "speedup_b32", "latency_ms_b32", "total_steps")
_SCALED = ("speedup", "flops_ratio", "latency_ms")


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    return statistics.fmean(present), (statistics.stdev(present) if len(present) > 1 else 0.0)


def _row(method: str, target: float, pts: list[dict[str, Any]]) -> dict[str, Any]:
    done = [p for p in pts if p["status"] == "done"]
    label = METHODS[method].label if method in METHODS else pts[0].get("label", method)  # presentation only
    row: dict[str, Any] = {"method": method, "label": label, "target": target,
                           "seeds": sorted(p["seed"] for p in done), "n": len(done)}
    if not done:
        row.update(status=pts[0]["status"], reason=pts[0].get("reason") or pts[0].get("error"))
        return row
    row["status"] = "done"
    for q in _MEASURED:
        row[q], row[q + "_std"] = _mean_std([p.get(q) for p in done])
    phases = sorted({k for p in done for k in (p.get("steps") or {})})
    if phases:  # the optimizer steps by phase (planning, fine-tune), mean over seeds
        row["steps"] = {k: statistics.fmean([(p.get("steps") or {}).get(k, 0) for p in done]) for k in phases}
    scaled = [p["scaled"] for p in done if p.get("scaled")]
    if scaled:
        for q in _SCALED:
            row["scaled_" + q], row["scaled_" + q + "_std"] = _mean_std([s[q] for s in scaled])
    return row


def summarize(state: dict[str, Any], methods: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per (method, target): mean ± std over seeds of every measured quantity."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for p in state["points"].values():
        if methods is None or p["method"] in methods:
            groups.setdefault((p["method"], p["target"]), []).append(p)
    rows = [_row(method, target, pts) for (method, target), pts in groups.items()]
    order = {m: i for i, m in enumerate(methods or sorted({r["method"] for r in rows}))}
    rows.sort(key=lambda r: (order.get(r["method"], 99), -r["target"]))
    return rows


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (speedup, top-1) that no other point beats in both (ties kept)."""
    front = []
    for i, (s, a) in enumerate(points):
        if not any((s2 >= s and a2 >= a) and (s2 > s or a2 > a) for j, (s2, a2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _pm(v: Any, sd: Any, fmt: str) -> str:
    if v is None:
        return "–"
    return f"{v:{fmt}}" + (f" ± {sd:{fmt}}" if sd else "")


def _cells(r: dict[str, Any], scaled: bool) -> list[str]:
    cells = [r["method"], f"{r['target']:g}", str(r["n"]), _pm(r["flops_ratio"], r["flops_ratio_std"], ".3f"),
             f"{r['params'] / 1e6:.3f}", _pm(r["top1_pruned"], r["top1_pruned_std"], ".2f"),
             _pm(r["top1"], r["top1_std"], ".2f"), _pm(r["latency_ms"], r["latency_ms_std"], ".3f"),
             _pm(r["speedup"], r["speedup_std"], ".2f") + "×"]
    if scaled:
        cells += [(_pm(r.get("scaled_speedup"), r.get("scaled_speedup_std"), ".2f") + "×")
                  if r.get("scaled_speedup") else "–",
                  _pm(r.get("scaled_flops_ratio"), None, ".3f")]
    return cells


def format_markdown(state: dict[str, Any], methods: Sequence[str] | None = None) -> str:
    """The sweep as a Markdown table: the original, then one row per (method, target)."""
    rows = summarize(state, methods)
    orig = state.get("original") or {}
    scaled = any("scaled_speedup" in r for r in rows)
    head = ["method", "target", "seeds", "FLOPs ratio", "params (M)", "top-1 pruned", "top-1 fine-tuned",
            "ORT ms", "ORT speedup"] + ([f"{state.get('scale_model')} speedup", "scaled FLOPs ratio"] if scaled else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", "---:"] + ["---:"] * (len(head) - 2)) + "|"]
    lines.append("| original | 1.0 | – | 1.000 | " + (f"{orig.get('params', 0) / 1e6:.3f}" if orig else "–") +
                 f" | – | {orig.get('top1', float('nan')):.2f} | – | 1.00× |" + (" 1.00× | 1.000 |" if scaled else ""))
    for r in rows:
        if r["status"] != "done":
            lines.append(f"| {r['method']} | {r['target']:g} | – | {r['status']}: {r.get('reason', '')[:120]} |"
                         + " |" * (len(head) - 4))
        else:
            lines.append("| " + " | ".join(_cells(r, scaled)) + " |")
    return "\n".join(lines)


def _draw(ax: Any, state: dict[str, Any], rows: list[dict[str, Any]], speed: str) -> None:
    """One errorbar line per method, the original as a star, the frontier over all points in red."""
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    for rs in by_method.values():
        rs.sort(key=lambda r: r[speed])
        ax.errorbar([r[speed] for r in rs], [r["top1"] for r in rs], yerr=[r["top1_std"] or 0 for r in rs],
                    xerr=[r.get(speed + "_std") or 0 for r in rs], marker="o", ms=4, capsize=2, lw=1.2,
                    label=rs[0]["label"])
    orig = state.get("original") or {}
    if orig.get("top1") is not None:
        ax.scatter([1.0], [orig["top1"]], marker="*", s=220, c="black", zorder=5, label="original")
    pts = [(r[speed], r["top1"]) for r in rows] + ([(1.0, orig["top1"])] if orig.get("top1") is not None else [])
    if pts:
        front = pareto_front(pts)
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], color="red", lw=3, alpha=0.35,
                zorder=1, label="Pareto frontier")


def plot_sweep(state: dict[str, Any], path: str, *, methods: Sequence[str] | None = None,
               speed: str = "speedup", title: str | None = None) -> None:
    """Top-1 vs ORT speedup (``speed="speedup"``: the swept model; ``"scaled_speedup"``: the scale
    model), one line per method (mean over seeds, std as error bars), the original marked, the Pareto
    frontier over all methods highlighted. Written atomically."""
    import matplotlib  # optional: only plotting needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summarize(state, methods) if r["status"] == "done" and r.get(speed)]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    try:
        _draw(ax, state, rows, speed)
        batch = speed.rsplit("_b", 1)[1] if "_b" in speed else "1"
        ax.set_xlabel(f"ONNX Runtime speedup (batch {batch})"
                      + (f", {state.get('scale_model')}" if speed.startswith("scaled") else ""))
        ax.set_ylabel("top-1 (%) after fine-tuning")
        ax.set_title(title or "accuracy vs ORT speedup")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    finally:
        plt.close(fig)


def write_text(path: str, text: str) -> None:
    """``text`` as UTF-8 at ``path``, atomically."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_reports(state: dict[str, Any], out_dir: str, methods: Sequence[str] | None = None) -> dict[str, str]:
    """``sweep.md`` and ``sweep.png`` from a sweep state."""
    md = os.path.join(out_dir, "sweep.md")
    png = os.path.join(out_dir, "sweep.png")
    write_text(md, "# vitprune sweep\n\n" + format_markdown(state, methods) + "\n")
    plot_sweep(state, png, methods=methods)
    return {"md": md, "png": png}
