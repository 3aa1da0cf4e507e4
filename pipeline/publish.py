"""Atomic replacement of whole directories, and the temp/trash folders that make it safe.

Why this is hand-written: no library does atomic *directory* replacement. ``os.replace`` and
``shutil.move`` replace files atomically, but ``rename(2)`` refuses a non-empty target directory,
so the usual "remove the old one, rename the new one in" leaves a moment without any directory
(and loses the old one when the process dies in between); ``tempfile`` only makes the temp dir.
Linux has had ``renameat2(RENAME_EXCHANGE)`` since 3.15, which swaps two paths in one step, but
Python does not expose it, so it is called through ctypes (libc, else the raw syscall), with a
fallback to rename-aside + rename on kernels and file systems without it.

Naming: every temp or trash folder is a sibling of the final path (same file system, so renames
are atomic) called ``.<prefix>tmp-<pid>-<host>-<random>`` or ``.<prefix>trash-<pid>-<host>-<random>``;
``collect_stale`` removes those whose process is gone (SIGKILL, power loss) or that are older than
a day, and never touches a live process's folder.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import platform
import random
import re
import secrets
import shutil
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Callable

__all__ = [
    "STALE_AFTER_S",
    "apply_umask_modes",
    "collect_stale",
    "current_umask",
    "make_temp_dir",
    "publish_directory",
    "remove_tree",
    "rename_exchange",
    "replace_directory",
    "trash_path",
]

STALE_AFTER_S = 24 * 3600  # a temp folder older than this is stale whatever its pid
MAX_ATTEMPTS = 100  # bounded retries when other processes keep replacing the same path

_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_NAME = re.compile(r"^\.(?P<prefix>.*?)(?P<what>tmp|trash)-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-[0-9a-f]{12}$")


# ---------------------------------------------------------------------------------------------
# temp and trash names


def _sibling_name(prefix: str, what: str) -> str:
    return f".{prefix}{what}-{os.getpid()}-{_HOST}-{secrets.token_hex(6)}"


def make_temp_dir(parent: Path, prefix: str = "") -> Path:
    """A new empty folder ``parent/.<prefix>tmp-<pid>-<host>-<random>`` with mode 0o777 & ~umask
    (``tempfile.mkdtemp`` would give 0o700)."""
    parent = Path(parent)
    for _ in range(MAX_ATTEMPTS):
        path = parent / _sibling_name(prefix, "tmp")
        try:
            os.mkdir(path, 0o777)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(errno.EEXIST, "could not create a unique temp folder", str(parent))


def trash_path(parent: Path, prefix: str = "") -> Path:
    """A fresh name ``parent/.<prefix>trash-<pid>-<host>-<random>`` to rename something aside to."""
    return Path(parent) / _sibling_name(prefix, "trash")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return True
    return True


def collect_stale(folder: Path, prefix: str | None = None, max_age_s: float = STALE_AFTER_S) -> int:
    """Remove the temp/trash folders in ``folder`` left by dead processes (same host) or older
    than ``max_age_s`` (any host). ``prefix`` limits it to one final's folders (``None``: all).
    Best effort and safe to run concurrently; returns how many were removed."""
    removed = 0
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for e in entries:
        m = _NAME.match(e.name)
        if not m or (prefix is not None and m["prefix"] != prefix):
            continue
        try:
            age = now - e.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        dead = m["host"] == _HOST and not _pid_alive(int(m["pid"]))
        if dead or age > max_age_s:
            remove_tree(Path(e.path))
            removed += 1
    return removed


def remove_tree(path: Path) -> None:
    """Delete a folder (or a file or symlink: never what a symlink points to). Tolerates another
    process deleting the same tree at the same time; other errors are ignored (what is left is
    collected later as stale)."""

    def onerror(func, p, exc_info):
        if isinstance(exc_info[1], FileNotFoundError):
            return
        if isinstance(exc_info[1], PermissionError):  # a read-only folder inside: make it writable, retry
            try:
                os.chmod(os.path.dirname(p), stat.S_IRWXU)
                func(p)
            except OSError:
                pass

    try:
        st = os.lstat(path)
    except OSError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, onerror=onerror)
    else:
        try:
            os.unlink(path)
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
# modes


_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it (``/proc/self/status``) where possible."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def apply_umask_modes(root: Path, umask: int | None = None) -> None:
    """Give ``root`` and everything below it the modes people expect from a plain ``mkdir`` /
    ``open``: folders 0o777 & ~umask, files 0o666 & ~umask (0o777 & ~umask for files the owner
    can execute). Symlinks are left alone (never followed)."""
    mask = current_umask() if umask is None else umask
    dir_mode = 0o777 & ~mask
    file_mode = 0o666 & ~mask
    exe_mode = 0o777 & ~mask

    def fix(path: str, st: os.stat_result) -> None:
        if stat.S_ISDIR(st.st_mode):
            want = dir_mode | stat.S_IRWXU  # the owner must keep rwx to fill and delete it
        elif stat.S_ISREG(st.st_mode):
            want = exe_mode if st.st_mode & stat.S_IXUSR else file_mode
        else:
            return
        if stat.S_IMODE(st.st_mode) != want:
            os.chmod(path, want)

    fix(str(root), os.lstat(root))
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            fix(p, os.lstat(p))


# ---------------------------------------------------------------------------------------------
# renameat2(RENAME_EXCHANGE)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_SYSCALL_RENAMEAT2 = {"x86_64": 316, "amd64": 316, "aarch64": 276, "arm64": 276, "riscv64": 276, "i686": 353, "i386": 353}


def _load_renameat2():
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    fn = getattr(libc, "renameat2", None)  # glibc >= 2.28, musl >= 1.2.?
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return lambda a, b, flags: fn(_AT_FDCWD, a, _AT_FDCWD, b, flags)
    nr = _SYSCALL_RENAMEAT2.get(platform.machine().lower())
    syscall = getattr(libc, "syscall", None)
    if nr is None or syscall is None:
        return None
    syscall.restype = ctypes.c_long
    return lambda a, b, flags: syscall(
        ctypes.c_long(nr), ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(a), ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(b), ctypes.c_uint(flags)
    )


_renameat2 = _load_renameat2()
_exchange_ok = _renameat2 is not None  # turned off on the first EINVAL/ENOSYS (kernel or file system without it)


def rename_exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` atomically (both must exist). False when this system or
    file system cannot (then nothing happened); OSError for real failures (ENOENT: one is gone)."""
    global _exchange_ok
    if not _exchange_ok:
        return False
    rc = _renameat2(os.fsencode(a), os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        if err in (errno.ENOSYS, errno.EINVAL):
            _exchange_ok = False
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


# ---------------------------------------------------------------------------------------------
# replacing a directory


def _backoff(attempt: int) -> None:
    time.sleep(random.uniform(0, min(0.05, 0.001 * (attempt + 1))))


def replace_directory(src: Path, dst: Path, prefix: str = "") -> None:
    """Put the folder ``src`` at ``dst``, replacing whatever is there. With RENAME_EXCHANGE there is
    no moment without a ``dst``; otherwise the old one is renamed aside first. The old content ends
    up at ``src``'s name or a trash name and is deleted. Retries (bounded) when other processes
    replace ``dst`` at the same time; the last one to swap wins and every caller succeeds."""
    src, dst = Path(src), Path(dst)
    for attempt in range(MAX_ATTEMPTS):
        try:
            os.rename(src, dst)  # dst absent (or an empty folder): done
            return
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise
        try:
            if rename_exchange(src, dst):
                remove_tree(src)  # src now holds the old one
                return
        except FileNotFoundError:
            if not os.path.lexists(src):
                raise
            _backoff(attempt)  # dst vanished in between: plain rename next time
            continue
        # Fallback: rename the old one aside, ours in at once, then delete the old one.
        trash: Path | None = trash_path(dst.parent, prefix)
        try:
            os.rename(dst, trash)
        except FileNotFoundError:
            trash = None
        try:
            os.rename(src, dst)
            done = True
        except OSError as e:  # another process got its folder in first: go round again
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise
            done = False
        if trash is not None:
            remove_tree(trash)
        if done:
            return
        _backoff(attempt)
    raise OSError(errno.EBUSY, f"{dst} kept being replaced by other processes; gave up after {MAX_ATTEMPTS} tries", str(dst))


def publish_directory(final: Path, fill: Callable[[Path], None]) -> None:
    """Build a folder with ``fill(tmp)`` and put it at ``final`` atomically.

    ``tmp`` is a fresh folder beside ``final`` (same file system). When ``fill`` raises, the
    previous ``final`` is untouched and the temp folder is removed. Folders get 0o777 & ~umask and
    files 0o666 & ~umask, so the result is readable by whoever the umask allows. Concurrent
    publishers of the same ``final`` all succeed, and ``final`` is one complete result. Temp folders
    left by killed publishers of this ``final`` are removed first.
    """
    final = Path(final)
    parent = final.parent
    prefix = f"{final.name}."
    parent.mkdir(parents=True, exist_ok=True)
    collect_stale(parent, prefix=prefix)
    tmp = make_temp_dir(parent, prefix)
    try:
        fill(tmp)
        apply_umask_modes(tmp)
        replace_directory(tmp, final, prefix)
    finally:
        remove_tree(tmp)
