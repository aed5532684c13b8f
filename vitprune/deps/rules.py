"""One small rule per op kind: how channel axes flow from an op's inputs to its outputs.

A rule receives the :class:`RuleContext` and the node, couples axes in the context's table
(``ctx.t.unify``) and returns the output's axes: a list (one axis per tensor dim), a list of such
lists for tuple outputs (``unbind``, ``split``), or ``None`` for non-tensor values.

The op table is explicit. An op with no rule is never guessed at: the dependency graph freezes every
axis it touches and reports it (see ``DependencyGraph.unsupported``).
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .dims import CAT, AxisTable

Dims = list[int]
Rule = Callable[["RuleContext", fx.Node], Any]

RULES: dict[str, Rule] = {}


def rule(*keys: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for key in keys:
            RULES[key] = fn
        return fn
    return register


# -- naming ops --------------------------------------------------------------------------------
_FUNCTION_NAMESPACES = (operator, torch, F, torch.Tensor)
_FUNCTION_NAMES = (
    "add sub mul truediv floordiv div neg pow matmul getitem abs exp log sqrt rsqrt sigmoid tanh erf "
    "relu gelu silu softmax log_softmax dropout layer_norm rms_norm group_norm batch_norm linear "
    "conv2d scaled_dot_product_attention cat stack flatten unflatten reshape permute transpose "
    "squeeze unsqueeze unbind split chunk bmm mean sum amax clamp maximum minimum where "
    "zeros ones full arange zeros_like ones_like hardswish hardsigmoid mish leaky_relu elu softplus "
    "normalize cos sin reciprocal einsum roll flip cumsum topk gather sort argsort"
).split()


def _function_table() -> dict[Any, str]:
    table: dict[Any, str] = {getattr: "getattr", operator.iadd: "add", operator.imul: "mul"}
    for name in _FUNCTION_NAMES:
        for ns in _FUNCTION_NAMESPACES:
            fn = getattr(ns, name, None)
            if fn is not None:
                table.setdefault(fn, name)
    return table


FUNCTION_KEYS = _function_table()

MODULE_KEYS: dict[type, str] = {
    nn.GELU: "gelu", nn.ReLU: "relu", nn.SiLU: "silu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid",
    nn.Hardswish: "hardswish", nn.Mish: "mish", nn.LeakyReLU: "leaky_relu", nn.ELU: "elu",
    nn.Dropout: "dropout", nn.Dropout1d: "dropout", nn.Dropout2d: "dropout", nn.Softmax: "softmax",
}


def op_key(node: fx.Node, gm: fx.GraphModule) -> str:
    """A stable name for the op a node performs (``linear``, ``reshape``, ``module:Foo`` ...)."""
    if node.op == "call_function":
        key = FUNCTION_KEYS.get(node.target)
        if key is not None:
            return key
        return f"{getattr(node.target, '__module__', '?')}.{getattr(node.target, '__name__', node.target)}"
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_module":
        cls = type(gm.get_submodule(node.target))
        return MODULE_KEYS.get(cls, f"module:{cls.__module__}.{cls.__qualname__}")
    return node.op


# -- context -----------------------------------------------------------------------------------
class RuleContext:
    """What a rule may read and record while the dependency graph is being built."""

    def __init__(self, gm: fx.GraphModule, table: AxisTable):
        self.gm = gm
        self.t = table
        self.node_dims: dict[fx.Node, Any] = {}
        self.param_roles: dict[tuple[str, int], set[str]] = {}

    def dims(self, x: Any) -> Dims | None:
        return self.node_dims.get(x) if isinstance(x, fx.Node) else None

    def value(self, x: Any) -> Any:
        """Concrete value of an argument (a literal, or a node's propagated non-tensor value)."""
        if isinstance(x, fx.Node):
            return x.meta.get("value")
        if isinstance(x, (list, tuple)):
            return type(x)(self.value(v) for v in x)
        return x

    def shape(self, node: fx.Node) -> tuple[int, ...]:
        return tuple(node.meta["tensor_meta"].shape)

    def fresh(self, shape: Sequence[int], frozen: str | None = None) -> Dims:
        return [self.t.new(s, frozen) for s in shape]

    def role(self, x: Any, dim: int, role: str) -> None:
        """Record how a parameter dim is used (for naming groups: ``norm``, ``linear_out`` ...)."""
        if isinstance(x, fx.Node) and x.op == "get_attr":
            self.param_roles.setdefault((str(x.target), dim), set()).add(role)

    def arg(self, node: fx.Node, index: int, name: str, default: Any = None) -> Any:
        if len(node.args) > index:
            return node.args[index]
        return node.kwargs.get(name, default)


def _neg(dim: int, ndim: int) -> int:
    return dim - ndim if dim >= 0 else dim


# -- elementwise -------------------------------------------------------------------------------
def broadcast(ctx: RuleContext, out_shape: Sequence[int], inputs: list[tuple[Dims, Sequence[int]]]) -> Dims:
    """Couple right-aligned dims of equal size across inputs; size-1 dims broadcast freely."""
    out: Dims = []
    nd = len(out_shape)
    for i in range(nd):
        size = out_shape[i]
        axes = [d[len(d) - nd + i] for d, s in inputs if len(d) - nd + i >= 0 and s[len(s) - nd + i] == size]
        if not axes:
            out.append(ctx.t.new(size))
            continue
        for a in axes[1:]:
            ctx.t.unify(axes[0], a)
        out.append(axes[0])
    return out


def _tensor_inputs(ctx: RuleContext, items: Sequence[Any]) -> list[tuple[Dims, tuple[int, ...]]]:
    return [(ctx.dims(x), ctx.shape(x)) for x in items if ctx.dims(x) is not None]


@rule("add", "sub", "mul", "truediv", "div", "floordiv", "pow", "maximum", "minimum", "where",
      "masked_fill", "add_", "mul_", "sub_", "div_", "__add__", "__mul__", "__radd__", "__rmul__")
def elementwise_nary(ctx: RuleContext, node: fx.Node) -> Dims:
    items = list(node.args) + list(node.kwargs.values())
    return broadcast(ctx, ctx.shape(node), _tensor_inputs(ctx, items))


@rule("normalize")
def normalize(ctx: RuleContext, node: fx.Node) -> Dims:
    """L2-normalise along a dim: channel-wise like LayerNorm's statistics (pruning renormalises)."""
    return list(ctx.dims(ctx.arg(node, 0, "input")))


@rule("batch_norm")
def batch_norm(ctx: RuleContext, node: fx.Node) -> Dims:
    xd = ctx.dims(ctx.arg(node, 0, "input"))
    for i, name in enumerate(("running_mean", "running_var", "weight", "bias"), start=1):
        p = ctx.arg(node, i, name)
        if ctx.dims(p) is not None:
            ctx.t.unify(ctx.dims(p)[0], xd[1])
            ctx.role(p, 0, "norm")
    return list(xd)


@rule("neg", "abs", "exp", "log", "sqrt", "rsqrt", "sigmoid", "tanh", "erf", "relu", "gelu", "silu",
      "dropout", "clamp", "contiguous", "clone", "detach", "float", "half", "to", "type_as", "type",
      "zeros_like", "ones_like", "hardswish", "hardsigmoid", "mish", "leaky_relu", "elu", "softplus",
      "cos", "sin", "reciprocal", "softmax", "log_softmax", "relu_", "clamp_", "requires_grad_")
def elementwise_unary(ctx: RuleContext, node: fx.Node) -> Dims:
    """Channel-wise ops on the first argument; softmax too (its normalised dim is never a channel
    pruned without intent: LayerNorm-like renormalisation is what pruning that dim means)."""
    return list(ctx.dims(node.args[0]))


# -- parameterised ops -------------------------------------------------------------------------
@rule("linear")
def linear(ctx: RuleContext, node: fx.Node) -> Dims:
    x, w, b = ctx.arg(node, 0, "input"), ctx.arg(node, 1, "weight"), ctx.arg(node, 2, "bias")
    xd, wd = ctx.dims(x), ctx.dims(w)
    ctx.t.unify(xd[-1], wd[1])
    ctx.role(w, 0, "linear_out")
    ctx.role(w, 1, "linear_in")
    if ctx.dims(b) is not None:
        ctx.t.unify(ctx.dims(b)[0], wd[0])
        ctx.role(b, 0, "bias")
    return xd[:-1] + [wd[0]]


@rule("conv2d")
def conv2d(ctx: RuleContext, node: fx.Node) -> Dims:
    x, w, b = ctx.arg(node, 0, "input"), ctx.arg(node, 1, "weight"), ctx.arg(node, 2, "bias")
    groups = ctx.value(ctx.arg(node, 6, "groups", 1))
    xd, wd = ctx.dims(x), ctx.dims(w)
    out_shape = ctx.shape(node)
    if groups == 1:
        ctx.t.unify(xd[1], wd[1])
    elif groups == ctx.shape(x)[1] == out_shape[1]:  # depthwise: channel c reads channel c
        ctx.t.unify(xd[1], wd[0])
    else:
        for a in (xd[1], wd[0], wd[1]):
            ctx.t.freeze(a, f"grouped conv (groups={groups})")
    for a in wd[2:]:
        ctx.t.freeze(a, "conv kernel")
    ctx.role(w, 0, "conv_out")
    if ctx.dims(b) is not None:
        ctx.t.unify(ctx.dims(b)[0], wd[0])
    spatial = ctx.fresh(out_shape[2:], frozen="spatial dims of a conv output")
    return [xd[0], wd[0], *spatial]


@rule("layer_norm", "rms_norm")
def layer_norm(ctx: RuleContext, node: fx.Node) -> Dims:
    x = ctx.arg(node, 0, "input")
    xd = ctx.dims(x)
    k = len(ctx.value(ctx.arg(node, 1, "normalized_shape")))
    params = [ctx.arg(node, 2, "weight"), ctx.arg(node, 3, "bias")] if node.target is not F.rms_norm \
        else [ctx.arg(node, 2, "weight")]
    for p in params:
        pd = ctx.dims(p)
        if pd is None:
            continue
        for a, b in zip(xd[-k:], pd):
            ctx.t.unify(a, b)
        for dim in range(k):
            ctx.role(p, dim, "norm")
    return list(xd)


@rule("group_norm")
def group_norm(ctx: RuleContext, node: fx.Node) -> Dims:
    xd = ctx.dims(node.args[0])
    ctx.t.freeze(xd[1], "group_norm couples channels within groups")
    for p in (ctx.arg(node, 2, "weight"), ctx.arg(node, 3, "bias")):
        if ctx.dims(p) is not None:
            ctx.t.unify(ctx.dims(p)[0], xd[1])
    return list(xd)


# -- products of tensors -----------------------------------------------------------------------
def _batch_broadcast(ctx: RuleContext, node: fx.Node, items: list[Any], keep_last: int) -> Dims:
    """Broadcast all but the last ``keep_last`` dims of several operands (matmul batch dims)."""
    out_shape = ctx.shape(node)[:-2]
    inputs = [(ctx.dims(x)[:-keep_last], ctx.shape(x)[:-keep_last]) for x in items if ctx.dims(x) is not None]
    return broadcast(ctx, out_shape, inputs)


@rule("matmul", "bmm", "__matmul__")
def matmul(ctx: RuleContext, node: fx.Node) -> Dims:
    a, b = ctx.arg(node, 0, "input"), ctx.arg(node, 1, "other")
    ad, bd = ctx.dims(a), ctx.dims(b)
    if len(ad) < 2 or len(bd) < 2:
        for d in (ad, bd):
            for x in d:
                ctx.t.freeze(x, "matmul with a 1-D operand")
        return ctx.fresh(ctx.shape(node), frozen="matmul with a 1-D operand")
    ctx.t.unify(ad[-1], bd[-2])  # the contracted dim: q·k couples the head-dim of q and k
    return _batch_broadcast(ctx, node, [a, b], 2) + [ad[-2], bd[-1]]


@rule("scaled_dot_product_attention")
def sdpa(ctx: RuleContext, node: fx.Node) -> Dims:
    q, k, v = ctx.arg(node, 0, "query"), ctx.arg(node, 1, "key"), ctx.arg(node, 2, "value")
    qd, kd, vd = ctx.dims(q), ctx.dims(k), ctx.dims(v)
    ctx.t.unify(qd[-1], kd[-1])  # q·k contracts the head-dim
    ctx.t.unify(kd[-2], vd[-2])  # keys and values share the sequence
    batch = _batch_broadcast(ctx, node, [q, k, v], 2)
    mask = ctx.arg(node, 3, "attn_mask")
    if ctx.dims(mask) is not None:
        broadcast(ctx, ctx.shape(node)[:-1] + (ctx.shape(k)[-2],),
                  [(batch + [qd[-2], kd[-2]], ctx.shape(node)[:-1] + (ctx.shape(k)[-2],)),
                   (ctx.dims(mask), ctx.shape(mask))])
    return batch + [qd[-2], vd[-1]]


# -- reductions --------------------------------------------------------------------------------
@rule("mean", "sum", "amax", "amin", "std", "var", "logsumexp", "norm")
def reduction(ctx: RuleContext, node: fx.Node) -> Dims:
    xd = ctx.dims(node.args[0])
    ndim = len(xd)
    dim = ctx.value(ctx.arg(node, 1, "dim"))
    if node.target == "norm" or node.target is torch.norm:
        dim = ctx.value(node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else None))
    keepdim = bool(ctx.value(node.kwargs.get("keepdim", False)))
    if dim is None:
        return [] if not keepdim else ctx.fresh([1] * ndim)
    dims = {d % ndim for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
    out = []
    for i, a in enumerate(xd):
        if i not in dims:
            out.append(a)
        elif keepdim:
            out.append(ctx.t.new(1))
    return out


# -- shape ops ---------------------------------------------------------------------------------
def reshape_axes(ctx: RuleContext, in_dims: Dims, in_shape: Sequence[int], out_shape: Sequence[int]) -> Dims:
    """Row-major reshape: both sides are factorisations of one virtual axis."""
    src = ctx.t.product([a for a, s in zip(in_dims, in_shape) if s != 1])
    pieces = [ctx.t.new(s) for s in out_shape if s != 1]
    ctx.t.unify(src, ctx.t.product(pieces))
    it = iter(pieces)
    return [next(it) if s != 1 else ctx.t.new(1) for s in out_shape]


@rule("reshape", "view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as")
def reshape(ctx: RuleContext, node: fx.Node) -> Dims:
    x = node.args[0]
    return reshape_axes(ctx, ctx.dims(x), ctx.shape(x), ctx.shape(node))


def _perm_arg(ctx: RuleContext, node: fx.Node) -> list[int]:
    perm = [ctx.value(a) for a in node.args[1:]] or ctx.value(node.kwargs.get("dims"))
    if len(perm) == 1 and isinstance(perm[0], (list, tuple)):
        perm = list(perm[0])
    return list(perm)


@rule("permute")
def permute(ctx: RuleContext, node: fx.Node) -> Dims:
    xd = ctx.dims(node.args[0])
    return [xd[p] for p in _perm_arg(ctx, node)]


@rule("transpose", "swapaxes", "t")
def transpose(ctx: RuleContext, node: fx.Node) -> Dims:
    xd = list(ctx.dims(node.args[0]))
    if node.target in ("t",) or len(node.args) < 3:
        d0, d1 = (0, 1) if len(xd) == 2 else (ctx.value(node.args[1]), ctx.value(node.args[2]))
    else:
        d0, d1 = ctx.value(node.args[1]), ctx.value(node.args[2])
    xd[d0], xd[d1] = xd[d1], xd[d0]
    return xd


@rule("expand", "expand_as", "broadcast_to")
def expand(ctx: RuleContext, node: fx.Node) -> Dims:
    x = node.args[0]
    xd, xs, out_shape = ctx.dims(x), ctx.shape(x), ctx.shape(node)
    lead = len(out_shape) - len(xd)
    out = ctx.fresh(out_shape[:lead])
    for a, s, o in zip(xd, xs, out_shape[lead:]):
        out.append(a if s == o else ctx.t.new(o))
    return out


@rule("repeat", "tile")
def repeat(ctx: RuleContext, node: fx.Node) -> Dims:
    x = node.args[0]
    xd, xs, out_shape = ctx.dims(x), ctx.shape(x), ctx.shape(node)
    lead = len(out_shape) - len(xd)
    out = ctx.fresh(out_shape[:lead])
    for a, s, o in zip(xd, xs, out_shape[lead:]):
        if s == o:
            out.append(a)
        else:
            if s != 1:
                ctx.t.freeze(a, "tiled by repeat")
            out.append(ctx.t.new(o))
    return out


def _dim_arg(ctx: RuleContext, node: fx.Node, index: int, ndim: int, default: int = 0) -> int:
    return ctx.value(ctx.arg(node, index, "dim", default)) % ndim


@rule("cat")
def cat(ctx: RuleContext, node: fx.Node) -> Dims:
    items = [x for x in ctx.arg(node, 0, "tensors") if ctx.dims(x) is not None]
    nd = len(ctx.shape(node))
    dim = _dim_arg(ctx, node, 1, nd)
    first = list(ctx.dims(items[0]))
    for x in items[1:]:
        for i, (a, b) in enumerate(zip(first, ctx.dims(x))):
            if i != dim:
                ctx.t.unify(a, b)
    first[dim] = ctx.t.concat([ctx.dims(x)[dim] for x in items])
    return first


@rule("stack")
def stack(ctx: RuleContext, node: fx.Node) -> Dims:
    items = [x for x in ctx.arg(node, 0, "tensors") if ctx.dims(x) is not None]
    nd = len(ctx.shape(node))
    dim = _dim_arg(ctx, node, 1, nd)
    first = list(ctx.dims(items[0]))
    for x in items[1:]:
        for a, b in zip(first, ctx.dims(x)):
            ctx.t.unify(a, b)
    return first[:dim] + [ctx.t.new(len(items), frozen="stacked dim")] + first[dim:]


@rule("unbind")
def unbind(ctx: RuleContext, node: fx.Node) -> list[Dims]:
    xd = ctx.dims(node.args[0])
    dim = _dim_arg(ctx, node, 1, len(xd))
    ctx.t.freeze(xd[dim], "indexed by unbind")
    rest = xd[:dim] + xd[dim + 1:]
    return [list(rest) for _ in range(ctx.shape(node.args[0])[dim])]


@rule("split", "chunk", "tensor_split")
def split(ctx: RuleContext, node: fx.Node) -> list[Dims]:
    x = node.args[0]
    xd = ctx.dims(x)
    dim = _dim_arg(ctx, node, 2, len(xd))
    sizes = [tm.shape[dim] for tm in node.meta["tensor_meta"]]
    pieces = ctx.t.split(xd[dim], sizes, CAT)
    equal_pieces = node.target == "chunk" or isinstance(ctx.value(node.args[1]), int)
    if equal_pieces:  # one size for all pieces: they must stay equal after pruning
        if len(set(sizes)) > 1:
            ctx.t.freeze(xd[dim], "uneven equal-size split")
        else:
            for p in pieces[1:]:
                ctx.t.unify(pieces[0], p)
    return [xd[:dim] + [p] + xd[dim + 1:] for p in pieces]


@rule("topk", "sort")
def topk(ctx: RuleContext, node: fx.Node) -> list[Dims]:
    """(values, indices) along ``dim``: that dim is reordered/selected, so it is frozen."""
    xd = ctx.dims(ctx.arg(node, 0, "input"))
    default = -1
    dim = ctx.value(ctx.arg(node, 2, "dim", default)) if node.target in ("topk", torch.topk) \
        else ctx.value(ctx.arg(node, 1, "dim", default))
    dim = dim % len(xd)
    ctx.t.freeze(xd[dim], f"ordered by {op_key(node, ctx.gm)}")
    out_shape = node.meta["tensor_meta"][0].shape
    out = list(xd)
    out[dim] = ctx.t.new(out_shape[dim], frozen=f"ordered by {op_key(node, ctx.gm)}")
    return [list(out), list(out)]


@rule("gather")
def gather(ctx: RuleContext, node: fx.Node) -> Dims:
    """Output dims are the index's; every dim but ``dim`` reads the source channel-wise."""
    x, index = ctx.arg(node, 0, "input"), ctx.arg(node, 2, "index")
    xd, idx = ctx.dims(x), ctx.dims(index)
    dim = ctx.value(ctx.arg(node, 1, "dim")) % len(xd)
    ctx.t.freeze(xd[dim], "gathered")
    ctx.t.freeze(idx[dim], "gathered")
    for d in range(len(xd)):
        if d != dim and ctx.shape(x)[d] == ctx.shape(index)[d]:
            ctx.t.unify(xd[d], idx[d])
    return list(idx)


@rule("getitem")
def getitem(ctx: RuleContext, node: fx.Node) -> Any:
    src, index = node.args
    sd = ctx.dims(src)
    if sd is None:
        return None
    if sd and isinstance(sd[0], list):  # element of a tuple output (unbind/split)
        return sd[ctx.value(index)]
    return _index_tensor(ctx, node, sd, ctx.shape(src), index)


def _index_tensor(ctx: RuleContext, node: fx.Node, sd: Dims, shape: tuple[int, ...], index: Any) -> Dims:
    items = list(index) if isinstance(index, tuple) else [index]
    items = [slice(*(ctx.value(v) for v in (i.start, i.stop, i.step))) if isinstance(i, slice) else i
             for i in items]
    tensor_index = [i for i in items if isinstance(i, fx.Node) and ctx.dims(i) is not None]
    if tensor_index or any(isinstance(i, (list, torch.Tensor)) for i in items):
        # gather-like: neither the source's nor the index tensor's channels can be pruned
        for a in sd + [a for i in tensor_index for a in ctx.dims(i)]:
            ctx.t.freeze(a, "advanced indexing")
        return ctx.fresh(ctx.shape(node), frozen="advanced indexing")
    items = [ctx.value(i) if isinstance(i, fx.Node) else i for i in items]
    if Ellipsis in items:
        at = items.index(Ellipsis)
        used = sum(1 for i in items if i is not None and i is not Ellipsis)
        items[at:at + 1] = [slice(None)] * (len(sd) - used)
    out, pos = [], 0
    for item in items:
        if item is None:
            out.append(ctx.t.new(1))
            continue
        a, size = sd[pos], shape[pos]
        pos += 1
        if isinstance(item, int):
            ctx.t.freeze(a, "indexed by an integer")
        elif isinstance(item, slice) and item.indices(size) == (0, size, 1):
            out.append(a)
        else:
            ctx.t.freeze(a, "sliced")
            out.append(ctx.t.new(len(range(*item.indices(size))), frozen="sliced"))
    out.extend(sd[pos:])
    return out
