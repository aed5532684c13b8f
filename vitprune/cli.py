"""The ``vitprune`` command line: parse, call the API, print. Nothing here that Python callers need.

Exit codes: 0 success; 2 bad input (any :class:`VitpruneError`, or a usage error), reported on one
line ``vitprune: error: <message>``; 1 an internal error (one line; ``--debug`` re-raises it);
128 + N when signal N (SIGINT, SIGTERM, SIGHUP) ended the run; 141 when the reader closed stdout.
Whatever the exit, files at the output location are all new or all as before (:mod:`vitprune.deploy.outputs`).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import warnings
from typing import Any, Iterator, Sequence

from vitprune.errors import InputError, VitpruneError
from vitprune.deploy.outputs import check_destination, output_paths, termination_as_interrupt
from vitprune.spec import ATTENTION_VARIANTS, DEPTH_SELECTIONS, IMPORTANCES, MERGES, METHODS, RANKINGS

PROG = "vitprune"
_OUT_SUFFIXES = (".onnx", ".pt2", ".json")
_DEFAULT_OPSET = 18  # vitprune.deploy.onnx.DEFAULT_OPSET, without importing torch for --help
#: Explicit compress flags that would do nothing without another setting: (dest, applies, needs).
_NEEDS: tuple[tuple[str, Any, str], ...] = (
    ("prune_heads_cpvit", lambda s: s.method == "cpvit", "--method cpvit"),
    ("depth_share", lambda s: s.method == "boundarydpt+", "--method boundarydpt+"),
    ("search_steps", lambda s: s.depth_selection == "search", "--depth-selection search"),
    ("latency_threads", lambda s: s.target_latency is not None, "--target-latency"),
    ("lr", lambda s: s.epochs > 0 or s.depth_selection == "search", "--epochs N or --depth-selection search"),
    ("attention_variant", lambda s: s.method.startswith("boundarydpt") or s.remove_attention is not None,
     "--method boundarydpt/boundarydpt+ or --remove-attention"),
    ("merge", lambda s: s.method.startswith("boundarydpt") or s.remove_activation is not None,
     "--method boundarydpt/boundarydpt+ or --remove-activation"),
    ("fold_norm", lambda s: s.method.startswith("boundarydpt") or s.remove_activation is not None,
     "--method boundarydpt/boundarydpt+ or --remove-activation"),
)


class _UsageError(Exception):
    """argparse usage error, turned into exit 2 by :func:`main`."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise _UsageError(f"{message} (see '{self.prog} --help')")


# ---------------------------------------------------------------------------------------------- args
def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return v


def _index_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block indices like 0,3,7, got {text!r}") from None
    if any(b < 0 for b in out):
        raise argparse.ArgumentTypeError(f"block indices must be >= 0, got {text!r}")
    return out


def _batch_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes like 1,8, got {text!r}") from None
    if not out or any(b < 1 for b in out):
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes >= 1 like 1,8, got {text!r}")
    return out


def _add_load_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="timm:<name> or torchvision:<name> (random weights), a checkpoint file (with "
                        "--arch), a Hugging Face model directory, a .pt2 (torch.export.save; with "
                        "--trust-pickle), or a pickled nn.Module (with --trust-pickle)")
    g = p.add_argument_group("loading")
    g.add_argument("--arch", help="architecture of a state-dict checkpoint: timm:NAME (or a bare timm name) "
                                  "or torchvision:NAME, e.g. deit_small_patch16_224")
    g.add_argument("--trust-pickle", action="store_true",
                   help="allow a whole pickled nn.Module or a .pt2 archive (both can run code from the "
                        "file: only for files you trust)")
    g.add_argument("--img-size", type=_positive_int, metavar="N", help="square input size N x N")
    g.add_argument("--num-classes", type=_nonneg_int, metavar="N",
                   help="classifier outputs (inferred from a checkpoint when omitted)")


def _add_debug(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="re-raise errors with the full traceback")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="A torch.fx compiler that prunes Vision Transformers (timm, Hugging "
                                            "Face, torchvision, .pt2) and exports shape-consistent ONNX.")
    parser.add_argument("--debug", action="store_true", help="re-raise errors with the full traceback")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_compress, _add_inspect, _add_export, _add_bench, _add_sweep):
        add(sub)
    return parser


def _add_compress(sub: Any) -> None:
    c = sub.add_parser("compress", help="prune a ViT to a FLOPs target; write PREFIX.onnx/.pt2/.json",
                       description="Prune a ViT and write PREFIX.onnx, PREFIX.pt2 and PREFIX.json.")
    _add_load_flags(c)
    _add_spec_flags(c)
    o = c.add_argument_group("output")
    o.add_argument("--out", required=True, metavar="PREFIX", help="output prefix (writes PREFIX.onnx/.pt2/.json)")
    o.add_argument("--no-export", action="store_true", help="skip ONNX export (writes PREFIX.pt2/.json)")
    o.add_argument("--opset", type=_positive_int, metavar="N", help="ONNX opset (default 18)")
    _add_debug(c)
    c.set_defaults(func=cmd_compress)


def _add_spec_flags(c: argparse.ArgumentParser) -> None:
    """The spec fields as flags; choices come from :mod:`vitprune.spec` (one list of allowed values)."""
    s = c.add_argument_group("spec (flags override --spec)")
    s.add_argument("--spec", metavar="FILE", help="JSON or YAML spec file (see README, 'Spec format')")
    s.add_argument("--target-flops", type=float, metavar="R", help="fraction of the original FLOPs, in (0, 1]")
    s.add_argument("--method", choices=METHODS,
                   help="width (default), boundarydpt (depth), boundarydpt+ (depth then width), cpvit (tokens)")
    s.add_argument("--remove-attention", type=_index_list, metavar="I,J", help="remove these attention branches")
    s.add_argument("--remove-activation", type=_index_list, metavar="I,J",
                   help="remove these activations (fc2∘fc1 merged when cheaper)")
    s.add_argument("--attention-variant", choices=ATTENTION_VARIANTS,
                   help="removed attention becomes x + LN1(x) (identity_norm, default) or x (drop)")
    s.add_argument("--merge", choices=MERGES, help="merge fc2∘fc1 after removing an activation")
    s.add_argument("--fold-norm", dest="fold_norm", action="store_const", const=True,
                   help="fold LN2's affine into a merged linear")
    s.add_argument("--depth-selection", choices=DEPTH_SELECTIONS,
                   help="how boundarydpt picks layers: one_shot scores, or the gated search (needs --data)")
    s.add_argument("--depth-share", type=float, metavar="F",
                   help="boundarydpt+: most of each kind's layers removed before width (default 0.42)")
    s.add_argument("--tokens", metavar="SPEC", help="static token pruning, e.g. keep=0.5,start=4")
    s.add_argument("--prune-heads", dest="prune_heads_cpvit", type=float, metavar="F",
                   help="cpvit: fraction of heads kept per block, by cumulative head score")
    s.add_argument("--epochs", type=int, metavar="N", help="recovery fine-tuning epochs on --data (distillation)")
    s.add_argument("--lr", type=float, metavar="LR", help="fine-tuning / search learning rate")
    s.add_argument("--search-steps", type=int, metavar="N", help="gated search: training steps per pruning event")
    s.add_argument("--target-latency", type=float, metavar="R",
                   help="fraction of the original ONNX Runtime batch-1 latency, measured here, in (0, 1]")
    s.add_argument("--latency-threads", type=int, metavar="N", help="ORT threads for --target-latency (default 1)")
    s.add_argument("--importance", choices=IMPORTANCES)
    s.add_argument("--ranking", choices=RANKINGS)
    s.add_argument("--round-to", type=int, metavar="N", help="pruned widths are multiples of N")
    s.add_argument("--no-residual", dest="prune_residual", action="store_const", const=False,
                   help="keep the residual stream width")
    s.add_argument("--no-mlp", dest="prune_mlp", action="store_const", const=False, help="keep MLP widths")
    s.add_argument("--no-heads", dest="prune_heads", action="store_const", const=False, help="keep all heads")
    s.add_argument("--no-head-dim", dest="prune_head_dim", action="store_const", const=False,
                   help="keep the head dimension")
    s.add_argument("--min-keep", type=float, metavar="F", help="fraction of every group always kept, in (0, 1]")
    s.add_argument("--calib-batches", type=int, metavar="N", help="calibration batches for taylor importance")
    s.add_argument("--batch-size", type=int, metavar="N", help="calibration batch size")
    s.add_argument("--seed", type=int, metavar="N",
                   help="random seed: random-weight models (timm:, torchvision:, HF config) and calibration")
    s.add_argument("--data", metavar="DIR", help="image folder (DIR/<class>/<image> or DIR/train/...) "
                   "for taylor calibration; without it, taylor uses random images")


def _add_inspect(sub: Any) -> None:
    i = sub.add_parser("inspect", help="print coupled channel groups and FLOPs/params per block",
                       description="Print the coupled channel groups, their sizes and FLOPs/params per block.")
    _add_load_flags(i)
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    _add_debug(i)
    i.set_defaults(func=cmd_inspect)


def _add_export(sub: Any) -> None:
    e = sub.add_parser("export", help="export a model to ONNX (checked, with ORT parity)",
                       description="Export a model to ONNX with a dynamic batch axis, checked against ORT.")
    _add_load_flags(e)
    e.add_argument("--out", required=True, metavar="FILE.onnx")
    e.add_argument("--opset", type=_positive_int, default=_DEFAULT_OPSET, metavar="N",
                   help=f"ONNX opset (default {_DEFAULT_OPSET})")
    _add_debug(e)
    e.set_defaults(func=cmd_export)


def _add_bench(sub: Any) -> None:
    b = sub.add_parser("bench", help="time ONNX files in ONNX Runtime, side by side",
                       description="ONNX Runtime latency (median, p90) of one or more ONNX files.")
    b.add_argument("onnx", nargs="+", metavar="ONNX")
    b.add_argument("--batch", type=_batch_list, default=[1, 8], metavar="B1,B2", help="batch sizes (default 1,8)")
    b.add_argument("--threads", type=_positive_int, default=1, metavar="N", help="intra-op threads (default 1)")
    b.add_argument("--runs", type=_positive_int, default=50, metavar="N", help="timed runs (default 50)")
    b.add_argument("--warmup", type=_nonneg_int, default=5, metavar="N", help="warm-up runs (default 5)")
    _add_debug(b)
    b.set_defaults(func=cmd_bench)


def _add_sweep(sub: Any) -> None:
    w = sub.add_parser("sweep", help="accuracy/speedup Pareto sweep: methods x FLOPs targets, fine-tuned, timed in ORT",
                       description="For every method x target (x seed): compress, fine-tune with the same budget, "
                                   "evaluate top-1 on DIR/val, export ONNX and time it against the original. "
                                   "Writes OUT/sweep.json, sweep.md, sweep.png; resumable.")
    _add_load_flags(w)
    w.add_argument("--data", required=True, metavar="DIR", help="image folder with DIR/train and DIR/val")
    w.add_argument("--targets", default="0.9,0.7,0.5,0.3", metavar="R,R", help="FLOPs fractions (default 0.9,0.7,0.5,0.3)")
    w.add_argument("--methods", default="width,boundarydpt,boundarydpt+,cpvit", metavar="M,M",
                   help="rows: width, boundarydpt, boundarydpt+, cpvit, attention, activation, combo, tp_width")
    w.add_argument("--epochs", type=_nonneg_int, default=1, metavar="N", help="fine-tuning epochs per point (default 1)")
    w.add_argument("--lr", type=float, default=5e-4, metavar="LR", help="fine-tuning learning rate (default 5e-4)")
    w.add_argument("--batch-size", type=_positive_int, default=64, metavar="N", help="batch size (default 64)")
    w.add_argument("--seeds", default="0", metavar="S,S", help="seeds (default 0)")
    w.add_argument("--threads", type=_positive_int, default=1, metavar="N", help="ORT intra-op threads (default 1)")
    w.add_argument("--runs", type=_positive_int, default=30, metavar="N", help="timed ORT runs per point (default 30)")
    w.add_argument("--out", required=True, metavar="DIR", help="results folder (resumed when it holds sweep.json)")
    w.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_debug(w)
    w.set_defaults(func=cmd_sweep)


# ---------------------------------------------------------------------------------------------- commands
def _load(args: argparse.Namespace, seed: int = 0):
    """MODEL as the loading flags say; random-weight models are built under ``seed``."""
    from vitprune.frontend.load import load_model

    return load_model(args.model, arch=args.arch, trust_pickle=args.trust_pickle,
                      img_size=args.img_size, num_classes=args.num_classes, seed=seed)


def spec_from_args(args: argparse.Namespace):
    """The spec of ``compress``: ``--spec`` file (or defaults), then every given flag on top."""
    from vitprune.spec import CompressSpec

    spec = CompressSpec.from_file(args.spec) if args.spec else CompressSpec()
    if args.target_flops is not None or args.target_latency is not None:
        # a target given on the command line replaces the file's target, of either kind
        spec = dataclasses.replace(spec, target_flops=None, target_latency=None)
    return spec.merged(
        method=args.method, remove_attention=args.remove_attention, remove_activation=args.remove_activation,
        attention_variant=args.attention_variant, merge=args.merge, fold_norm=args.fold_norm,
        depth_selection=args.depth_selection, depth_share=args.depth_share, tokens=args.tokens,
        prune_heads_cpvit=args.prune_heads_cpvit, epochs=args.epochs, lr=args.lr, search_steps=args.search_steps,
        target_flops=args.target_flops, target_latency=args.target_latency,
        latency_threads=args.latency_threads, importance=args.importance, ranking=args.ranking,
        round_to=args.round_to, prune_residual=args.prune_residual, prune_mlp=args.prune_mlp,
        prune_heads=args.prune_heads, prune_head_dim=args.prune_head_dim, min_keep=args.min_keep,
        calib_batches=args.calib_batches, batch_size=args.batch_size, seed=args.seed,
    )


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
    for dest, applies, needs in _NEEDS:
        if getattr(args, dest) is not None and not applies(spec):
            flag = "--" + {"prune_heads_cpvit": "prune_heads"}.get(dest, dest).replace("_", "-")
            raise InputError(f"{flag} has no effect without {needs}; add that, or drop {flag}")
    if args.data is not None and not os.path.isdir(args.data):
        raise InputError(f"--data {args.data!r} is not a directory")


def _check_opset(opset: int) -> int:
    from vitprune.deploy.onnx import check_opset

    return check_opset(opset, "--opset")


def cmd_compress(args: argparse.Namespace) -> int:
    # every check that needs no model runs before the (slow) load: output location, spec, opset
    prefix = _out_prefix(args.out)
    export = not args.no_export
    files, stale = output_paths(prefix, export)
    check_destination([*files.values(), *stale], f"--out {args.out}")
    spec = spec_from_args(args)
    _check_requests(spec, args)
    opset = args.opset or _DEFAULT_OPSET
    if export:
        _check_opset(opset)
    loaded = _load(args, seed=spec.seed)
    size = spec.input_size if (spec.input_size and args.img_size is None) else loaded.input_size
    from vitprune import api

    api.check_input_size(loaded.model, size)
    calib = train = val = None
    if args.data is not None:
        from vitprune.train.data import calibration_batches, loader

        calib = list(calibration_batches(args.data, size, batches=spec.calib_batches,
                                         batch_size=spec.batch_size, seed=spec.seed))
        if spec.epochs > 0 or spec.depth_selection == "search":
            from vitprune.train.finetune import folder_datasets

            _, val = folder_datasets(args.data, size)  # DIR/val (or validation) when present
            train = loader(args.data, size, batch_size=spec.batch_size, split="train", shuffle=True,
                           seed=spec.seed)
    result = api.compress(loaded.model, spec, example_input_size=size, source=loaded.source,
                          calib_data=calib, train_data=train, val_data=val)
    removed = [p for p in stale if os.path.lexists(p)]
    paths = api.write_outputs(result, prefix, export=export, opset=opset)
    print(format_summary(result.report, paths, removed))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    loaded = _load(args)
    from vitprune import api

    d = api.inspect_model(loaded.model, loaded.input_size)
    print(json.dumps(d, indent=2, default=str) if args.json else api.format_inspect(d))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if not args.out.lower().endswith(".onnx") or os.path.isdir(args.out):
        raise InputError(f"--out {args.out!r} must be a file name ending in .onnx")
    check_destination([args.out], f"--out {args.out}")
    opset = _check_opset(args.opset)
    loaded = _load(args)
    from vitprune import api

    info = api.export_model(loaded.model, args.out, input_size=loaded.input_size, opset=opset)
    print(f"wrote {args.out}")
    for k, v in (info or {}).items():
        if isinstance(v, (str, int, float, bool)) and k != "path":
            print(f"  {k}: {v}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    for p in args.onnx:
        if os.path.isdir(p):
            raise InputError(f"{p} is a folder, not an ONNX file")
        if not os.path.isfile(p):
            raise InputError(f"ONNX file {p} does not exist")
    from vitprune.deploy import bench

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", getattr(bench, "InputMismatchWarning", UserWarning))
        rows = bench.compare(args.onnx, batch_sizes=args.batch, threads=args.threads,
                             runs=args.runs, warmup=args.warmup)
    for w in caught:
        if issubclass(w.category, getattr(bench, "InputMismatchWarning", ())):
            print(f"{PROG}: warning: {_one_line(w.message)}", file=sys.stderr)
    print(bench.format_table(rows))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from vitprune import sweep

    def _csv(text: str, kind: type, what: str) -> list:
        try:
            out = [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise InputError(f"--{what} expects a comma-separated list, got {text!r}") from None
        if not out:
            raise InputError(f"--{what} is empty")
        return out

    config = sweep.SweepConfig(targets=_csv(args.targets, float, "targets"),
                               methods=_csv(args.methods, str, "methods"), seeds=_csv(args.seeds, int, "seeds"),
                               epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, threads=args.threads,
                               runs=args.runs, progress=not args.no_progress)
    loaded = _load(args)
    from vitprune.train.data import loader
    from vitprune.train.finetune import folder_datasets

    size = loaded.input_size
    _, val = folder_datasets(args.data, size)
    if val is None:
        raise InputError(f"--data {args.data!r} has no val/ (or validation/) folder to measure top-1 on")
    train = loader(args.data, size, batch_size=args.batch_size, split="train", shuffle=True, seed=config.seeds[0])
    state = sweep.run_sweep(loaded.model, train, val, config, args.out, input_size=size, source=loaded.source)
    print(sweep.format_markdown(state, config.methods))
    print(f"wrote {os.path.join(args.out, 'sweep.json')}, sweep.md, sweep.png "
          f"({len(state['computed'])} point(s) computed now)")
    return 0


# ---------------------------------------------------------------------------------------------- summary
def _find(report: dict, *paths: str) -> Any:
    """First value found at one of the dotted ``paths`` in ``report`` (None if none)."""
    for path in paths:
        cur: Any = report
        for part in path.split("."):
            if not isinstance(cur, dict) or part not in cur:
                break
            cur = cur[part]
        else:
            return cur
    return None


def _human(n: Any) -> str:
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return str(n)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"


def format_summary(report: Any, paths: dict[str, str] | None, removed: Sequence[str] = ()) -> str:
    """A few lines: FLOPs before/after and ratio, params before/after, plan notes, files written
    and stale files removed.

    The report is expected to hold ``{"flops": {"before": n, "after": n}, "params": {...}}``; a few
    other spellings (``flops_before``, ``original.flops``, ...) are accepted, missing ones skipped.
    """
    report = report if isinstance(report, dict) else {}
    lines = []
    for what in ("flops", "params"):
        before = _find(report, f"{what}.before", f"{what}.original", f"{what}_before", f"original_{what}",
                       f"original.{what}", f"before.{what}")
        after = _find(report, f"{what}.after", f"{what}.pruned", f"{what}.compressed", f"{what}_after",
                      f"pruned_{what}", f"compressed_{what}", f"compressed.{what}", f"pruned.{what}",
                      f"after.{what}")
        if before is None and after is None:
            continue
        line = f"{'FLOPs' if what == 'flops' else 'params'}: {_human(before)} -> {_human(after)}"
        if isinstance(before, (int, float)) and isinstance(after, (int, float)) and before:
            line += f" ({after / before:.3f} of original)"
        lines.append(line)
    target = _find(report, "target_flops", "spec.target_flops")
    if target is not None:
        lines.append(f"target FLOPs ratio: {target}")
    for note in _notes(report):
        lines.append(f"note: {note}")
    for p in (paths or {}).values():
        lines.append(f"wrote {p}")
    for p in removed:
        lines.append(f"removed {p} (left by an earlier run; this run writes no {os.path.splitext(p)[1]})")
    return "\n".join(lines) if lines else "done"


def _notes(report: dict) -> list[str]:
    """The planners' notes (e.g. a round_to that could not be met), in stage order."""
    out: list[str] = []
    stages = report.get("stages") if isinstance(report.get("stages"), dict) else {"width": report.get("plan")}
    for info in stages.values():
        if isinstance(info, dict):
            out += [info["note"]] if isinstance(info.get("note"), str) else []
            out += [n for n in info.get("notes") or [] if isinstance(n, str)]
    return out


# ---------------------------------------------------------------------------------------------- main
def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@contextlib.contextmanager
def _library_logs(debug: bool) -> Iterator[None]:
    """Silence library logging (the ONNX exporter logs tracebacks before raising what we report on
    one line); --debug keeps it."""
    if debug:
        yield
        return
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(previous)


def _stdout_gone() -> int:
    """The reader closed stdout (``vitprune inspect ... | head``): end quietly, as a Unix tool killed
    by SIGPIPE would (128 + 13), and keep Python from failing again when it flushes at exit."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 128 + 13


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code: 0 ok, 2 bad input, 1 internal error, 128 + N for signal N
    (130 SIGINT, 143 SIGTERM, 129 SIGHUP; outputs are left as they were), 141 when stdout closed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        with termination_as_interrupt(), _library_logs(debug):
            args = build_parser().parse_args(argv)
            debug = bool(getattr(args, "debug", False))
            code = int(args.func(args))
            sys.stdout.flush()  # a closed pipe shows here, where it is handled, not at exit
            return code
    except SystemExit as e:  # --help / --version
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except (_UsageError, VitpruneError) as e:
        if debug and isinstance(e, VitpruneError):
            raise
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return _stdout_gone()
    except KeyboardInterrupt as e:  # SIGINT, and SIGTERM/SIGHUP through termination_as_interrupt
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"{PROG}: interrupted by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    except Exception as e:
        if debug:
            raise
        print(f"{PROG}: error: internal error: {type(e).__name__}: {_one_line(e)} "
              f"(rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
