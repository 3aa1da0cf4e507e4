"""Compression that buys speed at the shapes users deploy: dense vs latency-pruned int8 bundles.

    python benchmarks/speed.py [--data ../shared/data/mnist] [--json benchmarks/results/speed.json] [--models ...]

Models (MLPerf Tiny's shapes, plus one big enough to be compute-bound on this host):

    mobilenet_v2_035_96   MobileNetV2 width 0.35 at 96x96x3 (visual wake words)   benchmarks.speed:mobilenet_v2_035
    resnet8_32            ResNet-8 at 32x32x3 (image classification)              the zoo's resnet-8
    ds_cnn_49x10          DS-CNN at 49x10x1 (keyword spotting)                    the zoo's ds-cnn
    resnet18_64           ResNet-18 (full width) at 64x64x3 (compute-bound)       benchmarks.speed:resnet18

Data: MNIST resized (bilinear) to each input shape, grey copied into every channel, uint8: a class-balanced
random subset of the training images (``--train-samples``, 10% of it validation unless the model's
``val_fraction`` says more) and of the test split (``--test-samples``). The accuracy is the data's, the latency the shape's.

For each model two rpi (TFLite int8) bundles come from one stage cache (same trained model):

    dense        train -> export
    compressed   train -> prune (mode = "channels", target_speedup, latency measured where the model's figure
                 is judged: latency_device "emulated-arm64" (the Pi 4 core) for the MLPerf Tiny shapes, "host" for the
                 compute-bound one) -> retrain -> export

Latency: the two bundles timed in interleaved rounds in one process (``edgec.ondevice.paired``, the
``bench --baseline`` method), 1 and 2 threads, XNNPACK on; ``speedup_host`` is the median of the
per-round ratios at 1 thread. ``speedup_pi_emulated``: both bundles' models in one qemu process
(Cortex-A72, ai-edge-litert, 1 thread, XNNPACK on) in 9 alternating rounds, the median of the per-round
p50 ratios (``pi4_emulated_paired``; relative figures only); ``pi4_emulated`` keeps each bundle's own
``run.py bench`` under qemu (XNNPACK on/off, best p50, the lower of two alternating rounds:
``benchmarks.structured.emulated_rounds``) as a cross-check: separate processes drift with the load.
``gate_runs``: the compute-bound model's compressed bundle (``target_speedup = 2``) checked 5 times with
``edgec bench --baseline`` + ``edgec check --min-speedup 2`` while another build runs beside it.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks.speed:... imported by name as user models

# device: where the prune stage's latency table is measured ("emulated-arm64": the Pi 4 core the rpi
# bundles are for; "host": this CPU). train_samples: fewer for the compute-bound model, whose every
# training image costs ~0.5 s on 2 shared cores (600 gave a 60-image validation split, where one image
# is 1.7 pt: more than the accuracy budget, and the export was refused). The MLPerf Tiny shapes train on
# more (ResNet-8: 4 ms an image; MobileNetV2: 17 ms): with 200 validation images the prune stage's
# 0.5 pt share of the budget was one image, and the prune stopped at 1.1x.
MODELS = {
    "mobilenet_v2_035_96": {"model": "benchmarks.speed:mobilenet_v2_035", "shape": (3, 96, 96), "target_speedup": 2.0,
                            "epochs": 5, "lr": 3e-3, "widths": [0.25], "device": "emulated-arm64", "train_samples": 6000,
                            "recovery_epochs": 5},
    "resnet8_32": {"model": "resnet-8", "shape": (3, 32, 32), "target_speedup": 2.0, "epochs": 6, "lr": 2e-3,
                   "device": "emulated-arm64", "train_samples": 10000, "recovery_epochs": 6},
    "ds_cnn_49x10": {"model": "ds-cnn", "shape": (1, 49, 10), "target_speedup": 2.0, "epochs": 4, "lr": 3e-3,
                     "device": "emulated-arm64"},
    # compute-bound: a stride-1 stem at 64x64 (2.2G MACs); ~0.13 s of one core per training image, so 2,500
    # images of which 20% validate (500: one image is 0.2 pt, well under the 1 pt budget)
    "resnet18_64": {"model": "benchmarks.speed:resnet18", "shape": (3, 64, 64), "target_speedup": 2.0, "epochs": 2,
                    "lr": 2e-3, "widths": [0.5, 0.25], "device": "host", "train_samples": 2500, "val_fraction": 0.2,
                    "test_samples": 1000, "recovery_epochs": 2},
}
COMPUTE_BOUND = "resnet18_64"
WIDTHS = [0.5, 0.25]  # latency table widths; MobileNetV2 (24 channel groups) measures one width only
# (conversions take 10-100 s each on this host); MobileNetV2's 0.25: every group at 0.5 is only 2.5x fewer MACs
GATE_RUNS, GATE_SPEEDUP = 5, 2.0
EMULATED_ROUNDS = 9  # paired rounds of the two bundles in one qemu process (an odd count: a true median)
TARGETS = {"mobilenet_v2_035_96": "speedup_pi_emulated", "resnet8_32": "speedup_pi_emulated", "resnet18_64": "speedup_host"}


# --- models ------------------------------------------------------------------------------------

def _divisible(v: float, d: int = 8) -> int:
    return max(d, int(v + d / 2) // d * d)


def mobilenet_v2_035(*, input_shape=(3, 96, 96), num_classes=10):
    """MobileNetV2 (Sandler et al. 2018) at width 0.35: expansion 6, ReLU6, residual adds, 1280 head."""
    from torch import nn

    def conv_bn(a, b, k, s, groups=1, act=True):
        layers = [nn.Conv2d(a, b, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(b)]
        return nn.Sequential(*layers, *([nn.ReLU6()] if act else []))

    class Block(nn.Module):
        def __init__(self, a, b, stride, expand):
            super().__init__()
            hidden = a * expand
            self.residual = stride == 1 and a == b
            self.body = nn.Sequential(*([conv_bn(a, hidden, 1, 1)] if expand != 1 else []),
                                      conv_bn(hidden, hidden, 3, stride, groups=hidden), conv_bn(hidden, b, 1, 1, act=False))

        def forward(self, x):
            return x + self.body(x) if self.residual else self.body(x)

    layers, c = [conv_bn(input_shape[0], _divisible(32 * 0.35), 3, 2)], _divisible(32 * 0.35)
    for t, channels, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                              (6, 320, 1, 1)):
        for i in range(n):
            out = _divisible(channels * 0.35)
            layers.append(Block(c, out, s if i == 0 else 1, t))
            c = out
    layers += [conv_bn(c, 1280, 1, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(1280, num_classes)]
    return nn.Sequential(*layers)


def resnet18(*, input_shape=(3, 64, 64), num_classes=10, widths=(64, 128, 256, 512)):
    """ResNet-18 (basic blocks 2-2-2-2, full width) for small inputs: a stride-1 3x3 stem, no max pool (the
    CIFAR / Tiny ImageNet variant). At 64x64: 2.2G MACs, dense int8 p50 ~7 ms at 1 thread on this host
    (a stride-2 stem: 1.2 ms, not compute-bound)."""
    from torch import nn

    from edgec.zoo import _BasicBlock  # the zoo's ResNet basic block

    layers = [nn.Conv2d(input_shape[0], widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
    c = widths[0]
    for i, w in enumerate(widths):
        layers += [_BasicBlock(c, w, 1 if i == 0 else 2), _BasicBlock(w, w, 1)]
        c = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
    return nn.Sequential(*layers)


# --- data and target ---------------------------------------------------------------------------

def resized_mnist(data_dir: Path, shape, train: int, test: int, out: Path, val_fraction: float) -> str:
    """MNIST resized to ``shape`` (C, H, W), uint8, class-balanced random subsets (seed 0)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from edgec.base.data import load_dataset

    mnist = load_dataset(f"mnist:{data_dir}")
    rng = np.random.default_rng(0)

    def subset(x, y, n):
        idx = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:n // 10] for c in range(10)]))
        small = torch.from_numpy(x[idx].astype(np.float32))
        big = F.interpolate(small, size=shape[1:], mode="bilinear", align_corners=False).clamp(0, 255).round()
        return big.repeat(1, shape[0], 1, 1).to(torch.uint8).numpy(), y[idx]

    x_train, y_train = subset(np.concatenate([mnist.x_train, mnist.x_val]), np.concatenate([mnist.y_train, mnist.y_val]), train)
    x_test, y_test = subset(mnist.x_test, mnist.y_test, test)
    np.savez(out, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return (f"MNIST ({os.path.relpath(data_dir.resolve(), ROOT)}) resized to {'x'.join(map(str, shape))}: {len(y_train):,} "
            f"training images ({val_fraction:.0%} validation), {len(y_test):,} test images, class-balanced random subsets (seed 0)")


def roomy_rpi_target(path: Path) -> str:
    """The rpi profile with size budgets a 2.8M-parameter model fits (the ResNet-18-style one)."""
    from edgec.targets.profile import load_target

    profile = load_target("rpi").model_dump(mode="json", exclude={"requirements_file"})
    profile["budgets"].update(max_model_bytes=50_000_000, max_transport_bytes=50_000_000, max_p95_ms=200.0)
    value = lambda v: str(v).lower() if isinstance(v, bool) else json.dumps(v)  # noqa: E731 (TOML's basic values)
    lines = [f"{k} = {value(v)}" for k, v in profile.items() if v is not None and not isinstance(v, dict)]
    for table in ("budgets", "budget"):
        if profile.get(table):
            lines += [f"[{table}]"] + [f"{k} = {value(v)}" for k, v in profile[table].items() if v is not None]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def chains(spec: dict) -> dict[str, list[dict]]:
    train = {"kind": "train", "epochs": spec["epochs"], "batch_size": 32, "lr": spec["lr"], "patience": 20}
    export = {"kind": "export", "calibration": {"samples": 1024}}
    prune = {"kind": "prune", "mode": "channels", "target_speedup": spec["target_speedup"],
             "latency_widths": spec.get("widths", WIDTHS), "latency_device": spec["device"], "round_to": 8,
             "retrain": {"epochs": spec.get("recovery_epochs", 2), "lr": 1e-3, "patience": 5}}
    retrain = {"kind": "retrain", "epochs": spec.get("recovery_epochs", 2), "lr": 5e-4, "patience": 10}
    return {"dense": [train, export], "compressed": [train, prune, retrain, export]}


# --- timing ------------------------------------------------------------------------------------

def paired(dense: Path, compressed: Path, threads: int, rounds: int) -> dict:
    from edgec.ondevice.manifest import load_bundle
    from edgec.ondevice.paired import paired_speedup

    settings = {"threads": threads, "xnnpack": True}
    r = paired_speedup(load_bundle(str(dense)), settings, load_bundle(str(compressed)), settings, rounds=rounds, runs=30,
                       min_seconds=0.2)
    return {"dense_p50_ms": r["slow_median_p50_ms"], "compressed_p50_ms": r["fast_median_p50_ms"], "speedup": r["median"],
            "lower_bound": r["lower_bound"], "spread": r["spread"], "rounds": r["rounds"]}


def emulated_paired(python, dense: Path, compressed: Path, rounds: int = EMULATED_ROUNDS) -> dict:
    """Both bundles' models in ONE qemu process (Cortex-A72, ai-edge-litert, 1 thread, XNNPACK on) in
    alternating rounds: the median of the per-round p50 ratios, and their spread. Separate processes
    (``run.py bench`` each) see qemu's speed drift with the host's load."""
    from edgec.base.emulation import emulated_round_p50s_ms
    from edgec.ondevice.manifest import load_bundle

    p50s = emulated_round_p50s_ms(python, [load_bundle(str(b)).model_path for b in (dense, compressed)], 1, warmup=5,
                                  rounds=rounds, runs=5)
    ratios = sorted(d / c for d, c in p50s)
    return {"rounds": rounds, "round_p50_ms": p50s, "speedup": ratios[len(ratios) // 2],
            "spread": ratios[-1] - ratios[0], "min_ratio": ratios[0],
            "dense_p50_ms": sorted(d for d, _ in p50s)[rounds // 2], "compressed_p50_ms": sorted(c for _, c in p50s)[rounds // 2]}


def macs_of(compressed, shape) -> tuple[int, int]:
    """(dense, compressed) multiply-accumulates: the uncompressed model the build keeps, and the prune stage's count."""
    import torch

    from edgec.base.architecture import ModelTrust, build
    from edgec.pipeline.algorithms.channels import model_cost

    arch = torch.load(compressed.build_dir / "uncompressed.pt", weights_only=True)["arch"]
    dense = model_cost(build(arch, ModelTrust(frozenset(m["model"] for m in MODELS.values()))), torch.zeros(1, *shape))["macs"]
    channels = next(s for s in compressed.stages if s.kind == "prune").info.get("channels")
    return dense, (channels["macs"][1] if channels else dense)


def gate_runs(bundle: Path, model_name: str, work: Path, background_config: Path) -> list[dict]:
    """`edgec bench --baseline` + `edgec check --min-speedup 2`, 5 times, another build running beside them."""
    edgec = [sys.executable, "-m", "edgec"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    beside = subprocess.Popen([*edgec, "build", "--config", str(background_config), "--target", "rpi", "--out",
                               str(work / "beside-out"), "--cache-dir", str(work / "beside-cache")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=work)
    runs = []
    try:
        for i in range(GATE_RUNS):
            bench = work / f"gate-{i}.json"
            subprocess.run([*edgec, "bench", str(bundle), "--baseline", "--model", model_name, "--no-sweep",
                            "--batch-sizes", "1", "--no-write-recommended", "--json", str(bench)],
                           capture_output=True, text=True, env=env, cwd=work)
            check = subprocess.run([*edgec, "check", str(bundle), "--bench", str(bench), "--min-speedup", str(GATE_SPEEDUP)],
                                   capture_output=True, text=True, env=env, cwd=work)
            base = json.loads(bench.read_text()).get("baseline", {}) if bench.is_file() else {}
            speed = base.get("speedup") or {}
            runs.append({"exit_code": check.returncode, "passed": check.returncode == 0,
                         "speedup_lower_bound": speed.get("lower_bound"), "speedup_median": speed.get("median"),
                         "beside_build_running": beside.poll() is None,
                         "failed": [ln for ln in check.stdout.splitlines() if "FAIL" in ln.upper()][:3]})
    finally:
        beside.terminate()
        beside.wait()
    return runs


def background_build_config(work: Path, data_file: Path) -> Path:
    path = work / "beside.toml"
    path.write_text(f'stages = ["train", "export"]\nseed = 1\n[data]\nsource = "npz:{data_file}"\n[model]\nname = "resnet-8"\n'
                    '[train]\nepochs = 50\npatience = 50\n')
    return path


# --- main --------------------------------------------------------------------------------------

def run_model(key: str, spec: dict, args, work: Path, target: str, python, console) -> tuple[dict, Path | None, dict | None]:
    from benchmarks.structured import emulated_rounds
    from edgec.api import build

    data_file = work / f"{key}.npz"
    note = resized_mnist(args.data, spec["shape"], spec.get("train_samples", args.train_samples),
                         spec.get("test_samples", args.test_samples), data_file, spec.get("val_fraction", 0.1))
    results = {}
    for variant, stages in chains(spec).items():
        console.rule(f"{key}: {variant}")
        config = {"data": {"source": f"npz:{data_file}", "val_fraction": spec.get("val_fraction", 0.1)}, "model": {"name": spec["model"]}, "stages": stages, "seed": 0}
        results[variant] = build(config, target=target, out=work / "out" / key / variant, cache_dir=args.cache_dir or work / "cache",
                                 console=console)
    dense, comp = (json.loads((results[v].bundle / "manifest.json").read_text()) for v in ("dense", "compressed"))
    prune = next(s for s in results["compressed"].stages if s.kind == "prune").info.get("latency", {})
    row = {"model": spec["model"], "input_shape": list(spec["shape"]), "data": note, "threads": 1,
           "target_speedup": spec["target_speedup"],
           "dense_accuracy": dense["metrics"]["accuracy"], "compressed_accuracy": comp["metrics"]["accuracy"],
           "drop_pt": round(100 * (dense["metrics"]["accuracy"] - comp["metrics"]["accuracy"]), 2),
           **dict(zip(("dense_macs", "compressed_macs"), macs_of(results["compressed"], spec["shape"]))),
           "dense_model_bytes": dense["size"]["model_bytes"], "compressed_model_bytes": comp["size"]["model_bytes"],
           "prune": {k: prune.get(k) for k in ("pruned", "reason", "best_speedup", "measured_speedup", "speedup_lower_bound",
                                                "target_met",
                                                "drop_pt", "chosen", "measured_on", "table_cached", "estimated_ms",
                                                "measured_ms", "path")},
           "latency_device": spec["device"],
           "latency_table": prune.get("table"), "build_seconds": {v: round(r.seconds, 1) for v, r in results.items()}}
    one = paired(results["dense"].bundle, results["compressed"].bundle, 1, args.rounds)
    two = paired(results["dense"].bundle, results["compressed"].bundle, 2, args.rounds)
    row.update(dense_p50_ms=one["dense_p50_ms"], compressed_p50_ms=one["compressed_p50_ms"], speedup_host=one["speedup"],
               host_1_thread=one, host_2_threads=two, speedup_host_2_threads=two["speedup"])
    row["speedup_pi_emulated"] = None
    if python is not None:
        emu = emulated_rounds(python, {v: results[v].bundle for v in ("dense", "compressed")}, work, True, console, key)
        row["pi4_emulated"] = emu
        if emu["dense"]["p50_ms"] and emu["compressed"]["p50_ms"]:
            emu["speedup_run_py"] = emu["dense"]["p50_ms"] / emu["compressed"]["p50_ms"]
        row["pi4_emulated_paired"] = emulated_paired(python, results["dense"].bundle, results["compressed"].bundle)
        row["speedup_pi_emulated"] = row["pi4_emulated_paired"]["speedup"]
    if key in TARGETS:
        figure = row[TARGETS[key]]
        row["target"] = {"figure": TARGETS[key], "min": 2.0, "max_drop_pt": 1.0,
                         "met": figure is not None and figure >= 2.0 and row["drop_pt"] <= 1.0}
    console.print({k: row[k] for k in ("dense_p50_ms", "compressed_p50_ms", "speedup_host", "speedup_pi_emulated", "drop_pt")})
    return row, results["compressed"].bundle, {"data_file": data_file}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "mnist")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "speed.json")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--train-samples", type=int, default=2000)
    parser.add_argument("--test-samples", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds per thread count")
    parser.add_argument("--no-emulate", action="store_true")
    parser.add_argument("--no-gate", action="store_true")
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"MNIST not found: {args.data} is not a directory; pass --data DIR")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    from rich.console import Console

    from edgec.ondevice.machine import machine_info
    from edgec.ondevice.op_profile import profile_ops
    from edgec.ondevice.manifest import load_bundle

    torch.set_num_threads(1)
    console = Console(stderr=True)
    start = time.perf_counter()
    previous = json.loads(args.json.read_text()) if args.json.is_file() else {}
    kept = {k: v for k, v in (previous.get("models") or {}).items() if k in MODELS}  # `--models X` redoes X only
    result = {"schema": "edgec-benchmark-speed", "schema_version": 1, "models": kept,
              "ops_profile": previous.get("ops_profile"), "gate_runs": previous.get("gate_runs")}
    with tempfile.TemporaryDirectory(prefix="edgec-speed-") as tmp:
        work = Path(tmp)
        target = roomy_rpi_target(work / "rpi.toml")
        python = None
        if not args.no_emulate:
            from edgec.base.emulation import DEFAULT_CACHE_DIR, prepare_arm64_python

            python = prepare_arm64_python(DEFAULT_CACHE_DIR, "ai-edge-litert", progress=console.log)
        for key in args.models:
            row, bundle, extra = run_model(key, MODELS[key], args, work, target, python, console)
            result["models"][key] = {**row, "machine": machine_info()}  # rows kept from other runs keep theirs
            _write(args.json, result, start)  # the row is kept even if the profile or the gate runs are cut short
            if key == COMPUTE_BOUND:
                result["ops_profile"] = {"bundle": f"{key} compressed", **profile_ops(
                    load_bundle(str(bundle)), {"threads": 1, "xnnpack": True}, runs=20)}
                if not args.no_gate:
                    result["gate_runs"] = {
                        "command": f"edgec bench BUNDLE --baseline --no-sweep --json B.json && edgec check BUNDLE --bench "
                                   f"B.json --min-speedup {GATE_SPEEDUP}", "beside": "edgec build of resnet-8 (train 50 "
                                   "epochs) running in another process",
                        "runs": gate_runs(bundle, MODELS[key]["model"], work, background_build_config(work, extra["data_file"]))}
                    result["gate_runs"]["passed"] = sum(r["passed"] for r in result["gate_runs"]["runs"])
            _write(args.json, result, start)
    print(table(result))


def _write(path: Path, result: dict, start: float) -> None:
    """``machine`` is the last run's; each row has the machine it ran on."""
    from edgec.ondevice.machine import machine_info

    result.update(machine=machine_info(), command="python benchmarks/speed.py",
                  timing="host: interleaved rounds of both bundles in one process (edgec.ondevice.paired), XNNPACK on; "
                         "speedup = median of per-round p50 ratios. speedup_pi_emulated (pi4_emulated_paired): both "
                         "bundles' models in one qemu-aarch64 -cpu cortex-a72 process, 1 thread, XNNPACK on, alternating "
                         "rounds, median per-round p50 ratio; pi4_emulated: each bundle's run.py bench under qemu (best "
                         "setting that reproduces the test vectors, lower p50 of two alternating rounds) as a "
                         "cross-check; relative figures only",
                  seconds_last_run=round(time.perf_counter() - start, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


def table(result: dict) -> str:
    f = lambda v, p="{:.2f}": "-" if v is None else p.format(v)  # noqa: E731
    lines = ["| model | dense p50 ms | compressed p50 ms | speedup host | speedup Pi 4 emulated | drop pt | MACs dense -> compressed |",
             "|---|---|---|---|---|---|---|"]
    for key, r in result["models"].items():
        lines.append(f"| {key} | {f(r['dense_p50_ms'], '{:.3f}')} | {f(r['compressed_p50_ms'], '{:.3f}')} | "
                     f"{f(r['speedup_host'])}x | {f(r['speedup_pi_emulated'])}x | {r['drop_pt']:.2f} | "
                     f"{r['dense_macs']:,} -> {r['compressed_macs']:,} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
