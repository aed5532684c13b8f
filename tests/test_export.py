"""ONNX export: checker + strict shape inference + ORT parity on traced ViTs (plain, layer-scale,
hand-pruned, token-pruned), atomic writes on failure, and op counts. Tiny configs (img 64, depth 2)."""
from __future__ import annotations

import operator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from conftest import tiny
import torch
import torch.nn.functional as F
from torch import nn

from passes.tensors import set_tensor
from vitprune.frontend.capture import capture, example_input_for
from vitprune.errors import ExportError, InputError
from vitprune.deploy.onnx import export_onnx, onnx_op_counts, run_onnx

IMG = 64
DEPTH = 2


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    """Capture the way the compiler does (torch.export, ATen ops, dynamic batch)."""
    return capture(model, example_input_for((3, IMG, IMG)))


def _vit(arch: str = "deit_tiny_patch16_224", **kw) -> nn.Module:
    return tiny(arch, img_size=IMG, depth=DEPTH, **kw)


def _x(batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def _torch_out(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(x).numpy()


def _assert_valid_file(path: Path) -> onnx.ModelProto:
    """The file on disk passes the same checks export_onnx claims, and is self-contained."""
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in proto.graph.initializer)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no .data file, no temp file
    return proto


def _pruned_deit() -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """(original, pruned), pruned by hand on the captured graph: block 0 keeps heads {0, 2} of 3
    (qkv rows, proj columns and both reshape constants rewritten), block 1's MLP hidden width is
    halved (fc1 rows, fc2 columns)."""
    ref = _trace(_vit())
    gm = _trace(_vit())
    heads, hd, dim = [0, 2], 64, 192
    qkv_w, qkv_b = gm.get_parameter("blocks.0.attn.qkv.weight"), gm.get_parameter("blocks.0.attn.qkv.bias")
    set_tensor(gm, "blocks.0.attn.qkv.weight", qkv_w.detach().view(3, 3, hd, dim)[:, heads].reshape(-1, dim))
    set_tensor(gm, "blocks.0.attn.qkv.bias", qkv_b.detach().view(3, 3, hd)[:, heads].reshape(-1))
    cols = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads])
    proj_w = gm.get_parameter("blocks.0.attn.proj.weight")
    set_tensor(gm, "blocks.0.attn.proj.weight", proj_w.detach()[:, cols])
    reshapes = [n for n in gm.graph.nodes if n.target is torch.ops.aten.reshape.default]
    qkv_reshape, out_reshape = reshapes[0], reshapes[1]
    assert list(qkv_reshape.args[1][-3:]) == [3, 3, hd] and out_reshape.args[1][-1] == dim
    qkv_reshape.args = (qkv_reshape.args[0], [*qkv_reshape.args[1][:-2], len(heads), hd])
    out_reshape.args = (out_reshape.args[0], [*out_reshape.args[1][:-1], len(heads) * hd])

    keep = torch.arange(0, 768, 2)
    for name, rows in (("fc1.weight", True), ("fc1.bias", True), ("fc2.weight", False)):
        t = gm.get_parameter(f"blocks.1.mlp.{name}").detach()
        set_tensor(gm, f"blocks.1.mlp.{name}", t[keep] if rows else t[:, keep])
    gm.graph.lint()
    gm.recompile()
    return ref, gm


# ------------------------------------------------------------------------------ export + parity
@pytest.mark.parametrize("arch", ["deit_tiny_patch16_224", "deit3_small_patch16_224"])
def test_traced_vit_exports_with_parity(tmp_path, arch):
    gm = _trace(_vit(arch))
    if arch.startswith("deit3"):  # layer scale starts at 1e-6: make the blocks matter for parity
        gammas = [p for n, p in gm.named_parameters() if n.endswith(("ls1.gamma", "ls2.gamma"))]
        assert len(gammas) == 2 * DEPTH
        with torch.no_grad():
            for g in gammas:
                g.copy_(torch.rand_like(g) + 0.5)
    path = tmp_path / "m.onnx"
    info = export_onnx(gm, _x(), path)

    assert info["path"] == str(path) and info["exporter"] and info["opset"] == 18
    assert set(info["parity_max_abs_err"]) == {"1", "4"}
    assert all(0 <= e <= 1e-4 for e in info["parity_max_abs_err"].values())
    # weights are inside the file (the exporter shares identical initialisers, hence 0.9)
    n_params = sum(p.numel() for p in gm.parameters())
    assert info["file_bytes"] == path.stat().st_size > 0.9 * 4 * n_params
    proto = _assert_valid_file(path)
    assert info["op_counts"] == onnx_op_counts(path) == onnx_op_counts(proto)
    assert info["num_nodes"] == len(proto.graph.node)
    batch_axis = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_axis.dim_param and not batch_axis.HasField("dim_value")
    assert (info["input_name"], info["output_name"]) == (proto.graph.input[0].name,
                                                        proto.graph.output[0].name)
    # a batch size parity did not check still matches: the batch axis really is dynamic
    x3 = _x(3)
    np.testing.assert_allclose(run_onnx(path, x3.numpy()), _torch_out(gm, x3), atol=1e-4)
    # structure: per block qkv, proj, fc1, fc2 + 2 attention matmuls (SDPA decomposed); + head
    c = info["op_counts"]
    assert c.get("Gemm", 0) + c.get("MatMul", 0) == DEPTH * (4 + 2) + 1
    assert c["Erf"] == DEPTH and c["Softmax"] == DEPTH and c["Conv"] == 1
    assert c["LayerNormalization"] == 2 * DEPTH + 1


def test_hand_pruned_graph_exports_with_parity(tmp_path):
    ref, gm = _pruned_deit()
    assert gm.get_parameter("blocks.1.mlp.fc1.weight").shape == (384, 192)
    assert gm.get_parameter("blocks.0.attn.qkv.weight").shape == (384, 192)
    x = _x(2)
    # sanity: the pruned graph runs and really computes something different from the original
    assert not np.allclose(_torch_out(gm, x), _torch_out(ref, x), atol=1e-4)
    path = tmp_path / "pruned.onnx"
    info = export_onnx(gm, x, path)
    assert max(info["parity_max_abs_err"].values()) <= 1e-4
    _assert_valid_file(path)
    # the smaller weights are what the file holds (MatMul weights are stored transposed, (in, out))
    matrices = sorted(tuple(t.dims) for t in onnx.load(str(path)).graph.initializer
                      if len(t.dims) == 2)
    assert matrices == [(128, 192), (192, 192), (192, 384), (192, 384), (192, 576), (192, 768),
                        (384, 192), (768, 192), (1000, 192)]


def test_token_pruned_graph_with_topk_gather_exports(tmp_path):
    """Static-keep token selection (mean score -> topk -> gather) after block 0, as tokens.py will."""
    gm = _trace(_vit())
    g = gm.graph
    (norm1_w,) = [n for n in g.nodes if n.op == "get_attr" and n.target == "norm.weight"]
    (norm1,) = norm1_w.users
    res = norm1.args[0]  # the residual stream leaving the last block (torch.export bakes the
    # sequence length into every block's reshapes; passes.tokens rewrites those, this test need not)
    aten = torch.ops.aten
    with g.inserting_before(res.next):  # keeps the new nodes in program order
        patches = g.call_function(aten.narrow.default, (res, 1, 1, 16))
        cls = g.call_function(aten.narrow.default, (res, 1, 0, 1))
        score = g.call_function(aten.mean.dim, (patches, [-1]))
        top = g.call_function(aten.topk.default, (score, 8, 1))
        idx = g.call_function(operator.getitem, (top, 1))
        column = g.call_function(aten.unsqueeze.default, (idx, -1))
        idx = g.call_function(aten.expand.default, (column, [-1, -1, 192]))
        picked = g.call_function(aten.gather.default, (patches, 1, idx))
        kept = g.call_function(aten.cat.default, ([cls, picked], 1))
    res.replace_all_uses_with(kept, delete_user_cb=lambda u: u not in (patches, cls))
    g.lint()
    gm.recompile()
    path = tmp_path / "tokens.onnx"
    info = export_onnx(gm, _x(2), path)
    assert info["op_counts"]["TopK"] == 1 and info["op_counts"]["GatherElements"] == 1
    assert max(info["parity_max_abs_err"].values()) <= 1e-4
    # opset 17 is honoured or refused, never silently replaced (ReduceMean changed in opset 18)
    p17 = tmp_path / "tokens17.onnx"
    try:
        info17 = export_onnx(gm, _x(2), p17, opset=17)
    except ExportError as e:
        assert "opset" in str(e) and not p17.exists()
    else:
        assert info17["opset"] == 17 == onnx.load(str(p17)).opset_import[0].version


def test_opset_17_on_plain_vit(tmp_path):
    info = export_onnx(_trace(_vit()), _x(), tmp_path / "m17.onnx", opset=17, parity_batches=(2,))
    proto = _assert_valid_file(tmp_path / "m17.onnx")
    assert info["opset"] == 17 == [o.version for o in proto.opset_import if o.domain == ""][0]
    assert set(info["parity_max_abs_err"]) == {"2"}


def test_static_batch_and_training_flag_restored(tmp_path):
    """dynamic_batch=False bakes the example's batch in (parity at that batch only); a model handed
    over in training mode is exported in eval mode and given back in training mode."""
    model = _vit().train()
    path = tmp_path / "static.onnx"
    info = export_onnx(model, _x(2), path, dynamic_batch=False)
    assert model.training
    assert set(info["parity_max_abs_err"]) == {"2"}
    dim0 = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_value == 2


# ------------------------------------------------------------------------------------ atomicity
class _Raises(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom in forward")


class _Unsupported(nn.Module):
    """torch.export handles it, but there is no ONNX translation for linalg_eig."""

    def forward(self, x):
        return torch.linalg.eigvals(x).real


class _Noisy(nn.Module):
    """Differs between any two runs, so ORT can never match torch."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) + torch.rand_like(x)


@pytest.mark.parametrize("model, needle", [(_Raises(), "boom in forward"),
                                           (_Unsupported(), "linalg_eig")])
def test_failed_export_leaves_nothing(tmp_path, model, needle):
    path = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match=needle) as info:
        export_onnx(model, torch.randn(2, 4, 4), path)
    assert info.value.__cause__ is not None  # the exporter's own exception is kept
    assert list(tmp_path.iterdir()) == []


def test_parity_failure_raises_and_leaves_nothing(tmp_path):
    path = tmp_path / "noisy.onnx"
    with pytest.raises(ExportError, match=r"parity failed at batch 1: max abs error"):
        export_onnx(_Noisy(), torch.randn(1, 4), path)
    assert list(tmp_path.iterdir()) == []


def test_parity_failure_via_monkeypatched_runtime(tmp_path, monkeypatch):
    """ORT output perturbed at batch 4 only: the batch named is the one that failed, and an older
    good file at the target path is left exactly as it was."""
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous good export")
    real_run = onnxruntime.InferenceSession.run

    def perturbed(self, output_names, feed, *args, **kw):
        out = real_run(self, output_names, feed, *args, **kw)
        if next(iter(feed.values())).shape[0] == 4:
            out = [o + 1e-3 for o in out]
        return out

    monkeypatch.setattr(onnxruntime.InferenceSession, "run", perturbed)
    with pytest.raises(ExportError, match=r"batch 4: max abs error 0\.001"):
        export_onnx(_trace(_vit()), _x(), path)
    assert path.read_bytes() == b"previous good export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


@pytest.mark.parametrize("kwargs, needle", [
    (dict(example_input="not a tensor"), "example_input"),
    (dict(example_input=torch.ones(1, 4, dtype=torch.long)), "floating"),
    (dict(parity_batches=(0,)), "parity_batches"),
    (dict(opset=0), "opset"),
    (dict(path="/nonexistent-dir/m.onnx"), "does not exist"),
])
def test_bad_arguments(tmp_path, kwargs, needle):
    args = dict(model=nn.Linear(4, 4), example_input=torch.randn(1, 4), path=tmp_path / "m.onnx")
    args.update(kwargs)
    with pytest.raises(InputError, match=needle):
        export_onnx(args.pop("model"), args.pop("example_input"), args.pop("path"), **args)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ op counts
class _Tiny(nn.Module):
    """2 linears + 1 matmul + 1 GELU(erf): 3 Gemm/MatMul and 1 Erf in any faithful export."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = self.fc2(F.gelu(self.fc1(x)))
        return h @ h.transpose(-1, -2)


def test_op_counts_tiny_model(tmp_path):
    info = export_onnx(_Tiny(), torch.randn(2, 5, 8), tmp_path / "tiny.onnx")
    counts = onnx_op_counts(tmp_path / "tiny.onnx")
    assert counts == info["op_counts"]
    assert counts.get("Gemm", 0) + counts.get("MatMul", 0) == 3
    assert counts["Erf"] == 1 and sum(counts.values()) == info["num_nodes"]


def test_op_counts_bad_input(tmp_path):
    with pytest.raises(InputError, match="not found"):
        onnx_op_counts(tmp_path / "missing.onnx")
    with pytest.raises(InputError):
        run_onnx(tmp_path / "missing.onnx", np.zeros((1, 4), np.float32))
