"""The ``vitprune`` command line: the parser and the exit codes; the command bodies are in
:mod:`vitprune.commands`. Nothing here that Python callers need.

Exit codes: 0 success; 2 bad input (any :class:`VitpruneError`, or a usage error), reported on one
line ``vitprune: error: <message>``; 1 an internal error (one line; ``--debug`` re-raises it);
128 + N when signal N (SIGINT, SIGTERM, SIGHUP) ended the run; 141 when the reader closed stdout.
Whatever the exit, files at the output location are all new or all as before (:mod:`vitprune.deploy.outputs`).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from typing import Any, Callable, Iterator, Sequence

from vitprune.deploy import DEFAULT_OPSET
from vitprune.deploy.outputs import termination_as_interrupt
from vitprune.errors import SpecError, VitpruneError, one_line
from vitprune.spec import CompressSpec, Option, options

PROG = "vitprune"



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


def _positive_ints(what: str, example: str) -> Callable[[str], list[int]]:
    """An argparse type reading comma-separated integers >= 1 (batch sizes, thread counts)."""
    def parse(text: str) -> list[int]:
        try:
            out = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            out = []
        if not out or any(v < 1 for v in out):
            raise argparse.ArgumentTypeError(f"expected comma-separated {what} >= 1 like {example}, got {text!r}")
        return out
    return parse


def _add_load_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="timm:<name> or torchvision:<name> (random weights), a checkpoint file (with "
                        "--arch), a Hugging Face model directory, a .pt2 (torch.export.save; with "
                        "--trust-pickle), or a pickled nn.Module (with --trust-pickle)")
    g = p.add_argument_group("loading")
    g.add_argument("--arch", help="architecture of a state-dict checkpoint: timm:NAME (or a bare timm name), "
                                  "torchvision:NAME, e.g. deit_small_patch16_224, or hetdpt[:NAME] "
                                  "(HetDPT's released checkpoint layout)")
    g.add_argument("--weights-key", metavar="KEY",
                   help="a checkpoint dict holding several weight sets (e.g. 'model' and 'state_dict_ema'): the "
                        "key of the one to load (default: the first of state_dict, model, state_dict_ema; the "
                        "summary and the report say which was used)")
    g.add_argument("--trust-pickle", action="store_true",
                   help="allow a whole pickled nn.Module or a .pt2 archive (both can run code from the "
                        "file: only for files you trust)")
    g.add_argument("--img-size", type=_positive_int, metavar="N", help="square input size N x N")
    g.add_argument("--num-classes", type=_nonneg_int, metavar="N",
                   help="classifier outputs (inferred from a checkpoint when omitted)")
    g.add_argument("--prune-layer-attn", metavar="LIST",
                   help="--arch hetdpt: blocks whose attention HetDPT removed, e.g. 0,3,7,8,11 (read from the "
                        "checkpoint's keys when omitted, checked against them when given)")
    g.add_argument("--prune-layer-act", metavar="LIST",
                   help="--arch hetdpt: blocks whose activation HetDPT removed, e.g. 2,7,8,10,11 ('' for none); "
                        "needed unless the checkpoint's MLPs are merged or it keeps HetDPT's args")
    g.add_argument("--hetdpt-gelu", action="store_true",
                   help="--arch hetdpt: HetDPT's released forward exactly: a GELU after blocks that lost both "
                        "attention and activation (vitprune's function has none)")


def _add_debug(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="re-raise errors with the full traceback")


def _add_progress(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", action="store_true",
                   help="show progress on stderr even when it is not a terminal (default: only on a terminal)")
    g.add_argument("--quiet", action="store_true", help="print nothing but errors (no progress, no summary)")


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
    o.add_argument("--opset", type=_positive_int, metavar="N", help=f"ONNX opset (default {DEFAULT_OPSET})")
    _add_progress(c)
    _add_debug(c)
    c.set_defaults(command="compress")


def _add_spec_flags(c: argparse.ArgumentParser) -> None:
    """One flag per :class:`CompressSpec` field, built from the field's :class:`~vitprune.spec.Option`
    (help, choices, how the text is read): the spec is the single source of names and allowed values."""
    s = c.add_argument_group("spec (flags override --spec)")
    s.add_argument("--spec", metavar="FILE", help="JSON or YAML spec file (see README, 'Spec format')")
    for f in dataclasses.fields(CompressSpec):
        option = options()[f.name]
        if option.cli:
            s.add_argument(option.flag_for(f.name), dest=f.name, **_flag_settings(option, f.default))
    s.add_argument("--data", metavar="DIR", help="image folder (DIR/<class>/<image> or DIR/train/...) "
                   "for calibration (taylor importance, depth scores, CP-ViT ranges) and fine-tuning; "
                   "without it, calibration uses random images")
    _add_skip_bad(s)


def _add_skip_bad(g: Any) -> None:
    g.add_argument("--skip-bad-images", action="store_true",
                   help="with --data: leave out images that cannot be decoded (every image is decoded once "
                        "first; the summary and report count them) instead of refusing the first one")


def _flag_settings(option: Option, default: Any) -> dict[str, Any]:
    """argparse settings of one spec flag. Every default is None, so that only the flags given
    replace what ``--spec`` (or the spec's own default, shown in the help) says."""
    if option.switch is not None:
        return dict(action="store_const", const=option.switch, help=option.help)
    shown = "" if default is None else f" (default {default})"
    return dict(type=_argparse_type(option.read), choices=option.choices, metavar=option.metavar,
                help=option.help + shown)


def _argparse_type(read: Any) -> Any:
    """``read`` for argparse: a :class:`SpecError` becomes argparse's one-line usage error; the
    name stays, so ``int``/``float`` keep their "invalid int value" messages."""
    def parse(text: str) -> Any:
        try:
            return read(text)
        except SpecError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = read.__name__
    return parse


def _add_inspect(sub: Any) -> None:
    i = sub.add_parser("inspect", help="print coupled channel groups and FLOPs/params per block",
                       description="Print the coupled channel groups, their sizes and FLOPs/params per block.")
    _add_load_flags(i)
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    _add_debug(i)
    i.set_defaults(command="inspect")


def _add_export(sub: Any) -> None:
    e = sub.add_parser("export", help="export a model to ONNX (checked, with ORT parity)",
                       description="Export a model to ONNX with a dynamic batch axis, checked against ORT.")
    _add_load_flags(e)
    e.add_argument("--out", required=True, metavar="FILE.onnx")
    e.add_argument("--opset", type=_positive_int, default=DEFAULT_OPSET, metavar="N",
                   help=f"ONNX opset (default {DEFAULT_OPSET})")
    _add_progress(e)
    _add_debug(e)
    e.set_defaults(command="export")


def _add_bench(sub: Any) -> None:
    b = sub.add_parser("bench", help="time ONNX files in ONNX Runtime, side by side",
                       description="ONNX Runtime latency (median, p90) of one or more ONNX files.")
    b.add_argument("onnx", nargs="+", metavar="ONNX")
    b.add_argument("--batch", type=_positive_ints("batch sizes", "1,8"), default=[1, 8], metavar="B1,B2", help="batch sizes (default 1,8)")
    b.add_argument("--threads", type=_positive_ints("thread counts", "1,2"), default=None, metavar="N[,N]",
                   help="intra-op thread counts to compare (default: 1 and one per available core); the table "
                        "names the fastest for each model and batch, as ORT's intra_op_num_threads takes it")
    b.add_argument("--runs", type=_positive_int, default=50, metavar="N", help="timed runs (default 50)")
    b.add_argument("--warmup", type=_nonneg_int, default=5, metavar="N", help="warm-up runs (default 5)")
    _add_debug(b)
    b.set_defaults(command="bench")


def _add_sweep(sub: Any) -> None:
    w = sub.add_parser("sweep", help="accuracy/speedup Pareto sweep: methods x FLOPs targets, fine-tuned, timed in ORT",
                       description="For every method x target (x seed): compress, fine-tune with the same budget, "
                                   "evaluate top-1 on DIR/val, export ONNX and time it against the original. "
                                   "Writes OUT/sweep.json, sweep.md, sweep.png; resumable.")
    _add_load_flags(w)
    w.add_argument("--data", required=True, metavar="DIR", help="image folder with DIR/train and DIR/val")
    _add_skip_bad(w)
    w.add_argument("--targets", default="0.9,0.7,0.5,0.3", metavar="R,R", help="FLOPs fractions (default 0.9,0.7,0.5,0.3)")
    w.add_argument("--methods", default="width,boundarydpt,boundarydpt+,cpvit", metavar="M,M",
                   help="rows: width, boundarydpt, boundarydpt+, boundarydpt+paper, cpvit, tome, attention, activation, "
                        "combo, tp_width")
    w.add_argument("--epochs", type=_nonneg_int, default=None, metavar="N",
                   help="fine-tuning epochs per point after pruning (default 1; not with --steps)")
    w.add_argument("--steps", type=_positive_int, default=None, metavar="N",
                   help="equal budget: N optimizer steps per point, the planner's own (gated search, probes, "
                        "recovery: at most 40%%) and the fine-tune's together")
    w.add_argument("--lr", type=float, default=5e-4, metavar="LR", help="fine-tuning learning rate (default 5e-4)")
    w.add_argument("--batch-size", type=_positive_int, default=64, metavar="N", help="batch size (default 64)")
    w.add_argument("--seeds", default="0", metavar="S,S", help="seeds (default 0)")
    w.add_argument("--threads", type=_positive_int, default=1, metavar="N", help="ORT intra-op threads (default 1)")
    w.add_argument("--runs", type=_positive_int, default=30, metavar="N", help="timed ORT runs per point (default 30)")
    w.add_argument("--out", required=True, metavar="DIR", help="results folder (resumed when it holds sweep.json)")
    w.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_debug(w)
    w.set_defaults(command="sweep")


# ---------------------------------------------------------------------------------------------- main
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
            # The command bodies need torch, timm and ONNX Runtime (≈5 s of CPU to import): they are
            # imported once a command has parsed, so --help and usage errors answer in a tenth of that.
            from vitprune import commands

            code = int(commands.COMMANDS[args.command](args))
            sys.stdout.flush()  # a closed pipe shows here, where it is handled, not at exit
            return code
    except SystemExit as e:  # --help / --version
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except (_UsageError, VitpruneError) as e:
        if debug and isinstance(e, VitpruneError):
            raise
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
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
        print(f"{PROG}: error: internal error: {type(e).__name__}: {one_line(e)} "
              f"(rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
