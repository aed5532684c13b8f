"""The accuracy/speedup Pareto sweep: every method × FLOPs target × seed, measured the same way.

For each point::

    prune (method registry) → top-1 before recovery → fine-tune (the same budget for every method,
    distillation from the original) → top-1 → ONNX export → ORT latency interleaved with the
    original's ONNX in the same run (speedup = original median / point median)

and, when a *scale model* is given (e.g. DeiT-S at 224×224 with random weights), the same compressed
**architecture** is rebuilt on it and timed against it the same way, so speedups are also measured
at a deployment-like size (see :func:`scale_recipe` for how an architecture is mapped).

Outputs in ``out_dir``: ``sweep.json`` (every point, written atomically after each one: the sweep is
resumable, a finished point — done, skipped or failed — is never recomputed), ``sweep.md`` (a table,
mean ± std over seeds) and ``sweep.png`` (top-1 vs ORT speedup, one line per method, the original
marked, the Pareto frontier highlighted). A point that cannot be planned (a :class:`PlanError`, e.g.
depth alone cannot reach a deep target) is recorded as ``skipped`` with the reason.

Methods are a registry (:data:`METHODS`, :func:`register`): a :class:`Method` turns
``(model, target, ctx)`` into a :class:`Pruned` (the pruned module, not yet fine-tuned, and a JSON
*architecture* that :attr:`Method.scale` can rebuild on another model). Built in: ``width``,
``boundarydpt``, ``boundarydpt+``, ``cpvit`` (vitprune), ``attention`` / ``activation`` (one kind of
depth removal only), ``combo`` (BoundaryDPT+ with a static token cut) and ``tp_width`` (Torch-Pruning's
recommended timm ViT recipe, the external baseline; needs ``torch-pruning``).

    from vitprune.sweep import SweepConfig, run_sweep
    result = run_sweep(model, train_loader, val_loader, SweepConfig(targets=(0.7, 0.5), epochs=2),
                       "out/sweep", input_size=(3, 32, 32))
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from vitprune.errors import InputError, PlanError

__all__ = ["METHODS", "Method", "Pruned", "PointContext", "ScaleModel", "SweepConfig", "format_markdown",
           "pareto_front", "plot_sweep", "rebench", "register", "run_sweep", "scale_recipe", "summarize"]

SWEEP_FORMAT = "vitprune-sweep"
SWEEP_VERSION = 1


# ---------------------------------------------------------------------------------------------- config
@dataclass
class SweepConfig:
    """What to sweep and with which (shared) budget. Every method gets exactly the same recovery:
    ``epochs`` of distillation from the original at ``lr`` with batch ``batch_size``."""

    targets: Sequence[float] = (0.9, 0.7, 0.5, 0.3)
    methods: Sequence[str] = ("width", "boundarydpt", "boundarydpt+", "cpvit")
    seeds: Sequence[int] = (0,)
    epochs: int = 1
    lr: float = 5e-4
    batch_size: int = 64
    importance: str = "l2"          # vitprune width importance (l2 | taylor)
    tp_importance: str = "l2"       # Torch-Pruning importance (l2 | taylor)
    round_to: int = 8               # vitprune width rounding at the swept model's size
    calib_batches: int = 4
    cpvit_heads: float | None = None  # cpvit: fraction of heads kept (None: tokens only)
    combo_tokens: str = "keep=0.7,start=2"
    threads: int = 1
    runs: int = 30
    warmup: int = 5
    scale_runs: int = 10
    scale_warmup: int = 2
    kd_weight: float = 1.0
    label_weight: float = 0.0
    progress: bool = True

    def __post_init__(self) -> None:
        self.targets = tuple(float(t) for t in self.targets)
        self.methods = tuple(self.methods)
        self.seeds = tuple(int(s) for s in self.seeds)
        if not self.targets or any(not (0.0 < t <= 1.0) for t in self.targets):
            raise InputError(f"sweep targets must be FLOPs fractions in (0, 1], got {list(self.targets)}")
        if not self.methods:
            raise InputError("sweep needs at least one method")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise InputError(f"unknown sweep method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
        if not self.seeds:
            raise InputError("sweep needs at least one seed")
        for name in ("epochs",):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
                raise InputError(f"sweep {name} must be an integer >= 0, got {getattr(self, name)!r}")
        for name in ("batch_size", "threads", "runs", "round_to", "calib_batches", "scale_runs"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise InputError(f"sweep {name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise InputError(f"sweep lr must be > 0, got {self.lr!r}")
        if self.importance not in ("l2", "taylor") or self.tp_importance not in ("l2", "taylor"):
            raise InputError("sweep importance / tp_importance must be l2 or taylor")

    def budget(self) -> dict[str, Any]:
        """The recovery budget every point shares (recorded with the results)."""
        return {"epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size,
                "kd_weight": self.kd_weight, "label_weight": self.label_weight}


@dataclass
class ScaleModel:
    """Another model to rebuild each compressed architecture on, for latency only (random weights)."""

    name: str
    factory: Callable[[], nn.Module]
    input_size: tuple[int, int, int]


@dataclass
class PointContext:
    """What a method may use to prune: calibration batches (images, labels), the seed, the config."""

    input_size: tuple[int, int, int]
    seed: int
    calib: list
    config: SweepConfig
    source: dict | None = None


@dataclass
class Pruned:
    """A method's output: the pruned module (not fine-tuned) and its architecture (JSON)."""

    model: nn.Module
    arch: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Method:
    """A sweep row. ``prune(model, target, ctx) -> Pruned`` (raise PlanError when the target cannot be
    planned); ``scale(arch, src_model, src_size, dst_model, dst_size, config) -> nn.Module`` rebuilds
    the architecture on another model (None: no scaled latency for this method)."""

    name: str
    label: str
    prune: Callable[[nn.Module, float, PointContext], Pruned]
    scale: Callable[..., nn.Module] | None = None


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add (or replace) a sweep method; returns it."""
    METHODS[method.name] = method
    return method


# ---------------------------------------------------------------------------------------------- vitprune methods
def _spec(ctx: PointContext, **kw: Any):
    from vitprune.spec import CompressSpec

    base = dict(importance=ctx.config.importance, round_to=ctx.config.round_to, seed=ctx.seed,
                calib_batches=max(1, len(ctx.calib)), input_size=tuple(ctx.input_size))
    base.update(kw)
    return CompressSpec(**base)


def _compress(model: nn.Module, ctx: PointContext, **kw: Any) -> Pruned:
    from vitprune.api import compress

    result = compress(model, _spec(ctx, **kw), example_input_size=ctx.input_size, source=ctx.source,
                      calib_data=ctx.calib)
    stages = result.report.get("stages", {})
    return Pruned(result.model, {"kind": "recipe", "steps": recipe_shapes(result.recipe)},
                  {"stages": json.loads(json.dumps(stages, default=str))})


def _vitprune_method(method: str) -> Callable[[nn.Module, float, PointContext], Pruned]:
    def prune(model: nn.Module, target: float, ctx: PointContext) -> Pruned:
        kw: dict[str, Any] = {"method": method, "target_flops": target}
        if method == "cpvit" and ctx.config.cpvit_heads is not None:
            kw["prune_heads_cpvit"] = ctx.config.cpvit_heads
        return _compress(model, ctx, **kw)

    return prune


def _one_kind(kind: str) -> Callable[[nn.Module, float, PointContext], Pruned]:
    """Remove layers of one kind only (attention branches or activations), fewest that meet the target,
    chosen by BoundaryDPT's one-shot scores on the calibration batches."""

    def prune(model: nn.Module, target: float, ctx: PointContext) -> Pruned:
        from vitprune.api import analyse
        from vitprune.plan.depth import depth_flops_options, one_shot_scores
        from vitprune.deps.flops import count_flops

        gm, _ = analyse(model, ctx.input_size)
        base = count_flops(gm, gm.meta["example_input"])
        attn, act = one_shot_scores(gm, ctx.calib)
        scores = attn if kind == "attention" else act
        order = sorted(scores, key=lambda b: (scores[b], b))
        options = depth_flops_options(gm, attention_order=order if kind == "attention" else [],
                                      activation_order=order if kind == "activation" else [])
        for n in range(len(order) + 1):
            key = (n, 0) if kind == "attention" else (0, n)
            if options[key] <= target * base * 1.0 + 0.01 * base:
                break
        else:
            best = options[(len(order), 0) if kind == "attention" else (0, len(order))] / base
            raise PlanError(f"{kind} removal alone reaches {best:.3f} of the FLOPs at best (target {target})")
        chosen = sorted(order[:n])
        lists = {"remove_attention": chosen} if kind == "attention" else {"remove_activation": chosen}
        return _compress(model, ctx, method="width", target_flops=None, **lists)

    return prune


def _combo(model: nn.Module, target: float, ctx: PointContext) -> Pruned:
    """BoundaryDPT+ (depth then width) with a static CP-ViT token cut: the FLOPs target given to the
    depth/width planner is corrected (once) for what the token cut removes afterwards."""
    from vitprune.api import analyse
    from vitprune.deps.flops import count_flops

    tokens = ctx.config.combo_tokens
    gm, _ = analyse(model, ctx.input_size)
    base = count_flops(gm, gm.meta["example_input"])
    token_only = _compress(model, ctx, target_flops=None, tokens=tokens)
    tau = count_flops(token_only.model, gm.meta["example_input"]) / base
    if tau <= target + 0.01:
        token_only.info["planner_target"] = None
        return token_only
    inner = min(1.0, target / tau)
    best = None
    for _ in range(2):
        pruned = _compress(model, ctx, method="boundarydpt+", target_flops=inner, tokens=tokens)
        achieved = count_flops(pruned.model, gm.meta["example_input"]) / base
        pruned.info["planner_target"] = inner
        if best is None or abs(achieved - target) < best[0]:
            best = (abs(achieved - target), pruned)
        if abs(achieved - target) <= 0.01 or inner >= 1.0:
            break
        inner = min(1.0, inner * target / achieved)
    return best[1]


# ---------------------------------------------------------------------------------------------- Torch-Pruning
def _tp_attention_forward(self, x, attn_mask=None, is_causal=False, **_: Any):
    """timm's Attention.forward as Torch-Pruning's ViT example rewrites it (``reshape(B, N, -1)`` so
    the attention width may differ from the input width), plus ``scale=self.scale``: the example
    leaves SDPA's default 1/sqrt(head_dim), which changes the function once head_dim shrinks; keeping
    the original scale is the fairer baseline."""
    import torch.nn.functional as F

    B, N, _ = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
    x = x.transpose(1, 2).reshape(B, N, -1)
    x = self.norm(x) if hasattr(self, "norm") else x
    x = self.proj(x)
    return self.proj_drop(x)


def tp_prune(model: nn.Module, ratio: float, input_size: Sequence[int], *, importance: str = "l2",
             calib: Iterable | None = None, round_to: int = 2) -> nn.Module:
    """Torch-Pruning's recommended timm ViT recipe (examples/transformers/prune_timm_vit.py):
    ``MetaPruner`` with a uniform (not global) ``pruning_ratio``, the classifier ignored, ``num_heads``
    hints, ``prune_head_dims=True`` / ``prune_num_heads=False`` (their default), ``round_to=2``;
    ``GroupMagnitudeImportance(p=2)`` or ``GroupTaylorImportance`` (their DeiT script) with gradients
    from ``calib``; afterwards ``num_heads``/``head_dim`` patched as the example does."""
    import torch_pruning as tp
    from timm.models.vision_transformer import Attention

    m = copy.deepcopy(model).eval()
    if not hasattr(m, "blocks") or not any(isinstance(x, Attention) for x in m.modules()):
        raise PlanError("tp_width needs a timm VisionTransformer (Attention modules) as in Torch-Pruning's example")
    num_heads = {}
    for mod in m.modules():
        if isinstance(mod, Attention):
            mod.forward = _tp_attention_forward.__get__(mod, Attention)
            num_heads[mod.qkv] = mod.num_heads
    example = torch.randn(1, *input_size)
    imp = tp.importance.GroupTaylorImportance() if importance == "taylor" else \
        tp.importance.GroupMagnitudeImportance(p=2)
    ignored = [m.head] if isinstance(getattr(m, "head", None), nn.Module) else []
    pruner = tp.pruner.MetaPruner(m, example, global_pruning=False, importance=imp, pruning_ratio=ratio,
                                  ignored_layers=ignored, num_heads=num_heads, prune_num_heads=False,
                                  prune_head_dims=True, round_to=round_to)
    if importance == "taylor":
        m.zero_grad()
        for images, labels in calib or []:
            nn.functional.cross_entropy(m(images), labels).backward()
    pruner.step()
    m.zero_grad(set_to_none=True)
    for mod in m.modules():
        if isinstance(mod, Attention):
            mod.num_heads = pruner.num_heads[mod.qkv]
            mod.head_dim = mod.qkv.out_features // (3 * mod.num_heads)
            mod.attn_dim = mod.num_heads * mod.head_dim
    return m


def _tp_shapes_ratio(model: nn.Module, ratio: float, input_size: Sequence[int], base: int) -> float:
    from vitprune.deps.flops import count_flops

    m = tp_prune(model, ratio, input_size)
    return count_flops(m, torch.zeros(1, *input_size)) / base


def _tp_width(model: nn.Module, target: float, ctx: PointContext) -> Pruned:
    """Bisect Torch-Pruning's uniform ratio to the FLOPs target (uniform ratios give the same shapes
    whatever the importance, so the search uses magnitudes), then prune with the configured importance."""
    from vitprune.deps.flops import count_flops

    base = count_flops(model, torch.zeros(1, *ctx.input_size))
    lo, hi = 0.0, 0.95
    if _tp_shapes_ratio(model, hi, ctx.input_size, base) > target + 0.01:
        raise PlanError(f"Torch-Pruning's uniform ratio 0.95 stays above the target {target}")
    best = (1.0, 0.0)
    for _ in range(12):
        mid = (lo + hi) / 2
        r = _tp_shapes_ratio(model, mid, ctx.input_size, base)
        if abs(r - target) < abs(best[0] - target):
            best = (r, mid)
        if abs(r - target) <= 0.005:
            break
        lo, hi = (mid, hi) if r > target else (lo, mid)
    ratio = best[1]
    m = tp_prune(model, ratio, ctx.input_size, importance=ctx.config.tp_importance, calib=ctx.calib)
    return Pruned(m, {"kind": "tp", "ratio": round(ratio, 6), "round_to": 2},
                  {"tp_pruning_ratio": ratio, "tp_importance": ctx.config.tp_importance})


def _tp_scale(arch: dict, src_model: nn.Module, src_size, dst_model: nn.Module, dst_size,
              config: SweepConfig) -> nn.Module:
    """The same uniform ratio on the scale model: identical per-layer width ratios (up to rounding)."""
    return tp_prune(dst_model, arch["ratio"], dst_size, round_to=arch.get("round_to", 2))


# ---------------------------------------------------------------------------------------------- architecture mapping
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


def _block_map(src_depth: int, dst_depth: int) -> list[int]:
    """dst block j ↦ src block ⌊j·S/D⌋ (12 blocks from 6: each src block becomes two)."""
    return [j * src_depth // dst_depth for j in range(dst_depth)]


def _depth_of(model: nn.Module) -> int:
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise PlanError("architecture mapping needs a model with .blocks")
    return len(blocks)


def _group_sizes(model: nn.Module, size) -> dict[str, int]:
    from vitprune.api import analyse

    _, dg = analyse(model, tuple(size))
    return {g.name: g.size for g in dg.groups if g.prunable}


def _patches(model: nn.Module, size) -> int:
    from vitprune.deps.tokens import analyse_tokens
    from vitprune.api import analyse

    gm, _ = analyse(model, tuple(size))
    return analyse_tokens(gm).num_patches


def _round_width(count: int, src: int, dst: int, kind: str, round_to: int) -> int:
    unit = 1 if kind == "head" else min(round_to, dst)
    n = max(unit, int(round(count / src * dst / unit)) * unit)
    return min(dst, n)


def scale_recipe(steps: list[dict[str, Any]], src_model: nn.Module, src_size, dst_model: nn.Module,
                 dst_size, *, round_to: int = 16) -> list[dict[str, Any]]:
    """Map an architecture (``recipe_shapes`` output) from ``src_model`` onto ``dst_model``.

    * blocks: dst block ``j`` copies src block ``⌊j·S/D⌋`` (depth 6 → 12: block ``i`` becomes blocks
      ``2i`` and ``2i+1``), so removed attention branches / activations keep their *fraction* and
      their place in the depth;
    * widths: every group keeps the same fraction of its channels (``kind:blocks.i.…`` maps to
      ``kind:blocks.j.…`` for the dst blocks of ``i``; the residual stream by name), rounded to
      multiples of ``round_to`` (heads: whole heads); the first channels are kept (random weights);
    * tokens: each dst block keeps the same fraction of its patch tokens as its src block (prefix
      tokens always stay), over the blocks that still have attention.
    """
    src_depth, dst_depth = _depth_of(src_model), _depth_of(dst_model)
    bmap = _block_map(src_depth, dst_depth)
    src_sizes, dst_sizes = _group_sizes(src_model, src_size), _group_sizes(dst_model, dst_size)
    removed_src: dict[str, set[int]] = {"attention": set(), "activation": set()}
    out: list[dict[str, Any]] = []
    for step in steps:
        kind = step.get("pass")
        if kind in ("attention", "activation"):
            removed_src[kind] |= set(step["blocks"])
            new = dict(step, blocks=[j for j in range(dst_depth) if bmap[j] in step["blocks"]])
            out.append(new)
        elif kind == "width":
            keep: dict[str, list[int]] = {}
            for name, count in step["counts"].items():
                gkind = name.split(":", 1)[0]
                m = _BLOCK.search(name)
                targets = ([_BLOCK.sub(lambda mm: f"{mm.group(1)}{j}{mm.group(3)}", name, count=1)
                            for j in range(dst_depth) if bmap[j] == int(m.group(2))] if m else [name])
                if name not in src_sizes:
                    raise PlanError(f"cannot map width group {name}: not in the source model")
                for t in targets:
                    if t not in dst_sizes:
                        raise PlanError(f"cannot map width group {name}: {t} not in the scale model")
                    n = _round_width(count, src_sizes[name], dst_sizes[t], gkind, round_to)
                    keep[t] = list(range(n))
            out.append({"pass": "width", "keep": keep})
        elif kind == "tokens":
            p_src, p_dst = _patches(src_model, src_size), _patches(dst_model, dst_size)
            src_blocks = [b for b in range(src_depth) if b not in removed_src["attention"]]
            dst_blocks = [j for j in range(dst_depth) if bmap[j] not in removed_src["attention"]]
            if len(step["keep"]) != len(src_blocks):
                raise PlanError(f"token keep list has {len(step['keep'])} entries for {len(src_blocks)} "
                                "attention blocks")
            by_block = dict(zip(src_blocks, step["keep"]))
            keep_dst = []
            for j in dst_blocks:
                k = by_block[bmap[j]]
                keep_dst.append(None if k is None else max(1, min(p_dst, int(round(k / p_src * p_dst)))))
            for i in range(1, len(keep_dst)):  # cascade: never more tokens than the block before
                if keep_dst[i] is not None and keep_dst[i - 1] is not None:
                    keep_dst[i] = min(keep_dst[i], keep_dst[i - 1])
            out.append({"pass": "tokens", "keep": keep_dst})
        else:
            raise PlanError(f"cannot map recipe step {kind!r}")
    return out


def _recipe_scale(arch: dict, src_model: nn.Module, src_size, dst_model: nn.Module, dst_size,
                  config: SweepConfig) -> nn.Module:
    from vitprune.api import replay

    steps = scale_recipe(arch["steps"], src_model, src_size, dst_model, dst_size, round_to=16)
    return replay(dst_model, steps, tuple(dst_size)).eval()


for _name, _label in (("width", "vitprune width"), ("boundarydpt", "BoundaryDPT (depth)"),
                      ("boundarydpt+", "BoundaryDPT+ (depth + width)"), ("cpvit", "CP-ViT (tokens; + heads if cpvit_heads)")):
    register(Method(_name, _label, _vitprune_method(_name), _recipe_scale))
register(Method("attention", "attention removal only", _one_kind("attention"), _recipe_scale))
register(Method("activation", "activation removal only", _one_kind("activation"), _recipe_scale))
register(Method("combo", "BoundaryDPT+ + tokens", _combo, _recipe_scale))
register(Method("tp_width", "Torch-Pruning width (baseline)", _tp_width, _tp_scale))


# ---------------------------------------------------------------------------------------------- the sweep
def point_key(method: str, target: float, seed: int) -> str:
    return f"{method}@{target:g}#s{seed}"


def arch_key(arch: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]


def _atomic_json(path: str, obj: Any) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".sweep.", suffix=".json.tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, default=_jsonable)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _jsonable(o: Any) -> Any:
    if isinstance(o, (set, tuple)):
        return list(o)
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def _as_loader(data: Any, batch_size: int, shuffle: bool) -> Any:
    """Datasets become DataLoaders (evaluation iterates batches); DataLoaders pass through."""
    from torch.utils.data import DataLoader, Dataset

    if isinstance(data, Dataset) and not isinstance(data, DataLoader):
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle,
                          generator=torch.Generator().manual_seed(0) if shuffle else None)
    return data


def _calibration(train_data: Any, n: int, seed: int) -> list:
    """``n`` shuffled (images, labels) batches from the training data, fixed by ``seed``."""
    from torch.utils.data import DataLoader

    dataset = train_data.dataset if isinstance(train_data, DataLoader) else train_data
    bs = train_data.batch_size if isinstance(train_data, DataLoader) and train_data.batch_size else 32
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=bs, shuffle=True, generator=g)
    out = []
    for images, labels in loader:
        out.append((images, labels))
        if len(out) >= n:
            break
    return out


def _machine() -> dict[str, Any]:
    import onnxruntime as ort

    return {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort.__version__,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count()}


class _Sweep:
    def __init__(self, model: nn.Module, train_data: Any, val_data: Any, config: SweepConfig, out_dir: str,
                 input_size: tuple[int, int, int], scale: ScaleModel | None, source: dict | None,
                 on_point: Callable[[dict], None] | None) -> None:
        self.model, self.train, self.val, self.cfg = model.eval(), train_data, val_data, config
        self.out, self.size, self.scale, self.source, self.on_point = out_dir, tuple(input_size), scale, source, on_point
        self.path = os.path.join(out_dir, "sweep.json")
        self.onnx_dir = os.path.join(out_dir, "onnx")
        os.makedirs(self.onnx_dir, exist_ok=True)
        self.state = self._load()
        self._scale_model: nn.Module | None = None

    # -- state ----------------------------------------------------------------------------------
    def _load(self) -> dict[str, Any]:
        if os.path.exists(self.path):
            try:
                with open(self.path) as f:
                    state = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise InputError(f"{self.path} exists but is not a readable sweep file: {e}") from e
            if state.get("format") != SWEEP_FORMAT:
                raise InputError(f"{self.path} is not a {SWEEP_FORMAT} file")
            if state.get("budget") != self.cfg.budget():
                raise InputError(f"{self.path} was written with another fine-tuning budget "
                                 f"({state.get('budget')}); use a new --out to compare different budgets")
            state.setdefault("points", {})
            state.setdefault("scaled", {})
            return state
        return {"format": SWEEP_FORMAT, "version": SWEEP_VERSION, "budget": self.cfg.budget(),
                "input_size": list(self.size), "machine": _machine(), "original": None, "points": {},
                "scaled": {}, "scale_model": self.scale.name if self.scale else None,
                "config": {k: v for k, v in dataclasses.asdict(self.cfg).items()}, "computed": []}

    def _save(self) -> None:
        _atomic_json(self.path, self.state)

    # -- original -------------------------------------------------------------------------------
    def original(self) -> dict[str, Any]:
        from vitprune.deploy.onnx import export_onnx
        from vitprune.deps.flops import count_flops, count_params
        from vitprune.train.finetune import evaluate

        path = os.path.join(self.onnx_dir, "original.onnx")
        if self.state.get("original") is None or not os.path.exists(path):
            x = torch.zeros(1, *self.size)
            export_onnx(self.model, x, path, parity_batches=(1,))
            self.state["original"] = {"top1": evaluate(self.model, self.val), "flops": count_flops(self.model, x),
                                      "params": count_params(self.model), "onnx": path}
            self._save()
        return self.state["original"]

    # -- one point ------------------------------------------------------------------------------
    def run_point(self, method: str, target: float, seed: int) -> dict[str, Any]:
        from vitprune.deploy.onnx import export_onnx
        from vitprune.deps.flops import count_flops, count_params
        from vitprune.train.finetune import FinetuneConfig, evaluate, finetune
        from vitprune.deploy.bench import compare

        key = point_key(method, target, seed)
        rec: dict[str, Any] = {"key": key, "method": method, "label": METHODS[method].label, "target": target,
                               "seed": seed}
        t0 = time.perf_counter()
        try:
            torch.manual_seed(seed)
            ctx = PointContext(self.size, seed, _calibration(self.train, self.cfg.calib_batches, seed), self.cfg,
                               self.source)
            try:
                pruned = METHODS[method].prune(copy.deepcopy(self.model), target, ctx)
            except PlanError as e:
                rec.update(status="skipped", reason=" ".join(str(e).split()))
                return rec
            x = torch.zeros(1, *self.size)
            orig = self.state["original"]
            student = pruned.model
            flops = count_flops(student, x)
            rec.update(flops=flops, flops_ratio=flops / orig["flops"], params=count_params(student),
                       params_ratio=count_params(student) / orig["params"], arch=pruned.arch,
                       info=json.loads(json.dumps(pruned.info, default=_jsonable)),
                       compile_seconds=round(time.perf_counter() - t0, 2))
            rec["top1_pruned"] = evaluate(student, self.val)
            if self.cfg.epochs > 0:
                teacher = copy.deepcopy(self.model).eval()
                for p in teacher.parameters():
                    p.requires_grad_(False)
                t1 = time.perf_counter()
                hist = finetune(student, teacher, self.train, self.val, FinetuneConfig(
                    epochs=self.cfg.epochs, lr=self.cfg.lr, batch_size=self.cfg.batch_size, seed=seed,
                    kd_weight=self.cfg.kd_weight, label_weight=self.cfg.label_weight,
                    warmup_epochs=min(1.0, self.cfg.epochs * 0.2), progress=False))
                rec["finetune_seconds"] = round(time.perf_counter() - t1, 2)
                rec["history"] = [{"epoch": e["epoch"], "loss": e["loss"], "top1": e["top1"]} for e in hist["epochs"]]
            rec["top1"] = evaluate(student, self.val)
            path = os.path.join(self.onnx_dir, re.sub(r"[^A-Za-z0-9_.+-]", "_", key) + ".onnx")
            export_onnx(student.eval(), x, path, parity_batches=(1,))
            rows = compare([orig["onnx"], path], batch_sizes=(1,), threads=self.cfg.threads, runs=self.cfg.runs,
                           warmup=self.cfg.warmup)
            rec.update(original_ms=rows[0]["median_ms"], latency_ms=rows[1]["median_ms"],
                       latency_p90_ms=rows[1]["p90_ms"], original_p90_ms=rows[0]["p90_ms"],
                       speedup=rows[1]["speedup"], onnx=path)
            if self.scale is not None and METHODS[method].scale is not None:
                rec["scaled"] = self.scaled(method, pruned.arch)
            rec["status"] = "done"
        except KeyboardInterrupt:
            raise
        except Exception as e:  # recorded, not fatal: one broken point must not end a long sweep
            rec.update(status="error", error=f"{type(e).__name__}: {' '.join(str(e).split())[:500]}",
                       traceback=traceback.format_exc(limit=6)[-2000:])
        finally:
            rec["seconds"] = round(time.perf_counter() - t0, 2)
        return rec

    def scaled(self, method: str, arch: dict[str, Any]) -> dict[str, Any]:
        """Latency of ``arch`` rebuilt on the scale model (cached by architecture: seeds share it)."""
        from vitprune.deploy.bench import compare
        from vitprune.deploy.onnx import export_onnx
        from vitprune.deps.flops import count_flops

        akey = f"{method}:{arch_key(arch)}"
        cached = self.state["scaled"].get(akey)
        if cached is not None:
            return dict(cached, arch_key=akey)
        scale = self.scale
        base = self._scale_base()
        x = torch.zeros(1, *scale.input_size)
        dst = METHODS[method].scale(arch, self.model, self.size, scale.factory().eval(), scale.input_size, self.cfg)
        path = os.path.join(self.onnx_dir, f"scaled_{re.sub(r'[^A-Za-z0-9_.+-]', '_', akey)}.onnx")
        export_onnx(dst.eval(), x, path, parity_batches=(1,))
        rows = compare([base["onnx"], path], batch_sizes=(1,), threads=self.cfg.threads, runs=self.cfg.scale_runs,
                       warmup=self.cfg.scale_warmup)
        flops = count_flops(dst, x)
        entry = {"model": scale.name, "flops_ratio": flops / base["flops"], "params": sum(p.numel() for p in dst.parameters()),
                 "original_ms": rows[0]["median_ms"], "latency_ms": rows[1]["median_ms"],
                 "latency_p90_ms": rows[1]["p90_ms"], "speedup": rows[1]["speedup"]}
        self.state["scaled"][akey] = entry
        os.remove(path)  # large; the numbers are what matter
        return dict(entry, arch_key=akey)

    def _scale_base(self) -> dict[str, Any]:
        from vitprune.deploy.onnx import export_onnx
        from vitprune.deps.flops import count_flops

        path = os.path.join(self.onnx_dir, "scale_original.onnx")
        info = self.state.get("scale_original")
        if info is None or not os.path.exists(path):
            m = self.scale.factory().eval()
            x = torch.zeros(1, *self.scale.input_size)
            export_onnx(m, x, path, parity_batches=(1,))
            info = {"model": self.scale.name, "flops": count_flops(m, x),
                    "params": sum(p.numel() for p in m.parameters()), "onnx": path}
            self.state["scale_original"] = info
        return info

    # -- all points -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from tqdm import tqdm

        self.original()
        self.state["config"] = dataclasses.asdict(self.cfg)  # what this invocation swept (budget unchanged)
        todo = [(m, t, s) for m in self.cfg.methods for t in self.cfg.targets for s in self.cfg.seeds]
        self.state["computed"] = []
        bar = tqdm(total=len(todo), desc="sweep", unit="point", disable=not self.cfg.progress, file=sys.stderr,
                   dynamic_ncols=True)
        with bar:
            for method, target, seed in todo:
                key = point_key(method, target, seed)
                bar.set_postfix_str(key)
                if key in self.state["points"]:
                    bar.update(1)
                    continue
                rec = self.run_point(method, target, seed)
                self.state["points"][key] = rec
                self.state["computed"].append(key)
                self._save()
                if self.on_point is not None:
                    self.on_point(rec)
                bar.update(1)
                if rec["status"] != "done":
                    bar.write(f"{key}: {rec['status']}: {rec.get('reason') or rec.get('error')}")
        self._save()
        write_reports(self.state, self.out)
        return self.state


def run_sweep(model: nn.Module, train_data: Any, val_data: Any, config: SweepConfig | None = None,
              out_dir: str | os.PathLike = "sweep", *, input_size: tuple[int, int, int],
              scale: ScaleModel | None = None, source: dict | None = None,
              on_point: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the sweep; returns the ``sweep.json`` content. ``state["computed"]`` lists the
    points this call computed (empty when everything was already there)."""
    config = config or SweepConfig()
    if val_data is None:
        raise InputError("the sweep needs validation data (DIR/val) to measure top-1")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    val_data = _as_loader(val_data, config.batch_size, shuffle=False)
    train_data = _as_loader(train_data, config.batch_size, shuffle=True)
    return _Sweep(model, train_data, val_data, config, out_dir, input_size, scale, source, on_point).run()


def rebench(state: dict[str, Any], out_dir: str | os.PathLike, *, runs: int = 50, warmup: int = 5,
            threads: int = 1) -> bool:
    """Re-time every finished point's ONNX and the original together, in *one* interleaved run.

    Per-point timings are pairs measured minutes apart; on a shared machine a burst of load can land in
    one pair's median (tiny models run in ~1 ms). One round-robin over all models puts every point under
    the same conditions. The pairwise numbers are kept under ``"pairwise"``. Skipped (returns False)
    when the same set of points was already re-timed, so a resumed sweep changes nothing.
    """
    from vitprune.deploy.bench import compare

    done = sorted(k for k, p in state["points"].items() if p["status"] == "done" and os.path.exists(p.get("onnx", "")))
    if not done or (state.get("rebench") or {}).get("points") == done:
        return False
    paths = [state["original"]["onnx"]] + [state["points"][k]["onnx"] for k in done]
    rows = compare(paths, batch_sizes=(1,), threads=threads, runs=runs, warmup=warmup)
    for key, row in zip(done, rows[1:]):
        p = state["points"][key]
        p.setdefault("pairwise", {q: p.get(q) for q in ("original_ms", "latency_ms", "latency_p90_ms", "speedup")})
        p.update(original_ms=rows[0]["median_ms"], original_p90_ms=rows[0]["p90_ms"], latency_ms=row["median_ms"],
                 latency_p90_ms=row["p90_ms"], speedup=row["speedup"])
    state["rebench"] = {"points": done, "runs": runs, "warmup": warmup, "threads": threads,
                        "original_ms": rows[0]["median_ms"], "original_p90_ms": rows[0]["p90_ms"]}
    _atomic_json(os.path.join(os.fspath(out_dir), "sweep.json"), state)
    return True


# ---------------------------------------------------------------------------------------------- reports
def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(state: dict[str, Any], methods: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per (method, target): mean ± std over seeds of every measured quantity."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for p in state["points"].values():
        if methods is not None and p["method"] not in methods:
            continue
        groups.setdefault((p["method"], p["target"]), []).append(p)
    rows = []
    for (method, target), pts in groups.items():
        done = [p for p in pts if p["status"] == "done"]
        label = METHODS[method].label if method in METHODS else pts[0].get("label", method)  # presentation only
        row: dict[str, Any] = {"method": method, "label": label, "target": target,
                               "seeds": sorted(p["seed"] for p in done), "n": len(done)}
        if not done:
            other = pts[0]
            row.update(status=other["status"], reason=other.get("reason") or other.get("error"))
            rows.append(row)
            continue
        row["status"] = "done"
        for q in ("flops_ratio", "params", "top1_pruned", "top1", "speedup", "latency_ms", "latency_p90_ms"):
            row[q], row[q + "_std"] = _mean_std([p.get(q) for p in done])
        sc = [p["scaled"] for p in done if p.get("scaled")]
        if sc:
            for q in ("speedup", "flops_ratio", "latency_ms"):
                row["scaled_" + q], row["scaled_" + q + "_std"] = _mean_std([s[q] for s in sc])
        rows.append(row)
    order = {m: i for i, m in enumerate(methods or sorted({r["method"] for r in rows}))}
    rows.sort(key=lambda r: (order.get(r["method"], 99), -r["target"]))
    return rows


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (speedup, top-1) that no other point beats in both (ties kept)."""
    front = []
    for i, (s, a) in enumerate(points):
        if not any((s2 >= s and a2 >= a) and (s2 > s or a2 > a) for j, (s2, a2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _pm(v: Any, sd: Any, fmt: str) -> str:
    if v is None:
        return "–"
    return f"{v:{fmt}}" + (f" ± {sd:{fmt}}" if sd else "")


def format_markdown(state: dict[str, Any], methods: Sequence[str] | None = None) -> str:
    rows = summarize(state, methods)
    orig = state.get("original") or {}
    scaled = any("scaled_speedup" in r for r in rows)
    head = ["method", "target", "seeds", "FLOPs ratio", "params (M)", "top-1 pruned", "top-1 fine-tuned",
            "ORT ms", "ORT speedup"] + ([f"{state.get('scale_model')} speedup", "scaled FLOPs ratio"] if scaled else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", "---:"] + ["---:"] * (len(head) - 2)) + "|"]
    lines.append("| original | 1.0 | – | 1.000 | " + (f"{orig.get('params', 0) / 1e6:.3f}" if orig else "–") +
                 f" | – | {orig.get('top1', float('nan')):.2f} | – | 1.00× |" + (" 1.00× | 1.000 |" if scaled else ""))
    for r in rows:
        if r["status"] != "done":
            lines.append(f"| {r['method']} | {r['target']:g} | – | {r['status']}: {r.get('reason', '')[:120]} |"
                         + " |" * (len(head) - 4))
            continue
        cells = [r["method"], f"{r['target']:g}", str(r["n"]), _pm(r["flops_ratio"], r["flops_ratio_std"], ".3f"),
                 f"{r['params'] / 1e6:.3f}", _pm(r["top1_pruned"], r["top1_pruned_std"], ".2f"),
                 _pm(r["top1"], r["top1_std"], ".2f"), _pm(r["latency_ms"], r["latency_ms_std"], ".3f"),
                 _pm(r["speedup"], r["speedup_std"], ".2f") + "×"]
        if scaled:
            cells += [(_pm(r.get("scaled_speedup"), r.get("scaled_speedup_std"), ".2f") + "×")
                      if r.get("scaled_speedup") else "–",
                      _pm(r.get("scaled_flops_ratio"), None, ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sweep(state: dict[str, Any], path: str, *, methods: Sequence[str] | None = None,
               speed: str = "speedup", title: str | None = None) -> None:
    """Top-1 vs ORT speedup (``speed="speedup"``: the swept model; ``"scaled_speedup"``: the scale
    model), one line per method (mean over seeds, std as error bars), the original marked, the Pareto
    frontier over all methods highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summarize(state, methods) if r["status"] == "done" and r.get(speed)]
    orig = state.get("original") or {}
    fig, ax = plt.subplots(figsize=(8, 5.5))
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    for method, rs in by_method.items():
        rs.sort(key=lambda r: r[speed])
        ax.errorbar([r[speed] for r in rs], [r["top1"] for r in rs], yerr=[r["top1_std"] or 0 for r in rs],
                    xerr=[r.get(speed + "_std") or 0 for r in rs], marker="o", ms=4, capsize=2, lw=1.2,
                    label=rs[0]["label"])
    if orig.get("top1") is not None:
        ax.scatter([1.0], [orig["top1"]], marker="*", s=220, c="black", zorder=5, label="original")
    pts = [(r[speed], r["top1"]) for r in rows] + ([(1.0, orig["top1"])] if orig.get("top1") is not None else [])
    if pts:
        front = pareto_front(pts)
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], color="red", lw=3, alpha=0.35,
                zorder=1, label="Pareto frontier")
    ax.set_xlabel("ONNX Runtime speedup (batch 1)" + (f", {state.get('scale_model')}" if speed != "speedup" else ""))
    ax.set_ylabel("top-1 (%) after fine-tuning")
    ax.set_title(title or "accuracy vs ORT speedup")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_reports(state: dict[str, Any], out_dir: str, methods: Sequence[str] | None = None) -> dict[str, str]:
    """``sweep.md`` and ``sweep.png`` from a sweep state."""
    md = os.path.join(out_dir, "sweep.md")
    png = os.path.join(out_dir, "sweep.png")
    text = "# vitprune sweep\n\n" + format_markdown(state, methods) + "\n"
    with open(md + ".tmp", "w") as f:
        f.write(text)
    os.replace(md + ".tmp", md)
    plot_sweep(state, png, methods=methods)
    return {"md": md, "png": png}
