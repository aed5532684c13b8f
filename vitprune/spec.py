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
from typing import Any, Callable

import yaml

from vitprune.errors import SpecError

@dataclass(frozen=True)
class MethodInfo:
    """One compression method, the one place it is described: its name, what it does (the CLI's help),
    the stages that plan to the target (:data:`vitprune.plan.stages.STAGES`, in order), whether its
    planner can spend estimated latency (``cost: latency``), and its row label in the sweep."""

    name: str
    help: str
    stages: tuple[str, ...]
    latency_cost: bool
    label: str

    @property
    def removes_layers(self) -> bool:
        """Whether it removes attention branches and activations (BoundaryDPT's depth)."""
        return bool({"depth", "joint"} & set(self.stages))


#: Every compression method by name: the only list (the spec's choices, the CLI's, the stages each
#: method runs, the latency-cost methods and the sweep's rows are all read from it).
METHOD_REGISTRY: dict[str, MethodInfo] = {m.name: m for m in (
    MethodInfo("width", "coupled channels", ("width",), True, "vitprune width"),
    MethodInfo("boundarydpt", "attention/activation removal", ("depth",), False, "BoundaryDPT (depth)"),
    MethodInfo("boundarydpt+", "depth and width, planned jointly", ("joint",), True,
               "BoundaryDPT+ (joint depth + width planner)"),
    MethodInfo("boundarydpt+paper", "the paper's: a fixed share of each kind's layers, then width",
               ("depth", "width"), False, "BoundaryDPT+ as published (searched depth share, then width)"),
    MethodInfo("cpvit", "token and head pruning", ("heads", "tokens"), False,
               "CP-ViT (tokens; + heads if cpvit_heads)"),
    MethodInfo("tome", "token merging, training-free", ("merge",), False, "ToMe (token merging, training-free)"),
)}
#: Compression method names (:data:`METHOD_REGISTRY`'s keys).
METHODS: tuple[str, ...] = tuple(METHOD_REGISTRY)
#: The share of each kind's layers the paper's BoundaryDPT+ removes before width pruning, when
#: ``depth_share`` is unset: 5 of 12 attention branches and 5 of 12 activations, the released
#: DeiT-B configuration (README "Methods").
PAPER_DEPTH_SHARE = 5 / 12
DEPTH_SELECTIONS: tuple[str, ...] = ("one_shot", "search")
ATTENTION_VARIANTS: tuple[str, ...] = ("identity_norm", "drop")
MERGES: tuple[str, ...] = ("auto", "always", "never")
#: Channel importance criteria.
IMPORTANCES: tuple[str, ...] = ("l2", "taylor")
#: How widths are chosen across groups: "global" ranks normalised scores across all groups,
#: "uniform" removes the same fraction from every group.
RANKINGS: tuple[str, ...] = ("global", "uniform")
#: How attention is narrowed: "keep" removes whole heads and leaves head_dim whole (the faster shapes
#: in ONNX Runtime, measured in benchmarks/README.md); "shrink" may also narrow head_dim.
HEAD_DIM_POLICIES: tuple[str, ...] = ("keep", "shrink")
#: What a planner's target fraction measures: FLOPs, or the latency estimated from per-op
#: ONNX Runtime tables measured once on this machine (:mod:`vitprune.plan.cost`).
COSTS: tuple[str, ...] = ("flops", "latency")
#: The methods whose planner can spend estimated latency (``cost: latency``): the width planner and
#: the joint BoundaryDPT+ planner; the others plan to FLOPs only.
LATENCY_COST_METHODS: tuple[str, ...] = tuple(n for n, m in METHOD_REGISTRY.items() if m.latency_cost)
#: Parts of the explicit token forms, each given at most once: pruning ``keep=F,start=N[,every=M]``
#: and merging (ToMe) ``merge=R[,start=N]``.
TOKEN_PARTS: tuple[str, ...] = ("keep", "start", "every", "merge")
#: Seeds torch's generators accept.
SEED_RANGE = (0, 2**64)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class Option:
    """What a :class:`CompressSpec` field means and how ``vitprune compress`` takes it: the CLI builds
    its flags from these, and :meth:`CompressSpec.validate` reads the allowed ``choices`` here, so
    each allowed value and each help text has one home.

    ``read`` turns a flag's text into the value; ``flag`` is the flag's name where it is not
    ``--field-name``; a ``switch`` flag takes no value and sets the field to ``switch``
    (``--no-mlp`` sets ``prune_mlp`` to False); ``cli=False`` marks a field that is no flag, and its
    ``help`` says where the value comes from instead. ``needs`` names the setting without which the
    field does nothing, as ``(applies, in words, as flags)``: a field set away from its default
    (or its flag given) while ``applies(spec)`` is false is refused, never silently ignored."""

    help: str
    read: Callable[[str], Any] = str
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    flag: str | None = None
    switch: bool | None = None
    cli: bool = True
    needs: tuple[Callable[[Any], bool], str, str] | None = None

    def flag_for(self, field_name: str) -> str:
        return self.flag or "--" + field_name.replace("_", "-")


#: The key of a field's :class:`Option` in its ``dataclasses.field`` metadata.
OPTION = "vitprune.option"


def _field(default: Any, help: str, **how: Any) -> Any:
    return dataclasses.field(default=default, metadata={OPTION: Option(help, **how)})


def _trains(s: Any) -> bool:
    return s.epochs > 0 or s.depth_selection == "search" or s.method == "boundarydpt+"


def _searches_or_recovers(s: Any) -> bool:
    return s.depth_selection == "search" or s.method == "boundarydpt+"


def _shares_depth(s: Any) -> bool:
    return s.method in ("boundarydpt+", "boundarydpt+paper")


def _removes_attention(s: Any) -> bool:
    return METHOD_REGISTRY[s.method].removes_layers or s.remove_attention is not None


def _removes_activation(s: Any) -> bool:
    return METHOD_REGISTRY[s.method].removes_layers or s.remove_activation is not None


def read_block_indices(text: str) -> list[int]:
    """The command line's form of a block list: ``0,3,7`` → ``[0, 3, 7]``."""
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SpecError(f"expected comma-separated block indices like 0,3,7, got {text!r}") from None
    if any(b < 0 for b in out):
        raise SpecError(f"block indices must be >= 0, got {text!r}")
    return out


@dataclass
class CompressSpec:
    """A validated compression request. Every field has a default and an :class:`Option` (its
    meaning and its flag); see README "Spec format".

    >>> CompressSpec(target_flops=0.5).merged(round_to=8).round_to
    8
    """

    target_flops: float | None = _field(
        None, "fraction of the original FLOPs to keep, in (0, 1]; 1.0 removes nothing", read=float, metavar="R")
    method: str = _field(
        "width", ", ".join(f"{m.name} ({m.help})" for m in METHOD_REGISTRY.values()), choices=METHODS)
    importance: str = _field(
        "l2", "channel importance: l2 (weight magnitude) or taylor (first order, from calibration batches)",
        choices=IMPORTANCES)
    ranking: str = _field(
        "global", "global: normalised scores ranked across all groups; uniform: the same ratio in every group",
        choices=RANKINGS)
    round_to: int = _field(32, "pruned widths are multiples of N where the group allows", read=int, metavar="N")
    head_dim_policy: str = _field(
        "keep", "keep: narrow attention by whole heads only (head_dim stays whole: faster in ORT); "
        "shrink: head_dim may narrow too", choices=HEAD_DIM_POLICIES)
    cost: str = _field(
        "flops", "what the target measures for methods width and boundarydpt+: flops, or latency estimated "
        "from per-op ONNX Runtime tables measured once on this machine (cached; --latency-threads)", choices=COSTS)
    prune_residual: bool = _field(True, "keep the residual stream width", flag="--no-residual", switch=False)
    prune_mlp: bool = _field(True, "keep MLP widths", flag="--no-mlp", switch=False)
    prune_heads: bool = _field(True, "keep all heads", flag="--no-heads", switch=False)
    prune_head_dim: bool = _field(True, "keep the head dimension", flag="--no-head-dim", switch=False)
    min_keep: float = _field(0.1, "fraction of every group always kept, in (0, 1]", read=float, metavar="F")
    calib_batches: int = _field(
        4, "calibration batches (taylor importance, depth scores, CP-ViT ranges)", read=int, metavar="N")
    batch_size: int = _field(8, "calibration and fine-tuning batch size", read=int, metavar="N")
    seed: int = _field(
        0, "random seed: random-weight models (timm:, torchvision:, HF config) and calibration", read=int,
        metavar="N")
    input_size: tuple[int, int, int] | None = _field(
        None, "example input [C, H, W] (spec file only: on the command line, --img-size N builds the model "
        "at N x N and wins)", cli=False)
    target_latency: float | None = _field(
        None, "fraction of the original ONNX Runtime batch-1 latency, measured here, in (0, 1]", read=float,
        metavar="R")
    latency_threads: int = _field(1, "ORT threads for --target-latency and --cost latency", read=int, metavar="N",
                                  needs=(lambda s: s.target_latency is not None or s.cost == "latency",
                                         "target_latency or cost latency", "--target-latency or --cost latency"))
    remove_attention: list[int] | None = _field(
        None, "remove these attention branches (block indices)", read=read_block_indices, metavar="I,J")
    remove_activation: list[int] | None = _field(
        None, "remove these activations (fc2∘fc1 merged when cheaper)", read=read_block_indices, metavar="I,J")
    attention_variant: str = _field(
        "identity_norm", "removed attention becomes x + LN1(x) (identity_norm) or x (drop)",
        choices=ATTENTION_VARIANTS, needs=(_removes_attention, "method boundarydpt/boundarydpt+ or remove_attention",
                                           "--method boundarydpt/boundarydpt+ or --remove-attention"))
    merge: str = _field("auto", "merge fc2∘fc1 after removing an activation: auto (by FLOPs), always, never",
                        choices=MERGES, needs=(_removes_activation, "method boundarydpt/boundarydpt+ or "
                                               "remove_activation", "--method boundarydpt/boundarydpt+ or "
                                               "--remove-activation"))
    fold_norm: bool = _field(False, "fold LN2's affine into a merged linear (exact)", switch=True,
                             needs=(_removes_activation, "method boundarydpt/boundarydpt+ or remove_activation",
                                    "--method boundarydpt/boundarydpt+ or --remove-activation"))
    depth_selection: str = _field(
        "one_shot", "how boundarydpt picks layers: one_shot scores, or the gated search (needs --data)",
        choices=DEPTH_SELECTIONS)
    depth_share: float | None = _field(
        None, "boundarydpt+: at most this share of each kind's layers removed (default: no cap; the "
        "joint planner trades depth against width move by move); boundarydpt+paper: the share of each "
        "kind removed before width pruning (default 5/12, the paper's DeiT-B)", read=float, metavar="F",
        needs=(_shares_depth, "method boundarydpt+ or boundarydpt+paper",
               "--method boundarydpt+ or boundarydpt+paper"))
    tokens: str | None = _field(
        None, "static token pruning, e.g. keep=0.5,start=4 (every=M for repeated cuts), or token merging "
        "(ToMe), e.g. merge=8 (8 tokens per block; start=N: from block N on)", metavar="SPEC")
    prune_heads_cpvit: float | None = _field(
        None, "cpvit: fraction of heads kept per block, by cumulative head score", read=float, metavar="F",
        flag="--prune-heads", needs=(lambda s: s.method == "cpvit", "method cpvit", "--method cpvit"))
    epochs: int = _field(0, "recovery fine-tuning epochs on --data (distillation)", read=int, metavar="N")
    lr: float = _field(5e-4, "fine-tuning / search / recovery learning rate", read=float, metavar="LR",
                       needs=(_trains, "epochs > 0, depth_selection search or method boundarydpt+",
                              "--epochs N, --depth-selection search or --method boundarydpt+"))
    search_steps: int = _field(
        20, "gated search: steps of the first (warm-up) window (later windows grow 3:5:7…; stage 1 trains "
        "each attention/activation candidate 2×/⅓× this); boundarydpt+: recovery steps between events",
        read=int, metavar="N", needs=(_searches_or_recovers, "depth_selection search or method boundarydpt+",
                                      "--depth-selection search or --method boundarydpt+"))
    probe_steps: int = _field(
        20, "boundarydpt+ with --data: each event prices layer removals by their loss after N recovery steps "
        "(probes; every step counts in the report's train_steps); 0: by the loss right after removal",
        read=int, metavar="N", needs=(lambda s: s.method == "boundarydpt+", "method boundarydpt+",
                                      "--method boundarydpt+"))

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
        if self.depth_share is not None and not (_is_real(self.depth_share) and 0.0 <= self.depth_share <= 1.0):
            raise SpecError(f"depth_share must be in [0, 1] (or unset: no cap), got {self.depth_share!r}")
        h = self.prune_heads_cpvit
        if h is not None and not (_is_real(h) and 0.0 < h <= 1.0):
            raise SpecError(f"prune_heads_cpvit must be the fraction of heads kept, in (0, 1], got {h!r}")
        if self.tokens is not None:
            token_parts(self.tokens)
        for name in ("epochs", "probe_steps"):
            if not (_is_int(getattr(self, name)) and getattr(self, name) >= 0):
                raise SpecError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not (_is_real(self.lr) and self.lr > 0):
            raise SpecError(f"lr must be a positive number, got {self.lr!r}")
        if not isinstance(self.fold_norm, bool):
            raise SpecError(f"fold_norm must be true or false, got {self.fold_norm!r}")
        for name, option in options().items():
            v = getattr(self, name)
            if option.choices is not None and v not in option.choices:
                raise SpecError(f"{name} must be one of {', '.join(option.choices)}; got {v!r}")
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
        trains, ``cost: latency`` needs a planner that spends latency (width, boundarydpt+), a field
        whose ``needs`` (:class:`Option`) is unmet does nothing, and ``target_flops: 1.0`` keeps every
        FLOP, so compress removes nothing."""
        if self.target_latency is not None and (self.epochs or self.depth_selection == "search"):
            raise SpecError("target_latency does not train: it cannot be combined with epochs > 0 or "
                            "depth_selection 'search'")
        if self.cost == "latency" and (self.method not in LATENCY_COST_METHODS or self.target_latency is not None):
            methods = " or ".join(map(repr, LATENCY_COST_METHODS))
            raise SpecError(f"cost 'latency' plans to a fraction of the estimated latency: it needs method "
                            f"{methods} and target_flops (got method {self.method!r}"
                            f"{', target_latency' if self.target_latency is not None else ''}); "
                            f"--target-latency uses the latency model by itself")
        self._check_token_forms()
        for f in fields(self):
            need = options()[f.name].needs
            if need is not None and getattr(self, f.name) != f.default and not need[0](self):
                flag = options()[f.name].flag_for(f.name)
                raise SpecError(f"{f.name} ({flag}) has no effect without {need[1]} ({need[2]}); set that, or "
                                f"drop {f.name}")
        if self.target_flops != 1.0:
            return
        asked = [f"{name}={getattr(self, name)!r}" for name in
                 ("remove_attention", "remove_activation", "tokens", "prune_heads_cpvit")
                 if getattr(self, name) not in (None, [], ())]
        if asked:
            raise SpecError(f"target_flops=1.0 keeps the whole model, but {', '.join(asked)} asks to remove "
                            f"part of it; drop target_flops (explicit removals need no target) or lower it")

    def _check_token_forms(self) -> None:
        """Pruned and merged token counts do not compose (each needs the whole stream's length): a
        method that plans one form refuses an explicit request of the other."""
        if self.tokens is None or self.target_flops is None:
            return
        merge = "merge" in token_parts(self.tokens)
        if (self.method == "tome" and not merge) or (self.method == "cpvit" and merge):
            form = "merge=R" if merge else "keep=F"
            raise SpecError(f"method {self.method!r} plans its own token schedule and cannot be combined with "
                            f"tokens {form} ({self.tokens!r}); drop tokens or pick another method")

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
        if os.path.exists(path) and not (os.path.isfile(path) or os.path.isdir(path)):
            raise SpecError(f"spec file {path} is not a regular file (a FIFO, socket or device: reading it "
                            f"could block)")
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


def options() -> dict[str, Option]:
    """Every spec field's :class:`Option`, by field name, in field order."""
    return {f.name: f.metadata[OPTION] for f in fields(CompressSpec)}


# ---------------------------------------------------------------------------------------------- tokens
def token_parts(text: Any) -> dict[str, float | int]:
    """Check the syntax of an explicit token form without a model: pruning ``keep=F,start=N[,every=M]``
    or merging ``merge=R[,start=N]``.

    Each part at most once (a repeated one is refused, not overwritten), ``keep`` in (0, 1],
    ``every`` an integer >= 1, ``merge`` an integer >= 0, ``start`` an integer >= 1 for pruning (block 0
    has no score yet) and >= 0 for merging; whether ``start`` is a block of the model is checked when
    the schedule is built (:func:`vitprune.plan.tokens.parse_tokens`, :func:`vitprune.plan.merging.parse_merge`)."""
    if not isinstance(text, str):
        raise SpecError(f"tokens must be a string like 'keep=0.5,start=4' or 'merge=8', got {text!r}")
    out: dict[str, float | int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(\w+)\s*=\s*(\S+)", part)
        if m is None or m.group(1) not in TOKEN_PARTS:
            raise SpecError(f"tokens: cannot read {part!r} in {text!r}; expected keep=F,start=N[,every=M] or "
                            "merge=R[,start=N]")
        key, value = m.groups()
        if key in out:
            raise SpecError(f"tokens: {key} is given twice in {text!r}; give each of keep, start, every, merge once")
        out[key] = _token_value(key, value, text)
    if "merge" in out:
        if "keep" in out or "every" in out:
            raise SpecError(f"tokens: {text!r} mixes merging (merge=) with pruning (keep=, every=); give one form")
        return out
    if "keep" not in out or "start" not in out:
        raise SpecError(f"tokens: {text!r} needs both keep= and start= (e.g. keep=0.5,start=4), or merge= "
                        "(e.g. merge=8)")
    if out["start"] < 1:
        raise SpecError(f"tokens: start must be an integer >= 1 when pruning, got {out['start']} in {text!r}")
    return out


def _token_value(key: str, value: str, text: str) -> float | int:
    try:
        v: float | int = float(value) if key == "keep" else int(value)
    except ValueError:
        kind = "a fraction" if key == "keep" else "an integer"
        raise SpecError(f"tokens: {key} must be {kind}, got {value!r} in {text!r}") from None
    if key == "keep" and not (math.isfinite(v) and 0.0 < v <= 1.0):
        raise SpecError(f"tokens: keep must be a fraction in (0, 1], got {value} in {text!r}")
    if key == "every" and v < 1:
        raise SpecError(f"tokens: every must be an integer >= 1, got {value} in {text!r}")
    if key in ("merge", "start") and v < 0:
        raise SpecError(f"tokens: {key} must be an integer >= 0, got {value} in {text!r}")
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
