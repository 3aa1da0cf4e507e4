"""The ``edgec`` command line.

Known errors (:class:`edgec.errors.EdgecError`) print one line and exit with their code (2 for bad
usage, config or input; 1 for a failed run). ``--debug`` anywhere on the command line shows the
traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any, Optional

import click
import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import ConfigError, EdgecError, RunError
from .ondevice.errors import BundleError

app = typer.Typer(
    name="edgec",
    help="Compress PyTorch models and ship verified bundles to Raspberry Pi, mobile and desktop GPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"edgec {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
) -> None:
    """edgec: train -> prune -> retrain -> share -> distill -> export, cached stage by stage."""


def _parse_set(items: list[str]) -> dict[str, Any]:
    """``--set train.lr=0.01``: the value is read as a TOML value, or as a string if that fails."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=10")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value
    return out


@app.command()
def build(
    target: Annotated[Optional[str], typer.Option("--target", "-t", help="Built-in target (see `edgec targets`) or a board.toml path. Default: rpi.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="Config file. Default: ./edgec.toml when present.")] = None,
    data: Annotated[Optional[str], typer.Option(help="digits (built in, default) | mnist:DIR | npz:FILE | folder:DIR")] = None,
    model: Annotated[Optional[str], typer.Option(help="Zoo model (lenet-300-100, lenet-5, mlp, cnn-small; default cnn-small) or package.module:factory.")] = None,
    weights: Annotated[Optional[Path], typer.Option(help="Initial weights: an edgec checkpoint (no --model needed) or a plain state dict.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder; the build lands in OUT/<target>/. Default: ./edgec-out.")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Stage cache. Default: $EDGEC_CACHE_DIR or ~/.cache/edgec.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for initialisation, shuffling and augmentation. Default: 0.")] = None,
    stages: Annotated[Optional[str], typer.Option(help="Comma-separated stage list, e.g. train,export.")] = None,
    precision: Annotated[Optional[str], typer.Option(help="Precision of the shipped model: int8, fp16 or fp32. Default: the target's.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs (train stage).")] = None,
    augment: Annotated[Optional[bool], typer.Option("--augment/--no-augment", help="Random shifts and rotations while training.")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="Override any config key: --set train.lr=0.01 (repeatable).")] = [],
    force: Annotated[Optional[str], typer.Option(help="Rerun this stage and every stage after it, ignoring the cache.")] = None,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the resolved config as JSON and exit.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the build summary as JSON on stdout (progress goes to stderr).")] = False,
) -> None:
    """Build a deployable bundle for a target."""
    from .build import build as run_build
    from .config import load_config

    overrides: dict[str, Any] = {}
    for key, value in (
        ("target", target), ("data.source", data), ("model.weights", weights), ("out", out),
        ("cache_dir", cache_dir), ("seed", seed), ("train.epochs", epochs), ("train.augment.enabled", augment),
        ("export.precision", precision),
    ):
        if value is not None:
            overrides[key] = str(value) if isinstance(value, Path) else value
    if model is not None:
        overrides["model.name"] = model
    elif weights is not None:
        overrides["model.name"] = None  # an edgec checkpoint names its own model
    if stages is not None:
        overrides["stages"] = [s.strip() for s in stages.split(",") if s.strip()]
    overrides.update(_parse_set(set_))
    cfg = load_config(config, overrides)
    if print_config:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return
    # Logs and pipes get 120 columns (rich would use 80), so the summary table is not truncated.
    console = Console(stderr=json_out, width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 120)
    result = run_build(cfg, console, force=force)
    report_path = _write_build_report(result.build_dir, console)
    if json_out:
        print(json.dumps({"build_dir": str(result.build_dir), "seconds": round(result.seconds, 2),
                          "report": str(report_path) if report_path else None, **result.summary}, indent=2))
        return
    _print_summary(console, result)
    if report_path:
        console.print(f"report {report_path}")


def _write_build_report(build_dir: Path, console: Console) -> Path | None:
    """report.html / report.md beside the bundle; a report problem never fails a finished build."""
    from .report import write_report

    try:
        return write_report(build_dir)["html"]
    except Exception as e:  # the bundle is already published; the report is a convenience
        console.print(f"[yellow]report not written[/]: {type(e).__name__}: {e}")
        return None


def _print_summary(console: Console, result) -> None:
    table = Table(title=f"edgec build: {result.summary['target']}", show_edge=False)
    for col in ("stage", "status", "accuracy", "params", "non-zero", "fp32 bytes", "model bytes", "transport bytes", "seconds"):
        table.add_column(col, justify="left" if col in ("stage", "status") else "right", no_wrap=True)
    rows = [("source", "-", result.summary["source"])] + [
        (s["stage"], "cached" if s["cached"] else "ran", s["info"] | {"seconds": s["seconds"]})
        for s in result.summary["stages"]
    ]
    for name, status, info in rows:
        table.add_row(
            name,
            status,
            _fmt(info.get("accuracy"), "{:.4f}"),
            _fmt(info.get("params"), "{:,}"),
            _fmt(info.get("nonzero_params"), "{:,}"),
            _fmt(info.get("fp32_bytes"), "{:,}"),
            _fmt(info.get("model_bytes"), "{:,}"),
            _fmt(info.get("transport_bytes"), "{:,}"),
            _fmt(info.get("seconds"), "{:.1f}"),
        )
    console.print(table)
    ran = sum(not s["cached"] for s in result.summary["stages"])
    console.print(f"[bold green]done[/] in {result.seconds:.1f} s ({ran} stage(s) ran) -> {result.build_dir}")


def _fmt(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


@app.command()
def targets(
    json_out: Annotated[bool, typer.Option("--json", help="Print the profiles as JSON.")] = False,
) -> None:
    """List the built-in targets and their budgets."""
    from edgec.targets.profile import builtin_targets

    profiles = builtin_targets()
    if json_out:
        print(json.dumps({k: p.model_dump(mode="json") for k, p in profiles.items()}, indent=2))
        return
    table = Table(show_edge=False)
    for col in ("target", "format", "precision", "arch", "budgets", "description"):
        table.add_column(col)
    for p in profiles.values():
        budgets = ", ".join(f"{k}={v}" for k, v in p.budgets.model_dump().items() if v is not None)
        table.add_row(p.name, p.format, p.precision, p.arch, budgets, p.description)
    Console().print(table)


def _configure_libraries() -> None:
    """Before torch is imported: OpenMP threads sleep instead of spinning when they wait (on a busy
    2-core machine spinning made a LeNet-5 epoch 10x slower); TensorFlow Lite / oneDNN keep their
    C++ INFO lines to themselves."""
    import logging
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    _configure_libraries()
    try:
        code = app(standalone_mode=False)
    except (EdgecError, BundleError) as e:  # both carry their exit code; BundleError comes from the runner
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # a bug: still one line unless --debug
        if debug:
            raise
        print(f"error: internal error {type(e).__name__}: {e} (rerun with --debug and report it)", file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


@app.command()
def report(
    build_dir: Annotated[Path, typer.Argument(help="Build directory (OUT/<target>/) written by `edgec build`.")],
    bench_result: Annotated[Optional[Path], typer.Option("--bench", help="A bench JSON (edgec bench --json) for the latency plot and the p95 budget. Default: BUILD_DIR/bench.json when present.")] = None,
) -> None:
    """Write report.html (self-contained) and report.md (+ report/*.png) into a build directory."""
    from .report import write_report

    paths = write_report(build_dir, bench=bench_result)
    console = Console()
    console.print(f"report {paths['html']}")
    console.print(f"       {paths['markdown']} (plots in {paths['assets']}/)")


@app.command()
def verify(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory (OUT/<target>/bundle).")],
    exact: Annotated[bool, typer.Option(help="Demand bit-identical outputs instead of the manifest's tolerance.")] = False,
    runtime: Annotated[Optional[str], typer.Option(help="Force a runtime package: ai-edge-litert, tflite-runtime or onnxruntime.")] = None,
    emulate: Annotated[Optional[str], typer.Option(help="Run the check on an emulated device: arm64 (Raspberry Pi OS bookworm under qemu-user).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the result as JSON to this file ('-' for stdout).")] = None,
) -> None:
    """Check every file's sha256, the transport payload, load the model in its runtime, reproduce the test vectors, measure accuracy."""
    from edgec.ondevice import render_verify, verify_bundle

    console = Console(stderr=json_out is not None and str(json_out) == "-")
    if emulate is not None:
        results = _verify_emulated(bundle, emulate, console)
    else:
        results = [verify_bundle(str(bundle), exact=exact, runtime=runtime)]
    for result in results:
        _echo(render_verify(result), json_out)
    _write_json(json_out, results[0] if len(results) == 1 else {"schema": "edgec-verify-emulated", "runs": results})
    failed = [r for r in results if not r["ok"]]
    if failed:
        raise RunError("verify failed: " + "; ".join(e for r in failed for e in r.get("errors", [])[:3]))


def _verify_emulated(bundle: Path, emulate: str, console: Console) -> list[dict]:
    """arm64: for int8 bundles ai-edge-litert must reproduce the build's outputs bit for bit;
    tflite-runtime (whose kernels may round an int8 output one step differently) and float models
    (whose last bits differ between x86 and Arm) are checked within the manifest's tolerance.
    Top-1 predictions must equal the build machine's in every case."""
    from edgec.emulation import DEFAULT_CACHE_DIR, verify_bundle_emulated
    from edgec.ondevice import load_bundle

    if emulate != "arm64":
        raise ConfigError(f"--emulate {emulate!r}: only arm64 is supported")
    loaded = load_bundle(str(bundle))
    if loaded.runtime_name != "tflite":
        raise ConfigError("--emulate arm64 checks TFLite bundles (rpi, mobile); this bundle is for onnxruntime")
    int8 = loaded.manifest["outputs"][0]["dtype"] == "int8"
    results = []
    with console.status("preparing emulated arm64 userland") as status:
        for runtime, exact in (("ai-edge-litert", int8), ("tflite-runtime", False)):
            result = verify_bundle_emulated(bundle, DEFAULT_CACHE_DIR, runtime, progress=status.update, exact=exact)
            if result.get("top1_agreement") not in (None, 1.0):
                result["ok"] = False
                result.setdefault("errors", []).append(
                    f"{runtime}: top-1 predictions differ from the build machine's (agreement {result['top1_agreement']})"
                )
            emu = result["emulation"]
            console.print(f"[bold]{emu.get('machine')}[/] {runtime} {emu.get('runtime_version', '')} "
                          f"({'bit-exact' if exact else 'within tolerance'}): {'[green]ok[/]' if result['ok'] else '[red]FAILED[/]'}")
            results.append(result)
    return results


def _echo(text: str, json_out: Optional[Path]) -> None:
    """Pre-rendered tables go out as they are (rich would re-wrap them); to stderr when stdout carries JSON."""
    print(text, file=sys.stderr if json_out is not None and str(json_out) == "-" else sys.stdout)


def _write_json(dest: Optional[Path], obj: dict) -> None:
    if dest is None:
        return
    text = json.dumps(obj, indent=2, default=str) + "\n"
    if str(dest) == "-":
        sys.stdout.write(text)
    else:
        dest.write_text(text)


@app.command()
def bench(
    bundle: Annotated[Optional[Path], typer.Argument(help="Bundle directory.")] = None,
    warmup: Annotated[int, typer.Option(help="Warmup runs before timing.")] = 10,
    runs: Annotated[int, typer.Option(help="Minimum timed runs at batch 1.")] = 200,
    min_seconds: Annotated[float, typer.Option(help="Keep timing until at least this many seconds have passed.")] = 1.0,
    sweep: Annotated[bool, typer.Option(help="Sweep runtime settings (threads, XNNPACK / provider, graph optimisation) and keep the best.")] = True,
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes for throughput, comma-separated.")] = "1,8,32",
    runtime: Annotated[Optional[str], typer.Option(help="Force a runtime package: ai-edge-litert, tflite-runtime or onnxruntime.")] = None,
    reference: Annotated[bool, typer.Option(help="Also time the fp32 torch model (OUT/<target>/reference.pt) in this run and report the speedup.")] = False,
    write_recommended: Annotated[bool, typer.Option(help="Write the best setting into the bundle's manifest as runtime.recommended.")] = True,
    compare: Annotated[Optional[list[Path]], typer.Option(help="Compare two bench JSON files (give --compare A --compare B) instead of running.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the result as JSON to this file ('-' for stdout).")] = None,
    markdown: Annotated[bool, typer.Option(help="Print a Markdown table instead of the text table.")] = False,
) -> None:
    """Measure a bundle: load, first inference, latency percentiles, throughput, memory, accuracy."""
    from edgec.benchmarking import compare_results, render_comparison, run_bench

    if compare:
        if len(compare) != 2 or bundle is not None:
            raise ConfigError("--compare takes exactly two bench JSON files: --compare A.json --compare B.json (and no bundle)")
        comparison = compare_results(compare[0], compare[1])
        _echo(render_comparison(comparison, markdown), json_out)
        _write_json(json_out, comparison)
        if comparison["regressions"]:
            raise RunError(f"{len(comparison['regressions'])} regression(s): " + ", ".join(r["figure"] for r in comparison["regressions"]))
        return
    if bundle is None:
        raise ConfigError("give a bundle directory, or --compare A.json --compare B.json")
    sizes = [int(b) for b in batch_sizes.split(",") if b.strip()]
    console = Console(stderr=json_out is not None and str(json_out) == "-")
    result, text = run_bench(bundle, console, warmup=warmup, runs=runs, min_seconds=min_seconds, sweep=sweep,
                             batch_sizes=sizes, runtime=runtime, reference=reference,
                             write_recommended=write_recommended, markdown=markdown)
    _echo(text, json_out)
    _write_json(json_out, result)
    if not result["ok"]:
        raise RunError("bench failed: " + "; ".join(result.get("errors", [])[:3]))


@app.command()
def check(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    bench_result: Annotated[Optional[Path], typer.Option("--bench", help="A bench JSON (edgec bench --json) for the latency budget.")] = None,
    max_model_bytes: Annotated[Optional[int], typer.Option(help="Override the target's budget.")] = None,
    max_transport_bytes: Annotated[Optional[int], typer.Option(help="Override the target's budget.")] = None,
    max_p95_ms: Annotated[Optional[float], typer.Option(help="Override the target's budget (needs --bench).")] = None,
    max_accuracy_drop: Annotated[Optional[float], typer.Option(help="Override the target's budget.")] = None,
    min_agreement: Annotated[Optional[float], typer.Option(help="Override the target's budget.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the result as JSON to this file ('-' for stdout).")] = None,
) -> None:
    """Apply the target's budgets; exit 1 listing every violation, 0 when all hold."""
    from edgec.budgets import check_budgets
    from edgec.ondevice import load_bundle
    from edgec.targets.profile import Budgets

    manifest = load_bundle(str(bundle)).manifest
    budgets = Budgets.model_validate(manifest["target"]["profile"]["budgets"])
    overrides = {
        "max_model_bytes": max_model_bytes, "max_transport_bytes": max_transport_bytes, "max_p95_ms": max_p95_ms,
        "max_accuracy_drop": max_accuracy_drop, "min_agreement": min_agreement,
    }
    budgets = budgets.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    bench_data = None
    if bench_result is not None:
        from edgec.benchmarking import load_bench_json

        bench_data = load_bench_json(bench_result)
    rows = check_budgets(manifest, budgets, bench_data)
    table = Table(title=f"budgets: {manifest['target']['name']}", show_edge=False)
    for col in ("budget", "limit", "actual", "result"):
        table.add_column(col)
    for r in rows:
        verdict = "[dim]unknown (no --bench)[/]" if r["ok"] is None else ("[green]ok[/]" if r["ok"] else "[red]VIOLATED[/]")
        table.add_row(r["budget"], f"{r['op']} {r['limit']}", "-" if r["actual"] is None else f"{r['actual']:.6g}", verdict)
    console = Console(stderr=json_out is not None and str(json_out) == "-")
    console.print(table)
    _write_json(json_out, {"schema": "edgec-check", "schema_version": 1, "budgets": rows})
    violated = [r for r in rows if r["ok"] is False]
    if violated:
        raise RunError("budget violated: " + "; ".join(f"{r['budget']} {r['actual']:.6g} (limit {r['op']} {r['limit']})" for r in violated))
