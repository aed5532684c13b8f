"""FLOPs and parameter counts.

The truth is :class:`torch.utils.flop_counter.FlopCounterMode` (it counts SDPA and every attention
matmul). Planning needs thousands of "what if" evaluations, so :class:`FlopModel` recomputes the same
formulas (``torch.utils.flop_counter``'s own ``mm``/``bmm``/``conv``/``sdpa`` counters) from the shapes
the dependency graph predicts for a candidate width per group; tests hold it equal to the counter.
FLOPs are reported per image (batch 1), counting a multiply-add as 2 FLOPs as the counter does.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from math import prod
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import flop_counter as fc
from torch.utils.flop_counter import FlopCounterMode

from vitprune.deps import DependencyGraph
from vitprune.deps.branches import ActivationSite, AttentionBranch
from vitprune.deps.rules import op_key
from vitprune.frontend.capture import node_arg


def _register_cpu_sdpa() -> None:
    """FlopCounterMode misses SDPA on CPU: it dispatches to ``_scaled_dot_product_flash_attention_for_cpu``,
    which has no formula in torch's registry (the CUDA kernels do). Register the same formula the CUDA
    kernels use, through the counter's own extension point."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in fc.flop_registry or op.default in fc.flop_registry:
        return

    @fc.register_flop_formula(op)
    def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query_shape, key_shape, value_shape)


_register_cpu_sdpa()


def count_flops(model: torch.nn.Module, example_input: torch.Tensor) -> int:
    """FLOPs of one forward pass on one image (FlopCounterMode, batch 1)."""
    # Fake tensors: the counter needs shapes only, so no arithmetic is done.
    with FakeTensorMode(allow_non_fake_inputs=True) as fake_mode:
        x = fake_mode.from_tensor(example_input[:1])
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    return int(counter.get_total_flops())


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class _NodeFlops(fx.Interpreter):
    """Runs a GraphModule under FlopCounterMode and attributes FLOPs to each node."""

    def __init__(self, gm: fx.GraphModule, counter: FlopCounterMode):
        super().__init__(gm)
        self.counter = counter
        self.per_node: dict[fx.Node, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        before = self.counter.get_total_flops()
        out = super().run_node(n)
        spent = self.counter.get_total_flops() - before
        if spent:
            self.per_node[n] = int(spent)
        return out


def node_flops(gm: fx.GraphModule, example_input: torch.Tensor) -> dict[fx.Node, int]:
    """FLOPs of each node for one image (FlopCounterMode on fake tensors)."""
    with FakeTensorMode(allow_non_fake_inputs=True) as fake_mode:
        x = fake_mode.from_tensor(example_input[:1])
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            interp = _NodeFlops(gm, counter)
            interp.run(x)
    return interp.per_node


def flops_by_block(gm: fx.GraphModule, example_input: torch.Tensor, depth: int = 2) -> dict[str, int]:
    """FLOPs per module scope (``blocks.3``), from each node's ``nn_module_stack``; batch 1."""
    out: dict[str, int] = defaultdict(int)
    for node, flops in node_flops(gm, example_input).items():
        out[_scope(node, depth)] += flops
    return dict(out)


def params_by_block(model: torch.nn.Module) -> dict[str, int]:
    """Parameters per module scope, with the same scope names as :func:`flops_by_block`."""
    out: dict[str, int] = defaultdict(int)
    for name, p in model.named_parameters():
        parts = name.split(".")
        keep = 2 if len(parts) > 2 and parts[1].isdigit() else 1
        out[".".join(parts[:keep])] += p.numel()
    return dict(out)


def _scope(node: fx.Node, depth: int) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] if isinstance(v, tuple) else str(k) for k, v in stack.items()]
    if not paths:
        return "(top)"
    path = paths[-1].split(".")
    # keep "blocks.3" for containers (blocks.3.attn.qkv → blocks.3), plain "head" otherwise
    keep = depth if len(path) > 1 and path[1].isdigit() else 1
    return ".".join(path[:keep])


class RemovalPrices:
    """What removing a layer saves, for a cost model with ``nodes_cost(nodes, counts)`` (the cost of
    these nodes of its graph when leaf ``r`` keeps ``counts[r]``) and ``merged_linear_cost(first,
    second, counts)``. One rule for FLOPs and for latency, priced at the widths chosen so far: a
    width move inside a layer that is then removed is not counted twice."""

    def attention_saving(self, branch: AttentionBranch, variant: str, counts: dict[int, int] | None = None) -> float:
        """Saved by removing ``branch`` (:class:`passes.attention.AttentionRemoval`): its nodes (qkv,
        attention, proj, their reshapes; a layer-scale mul is priced as removed, as when γ folds
        into LN1); ``variant="drop"`` also deletes the residual add, and LN1 when only the branch
        reads it. ``identity_norm`` keeps both."""
        gone = list(branch.nodes)
        if variant == "drop":
            gone.append(branch.add)
            if branch.norm is not None and set(branch.norm.users) <= set(branch.nodes):
                gone.append(branch.norm)
        return self.nodes_cost(gone, counts)

    def activation_saving(self, site: ActivationSite, merged: bool, counts: dict[int, int] | None = None) -> float:
        """Saved by removing ``site``'s activation (:class:`passes.activation.ActivationRemoval`):
        fc1, the activation and fc2 less the one merged linear when the pass merges (``merged``),
        else the activation alone (the factorised pair stays)."""
        if not merged:
            return self.nodes_cost([site.act], counts)
        gone = self.nodes_cost([site.fc1, site.act, *site.between, site.fc2], counts)
        return gone - self.merged_linear_cost(site.fc1, site.fc2, counts)

    def nodes_cost(self, nodes: Iterable[fx.Node], counts: dict[int, int] | None = None) -> float:
        raise NotImplementedError

    def merged_linear_cost(self, first: fx.Node, second: fx.Node, counts: dict[int, int] | None = None) -> float:
        raise NotImplementedError


class FlopModel(RemovalPrices):
    """FLOPs and parameter counts as a function of the number of channels kept per leaf axis."""

    _OPERANDS = {
        "linear": ("input", "weight"), "conv2d": ("input", "weight"), "matmul": ("input", "other"),
        "bmm": ("input", "mat2"), "mm": ("input", "mat2"),
        "scaled_dot_product_attention": ("query", "key", "value"),
    }
    _KINDS = set(_OPERANDS) | {"einsum"}

    def __init__(self, dg: DependencyGraph):
        self.dg = dg
        gm = dg.gm
        # Per-node truth at batch 1 (FlopCounterMode on fake tensors). Each modelled node is scaled
        # by truth / formula-at-the-example-batch: 1/B for per-image ops, 1 for ops that run once
        # per forward whatever the batch (a relative-position MLP on coordinates).
        truth = node_flops(gm, gm.meta["example_input"])
        self.ops: list[tuple[str, list[list[int]], list[int], float]] = []
        self.constant = 0  # FLOPs of ops the model has no formula for (counted, not scaled)
        self._op_of: dict[fx.Node, int] = {}  # node -> its entry of self.ops
        self._unmodelled: dict[fx.Node, int] = {}  # node -> its share of self.constant
        for node in gm.graph.nodes:
            key = op_key(node, gm) if node.op in ("call_function", "call_method", "call_module") else ""
            if key in self._KINDS:
                if key == "einsum":  # einsum(equation, [operands]): the equation rides in the key
                    operands, key = list(node.args[1]), f"einsum:{node.args[0]}"
                else:
                    operands = [node_arg(node, i, name) for i, name in enumerate(self._OPERANDS[key])]
                ins = [dg.node_dims[a] for a in operands if isinstance(a, fx.Node) and dg.node_dims.get(a)]
                op = (key, ins, dg.node_dims[node])
                at_example = self._op_flops(op, {})
                if at_example:
                    self._op_of[node] = len(self.ops)
                    self.ops.append((*op, truth.get(node, 0) / at_example))
            elif node in truth:
                self.constant += truth[node]
                self._unmodelled[node] = truth[node]
        self.exact = self.constant == 0
        self.params = {name: axes for name, axes in dg.param_dims.items()
                       if _is_parameter(dg.gm, name)}

    def _shape(self, axes: list[int], counts: dict[int, int]) -> list[int]:
        return [self.dg.table.kept_size(a, counts) for a in axes]

    def _op_flops(self, op, counts: dict[int, int]) -> int:
        key, ins, out = op[:3]
        return _formula(key, [self._shape(d, counts) for d in ins], self._shape(out, counts))

    def flops(self, counts: dict[int, int] | None = None) -> int:
        """FLOPs per image when leaf ``r`` keeps ``counts[r]`` channels (default: all)."""
        counts = counts or {}
        total = sum(self._op_flops(op, counts) * op[3] for op in self.ops)
        return int(round(total)) + self.constant

    def cost(self, counts: dict[int, int] | None = None) -> int:
        """The planners' cost (:class:`vitprune.plan.cost.LatencyModel` has the same method, in ms)."""
        return self.flops(counts)

    def nodes_cost(self, nodes: Iterable[fx.Node], counts: dict[int, int] | None = None) -> float:
        """FLOPs of ``nodes`` of this graph at ``counts``, as :meth:`flops` counts them: what deleting
        them saves (norms, adds and activations count none)."""
        counts = counts or {}
        total = 0.0
        for node in dict.fromkeys(nodes):
            if node in self._op_of:
                op = self.ops[self._op_of[node]]
                total += self._op_flops(op, counts) * op[3]
            else:
                total += self._unmodelled.get(node, 0)
        return total

    def merged_linear_cost(self, first: fx.Node, second: fx.Node, counts: dict[int, int] | None = None) -> float:
        """FLOPs of the one linear that replaces ``second ∘ first``: ``first``'s FLOPs with its output
        width swapped for ``second``'s (rows × in × out)."""
        counts = counts or {}
        hidden = self._shape(self.dg.node_dims[first], counts)[-1]
        d_out = self._shape(self.dg.node_dims[second], counts)[-1]
        return self.nodes_cost([first], counts) * d_out / hidden if hidden else 0.0

    def num_params(self, counts: dict[int, int] | None = None) -> int:
        counts = counts or {}
        return sum(prod(self._shape(axes, counts)) for axes in self.params.values())


def _is_parameter(gm: fx.GraphModule, name: str) -> bool:
    module_path, _, attr = name.rpartition(".")
    owner = gm.get_submodule(module_path) if module_path else gm
    return isinstance(getattr(owner, attr, None), torch.nn.Parameter)


def _einsum_flops(equation: str, shapes: list[list[int]]) -> int:
    """2 × the product of every index size (what the counter's bmm decomposition counts for a
    contraction of two operands); ``...`` is not supported (returns 0: counted as a constant)."""
    inputs = equation.replace(" ", "").split("->")[0].split(",")
    if "." in equation or len(inputs) != len(shapes) or len(inputs) != 2:
        return 0
    sizes: dict[str, int] = {}
    for letters, shape in zip(inputs, shapes):
        if len(letters) != len(shape):
            return 0
        sizes.update(zip(letters, shape))
    return 2 * prod(sizes.values())


def _formula(key: str, shapes: list[list[int]], out_shape: list[int]) -> int:
    if key.startswith("einsum:"):
        return _einsum_flops(key[len("einsum:"):], shapes)
    if key == "linear":
        x, w = shapes[0], shapes[1]
        return fc.mm_flop([prod(x[:-1]), x[-1]], [w[1], w[0]])
    if key == "conv2d":
        return fc.conv_flop_count(shapes[0], shapes[1], out_shape, transposed=False)
    if key == "scaled_dot_product_attention":
        q, k, v = (_as4d(s) for s in shapes[:3])
        return fc.sdpa_flop_count(q, k, v)
    a, b = shapes[0], shapes[1]  # matmul: batch dims broadcast to the output's
    batch = prod(out_shape[:-2])
    return fc.bmm_flop([batch, a[-2], a[-1]], [batch, b[-2], b[-1]])


def _as4d(shape: list[int]) -> list[int]:
    lead = prod(shape[:-2]) if len(shape) > 2 else 1
    return [1, lead, shape[-2], shape[-1]] if len(shape) != 4 else shape
