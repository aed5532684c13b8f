"""CompressSpec: what to compress and how, read from CLI flags or a JSON/YAML file, always validated.

A spec file is a flat mapping whose keys are the field names below, e.g. ``spec.yaml``::

    target_flops: 0.5
    importance: taylor
    round_to: 16

CLI flags given on top of ``--spec`` replace the file's values (:meth:`CompressSpec.merged`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, fields
from typing import Any

import yaml

from vitprune.errors import SpecError

#: Compression methods. Later passes add "boundarydpt", "boundarydpt+", "cpvit".
METHODS: tuple[str, ...] = ("width", "boundarydpt", "boundarydpt+", "cpvit")
DEPTH_SELECTIONS: tuple[str, ...] = ("one_shot", "search")
ATTENTION_VARIANTS: tuple[str, ...] = ("identity_norm", "drop")
MERGES: tuple[str, ...] = ("auto", "always", "never")
#: Channel importance criteria.
IMPORTANCES: tuple[str, ...] = ("l2", "taylor")
#: How widths are chosen across groups: "global" ranks normalised scores across all groups,
#: "uniform" removes the same fraction from every group.
RANKINGS: tuple[str, ...] = ("global", "uniform")
#: Parts of the explicit token form ``keep=F,start=N[,every=M]``, each given at most once.
TOKEN_PARTS: tuple[str, ...] = ("keep", "start", "every")
#: Seeds torch's generators accept.
SEED_RANGE = (0, 2**64)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class CompressSpec:
    """A validated compression request. Every field has a default; see README "Spec format".

    >>> CompressSpec(target_flops=0.5).merged(round_to=8).round_to
    8
    """

    target_flops: float | None = None
    method: str = "width"
    importance: str = "l2"
    ranking: str = "global"
    round_to: int = 16
    prune_residual: bool = True
    prune_mlp: bool = True
    prune_heads: bool = True
    prune_head_dim: bool = True
    min_keep: float = 0.1
    calib_batches: int = 4
    batch_size: int = 8
    seed: int = 0
    input_size: tuple[int, int, int] | None = None
    target_latency: float | None = None
    latency_threads: int = 1
    remove_attention: list[int] | None = None
    remove_activation: list[int] | None = None
    attention_variant: str = "identity_norm"
    merge: str = "auto"
    fold_norm: bool = False
    depth_selection: str = "one_shot"
    depth_share: float = 0.42
    tokens: str | None = None
    prune_heads_cpvit: float | None = None
    epochs: int = 0
    lr: float = 5e-4
    search_steps: int = 20

    def __post_init__(self) -> None:
        if isinstance(self.input_size, list):  # JSON/YAML give lists
            self.input_size = tuple(self.input_size)
        if _is_int(self.lr):
            self.lr = float(self.lr)
        if _is_int(self.target_flops):
            self.target_flops = float(self.target_flops)
        if _is_int(self.min_keep):
            self.min_keep = float(self.min_keep)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise :class:`SpecError` naming the first invalid field and what it accepts."""
        t = self.target_flops
        if t is not None and not (_is_real(t) and 0.0 < t <= 1.0):
            raise SpecError(
                f"target_flops must be a fraction of the original FLOPs in (0, 1] "
                f"(e.g. 0.5 keeps half), got {t!r}"
            )
        lat = self.target_latency
        if lat is not None and not (_is_real(lat) and 0.0 < lat <= 1.0):
            raise SpecError(f"target_latency must be a fraction of the original ONNX Runtime latency in "
                            f"(0, 1], got {lat!r}")
        if lat is not None and t is not None:
            raise SpecError("give target_flops or target_latency, not both")
        for name in ("remove_attention", "remove_activation"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (list, tuple)) and all(_is_int(b) and b >= 0 for b in v)):
                raise SpecError(f"{name} must be a list of block indices >= 0 (e.g. [0, 3, 7]), got {v!r}")
        if not (_is_real(self.depth_share) and 0.0 <= self.depth_share <= 1.0):
            raise SpecError(f"depth_share must be in [0, 1], got {self.depth_share!r}")
        h = self.prune_heads_cpvit
        if h is not None and not (_is_real(h) and 0.0 < h <= 1.0):
            raise SpecError(f"prune_heads_cpvit must be the fraction of heads kept, in (0, 1], got {h!r}")
        if self.tokens is not None:
            token_parts(self.tokens)
        if not (_is_int(self.epochs) and self.epochs >= 0):
            raise SpecError(f"epochs must be an integer >= 0, got {self.epochs!r}")
        if not (_is_real(self.lr) and self.lr > 0):
            raise SpecError(f"lr must be a positive number, got {self.lr!r}")
        if not isinstance(self.fold_norm, bool):
            raise SpecError(f"fold_norm must be true or false, got {self.fold_norm!r}")
        for name, allowed in (("method", METHODS), ("importance", IMPORTANCES), ("ranking", RANKINGS),
                              ("depth_selection", DEPTH_SELECTIONS), ("attention_variant", ATTENTION_VARIANTS),
                              ("merge", MERGES)):
            v = getattr(self, name)
            if v not in allowed:
                raise SpecError(f"{name} must be one of {', '.join(allowed)}; got {v!r}")
        for name in ("prune_residual", "prune_mlp", "prune_heads", "prune_head_dim"):
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise SpecError(f"{name} must be true or false, got {v!r}")
        if not (_is_real(self.min_keep) and 0.0 < self.min_keep <= 1.0):
            raise SpecError(
                f"min_keep must be the fraction of each group always kept, in (0, 1]; got {self.min_keep!r}"
            )
        for name in ("round_to", "calib_batches", "batch_size", "latency_threads", "search_steps"):
            v = getattr(self, name)
            if not (_is_int(v) and v >= 1):
                raise SpecError(f"{name} must be an integer >= 1, got {v!r}")
        if not (_is_int(self.seed) and SEED_RANGE[0] <= self.seed < SEED_RANGE[1]):
            raise SpecError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        s = self.input_size
        if s is not None and not (
            isinstance(s, tuple) and len(s) == 3 and all(_is_int(x) and x >= 1 for x in s)
        ):
            raise SpecError(f"input_size must be three positive integers [C, H, W], got {s!r}")
        self._check_conflicts()

    def _check_conflicts(self) -> None:
        """Requests the chosen path would skip are refused, naming both sides: the latency loop never
        trains, and ``target_flops: 1.0`` keeps every FLOP, so compress removes nothing."""
        if self.target_latency is not None and (self.epochs or self.depth_selection == "search"):
            raise SpecError("target_latency does not train: it cannot be combined with epochs > 0 or "
                            "depth_selection 'search'")
        if self.target_flops != 1.0:
            return
        asked = [f"{name}={getattr(self, name)!r}" for name in
                 ("remove_attention", "remove_activation", "tokens", "prune_heads_cpvit")
                 if getattr(self, name) not in (None, [], ())]
        if asked:
            raise SpecError(f"target_flops=1.0 keeps the whole model, but {', '.join(asked)} asks to remove "
                            f"part of it; drop target_flops (explicit removals need no target) or lower it")

    def check_data(self, has_data: bool) -> None:
        """Refuse requests that train when there is no training data: without it they would be
        silently skipped (``epochs``) or quietly replaced (``depth_selection: search``)."""
        if has_data:
            return
        if self.epochs > 0:
            raise SpecError(f"epochs={self.epochs} fine-tunes on training data, and none was given "
                            f"(--data DIR); pass --data, or drop epochs")
        if self.depth_selection == "search":
            raise SpecError("depth_selection 'search' trains gates on training data, and none was given "
                            "(--data DIR); pass --data, or use one_shot")

    # ------------------------------------------------------------------ construction
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, d: Any) -> "CompressSpec":
        """Build from a mapping of field names; unknown keys raise :class:`SpecError`."""
        if not isinstance(d, dict):
            raise SpecError(f"a spec must be a mapping of field names to values, got {type(d).__name__}")
        valid = cls.field_names()
        unknown = sorted(str(k) for k in d if k not in valid)
        if unknown:
            raise SpecError(f"unknown spec key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "CompressSpec":
        """Read a .json, .yaml or .yml spec file."""
        path = os.fspath(path)
        ext = os.path.splitext(path)[1].lower()
        if ext not in (".json", ".yaml", ".yml"):
            raise SpecError(f"spec file {path} must end in .json, .yaml or .yml")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise SpecError(f"cannot read spec file {path}: {e}") from e
        try:
            d = json.loads(text, object_pairs_hook=_unique_json_keys) if ext == ".json" else \
                yaml.load(text, Loader=_UniqueKeyLoader)
        except _DuplicateKey as e:
            raise SpecError(f"spec file {path}: {e}") from None
        except (ValueError, yaml.YAMLError) as e:  # json.JSONDecodeError is a ValueError
            raise SpecError(f"spec file {path} is not valid {ext[1:].upper()}: {e}") from e
        try:
            return cls.from_dict(d)
        except SpecError as e:
            raise SpecError(f"spec file {path}: {e}") from e

    # ------------------------------------------------------------------ conversion
    def to_dict(self) -> dict[str, Any]:
        """A plain JSON/YAML-safe dict (input_size as a list) that :meth:`from_dict` reads back."""
        d = dataclasses.asdict(self)
        if d["input_size"] is not None:
            d["input_size"] = list(d["input_size"])
        return d

    def merged(self, **overrides: Any) -> "CompressSpec":
        """A copy where every non-None override replaces its field (CLI flags on top of --spec)."""
        valid = self.field_names()
        unknown = sorted(k for k in overrides if k not in valid)
        if unknown:
            raise SpecError(f"unknown spec key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})


# ---------------------------------------------------------------------------------------------- tokens
def token_parts(text: Any) -> dict[str, float | int]:
    """Check the syntax of the explicit token form ``keep=F,start=N[,every=M]`` without a model.

    Each part at most once (a repeated one is refused, not overwritten), ``keep`` in (0, 1],
    ``start`` and ``every`` integers >= 1; whether ``start`` is a block of the model is checked when
    the schedule is built (:func:`vitprune.plan.tokens.parse_tokens`)."""
    if not isinstance(text, str):
        raise SpecError(f"tokens must be a string like 'keep=0.5,start=4', got {text!r}")
    out: dict[str, float | int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(\w+)\s*=\s*(\S+)", part)
        if m is None or m.group(1) not in TOKEN_PARTS:
            raise SpecError(f"tokens: cannot read {part!r} in {text!r}; expected keep=F,start=N[,every=M]")
        key, value = m.groups()
        if key in out:
            raise SpecError(f"tokens: {key} is given twice in {text!r}; give each of keep, start, every once")
        out[key] = _token_value(key, value, text)
    if "keep" not in out or "start" not in out:
        raise SpecError(f"tokens: {text!r} needs both keep= and start= (e.g. keep=0.5,start=4)")
    return out


def _token_value(key: str, value: str, text: str) -> float | int:
    try:
        v: float | int = float(value) if key == "keep" else int(value)
    except ValueError:
        kind = "a fraction" if key == "keep" else "an integer"
        raise SpecError(f"tokens: {key} must be {kind}, got {value!r} in {text!r}") from None
    if key == "keep" and not (math.isfinite(v) and 0.0 < v <= 1.0):
        raise SpecError(f"tokens: keep must be a fraction in (0, 1], got {value} in {text!r}")
    if key != "keep" and v < 1:
        raise SpecError(f"tokens: {key} must be an integer >= 1, got {value} in {text!r}")
    return v


# ---------------------------------------------------------------------------------------------- files
class _DuplicateKey(Exception):
    """A key given twice in a spec file: refused, never last-one-wins."""


def _unique_json_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"key {key!r} is given twice; give each key once")
        out[key] = value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # an unhashable key: construct_mapping reports it
            line = key_node.start_mark.line + 1
            if key in lines:
                raise _DuplicateKey(f"key {key!r} is given twice (lines {lines[key]} and {line}); "
                                    f"give each key once")
            lines[key] = line
        return super().construct_mapping(node, deep=deep)
