"""Checkpoints in the layout of HetDPT's released code (``Efficient-AI-for-All/HetDPT``,
``hetdpt/models_pruned.py``): a DeiT whose blocks each lost their attention, their activation, both,
or nothing. The layout is a frontend concern, so it lives here and nowhere in deps/ or passes/.

Why a loader of our own: their classes need their repository on the path (and timm's old
``timm.models.layers`` names), while vitprune only needs the function. :class:`HetDPTViT` is a plain
module with the same parameter names, so their state dict loads into it as it is, and it captures
with :func:`vitprune.frontend.capture.capture` like any timm model.

What their layout says, per block ``i`` (``blocks.{i}.…``):

* attention kept: ``attn.qkv.{weight,bias}`` and ``attn.proj.{weight,bias}``; attention removed
  (their ``Block_attn`` / ``Block_no_act_no_attn``): no ``attn.*`` keys, ``norm1`` kept, and the block
  computes ``x + norm1(x)`` (the branch becomes the identity after the norm; vitprune's
  ``identity_norm`` removal computes the same);
* activation kept: ``mlp.fc1`` → GELU → ``mlp.fc2``; activation removed (``MLP_no_act``):
  ``mlp.fc1`` → ``mlp.fc2`` with nothing between (the keys are the same as with the GELU, so only
  the list says which), or, after their ``merge_mlp_model``, one linear ``mlp.{weight,bias}`` with
  ``W = W2·W1``, ``b = W2·b1 + b2``;
* both removed (``Block_no_act_no_attn``): their forward applies a GELU to the block's output. That
  GELU is part of neither removal; vitprune's own removals do not add it. ``extra_gelu=True``
  reproduces their forward exactly; the default (False) is vitprune's function.

Which blocks were pruned is not stored in the weights: their scripts take it on the command line
(``--prune_layer_attn '[0,3,7,8,11]' --prune_layer_act '[2,7,8,10,11]'``) and their training scripts
pickle those strings in the checkpoint under ``args`` (an ``argparse.Namespace``, which only a
trusted load reads). Removed attention is read from the keys; removed activations from merged MLPs,
from ``args``, or from the list given here.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitprune.errors import InputError, LoadError

#: The ``--arch`` kind of this layout: ``hetdpt`` or ``hetdpt:NAME`` with NAME from :data:`ARCHES`.
ARCH_KIND = "hetdpt"
#: Names registered in HetDPT's hetdpt/models_pruned.py (and short forms) → (embed dim, heads,
#: distilled or None for either). A bare ``hetdpt`` infers the dim and takes heads = dim // 64.
ARCHES: dict[str, tuple[int, int, bool | None]] = {
    "deit_tiny": (192, 3, None),
    "deit_small": (384, 6, None),
    "deit_base": (768, 12, None),
    "deit_tiny_patch16_224_copy_lambda_shrink": (192, 3, False),
    "deit_small_patch16_224_copy_lambda_shrink": (384, 6, False),
    "deit_base_patch16_224_copy_lambda_shrink": (768, 12, False),
    "deit_small_distilled_patch16_224_lambda_shrink": (384, 6, True),
    "deit_base_distilled_patch16_224_lambda_shrink": (768, 12, True),
}
_EPS = 1e-6  # their DeiT factories build every LayerNorm with eps=1e-6
_HEAD_DIM = 64  # every DeiT has 64-channel heads
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")


@dataclass(frozen=True)
class HetDPTOptions:
    """What the weights do not say. Lists accept ints or HetDPT's own strings (``"[0,3,7]"``,
    ``"0,3,7"``, ``""`` for none). ``None`` means: read it from the checkpoint (keys, merged MLPs,
    its pickled ``args``). ``merge_mlp`` folds an unmerged activation-free ``fc2∘fc1`` into one linear,
    as their evaluate.py does before measuring; ``num_heads`` overrides the name / dim // 64 rule."""

    removed_attention: tuple[int, ...] | None = None
    removed_activation: tuple[int, ...] | None = None
    extra_gelu: bool = False
    merge_mlp: bool = True
    num_heads: int | None = None

    def __post_init__(self) -> None:
        for name, flag in (("removed_attention", "--prune-layer-attn"), ("removed_activation", "--prune-layer-act")):
            object.__setattr__(self, name, parse_layers(getattr(self, name), flag))
        if self.num_heads is not None and (isinstance(self.num_heads, bool) or not isinstance(self.num_heads, int)
                                           or self.num_heads < 1):
            raise InputError(f"num_heads must be an integer >= 1, got {self.num_heads!r}")


def parse_layers(value: Any, flag: str) -> tuple[int, ...] | None:
    """Block indices from ints or text such as HetDPT's ``'[2,7,8]'``, sorted; ``None`` stays None.
    Text is parsed by hand, never ``eval``-ed as their scripts do."""
    if value is None:
        return None
    if isinstance(value, str):
        body = value.strip().removeprefix("[").removesuffix("]").strip()
        parts = [p.strip() for p in body.split(",")] if body else []
        if not all(p.isdigit() for p in parts):
            raise InputError(f"{flag} must list block indices like 0,3,7 or [0,3,7], got {value!r}")
        value = [int(p) for p in parts]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                      for v in value):
        raise InputError(f"{flag} must list block indices >= 0, got {value!r}")
    if len(set(value)) != len(value):
        raise InputError(f"{flag} lists a block twice: {list(value)}")
    return tuple(sorted(value))


def arch_name(arch: str | None) -> str | None:
    """``""`` for ``--arch hetdpt``, NAME for ``hetdpt:NAME``, None for any other arch."""
    if arch == ARCH_KIND:
        return ""
    if arch is not None and arch.startswith(ARCH_KIND + ":"):
        return arch[len(ARCH_KIND) + 1:]
    return None


# ---------------------------------------------------------------------------------------------- the module
class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided conv; ``img_size`` tells vitprune the input size."""

    def __init__(self, in_chans: int, dim: int, patch: tuple[int, int], img_size: tuple[int, int]):
        super().__init__()
        self.img_size = img_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with scale head_dim ** -0.5 (their ``Attention``, through SDPA)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """fc1 → GELU → fc2, or fc1 → fc2 when the activation was removed (their ``MLP_no_act``)."""

    def __init__(self, dim: int, hidden: int, gelu: bool):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU() if gelu else nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


@dataclass(frozen=True)
class BlockSpec:
    """One block as the checkpoint has it: attention kept?, activation kept?, MLP merged into one
    linear?, MLP hidden width (the merged linear's output width when merged), qkv bias?"""

    attention: bool
    activation: bool
    merged: bool
    hidden: int
    qkv_bias: bool = True


class Block(nn.Module):
    """A pre-norm block; a removed attention leaves ``x + norm1(x)`` and ``out_gelu`` adds HetDPT's
    GELU after a block with both attention and activation removed."""

    def __init__(self, dim: int, num_heads: int, spec: BlockSpec, out_gelu: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_EPS)
        self.attn = Attention(dim, num_heads, spec.qkv_bias) if spec.attention else None
        self.norm2 = nn.LayerNorm(dim, eps=_EPS)
        self.mlp: nn.Module = nn.Linear(dim, dim) if spec.merged else Mlp(dim, spec.hidden, spec.activation)
        self.out_gelu = out_gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + (self.attn(y) if self.attn is not None else y)
        x = x + self.mlp(self.norm2(x))
        return F.gelu(x) if self.out_gelu else x


@dataclass(frozen=True)
class HetDPTLayout:
    """Everything needed to build the module, as read from a checkpoint."""

    dim: int
    num_heads: int
    in_chans: int
    patch: tuple[int, int]
    grid: tuple[int, int]
    num_classes: int
    distilled: bool
    blocks: tuple[BlockSpec, ...]


class HetDPTViT(nn.Module):
    """HetDPT's pruned DeiT (plain or distilled) at inference: the distilled one returns the mean of
    its two heads' logits, as theirs does in eval mode. ``extra_gelu`` says whether the blocks with
    both attention and activation removed end in their GELU."""

    def __init__(self, layout: HetDPTLayout, extra_gelu: bool = False):
        super().__init__()
        d = layout.dim
        img = (layout.grid[0] * layout.patch[0], layout.grid[1] * layout.patch[1])
        self.patch_embed = PatchEmbed(layout.in_chans, d, layout.patch, img)
        tokens = 2 if layout.distilled else 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d)) if layout.distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, layout.grid[0] * layout.grid[1] + tokens, d))
        self.blocks = nn.ModuleList(
            Block(d, layout.num_heads, s, extra_gelu and not s.attention and not s.activation) for s in layout.blocks)
        self.norm = nn.LayerNorm(d, eps=_EPS)
        self.head = nn.Linear(d, layout.num_classes) if layout.num_classes else nn.Identity()
        self.head_dist = (nn.Linear(d, layout.num_classes) if layout.num_classes else nn.Identity()) \
            if layout.distilled else None
        self.num_classes = layout.num_classes
        self.layout = layout
        self.extra_gelu = extra_gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        b = x.shape[0]
        first = [self.cls_token.expand(b, -1, -1)]
        if self.dist_token is not None:
            first.append(self.dist_token.expand(b, -1, -1))
        x = torch.cat([*first, x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        if self.head_dist is None:
            return self.head(x[:, 0])
        return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2


# ---------------------------------------------------------------------------------------------- loading
def load_hetdpt(state_dict: Mapping[str, torch.Tensor], removed_attention: Any = None,
                removed_activation: Any = None, *, extra_gelu: bool = False, merge_mlp: bool = True,
                num_heads: int | None = None, name: str = "", where: str = "state dict") -> HetDPTViT:
    """A :class:`HetDPTViT` holding ``state_dict`` (HetDPT's key layout), in eval mode.

    Widths, depth, patch size, grid and class count come from the tensors' shapes; heads from
    ``num_heads``, else ``name`` (:data:`ARCHES`), else dim // 64. Anything that is not this layout is a
    :class:`LoadError` naming the first missing or unexpected key."""
    opts = HetDPTOptions(removed_attention, removed_activation, extra_gelu, merge_mlp, num_heads)
    layout = read_layout(state_dict, opts, name=name, where=where)
    model = HetDPTViT(layout, extra_gelu=opts.extra_gelu)
    _check_keys(model, state_dict, where)
    model.load_state_dict(dict(state_dict), strict=True)
    if opts.merge_mlp:
        _merge_mlps(model)
    return model.eval()


def load_checkpoint(checkpoint: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], opts: HetDPTOptions,
                    *, name: str, where: str) -> HetDPTViT:
    """:func:`load_hetdpt` for a loaded checkpoint file: pruning lists not given in ``opts`` are
    taken from its pickled ``args`` (their training scripts save them there), and a list given both
    ways must agree."""
    saved = _saved_lists(checkpoint, where)
    lists = []
    for attr, flag in (("removed_attention", "--prune-layer-attn"), ("removed_activation", "--prune-layer-act")):
        given, stored = getattr(opts, attr), saved.get(attr)
        if given is not None and stored is not None and given != stored:
            raise LoadError(f"{where}: {flag} {','.join(map(str, given))} differs from the list saved in the "
                            f"checkpoint's args ({list(stored)}); drop {flag} or correct it")
        lists.append(given if given is not None else stored)
    return load_hetdpt(state_dict, lists[0], lists[1], extra_gelu=opts.extra_gelu, merge_mlp=opts.merge_mlp,
                       num_heads=opts.num_heads, name=name, where=where)


def _saved_lists(checkpoint: Mapping[str, Any], where: str) -> dict[str, tuple[int, ...] | None]:
    """``prune_layer_attn`` / ``prune_layer_act`` from a checkpoint's ``args``, when it has them."""
    args = checkpoint.get("args") if isinstance(checkpoint, Mapping) else None
    out: dict[str, tuple[int, ...] | None] = {}
    for attr, key in (("removed_attention", "prune_layer_attn"), ("removed_activation", "prune_layer_act")):
        value = args.get(key) if isinstance(args, Mapping) else getattr(args, key, None)
        if value is not None:
            try:
                out[attr] = parse_layers(value, f"args.{key}")
            except InputError as e:
                raise LoadError(f"{where}: the checkpoint's {e}") from None
    return out


def read_layout(sd: Mapping[str, torch.Tensor], opts: HetDPTOptions, *, name: str = "",
                where: str = "state dict") -> HetDPTLayout:
    """The architecture ``sd`` encodes; see the module docstring for the keys read."""
    for key in ("patch_embed.proj.weight", "cls_token", "pos_embed", "norm.weight"):
        if key not in sd:
            raise LoadError(f"{where} is not in HetDPT's DeiT layout: missing key {key}")
    w = sd["patch_embed.proj.weight"]
    if w.dim() != 4:
        raise LoadError(f"{where}: patch_embed.proj.weight is {list(w.shape)}, not a 4-D conv weight")
    dim, in_chans, patch = int(w.shape[0]), int(w.shape[1]), (int(w.shape[2]), int(w.shape[3]))
    distilled = "dist_token" in sd
    grid = _grid(sd["pos_embed"], 2 if distilled else 1, where)
    head = sd.get("head.weight")
    num_classes = int(head.shape[0]) if isinstance(head, torch.Tensor) and head.dim() == 2 else 0
    heads = _num_heads(dim, distilled, opts.num_heads, name, where)
    blocks = _block_specs(sd, opts, where)
    return HetDPTLayout(dim, heads, in_chans, patch, grid, num_classes, distilled, blocks)


def _grid(pos: torch.Tensor, tokens: int, where: str) -> tuple[int, int]:
    n = int(pos.shape[1]) - tokens if pos.dim() == 3 else -1
    side = math.isqrt(n) if n > 0 else 0
    if side * side != n or n <= 0:
        raise LoadError(f"{where}: pos_embed is {list(pos.shape)}, not (1, {tokens} + a square number of "
                        f"patches, dim); HetDPT's layout keeps {tokens} extra token(s)")
    return (side, side)


def _num_heads(dim: int, distilled: bool, given: int | None, name: str, where: str) -> int:
    if name and name not in ARCHES:
        raise InputError(f"unknown HetDPT architecture {name!r}; use --arch hetdpt or hetdpt:NAME with NAME one "
                         f"of {', '.join(ARCHES)}")
    if name:
        want_dim, heads, want_distilled = ARCHES[name]
        if dim != want_dim:
            raise LoadError(f"{where}: embed dim {dim} (patch_embed.proj.weight) is not {name}'s {want_dim}")
        if want_distilled is not None and want_distilled != distilled:
            what = "missing key dist_token" if want_distilled else "unexpected key dist_token"
            raise LoadError(f"{where} does not fit {name}: {what}")
    else:
        heads = dim // _HEAD_DIM if dim % _HEAD_DIM == 0 else 0
    heads = given or heads
    if not heads or dim % heads:
        raise LoadError(f"{where}: cannot split embed dim {dim} into heads; pass num_heads (a divisor of {dim})")
    return heads


def _block_specs(sd: Mapping[str, torch.Tensor], opts: HetDPTOptions, where: str) -> tuple[BlockSpec, ...]:
    """Per block: attention from the keys, activation from merged MLPs or the list (checked)."""
    found = [int(m.group(1)) for k in sd if (m := _BLOCK_KEY.match(k))]
    if not found:
        raise LoadError(f"{where} is not in HetDPT's DeiT layout: missing key blocks.0.norm1.weight")
    depth = max(found) + 1
    _check_range(opts.removed_attention, depth, "--prune-layer-attn", where)
    _check_range(opts.removed_activation, depth, "--prune-layer-act", where)
    merged = {i for i in range(depth) if f"blocks.{i}.mlp.weight" in sd}
    removed_act = opts.removed_activation
    if removed_act is None:
        if not merged:
            raise LoadError(f"{where}: which activations HetDPT removed is not in its weights (fc1/fc2 keys are "
                            f"the same with or without the GELU): pass --prune-layer-act, HetDPT's "
                            f"--prune_layer_act (e.g. 2,7,8,10,11; an empty list for none)")
        removed_act = tuple(sorted(merged))
    specs = []
    for i in range(depth):
        attention = f"blocks.{i}.attn.qkv.weight" in sd
        _check_listed(i, attention, opts.removed_attention, f"blocks.{i}.attn.qkv.weight", "--prune-layer-attn", where)
        if i in merged and i not in removed_act:
            raise LoadError(f"{where}: unexpected key blocks.{i}.mlp.weight: a merged MLP means block {i}'s "
                            f"activation was removed, but --prune-layer-act does not list {i}")
        key = f"blocks.{i}.mlp.weight" if i in merged else f"blocks.{i}.mlp.fc1.weight"
        hidden = int(sd[key].shape[0]) if key in sd and sd[key].dim() == 2 else 1
        specs.append(BlockSpec(attention, i not in removed_act, i in merged, hidden,
                               f"blocks.{i}.attn.qkv.bias" in sd or not attention))
    return tuple(specs)


def _check_range(listed: tuple[int, ...] | None, depth: int, flag: str, where: str) -> None:
    if listed and listed[-1] >= depth:
        raise LoadError(f"{where} has {depth} blocks (0-{depth - 1}), but {flag} lists block {listed[-1]}")


def _check_listed(i: int, present: bool, listed: tuple[int, ...] | None, key: str, flag: str, where: str) -> None:
    """A removal list, when given, must agree with the keys of block ``i``."""
    if listed is None:
        return
    if present and i in listed:
        raise LoadError(f"{where}: unexpected key {key}: {flag} lists block {i} as removed")
    if not present and i not in listed:
        raise LoadError(f"{where}: missing key {key} (block {i} is not in {flag})")


def _check_keys(model: nn.Module, sd: Mapping[str, torch.Tensor], where: str) -> None:
    """The first key the layout misses or does not expect, or whose shape differs, as a LoadError."""
    own = model.state_dict()
    for key, t in own.items():
        if key not in sd:
            raise LoadError(f"{where} is not in HetDPT's DeiT layout: missing key {key}")
        got = sd[key]
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(t.shape):
            shape = list(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise LoadError(f"{where}: {key} is {shape}, the layout read from the other keys needs {list(t.shape)}")
    extra = next((k for k in sd if k not in own), None)
    if extra is not None:
        raise LoadError(f"{where} is not in HetDPT's DeiT layout: unexpected key {extra}")


@torch.no_grad()
def _merge_mlps(model: HetDPTViT) -> None:
    """Replace each activation-free ``fc2∘fc1`` by one linear (``W2·W1``, ``W2·b1 + b2``), the same
    float32 arithmetic as their ``merge_mlp_model``, so the merged forward is theirs."""
    for blk in model.blocks:
        mlp = blk.mlp
        if isinstance(mlp, Mlp) and isinstance(mlp.act, nn.Identity):
            merged = nn.Linear(mlp.fc1.in_features, mlp.fc2.out_features)
            merged.weight.copy_(mlp.fc2.weight @ mlp.fc1.weight)
            merged.bias.copy_(mlp.fc1.bias @ mlp.fc2.weight.t() + mlp.fc2.bias)
            blk.mlp = merged
