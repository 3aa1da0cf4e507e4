"""Data sources: ``digits`` (built in), ``mnist:DIR``, ``npz:FILE``, ``folder:DIR``.

Every source yields a :class:`Dataset` holding *raw* samples (uint8 where the source is 8-bit)
and the affine map that turns a raw sample into the model input (``raw * scale + offset``).
Keeping raw samples lets a bundle ship its evaluation set the way a device would see data.
Splits are deterministic and independent of the training seed, so changing ``--seed`` never
changes which samples are evaluated.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from .errors import InputError

SPLIT_SEED = 0  # fixed on purpose: splits do not move with --seed


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    scale: float
    offset: float = 0.0
    labels: tuple[str, ...] = field(default=())

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3

    def to_input(self, raw: np.ndarray) -> np.ndarray:
        """Raw samples -> float32 model inputs."""
        return (raw.astype(np.float32) * np.float32(self.scale) + np.float32(self.offset)).astype(np.float32)

    @property
    def digest(self) -> str:
        """Content hash of every split and the preprocessing; part of every cache key."""
        h = hashlib.sha256()
        for a in (self.x_train, self.y_train, self.x_val, self.y_val, self.x_test, self.y_test):
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
        h.update(repr((self.scale, self.offset, self.labels)).encode())
        return h.hexdigest()

    def summary(self) -> str:
        return (
            f"{self.name}: {len(self.y_train)} train / {len(self.y_val)} val / {len(self.y_test)} test, "
            f"input {list(self.input_shape)}, {self.num_classes} classes"
        )


def load_dataset(spec: str, val_fraction: float = 0.1, image_size: int | None = None) -> Dataset:
    """Resolve a ``--data`` spec into a validated :class:`Dataset`."""
    scheme, _, arg = spec.partition(":")
    if scheme == "digits" and not arg:
        parts = _digits()
    elif scheme == "mnist" and arg:
        parts = _mnist(Path(arg).expanduser())
    elif scheme == "npz" and arg:
        parts = _npz(Path(arg).expanduser())
    elif scheme == "folder" and arg:
        parts = _folder(Path(arg).expanduser(), image_size)
    else:
        raise InputError(
            f"unknown data spec {spec!r}: use digits, mnist:DIR, npz:FILE or folder:DIR"
        )
    name, x_train, y_train, x_test, y_test, scale, labels = parts
    return _finish(name, x_train, y_train, x_test, y_test, scale, labels, val_fraction)


def _finish(name, x_train, y_train, x_test, y_test, scale, labels, val_fraction) -> Dataset:
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if len(x) == 0:
            raise InputError(f"{name}: the {split} split is empty; give it at least one sample per class")
        if len(x) != len(y):
            raise InputError(
                f"{name}: {split} has {len(x)} samples but {len(y)} labels; they must match one to one"
            )
        if not np.issubdtype(y.dtype, np.integer):
            raise InputError(f"{name}: {split} labels must be integers, got {y.dtype}")
        bad = (y < 0) | (y >= len(labels))
        if bad.any():
            raise InputError(
                f"{name}: {split} label {int(y[bad][0])} is out of range 0..{len(labels) - 1}; "
                "labels must be class indices"
            )
    if x_train.shape[1:] != x_test.shape[1:]:
        raise InputError(
            f"{name}: train samples have shape {x_train.shape[1:]} but test samples {x_test.shape[1:]}"
        )
    y_train, y_test = y_train.astype(np.int64), y_test.astype(np.int64)
    if not 0 < val_fraction < 1:
        raise InputError(f"val_fraction {val_fraction} must be between 0 and 1 (exclusive)")
    x_tr, x_val, y_tr, y_val = _split(x_train, y_train, val_fraction)
    return Dataset(name, x_tr, y_tr, x_val, y_val, x_test, y_test, scale=scale, labels=tuple(labels))


def _split(x: np.ndarray, y: np.ndarray, fraction: float):
    """Deterministic split, stratified by class whenever every class can be represented."""
    counts = np.bincount(y)
    counts = counts[counts > 0]
    n_held = int(np.ceil(fraction * len(y)))
    stratify = y if counts.min() >= 2 and len(counts) <= min(n_held, len(y) - n_held) else None
    if len(y) < 2:
        raise InputError("the train split needs at least 2 samples to hold some out for validation")
    return train_test_split(x, y, test_size=fraction, random_state=SPLIT_SEED, stratify=stratify)


def _digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.uint8)[:, None, :, :]  # values 0..16
    y = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = _split(x, y, 0.2)
    return "digits", x_train, y_train, x_test, y_test, 1.0 / 16.0, [str(i) for i in range(10)]


# --- MNIST IDX -------------------------------------------------------------------------------
# IDX is four lines of numpy; torchvision (the usual reader) has no CPU wheel for this torch.

_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def _mnist(folder: Path):
    if not folder.is_dir():
        raise InputError(f"mnist: {folder} is not a directory; point mnist:DIR at the folder with the IDX files")
    arrays = {}
    for key, stem in _MNIST_FILES.items():
        candidates = [folder / (stem + ".gz"), folder / stem]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise InputError(f"mnist: {stem}[.gz] not found in {folder}; it needs the four IDX files as distributed")
        arrays[key] = read_idx(path)
    x_train, x_test = arrays["x_train"], arrays["x_test"]
    if x_train.ndim != 3 or arrays["y_train"].ndim != 1:
        raise InputError(f"mnist: {folder} does not hold 3-d image and 1-d label IDX files")
    return (
        "mnist",
        x_train[:, None],
        arrays["y_train"].astype(np.int64),
        x_test[:, None],
        arrays["y_test"].astype(np.int64),
        1.0 / 255.0,
        [str(i) for i in range(10)],
    )


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or raw); raise InputError naming the file if it is corrupt."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise InputError(f"{path}: cannot read ({e}); re-download the file") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise InputError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise InputError(f"{path}: truncated IDX header")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise InputError(
            f"{path}: truncated or corrupt IDX file: header promises {expected} bytes of data for shape "
            f"{dims}, found {len(raw) - header}; re-download the file"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


# --- npz --------------------------------------------------------------------------------------


def _npz(path: Path):
    if not path.is_file():
        raise InputError(f"npz: {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f]
            if missing:
                raise InputError(f"npz: {path} lacks {', '.join(missing)}; it needs x_train, y_train, x_test, y_test")
            x_train, y_train, x_test, y_test = (f[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    except (ValueError, OSError) as e:
        raise InputError(f"npz: {path} is not a readable .npz without pickled objects ({e})") from None
    x_train, x_test = _image_layout(x_train), _image_layout(x_test)
    scale = 1.0 / 255.0 if x_train.dtype == np.uint8 else 1.0
    if x_train.dtype != np.uint8:
        x_train, x_test = x_train.astype(np.float32), x_test.astype(np.float32)
    y_train, y_test = y_train.reshape(-1), y_test.reshape(-1)
    n = int(max(y_train.max(initial=-1), y_test.max(initial=-1))) + 1
    return f"npz:{path.name}", x_train, y_train, x_test, y_test, scale, [str(i) for i in range(max(n, 1))]


def _image_layout(x: np.ndarray) -> np.ndarray:
    """Flat features stay (N, F); images become NCHW."""
    if x.ndim == 2:
        return x
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        return x if x.shape[1] in (1, 3) else np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    raise InputError(f"npz: samples of shape {x.shape[1:]} are neither flat vectors nor images")


# --- folder of images -------------------------------------------------------------------------

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm", ".tif", ".tiff", ".webp"}


def _folder(root: Path, image_size: int | None):
    from PIL import Image, UnidentifiedImageError

    if not root.is_dir():
        raise InputError(f"folder: {root} is not a directory; it needs one sub-folder of images per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise InputError(f"folder: {root} has no class sub-folders; put the images of each class in one sub-folder")
    files = [
        (f, i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir()) if f.suffix.lower() in _IMAGE_SUFFIXES
    ]
    if not files:
        raise InputError(f"folder: no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) under {root}")
    images = []
    for f, _ in files:
        try:
            with Image.open(f) as im:
                images.append(im.copy())
        except (UnidentifiedImageError, OSError) as e:
            raise InputError(f"folder: {f} is not a readable image ({e})") from None
    gray = all(im.mode in ("1", "L", "I;16", "I") for im in images)
    size = (image_size, image_size) if image_size else images[0].size
    x = np.stack(
        [np.asarray(im.convert("L" if gray else "RGB").resize(size), dtype=np.uint8) for im in images]
    )
    x = x[:, None] if gray else x.transpose(0, 3, 1, 2)
    y = np.array([i for _, i in files], dtype=np.int64)
    x_train, x_test, y_train, y_test = _split(x, y, 0.2)
    return f"folder:{root.name}", x_train, y_train, x_test, y_test, 1.0 / 255.0, classes
