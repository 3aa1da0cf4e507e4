"""Content-addressed stage cache with atomic writes (DVC run-cache style).

An entry is ``<root>/<stage>/<key>/`` with the stage's files and ``entry.json``: the stage and key
it was written for, the artifact's kind, every file's sha256, the artifact digest (sha256 of
``{"kind", "files"}``) and the stage's info.

The cache does not trust itself. ``get`` reads an entry through one open directory handle (a
concurrent replacement cannot mix two entries), never follows a symlink, and serves it only when
the stage and key recorded in entry.json are the ones asked for, the files on disk are exactly the
recorded ones with the recorded hashes, the digest recomputed from that table is the recorded one,
and entry.json carries a valid MAC (HMAC-SHA256 under a key kept outside the cache, see
``cache_auth``) of all it records: whoever can write the cache but lacks the key cannot make an
entry that is served. An entry that fails this (an entry from an older edgec, without a MAC,
included) is discarded (renamed aside, then deleted) and rebuilt, never served.
The artifact served carries the authenticated file table: ``artifact.read_verified`` / ``copy_verified``
check every byte read later against it, so a file swapped after ``get`` is never used.
A read that fails for a transient reason (EACCES, EIO, a file vanishing because another process is
replacing the entry) is a miss, never a deletion.

``put`` builds in a temp folder beside the entry and renames it into place; there is no
remove-then-rename window. When another process put a valid entry first, that one is kept and
returned; ``force=True`` (or an invalid entry there) swaps the new one in atomically (see
``publish.replace_directory``). Temp and trash folders carry their process's pid in their name and
are collected once that process is gone (``collect_stale``, also run when a StageCache is made).
Entries get folders 0o777 & ~umask and files 0o666 & ~umask, so a shared cache or a bundle copied
out of it is readable by whoever the umask allows.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any, Callable, NamedTuple


from .artifact import Artifact
from .cache_auth import entry_mac, load_cache_key, mac_matches
from .publish import STALE_AFTER_S, apply_umask_modes, collect_stale, make_temp_dir, remove_tree, replace_directory, trash_path

ENTRY_FILE = "entry.json"
MAX_ENTRY_JSON_BYTES = 64 << 20
_VERIFY_TRIES = 3  # a get retries this often when the entry is replaced while it is being read

_O_DIR = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_O_FILE = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stable_hash(obj: Any) -> str:
    """sha256 of canonical JSON: the same config always gives the same key."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()).hexdigest()


class CorruptEntry(ValueError):
    """An entry (or a build's output) that is not what the cache may serve."""


def _check_name(what: str, name: str) -> None:
    if not isinstance(name, str) or not name or name in (".", "..") or name.startswith(".") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"invalid cache {what} {name!r}: must be a plain folder name not starting with '.'")


def _safe_relpath(name: Any) -> bool:
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name or "\0" in name:
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def _hash_open_file(fd: int) -> str:
    """sha256 of an open file's content (reads from the start)."""
    h = hashlib.sha256()
    while block := os.read(fd, 1 << 20):
        h.update(block)
    return h.hexdigest()


def _open_file(name: str, dir_fd: int) -> int:
    """Open a regular file in ``dir_fd`` without following a symlink; CorruptEntry otherwise."""
    try:
        fd = os.open(name, _O_FILE, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CorruptEntry(f"{name} is a symlink") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CorruptEntry(f"{name} is not a regular file")
    return fd


def _table_fd(dir_fd: int, prefix: str = "") -> dict[str, str]:
    """{relative posix path: sha256} of every file below the open folder ``dir_fd`` (top-level
    entry.json excluded), read through handles only: a symlink, device, fifo or socket anywhere
    is CorruptEntry, and nothing is ever followed out of the folder."""
    table: dict[str, str] = {}
    for name in sorted(os.listdir(dir_fd)):
        rel = prefix + name
        if rel == ENTRY_FILE:
            continue
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            try:
                sub = os.open(name, _O_DIR, dir_fd=dir_fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise CorruptEntry(f"{rel} changed type while being read") from None
                raise
            try:
                table.update(_table_fd(sub, rel + "/"))
            finally:
                os.close(sub)
        elif stat.S_ISREG(st.st_mode):
            fd = _open_file(name, dir_fd)
            try:
                table[rel] = _hash_open_file(fd)
            finally:
                os.close(fd)
        else:
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
            raise CorruptEntry(f"{rel} is {kind}")
    return dict(sorted(table.items()))


def _file_table(folder: Path) -> dict[str, str]:
    fd = os.open(folder, _O_DIR)
    try:
        return _table_fd(fd)
    finally:
        os.close(fd)


def _read_entry_json(dir_fd: int) -> dict[str, Any]:
    try:
        fd = _open_file(ENTRY_FILE, dir_fd)
    except FileNotFoundError:
        raise CorruptEntry(f"no {ENTRY_FILE}") from None
    try:
        raw = b""
        while len(raw) <= MAX_ENTRY_JSON_BYTES and (block := os.read(fd, 1 << 20)):
            raw += block
    finally:
        os.close(fd)
    if len(raw) > MAX_ENTRY_JSON_BYTES:
        raise CorruptEntry(f"{ENTRY_FILE} is too large")
    try:
        entry = json.loads(raw)
    except ValueError:  # also UnicodeDecodeError
        raise CorruptEntry(f"{ENTRY_FILE} is not JSON") from None
    if not isinstance(entry, dict):
        raise CorruptEntry(f"{ENTRY_FILE} is not an object")
    return entry


def _verify(dir_fd: int, stage: str, key: str, path: Path, secret: bytes) -> Artifact:
    """The artifact in the open entry folder, or CorruptEntry saying why it may not be served."""
    entry = _read_entry_json(dir_fd)
    mac = entry.pop("mac", None)
    if not mac_matches(secret, entry, mac):
        raise CorruptEntry(f"{ENTRY_FILE} is not authenticated by this cache key" + ("" if mac else " (no MAC: an older edgec wrote it)"))
    if entry.get("stage") != stage or entry.get("key") != key:
        raise CorruptEntry(f"entry was written for {entry.get('stage')!r}/{entry.get('key')!r}, found under {stage!r}/{key!r}")
    kind, files, digest, info = (entry.get(k) for k in ("kind", "files", "digest", "info"))
    if not isinstance(kind, str) or not isinstance(digest, str) or not isinstance(info, dict) or not isinstance(files, dict):
        raise CorruptEntry(f"{ENTRY_FILE} lacks kind, digest, files or info")
    if not all(_safe_relpath(n) and isinstance(h, str) for n, h in files.items()):
        raise CorruptEntry(f"{ENTRY_FILE} names a file outside the entry")
    table = _table_fd(dir_fd)
    if table.keys() != files.keys():
        extra, missing = sorted(table.keys() - files.keys()), sorted(files.keys() - table.keys())
        raise CorruptEntry(f"unexpected files {extra[:5]}, missing files {missing[:5]}")
    changed = [n for n in table if table[n] != files[n]]
    if changed:
        raise CorruptEntry(f"files changed: {changed[:5]}")
    if stable_hash({"kind": kind, "files": table}) != digest:
        raise CorruptEntry("recorded digest does not match the file table")
    return Artifact(kind, path, digest, info, files)


class _Check(NamedTuple):
    status: str  # "valid" | "missing" | "transient" | "replaced" (while being read: look again) | "corrupt"
    artifact: Artifact | None = None
    ident: tuple[int, int] | None = None  # (st_dev, st_ino) of what was found, for a corrupt entry
    reason: str = ""


def _ident(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def _still_at(path: Path, ident: tuple[int, int]) -> bool:
    try:
        return _ident(os.lstat(path)) == ident
    except OSError:
        return False


class StageCache:
    """``<root>/<stage>/<key>/`` entries; see the module docstring."""

    def __init__(self, root: Path, collect: bool = True, key: bytes | None = None,
                 on_discard: Callable[[str, str, str], None] | None = None):
        """``key``: the MAC key (default: ``cache_auth.load_cache_key()``). ``on_discard(stage, key,
        reason)`` is told about every entry refused and discarded."""
        self.root = Path(root)
        self._secret = load_cache_key() if key is None else key
        self._on_discard = on_discard
        self.last_discard_reason = ""  # why the last discarded entry was refused (for logs and tests)
        if collect:
            self.collect_stale()

    def _entry(self, stage: str, key: str) -> Path:
        _check_name("stage", stage)
        _check_name("key", key)
        return self.root / stage / key

    # -- reading ---------------------------------------------------------------------------

    def _check(self, stage: str, key: str) -> _Check:
        """Look at (stage, key) once, through one directory handle."""
        final = self._entry(stage, key)
        try:
            st = os.lstat(final)
        except FileNotFoundError:
            return _Check("missing")
        except OSError as e:
            return _Check("transient", reason=str(e))
        if not stat.S_ISDIR(st.st_mode):
            return _Check("corrupt", ident=_ident(st), reason="not a folder (a symlink or a file)")
        try:
            dir_fd = os.open(final, _O_DIR)
        except FileNotFoundError:
            return _Check("missing")
        except OSError as e:  # replaced by a symlink/file in between (ELOOP, ENOTDIR), EACCES, EIO...
            return _Check("transient", reason=str(e))
        try:
            ident = _ident(os.fstat(dir_fd))
            try:
                art = _verify(dir_fd, stage, key, final, self._secret)
            except CorruptEntry as e:
                # Only a folder still in place is judged: one that was replaced or discarded while
                # we read it (files vanishing, half-deleted) is someone else's business.
                if _still_at(final, ident):
                    return _Check("corrupt", ident=ident, reason=str(e))
                return _Check("replaced", reason=f"replaced while being read ({e})")
            except OSError as e:  # EACCES, EIO, ENOENT of a file vanishing mid-read: a miss
                return _Check("transient" if _still_at(final, ident) else "replaced", reason=str(e))
            if not _still_at(final, ident):  # verified, but no longer the one at `final`
                return _Check("replaced", reason="replaced while being read")
            return _Check("valid", artifact=art)
        finally:
            os.close(dir_fd)

    def get(self, stage: str, key: str) -> Artifact | None:
        """The verified artifact for (stage, key), or None. A verified mismatch discards the entry;
        a transient read error is a miss and leaves it alone."""
        for _ in range(_VERIFY_TRIES):
            check = self._check(stage, key)
            if check.status == "valid":
                return check.artifact
            if check.status == "corrupt":
                self._discard(stage, key, check.ident, check.reason)
                return None
            if check.status != "replaced":
                return None  # missing, or a transient read error: a miss, the entry is left alone
        return None

    def _discard(self, stage: str, key: str, ident: tuple[int, int] | None, reason: str = "") -> None:
        """Rename the entry aside, then delete it; tolerant of a concurrent discard or replacement.
        When what was renamed aside is not the entry that was judged (a valid one was put there
        meanwhile), it is put back if the place is still free."""
        final = self._entry(stage, key)
        trash = trash_path(final.parent)
        try:
            os.rename(final, trash)
        except FileNotFoundError:
            return  # someone else discarded it
        except OSError:
            return  # cannot move it (permissions, ...): leave it, a put will replace it
        try:
            moved = _ident(os.lstat(trash))
        except OSError:
            moved = None
        if ident is not None and moved is not None and moved != ident:
            try:
                os.rename(trash, final)  # not ours to discard: put it back
                return
            except OSError:
                pass  # the place was taken again: dropping this copy only costs a cache miss
        else:
            self.last_discard_reason = reason
            if self._on_discard is not None:
                self._on_discard(stage, key, reason)
        remove_tree(trash)

    # -- writing ---------------------------------------------------------------------------

    def put(
        self, stage: str, key: str, kind: str, build: Callable[[Path], dict[str, Any]], force: bool = False
    ) -> Artifact:
        """Run ``build(tmp_dir) -> info`` and publish its files atomically under (stage, key).

        When a valid entry is already there (another process won the race) it is kept and
        returned, and this build's output is dropped; ``force=True`` replaces it (``--force``).
        An invalid entry there is always replaced. Readers never see a moment without an entry
        where RENAME_EXCHANGE is available."""
        final = self._entry(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(final.parent)
        try:
            info = build(tmp)
            if not isinstance(info, dict):
                raise TypeError(f"stage {stage!r}: build must return a dict (the artifact's info), not {type(info).__name__}")
            if os.path.lexists(tmp / ENTRY_FILE):
                raise ValueError(f"stage {stage!r} wrote {ENTRY_FILE}, a name the cache reserves")
            try:
                files = _file_table(tmp)
            except CorruptEntry as e:
                raise ValueError(f"stage {stage!r} produced output the cache cannot hold: {e}") from None
            digest = stable_hash({"kind": kind, "files": files})
            # The MAC is of the record as it reads back from JSON (tuples become lists, ...).
            body = json.loads(json.dumps({"kind": kind, "stage": stage, "key": key, "digest": digest, "files": files,
                                          "info": info}))
            entry = {**body, "mac": entry_mac(self._secret, body)}
            (tmp / ENTRY_FILE).write_text(json.dumps(entry, indent=1, sort_keys=True))
            apply_umask_modes(tmp)
            return self._install(tmp, final, stage, key, force) or Artifact(kind, final, digest, body["info"], files)
        finally:
            remove_tree(tmp)

    def _install(self, tmp: Path, final: Path, stage: str, key: str, force: bool) -> Artifact | None:
        """Move ``tmp`` to ``final``. Returns the entry that was kept instead of ours, or None when
        ours is in place."""
        if not force:
            try:
                os.rename(tmp, final)
                return None
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    raise
            check = self._check(stage, key)
            if check.status == "valid":
                return check.artifact  # another process won the race: keep its entry
        # force, or whatever is there is not a valid entry we can read: swap ours in atomically.
        replace_directory(tmp, final)
        return None

    # -- housekeeping ----------------------------------------------------------------------

    def collect_stale(self, max_age_s: float = STALE_AFTER_S) -> int:
        """Remove temp/trash folders left by dead processes (e.g. SIGKILL mid-put) or older than
        ``max_age_s``. Runs when a StageCache is made; cheap, best effort. Returns the count."""
        removed = 0
        try:
            stages = [e for e in os.scandir(self.root) if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")]
        except OSError:
            return 0
        for e in stages:
            removed += collect_stale(Path(e.path), prefix="", max_age_s=max_age_s)
        return removed
