"""Where a build may publish: checks made before any work, so a publish never destroys what is not
edgec's.

A build replaces ``OUT/<target>/`` as a whole. That is only safe when the folder is absent, empty
or an earlier edgec build (``build.json`` and its bundle or model); anything else holds the
user's files and is refused. The stage cache must not overlap ``OUT`` (one inside the other, or
the same folder): a publish or a cache clean-up would delete the other.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from .build_layout import BUILD_FILE, BUNDLE_DIR, MODEL_FILE
from .base.errors import InputError
from .ondevice.integrity import MANIFEST_NAME

BUNDLE_MANIFEST = (BUNDLE_DIR, MANIFEST_NAME)


def check_output_locations(out: Path, target: str, cache_dir: Path) -> None:
    """InputError (exit 2) when publishing to ``out/target`` could destroy the cache or user files."""
    _check_no_overlap(out, cache_dir)
    _check_replaceable(out / target, out)


def _check_no_overlap(out: Path, cache_dir: Path) -> None:
    out_r, cache_r = Path(os.path.realpath(out)), Path(os.path.realpath(cache_dir))
    if out_r == cache_r or out_r in cache_r.parents or cache_r in out_r.parents:
        raise InputError(f"the stage cache {cache_dir} and the output folder {out} overlap (one is inside the other); "
                         "a build would delete one with the other: choose separate folders with --out / --cache-dir")


def is_edgec_build(folder: Path) -> bool:
    """A real folder holding a build.json object and the bundle or model an edgec build publishes."""
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            return False
        summary = json.loads((folder / BUILD_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(summary, dict) or os.path.islink(folder / BUILD_FILE):
        return False
    return (folder.joinpath(*BUNDLE_MANIFEST).is_file() and not (folder / BUNDLE_MANIFEST[0]).is_symlink()) or (
        (folder / MODEL_FILE).is_file() and not (folder / MODEL_FILE).is_symlink())


def _check_replaceable(final: Path, out: Path) -> None:
    try:
        st = os.lstat(final)
        if stat.S_ISDIR(st.st_mode):
            with os.scandir(final) as entries:
                if next(entries, None) is None:
                    return  # an empty folder: nothing to lose
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise InputError(f"cannot write to {out}: a folder on its path is a file; choose another folder with --out") from None
    except OSError as e:
        raise InputError(f"cannot read {final} ({e.strerror}); choose another folder with --out") from None
    if not is_edgec_build(final):
        raise InputError(f"{final} exists and is not an edgec build (no build.json with a bundle or model.pt); a build "
                         f"would replace it: move it away or choose another folder with --out (now {out})")
