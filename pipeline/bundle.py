"""The bundle writer: the files every bundle holds besides its model files, written the same way for a
single model and for a multi-task one (``stages/export.py``, ``stages/export_tasks.py``).

A bundle is its model file(s), ``eval*.npz`` (the on-device accuracy check), ``test_vectors*.npz``
(inputs with the exported and the reference outputs), ``labels.txt``, ``requirements.txt``, the
numpy-only runner (``edgec_ondevice/`` and ``run.py``), the model's transport payload
(``<model file>.edgt``) and the manifest, written last with the file table of everything else and
its seal (``manifest.py``). The build signs it after adding the lineage (``edgec/api.py``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

import edgec
from edgec.base.errors import RunError

from .algorithms.transport_codec import encode_transport
from .manifest import write_manifest

ONDEVICE_PACKAGE = Path(edgec.__file__).parent / "ondevice"
RUNNER_TEMPLATE = ONDEVICE_PACKAGE / "run_bundle.py"
TRANSPORT_CODEC = Path(__file__).parent / "algorithms" / "transport_codec.py"
FP32_FALLBACK = "model.fp32.onnx"


def shaping_sources() -> list[Path]:
    """The code that shapes a bundle beyond the model (the runner, the transport encoder): a change
    to it is a new bundle, so the export stage's cache key hashes these files."""
    return sorted(ONDEVICE_PACKAGE.glob("*.py")) + [TRANSPORT_CODEC]


def write_eval_set(out_dir: Path, name: str, x: np.ndarray, y: np.ndarray) -> None:
    """Raw samples (before preprocessing) and labels / targets the device measures accuracy on."""
    np.savez_compressed(out_dir / name, x=x, y=y)


def write_test_vectors(out_dir: Path, name: str, inputs: np.ndarray, expected: np.ndarray, reference: np.ndarray) -> None:
    """Model inputs with the exported model's outputs (``expected``) and the torch reference's."""
    np.savez_compressed(out_dir / name, inputs=inputs, expected=expected, reference=reference)


def write_fp32_fallback(out_dir: Path, model, example, target, precision) -> list[str]:
    """An fp32 ONNX file beside a reduced-precision model, for targets that ask for one; the extra file names."""
    if not target.fp32_fallback or precision.lossless:
        return []
    from edgec.targets.onnx_export import export_onnx

    export_onnx(model, example, out_dir / FP32_FALLBACK, precision="fp32")
    return [FP32_FALLBACK]


def write_bundle(out_dir: Path, *, target, labels: Iterable[str], model_file: str, codebooks: list[np.ndarray],
                 reference_fp32_bytes: int, manifest: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """Write labels, requirements, the runner and ``model_file``'s transport payload beside the model
    files already in ``out_dir``; refuse a bundle over the target's size budget; then write the
    manifest that ``manifest(size)`` makes. Returns the size record."""
    (out_dir / "labels.txt").write_text("\n".join(labels) + "\n")
    (out_dir / "requirements.txt").write_text("\n".join(target.requirements) + "\n")
    shutil.copytree(ONDEVICE_PACKAGE, out_dir / "edgec_ondevice", ignore=shutil.ignore_patterns("__pycache__", "run_bundle.py"))
    shutil.copy2(RUNNER_TEMPLATE, out_dir / "run.py")
    model_bytes = (out_dir / model_file).read_bytes()
    transport = out_dir / f"{model_file}.edgt"
    transport.write_bytes(encode_transport(model_bytes, codebooks))
    size = {
        "reference_fp32_bytes": reference_fp32_bytes,
        "model_bytes": len(model_bytes),
        "transport_bytes": transport.stat().st_size,
        "transport_file": transport.name,
    }
    refuse_on_budget(size, target)
    write_manifest(out_dir, manifest(size))
    return size


def refuse_on_budget(size: dict[str, Any], target) -> None:
    """Size budgets are checked when the bundle is made: a build never 'succeeds' over them."""
    budgets, problems = target.budgets, []
    if budgets.max_model_bytes is not None and size["model_bytes"] > budgets.max_model_bytes:
        problems.append(f"model file {size['model_bytes']:,} bytes > max_model_bytes {budgets.max_model_bytes:,}")
    if budgets.max_transport_bytes is not None and size["transport_bytes"] > budgets.max_transport_bytes:
        problems.append(f"transport payload {size['transport_bytes']:,} bytes > max_transport_bytes "
                        f"{budgets.max_transport_bytes:,}")
    if problems:
        raise RunError(f"the bundle exceeds target {target.name!r}'s size budget ({'; '.join(problems)}); no bundle "
                       "written. Compress more (prune, share, a narrower distill student) or raise the budget in a "
                       "board.toml")
