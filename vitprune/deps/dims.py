"""Channel axes: the atoms the dependency graph couples.

Every dimension of every tensor in the traced graph is described by an *axis*. Axes live in a
union-find table: two axes are unified when an op forces their channels to be pruned together
(``x + y`` unifies the last dims of ``x`` and ``y``; ``F.linear`` unifies ``x[-1]`` with the weight's
input dim). An axis may be *refined* into smaller ones:

* ``prod``: a reshape splits a dim row-major into factors. ``qkv(x).reshape(B, N, 3, H, D)`` refines
  the qkv output axis (3·H·D) into the factors ``[3, H, D]``; pruning factor ``H`` index ``h`` removes
  every row whose head coordinate is ``h`` — that is what pruning a head means.
* ``cat``: ``torch.cat``/``split`` refine a dim into consecutive segments.

When two refined axes are unified, both are refined to their common refinement (``[3, 384]`` and
``[3, 6, 64]`` become ``[3, 6, 64]``) and unified factor by factor. Refinements that do not nest (a
``[4, 6]`` view of a ``[6, 4]`` dim, or a ``prod`` meeting a ``cat``) cannot be pruned consistently,
so every axis involved is *frozen*. Only unrefined axes ("leaves") are pruned; a frozen leaf never is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod as _prod

import numpy as np

PROD, CAT = "prod", "cat"


class DimMismatch(Exception):
    """Two axes of different sizes were unified: a rule is wrong for this op (internal)."""


@dataclass
class AxisTable:
    """Union-find over channel axes with row-major (``prod``) and segment (``cat``) refinement."""

    _parent: list[int] = field(default_factory=list)
    _size: list[int] = field(default_factory=list)
    _frozen: list[str | None] = field(default_factory=list)  # reason, on roots
    _split: dict[int, tuple[str, list[int]]] = field(default_factory=dict)

    # -- construction -------------------------------------------------------------------------
    def new(self, size: int, frozen: str | None = None) -> int:
        self._parent.append(len(self._parent))
        self._size.append(int(size))
        self._frozen.append(frozen)
        return len(self._parent) - 1

    def product(self, children: list[int]) -> int:
        """An axis laid out row-major over ``children`` (outermost first).

        Size-1 factors carry no channel and are dropped; a single factor is the axis itself (so an
        axis is never refined into a copy of itself)."""
        children = [c for c in children if self.size(c) != 1]
        if len(children) == 1:
            return children[0]
        axis = self.new(_prod(self.size(c) for c in children))
        if children:
            self._split[axis] = (PROD, children)
        return axis

    def concat(self, children: list[int]) -> int:
        """An axis made of the segments ``children`` in order (empty segments dropped)."""
        children = [c for c in children if self.size(c) != 0]
        if len(children) == 1:
            return children[0]
        axis = self.new(sum(self.size(c) for c in children))
        if children:
            self._split[axis] = (CAT, children)
        return axis

    def split(self, axis: int, sizes: list[int], kind: str) -> list[int]:
        """Refine ``axis`` into pieces of ``sizes`` (``prod`` factors or ``cat`` segments).

        Returns one axis per piece. If the axis is already refined incompatibly, everything
        involved is frozen and the pieces still come back (frozen), so callers need no branch.
        """
        pieces = [self.new(s) for s in sizes]
        fresh = self.product(pieces) if kind == PROD else self.concat(pieces)
        if fresh in pieces:  # a trivial split (one real piece): the piece is the axis
            self.unify(axis, fresh)
            return pieces
        self.unify(axis, fresh)
        return pieces

    # -- queries ------------------------------------------------------------------------------
    def find(self, a: int) -> int:
        parent = self._parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:  # path compression
            parent[a], a = root, parent[a]
        return root

    def size(self, a: int) -> int:
        return self._size[self.find(a)]

    def refinement(self, a: int) -> tuple[str, list[int]] | None:
        return self._split.get(self.find(a))

    def leaves(self, a: int) -> list[int]:
        """The unrefined root axes ``a`` is made of, outermost/first first."""
        root = self.find(a)
        sp = self._split.get(root)
        if sp is None:
            return [root]
        return [leaf for child in sp[1] for leaf in self.leaves(child)]

    def _leaf_set(self, a: int) -> set[int]:
        root = self.find(a)
        sp = self._split.get(root)
        if sp is None:
            return set()
        out: set[int] = set()
        for c in sp[1]:
            rc = self.find(c)
            out.add(rc)
            out |= self._leaf_set(rc)
        return out

    def frozen_reason(self, a: int) -> str | None:
        return self._frozen[self.find(a)]

    def is_frozen(self, a: int) -> bool:
        return any(self._frozen[leaf] is not None for leaf in self.leaves(a))

    # -- coupling -----------------------------------------------------------------------------
    def freeze(self, a: int, reason: str) -> None:
        """Mark every leaf of ``a`` unprunable (first reason wins)."""
        for leaf in self.leaves(a):
            if self._frozen[leaf] is None:
                self._frozen[leaf] = reason

    def unify(self, a: int, b: int) -> None:
        """Couple two axes of equal size channel by channel."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if rb in self._leaf_set(ra) or ra in self._leaf_set(rb):
            # one is made of the other (x = cat(x, empty)): they are the same channels already
            return
        if self._size[ra] != self._size[rb]:
            raise DimMismatch(f"cannot couple a dim of size {self._size[ra]} with one of size {self._size[rb]}")
        sa, sb = self._split.get(ra), self._split.get(rb)
        if sa is not None and sb is not None:
            if sa[0] != sb[0] or not self._unify_refined(ra, rb, sa[0]):
                reason = f"incompatible reshapes of one dim ({sa[0]} {self._sizes(sa[1])} vs {sb[0]} {self._sizes(sb[1])})"
                self.freeze(ra, reason)
                self.freeze(rb, reason)
            ra, rb = self.find(ra), self.find(rb)
            if ra == rb:
                return
        frozen = self._frozen[ra] or self._frozen[rb]
        self._parent[ra] = rb
        if sb is None and sa is not None:
            self._split[rb] = sa
        self._split.pop(ra, None)
        if frozen:
            self._frozen[rb] = frozen
            self.freeze(rb, frozen)

    # -- masks --------------------------------------------------------------------------------
    def mask(self, a: int, keep: dict[int, np.ndarray]) -> np.ndarray:
        """Boolean keep-mask over ``a``'s channels given keep-masks for some leaves."""
        root = self.find(a)
        sp = self._split.get(root)
        if sp is None:
            m = keep.get(root)
            return np.ones(self._size[root], dtype=bool) if m is None else m
        kind, children = sp
        masks = [self.mask(c, keep) for c in children]
        if kind == CAT:
            return np.concatenate(masks)
        out = np.ones(1, dtype=bool)
        for m in masks:
            out = np.logical_and.outer(out, m).ravel()
        return out

    def kept_size(self, a: int, counts: dict[int, int]) -> int:
        """Number of channels of ``a`` kept when leaf ``r`` keeps ``counts[r]`` (default: all)."""
        root = self.find(a)
        sp = self._split.get(root)
        if sp is None:
            return counts.get(root, self._size[root])
        sizes = [self.kept_size(c, counts) for c in sp[1]]
        return sum(sizes) if sp[0] == CAT else _prod(sizes)

    def coords(self, a: int) -> dict[int, np.ndarray]:
        """For each leaf of ``a``: the leaf channel each position of ``a`` belongs to (-1: none)."""
        root = self.find(a)
        n = self._size[root]
        sp = self._split.get(root)
        if sp is None:
            return {root: np.arange(n)}
        kind, children = sp
        out: dict[int, np.ndarray] = {}
        if kind == CAT:
            start = 0
            for child in children:
                size = self.size(child)
                for leaf, c in self.coords(child).items():
                    full = out.setdefault(leaf, np.full(n, -1))
                    full[start:start + size] = np.where(c >= 0, c, full[start:start + size])
                start += size
            return out
        positions = np.arange(n)
        stride = n
        for child in children:
            size = self.size(child)
            stride //= size
            child_pos = (positions // stride) % size
            for leaf, c in self.coords(child).items():
                full = out.setdefault(leaf, np.full(n, -1))
                full[:] = np.where(c[child_pos] >= 0, c[child_pos], full)
        return out

    # -- internals ----------------------------------------------------------------------------
    def _sizes(self, axes: list[int]) -> list[int]:
        return [self.size(a) for a in axes]

    def _flat(self, a: int, kind: str) -> list[int]:
        root = self.find(a)
        sp = self._split.get(root)
        if sp is not None and sp[0] == kind:
            return [x for c in sp[1] for x in self._flat(c, kind)]
        trivial = self._size[root] == (1 if kind == PROD else 0)
        return [] if trivial else [root]

    def _bounds(self, axes: list[int], kind: str) -> list[int]:
        out, pos = [], 1 if kind == PROD else 0
        for a in axes:
            pos = pos * self.size(a) if kind == PROD else pos + self.size(a)
            out.append(pos)
        return out

    def _unify_refined(self, ra: int, rb: int, kind: str) -> bool:
        """Unify two refined axes through their common refinement; False if none exists."""
        fa, fb = self._flat(ra, kind), self._flat(rb, kind)
        cuts = sorted(set(self._bounds(fa, kind)) | set(self._bounds(fb, kind)))
        if kind == PROD and any(hi % lo for lo, hi in zip(cuts, cuts[1:])):
            return False
        for flat in (fa, fb):
            start = 1 if kind == PROD else 0
            for axis in flat:
                end = start * self.size(axis) if kind == PROD else start + self.size(axis)
                inner = [c for c in cuts if start < c < end]
                if inner:
                    edges = [start, *inner, end]
                    sizes = [hi // lo if kind == PROD else hi - lo for lo, hi in zip(edges, edges[1:])]
                    self.split(axis, sizes, kind)
                start = end
        fa, fb = self._flat(ra, kind), self._flat(rb, kind)
        if self._sizes(fa) != self._sizes(fb):
            return False
        for x, y in zip(fa, fb):
            self.unify(x, y)
        return True
