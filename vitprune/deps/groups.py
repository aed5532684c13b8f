"""ChannelGroup: one set of coupled channels, and the members (parameter slices) it owns.

Worked example (DeiT-Tiny block 0, fused qkv, dim 192, 3 heads × 64)::

    heads group (size 3):     blocks.0.attn.qkv.weight  dim 0  (3 × [3] × 64 rows, factor 2 of 3)
                              blocks.0.attn.qkv.bias    dim 0
                              blocks.0.attn.proj.weight dim 1  ([3] × 64 columns, factor 1 of 2)
    head-dim group (size 64): the same three parameter dims, innermost factor; q_norm/k_norm
                              weights when the model has q/k-norm

Removing head ``h`` removes every qkv row and proj column whose head coordinate is ``h``; the
reshape ``(B, N, 3, heads, head_dim)`` that produced the factorisation is rewritten by the width pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class GroupMember:
    """One parameter dim (or part of it) that a group's channels index into."""

    param: str
    dim: int
    coords: np.ndarray  # for each position along ``dim``: the group channel it belongs to, -1 = none
    roles: tuple[str, ...] = ()

    def positions(self, channel: int) -> np.ndarray:
        return np.nonzero(self.coords == channel)[0]


@dataclass
class ChannelGroup:
    """A leaf axis of the dependency graph that owns parameter dims.

    ``kind`` is derived from the graph's structure, never from module names:
    ``head`` (outer factor of a reshaped dim), ``head_dim`` (inner factor, or the channels of a
    one-head attention: summed over by q·k), ``residual`` (normalised
    by two or more norms: the residual stream), ``hidden`` (a linear's output feeding another linear:
    the MLP hidden dim) or ``other``.
    """

    axis: int
    size: int
    members: list[GroupMember] = field(default_factory=list)
    kind: str = "other"
    frozen: str | None = None
    granularity: int = 1  # channels per group unit (head_dim for heads), for reporting widths
    suffix: str = ""  # "#1", "#2" when another group starts with the same parameter dim

    @property
    def prunable(self) -> bool:
        return self.frozen is None and self.size > 1

    @property
    def name(self) -> str:
        """A readable, stable name: the kind and the first member's parameter."""
        first = self.members[0]
        return f"{self.kind}:{first.param}[{first.dim}]{self.suffix}"

    def params(self) -> list[str]:
        return sorted({m.param for m in self.members})

    def describe(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "size": self.size,
            "prunable": self.prunable,
            "frozen": self.frozen,
            "members": [f"{m.param}[{m.dim}]" for m in self.members],
        }


def classify(members: list[GroupMember], factor_positions: set[str], attention_summed: bool = False) -> str:
    """Name a group from how its channels appear in parameters (see :class:`ChannelGroup`).
    ``attention_summed``: a product of two activations sums over the group's axis (q·k). Such a
    linear-to-linear group is a head-dim even when no reshape splits heads out of it (one head)."""
    if "outer" in factor_positions:
        return "head"
    if "inner" in factor_positions:
        return "head_dim"
    norms = sum(1 for m in members if "norm" in m.roles)
    if norms >= 2:
        return "residual"
    roles = [set(m.roles) for m in members]
    if any("linear_out" in r for r in roles) and any("linear_in" in r for r in roles):
        return "head_dim" if attention_summed else "hidden"
    return "other"
