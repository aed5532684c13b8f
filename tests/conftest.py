"""Shared tiny-model fixtures. Small configs of the real timm classes keep the suite fast."""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from vitprune.frontend.capture import example_input_for, capture
from vitprune.plan.cost import _CHAIN


@pytest.fixture(scope="module")
def one_thread():
    """Small graphs and training steps on a shared 2-core machine: one intra-op thread is about as
    fast when the machine is idle and many times faster when other processes compete (OpenMP
    threads spin-wait). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(name: str = "deit_tiny_patch16_224", *, fused: bool = True, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A small timm model by name (2 blocks, 32×32 input unless told otherwise), eval mode, seeded.
    The one builder of named test models: every test file asks this one."""
    torch.manual_seed(seed)
    kwargs = {"depth": 2, "img_size": 32, **kwargs}
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    set_fused_attention(model, fused)
    return model


def tiny_vit(*, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A timm ``VisionTransformer`` built from its config (32×32, patch 8, width 96, 2 blocks of 3 heads,
    10 classes unless told otherwise), eval mode, seeded: for tests that set the architecture itself."""
    torch.manual_seed(seed)
    cfg = dict(img_size=32, patch_size=8, embed_dim=96, depth=2, num_heads=3, num_classes=10)
    cfg.update(kwargs)
    return VisionTransformer(**cfg).eval()


def tiny_qknorm(**kwargs) -> torch.nn.Module:
    return tiny_vit(qk_norm=True, **kwargs)


def set_fused_attention(model: torch.nn.Module, fused: bool) -> None:
    """timm's `fused_attn` picks SDPA or matmul → softmax → matmul: one model, two graphs."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused


def input_size(model: torch.nn.Module) -> tuple[int, int, int]:
    return (3, *model.patch_embed.img_size)


def traced(model: torch.nn.Module, batch: int = 2):
    return capture(model, example_input_for(input_size(model), batch=batch))


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial norms, biases and layer-scales, so no test passes because a weight is 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or "token" in name or "pos_embed" in name or "gamma" in name:
                p.copy_(p + 0.1 * torch.randn(p.shape, generator=g))
    return model


MODELS = {
    "deit_tiny": lambda **kw: tiny("deit_tiny_patch16_224", **kw),
    "deit_small_distilled": lambda **kw: tiny("deit_small_distilled_patch16_224", **kw),
    "deit3_small": lambda **kw: tiny("deit3_small_patch16_224", **kw),
    "vit_small": lambda **kw: tiny("vit_small_patch16_224", **kw),
    "vit_base_patch32": lambda **kw: tiny("vit_base_patch32_224", **kw),
    "vit_base_clip": lambda **kw: tiny("vit_base_patch16_clip_224", **kw),
    "dinov2_reg4": lambda **kw: tiny("vit_small_patch14_reg4_dinov2", img_size=28, num_classes=10, **kw),
    "vit_medium_gap": lambda **kw: tiny("vit_medium_patch16_gap_256", **kw),
    "qk_norm": lambda **kw: _qk(**kw),
}


def _qk(fused: bool = True, **kw):
    m = tiny_qknorm(**kw)
    set_fused_attention(m, fused)
    return m


def _op_work(kind: str, key: tuple[int, ...]) -> float:
    """Multiply-adds (or elements) of a latency-table op: what the deterministic timer charges for."""
    if kind == "attention":
        b, t, h, d = key
        return 2.0 * b * h * t * t * d
    return float(np.prod(key)) if key else 0.0


@pytest.fixture(scope="session", autouse=True)
def _latency_cache(tmp_path_factory):
    """Latency tables measured by tests (small graphs, a machine busy with the suite) go to a
    folder of the session's, never into the user's ``~/.cache/vitprune``, where later real plans
    would read them."""
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before


@pytest.fixture
def op_timer(monkeypatch, tmp_path):
    """Latency tables timed by a deterministic stand-in for ONNX Runtime: 1 ms per 10^6 multiply-adds
    or elements plus 2 µs a kernel, 10 µs a call. Tests of planning logic on the latency model use
    it so that a table entry measured late (a rewritten graph's own widths) agrees with the earlier
    ones exactly; real timing is tested in test_cost and test_bench. Its tables are cached in a
    folder of the test's own, so no test reads them as measured ones."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "op-timer-cache"))

    def measure(keys, threads, *, runs=7, warmup=2, repeats=2):
        out = {k: 1e-6 * _op_work(*k) + 2e-3 for k in keys if k[0] != "chain"}
        out.update({k: _CHAIN * 2e-3 for k in keys if k[0] == "chain"})  # _CHAIN kernels in a row
        return {**out, ("overhead", ()): 0.01}
    monkeypatch.setattr("vitprune.plan.cost.measure", measure)
    return measure


@pytest.fixture(params=sorted(MODELS))
def model_name(request) -> str:
    return request.param


def zero_masked(gm, dg, keep: dict[str, list[int]]):
    """The width pass's oracle: the unpruned graph with every removed channel's parameter slices set
    to zero (``keep``: group name → kept channels)."""
    masked = copy.deepcopy(gm)
    params = dict(masked.named_parameters())
    with torch.no_grad():
        for name, idx in keep.items():
            group = dg.group_by_name(name)
            removed = np.setdiff1d(np.arange(group.size), idx)
            for m in group.members:
                pos = np.nonzero(np.isin(m.coords, removed))[0]
                params[m.param].index_fill_(m.dim, torch.as_tensor(pos), 0.0)
    return masked


def random_keep(group_size: int, fraction: float, rng: np.random.Generator) -> list[int]:
    k = max(1, int(round(group_size * fraction)))
    return sorted(rng.choice(group_size, k, replace=False).tolist())


# -- the command line, as a user meets it ------------------------------------------------------------
def run_cli(capsys, *argv):
    """``vitprune.cli.main(argv)`` → (exit code, stdout, stderr)."""
    from vitprune import cli

    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def files_under(path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


def assert_bad_input(rc, err, *needles) -> None:
    """Exit 2 and exactly one line ``vitprune: error: ...`` that contains every needle."""
    lines = err.splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("vitprune: error: "), err
    for n in needles:
        assert n in lines[0], lines[0]
