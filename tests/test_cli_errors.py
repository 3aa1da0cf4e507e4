"""The CLI's error contract: one line on stderr, exit 2 (usage, config, input) or 1 (a failed run),
no traceback unless --debug, nothing half-written; 130 / 143 on SIGINT / SIGTERM after cleanup.

Every test fails before any training, except the signal tests, which stop a build mid-stage."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import run_cli


def one_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["build", "--bogus"], "No such option: --bogus"),
        (["build", "--seed", "abc"], "Invalid value for '--seed'"),
        (["build", "--epochs", "1.5"], "Invalid value for '--epochs'"),
        (["frobnicate"], "No such command 'frobnicate'"),
        (["verify"], "Missing argument 'bundle'"),
        (["build", "--target"], "Option '--target' requires an argument"),
        (["targets", "extra"], "unexpected extra argument"),
        # --debug anywhere is edgec's, not an unknown option of the subcommand
        (["build", "--debug", "--bogus"], "No such option: --bogus"),
        (["--debug", "build", "--bogus"], "No such option: --bogus"),
    ],
)
def test_usage_errors_are_one_line_exit_2(tmp_path, args, message):
    proc = run_cli(*args, cwd=tmp_path, check=2)
    line = one_line(proc)
    assert line.startswith("error: ") and message in line and "--debug" not in line
    command = next(a for a in args if not a.startswith("-"))
    assert line.endswith(f"(see 'edgec{'' if command == 'frobnicate' else ' ' + command} --help')")
    assert not (tmp_path / "edgec-out").exists()


def test_no_command_shows_help_exit_2(tmp_path):
    proc = run_cli(cwd=tmp_path, check=2)
    assert "build" in proc.stdout + proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("where", ["first", "after-command", "last"])
def test_debug_is_accepted_anywhere(tmp_path, where):
    args = ["build", "--target", "toaster"]
    args = {"first": ["--debug", *args], "after-command": ["build", "--debug", *args[1:]], "last": [*args, "--debug"]}[where]
    proc = run_cli(*args, cwd=tmp_path, check=2)  # the same exit code as without --debug
    assert "Traceback" in proc.stderr and "ConfigError" in proc.stderr
    out = run_cli("build", "--print-config", "--debug", "--seed", "3", cwd=tmp_path)
    assert '"seed": 3' in out.stdout


# --- OS errors: the `targets` command is made to fail the way a stage's write would ------------


def run_failing(tmp_path, body: str, *extra):
    """``edgec targets`` with its target listing replaced by ``body`` (Python, indented 4)."""
    code = (
        "import errno, sys\n"
        "from pathlib import Path\n"
        "import edgec.targets.profile as profile\n"
        "def failing():\n"
        f"{body}\n"
        "profile.builtin_targets = failing\n"
        "sys.argv = ['edgec', 'targets', *sys.argv[1:]]\n"
        "from edgec.cli import main\n"
        "main()\n"
    )
    return subprocess.run([sys.executable, "-c", code, *extra], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "160"})


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_names_the_file_exit_1(tmp_path):
    # a real ENOSPC from write(): the OSError carries no file name, the message still names it
    proc = run_failing(tmp_path, "    Path('/dev/full').write_bytes(b'x' * 65536)")
    assert proc.returncode == 1, proc.stderr
    line = one_line(proc)
    assert line == "error: no space left on device: /dev/full; free some space or point --out / --cache-dir at another disk"


@pytest.mark.parametrize(
    "err, code, message",
    [
        ("PermissionError(errno.EACCES, 'Permission denied', '/c/train/.tmp-1/model.pt')", 2,
         "error: permission denied: /c/train/.tmp-1/model.pt; fix its permissions or choose a folder you can write"),
        ("PermissionError(errno.EPERM, 'Operation not permitted', '/o/rpi/bundle')", 2,
         "error: operation not permitted: /o/rpi/bundle; fix its permissions"),
        ("OSError(errno.EROFS, 'Read-only file system', '/mnt/ro/cache/train')", 2,
         "error: read-only file system: /mnt/ro/cache/train; choose a writable folder with --out / --cache-dir"),
        ("OSError(errno.EDQUOT, 'Disk quota exceeded', '/home/u/.cache/edgec/share/x')", 1,
         "error: disk quota exceeded: /home/u/.cache/edgec/share/x; free some space"),
        ("OSError(errno.ENOTCONN, 'Transport endpoint is not connected', '/net/cache')", 1,
         "error: Transport endpoint is not connected: /net/cache; rerun with --debug for details"),
        ("MemoryError()", 1, "error: out of memory"),
    ],
    ids=["EACCES", "EPERM", "EROFS", "EDQUOT", "other-errno", "memory"],
)
def test_os_errors_are_one_line(tmp_path, err, code, message):
    proc = run_failing(tmp_path, f"    raise {err}")
    assert proc.returncode == code, proc.stderr
    assert one_line(proc).startswith(message)
    debug = run_failing(tmp_path, f"    raise {err}", "--debug")
    assert debug.returncode == code and "Traceback" in debug.stderr  # --debug never changes the exit code


# --- signals: cleanup runs, one line, 130 / 143 ------------------------------------------------


def interrupt_build(tmp_path, sig) -> subprocess.CompletedProcess:
    """Start a build on the built-in data, wait until a training stage runs, send ``sig``."""
    stdout, stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(stdout, "w") as out, open(stderr, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgec", "build", "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out",
             "--stages", "train,prune", "--epochs", "200"],
            cwd=tmp_path, stdout=out, stderr=err, env={**os.environ, "COLUMNS": "160"},
            # as from a terminal: a suite started in the background (``cmd &``) ignores SIGINT, and the
            # CLI rightly keeps an inherited ignore, so the build would never see the signal
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            deadline = time.monotonic() + 240
            # inside the train stage: it has printed that it runs and its temp folder exists
            while "run    train" not in stdout.read_text() or not temp_folders(tmp_path / "cache"):
                assert proc.poll() is None, f"build ended early:\n{stdout.read_text()}\n{stderr.read_text()}"
                assert time.monotonic() < deadline, "the train stage never started"
                time.sleep(0.2)
            time.sleep(0.5)
            proc.send_signal(sig)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout.read_text(), stderr.read_text())


def temp_folders(root: Path) -> list[Path]:
    """Dot-folders (a stage's or the output's work in progress) anywhere under root."""
    return [p for p in root.rglob(".*") if p.is_dir()] if root.is_dir() else []


def assert_nothing_half_written(tmp_path):
    assert temp_folders(tmp_path / "cache") == []
    assert not (tmp_path / "cache" / "train").exists() or not any((tmp_path / "cache" / "train").iterdir())
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))


@pytest.mark.parametrize(
    "sig, code, message",
    [(signal.SIGTERM, 143, "terminated (SIGTERM)"), (signal.SIGINT, 130, "interrupted")],
    ids=["SIGTERM", "SIGINT"],
)
def test_signal_mid_stage_cleans_up(tmp_path, sig, code, message):
    proc = interrupt_build(tmp_path, sig)
    assert proc.returncode == code, proc.stderr
    assert one_line(proc) == message
    assert_nothing_half_written(tmp_path)
