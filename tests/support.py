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

    from edgec.base import architecture
    from edgec.base.architecture import ModelTrust
    from edgec.base.checkpoint import Checkpoint
    from edgec.pipeline.artifact import CHECKPOINT_FILE, MODEL

    arch = architecture.record(architecture.zoo_base(name, data.input_shape, data.num_classes, **kwargs))
    torch.manual_seed(0)
    state = architecture.build(arch, ModelTrust()).state_dict()
    return cache.put("source", "s", MODEL, lambda out: Checkpoint(arch, state).save(out / CHECKPOINT_FILE) or {})


# A top-1 decision that a runtime's rounding can move says nothing about the conversion: a sample counts
# only where the reference's top-1 leads its runner-up by more than this fraction of the reference
# logits' spread (max - min over the set). An int8 output has 255 steps over about that spread, and the
# layers before it add a few steps of rounding that differs between CPUs' kernels (AMX, AVX-512, AVX2,
# NEON); fp16 and fp32 kernels differ by summation order. Measured on the edge architectures (AMX and
# AVX2 kernels): int8 flipped 1-3 of 360 samples, at leads up to 0.026 of the spread (so a few decisive
# ones may still flip: the bar stays below 1.0); fp16 errors up to 0.0011, fp32 up to 3e-7.
TIE_MARGIN = {"int8": 0.02, "fp16": 0.002, "fp32": 1e-5}
MIN_DECISIVE = 0.8  # below this the set is mostly near-ties and agreement on the rest is no evidence


def decisive_agreement(out, ref, precision: str) -> float:
    """Top-1 agreement of ``out`` with ``ref`` on the samples ``ref`` decides by more than
    ``TIE_MARGIN[precision]`` (see above). Asserts that at least ``MIN_DECISIVE`` of the samples count,
    so the statistic cannot pass vacuously."""
    import numpy as np

    top2 = np.sort(ref, axis=1)[:, -2:]
    decisive = top2[:, 1] - top2[:, 0] > TIE_MARGIN[precision] * np.ptp(ref)
    assert decisive.mean() >= MIN_DECISIVE, f"only {decisive.mean():.3f} of the samples have a decisive top-1"
    return float((out[decisive].argmax(1) == ref[decisive].argmax(1)).mean())


def reseal_manifest(path: Path) -> dict:
    """Recompute the self-digest of a manifest a test edited on purpose (``path``: the bundle folder or
    its manifest.json), so the edit under test is what the reader sees. Returns the manifest."""
    import json

    from edgec.ondevice.manifest_seal import manifest_bytes

    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_bytes(manifest_bytes(manifest))
    return manifest
