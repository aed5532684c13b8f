"""Progress on stderr: shown on a terminal, silent in a pipe unless --progress, nothing with --quiet."""
from __future__ import annotations

import os
import pty
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPRESS = ["compress", "timm:test_vit", "--img-size", "32", "--num-classes", "10", "--target-flops", "0.6"]
STEPS = ("load timm:test_vit", "capture (torch.export) and dependency graph", "width stage (width)", "cleanup",
         "ONNX export, checks and ORT parity", "write .pt2")


def _run(args: list[str], tty: bool) -> tuple[int, str, str]:
    """The CLI in a child process; stderr on a pseudo-terminal (``tty``) or a pipe."""
    code = "import sys; from vitprune.cli import main; sys.exit(main(sys.argv[1:]))"
    env = dict(os.environ, PYTHONPATH=ROOT, COLUMNS="100")
    if not tty:
        p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                           timeout=600)
        return p.returncode, p.stdout, p.stderr
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=slave, env=env, cwd=ROOT)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    out = p.stdout.read().decode()
    p.wait(timeout=600)
    os.close(master)
    return p.returncode, out, b"".join(chunks).decode(errors="replace")


@pytest.fixture(scope="module")
def terminal(tmp_path_factory):
    return _run([*COMPRESS, "--out", str(tmp_path_factory.mktemp("tty") / "m")], tty=True)


def _in_process(args: list[str], capsys) -> tuple[int, str, str]:
    """The CLI in this process: its stderr is pytest's capture, not a terminal."""
    from vitprune.cli import main

    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_a_terminal_sees_every_long_step_with_its_time(terminal):
    rc, out, err = terminal
    assert rc == 0 and "FLOPs:" in out
    for step in STEPS:
        assert f"] {step} ..." in err and f"] {step} " in err, step
    assert "time: capture" in out  # the summary says where the time went


def test_a_pipe_gets_only_the_summary_unless_asked(tmp_path, capsys):
    rc, out, err = _in_process([*COMPRESS, "--out", str(tmp_path / "pipe")], capsys)
    assert rc == 0 and "FLOPs:" in out and err == ""
    rc, out, err = _in_process([*COMPRESS, "--out", str(tmp_path / "forced"), "--progress"], capsys)
    assert rc == 0 and all(f"] {step} ..." in err for step in STEPS)


def test_quiet_prints_nothing_but_errors(tmp_path, capsys):
    rc, out, err = _in_process([*COMPRESS, "--out", str(tmp_path / "q"), "--quiet", "--progress"], capsys)
    assert rc == 2 and "not allowed with argument" in err  # they contradict each other: a usage error
    rc, out, err = _in_process([*COMPRESS, "--out", str(tmp_path / "quiet"), "--quiet"], capsys)
    assert rc == 0 and out == "" and err == "" and (tmp_path / "quiet.onnx").exists()
    rc, out, err = _in_process(["compress", "nope.pth", "--arch", "test_vit", "--out", str(tmp_path / "m"),
                                "--quiet"], capsys)
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1
