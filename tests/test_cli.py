"""The vitprune CLI: parsing, spec merging, exit codes (0 / 2 one line / 1 + --debug), no files left on
failure. The API it calls is faked where only the CLI's own behaviour is tested; the end-to-end tests
at the bottom run the real API and are skipped only while ``vitprune.api`` is not importable."""
import json
import os
import subprocess
import sys
import types

import pytest
import timm
import torch

import vitprune
from vitprune import cli
from vitprune.errors import InputError, PlanError
from vitprune.spec import CompressSpec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEIT = "timm:deit_tiny_patch16_224"
TINY = "timm:test_vit"  # timm's own tiny ViT, for tests where the API is faked


def run(capsys, *argv):
    """main(argv) -> (exit code, stdout, stderr)."""
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def files_under(path):
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


def assert_bad_input(rc, err, *needles):
    assert rc == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("vitprune: error: ")
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def fake_api(monkeypatch):
    """A stand-in vitprune.api recording its calls; set .fail to make a stage raise."""
    calls = {}
    api = types.ModuleType("vitprune.api")
    api.fail = {}

    def compress(model, spec, *, example_input_size, source, calib_data=None, train_data=None, val_data=None):
        calls["compress"] = dict(model=model, spec=spec, size=example_input_size, source=source,
                                 calib_data=calib_data)
        if "compress" in api.fail:
            raise api.fail["compress"]
        report = {"flops": {"before": 2.0e9, "after": 1.0e9}, "params": {"before": 5.0e6, "after": 2.5e6}}
        return types.SimpleNamespace(model=model, report=report)

    def write_outputs(result, prefix, export=True, opset=17):
        calls["write"] = dict(prefix=prefix, export=export, opset=opset)
        if "write" in api.fail:
            raise api.fail["write"]
        paths = {}
        for ext in (["onnx"] if export else []) + ["pt2", "json"]:
            with open(f"{prefix}.{ext}", "w") as f:
                f.write("x")
            paths[ext] = f"{prefix}.{ext}"
        return paths

    def inspect_model(model, size):
        calls["inspect"] = dict(model=model, size=size)
        return {"groups": [{"name": "residual", "size": 192}]}

    api.compress, api.write_outputs, api.inspect_model = compress, write_outputs, inspect_model
    api.format_inspect = lambda d: "GROUPS: " + ", ".join(g["name"] for g in d["groups"])
    api.calls = calls
    monkeypatch.setitem(sys.modules, "vitprune.api", api)
    monkeypatch.setattr(vitprune, "api", api, raising=False)
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
    return cli.spec_from_args(cli.build_parser().parse_args(["compress", DEIT, "--out", "o", *argv]))


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
    fake_api.fail["write"] = OSError("disk full")
    rc, err = _bad_compress(capsys, tmp_path, TINY, "--img-size", "32")
    assert rc == 1 and "disk full" in err and "--debug" in err and len(err.splitlines()) == 1
    assert files_under(tmp_path) == []


# ------------------------------------------------------------------------------------------ exit codes
def test_internal_error_exit_1_and_debug_reraises(capsys, monkeypatch):
    def boom(args):
        raise RuntimeError("kaboom\nsecond line")

    monkeypatch.setattr(cli, "cmd_inspect", boom)
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

    monkeypatch.setattr(cli, "cmd_inspect", bad)
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
    mod = types.ModuleType("vitprune.export")

    def export_onnx(model, example_input, path, *, opset=17, dynamic_batch=True, parity_batches=(1, 4),
                    atol=1e-4):
        seen.update(shape=tuple(example_input.shape), path=path, opset=opset)
        return {"max_abs_err": 1e-6}

    mod.export_onnx = export_onnx
    monkeypatch.setitem(sys.modules, "vitprune.export", mod)
    monkeypatch.setattr(vitprune, "export", mod, raising=False)
    out = tmp_path / "m.onnx"
    rc, stdout, _ = run(capsys, "export", TINY, "--img-size", "32", "--out", out, "--opset", "18")
    assert rc == 0 and seen == dict(shape=(1, 3, 32, 32), path=str(out), opset=18)
    assert "max_abs_err" in stdout
    rc, _, err = run(capsys, "export", TINY, "--out", tmp_path / "m.pt")
    assert_bad_input(rc, err, ".onnx")


def test_bench_calls_compare(capsys, tmp_path, monkeypatch):
    seen = {}
    mod = types.ModuleType("vitprune.bench")
    mod.compare = lambda paths, **kw: seen.update(paths=paths, **kw) or [{"row": 1}]
    mod.format_table = lambda rows: f"TABLE {rows}"
    monkeypatch.setitem(sys.modules, "vitprune.bench", mod)
    monkeypatch.setattr(vitprune, "bench", mod, raising=False)
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    a.write_bytes(b"x")
    b.write_bytes(b"x")
    rc, out, _ = run(capsys, "bench", a, b, "--batch", "1,4", "--threads", "2", "--runs", "3", "--warmup", "0")
    assert rc == 0 and out.strip() == "TABLE [{'row': 1}]"
    assert seen == dict(paths=[str(a), str(b)], batch_sizes=[1, 4], threads=2, runs=3, warmup=0)
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
    report = json.loads((tmp_path / "out" / "m.json").read_text())
    assert isinstance(report, dict) and report
    assert "FLOPs" in stdout


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
