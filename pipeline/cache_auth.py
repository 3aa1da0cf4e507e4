"""The secret that authenticates stage-cache entries (HMAC-SHA256), kept outside the cache.

Anyone who can write the cache folder can write files, hashes and digests that match each other;
what they cannot write without this key is an entry's MAC. So a cache entry is served only when
its entry.json carries an HMAC-SHA256, under this key, of everything it records (stage, key, kind,
digest, every file's sha256, info); see ``StageCache``.

The key is 32 random bytes in a file:

- ``$EDGEC_CACHE_KEY_FILE`` when set: a key shared on purpose (everyone who builds from one shared
  cache uses the same file). It must exist; it is never created.
- else ``$XDG_CONFIG_HOME/edgec/cache.key``, or ``$HOME/.config/edgec/cache.key``: one per user,
  created (mode 0600) on first use. Relative or empty XDG_CONFIG_HOME / HOME are ignored (XDG
  spec); with no usable location the user is told to set EDGEC_CACHE_KEY_FILE.

A symlink, a non-regular file, an unreadable file or one that is not exactly 32 bytes is refused
with a one-line InputError; the key is never guessed or replaced.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from edgec.base.errors import InputError
from edgec.base.locations import home_base, usable_base

KEY_ENV = "EDGEC_CACHE_KEY_FILE"
KEY_BYTES = 32
MAC_DOMAIN = "edgec-cache-entry-v1"
_O_KEY = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)


def default_key_file() -> Path:
    config = usable_base("XDG_CONFIG_HOME")
    if config is None:
        home = home_base()
        if home is None:
            raise InputError(f"no place for the stage cache's key: HOME is not an absolute path; set {KEY_ENV} to a "
                             "key file (32 random bytes: head -c 32 /dev/urandom > FILE)")
        config = home / ".config"
    return config / "edgec" / "cache.key"


def load_cache_key() -> bytes:
    """The key from ``$EDGEC_CACHE_KEY_FILE``, or the user's own (created on first use)."""
    shared = os.environ.get(KEY_ENV)
    if shared:
        return read_key(Path(shared).expanduser(), f"{KEY_ENV}={shared}")
    path = default_key_file()
    try:
        return read_key(path, "the stage cache's key")
    except FileNotFoundError:
        _create_key(path)
        return read_key(path, "the stage cache's key")


def read_key(path: Path, what: str) -> bytes:
    """Exactly KEY_BYTES from a regular file, never through a symlink. FileNotFoundError when it
    does not exist (the caller decides whether to create it), InputError for anything else."""
    fix = f"point {KEY_ENV} at a file of {KEY_BYTES} random bytes (head -c {KEY_BYTES} /dev/urandom > FILE)"
    try:
        fd = os.open(path, _O_KEY)
    except FileNotFoundError:
        if what.startswith(KEY_ENV):
            raise InputError(f"{what}: the cache key file does not exist; {fix}") from None
        raise
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputError(f"{what}: {path} is a symlink; name the key file itself") from None
        raise InputError(f"{what}: cannot read {path} ({e.strerror}); {fix}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(f"{what}: {path} is not a regular file; {fix}")
        key = os.read(fd, KEY_BYTES + 1)
    except OSError as e:
        raise InputError(f"{what}: cannot read {path} ({e.strerror}); {fix}") from None
    finally:
        os.close(fd)
    if len(key) != KEY_BYTES:
        raise InputError(f"{what}: {path} is not a cache key ({len(key)}{'+' if len(key) > KEY_BYTES else ''} bytes, "
                         f"expected {KEY_BYTES}); {fix}")
    return key


def _create_key(path: Path) -> None:
    """Write a fresh key atomically (0600); when another process made one first, keep that one."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_bytes(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails when another process created the key meanwhile: theirs is kept
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    except OSError as e:
        raise InputError(f"cannot create the stage cache's key {path} ({e.strerror}); set {KEY_ENV} to a key file "
                         f"(head -c {KEY_BYTES} /dev/urandom > FILE)") from None


def entry_mac(key: bytes, body: dict[str, Any]) -> str:
    """HMAC-SHA256 of an entry's record (everything in entry.json but the MAC), as canonical JSON."""
    text = json.dumps({"domain": MAC_DOMAIN, **body}, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def mac_matches(key: bytes, body: dict[str, Any], mac: Any) -> bool:
    return isinstance(mac, str) and hmac.compare_digest(entry_mac(key, body), mac)
