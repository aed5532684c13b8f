"""Running the sweep: every method × target × seed, each point measured the same way.

For each point::

    prune (method registry) → top-1 before recovery → fine-tune (the same budget for every method,
    distillation from the original) → top-1 → ONNX export → ORT latency interleaved with the
    original's ONNX in the same run (speedup = original median / point median)

and, with a :class:`ScaleModel`, the same architecture rebuilt on it and timed against it. A point
that cannot be planned (a :class:`PlanError`) is recorded as ``skipped``; any other failure as
``error`` with its traceback: one broken point must not end a long sweep.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
import re
import sys
import time
import traceback
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from vitprune.deploy.bench import compare
from vitprune.deploy.onnx import export_onnx
from vitprune.deps.flops import count_flops, count_params
from vitprune.errors import InputError, PlanError
from vitprune.plan.stages import copy_teacher
from vitprune.sweep.config import METHODS, PointContext, Pruned, ScaleModel, SweepConfig
from vitprune.sweep.report import write_reports
from vitprune.sweep.scaling import rebuild as rebuild_arch
from vitprune.sweep.state import arch_key, jsonable, load_state, new_state, point_key, save_state
from vitprune.train.finetune import FinetuneConfig, evaluate, finetune

#: Batch size for calibration batches drawn from a bare dataset (a DataLoader keeps its own).
_CALIB_BATCH = 32
#: The latency columns of a point (and of a scaled architecture), kept under "pairwise" when
#: :func:`rebench` (:func:`rescale`) re-times it.
_LATENCY = ("original_ms", "latency_ms", "latency_p90_ms", "speedup")


def _as_loader(data: Any, batch_size: int, shuffle: bool) -> Any:
    """Datasets become DataLoaders (evaluation iterates batches); DataLoaders pass through."""
    if isinstance(data, Dataset) and not isinstance(data, DataLoader):
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle,
                          generator=torch.Generator().manual_seed(0) if shuffle else None)
    return data


def _calibration(train_data: Any, n: int, seed: int) -> list:
    """``n`` shuffled (images, labels) batches from the training data, fixed by ``seed``."""
    dataset = train_data.dataset if isinstance(train_data, DataLoader) else train_data
    bs = train_data.batch_size if isinstance(train_data, DataLoader) and train_data.batch_size else _CALIB_BATCH
    loader = DataLoader(dataset, batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(seed))
    return [(images, labels) for images, labels in itertools.islice(loader, n)]


def _step_dataset(train_data: Any, n: int, seed: int) -> Subset:
    """``n`` samples of the training data, drawn epoch by epoch without replacement (a seeded
    permutation of the whole set, then another): a fine-tune of one pass over it takes exactly
    ``n / batch`` optimizer steps however large the data set is."""
    dataset = train_data.dataset if isinstance(train_data, DataLoader) else train_data
    g = torch.Generator().manual_seed(seed)
    rounds = -(-n // len(dataset))
    order = torch.cat([torch.randperm(len(dataset), generator=g) for _ in range(rounds)])[:n]
    return Subset(dataset, order.tolist())


def _file_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", key)


class _Sweep:
    """One invocation: the state (loaded or new), the models and data, and how each point is run."""

    def __init__(self, model: nn.Module, train_data: Any, val_data: Any, config: SweepConfig, out_dir: str,
                 input_size: tuple[int, int, int], scale: ScaleModel | None, source: dict | None,
                 on_point: Callable[[dict], None] | None) -> None:
        self.model, self.train, self.val, self.cfg = model.eval(), train_data, val_data, config
        self.out, self.size, self.scale, self.source, self.on_point = out_dir, tuple(input_size), scale, source, on_point
        self.path = os.path.join(out_dir, "sweep.json")
        self.onnx_dir = os.path.join(out_dir, "onnx")
        self.state = load_state(self.path, config) or new_state(config, self.size, scale.name if scale else None)
        os.makedirs(self.onnx_dir, exist_ok=True)  # after the record is accepted: a refusal creates nothing

    def _save(self) -> None:
        save_state(self.path, self.state)

    def _timed(self, model: nn.Module, x: torch.Tensor, path: str, base_onnx: str, runs: int,
               warmup: int) -> list[dict[str, Any]]:
        """Export ``model`` to ``path`` and time it interleaved with ``base_onnx``: [base row, its row]."""
        export_onnx(model.eval(), x, path, parity_batches=(1,))
        return compare([base_onnx, path], batch_sizes=(1,), threads=self.cfg.threads, runs=runs, warmup=warmup)

    # -- original -------------------------------------------------------------------------------
    def original(self) -> dict[str, Any]:
        """Top-1, FLOPs, params and ONNX of the swept model (computed once per output folder)."""
        path = os.path.join(self.onnx_dir, "original.onnx")
        if self.state.get("original") is None or not os.path.exists(path):
            x = torch.zeros(1, *self.size)
            export_onnx(self.model, x, path, parity_batches=(1,))
            self.state["original"] = {"top1": evaluate(self.model, self.val), "flops": count_flops(self.model, x),
                                      "params": count_params(self.model), "onnx": path}
            self._save()
        return self.state["original"]

    # -- one point ------------------------------------------------------------------------------
    def run_point(self, method: str, target: float, seed: int) -> dict[str, Any]:
        """Prune, evaluate, fine-tune, evaluate, time; failures are recorded, never raised."""
        rec: dict[str, Any] = {"key": point_key(method, target, seed), "method": method,
                               "label": METHODS[method].label, "target": target, "seed": seed}
        t0 = time.perf_counter()
        try:
            self._point(rec, t0)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # recorded, not fatal: one broken point must not end a long sweep
            rec.update(status="error", error=f"{type(e).__name__}: {' '.join(str(e).split())[:500]}",
                       traceback=traceback.format_exc(limit=6)[-2000:])
        finally:
            rec["seconds"] = round(time.perf_counter() - t0, 2)
        return rec

    def _point(self, rec: dict[str, Any], t0: float) -> None:
        method, seed = rec["method"], rec["seed"]
        torch.manual_seed(seed)
        ctx = PointContext(self.size, seed, _calibration(self.train, self.cfg.calib_batches, seed), self.cfg,
                           self.source, train=self._stream(seed) if self.cfg.plan_steps else None,
                           plan_steps=self.cfg.plan_steps)
        try:
            pruned = METHODS[method].prune(copy.deepcopy(self.model), rec["target"], ctx)
        except PlanError as e:
            rec.update(status="skipped", reason=" ".join(str(e).split()))
            return
        self._describe(rec, pruned, t0)
        student = pruned.model
        rec["top1_pruned"] = evaluate(student, self.val)
        finetune_steps = self._account(rec, pruned)
        if finetune_steps > 0:
            self._recover(rec, student, seed, finetune_steps)
        rec["top1"] = evaluate(student, self.val)
        x = torch.zeros(1, *self.size)
        path = os.path.join(self.onnx_dir, _file_name(rec["key"]) + ".onnx")
        rows = self._timed(student, x, path, self.state["original"]["onnx"], self.cfg.runs, self.cfg.warmup)
        rec.update(original_ms=rows[0]["median_ms"], latency_ms=rows[1]["median_ms"],
                   latency_p90_ms=rows[1]["p90_ms"], original_p90_ms=rows[0]["p90_ms"],
                   speedup=rows[1]["speedup"], onnx=path)
        if self.scale is not None and METHODS[method].scale is not None:
            rec["scaled"] = self.scaled(method, pruned.arch)
        rec["status"] = "done"

    def _describe(self, rec: dict[str, Any], pruned: Pruned, t0: float) -> None:
        """FLOPs, params and architecture of the pruned model, relative to the original."""
        orig = self.state["original"]
        flops, params = count_flops(pruned.model, torch.zeros(1, *self.size)), count_params(pruned.model)
        rec.update(flops=flops, flops_ratio=flops / orig["flops"], params=params,
                   params_ratio=params / orig["params"], arch=pruned.arch,
                   info=json.loads(json.dumps(pruned.info, default=jsonable)),
                   compile_seconds=round(time.perf_counter() - t0, 2))

    def _stream(self, seed: int) -> Any:
        """The training data a planner trains on: shuffled batches, the order fixed by ``seed``."""
        dataset = self.train.dataset if isinstance(self.train, DataLoader) else self.train
        return DataLoader(dataset, batch_size=self.cfg.batch_size, shuffle=True, drop_last=True,
                          generator=torch.Generator().manual_seed(seed))

    def _account(self, rec: dict[str, Any], pruned: Pruned) -> int:
        """The point's optimizer steps by phase (``rec["steps"]``, the planner's and the fine-tune's,
        adding up to the budget); returns the fine-tune's share: the budget less what planning took
        (``epochs`` of the training data without a step budget)."""
        planned = {k: int(v) for k, v in (pruned.info.get("train_steps") or {}).items()}
        if self.cfg.steps is None:
            per_epoch = len(_as_loader(self.train, self.cfg.batch_size, shuffle=True))
            rec["steps"] = {**planned, "finetune": self.cfg.epochs * per_epoch}
        else:
            left = self.cfg.steps - sum(planned.values())
            if left < 0:
                raise RuntimeError(f"{rec['method']} planned with {sum(planned.values())} optimizer steps, "
                                   f"more than the point's budget of {self.cfg.steps}")
            rec["steps"] = {**planned, "finetune": left}
        rec["total_steps"] = sum(rec["steps"].values())
        return rec["steps"]["finetune"]

    def _recover(self, rec: dict[str, Any], student: nn.Module, seed: int, steps: int) -> None:
        """The fine-tune after pruning: ``steps`` of distillation from a frozen copy of the original
        (``epochs`` over the training data without a step budget)."""
        t1 = time.perf_counter()
        data, epochs = self.train, self.cfg.epochs
        if self.cfg.steps is not None:  # exactly `steps` batches: one pass over a seeded draw of the data
            data, epochs = _step_dataset(self.train, steps * self.cfg.batch_size, seed), 1
        hist = finetune(student, copy_teacher(self.model), data, self.val, FinetuneConfig(
            epochs=epochs, lr=self.cfg.lr, batch_size=self.cfg.batch_size, seed=seed,
            kd_weight=self.cfg.kd_weight, label_weight=self.cfg.label_weight,
            warmup_epochs=min(1.0, epochs * 0.2), progress=False))
        rec["finetune_seconds"] = round(time.perf_counter() - t1, 2)
        rec["finetune_steps_taken"] = hist["steps_per_epoch"] * len(hist["epochs"])
        rec["history"] = [{"epoch": e["epoch"], "loss": e["loss"], "top1": e["top1"]} for e in hist["epochs"]]

    # -- the scale model ------------------------------------------------------------------------
    def scaled(self, method: str, arch: dict[str, Any]) -> dict[str, Any]:
        """Latency of ``arch`` rebuilt on the scale model (cached by architecture: seeds share it)."""
        akey = f"{method}:{arch_key(arch)}"
        cached = self.state["scaled"].get(akey)
        if cached is not None:
            return dict(cached, arch_key=akey)
        scale, base = self.scale, self._scale_base()
        x = torch.zeros(1, *scale.input_size)
        dst = METHODS[method].scale(arch, self.model, self.size, scale.factory().eval(), scale.input_size, self.cfg)
        path = os.path.join(self.onnx_dir, f"scaled_{_file_name(akey)}.onnx")
        rows = self._timed(dst, x, path, base["onnx"], self.cfg.scale_runs, self.cfg.scale_warmup)
        entry = {"model": scale.name, "flops_ratio": count_flops(dst, x) / base["flops"],
                 "params": count_params(dst), "original_ms": rows[0]["median_ms"],
                 "latency_ms": rows[1]["median_ms"], "latency_p90_ms": rows[1]["p90_ms"],
                 "speedup": rows[1]["speedup"]}
        self.state["scaled"][akey] = entry
        os.remove(path)  # large; the numbers are what matter
        return dict(entry, arch_key=akey)

    def _scale_base(self) -> dict[str, Any]:
        path = os.path.join(self.onnx_dir, "scale_original.onnx")
        info = self.state.get("scale_original")
        if info is None or not os.path.exists(path):
            m = self.scale.factory().eval()
            x = torch.zeros(1, *self.scale.input_size)
            export_onnx(m, x, path, parity_batches=(1,))
            info = {"model": self.scale.name, "flops": count_flops(m, x), "params": count_params(m), "onnx": path}
            self.state["scale_original"] = info
        return info

    # -- all points -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Every point not already in the state, saved after each; then the reports."""
        self.original()
        self.state["config"] = dataclasses.asdict(self.cfg)  # what this invocation swept (budget unchanged)
        todo = [(m, t, s) for m in self.cfg.methods for t in self.cfg.targets for s in self.cfg.seeds]
        self.state["computed"] = []
        with tqdm(total=len(todo), desc="sweep", unit="point", disable=not self.cfg.progress, file=sys.stderr,
                  dynamic_ncols=True) as bar:
            for method, target, seed in todo:
                key = point_key(method, target, seed)
                bar.set_postfix_str(key)
                if key not in self.state["points"]:
                    rec = self._record(self.run_point(method, target, seed))
                    if rec["status"] != "done":
                        bar.write(f"{key}: {rec['status']}: {rec.get('reason') or rec.get('error')}")
                bar.update(1)
        self._save()
        write_reports(self.state, self.out)
        return self.state

    def _record(self, rec: dict[str, Any]) -> dict[str, Any]:
        self.state["points"][rec["key"]] = rec
        self.state["computed"].append(rec["key"])
        self._save()
        if self.on_point is not None:
            self.on_point(rec)
        return rec


def run_sweep(model: nn.Module, train_data: Any, val_data: Any, config: SweepConfig | None = None,
              out_dir: str | os.PathLike = "sweep", *, input_size: tuple[int, int, int],
              scale: ScaleModel | None = None, source: dict | None = None,
              on_point: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the sweep; returns the ``sweep.json`` content. ``state["computed"]`` lists the
    points this call computed (empty when everything was already there)."""
    config = config or SweepConfig()
    if val_data is None:
        raise InputError("the sweep needs validation data (DIR/val) to measure top-1")
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"--out {out_dir} is a file; the sweep writes a folder there (sweep.json, onnx/, ...)")
    val_data = _as_loader(val_data, config.batch_size, shuffle=False)
    train_data = _as_loader(train_data, config.batch_size, shuffle=True)
    return _Sweep(model, train_data, val_data, config, out_dir, input_size, scale, source, on_point).run()


def rebench(state: dict[str, Any], out_dir: str | os.PathLike, *, runs: int = 50, warmup: int = 5,
            threads: int = 1, batch_sizes: tuple[int, ...] = (1,)) -> bool:
    """Re-time every finished point's ONNX and the original together, in *one* interleaved run per
    batch size (:func:`retime` of one sweep)."""
    return retime([(state, out_dir)], runs=runs, warmup=warmup, threads=threads, batch_sizes=batch_sizes)


def retime(sweeps: list[tuple[dict[str, Any], str | os.PathLike]], *, runs: int = 50, warmup: int = 5,
           threads: int = 1, batch_sizes: tuple[int, ...] = (1,),
           rebuild: tuple[nn.Module, tuple[int, int, int], SweepConfig] | None = None) -> bool:
    """Re-time every finished point of every sweep in ``sweeps`` (``(state, out_dir)`` pairs of one
    original model, e.g. a short and a long budget) and the original, all in *one* interleaved run per
    batch size.

    Per-point timings are pairs measured minutes apart; on a shared machine a burst of load can land in
    one pair's median (tiny models run in ~1 ms). One round-robin over all models puts every point under
    the same conditions. The first batch size's numbers replace the point's latency columns (the
    pairwise ones are kept under ``"pairwise"``); every other batch size ``b`` gives ``speedup_b<b>``
    and ``latency_ms_b<b>``, and all of them are under ``"by_batch"``. Skipped (returns False) when
    the same points were already re-timed at the same batch sizes, so a resumed sweep changes nothing.
    ``rebuild`` (the swept model, its input size, the config): a point whose ONNX file is gone (the
    sweep resumed in another session, where only ``sweep.json`` was kept) is exported again from its
    architecture rebuilt on the model (:func:`~vitprune.sweep.scaling.rebuild`: latency depends on
    shapes only); without it such a point is left out.
    """
    batches = [int(b) for b in batch_sizes]
    if rebuild is not None:
        for state, out in sweeps:
            _restore_onnx(state, out, *rebuild)
    todo = [(state, out, sorted(k for k, p in state["points"].items()
                                if p["status"] == "done" and os.path.exists(p.get("onnx", ""))))
            for state, out in sweeps]
    everyone = [f"{i}:{k}" for i, (_, _, keys) in enumerate(todo) for k in keys]
    if not everyone or all((state.get("rebench") or {}).get("points") == keys and
                           (state.get("rebench") or {}).get("batch_sizes", [1]) == batches and
                           (state.get("rebench") or {}).get("together") == everyone for state, _, keys in todo):
        return False
    points = [state["points"][k] for state, _, keys in todo for k in keys]
    paths = [todo[0][0]["original"]["onnx"]] + [p["onnx"] for p in points]
    rows = compare(paths, batch_sizes=batches, threads=threads, runs=runs, warmup=warmup)
    for b_index, batch in enumerate(batches):
        group = rows[b_index * len(paths):(b_index + 1) * len(paths)]
        for p, row in zip(points, group[1:]):
            _set_timing(p, batch, b_index == 0, group[0], row)
    for state, out, keys in todo:
        state["rebench"] = {"points": keys, "together": everyone, "runs": runs, "warmup": warmup, "threads": threads,
                            "batch_sizes": batches, "original_ms": rows[0]["median_ms"],
                            "original_p90_ms": rows[0]["p90_ms"],
                            "original_ms_by_batch": {str(b): rows[i * len(paths)]["median_ms"]
                                                     for i, b in enumerate(batches)}}
        save_state(os.path.join(os.fspath(out), "sweep.json"), state)
    return True


def _restore_onnx(state: dict[str, Any], out: str | os.PathLike, model: nn.Module, size: tuple[int, int, int],
                  config: SweepConfig) -> None:
    """Export again, into ``out/onnx``, the original and every finished point whose ONNX file is gone."""
    folder = os.path.join(os.fspath(out), "onnx")
    os.makedirs(folder, exist_ok=True)
    x = torch.zeros(1, *size)
    if not os.path.exists(state["original"].get("onnx", "")):
        state["original"]["onnx"] = os.path.join(folder, "original.onnx")
        export_onnx(model.eval(), x, state["original"]["onnx"], parity_batches=(1,))
    for key, p in state["points"].items():
        if p["status"] == "done" and not os.path.exists(p.get("onnx", "")):
            p["onnx"] = os.path.join(folder, _file_name(key) + ".onnx")
            export_onnx(rebuild_arch(p["method"], p["arch"], model, size, config), x, p["onnx"], parity_batches=(1,))


def _set_timing(p: dict[str, Any], batch: int, first: bool, original: dict[str, Any], row: dict[str, Any]) -> None:
    timing = {"original_ms": original["median_ms"], "original_p90_ms": original["p90_ms"],
              "latency_ms": row["median_ms"], "latency_p90_ms": row["p90_ms"], "speedup": row["speedup"]}
    p.setdefault("by_batch", {})[str(batch)] = timing
    if first:
        p.setdefault("pairwise", {q: p.get(q) for q in _LATENCY})
        p.update(timing)
    else:
        p.update({f"speedup_b{batch}": row["speedup"], f"latency_ms_b{batch}": row["median_ms"]})


def rescale(state: dict[str, Any], out_dir: str | os.PathLike, model: nn.Module, input_size: tuple[int, int, int],
            scale: ScaleModel, config: SweepConfig, *, runs: int = 10, warmup: int = 2) -> bool:
    """Re-time every distinct scaled architecture and the scale model together, in *one* interleaved run.

    The scaled timings are otherwise pairs (architecture, original) taken whenever the point ran, minutes
    or hours apart and under whatever else the machine was doing; a speedup goal at 2× is decided by a
    few percent. Each architecture is rebuilt on the scale model again (its ONNX files are removed
    afterwards: ~90 MB each for DeiT-S). The pairwise numbers are kept under ``"pairwise"``. Skipped
    (returns False) when the same architectures were already re-timed together."""
    archs: dict[str, tuple[str, dict[str, Any]]] = {}
    for p in state["points"].values():
        if p["status"] == "done" and p.get("scaled"):
            archs.setdefault(p["scaled"]["arch_key"], (p["method"], p["arch"]))
    keys = sorted(archs)
    if not keys or (state.get("rescale") or {}).get("archs") == keys:
        return False
    folder = os.path.join(os.fspath(out_dir), "onnx")
    os.makedirs(folder, exist_ok=True)
    x = torch.zeros(1, *scale.input_size)
    base = scale.factory().eval()
    paths = [os.path.join(folder, "rescale_original.onnx")]
    try:
        export_onnx(base, x, paths[0], parity_batches=(1,))
        for i, key in enumerate(keys):
            method, arch = archs[key]
            dst = METHODS[method].scale(arch, model, input_size, scale.factory().eval(), scale.input_size, config)
            paths.append(os.path.join(folder, f"rescale_{i}.onnx"))
            export_onnx(dst.eval(), x, paths[-1], parity_batches=(1,))
        rows = compare(paths, batch_sizes=(1,), threads=config.threads, runs=runs, warmup=warmup)
    finally:  # large files, whatever happened: the numbers are what is kept
        for path in paths:
            if os.path.exists(path):
                os.remove(path)
    for key, row in zip(keys, rows[1:]):
        entry = state["scaled"][key]
        entry.setdefault("pairwise", {q: entry.get(q) for q in _LATENCY})
        entry.update(original_ms=rows[0]["median_ms"], latency_ms=row["median_ms"], latency_p90_ms=row["p90_ms"],
                     speedup=row["speedup"])
    for p in state["points"].values():
        if p["status"] == "done" and p.get("scaled"):
            p["scaled"] = dict(state["scaled"][p["scaled"]["arch_key"]], arch_key=p["scaled"]["arch_key"])
    state["rescale"] = {"archs": keys, "runs": runs, "warmup": warmup, "threads": config.threads,
                        "original_ms": rows[0]["median_ms"]}
    save_state(os.path.join(os.fspath(out_dir), "sweep.json"), state)
    return True
