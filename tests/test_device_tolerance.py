"""Each Raspberry Pi runtime gets the test-vector tolerance its op families and depth need, and no more.

A bundle's expected outputs come from ai-edge-litert; tflite-runtime 2.14's int8 hardswish and
multiply kernels round differently (targets/device_tolerance.py has the measurements). The manifest
records each runtime's allowance (``tolerance.runtimes``) and run.py applies the one of the runtime it
loaded. Host tests: the allowance by op family, the manifest fields (recorded, applied, range-checked)
and that a corrupted weight fails verify beyond every runtime's tolerance. The slow emulated tests
verify ResNet, MobileNetV2 (3 and 8 inverted residuals) and MobileNetV3 blocks with both runtimes on arm64 under qemu-user (they
skip like tests/test_emulation.py without qemu-aarch64-static or with EDGEC_SKIP_EMULATION=1; about
a minute per model here, plus the device wheels' download on the first run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert.tools import flatbuffer_utils
from support import reseal_manifest, run_cli

from edgec.base import emulation
from edgec.ondevice import ManifestError, load_bundle, verify_bundle
from edgec.pipeline.algorithms.transport_codec import encode_transport
from edgec.pipeline.manifest import write_manifest
from edgec.targets.device_tolerance import SCALE_MARGIN, tflite_op_names, tolerances_for_ops

TESTS = Path(__file__).parent
# Epochs enough for every test vector's top-1 to be decisive (an undertrained model's near-ties flip
# under any rounding, and the emulated check demands identical top-1).
EPOCHS = {"resnet_basic": 8, "inverted_residual": 30, "mobilenet_v3_block": 30, "deep_inverted_residual": 30,
          "deep_mobilenet_v3": 30}


def build_rpi_bundle(workdir: Path, factory: str) -> Path:
    """A real rpi bundle (train, export) of a user model from tests/fixtures/edge_models.py on digits."""
    out = workdir / factory
    if not (out / "rpi" / "bundle").is_dir():
        run_cli("build", "--target", "rpi", "--stages", "train,export", "--epochs", EPOCHS[factory],
                "--set", "budget.enforce=false", "--model", f"fixtures.edge_models:{factory}", "--out", out,
                cwd=workdir, env={"PYTHONPATH": str(TESTS), "EDGEC_CACHE_DIR": str(workdir / "cache")})
    return out / "rpi" / "bundle"


def corrupt_one_weight(source: Path, bundle: Path) -> Path:
    """A copy of ``source`` whose logits layer has its largest int8 weight negated, re-listed by the
    build's own manifest writer (the files' hashes match: only the numbers can tell)."""
    shutil.copytree(source, bundle)
    model_path = bundle / "model.tflite"
    model = flatbuffer_utils.read_model(str(model_path))
    graph = model.subgraphs[0]
    logits = [op for op, name in zip(graph.operators, tflite_op_names(model_path)) if name == "FULLY_CONNECTED"][-1]
    weights = model.buffers[graph.tensors[logits.inputs[1]].buffer].data.view(np.int8)
    i = int(np.argmax(np.abs(weights.astype(np.int16))))
    weights[i] = 127 if weights[i] == -128 else -weights[i]
    flatbuffer_utils.write_model(model, str(model_path))
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / manifest["size"]["transport_file"]).write_bytes(encode_transport(model_path.read_bytes()))
    write_manifest(bundle, manifest)
    return bundle


def output_scale(bundle: Path) -> float:
    return float(json.loads((bundle / "manifest.json").read_text())["outputs"][0]["quantization"]["scale"])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("device-tolerance")


@pytest.fixture(scope="module")
def mobilenet_v3(workdir) -> Path:
    return build_rpi_bundle(workdir, "mobilenet_v3_block")


# ---- host: the allowance, the manifest fields, a corrupted weight -------------------------------------


@pytest.mark.parametrize("ops, tflite_runtime_steps", [
    (["CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "MEAN", "FULLY_CONNECTED"], 2),  # shallow ResNet, MobileNetV2
    (["CONV_2D", "HARD_SWISH"], 5),
    (["CONV_2D", "MUL"], 4),  # squeeze-excite
    (["CONV_2D", "HARD_SWISH", "MUL"], 7),  # MobileNetV3: the families' differences add up
    (["CONV_2D"] * 18 + ["DEPTHWISE_CONV_2D"] * 8 + ["ADD"] * 6 + ["FULLY_CONNECTED"], 11),  # 27 weighted: 7 measured
    (["CONV_2D"] * 33 + ["DEPTHWISE_CONV_2D"] * 17 + ["FULLY_CONNECTED"], 21),  # 51 weighted: 10 measured
    (["CONV_2D"] * 13 + ["HARD_SWISH", "MUL"], 6 + 5),  # depth and families add up
])
def test_each_runtime_gets_its_base_or_depth_plus_the_extra_steps_of_its_op_families(ops, tflite_runtime_steps):
    tolerances = tolerances_for_ops(ops, 0.05)
    assert tolerances["ai-edge-litert"]["int8_steps"] == 1  # it made the expected outputs
    assert tolerances["tflite-runtime"]["int8_steps"] == tflite_runtime_steps
    for entry in tolerances.values():
        assert entry["atol"] == pytest.approx(entry["int8_steps"] * 0.05 * SCALE_MARGIN)


@pytest.mark.parametrize("package, version, noted", [
    ("ai-edge-litert", "2.3.0", False), ("ai-edge-litert", "1.4.0", True), ("tflite-runtime", "2.14.0", False),
    ("tflite-runtime", "2.13.0", True), ("some-other-build", "0.1", False)])
def test_each_runtime_package_is_compared_with_its_own_minimum_version(package, version, noted):
    """ai-edge-litert restarted its numbering at 1.0 when it forked from tflite-runtime: one minimum for
    both called the default runtime (ai-edge-litert 2.3.0) older than 2.14.0 on every Pi verify."""
    from edgec.ondevice.manifest import Bundle
    from edgec.ondevice.runtime_base import RuntimeInfo
    from edgec.targets.converters import TFLiteConverter

    bundle = Bundle("bundle", {"schema_version": 1, "model_file": "model.tflite",
                               "runtime": {"name": "tflite", "min_versions": TFLiteConverter.min_runtime_versions}})
    note = bundle.runtime_min_version_note(RuntimeInfo("tflite", package, version, None))
    assert (note is not None) == noted, note
    if noted:
        want = TFLiteConverter.min_runtime_versions[package]
        assert note.startswith(f"{package} {version} is older than {want}, the bundle's runtime.min_versions for it")
        assert f"pip install -U {package}" in note


def test_the_manifest_records_each_runtimes_tolerance_and_verify_applies_the_loaded_ones(mobilenet_v3):
    manifest = json.loads((mobilenet_v3 / "manifest.json").read_text())
    ops = tflite_op_names(mobilenet_v3 / "model.tflite")
    assert {"HARD_SWISH", "MUL"} <= set(ops)
    assert manifest["tolerance"]["runtimes"] == tolerances_for_ops(ops, output_scale(mobilenet_v3))
    bundle = load_bundle(str(mobilenet_v3))
    assert bundle.atol_for("tflite-runtime") == manifest["tolerance"]["runtimes"]["tflite-runtime"]["atol"]
    assert bundle.atol_for("onnxruntime") == manifest["tolerance"]["atol"]  # none recorded: the general one
    report = verify_bundle(str(mobilenet_v3))
    assert report["ok"], report["errors"]
    assert report["test_vectors"]["atol_runtime"] == "ai-edge-litert"
    assert report["test_vectors"]["atol"] == manifest["tolerance"]["runtimes"]["ai-edge-litert"]["atol"]


def test_a_corrupted_weight_fails_verify_beyond_every_runtimes_tolerance(mobilenet_v3, tmp_path):
    bundle = corrupt_one_weight(mobilenet_v3, tmp_path / "corrupted")
    report = verify_bundle(str(bundle))
    assert not report["ok"] and any(e.startswith("test_vectors:") for e in report["errors"])
    runtimes = json.loads((bundle / "manifest.json").read_text())["tolerance"]["runtimes"]
    assert set(runtimes) == set(emulation.RUNTIMES)
    # beyond the loosest runtime's tolerance too (about 2x it here; 1.98x on an AVX2-only AMD EPYC)
    assert report["test_vectors"]["max_abs_diff"] > max(entry["atol"] for entry in runtimes.values())


@pytest.mark.parametrize("runtimes, field", [
    ({"tensorflow": {"int8_steps": 1, "atol": 0.1}}, "tolerance.runtimes"),
    ({"tflite-runtime": 0.1}, "tolerance.runtimes.tflite-runtime"),
    ({"tflite-runtime": {"int8_steps": 256, "atol": 0.1}}, "tolerance.runtimes.tflite-runtime.int8_steps"),
    ({"tflite-runtime": {"int8_steps": -1, "atol": 0.1}}, "tolerance.runtimes.tflite-runtime.int8_steps"),
    ({"tflite-runtime": {"int8_steps": True, "atol": 0.1}}, "tolerance.runtimes.tflite-runtime.int8_steps"),
    ({"tflite-runtime": {"int8_steps": 2, "atol": -0.1}}, "tolerance.runtimes.tflite-runtime.atol"),
    ({"tflite-runtime": {"int8_steps": 2, "atol": "big"}}, "tolerance.runtimes.tflite-runtime.atol"),
    ({"tflite-runtime": {"int8_steps": 2}}, "tolerance.runtimes.tflite-runtime.atol"),
    ([], "tolerance.runtimes"),
])
def test_hostile_runtime_tolerances_are_refused_naming_the_field(mobilenet_v3, tmp_path, runtimes, field):
    bundle = tmp_path / "bundle"
    shutil.copytree(mobilenet_v3, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["tolerance"]["runtimes"] = runtimes
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    reseal_manifest(bundle)
    with pytest.raises(ManifestError, match="manifest.json: %s should be" % field.replace(".", r"\.")):
        load_bundle(str(bundle))
    done = subprocess.run([sys.executable, "run.py", "verify"], cwd=bundle, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ""}, timeout=300)
    assert done.returncode == 2 and field in done.stderr and "Traceback" not in done.stderr + done.stdout


# ---- emulated arm64: both runtimes, three families of blocks ------------------------------------------


def emulated_runs(bundle: Path, workdir: Path, check: int) -> dict[str, dict]:
    """``edgec verify --emulate arm64`` (ai-edge-litert bit-exact, tflite-runtime within its tolerance)."""
    done = run_cli("verify", bundle, "--emulate", "arm64", "--json", "-", cwd=workdir, check=check)
    return {run["emulation"]["runtime"]: run for run in json.loads(done.stdout)["runs"]}


@pytest.mark.slow
@pytest.mark.parametrize("factory", list(EPOCHS))
def test_blocks_verify_on_emulated_arm64_with_both_runtimes(arm64_cache, workdir, factory):
    bundle = build_rpi_bundle(workdir, factory)
    runtimes = json.loads((bundle / "manifest.json").read_text())["tolerance"]["runtimes"]
    runs = emulated_runs(bundle, workdir, check=0)
    assert set(runs) == {"ai-edge-litert", "tflite-runtime"}
    for runtime, run in runs.items():
        assert run["ok"], run.get("errors")
        assert run["test_vectors"]["atol_runtime"] == runtime
        assert run["test_vectors"]["atol"] == pytest.approx(runtimes[runtime]["atol"])
        assert run["top1_agreement"] == 1.0
    assert runs["ai-edge-litert"]["max_abs_diff"] == 0.0
    steps = runs["tflite-runtime"]["max_abs_diff"] / output_scale(bundle)
    print(f"{factory}: tflite-runtime max|diff| {steps:.2f} int8 steps (allowance {runtimes['tflite-runtime']['int8_steps']})")


@pytest.mark.slow
def test_a_corrupted_weight_fails_on_emulated_arm64_with_both_runtimes(arm64_cache, workdir, mobilenet_v3, tmp_path):
    bundle = corrupt_one_weight(mobilenet_v3, tmp_path / "corrupted")
    runs = emulated_runs(bundle, workdir, check=1)
    assert set(runs) == {"ai-edge-litert", "tflite-runtime"}
    for run in runs.values():
        assert not run["ok"] and run["test_vectors"]["n_failed"] > 0, run["emulation"]["runtime"]
