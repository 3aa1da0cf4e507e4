"""edgec search on LeNet-300-100 / MNIST: 12 trials embedded and on a local 2-CPU Ray cluster.

    python benchmarks/search.py [--data ../shared/data/mnist] [--json benchmarks/results/search.json]
                                [--keep DIR] [--config examples/search-lenet-300-100.toml]

1. Builds examples/mnist-lenet-300-100.toml for rpi through the CLI (1 torch thread), the hand-tuned
   reference: its error (int8 TFLite, 10,000 test images) and ratio (fp32 bytes / transport bytes).
   Its trained model is the common prefix of every trial; each search below starts from a fresh stage
   cache holding that one entry ("reuse the trained model via the cache"), so the searches time pruning,
   retraining, sharing, export, the validation accuracy and the latency of all their trials.
2. `edgec search --config examples/search-lenet-300-100.toml --data mnist:DIR --target rpi` embedded,
   then the same with `--ray --ray-cpus 2` (Ray Tune, a trial per CPU), each timed end to end.
3. Compares them: the same trials (ids), the same figures (accuracy, bytes), the same Pareto front.

Targets: the front holds a point at least as good as the example on both error and compression ratio;
the Ray and serial fronts are identical. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgec.ondevice.machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mnist"
EXAMPLE = "examples/mnist-lenet-300-100.toml"
SEARCH = "examples/search-lenet-300-100.toml"
RAY_CPUS = 2


def edgec(*args, env: dict, log: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "edgec", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    log.write_text(f"$ edgec {' '.join(map(str, args))}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    if proc.returncode != 0:
        raise SystemExit(f"edgec {' '.join(map(str, args))} exited {proc.returncode} (log: {log}):\n{proc.stderr[-3000:]}")
    return proc


def build_example(work: Path, data: Path, env: dict) -> dict:
    out, cache = work / "example", work / "seed-cache"
    start = time.perf_counter()
    edgec("build", "--config", EXAMPLE, "--data", f"mnist:{data}", "--target", "rpi", "--out", out,
          "--cache-dir", cache, "--json", env={**env, "OMP_NUM_THREADS": "1"}, log=work / "example.log")
    seconds = time.perf_counter() - start
    build = json.loads((out / "rpi" / "build.json").read_text())
    manifest = json.loads((out / "rpi" / "bundle" / "manifest.json").read_text())
    size = manifest["size"]
    train = build["stages"][0]
    assert train["kind"] == "train"
    return {"seconds": round(seconds, 1), "train_entry": cache / "train" / train["key"],
            "keys": [s["key"] for s in build["stages"]],
            "error": round(100 * (1 - manifest["metrics"]["accuracy"]), 2),
            "ratio": round(size["reference_fp32_bytes"] / size["transport_bytes"], 2),
            "transport_bytes": size["transport_bytes"], "accuracy": manifest["metrics"]["accuracy"]}


def run_search(work: Path, name: str, data: Path, env: dict, seed_entry: Path, extra=()) -> tuple[dict, float]:
    cache = work / f"cache-{name}"
    shutil.rmtree(cache, ignore_errors=True)
    shutil.copytree(seed_entry, cache / "train" / seed_entry.name)  # only the trained model
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    print(f"search {name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = edgec("search", "--config", SEARCH, "--data", f"mnist:{data}", "--target", "rpi", "--out", out,
                 "--cache-dir", cache, "--json", *extra, env=env, log=work / f"search-{name}.log")
    seconds = time.perf_counter() - start
    print(f"  {seconds:.0f} s", file=sys.stderr, flush=True)
    return json.loads(proc.stdout), seconds


def front(summary: dict, target: str = "rpi") -> list[dict]:
    by_id = {t["id"]: t for t in summary["trials"]}
    rows = []
    for tid in summary["targets"][target]["pareto"]:
        t = by_id[tid]
        m = t["targets"][target]["metrics"]
        rows.append({"trial": t["number"], "id": tid, "config": t["point"], "accuracy": m["test_accuracy"],
                     "val_accuracy": m["accuracy"], "transport_bytes": m["transport_bytes"], "p50_ms": m["p50_ms"],
                     "error": round(100 * (1 - m["test_accuracy"]), 2), "ratio": round(m["ratio"], 2),
                     "best_toml": t["targets"][target]["best"]})
    return rows


def figures(summary: dict, target: str = "rpi") -> dict:
    keep = ("accuracy", "test_accuracy", "transport_bytes", "model_bytes")
    return {t["id"]: {k: t["targets"][target]["metrics"].get(k) for k in keep} for t in summary["trials"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MNIST IDX folder (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "search.json")
    parser.add_argument("--keep", type=Path, help="keep builds, caches and logs in this folder (default: a temp dir)")
    args = parser.parse_args(argv)
    data = args.data.resolve()
    if not (data / "train-images-idx3-ubyte.gz").is_file() and not (data / "train-images-idx3-ubyte").is_file():
        print(f"skipped: MNIST not found at {data}; pass --data DIR", file=sys.stderr)
        return 0

    env = {**os.environ, "COLUMNS": "160", "OMP_WAIT_POLICY": "PASSIVE", "TF_CPP_MIN_LOG_LEVEL": "2"}
    load_start = os.getloadavg()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgec-search-bench-") as tmp:
        work = args.keep.resolve() if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print("building the example (train once: the trials' common prefix) ...", file=sys.stderr, flush=True)
        example = build_example(work, data, env)
        print(f"  {example['seconds']:.0f} s: error {example['error']}%, {example['ratio']}x", file=sys.stderr, flush=True)
        serial, serial_s = run_search(work, "serial", data, env, example["train_entry"])
        ray, ray_s = run_search(work, "ray", data, env, example["train_entry"], ("--ray", "--ray-cpus", RAY_CPUS))

    serial_front, ray_front = front(serial), front(ray)
    identical_trials = [t["id"] for t in serial["trials"]] == [t["id"] for t in ray["trials"]]
    identical_figures = figures(serial) == figures(ray)
    identical_pareto = [r["id"] for r in serial_front] == [r["id"] for r in ray_front]
    ex = {"error": example["error"], "ratio": example["ratio"]}
    as_good = [r for r in serial_front if r["error"] <= ex["error"] and r["ratio"] >= ex["ratio"]]
    # the front point reported against the example: the smallest error among those at least as good
    # on both figures (else the largest ratio among those at least as accurate, else the best.toml pick)
    pick = (min(as_good, key=lambda r: (r["error"], -r["ratio"])) if as_good else
            max((r for r in serial_front if r["error"] <= ex["error"]), key=lambda r: r["ratio"], default=None)
            or next((r for r in serial_front if r["best_toml"]), serial_front[0] if serial_front else None))
    best_toml = next((r for r in serial_front if r["best_toml"]), None)
    example_trial = next((t for t in serial["trials"] if [s["key"] for s in t["targets"]["rpi"]["stages"]] == example["keys"]), None)
    result = {
        "benchmark": "search",
        "command": f"edgec search --config {SEARCH} --data mnist:DIR --target rpi [--ray --ray-cpus {RAY_CPUS}]",
        "trials": len(serial["trials"]),
        "serial_seconds": round(serial_s, 1),
        "ray_seconds": round(ray_s, 1),
        "ray_cpus": RAY_CPUS,
        "cache_stage_runs_saved": serial["cache"]["stage_runs_saved"],
        "identical_pareto": identical_pareto and identical_trials,
        "pareto": [{k: r[k] for k in ("config", "accuracy", "transport_bytes", "p50_ms", "val_accuracy", "error", "ratio", "trial")}
                   for r in serial_front],
        "best_vs_example": {"example": ex, "best": {"error": pick["error"], "ratio": pick["ratio"], "trial": pick["trial"],
                                                    "config": pick["config"]} if pick else None},
        "target_met": {"front_at_least_as_good_as_example": bool(as_good), "identical_pareto": identical_pareto},
        "details": {
            "units": "error in % of the 10,000 MNIST test images (int8 TFLite in its runtime); ratio = fp32 bytes / transport bytes; "
                     "accuracy = test (reported), val_accuracy = validation (what the front is ranked on)",
            "identical_trials": identical_trials, "identical_figures": identical_figures,
            "ray_pareto": [r["id"] for r in ray_front], "serial_pareto": [r["id"] for r in serial_front],
            "stage_cache": {"serial": serial["cache"], "ray": ray["cache"]},
            "example": {k: v for k, v in example.items() if k not in ("train_entry", "keys")},
            "example_point_in_grid": {"trial": example_trial["number"],
                                      "error": round(100 * (1 - example_trial["targets"]["rpi"]["metrics"]["test_accuracy"]), 2),
                                      "same_cache_keys_as_the_example_build": True} if example_trial else None,
            "best_toml": {"rule": serial["search"]["best_rule"]["text"], "trial": best_toml["trial"], "error": best_toml["error"],
                          "ratio": best_toml["ratio"], "config": best_toml["config"]} if best_toml else None,
            "ray": ray.get("ray"),
            "latency_tolerance": serial["search"]["latency_tolerance"],
            "p50_ms_serial_vs_ray": {t["id"]: [t["targets"]["rpi"]["metrics"]["p50_ms"], u["targets"]["rpi"]["metrics"]["p50_ms"]]
                                     for t, u in zip(serial["trials"], ray["trials"]) if t["targets"]["rpi"]["metrics"]},
            "machine": machine_info(),
            "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
            "total_seconds": round(time.perf_counter() - start, 1),
        },
    }

    print(f"{'#':>3} {'point':58} {'val acc':>8} {'error %':>8} {'transport B':>12} {'ratio':>7} {'p50 us':>7}")
    for r in serial_front:
        point = ", ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in r["config"].items())
        print(f"{r['trial']:>3} {point:58} {100 * r['val_accuracy']:8.2f} {r['error']:8.2f} {r['transport_bytes']:12,} "
              f"{r['ratio']:6.1f}x {r['p50_ms'] * 1e3:7.2f}{'  best.toml' if r['best_toml'] else ''}")
    print(f"example {EXAMPLE}: error {ex['error']}%, {ex['ratio']}x; front point at least as good on both: "
          f"{'yes' if as_good else 'NO'}" + (f" (trial {pick['trial']}: {pick['error']}%, {pick['ratio']}x)" if as_good else ""))
    print(f"{result['trials']} trials: serial {serial_s:.0f} s, Ray ({RAY_CPUS} CPUs) {ray_s:.0f} s; identical front: "
          f"{'yes' if identical_pareto else 'NO'} (trials {'identical' if identical_trials else 'DIFFER'}, figures "
          f"{'identical' if identical_figures else 'DIFFER'}); stage runs saved by the cache: {result['cache_stage_runs_saved']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)
    return 0 if all(result["target_met"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
