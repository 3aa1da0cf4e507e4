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


def zoo_source(cache, name: str, data, **kwargs):
    """A source artifact in ``cache``: the zoo model ``name`` built for ``data`` with seed-0 initial weights."""
    import torch

    from edgec import architecture
    from edgec.architecture import ModelTrust
    from edgec.checkpoint import Checkpoint
    from edgec.pipeline.artifact import CHECKPOINT_FILE, MODEL

    arch = architecture.record(architecture.zoo_base(name, data.input_shape, data.num_classes, **kwargs))
    torch.manual_seed(0)
    state = architecture.build(arch, ModelTrust()).state_dict()
    return cache.put("source", "s", MODEL, lambda out: Checkpoint(arch, state).save(out / CHECKPOINT_FILE) or {})
