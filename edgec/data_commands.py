"""``edgec data fetch NAME`` and ``edgec data list``: the data sets edgec downloads (edgec/base/data_fetch.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from .base import data_fetch

data_app = typer.Typer(help="Data sets edgec downloads for --data NAME (mnist, fashion-mnist, kmnist).",
                       no_args_is_help=True)

_CACHE_HELP = "Cache folder; data sets go to CACHE_DIR/data/NAME/. Default: $EDGEC_CACHE_DIR or ~/.cache/edgec."


@data_app.command("fetch")
def fetch(
    names: Annotated[list[str], typer.Argument(help=f"Data sets to download: {', '.join(data_fetch.DATASETS)}.")],
    cache_dir: Annotated[Optional[Path], typer.Option(help=_CACHE_HELP)] = None,
    mirror: Annotated[Optional[str], typer.Option(help=f"Base URL of a copy, read as URL/NAME/FILE (or ${data_fetch.MIRROR_ENV}). Default: the published mirrors.")] = None,
) -> None:
    """Download data sets into the cache, checked against pinned sha256s; an interrupted download resumes."""
    for name in names:
        data_fetch.lookup(name)  # every name is checked before anything is downloaded
    console = Console(stderr=True)
    for name in names:
        with _progress(console) as report:
            folder = data_fetch.fetch(name, cache_dir, mirror, report)
        print(f"{name}: {folder} (use --data {name})")


class _progress:
    """A progress bar per file on a terminal; nothing otherwise (logs get the final line only)."""

    def __init__(self, console: Console):
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                            console=console, transient=True) if console.is_terminal else None
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        if self.bar is None:
            return None
        self.bar.start()
        return self.update

    def update(self, remote: data_fetch.RemoteFile, done: int) -> None:
        if remote.name not in self.tasks:
            self.tasks[remote.name] = self.bar.add_task(remote.name, total=remote.size)
        self.bar.update(self.tasks[remote.name], completed=done)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False


@data_app.command("list")
def list_(cache_dir: Annotated[Optional[Path], typer.Option(help=_CACHE_HELP)] = None) -> None:
    """Each data set edgec can fetch: whether it is downloaded, its size and its folder."""
    rows = data_fetch.listing(cache_dir)
    print(f"{'name':<14} {'state':<28} {'size':>10}  path")  # plain columns: a path is never cut off
    for row in rows:
        size = f"{row['bytes'] / 1e6:.1f} MB" if row["bytes"] else f"({row['download_bytes'] / 1e6:.1f} MB)"
        print(f"{row['name']:<14} {row['state']:<28} {size:>10}  {row['path']}")
