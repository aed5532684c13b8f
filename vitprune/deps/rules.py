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

from vitprune.deps.dims import CAT, AxisTable

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
#: ATen ops that are spellings of another op for channel flow (``_unsafe_view`` is a ``view``)
ALIASES: dict[str, str] = {
    "_unsafe_view": "view", "contiguous": "clone", "alias": "clone", "lift_fresh_copy": "clone",
    "_to_copy": "to", "clamp_min": "clamp", "clamp_max": "clamp", "hardtanh": "clamp",
    "linalg_vector_norm": "norm", "split_with_sizes": "split", "_softmax": "softmax",
    "_log_softmax": "log_softmax", "rsub": "sub", "true_divide": "div", "multiply": "mul",
    "swapaxes": "transpose", "constant_pad_nd": "pad", "upsample_bicubic2d": "upsample",
    "upsample_bilinear2d": "upsample", "upsample_nearest2d": "upsample", "upsample_linear1d": "upsample",
    "upsample_nearest1d": "upsample", "upsample_trilinear3d": "upsample", "_upsample_bicubic2d_aa": "upsample",
    "_upsample_bilinear2d_aa": "upsample", "_adaptive_avg_pool2d": "adaptive_avg_pool2d",
}
#: Python functions export leaves in the graph (tuple indexing, size arithmetic on SymInts)
PYTHON_KEYS: dict[Any, str] = {
    operator.getitem: "getitem", operator.add: "add", operator.sub: "sub", operator.mul: "mul",
    operator.floordiv: "floordiv", operator.truediv: "truediv", operator.neg: "neg", operator.pow: "pow",
    operator.mod: "mod", operator.eq: "eq", operator.ne: "ne", operator.lt: "lt", operator.le: "le",
    operator.gt: "gt", operator.ge: "ge",
}


def op_key(node: fx.Node, gm: fx.GraphModule | None = None) -> str:
    """The op a node performs, by its ATen overload packet (``aten.view.default`` → ``view``).

    Read from ``node.target`` (an ``OpOverload``), never from the node's printed name; aliases map
    to the op they spell. Other callables get a qualified name that no rule knows (reported)."""
    target = node.target
    if node.op == "call_function":
        if isinstance(target, torch._ops.OpOverload):
            name = target.overloadpacket.__name__
            return ALIASES.get(name, name)
        key = PYTHON_KEYS.get(target)
        if key is not None:
            return key
        return f"{getattr(target, '__module__', '?')}.{getattr(target, '__name__', target)}"
    if node.op == "call_module" and gm is not None:
        cls = type(gm.get_submodule(str(target)))
        return f"module:{cls.__module__}.{cls.__qualname__}"
    return node.op if node.op != "call_method" else f"method:{target}"


# -- context -----------------------------------------------------------------------------------
class RuleContext:
    """What a rule may read and record while the dependency graph is being built."""

    def __init__(self, gm: fx.GraphModule, table: AxisTable):
        self.gm = gm
        self.t = table
        self.node_dims: dict[fx.Node, Any] = {}
        self.param_roles: dict[tuple[str, int], set[str]] = {}
        # axes a product of two activations sums over (attention's q·k): a head-dim even where no
        # reshape splits it into heads (a one-head attention), see DependencyGraph._collect_groups
        self.contracted: list[int] = []

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

    def contract(self, node: fx.Node, operands: Sequence[Any], axis: int) -> None:
        """Record that ``node`` sums ``axis`` over a product of ``operands``, if none is a weight."""
        if not any(_from_parameter(x) for x in operands):
            self.contracted.append(axis)

    def role(self, x: Any, dim: int, role: str) -> None:
        """Record how a parameter dim is used (for naming groups: ``norm``, ``linear_out`` ...)."""
        if isinstance(x, fx.Node) and x.op == "get_attr":
            self.param_roles.setdefault((str(x.target), dim), set()).add(role)

    def arg(self, node: fx.Node, index: int, name: str, default: Any = None) -> Any:
        if len(node.args) > index:
            return node.args[index]
        return node.kwargs.get(name, default)


#: Ops that re-view one tensor: a weight seen through them is still a weight (``mm(x, w.t())``).
_REVIEWS = {"t", "transpose", "permute", "view", "reshape", "_unsafe_view", "expand", "contiguous", "clone",
            "unsqueeze", "squeeze", "alias", "detach", "_to_copy"}


def _from_parameter(x: Any) -> bool:
    """``x`` is a parameter or buffer, possibly re-viewed (:data:`_REVIEWS`)."""
    while isinstance(x, fx.Node) and x.op == "call_function" and op_key(x) in _REVIEWS and x.args:
        x = x.args[0]
    return isinstance(x, fx.Node) and x.op == "get_attr"


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
      "masked_fill", "add_", "mul_", "sub_", "div_", "eq", "ne", "lt", "le", "gt", "ge",
      "logical_and", "logical_or", "bitwise_and", "bitwise_or", "fmod", "remainder", "atan2", "lerp")
def elementwise_nary(ctx: RuleContext, node: fx.Node) -> Dims:
    items = list(node.args) + list(node.kwargs.values())
    return broadcast(ctx, ctx.shape(node), _tensor_inputs(ctx, items))


@rule("batch_norm")
def batch_norm(ctx: RuleContext, node: fx.Node) -> Dims:
    xd = ctx.dims(ctx.arg(node, 0, "input"))
    for i, name in enumerate(("weight", "bias", "running_mean", "running_var"), start=1):
        p = ctx.arg(node, i, name)
        if ctx.dims(p) is not None:
            ctx.t.unify(ctx.dims(p)[0], xd[1])
            ctx.role(p, 0, "norm")
    return list(xd)


@rule("neg", "abs", "exp", "log", "sqrt", "rsqrt", "sigmoid", "tanh", "erf", "relu", "gelu", "silu",
      "dropout", "clamp", "clone", "detach", "to", "type_as", "zeros_like", "ones_like", "full_like",
      "empty_like", "hardswish", "hardsigmoid", "mish", "leaky_relu", "elu", "softplus", "cos", "sin",
      "reciprocal", "softmax", "log_softmax", "relu_", "gelu_", "silu_", "clamp_", "square", "sign",
      "log1p", "expm1", "logical_not", "bitwise_not", "erfinv", "tan", "atan", "sigmoid_", "tanh_",
      "feature_dropout", "alpha_dropout", "quick_gelu", "fill", "fill_", "zero_", "masked_fill_", "nan_to_num")
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
    params = [ctx.arg(node, 2, "weight"), ctx.arg(node, 3, "bias")] if op_key(node) != "rms_norm" \
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


@rule("matmul", "bmm", "mm")
def matmul(ctx: RuleContext, node: fx.Node) -> Dims:
    a, b = ctx.arg(node, 0, "input"), ctx.arg(node, 1, "other")
    ad, bd = ctx.dims(a), ctx.dims(b)
    if len(ad) < 2 or len(bd) < 2:
        for d in (ad, bd):
            for x in d:
                ctx.t.freeze(x, "matmul with a 1-D operand")
        return ctx.fresh(ctx.shape(node), frozen="matmul with a 1-D operand")
    ctx.t.unify(ad[-1], bd[-2])  # the contracted dim: q·k couples the head-dim of q and k
    ctx.contract(node, [a, b], ad[-1])
    return _batch_broadcast(ctx, node, [a, b], 2) + [ad[-2], bd[-1]]


@rule("scaled_dot_product_attention")
def sdpa(ctx: RuleContext, node: fx.Node) -> Dims:
    q, k, v = ctx.arg(node, 0, "query"), ctx.arg(node, 1, "key"), ctx.arg(node, 2, "value")
    qd, kd, vd = ctx.dims(q), ctx.dims(k), ctx.dims(v)
    ctx.t.unify(qd[-1], kd[-1])  # q·k contracts the head-dim
    ctx.contract(node, [q, k], qd[-1])
    ctx.t.unify(kd[-2], vd[-2])  # keys and values share the sequence
    batch = _batch_broadcast(ctx, node, [q, k, v], 2)
    mask = ctx.arg(node, 3, "attn_mask")
    if ctx.dims(mask) is not None:
        broadcast(ctx, ctx.shape(node)[:-1] + (ctx.shape(k)[-2],),
                  [(batch + [qd[-2], kd[-2]], ctx.shape(node)[:-1] + (ctx.shape(k)[-2],)),
                   (ctx.dims(mask), ctx.shape(mask))])
    return batch + [qd[-2], vd[-1]]


# -- reductions --------------------------------------------------------------------------------
@rule("mean", "sum", "amax", "amin", "std", "var", "logsumexp", "norm", "prod", "any", "all")
def reduction(ctx: RuleContext, node: fx.Node) -> Dims:
    """``op(x, dim, keepdim)`` (``norm``: ``op(x, ord, dim, keepdim)``); no/empty dim reduces all."""
    xd = ctx.dims(node.args[0])
    ndim = len(xd)
    at = 2 if op_key(node) == "norm" else 1
    dim = ctx.value(ctx.arg(node, at, "dim"))
    keepdim = bool(ctx.value(ctx.arg(node, at + 1, "keepdim", False)))
    if dim is None or (isinstance(dim, (list, tuple)) and not dim):
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


@rule("reshape", "view", "flatten", "unflatten", "squeeze", "unsqueeze")
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


@rule("transpose", "t")
def transpose(ctx: RuleContext, node: fx.Node) -> Dims:
    xd = list(ctx.dims(node.args[0]))
    d0, d1 = (0, -1) if len(node.args) < 3 else (ctx.value(node.args[1]), ctx.value(node.args[2]))
    xd[d0], xd[d1] = xd[d1], xd[d0]
    return xd


@rule("expand_as")
def expand_as(ctx: RuleContext, node: fx.Node) -> Dims:
    """``x.expand_as(other)`` (``F.normalize``'s norm expanded back over ``x``): broadcast x to
    ``other``'s shape; equal-sized dims are the same channels."""
    x, other = node.args[0], node.args[1]
    return broadcast(ctx, ctx.shape(node), _tensor_inputs(ctx, [x, other]))


@rule("expand")
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
    equal_pieces = op_key(node) == "chunk" or isinstance(ctx.value(node.args[1]), int)
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
    dim = ctx.value(ctx.arg(node, 2, "dim", default)) if op_key(node) == "topk" \
        else ctx.value(ctx.arg(node, 1, "dim", default))
    dim = dim % len(xd)
    ctx.t.freeze(xd[dim], f"ordered by {op_key(node, ctx.gm)}")
    out_shape = node.meta["tensor_meta"][0].shape
    out = list(xd)
    out[dim] = ctx.t.new(out_shape[dim], frozen=f"ordered by {op_key(node, ctx.gm)}")
    return [list(out), list(out)]


@rule("argsort")
def argsort(ctx: RuleContext, node: fx.Node) -> Dims:
    """Indices that order ``dim``: that dim is reordered, so it is frozen (MAE's random masking)."""
    xd = ctx.dims(ctx.arg(node, 0, "input"))
    dim = ctx.value(ctx.arg(node, 1, "dim", -1)) % len(xd)
    ctx.t.freeze(xd[dim], "ordered by argsort")
    out = list(xd)
    out[dim] = ctx.t.new(ctx.shape(node)[dim], frozen="ordered by argsort")
    return out


@rule("repeat_interleave")
def repeat_interleave(ctx: RuleContext, node: fx.Node) -> Dims:
    """Each element of ``dim`` repeated in place (RoPE's sin/cos tables): that dim is frozen, the
    others pass through channel-wise. Without ``dim`` the input is flattened: all frozen."""
    x = node.args[0]
    xd, out_shape = ctx.dims(x), ctx.shape(node)
    dim = ctx.value(ctx.arg(node, 2, "dim"))
    if not isinstance(x, fx.Node) or xd is None or dim is None or len(out_shape) != len(xd):
        for a in xd or []:
            ctx.t.freeze(a, "flattened by repeat_interleave")
        return ctx.fresh(out_shape, frozen="output of repeat_interleave")
    dim %= len(xd)
    ctx.t.freeze(xd[dim], "repeated by repeat_interleave")
    out = list(xd)
    out[dim] = ctx.t.new(out_shape[dim], frozen="repeated by repeat_interleave")
    return out


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
    """An element of a tuple output (``unbind``, ``split``, ``topk``)."""
    src, index = node.args
    sd = ctx.dims(src)
    if sd is None:
        return None
    if sd and isinstance(sd[0], list):
        return sd[ctx.value(index)]
    raise TypeError("getitem on a tensor (indexing is select/slice/index in ATen graphs)")


@rule("select")
def select(ctx: RuleContext, node: fx.Node) -> Dims:
    """``x[:, i]``: one position of ``dim`` is read, so that dim is frozen and dropped."""
    xd = ctx.dims(node.args[0])
    dim = ctx.value(node.args[1]) % len(xd)
    ctx.t.freeze(xd[dim], "indexed by an integer")
    return xd[:dim] + xd[dim + 1:]


@rule("slice")
def slice_(ctx: RuleContext, node: fx.Node) -> Dims:
    """``x[:, a:b:s]``: a full slice keeps the axis; any other freezes it."""
    x = node.args[0]
    xd, shape = list(ctx.dims(x)), ctx.shape(x)
    dim = ctx.value(ctx.arg(node, 1, "dim", 0)) % len(xd)
    start, end, step = (ctx.value(ctx.arg(node, i, n, d))
                        for i, n, d in ((2, "start", None), (3, "end", None), (4, "step", 1)))
    if slice(start, end, step).indices(shape[dim]) != (0, shape[dim], 1):
        ctx.t.freeze(xd[dim], "sliced")
        xd[dim] = ctx.t.new(ctx.shape(node)[dim], frozen="sliced")
    return xd


@rule("index")
def index(ctx: RuleContext, node: fx.Node) -> Dims:
    """``x[idx]``, ``x[:, idx]`` (``aten.index.Tensor(x, [None, idx])``): the indexed dims are read at
    data-given positions, so they (and the indices) are frozen; every other dim passes through
    channel-wise. A relative-position table ``(positions, heads)`` thus keeps its per-head column
    coupled to the heads it biases (Swin, BEiT), and a decomposed rel-pos table its head-dim (SAM)."""
    x, indices = node.args[0], list(node.args[1])
    xd = ctx.dims(x)
    picked = [i for i, t in enumerate(indices) if t is not None]
    tensors = [indices[i] for i in picked]
    if not picked or any(ctx.dims(t) is None or _dtype(t) in (torch.bool, torch.uint8) for t in tensors):
        return advanced_index(ctx, node)  # boolean masks select data-dependent positions
    gathered = ctx.fresh(torch.broadcast_shapes(*(ctx.shape(t) for t in tensors)),
                         frozen="positions gathered by index")
    rest = [a for i, a in enumerate(xd) if i not in picked]
    if picked == list(range(picked[0], picked[-1] + 1)):  # adjacent: the result takes their place
        out = xd[:picked[0]] + gathered + xd[picked[-1] + 1:]
    else:  # separated indices: broadcast dims go first (numpy's rule)
        out = gathered + rest
    if [ctx.t.size(a) for a in out] != list(ctx.shape(node)):
        raise ValueError(f"unexpected index result shape {ctx.shape(node)}")
    for i in picked:
        ctx.t.freeze(xd[i], "indexed by index")
    for t in tensors:
        for a in ctx.dims(t):
            ctx.t.freeze(a, "index tensor")
    return out


def _dtype(x: Any) -> torch.dtype | None:
    tm = x.meta.get("tensor_meta") if isinstance(x, fx.Node) else None
    return getattr(tm, "dtype", None)


@rule("index_select")
def index_select(ctx: RuleContext, node: fx.Node) -> Dims:
    """``index_select(x, dim, idx)``: ``dim`` is gathered (frozen), the other dims pass through."""
    xd = list(ctx.dims(node.args[0]))
    dim = ctx.value(node.args[1]) % len(xd)
    ctx.t.freeze(xd[dim], "indexed by index_select")
    for a in ctx.dims(node.args[2]) or []:
        ctx.t.freeze(a, "index tensor")
    xd[dim] = ctx.t.new(ctx.shape(node)[dim], frozen="positions gathered by index_select")
    return xd


@rule("embedding")
def embedding(ctx: RuleContext, node: fx.Node) -> Dims:
    """``embedding(W, ids)``: rows of W are looked up (W's dim 0 frozen); the embedding width W's
    dim 1 is the output's channel dim (CLIP's position embedding joins the residual stream)."""
    w, ids = node.args[0], node.args[1]
    wd = ctx.dims(w)
    ctx.t.freeze(wd[0], "embedding rows (looked up by index)")
    id_dims = ctx.dims(ids) or ctx.fresh(ctx.shape(ids))
    for a in id_dims:
        ctx.t.freeze(a, "index tensor")
    return list(id_dims) + [wd[1]]


@rule("meshgrid")
def meshgrid(ctx: RuleContext, node: fx.Node) -> list[Dims]:
    """Coordinate grids (relative-position index tables): positions, never channels."""
    for x in ctx.arg(node, 0, "tensors"):
        for a in ctx.dims(x) or []:
            ctx.t.freeze(a, "position grid")
    return [ctx.fresh(tm.shape, frozen="position grid") for tm in node.meta["tensor_meta"]]


@rule("copy_", "copy")
def copy_(ctx: RuleContext, node: fx.Node) -> Dims:
    """``dst.copy_(src)`` (also into a view of ``dst``): src broadcasts into dst channel-wise."""
    dst, src = node.args[0], node.args[1]
    return broadcast(ctx, ctx.shape(dst), _tensor_inputs(ctx, [dst, src]))


@rule("einsum")
def einsum(ctx: RuleContext, node: fx.Node) -> Dims:
    """``einsum(eq, operands)``: dims sharing a subscript are one axis (summed or not), as ``matmul``
    couples its contracted dims; size-1 dims broadcast freely; ``...`` dims align from the right."""
    equation = str(ctx.value(node.args[0])).replace(" ", "")
    operands = list(node.args[1])
    lhs, arrow, rhs = equation.partition("->")
    specs = lhs.split(",")
    labelled = [_subscripts(spec, len(ctx.dims(x))) for spec, x in zip(specs, operands, strict=True)]
    width = max((sum(isinstance(l, int) for l in ls) for ls in labelled), default=0)
    if not arrow:  # implicit output: ``...`` then the subscripts used once, alphabetically
        letters = [c for c in lhs if c.isalpha()]
        rhs = "..." * ("..." in lhs) + "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    axis_of: dict[Any, int] = {}
    for label, items in _by_label(ctx, labelled, operands).items():
        size = max(n for _, n in items)
        full = [a for a, n in items if n == size]
        for a in full[1:]:
            ctx.t.unify(full[0], a)
        axis_of[label] = full[0]
        if isinstance(label, str) and label not in rhs and len(items) > 1:  # summed over a product
            ctx.contract(node, operands, full[0])
    out_shape = ctx.shape(node)
    out_labels = _subscripts(rhs, len(out_shape), width)
    out = [axis_of[l] if l in axis_of and ctx.t.size(axis_of[l]) == s else ctx.t.new(s)
           for l, s in zip(out_labels, out_shape, strict=True)]
    return out


def _subscripts(spec: str, ndim: int, ellipsis: int | None = None) -> list[Any]:
    """One label per dim: a letter, or for ``...`` dims a negative int counted from the right of the
    ellipsis (so operands with fewer broadcast dims align like numpy)."""
    head, dots, tail = spec.partition("...")
    n = ndim - len(head) - len(tail) if ellipsis is None else ellipsis
    if n < 0 or (not dots and n and ellipsis is None):
        raise ValueError(f"einsum subscripts {spec!r} do not fit {ndim} dims")
    return list(head) + list(range(-n, 0)) * bool(dots) + list(tail)


def _by_label(ctx: RuleContext, labelled: list[list[Any]], operands: list[Any]) -> dict[Any, list]:
    found: dict[Any, list[tuple[int, int]]] = {}
    for labels, x in zip(labelled, operands):
        for label, a, n in zip(labels, ctx.dims(x), ctx.shape(x), strict=True):
            found.setdefault(label, []).append((a, n))
    return found


@rule("index_put", "masked_select", "take")
def advanced_index(ctx: RuleContext, node: fx.Node) -> Dims:
    """Gather-like reads: neither the source's nor the index tensors' channels can be pruned."""
    for x in _flat(node.args):
        for a in ctx.dims(x) or []:
            if isinstance(a, int):
                ctx.t.freeze(a, f"indexed by {op_key(node)}")
    return ctx.fresh(ctx.shape(node), frozen=f"output of {op_key(node)}")


@rule("roll", "flip", "pad", "upsample", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
      "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d")
def spatial(ctx: RuleContext, node: fx.Node) -> Dims:
    """Ops that move positions along some dims (swin's shifted windows, padding, resizing): the
    dims they act on are frozen, every other dim passes through channel-wise."""
    x = node.args[0]
    xd, xs, out = list(ctx.dims(x)), ctx.shape(x), ctx.shape(node)
    moved = set(_moved_dims(ctx, node, len(xd)))
    for i in range(len(xd)):
        if i in moved or xs[i] != out[i]:
            ctx.t.freeze(xd[i], f"moved by {op_key(node)}")
            xd[i] = ctx.t.new(out[i], frozen=f"moved by {op_key(node)}")
    return xd


def _moved_dims(ctx: RuleContext, node: fx.Node, ndim: int) -> list[int]:
    key = op_key(node)
    if key == "roll":
        dims = ctx.value(ctx.arg(node, 2, "dims", []))
        return list(range(ndim)) if not dims else [d % ndim for d in dims]
    if key == "flip":
        return [d % ndim for d in ctx.value(ctx.arg(node, 1, "dims"))]
    if key == "pad":
        pad = ctx.value(node.args[1])
        return [ndim - 1 - i // 2 for i, p in enumerate(pad) if p]
    if key[-2:] in ("1d", "2d", "3d"):  # pools: the last 1, 2 or 3 dims are spatial
        return list(range(ndim - int(key[-2]), ndim))
    return list(range(2, ndim))  # upsample: the spatial dims of (N, C, H, W)


def _flat(args: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(args, out.append)
    return out
