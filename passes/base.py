"""The common shape of every pass (after ``torch.fx.passes.infra.pass_base``).

A pass checks its preconditions (``requires``), rewrites the GraphModule (``call``), checks its
postconditions (``ensures``: by default the graph lints and runs on the example input with every
shape re-propagated) and returns a :class:`PassResult` that says whether anything changed, what was
removed, and a JSON-able ``recipe`` from which the same rewrite can be replayed on a fresh trace of
the original architecture (how compressed models reload without pickled code).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from vitprune.errors import VitpruneError
from vitprune.frontend.capture import propagate_shapes


class PassError(VitpruneError):
    """A pass was asked for something its preconditions forbid (names the pass)."""


@dataclass
class PassResult:
    """What a pass did: the rewritten graph, whether anything changed, what was removed, the recipe
    that replays it, and ``expect``: what the rewritten graph must show (checked by ``ensures``)."""

    graph_module: fx.GraphModule
    modified: bool
    removed: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] | None = None
    expect: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class: subclasses implement :meth:`call` and may extend ``requires``/``ensures``.

    A pass keeps no state between ``call`` and ``ensures``: what the result must show travels in
    ``PassResult.expect``. ``preserves_computation`` declares whether outputs stay equal (to 1e-5);
    tests/test_pass_contract.py holds every pass that claims it to the claim.
    """

    name: str = "pass"
    preserves_computation: bool = False

    def requires(self, gm: fx.GraphModule) -> None:
        if "example_input" not in gm.meta:
            raise PassError(f"{self.name}: the GraphModule was not traced by vitprune.frontend.capture "
                            "(no example input in gm.meta)")
        first = next(iter(gm.graph.nodes), None)
        if first is None or "tensor_meta" not in first.meta:
            raise PassError(f"{self.name}: shapes were not propagated (run vitprune.frontend.capture)")

    def call(self, gm: fx.GraphModule) -> PassResult:
        raise NotImplementedError

    def ensures(self, result: PassResult) -> None:
        gm = result.graph_module
        gm.graph.lint()
        try:
            propagate_shapes(gm, gm.meta["example_input"])
        except VitpruneError as e:
            raise RuntimeError(f"{self.name} produced a graph that does not run: {e}") from e

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        self.requires(gm)
        result = self.call(gm)
        if result.modified:
            self.ensures(result)
        return result
