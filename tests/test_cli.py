"""The vitprune CLI: parsing, spec merging, exit codes (0 / 2 one line / 1 + --debug), no files left on
failure. The API it calls is faked where only the CLI's own behaviour is tested; the end-to-end tests
at the bottom run the real API and are skipped only while ``vitprune.api`` is not importable."""
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
import types

import pytest
import timm
import torch

from conftest import assert_bad_input, files_under, run_cli as run
from vitprune import api as vitprune_api, cli, commands
from vitprune.deploy import outputs
from vitprune.errors import InputError, OutputError, PlanError
from vitprune.deploy.outputs import (Interrupted, OutputSet, file_mode, output_paths, signals_deferred,
                              termination_as_interrupt)
from vitprune.report import CompressReport, CompressResult
from vitprune.spec import CompressSpec, options

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEIT = "timm:deit_tiny_patch16_224"
TINY = "timm:test_vit"  # timm's own tiny ViT, for tests where the API is faked


@pytest.fixture
def fake_api(monkeypatch):
    """A stand-in vitprune.api recording its calls; set .fail to make a stage raise, .stages for the
    stage reports its result carries. Its report is built by the real CompressReport, so the summary
    reads the same shape from the fake as from the pipeline."""
    calls = {}
    api = types.ModuleType("vitprune.api")
    api.fail = {}
    api.stages = {"width": {"notes": []}}

    def compress(model, spec, *, example_input_size, source, calib_data=None, train_data=None, val_data=None):
        calls["compress"] = dict(model=model, spec=spec, size=example_input_size, source=source,
                                 calib_data=calib_data)
        if "compress" in api.fail:
            raise api.fail["compress"]
        report = CompressReport(method=spec.method, spec=spec.to_dict(), input_size=example_input_size,
                                flops_before=2_000_000_000, flops_after=1_000_000_000, params_before=5_000_000,
                                params_after=2_500_000, stages=api.stages, groups=[], unsupported_ops=[])
        return CompressResult(model, report.to_dict(), source=source, input_size=example_input_size)

    def write_outputs(result, prefix, export=True, opset=17):
        """The real commit protocol (vitprune.deploy.outputs) around stand-in file contents."""
        calls["write"] = dict(prefix=prefix, export=export, opset=opset)
        files, stale = output_paths(prefix, export)
        with OutputSet(files, stale=stale) as out:
            for kind in files:
                with open(out.path(kind), "w") as f:
                    f.write("x")
            if "write" in api.fail:
                raise api.fail["write"]
            out.commit()
        return files

    def inspect_model(model, size):
        calls["inspect"] = dict(model=model, size=size)
        return {"groups": [{"name": "residual", "size": 192}]}

    api.compress, api.write_outputs, api.inspect_model = compress, write_outputs, inspect_model
    api.check_input_size = lambda model, size: calls.setdefault("check_input_size", size)
    api.format_inspect = lambda d: "GROUPS: " + ", ".join(g["name"] for g in d["groups"])
    api.calls = calls
    monkeypatch.setattr(commands, "api", api)
    return api


@pytest.fixture
def tiny_sd(tmp_path):
    m = timm.create_model("test_vit", pretrained=False)
    p = tmp_path / "in" / "tiny.pth"
    p.parent.mkdir()
    torch.save(m.state_dict(), p)
    return p


# ------------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize("cmd", [[], ["compress"], ["inspect"], ["export"], ["bench"]])
def test_help(capsys, cmd):
    rc, out, _ = run(capsys, *cmd, "--help")
    assert rc == 0 and "usage: vitprune" in out


def test_help_lists_flags(capsys):
    _, out, _ = run(capsys, "compress", "--help")
    for flag in ("--arch", "--trust-pickle", "--img-size", "--num-classes", "--spec", "--target-flops",
                 "--importance", "--ranking", "--round-to", "--no-residual", "--no-mlp", "--no-heads",
                 "--no-head-dim", "--min-keep", "--calib-batches", "--batch-size", "--seed", "--out",
                 "--no-export", "--opset"):
        assert flag in out


@pytest.mark.parametrize(
    "argv,needle",
    [
        ([], "COMMAND"),
        (["frobnicate"], "frobnicate"),
        (["compress", DEIT], "--out"),
        (["compress", DEIT, "--out", "x", "--importance", "fisher"], "fisher"),
        (["compress", DEIT, "--out", "x", "--target-flops", "half"], "half"),
        (["compress", DEIT, "--out", "x", "--img-size", "0"], "--img-size"),
        (["inspect", DEIT, "--bogus"], "--bogus"),
        (["bench", "a.onnx", "--batch", "1,x"], "--batch"),
        (["bench"], "ONNX"),
    ],
)
def test_usage_errors_exit_2_one_line(capsys, tmp_path, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run(capsys, *argv)
    assert_bad_input(rc, err, needle)
    assert files_under(tmp_path) == []


def _spec(argv):
    return commands.spec_from_args(cli.build_parser().parse_args(["compress", DEIT, "--out", "o", *argv]))


def test_spec_defaults_without_flags():
    assert _spec([]) == CompressSpec()


def test_flags_build_spec():
    s = _spec(["--target-flops", "0.5", "--importance", "taylor", "--ranking", "uniform", "--round-to", "8",
               "--no-residual", "--no-mlp", "--no-heads", "--no-head-dim", "--min-keep", "0.2",
               "--calib-batches", "2", "--batch-size", "4", "--seed", "7"])
    assert s == CompressSpec(target_flops=0.5, importance="taylor", ranking="uniform", round_to=8,
                             prune_residual=False, prune_mlp=False, prune_heads=False, prune_head_dim=False,
                             min_keep=0.2, calib_batches=2, batch_size=4, seed=7)


def test_flags_override_spec_file_and_absent_flags_do_not(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("target_flops: 0.4\nimportance: taylor\nprune_mlp: false\nround_to: 32\nseed: 3\n")
    s = _spec(["--spec", str(p), "--target-flops", "0.6", "--round-to", "8"])
    assert s.target_flops == 0.6 and s.round_to == 8  # flags win
    assert s.importance == "taylor" and s.prune_mlp is False and s.seed == 3  # file kept where no flag


def test_every_spec_field_is_a_flag_or_says_why_not(capsys):
    """A field added to CompressSpec becomes a flag (or is marked cli=False with its reason): the
    help lists every flag with its choices, and the parser sets the field it names."""
    _, out, _ = run(capsys, "compress", "--help")
    parser_dests = set(vars(cli.build_parser().parse_args(["compress", DEIT, "--out", "o"])))
    for name, option in options().items():
        if not option.cli:
            assert option.help and name not in parser_dests
            continue
        flag = option.flag_for(name)
        assert f"  {flag}" in out and name in parser_dests, flag
        if option.choices:
            assert f"{flag} {{{','.join(option.choices)}}}" in out
    assert [n for n, o in options().items() if not o.cli] == ["input_size"]


def test_every_flag_reaches_its_field():
    """One value per flag (not the default), each read the way its field says."""
    s = _spec(["--method", "boundarydpt+", "--remove-attention", "0,3", "--remove-activation", "2",
               "--attention-variant", "drop", "--merge", "never", "--fold-norm", "--depth-selection", "search",
               "--depth-share", "0.3", "--tokens", "keep=0.5,start=2", "--epochs", "2",
               "--lr", "0.01", "--search-steps", "5", "--head-dim-policy", "shrink"])
    assert s == CompressSpec(method="boundarydpt+", remove_attention=[0, 3], remove_activation=[2],
                             attention_variant="drop", merge="never", fold_norm=True, depth_selection="search",
                             depth_share=0.3, tokens="keep=0.5,start=2", epochs=2, lr=0.01, search_steps=5,
                             head_dim_policy="shrink")
    assert _spec(["--method", "cpvit", "--prune-heads", "0.75"]).prune_heads_cpvit == 0.75
    s = _spec(["--target-flops", "0.5", "--cost", "latency", "--latency-threads", "3"])
    assert (s.cost, s.latency_threads) == ("latency", 3)
    assert _spec(["--target-latency", "0.5"]).target_latency == 0.5


def test_help_shows_the_spec_defaults(capsys):
    _, out, _ = run(capsys, "compress", "--help")
    text = " ".join(out.split())
    assert "(default 32)" in text and "(default identity_norm)" in text and "(default 0.0005)" in text


@pytest.mark.parametrize("text,needle", [("0,x", "comma-separated block indices like 0,3,7"),
                                         ("1,-2", "block indices must be >= 0")])
def test_bad_block_list_is_a_usage_error(capsys, tmp_path, text, needle):
    rc, _, err = run(capsys, "compress", DEIT, "--remove-attention", text, "--out", tmp_path / "m")
    assert_bad_input(rc, err, "--remove-attention", needle)


def test_a_target_flag_replaces_the_file_target_of_either_kind(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("target_latency: 0.5\n")
    assert _spec(["--spec", str(p)]).target_latency == 0.5
    s = _spec(["--spec", str(p), "--target-flops", "0.6"])
    assert (s.target_flops, s.target_latency) == (0.6, None)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("target", ["0", "-0.5", "1.5", "nan"])
def test_target_outside_range(capsys, tmp_path, fake_api, target):
    out = tmp_path / "out" / "m"
    rc, _, err = run(capsys, "compress", DEIT, "--target-flops", target, "--out", out)
    assert_bad_input(rc, err, "target_flops", "(0, 1]")
    assert files_under(tmp_path) == [] and "compress" not in fake_api.calls


def _bad_compress(capsys, tmp_path, model, *extra):
    rc, _, err = run(capsys, "compress", model, "--out", tmp_path / "out" / "m", *extra)
    assert not (tmp_path / "out").exists()
    return rc, err


def test_empty_file(capsys, tmp_path, fake_api):
    p = tmp_path / "empty.pth"
    p.write_bytes(b"")
    rc, err = _bad_compress(capsys, tmp_path, p, "--arch", "test_vit")
    assert_bad_input(rc, err, "empty.pth", "not a PyTorch checkpoint")
    assert files_under(tmp_path) == ["empty.pth"]


def test_corrupt_file(capsys, tmp_path, fake_api):
    p = tmp_path / "rand.pth"
    p.write_bytes(os.urandom(2048))
    rc, err = _bad_compress(capsys, tmp_path, p, "--arch", "test_vit")
    assert_bad_input(rc, err, "rand.pth", "not a PyTorch checkpoint")
    assert files_under(tmp_path) == ["rand.pth"]


def test_missing_file(capsys, tmp_path, fake_api):
    rc, err = _bad_compress(capsys, tmp_path, tmp_path / "nope.pth")
    assert_bad_input(rc, err, "does not exist")


def test_unknown_arch(capsys, tmp_path, fake_api):
    rc, err = _bad_compress(capsys, tmp_path, "timm:deit_tinyy")
    assert_bad_input(rc, err, "deit_tinyy", "deit_tiny_patch16_224")
    assert files_under(tmp_path) == []


def test_state_dict_without_arch(capsys, tmp_path, fake_api, tiny_sd):
    rc, err = _bad_compress(capsys, tmp_path, tiny_sd)
    assert_bad_input(rc, err, "--arch")
    assert files_under(tmp_path) == ["in/tiny.pth"]


def test_pickled_module_without_trust(capsys, tmp_path, fake_api):
    p = tmp_path / "whole.pt"
    torch.save(timm.create_model("test_vit", pretrained=False), p)
    rc, err = _bad_compress(capsys, tmp_path, p)
    assert_bad_input(rc, err, "--trust-pickle", "arbitrary code")
    assert files_under(tmp_path) == ["whole.pt"] and "compress" not in fake_api.calls
    rc, out, err = run(capsys, "inspect", p, "--trust-pickle")
    assert rc == 0 and err == "" and "GROUPS: residual" in out
    assert fake_api.calls["inspect"]["size"] == (3, 160, 160)


@pytest.mark.parametrize("text,needle", [("target_flop: 0.5\n", "target_flop"),
                                         ("target_flops: 2\n", "target_flops"),
                                         ("importance: fisher\n", "fisher"),
                                         ("round_to: [\n", "not valid YAML")])
def test_bad_spec_file(capsys, tmp_path, fake_api, text, needle):
    p = tmp_path / "spec.yaml"
    p.write_text(text)
    rc, err = _bad_compress(capsys, tmp_path, DEIT, "--spec", p)
    assert_bad_input(rc, err, needle, "spec.yaml")
    assert files_under(tmp_path) == ["spec.yaml"]


def test_out_must_be_a_prefix(capsys, tmp_path, fake_api):
    rc, _, err = run(capsys, "compress", DEIT, "--out", tmp_path)
    assert_bad_input(rc, err, "prefix")


def test_api_error_leaves_nothing(capsys, tmp_path, fake_api):
    fake_api.fail["compress"] = PlanError("target 0.01 is below\nwhat the floors allow (0.12)")
    rc, err = _bad_compress(capsys, tmp_path, TINY, "--img-size", "32", "--target-flops", "0.5")
    assert_bad_input(rc, err, "below what the floors allow")
    assert files_under(tmp_path) == [] and "write" not in fake_api.calls


def test_write_failure_removes_the_new_folder(capsys, tmp_path, fake_api):
    fake_api.fail["write"] = OSError(28, "No space left on device")  # the environment: exit 2
    rc, err = _bad_compress(capsys, tmp_path, TINY, "--img-size", "32")
    assert_bad_input(rc, err, "No space left", "left as they were")
    assert files_under(tmp_path) == [] and os.listdir(tmp_path) == []
    fake_api.fail["write"] = RuntimeError("kaboom")  # a bug: exit 1, still nothing left
    rc, err = _bad_compress(capsys, tmp_path, TINY, "--img-size", "32")
    assert rc == 1 and "kaboom" in err and "--debug" in err and len(err.splitlines()) == 1
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------ exit codes
def test_internal_error_exit_1_and_debug_reraises(capsys, monkeypatch):
    def boom(args):
        raise RuntimeError("kaboom\nsecond line")

    monkeypatch.setitem(commands.COMMANDS, "inspect", boom)
    rc, out, err = run(capsys, "inspect", DEIT)
    assert rc == 1 and out == ""
    assert err.splitlines() == ["vitprune: error: internal error: RuntimeError: kaboom second line "
                                "(rerun with --debug for the traceback)"]
    for argv in (["--debug", "inspect", DEIT], ["inspect", DEIT, "--debug"]):
        with pytest.raises(RuntimeError, match="kaboom"):
            cli.main(argv)


def test_vitprune_error_is_one_line(capsys, monkeypatch):
    def bad(args):
        raise InputError("first\n  second\n\nthird")

    monkeypatch.setitem(commands.COMMANDS, "inspect", bad)
    rc, _, err = run(capsys, "inspect", DEIT)
    assert rc == 2 and err == "vitprune: error: first second third\n"


def test_console_script_process(tmp_path):
    """A real process: exit status and stderr as a user sees them."""
    p = tmp_path / "empty.pth"
    p.write_bytes(b"")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "vitprune.cli", "inspect", str(p), "--arch", "test_vit"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("vitprune: error: ")


# ------------------------------------------------------------------------------------------ commands (fake API)
def test_compress_calls_api_and_prints_summary(capsys, tmp_path, fake_api, tiny_sd):
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps({"target_flops": 0.4, "importance": "taylor"}))
    out = tmp_path / "new" / "deeper" / "m"
    rc, stdout, err = run(capsys, "compress", tiny_sd, "--arch", "test_vit", "--spec", spec,
                          "--target-flops", "0.5", "--no-heads", "--opset", "18", "--out", out)
    assert rc == 0 and err == ""
    c = fake_api.calls["compress"]
    assert c["spec"] == CompressSpec(target_flops=0.5, importance="taylor", prune_heads=False)
    assert c["size"] == (3, 160, 160)
    assert c["source"] == {"kind": "timm", "arch": "test_vit", "kwargs": {}}
    assert fake_api.calls["write"] == dict(prefix=str(out), export=True, opset=18)
    assert "FLOPs: 2G -> 1G (0.500 of original)" in stdout and "params: 5M -> 2.5M" in stdout
    assert f"{out}.onnx" in stdout
    assert files_under(tmp_path / "new") == ["deeper/m.json", "deeper/m.onnx", "deeper/m.pt2"]


def test_summary_prints_the_planners_notes(capsys, tmp_path, fake_api):
    fake_api.stages = {"depth": {"attention": [1], "activation": [], "selection": "one_shot",
                                 "scored_on": "random images labelled by the model itself"},
                       "width": {"notes": ["round_to 16 could not be met for blocks.0.mlp"]}}
    rc, stdout, err = run(capsys, "compress", TINY, "--img-size", "32", "--method", "boundarydpt+",
                          "--target-flops", "0.5", "--out", tmp_path / "m")
    assert rc == 0, err
    notes = [line for line in stdout.splitlines() if line.startswith("note: ")]
    assert notes == ["note: round_to 16 could not be met for blocks.0.mlp",
                     "note: depth layers were chosen on random images labelled by the model itself; "
                     "--data DIR scores them on real images"]
    assert "target FLOPs ratio: 0.5" in stdout


def test_summary_has_no_random_images_note_when_depth_used_data(capsys, tmp_path, fake_api):
    fake_api.stages = {"depth": {"attention": [1], "activation": [], "selection": "one_shot",
                                 "scored_on": "calibration data"}}
    rc, stdout, _ = run(capsys, "compress", TINY, "--img-size", "32", "--method", "boundarydpt",
                        "--target-flops", "0.5", "--out", tmp_path / "m")
    assert rc == 0 and "note:" not in stdout


def test_compress_no_export_img_size_and_suffix(capsys, tmp_path, fake_api):
    rc, _, _ = run(capsys, "compress", TINY, "--img-size", "32", "--no-export", "--out", tmp_path / "m.onnx")
    assert rc == 0
    assert fake_api.calls["write"] == dict(prefix=str(tmp_path / "m"), export=False, opset=18)
    assert fake_api.calls["compress"]["size"] == (3, 32, 32)
    assert fake_api.calls["compress"]["source"]["kwargs"] == {"img_size": 32}


def test_spec_input_size_used_when_no_img_size(capsys, tmp_path, fake_api):
    p = tmp_path / "s.json"
    p.write_text('{"input_size": [3, 224, 224]}')
    run(capsys, "compress", TINY, "--spec", p, "--out", tmp_path / "a")
    assert fake_api.calls["compress"]["size"] == (3, 224, 224)


def test_inspect_json(capsys, fake_api):
    rc, out, _ = run(capsys, "inspect", TINY, "--img-size", "32", "--json")
    assert rc == 0 and json.loads(out) == {"groups": [{"name": "residual", "size": 192}]}
    assert fake_api.calls["inspect"]["size"] == (3, 32, 32)


def test_export_calls_export_onnx(capsys, tmp_path, monkeypatch):
    seen = {}

    def export_onnx(model, example_input, path, *, opset=17, dynamic_batch=True, parity_batches=(1, 4),
                    atol=1e-4):
        seen.update(shape=tuple(example_input.shape), path=path, opset=opset)
        with open(path, "w") as f:  # staged beside the final file, moved there after
            f.write("onnx")
        return {"max_abs_err": 1e-6}

    monkeypatch.setattr(vitprune_api, "export_onnx", export_onnx)
    monkeypatch.setattr(vitprune_api, "check_opset", lambda opset, name="opset": opset)
    out = tmp_path / "m.onnx"
    rc, stdout, err = run(capsys, "export", TINY, "--img-size", "32", "--out", out, "--opset", "18")
    assert rc == 0, err
    assert rc == 0 and seen.pop("path") != str(out) and seen == dict(shape=(1, 3, 32, 32), opset=18)
    assert "max_abs_err" in stdout and out.read_text() == "onnx" and os.listdir(tmp_path) == ["m.onnx"]
    rc, _, err = run(capsys, "export", TINY, "--out", tmp_path / "m.pt")
    assert_bad_input(rc, err, ".onnx")


def test_bench_calls_compare(capsys, tmp_path, monkeypatch):
    seen = {}
    mod = types.ModuleType("vitprune.deploy.bench")
    mod.compare = lambda paths, **kw: seen.update(paths=paths, **kw) or [{"row": 1}]
    mod.format_table = lambda rows: f"TABLE {rows}"
    monkeypatch.setattr(commands, "bench", mod)
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    a.write_bytes(b"x")
    b.write_bytes(b"x")
    rc, out, _ = run(capsys, "bench", a, b, "--batch", "1,4", "--threads", "2", "--runs", "3", "--warmup", "0")
    assert rc == 0 and out.strip() == "TABLE [{'row': 1}]"
    assert seen == dict(paths=[str(a), str(b)], batch_sizes=[1, 4], threads=[2], runs=3, warmup=0)
    rc, _, err = run(capsys, "bench", tmp_path / "missing.onnx")
    assert_bad_input(rc, err, "missing.onnx")


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture
def real_api():
    return pytest.importorskip("vitprune.api")


def test_e2e_compress_writes_three_files(capsys, tmp_path, real_api):
    out = tmp_path / "out" / "m"
    rc, stdout, err = run(capsys, "compress", DEIT, "--img-size", "64", "--target-flops", "0.5",
                          "--calib-batches", "1", "--batch-size", "2", "--out", out)
    assert rc == 0, err
    assert files_under(tmp_path) == ["out/m.json", "out/m.onnx", "out/m.pt2"]
    report = CompressReport.from_dict(json.loads((tmp_path / "out" / "m.json").read_text()))
    assert report.onnx["path"] == f"{out}.onnx" and report.spec["target_flops"] == 0.5
    assert "FLOPs: " in stdout and f"({report.flops_ratio:.3f} of original)" in stdout


def test_e2e_depth_on_random_images_says_so(capsys, tmp_path, real_api):
    """The real pipeline's depth report carries what the summary's note looks for."""
    rc, stdout, err = run(capsys, "compress", TINY, "--img-size", "32", "--method", "boundarydpt",
                          "--target-flops", "0.8", "--no-export", "--out", tmp_path / "m")
    assert rc == 0, err
    report = CompressReport.from_dict(json.loads((tmp_path / "m.json").read_text()))
    assert report.depth_scored_on_random_images and report.method == "boundarydpt"
    assert "note: depth layers were chosen on random images" in stdout


def test_e2e_inspect_prints_groups(capsys, real_api):
    rc, out, err = run(capsys, "inspect", DEIT, "--img-size", "64")
    assert rc == 0, err
    assert "group" in out.lower() and "192" in out


def test_e2e_non_vit_refused(capsys, tmp_path, real_api):
    rc, err = _bad_compress(capsys, tmp_path, "timm:resnet18", "--target-flops", "0.5")
    assert_bad_input(rc, err)
    assert files_under(tmp_path) == []


def test_e2e_trusted_pickle_inspects(capsys, tmp_path, real_api):
    p = tmp_path / "whole.pt"
    torch.save(timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=64), p)
    rc, out, err = run(capsys, "inspect", p, "--trust-pickle")
    assert rc == 0, err
    assert "group" in out.lower()


def test_e2e_no_export_removes_a_stale_onnx(capsys, tmp_path, real_api):
    """--no-export onto a prefix with an older PREFIX.onnx: the set on disk is one model's, and the
    files get the umask's mode (the exporter's temp files are 0600)."""
    out = tmp_path / "m"
    for ext in ("onnx", "pt2", "json"):
        (tmp_path / f"m.{ext}").write_text("another model")
    rc, stdout, err = run(capsys, "compress", TINY, "--img-size", "32", "--target-flops", "0.5", "--no-export",
                          "--out", out)
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path)) == ["m.json", "m.pt2"]
    assert f"removed {out}.onnx" in stdout
    assert all((tmp_path / f).stat().st_mode & 0o777 == file_mode() for f in os.listdir(tmp_path))


# ------------------------------------------------------------------------------------------ outputs
def _old_set(folder):
    folder.mkdir(exist_ok=True)
    for ext in ("onnx", "pt2", "json"):
        (folder / f"m.{ext}").write_text(f"old {ext}")
    return {f"m.{ext}": f"old {ext}" for ext in ("onnx", "pt2", "json")}


def _contents(folder):
    """Every entry of ``folder``: a file's text, or "folder"."""
    return {p.name: "folder" if p.is_dir() else p.read_text() for p in folder.iterdir()}


def _stage_new(out, kinds):
    for kind in kinds:
        with open(out.path(kind), "w") as f:
            f.write(f"new {kind}")


def test_output_set_swaps_all_and_removes_stale(tmp_path):
    old = _old_set(tmp_path)
    files, stale = output_paths(tmp_path / "m", export=False)
    with OutputSet(files, stale=stale) as out:
        _stage_new(out, files)
        staged = _contents(tmp_path)
        out.commit()
    assert {k: v for k, v in staged.items() if not k.startswith(".")} == old  # nothing visible before
    assert _contents(tmp_path) == {"m.pt2": "new pt2", "m.json": "new json"}


def test_output_set_rolls_back_a_failed_rename(tmp_path, monkeypatch):
    """The second rename fails: the first new file is taken back and every old file restored."""
    old = _old_set(tmp_path)
    files, stale = output_paths(tmp_path / "m")
    real_replace, staged_moves = os.replace, []

    def replace(src, dst):
        if os.path.dirname(dst) == str(tmp_path) and ".vitprune-" in src and "/.old/" not in src:
            staged_moves.append(dst)
            if len(staged_moves) == 2:
                raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", replace)
    with pytest.raises(OutputError, match="left as they were"):
        with OutputSet(files, stale=stale) as out:
            _stage_new(out, files)
            out.commit()
    assert _contents(tmp_path) == old and len(staged_moves) == 2


def test_output_set_keeps_old_files_it_could_not_restore(tmp_path, monkeypatch):
    """Rename in fails, and so does putting an old file back: the old files stay in the staging
    folder, which the error names, instead of being deleted with it."""
    old = _old_set(tmp_path)
    files, stale = output_paths(tmp_path / "m")
    real_replace = os.replace

    def replace(src, dst):
        if "/.old/" in os.fspath(src) or (".vitprune-" in os.fspath(src) and os.fspath(dst).endswith(".pt2")):
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", replace)
    with pytest.raises(OutputError, match="restoring the old files failed too") as e:
        with OutputSet(files, stale=stale) as out:
            _stage_new(out, files)
            out.commit()
    staging = str(e.value).rsplit("the old files are in ", 1)[1]
    monkeypatch.undo()
    kept = {n: (tmp_path / staging / ".old" / n).read_text() for n in os.listdir(os.path.join(staging, ".old"))}
    assert kept == old


@pytest.mark.parametrize("error", [RuntimeError("bug"), KeyboardInterrupt()])
def test_output_set_failure_leaves_nothing(tmp_path, error):
    old = _old_set(tmp_path / "old")
    for folder, expect in ((tmp_path / "old", old), (tmp_path / "new" / "deeper", None)):
        files, stale = output_paths(folder / "m")
        with pytest.raises(type(error)):
            with OutputSet(files, stale=stale) as out:
                _stage_new(out, ["onnx"])
                raise error
        assert (_contents(folder) == expect) if expect else not (tmp_path / "new").exists()


def test_output_set_modes_follow_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        with OutputSet({"onnx": tmp_path / "m.onnx"}) as out:
            fd = os.open(out.path("onnx"), os.O_CREAT | os.O_WRONLY, 0o600)  # as tempfile.mkstemp makes it
            os.close(fd)
            out.commit()
        assert file_mode() == 0o640
    finally:
        os.umask(previous)
    assert (tmp_path / "m.onnx").stat().st_mode & 0o777 == 0o640


def test_signals_are_deferred_then_delivered():
    got = []
    with termination_as_interrupt():
        with pytest.raises(Interrupted) as e:
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                got.append("block finished")
        assert e.value.signum == signal.SIGTERM and got == ["block finished"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


# ------------------------------------------------------------------------------------------ signals
# A real process, stopped by a signal at a chosen point of a compress run: the driver wraps one
# function so that it announces the point (a marker file) and then waits there for the signal.
_DRIVER = """
import os, sys, time
import vitprune.api, vitprune.deploy.onnx, vitprune.frontend.load, vitprune.deploy.outputs
from vitprune import cli, commands

point, argv = sys.argv[1], sys.argv[2:]
module, name = {"load": (commands, "load_model"), "compress": (vitprune.api, "compress"),
                "onnx_written": (vitprune.deploy.onnx, "_check_proto"), "pt2": (vitprune.api, "write_pt2"),
                "swap": (vitprune.deploy.outputs, "_swap")}[point]
original = getattr(module, name)

def at_the_point(*args, **kwargs):
    open(os.environ["MARK"], "w").close()
    end = time.monotonic() + float(os.environ["HOLD"])
    while time.monotonic() < end:
        time.sleep(0.02)
    return original(*args, **kwargs)

setattr(module, name, at_the_point)
sys.exit(cli.main(argv))
"""

# (id, point, signal, where the outputs go: over an older set, or into a folder the run creates)
SIGNAL_CASES = [
    ("term_at_load", "load", "SIGTERM", "old"),
    ("term_in_compress", "compress", "SIGTERM", "new"),
    ("term_while_onnx_is_written", "onnx_written", "SIGTERM", "old"),
    ("term_while_pt2_is_written", "pt2", "SIGTERM", "new"),
    ("term_during_swap", "swap", "SIGTERM", "old"),
    ("int_in_compress", "compress", "SIGINT", "old"),
    ("int_while_onnx_is_written", "onnx_written", "SIGINT", "new"),
    ("hup_while_onnx_is_written", "onnx_written", "SIGHUP", "old"),
]


def _signal_run(root, case):
    name, point, sig, where = case
    work = root / name
    work.mkdir()
    old = _old_set(work / "out") if where == "old" else None
    out = work / "out" / "m" if where == "old" else work / "new" / "deeper" / "m"
    mark = work / "mark"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), MARK=str(mark),
               HOLD="2" if point == "swap" else "300")  # the swap holds signals: it must end by itself
    p = subprocess.Popen([sys.executable, "-c", _DRIVER, point, "compress", TINY, "--img-size", "32",
                          "--target-flops", "0.5", "--out", str(out)], cwd=work, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not mark.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    staged = [e for e in os.listdir(out.parent) if ".vitprune-" in e] if out.parent.exists() else []
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=600)
    return dict(rc=p.returncode, err=err, old=old, work=work, staged_when_signalled=staged)


@pytest.fixture(scope="module")
def signal_runs(tmp_path_factory):
    """All scenarios at once, three processes at a time (each spends most of its time importing)."""
    root = tmp_path_factory.mktemp("signals")
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        runs = pool.map(lambda c: _signal_run(root, c), SIGNAL_CASES)
        return {c[0]: r for c, r in zip(SIGNAL_CASES, runs)}


@pytest.mark.parametrize("case", SIGNAL_CASES, ids=[c[0] for c in SIGNAL_CASES])
def test_signal_leaves_old_outputs_or_none(signal_runs, case):
    name, point, sig, where = case
    r = signal_runs[name]
    signum = getattr(signal, sig)
    assert r["rc"] == 128 + signum, r["err"]
    assert r["err"] == f"vitprune: interrupted by {sig}\n"
    if point in ("onnx_written", "pt2", "swap"):
        assert r["staged_when_signalled"], "the signal was meant to land while files were staged"
    left = files_under(r["work"])
    assert not [f for f in left if ".vitprune-" in f or f.endswith(".tmp")], left
    if where == "new":
        assert left == ["mark"] and not (r["work"] / "new").exists()
    elif point == "swap":  # signals wait for the swap: the complete new set, then the exit
        assert {f: (r["work"] / "out" / f).read_text(errors="replace")[:3] != "old" for f in r["old"]} == \
               {f: True for f in r["old"]}
    else:
        assert _contents(r["work"] / "out") == r["old"]


def test_closed_stdout_ends_quietly(tmp_path):
    """`vitprune inspect ... | head -0`: the reader is gone; exit 141 (128 + SIGPIPE), no traceback."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-m", "vitprune.cli", "inspect", TINY, "--img-size", "32"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, env=env)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 141 and err == ""


def test_bench_warns_when_inputs_differ(capsys, tmp_path):
    """Speedups of models that take different input sizes compare different work: say so."""
    import onnx
    from onnx import TensorProto, helper

    for name, side in (("a.onnx", 4), ("b.onnx", 8)):
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, side, side])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, side, side])])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / name))
    rc, out, err = run(capsys, "bench", tmp_path / "a.onnx", tmp_path / "b.onnx", "--batch", "1", "--runs", "2",
                       "--warmup", "0")
    assert rc == 0 and "speedup" in out
    assert err.splitlines() == [f"vitprune: warning: the models take inputs of different sizes ({tmp_path}/a.onnx "
                                f"3x4x4, {tmp_path}/b.onnx 3x8x8): their speedups compare different amounts of work"]


def test_a_bad_spec_fails_before_the_model_is_loaded(capsys, tmp_path):
    """The whole spec, --tokens included, is checked before the (slow) load: the model named here
    does not even exist, and the error is about the spec."""
    rc, _, err = run(capsys, "compress", "timm:no_such_model_xyz", "--tokens", "keep=abc,start=2",
                     "--out", tmp_path / "m")
    assert_bad_input(rc, err, "keep")
    assert "no_such_model_xyz" not in err and files_under(tmp_path) == []
