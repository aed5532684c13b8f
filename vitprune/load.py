"""Model loading: ``timm:<name>``, a checkpoint plus ``arch``, a vitprune compressed model, or (only when
trusted) a whole pickled ``nn.Module``.

Files are read with ``torch.load(weights_only=True)``: that never runs code from the file. A file that
pickles Python objects (e.g. ``torch.save(model)``) needs ``trust_pickle=True``. Whether the model is a
ViT is not checked here; the tracer refuses models it cannot analyse.
"""
from __future__ import annotations

import difflib
import os
import pickle
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vitprune.errors import InputError, LoadError

COMPRESSED_FORMAT = "vitprune-compressed"
#: Keys under which training checkpoints keep their state dict, in order of preference.
STATE_DICT_KEYS: tuple[str, ...] = ("state_dict", "model", "state_dict_ema")
_TIMM_PREFIX = "timm:"


@dataclass
class LoadedModel:
    """A loaded model, where it came from (enough to rebuild it, or None for a pickle), and the
    (C, H, W) example input size the tracer should use."""

    model: nn.Module
    source: dict | None
    input_size: tuple[int, int, int]


def load_model(
    ref: str,
    *,
    arch: str | None = None,
    trust_pickle: bool = False,
    img_size: int | None = None,
    num_classes: int | None = None,
) -> LoadedModel:
    """Load ``ref``: ``timm:<name>`` (random weights) or a file path (see module docstring)."""
    _check_positive("img_size", img_size)
    _check_positive("num_classes", num_classes, allow_zero=True)
    if ref.startswith(_TIMM_PREFIX):
        name = ref[len(_TIMM_PREFIX):]
        kwargs = _timm_kwargs(img_size, num_classes)
        model = _create_timm(name, kwargs)
        model.eval()
        return LoadedModel(model, _timm_source(name, kwargs), input_size_of(model, img_size))
    return _load_file(ref, arch=arch, trust_pickle=trust_pickle, img_size=img_size, num_classes=num_classes)


def input_size_of(model: nn.Module, img_size: int | None = None) -> tuple[int, int, int]:
    """(C, H, W): explicit ``img_size`` > timm ``patch_embed`` > ``pretrained_cfg["input_size"]``."""
    pe = getattr(model, "patch_embed", None)
    pe_size = getattr(pe, "img_size", None)
    pe_chans = getattr(getattr(pe, "proj", None), "in_channels", None)
    cfg = getattr(model, "pretrained_cfg", None)
    cfg_size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if cfg_size is not None and len(tuple(cfg_size)) != 3:
        cfg_size = None
    if img_size is not None:
        chans = pe_chans if isinstance(pe_chans, int) else (int(cfg_size[0]) if cfg_size else 3)
        return (chans, int(img_size), int(img_size))
    if isinstance(pe_chans, int) and pe_size is not None:
        hw = (pe_size, pe_size) if isinstance(pe_size, int) else tuple(pe_size)
        if len(hw) == 2:
            return (pe_chans, int(hw[0]), int(hw[1]))
    if cfg_size is not None:
        return tuple(int(x) for x in cfg_size)  # type: ignore[return-value]
    raise LoadError(
        f"cannot tell the input size of this {type(model).__name__}; pass --img-size N (square N x N input)"
    )


# ---------------------------------------------------------------------------------------------- timm
def _check_positive(name: str, v: int | None, allow_zero: bool = False) -> None:
    if v is None:
        return
    lo = 0 if allow_zero else 1
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        flag = "--" + name.replace("_", "-")
        raise InputError(f"{flag} must be an integer >= {lo}, got {v!r}")


def _timm_kwargs(img_size: int | None, num_classes: int | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if img_size is not None:
        kwargs["img_size"] = img_size
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return kwargs


def _timm_source(name: str, kwargs: dict[str, Any]) -> dict:
    return {"kind": "timm", "arch": name, "kwargs": dict(kwargs)}


def _create_timm(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import timm

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
    import timm

    names: list[str] = []
    for part in re.split(r"[_\-.]+", name):
        if len(part) >= 3:
            names.extend(timm.list_models(f"*{part}*"))
    close = difflib.get_close_matches(name, sorted(set(names)) or timm.list_models(), n=5, cutoff=0.4)
    if close:
        return f"; did you mean {', '.join(close)}?"
    return "; see timm.list_models() for the names"


# ---------------------------------------------------------------------------------------------- files
def _load_file(
    path: str, *, arch: str | None, trust_pickle: bool, img_size: int | None, num_classes: int | None
) -> LoadedModel:
    if not os.path.exists(path):
        hint = " (for a timm architecture write timm:<name>)" if os.sep not in path and "." not in path else ""
        raise InputError(f"model file {path} does not exist{hint}")
    if os.path.isdir(path):
        raise InputError(f"{path} is a directory, not a model file")
    if os.path.getsize(path) == 0:
        raise LoadError(f"{path} is not a PyTorch checkpoint: the file is empty")
    obj = _torch_load(path, trust_pickle)

    if isinstance(obj, dict) and obj.get("format") == COMPRESSED_FORMAT:
        return _from_compressed(obj, img_size)
    if isinstance(obj, nn.Module):  # only reachable with trust_pickle
        obj.eval()
        return LoadedModel(obj, None, input_size_of(obj, img_size))
    if isinstance(obj, dict):
        held = _unwrap_state_dict(obj, path)
        if isinstance(held, nn.Module):  # {"model": module}, trusted pickle only
            held.eval()
            return LoadedModel(held, None, input_size_of(held, img_size))
        return _from_state_dict(held, path, arch=arch, img_size=img_size, num_classes=num_classes)
    raise LoadError(
        f"{path} holds a {type(obj).__name__}, not a state dict, a checkpoint dict or an nn.Module"
    )


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


def _from_compressed(obj: dict, img_size: int | None) -> LoadedModel:
    from vitprune.api import load_compressed_dict

    model = load_compressed_dict(obj)
    stored = obj.get("input_size")
    if img_size is None and stored is not None and len(stored) == 3:
        size = tuple(int(x) for x in stored)
    else:
        size = input_size_of(model, img_size)
    return LoadedModel(model, obj.get("source"), size)  # type: ignore[arg-type]


def _is_state_dict(d: dict) -> bool:
    return bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def _unwrap_state_dict(obj: dict, path: str) -> dict | nn.Module:
    if _is_state_dict(obj):
        sd = obj
    else:
        for key in STATE_DICT_KEYS:
            v = obj.get(key)
            if isinstance(v, nn.Module):
                return v
            if isinstance(v, dict) and _is_state_dict(v):
                sd = v
                break
        else:
            keys = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
            raise LoadError(
                f"{path} holds a dict that is not a state dict and has no state dict under "
                f"{', '.join(repr(k) for k in STATE_DICT_KEYS)} (its keys: {keys})"
            )
    if all(k.startswith("module.") for k in sd):  # DDP / DataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _from_state_dict(
    sd: dict, path: str, *, arch: str | None, img_size: int | None, num_classes: int | None
) -> LoadedModel:
    if not arch:
        raise LoadError(f"{path} holds a state dict; pass --arch <timm model name>")
    name = arch[len(_TIMM_PREFIX):] if arch.startswith(_TIMM_PREFIX) else arch
    kwargs = _timm_kwargs(img_size, num_classes)
    model = _create_timm(name, kwargs)
    problems = _mismatches(model, sd)
    if problems and num_classes is None:
        inferred = _infer_num_classes(model, sd, problems)
        if inferred is not None:
            kwargs["num_classes"] = inferred
            model = _create_timm(name, kwargs)
            problems = _mismatches(model, sd)
    if problems:
        shown = "; ".join(map(str, problems[:4])) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise LoadError(
            f"{path} does not fit timm {name}{_fmt_kwargs(kwargs)}: {shown}. "
            f"Check --arch, or pass --img-size/--num-classes to match the checkpoint"
        )
    model.load_state_dict(sd, strict=True)
    model.eval()
    return LoadedModel(model, _timm_source(name, kwargs), input_size_of(model, img_size))


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


def _classifier_names(model: nn.Module) -> list[str]:
    """Module names of ``model.get_classifier()`` (a module, or a tuple of them for distilled ViTs)."""
    get = getattr(model, "get_classifier", None)
    if get is None:
        return []
    heads = get()
    heads = heads if isinstance(heads, (tuple, list)) else (heads,)
    ids = {id(h) for h in heads if isinstance(h, nn.Module)}
    return [n for n, m in model.named_modules() if id(m) in ids and n]


def _infer_num_classes(model: nn.Module, sd: dict, problems: list[_Mismatch]) -> int | None:
    """The checkpoint's class count, when the classifier is the only thing that does not fit."""
    names = _classifier_names(model)
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
