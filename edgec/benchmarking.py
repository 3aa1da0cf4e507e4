"""Host side of ``edgec bench``: the on-device harness plus what needs the build machine.

- ``--reference``: the fp32 torch model that was exported (``OUT/<target>/reference.pt``) is timed in
  the same run on the same inputs, so the speedup is a ratio measured side by side;
- the best runtime setting is written back into the manifest as ``runtime.recommended`` (the
  manifest is not in its own file table, so the bundle stays verifiable);
- ``--compare``: ratios per figure between two bench results, regressions flagged.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from edgec.errors import InputError

BENCH_SCHEMA = "edgec-bench"
REFERENCE_FILE = "reference.pt"
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


def run_bench(bundle: Path, console: Console, *, reference: bool, write_recommended: bool, markdown: bool, **options) -> tuple[dict, str]:
    from edgec.ondevice import bench_bundle, render_bench
    with console.status("benchmarking") as status:
        result = bench_bundle(str(bundle), progress=status.update, **options)
    if reference:
        result["reference"] = time_reference(bundle, result, options.get("warmup", 10), options.get("runs", 200))
        p50 = (result.get("latency_ms") or {}).get("p50")
        if p50:
            result["reference"]["speedup_p50"] = result["reference"]["latency_ms"]["p50"] / p50
    if write_recommended and result.get("ok") and result.get("recommended"):
        manifest_path = bundle / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["runtime"]["recommended"] = result["recommended"]
        manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    text = render_bench(result, markdown=markdown)
    if "reference" in result:
        ref = result["reference"]
        text += (
            f"\ntorch eager fp32 reference (same run, batch 1, {ref['threads']} thread(s)): p50 {ref['latency_ms']['p50']:.4f} ms"
            + (f" -> bundle is {ref['speedup_p50']:.1f}x faster at p50" if "speedup_p50" in ref else "")
        )
    return result, text


def time_reference(bundle: Path, result: dict, warmup: int, runs: int) -> dict[str, Any]:
    """Latency of the fp32 torch model at batch 1 with the best setting's thread count."""
    import torch

    from edgec.checkpoint import load_checkpoint

    path = bundle.parent / REFERENCE_FILE
    if not path.is_file():
        raise InputError(f"--reference needs {path} (written by `edgec build` beside the bundle)")
    model = load_checkpoint(path).build()
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
