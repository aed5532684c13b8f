"""The accuracy/speedup Pareto benchmark: every compression method under the same training budget.

1. Trains a base ViT (timm ``VisionTransformer``, depth 6, 3 heads, 10 classes) on a task bundled with
   an installed package (nothing downloaded) and caches it in ``OUT/base_<hash>.pt``. Tasks:

   ========= ==========================================================================================
   scatter   (default; the committed results) ``vitprune.train.mosaic`` on an 8×8 grid: 64×64 images
             of 64 cells, one scikit-learn digit (8×8, its own resolution) in a random cell of each
             quadrant, the other 60 cells uniform noise; class = decile of 1·d_tl + 2·d_tr + 3·d_bl +
             4·d_br. Base: patch 8, so **64 patch tokens** (+ the class token), each cell one token:
             attention must find the four digit tokens among 60 noise tokens and combine them, and it
             is a DeiT-like share of the FLOPs (65 tokens at width 96; DeiT-S has 197 at 384).
             20,000 train / 2,000 test mosaics from disjoint digit-image pools.
   mosaic    the earlier task (issue 10's results): 2×2 mosaics at 32×32, patch 16, **5 tokens**.
   digits    (the smoke test, ``--quick``) ``vitprune.train.digits``: 1,797 8×8 digits upsampled to
             32×32, 1,437 train / 360 test; base: patch 4.
   ========= ==========================================================================================

2. Sweeps the rows with :func:`vitprune.sweep.run_sweep` under **equal step budgets**: every point gets
   the same training data and the same total number of optimizer steps (batch 32, AdamW, lr 5e-4) —
   the method's own (the gated depth search, the joint planner's probes and its recovery between
   events: at most 40% of the budget) plus the fine-tune after pruning (distillation from the base
   model) — so a row that trains while it plans pays for it. Two budgets: ``short`` and ``long``
   (4× the steps; the research's claim is about recovery speed). Each point's split of its steps is
   in the results.

   ================== =============================================================================
   tp_width           Torch-Pruning's recommended timm ViT recipe (uniform ratio bisected to the target)
   width              vitprune width pruning (global ranking, heads/MLP/residual)
   blockdrop          naive depth: whole blocks dropped (defined here, see :func:`blockdrop`)
   attention          attention-branch removal only (one-shot scores)
   activation         activation removal only (fc2∘fc1 merged)
   boundarydpt        BoundaryDPT: both kinds, the gated search with the step budget
   boundarydpt+       the joint planner: depth and width moves priced after recovery (probes)
   boundarydpt+paper  BoundaryDPT+ as published: 5/12 of each kind by the gated search, then width
   cpvit              CP-ViT progressive token pruning
   combo              BoundaryDPT+ with a static CP-ViT token cut (keep 70% from block 2)
   ================== =============================================================================

3. Times every point's ONNX and the base model's **in one interleaved ONNX Runtime run** (1 thread) at
   batch 1 and batch 32, both budgets together (``--rebench-runs``). The goals are read on the
   benchmark's own model at batch 32 (``speedup``; ``speedup_b1`` beside it). ``--scale`` adds the
   earlier DeiT-S 224 mapping (every architecture rebuilt on DeiT-S, timed against it).

    python benchmarks/pareto.py --write-results   # the full benchmark; updates benchmarks/pareto.{md,json,png}
    python benchmarks/pareto.py --quick --out DIR # smoke test: digits, tiny budget, 3 rows, 1 seed
    python benchmarks/pareto.py --out A --base-only --torch-threads 2; mkdir B; cp A/base_*.pt B/
    python benchmarks/pareto.py --out A --budgets long --methods tp_width,width &        # one sweep on two
    python benchmarks/pareto.py --out B --budgets long --methods boundarydpt+; wait      # cores: a process
    python benchmarks/pareto.py --out A --merge B --write-results                        # per core, then one report

Every run writes only under ``--out`` (default ``$TMPDIR/vitprune-pareto-<task>[-quick]``):
``<budget>/sweep.json`` (every point of that budget, resumable), ``<budget>/sweep.{md,png}``, and
``pareto.md`` / ``pareto.json`` / ``pareto.png`` (the report; ``pareto.json`` has one schema, read by
other tools: ``{"task": {"name", "test_images", "tokens"}, "base_top1", "points": [{"method",
"target", "seed", "budget", "steps", "top1", "speedup", "speedup_b1"}]}``). Only ``--write-results``
copies those three into ``benchmarks/``, and only for the full kind of run (scatter task, ≥ 3 seeds,
the long budget). A ``<!-- reading -->`` … ``<!-- /reading -->`` section already in
``benchmarks/pareto.md`` is kept. Resumable: rerun the same command and only missing points are computed. Across sessions only
``base_*.pt`` and each ``<budget>/sweep.json`` need to be kept (``benchmarks/pareto_state/`` holds the
committed run's): a point's ONNX file, if gone, is exported again from its architecture rebuilt on the
base model before the interleaved timing (latency depends on the shapes only).

Block dropping: no vitprune pass removes a whole MLP (activation removal keeps a merged linear), so
``blockdrop`` is a plain module rewrite here: ``model.blocks`` becomes a ``Sequential`` of the kept
blocks; the blocks dropped are those whose single removal changes the output least (KL to the base
model's predictions on the calibration batches), as few as meet the FLOPs target.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import hashlib
import json
import os
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vitprune import sweep as sw  # noqa: E402
from vitprune.train.digits import digits_splits  # noqa: E402
from vitprune.train.mosaic import mosaic_splits  # noqa: E402
from vitprune.errors import PlanError  # noqa: E402
from vitprune.deps.flops import count_flops  # noqa: E402
from vitprune.train.finetune import FinetuneConfig, evaluate, finetune  # noqa: E402
import pareto_report as report  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = {ext: os.path.join(HERE, f"pareto.{ext}") for ext in ("md", "json", "png")}  # the committed results
MIN_SEEDS = 3  # committed results: mean ± std over at least this many seeds per point
ALL_METHODS = report.ALL_METHODS
DEPTH_METHODS = ("boundarydpt", "boundarydpt+", "boundarydpt+paper", "boundarydpt+pre")
SCALE_NAME = "deit_small_patch16_224"
BATCH = 32  # training and calibration batch, and the batch the goals' speedups are timed at
TIMED_BATCHES = (1, BATCH)

# the tasks: data, the base model's shape and its training budget (lr, batch, epochs)
TASKS = {
    "scatter": dict(title="scattered digit mosaics", image_size=64, grid=8, background=0.15, patch_size=8,
                    embed_dim=96, base_epochs=24, base_batch=64, base_lr=2e-3, train_images=20_000,
                    test_images=2_000),
    "mosaic": dict(title="digit mosaics", image_size=32, grid=2, background=0.0, patch_size=16, embed_dim=96,
                   base_epochs=12, base_batch=64, base_lr=2e-3, train_images=20_000, test_images=2_000),
    "digits": dict(title="digits", image_size=32, patch_size=4, embed_dim=96, base_epochs=40, base_batch=32,
                   base_lr=2e-3, train_images=1_437, test_images=360),
}
#: Optimizer steps per point (batch 32): the short budget is one pass over the 20,000 training
#: mosaics at most (625 steps); the long one is 4× it.
BUDGETS = {"short": 500, "long": 2000}
# the committed run: the rows issue 19's goals name, the targets where width reaches ≥ 2×, and one
# lower target for the depth rows (where depth may extend the frontier past width's fastest point)
FULL = dict(task="scatter", targets=(0.5, 0.35, 0.25), depth_targets=(0.15,),
            methods=("tp_width", "width", "boundarydpt", "boundarydpt+", "boundarydpt+paper", "cpvit", "tome"),
            seeds=(0, 1, 2), budgets=("short", "long"), steps=BUDGETS, train_subset=None, runs=30, scale=False)
QUICK = dict(task="digits", targets=(0.5,), depth_targets=(), methods=("tp_width", "width", "boundarydpt+"),
             seeds=(0,), budgets=("short",), steps={"short": 30, "long": 120}, base_epochs=10, embed_dim=48,
             train_subset=600, runs=10, scale=False)


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


# ---------------------------------------------------------------------------------------------- the pricing ablation
def joint_before_recovery(model: nn.Module, target: float, ctx: sw.PointContext) -> sw.Pruned:
    """The joint planner as the ``boundarydpt+`` row runs it (same events, same recovery between them),
    but pricing layer moves by their loss *before* recovery (``probe_steps=0``): the fine-tune gets the
    probes' steps instead. What recovery-aware pricing is worth, at the same total budget."""
    kw: dict[str, Any] = {"method": "boundarydpt+", "target_flops": target, "probe_steps": 0}
    trains = ctx.plan_steps > 0 and ctx.train is not None
    if trains:
        kw["search_steps"] = max(1, sw.probe_sizes(ctx.plan_steps)[1])
    return sw.compress_point(model, ctx, train=trains, **kw)


sw.register(sw.Method("boundarydpt+pre", "BoundaryDPT+ joint, priced before recovery (ablation)",
                      joint_before_recovery, sw.recipe_scale))


# ---------------------------------------------------------------------------------------------- base model
def make_model(s: dict[str, Any]) -> nn.Module:
    return VisionTransformer(img_size=s["image_size"], patch_size=s["patch_size"], embed_dim=s["embed_dim"], depth=6,
                             num_heads=3, num_classes=10)


def tokens(s: dict[str, Any]) -> int:
    """Patch tokens of the task's base model (the class token not counted)."""
    return (s["image_size"] // s["patch_size"]) ** 2


def data(s: dict[str, Any], batch_size: int, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """The task's (train, test) loaders; the data split is fixed (seed 0), ``seed`` only shuffles."""
    if s["task"] in ("scatter", "mosaic"):
        train_ds, test_ds = mosaic_splits(image_size=s["image_size"], train_size=s["train_images"],
                                          test_size=s["test_images"], grid=s["grid"], background=s["background"])
        train_ds, test_ds = train_ds.materialize(), test_ds.materialize()
    else:
        train_ds, test_ds = digits_splits(image_size=s["image_size"], seed=0)
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
    if s["task"] == "scatter":  # (the earlier tasks keep their cache keys)
        recipe += [s["image_size"], s["grid"], s["background"]]
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
              "curve": [round(e["top1"], 2) for e in hist["epochs"]], "threads": torch.get_num_threads()}
    fd, tmp = tempfile.mkstemp(dir=out, suffix=".pt.tmp")
    os.close(fd)
    torch.save({"state_dict": model.state_dict(), "record": record}, tmp)
    os.replace(tmp, path)
    return model.eval(), record


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pareto.py", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test (digits): 3 rows, 1 target, 1 seed, tiny budget")
    p.add_argument("--task", choices=sorted(TASKS), help="scatter (default), mosaic, or digits (default with --quick)")
    p.add_argument("--out", help="results folder (default: $TMPDIR/vitprune-pareto-<task>[-quick])")
    p.add_argument("--write-results", action="store_true",
                   help="also copy pareto.md/.json/.png into benchmarks/ (the committed results; needs the full "
                        f"kind of run: scatter task, >= {MIN_SEEDS} seeds, the long budget)")
    p.add_argument("--targets", help="comma-separated FLOPs fractions (every row)")
    p.add_argument("--depth-targets", help="comma-separated FLOPs fractions for the depth rows only ('' for none)")
    p.add_argument("--methods", help=f"comma-separated rows from {','.join(ALL_METHODS)}")
    p.add_argument("--seeds", help="comma-separated seeds")
    p.add_argument("--budgets", help="comma-separated budgets from short,long (default both)")
    p.add_argument("--base-epochs", type=int, help="base model training epochs")
    p.add_argument("--runs", type=int, help="ORT timed runs per point (pairwise, while sweeping)")
    p.add_argument("--scale", action="store_true", help="also time every architecture rebuilt on DeiT-S 224")
    p.add_argument("--no-md", action="store_true", help="do not write OUT/pareto.md")
    p.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (default 1)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch threads for training (default 1: measured 4x faster than 2 on the shared 2-core box)")
    p.add_argument("--rebench-runs", type=int, default=30,
                   help="re-time every point's ONNX of every budget and the base model's together in one "
                        "interleaved run at batch 1 and 32 (0: keep the pairwise batch-1 timings)")
    p.add_argument("--rescale-runs", type=int, default=10,
                   help="with --scale: re-time every distinct architecture rebuilt on DeiT-S together")
    p.add_argument("--merge", action="append", default=[], metavar="DIR",
                   help="first copy in the points of another --out folder of the same sweep (same budgets) that this "
                        "one lacks: a sweep split over processes (e.g. --methods per process) becomes one report; "
                        "repeatable")
    p.add_argument("--base-only", action="store_true",
                   help="train (or load) the base model into --out and stop: run this once before splitting a "
                        "sweep over processes, then copy OUT/base_*.pt into each process's --out")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        args.settings = settings_from(args)
    except ValueError as e:
        p.error(str(e))
    return args


def _csv(text: str, kind: type, what: str) -> tuple:
    try:
        return tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{what} must be comma-separated {kind.__name__}s, got {text!r}") from None


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings: the preset (full or --quick), the task's model and data, then the flags."""
    preset = QUICK if args.quick else FULL
    task = args.task or preset["task"]
    s = {**TASKS[task], "task": task, **{k: v for k, v in preset.items() if k != "task"}}
    if args.targets:
        s["targets"] = _csv(args.targets, float, "--targets")
    if args.depth_targets is not None:
        s["depth_targets"] = _csv(args.depth_targets, float, "--depth-targets")
    if args.methods:
        s["methods"] = _csv(args.methods, str, "--methods")
        unknown = [m for m in s["methods"] if m not in ALL_METHODS]
        if unknown:
            raise ValueError(f"--methods: unknown row(s) {','.join(unknown)}; choose from {','.join(ALL_METHODS)}")
    if args.seeds:
        s["seeds"] = _csv(args.seeds, int, "--seeds")
    if args.budgets:
        s["budgets"] = _csv(args.budgets, str, "--budgets")
        unknown = [b for b in s["budgets"] if b not in BUDGETS]
        if unknown or not s["budgets"]:
            raise ValueError(f"--budgets: choose from {','.join(BUDGETS)}, got {args.budgets!r}")
    for k in ("base_epochs", "runs"):
        if getattr(args, k) is not None:
            s[k] = getattr(args, k)
    s["scale"] = bool(args.scale)
    if args.write_results:
        if task != "scatter" or len(set(s["seeds"])) < MIN_SEEDS or "long" not in s["budgets"] \
                or s["train_subset"] is not None:
            raise ValueError(f"--write-results writes the committed results: it needs --task scatter, >= {MIN_SEEDS} "
                             "seeds, the long budget and no --quick")
    return s


def default_out(s: dict[str, Any], quick: bool) -> str:
    """Outside the repository, and the same from any working directory."""
    return os.path.join(tempfile.gettempdir(), f"vitprune-pareto-{s['task']}" + ("-quick" if quick else ""))


def sweep_config(s: dict[str, Any], budget: str, args: argparse.Namespace) -> sw.SweepConfig:
    """One budget's sweep: every row at ``s["targets"]`` (the depth rows' extra targets run apart)."""
    return sw.SweepConfig(targets=s["targets"], methods=s["methods"], seeds=s["seeds"], steps=s["steps"][budget],
                          label=budget, plan_share=0.4, lr=5e-4, batch_size=BATCH, importance="l2",
                          tp_importance="l2", round_to=8, threads=args.threads, runs=s["runs"], warmup=3,
                          scale_runs=8, scale_warmup=1, progress=not args.no_progress)


def run_budget(model: nn.Module, train: DataLoader, test: DataLoader, s: dict[str, Any], budget: str,
               args: argparse.Namespace, scale: sw.ScaleModel | None) -> dict[str, Any]:
    """Every point of one budget (resumed; ``--merge`` folders' points copied in first)."""
    out = os.path.join(args.out, budget)
    os.makedirs(out, exist_ok=True)
    config = sweep_config(s, budget, args)
    others = [os.path.join(os.path.abspath(d), budget, "sweep.json") for d in args.merge]
    if any(os.path.exists(o) for o in others):  # merge_states needs this folder's own sweep (its original)
        added = sw.merge_states(os.path.join(out, "sweep.json"), [o for o in others if os.path.exists(o)], config)
        print(f"{budget}: merged {added} point(s) from {', '.join(args.merge)}")
    size = (3, s["image_size"], s["image_size"])
    state = sw.run_sweep(model, train, test, config, out, input_size=size, scale=scale)
    depth_rows = tuple(m for m in s["methods"] if m in DEPTH_METHODS)
    if s["depth_targets"] and depth_rows:
        deeper = dataclasses.replace(config, targets=s["depth_targets"], methods=depth_rows)
        state = sw.run_sweep(model, train, test, deeper, out, input_size=size, scale=scale)
    return state


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    s = args.settings
    args.out = os.path.abspath(args.out or default_out(s, args.quick))
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    torch.set_num_threads(args.torch_threads)  # 1: on a shared 2-core machine more threads spin and stall
    model, record = base_model(args.out, s)
    print(f"base model ({s['task']}, {tokens(s)} patch tokens): top-1 {record['top1']:.2f}% after "
          f"{record['epochs']} epochs ({record['seconds']:.0f} s)")
    if args.base_only:
        return {}
    train, test = data(s, BATCH)
    scale = None
    if s["scale"]:
        scale = sw.ScaleModel(SCALE_NAME, lambda: timm.create_model(SCALE_NAME, pretrained=False), (3, 224, 224))
    states = {budget: run_budget(model, train, test, s, budget, args, scale) for budget in s["budgets"]}
    if args.rebench_runs:  # every ONNX of every budget in one interleaved run: same conditions for every point
        size = (3, s["image_size"], s["image_size"])
        sw.retime([(state, os.path.join(args.out, b)) for b, state in states.items()], runs=args.rebench_runs,
                  warmup=5, threads=args.threads, batch_sizes=TIMED_BATCHES,
                  rebuild=(model, size, sweep_config(s, s["budgets"][0], args)))
    for budget, state in states.items():
        if scale is not None and args.rescale_runs:
            sw.rescale(state, os.path.join(args.out, budget), model, (3, s["image_size"], s["image_size"]), scale,
                       sweep_config(s, budget, args), runs=args.rescale_runs, warmup=2)
        sw.write_reports(state, os.path.join(args.out, budget), ALL_METHODS)
    write_outputs(states, args, s, record, time.perf_counter() - t0)
    for budget, state in states.items():
        print(f"\n## {budget} budget\n" + sw.format_markdown(state, ALL_METHODS))
    print(f"results in {args.out} ({time.perf_counter() - t0:.0f} s)")
    return states


def write_outputs(states: dict[str, dict], args: argparse.Namespace, s: dict[str, Any], record: dict,
                  seconds: float) -> None:
    """``OUT/pareto.{md,json,png}``; with ``--write-results`` also copied over the committed ones."""
    out = {ext: os.path.join(args.out, f"pareto.{ext}") for ext in RESULTS}
    report.plot(states, out["png"], s)
    with open(out["json"] + ".tmp", "w") as f:
        json.dump(report.results_json(states, s, tokens(s)), f, indent=1)
        f.write("\n")
    os.replace(out["json"] + ".tmp", out["json"])
    if not args.no_md:
        command = "python benchmarks/pareto.py " + " ".join(sys.argv[1:])
        report.write_md(states, s, record, seconds, out["md"], command, keep_from=RESULTS["md"])
    if args.write_results:
        for ext, path in RESULTS.items():
            if os.path.exists(out[ext]):
                shutil.copyfile(out[ext], path + ".tmp")
                os.replace(path + ".tmp", path)
                print(f"wrote {path}")


if __name__ == "__main__":
    main()
