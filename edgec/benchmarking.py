"""Host side of ``edgec bench``: the on-device harness plus what needs the build machine.

- ``--reference``: the fp32 torch model that was exported (``OUT/<target>/reference.pt``) is timed in
  the same run on the same inputs, so the speedup is a ratio measured side by side;
- the reference is an edgec checkpoint; one that names a user factory is rebuilt only when the
  user names that factory (``--model``), like every file edgec reads;
- ``--baseline``: the uncompressed model (``OUT/<target>/uncompressed.pt``: the model before the
  first compression stage) is exported for the bundle's target with the same converter and
  precision and benched by the same harness in the same run; then both are timed in interleaved
  rounds at their best settings (``edgec.ondevice.paired``): ``baseline.speedup`` holds the per-round
  ratios, and its lower confidence bound is what the ``min_speedup`` budget checks
  (``baseline.speedup_p50``, the ratio of the two sweeps' p50s, is kept for reference);
- ``--compare``: ratios per figure between two bench results, regressions flagged.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from edgec.build_layout import REFERENCE_FILE, UNCOMPRESSED_FILE
from edgec.base.errors import InputError
from edgec.ondevice.integrity import MANIFEST_NAME, RECOMMENDED_NAME, SIGNATURE_NAME
from edgec.ondevice.paired import DEFAULT_ROUNDS

BENCH_SCHEMA = "edgec-bench"
BASELINE_CALIBRATION_SAMPLES = 512
PAIRED_ROUNDS = DEFAULT_ROUNDS  # interleaved rounds of --baseline timing (the prune stage's measure too)
# Figures compared by --compare: (path in the result, lower is better, regression threshold)
COMPARED = [
    ("latency_ms.p50", True, 0.10),
    ("latency_ms.p95", True, 0.10),
    ("latency_ms.p99", True, 0.20),
    ("load_ms", True, 0.25),
    ("first_inference_ms", True, 0.25),
    ("peak_rss_bytes", True, 0.10),
    ("size.model_bytes", True, 0.0),
    ("size.transport_bytes", True, 0.0),
    ("accuracy.accuracy", False, 0.0),
]


def run_bench(bundle: Path, console: Console, *, reference: bool, markdown: bool, trusted_model: str | None = None,
              baseline: bool = False, ops: bool = False, **options) -> tuple[dict, str]:
    from edgec.ondevice import bench_bundle, load_bundle, render_bench
    from edgec.ondevice.op_profile import profile_ops
    if baseline:
        _uncompressed_path(bundle)  # before the bundle's sweep: a missing file costs no time
    with console.status("benchmarking") as status:
        result = bench_bundle(str(bundle), progress=status.update, **options)
        if ops and result.get("recommended") is not None:
            status.update("timing each operator")
            result["ops_profile"] = profile_ops(load_bundle(str(bundle)), result["recommended"], options.get("runtime"))
        if baseline:
            result["baseline"] = bench_baseline(bundle, result, options, trusted_model, progress=status.update)
    if reference:
        result["reference"] = time_reference(bundle, result, options.get("warmup", 10), options.get("runs", 200), trusted_model)
        p50 = (result.get("latency_ms") or {}).get("p50")
        if p50:
            result["reference"]["speedup_p50"] = result["reference"]["latency_ms"]["p50"] / p50
    text = render_bench(result, markdown=markdown)
    if "reference" in result:
        ref = result["reference"]
        text += (
            f"\ntorch eager fp32 reference (same run, batch 1, {ref['threads']} thread(s)): p50 {ref['latency_ms']['p50']:.4f} ms"
            + (f" -> bundle is {ref['speedup_p50']:.1f}x faster at p50" if "speedup_p50" in ref else "")
        )
    if "baseline" in result:
        base = result["baseline"]
        text += (
            f"\nuncompressed model ({UNCOMPRESSED_FILE}, {base['precision']} for {base['target']}, same harness, same run): "
            + (f"p50 {base['p50_ms']:.4f} ms ({base['best_setting']}), bundle p50 {base['bundle_p50_ms']:.4f} ms -> "
               f"speedup {base['speedup_p50']:.2f}x at p50" if base.get("speedup_p50") else
               "not measured: " + "; ".join(base.get("errors") or ["no setting succeeded"])[:300])
        )
        paired = base.get("speedup")
        if paired:
            text += (f"\ninterleaved rounds ({paired['rounds']}, both models loaded, order alternating): speedup median "
                     f"{paired['median']:.2f}x, range {paired['min']:.2f}-{paired['max']:.2f}x, "
                     f"{paired['confidence']:.0%} lower bound {paired['lower_bound']:.2f}x (what --min-speedup judges)")
    return result, text


def bench_baseline(bundle: Path, result: dict, options: dict[str, Any], trusted_model: str | None = None,
                   progress=None) -> dict[str, Any]:
    """Export the uncompressed model for the bundle's target (same converter, same precision) into a
    temporary bundle and bench it with the same harness and options as the bundle itself."""
    from edgec.base.architecture import ModelTrust
    from edgec.base.checkpoint import load_checkpoint
    from edgec.ondevice import bench_bundle, load_bundle
    from edgec.ondevice.paired import paired_speedup

    model = load_checkpoint(_uncompressed_path(bundle)).build(ModelTrust(frozenset({trusted_model} if trusted_model else ())))
    with tempfile.TemporaryDirectory(prefix="edgec-baseline-") as tmp:
        if progress:
            progress("exporting the uncompressed model for the bundle's target")
        made = baseline_bundle(bundle, model, Path(tmp) / "bundle")
        opts = dict(options, save_recommendation=False)
        res = bench_bundle(str(Path(tmp) / "bundle"), progress=(lambda m: progress(f"baseline {m}")) if progress else None,
                           **opts)
        paired = None
        if res.get("ok") and result.get("ok"):
            if progress:
                progress(f"timing both models in {PAIRED_ROUNDS} interleaved rounds")
            paired = paired_speedup(load_bundle(str(Path(tmp) / "bundle")), res["recommended"], load_bundle(str(bundle)),
                                    result["recommended"], runtime=options.get("runtime"), rounds=PAIRED_ROUNDS,
                                    runs=max(10, int(options.get("runs", 100)) // 2),
                                    min_seconds=max(0.02, float(options.get("min_seconds", 1.0)) / 5))
    p50, bundle_p50 = (res.get("latency_ms") or {}).get("p50"), (result.get("latency_ms") or {}).get("p50")
    return {
        "model": UNCOMPRESSED_FILE, **made, "ok": bool(res.get("ok")),
        "p50_ms": p50, "bundle_p50_ms": bundle_p50,
        "speedup_p50": p50 / bundle_p50 if p50 and bundle_p50 else None,
        "speedup": paired,
        "best_setting": (res.get("best") or {}).get("id"),
        "latency_ms": res.get("latency_ms"), "load_ms": res.get("load_ms"), "peak_rss_bytes": res.get("peak_rss_bytes"),
        "accuracy": res.get("accuracy"), "size": {k: (res.get("size") or {}).get(k) for k in ("model_bytes", "transport_bytes")},
        "settings": [{"id": r.get("id"), "ok": r.get("ok"), "p50_ms": (r.get("latency_ms") or {}).get("p50")}
                     for r in res.get("settings") or []],
        "errors": res.get("errors") or [],
    }


def _uncompressed_path(bundle: Path) -> Path:
    path = bundle.parent / UNCOMPRESSED_FILE
    if not path.is_file():
        raise InputError(f"--baseline needs {path}, the model before the first compression stage (written by `edgec build` "
                         "beside the bundle; rebuild with this edgec version)")
    return path


def baseline_bundle(bundle: Path, model, out: Path) -> dict[str, Any]:
    """A copy of ``bundle`` whose model file is ``model`` exported like the bundle's (format and
    precision; int8 calibrated on the bundle's eval set, since the train split is not at hand):
    test vectors, transport payload and manifest rewritten to match. It exists to be timed."""
    import torch

    from edgec.ondevice import load_bundle
    from edgec.ondevice.preprocess import preprocess_raw
    from edgec.ondevice.runtimes import open_model
    from edgec.pipeline.algorithms.transport_codec import encode_transport
    from edgec.pipeline.manifest import output_tolerance, write_manifest
    from edgec.targets.onnx_export import export_onnx
    from edgec.targets.tflite_export import export_tflite

    source = load_bundle(str(bundle))
    source.require_intact()
    manifest = copy.deepcopy(source.manifest)
    precision, inp = manifest["precision"], manifest["inputs"][0]
    evalset = source.eval_set()
    if evalset is None:
        raise InputError(f"--baseline: {bundle} has no eval.npz to calibrate the uncompressed model with")
    x = preprocess_raw(evalset[0], manifest["preprocessing"], inp["shape"][1:], inp.get("layout"))
    calibration = x[np.linspace(0, len(x) - 1, min(len(x), BASELINE_CALIBRATION_SAMPLES)).astype(int)]
    shutil.copytree(bundle, out, ignore=shutil.ignore_patterns(MANIFEST_NAME, SIGNATURE_NAME, RECOMMENDED_NAME, "__pycache__"))
    model_path = out / manifest["model_file"]
    model_path.unlink()
    example = torch.from_numpy(calibration[:1])
    if source.runtime_name == "tflite":
        exported = export_tflite(model, example, model_path, precision=precision, calibration=calibration)
    else:
        method = (manifest.get("conversion") or {}).get("calibration_method", "minmax")
        exported = export_onnx(model, example, model_path, precision=precision, calibration=calibration,
                               calibration_method=method if method in ("minmax", "percentile", "entropy") else "minmax")
        for extra in manifest.get("extra_model_files") or []:
            (out / extra).unlink(missing_ok=True)
            export_onnx(model, example, out / extra, precision="fp32")
    vectors = source.test_vectors()
    if vectors is not None:
        runner = open_model(str(model_path), source.runtime_name, io_meta={"input": exported.inputs[0],
                                                                          "output": exported.outputs[0]})
        inputs = np.asarray(vectors["inputs"], dtype=np.float32)
        expected = runner.run_model_input(inputs)
        runner.close()
        with torch.no_grad():
            reference = model.eval()(torch.from_numpy(inputs)).numpy()
        np.savez_compressed(out / "test_vectors.npz", inputs=inputs, expected=expected, reference=reference)
    transport_file = (manifest.get("size") or {}).get("transport_file")
    if transport_file:
        (out / transport_file).write_bytes(encode_transport(model_path.read_bytes()))
    manifest.update(inputs=exported.inputs, outputs=exported.outputs, conversion=exported.conversion, lineage=[])
    manifest["tolerance"] = {**output_tolerance(exported, source.runtime_name),
                             **{k: v for k, v in manifest["tolerance"].items() if k not in ("atol", "runtimes")}}
    params = sum(p.numel() for p in model.parameters())
    manifest["size"] = {**manifest["size"], "reference_fp32_bytes": 4 * params, "model_bytes": model_path.stat().st_size,
                        **({"transport_bytes": (out / transport_file).stat().st_size} if transport_file else {})}
    write_manifest(out, manifest)
    return {"target": (manifest.get("target") or {}).get("name"), "format": source.runtime_name, "precision": precision,
            "params": params, "calibration": f"{len(calibration)} samples of the bundle's eval set"}


def time_reference(bundle: Path, result: dict, warmup: int, runs: int, trusted_model: str | None = None) -> dict[str, Any]:
    """Latency of the fp32 torch model at batch 1 with the best setting's thread count."""
    import torch

    from edgec.base.architecture import ModelTrust
    from edgec.base.checkpoint import load_checkpoint

    path = bundle.parent / REFERENCE_FILE
    if not path.is_file():
        raise InputError(f"--reference needs {path} (written by `edgec build` beside the bundle)")
    model = load_checkpoint(path).build(ModelTrust(frozenset({trusted_model} if trusted_model else ())))
    with np.load(bundle / "test_vectors.npz") as vectors:
        inputs = torch.from_numpy(vectors["inputs"][:1])
    threads = int((result.get("recommended") or {}).get("threads", 1))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(inputs)
            samples = []
            deadline = time.perf_counter() + 1.0
            while len(samples) < runs or time.perf_counter() < deadline:
                start = time.perf_counter_ns()
                model(inputs)
                samples.append((time.perf_counter_ns() - start) / 1e6)
    finally:
        torch.set_num_threads(previous)
    ms = np.asarray(samples)
    return {
        "runtime": f"torch {torch.__version__} eager fp32",
        "threads": threads,
        "latency_ms": {
            "runs": len(ms), "p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
            "p95": float(np.percentile(ms, 95)), "p99": float(np.percentile(ms, 99)),
            "mean": float(ms.mean()), "std": float(ms.std()), "min": float(ms.min()), "max": float(ms.max()),
        },
    }


def load_bench_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict) or data.get("schema") != BENCH_SCHEMA:
        raise InputError(f"{path} is not an edgec bench result (schema {data.get('schema') if isinstance(data, dict) else None!r}); make one with `edgec bench BUNDLE --json FILE`")
    if data.get("schema_version", 0) > 1:
        raise InputError(f"{path} has bench schema_version {data['schema_version']}; upgrade edgec to compare it")
    return data


def _get(data: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data if isinstance(data, (int, float)) else None


def compare_results(a_path: Path, b_path: Path) -> dict[str, Any]:
    """Ratios B / A for each figure; a figure worse by more than its threshold is a regression."""
    a, b = load_bench_json(a_path), load_bench_json(b_path)
    rows, regressions = [], []
    for figure, lower_is_better, threshold in COMPARED:
        va, vb = _get(a, figure), _get(b, figure)
        if va is None or vb is None:
            continue
        ratio = vb / va if va else None
        worse = (vb > va * (1 + threshold)) if lower_is_better else (vb < va * (1 - threshold) - 1e-12)
        row = {"figure": figure, "a": va, "b": vb, "ratio": ratio, "regression": bool(worse)}
        rows.append(row)
        if worse:
            regressions.append(row)
    return {"schema": "edgec-bench-compare", "schema_version": 1, "a": str(a_path), "b": str(b_path), "rows": rows, "regressions": regressions}


def render_comparison(comparison: dict[str, Any], markdown: bool) -> str:
    head = ["figure", "A", "B", "B/A", ""]
    lines = [[r["figure"], f"{r['a']:.6g}", f"{r['b']:.6g}", "-" if r["ratio"] is None else f"{r['ratio']:.3f}", "REGRESSION" if r["regression"] else ""] for r in comparison["rows"]]
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in [head, *lines])
