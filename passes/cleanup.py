"""Cleanup: drop the ops that compute nothing, the dead code and the parameters nothing reads.

Rewrites (each an identity on values, so the function is unchanged — ``preserves_computation``):

* ``view``/``reshape``/``expand`` to the shape their input already has (width and depth passes leave
  such reshapes behind: ``reshape(x, [-1, N, C])`` of an ``(B, N, C)`` tensor);
* ``clone``/``alias``/``contiguous``, and ``to``/``_to_copy`` to the input's own dtype, when no user
  writes in place (a captured graph is functional, so none does);
* nodes whose value nobody uses, then every parameter, buffer and submodule no ``get_attr`` reads.

Safe because each removed op returns a tensor equal to its input (same shape, dtype and values), so
replacing its uses by the input changes no result; shapes come from the propagated ``tensor_meta``.
"""
from __future__ import annotations

import torch.fx as fx

from vitprune.frontend.capture import eliminate_dead_code
from vitprune.deps.rules import op_key

from .base import Pass, PassResult
from .tensors import delete_unreferenced

_RESHAPES = frozenset({"view", "reshape", "expand"})
_COPIES = frozenset({"clone", "to"})


class Cleanup(Pass):
    """Remove identity ops, dead nodes and unread parameters (see the module docstring)."""

    name = "cleanup"
    preserves_computation = True

    @classmethod
    def from_recipe(cls, recipe: dict) -> "Cleanup":
        return cls()

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        params_before = {name for name, _ in gm.named_parameters()} | {name for name, _ in gm.named_buffers()}
        bypassed = [n for n in list(graph.nodes) if _is_identity(n)]
        for node in bypassed:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        dead = eliminate_dead_code(graph)
        deleted = delete_unreferenced(gm, params_before)
        if not (bypassed or dead or deleted):
            return PassResult(gm, modified=False)
        graph.lint()
        gm.recompile()
        removed = {"identity_ops": len(bypassed), "parameters": deleted}
        return PassResult(gm, modified=True, removed=removed, recipe={"pass": self.name})


def _is_identity(node: fx.Node) -> bool:
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    key = op_key(node)
    if key not in _RESHAPES and key not in _COPIES:
        return False
    out, src = node.meta.get("tensor_meta"), node.args[0].meta.get("tensor_meta")
    if not (hasattr(out, "shape") and hasattr(src, "shape")) or tuple(out.shape) != tuple(src.shape):
        return False
    if out.dtype != src.dtype or any(_writes_in_place(u) for u in node.users):
        return False
    if key == "to":  # a device move is not an identity, whatever device the graph runs on
        return "device" not in node.kwargs and node.target._overloadname not in ("device", "other")
    return True


def _writes_in_place(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and schema.is_mutable
