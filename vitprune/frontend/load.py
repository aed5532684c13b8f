"""Model loading: ``timm:<name>`` or ``torchvision:<name>`` (random weights under a seed), a checkpoint
plus ``arch``, a Hugging Face model directory, a ``torch.export`` ``.pt2`` archive (what vitprune writes
for a compressed model), or (only when trusted) a whole pickled ``nn.Module``.

What runs code from a file: checkpoints are read with ``torch.load(weights_only=True)``, which never
does; a file that pickles Python objects (e.g. ``torch.save(model)``) needs ``trust_pickle=True``.
Hugging Face directories are read offline (``local_files_only=True``), never with
``trust_remote_code``; transformers reads ``model.safetensors`` as data and ``pytorch_model.bin`` with
``weights_only=True``. A ``.pt2`` archive also needs ``trust_pickle=True``: ``torch.export.load``
unpickles parts of it with ``weights_only=False`` (sample inputs, pickled weights and constants) and
``ExportedProgram.module()`` ``exec``s the guard expressions stored in it, so a crafted ``.pt2`` runs
arbitrary code; PyTorch's own documentation says never to load an untrusted one.

Whether the model is a ViT is not checked here; the tracer refuses models it cannot analyse.
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import os
import pickle
import re
import stat
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from torch import nn
from torchvision import models

from vitprune.errors import InputError, LoadError
from vitprune.frontend import hetdpt

#: Keys under which training checkpoints keep their state dict, in order of preference.
STATE_DICT_KEYS: tuple[str, ...] = ("state_dict", "model", "state_dict_ema")
#: MODEL / --arch prefixes of the architectures built with random weights; a bare --arch means timm.
ARCH_KINDS: tuple[str, ...] = ("timm", "torchvision")
_TV_DEFAULT_CLASSES = 1000  # torchvision classifiers' num_classes default
#: Weight files of a save_pretrained directory (sharded weights come with an index).
HF_WEIGHT_FILES: tuple[str, ...] = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".h5", ".msgpack", ".ckpt", ".pt", ".pth")


@dataclass
class LoadedModel:
    """A loaded model, where it came from (enough to rebuild it, or None for a pickle), and the
    (C, H, W) example input size the tracer should use."""

    model: nn.Module
    source: dict | None
    input_size: tuple[int, int, int]
    #: what the user should know about how the file was read (e.g. which of several weight sets)
    notes: list[str] = field(default_factory=list)
    #: for a checkpoint dict: ``{"weights_key": the key loaded, "weight_sets": every key holding weights}``
    weights: dict[str, Any] | None = None


def load_model(
    ref: str,
    *,
    arch: str | None = None,
    trust_pickle: bool = False,
    img_size: int | None = None,
    num_classes: int | None = None,
    seed: int = 0,
    hetdpt_options: hetdpt.HetDPTOptions | None = None,
    weights_key: str | None = None,
) -> LoadedModel:
    """Load ``ref`` (see the module docstring): ``timm:<name>`` / ``torchvision:<name>``, a checkpoint
    file (with ``arch``), a Hugging Face model directory, a ``.pt2`` archive or a vitprune ``.pt``.

    Random weights (``timm:``, ``torchvision:``, a Hugging Face config without weights) are drawn
    under ``seed`` in a forked RNG: equal seeds give equal weights, and the global RNG is untouched.
    ``arch="hetdpt"`` (or ``hetdpt:NAME``) reads a checkpoint in HetDPT's released layout
    (:mod:`vitprune.frontend.hetdpt`), with what its weights do not say in ``hetdpt_options``.
    ``weights_key`` picks the weight set of a checkpoint dict holding several (``model``,
    ``state_dict_ema``, ...); without it the first of :data:`STATE_DICT_KEYS` is used, and a note
    (``LoadedModel.notes``) says which, and which others the file holds.
    """
    if hetdpt_options is not None and hetdpt.arch_name(arch) is None:
        raise InputError("--prune-layer-attn, --prune-layer-act and --hetdpt-gelu apply to --arch hetdpt only")
    _check_positive("img_size", img_size)
    _check_positive("num_classes", num_classes, allow_zero=True)
    _check_seed(seed)
    kind = next((k for k in ARCH_KINDS if ref.startswith(k + ":")), None)
    if kind is not None:
        name = ref[len(kind) + 1:]
        kwargs = _arch_kwargs(kind, name, img_size, num_classes)
        model = _build_arch(kind, name, kwargs, seed)
        model.eval()
        loaded = LoadedModel(model, _arch_source(kind, name, kwargs), input_size_of(model, img_size))
    else:
        _check_regular(ref)
        loaded = _load_file(ref, arch=arch, trust_pickle=trust_pickle, img_size=img_size,
                            num_classes=num_classes, seed=seed, hetdpt_options=hetdpt_options,
                            weights_key=weights_key)
    if weights_key is not None and loaded.weights is None:
        raise InputError(f"--weights-key {weights_key} applies to a checkpoint file holding several weight sets; "
                         f"{ref} is not one: drop --weights-key")
    check_weights(loaded.model, ref)
    return loaded


def check_weights(model: nn.Module, where: str | None = None) -> None:
    """Refuse non-finite weights, naming the first bad tensor: NaN or inf in a parameter, NaN in a
    buffer (a buffer may hold -inf on purpose, e.g. an attention mask). Such weights would otherwise
    surface far later, as an ONNX parity failure, or never (``--no-export``)."""
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            if t.is_meta or not (t.is_floating_point() or t.is_complex()):
                continue
            if kind == "parameter" and torch.isfinite(t.detach().sum(dtype=torch.float64)):
                continue  # NaN and ±inf reach the sum: a finite sum means a finite tensor, cheaply
            bad = ~torch.isfinite(t) if kind == "parameter" else torch.isnan(t)
            count = int(bad.sum())
            if count:
                nans = int(torch.isnan(t).sum())
                raise LoadError(f"{where + ': ' if where else ''}the weights are not finite: {kind} {name} "
                                f"{list(t.shape)} has {nans} NaN and {count - nans} infinite value(s); "
                                f"the checkpoint is damaged or the training diverged")


def input_size_of(model: nn.Module, img_size: int | None = None) -> tuple[int, int, int]:
    """(C, H, W): explicit ``img_size`` > timm ``patch_embed`` > torchvision ``image_size`` > a Hugging
    Face ``config`` (``image_size``, ``num_channels``; its ``vision_config`` if it has one) > timm
    ``pretrained_cfg["input_size"]``. With ``img_size`` the channels come from the first rule that knows them."""
    hints = _size_hints(model)
    if img_size is not None:
        chans = next((c for c, _ in hints if c is not None), 3)
        return (chans, int(img_size), int(img_size))
    for chans, hw in hints:
        if chans is not None and hw is not None:
            return (chans, hw[0], hw[1])
    raise LoadError(
        f"cannot tell the input size of this {type(model).__name__}; pass --img-size N (square N x N input)"
    )


def _size_hints(model: nn.Module) -> list[tuple[int | None, tuple[int, int] | None]]:
    """(channels, (H, W)) as each convention states them, most specific first; None where unknown."""
    pe = getattr(model, "patch_embed", None)
    pe_chans = _int_or_none(getattr(getattr(pe, "proj", None), "in_channels", None))
    pe_hw = _hw(getattr(pe, "img_size", None)) if pe_chans is not None else None
    tv_hw = _hw(getattr(model, "image_size", None))
    tv_chans = _int_or_none(getattr(getattr(model, "conv_proj", None), "in_channels", None))
    tv_chans = tv_chans or (3 if tv_hw else None)
    config = getattr(model, "config", None)
    config = getattr(config, "vision_config", None) or config
    hf_hw = _hw(getattr(config, "image_size", None))
    hf_chans = _int_or_none(getattr(config, "num_channels", None)) or (3 if hf_hw else None)
    cfg = getattr(model, "pretrained_cfg", None)
    cfg_size = cfg.get("input_size") if isinstance(cfg, dict) else None
    cfg_hint: tuple[int | None, tuple[int, int] | None] = (None, None)
    if cfg_size is not None and len(tuple(cfg_size)) == 3:
        cfg_hint = (int(cfg_size[0]), (int(cfg_size[1]), int(cfg_size[2])))
    return [(pe_chans, pe_hw), (tv_chans, tv_hw), (hf_chans, hf_hw), cfg_hint]


def _int_or_none(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _hw(v: Any) -> tuple[int, int] | None:
    """An int or an (H, W) pair as (H, W); None for anything else."""
    if _int_or_none(v) is not None:
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(_int_or_none(x) is not None for x in v):
        return (v[0], v[1])
    return None


# ---------------------------------------------------------------------------------------------- architectures
def _check_positive(name: str, v: int | None, allow_zero: bool = False) -> None:
    if v is None:
        return
    lo = 0 if allow_zero else 1
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        flag = "--" + name.replace("_", "-")
        raise InputError(f"{flag} must be an integer >= {lo}, got {v!r}")


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise InputError(f"--seed must be an integer in [0, 2**64), got {seed!r}")


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG for the block; the caller's RNG state is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _split_arch(arch: str) -> tuple[str, str]:
    """``timm:NAME`` / ``torchvision:NAME`` → (kind, NAME); a bare name is a timm name."""
    for kind in ARCH_KINDS:
        if arch.startswith(kind + ":"):
            return kind, arch[len(kind) + 1:]
    return "timm", arch


def _arch_kwargs(kind: str, name: str, img_size: int | None, num_classes: int | None) -> dict[str, Any]:
    if kind == "timm":
        return _timm_kwargs(img_size, num_classes)
    kwargs: dict[str, Any] = {}
    if img_size is not None and _is_torchvision_vit(name):
        kwargs["image_size"] = img_size  # other torchvision classifiers take any input size
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return kwargs


def _build_arch(kind: str, name: str, kwargs: dict[str, Any], seed: int) -> nn.Module:
    with _seeded(seed):
        return _create_timm(name, kwargs) if kind == "timm" else _create_torchvision(name, kwargs)


def _arch_source(kind: str, name: str, kwargs: dict[str, Any]) -> dict:
    return {"kind": kind, "arch": name, "kwargs": dict(kwargs)}


def _timm_kwargs(img_size: int | None, num_classes: int | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if img_size is not None:
        kwargs["img_size"] = img_size
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return kwargs


def _create_timm(name: str, kwargs: dict[str, Any]) -> nn.Module:
    if not name or not timm.is_model(name):
        raise LoadError(f"unknown timm architecture {name!r}{_suggest(name)}")
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        if kwargs:
            raise LoadError(
                f"timm model {name} does not accept {', '.join(kwargs)} ({e}); drop --img-size/--num-classes"
            ) from e
        raise


def _suggest(name: str) -> str:
    names: list[str] = []
    for part in re.split(r"[_\-.]+", name):
        if len(part) >= 3:
            names.extend(timm.list_models(f"*{part}*"))
    return _did_you_mean(name, sorted(set(names)) or timm.list_models(), "timm.list_models()")


def _did_you_mean(name: str, names: list[str], listing: str) -> str:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.4)
    if close:
        return f"; did you mean {', '.join(close)}?"
    return f"; see {listing} for the names"


def _torchvision_classifiers() -> list[str]:
    return models.list_models(module=models)  # classification only: not detection, video, ...


def _is_torchvision_vit(name: str) -> bool:
    if name not in _torchvision_classifiers():
        return False
    return models.get_model_builder(name).__module__ == "torchvision.models.vision_transformer"


def _create_torchvision(name: str, kwargs: dict[str, Any]) -> nn.Module:
    classifiers = _torchvision_classifiers()
    if name not in classifiers:
        if name and name in models.list_models():
            raise LoadError(f"torchvision model {name!r} is not an image classifier; vitprune loads torchvision "
                            f"classification models (torchvision.models.list_models(module=torchvision.models))")
        raise LoadError(f"unknown torchvision model {name!r}"
                        f"{_did_you_mean(name, classifiers, 'torchvision.models.list_models()')}")
    try:
        return models.get_model(name, weights=None, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        if kwargs:
            raise LoadError(f"torchvision model {name} does not accept {_fmt_kwargs(kwargs)} ({_one_line(e)}); "
                            f"check --img-size/--num-classes") from e
        raise


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}" if text else type(e).__name__


# ---------------------------------------------------------------------------------------------- files
def _check_regular(path: str) -> None:
    """Refuse at once what is not a file or a folder: reading a FIFO, a socket or a device would
    block or never end."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing or unreadable: _load_file says which
    kind = _special_kind(mode)
    if kind:
        raise InputError(f"model {path} is a {kind}, not a model file or folder")


def special_kind(path: str) -> str | None:
    """``"FIFO"``, ``"socket"``, ``"device"`` when ``path`` is one (reading it could block), else None."""
    try:
        return _special_kind(os.stat(path).st_mode)
    except OSError:
        return None


def _special_kind(mode: int) -> str | None:
    if stat.S_ISFIFO(mode):
        return "FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return None


def _load_file(
    path: str, *, arch: str | None, trust_pickle: bool, img_size: int | None, num_classes: int | None, seed: int,
    hetdpt_options: hetdpt.HetDPTOptions | None = None, weights_key: str | None = None,
) -> LoadedModel:
    if not os.path.exists(path):
        hint = (" (for an architecture write timm:<name> or torchvision:<name>)"
                if os.sep not in path and "." not in path else "")
        raise InputError(f"model file {path} does not exist{hint}")
    if os.path.isdir(path):
        return _load_hf_dir(path, img_size=img_size, num_classes=num_classes, seed=seed)
    is_pt2 = path.lower().endswith(".pt2") or _is_pt2_archive(path)
    if os.path.getsize(path) == 0:
        what = "torch.export .pt2 archive" if is_pt2 else "PyTorch checkpoint"
        raise LoadError(f"{path} is not a {what}: the file is empty")
    _check_zip_crc(path, "torch.export .pt2 archive" if is_pt2 else "PyTorch checkpoint")
    if is_pt2:
        return _load_pt2(path, trust_pickle=trust_pickle, img_size=img_size, num_classes=num_classes)
    obj = _torch_load(path, trust_pickle)

    if isinstance(obj, nn.Module):  # only reachable with trust_pickle
        obj.eval()
        return LoadedModel(obj, None, input_size_of(obj, img_size))
    if isinstance(obj, dict):
        held, key, keys = _unwrap_state_dict(obj, path, weights_key)
        if isinstance(held, nn.Module):  # {"model": module}, trusted pickle only
            held.eval()
            loaded = LoadedModel(held, None, input_size_of(held, img_size))
        elif hetdpt.arch_name(arch) is not None:
            loaded = _from_hetdpt(obj, held, path, arch=str(arch), options=hetdpt_options or hetdpt.HetDPTOptions(),
                                  img_size=img_size, num_classes=num_classes)
        else:
            loaded = _from_state_dict(held, path, arch=arch, img_size=img_size, num_classes=num_classes, seed=seed)
        return _with_weights_key(loaded, path, key, keys)
    raise LoadError(
        f"{path} holds a {type(obj).__name__}, not a state dict, a checkpoint dict or an nn.Module"
    )


def _check_zip_crc(path: str, what: str) -> None:
    """Refuse a zip archive (``torch.save``'s format, ``.pt2``, ``pytorch_model.bin``) with a member
    that fails its CRC-32: ``torch.load`` and ``torch.export.load`` do not check CRCs, so a flipped
    byte would load as a silently wrong weight. ``testzip`` reads every member once: 0.15 s for a
    352 MB checkpoint here (page cache warm), against 0.22 s for ``torch.load`` itself."""
    try:
        if not zipfile.is_zipfile(path):
            return  # legacy torch.save files, safetensors: their own readers check what they can
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (OSError, zipfile.BadZipFile, RuntimeError, ValueError, EOFError, NotImplementedError) as e:
        raise LoadError(f"{path} is not a {what}; it is corrupt or in another format (a damaged zip archive: "
                        f"{_one_line(e)})") from e
    if bad is not None:
        raise LoadError(f"{path} is a damaged {what}: its member {bad} fails the zip CRC-32 check (the file "
                        f"changed after it was written); copy or download it again")


def _torch_load(path: str, trust_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if "Weights only load failed" not in str(e) or found is None:
            raise _not_a_checkpoint(path, e) from e
        if not trust_pickle:
            raise LoadError(
                f"{path} pickles Python objects (e.g. a whole nn.Module; first: {found.group(1)}) and "
                f"unpickling runs arbitrary code: re-run with --trust-pickle if you trust the file, "
                f"or save model.state_dict() and pass --arch <timm model name>"
            ) from None
    except Exception as e:  # EOFError, zip/miniz RuntimeError, KeyError, ... from a damaged file
        raise _not_a_checkpoint(path, e) from e
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise LoadError(f"{path} could not be unpickled even with --trust-pickle: {type(e).__name__}: {e}") from e


def _not_a_checkpoint(path: str, e: BaseException) -> LoadError:
    text = str(e)
    inner = re.search(r"WeightsUnpickler error:\s*(.+?)(\n\n|$)", text, re.S)
    text = " ".join((inner.group(1) if inner else text).split())
    first = text.split(". ")[0][:160]
    detail = f"{type(e).__name__}: {first}" if first else type(e).__name__
    return LoadError(f"{path} is not a PyTorch checkpoint; it is corrupt or in another format ({detail})")


def _is_state_dict(d: dict) -> bool:
    return bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def _weight_sets(obj: dict) -> list[str]:
    """The keys of ``obj`` holding a state dict or a module: :data:`STATE_DICT_KEYS` first, in order,
    then any other (``state_dict_ema_1``, ``teacher``, ...)."""
    held = [k for k, v in obj.items() if isinstance(k, str) and
            (isinstance(v, nn.Module) or (isinstance(v, dict) and _is_state_dict(v)))]
    return [k for k in STATE_DICT_KEYS if k in held] + [k for k in held if k not in STATE_DICT_KEYS]


def _unwrap_state_dict(obj: dict, path: str,
                       weights_key: str | None = None) -> tuple[dict | nn.Module, str | None, list[str]]:
    """(the state dict or module to load, the key it was under or None, every weight-set key)."""
    if _is_state_dict(obj):
        if weights_key is not None:
            raise LoadError(f"{path} is a bare state dict with no weight sets to choose from; drop --weights-key")
        key, keys, sd = None, [], obj
    else:
        keys = _weight_sets(obj)
        key = weights_key if weights_key is not None else next((k for k in keys if k in STATE_DICT_KEYS), None)
        if key is None or key not in keys:
            found = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
            wanted = f"under --weights-key {key!r}" if weights_key else \
                f"under {', '.join(repr(k) for k in STATE_DICT_KEYS)}"
            raise LoadError(f"{path} holds a dict that is not a state dict and has no state dict {wanted} "
                            f"(its keys: {found})")
        sd = obj[key]
        if isinstance(sd, nn.Module):
            return sd, key, keys
    if all(k.startswith("module.") for k in sd):  # DDP / DataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd, key, keys


def _with_weights_key(loaded: LoadedModel, path: str, key: str | None, keys: list[str]) -> LoadedModel:
    """Record which weight set was loaded (``loaded.weights``) and, when the file holds several, say
    so in a note."""
    if key is None:
        return loaded
    loaded.weights = {"weights_key": key, "weight_sets": keys}
    if len(keys) > 1:
        others = ", ".join(k for k in keys if k != key)
        loaded.notes.append(f"{os.path.basename(path)} holds {len(keys)} weight sets; used {key!r} (not {others}); "
                            f"--weights-key picks another")
    return loaded


def _from_state_dict(
    sd: dict, path: str, *, arch: str | None, img_size: int | None, num_classes: int | None, seed: int = 0
) -> LoadedModel:
    if not arch:
        raise LoadError(f"{path} holds a state dict; pass --arch <timm model name> (or torchvision:<name>)")
    kind, name = _split_arch(arch)
    kwargs = _arch_kwargs(kind, name, img_size, num_classes)
    model = _build_arch(kind, name, kwargs, seed)
    # torchvision classifiers do not all record their class count; it is what the model was built with
    count = None if kind == "timm" else kwargs.get("num_classes", _TV_DEFAULT_CLASSES)
    problems = _mismatches(model, sd)
    if problems and num_classes is None:
        inferred = _infer_num_classes(model, sd, problems, count)
        if inferred is not None:
            kwargs["num_classes"] = inferred
            model = _build_arch(kind, name, kwargs, seed)
            problems = _mismatches(model, sd)
    if problems:
        shown = "; ".join(map(str, problems[:4])) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise LoadError(
            f"{path} does not fit {kind} {name}{_fmt_kwargs(kwargs)}: {shown}. "
            f"Check --arch, or pass --img-size/--num-classes to match the checkpoint"
        )
    model.load_state_dict(sd, strict=True)
    model.eval()
    return LoadedModel(model, _arch_source(kind, name, kwargs), input_size_of(model, img_size))


def _from_hetdpt(checkpoint: dict, sd: dict, path: str, *, arch: str, options: hetdpt.HetDPTOptions,
                 img_size: int | None, num_classes: int | None) -> LoadedModel:
    """A checkpoint in HetDPT's layout: its widths, depth and class count come from the weights, so
    --img-size / --num-classes may only restate them."""
    name = hetdpt.arch_name(arch) or ""
    model = hetdpt.load_checkpoint(checkpoint, sd, options, name=name, where=path)
    size = input_size_of(model)
    if img_size is not None and size[1:] != (img_size, img_size):
        raise LoadError(f"{path} is a HetDPT model for {size[1]}x{size[2]} inputs (its pos_embed); drop "
                        f"--img-size {img_size}")
    if num_classes is not None and num_classes != model.num_classes:
        raise LoadError(f"{path} has {model.num_classes} classes (head.weight), not --num-classes {num_classes}")
    kwargs = {"removed_attention": [i for i, b in enumerate(model.layout.blocks) if not b.attention],
              "removed_activation": [i for i, b in enumerate(model.layout.blocks) if not b.activation],
              "extra_gelu": options.extra_gelu, "merge_mlp": options.merge_mlp, "num_heads": model.layout.num_heads}
    return LoadedModel(model, _arch_source(hetdpt.ARCH_KIND, name, kwargs), size)


def _fmt_kwargs(kwargs: dict[str, Any]) -> str:
    return "(" + ", ".join(f"{k}={v}" for k, v in kwargs.items()) + ")" if kwargs else ""


@dataclass(frozen=True)
class _Mismatch:
    key: str
    text: str

    def __str__(self) -> str:
        return self.text


def _mismatches(model: nn.Module, sd: dict) -> list[_Mismatch]:
    """Every key that would make ``load_state_dict(strict=True)`` fail, in the model's order."""
    own = model.state_dict()
    out: list[_Mismatch] = []
    for k, v in own.items():
        if k not in sd:
            out.append(_Mismatch(k, f"missing {k}"))
        elif tuple(sd[k].shape) != tuple(v.shape):
            out.append(_Mismatch(k, f"{k} is {list(sd[k].shape)} in the file, {list(v.shape)} in the model"))
    out.extend(_Mismatch(k, f"unexpected {k}") for k in sd if k not in own)
    return out


def _classifier_names(model: nn.Module, num_classes: int | None = None) -> list[str]:
    """Module names of the classifier: timm's ``get_classifier()`` (a module, or a tuple of them for
    distilled ViTs); otherwise the last ``nn.Linear`` whose ``out_features`` is the class count
    (``num_classes``, else the model's ``num_classes`` attribute or ``config.num_labels``)."""
    get = getattr(model, "get_classifier", None)
    if callable(get):
        heads = get()
        heads = heads if isinstance(heads, (tuple, list)) else (heads,)
        ids = {id(h) for h in heads if isinstance(h, nn.Module)}
        return [n for n, m in model.named_modules() if id(m) in ids and n]
    if num_classes is None:
        num_classes = _int_or_none(getattr(model, "num_classes", None))
    if num_classes is None:
        num_classes = _int_or_none(getattr(getattr(model, "config", None), "num_labels", None))
    if num_classes is None:
        return []
    heads = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    return heads[-1:]


def _infer_num_classes(
    model: nn.Module, sd: dict, problems: list[_Mismatch], num_classes: int | None = None
) -> int | None:
    """The checkpoint's class count, when the classifier is the only thing that does not fit."""
    names = _classifier_names(model, num_classes)
    if not names:
        return None

    def in_head(key: str) -> bool:
        return any(key == n or key.startswith(n + ".") for n in names)

    if not all(in_head(p.key) for p in problems):
        return None
    w = sd.get(names[0] + ".weight")
    if isinstance(w, torch.Tensor) and w.dim() >= 1:
        return int(w.shape[0])
    if not any(in_head(k) for k in sd):  # headless checkpoint (num_classes=0)
        return 0
    return None


# ---------------------------------------------------------------------------------------------- Hugging Face
def _load_hf_dir(path: str, *, img_size: int | None, num_classes: int | None, seed: int) -> LoadedModel:
    """A ``save_pretrained`` directory, offline; random weights (under ``seed``) when it has none."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise LoadError(
            f"{path} is a directory but has no config.json; a Hugging Face model directory as save_pretrained "
            f"writes it (config.json plus model.safetensors or pytorch_model.bin) is expected"
        )
    transformers = _import_transformers()
    with _quiet_transformers(transformers):
        config = _hf_config(transformers, path)
        cls = _hf_class(transformers, config, path)
        _check_image_model(cls, config, path)
        kwargs = _hf_overrides(config, cls.__name__, img_size, num_classes)
        with _seeded(seed):
            model = _hf_from_pretrained(cls, path, config) if _has_hf_weights(path) else cls(config)
    model.float().eval()
    source = {"kind": "hf", "path": os.path.abspath(path), "class": cls.__name__, "kwargs": kwargs}
    return LoadedModel(model, source, input_size_of(model, img_size))


@contextlib.contextmanager
def _quiet_transformers(transformers: Any) -> Iterator[None]:
    """transformers' own output while a folder loads, silenced on purpose: its progress bars
    ("Loading weights") and its warnings. What they would say that matters (missing or mismatched
    weights, an unknown architecture) is checked here and raised as one :class:`LoadError`."""
    hf_logging = transformers.utils.logging
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _check_image_model(cls: type, config: Any, path: str) -> None:
    """Refuse a model whose input is not pixels (a text or audio model): transformers names its
    main input on the class (``pixel_values`` for image models); one that names another input is
    still taken when its config states an image size (Perceiver's image classifiers take ``inputs``)."""
    main = getattr(cls, "main_input_name", "pixel_values")
    vision = getattr(config, "vision_config", None) or config
    if main != "pixel_values" and getattr(vision, "image_size", None) is None:
        raise LoadError(f"{path} is not an image model: {cls.__name__} ({getattr(config, 'model_type', '?')}) "
                        f"takes {main}, not pixel_values; vitprune compresses Vision Transformers")


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise LoadError(
            f"loading a Hugging Face model directory needs transformers ({_one_line(e)}): "
            f"pip install 'vitprune[hf]'"
        ) from e
    return transformers


def _hf_config(transformers: Any, path: str) -> Any:
    try:  # no trust_remote_code: a config that needs custom code is refused
        return transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # ValueError (unknown model_type), OSError (bad JSON), KeyError, ...
        raise LoadError(
            f"{path}/config.json cannot be read by transformers {transformers.__version__}: {_sentences(e)}"
        ) from e


def _sentences(e: BaseException, limit: int = 240) -> str:
    """The first sentences of ``e``'s message on one line, up to about ``limit`` characters."""
    out = ""
    for sentence in re.split(r"(?<=\.)\s+", " ".join(str(e).split())):
        if out and len(out) + len(sentence) > limit:
            break
        out = f"{out} {sentence}".strip()
    return out[: limit + 80] or type(e).__name__


def _hf_class(transformers: Any, config: Any, path: str) -> type:
    """``config.architectures[0]`` when given; else the image-classification class, else the base model."""
    names = getattr(config, "architectures", None) or []
    if names:
        try:
            cls = getattr(transformers, str(names[0]), None)
        except Exception:  # a lazy import that fails (missing backend): treat as absent
            cls = None
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
        known = [n for n in dir(transformers) if n.endswith(("Model", "ForImageClassification"))]
        raise LoadError(
            f"{path}/config.json names architecture {names[0]!r}, which transformers "
            f"{transformers.__version__} does not have (custom-code models are not run)"
            f"{_did_you_mean(str(names[0]), known, 'the transformers model classes')}"
        )
    for auto in (transformers.AutoModelForImageClassification, transformers.AutoModel):
        try:
            return auto._model_mapping[type(config)]
        except (KeyError, ValueError):
            continue
    raise LoadError(f"{path}/config.json: transformers has no model class for {type(config).__name__}")


def _hf_overrides(config: Any, cls_name: str, img_size: int | None, num_classes: int | None) -> dict[str, Any]:
    """Apply --img-size / --num-classes to ``config`` before the model is built; returns what was set."""
    kwargs: dict[str, Any] = {}
    target = getattr(config, "vision_config", None) or config
    if img_size is not None and hasattr(target, "image_size"):
        target.image_size = img_size
        kwargs["image_size"] = img_size
    if num_classes is not None:
        if "ForImageClassification" not in cls_name:
            raise LoadError(f"--num-classes applies to image-classification models; {cls_name} has no classifier")
        config.num_labels = num_classes
        kwargs["num_labels"] = num_classes
    return kwargs


def _has_hf_weights(path: str) -> bool:
    names = set(os.listdir(path))
    if names.intersection(HF_WEIGHT_FILES):
        return True
    other = sorted(n for n in names if n.endswith(_WEIGHT_SUFFIXES))
    if other:  # e.g. shards without their index, TF/Flax weights: do not fall back to random weights
        raise LoadError(
            f"{path} has weight files but none transformers loads here ({', '.join(other[:3])}); expected "
            f"{' or '.join(HF_WEIGHT_FILES[::2])} (or its .index.json for sharded weights)"
        )
    return False


def _hf_from_pretrained(cls: type, path: str, config: Any) -> nn.Module:
    for name in sorted(os.listdir(path)):
        if name.startswith("pytorch_model") and name.endswith(".bin"):
            _check_zip_crc(os.path.join(path, name), "PyTorch weight file")
    try:
        model, info = cls.from_pretrained(  # type: ignore[attr-defined]
            path, config=config, local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True
        )
    except Exception as e:  # corrupt safetensors, truncated shards, ...
        raise LoadError(
            f"{path}: transformers could not load the weights into {cls.__name__} ({_one_line(e)})"
        ) from e
    problems = [f"missing {k}" for k in sorted(info.get("missing_keys") or ())]
    for item in sorted(info.get("mismatched_keys") or (), key=str):
        if isinstance(item, (tuple, list)) and len(item) == 3:
            problems.append(f"{item[0]} is {list(item[1])} in the file, {list(item[2])} in the model")
        else:
            problems.append(f"{item} has another shape in the file")
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise LoadError(
            f"{path} does not fit {cls.__name__}: {shown}. Check config.json, or pass --img-size/--num-classes "
            f"to match the checkpoint"
        )
    return model


# ---------------------------------------------------------------------------------------------- torch.export
def _is_pt2_archive(path: str) -> bool:
    """A zip with ``<dir>/archive_format`` holding ``pt2``, as ``torch.export.save`` writes it."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            marks = [n for n in z.namelist() if n.count("/") == 1 and n.endswith("/archive_format")]
            return bool(marks) and z.read(marks[0]).strip() == b"pt2"
    except (OSError, zipfile.BadZipFile, RuntimeError, ValueError, EOFError):
        return False


def _is_torch_save_zip(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/data.pkl") for n in z.namelist())
    except (OSError, zipfile.BadZipFile, RuntimeError, ValueError, EOFError):
        return False


def _load_pt2(path: str, *, trust_pickle: bool, img_size: int | None, num_classes: int | None) -> LoadedModel:
    """An ExportedProgram's module; only with ``trust_pickle`` (see the module docstring)."""
    if not _is_pt2_archive(path):
        raise LoadError(
            f"{path} is not a torch.export archive (no ExportedProgram in it; torch.export.save writes one)"
            f"{'; it is a torch.save file: give it a .pt/.pth name' if _is_torch_save_zip(path) else ''}"
        )
    if not trust_pickle:
        raise LoadError(
            f"{path} is a torch.export archive, and loading one runs code stored in it (torch.export.load "
            f"unpickles parts of it, the exported module execs its guard expressions): re-run with "
            f"--trust-pickle if you trust the file, or save model.state_dict() and pass --arch"
        )
    ep = _export_load(path)
    size = _pt2_input_size(ep, path, img_size)
    classes = _pt2_num_classes(ep)
    if num_classes is not None and classes is not None and classes != num_classes:
        raise LoadError(f"{path} was exported with {classes} classes, not --num-classes {num_classes}; "
                        f"an exported graph is fixed: drop --num-classes or re-export")
    try:
        model = ep.module()
    except Exception as e:
        raise LoadError(f"{path}: the ExportedProgram cannot be turned into a module ({_one_line(e)})") from e
    notes = _free_the_batch(model, _pt2_batch(ep), path)
    return LoadedModel(model, {"kind": "pt2", "path": os.path.abspath(path)}, size, notes)


#: ``GraphModule.meta`` key: why a loaded ``.pt2`` may not be capturable with a dynamic batch (its
#: batch was static when it was exported); :func:`vitprune.frontend.capture.export_program` says it.
FIXED_BATCH = "vitprune_fixed_batch"


def _pt2_batch(ep: Any) -> tuple[int | None, int | None]:
    """(lowest, highest) batch the program was exported for: equal for a static batch, (lo, None)
    for an unbounded ``Dim``."""
    users = set(ep.graph_signature.user_inputs)
    node = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name in users)
    batch = node.meta["val"].shape[0]
    if _int_or_none(batch) is not None:
        return batch, batch
    expr = getattr(getattr(batch, "node", None), "expr", None)
    bounds = ep.range_constraints.get(expr) if expr is not None else None
    if bounds is None:
        return None, None
    upper = bounds.upper if getattr(bounds.upper, "is_finite", True) and bounds.upper < 2**62 else None
    return int(bounds.lower), (int(upper) if upper is not None else None)


def _free_the_batch(model: nn.Module, batch: tuple[int | None, int | None], path: str) -> list[str]:
    """Drop the input guards of ``ep.module()`` (the batch range or the static batch the program was
    exported with): vitprune captures the graph again with a dynamic batch, and that capture derives
    every constraint the graph really has. A batch baked into the graph is recorded in
    ``model.meta[FIXED_BATCH]`` so the capture can say what to change. Returns notes for the user."""
    graph = getattr(model, "graph", None)
    if isinstance(graph, torch.fx.Graph):
        for node in list(graph.nodes):
            if node.op == "call_module" and str(node.target) == "_guards_fn" and not node.users:
                graph.erase_node(node)
        model.recompile()  # type: ignore[operator]
    lo, hi = batch
    if lo is not None and lo == hi and isinstance(getattr(model, "meta", None), dict):
        model.meta[FIXED_BATCH] = (  # type: ignore[union-attr]
            f"{path} was exported with a fixed batch of {lo} (torch.export.export's default without "
            f"dynamic_shapes) that its graph depends on, so it cannot be captured with a dynamic batch: export "
            f"it again with dynamic_shapes=({{0: torch.export.Dim('batch')}},) and pass that .pt2")
        return []
    if hi is not None:
        return [f"{os.path.basename(path)} limits its batch to {lo}..{hi} (a bounded Dim); the compressed "
                f"model is captured with any batch >= 1"]
    return []


def _export_load(path: str) -> Any:
    quiet = logging.getLogger("torch.export")  # it logs a traceback before raising on a bad archive
    was = quiet.disabled
    quiet.disabled = True
    try:  # a file object: torch.export.load warns about a path not ending in .pt2
        with open(path, "rb") as f:
            ep = torch.export.load(f)
    except Exception as e:
        raise LoadError(f"{path} is not a loadable torch.export archive ({_one_line(e)})") from e
    finally:
        quiet.disabled = was
    if not isinstance(ep, torch.export.ExportedProgram):
        raise LoadError(f"{path} holds a {type(ep).__name__}, not an ExportedProgram")
    return ep


def _pt2_input_size(ep: Any, path: str, img_size: int | None) -> tuple[int, int, int]:
    """(C, H, W) of the first user input; its batch dimension may be symbolic, the rest must be static
    (a symbolic H, W is taken from ``img_size``)."""
    users = set(ep.graph_signature.user_inputs)
    node = next((n for n in ep.graph.nodes if n.op == "placeholder" and n.name in users), None)
    val = node.meta.get("val") if node is not None else None
    shape = tuple(getattr(val, "shape", ()))
    if len(shape) != 4 or _int_or_none(shape[1]) is None:
        raise LoadError(f"{path}: the exported graph's first input is not an (N, C, H, W) image batch "
                        f"with a fixed channel count (its shape: {list(shape) or 'unknown'})")
    hw = tuple(_int_or_none(d) for d in shape[2:])
    if None in hw:
        if img_size is None:
            raise LoadError(f"{path}: the exported graph has a symbolic image size; pass --img-size N")
        return (shape[1], img_size, img_size)
    if img_size is not None and hw != (img_size, img_size):
        raise LoadError(f"{path} was exported for {hw[0]}x{hw[1]} inputs and an exported graph's spatial size "
                        f"is fixed: drop --img-size {img_size} or re-export at that size")
    return (shape[1], hw[0], hw[1])  # type: ignore[return-value]


def _pt2_num_classes(ep: Any) -> int | None:
    """The last dimension of the first output, when static."""
    out = next((n for n in ep.graph.nodes if n.op == "output"), None)
    first = out.args[0][0] if out is not None and out.args and out.args[0] else None
    shape = getattr(getattr(first, "meta", {}).get("val"), "shape", None)
    return _int_or_none(shape[-1]) if shape else None
