"""Helpers shared by the tests (importable because pyproject puts tests/ on the path)."""

import os
import subprocess
import sys
from pathlib import Path

MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


def run_cli(*args, cwd: Path, env: dict | None = None, check: int | None = 0) -> subprocess.CompletedProcess:
    """Run the real CLI (``python -m edgec``) in a subprocess."""
    proc = subprocess.run(
        [sys.executable, "-m", "edgec", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "160", **(env or {})},
        timeout=900,
    )
    if check is not None and proc.returncode != check:
        raise AssertionError(
            f"edgec {' '.join(map(str, args))} exited {proc.returncode}, expected {check}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc
