"""Progress on stderr for the long steps: a line per step with the elapsed time, and tqdm bars.

Shown only where someone watches: the CLI turns it on when stderr is a terminal (``--progress``
forces it, in a pipe or CI log too; ``--quiet`` turns it off and the summary with it), and library
callers with :func:`configure`. Off, every function here does nothing, so the library stays silent
by default, as a library should. It is a contract-level module: every room may report through it and
it imports none of them.

    with progress.step("capture"):              # "[   1.2s] capture ..." then "... capture 3.4 s"
        gm = capture(model, x)
    progress.say("joint: event 2/4, cost 0.612 -> target 0.300")
    for batch in progress.bar(loader, desc="recovery"):
        ...
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Iterable, Iterator, TextIO

from tqdm.auto import tqdm

_state: dict[str, Any] = {"on": False, "start": time.perf_counter(), "stream": None}


def configure(on: bool, stream: TextIO | None = None) -> None:
    """Turn progress on or off; the elapsed times count from this call. ``stream``: stderr by default."""
    _state.update(on=bool(on), start=time.perf_counter(), stream=stream)


def enabled() -> bool:
    return bool(_state["on"])


def _stream() -> TextIO:
    return _state["stream"] or sys.stderr


def say(message: str) -> None:
    """One line, prefixed by the seconds since :func:`configure`."""
    if _state["on"]:
        print(f"[{time.perf_counter() - _state['start']:7.1f}s] {message}", file=_stream(), flush=True)


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    """A line when the step starts and one with its duration when it ends."""
    if not _state["on"]:
        yield
        return
    start = time.perf_counter()
    say(f"{name} ...")
    yield
    say(f"{name} {time.perf_counter() - start:.1f} s")


def bar(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar on the progress stream, disabled while progress is off."""
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, file=_stream(), disable=not _state["on"], **kwargs)
