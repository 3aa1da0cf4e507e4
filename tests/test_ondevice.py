"""Tests for edgec.ondevice (the on-device runner) on tiny hand-built bundles.

The fixture trains a 64-32-10 MLP on scikit-learn's 8x8 digits for a fraction of a
second and builds three bundles exactly as docs/design.md lays them out: ONNX fp32
(dynamic batch), TFLite fp32 and TFLite full-int8 (litert-torch + PT2E), with test
vectors computed by each runtime's own API (not by the code under test).
"""

import gzip
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgec.ondevice import (BundleError, IntegrityError, ManifestError, ModelLoadError, NotABundleError,
                            RuntimeMissingError, SchemaTooNewError, SettingsError, bench_bundle,
                            compare_outputs, import_runtime, load_bundle, open_model, preprocess_raw,
                            quantize, render_bench_markdown, render_bench_text, render_verify_text,
                            sweep_grid, verify_bundle)
from edgec.ondevice.manifest_seal import manifest_bytes
from support import reseal_manifest

ONDEVICE_DIR = Path(__file__).resolve().parents[1] / "edgec" / "ondevice"
N_VECTORS = 16
KINDS = ("onnx", "tflite", "tflite-int8")


# ---------------------------------------------------------------------------------------------
# fixture bundles
# ---------------------------------------------------------------------------------------------
def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _file_table(root):
    out = []
    for p in sorted(Path(root).rglob("*")):
        if p.is_file() and p.name != "manifest.json" and "__pycache__" not in p.parts:
            out.append({"name": p.relative_to(root).as_posix(), "bytes": p.stat().st_size, "sha256": _sha(p)})
    return out


def write_manifest(root, manifest):
    """Refresh ``files`` from disk and write manifest.json (sealed, as edgec writes it)."""
    manifest = dict(manifest, files=_file_table(root))
    (Path(root) / "manifest.json").write_bytes(manifest_bytes(manifest))
    return manifest


def read_manifest(root):
    return json.loads((Path(root) / "manifest.json").read_text())


def _train_digits_mlp():
    import torch
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    d = load_digits()
    raw = d.images.astype(np.uint8)  # values 0..16, shape (N, 8, 8)
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    tr, ev = order[:1500], order[1500:]
    x = torch.tensor(raw[tr].astype(np.float32) / 16.0).unsqueeze(1)
    t = torch.tensor(y[tr])
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(80):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), t).backward()
        opt.step()
    model.eval()
    return model, raw[tr], raw[ev], y[ev]


def _export(kind, model, train_raw, path):
    import torch

    example = (torch.zeros(1, 1, 8, 8),)
    if kind == "onnx":
        torch.onnx.export(model, example, str(path), dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        return
    import litert_torch
    if kind == "tflite":
        litert_torch.convert(model, example).export(str(path))
        return
    from litert_torch.quantize import pt2e_quantizer
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e import quantize_pt2e

    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True))
    em = quantize_pt2e.prepare_pt2e(torch.export.export(model, example).module(), quantizer)
    calib = torch.tensor(train_raw[:256].astype(np.float32) / 16.0).unsqueeze(1)
    for i in range(len(calib)):
        em(calib[i:i + 1])
    em = quantize_pt2e.convert_pt2e(em, fold_quantize=False)
    litert_torch.convert(em, example, quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(str(path))


def _run_reference_runtime(kind, path, x):
    """Expected outputs computed with the runtimes' own APIs (independent of edgec.ondevice)."""
    if kind == "onnx":
        import onnxruntime as ort
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return sess.run(None, {"input": x})[0].astype(np.float32), None, None
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    outs = []
    for row in x:
        v = row[None]
        if inp["dtype"] == np.int8:
            s, z = inp["quantization"]
            v = np.clip(np.round(v / s) + z, -128, 127).astype(np.int8)
        it.set_tensor(inp["index"], v)
        it.invoke()
        o = it.get_tensor(out["index"])
        if out["dtype"] == np.int8:
            s, z = out["quantization"]
            o = (o.astype(np.float32) - z) * np.float32(s)
        outs.append(o[0].astype(np.float32))
    return np.stack(outs), inp, out


def _build_bundle(kind, root, model, train_raw, eval_raw, eval_y):
    import torch

    root = Path(root)
    root.mkdir(parents=True)
    model_file = "model.onnx" if kind == "onnx" else "model.tflite"
    _export(kind, model, train_raw, root / model_file)
    x_eval = eval_raw.astype(np.float32).reshape(-1, 1, 8, 8) / np.float32(16.0)
    with torch.no_grad():
        ref = model(torch.tensor(x_eval)).numpy()
    got, inp, out = _run_reference_runtime(kind, root / model_file, x_eval)
    np.savez(root / "test_vectors.npz", inputs=x_eval[:N_VECTORS], expected=got[:N_VECTORS],
             reference=ref[:N_VECTORS])
    np.savez(root / "eval.npz", x=eval_raw, y=eval_y)
    labels = [str(i) for i in range(10)]
    (root / "labels.txt").write_text("\n".join(labels) + "\n")
    shutil.copytree(ONDEVICE_DIR, root / "edgec_ondevice", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(ONDEVICE_DIR / "run_bundle.py", root / "run.py")
    pkg = "onnxruntime" if kind == "onnx" else "ai-edge-litert"
    (root / "requirements.txt").write_text("%s\nnumpy>=1.26\n" % pkg)

    def qmeta(d):
        return {"scale": float(d["quantization"][0]), "zero_point": int(d["quantization"][1])} \
            if d is not None and d["dtype"] == np.int8 else None
    int8 = kind == "tflite-int8"
    atol = 1e-4 if not int8 else float(out["quantization"][0]) * 1.01
    model_bytes = (root / model_file).stat().st_size
    manifest = {
        "schema_version": 1, "edgec_version": "0.1.0",
        "target": {"name": "test-%s" % kind, "profile": {}},
        "runtime": {"name": "onnxruntime" if kind == "onnx" else "tflite", "packages": [pkg],
                    "min_versions": {pkg: "1.20" if kind == "onnx" else "2.3"}, "recommended": {}},
        "model_file": model_file, "files": [],
        "inputs": [{"name": "input", "shape": [None if kind == "onnx" else 1, 1, 8, 8],
                    "dtype": "int8" if int8 else "float32", "layout": "NCHW", "quantization": qmeta(inp)}],
        "outputs": [{"name": "logits", "shape": [None if kind == "onnx" else 1, 10],
                     "dtype": "int8" if int8 else "float32", "layout": "NC", "quantization": qmeta(out)}],
        "preprocessing": {"raw_dtype": "uint8", "raw_shape": [8, 8], "scale": 1.0 / 16.0, "offset": 0.0,
                          "layout": "HW"},
        "labels": labels,
        "metrics": {"reference_accuracy": float(np.mean(ref.argmax(1) == eval_y)),
                    "accuracy": float(np.mean(got.argmax(1) == eval_y)),
                    "top1_agreement": float(np.mean(got.argmax(1) == ref.argmax(1))),
                    "max_abs_diff": float(np.abs(got - ref).max()), "eval_samples": int(len(eval_y))},
        "size": {"reference_fp32_bytes": 4 * sum(p.numel() for p in model.parameters()),
                 "model_bytes": model_bytes,
                 "transport_bytes": len(gzip.compress((root / model_file).read_bytes()))},
        "tolerance": {"atol": atol},
        "lineage": [{"stage": "test-fixture", "version": 1, "config": {}, "cache_key": "none"}],
        "versions": {"numpy": np.__version__, "torch": torch.__version__},
    }
    write_manifest(root, manifest)
    return root


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    pytest.importorskip("litert_torch")
    pytest.importorskip("onnxruntime")
    base = tmp_path_factory.mktemp("ondevice-bundles")
    model, train_raw, eval_raw, eval_y = _train_digits_mlp()
    return {k: _build_bundle(k, base / k, model, train_raw, eval_raw, eval_y) for k in KINDS}


@pytest.fixture
def copy_bundle(bundles, tmp_path):
    def make(kind, name=None):
        dst = tmp_path / (name or kind)
        shutil.copytree(bundles[kind], dst)
        return dst
    return make


def flip_byte(path, offset=None):
    data = bytearray(Path(path).read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    Path(path).write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_verify_passes_on_intact_bundle(bundles, kind):
    res = verify_bundle(bundles[kind])
    assert res["ok"], res["errors"]
    assert res["schema"] == "edgec-verify" and res["schema_version"] == 1
    assert [c["name"] for c in res["checks"]] == ["integrity", "load", "test_vectors", "accuracy"]
    assert all(c["ok"] for c in res["checks"])
    assert res["vectors"] == N_VECTORS
    assert res["max_abs_diff"] <= read_manifest(bundles[kind])["tolerance"]["atol"]
    assert res["top1_agreement"] == 1.0
    assert res["accuracy"] > 0.85 and res["eval_samples"] == 297
    assert res["accuracy"] == pytest.approx(res["manifest_accuracy"], abs=0.01)
    assert res["machine"] == platform.machine()
    assert res["runtime"]["name"] == ("onnxruntime" if kind == "onnx" else "tflite")
    assert res["runtime"]["package"] in ("onnxruntime", "ai-edge-litert", "tflite-runtime")
    assert res["runtime"]["version"] not in (None, "", "unknown")
    assert res["integrity"]["unlisted"] == []
    assert "edgec verify: OK" in render_verify_text(res)


@pytest.mark.parametrize("kind", KINDS)
def test_verify_exact_is_bit_identical_with_build_settings(bundles, kind):
    res = verify_bundle(bundles[kind], exact=True)
    assert res["ok"], res["errors"]
    assert res["test_vectors"]["exact"] and res["max_abs_diff"] == 0.0


def test_verify_exact_catches_one_ulp_and_names_vector(copy_bundle):
    b = copy_bundle("onnx")
    with np.load(b / "test_vectors.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["expected"][5, 3] = np.nextafter(arrays["expected"][5, 3], np.float32(np.inf))
    np.savez(b / "test_vectors.npz", **arrays)
    write_manifest(b, read_manifest(b))
    assert verify_bundle(b)["ok"]  # within atol
    res = verify_bundle(b, exact=True)
    assert not res["ok"]
    assert res["test_vectors"]["failed_indices"] == [5]
    assert any("index 5" in e for e in res["errors"])


def test_verify_vector_mismatch_names_index(copy_bundle):
    b = copy_bundle("tflite")
    with np.load(b / "test_vectors.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["expected"][11] += 0.5
    np.savez(b / "test_vectors.npz", **arrays)
    write_manifest(b, read_manifest(b))
    res = verify_bundle(b)
    assert not res["ok"]
    assert res["test_vectors"]["failed_indices"] == [11] and res["test_vectors"]["n_failed"] == 1
    assert "index 11" in res["errors"][0]


@pytest.mark.parametrize("kind", ("onnx", "tflite-int8"))
def test_one_flipped_byte_in_any_file_is_caught_and_named(bundles, tmp_path, kind):
    names = [f["name"] for f in read_manifest(bundles[kind])["files"]]
    assert {"model.onnx" if kind == "onnx" else "model.tflite", "test_vectors.npz", "eval.npz", "labels.txt",
            "run.py", "requirements.txt", "edgec_ondevice/__init__.py"} <= set(names)
    for i, name in enumerate(names):
        b = tmp_path / ("b%d" % i)
        shutil.copytree(bundles[kind], b)
        flip_byte(b / name)
        res = verify_bundle(b)
        assert not res["ok"], name
        probs = res["integrity"]["problems"]
        assert [(p["file"], p["problem"]) for p in probs] == [(name, "sha256")]
        assert name in res["errors"][0]
        assert [c["skipped"] for c in res["checks"][1:]] == [True, True, True]
        with pytest.raises(IntegrityError, match=name.replace(".", r"\.")):
            load_bundle(b).require_intact()


def test_missing_and_truncated_files_are_caught(copy_bundle):
    b = copy_bundle("tflite")
    (b / "eval.npz").unlink()
    (b / "labels.txt").write_bytes((b / "labels.txt").read_bytes()[:-1])
    res = verify_bundle(b)
    assert not res["ok"]
    got = {(p["file"], p["problem"]) for p in res["integrity"]["problems"]}
    assert got == {("eval.npz", "missing"), ("labels.txt", "size")}
    assert any("eval.npz is missing" in e for e in res["errors"])


def test_unlisted_file_fails_verify(copy_bundle):
    """run.py and edgec_ondevice/ are code the device runs: a file the manifest does not list is refused."""
    b = copy_bundle("onnx")
    (b / "extra.txt").write_text("hello")
    res = verify_bundle(b, check_accuracy=False)
    assert not res["ok"]
    assert res["integrity"]["unlisted"] == ["extra.txt"]
    assert [(p["file"], p["problem"]) for p in res["integrity"]["problems"]] == [("extra.txt", "unlisted")]
    assert any("extra.txt is not listed in the manifest" in e for e in res["errors"])
    with pytest.raises(IntegrityError, match="extra.txt"):
        load_bundle(b).require_intact()


# ---------------------------------------------------------------------------------------------
# manifest / bundle errors
# ---------------------------------------------------------------------------------------------
def test_newer_schema_is_rejected_with_upgrade_hint(copy_bundle):
    b = copy_bundle("onnx")
    m = read_manifest(b)
    m["schema_version"] = 2
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SchemaTooNewError) as ei:
        load_bundle(b)
    msg = str(ei.value)
    assert "schema_version 2" in msg and "upgrade edgec" in msg and "\n" not in msg
    assert ei.value.exit_code == 2


def test_not_a_bundle(tmp_path):
    with pytest.raises(NotABundleError, match="not an edgec bundle \\(no manifest.json\\)"):
        load_bundle(tmp_path)
    with pytest.raises(NotABundleError, match="does not exist"):
        verify_bundle(tmp_path / "nope")


def test_manifest_problems_are_one_line_errors(copy_bundle):
    b = copy_bundle("onnx")
    good = read_manifest(b)
    (b / "manifest.json").write_text(json.dumps(good)[:-5])
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_bundle(b)
    m = dict(good)
    del m["tolerance"]
    (b / "manifest.json").write_text(json.dumps(m))
    reseal_manifest(b)
    with pytest.raises(ManifestError, match="missing 'tolerance.atol'"):
        load_bundle(b)
    m = json.loads(json.dumps(good))
    m["files"].append({"name": "../outside.txt", "bytes": 1, "sha256": "0" * 64})
    (b / "manifest.json").write_text(json.dumps(m))
    reseal_manifest(b)
    with pytest.raises(ManifestError, match="outside the bundle"):
        verify_bundle(b)
    m = json.loads(json.dumps(good))
    m["runtime"]["name"] = "coreml"
    (b / "manifest.json").write_text(json.dumps(m))
    reseal_manifest(b)
    with pytest.raises(ManifestError, match="runtime.name"):
        load_bundle(b)
    # manifest.json given instead of the folder
    (b / "manifest.json").write_text(json.dumps(good))
    assert load_bundle(b / "manifest.json").path == str(b)


def test_model_that_does_not_load(copy_bundle):
    b = copy_bundle("tflite")
    (b / "model.tflite").write_bytes(b"this is not a flatbuffer" * 10)
    write_manifest(b, read_manifest(b))  # integrity passes: the exporter wrote garbage
    res = verify_bundle(b)
    assert not res["ok"]
    load = [c for c in res["checks"] if c["name"] == "load"][0]
    assert not load["ok"] and "model.tflite does not load" in load["detail"]
    with pytest.raises(ModelLoadError, match="does not load"):
        load_bundle(b).open_model()
    res = bench_bundle(b, sweep=False, isolate=False, **FAST)
    assert not res["ok"] and res["best"] is None and "does not load" in res["errors"][0]


def test_missing_test_vectors_fail_verify(copy_bundle):
    b = copy_bundle("onnx")
    (b / "test_vectors.npz").unlink()
    write_manifest(b, read_manifest(b))
    res = verify_bundle(b)
    assert not res["ok"] and "test_vectors.npz is missing" in res["errors"][0]


def test_missing_runtime_names_pip_package(bundles, monkeypatch):
    with pytest.raises(RuntimeMissingError, match="pip install onnxruntime"):
        monkeypatch.setitem(sys.modules, "onnxruntime", None)
        verify_bundle(bundles["onnx"])
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)
    with pytest.raises(RuntimeMissingError, match="pip install ai-edge-litert") as ei:
        load_bundle(bundles["tflite"]).open_model()
    assert ei.value.exit_code == 2


def test_runtime_override(bundles):
    with pytest.raises(SettingsError, match="cannot run a tflite bundle"):
        verify_bundle(bundles["tflite"], runtime="onnxruntime")
    if importlib_find("tflite_runtime") is None:
        with pytest.raises(RuntimeMissingError, match="tflite-runtime"):
            verify_bundle(bundles["tflite"], runtime="tflite-runtime")
    res = verify_bundle(bundles["tflite"], runtime="ai-edge-litert", check_accuracy=False)
    assert res["ok"] and res["runtime"]["package"] == "ai-edge-litert"


def importlib_find(name):
    import importlib.util
    return importlib.util.find_spec(name)


# ---------------------------------------------------------------------------------------------
# runtimes, preprocessing, batching
# ---------------------------------------------------------------------------------------------
def test_predict_raw_applies_preprocessing_and_int8_quantization(bundles):
    b = load_bundle(bundles["tflite-int8"])
    m = b.open_model()
    assert m.input_dtype == np.int8 and m.input_quant and m.output_quant
    x_raw, y = b.eval_set()
    logits = m.predict_raw(x_raw[:10])
    assert logits.dtype == np.float32 and logits.shape == (10, 10)
    np.testing.assert_array_equal(logits, m.run_model_input(x_raw[:10].astype(np.float32) / 16.0))
    one = m.predict_raw(x_raw[0])  # a single raw sample
    np.testing.assert_array_equal(one, logits[:1])
    tv = b.test_vectors()
    np.testing.assert_allclose(m.run_model_input(tv["inputs"]), tv["expected"], atol=b.atol)


def test_quantize_rounds_half_away_from_zero_and_saturates():
    q = quantize(np.array([0.5, -0.5, 1.5, 2.5, 1000.0, -1000.0], np.float32), 1.0, 0, np.int8)
    assert q.tolist() == [1, -1, 2, 3, 127, -128]
    assert quantize(np.array([0.0]), 0.5, -128, np.int8).tolist() == [-128]


def test_preprocess_layout_transpose_and_per_channel():
    raw = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)  # NHWC raw images
    pre = {"raw_shape": [4, 4, 3], "scale": [1.0, 2.0, 3.0], "offset": 0.5, "layout": "HWC"}
    x = preprocess_raw(raw, pre, (3, 4, 4), model_layout="NCHW")
    assert x.shape == (2, 3, 4, 4) and x.dtype == np.float32
    assert x[1, 2, 3, 1] == raw[1, 3, 1, 2] * 3.0 + 0.5
    with pytest.raises(BundleError, match="expects"):
        preprocess_raw(np.zeros((2, 5, 5), np.uint8), {"raw_shape": [8, 8]}, (1, 8, 8))


def test_onnx_settings_and_cuda_fallback(bundles):
    b = load_bundle(bundles["onnx"])
    m = b.open_model({"threads": 1, "provider": "cuda", "graph_optimization_level": "basic"})
    assert m.settings["providers"] == ["CPUExecutionProvider"]
    assert any("CUDAExecutionProvider requested but not available" in n for n in m.notes)
    assert m.batch_size is None  # dynamic batch
    tv = b.test_vectors()
    np.testing.assert_allclose(m.run_model_input(tv["inputs"]), tv["expected"], atol=1e-4)
    with pytest.raises(SettingsError, match="graph optimisation level"):
        b.open_model({"graph_optimization_level": "max"})


def test_sweep_grids():
    assert sweep_grid("tflite", 2) == [{"threads": 1, "xnnpack": True}, {"threads": 1, "xnnpack": False},
                                       {"threads": 2, "xnnpack": True}, {"threads": 2, "xnnpack": False}]
    notes = []
    grid = sweep_grid("onnxruntime", 1, ["cuda", "tensorrt", "CPUExecutionProvider"], notes)
    available = import_runtime("onnxruntime").module.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        assert {g["provider"] for g in grid} == {"CPUExecutionProvider"}
        assert len(grid) == 4 and any("CUDAExecutionProvider requested but not available" in n for n in notes)
        assert len(notes) == (2 if "TensorrtExecutionProvider" not in available else 1)


def test_tflite_batch_one_model_loops_and_reports_resize(bundles):
    b = load_bundle(bundles["tflite"])
    m = b.open_model({"threads": 1, "xnnpack": False})
    assert m.batch_size == 1 and m.settings == {"threads": 1, "xnnpack": False}
    tv = b.test_vectors()
    np.testing.assert_allclose(m.run_model_input(tv["inputs"][:5]), tv["expected"][:5], atol=1e-4)
    m8 = b.open_model()
    if m8.set_batch_size(8):  # resize worked: batched outputs must match
        assert m8.batch_size == 8
        np.testing.assert_allclose(m8.run_model_input(tv["inputs"][:8]), tv["expected"][:8], atol=1e-4)
    else:
        assert m8.batch_size == 1 and "batch 8" in m8.notes[-1]


def test_open_model_without_bundle(bundles):
    m = open_model(str(bundles["onnx"] / "model.onnx"), "onnxruntime")
    assert m.run_model_input(np.zeros((3, 1, 8, 8), np.float32)).shape == (3, 10)
    with pytest.raises(ModelLoadError, match="preprocessing"):
        m.predict_raw(np.zeros((1, 8, 8), np.uint8))
    assert import_runtime("tflite").package in ("ai-edge-litert", "tflite-runtime")


# ---------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------
FAST = dict(warmup=2, warmup_seconds=0.0, runs=20, min_seconds=0.0, max_seconds=5.0)


def _check_latency(lat):
    assert lat["runs"] >= 20
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert lat["min"] <= lat["mean"] <= lat["max"] and lat["std"] >= 0
    assert lat["p50"] < 50  # ms; the model has 2.4k MACs


def test_bench_tflite_sweep_in_fresh_subprocesses(bundles):
    res = bench_bundle(bundles["tflite"], sweep=True, batch_sizes=(1, 4), max_threads=2, **FAST)
    assert res["schema"] == "edgec-bench" and res["schema_version"] == 1 and res["ok"], res["errors"]
    ids = [s["id"] for s in res["settings"]]
    assert ids == ["threads=1 xnnpack=on", "threads=1 xnnpack=off", "threads=2 xnnpack=on",
                   "threads=2 xnnpack=off"]
    for s in res["settings"]:
        assert s["ok"], s.get("error")
        _check_latency(s["latency_ms"])
        assert s["load_ms"] > 0 and s["first_inference_ms"] > 0 and s["warmup"]["runs"] >= 2
        assert [t["batch_size"] for t in s["throughput"]] == [1, 4]
        assert all(t["samples_per_s"] > 0 and t["mode"] in ("native", "loop") for t in s["throughput"])
        assert 10 * 2**20 < s["peak_rss_bytes"] < 2 * 2**30
        assert s["vectors"]["ok"] and s["vectors"]["count"] == N_VECTORS
    low = min(s["latency_ms"]["p50"] for s in res["settings"])
    best = [s for s in res["settings"] if s["id"] == res["best"]["id"]][0]
    assert res["best"]["p50_ms"] == best["latency_ms"]["p50"] <= low * 1.01  # 1% tie band, fewer threads
    assert res["recommended"] == best["settings"] and set(res["recommended"]) == {"threads", "xnnpack"}
    assert res["memory"]["scope"] == "fresh subprocess per setting"
    assert 0 < res["harness"]["overhead_ms_per_iteration"] < res["latency_ms"]["p50"]
    assert res["accuracy"]["eval_samples"] == 297 and res["accuracy"]["accuracy"] > 0.85
    assert res["size"]["model_bytes"] == res["size"]["model_file_bytes"] > res["size"]["transport_bytes"] > 0
    assert res["machine"] == platform.machine()
    json.dumps(res)
    text, md = render_bench_text(res), render_bench_markdown(res)
    assert "best: " + res["best"]["id"] in text and "p50" in text and "batch 4" in text
    assert "| setting |" in md and "**best**" in md


def test_bench_onnx_sweep_covers_levels_and_batches(bundles):
    res = bench_bundle(bundles["onnx"], sweep=True, batch_sizes=(1, 8), max_threads=1, **FAST)
    assert res["ok"], res["errors"]
    assert [s["settings"]["graph_optimization_level"] for s in res["settings"]] == \
        ["all", "extended", "basic", "disable_all"]
    for s in res["settings"]:
        _check_latency(s["latency_ms"])
        assert s["batch_sizes_native"] == [1, 8]  # dynamic batch
    assert res["recommended"]["provider"] == "CPUExecutionProvider"


def test_bench_int8_in_process_no_sweep(bundles):
    res = bench_bundle(bundles["tflite-int8"], sweep=False, isolate=False, batch_sizes=(1, 8),
                       settings={"threads": 1}, **FAST)
    assert res["ok"], res["errors"]
    assert len(res["settings"]) == 1 and res["recommended"] == {"threads": 1, "xnnpack": True}
    assert res["memory"]["scope"].startswith("this process")
    assert res["vectors"]["ok"]
    t8 = res["throughput"][1]
    assert t8["batch_size"] == 8 and t8["samples_per_s"] > 0
    assert (t8["mode"] == "native") == (8 in res["settings"][0]["batch_sizes_native"])


def test_bench_fixed_settings_narrow_the_sweep(bundles):
    res = bench_bundle(bundles["tflite"], sweep=True, settings={"xnnpack": False}, batch_sizes=(1,),
                       max_threads=2, accuracy=False, **FAST)
    assert [s["id"] for s in res["settings"]] == ["threads=1 xnnpack=off", "threads=2 xnnpack=off"]
    assert res["accuracy"] is None and res["recommended"]["xnnpack"] is False


def test_bench_refuses_corrupt_bundle(copy_bundle):
    b = copy_bundle("onnx")
    flip_byte(b / "model.onnx")
    with pytest.raises(IntegrityError, match="model.onnx"):
        bench_bundle(b, **FAST)


# ---------------------------------------------------------------------------------------------
# run.py CLI from a copied bundle, with only the copied edgec_ondevice and no torch
# ---------------------------------------------------------------------------------------------
def run_py(bundle, *args, importtime=False):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    cmd = [sys.executable] + (["-X", "importtime"] if importtime else []) + ["run.py", *map(str, args)]
    return subprocess.run(cmd, cwd=bundle, capture_output=True, text=True, env=env, timeout=300)


def _imported_top_modules(stderr):
    mods = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            mods.add(name.split(".")[0])
    return mods


def test_run_py_verify_from_copied_bundle_without_torch(copy_bundle, tmp_path):
    b = copy_bundle("tflite-int8")
    out = tmp_path / "verify.json"
    p = run_py(b, "verify", "--json", out, importtime=True)
    assert p.returncode == 0, p.stderr[-2000:]
    mods = _imported_top_modules(p.stderr)
    assert "edgec_ondevice" in mods and "numpy" in mods and "ai_edge_litert" in mods
    assert not mods & {"torch", "tensorflow", "edgec", "litert_torch", "jax", "onnx", "sklearn"}, mods
    res = json.loads(out.read_text())
    assert res["ok"] and res["vectors"] == N_VECTORS
    assert res["system"]["numpy"] == np.__version__
    assert "edgec verify: OK" in p.stdout
    assert not list(b.rglob("__pycache__"))  # run.py leaves the bundle as exported


def test_run_py_bench_and_predict(copy_bundle, tmp_path):
    b = copy_bundle("onnx")
    out = tmp_path / "bench.json"
    p = run_py(b, "bench", "--warmup", 1, "--warmup-seconds", 0, "--runs", 10, "--min-seconds", 0,
               "--no-sweep", "--batch-sizes", "1,4", "--json", out, "--markdown")
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["schema"] == "edgec-bench" and len(res["settings"]) == 1
    assert "| setting |" in p.stdout
    x_raw = np.load(b / "eval.npz")["x"][:5]
    np.save(tmp_path / "x.npy", x_raw)
    p = run_py(b, "predict", tmp_path / "x.npy")
    assert p.returncode == 0, p.stderr
    lines = [ln.split("\t") for ln in p.stdout.strip().splitlines()]
    assert lines[0][:3] == ["index", "label", "class"]
    lines = lines[1:]
    assert [ln[0] for ln in lines] == ["0", "1", "2", "3", "4"]
    want = load_bundle(b).open_model().predict_raw(x_raw).argmax(1)
    assert [int(ln[2]) for ln in lines] == want.tolist()


def test_run_py_exit_codes_and_one_line_errors(copy_bundle, tmp_path):
    b = copy_bundle("tflite")
    flip_byte(b / "test_vectors.npz")
    p = run_py(b, "verify")
    assert p.returncode == 1 and "test_vectors.npz" in p.stderr and "Traceback" not in p.stderr

    b2 = copy_bundle("tflite", "b2")
    m = read_manifest(b2)
    m["schema_version"] = 7
    (b2 / "manifest.json").write_text(json.dumps(m))
    p = run_py(b2, "verify")
    assert p.returncode == 2 and "upgrade edgec" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr

    b3 = copy_bundle("tflite", "b3")
    (b3 / "manifest.json").unlink()
    p = run_py(b3, "bench")
    assert p.returncode == 2 and "no manifest.json" in p.stderr

    b4 = copy_bundle("tflite", "b4")
    mod = b4 / "edgec_ondevice" / "verify.py"
    mod.write_text(mod.read_text().replace("def verify_bundle(", "def verify_bundle((", 1))
    p = run_py(b4, "verify")
    assert p.returncode == 1 and "edgec_ondevice/verify.py" in p.stderr

    b5 = copy_bundle("tflite", "b5")
    p = run_py(b5, "bench", "--runs", "many")
    assert p.returncode == 2 and "usage" in p.stderr
    p = run_py(b5, "verify", "--provider", "cuda")
    assert p.returncode == 2 and "ONNX bundles" in p.stderr
    np.savez(tmp_path / "x.npz", x=np.zeros((2, 8, 8), np.uint8))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-m", "edgec_ondevice", "predict", str(tmp_path / "x.npz"), "--json", "-"],
                       cwd=b5, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert [q["index"] for q in json.loads(p.stdout)["predictions"]] == [0, 1]


def test_compare_outputs_nan_and_shape():
    r = compare_outputs(np.array([[np.nan, 0]], np.float32), np.zeros((1, 2), np.float32), 1e-3)
    assert not r["ok"] and r["failed_indices"] == [0]
    r = compare_outputs(np.zeros((2, 3)), np.zeros((2, 2)), 1e-3)
    assert not r["ok"] and "shape" in r["error"]
