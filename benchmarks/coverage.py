"""Coverage survey over ViT families: capture, dependency graph, width pass, FLOP model.

Three families (``--families``, default all):

* ``timm``: every architecture timm registers in a ViT-family module (``--modules``), as a small
  instance (``depth=2`` and a 4×4-patch input where the constructor accepts them, 10 classes,
  ``pretrained=False``);
* ``hf``: Hugging Face transformers vision transformers built from a small random config
  (``_from_config``: 2 layers, hidden 64, 4 heads, MLP 128, patch 8, 32×32 input; ``HF_MODELS``);
* ``torchvision``: ``vit_b_16``, ``vit_b_32``, ``vit_l_16``, ``vit_h_14`` as small
  ``torchvision.models.VisionTransformer`` configs (2 layers, head-dim 8 or 10, their own patch size
  and head count, 4×4 patches; ``TORCHVISION_MODELS``).

For each it records:

* captured?          ``vitprune.frontend.capture.capture`` (``torch.export``) succeeded
* unsupported ops    ATen ops (``vitprune.deps.rules.op_key``: overload-packet names) the dependency
                     graph has no rule for (they freeze what they touch)
* groups             prunable groups by kind (R residual, H head, D head_dim, M MLP hidden, O other)
                     and the number of frozen ones
* width OK?          ``WidthPruning`` keeping every other channel of every prunable group produced a
                     graph that runs and returns finite outputs
* FLOPs exact?       ``FlopModel`` equals ``count_flops`` on the dense and on the pruned model
* pruned = masked?   the width pass's invariant: pruning the groups that feed no normalisation
                     (MLP hidden, heads, head-dims without q/k-norm) gives the same outputs as the
                     original with those channels' parameter slices zeroed (parameters get small
                     seeded noise first, so zero biases and 1e-5 layer-scales hide nothing). Which
                     channels to zero comes from the dependency graph's groups alone (their members'
                     parameter slices), never from module names; random ops (ViTMAE's masking)
                     draw the same numbers in both runs
* matmul path        all the checks again (zero-mask included) on the other attention path: timm with
                     ``fused_attn = False`` on every attention module, Hugging Face with
                     ``attn_implementation="eager"`` instead of ``"sdpa"`` (matmul → softmax → matmul
                     instead of SDPA); ``n/a`` where there is no such switch (torchvision, timm models
                     without a ``fused_attn`` module, HF classes that only implement eager attention)

Each model runs in a worker process with a time limit, so one crash, hang or out-of-memory never
stops the survey. Each attention path is captured once; the pruned and the zero-masked graphs are
deep copies of that capture. Architectures whose small instance has the same structure as one
already seen (``_224`` vs ``_384`` variants) are run once and listed as duplicates. Architectures
whose small instance would still exceed ``--max-params`` are skipped and listed. When ``--budget``
runs out the rest are listed as not run (the required architectures go first, then the others
round-robin over modules and families, so every family is sampled).

    python benchmarks/coverage.py --workers 1        # Markdown table on stdout and benchmarks/coverage.md
    python benchmarks/coverage.py --limit 20 --families timm --modules deit beit
    python benchmarks/coverage.py --families hf torchvision --out /tmp/cov.md
    python benchmarks/coverage.py --json /tmp/cov.json && python benchmarks/coverage.py --resume /tmp/cov.json
    git show HEAD:benchmarks/coverage.md > /tmp/old.md && python benchmarks/coverage.py --baseline /tmp/old.md
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import multiprocessing as mp
import os
import re
import sys
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from itertools import zip_longest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("timm", "hf", "torchvision")
DEFAULT_MODULES = ["vision_transformer", "deit", "beit", "eva", "vision_transformer_sam",
                   "vision_transformer_relpos", "xcit", "cait", "naflexvit", "crossvit", "pit", "tnt"]

# -- Hugging Face: small random configs ------------------------------------------------------------
_HF_BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                image_size=32, patch_size=8)
_HF_RATIO = {**{k: v for k, v in _HF_BASE.items() if k != "intermediate_size"}, "mlp_ratio": 2}
_LABELS = {"num_labels": 10}
#: (row name, model class, config class, config kwargs); a ``+variant`` suffix names a config variant
HF_MODELS: list[tuple[str, str, str, dict]] = [
    ("ViTForImageClassification", "ViTForImageClassification", "ViTConfig", {**_HF_BASE, **_LABELS}),
    ("ViTMAEModel", "ViTMAEModel", "ViTMAEConfig", dict(_HF_BASE)),  # random masking (75 %) inside
    ("ViTMSNForImageClassification", "ViTMSNForImageClassification", "ViTMSNConfig", {**_HF_BASE, **_LABELS}),
    ("DeiTForImageClassification", "DeiTForImageClassification", "DeiTConfig", {**_HF_BASE, **_LABELS}),
    ("DeiTForImageClassificationWithTeacher", "DeiTForImageClassificationWithTeacher", "DeiTConfig",
     {**_HF_BASE, **_LABELS}),
    ("BeitForImageClassification", "BeitForImageClassification", "BeitConfig", {**_HF_BASE, **_LABELS}),
    ("BeitForImageClassification+relpos", "BeitForImageClassification", "BeitConfig",
     {**_HF_BASE, **_LABELS, "use_relative_position_bias": True}),
    ("BeitForImageClassification+shared_relpos", "BeitForImageClassification", "BeitConfig",
     {**_HF_BASE, **_LABELS, "use_shared_relative_position_bias": True}),
    ("Data2VecVisionForImageClassification", "Data2VecVisionForImageClassification", "Data2VecVisionConfig",
     {**_HF_BASE, **_LABELS, "use_relative_position_bias": True}),
    ("Dinov2Model", "Dinov2Model", "Dinov2Config", dict(_HF_RATIO)),
    ("Dinov2ForImageClassification", "Dinov2ForImageClassification", "Dinov2Config", {**_HF_RATIO, **_LABELS}),
    ("Dinov2WithRegistersModel", "Dinov2WithRegistersModel", "Dinov2WithRegistersConfig",
     {**_HF_RATIO, "num_register_tokens": 4}),
    ("DINOv3ViTModel", "DINOv3ViTModel", "DINOv3ViTConfig", {**_HF_BASE, "num_register_tokens": 4}),
    ("IJepaForImageClassification", "IJepaForImageClassification", "IJepaConfig", {**_HF_BASE, **_LABELS}),
    ("CLIPVisionModel", "CLIPVisionModel", "CLIPVisionConfig", dict(_HF_BASE)),
    ("CLIPVisionModelWithProjection", "CLIPVisionModelWithProjection", "CLIPVisionConfig",
     {**_HF_BASE, "projection_dim": 32}),
    ("SiglipVisionModel", "SiglipVisionModel", "SiglipVisionConfig", dict(_HF_BASE)),
    ("AltCLIPVisionModel", "AltCLIPVisionModel", "AltCLIPVisionConfig", dict(_HF_BASE)),
    ("ChineseCLIPVisionModel", "ChineseCLIPVisionModel", "ChineseCLIPVisionConfig", dict(_HF_BASE)),
    ("MetaClip2VisionModel", "MetaClip2VisionModel", "MetaClip2VisionConfig", dict(_HF_BASE)),
    ("OwlViTVisionModel", "OwlViTVisionModel", "OwlViTVisionConfig", dict(_HF_BASE)),
    ("BlipVisionModel", "BlipVisionModel", "BlipVisionConfig", dict(_HF_BASE)),
    ("Blip2VisionModel", "Blip2VisionModel", "Blip2VisionConfig", dict(_HF_BASE)),
    ("InstructBlipVisionModel", "InstructBlipVisionModel", "InstructBlipVisionConfig", dict(_HF_BASE)),
    ("GitVisionModel", "GitVisionModel", "GitVisionConfig", dict(_HF_BASE)),
    ("Aimv2VisionModel", "Aimv2VisionModel", "Aimv2VisionConfig", dict(_HF_BASE)),
    ("InternVLVisionModel", "InternVLVisionModel", "InternVLVisionConfig", dict(_HF_BASE)),
    ("PixioModel", "PixioModel", "PixioConfig", dict(_HF_BASE)),
    ("YolosModel", "YolosModel", "YolosConfig", {**_HF_BASE, "image_size": [32, 32], "num_detection_tokens": 4}),
    ("VitDetModel", "VitDetModel", "VitDetConfig", dict(_HF_RATIO)),
    ("DPTModel", "DPTModel", "DPTConfig", dict(_HF_BASE)),
]
_HF_KEY_SHORT = {"hidden_size": "hidden", "num_hidden_layers": "layers", "num_attention_heads": "heads",
                 "intermediate_size": "mlp", "image_size": "img", "patch_size": "patch"}

# -- torchvision: small VisionTransformer configs (own patch size and head count, 4×4 patches) -------
TORCHVISION_MODELS: dict[str, dict] = {
    "vit_b_16": dict(image_size=64, patch_size=16, num_layers=2, num_heads=12, hidden_dim=96, mlp_dim=384),
    "vit_b_32": dict(image_size=128, patch_size=32, num_layers=2, num_heads=12, hidden_dim=96, mlp_dim=384),
    "vit_l_16": dict(image_size=64, patch_size=16, num_layers=2, num_heads=16, hidden_dim=128, mlp_dim=512),
    "vit_h_14": dict(image_size=56, patch_size=14, num_layers=2, num_heads=16, hidden_dim=160, mlp_dim=640),
}

# the architectures vitprune must support, bold in the table, run first: the timm ones are held to it by
# tests/test_coverage.py, the Hugging Face / torchvision ones by tests/test_frontends.py
REQUIRED = {"deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
            "deit_small_distilled_patch16_224", "deit3_small_patch16_224", "vit_small_patch16_224",
            "vit_base_patch32_224", "vit_base_patch16_clip_224", "vit_small_patch14_reg4_dinov2",
            "vit_medium_patch16_gap_256",
            "hf:ViTForImageClassification", "hf:DeiTForImageClassificationWithTeacher", "hf:Dinov2Model",
            "hf:Dinov2WithRegistersModel", "hf:CLIPVisionModel", "hf:BeitForImageClassification",
            "hf:BeitForImageClassification+relpos",
            "torchvision:vit_b_16", "torchvision:vit_b_32", "torchvision:vit_l_16", "torchvision:vit_h_14"}
KIND_LETTER = {"residual": "R", "head": "H", "head_dim": "D", "hidden": "M", "other": "O"}


@dataclass
class Row:
    model: str
    module: str
    family: str = "timm"
    config: str = ""
    status: str = "ok"  # ok | error | skipped | duplicate | timeout | not run
    captured: bool = False
    unsupported: list[str] = field(default_factory=list)
    groups: str = ""
    prunable: bool = False
    width_ok: bool | None = None
    flops_exact: bool | None = None
    equivalent: bool | None = None
    matmul: str = "n/a"
    error: str = ""
    seconds: float = 0.0
    signature: str = ""
    dup_of: str = ""
    # timm: create_model kwargs; hf: {"cls", "config_cls", "config", "attn"}; torchvision: VisionTransformer kwargs
    kwargs: dict = field(default_factory=dict)
    input_size: tuple = ()


# -- building one model ------------------------------------------------------------------------------
def _create(row: Row, meta: bool, path: str | None = None):
    """Build the small instance; ``path`` "sdpa" / "matmul" picks the attention path where the family
    has a switch (timm ``fused_attn``, HF ``attn_implementation``), None the default one."""
    import torch
    ctx = torch.device("meta") if meta else _Nothing()
    if not meta:
        torch.manual_seed(0)
    with ctx:
        if row.family == "timm":
            import timm
            model = timm.create_model(row.model, pretrained=False, **row.kwargs)
            if path is not None:
                _set_fused(model, path == "sdpa")
        elif row.family == "hf":
            import transformers
            k = row.kwargs
            config = getattr(transformers, k["config_cls"])(**k["config"])
            attn = "eager" if path == "matmul" else k["attn"]
            model = getattr(transformers, k["cls"])._from_config(config, attn_implementation=attn)
        elif row.family == "torchvision":
            from torchvision.models.vision_transformer import VisionTransformer
            model = VisionTransformer(**row.kwargs, num_classes=10)
        else:
            raise ValueError(f"unknown family {row.family!r}")
    return model.eval()


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _has_switch(row: Row, probe) -> bool:
    """Whether the family has a generic switch between SDPA and matmul → softmax → matmul."""
    if row.family == "timm":
        return any(hasattr(m, "fused_attn") for m in probe.modules())
    if row.family == "hf":
        return row.kwargs["attn"] == "sdpa"
    return False


def _pick_config(name: str) -> tuple[dict, tuple[int, int, int], object]:
    """The smallest constructor arguments a timm architecture accepts, tried on the meta device."""
    base = {"num_classes": 10}
    attempts = [{"depth": 2}, {}]
    last: Exception | None = None
    for extra in attempts:
        try:
            probe = _create(Row(name, "", kwargs={**base, **extra}), meta=True)
        except Exception as e:  # constructors reject unknown/ill-typed kwargs in many ways
            last = e
            continue
        patch = _patch_size(probe)
        if patch:
            side = 4 * patch
            try:
                kwargs = {**base, **extra, "img_size": side}
                probe2 = _create(Row(name, "", kwargs=kwargs), meta=True)
                return kwargs, (3, side, side), probe2
            except Exception:
                pass
        return {**base, **extra}, _default_input(probe), probe
    raise RuntimeError(f"cannot construct: {type(last).__name__}: {last}")


def _patch_size(model) -> int | None:
    pe = getattr(model, "patch_embed", None)
    p = getattr(pe, "patch_size", None)
    if isinstance(p, (tuple, list)) and p and len(set(p)) == 1:
        return int(p[0])
    return int(p) if isinstance(p, int) else None


def _default_input(model) -> tuple[int, int, int]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size", (3, 224, 224))
    return tuple(int(s) for s in size)


def _structure_signature(model, input_size, kwargs: dict) -> str:
    """Module tree, every parameter/buffer name and shape, and the plain attributes of every module
    (global_pool, num_prefix_tokens, dynamic_img_size, ...): what decides the captured graph."""
    tensors = [(n, tuple(t.shape)) for n, t in (*model.named_parameters(), *model.named_buffers())]
    attrs = [(n, sorted((k, repr(v)) for k, v in vars(m).items()
                        if not k.startswith("_") and isinstance(v, (bool, int, float, str, tuple, type(None)))))
             for n, m in model.named_modules()]
    config = getattr(model, "config", None)  # HF: everything the forward reads
    config = config.to_dict() if hasattr(config, "to_dict") else None
    text = repr((type(model).__qualname__, repr(model), tensors, attrs, input_size,
                 repr(config) if config is not None else ""))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _set_fused(model, fused: bool) -> int:
    n = 0
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
            n += 1
    return n


# -- the checks --------------------------------------------------------------------------------------
def _run(gm, x):
    """Forward with the RNG reset: models that draw random numbers (ViTMAE's masking) draw the same."""
    import torch
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        return gm(x)


def _one_path(model, x) -> dict:
    """Capture → dependency graph → prune half of every prunable group → run + FLOP checks, then the
    zero-mask equivalence check. The pruned and the masked graphs are deep copies of one capture."""
    import torch
    from passes.width import WidthPruning
    from vitprune.frontend.capture import capture
    from vitprune.deps import DependencyGraph
    from vitprune.deps.flops import FlopModel, count_flops

    out: dict = {"captured": False, "unsupported": [], "groups": "", "prunable": False,
                 "width_ok": None, "flops_exact": None, "equivalent": None, "error": ""}

    def note(text: str) -> None:
        out["error"] = out["error"] + "; " * bool(out["error"]) + text

    try:
        gm = capture(model, x)
    except Exception as e:
        out["error"] = f"capture: {_short(e)}"
        return out
    out["captured"] = True
    try:
        dg = DependencyGraph.build(gm)
    except Exception as e:
        out["error"] = f"deps: {_short(e)}"
        return out
    out["unsupported"] = sorted({u.op for u in dg.unsupported})
    groups = dg.prunable_groups()
    kinds = Counter(g.kind for g in groups)
    frozen = sum(1 for g in dg.groups if not g.prunable and g.size > 1)
    out["groups"] = " ".join(f"{KIND_LETTER[k]}{kinds[k]}" for k in KIND_LETTER if kinds[k]) + f" / {frozen} frozen"
    out["prunable"] = bool(groups)
    if not groups:
        return out
    dup = sorted(n for n, c in Counter(g.name for g in groups).items() if c > 1)
    if dup:  # WidthPruning addresses groups by name: only the first of several namesakes is reachable
        note(f"{len(dup)} names shared by several prunable groups, e.g. {dup[0]} (those skipped)")
        groups = [g for g in groups if g.name not in dup]
    try:
        fm = FlopModel(dg)
        dense = (count_flops(gm, x), fm.flops())
        dense_exact = dense[0] == dense[1]
        keep = {g.name: _half(g.size) for g in groups}
        counts = {g.axis: len(keep[g.name]) for g in groups}
        predicted = fm.flops(counts)
    except Exception as e:
        note(f"flop model: {_short(e)}")
        return out
    pruned = None
    try:
        pruned = WidthPruning(keep)(copy.deepcopy(gm)).graph_module
        y = _run(pruned, x)
        out["width_ok"] = all(torch.isfinite(t).all().item() for t in _tensors(y))
        if not out["width_ok"]:
            note("width: the pruned graph returns non-finite values")
    except Exception as e:
        out["width_ok"] = False
        note(f"width: {_short(e)}")
    if out["width_ok"]:
        try:
            actual = count_flops(pruned, x)
            out["flops_exact"] = dense_exact and actual == predicted
            if not out["flops_exact"]:
                note(f"flops (counter vs model): dense {dense[0]} vs {dense[1]}, pruned {actual} vs {predicted}")
        except Exception as e:
            note(f"count_flops: {_short(e)}")
    try:  # also when pruning everything failed: the norm-free groups alone may still work
        out["equivalent"], detail = _zero_mask_equivalent(gm, x)
        if out["equivalent"] is False:
            note(f"zero-mask: {detail}")
    except Exception as e:
        out["equivalent"] = False
        note(f"zero-mask check: {_short(e)}")
    return out


def _half(size: int) -> list[int]:
    return list(range(0, size, 2))


def _tensors(y) -> list:
    import torch
    return [t for t in (y if isinstance(y, (tuple, list)) else [y]) if isinstance(t, torch.Tensor)]


#: ATen ops (overload-packet names through ``op_key``) whose result renormalises over a dim, and where
#: the dim argument sits: softmax(x, dim), norm = linalg_vector_norm(x, ord, dim), SDPA (keys' sequence)
_RENORMALISING = {"softmax": 1, "log_softmax": 1, "norm": 2, "scaled_dot_product_attention": None}


def _renormalised_axes(dg) -> set[int]:
    """Leaf axes a softmax / L2-norm / SDPA's softmax reduces over (XCiT attends over channels):
    pruning such channels renormalises over the rest, so zero-masking them is not the same function."""
    from vitprune.deps.rules import op_key
    out: set[int] = set()
    for node in dg.gm.graph.nodes:
        if node.op != "call_function":
            continue
        key = op_key(node, dg.gm)
        if key not in _RENORMALISING:
            continue
        if key == "scaled_dot_product_attention":  # its softmax runs over the keys' sequence dim
            src = node.args[1] if len(node.args) > 1 else node.kwargs.get("key")
            dim = -2
        else:
            src = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
            at = _RENORMALISING[key]
            dim = node.args[at] if len(node.args) > at else node.kwargs.get("dim", -1 if key != "norm" else None)
        dims = dg.node_dims.get(src)
        if not dims or isinstance(dims[0], list):
            continue
        if dim is None:  # a norm over every dim
            reduced = list(range(len(dims)))
        else:
            reduced = list(dim) if isinstance(dim, (list, tuple)) else [dim]
        for d in reduced:
            if isinstance(d, int) and -len(dims) <= d < len(dims):
                out.update(dg.table.find(leaf) for leaf in dg.table.leaves(dims[d]))
    return out


def _zero_mask_equivalent(gm, x) -> tuple[bool | None, str]:
    """The width pass's invariant for groups that feed no normalisation: pruning them gives exactly
    the original function with the removed channels' parameter slices set to zero.

    Groups with a norm member (the residual stream, q/k-norm head-dims), groups a softmax or
    L2-norm reduces over, and groups with a buffer member are left out; None when none qualifies.
    Which slices to zero comes from the groups' members (parameter, dim, channel coordinates).
    """
    import numpy as np
    import torch
    from passes.width import WidthPruning
    from vitprune.deps import DependencyGraph

    gm_pruned, gm_masked = copy.deepcopy(gm), copy.deepcopy(gm)
    dg = DependencyGraph.build(gm_masked)
    params = dict(gm_masked.named_parameters())
    names = Counter(g.name for g in dg.prunable_groups())
    renormalised = _renormalised_axes(dg)
    chosen = [g for g in dg.prunable_groups() if names[g.name] == 1
              and dg.table.find(g.axis) not in renormalised
              and all("norm" not in m.roles and m.param in params for m in g.members)]
    if not chosen:
        return None, ""
    keep = {g.name: _half(g.size) for g in chosen}
    with torch.no_grad():
        for g in chosen:
            removed = np.setdiff1d(np.arange(g.size), keep[g.name])
            for m in g.members:
                idx = torch.as_tensor(np.nonzero(np.isin(m.coords, removed))[0])
                params[m.param].index_fill_(m.dim, idx, 0.0)
    want = _tensors(_run(gm_masked, x))
    got = _tensors(_run(WidthPruning(keep)(gm_pruned).graph_module, x))
    err = max(float((a - b).abs().max() / (b.abs().max() + 1e-12)) for a, b in zip(got, want))
    kinds = ",".join(sorted({g.kind for g in chosen}))
    return err < 1e-4, f"pruning {kinds} groups differs from zero-masking them (relative error {err:.1e})"


# -- planning (meta device, cheap) ------------------------------------------------------------------
def plan(row: Row, max_params: float) -> Row:
    """Pick the small config on the meta device: config, structure signature, or why not."""
    try:
        if row.family == "timm":
            kwargs, input_size, probe = _pick_config(row.model)
            row.kwargs, row.input_size = kwargs, input_size
            row.config = (", ".join(f"{k}={v}" for k, v in kwargs.items() if k != "num_classes")
                          + f"; input {input_size[1]}")
        elif row.family == "hf":
            probe = _hf_plan(row)
        else:
            probe = _create(row, meta=True)
            side = row.kwargs["image_size"]
            row.input_size = (3, side, side)
            short = {"num_layers": "layers", "num_heads": "heads", "hidden_dim": "hidden", "mlp_dim": "mlp",
                     "patch_size": "patch"}
            row.config = ", ".join(f"{short[k]}={v}" for k, v in row.kwargs.items() if k in short) + f"; input {side}"
    except Exception as e:
        row.status, row.error = "error", _short(e)
        return row
    row.signature = _structure_signature(probe, row.input_size, row.kwargs)
    n_params = sum(p.numel() for p in probe.parameters())
    if n_params > max_params:
        row.status, row.error = "skipped", f"{n_params / 1e6:.0f}M params even when small (--max-params)"
    return row


def _hf_plan(row: Row):
    import transformers
    cls = getattr(transformers, row.kwargs["cls"])
    row.module = cls.__module__.split(".")[2] if cls.__module__.startswith("transformers.models.") else cls.__module__
    row.kwargs["attn"] = "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"
    probe = _create(row, meta=True)
    cfg = row.kwargs["config"]
    size = cfg.get("image_size", 224)
    side = size[0] if isinstance(size, (list, tuple)) else size
    row.input_size = (int(cfg.get("num_channels", 3)), int(side), int(side))
    parts = [f"{_HF_KEY_SHORT.get(k, k)}={v}" for k, v in cfg.items()
             if k not in ("num_labels", "image_size")]
    row.config = ", ".join(parts) + f"; input {side}" + ("; eager attention only" if row.kwargs["attn"] == "eager" else "")
    return probe


def check_model(row: Row) -> Row:
    """Run both attention paths of one planned architecture (in a worker process)."""
    import torch
    from vitprune.frontend.capture import example_input_for
    torch.set_num_threads(1)
    start = time.perf_counter()

    def build(path: str | None):
        model = _create(row, meta=False, path=path)
        _randomize(model)
        return model

    try:
        x = example_input_for(tuple(row.input_size), batch=2)
        has_switch = _has_switch(row, _create(row, meta=True))
        res = _one_path(build("sdpa" if has_switch else None), x)
        row.captured, row.unsupported, row.groups = res["captured"], res["unsupported"], res["groups"]
        row.prunable, row.width_ok, row.flops_exact, row.equivalent, row.error = (
            res["prunable"], res["width_ok"], res["flops_exact"], res["equivalent"], res["error"])
        if has_switch:
            m = _one_path(build("matmul"), x)
            row.matmul = _summary(m)
            if m["error"] and m["error"] != res["error"]:
                row.error = row.error + "; " * bool(row.error) + f"matmul path: {m['error']}"
        row.status = "error" if row.error else "ok"
    except Exception as e:
        row.status = "error"
        row.error = _short(e)
    row.seconds = time.perf_counter() - start
    return row


def _randomize(model) -> None:
    """Small seeded noise on every float parameter: zero biases, unit norms and 1e-5 layer-scales of
    a fresh init would let a wrong rewrite pass the zero-mask check."""
    import torch
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _summary(res: dict) -> str:
    if not res["captured"]:
        return "capture fails"
    if res["unsupported"]:
        return _summary_unsupported(res["unsupported"])
    if res["width_ok"] is False:
        return "width fails"
    if res["flops_exact"] is False:
        return "FLOPs differ"
    if res["equivalent"] is False:
        return "zero-mask differs"
    if res["error"]:
        return "error"
    return "ok" if res["width_ok"] else "no prunable group"


def _short(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:400]}"


# -- worker pool with a time limit per model ------------------------------------------------------------
def _worker(tasks, results):
    sys.path.insert(0, str(ROOT))
    import warnings
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    while True:
        task = tasks.get()
        if task is None:
            return
        row = Row(**task)
        try:
            row = check_model(row)
        except BaseException as e:  # never let one model take the worker down silently
            row.status, row.error = "error", _short(e) + traceback.format_exc()[-200:]
        results.put(asdict(row))


class Pool:
    """``jobs`` worker processes; a model over ``timeout`` seconds gets its worker killed."""

    def __init__(self, jobs: int, timeout: float):
        self.ctx = mp.get_context("spawn")
        self.jobs, self.timeout = jobs, timeout
        self.workers: list[dict] = []

    def _start(self) -> dict:
        tasks, results = self.ctx.Queue(), self.ctx.Queue()
        p = self.ctx.Process(target=_worker, args=(tasks, results), daemon=True)
        p.start()
        return {"proc": p, "tasks": tasks, "results": results, "task": None, "since": 0.0}

    def run(self, todo: list[Row], budget: float, on_row) -> list[Row]:
        """Run until ``todo`` is empty or ``budget`` seconds passed; return what was not started."""
        deadline = time.perf_counter() + budget
        todo = list(todo)
        self.workers = [self._start() for _ in range(self.jobs)]
        while todo or any(w["task"] for w in self.workers):
            for i, w in enumerate(self.workers):
                if w["task"] is None and todo and time.perf_counter() < deadline:
                    w["task"], w["since"] = todo.pop(0), time.perf_counter()
                    w["tasks"].put(asdict(w["task"]))
                if w["task"] is None:
                    continue
                try:
                    on_row(Row(**w["results"].get(timeout=0.05)))
                    w["task"] = None
                except Exception:  # queue.Empty: still working
                    elapsed = time.perf_counter() - w["since"]
                    if elapsed > self.timeout or not w["proc"].is_alive():
                        row, dead = w["task"], not w["proc"].is_alive()
                        row.status = "error" if dead else "timeout"
                        row.error = f"worker died (exit {w['proc'].exitcode})" if dead else f"over {self.timeout:.0f} s"
                        row.seconds = elapsed
                        on_row(row)
                        w["proc"].kill()
                        w["proc"].join()
                        self.workers[i] = self._start()
            if not todo and not any(w["task"] for w in self.workers):
                break
            if time.perf_counter() >= deadline and not any(w["task"] for w in self.workers):
                break
        for w in self.workers:
            w["tasks"].put(None)
        for w in self.workers:
            w["proc"].join(timeout=5)
            if w["proc"].is_alive():
                w["proc"].kill()
        return todo


# -- listing and reporting ---------------------------------------------------------------------------------
def candidates(families: list[str], modules: list[str]) -> list[Row]:
    """Unplanned rows: the required architectures first, then round-robin over timm's modules, the
    Hugging Face classes and torchvision, so a budget cut still samples every family."""
    per_module: list[list[Row]] = []
    if "timm" in families:
        import timm
        for m in modules:
            try:
                per_module.append([Row(n, m, "timm") for n in timm.list_models(module=m)])
            except Exception:
                per_module.append([])
    if "hf" in families:
        per_module.append([Row(f"hf:{name}", "", "hf", kwargs={"cls": cls, "config_cls": cfg, "config": dict(kw)})
                           for name, cls, cfg, kw in HF_MODELS])
    if "torchvision" in families:
        per_module.append([Row(f"torchvision:{name}", "vision_transformer", "torchvision", kwargs=dict(kw))
                           for name, kw in TORCHVISION_MODELS.items()])
    ordered = [x for batch in zip_longest(*per_module) for x in batch if x is not None]
    return sorted(ordered, key=lambda r: r.model not in REQUIRED)  # the must-support ones first (stable)


def _mark(v: bool | None) -> str:
    return "n/a" if v is None else ("yes" if v else "**NO**")


def markdown(rows: list[Row], header: str) -> str:
    lines = [header, "",
             "| model | family | module | config | captured? | unsupported ops | prunable groups / frozen | prunable? "
             "| width pass OK? | FLOP model exact? | pruned = zero-masked? | matmul attention path | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        model = f"**{r.model}**" if r.model in REQUIRED else r.model
        if r.status in ("not run", "skipped", "timeout") or (r.status == "error" and not r.captured):
            lines.append(f"| {model} | {r.family} | {r.module} | {r.config} "
                         f"| {_mark(r.captured) if r.status == 'error' else '-'} "
                         f"| | | | | | | | {r.status}: {_cell(r.error)} |")
            continue
        unsupported = ", ".join(r.unsupported) or "none"
        lines.append(f"| {model} | {r.family} | {r.module} | {r.config} | {_mark(r.captured)} | {unsupported} "
                     f"| {r.groups} | {_mark(r.prunable)} | {_mark(r.width_ok)} | {_mark(r.flops_exact)} "
                     f"| {_mark(r.equivalent)} | {r.matmul} | {_cell(r.error)} |")
    return "\n".join(lines) + "\n"


def _cell(s: str, limit: int = 400) -> str:
    return s.replace("|", "\\|").replace("\n", " ")[:limit]


def _clean(r: Row) -> bool:
    return (r.status == "ok" and not r.unsupported and r.matmul in ("ok", "n/a")
            and bool(r.width_ok) and bool(r.flops_exact) and r.equivalent is not False)


def _covered(rows: list[Row]) -> list[Row]:
    return [r for r in rows if (r.status in ("ok", "error", "timeout") and not r.dup_of) or r.dup_of]


def summary(rows: list[Row], families: list[str]) -> str:
    ran = [r for r in rows if r.status in ("ok", "error", "timeout") and not r.dup_of]
    dups = [r for r in rows if r.dup_of]
    covered = ran + dups
    clean = [r for r in covered if _clean(r)]
    by_status = Counter("duplicate" if r.dup_of else r.status for r in rows)
    ops = Counter(o for r in ran for o in r.unsupported)

    def names(rs: list[Row]) -> str:
        return ", ".join(r.model for r in rs) or "none"

    required = [r for r in covered if r.model in REQUIRED]
    matmul_only = [r for r in ran if r.captured and r.matmul not in ("ok", "n/a") and not r.unsupported
                   and r.width_ok and r.flops_exact and r.equivalent is not False]
    lines = [
        f"- required architectures (bold) fully supported: {sum(r in clean for r in required)} of {len(required)}",
        f"- architectures listed: {len(rows)}; distinct small structures run: {len(ran)}; "
        f"duplicates of a run structure: {len(dups)} ("
        + ", ".join(f"{k}: {v}" for k, v in sorted(by_status.items())) + ")",
        f"- fully supported (no unsupported op, width pass runs, FLOP model exact, pruned = zero-masked; "
        f"both attention paths): {len(clean)} of {len(covered)} covered architectures",
    ]
    for fam in families:
        fc = [r for r in covered if r.family == fam]
        lines.append(f"  - {fam}: {sum(r in clean for r in fc)} of {len(fc)} fully supported; "
                     f"capture fails: {sum(1 for r in fc if not r.captured and r.status != 'timeout')}; "
                     f"listed {sum(1 for r in rows if r.family == fam)}, "
                     f"skipped {sum(1 for r in rows if r.family == fam and r.status == 'skipped')}, "
                     f"not run {sum(1 for r in rows if r.family == fam and r.status == 'not run')}")
    lines += [
        f"- width pass produced a graph that fails to run: "
        f"{names([r for r in ran if r.width_ok is False or r.matmul == 'width fails'])}",
        f"- FLOP model not exact: {names([r for r in ran if r.flops_exact is False or r.matmul == 'FLOPs differ'])}",
        f"- pruning differs from zero-masking the removed channels: "
        f"{names([r for r in ran if r.equivalent is False or r.matmul == 'zero-mask differs'])}",
        f"- several prunable groups share one name (WidthPruning reaches only the first): "
        f"{names([r for r in ran if 'names shared by several' in r.error])}",
        f"- capture fails: {names([r for r in covered if not r.captured and r.status != 'timeout'])}",
        f"- only the matmul attention path fails a check: {names(matmul_only)}",
        "- other errors: " + ("; ".join(f"{r.model} ({_cell(r.error, 120)})" for r in ran if r.status == "error"
                                        and r.captured and r.width_ok is not False and r.flops_exact is not False
                                        and r.equivalent is not False and "names shared" not in r.error
                                        and r.matmul in ("ok", "n/a")) or "none"),
        f"- no prunable group at all: {names([r for r in ran if r.captured and not r.prunable and r.groups])}",
        f"- timeouts: {names([r for r in rows if r.status == 'timeout'])}",
    ]
    if ops:
        lines.append("- unsupported ops (distinct structures): "
                     + ", ".join(f"`{o}` ({n})" for o, n in ops.most_common()))
    return "\n".join(lines) + "\n"


def failures(rows: list[Row]) -> str:
    """Every distinct structure that is not fully supported, grouped by the exact reason."""
    by_reason: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        if r.dup_of or r.status not in ("ok", "error", "timeout") or _clean(r):
            continue
        if r.status == "timeout":
            reason = f"timeout: {r.error}"
        elif not r.captured:
            reason = r.error
        else:
            reason = "; ".join(filter(None, [
                "unsupported ops: " + ", ".join(f"`{o}`" for o in r.unsupported) if r.unsupported else "",
                r.error or ("" if r.matmul in ("ok", "n/a") or r.matmul == _summary_unsupported(r.unsupported)
                            else f"matmul path: {r.matmul}")]))
            if r.matmul == "ok":
                reason += " [SDPA path; the matmul path passes]"
            elif r.matmul != "n/a" and "matmul path" not in reason:
                reason += " [both attention paths]"
        by_reason[_generic(reason)].append(r.model)
    if not by_reason:
        return "## What fails\n\nnothing\n"
    dups = Counter(r.dup_of for r in rows if r.dup_of)
    lines = ["## What fails (distinct structures; `+N` = duplicates with the same structure)", ""]
    for reason, models in sorted(by_reason.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        shown = ", ".join(m + (f" (+{dups[m]})" if dups[m] else "") for m in models)
        lines.append(f"- {_cell(reason, 700)}: {shown}")
    return "\n".join(lines) + "\n"


def _summary_unsupported(ops: list[str]) -> str:
    return "unsupported: " + ", ".join(ops)


def _generic(reason: str) -> str:
    """Group reasons that differ only in FLOP counts or relative errors (the table has the numbers)."""
    reason = re.sub(r"(dense|pruned) \d+ vs \d+", r"\1 N vs N", reason)
    return re.sub(r"relative error [\d.e+-]+", "relative error N", reason)


def _revision() -> str:
    """The commit measured, and which files differed from it (results depend on vitprune/ and passes/)."""
    import subprocess
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                                capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "(revision unknown)"
    changed = [line[3:] for line in status]
    core = [p for p in changed if p.startswith(("vitprune/", "passes/"))]
    other = [p for p in changed if p not in core]
    if not changed:
        return f"at {head} (clean tree)"
    text = f"at {head} with uncommitted changes ("
    text += f"to vitprune/passes: {', '.join(core)}" if core else "none to vitprune/ or passes/"
    return text + (f"; elsewhere: {', '.join(other)}" if other else "") + ")"


def _baseline(path: str | None) -> str:
    """The headline counts of an earlier coverage.md (e.g. ``git show HEAD:benchmarks/coverage.md``)."""
    if not path or not Path(path).exists():
        return ""
    text = Path(path).read_text()
    rev = re.search(r"vitprune (at \S+[^;]*);", text)
    full = re.search(r"fully supported \(.*?\): (\d+) of (\d+) covered", text)
    fails = re.search(r"^- (?:trace|capture) fails: (.*)$", text, re.M)
    n_fail = 0 if not fails or fails.group(1).strip() == "none" else len(fails.group(1).split(", "))
    if not full:
        return ""
    return (f"Before (the results this file replaces, vitprune {rev.group(1) if rev else '?'}): "
            f"{full.group(1)} of {full.group(2)} covered architectures fully supported, "
            f"{n_fail} capture (trace) failures.\n\n")


def _baseline_rows(path: str | None) -> dict[str, bool]:
    """model → fully supported, from an earlier coverage.md's table (with or without a family column)."""
    if not path or not Path(path).exists():
        return {}
    out: dict[str, bool] = {}
    cols: list[str] = []
    for line in Path(path).read_text().splitlines():
        if line.startswith("| model |"):
            cols = [c.strip() for c in line.strip("|").split("|")]
            continue
        if not cols or not line.startswith("| ") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if len(cells) != len(cols):
            continue
        c = dict(zip(cols, cells))
        note = c.get("note", "")
        ok = (c.get("traced?", c.get("captured?")) == "yes" and c.get("unsupported ops") == "none"
              and c.get("width pass OK?") == "yes" and c.get("FLOP model exact?") == "yes"
              and c.get("pruned = zero-masked?") in ("yes", "n/a") and c.get("matmul attention path") in ("ok", "n/a")
              and (not note or (note.startswith("same small structure as") and ";" not in note)))
        out[c["model"].strip("*")] = ok
    return out


def changes(rows: list[Row], before: dict[str, bool]) -> str:
    """Architectures whose verdict differs from the baseline's."""
    if not before:
        return ""
    now = {r.model: _clean(r) for r in _covered(rows)}
    gained = sorted(m for m, ok in now.items() if ok and not before.get(m, False) and m in before)
    lost = sorted(m for m, ok in now.items() if not ok and before.get(m, False))
    new = sorted(m for m in now if m not in before)
    return ("## Changes since the baseline\n\n"
            f"- newly fully supported ({len(gained)}): {', '.join(gained) or 'none'}\n"
            f"- fully supported before, not now ({len(lost)}): {', '.join(lost) or 'none'}\n"
            f"- not in the baseline ({len(new)}; {sum(now[m] for m in new)} fully supported)\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    ap.add_argument("--modules", nargs="+", default=DEFAULT_MODULES, help="timm modules")
    ap.add_argument("--limit", type=int, default=0, help="at most this many architectures (0: all)")
    ap.add_argument("--budget", type=float, default=1500.0, help="seconds for the whole survey")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per architecture")
    ap.add_argument("--max-params", type=float, default=150e6, help="skip small instances above this")
    ap.add_argument("--workers", "--jobs", dest="jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "coverage.md"))
    ap.add_argument("--json", help="also write every row as JSON here (for --resume)")
    ap.add_argument("--resume", help="reuse the results in this --json file (same structure) and run "
                    "only the rest: one survey split over several bounded runs")
    ap.add_argument("--baseline", help="an earlier coverage.md whose headline counts the header quotes")
    ap.add_argument("--note", default="", help="a sentence for the header (e.g. how a split survey ran)")
    args = ap.parse_args(argv)
    families = [f for f in FAMILIES if f in args.families]
    previous: dict[str, dict] = {}
    if args.resume and Path(args.resume).exists():
        previous = {r["model"]: r for r in json.loads(Path(args.resume).read_text())
                    if r["status"] in ("ok", "error", "timeout") and not r["dup_of"]}

    sys.path.insert(0, str(ROOT))
    import warnings
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    baseline = _baseline(args.baseline)
    revision = _revision()  # before the run: what was measured
    listed = candidates(families, args.modules)
    if args.limit:
        listed = listed[:args.limit]
    start = time.perf_counter()
    rows: dict[str, Row] = {}
    first_of: dict[str, str] = {}  # structure signature → first architecture with it
    todo: list[Row] = []
    reused = 0
    for row in listed:
        row = plan(row, args.max_params)
        rows[row.model] = row
        if row.status != "ok":
            continue
        if row.signature in first_of:
            row.status = "duplicate"
            continue
        first_of[row.signature] = row.model
        old = previous.get(row.model)
        if old is not None and old["signature"] == row.signature:
            rows[row.model] = Row(**{**old, "input_size": tuple(old["input_size"])})
            reused += 1
            continue
        todo.append(row)
    print(f"[{time.perf_counter() - start:6.1f}s] {len(listed)} architectures, {len(todo)} distinct small "
          f"structures to run, {reused} reused", file=sys.stderr, flush=True)

    done = {name for name, r in rows.items() if r.status in ("ok", "error", "timeout")
            and name not in {t.model for t in todo}}  # reused results

    def on_row(row: Row) -> None:
        rows[row.model] = row
        done.add(row.model)
        print(f"[{time.perf_counter() - start:6.1f}s] {row.model}: {row.status} ({row.seconds:.1f}s) "
              f"{row.error[:160]}", file=sys.stderr, flush=True)
        if args.json:  # progress survives a kill: --resume picks it up
            Path(args.json).write_text(json.dumps([asdict(rows[n]) for n in sorted(done)], indent=1))

    left = Pool(args.jobs, args.timeout).run(todo, args.budget, on_row)
    for row in left:
        row.status, row.error = "not run", "survey budget spent"
    for row in rows.values():  # duplicates report the result of the first of their structure
        if row.status == "duplicate":
            first = rows[first_of[row.signature]]
            if first.status not in ("ok", "error", "timeout"):  # its structure was not run either
                row.status, row.error = first.status, f"same small structure as {first.model}: {first.error}"
                continue
            keep = {k: v for k, v in asdict(first).items() if k not in ("model", "module", "family", "config")}
            rows[row.model] = Row(**{**asdict(row), **keep})
            rows[row.model].error = f"same small structure as {first.model}" + (f"; {first.error}" if first.error else "")
            rows[row.model].dup_of = first.model
    ordered = sorted(rows.values(), key=lambda r: (FAMILIES.index(r.family), r.module, r.model))
    elapsed = time.perf_counter() - start
    import torch
    versions = [f"torch {torch.__version__}"]
    for fam, mod in (("timm", "timm"), ("hf", "transformers"), ("torchvision", "torchvision")):
        if fam in families:
            versions.append(f"{mod} {__import__(mod).__version__}")
    worker_s = sum(r.seconds for r in ordered if not r.dup_of)
    described = {
        "timm": f"timm depth 2 and a 4×4-patch input where the constructor accepts them, pretrained=False, "
                f"10 classes (modules {', '.join(args.modules)})",
        "hf": "Hugging Face small random configs (2 layers, hidden 64, 4 heads, MLP 128 or ratio 2, patch 8, "
              "input 32)",
        "torchvision": "torchvision VisionTransformer with 2 layers, their own patch size and head count, "
                       "head-dim 8/10, 4×4 patches",
    }
    header = (f"# vitprune coverage over ViT families ({', '.join(families)}), torch.export frontend\n\n"
              f"vitprune {revision}; {', '.join(versions)}. Small instances: "
              + "; ".join(described[f] for f in families)
              + f". The width pass keeps every other channel of every prunable group. {len(rows)} architectures. "
              f"Checks took {worker_s / 60:.0f} worker-minutes in all; "
              + (f"this invocation only rebuilt the report from the {reused} results of earlier bounded runs "
                 f"(--resume; no model run, {elapsed:.0f} s)" if reused and not todo else
                 f"this invocation ran {len(todo)} distinct structures in {elapsed:.0f} s wall-clock (planning "
                 f"included) with {args.jobs} workers, {args.timeout:.0f} s per model, budget {args.budget:.0f} s"
                 + (f", and reused {reused} results of earlier bounded runs (--resume)" if reused else ""))
              + "." + (f" {args.note}" if args.note else "") + "\n\n" + baseline + summary(ordered, families) + "\n" + failures(ordered) + "\n"
              + changes(ordered, _baseline_rows(args.baseline)))
    text = markdown(ordered, header)
    print(text)
    Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in ordered], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
