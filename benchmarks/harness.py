"""Benchmark the benchmark harness, and every target's MNIST LeNet bundles against torch eager.

    python benchmarks/harness.py [--data ../shared/data/mnist] [--json benchmarks/results/harness.json]

1. The harness's own cost: the empty timed-loop iteration, and the p50 of a trivial model (an MLP with
   one hidden unit on 8x8 digits), i.e. the floor under every latency it reports.
2. LeNet-300-100 and LeNet-5 bundles for rpi, mobile and desktop-gpu, each benched with
   ``edgec bench --reference``: the bundle's best setting and the fp32 torch model are timed in the same
   run at batch 1, so the speedup is a ratio measured side by side. Speed does not depend on how well a
   model is trained, so these builds run ``train,export`` with few epochs (the compressed builds are in
   benchmarks/deep_compression.py). Target: the rpi int8 bundle of each >= 5x faster than torch eager.

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgec.ondevice.machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("rpi", "mobile", "desktop-gpu")
MODELS = {"lenet-300-100": 2, "lenet-5": 1}  # model -> training epochs (speed does not need more)
SPEEDUP_TARGET = 5.0


def edgec(*args, env) -> str:
    proc = subprocess.run([sys.executable, "-m", "edgec", *map(str, args)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"edgec {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def build_and_bench(work: Path, env, data: str, model: str, epochs: int, target: str, extra=()) -> dict:
    out = work / f"{model}-{target}"
    edgec("build", "--data", data, "--model", model, "--stages", "train,export", "--epochs", epochs,
          "--target", target, "--out", out, *extra, "--json", env=env)
    bundle = out / target / "bundle"
    result_file = out / "bench.json"
    edgec("bench", bundle, "--reference", "--runs", 300, "--min-seconds", 1, "--batch-sizes", "1,32",
          "--json", result_file, env=env)
    result = json.loads(result_file.read_text())
    manifest = json.loads((bundle / "manifest.json").read_text())
    return {
        "model": model,
        "target": target,
        "precision": manifest["precision"],
        "runtime": f"{result['runtime']['package']} {result['runtime']['version']}",
        "best": result["best"]["id"],
        "p50_ms": result["latency_ms"]["p50"],
        "p95_ms": result["latency_ms"]["p95"],
        "torch_p50_ms": result["reference"]["latency_ms"]["p50"],
        "speedup": result["reference"]["speedup_p50"],
        "model_bytes": manifest["size"]["model_bytes"],
        "accuracy": manifest["metrics"]["accuracy"],
        "settings": {s["id"]: s["latency_ms"]["p50"] for s in result["settings"] if s.get("ok")},
        "harness_overhead_ms": result["harness"]["overhead_ms_per_iteration"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "mnist")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "harness.json")
    args = parser.parse_args()
    if not (args.data / "train-images-idx3-ubyte.gz").is_file() and not (args.data / "train-images-idx3-ubyte").is_file():
        raise SystemExit(f"MNIST not found in {args.data}: pass --data DIR with the four IDX files")

    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgec-harness-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "EDGEC_CACHE_DIR": str(work / "cache")}
        trivial = build_and_bench(work, env, "digits", "mlp", 1, "rpi", ("--set", "model.args.widths=[1]", "--precision", "fp32"))
        for model, epochs in MODELS.items():
            for target in TARGETS:
                print(f"{model} {target} ...", file=sys.stderr, flush=True)
                rows.append(build_and_bench(work, env, f"mnist:{args.data}", model, epochs, target))

    header = f"{'model':14} {'target':12} {'precision':9} {'runtime':22} {'best setting':26} {'p50 ms':>9} {'p95 ms':>9} {'torch p50':>10} {'speedup':>8}"
    print(f"harness overhead per timed iteration: {trivial['harness_overhead_ms'] * 1e3:.3f} us; "
          f"trivial model p50 {trivial['p50_ms'] * 1e3:.2f} us ({trivial['runtime']}, {trivial['best']})")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:14} {r['target']:12} {r['precision']:9} {r['runtime']:22} {r['best']:26} "
              f"{r['p50_ms']:9.4f} {r['p95_ms']:9.4f} {r['torch_p50_ms']:10.4f} {r['speedup']:7.1f}x")
    verdicts = {r["model"]: r["speedup"] >= SPEEDUP_TARGET for r in rows if r["target"] == "rpi"}
    for model, ok in verdicts.items():
        print(f"rpi int8 {model}: {'PASS' if ok else 'FAIL'} (target >= {SPEEDUP_TARGET}x torch eager fp32 at batch 1)")
    seconds = time.perf_counter() - start
    print(f"total {seconds:.0f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "schema": "edgec-harness-benchmark", "schema_version": 1, "machine": machine_info(),
        "load_average": os.getloadavg(), "trivial": trivial, "rows": rows, "rpi_speedup_target": SPEEDUP_TARGET,
        "rpi_pass": verdicts, "seconds": seconds,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
