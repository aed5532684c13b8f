"""vitprune: a torch.fx graph-rewriting compiler that makes Vision Transformers smaller and faster.

Public API::

    from vitprune import compress, CompressSpec, load_model, export_onnx
"""
from __future__ import annotations

import importlib
from typing import Any

from vitprune.errors import VitpruneError

__version__ = "0.1.0"

_LAZY = {
    "compress": "vitprune.api",
    "CompressResult": "vitprune.api",
    "inspect_model": "vitprune.api",
    "save_compressed": "vitprune.api",
    "load_compressed": "vitprune.api",
    "CompressSpec": "vitprune.spec",
    "load_model": "vitprune.frontend.load",
    "export_onnx": "vitprune.deploy.onnx",
    "capture": "vitprune.frontend.capture",
    "DependencyGraph": "vitprune.deps",
}


def __getattr__(name: str) -> Any:
    # Lazy so that `import vitprune` stays cheap (the CLI's --help does not import torch.onnx).
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vitprune' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = ["VitpruneError", *_LAZY]
