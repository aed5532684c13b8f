"""ONNX export with a checked graph and ONNX Runtime parity.

:func:`export_onnx` is the one way vitprune writes ONNX: export, ``onnx.checker`` (full check), strict
shape inference, then ORT-vs-torch parity at several batch sizes. The file appears at its final path
only after every check passed (temp file + ``os.replace``), so a file at ``path`` is always a good one.

Exporter choice: ``torch.onnx.export(..., dynamo=True)`` (the torch.export-based exporter), the same
capture vitprune's own IR comes from (:mod:`vitprune.frontend.capture`): the captured ATen GraphModule is
re-exported as is, with a symbolic batch axis (``Dim("batch")``). On ``deit_tiny_patch16_224`` (12
blocks) that gives 503 nodes, no Constant/Identity clutter and ORT parity ~1e-6, and pruned graphs
(qkv rows sliced, reshape constants rewritten, ``topk``/``gather`` token selection) export the same
way. The TorchScript exporter (dynamo=False) is deprecated since torch 2.9 and gave about twice the
nodes. The program is :func:`vitprune.frontend.capture.export_program`'s, always traced at batch >= 2 (a
batch of 1 would be specialised and baked in), and a reshape of a transposed tensor reads a
contiguous copy first (see ``_materialise_layouts``).

Opset: the dynamo exporter implements opset 18 natively; a lower opset is reached by onnx's version
converter, which *silently keeps opset 18* when it cannot convert (seen for ``ReduceMean`` and
``ReduceL2``, i.e. ``x.mean(dim)`` / ``x.norm(dim)``, which token pruning uses). So the default is 18,
and the produced opset is checked: a model that is not at the requested opset is an ExportError.
"""

from __future__ import annotations

import collections
import copy
import functools
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch.onnx import _constants as torch_onnx

from vitprune.deploy import DEFAULT_OPSET
from vitprune.errors import ExportError, InputError, UnsupportedModelError, VitpruneError
from vitprune.frontend.capture import BATCH_DIM, export_program

__all__ = ["export_onnx", "onnx_op_counts", "run_onnx", "ort_session", "check_opset", "supported_opsets",
           "EXPORTER", "DEFAULT_OPSET"]

#: Recorded in the export report so a reader knows which code path produced the file.
EXPORTER = "torch.onnx.export(dynamo=True)"
INPUT_NAME = "input"
OUTPUT_NAME = "output"
_PARITY_SEED = 0
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def export_onnx(
    model: torch.nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    parity_batches: tuple[int, ...] = (1, 4),
    atol: float = 1e-4,
) -> dict[str, Any]:
    """Export ``model`` to a checked ONNX file at ``path`` and prove it computes what torch computes.

    ``model`` is a plain module or a ``torch.fx.GraphModule``; it is run in eval mode (its training
    flag is restored afterwards). With ``dynamic_batch`` the first input/output axis is the symbolic
    ``"batch"``, and parity is checked at every size in ``parity_batches`` on seeded random input;
    without it the batch is fixed to ``example_input``'s and parity runs at that size only.

    Atomic: the file is written to a hidden temp file beside ``path`` and moved there only after the
    checker, strict shape inference and parity passed. On any failure the temp file is removed,
    nothing new appears at ``path`` (a file already there is left as it was) and ExportError is raised.

    Returns a JSON-able report: path, opset, exporter, parity_max_abs_err (per batch, keys are
    strings), op_counts, num_nodes, file_bytes, input_name, output_name.
    """
    _validate_args(model, example_input, path, opset, parity_batches, atol)
    path = Path(path)
    batches = tuple(parity_batches) if dynamic_batch else (int(example_input.shape[0]),)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise InputError(f"cannot write to {path.parent}: {e}") from e
    os.close(fd)
    tmp = Path(tmp_name)
    was_training = model.training
    model.eval()
    try:
        proto = _to_proto(_materialise_layouts(model), example_input, opset, dynamic_batch)
        tmp.write_bytes(proto.SerializeToString())
        proto = onnx.load(str(tmp))  # check what is on disk, not what is in memory
        _check_proto(proto, opset)
        errors = _parity(model, tmp, example_input, batches, atol)
        os.replace(tmp, path)
    except VitpruneError:
        raise
    except Exception as e:  # an exporter/checker bug or an unsupported op: say what, keep the cause
        raise ExportError(f"ONNX export of {type(model).__name__} failed: {_describe(e)}") from e
    finally:
        tmp.unlink(missing_ok=True)
        model.train(was_training)
    return _report(path, proto, errors)


def _report(path: Path, proto: onnx.ModelProto, errors: dict[int, float]) -> dict[str, Any]:
    counts = onnx_op_counts(proto)
    return {
        "path": str(path), "opset": _default_opset(proto), "exporter": EXPORTER,
        "parity_max_abs_err": {str(b): err for b, err in errors.items()},
        "op_counts": counts, "num_nodes": sum(counts.values()), "file_bytes": path.stat().st_size,
        "input_name": proto.graph.input[0].name, "output_name": proto.graph.output[0].name,
    }


def onnx_op_counts(path_or_proto: str | os.PathLike | onnx.ModelProto) -> dict[str, int]:
    """Count nodes per op type (``{"MatMul": 13, ...}``), including nodes inside subgraphs.

    Op types from a non-default domain are prefixed with it (``"com.microsoft.Attention"``) so they
    cannot be mistaken for standard ops. Tests use this to assert what a pass removed.
    """
    if isinstance(path_or_proto, onnx.ModelProto):
        proto = path_or_proto
    else:
        proto = _load_proto(path_or_proto)
    counts: collections.Counter[str] = collections.Counter()
    _count_graph(proto.graph, counts)
    return dict(sorted(counts.items()))


def run_onnx(path: str | os.PathLike, inputs: np.ndarray, threads: int | None = None) -> np.ndarray:
    """Run a single-input ONNX model on CPU and return its first output (a convenience for tests)."""
    session = ort_session(path, threads)
    name = session.get_inputs()[0].name
    try:
        return session.run(None, {name: np.asarray(inputs)})[0]
    except Exception as e:
        raise InputError(f"ONNX Runtime could not run {path} on input of shape "
                         f"{tuple(np.shape(inputs))}: {_describe(e)}") from e


def ort_session(path: str | os.PathLike, threads: int | None = None, *,
                keep_spinning: bool = False) -> ort.InferenceSession:
    """A CPU session with the settings every vitprune measurement uses.

    ``threads`` sets intra-op threads (None: ORT's default); inter-op is 1 with sequential execution
    so a thread count means what it says; graph optimisation stays at ORT's default (ENABLE_ALL),
    the path USERS.md found fastest. The pool's threads stop spinning when a run returns
    (``session.force_spinning_stop``; they still spin between the ops of a run): a session that
    has finished must not keep a core busy while the next one runs. Without it, timing several
    2-thread sessions round-robin measured the finished session's spinning worker, not the model:
    DeiT-S pruned to 0.5 FLOPs ran 0.89× the original at batch 1, against 1.84× with it and 1.83×
    timed in a session of its own. ``keep_spinning`` leaves ORT's default (spin on after a run) for a
    session timed on its own, back to back, where the next run then finds the pool awake, as each op
    of a graph does. A missing or unreadable file is an InputError.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"ONNX model not found: {path}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise InputError(f"threads must be an integer >= 1, got {threads!r}")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not keep_spinning:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    options.log_severity_level = 3  # errors only: ORT's warnings are about its own rewrites
    try:
        return ort.InferenceSession(str(path), sess_options=options,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:
        raise InputError(f"{path} is not an ONNX model ONNX Runtime can load: {_describe(e)}") from e


# --------------------------------------------------------------------------------------------------


def _validate_args(model: Any, example_input: Any, path: str | os.PathLike, opset: Any,
                   parity_batches: Any, atol: Any) -> None:
    """Reject bad arguments before anything is written, with a message the user can act on."""
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor) or example_input.ndim < 1:
        raise InputError("example_input must be a tensor with a leading batch axis")
    if not example_input.is_floating_point():
        raise InputError(f"example_input must be a floating-point tensor, got {example_input.dtype}")
    check_opset(opset)
    if not parity_batches or any(not isinstance(b, int) or b < 1 for b in parity_batches):
        raise InputError(f"parity_batches must be non-empty integers >= 1, got {parity_batches!r}")
    if not isinstance(atol, (int, float)) or not atol >= 0:
        raise InputError(f"atol must be >= 0, got {atol!r}")
    parent = Path(path).parent
    if not parent.is_dir():
        raise InputError(f"output folder does not exist: {parent}")
    if Path(path).is_dir():
        raise InputError(f"output path is a folder, not a file: {path}")


def check_opset(opset: Any, name: str = "opset") -> int:
    """``opset`` if the installed exporter can write it and ONNX Runtime can load it, else an
    InputError naming the range (and ``name``, e.g. the CLI flag); cheap, so callers check it
    before any work."""
    if not isinstance(opset, int) or isinstance(opset, bool) or opset < 1:
        raise InputError(f"{name} must be a positive integer, got {opset!r}")
    lo, hi = supported_opsets()
    if not lo <= opset <= hi:
        raise InputError(
            f"{name} {opset} is not supported by the installed exporter: it writes opsets {lo} to {hi} "
            f"({DEFAULT_OPSET} natively, others by conversion; torch {torch.__version__}, onnx {onnx.__version__}, "
            f"onnxruntime {ort.__version__}); the default is {DEFAULT_OPSET}")
    return opset


@functools.lru_cache(maxsize=1)
def supported_opsets() -> tuple[int, int]:
    """(lowest, highest) default-domain opset this installation can export and check.

    Lowest: torch's ``ONNX_MIN_OPSET``; below 18, onnx's version converter is used, and a graph it
    cannot convert is still refused after export (see the module docstring). Highest: what
    onnxscript's version converter can reach from 18 (above it the exporter silently stays at 18),
    capped by what the onnx package knows and what ONNX Runtime loads (probed on a one-node model)."""
    lo = int(getattr(torch_onnx, "ONNX_MIN_OPSET", 7))
    try:
        from onnxscript.version_converter import _version_converter as converter

        hi = int(converter.SUPPORTED_MAX_ONNX_OPSET)
    except (ImportError, AttributeError):  # private names: fall back to torch's own bound
        hi = int(getattr(torch_onnx, "ONNX_MAX_OPSET", DEFAULT_OPSET))
    hi = min(hi, onnx.defs.onnx_opset_version())
    while hi > DEFAULT_OPSET and not _ort_loads_opset(hi):
        hi -= 1
    return lo, hi


def _ort_loads_opset(opset: int) -> bool:
    helper, f32 = onnx.helper, onnx.TensorProto.FLOAT
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", f32, [1])],
                              [helper.make_tensor_value_info("y", f32, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:  # ORT raises its own Fail/InvalidGraph types
        return False
    return True


def _materialise_layouts(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a captured graph rewritten around two exporter limitations, values unchanged:

    * every reshape of a transposed tensor reads a contiguous copy first. The exporter turns
      ``reshape`` into ``view`` and, with a symbolic batch, cannot always prove that a transposed
      attention output may be viewed (beit and relpos ViTs: the strides of its decomposed attention
      differ from eager's), so it fails on a valid graph; ``reshape`` copies such a tensor anyway;
    * a 3-D ``scaled_dot_product_attention`` (SAM: ``(batch·heads, N, D)``) gets a leading unit
      dim in and out, because the ONNX translation of SDPA takes 4-D operands only."""
    if not isinstance(model, torch.fx.GraphModule):
        return model
    gm = copy.deepcopy(model)
    for node in list(gm.graph.nodes):
        if node.target is torch.ops.aten.reshape.default:
            _contiguous_input(gm.graph, node)
        elif node.target is torch.ops.aten.scaled_dot_product_attention.default:
            _as_4d_attention(gm.graph, node)
    gm.recompile()
    return gm


def _contiguous_input(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    source = node.args[0]
    if isinstance(source, torch.fx.Node) and source.target in _LAYOUT_VIEWS:
        with graph.inserting_before(node):
            dense = graph.call_function(aten.clone.default, (source,), {"memory_format": torch.contiguous_format})
        node.replace_input_with(source, dense)


def _as_4d_attention(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    meta = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], torch.fx.Node) else None
    if meta is None or len(meta.shape) != 3:
        return
    with graph.inserting_before(node):
        lifted = [graph.call_function(aten.unsqueeze.default, (a, 0)) if isinstance(a, torch.fx.Node) else a
                  for a in node.args]
    node.args = tuple(lifted)
    with graph.inserting_after(node):
        out = graph.call_function(aten.squeeze.dim, (node, 0))
    node.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)


aten = torch.ops.aten
_LAYOUT_VIEWS = (aten.transpose.int, aten.permute.default)


def _to_proto(model: torch.nn.Module, example_input: torch.Tensor, opset: int,
              dynamic_batch: bool) -> onnx.ModelProto:
    """Run the exporter in memory; weights are embedded (``external_data=False``) in the proto.

    dynamo=True, not the TorchScript exporter: see the module docstring. With a dynamic batch the
    program is :func:`~vitprune.frontend.capture.export_program`'s, the one ``torch.export`` call
    behind the captured IR and the ``.pt2`` too (batch named ``"batch"``, traced at batch >= 2).
    """
    if dynamic_batch:
        try:
            model = export_program(model, example_input)
        except UnsupportedModelError as e:  # export_onnx's failures are ExportErrors
            raise ExportError(f"ONNX export of {type(model).__name__} failed: {e}") from e
    program = torch.onnx.export(
        model, (example_input,), None, dynamo=True, opset_version=opset,
        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        # on a program this only names the axis: ONNX says "batch", not the symbol ("s77")
        dynamic_shapes=({0: torch.export.Dim(BATCH_DIM, min=1)},) if dynamic_batch else None,
        external_data=False, optimize=True, verbose=False,
    )
    return program.model_proto


def _check_proto(proto: onnx.ModelProto, opset: int) -> None:
    """The file must be self-contained, at the requested opset, valid and shape-consistent."""
    if any(onnx.external_data_helper.uses_external_data(t) for t in proto.graph.initializer):
        raise ExportError("the exported model stores weights as external data; vitprune writes "
                          "single-file models only (models under 2 GB)")
    got = _default_opset(proto)
    if got != opset:
        raise ExportError(
            f"requested opset {opset} but the exporter produced opset {got}: torch's exporter emits "
            f"opset {DEFAULT_OPSET} natively and could not convert this graph down (e.g. "
            f"ReduceMean/ReduceL2 changed in opset 18); use opset >= {DEFAULT_OPSET}")
    if len(proto.graph.input) != 1 or len(proto.graph.output) != 1:
        raise ExportError(f"expected one input and one output, the ONNX graph has "
                          f"{len(proto.graph.input)} inputs and {len(proto.graph.output)} outputs")
    try:
        onnx.checker.check_model(proto, full_check=True)
        onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    except Exception as e:
        raise ExportError(f"the exported ONNX model is invalid: {_describe(e)}") from e


def _parity(model: torch.nn.Module, path: Path, example_input: torch.Tensor,
            batches: tuple[int, ...], atol: float) -> dict[int, float]:
    """Max |ORT - torch| per batch size on seeded random input; above ``atol`` is an ExportError."""
    try:
        session = ort_session(path)
    except InputError as e:
        raise ExportError(f"ONNX Runtime cannot load the exported model: {e}") from e
    generator = torch.Generator().manual_seed(_PARITY_SEED)
    errors: dict[int, float] = {}
    for batch in batches:
        x = torch.randn((batch, *example_input.shape[1:]), generator=generator,
                        dtype=example_input.dtype).to(example_input.device)
        with torch.no_grad():
            expected = model(x)
        if not isinstance(expected, torch.Tensor):
            raise ExportError(f"the model must return one tensor, got {type(expected).__name__}")
        try:
            got = session.run(None, {INPUT_NAME: x.cpu().numpy()})[0]
        except Exception as e:
            raise ExportError(f"ONNX Runtime failed at batch {batch}: {_describe(e)}") from e
        want = expected.detach().cpu().numpy()
        if got.shape != want.shape:
            raise ExportError(f"parity failed at batch {batch}: ONNX output shape {got.shape} != "
                              f"torch output shape {want.shape}")
        err = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)), initial=0.0))
        if not err <= atol:  # also catches NaN
            raise ExportError(f"parity failed at batch {batch}: max abs error {err:.3g} > atol "
                              f"{atol:g} between ONNX Runtime and torch")
        errors[batch] = err
    return errors


def _default_opset(proto: onnx.ModelProto) -> int:
    """The opset of the default ("" / "ai.onnx") domain."""
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ExportError("the exported model imports no default-domain opset")


def _count_graph(graph: onnx.GraphProto, counts: collections.Counter[str]) -> None:
    for node in graph.node:
        counts[f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx")
               else node.op_type] += 1
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _count_graph(attr.g, counts)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _count_graph(sub, counts)


def _load_proto(path: str | os.PathLike) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"ONNX model not found: {path}")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise InputError(f"{path} is not an ONNX model: {_describe(e)}") from e


def _describe(e: BaseException) -> str:
    """One line per link of the exception chain (the exporter wraps the real cause), no colours."""
    parts = []
    seen: set[int] = set()
    link: BaseException | None = e
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        text = _ANSI.sub("", str(link)).strip()
        first = text.splitlines()[0] if text else ""
        parts.append(f"{type(link).__name__}: {first}" if first else type(link).__name__)
        link = link.__cause__
    return " <- ".join(parts)
