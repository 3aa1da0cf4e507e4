"""Structured (channel) pruning against unstructured pruning: which one makes an int8 bundle faster.

    python benchmarks/structured.py [--data ../shared/data/mnist] [--json benchmarks/results/structured.json]

Data: MNIST, every image zero-padded from 28x28 to 32x32 (the input size of CIFAR-style edge models),
written to an .npz and read with ``--data npz:FILE``. Training uses a class-balanced random subset of
the 60,000 training images (``--train-samples``, default 5,000; 10% of it is the validation split)
so that the whole benchmark fits in about 20 minutes on 2 busy CPU cores; accuracy is always measured
on the **whole** 10,000-image test split (the bundle's int8 model in its runtime, at export).

Models: ``resnet8`` is the zoo's ``resnet-8`` (MLPerf Tiny's image-classification ResNet: residual
adds, strided 1x1 shortcuts, BatchNorm); ``mobilenet_v2`` is :func:`mobilenet_v2` below, a user factory
(``benchmarks.structured:mobilenet_v2``) stacking the MobileNetV2 inverted residual blocks of
``tests/fixtures/edge_models.py`` (1x1 expand x4, depthwise 3x3, 1x1 project, ReLU6, residual adds) at
CIFAR-style widths 16-24-32-64 (86k parameters, 5.7M MACs at 32x32). The fixture's own
``inverted_residual`` network (6k parameters) has no redundancy to prune: with 75% of its weights zero or
60% of its channels removed it fell to 35-40% accuracy and did not recover in retraining.
For each model three rpi (TFLite int8) bundles are built through ``edgec.api.build`` with one stage
cache, so all three start from the same trained model:

    dense         train -> export
    channels      train -> prune (mode = "channels", ratio 0.5 / 0.6, l2 importance, round_to 8, 2 steps) -> retrain -> export
    unstructured  train -> prune (mode = "layer", 75% of every conv/linear weight zero) -> retrain -> export

Latency: ``edgec bench`` (``edgec.benchmarking.run_bench``: threads x XNNPACK swept, the best
setting's p50 at batch 1; one thread, XNNPACK on/off) on this machine, all bundles of a model in one run; the channel-pruned
bundle is benched with ``--baseline`` (the speedup gate: the uncompressed model exported for the same
target in the same run) and checked against ``min_speedup = 2``. Because this machine's CPU has
AMX int8 tile instructions, XNNPACK runs these small int8 graphs in about 0.13 ms whatever their
size (per-operator overhead, not arithmetic, dominates), so the same bundles are also benched with
their own ``run.py bench`` on an emulated Raspberry Pi 4 core (qemu-user, Cortex-A72, ai-edge-litert
2.3, one thread, XNNPACK on/off): emulated time follows the instructions executed, so its ratios are
those of a compute-bound Arm core, while its absolute times are not a Pi's.

Targets (issue 14 B): per model, the channel-pruned bundle's p50 <= 0.5 x the dense bundle's at <= 1
point accuracy drop.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # fixtures.edge_models: the MobileNetV2 blocks
sys.path.insert(0, str(ROOT))  # benchmarks.structured:mobilenet_v2, imported by name as a user model

P50_TARGET = 0.5
DROP_TARGET = 0.01
MIN_SPEEDUP = 2.0
MODELS = {
    "resnet8": {"name": "resnet-8"},
    "mobilenet_v2": {"name": "benchmarks.structured:mobilenet_v2"},
}
RATIOS = {"resnet8": 0.5, "mobilenet_v2": 0.5}
TRAIN = {"resnet8": {"epochs": 6, "lr": 2e-3}, "mobilenet_v2": {"epochs": 6, "lr": 3e-3}}


def _mobilenet_v2_class():
    import torch
    from torch import nn

    from fixtures.edge_models import InvertedResidual, _conv_bn

    class MobileNetV2(nn.Module):
        def __init__(self, input_shape, num_classes):
            super().__init__()
            self.stem = _conv_bn(input_shape[0], 16, 3, 1, act=nn.ReLU6)
            self.blocks = nn.Sequential(*(InvertedResidual(a, b, s) for a, b, s in (
                (16, 24, 2), (24, 24, 1), (24, 32, 2), (32, 32, 1), (32, 64, 2), (64, 64, 1))))
            self.head = _conv_bn(64, 128, 1, act=nn.ReLU6)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(128, num_classes))

        def forward(self, x):
            return self.classifier(torch.flatten(self.pool(self.head(self.blocks(self.stem(x)))), 1))

    return MobileNetV2


_MOBILENET_V2 = []  # one class for every call: the architecture record compares module types


def mobilenet_v2(*, input_shape=(1, 32, 32), num_classes=10):
    """MobileNetV2 for 32x32 inputs from the fixtures' inverted residual blocks: stem 16, blocks 16->24 (/2),
    24->24, 24->32 (/2), 32->32, 32->64 (/2), 64->64, a 1x1 head of 128, global pooling, Dropout, linear."""
    if not _MOBILENET_V2:
        _MOBILENET_V2.append(_mobilenet_v2_class())
    return _MOBILENET_V2[0](input_shape, num_classes)


def _shown(path: Path) -> str:
    """The data folder as recorded in the JSON: relative to the repository, never this machine's path."""
    return os.path.relpath(Path(path).resolve(), ROOT)


def padded_mnist(data_dir: Path, train_samples: int, out: Path) -> str:
    """MNIST zero-padded to 32x32, a class-balanced random subset of the training images, the whole test split."""
    import numpy as np

    from edgec.base.data import load_dataset

    mnist = load_dataset(f"mnist:{data_dir}")
    x = np.concatenate([mnist.x_train, mnist.x_val])
    y = np.concatenate([mnist.y_train, mnist.y_val])
    rng = np.random.default_rng(0)
    per_class = train_samples // 10
    idx = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per_class] for c in range(10)]))
    pad = ((0, 0), (0, 0), (2, 2), (2, 2))
    np.savez(out, x_train=np.pad(x[idx], pad), y_train=y[idx], x_test=np.pad(mnist.x_test, pad), y_test=mnist.y_test)
    return (f"MNIST ({_shown(data_dir)}) zero-padded to 1x32x32: {len(idx):,} training images (class-balanced random subset of "
            f"60,000, seed 0; 10% held out for validation), accuracy on the whole 10,000-image test split")


def chains(ratio: float, train: dict, quick: bool) -> dict[str, list[dict]]:
    e = (lambda n: max(1, n // 3)) if quick else (lambda n: n)
    train = {"kind": "train", "epochs": e(train["epochs"]), "batch_size": 32, "lr": train["lr"], "patience": 20}
    # 2,048 calibration samples (export's default is 512): with 512 the int8 channel-pruned ResNet-8 agreed
    # with its fp32 model on 98.7% of the test split, and export refused it (the gate wants 99%).
    export = {"kind": "export", "calibration": {"samples": 2048}}
    return {
        "dense": [train, export],
        "channels": [train, {"kind": "prune", "mode": "channels", "ratio": ratio, "importance": "l2", "round_to": 8,
                             "steps": 2, "retrain": {"epochs": e(1), "lr": 1e-3, "patience": 5}},
                     {"kind": "retrain", "epochs": e(6), "lr": 1e-3, "patience": 10}, export],
        "unstructured": [train, {"kind": "prune", "mode": "layer", "sparsity": {"conv": 0.75, "linear": 0.75}, "steps": 1},
                         {"kind": "retrain", "epochs": e(3), "lr": 1e-3, "patience": 10}, export],
    }


def quick_target(path: Path) -> str:
    """--quick: the rpi profile with loose accuracy budgets (a model trained for seconds flips more int8
    top-1 predictions than export's gate allows); the full benchmark uses the built-in rpi target."""
    from edgec.targets.profile import load_target

    profile = load_target("rpi").model_dump(mode="json", exclude={"requirements_file"})
    profile["budgets"].update(min_agreement=0.5, max_accuracy_drop=0.5)
    value = lambda v: str(v).lower() if isinstance(v, bool) else json.dumps(v)  # noqa: E731 (TOML's basic values)
    lines = [f"{k} = {value(v)}" for k, v in profile.items() if v is not None and not isinstance(v, dict)]
    lines += ["[budgets]"] + [f"{k} = {value(v)}" for k, v in profile["budgets"].items() if v is not None]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def emulated_bench(python, bundle: Path, work: Path, quick: bool) -> dict:
    """The bundle's own `run.py bench` on the emulated Pi 4 core: 1 thread, XNNPACK on and off, best p50.
    Its exit code is 1 when the test vectors disagree with the runtime; the timing still stands."""
    result = work / "emulated.json"
    result.unlink(missing_ok=True)
    done = python.run(["run.py", "bench", "--runs", "10" if quick else "30", "--min-seconds", "0.5",
                       "--warmup", "3", "--warmup-seconds", "0", "--batch-sizes", "1", "--max-threads", "1",
                       "--no-accuracy", "--no-write-recommended", "--in-process", "--quiet", "--json", result],
                      cwd=bundle)
    if not result.is_file():
        return {"ok": False, "error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    r = json.loads(result.read_text())
    return {"ok": bool(r.get("ok")), "p50_ms": (r.get("best") or {}).get("p50_ms"), "best_setting": (r.get("best") or {}).get("id"),
            "settings": {s["id"]: (s.get("latency_ms") or {}).get("p50") for s in r.get("settings") or []},
            "vectors_ok": (r.get("vectors") or {}).get("ok"), "exit_code": done.returncode}


def emulated_rounds(python, bundles: dict, work: Path, quick: bool, console, label: str, rounds: int = 2) -> dict:
    """Each bundle's emulated ``run.py bench`` in ``rounds`` alternating rounds (A B, B A, ...), the lower
    p50 of each: a load spike on this shared machine inflates one round, not both.
    Returns ``{variant: {"runs": [...], "p50_ms": lowest p50 or None}}``."""
    out = {variant: {"runs": [], "p50_ms": None} for variant in bundles}
    for round_ in range(rounds):
        order = list(bundles.items())
        for variant, bundle in (order if round_ % 2 == 0 else order[::-1]):
            console.rule(f"{label}: emulated Pi 4 run.py bench {variant} (round {round_ + 1})")
            emu = emulated_bench(python, bundle, work, quick)
            console.print(emu)
            out[variant]["runs"].append(emu)
            p50s = [r["p50_ms"] for r in out[variant]["runs"] if r.get("p50_ms")]
            out[variant]["p50_ms"] = min(p50s) if p50s else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "mnist",
                        help="folder with the four MNIST IDX files (.gz or raw)")
    parser.add_argument("--json", type=Path, default=None,
                        help="result file (default benchmarks/results/structured.json; none with --quick)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--train-samples", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--no-emulate", action="store_true", help="skip the emulated Raspberry Pi 4 timing")
    parser.add_argument("--quick", action="store_true", help="a third of the epochs, 2,000 images, loose export gate: checks the script")
    parser.add_argument("--cache-dir", type=Path, default=None, help="stage cache (default: a fresh temporary one)")
    parser.add_argument("--out", type=Path, default=None, help="build folders (default: a temporary folder)")
    args = parser.parse_args()
    json_path = args.json or (None if args.quick else ROOT / "benchmarks" / "results" / "structured.json")
    if not args.data.is_dir():
        raise SystemExit(f"MNIST not found: {args.data} is not a directory; pass --data DIR")

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    from rich.console import Console

    from edgec.api import build
    from edgec.benchmarking import run_bench
    from edgec.budgets import check_budgets
    from edgec.base.errors import EdgecError
    from edgec.targets.profile import Budgets

    torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgec-structured-") as tmp:
        work = Path(tmp)
        cache = args.cache_dir or work / "cache"
        out_root = args.out or work / "out"
        data_file = work / "mnist32.npz"
        data_note = padded_mnist(args.data, 2000 if args.quick else args.train_samples, data_file)
        target = quick_target(work / "rpi.toml") if args.quick else "rpi"
        python = None
        if not args.no_emulate:
            from edgec.base.emulation import DEFAULT_CACHE_DIR, prepare_arm64_python

            python = prepare_arm64_python(DEFAULT_CACHE_DIR, "ai-edge-litert", progress=console.log)
        models: dict[str, dict] = {}
        gates: dict[str, dict] = {}
        for key in args.models:
            ratio = RATIOS[key]
            bundles, rows = {}, {}
            for variant, stages in chains(ratio, TRAIN[key], args.quick).items():
                console.rule(f"{key}: {variant}")
                config = {"data": {"source": f"npz:{data_file}"}, "model": MODELS[key], "stages": stages,
                          "seed": 0}
                try:
                    result = build(config, target=target, out=out_root / key / variant, cache_dir=cache, console=console)
                except EdgecError as e:  # export refused the bundle: record why, keep the other results
                    console.print(f"[red]{key} {variant}: {e}[/]")
                    rows[variant] = {**({"ratio": ratio} if variant == "channels" else {}), "error": str(e)}
                    continue
                bundles[variant] = result.bundle
                console.print(f"{key} {variant}: " + ", ".join(f"{st.id} {'cached' if st.cached else f'{st.seconds:.0f} s'}"
                                                             for st in result.stages))
                manifest = json.loads((result.bundle / "manifest.json").read_text())
                prune = next((s for s in result.stages if s.kind == "prune"), None)
                channels = (prune.info.get("channels") if prune else None) or {}
                rows[variant] = {
                    **({"ratio": ratio} if variant == "channels" else {}),
                    "accuracy": manifest["metrics"]["accuracy"],
                    "p50_ms": None,
                    "transport_bytes": manifest["size"]["transport_bytes"],
                    "model_bytes": manifest["size"]["model_bytes"],
                    "reference_accuracy": manifest["metrics"]["reference_accuracy"],
                    "params": result.stages[-1].info.get("params"),
                    "nonzero_params": result.stages[-1].info.get("nonzero_params"),
                    **({"macs": channels.get("macs", [None, None])[1], "macs_dense": channels.get("macs", [None])[0]}
                       if channels else {}),
                    "build_seconds": round(result.seconds, 1),
                }
            # Latency: every bundle of this model in one run, same harness and options.
            options = dict(warmup=10, runs=100, min_seconds=0.5, sweep=True, batch_sizes=[1], runtime=None,
                           max_threads=1, save_recommendation=False)
            if len(bundles) < 3:
                models[key] = rows
                continue
            for variant, bundle in bundles.items():
                console.rule(f"{key}: edgec bench {variant}{' --baseline' if variant == 'channels' else ''}")
                bench, text = run_bench(bundle, console, reference=False, markdown=False,
                                        trusted_model=MODELS[key]["name"], baseline=variant == "channels", **options)
                console.print(text)
                rows[variant]["p50_ms"] = bench["latency_ms"]["p50"]
                rows[variant]["best_setting"] = (bench.get("best") or {}).get("id")
                rows[variant]["settings_p50_ms"] = {s["id"]: (s.get("latency_ms") or {}).get("p50")
                                                    for s in bench.get("settings") or []}
                if variant == "channels":
                    manifest = json.loads((bundle / "manifest.json").read_text())
                    (row,) = [r for r in check_budgets(manifest, Budgets(min_speedup=MIN_SPEEDUP), bench)
                              if r["budget"] == "min_speedup"]
                    gates[key] = {"command": f"edgec bench BUNDLE --baseline --json B.json && edgec check BUNDLE "
                                             f"--bench B.json --min-speedup {MIN_SPEEDUP}",
                                  "min_speedup": MIN_SPEEDUP, "speedup_p50": row["actual"], "ok": row["ok"],
                                  "p50_ms": row.get("p50_ms"), "baseline_best_setting": bench["baseline"].get("best_setting")}
            if python is not None:
                for variant, emu in emulated_rounds(python, bundles, work, args.quick, console, key).items():
                    rows[variant].update(pi4_emulated=emu["runs"], p50_ms_pi4_emulated=emu["p50_ms"])
            dense, ch = rows["dense"], rows["channels"]
            for row in rows.values():
                row["p50_vs_dense"] = row["p50_ms"] / dense["p50_ms"] if dense["p50_ms"] else None
                if dense.get("p50_ms_pi4_emulated") and row.get("p50_ms_pi4_emulated"):
                    row["p50_vs_dense_pi4_emulated"] = row["p50_ms_pi4_emulated"] / dense["p50_ms_pi4_emulated"]
            drop = dense["accuracy"] - ch["accuracy"]
            rows["target"] = {
                "p50_ratio_max": P50_TARGET, "accuracy_drop_max": DROP_TARGET, "accuracy_drop": drop,
                "host": {"p50_ratio": ch["p50_vs_dense"], "ok": ch["p50_vs_dense"] <= P50_TARGET and drop <= DROP_TARGET},
                **({"pi4_emulated": {"p50_ratio": ch["p50_vs_dense_pi4_emulated"],
                                     "ok": ch["p50_vs_dense_pi4_emulated"] <= P50_TARGET and drop <= DROP_TARGET}}
                   if "p50_vs_dense_pi4_emulated" in ch else {}),
            }
            models[key] = rows

    from edgec.ondevice.machine import machine_info

    result = {
        "schema": "edgec-benchmark-structured", "schema_version": 1,
        "data": data_note,
        "models": models,
        "speedup_gate": gates,
        "target": "rpi (TFLite int8)",
        "timing": {
            "host": "edgec bench (edgec.benchmarking.run_bench): 1 thread (2 busy cores shared with other jobs), "
                    "XNNPACK on/off swept, each setting in a fresh process, 100+ runs and 0.5+ s at batch 1; p50 of the "
                    "best setting; all bundles of a model in one run",
            "pi4_emulated": "the bundle's own `run.py bench` under qemu-aarch64 -cpu cortex-a72 (ai-edge-litert 2.3, "
                            "Debian bookworm python3.11): 1 thread, XNNPACK on/off, best p50, the lower of two rounds; relative "
                            "figures only",
            "machine": machine_info(),
            "cpu_note": "the host CPU has AMX int8 (amx_int8, avx512_vnni): XNNPACK's int8 kernels leave per-operator "
                        "overhead as the cost of these graphs",
        },
        "threads": args.threads,
        "quick": args.quick,
        "seconds": round(time.perf_counter() - start, 1),
        "command": "python benchmarks/structured.py",
    }
    if json_path is not None:
        previous = json.loads(json_path.read_text()) if json_path.is_file() else {}
        if "qat" in previous:
            result["qat"] = previous["qat"]  # another benchmark fills it
        for section in ("models", "speedup_gate"):  # `--models X` redoes X and keeps the others' results
            result[section] = {**{k: v for k, v in (previous.get(section) or {}).items() if k in MODELS},
                               **result[section]}
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


def table(result: dict) -> str:
    head = "| model | bundle | accuracy | p50 host (ms) | vs dense | p50 Pi 4 emulated (ms) | vs dense | transport bytes |"
    lines = [head, "|" + "---|" * 8]
    for key, rows in result["models"].items():
        for variant in ("dense", "channels", "unstructured"):
            r = rows[variant]
            if "error" in r:
                lines.append(f"| {key} | {variant} | not built: {r['error'][:120]} | | | | | |")
                continue
            name = f"channels {r['ratio']}" if variant == "channels" else variant
            f = lambda v, p="{:.4f}": "-" if v is None else p.format(v)  # noqa: E731
            lines.append(f"| {key} | {name} | {100 * r['accuracy']:.2f}% | {f(r['p50_ms'])} | {f(r.get('p50_vs_dense'), '{:.2f}x')} "
                         f"| {f(r.get('p50_ms_pi4_emulated'), '{:.2f}')} | {f(r.get('p50_vs_dense_pi4_emulated'), '{:.2f}x')} "
                         f"| {r['transport_bytes']:,} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
