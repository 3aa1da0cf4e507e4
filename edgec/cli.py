"""The ``edgec`` command line.

Known errors (:class:`edgec.errors.EdgecError`) print one line and exit with their code (2 for bad
usage, config or input; 1 for a failed run). ``--debug`` anywhere on the command line shows the
traceback instead.
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any, Optional

import click
import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import ConfigError, EdgecError

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
    console = Console(stderr=json_out)
    result = run_build(cfg, console, force=force)
    if json_out:
        print(json.dumps({"build_dir": str(result.build_dir), "seconds": round(result.seconds, 2), **result.summary}, indent=2))
        return
    _print_summary(console, result)


def _print_summary(console: Console, result) -> None:
    table = Table(title=f"edgec build: {result.summary['target']}", show_edge=False)
    for col in ("stage", "status", "accuracy", "params", "non-zero", "fp32 bytes", "model bytes", "transport bytes", "seconds"):
        table.add_column(col, justify="left" if col in ("stage", "status") else "right")
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


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    try:
        code = app(standalone_mode=False)
    except EdgecError as e:
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
