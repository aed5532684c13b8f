"""Run passes in order and say where a failure happened (after ``torch.fx.passes.infra.pass_manager``).

Each pass checks its preconditions, rewrites, and checks its postconditions on its own
:class:`PassResult` (see :class:`passes.base.Pass`); the manager adds the history. A failure names the
pass and every pass that ran before it, so a problem in ``width`` after ``attention, activation`` is
reported as such, not as a bare shape error::

    manager = PassManager()
    gm = manager.apply(AttentionRemoval([3]), gm).graph_module
    gm = manager.apply(WidthPruning(keep), gm).graph_module
    manager.ran   # ["attention", "width"]
"""
from __future__ import annotations

from typing import Sequence

import torch.fx as fx

from vitprune.errors import VitpruneError

from .base import Pass, PassResult


class PassFailure(RuntimeError):
    """A pass broke its own postconditions or crashed: a bug in vitprune, not bad input."""


class PassManager:
    """Applies passes one at a time or as a list, keeping each result (``history``)."""

    def __init__(self, passes: Sequence[Pass] = ()):
        self.passes = list(passes)
        self.history: list[PassResult] = []
        self._names: list[str] = []

    @property
    def ran(self) -> list[str]:
        """Names of the passes applied so far, in order (those that changed nothing included)."""
        return list(self._names)

    def apply(self, p: Pass, gm: fx.GraphModule) -> PassResult:
        where = f"pass {p.name!r} (after: {', '.join(self._names) or 'no other pass'})"
        try:
            result = p(gm)
        except VitpruneError as e:  # bad input for this pass: same kind of error, now located
            e.args = (f"{where}: {e}",) + e.args[1:]
            raise
        except Exception as e:
            raise PassFailure(f"{where}: {type(e).__name__}: {e}") from e
        self.history.append(result)
        self._names.append(p.name)
        return result

    def apply_all(self, passes: Sequence[Pass], gm: fx.GraphModule) -> tuple[fx.GraphModule, list[dict]]:
        """Apply ``passes`` in order; returns the final graph and the recipes of the passes that left one."""
        recipe = []
        for p in passes:
            result = self.apply(p, gm)
            gm = result.graph_module
            if result.recipe:
                recipe.append(result.recipe)
        return gm, recipe

    def run(self, gm: fx.GraphModule) -> fx.GraphModule:
        """Apply every pass given at construction, in order; returns the final graph."""
        return self.apply_all(self.passes, gm)[0]

    def recipe(self) -> list[dict]:
        """The replayable steps of the passes that changed the graph."""
        return [r.recipe for r in self.history if r.modified and r.recipe]
