"""The ``.pt2`` a compression writes: an ExportedProgram with a dynamic batch that plain torch
reloads (``torch.export.load(path).module()``), with the report inside as ``vitprune.json``."""
from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from vitprune.deploy.outputs import atomic_write, through_memory
from vitprune.frontend.capture import example_input_for, export_program
from vitprune.frontend.load import load_model
from vitprune.report import CompressResult


def exported_program(model: nn.Module, input_size: tuple[int, int, int]) -> torch.export.ExportedProgram:
    """The compressed model as an ExportedProgram with a dynamic batch (what ``PREFIX.pt2`` holds)."""
    return export_program(model, example_input_for(tuple(input_size)))


def save_compressed(result: CompressResult, path: str | os.PathLike) -> None:
    """Write ``result.model`` to ``path`` as a ``.pt2`` (``torch.export.save``), atomically.

    ``torch.export.load(path).module()`` runs it with plain torch: no vitprune, timm or transformers
    import, no pickled model class. The report rides along as ``vitprune.json`` in the archive."""
    atomic_write(path, lambda f: write_pt2(result, f))


def write_pt2(result: CompressResult, f: Any) -> None:
    """``torch.export.save`` of ``result`` to ``f`` (a path or a binary file), through memory: a
    full disk is then an ``OSError`` from Python's write, not an abort in torch's C++ writer."""
    program = exported_program(result.model, result.input_size)
    meta = json.dumps({"input_size": list(result.input_size), "recipe": result.recipe,
                       "source": result.source, "report": result.report}, default=str)
    write = through_memory(lambda buffer: torch.export.save(program, buffer, extra_files={"vitprune.json": meta}))
    if isinstance(f, (str, os.PathLike)):
        with open(f, "wb") as fh:
            write(fh)
    else:
        write(f)


def load_compressed(path: str | os.PathLike) -> nn.Module:
    """Reload a ``.pt2`` written by :func:`save_compressed` (or any ``torch.export.save`` file).

    ``torch.export.load`` may run code stored in the archive (torch's own warning), so only load
    files you trust; ``vitprune.load_model(path, trust_pickle=True)`` is the checked entry point."""
    return load_model(os.fspath(path), trust_pickle=True).model
