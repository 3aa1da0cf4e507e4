"""The bundle manifest (``manifest.json``): the one module that writes it.

The export stage creates it; the build amends it with the lineage (the manifest is not listed in
its own file table, so amending it does not disturb the recorded hashes; a signature, when the
bundle is signed, is made after the last amendment). Every write seals it with its self-digest
(``edgec/ondevice/manifest_seal.py``), which every reader checks first. Readers on the device are in
``edgec/ondevice/manifest.py``; the field reference is in the README.
"""

from __future__ import annotations

import json
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import edgec
from edgec.ondevice.integrity import MANIFEST_NAME as MANIFEST  # the one definition of the file's name
from edgec.ondevice.manifest_seal import manifest_bytes

SCHEMA_VERSION = 1
METRIC_TOLERANCE = 0.01  # verify: the eval set's AUC / R^2 within this of the manifest's (MSE: relative)
VERSIONED_PACKAGES = ("edgec", "torch", "onnx", "onnxruntime", "litert-torch", "ai-edge-litert", "numpy")


def create_manifest(*, target, converter, precision: str, model_file: str, extra_files: list[str], exported,
                    data, metrics: dict[str, Any], size: dict[str, Any], tasks: dict[str, Any] | None = None,
                    labels: list[str] | None = None) -> dict[str, Any]:
    """``converter``: the target format's (``edgec.targets.converters``), which names the runtime and
    its settings; ``labels``: the output columns' names (default: the data's class names)."""
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "edgec_version": edgec.__version__,
        "target": {"name": target.name, "profile": target.model_dump(mode="json")},
        "runtime": {
            "name": converter.runtime,
            "packages": target.requirements,
            "min_versions": dict(converter.min_runtime_versions),
            "recommended": converter.recommended(target),
        },
        "precision": precision,
        "model_file": model_file,
        "extra_model_files": extra_files,
        "inputs": exported.inputs,
        "outputs": exported.outputs,
        "preprocessing": {
            "raw_dtype": str(data.x_test.dtype),
            "raw_shape": list(data.input_shape),
            "scale": data.scale,
            "offset": data.offset,
            "layout": "NCHW" if data.is_image else "NC",
        },
        "labels": list(data.labels if labels is None else labels),
        "metrics": metrics,
        "size": size,
        "tolerance": {**output_tolerance(exported, converter.runtime), "accuracy": 0.01},
        "conversion": exported.conversion,
        "lineage": [],  # filled in by the build, which knows the whole chain
        "versions": _versions(),
    }
    if exported.mixed_precision is not None:  # the layers that stay float, for the device and the reader
        manifest["mixed_precision"] = exported.mixed_precision
    if data.task != "classification":  # regression / reconstruction: "task", "postprocessing", tolerance.metric
        from .objectives import objective_for

        manifest.update(objective_for(data).manifest_fields())
        manifest["tolerance"]["metric"] = METRIC_TOLERANCE
    if tasks is not None:
        # multi-task bundle (learn stages): per task its output columns, labels, model file, eval
        # file and metrics; PackNet's per-task model files in one extra transport payload
        manifest["tasks"] = tasks["tasks"]
        if tasks.get("transport"):
            manifest["tasks_transport"] = tasks["transport"]
    return manifest


def write_manifest(bundle_dir: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest with the file table of everything in ``bundle_dir``."""
    from edgec.ondevice.integrity import describe_files  # the device's own hashing, so both agree

    names = sorted(p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest["files"] = describe_files(str(bundle_dir), names)
    (bundle_dir / MANIFEST).write_bytes(manifest_bytes(manifest))


def write_lineage(manifest_path: Path, stages: list[dict[str, Any]], configs: list[dict[str, Any]],
                  accuracy_budget: dict[str, Any] | None = None) -> None:
    """Every stage that made the bundle: id, kind, config and cache key; and the accuracy budget's
    record (the trained model's validation figure, the bundle's, drop and budget), which only the
    whole chain knows."""
    manifest = json.loads(manifest_path.read_text())
    by_id = {c["id"]: c for c in configs}
    manifest["lineage"] = [
        {"stage": s["id"], "kind": s["kind"], "config": by_id.get(s["id"]), "cache_key": s["key"]} for s in stages
    ]
    if accuracy_budget is not None:
        manifest["accuracy_budget"] = accuracy_budget
    manifest_path.write_bytes(manifest_bytes(manifest))


def output_tolerance(exported, runtime: str) -> dict[str, Any]:
    """``{"atol"}``, plus for a TFLite model with an int8 output ``{"runtimes": {package: {"int8_steps",
    "atol"}}}``: the tolerance each device runtime gets by its op families (targets/device_tolerance.py);
    the runner applies the one of the runtime it loaded."""
    tolerance: dict[str, Any] = {"atol": output_atol(exported.outputs[0])}
    if runtime == "tflite":
        from edgec.targets.device_tolerance import runtime_tolerances

        runtimes = runtime_tolerances(exported.path, exported.outputs[0])
        if runtimes:
            tolerance["runtimes"] = runtimes
    return tolerance


def output_atol(output: dict[str, Any]) -> float:
    """Test-vector tolerance: one quantization step for int8 outputs (runtimes and kernels may
    round differently by one step), a small float tolerance otherwise."""
    q = output.get("quantization")
    if q:
        return float(q["scale"]) * 1.01
    return 1e-3 if output["dtype"] == "float16" else 1e-4


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for pkg in VERSIONED_PACKAGES:
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return found
