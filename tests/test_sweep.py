"""The Pareto sweep: registry, architecture mapping, resumable runs, the CLI, and the --quick benchmark.

The benchmark smoke test asserts structure and sanity (fine-tuning helps, targets are met, a rerun
computes nothing), never fixed accuracy or latency numbers.
"""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, Subset

from vitprune import sweep as sw
from vitprune.deps.flops import count_flops
from vitprune.driver.pipeline import analyse
from vitprune.errors import InputError, PlanError
from vitprune.plan.budget import TOLERANCE
from vitprune.plan.depth import depth_flops_options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Training on a shared 2-core machine: 2 torch threads spin against other jobs (measured ~4x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _vit(depth=2, embed_dim=96, heads=3, img=32, patch=8, seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=img, patch_size=patch, embed_dim=embed_dim, depth=depth, num_heads=heads,
                             num_classes=10).eval()


def _digits(n_train=64, n_val=64):
    from vitprune.train.digits import digits_splits

    train, val = digits_splits(image_size=32)
    return (DataLoader(Subset(train, range(n_train)), batch_size=32, shuffle=True,
                       generator=torch.Generator().manual_seed(0)),
            DataLoader(Subset(val, range(n_val)), batch_size=64))


# ---------------------------------------------------------------------------------------------- units
def test_registry_has_every_row():
    for name in ("width", "boundarydpt", "boundarydpt+", "cpvit", "attention", "activation", "combo", "tp_width"):
        assert name in sw.METHODS and callable(sw.METHODS[name].prune)
    m = sw.register(sw.Method("dummy_row", "dummy", lambda model, target, ctx: None))
    try:
        assert sw.METHODS["dummy_row"] is m
        assert "dummy_row" in sw.SweepConfig(methods=["dummy_row"]).methods
    finally:
        del sw.METHODS["dummy_row"]


@pytest.mark.parametrize("kw, needle", [({"methods": ["nope"]}, "unknown sweep method"),
                                        ({"targets": [1.5]}, "targets"), ({"seeds": []}, "seed"),
                                        ({"epochs": -1}, "epochs")])
def test_config_validation(kw, needle):
    with pytest.raises(InputError, match=needle):
        sw.SweepConfig(**kw)


def test_pareto_front_keeps_only_undominated_points():
    pts = [(1.0, 90.0), (1.5, 85.0), (1.4, 80.0), (2.0, 85.0), (3.0, 50.0), (2.0, 84.0)]
    assert sw.pareto_front(pts) == [0, 3, 4]


def test_summarize_mean_std_and_skipped():
    state = {"points": {
        "w@0.5#s0": {"method": "w", "target": 0.5, "seed": 0, "status": "done", "top1": 80.0, "speedup": 2.0,
                     "flops_ratio": 0.5, "params": 10, "top1_pruned": 50.0, "latency_ms": 1.0, "latency_p90_ms": 1.1},
        "w@0.5#s1": {"method": "w", "target": 0.5, "seed": 1, "status": "done", "top1": 84.0, "speedup": 2.2,
                     "flops_ratio": 0.5, "params": 10, "top1_pruned": 52.0, "latency_ms": 1.0, "latency_p90_ms": 1.1},
        "d@0.1#s0": {"method": "d", "target": 0.1, "seed": 0, "status": "skipped", "reason": "too deep"}}}
    rows = {r["method"]: r for r in sw.summarize(state)}
    assert rows["w"]["top1"] == pytest.approx(82.0) and rows["w"]["top1_std"] == pytest.approx(2 ** 1.5)
    assert rows["w"]["n"] == 2 and rows["d"]["status"] == "skipped" and rows["d"]["reason"] == "too deep"


def test_scale_recipe_maps_blocks_widths_and_tokens():
    """depth 2 → 4 (block i ↦ 2i, 2i+1), widths by fraction (rounded), tokens by fraction of patches."""
    src, dst = _vit(depth=2, embed_dim=96, heads=3), _vit(depth=4, embed_dim=192, heads=6, img=64)
    steps = [{"pass": "activation", "blocks": [1], "merge": "auto", "fold_norm": False},
             {"pass": "width", "counts": {"hidden:blocks.0.mlp.fc1.weight[0]": 192, "head:blocks.0.attn.qkv.weight[0]": 2,
                                          "residual:patch_embed.proj.weight[0]": 64}},
             {"pass": "tokens", "keep": [16, 8]}]
    out = sw.scale_recipe(steps, src, (3, 32, 32), dst, (3, 64, 64), round_to=16)
    assert out[0]["blocks"] == [2, 3]
    keep = out[1]["keep"]
    assert {k: len(v) for k, v in keep.items()} == {
        "hidden:blocks.0.mlp.fc1.weight[0]": 384, "hidden:blocks.1.mlp.fc1.weight[0]": 384,
        "head:blocks.0.attn.qkv.weight[0]": 4, "head:blocks.1.attn.qkv.weight[0]": 4,
        "residual:patch_embed.proj.weight[0]": 128}
    assert out[2]["keep"] == [64, 64, 32, 32]
    from vitprune.api import replay

    gm = replay(dst, out, (3, 64, 64))
    assert gm(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    assert gm.get_parameter("patch_embed.proj.weight").shape[0] == 128
    assert count_flops(gm, torch.zeros(1, 3, 64, 64)) < 0.6 * count_flops(dst, torch.zeros(1, 3, 64, 64))


def test_scale_recipe_maps_a_block_left_with_one_head():
    """A block pruned to one head keeps its head-dim group's name (q·k still sums over it). It maps
    to the scale model's head-dim group, whether that one is left with two heads or one; a recipe
    written before one-head blocks were recognised (naming the group hidden:…) maps the same way."""
    src = _vit(depth=2, embed_dim=96, heads=3)
    from vitprune.api import replay

    head_dim = "head_dim:blocks.0.attn.qkv.weight[0]"
    gm = replay(src, [{"pass": "width", "keep": {"head:blocks.0.attn.qkv.weight[0]": [0]}},
                      {"pass": "width", "keep": {head_dim: list(range(16))}}], (3, 32, 32))
    assert gm.get_parameter("blocks.0.attn.qkv.weight").shape[0] == 3 * 16  # the recipe is what the planner sees
    dst = _vit(depth=4, embed_dim=192, heads=6, img=64)
    one = _vit(depth=2, embed_dim=192, heads=3, img=64)  # 1 of 3 heads here too
    for name in (head_dim, "hidden:blocks.0.attn.qkv.weight[0]"):
        steps = [{"pass": "width", "counts": {"head:blocks.0.attn.qkv.weight[0]": 1}},
                 {"pass": "width", "counts": {name: 16}}]
        out = sw.scale_recipe(steps, src, (3, 32, 32), dst, (3, 64, 64), round_to=16)
        assert {k: len(v) for k, v in out[1]["keep"].items()} == {head_dim: 16,
                                                                 "head_dim:blocks.1.attn.qkv.weight[0]": 16}
        scaled = replay(dst, out, (3, 64, 64))
        assert scaled.get_parameter("blocks.0.attn.qkv.weight").shape[0] == 3 * 2 * 16  # 2 of 6 heads, 16 of 32
        out = sw.scale_recipe(steps, src, (3, 32, 32), one, (3, 64, 64), round_to=16)
        assert list(out[1]["keep"]) == [head_dim]
        assert replay(one, out, (3, 64, 64)).get_parameter("blocks.0.attn.qkv.weight").shape[0] == 3 * 32


def test_merge_states_joins_a_sweep_split_over_processes(tmp_path):
    """Two --out folders of one sweep (same budget) become one record; another budget is refused."""
    from vitprune.sweep.state import load_state, merge_states, new_state, save_state

    cfg = sw.SweepConfig(methods=("width",), progress=False)
    a, b = new_state(cfg, (3, 32, 32), None), new_state(cfg, (3, 32, 32), None)
    a["points"]["width@0.5#s0"] = {"status": "done", "top1": 1.0}
    b["points"]["width@0.5#s0"] = {"status": "done", "top1": 2.0}  # already in a: a's own point stays
    b["points"]["tp_width@0.5#s0"] = {"status": "done", "top1": 3.0}
    b["scaled"]["tp_width:x"] = {"speedup": 2.0}
    save_state(str(tmp_path / "a.json"), a)
    save_state(str(tmp_path / "b.json"), b)
    assert merge_states(str(tmp_path / "a.json"), [str(tmp_path / "b.json")], cfg) == 1
    merged = load_state(str(tmp_path / "a.json"), cfg)
    assert {k: p["top1"] for k, p in merged["points"].items()} == {"width@0.5#s0": 1.0, "tp_width@0.5#s0": 3.0}
    assert merged["scaled"] == {"tp_width:x": {"speedup": 2.0}}
    with pytest.raises(InputError, match="budget"):
        merge_states(str(tmp_path / "a.json"), [str(tmp_path / "b.json")], sw.SweepConfig(epochs=5, progress=False))
    with pytest.raises(InputError, match="does not exist"):
        merge_states(str(tmp_path / "a.json"), [str(tmp_path / "c.json")], cfg)


def test_tp_width_meets_target_and_runs():
    pytest.importorskip("torch_pruning")
    model = _vit(depth=2)
    ctx = sw.PointContext((3, 32, 32), 0, [], sw.SweepConfig())
    pruned = sw.METHODS["tp_width"].prune(model, 0.6, ctx)
    x = torch.randn(2, 3, 32, 32)
    ratio = count_flops(pruned.model, x[:1]) / count_flops(model, x[:1])
    assert abs(ratio - 0.6) <= 0.02 and pruned.arch["kind"] == "tp"
    assert pruned.model(x).shape == (2, 10)
    for blk in pruned.model.blocks:  # num_heads/head_dim patched as Torch-Pruning's example does
        assert blk.attn.num_heads * blk.attn.head_dim * 3 == blk.attn.qkv.out_features


def _ctx(**config):
    torch.manual_seed(0)
    calib = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))]
    return sw.PointContext((3, 32, 32), 0, calib, sw.SweepConfig(calib_batches=1, **config))


def test_one_kind_removes_the_fewest_layers_within_tolerance():
    """Equal blocks: each activation removal saves the same FLOPs, so the count is known in advance.
    A target just below one removal's FLOPs (inside the tolerance) takes one removal, a target halfway
    to two removals takes two, and a target out of reach is a PlanError naming the best ratio."""
    model = _vit(depth=4)
    gm, _ = analyse(model, (3, 32, 32))
    base = count_flops(gm, gm.meta["example_input"])
    options = depth_flops_options(gm)
    one, two, every = (options[(0, n)] / base for n in (1, 2, 4))
    ctx, x = _ctx(), torch.zeros(1, 3, 32, 32)
    for target, removed in ((one - TOLERANCE / 2, 1), ((one + two) / 2, 2)):
        pruned = sw.METHODS["activation"].prune(model, target, ctx)
        steps = [s for s in pruned.arch["steps"] if s["pass"] == "activation"]
        assert len(steps) == 1 and len(steps[0]["blocks"]) == removed, pruned.arch
        assert count_flops(pruned.model, x) / base == pytest.approx(options[(0, removed)] / base)
    with pytest.raises(PlanError, match=f"activation removal alone reaches {every:.3f}"):
        sw.METHODS["activation"].prune(model, every - 2 * TOLERANCE, ctx)


def test_combo_corrects_the_planner_target_for_the_token_cut():
    """When the token cut alone meets the target it is the answer. Below it, depth/width get the target
    raised by what the tokens remove and are corrected once; a correction that would ask depth/width to
    keep 100% or more (which the spec refuses beside tokens) leaves the token cut alone as the other
    candidate. Either way the answer is never farther from the goal than the token cut alone."""
    model, x = _vit(depth=4), torch.zeros(1, 3, 32, 32)
    base = count_flops(model, x)
    ctx = _ctx(combo_tokens="keep=0.5,start=1")
    tokens_only = sw.METHODS["combo"].prune(model, 0.95, ctx)
    tau = count_flops(tokens_only.model, x) / base
    assert tokens_only.info["planner_target"] is None and [s["pass"] for s in tokens_only.arch["steps"]] == ["tokens"]
    assert tau < 0.95 - TOLERANCE
    for target in (tau - 0.05, tau - 0.15):
        combo = sw.METHODS["combo"].prune(model, target, ctx)
        ratio = count_flops(combo.model, x) / base
        assert combo.arch["steps"][-1]["pass"] == "tokens" and abs(ratio - target) <= abs(tau - target)
        planned = combo.info["planner_target"]
        assert planned is None or target < planned < 1.0, planned
    assert planned is not None and len(combo.arch["steps"]) >= 2  # the deeper target used depth/width too


@pytest.mark.parametrize("content, needle", [("{", "not a readable sweep file"), ("[1]", "not a vitprune-sweep file"),
                                             ('{"format": "other"}', "not a vitprune-sweep file")])
def test_sweep_refuses_a_foreign_sweep_json(tmp_path, content, needle):
    (tmp_path / "sweep.json").write_text(content)
    with pytest.raises(InputError, match=needle):
        sw.run_sweep(_vit(), [], [], sw.SweepConfig(methods=("width",), progress=False), tmp_path,
                     input_size=(3, 32, 32))
    assert (tmp_path / "sweep.json").read_text() == content  # left for the user to look at


# ---------------------------------------------------------------------------------------------- a tiny sweep
def test_sweep_records_skips_and_resumes(tmp_path):
    train, val = _digits()
    cfg = sw.SweepConfig(targets=(0.6, 0.05), methods=("width", "boundarydpt"), epochs=0, runs=3, warmup=1,
                         calib_batches=1, progress=False)
    state = sw.run_sweep(_vit(), train, val, cfg, tmp_path, input_size=(3, 32, 32))
    pts = state["points"]
    assert len(pts) == 4 and sorted(state["computed"]) == sorted(pts)
    assert pts["boundarydpt@0.05#s0"]["status"] == "skipped" and "depth alone" in pts["boundarydpt@0.05#s0"]["reason"]
    w = pts["width@0.6#s0"]
    assert w["status"] == "done", w.get("error")
    assert abs(w["flops_ratio"] - 0.6) <= 0.011 and w["speedup"] > 0 and w["latency_p90_ms"] >= w["latency_ms"]
    for f in ("sweep.json", "sweep.md", "sweep.png"):
        assert (tmp_path / f).stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # atomic writes leave nothing
    again = sw.run_sweep(_vit(), train, val, cfg, tmp_path, input_size=(3, 32, 32))
    assert again["computed"] == [] and again["points"] == json.loads((tmp_path / "sweep.json").read_text())["points"]
    with pytest.raises(InputError, match="budget"):
        sw.run_sweep(_vit(), train, val, sw.SweepConfig(methods=("width",), epochs=1, progress=False), tmp_path,
                     input_size=(3, 32, 32))


def test_equal_step_budgets_add_up_for_every_row(tmp_path):
    """With ``steps``, every point takes exactly that many optimizer steps: the planner's own (the
    gated search for boundarydpt+paper, probes and recovery for boundarydpt+), at most
    ``plan_share`` of them, and the fine-tune the rest (and takes exactly that many)."""
    train, val = _digits(n_train=128)
    cfg = sw.SweepConfig(targets=(0.5,), methods=("width", "boundarydpt+", "boundarydpt+paper"), steps=64,
                         plan_share=0.5, label="short", runs=2, warmup=0, calib_batches=1, batch_size=8,
                         progress=False)
    state = sw.run_sweep(_vit(depth=3), train, val, cfg, tmp_path, input_size=(3, 32, 32))
    assert state["budget"]["steps"] == 64 and state["budget"]["label"] == "short"
    pts = state["points"]
    for key, p in pts.items():
        assert p["status"] == "done", (key, p.get("error"))
        assert p["total_steps"] == sum(p["steps"].values()) == 64, (key, p["steps"])
        planning = sum(v for k, v in p["steps"].items() if k != "finetune")
        assert planning <= 32 and p["finetune_steps_taken"] == p["steps"]["finetune"]
    assert pts["width@0.5#s0"]["steps"] == {"finetune": 64}
    joint = pts["boundarydpt+@0.5#s0"]
    assert joint["steps"]["probes"] > 0 and joint["steps"]["recovery"] > 0
    assert joint["info"]["stages"]["joint"]["pricing"].startswith("after recovery")
    paper = pts["boundarydpt+paper@0.5#s0"]
    assert paper["steps"]["search"] > 0 and paper["info"]["stages"]["depth"]["selection"] == "search"
    assert len(paper["info"]["stages"]["depth"]["attention"]) == 1  # 5/12 of 3 blocks: 1 of each kind
    with pytest.raises(InputError, match="budget"):  # another step budget is another sweep
        sw.run_sweep(_vit(depth=3), train, val, sw.SweepConfig(methods=("width",), steps=96, progress=False),
                     tmp_path, input_size=(3, 32, 32))


def test_retime_puts_every_budget_in_one_interleaved_run_per_batch(tmp_path):
    train, val = _digits()
    states = []
    for budget, steps in (("short", 2), ("long", 8)):
        cfg = sw.SweepConfig(targets=(0.6,), methods=("width",), steps=steps, label=budget, runs=2, warmup=0,
                             calib_batches=1, progress=False)
        states.append((sw.run_sweep(_vit(), train, val, cfg, tmp_path / budget, input_size=(3, 32, 32)),
                       tmp_path / budget))
    assert sw.retime(states, runs=2, warmup=0, batch_sizes=(1, 4))
    originals = {s["rebench"]["original_ms_by_batch"]["4"] for s, _ in states}
    assert len(originals) == 1  # one run: the same original timing in both budgets
    for state, out in states:
        p = state["points"]["width@0.6#s0"]
        assert set(p["by_batch"]) == {"1", "4"} and p["speedup_b4"] == p["by_batch"]["4"]["speedup"] > 0
        assert p["speedup"] == p["by_batch"]["1"]["speedup"] and "pairwise" in p
        assert json.loads((out / "sweep.json").read_text())["rebench"]["batch_sizes"] == [1, 4]
    assert not sw.retime(states, runs=2, warmup=0, batch_sizes=(1, 4))  # nothing new: nothing re-timed
    # a later session has only sweep.json: the ONNX files are rebuilt from the architectures (same shapes)
    for state, out in states:
        for f in (out / "onnx").iterdir():
            f.unlink()
    assert not sw.retime(states, runs=2, warmup=0, batch_sizes=(1, 2))  # without the model: left out
    cfg = sw.SweepConfig(methods=("width",), progress=False)
    assert sw.retime(states, runs=2, warmup=0, batch_sizes=(1, 2), rebuild=(_vit(), (3, 32, 32), cfg))
    for state, out in states:
        p = state["points"]["width@0.6#s0"]
        assert os.path.exists(p["onnx"]) and p["speedup_b2"] > 0
        rebuilt = sw.rebuild("width", p["arch"], _vit(), (3, 32, 32), cfg)
        assert count_flops(rebuilt, torch.zeros(1, 3, 32, 32)) == p["flops"]


def test_rescale_retimes_every_scaled_architecture_in_one_run(tmp_path):
    """A sweep with a scale model, then rescale: every distinct architecture re-timed together (the
    pair numbers kept), points and the scaled cache agree, a second call changes nothing."""
    train, val = _digits()
    cfg = sw.SweepConfig(targets=(0.6, 0.4), methods=("width",), epochs=0, runs=2, warmup=0, scale_runs=1,
                         scale_warmup=0, calib_batches=1, progress=False)
    scale = sw.ScaleModel("vit-64", lambda: _vit(depth=4, embed_dim=192, heads=6, img=64), (3, 64, 64))
    state = sw.run_sweep(_vit(), train, val, cfg, tmp_path, input_size=(3, 32, 32), scale=scale)
    assert sw.rescale(state, tmp_path, _vit(), (3, 32, 32), scale, cfg, runs=2, warmup=0)
    assert len(state["rescale"]["archs"]) == 2 and len(state["scaled"]) == 2
    for p in state["points"].values():
        entry = state["scaled"][p["scaled"]["arch_key"]]
        assert "pairwise" in entry and p["scaled"]["speedup"] == entry["speedup"] > 0
        assert entry["original_ms"] == state["rescale"]["original_ms"]
    assert not [f for f in os.listdir(tmp_path / "onnx") if f.startswith("rescale")]  # ~90 MB each at DeiT-S size
    assert json.loads((tmp_path / "sweep.json").read_text())["rescale"] == state["rescale"]
    assert not sw.rescale(state, tmp_path, _vit(), (3, 32, 32), scale, cfg, runs=2, warmup=0)


def test_cli_sweep(tmp_path, capsys):
    from vitprune.cli import main
    from vitprune.train.digits import export_image_folder

    data = tmp_path / "digits"
    export_image_folder(data, image_size=32)
    argv = ["sweep", "timm:test_vit", "--img-size", "32", "--num-classes", "10", "--data", str(data),
            "--targets", "0.6", "--methods", "width", "--epochs", "0", "--runs", "3", "--out", str(tmp_path / "o"),
            "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| width | 0.6 |" in out and "1 point(s) computed now" in out
    assert main(argv) == 0 and "0 point(s) computed now" in capsys.readouterr().out
    assert main(argv[:-6] + ["--methods", "nope", "--out", str(tmp_path / "o2")]) == 2


# ---------------------------------------------------------------------------------------------- the benchmark
def _pareto():
    spec = importlib.util.spec_from_file_location("pareto_bench", os.path.join(ROOT, "benchmarks", "pareto.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_benchmark_smoke_and_resume(tmp_path):
    """``benchmarks/pareto.py --quick``: every row done, near its FLOPs target, fine-tuning beats the
    un-fine-tuned pruned model, and a second run recomputes nothing."""
    pareto = _pareto()
    argv = ["--quick", "--out", str(tmp_path), "--no-md", "--no-progress"]
    state = pareto.main(argv)["short"]
    pts = list(state["points"].values())
    assert {p["method"] for p in pts} == set(pareto.QUICK["methods"])
    for p in pts:
        assert p["status"] == "done", p.get("error")
        assert abs(p["flops_ratio"] - p["target"]) <= 0.06, p
        assert 0 < p["speedup"] < 20 and p["params"] < state["original"]["params"]
        assert set(p) >= {"method", "target", "seed", "flops_ratio", "params", "top1", "top1_pruned", "latency_ms",
                          "latency_p90_ms", "speedup", "speedup_b32", "history", "steps", "total_steps"}
        assert p["total_steps"] == pareto.QUICK["steps"]["short"]
    gain = sum(p["top1"] - p["top1_pruned"] for p in pts) / len(pts)
    assert gain > 0, [(p["key"], p["top1_pruned"], p["top1"]) for p in pts]
    assert state["original"]["top1"] > 20  # the base model learned something (chance: 10%)
    before = (tmp_path / "short" / "sweep.json").read_text()
    again = pareto.main(argv)["short"]
    assert again["computed"] == []
    assert json.loads(before)["points"] == json.loads((tmp_path / "short" / "sweep.json").read_text())["points"]
    assert {p["budget"] for p in json.loads((tmp_path / "pareto.json").read_text())["points"]} == {"short"}
