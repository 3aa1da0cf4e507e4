"""Where edgec keeps its files by default when the user names no folder: the stage cache (and the
datasets it downloads, under ``<cache>/data``). The cache key's own location is ``cache_auth``'s.

Only absolute paths other than ``/`` count as a base folder, so nothing lands under ``/`` or the
current folder by accident (an empty or relative ``XDG_*`` value is ignored, as the XDG spec says).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError


def usable_base(env: str) -> Path | None:
    """``$env`` as a base folder when it is an absolute path other than ``/``; else None (an empty
    or relative value would put files under ``/`` or the current folder)."""
    value = os.environ.get(env, "")
    path = Path(value)
    return path if value and path.is_absolute() and path != Path("/") else None


def home_base() -> Path | None:
    """The user's home as a base folder: $HOME when set, else the password database's; None when
    it is empty, relative or ``/``."""
    if "HOME" in os.environ:
        return usable_base("HOME")
    home = Path(os.path.expanduser("~"))
    return home if home.is_absolute() and home != Path("/") else None


def default_cache_dir() -> Path:
    """$EDGEC_CACHE_DIR, else $XDG_CACHE_HOME/edgec, else $HOME/.cache/edgec. An empty or relative
    XDG_CACHE_HOME is ignored (XDG spec), and an empty, relative or ``/`` HOME is no home: the cache
    never lands under ``/`` or the current folder by accident."""
    env = os.environ.get("EDGEC_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = usable_base("XDG_CACHE_HOME")
    if base is None:
        home = home_base()
        if home is None:
            raise ConfigError("no place for the stage cache: HOME is not an absolute path; set EDGEC_CACHE_DIR or "
                              "pass --cache-dir")
        base = home / ".cache"
    return base / "edgec"
