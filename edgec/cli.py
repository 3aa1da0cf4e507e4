"""The ``edgec`` command line.

Known errors (:class:`edgec.base.errors.EdgecError`) print one line and exit with their code (2 for bad
usage, config or input; 1 for a failed run). ``--debug`` anywhere on the command line adds the
traceback; the exit code never depends on it.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperCommand
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .data_commands import data_app
from .base.errors import ConfigError, EdgecError, RunError
from .ondevice.errors import BundleError
from .base.tomlfile import NestedTooDeep, parse_toml

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
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks with the one-line errors, and native libraries' logs (anywhere on the command line).")] = False,
) -> None:
    """edgec: train -> prune -> retrain -> share -> distill -> export, cached stage by stage."""


class _RegistryHelp(TyperCommand):
    """Help whose lists come from the registries (zoo models, stage kinds, built-in data sets), filled
    in only when help is shown (the zoo imports torch), with brackets escaped for rich."""

    def format_help(self, ctx, formatter) -> None:
        for param in self.params:
            if getattr(param, "help", None):
                text = param.help
                for placeholder, names in _registry_names().items():
                    text = text.replace(placeholder, names)
                param.help = escape(text)
        super().format_help(ctx, formatter)


def _registry_names() -> dict[str, str]:
    import edgec.pipeline.stages  # noqa: F401  (registers the stage kinds)
    from edgec.pipeline.stage import Stage

    from .base.data import BUILTIN_DATASETS, SOURCE_FORMS
    from .zoo import ZOO

    return {"{ZOO}": ", ".join(ZOO), "{STAGES}": ", ".join(Stage.registry),
            "{DATA}": " | ".join([*BUILTIN_DATASETS, *SOURCE_FORMS])}


def _parse_set(items: list[str]) -> dict[str, Any]:
    """``--set train.lr=0.01``: the value is read as a TOML value, or as a string if that fails."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=10")
        try:
            out[key.strip()] = parse_toml(f"v = {value}", f"--set {key.strip()}")["v"]
        except NestedTooDeep:
            raise
        except ConfigError:  # not a TOML value: the text itself
            out[key.strip()] = value
    return out


@app.command(cls=_RegistryHelp)
def build(
    target: Annotated[Optional[str], typer.Option("--target", "-t", help="Built-in target (see `edgec targets`) or a board.toml path. Default: rpi.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="Config file. Default: ./edgec.toml when present.")] = None,
    data: Annotated[Optional[str], typer.Option(help="{DATA} (default digits; a built-in data set sets its task).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Zoo model ({ZOO}) or package.module:factory (found in the current folder too). Default: cnn-small for images, mlp for flat features.")] = None,
    weights: Annotated[Optional[Path], typer.Option(help="Initial weights: an edgec checkpoint (no --model needed) or a plain state dict.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder; the build lands in OUT/<target>/. Default: ./edgec-out.")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Stage cache. Default: $EDGEC_CACHE_DIR or ~/.cache/edgec.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for initialisation, shuffling and augmentation. Default: 0.")] = None,
    stages: Annotated[Optional[str], typer.Option(help="Comma-separated stages to run, e.g. train,export: kinds ({STAGES}) for the shorthand list, ids to select from [[stages]] tables.")] = None,
    precision: Annotated[Optional[str], typer.Option(help="Precision of the shipped model: int8, fp16 or fp32. Default: the target's.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs (train stage).")] = None,
    augment: Annotated[Optional[bool], typer.Option("--augment/--no-augment", help="Random shifts and rotations while training.")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="Override any config key: --set train.lr=0.01, or by stage id: --set prune-fine.sparsity=0.9 (repeatable).")] = [],
    force: Annotated[Optional[str], typer.Option(help="Rerun this stage (id or kind) and every stage after it, ignoring the cache.")] = None,
    sign_key: Annotated[Optional[Path], typer.Option(help="Sign the bundle with this Ed25519 private key (edgec keys generate).")] = None,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the resolved config as JSON and exit.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the build summary as JSON on stdout (progress goes to stderr).")] = False,
    max_drop: Annotated[Optional[float], typer.Option("--max-drop", min=0.0, help="Accuracy budget: points of the trained model's validation metric the bundle may lose (default: [budget] max_accuracy_drop, the target's, else 1.0).")] = None,
) -> None:
    """Build a deployable bundle for a target."""
    from .api import build as run_build
    from .config import Overrides, load_config

    keys: dict[str, Any] = {}
    for key, value in (
        ("target", target), ("data.source", data), ("model.weights", weights), ("out", out),
        ("cache_dir", cache_dir), ("seed", seed), ("sign_key", sign_key), ("budget.max_accuracy_drop", max_drop),
    ):
        if value is not None:
            keys[key] = str(value) if isinstance(value, Path) else value
    if model is not None:
        keys["model.name"] = model
    elif weights is not None:
        keys["model.name"] = None  # an edgec checkpoint names its own model
    per_kind: dict[str, dict[str, Any]] = {"train": {}, "export": {}}
    if epochs is not None:
        per_kind["train"]["epochs"] = epochs
    if augment is not None:
        per_kind["train"]["augment.enabled"] = augment
    if precision is not None:
        per_kind["export"]["precision"] = precision
    keys.update(_parse_set(set_))
    selected = [s.strip() for s in stages.split(",") if s.strip()] if stages is not None else None
    cfg = load_config(config, Overrides(keys, per_kind, selected))
    if print_config:
        print(json.dumps(cfg.canonical(), indent=2))
        return
    # Logs and pipes get 120 columns (rich would use 80), so the summary table is not truncated.
    console = Console(stderr=json_out, width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 120)
    result = run_build(cfg, console=console, force=force)
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
    for col in ("stage", "status", "quality", "params", "non-zero", "fp32 bytes", "model bytes", "transport bytes", "seconds"):
        table.add_column(col, justify="left" if col in ("stage", "status") else "right", no_wrap=True)
    rows = [("source", "-", result.summary["source"])] + [
        (s.id, "cached" if s.cached else "ran", s.info | {"seconds": round(s.seconds, 3)}) for s in result.stages
    ]
    for name, status, info in rows:
        table.add_row(
            name,
            status,
            _fmt(_quality(info), "{}"),
            _fmt(info.get("params"), "{:,}"),
            _fmt(info.get("nonzero_params"), "{:,}"),
            _fmt(info.get("fp32_bytes"), "{:,}"),
            _fmt(info.get("model_bytes"), "{:,}"),
            _fmt(info.get("transport_bytes"), "{:,}"),
            _fmt(info.get("seconds"), "{:.1f}"),
        )
    console.print(table)
    reached = result.summary.get("reached_bundle") or []
    console.print(f"in the bundle: {', '.join(reached) if reached else 'the trained model, uncompressed'}")
    for stage in result.stages:
        mixed = stage.info.get("mixed_precision")
        if mixed:  # int8 missed the export parity gate; these layers' outputs stay float
            console.print(f"[yellow]mixed precision[/]: int8, with {len(mixed['float_ops'])} layer(s) in float: "
                          f"{', '.join(mixed['float_ops'])}")
    record = result.summary.get("accuracy_budget")
    if record:
        from edgec.pipeline.accuracy_budget import summary_line

        console.print(f"[bold {'green' if record['met'] else 'red'}]{summary_line(record)}[/]")
    console.print(f"[bold green]done[/] in {result.seconds:.1f} s ({result.stages_run} stage(s) ran) -> {result.build_dir}")


def _quality(info: dict) -> str | None:
    """Accuracy for classification; the task's headline figure (AUC, MSE, R²) otherwise."""
    if info.get("accuracy") is not None:
        return f"{info['accuracy']:.4f}"
    metric = info.get("metric")
    return f"{metric} {info[metric]:.4f}" if metric and isinstance(info.get(metric), (int, float)) else None


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
    console = Console()
    budgets = {name: [f"{k}={v}" for k, v in p.budgets.model_dump().items() if v is not None] for name, p in profiles.items()}
    if console.width < 120:  # a narrow terminal: one block per target, so no budget is cut off
        for p in profiles.values():
            console.print(f"[bold]{p.name}[/]  {p.format} {p.precision} {p.arch}")
            console.print(p.description, style="dim")
            console.print("budgets: " + ", ".join(budgets[p.name]))
            console.print()
        return
    table = Table(show_edge=False)
    for col in ("target", "format", "precision", "arch", "budgets", "description"):
        table.add_column(col, no_wrap=col == "budgets")
    for p in profiles.values():
        table.add_row(p.name, p.format, p.precision, p.arch, "\n".join(budgets[p.name]), p.description)
    console.print(table)


def _configure_libraries() -> None:
    """Before torch is imported: OpenMP threads sleep instead of spinning when they wait (on a busy
    2-core machine spinning made a LeNet-5 epoch 10x slower); TensorFlow Lite / oneDNN keep their
    C++ INFO lines to themselves."""
    import logging
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


DEBUG_FLAG = "--debug"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt so that every ``finally`` and
    ``except BaseException`` cleanup (cache temp folders, half-built outputs) runs before the exit."""


_signal_received: int | None = None


def _on_signal(signum: int, frame) -> None:
    global _signal_received
    _signal_received = signum
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _install_signal_handlers() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup / background jobs: keep ignoring
                signal.signal(sig, _on_signal)
        except ValueError:  # not the main thread (main() called from a thread): keep Python's defaults
            return


def _split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """``--debug`` is accepted anywhere before ``--``: take it out before typer parses the line."""
    end = argv.index("--") if "--" in argv else len(argv)
    rest = [a for a in argv[:end] if a != DEBUG_FLAG] + argv[end:]
    return rest, len(rest) != len(argv)


def _click_exceptions():
    """(UsageError, ClickException, Abort, NoArgsIsHelpError) classes of the click typer uses: recent
    typer vendors click as ``typer._click``, older typer uses click itself; catch both."""
    modules = []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            modules.append(__import__(name, fromlist=["ClickException"]))
        except ImportError:
            pass
    aborts = [m.Abort for m in modules if hasattr(m, "Abort")]
    aborts.append(typer.Abort)

    def classes(name):
        return tuple(getattr(m, name) for m in modules if hasattr(m, name))

    return classes("UsageError"), classes("ClickException"), tuple(aborts), classes("NoArgsIsHelpError")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _usage_error(e, args: list[str]) -> str:
    ctx = getattr(e, "ctx", None)
    if ctx is not None:
        command = ctx.command_path
    else:  # raised while parsing, before the subcommand's context exists
        names = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands if c.callback}
        command = f"edgec {args[0]}" if args and args[0] in names else "edgec"
    return f"error: {_one_line(e.format_message())} (see '{command} --help')"


# OSError by errno: (exit code, what happened, what to do). 2 where the fix is a different folder or
# permission (the user's choice), 1 where the run failed on the machine's state.
_OS_ERRORS = {
    errno.ENOSPC: (1, "no space left on device", "free some space or point --out / --cache-dir at another disk"),
    errno.EDQUOT: (1, "disk quota exceeded", "free some space or point --out / --cache-dir at another disk"),
    errno.EACCES: (2, "permission denied", "fix its permissions or choose a folder you can write with --out / --cache-dir"),
    errno.EPERM: (2, "operation not permitted", "fix its permissions or choose a folder you can write with --out / --cache-dir"),
    errno.EROFS: (2, "read-only file system", "choose a writable folder with --out / --cache-dir"),
    errno.ENAMETOOLONG: (2, "file name too long", "choose a shorter folder path"),
    errno.EMFILE: (1, "too many open files", "raise the limit (ulimit -n) and rerun"),
    errno.EIO: (1, "input/output error", "check the disk and rerun"),
}


def _path_of(e: OSError) -> str | None:
    """The path an OSError is about: its filename, else (a write() on an open file names none) the
    innermost file open for writing or pathlib path among the failing frames' locals."""
    for name in (e.filename, e.filename2):
        if isinstance(name, (str, bytes, os.PathLike)):
            return os.fsdecode(name)
    frames = []
    tb = e.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    paths = []
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            mode, name = getattr(value, "mode", None), getattr(value, "name", None)
            if hasattr(value, "write") and isinstance(mode, str) and isinstance(name, str) and any(c in mode for c in "wax+"):
                return name
            if isinstance(value, os.PathLike):
                paths.append(os.fspath(value))
    return paths[0] if paths else None


def _os_error(e: OSError) -> tuple[str, int]:
    code, what, fix = _OS_ERRORS.get(e.errno, (1, None, "rerun with --debug for details"))
    what = what or _one_line(e.strerror or e)
    path = _path_of(e)
    return f"error: {what}{f': {path}' if path else ''}; {fix}", code


def _internal(e: BaseException) -> str:
    return f"error: internal error {type(e).__name__}: {_one_line(e)} (rerun with --debug and report it)"


OUT_OF_MEMORY = "error: out of memory; use a smaller data set, model or batch size, or a machine with more memory"
# How torch's allocators report a failed allocation (a RuntimeError, not a MemoryError).
_ALLOCATOR_FAILURES = ("DefaultCPUAllocator", "not enough memory", "can't allocate memory", "out of memory")


def _out_of_memory(e: Exception) -> bool:
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and any(m in str(e) for m in _ALLOCATOR_FAILURES))


def _show_traceback(debug: bool) -> None:
    """--debug adds the traceback; the one-line message and the exit code stay what they are without it."""
    if debug:
        traceback.print_exc()


def main() -> None:
    args, debug = _split_debug(sys.argv[1:])
    if debug:
        os.environ["EDGEC_DEBUG"] = "1"  # native libraries' logs (edgec.base.quiet) are shown too
    usage_errors, click_errors, aborts, no_args_help = _click_exceptions()
    _install_signal_handlers()
    _configure_libraries()
    code: Any = 0
    try:
        try:
            code = app(args=args, prog_name="edgec", standalone_mode=False)
        finally:
            if _signal_received is not None:  # typer turns KeyboardInterrupt into a plain exit 130
                raise Terminated() if _signal_received == signal.SIGTERM else KeyboardInterrupt()
    except KeyboardInterrupt as e:  # SIGINT or SIGTERM: cleanup has run while this unwound
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        terminated = isinstance(e, Terminated)
        print("terminated (SIGTERM)" if terminated else "interrupted", file=sys.stderr)
        sys.exit(128 + (signal.SIGTERM if terminated else signal.SIGINT))
    except (EdgecError, BundleError) as e:  # both carry their exit code; BundleError comes from the runner
        _show_traceback(debug)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except no_args_help as e:  # plain `edgec`: the help, as a usage error
        text = e.format_message()  # typer's rich help has already been printed; plain click's is returned
        if text.strip():
            print(text, file=sys.stderr)
        sys.exit(2)
    except usage_errors as e:  # unknown command or option, missing argument, a value of the wrong type
        print(_usage_error(e, args), file=sys.stderr)
        sys.exit(2)
    except click_errors as e:
        _show_traceback(debug)
        print(f"error: {_one_line(e.format_message())}", file=sys.stderr)
        sys.exit(e.exit_code)
    except aborts:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except OSError as e:  # disk full, permissions, read-only file system: the machine, not edgec
        _show_traceback(debug)
        if e.errno == errno.EPIPE:  # whoever read stdout went away (`| head`): nothing to say
            sys.exit(1)
        message, exit_code = _os_error(e) if e.errno is not None else (_internal(e), 1)
        print(message, file=sys.stderr)
        sys.exit(exit_code)
    except Exception as e:  # out of memory, or a bug: still one line unless --debug
        _show_traceback(debug)
        print(OUT_OF_MEMORY if _out_of_memory(e) else _internal(e), file=sys.stderr)
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
    public_key: Annotated[Optional[Path], typer.Option("--public-key", help="Check the bundle's signature (manifest.sig) with this Ed25519 public key (edgec.pub): refuse an unsigned bundle, another key's, or any file changed, added or removed after signing.")] = None,
) -> None:
    """Check the signature (--public-key), every file's sha256 (and that no other file is present), the transport payload, load the model in its runtime, reproduce the test vectors, measure accuracy."""
    from edgec.ondevice import render_verify, verify_bundle

    console = Console(stderr=json_out is not None and str(json_out) == "-")
    if emulate is not None:
        results = _verify_emulated(bundle, emulate, console, public_key)
    else:
        results = [verify_bundle(str(bundle), exact=exact, runtime=runtime, public_key=public_key)]
    for result in results:
        _echo(render_verify(result), json_out)
    _write_json(json_out, results[0] if len(results) == 1 else {"schema": "edgec-verify-emulated", "runs": results})
    failed = [r for r in results if not r["ok"]]
    if failed:
        raise RunError("verify failed: " + "; ".join(e for r in failed for e in r.get("errors", [])[:3]))


def _verify_emulated(bundle: Path, emulate: str, console: Console, public_key: Optional[Path] = None) -> list[dict]:
    """arm64: for int8 bundles ai-edge-litert must reproduce the build's outputs bit for bit;
    tflite-runtime (whose int8 kernels round some op families differently) within the manifest's
    tolerance for it, and float models (whose last bits differ between x86 and Arm) within the
    manifest's tolerance.
    Top-1 predictions must equal the build machine's in every case."""
    from edgec.base.emulation import DEFAULT_CACHE_DIR, verify_bundle_emulated
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
            result = verify_bundle_emulated(bundle, DEFAULT_CACHE_DIR, runtime, progress=status.update, exact=exact,
                                            public_key=public_key)
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
    baseline: Annotated[bool, typer.Option(help="Also export the uncompressed model (OUT/<target>/uncompressed.pt) for the bundle's target with the same converter and precision, bench it with the same harness in this run, then time both in interleaved rounds: baseline.speedup holds the per-round ratios and their lower confidence bound (what `edgec check --min-speedup` gates).")] = False,
    model: Annotated[Optional[str], typer.Option(help="With --reference / --baseline: the package.module:factory the model was built from (needed for user models; a file never chooses code to import).")] = None,
    ops: Annotated[bool, typer.Option("--ops", help="Also time every operator at the best setting: a per-op table (op, type, shape, mean time, share, delegated or not); in --json as ops_profile and in the report as a bar chart.")] = False,
    write_recommended: Annotated[bool, typer.Option(help="Keep the best setting of a full sweep for this machine in the bundle's recommended.json (the manifest is never changed).")] = True,
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
    # Per machine, in recommended.json (edgec/ondevice/recommend.py): never into the (signed) manifest.
    result, text = run_bench(bundle, console, warmup=warmup, runs=runs, min_seconds=min_seconds, sweep=sweep,
                             batch_sizes=sizes, runtime=runtime, reference=reference, baseline=baseline,
                             save_recommendation=write_recommended, markdown=markdown, trusted_model=model, ops=ops)
    _echo(text, json_out)
    _write_json(json_out, result)
    if not result["ok"]:
        raise RunError("bench failed: " + "; ".join(result.get("errors", [])[:3]))


keys_app = typer.Typer(help="Ed25519 keys for signed bundles.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(data_app, name="data")


@keys_app.command("generate")
def keys_generate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for edgec.key (private, mode 0600) and edgec.pub (public).")],
    force: Annotated[bool, typer.Option(help="Replace an existing key pair in that folder.")] = False,
) -> None:
    """Write a new Ed25519 key pair: sign bundles with edgec.key, verify them with edgec.pub."""
    from edgec.signing import generate_keypair, public_key_fingerprint

    private_path, public_path = generate_keypair(out, force=force)
    print(f"private key {private_path} (keep it secret, off devices and out of version control)")
    print(f"public key  {public_path} ({public_key_fingerprint(public_path)})")


@app.command()
def check(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    bench_result: Annotated[Optional[Path], typer.Option("--bench", help="A bench JSON (edgec bench --json) for the latency budget.")] = None,
    max_model_bytes: Annotated[Optional[int], typer.Option(help="Override the target's budget.")] = None,
    max_transport_bytes: Annotated[Optional[int], typer.Option(help="Override the target's budget.")] = None,
    max_p95_ms: Annotated[Optional[float], typer.Option(help="Override the target's budget (needs --bench).")] = None,
    max_drop: Annotated[Optional[float], typer.Option("--max-drop", min=0.0, help="Accuracy budget in points: the bundle's validation drop against the trained model (manifest accuracy_budget). Default: the budget the build applied.")] = None,
    max_export_drop: Annotated[Optional[float], typer.Option("--max-export-drop", "--max-accuracy-drop", help="Override the target's budget (accuracy lost in export, a fraction; --max-accuracy-drop is its old name).")] = None,
    min_agreement: Annotated[Optional[float], typer.Option(help="Override the target's budget.")] = None,
    min_speedup: Annotated[Optional[float], typer.Option(help="The bundle's p50 must be this many times lower than the uncompressed model's (needs --bench from `edgec bench --baseline`). Overrides the target's budget.")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Fail (exit 1) when a budget could not be checked, e.g. max_p95_ms without --bench.")] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the result as JSON to this file ('-' for stdout).")] = None,
) -> None:
    """Apply the target's budgets; exit 1 listing every violation, 0 when all that could be checked hold
    (the budgets left unchecked are named; --strict fails on them)."""
    from edgec.budgets import check_budgets
    from edgec.ondevice import load_bundle
    from edgec.targets.profile import Budgets

    manifest = load_bundle(str(bundle)).manifest
    budgets = Budgets.model_validate(manifest["target"]["profile"]["budgets"])
    overrides = {
        "max_model_bytes": max_model_bytes, "max_transport_bytes": max_transport_bytes, "max_p95_ms": max_p95_ms,
        "max_export_drop": max_export_drop, "min_agreement": min_agreement, "min_speedup": min_speedup,
    }
    budgets = budgets.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    bench_data = None
    if bench_result is not None:
        from edgec.benchmarking import load_bench_json

        bench_data = load_bench_json(bench_result)
    rows = check_budgets(manifest, budgets, bench_data, max_drop)
    table = Table(title=f"budgets: {manifest['target']['name']}", show_edge=False)
    for col in ("budget", "limit", "actual", "result"):
        table.add_column(col)
    for r in rows:
        unknown = "unknown (no --bench)" if bench_data is None else (
            "unknown (bench without --baseline)" if r["budget"] == "min_speedup" else "unknown (not in the bench result)")
        verdict = f"[dim]{unknown}[/]" if r["ok"] is None else ("[green]ok[/]" if r["ok"] else "[red]VIOLATED[/]")
        if r.get("p50_ms"):  # min_speedup: show both latencies and which figure was judged
            verdict += f" (p50 {r['p50_ms']['bundle']:.4g} ms vs uncompressed {r['p50_ms']['uncompressed']:.4g} ms; judged: {r['rule']})"
        table.add_row(r["budget"], f"{r['op']} {r['limit']}", "-" if r["actual"] is None else f"{r['actual']:.6g}", verdict)
    console = Console(stderr=json_out is not None and str(json_out) == "-")
    console.print(table)
    violated = [r for r in rows if r["ok"] is False]
    unchecked = [r["budget"] for r in rows if r["ok"] is None]
    _write_json(json_out, {"schema": "edgec-check", "schema_version": 1, "budgets": rows, "unchecked": unchecked})
    if unchecked:
        how = "give --bench BENCH.json (edgec bench --json, --baseline for min_speedup)"
        console.print(f"[yellow]unchecked[/]: {', '.join(unchecked)}; {how}{'' if strict else ', or --strict to fail on them'}")
    if violated:
        raise RunError("budget violated: " + "; ".join(f"{r['budget']} {r['actual']:.6g} (limit {r['op']} {r['limit']})" for r in violated))
    if strict and unchecked:
        raise RunError(f"--strict: budget(s) not checked: {', '.join(unchecked)}; {how}")


@app.command(cls=_RegistryHelp)
def search(
    config: Annotated[Path, typer.Option("--config", "-c", help="Search config: a build config (edgec.toml keys) plus a [search] table with [search.space].")],
    target: Annotated[Optional[list[str]], typer.Option("--target", "-t", help="Target to rank points for (repeatable: one Pareto front each). Default: the config's target, else rpi.")] = None,
    data: Annotated[Optional[str], typer.Option(help="{DATA} (overrides the config's [data] source).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: search.json, report, pareto/ bundles, best.toml, trials/.")] = Path("edgec-search"),
    cache_dir: Annotated[Optional[Path], typer.Option(help="Stage cache shared by every trial (on Ray: storage every node sees). Default: $EDGEC_CACHE_DIR or ~/.cache/edgec.")] = None,
    strategy: Annotated[Optional[str], typer.Option(help="grid | random | tpe (overrides [search] strategy).")] = None,
    trials: Annotated[Optional[int], typer.Option(help="Trials for random / tpe (overrides [search] trials).")] = None,
    cpus_per_trial: Annotated[Optional[int], typer.Option(help="CPUs and torch threads per trial, embedded and on Ray (overrides [search] cpus_per_trial; default 1).")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Run the trials on a local Ray cluster started for this search (Ray Tune).")] = False,
    ray_address: Annotated[Optional[str], typer.Option(help="Join an existing Ray cluster (e.g. HEAD_IP:6379 from `ray start --head`, or auto) and run the trials there.")] = None,
    ray_cpus: Annotated[Optional[int], typer.Option(help="CPUs of the local cluster --ray starts. Default: all of this machine's.")] = None,
    keep_builds: Annotated[bool, typer.Option(help="Keep every trial's build folder in OUT/builds (default: only the Pareto bundles, in OUT/pareto).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check every point against every target at plan time (no training) and exit: 2 when none is valid.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print search.json on stdout (progress goes to stderr).")] = False,
) -> None:
    """Search pipeline configs (sparsity, bits, width, precision, ...) for the best trade-offs per target:
    a Pareto front of accuracy, bytes and latency under the target's budgets. Trials run here one after
    another, or on Ray with --ray / --ray-address. A restarted search reuses its finished trials."""
    from .search import search as run_search

    if ray_cpus is not None and not ray:
        raise ConfigError("--ray-cpus sizes the local cluster that --ray starts; add --ray")
    if ray and ray_address:
        raise ConfigError("give --ray (start a local cluster) or --ray-address (join one), not both")
    console = Console(stderr=json_out, width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 120)
    if dry_run:
        from .search import load_setup
        from .search.runner import check_points

        setup = load_setup(config, targets=target or None, data=data, out=out, cache_dir=cache_dir, strategy=strategy,
                           trials=trials, cpus_per_trial=cpus_per_trial)
        rows = check_points(setup)
        if json_out:
            print(json.dumps(rows, indent=2))
        else:
            table = Table(title=f"{len(rows)} point(s), checked at plan time (nothing trained)", show_edge=False)
            for col in ("#", "point", *setup.targets):
                table.add_column(col)
            for row in rows:
                cells = [f"ok ({t['cached']}/{t['stages']} stages cached)" if t["status"] == "ok" else f"[red]rejected[/]: {t['reason']}"
                         for t in (row["targets"][name] for name in setup.targets)]
                table.add_row(str(row["number"]), ", ".join(f"{k}={json.dumps(v)}" for k, v in row["point"].items()), *cells)
            console.print(table)
        if not any(t["status"] == "ok" for row in rows for t in row["targets"].values()):
            raise ConfigError("no point of the space passes the plan-time check for any target")
        return
    result = run_search(config, targets=target or None, data=data, out=out, cache_dir=cache_dir, strategy=strategy,
                        trials=trials, cpus_per_trial=cpus_per_trial, use_ray=ray, ray_address=ray_address,
                        ray_cpus=ray_cpus, keep_builds=keep_builds, console=console)
    from .search.output import print_summary

    if json_out:
        print(json.dumps(result.summary, indent=2, default=str))
    else:
        print_summary(console, result.summary, result.out)
    empty = [t for t, s in result.summary["targets"].items() if not s["feasible_trials"]]
    if empty:
        raise RunError(f"no feasible point for {', '.join(empty)}: every trial was rejected, failed or broke a budget "
                       f"(see {result.out / 'report.md'})")
