"""Every method on every frontend: BoundaryDPT, BoundaryDPT+, CP-ViT tokens and heads, recovery
fine-tuning and the measured latency target run through ``compress`` on Hugging Face transformers and
torchvision ViTs exactly as on timm — the graph is the same ATen IR whatever the source."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from vitprune import CompressSpec, compress

transformers = pytest.importorskip("transformers")
torchvision = pytest.importorskip("torchvision")

SIZE = (3, 64, 64)


def hf_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=64, patch_size=16, hidden_size=96, num_hidden_layers=4,
                                    num_attention_heads=3, intermediate_size=384, num_labels=10)
    return transformers.ViTForImageClassification(config).eval()


def tv_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=64, patch_size=16, num_layers=4, num_heads=3,
                                                hidden_dim=96, mlp_dim=384, num_classes=10).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.1)  # torchvision starts the head at zero
    return model


FRONTENDS = {"hf_vit": hf_vit, "torchvision_vit": tv_vit}


@pytest.fixture(params=sorted(FRONTENDS))
def model(request) -> torch.nn.Module:
    return FRONTENDS[request.param]()


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def _runs(result, model) -> None:
    x = torch.randn(3, *SIZE)
    with torch.no_grad():
        y = result.model(x)
        assert y.shape == _logits(model, x).shape and torch.isfinite(y).all()


def test_boundarydpt_removes_whole_layers(model):
    result = compress(model, CompressSpec(method="boundarydpt", target_flops=0.8, calib_batches=1, batch_size=2),
                      example_input_size=SIZE)
    depth = result.report["stages"]["depth"]
    assert depth["attention"] or depth["activation"]
    assert result.report["flops_ratio"] <= 0.81
    _runs(result, model)


def test_boundarydpt_plus_meets_the_target(model):
    result = compress(model, CompressSpec(method="boundarydpt+", target_flops=0.5, calib_batches=1, batch_size=2),
                      example_input_size=SIZE)
    assert abs(result.report["flops_ratio"] - 0.5) <= 0.01
    joint = result.report["stages"]["joint"]
    assert joint["attention"] or joint["activation"]  # layers found and removed on every frontend
    _runs(result, model)


def test_cpvit_tokens_and_heads(model):
    result = compress(model, CompressSpec(method="cpvit", target_flops=0.7, prune_heads_cpvit=0.67,
                                          calib_batches=1, batch_size=2), example_input_size=SIZE)
    tokens = result.report["stages"]["tokens"]
    assert all(k == 2 for k in result.report["stages"]["heads"]["heads_kept"].values())
    assert abs(result.report["flops_ratio"] - 0.7) <= 0.01
    assert tokens["keep"][-1] < 16  # fewer patch tokens in the last block than the 16 of the image
    _runs(result, model)


def test_recovery_finetuning_distils_from_the_original(model):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, *SIZE, generator=g), torch.randint(0, 10, (16,), generator=g))
    result = compress(model, CompressSpec(target_flops=0.6, epochs=1, batch_size=8), example_input_size=SIZE,
                      train_data=DataLoader(data, batch_size=8), val_data=data)
    recovery = result.report["recovery"]
    assert recovery is not None and len(recovery["epochs"]) == 1 and recovery["epochs"][0]["loss"] > 0
    _runs(result, model)


def test_latency_target_on_a_transformers_model():
    model = hf_vit()
    result = compress(model, CompressSpec(target_latency=0.6), example_input_size=SIZE)
    rounds = result.report["latency_plan"]["rounds"]
    assert rounds and all(r["latency_ratio"] > 0 for r in rounds)
    assert result.report["flops_ratio"] < 0.95
    _runs(result, model)
