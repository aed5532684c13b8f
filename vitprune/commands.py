"""What each ``vitprune`` command does once its flags parsed: check what needs no model, load, call
the API, print. The parser and the exit codes live in :mod:`vitprune.cli`."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import warnings
from typing import Any, Callable, Sequence

from vitprune import api, progress, sweep
from vitprune.deploy import DEFAULT_OPSET, bench
from vitprune.deploy.onnx import check_opset
from vitprune.deploy.outputs import check_destination, output_paths
from vitprune.errors import InputError, one_line
from vitprune.frontend.hetdpt import HetDPTOptions
from vitprune.frontend.load import LoadedModel, load_model, special_kind
from vitprune.report import CompressReport
from vitprune.spec import CompressSpec, options
from vitprune.sweep.state import load_state
from vitprune.train.data import first_batches, image_folder, loader_of
from vitprune.train.finetune import folder_datasets

PROG = "vitprune"
_OUT_SUFFIXES = (".onnx", ".pt2", ".json")



def _load(args: argparse.Namespace, seed: int = 0) -> LoadedModel:
    """MODEL as the loading flags say; random-weight models are built under ``seed``."""
    hetdpt = None
    if args.prune_layer_attn is not None or args.prune_layer_act is not None or args.hetdpt_gelu:
        hetdpt = HetDPTOptions(removed_attention=args.prune_layer_attn, removed_activation=args.prune_layer_act,
                               extra_gelu=args.hetdpt_gelu)
    with progress.step(f"load {args.model}"):
        return load_model(args.model, arch=args.arch, trust_pickle=args.trust_pickle, img_size=args.img_size,
                          num_classes=args.num_classes, seed=seed, hetdpt_options=hetdpt,
                          weights_key=args.weights_key)


def _not_special(path: str, what: str) -> None:
    """Refuse at once a FIFO, socket or device given as a file: reading it would block."""
    kind = special_kind(path)
    if kind:
        raise InputError(f"{what} {path} is a {kind}, not a file")


def spec_from_args(args: argparse.Namespace) -> CompressSpec:
    """The spec of ``compress``: ``--spec`` file (or defaults), then every flag given on top."""
    if args.spec:
        _not_special(args.spec, "--spec")
    spec = CompressSpec.from_file(args.spec) if args.spec else CompressSpec()
    if args.target_flops is not None or args.target_latency is not None:
        # a target given on the command line replaces the file's target, of either kind
        spec = dataclasses.replace(spec, target_flops=None, target_latency=None)
    return spec.merged(**{name: getattr(args, name) for name, option in options().items() if option.cli})


def _out_prefix(text: str) -> str:
    if not text or text.endswith(("/", os.sep)) or os.path.isdir(text):
        raise InputError(f"--out {text!r} must be a file prefix like out/deit_s_50, not a directory")
    root, ext = os.path.splitext(text)
    return root if ext.lower() in _OUT_SUFFIXES else text


def _check_requests(spec: Any, args: argparse.Namespace) -> None:
    """Refuse, before loading, what would otherwise be silently ignored (README, "Outputs")."""
    spec.check_data(args.data is not None)
    if args.no_export and args.opset is not None:
        raise InputError(f"--opset {args.opset} sets the ONNX export, which --no-export skips; drop one of them")
    for dest, option in options().items():  # a flag given at its default value, too
        if option.needs is not None and getattr(args, dest, None) is not None and not option.needs[0](spec):
            flag = option.flag_for(dest)
            raise InputError(f"{flag} has no effect without {option.needs[2]}; add that, or drop {flag}")
    if args.data is not None and not os.path.isdir(args.data):
        raise InputError(f"--data {args.data!r} is not a directory")
    if args.skip_bad_images and args.data is None:
        raise InputError("--skip-bad-images has no effect without --data; add that, or drop --skip-bad-images")


def _show_progress(args: argparse.Namespace) -> None:
    """Progress on stderr where someone watches it (a terminal), or when asked (``--progress``)."""
    progress.configure(args.progress or (not args.quiet and sys.stderr.isatty()))


def cmd_compress(args: argparse.Namespace) -> int:
    # every check that needs no model runs before the (slow) load: output location, spec, opset
    _show_progress(args)
    prefix = _out_prefix(args.out)
    export = not args.no_export
    files, stale = output_paths(prefix, export)
    check_destination([*files.values(), *stale], f"--out {args.out}")
    spec = spec_from_args(args)
    _check_requests(spec, args)
    opset = args.opset or DEFAULT_OPSET
    if export:
        check_opset(opset, "--opset")
    loaded = _load(args, seed=spec.seed)
    size = spec.input_size if (spec.input_size and args.img_size is None) else loaded.input_size
    api.check_input_size(loaded.model, size)
    with progress.step(f"read {args.data}") if args.data else contextlib.nullcontext():
        calib, train, val, skipped = _data(args, spec, size)
    result = api.compress(loaded.model, spec, example_input_size=size, source=loaded.source,
                          calib_data=calib, train_data=train, val_data=val)
    inputs = _inputs_record(loaded, args, skipped)
    if inputs:
        result.report["inputs"] = inputs
    removed = [p for p in stale if os.path.lexists(p)]
    paths = api.write_outputs(result, prefix, export=export, opset=opset)
    if not args.quiet:
        print(format_summary(CompressReport.from_dict(result.report), paths, removed))
    return 0


def _data(args: argparse.Namespace, spec: CompressSpec, size: tuple[int, int, int]) -> tuple[Any, Any, Any, list[str]]:
    """(calibration batches, training loader, validation set, images left out) from ``--data``;
    the training set is read once (with --skip-bad-images every image is decoded once)."""
    if args.data is None:
        return None, None, None, []
    fit = spec.epochs > 0 or spec.depth_selection == "search"
    if fit:
        train_set, val = folder_datasets(args.data, size, skip_bad=args.skip_bad_images)  # DIR/val when present
    else:
        train_set, val = image_folder(args.data, size, split="train", skip_bad=args.skip_bad_images), None
    calib = list(first_batches(train_set, batches=spec.calib_batches, batch_size=spec.batch_size, seed=spec.seed))
    train = loader_of(train_set, batch_size=spec.batch_size, shuffle=True, seed=spec.seed) if fit else None
    skipped = [*train_set.skipped, *(val.skipped if val is not None else [])]
    return calib, train, val, skipped


def _inputs_record(loaded: LoadedModel, args: argparse.Namespace, skipped: Sequence[str]) -> dict[str, Any]:
    """The report's ``inputs``: the weight set used, the images left out, and notes saying so."""
    record: dict[str, Any] = dict(loaded.weights or {})
    notes = list(loaded.notes)
    if getattr(args, "skip_bad_images", False):
        record["skipped_images"] = len(skipped)
        record["skipped_examples"] = list(skipped[:5])
        if skipped:
            notes.append(f"left out {len(skipped)} unreadable image(s) under {args.data} (--skip-bad-images), "
                         f"e.g. {skipped[0]}")
    if notes:
        record["notes"] = notes
    return record


def cmd_inspect(args: argparse.Namespace) -> int:
    loaded = _load(args)
    d = api.inspect_model(loaded.model, loaded.input_size)
    if loaded.notes:
        d["notes"] = list(loaded.notes)
    print(json.dumps(d, indent=2, default=str) if args.json else
          "\n".join([api.format_inspect(d), *(f"note: {n}" for n in loaded.notes)]))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if os.path.isdir(args.out):
        raise InputError(f"--out {args.out} is a folder; export writes one file: name it, e.g. "
                         f"{os.path.join(args.out, 'model.onnx')}")
    if not args.out.lower().endswith(".onnx"):
        raise InputError(f"--out {args.out!r} must be a file name ending in .onnx")
    check_destination([args.out], f"--out {args.out}")
    opset = check_opset(args.opset, "--opset")
    _show_progress(args)
    loaded = _load(args)
    info = api.export_model(loaded.model, args.out, input_size=loaded.input_size, opset=opset)
    if args.quiet:
        return 0
    print("\n".join([*(f"note: {n}" for n in loaded.notes), f"wrote {args.out}"]))
    for k, v in (info or {}).items():
        if isinstance(v, (str, int, float, bool)) and k != "path":
            print(f"  {k}: {v}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    for p in args.onnx:
        _not_special(p, "ONNX file")
        if os.path.isdir(p):
            raise InputError(f"{p} is a folder, not an ONNX file")
        if not os.path.isfile(p):
            raise InputError(f"ONNX file {p} does not exist")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", getattr(bench, "InputMismatchWarning", UserWarning))
        rows = bench.compare(args.onnx, batch_sizes=args.batch, threads=args.threads,
                             runs=args.runs, warmup=args.warmup)
    for w in caught:
        if issubclass(w.category, getattr(bench, "InputMismatchWarning", ())):
            print(f"{PROG}: warning: {one_line(w.message)}", file=sys.stderr)
    print(bench.format_table(rows))
    return 0


def _csv(text: str, kind: type, what: str) -> list:
    try:
        out = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--{what} expects a comma-separated list, got {text!r}") from None
    if not out:
        raise InputError(f"--{what} is empty")
    return out


def cmd_sweep(args: argparse.Namespace) -> int:
    if args.steps is not None and args.epochs is not None:
        raise InputError("--steps is the whole budget of each point (planning and fine-tuning); "
                         "drop --epochs, or drop --steps to fine-tune for --epochs after pruning")
    args.epochs = 1 if args.epochs is None else args.epochs
    config = sweep.SweepConfig(targets=_csv(args.targets, float, "targets"),
                               methods=_csv(args.methods, str, "methods"), seeds=_csv(args.seeds, int, "seeds"),
                               epochs=args.epochs, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                               threads=args.threads,
                               runs=args.runs, progress=not args.no_progress)
    _check_sweep_out(args.out, config)
    loaded = _load(args)
    size = loaded.input_size
    train_set, val = folder_datasets(args.data, size, skip_bad=args.skip_bad_images)
    if val is None:
        raise InputError(f"--data {args.data!r} has no val/ (or validation/) folder to measure top-1 on")
    train = loader_of(train_set, batch_size=args.batch_size, shuffle=True, seed=config.seeds[0])
    state = sweep.run_sweep(loaded.model, train, val, config, args.out, input_size=size, source=loaded.source)
    print(sweep.format_markdown(state, config.methods))
    for note in _inputs_record(loaded, args, [*train_set.skipped, *val.skipped]).get("notes", []):
        print(f"note: {note}")
    print(f"wrote {os.path.join(args.out, 'sweep.json')}, sweep.md, sweep.png "
          f"({len(state['computed'])} point(s) computed now)")
    return 0


def _check_sweep_out(out: str, config: Any) -> None:
    """Before any work: ``--out`` is (or can become) a folder where sweep.json can be written, and a
    sweep.json already there is one this sweep can resume (refused otherwise, creating nothing)."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out} is a file; the sweep writes a folder there (sweep.json, onnx/, ...): "
                         f"name a folder")
    state = os.path.join(out, "sweep.json")
    check_destination([state], f"--out {out}")
    _not_special(state, "sweep state")
    load_state(state, config)


# ---------------------------------------------------------------------------------------------- summary
def _human(n: Any) -> str:
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return str(n)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"


def format_summary(report: CompressReport, paths: dict[str, str] | None, removed: Sequence[str] = ()) -> str:
    """A few lines: FLOPs and params before/after, the target, the planners' notes, files written
    and stale files removed."""
    lines = [f"FLOPs: {_human(report.flops_before)} -> {_human(report.flops_after)} "
             f"({report.flops_ratio:.3f} of original)",
             f"params: {_human(report.params_before)} -> {_human(report.params_after)} "
             f"({report.params_ratio:.3f} of original)"]
    if report.spec.get("target_flops") is not None:
        lines.append(f"target FLOPs ratio: {report.spec['target_flops']}")
    if report.latency_plan is not None:
        plan = report.latency_plan
        lines.append(f"latency: {plan['measured_latency_ratio']:.3f} of original measured "
                     f"(target {plan['target_latency']}, {plan['threads']} ORT thread(s))")
        if "best_threads" in plan:
            lines.append(f"fastest ORT intra-op threads at batch 1: {plan['best_threads']} "
                         f"({plan['best_threads_ms']:.2f} ms; {plan['speedup_at_best_threads']:.2f}x "
                         f"vs the original at its own best)")
            lines += [f"note: {n}" for n in plan["thread_notes"]]
    notes = list(report.notes)
    if report.depth_scored_on_random_images:
        notes.append("depth layers were chosen on random images labelled by the model itself; "
                     "--data DIR scores them on real images")
    lines += [f"note: {note}" for note in notes]
    if report.timings:
        lines.append("time: " + ", ".join(f"{step} {s:.1f} s" for step, s in report.timings.items())
                     + (f"; peak RSS {report.peak_rss_mib / 1024:.2f} GiB" if report.peak_rss_mib else ""))
    lines += [f"wrote {p}" for p in (paths or {}).values()]
    lines += [f"removed {p} (left by an earlier run; this run writes no {os.path.splitext(p)[1]})"
              for p in removed]
    return "\n".join(lines)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "compress": cmd_compress, "inspect": cmd_inspect, "export": cmd_export, "bench": cmd_bench, "sweep": cmd_sweep,
}
