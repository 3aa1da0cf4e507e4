"""Data sets edgec can download: ``edgec data fetch NAME`` and ``--data NAME``.

Each data set is a few files with pinned sizes and sha256s, fetched into
``<cache_dir>/data/<name>/``. A file is written as ``NAME.part`` (an interrupted download resumes
with an HTTP Range request), checked against its pinned size and sha256, and only then renamed into
place, so a file under its own name is always the published one. A body larger than the pinned size
or a wrong hash is refused and the partial file deleted. ``--mirror URL`` / ``$EDGEC_DATA_MIRROR``
replaces the published mirrors with ``URL/<name>/<file>``.

CIFAR-10 is not offered: the archive torchvision downloads is Python pickles, which edgec does not
read (a pickle can run code).
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgec import __version__
from .errors import ConfigError, InputError, RunError
from .locations import default_cache_dir

MIRROR_ENV = "EDGEC_DATA_MIRROR"
TIMEOUT_S = 30.0  # per connect / read: a stalled server fails instead of hanging
CHUNK = 1 << 16


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class FetchableDataset:
    name: str
    mirrors: tuple[str, ...]  # base URLs, tried in order; a file's URL is base + file name
    files: tuple[RemoteFile, ...]
    labels: tuple[str, ...]


def _idx_files(sizes_and_hashes: tuple[tuple[int, str], ...]) -> tuple[RemoteFile, ...]:
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz")
    return tuple(RemoteFile(n, size, digest) for n, (size, digest) in zip(names, sizes_and_hashes, strict=True))


# Mirrors are torchvision's (torchvision/datasets/mnist.py). MNIST's sha256s are those of the files
# torchvision's md5s accept (checked against a local copy of the published files); Fashion-MNIST's and
# KMNIST's are the sha256s other loaders pin for the same files (e.g. TFDS's MNIST-family builders).
DATASETS: dict[str, FetchableDataset] = {
    d.name: d
    for d in (
        FetchableDataset(
            "mnist",
            ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
            _idx_files((
                (9912422, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
                (28881, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
                (1648877, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
                (4542, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
            )),
            tuple(str(i) for i in range(10)),
        ),
        FetchableDataset(
            "fashion-mnist",
            ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
            _idx_files((
                (26421880, "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
                (29515, "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
                (4422102, "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
                (5148, "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
            )),
            ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        ),
        FetchableDataset(
            "kmnist",
            ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
            _idx_files((
                (18165135, "51467d22d8cc72929e2a028a0428f2086b092bb31cfb79c69cc0a90ce135fde4"),
                (29497, "e38f9ebcd0f3ebcdec7fc8eabdcdaef93bb0df8ea12bee65224341c8183d8e17"),
                (3041136, "edd7a857845ad6bb1d0ba43fe7e794d164fe2dce499a1694695a792adfac43c5"),
                (5120, "20bb9a0ef54c7db3efc55a92eef5582c109615df22683c380526788f98e42a1c"),
            )),
            ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
        ),
    )
}


def lookup(name: str) -> FetchableDataset:
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}: edgec can fetch {', '.join(DATASETS)}") from None


def data_root(cache_dir: Path | None = None) -> Path:
    """``<cache_dir>/data`` (default cache: $EDGEC_CACHE_DIR or ~/.cache/edgec)."""
    if cache_dir is None:
        cache_dir = default_cache_dir()
    return Path(cache_dir).expanduser() / "data"


def dataset_dir(name: str, cache_dir: Path | None = None) -> Path:
    return data_root(cache_dir) / lookup(name).name


def present_files(dataset: FetchableDataset, folder: Path) -> list[RemoteFile]:
    """The files in place with their pinned size (their hash was checked before they got their name)."""
    return [f for f in dataset.files if _size(folder / f.name) == f.size]


def downloaded_dir(name: str, cache_dir: Path | None = None) -> Path:
    """The folder of a fetched data set, for ``--data NAME``; InputError when it is not (all) there."""
    folder = dataset_dir(name, cache_dir)
    if len(present_files(DATASETS[name], folder)) != len(DATASETS[name].files):
        raise InputError(f"dataset {name!r} is not downloaded: run `edgec data fetch {name}` (or --data {name}:PATH)")
    return folder


def mirrors_for(dataset: FetchableDataset, mirror: str | None) -> tuple[str, ...]:
    """The base URLs to try: ``mirror`` (or $EDGEC_DATA_MIRROR) + ``<name>/``, else the published ones."""
    mirror = mirror or os.environ.get(MIRROR_ENV) or None
    if mirror is None:
        return dataset.mirrors
    if not mirror.startswith(("http://", "https://")):
        raise ConfigError(f"mirror {mirror!r}: give an http:// or https:// URL (files are read from URL/{dataset.name}/FILE)")
    return (f"{mirror.rstrip('/')}/{dataset.name}/",)


Progress = Callable[[RemoteFile, int], None]  # (file, bytes written so far), also called once at the start


def fetch(name: str, cache_dir: Path | None = None, mirror: str | None = None,
          progress: Progress | None = None) -> Path:
    """Download every missing file of a data set (verified, resumable); return its folder."""
    dataset = lookup(name)
    bases = mirrors_for(dataset, mirror)
    folder = dataset_dir(name, cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".fetch.lock", "w") as lock:  # two fetches of one data set take turns
        fcntl.flock(lock, fcntl.LOCK_EX)
        for remote in dataset.files:
            if remote in present_files(dataset, folder):
                continue
            _fetch_from_mirrors(remote, bases, folder, progress)
    return folder


def _fetch_from_mirrors(remote: RemoteFile, bases: tuple[str, ...], folder: Path, progress: Progress | None) -> None:
    """Try each mirror in turn; a network or HTTP failure moves on, a refused file does not."""
    failures = []
    for base in bases:
        url = base + remote.name
        try:
            download(url, folder / remote.name, remote, progress)
            return
        except _TransferFailed as e:
            failures.append(f"{url}: {e}")
    hint = f"check the network, or point --mirror (or ${MIRROR_ENV}) at a copy; rerun to resume"
    raise RunError(f"cannot download {remote.name}: {'; '.join(failures)}; {hint}")


class _TransferFailed(Exception):
    """This mirror did not deliver (connection, HTTP status, timeout); another may."""


def download(url: str, dest: Path, remote: RemoteFile, progress: Progress | None = None) -> None:
    """Fetch ``url`` into ``dest`` through ``dest.part``: resumed, size-bounded, sha256-checked."""
    part = dest.with_name(dest.name + ".part")
    have = _size(part) or 0
    if have > remote.size:  # not the file we want: start over
        part.unlink()
        have = 0
    if have < remote.size:
        have = _transfer(url, part, have, remote, progress)
    if have < remote.size:  # kept for the next run to resume
        raise _TransferFailed(f"the connection ended after {have:,} of {remote.size:,} bytes")
    digest = _sha256(part)
    if digest != remote.sha256:
        part.unlink()
        raise RunError(
            f"{url}: sha256 {digest} is not the pinned {remote.sha256}; the file was refused and deleted "
            "(a changed or tampered file: report it if it happens again)"
        )
    os.replace(part, dest)


def _transfer(url: str, part: Path, have: int, remote: RemoteFile, progress: Progress | None) -> int:
    """Append the bytes after ``have`` to ``part``; return the size of ``part`` afterwards."""
    headers = {"User-Agent": f"edgec/{__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S) as response:
            if have and response.status != 206:  # the server ignored the Range: take the whole body
                have = 0
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and have + int(length) > remote.size:
                _refuse_oversized(part, url, remote, have + int(length))
            with open(part, "ab" if have else "wb") as out:
                if progress:
                    progress(remote, have)
                while chunk := response.read(CHUNK):
                    have += len(chunk)
                    if have > remote.size:
                        out.close()
                        _refuse_oversized(part, url, remote, None)
                    out.write(chunk)
                    if progress:
                        progress(remote, have)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the partial file does not fit what the server has: start over
            part.unlink(missing_ok=True)
            return _transfer(url, part, 0, remote, progress)
        raise _TransferFailed(f"HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise _TransferFailed(str(reason) or type(e).__name__) from None
    return have


def _refuse_oversized(part: Path, url: str, remote: RemoteFile, announced: int | None) -> None:
    part.unlink(missing_ok=True)
    what = f"announces {announced:,} bytes" if announced is not None else "sent more bytes"
    raise RunError(
        f"{url} {what} but {remote.name} is {remote.size:,} bytes; refused and deleted (a different file "
        "or a broken mirror)"
    )


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def listing(cache_dir: Path | None = None) -> list[dict]:
    """Each fetchable data set: whether it is there, its size on disk and its folder."""
    rows = []
    for dataset in DATASETS.values():
        folder = data_root(cache_dir) / dataset.name
        files = present_files(dataset, folder)
        state = ("present" if len(files) == len(dataset.files)
                 else f"partial ({len(files)} of {len(dataset.files)} files)" if files else "not downloaded")
        rows.append({"name": dataset.name, "state": state, "bytes": sum(f.size for f in files),
                     "download_bytes": sum(f.size for f in dataset.files), "path": str(folder)})
    return rows
