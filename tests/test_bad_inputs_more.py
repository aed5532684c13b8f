"""Bad inputs, part 2 (issue 22): training data that means something else, checkpoints with several
weight sets, full disks, models refused for the wrong reason, other libraries' chatter, special
files, unwritable outputs, debris.

Same rules as ``test_bad_inputs.py``: a refusal is exit 2, one line ``vitprune: error: ...`` on
stderr (read at the file descriptor, so a library's progress bar would show), nothing on stdout,
and the folder exactly as it was. A case that used to pass silently (exit 0 with other data than
meant) now either refuses or says what happened in a ``note:`` line and in ``PREFIX.json``. The
full-disk cases write into a small tmpfs (skipped where it cannot be mounted).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import stat
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from vitprune import cli
from vitprune.errors import OutputError

TINY = ["timm:test_vit", "--img-size", "32"]
FAST = ["--target-flops", "0.7", "--no-export"]
TRAIN = ["--epochs", "1", "--batch-size", "4"]


# ------------------------------------------------------------------------------------------------ inputs
def _image(path, mode: str, size: int = 32, seed: int = 0) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    chans = {"L": 1, "RGB": 3, "RGBA": 4, "P": 1}[mode]
    a = np.random.default_rng(seed).integers(0, 255, (size, size, chans), dtype=np.uint8)
    img = Image.fromarray(a[..., 0], "L") if chans == 1 else Image.fromarray(a, mode)
    (img.convert("P") if mode == "P" else img).save(path)


def _folders(root) -> None:
    """Image folders: mixed modes with val/, no val/, val/ with a class train/ lacks, a broken and
    a truncated image."""
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            for i, mode in enumerate(("L", "RGB", "RGBA", "P")):
                _image(root / "mixed" / split / c / f"{i}.png", mode, seed=i)
    for c in ("cat", "dog"):
        for i in range(2):
            _image(root / "noval" / "train" / c / f"{i}.png", "RGB", seed=i)
            _image(root / "bad" / "train" / c / f"{i}.png", "RGB", seed=i)
            _image(root / "trunc" / "train" / c / f"{i}.png", "RGB", seed=i)
        _image(root / "mis" / "train" / c / "0.png", "RGB")
    for c in ("bird", "dog"):
        _image(root / "mis" / "val" / c / "0.png", "RGB")
    (root / "bad" / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    whole = (root / "trunc" / "train" / "dog" / "0.png").read_bytes()
    (root / "trunc" / "train" / "dog" / "0.png").write_bytes(whole[: len(whole) // 2])


def _models(root) -> None:
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", pretrained=False, img_size=32).eval()
    sd = vit.state_dict()
    torch.save(sd, root / "good.pth")
    torch.save({"model": sd, "state_dict_ema": {k: v * 0.5 for k, v in sd.items()}}, root / "two.pth")
    x = torch.randn(1, 3, 32, 32)
    torch.export.save(torch.export.export(vit, (x,)), root / "static.pt2")
    bounded = torch.export.Dim("b", min=1, max=8)
    torch.export.save(torch.export.export(vit, (torch.randn(2, 3, 32, 32),), dynamic_shapes=({0: bounded},)),
                      root / "bounded.pt2")
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 16, stride=16), torch.nn.Flatten(), torch.nn.Linear(32, 4))
    torch.export.save(torch.export.export(cnn.eval(), (x,)), root / "cnn_static.pt2")
    _hf_folders(root)


def _hf_folders(root) -> None:
    transformers = pytest.importorskip("transformers")
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    with contextlib.redirect_stderr(open(os.devnull, "w")):  # save_pretrained's own progress bar
        transformers.BertModel(transformers.BertConfig(vocab_size=100, **small)).save_pretrained(root / "bert")
        vit = transformers.ViTConfig(image_size=32, patch_size=16, num_labels=3, **small)
        transformers.ViTForImageClassification(vit).save_pretrained(root / "hfvit_bad")
    config = json.loads((root / "hfvit_bad" / "config.json").read_text())
    config["id2label"] = {str(i): f"c{i}" for i in range(5)}  # 5 classes in the config, 3 in the weights
    config["label2id"] = {f"c{i}": i for i in range(5)}
    (root / "hfvit_bad" / "config.json").write_text(json.dumps(config))


def _make_files(root) -> None:
    (root / "out").mkdir()
    for ext in ("onnx", "pt2", "json"):
        (root / "out" / f"m.{ext}").write_text(f"old {ext}")
    (root / "out" / "x.onnx").mkdir()
    (root / "a_file").write_text("x")
    (root / "sw_broken").mkdir()
    (root / "sw_broken" / "sweep.json").write_text("{broken")
    (root / "sw_other").mkdir()
    (root / "sw_other" / "sweep.json").write_text('{"format": "something-else"}')
    os.mkfifo(root / "fifo.pth")
    os.mkfifo(root / "fifo.yaml")
    os.mkfifo(root / "fifo.onnx")
    _folders(root)
    _models(root)


def snapshot(root) -> dict:
    """Every entry under ``root``: folders and special files by kind, files by size, mode, mtime, content."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(d, name), root)] = "dir"
        for name in files:
            p = os.path.join(d, name)
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode):
                out[os.path.relpath(p, root)] = ("special", st.st_mode)
                continue
            with open(p, "rb") as f:
                digest = hashlib.sha1(f.read()).hexdigest()
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mode, st.st_mtime_ns, digest)
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs_more")
    _make_files(root)
    return root


def _refused(capfd, argv, needles) -> str:
    """Run the CLI; assert exit 2, one error line holding every needle, nothing on stdout."""
    rc = cli.main(list(argv))
    out, err = capfd.readouterr()
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vitprune: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert out == ""
    return lines[0]


# (id, argv, words the one-line message must contain, what it was before issue 22)
CASES = [
    # -- 1. training data that silently meant something else
    ("val_classes_differ", ["compress", *TINY, *FAST, *TRAIN, "--data", "mis", "--out", "out/m"],
     ["mis/val", "bird", "mis/train", "matched by folder name"], "scored against the wrong labels, exit 0"),
    ("image_unreadable", ["compress", *TINY, *FAST, *TRAIN, "--data", "bad", "--out", "out/m"],
     ["bad/train/cat/broken.png", "--skip-bad-images"], "skipped without a word, exit 0"),
    ("image_unreadable_calibration", ["compress", *TINY, *FAST, "--importance", "taylor", "--data", "bad",
                                      "--out", "out/m"], ["bad/train/cat/broken.png"], "skipped, exit 0"),
    ("image_truncated", ["compress", *TINY, *FAST, *TRAIN, "--data", "trunc", "--out", "out/m"],
     ["trunc/train/dog/0.png", "cannot read image"], "skipped, exit 0"),
    ("skip_bad_without_data", ["compress", *TINY, *FAST, "--skip-bad-images", "--out", "out/m"],
     ["--skip-bad-images", "--data"], None),
    # -- 2. weight sets
    ("weights_key_absent", ["compress", "two.pth", "--arch", "test_vit", "--img-size", "32", *FAST,
                            "--weights-key", "ema", "--out", "out/m"], ["--weights-key 'ema'", "'state_dict_ema'"],
     None),
    ("weights_key_bare_state_dict", ["compress", "good.pth", "--arch", "test_vit", "--img-size", "32", *FAST,
                                     "--weights-key", "model", "--out", "out/m"], ["bare state dict"], None),
    ("weights_key_architecture", ["inspect", *TINY, "--weights-key", "model"], ["--weights-key", "drop"], None),
    # -- 4. valid models refused for the wrong reason
    ("pt2_static_batch", ["compress", "static.pt2", "--trust-pickle", *FAST, "--out", "out/m"],
     ["static.pt2", "fixed batch of 1", "dynamic_shapes"], "torch's guard text"),
    ("pt2_static_batch_export", ["export", "static.pt2", "--trust-pickle", "--out", "out/e.onnx"],
     ["fixed batch of 1"], "torch's guard text"),
    ("pt2_static_not_a_vit", ["compress", "cnn_static.pt2", "--trust-pickle", *FAST, "--out", "out/m"],
     ["no attention"], "a complaint about the batch"),
    ("pt2_static_not_a_vit_inspect", ["inspect", "cnn_static.pt2", "--trust-pickle"], ["no attention"],
     "a complaint about the batch"),
    ("hf_not_an_image_model", ["compress", "bert", *FAST, "--out", "out/m"], ["not an image model", "input_ids"],
     "pass --img-size"),
    # -- 5. other libraries' chatter (transformers' "Loading weights" bar around the error)
    ("hf_weights_do_not_fit", ["compress", "hfvit_bad", *FAST, "--out", "out/m"],
     ["does not fit ViTForImageClassification", "classifier.weight"], "a progress bar before the error line"),
    # -- 6. special files
    ("model_fifo", ["compress", "fifo.pth", "--arch", "test_vit", "--out", "out/m"], ["fifo.pth", "FIFO"],
     "blocked forever"),
    ("model_fifo_inspect", ["inspect", "fifo.pth", "--arch", "test_vit"], ["FIFO"], "blocked forever"),
    ("model_device", ["inspect", "/dev/null", "--arch", "test_vit"], ["/dev/null is a device"], None),
    ("spec_fifo", ["compress", *TINY, "--spec", "fifo.yaml", "--out", "out/m"], ["--spec fifo.yaml", "FIFO"],
     "blocked forever"),
    ("bench_fifo", ["bench", "fifo.onnx"], ["fifo.onnx", "FIFO"], "called it 'does not exist'"),
    # -- 7. odd states
    ("sweep_out_is_a_file", ["sweep", *TINY, "--data", "mixed", "--out", "a_file"], ["a_file is a file"],
     "exit 1, internal error"),
    ("sweep_state_corrupt", ["sweep", *TINY, "--data", "mixed", "--out", "sw_broken"],
     ["sw_broken/sweep.json", "not a readable sweep file"], "refused after creating onnx/"),
    ("sweep_state_other_format", ["sweep", *TINY, "--data", "mixed", "--out", "sw_other"],
     ["sw_other/sweep.json", "is not a vitprune-sweep file"], "refused after creating onnx/"),
    ("export_out_is_a_folder", ["export", *TINY, "--out", "out/x.onnx"], ["out/x.onnx is a folder"],
     "'must be a file name ending in .onnx'"),
]


def test_enough_cases():
    assert len(CASES) >= 20 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("argv,needles", [pytest.param(c[1], c[2], id=c[0]) for c in CASES])
def test_bad_input(workdir, monkeypatch, capfd, argv, needles):
    monkeypatch.chdir(workdir)
    before = snapshot(workdir)
    _refused(capfd, argv, needles)
    assert snapshot(workdir) == before


# ------------------------------------------------------------------------------------------------ said, not silent
def _ran(capfd, argv) -> tuple[str, dict]:
    """Run a compress that succeeds: exit 0, nothing on stderr; (stdout, PREFIX.json)."""
    rc = cli.main(list(argv))
    out, err = capfd.readouterr()
    assert rc == 0 and err == "", err
    prefix = argv[argv.index("--out") + 1]
    with open(prefix + ".json") as f:
        return out, json.load(f)


def _only_outputs(folder) -> list[str]:
    """The folder holds the outputs and nothing else (no staging folder, no temporary file)."""
    return sorted(os.listdir(folder))


def test_skipped_images_are_counted(workdir, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    out, report = _ran(capfd, ["compress", *TINY, *FAST, *TRAIN, "--data", str(workdir / "bad"),
                               "--skip-bad-images", "--out", "o/m"])
    assert "note: left out 1 unreadable image(s)" in out and "broken.png" in out
    assert report["inputs"]["skipped_images"] == 1
    assert report["inputs"]["skipped_examples"][0].endswith("bad/train/cat/broken.png")
    assert _only_outputs("o") == ["m.json", "m.pt2"]


def test_epochs_without_val_says_so(workdir, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    out, report = _ran(capfd, ["compress", *TINY, *FAST, *TRAIN, "--data", str(workdir / "noval"), "--out", "o/m"])
    assert "note: fine-tuned for 1 epoch(s) without validation data" in out
    assert "no top-1 accuracy is reported" in report["recovery"]["note"]
    assert report["recovery"]["best_top1"] is None


def test_grayscale_palette_rgba_images_train_and_validate(workdir, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    out, report = _ran(capfd, ["compress", *TINY, *FAST, *TRAIN, "--data", str(workdir / "mixed"), "--out", "o/m"])
    assert report["recovery"]["best_top1"] is not None and "without validation" not in out


def test_validation_labels_follow_the_training_folder_names(workdir, tmp_path):
    """val/ with a subset of train/'s classes: labels by name, not by position in val/."""
    from vitprune.train.finetune import folder_datasets

    for c in ("ant", "bee", "cat"):
        _image(tmp_path / "train" / c / "0.png", "RGB")
    _image(tmp_path / "val" / "cat" / "0.png", "RGB")
    train, val = folder_datasets(tmp_path, (3, 32, 32))
    assert train.class_to_idx == {"ant": 0, "bee": 1, "cat": 2}
    assert [label for _, label in val.samples] == [2]  # was 0: val/ alone sorts cat first


@pytest.mark.parametrize("key,used", [(None, "model"), ("state_dict_ema", "state_dict_ema")])
def test_weight_set_is_named(workdir, tmp_path, monkeypatch, capfd, key, used):
    monkeypatch.chdir(tmp_path)
    argv = ["compress", str(workdir / "two.pth"), "--arch", "test_vit", "--img-size", "32", *FAST, "--out", "o/m"]
    out, report = _ran(capfd, argv + (["--weights-key", key] if key else []))
    assert f"holds 2 weight sets; used {used!r}" in out
    assert report["inputs"]["weights_key"] == used
    assert report["inputs"]["weight_sets"] == ["model", "state_dict_ema"]


def test_pt2_with_a_bounded_batch_is_captured_again(workdir, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    out, _ = _ran(capfd, ["compress", str(workdir / "bounded.pt2"), "--trust-pickle", *FAST, "--out", "o/m"])
    assert "limits its batch to 1..8" in out
    model = torch.export.load("o/m.pt2").module()
    assert model(torch.randn(12, 3, 32, 32)).shape[0] == 12  # beyond the original's bound


# ------------------------------------------------------------------------------------------------ full disks
@pytest.fixture
def tmpfs(tmp_path):
    """A 4 MiB tmpfs, or a skip saying why there is none."""
    mount = tmp_path / "small"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a tmpfs here ({e})")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=20)


def _fill(mount, leave: int) -> None:
    """Fill the tmpfs so that only about ``leave`` bytes stay free."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(mount / ".filler")
    st = os.statvfs(mount)
    free = st.f_bavail * st.f_frsize
    with open(mount / ".filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def _old_set(folder) -> None:
    folder.mkdir(exist_ok=True)
    for ext in ("onnx", "pt2", "json"):
        (folder / f"m.{ext}").write_text(f"old {ext}")


@pytest.fixture(scope="module")
def pt2_size(tmp_path_factory) -> int:
    folder = tmp_path_factory.mktemp("pt2_size")
    assert cli.main(["compress", *TINY, *FAST, "--out", str(folder / "m")]) == 0
    return os.path.getsize(folder / "m.pt2")


@pytest.mark.parametrize("what", ["pt2", "onnx", "json", "export"])
def test_disk_full_while_writing(tmpfs, monkeypatch, capfd, pt2_size, what):
    """Every output write path: one line, exit 2, the old set kept (.pt2 was an abort: exit 134)."""
    _old_set(tmpfs / "out")
    monkeypatch.chdir(tmpfs)
    argv = {"pt2": ["compress", *TINY, *FAST, "--out", "out/m"],
            "onnx": ["compress", *TINY, "--target-flops", "0.7", "--out", "out/m"],
            "json": ["compress", *TINY, *FAST, "--out", "out/m"],
            "export": ["export", *TINY, "--out", "out/m.onnx"]}[what]
    _fill(tmpfs, pt2_size + 4096 if what == "json" else 64 * 1024)  # json: room for the .pt2, not the report
    capfd.readouterr()
    before = snapshot(tmpfs)
    line = _refused(capfd, argv, ["No space left on device"])
    assert "internal error" not in line
    assert snapshot(tmpfs) == before


def _python_write_fails(tmpfs, write) -> None:
    """``write(path)`` on a full tmpfs raises one-line OutputError, and the old file stays."""
    target = tmpfs / "old.bin"
    target.write_bytes(b"old")
    _fill(tmpfs, 4096)
    before = snapshot(tmpfs)
    with pytest.raises(OutputError) as e:
        write(str(target))
    assert "No space left on device" in str(e.value) and "\n" not in str(e.value)
    assert snapshot(tmpfs) == before


def test_disk_full_fine_tuning_checkpoint(tmpfs):
    from vitprune.train.finetune import FinetuneConfig, finetune

    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 20000))
    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 2, 2), torch.randint(0, 2, (4,)))
    config = FinetuneConfig(epochs=1, label_weight=1.0, kd_weight=0.0, progress=False, device="cpu")

    def write(path):
        config.checkpoint = path
        finetune(student, None, data, None, config)
    _python_write_fails(tmpfs, write)


def test_disk_full_sweep_state_and_plot(tmpfs):
    from vitprune.sweep.report import plot_sweep
    from vitprune.sweep.state import save_state

    state = {"format": "vitprune-sweep", "points": {}, "original": None, "pad": "x" * 200_000}
    _python_write_fails(tmpfs, lambda path: save_state(path, state))
    _python_write_fails(tmpfs, lambda path: plot_sweep({"points": {}, "original": None}, path))


# ------------------------------------------------------------------------------------------------ unwritable outputs
def _chattr(flag: str, path) -> bool:
    try:
        return subprocess.run(["chattr", flag, str(path)], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _no_loading(monkeypatch) -> None:
    """Make loading the model a failure of the test: the refusal must come before the work."""
    from vitprune import commands

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded: the output was checked only after the work")
    monkeypatch.setattr(commands, "_load", load)


def test_immutable_output_is_refused_before_the_work(tmp_path, monkeypatch, capfd):
    _old_set(tmp_path / "out")
    if not _chattr("+i", tmp_path / "out" / "m.pt2"):
        pytest.skip("chattr +i is not available here (needs root and a filesystem with inode flags)")
    monkeypatch.chdir(tmp_path)
    try:
        before = snapshot(tmp_path)
        _no_loading(monkeypatch)
        _refused(capfd, ["compress", *TINY, *FAST, "--out", "out/m"], ["out/m.pt2", "cannot be replaced",
                                                                        "chattr +i"])
        assert snapshot(tmp_path) == before
    finally:
        _chattr("-i", tmp_path / "out" / "m.pt2")


def test_mount_point_output_is_refused_before_the_work(tmp_path, monkeypatch, capfd):
    _old_set(tmp_path / "out")
    (tmp_path / "elsewhere").write_text("mounted")
    done = subprocess.run(["mount", "--bind", str(tmp_path / "elsewhere"), str(tmp_path / "out" / "m.json")],
                          capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {done.stderr.strip()}")
    monkeypatch.chdir(tmp_path)
    try:
        before = snapshot(tmp_path)
        _no_loading(monkeypatch)
        _refused(capfd, ["compress", *TINY, *FAST, "--out", "out/m"], ["out/m.json", "cannot be replaced",
                                                                        "a mount point"])
        assert snapshot(tmp_path) == before
    finally:
        subprocess.run(["umount", str(tmp_path / "out" / "m.json")], capture_output=True, timeout=20)


# ------------------------------------------------------------------------------------------------ debris
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_staging_of_a_killed_run_is_removed(tmp_path, monkeypatch, capfd):
    """A SIGKILLed run leaves ``.m.pt2.vitprune-OWNER-XXXX``; the next run on the prefix removes it
    when its owner is gone, and keeps the live ones, other hosts' and one holding old files."""
    from vitprune.deploy.outputs import _host_tag, _owner_tag, _start_ticks

    out = tmp_path / "out"
    out.mkdir()
    host = _host_tag()
    dead = out / f".m.pt2.vitprune-{_dead_pid()}.123.{host}-abcd1234"
    reused = out / f".m.onnx.vitprune-{os.getpid()}.1.{host}-abcd1234"  # our pid, another start time
    alive = out / f".m.pt2.vitprune-{_owner_tag()}-abcd1234"
    foreign = out / f".m.pt2.vitprune-{_dead_pid()}.123.ffffff-abcd1234"
    other_prefix = out / f".n.pt2.vitprune-{_dead_pid()}.123.{host}-abcd1234"
    with_backups = out / f".m.json.vitprune-{_dead_pid()}.123.{host}-abcd1234"
    for d in (dead, reused, alive, foreign, other_prefix, with_backups):
        d.mkdir()
        (d / "m.pt2").write_bytes(b"\0" * 1000)
    (with_backups / ".old").mkdir()
    (with_backups / ".old" / "m.json").write_text("the only copy")
    assert _start_ticks("self") not in (None, "1")
    monkeypatch.chdir(tmp_path)
    _ran(capfd, ["compress", *TINY, *FAST, "--out", "out/m"])
    left = {p.name for p in out.iterdir()}
    assert dead.name not in left and reused.name not in left
    assert {alive.name, foreign.name, other_prefix.name, with_backups.name} <= left
    assert {"m.pt2", "m.json"} <= left and len(left) == 6


def test_a_real_sigkill_leaves_a_folder_the_next_run_removes(tmp_path):
    """Kill a run while it writes (its staging folder exists), then run again on the same prefix."""
    import signal
    import time

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "vitprune.cli", "compress", *TINY, *FAST, "--out", str(tmp_path / "m")]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if any(n.startswith(".m.pt2.vitprune-") and not n.endswith("probe") for n in os.listdir(tmp_path)):
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    p.wait()
    staged = [n for n in os.listdir(tmp_path) if ".vitprune-" in n]
    if p.returncode != -signal.SIGKILL or not staged:
        pytest.skip("the run ended before it could be killed while staging")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(tmp_path)) == ["m.json", "m.pt2"]


def test_socket_as_model_is_refused(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind("model.sock")
        _refused(capfd, ["inspect", "model.sock", "--arch", "test_vit"], ["model.sock is a socket"])
    finally:
        s.close()


def test_image_model_rule_follows_the_class_and_config():
    """Text/audio classes are refused; an image classifier naming another main input (Perceiver's
    ``inputs``) is not, since its config states an image size."""
    transformers = pytest.importorskip("transformers")
    from vitprune.errors import LoadError
    from vitprune.frontend.load import _check_image_model

    _check_image_model(transformers.ViTModel, transformers.ViTConfig(), "vit")
    _check_image_model(transformers.PerceiverForImageClassificationLearned, transformers.PerceiverConfig(), "p")
    for cls, config in ((transformers.BertModel, transformers.BertConfig()),
                        (transformers.WhisperModel, transformers.WhisperConfig())):
        with pytest.raises(LoadError, match="not an image model"):
            _check_image_model(cls, config, "folder")
