"""Depth candidates found from the graph alone: attention branches and activations between linears.

Two kinds of layer can be removed without changing any tensor dimension (BoundaryDPT/HetDPT):

* an **attention branch**: the residual ``add(x, branch)`` whose branch holds the attention core
  (``scaled_dot_product_attention``, or ``matmul → softmax → (dropout) → matmul``), together with the
  LayerNorm applied to ``x`` that feeds it, every node and parameter that only the branch uses
  (qkv, proj, q/k-norm, ...), and the layer-scale ``mul(out, gamma)`` when there is one;
* an **activation** between two linears: ``F.linear → act → (dropout)* → F.linear`` where ``act`` is
  GELU/ReLU/SiLU (module or function) and nothing else sits between the two linears.

Nothing here reads module names or model tables: the patterns are matched on ops (``op_key``) and
data flow, so timm's fused (SDPA) and unfused (matmul-softmax) attention, layer-scale (DeiT-III),
q/k-norm, register/distillation tokens and width-pruned graphs all look the same.

Worked example (DeiT, one block, unfused attention)::

    norm1 = layer_norm(x)           <- AttentionBranch.norm
    qkv = linear(norm1, W_qkv, b)   <- AttentionBranch.nodes ... (params: W_qkv, b, W_proj, ...)
    ... softmax ... matmul ...      <- AttentionBranch.core (the softmax / SDPA node)
    out = linear(..., W_proj, b)    <- AttentionBranch.out (before layer-scale)
    add = x + out                   <- AttentionBranch.add, .residual is x
    norm2 = layer_norm(add)         <- ActivationSite.norm (only when fc1 is its only user)
    h = linear(norm2, W1, b1)       <- ActivationSite.fc1
    a = gelu(h)                     <- ActivationSite.act
    y = linear(a, W2, b2)           <- ActivationSite.fc2

**Block indices are stable.** Candidates are numbered in graph order ("block i" = the i-th attention
branch / the i-th activation of the *original* model). The depth passes record what they removed in
``gm.meta["removed_layers"]``; discovery numbers the survivors by skipping those, so "block 7" means
the same layer before and after other blocks were removed (and in a replayed recipe).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.fx as fx

from vitprune.errors import UnsupportedModelError
from vitprune.frontend.capture import node_arg, param_tensor

from vitprune.deps.rules import op_key

__all__ = [
    "ActivationSite", "AttentionBranch", "BranchError", "UnknownShapeError", "REMOVED_KEY",
    "find_activations", "find_attention_branches", "record_removed",
    "removed_layers",
]

REMOVED_KEY = "removed_layers"
ACTIVATIONS = frozenset({"gelu", "relu", "silu"})
_PASS_THROUGH = frozenset({"dropout"})  # identity at inference; allowed between act and fc2
_MATMULS = frozenset({"matmul", "bmm", "mm"})
_NORMS = frozenset({"layer_norm", "rms_norm"})
_ADDS = frozenset({"add", "add_"})
_MULS = frozenset({"mul", "mul_"})
#: between q·kᵀ and softmax: scaling, biases and masks (relative position, shifted windows), casts
#: and the views that apply a window mask
_SCORE_OPS = frozenset({"mul", "div", "add", "sub", "masked_fill", "where", "to", "clone", "view",
                        "reshape", "dropout", "neg"})
#: between softmax and ·v: dropout, casts, head masks
_PROB_OPS = frozenset({"dropout", "to", "clone", "type_as", "view", "reshape", "mul"})
_MAX_HOPS = 8


class BranchError(UnsupportedModelError):
    """A depth candidate was found but cannot be analysed (its message names the node)."""


class UnknownShapeError(BranchError):
    """A node a depth pass needs has no propagated shape (run ``vitprune.frontend.capture`` first)."""


@dataclass
class AttentionBranch:
    """One removable attention branch: ``add = residual + branch`` (see the module docstring)."""

    index: int
    add: fx.Node
    residual: fx.Node
    branch: fx.Node                 # the add's branch operand (the layer-scale mul when there is one)
    core: fx.Node                   # SDPA, or the softmax of matmul → softmax → matmul
    out: fx.Node                    # the attention output, before layer-scale
    norm: fx.Node | None            # layer_norm(residual) feeding the branch, if any
    scale: fx.Node | None = None    # mul(out, gamma)
    gamma: str | None = None        # layer-scale parameter target
    nodes: list[fx.Node] = field(default_factory=list)   # graph order, norm excluded
    params: list[str] = field(default_factory=list)      # get_attr targets only the branch uses

    def num_params(self, gm: fx.GraphModule) -> int:
        return sum(param_tensor(gm, p).numel() for p in self.params)


@dataclass
class ActivationSite:
    """One activation between two linears: ``fc2(drop*(act(fc1(x))))``."""

    index: int
    act: fx.Node
    kind: str
    fc1: fx.Node
    fc2: fx.Node
    between: list[fx.Node]          # pass-through nodes (dropout) between act and fc2
    fc1_weight: str
    fc1_bias: str | None
    fc2_weight: str
    fc2_bias: str | None
    d_in: int
    hidden: int
    d_out: int
    norm: fx.Node | None            # layer_norm whose only user is fc1 (for folding its affine)

    @property
    def merge_is_cheaper(self) -> bool:
        """One d_in×d_out linear costs fewer multiply-adds than d_in×h + h×d_out."""
        return self.d_in * self.d_out < self.hidden * (self.d_in + self.d_out)


# -- removed-layer bookkeeping -----------------------------------------------------------------
def removed_layers(gm: fx.GraphModule, kind: str) -> list[int]:
    return sorted(gm.meta.get(REMOVED_KEY, {}).get(kind, []))


def record_removed(gm: fx.GraphModule, kind: str, blocks: Iterable[int]) -> None:
    record = dict(gm.meta.get(REMOVED_KEY, {}))
    record[kind] = sorted(set(record.get(kind, [])) | {int(b) for b in blocks})
    gm.meta[REMOVED_KEY] = record


def _original_indices(gm: fx.GraphModule, kind: str, count: int) -> list[int]:
    """The original block numbers of ``count`` surviving candidates (skipping removed ones)."""
    removed = set(removed_layers(gm, kind))
    out, i = [], 0
    while len(out) < count:
        if i not in removed:
            out.append(i)
        i += 1
    return out


# -- attention ---------------------------------------------------------------------------------
def find_attention_branches(gm: fx.GraphModule) -> list[AttentionBranch]:
    """Every attention branch of ``gm`` in graph order (raises :class:`BranchError` on a core whose
    branch cannot be delimited)."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    cores = [n for n in nodes if is_attention_core(n, gm)]
    found = [_attention_branch(gm, core, order) for core in cores]
    seen: set[fx.Node] = set()
    branches = []
    for b in found:  # two cores in one branch (rare) count once
        if b.add not in seen:
            seen.add(b.add)
            branches.append(b)
    for b, idx in zip(branches, _original_indices(gm, "attention", len(branches))):
        b.index = idx
    return branches


def _key(node: fx.Node, gm: fx.GraphModule | None) -> str:
    return op_key(node, gm) if node.op in ("call_function", "call_method", "call_module") else node.op


def is_attention_core(node: fx.Node, gm: fx.GraphModule | None = None) -> bool:
    """SDPA, or the softmax of an explicit attention, recognised by dataflow however it is written:
    ``matmul(q, kᵀ)`` → (scale, bias, mask, casts)* → softmax → (dropout, casts)* → ``matmul(p, v)``
    with the probabilities as the second matmul's left operand (either product may be a
    two-operand ``einsum``)."""
    key = _key(node, gm)
    if key == "scaled_dot_product_attention":
        return True
    if key != "softmax" or not isinstance(node_arg(node, 0, "input"), fx.Node):
        return False
    return _scores_from_matmul(node, gm) and _probs_to_matmul(node, gm)


def _scores_from_matmul(softmax: fx.Node, gm: fx.GraphModule | None) -> bool:
    # breadth first: the q·kᵀ product is the nearest one; a long bias/mask chain (relative
    # position tables, window masks) must not use up the hops before it is reached
    frontier, seen = [node_arg(softmax, 0, "input")], set()
    while frontier and len(seen) < _MAX_HOPS:
        n = frontier.pop(0)
        if n in seen:
            continue
        seen.add(n)
        k = _key(n, gm)
        if _left_operand(n, k) is not None:
            return True
        if k in _SCORE_OPS:
            frontier.extend(a for a in n.all_input_nodes if a.op not in ("get_attr", "placeholder"))
    return False


def _probs_to_matmul(softmax: fx.Node, gm: fx.GraphModule | None) -> bool:
    frontier, hops = [(softmax, u) for u in softmax.users], 0
    while frontier and hops < _MAX_HOPS:
        producer, u = frontier.pop()
        hops += 1
        k = _key(u, gm)
        if _left_operand(u, k) is producer:
            return True
        if k in _PROB_OPS:
            frontier.extend((u, v) for v in u.users)
    return False


def _left_operand(node: fx.Node, key: str) -> fx.Node | None:
    """The left factor of a product of two tensors: ``matmul(a, b)`` or ``einsum(eq, [a, b])``
    (attention written as ``einsum("bhid,bhjd->bhij", q, k)``); None for any other node."""
    if key in _MATMULS and node.args and isinstance(node.args[0], fx.Node):
        return node.args[0]
    if key == "einsum" and len(node.args) > 1 and isinstance(node.args[1], (list, tuple)) \
            and len(node.args[1]) == 2 and isinstance(node.args[1][0], fx.Node):
        return node.args[1][0]
    return None


def descendants(start: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [start]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return seen


def ancestors(start: fx.Node, follow: Callable[[fx.Node], bool] | None = None) -> set[fx.Node]:
    """Every node ``start`` depends on; with ``follow``, only through the inputs it accepts."""
    seen: set[fx.Node] = set()
    stack = [start]
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a not in seen and (follow is None or follow(a)):
                seen.add(a)
                stack.append(a)
    return seen


def _attention_branch(gm: fx.GraphModule, core: fx.Node, order: dict[fx.Node, int]) -> AttentionBranch:
    return _delimit(gm, core, *residual_add(gm, core, order), order)


def residual_add(gm: fx.GraphModule, core: fx.Node, order: dict[fx.Node, int]) -> tuple[fx.Node, fx.Node, fx.Node]:
    """``(add, residual, branch)``: the first ``add(residual, branch)`` after an attention core whose
    one operand comes from the core and the other does not — where the block's attention rejoins
    the residual stream. The one finder of attention blocks (the token layout reads it too)."""
    desc = descendants(core)
    adds = sorted((n for n in desc if _key(n, gm) in _ADDS), key=order.__getitem__)
    for add in adds:
        tensors = [a for a in add.args[:2] if isinstance(a, fx.Node)]
        if len(tensors) != 2:
            continue
        inside = [a for a in tensors if a is core or a in desc]
        if len(inside) != 1:
            continue
        branch = inside[0]
        return add, tensors[0] if tensors[1] is branch else tensors[1], branch
    raise BranchError(f"attention at `{core.format_node()}` reaches no residual add(x, branch): "
                      "vitprune removes attention only in residual (pre-norm) blocks")


def _delimit(gm: fx.GraphModule, core: fx.Node, add: fx.Node, residual: fx.Node, branch: fx.Node,
             order: dict[fx.Node, int]) -> AttentionBranch:
    before_core = ancestors(core)
    norm = next((n for n in sorted(before_core, key=order.__getitem__, reverse=True)
                 if _key(n, gm) in _NORMS and node_arg(n, 0, "input") is residual), None)
    outside = ancestors(residual) | {residual}
    if norm is not None:
        outside |= ancestors(norm) | {norm}
    members = (ancestors(branch) | {branch}) - outside
    members -= _shared_context(members, add, {residual} | ({norm} if norm is not None else set()), order)
    scale, gamma, out = _layer_scale(gm, branch, members)
    for n in members:
        if n.op == "get_attr" or not _is_tensor(n):
            continue
        stray = [u for u in n.users if u not in members and u is not add]
        if stray:
            raise BranchError(f"attention branch of `{add.format_node()}`: `{n.format_node()}` is also used "
                              f"by `{stray[0].format_node()}` outside the branch, so it cannot be removed")
    params = sorted({str(n.target) for n in members
                     if n.op == "get_attr" and all(u in members for u in n.users)})
    nodes = sorted((n for n in members if n.op != "get_attr"), key=order.__getitem__)
    return AttentionBranch(-1, add, residual, branch, core, out, norm, scale, gamma, nodes, params)


def _shared_context(members: set[fx.Node], add: fx.Node, stream: set[fx.Node],
                    order: dict[fx.Node, int]) -> set[fx.Node]:
    """Members that never read the residual stream but are also used outside the branch, with their
    ancestors: context shared between blocks (an attention mask built from sizes, as Hugging Face
    builds once per model; a position table several blocks index). It stays when the branch goes,
    so it is neither removed nor counted; only a *stream-reading* node used elsewhere is an error."""
    reads: set[fx.Node] = set()
    for n in sorted(members, key=order.__getitem__):  # graph order: inputs are decided first
        if any(a in stream or a in reads for a in n.all_input_nodes):
            reads.add(n)
    shared: set[fx.Node] = set()
    for n in members - reads:
        if n not in shared and any(u not in members and u is not add for u in n.users):
            shared |= {n} | (ancestors(n) & members)
    return shared


def _layer_scale(gm: fx.GraphModule, branch: fx.Node, members: set[fx.Node]) -> tuple:
    """``branch = mul(out, gamma)`` with a parameter gamma → (mul node, gamma target, out)."""
    if _key(branch, gm) in _MULS and len(branch.args) == 2:
        a, b = branch.args
        for out, g in ((a, b), (b, a)):
            if (isinstance(g, fx.Node) and g.op == "get_attr" and isinstance(out, fx.Node)
                    and out.op != "get_attr" and len(out.users) == 1 and g in members
                    and isinstance(param_tensor(gm, str(g.target)), torch.Tensor)
                    and param_tensor(gm, str(g.target)).ndim <= 1):
                return branch, str(g.target), out
    return None, None, branch


def _is_tensor(node: fx.Node) -> bool:
    """Tensor-valued (or unknown, treated as tensor); size arithmetic (``x.shape[0]``) is not."""
    tm = node.meta.get("tensor_meta")
    if tm is None:
        return "value" not in node.meta
    return hasattr(tm, "shape") or isinstance(tm, (tuple, list))


# -- activations -------------------------------------------------------------------------------
def find_activations(gm: fx.GraphModule) -> list[ActivationSite]:
    """Every activation between two linears in graph order (see the module docstring)."""
    sites = []
    for node in gm.graph.nodes:
        kind = _key(node, gm)
        if kind not in ACTIVATIONS or not isinstance(node_arg(node, 0, "input"), fx.Node):
            continue
        site = _activation_site(gm, node, kind)
        if site is not None:
            sites.append(site)
    for s, idx in zip(sites, _original_indices(gm, "activation", len(sites))):
        s.index = idx
    return sites


def _activation_site(gm: fx.GraphModule, act: fx.Node, kind: str) -> ActivationSite | None:
    if _inplace(act):
        return None
    fc1 = node_arg(act, 0, "input")
    if _key(fc1, gm) != "linear" or len(fc1.users) != 1 or not isinstance(node_arg(fc1, 0, "input"), fx.Node):
        return None
    between, cur = [], act
    while len(cur.users) == 1:
        nxt = next(iter(cur.users))
        if _key(nxt, gm) in _PASS_THROUGH and node_arg(nxt, 0, "input") is cur:
            between.append(nxt)
            cur = nxt
            continue
        break
    if len(cur.users) != 1:
        return None
    fc2 = next(iter(cur.users))
    if _key(fc2, gm) != "linear" or node_arg(fc2, 0, "input") is not cur:
        return None
    w1, b1 = _linear_params(gm, fc1)
    w2, b2 = _linear_params(gm, fc2)
    if w1 is None or w2 is None:
        return None
    hidden, d_in = _param_shape(gm, w1, fc1)
    d_out, hidden2 = _param_shape(gm, w2, fc2)
    if hidden2 != hidden:
        raise BranchError(f"activation `{act.format_node()}`: fc1 gives {hidden} channels but fc2 "
                          f"takes {hidden2}")
    for n in (fc1, act, fc2):
        if "tensor_meta" not in n.meta:
            raise UnknownShapeError(f"no propagated shape at `{n.format_node()}`; trace the model with "
                                    "vitprune.frontend.capture (or call propagate_shapes) before depth passes")
    src = node_arg(fc1, 0, "input")
    norm = src if (isinstance(src, fx.Node) and _key(src, gm) == "layer_norm" and len(src.users) == 1) else None
    return ActivationSite(-1, act, kind, fc1, fc2, between, w1, b1, w2, b2, d_in, hidden, d_out, norm)


def _inplace(act: fx.Node) -> bool:
    return bool(act.kwargs.get("inplace")) or str(act.target).endswith("_")


def _linear_params(gm: fx.GraphModule, lin: fx.Node) -> tuple[str | None, str | None]:
    """(weight, bias) targets of ``F.linear(x, W, b)`` when both are parameters (bias may be absent)."""
    w, b = node_arg(lin, 1, "weight"), node_arg(lin, 2, "bias")
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        return None, None
    if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr"):
        return None, None
    return str(w.target), (str(b.target) if b is not None else None)


def _param_shape(gm: fx.GraphModule, target: str, user: fx.Node) -> tuple[int, int]:
    t = param_tensor(gm, target)
    if not isinstance(t, torch.Tensor) or t.ndim != 2:
        raise UnknownShapeError(f"`{user.format_node()}`: weight {target} is not a 2-d tensor")
    return int(t.shape[0]), int(t.shape[1])
