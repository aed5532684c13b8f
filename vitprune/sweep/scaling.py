"""Architecture mapping: a compressed architecture rebuilt on another (larger) model, for latency.

An architecture is a recipe without *which* channels (:func:`recipe_shapes`); :func:`scale_recipe`
maps it block by block and group by group onto the scale model, and :func:`recipe_scale` replays
the result there (random weights: only the shapes matter for timing).
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from torch import nn

from vitprune.deps.tokens import analyse_tokens
from vitprune.driver.pipeline import analyse, replay
from vitprune.errors import PlanError
from vitprune.sweep.config import METHODS, SweepConfig

_BLOCK = re.compile(r"(blocks\.)(\d+)(\.)")


def recipe_shapes(recipe: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A recipe with width keeps replaced by counts: the architecture, without which channels."""
    out = []
    for step in recipe:
        step = json.loads(json.dumps(step))
        if step.get("pass") == "width":
            step = {"pass": "width", "counts": {k: len(v) for k, v in step["keep"].items()}}
        out.append(step)
    return out


def block_map(src_depth: int, dst_depth: int) -> list[int]:
    """dst block j ↦ src block ⌊j·S/D⌋ (12 blocks from 6: each src block becomes two)."""
    return [j * src_depth // dst_depth for j in range(dst_depth)]


def _depth_of(model: nn.Module) -> int:
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise PlanError("architecture mapping needs a model with .blocks")
    return len(blocks)


def _group_sizes(model: nn.Module, size: Sequence[int]) -> dict[str, int]:
    _, dg = analyse(model, tuple(size))
    return {g.name: g.size for g in dg.groups if g.prunable}


def _patches(model: nn.Module, size: Sequence[int]) -> int:
    gm, _ = analyse(model, tuple(size))
    return analyse_tokens(gm).num_patches


def _round_width(count: int, src: int, dst: int, kind: str, round_to: int) -> int:
    unit = 1 if kind == "head" else min(round_to, dst)
    n = max(unit, int(round(count / src * dst / unit)) * unit)
    return min(dst, n)


@dataclass
class _Mapping:
    """The two models, their block correspondence, and what earlier steps removed (src blocks)."""

    src_model: nn.Module
    src_size: Sequence[int]
    dst_model: nn.Module
    dst_size: Sequence[int]
    round_to: int
    src_depth: int = 0
    dst_depth: int = 0
    bmap: list[int] = field(default_factory=list)
    removed_attention: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.src_depth, self.dst_depth = _depth_of(self.src_model), _depth_of(self.dst_model)
        self.bmap = block_map(self.src_depth, self.dst_depth)

    def dst_blocks_of(self, src_blocks: Sequence[int]) -> list[int]:
        return [j for j in range(self.dst_depth) if self.bmap[j] in src_blocks]


def _map_removal(step: dict[str, Any], mapping: _Mapping) -> dict[str, Any]:
    if step["pass"] == "attention":
        mapping.removed_attention |= set(step["blocks"])
    return dict(step, blocks=mapping.dst_blocks_of(step["blocks"]))


def _source_name(name: str, src_sizes: dict[str, int]) -> str:
    """The group's name in the unpruned source model. Recipes written before one-head attentions were
    recognised (:func:`~vitprune.deps.groups.classify`) name such a block's head-dim group ``hidden``
    under the same first parameter dim: it is the source's ``head_dim`` group."""
    if name in src_sizes:
        return name
    kind, _, rest = name.partition(":")
    if kind == "hidden" and f"head_dim:{rest}" in src_sizes:
        return f"head_dim:{rest}"
    raise PlanError(f"cannot map width group {name}: not in the source model")


def _map_width(step: dict[str, Any], mapping: _Mapping, src_sizes: dict[str, int],
               dst_sizes: dict[str, int]) -> dict[str, Any]:
    keep: dict[str, list[int]] = {}
    for name, count in step["counts"].items():
        source = _source_name(name, src_sizes)
        m = _BLOCK.search(source)
        targets = ([_BLOCK.sub(lambda mm: f"{mm.group(1)}{j}{mm.group(3)}", source, count=1)
                    for j in mapping.dst_blocks_of([int(m.group(2))])] if m else [source])
        for t in targets:
            if t not in dst_sizes:
                raise PlanError(f"cannot map width group {name}: {t} not in the scale model")
            kind = t.partition(":")[0]
            n = _round_width(count, src_sizes[source], dst_sizes[t], kind, mapping.round_to)
            keep[t] = list(range(n))
    return {"pass": "width", "keep": keep}


def _map_tokens(step: dict[str, Any], mapping: _Mapping) -> dict[str, Any]:
    p_src = _patches(mapping.src_model, mapping.src_size)
    p_dst = _patches(mapping.dst_model, mapping.dst_size)
    src_blocks = [b for b in range(mapping.src_depth) if b not in mapping.removed_attention]
    dst_blocks = [j for j in range(mapping.dst_depth) if mapping.bmap[j] not in mapping.removed_attention]
    if len(step["keep"]) != len(src_blocks):
        raise PlanError(f"token keep list has {len(step['keep'])} entries for {len(src_blocks)} attention blocks")
    by_block = dict(zip(src_blocks, step["keep"]))
    keep_dst = []
    for j in dst_blocks:
        k = by_block[mapping.bmap[j]]
        keep_dst.append(None if k is None else max(1, min(p_dst, int(round(k / p_src * p_dst)))))
    for i in range(1, len(keep_dst)):  # cascade: never more tokens than the block before
        if keep_dst[i] is not None and keep_dst[i - 1] is not None:
            keep_dst[i] = min(keep_dst[i], keep_dst[i - 1])
    return {"pass": "tokens", "keep": keep_dst}


def _map_merging(step: dict[str, Any], mapping: _Mapping) -> dict[str, Any]:
    """Each dst block merges the same fraction of the patch tokens as its src block (the pass caps it)."""
    p_src = _patches(mapping.src_model, mapping.src_size)
    p_dst = _patches(mapping.dst_model, mapping.dst_size)
    src_blocks = [b for b in range(mapping.src_depth) if b not in mapping.removed_attention]
    dst_blocks = [j for j in range(mapping.dst_depth) if mapping.bmap[j] not in mapping.removed_attention]
    if len(step["r"]) != len(src_blocks):
        raise PlanError(f"merge schedule has {len(step['r'])} entries for {len(src_blocks)} attention blocks")
    by_block = dict(zip(src_blocks, step["r"]))
    return {"pass": "merging", "r": [int(round(by_block[mapping.bmap[j]] / p_src * p_dst)) for j in dst_blocks]}


def scale_recipe(steps: list[dict[str, Any]], src_model: nn.Module, src_size: Sequence[int],
                 dst_model: nn.Module, dst_size: Sequence[int], *, round_to: int = 16) -> list[dict[str, Any]]:
    """Map an architecture (``recipe_shapes`` output) from ``src_model`` onto ``dst_model``.

    * blocks: dst block ``j`` copies src block ``⌊j·S/D⌋`` (depth 6 → 12: block ``i`` becomes blocks
      ``2i`` and ``2i+1``), so removed attention branches / activations keep their *fraction* and
      their place in the depth;
    * widths: every group keeps the same fraction of its channels (``kind:blocks.i.…`` maps to
      ``kind:blocks.j.…`` for the dst blocks of ``i``; the residual stream by name), rounded to
      multiples of ``round_to`` (heads: whole heads); the first channels are kept (random weights);
    * tokens: each dst block keeps the same fraction of its patch tokens as its src block (prefix
      tokens always stay), over the blocks that still have attention; merging: each dst block merges
      the same fraction of the patch tokens as its src block.
    """
    mapping = _Mapping(src_model, src_size, dst_model, dst_size, round_to)
    src_sizes, dst_sizes = _group_sizes(src_model, src_size), _group_sizes(dst_model, dst_size)
    out: list[dict[str, Any]] = []
    for step in steps:
        kind = step.get("pass")
        if kind in ("attention", "activation"):
            out.append(_map_removal(step, mapping))
        elif kind == "width":
            out.append(_map_width(step, mapping, src_sizes, dst_sizes))
        elif kind == "tokens":
            out.append(_map_tokens(step, mapping))
        elif kind == "merging":
            out.append(_map_merging(step, mapping))
        else:
            raise PlanError(f"cannot map recipe step {kind!r}")
    return out


def recipe_scale(arch: dict[str, Any], src_model: nn.Module, src_size: Sequence[int], dst_model: nn.Module,
                 dst_size: Sequence[int], config: SweepConfig) -> nn.Module:
    """:attr:`Method.scale` for the vitprune methods: map the recipe, replay it on ``dst_model``."""
    steps = scale_recipe(arch["steps"], src_model, src_size, dst_model, dst_size, round_to=16)
    return replay(dst_model, steps, tuple(dst_size)).eval()


def rebuild(method: str, arch: dict[str, Any], model: nn.Module, size: Sequence[int], config: SweepConfig) -> nn.Module:
    """The architecture ``arch`` of a ``method`` point rebuilt on the model it was compressed from,
    with the same shapes and other channels (the first ones): what a point's latency depends on, so
    its ONNX can be re-timed after the file itself is gone (a sweep resumed in another session)."""
    if arch.get("kind") == "recipe":
        steps = [{"pass": "width", "keep": {g: list(range(n)) for g, n in step["counts"].items()}}
                 if step.get("pass") == "width" and "counts" in step else step for step in arch["steps"]]
        return replay(model, steps, tuple(size)).eval()
    return METHODS[method].scale(arch, model, size, copy.deepcopy(model).eval(), size, config).eval()
