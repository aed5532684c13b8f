"""The one setter of the rewriting room: replace, own and delete a captured graph's tensors.

A GraphModule made by ``fx.GraphModule(root, graph)`` shares submodules with ``root``; every
rewrite goes through :func:`own_module` first so the user's model is never changed behind its back.
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.fx as fx

from vitprune.deps.tokens import size_args


def own_module(gm: fx.GraphModule, module_path: str) -> torch.nn.Module:
    """Make ``gm``'s submodule at ``module_path`` private to ``gm`` before a pass edits it in place.

    A GraphModule may share submodules with another module (``fx.GraphModule(root, graph)`` keeps
    references to ``root``'s modules), so replacing or deleting one of their parameters would also
    change that module. A shallow copy with its own parameter and buffer dicts takes the module's
    place in ``gm``; the tensors themselves are not copied.
    """
    if not module_path:
        return gm
    parent_path, _, name = module_path.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    module = getattr(parent, name)
    if module.__dict__.get("_vitprune_owner") == id(gm):
        return module
    clone = copy.copy(module)
    clone.__dict__["_parameters"] = dict(module._parameters)
    clone.__dict__["_buffers"] = dict(module._buffers)
    clone.__dict__["_modules"] = dict(module._modules)
    clone.__dict__["_vitprune_owner"] = id(gm)
    setattr(parent, name, clone)
    return clone


def set_tensor(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """Replace the parameter or buffer ``target`` of ``gm`` by ``value``, keeping its kind (a parameter
    keeps its ``requires_grad``; a new name becomes a trainable parameter), without touching a model
    ``gm`` shares modules with (:func:`own_module`). A view is copied so the new tensor owns its
    storage; a fresh tensor (``index_select``'s result) is taken as is, which saves a second copy."""
    module_path, _, attr = target.rpartition(".")
    owner = own_module(gm, module_path)
    old = getattr(owner, attr, None)
    value = value.detach()
    if value._is_view():
        value = value.clone()
    if attr in owner._buffers:
        owner._buffers[attr] = value
    elif old is None or isinstance(old, torch.nn.Parameter):
        owner._parameters[attr] = torch.nn.Parameter(value, requires_grad=True if old is None else old.requires_grad)
    else:
        setattr(owner, attr, value)


def delete_unreferenced(gm: fx.GraphModule, targets: Iterable[str]) -> list[str]:
    """Delete the parameters/buffers among ``targets`` that no ``get_attr`` node reads any more, then
    every submodule left without a use. Returns the deleted targets (what a pass really removed)."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    gone = [t for t in sorted(set(targets) - used) if _exists(gm, t)]
    gm.delete_all_unused_submodules()  # whole modules leave gm; the traced model keeps its own
    for target in gone:
        if not _exists(gm, target):
            continue
        module_path, _, attr = target.rpartition(".")
        owner = own_module(gm, module_path)
        if attr in owner._parameters:
            del owner._parameters[attr]
        elif attr in owner._buffers:
            del owner._buffers[attr]
        else:
            delattr(owner, attr)
    return gone


def _exists(gm: fx.GraphModule, target: str) -> bool:
    module_path, _, attr = target.rpartition(".")
    try:
        owner = gm.get_submodule(module_path) if module_path else gm
    except AttributeError:
        return False
    return hasattr(owner, attr) and getattr(owner, attr) is not None


def rewrite_lengths(gm: fx.GraphModule, seq_len: int, length_after: dict[fx.Node, int],
                    constants: dict[fx.Node, list[int]]) -> None:
    """Rewrite each baked-in sequence length (``constants``: {reshape/view/expand: size positions},
    from :func:`vitprune.deps.tokens.find_length_constants`) to the length where it sits: the
    sequence is ``seq_len`` tokens long until a node of ``length_after`` sets a new length, in graph
    order (``reshape(B, 197, 3, H, D)`` behind a cut or merge becomes ``reshape(B, 150, 3, H, D)``)."""
    if not constants:
        return
    length = seq_len
    for node in gm.graph.nodes:
        length = length_after.get(node, length)
        if node in constants and length != seq_len:
            sizes, write = size_args(node)
            for i in constants[node]:
                sizes[i] = length
            write(sizes)
