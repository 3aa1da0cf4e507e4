"""Data sources: ``digits`` and ``diabetes`` (built in), ``mnist`` / ``fashion-mnist`` / ``kmnist``
(downloaded by ``edgec data fetch NAME``, or ``NAME:DIR`` for a folder of the IDX files), ``npz:FILE``,
``folder:DIR``.

Every source yields a :class:`Dataset` holding *raw* samples (uint8 where the source is 8-bit)
and the affine map that turns a raw sample into the model input (``raw * scale + offset``).
Keeping raw samples lets a bundle ship its evaluation set the way a device would see data.
Splits are deterministic and independent of the training seed, so changing ``--seed`` never
changes which samples are evaluated.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import unicodedata
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from .data_fetch import DATASETS as FETCHABLE
from .data_fetch import downloaded_dir
from .errors import InputError
from .suggest import did_you_mean

SPLIT_SEED = 0  # fixed on purpose: splits do not move with --seed
MAX_CLASSES = 100_000  # a label beyond this is a corrupt file, not a class index
MIN_TRAIN_PER_CLASS = 2  # samples each class keeps for training after the validation split
MAX_IMAGE_PIXELS = 50_000_000  # folder: a larger image is refused as a decompression bomb
# Built-in data sets by name, with the task their labels define (a build's default task).
BUILTIN_DATASETS = {"digits": "classification", "diabetes": "regression"}
SOURCE_FORMS = ("mnist", "fashion-mnist", "kmnist", "mnist:DIR", "npz:FILE", "folder:DIR")


def unknown_source(spec: str) -> InputError:
    hint = did_you_mean(spec.partition(":")[0], [*BUILTIN_DATASETS, *(f.split(":")[0] for f in SOURCE_FORMS)])
    return InputError(f"unknown data spec {spec!r}{hint}: use {', '.join([*BUILTIN_DATASETS, *SOURCE_FORMS])} "
                      "(edgec data fetch NAME downloads mnist, fashion-mnist or kmnist)")


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    scale: float | tuple[float, ...]  # one number, or one per feature (standardised flat features)
    offset: float | tuple[float, ...] = 0.0
    labels: tuple[str, ...] = field(default=())
    # Beyond classification (see pipeline/objectives.py): the task kind; for regression, y holds float
    # targets (N, k) in real units and the model outputs (y - target_offset) / target_scale; for
    # reconstruction, y_test marks anomalous test samples (1) and input_noise trains a denoising autoencoder.
    task: str = "classification"
    target_scale: tuple[float, ...] = (1.0,)
    target_offset: tuple[float, ...] = (0.0,)
    input_noise: float = 0.0

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
        scale, offset = np.asarray(self.scale, np.float32), np.asarray(self.offset, np.float32)
        return (raw.astype(np.float32) * scale + offset).astype(np.float32)

    @property
    def digest(self) -> str:
        """Content hash of every split and the preprocessing; part of every cache key."""
        h = hashlib.sha256()
        for a in (self.x_train, self.y_train, self.x_val, self.y_val, self.x_test, self.y_test):
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
        h.update(repr((self.scale, self.offset, self.labels)).encode())
        if self.task != "classification":  # classification digests stay what they were
            h.update(repr((self.task, self.target_scale, self.target_offset, self.input_noise)).encode())
        return h.hexdigest()

    def summary(self) -> str:
        if self.task != "classification":
            return task_summary(self)
        return (
            f"{self.name}: {len(self.y_train)} train / {len(self.y_val)} val / {len(self.y_test)} test, "
            f"input {list(self.input_shape)}, {self.num_classes} classes"
        )


def load_dataset(spec: str, val_fraction: float = 0.1, image_size: int | None = None, task: str = "classification",
                 normal: list[int] | None = None, input_noise: float = 0.0, cache_dir: Path | None = None) -> Dataset:
    """Resolve a ``--data`` spec into a validated :class:`Dataset` (for ``task``: see load_task_dataset).
    ``cache_dir`` holds the data sets ``edgec data fetch`` downloaded (default: the default cache)."""
    if task != "classification":
        return load_task_dataset(spec, val_fraction, image_size, task, normal, input_noise, cache_dir)
    scheme, _, arg = spec.partition(":")
    if scheme == "digits" and not arg:
        parts = _digits()
    elif scheme in FETCHABLE:
        folder = Path(arg).expanduser() if arg else downloaded_dir(scheme, cache_dir)
        parts = _idx_dataset(scheme, folder)
    elif scheme == "npz" and arg:
        parts = _npz(Path(arg).expanduser())
    elif scheme == "folder" and arg:
        parts = _folder(Path(arg).expanduser(), image_size)
    elif spec in BUILTIN_DATASETS:
        raise InputError(f"{spec} is a {BUILTIN_DATASETS[spec]} data set; set task = \"{BUILTIN_DATASETS[spec]}\" "
                         f"(--set task={BUILTIN_DATASETS[spec]}) or leave task unset")
    else:
        raise unknown_source(spec)
    name, x_train, y_train, x_test, y_test, scale, labels = parts
    return _finish(name, x_train, y_train, x_test, y_test, scale, labels, val_fraction)


def _finish(name, x_train, y_train, x_test, y_test, scale, labels, val_fraction) -> Dataset:
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        _check_samples(name, split, x)
        if len(x) == 0:
            raise InputError(f"{name}: the {split} split is empty; give it at least one sample per class")
        if len(x) != len(y):
            raise InputError(
                f"{name}: {split} has {len(x)} samples but {len(y)} labels; they must match one to one"
            )
        _check_labels(name, split, y, len(labels))
    if x_train.shape[1:] != x_test.shape[1:]:
        raise InputError(
            f"{name}: train samples have shape {x_train.shape[1:]} but test samples {x_test.shape[1:]}"
        )
    if x_train.dtype != x_test.dtype:
        raise InputError(
            f"{name}: train samples are {x_train.dtype} but test samples {x_test.dtype}; "
            "save both splits with the same dtype (uint8 images or float features)"
        )
    for split, x in (("train", x_train), ("test", x_test)):
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            raise InputError(
                f"{name}: the {split} samples contain NaN or infinite values (or values beyond float32); "
                "clean or impute them before training"
            )
    for label in labels:
        if _unprintable(label) or not label.strip():
            raise InputError(
                f"{name}: class name {label!r} is empty or contains a control character (newline, tab, ...); "
                "rename it to printable text"
            )
    present = np.unique(y_train)
    if len(present) < 2:
        raise InputError(
            f"{name}: the train split holds only one class ({labels[int(present[0])]!r}); "
            "classification needs samples of at least 2 classes"
        )
    y_train, y_test = y_train.astype(np.int64), y_test.astype(np.int64)
    if not 0 < val_fraction < 1:
        raise InputError(f"val_fraction {val_fraction} must be between 0 and 1 (exclusive)")
    x_tr, x_val, y_tr, y_val = _split(x_train, y_train, val_fraction, name)
    counts = np.bincount(y_tr, minlength=len(labels))
    short = [int(c) for c in present if counts[c] < MIN_TRAIN_PER_CLASS]
    if short:
        c = short[0]
        need = _min_per_class(val_fraction)
        raise InputError(
            f"{name}: too few samples: class {labels[c]!r} keeps {int(counts[c])} training sample(s) after "
            f"{val_fraction:.0%} is held out for validation ({MIN_TRAIN_PER_CLASS} needed); "
            f"give every class at least {need} training samples"
        )
    offset = 0.0
    if x_tr.ndim == 2 and x_tr.dtype != np.uint8:
        scale, offset = _standardisation(x_tr)
    return Dataset(name, x_tr, y_tr, x_val, y_val, x_test, y_test, scale=scale, offset=offset, labels=tuple(labels))


def _standardisation(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-feature ``scale, offset`` giving zero mean and unit variance on the training samples.

    Flat float features come in arbitrary units (breast-cancer features span 0.001 to 4000); a network
    trained on them raw stays about 5 points below one trained on standardised inputs. The map is
    part of the bundle's preprocessing, so a device feeds raw features as they are."""
    mean, std = x.mean(0, dtype=np.float64), x.std(0, dtype=np.float64)
    std[std < 1e-12] = 1.0
    return tuple(float(v) for v in 1.0 / std), tuple(float(v) for v in -mean / std)


def _unprintable(name: str) -> bool:
    """Control characters, line separators or undecodable bytes: they would break labels.txt (one name a line)."""
    return any(unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp") for ch in name)


def _min_per_class(fraction: float) -> int:
    """Samples a class needs so that MIN_TRAIN_PER_CLASS stay after holding out ``fraction``."""
    n = MIN_TRAIN_PER_CLASS
    while n - math.ceil(fraction * n) < MIN_TRAIN_PER_CLASS:
        n += 1
    return n


def _check_samples(name: str, split: str, x: np.ndarray) -> None:
    """Shapes and dtypes a model can take: (N, F) features or (N, C, H, W) images, numbers only."""
    if x.ndim < 2 or x.ndim > 4:
        raise InputError(
            f"{name}: {split} samples have shape {x.shape}; give (N, features) vectors or (N, C, H, W) images"
        )
    if 0 in x.shape[1:]:
        raise InputError(f"{name}: {split} samples have shape {x.shape[1:]} with a zero dimension")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise InputError(f"{name}: {split} samples are {x.dtype}; give integer or float numbers")


def _check_labels(name: str, split: str, y: np.ndarray, num_classes: int | None = None) -> None:
    """Integer class indices in 0..num_classes-1 (0..MAX_CLASSES-1 when the class list is not known yet)."""
    if y.ndim != 1:
        hint = "; they look one-hot: save y.argmax(axis=1)" if y.ndim == 2 and y.shape[1] > 1 else ""
        raise InputError(f"{name}: {split} labels have shape {y.shape}; give one class index per sample{hint}")
    if not np.issubdtype(y.dtype, np.integer):
        raise InputError(
            f"{name}: {split} labels must be integers, got {y.dtype}; save class indices (e.g. y.astype(np.int64))"
        )
    if len(y) == 0:
        return
    low, high = int(y.min()), int(y.max())
    if low < 0:
        raise InputError(f"{name}: {split} label {low} is negative; labels must be class indices 0, 1, 2, ...")
    if num_classes is None:
        if high >= MAX_CLASSES:
            raise InputError(
                f"{name}: {split} label {high} is too large (at most {MAX_CLASSES - 1}); "
                "labels must be class indices 0, 1, 2, ..."
            )
    elif high >= num_classes:
        raise InputError(
            f"{name}: {split} label {high} is out of range 0..{num_classes - 1}; "
            "labels must be class indices"
        )


def _split(x: np.ndarray, y: np.ndarray, fraction: float, name: str = "data"):
    """Deterministic split, stratified by class whenever every class can be represented."""
    if len(y) < 2:
        raise InputError(f"{name}: the train split needs at least 2 samples to hold some out for validation")
    counts = np.bincount(y)
    counts = counts[counts > 0]
    n_held = int(np.ceil(fraction * len(y)))
    stratify = y if counts.min() >= 2 and len(counts) <= min(n_held, len(y) - n_held) else None
    try:
        return train_test_split(x, y, test_size=fraction, random_state=SPLIT_SEED, stratify=stratify)
    except ValueError as e:
        raise InputError(f"{name}: cannot split {len(y)} samples ({e}); give it more samples") from None


def _digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.uint8)[:, None, :, :]  # values 0..16
    y = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = _split(x, y, 0.2, "digits")
    return "digits", x_train, y_train, x_test, y_test, 1.0 / 16.0, [str(i) for i in range(10)]


# --- MNIST-style IDX (mnist, fashion-mnist, kmnist) -------------------------------------------
# IDX is four lines of numpy; torchvision (the usual reader) has no CPU wheel for this torch.

_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def _idx_dataset(name: str, folder: Path):
    """The four IDX files of ``name`` (a key of FETCHABLE) in ``folder``, gzipped or not."""
    if not folder.is_dir():
        raise InputError(f"{name}: {folder} is not a directory; point {name}:DIR at the folder with the IDX files")
    arrays = {}
    for key, stem in _MNIST_FILES.items():
        candidates = [folder / (stem + ".gz"), folder / stem]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise InputError(f"{name}: {stem}[.gz] not found in {folder}; it needs the four IDX files as distributed")
        arrays[key] = read_idx(path)
    x_train, x_test = arrays["x_train"], arrays["x_test"]
    if x_train.ndim != 3 or arrays["y_train"].ndim != 1:
        raise InputError(f"{name}: {folder} does not hold 3-d image and 1-d label IDX files")
    return (
        name,
        x_train[:, None],
        arrays["y_train"].astype(np.int64),
        x_test[:, None],
        arrays["y_test"].astype(np.int64),
        1.0 / 255.0,
        list(FETCHABLE[name].labels),
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
    expected = math.prod(dims)  # Python ints: a lying header cannot overflow
    if len(raw) - header != expected:
        raise InputError(
            f"{path}: truncated or corrupt IDX file: header promises {expected} bytes of data for shape "
            f"{dims}, found {len(raw) - header}; re-download the file"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


# --- npz --------------------------------------------------------------------------------------

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _npz(path: Path):
    if not path.is_file():
        raise InputError(f"npz: {path} does not exist")
    _check_npz_headers(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            x_train, y_train, x_test, y_test = (f[k] for k in _NPZ_KEYS)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"npz: {path} is not a readable .npz without pickled objects ({e})") from None
    name = f"npz:{path.name}"
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if x.ndim < 2 or x.ndim > 4 or 0 in x.shape[1:]:
            raise InputError(
                f"npz: samples of shape {x.shape[1:]} are neither flat vectors nor images "
                f"({split}: give (N, features), (N, H, W), (N, C, H, W) or (N, H, W, C) with no zero dimension)"
            )
        if y.ndim == 2 and y.shape[1] == 1:
            y = y.reshape(-1)
        # before the class list is built from the largest label: 2**40 must not become 2**40 names
        _check_labels(name, split, y)
        _check_samples(name, split, x)
    if (x_train.dtype == np.uint8) != (x_test.dtype == np.uint8):
        raise InputError(
            f"{name}: x_train is {x_train.dtype} but x_test is {x_test.dtype}; "
            "save both splits with the same dtype (uint8 images or float features)"
        )
    x_train, x_test = _image_layout(x_train), _image_layout(x_test)
    scale = 1.0 / 255.0 if x_train.dtype == np.uint8 else 1.0
    if x_train.dtype != np.uint8:
        with np.errstate(over="ignore"):  # values beyond float32 become inf and are refused by _finish
            x_train, x_test = x_train.astype(np.float32), x_test.astype(np.float32)
    y_train, y_test = y_train.reshape(-1), y_test.reshape(-1)
    n = int(max(y_train.max(initial=-1), y_test.max(initial=-1))) + 1
    return name, x_train, y_train, x_test, y_test, scale, [str(i) for i in range(max(n, 1))]


def _check_npz_headers(path: Path, keys: tuple[str, ...] = _NPZ_KEYS) -> None:
    """Read the four arrays' headers (not their data) and refuse, before numpy allocates anything,
    a file that is not an npz, lacks an array, holds pickled objects, or promises more data than it
    holds or than this machine's memory."""
    if not zipfile.is_zipfile(path):
        raise InputError(f"npz: {path} is not an .npz archive; write one with numpy.savez(path, x_train=..., ...)")
    total = 0
    try:
        with zipfile.ZipFile(path) as z:
            members = {info.filename: info for info in z.infolist()}
            missing = [k for k in keys if k + ".npy" not in members]
            if missing:
                raise InputError(f"npz: {path} lacks {', '.join(missing)}; it needs {', '.join(keys)}")
            for key in keys:
                info = members[key + ".npy"]
                with z.open(info) as fp:
                    version = np.lib.format.read_magic(fp)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
                    header_len = fp.tell()
                if dtype.hasobject:
                    raise InputError(
                        f"npz: {path}: {key} holds pickled objects, which edgec does not load; "
                        "save plain numeric arrays"
                    )
                nbytes = math.prod(shape) * dtype.itemsize
                if header_len + nbytes > info.file_size:
                    raise InputError(
                        f"npz: {path}: {key} promises shape {shape} ({nbytes:,} bytes) but the file holds "
                        f"{info.file_size - header_len:,}; the file is truncated or corrupt"
                    )
                total += nbytes
    except InputError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, RuntimeError) as e:
        raise InputError(f"npz: {path} is not a readable .npz without pickled objects ({e})") from None
    memory = physical_memory()
    if memory and total > memory:
        raise InputError(
            f"npz: {path} holds {total / 2**30:.1f} GiB of arrays, more than this machine's "
            f"{memory / 2**30:.1f} GiB of memory; use a smaller data set"
        )


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


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
    for c in classes:  # names become lines of labels.txt in the bundle
        if _unprintable(c):
            raise InputError(
                f"folder: class folder {c!r} in {root} has a control character (newline, tab, ...) in its name; "
                "rename it to printable text"
            )
    files = [
        (f, i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir()) if f.suffix.lower() in _IMAGE_SUFFIXES
    ]
    if not files:
        raise InputError(f"folder: no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) under {root}")
    with_images = sorted({i for _, i in files})
    if len(with_images) < 2:
        raise InputError(
            f"folder: only {classes[with_images[0]]!r} under {root} has images; "
            "classification needs at least 2 class sub-folders with images"
        )
    images = []
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            for f, _ in files:
                try:
                    with Image.open(f) as im:
                        images.append(im.copy())
                except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                    raise InputError(
                        f"folder: {f} is too large ({e}); edgec reads images of at most {MAX_IMAGE_PIXELS:,} pixels: "
                        "shrink or remove it"
                    ) from None
                except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
                    raise InputError(f"folder: {f} is not a readable image ({e})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    gray = all(im.mode in ("1", "L", "I;16", "I") for im in images)
    size = (image_size, image_size) if image_size else images[0].size
    x = np.stack(
        [np.asarray(im.convert("L" if gray else "RGB").resize(size), dtype=np.uint8) for im in images]
    )
    x = x[:, None] if gray else x.transpose(0, 3, 1, 2)
    y = np.array([i for _, i in files], dtype=np.int64)
    x_train, x_test, y_train, y_test = _split(x, y, 0.2, f"folder:{root.name}")
    return f"folder:{root.name}", x_train, y_train, x_test, y_test, 1.0 / 255.0, classes


# --- beyond classification: regression and reconstruction (autoencoders) -----------------------

TASK_KINDS = ("classification", "reconstruction", "regression")
MAX_TARGETS = 1024  # regression outputs per sample
ANOMALY_KEY = "anomaly_test"


def task_summary(data: Dataset) -> str:
    counts = f"{data.name}: {len(data.x_train)} train / {len(data.x_val)} val / {len(data.x_test)} test, input {list(data.input_shape)}"
    if data.task == "regression":
        return f"{counts}, regression of {len(data.labels)} target(s) ({', '.join(data.labels)})"
    anomalous = int(np.count_nonzero(data.y_test))
    marked = f"{anomalous} of the test samples marked anomalous" if anomalous else "no test sample marked anomalous"
    noise = f", denoising (input noise {data.input_noise:g})" if data.input_noise else ""
    return f"{counts}, reconstruction{noise}; {marked}"


def load_task_dataset(spec: str, val_fraction: float, image_size: int | None, task: str,
                      normal: list[int] | None = None, input_noise: float = 0.0, cache_dir: Path | None = None) -> Dataset:
    """A regression or reconstruction data set.

    Regression: ``diabetes`` (scikit-learn's, shipped with it: 442 patients, 10 features, disease
    progression after one year) or ``npz:FILE`` with float ``y_train`` / ``y_test`` of shape (N,) or
    (N, k). Targets are standardized on the train split for training; the model's outputs map back
    to real units with ``target_scale`` / ``target_offset``.

    Reconstruction: ``npz:FILE`` with ``x_train`` and ``x_test`` only (an optional ``anomaly_test``
    array marks anomalous test samples with 1), or any labelled source (digits, mnist:DIR, folder:DIR,
    npz with labels) with ``normal`` classes: the model trains on those classes only and the test
    split's other classes are marked anomalous. Without ``normal`` every sample is normal.
    """
    if task not in TASK_KINDS:
        raise InputError(f"unknown task {task!r}: use {', '.join(TASK_KINDS)}")
    if not 0 < val_fraction < 1:
        raise InputError(f"val_fraction {val_fraction} must be between 0 and 1 (exclusive)")
    if task == "regression":
        if normal is not None or input_noise:
            raise InputError("data.normal and data.input_noise apply to task = \"reconstruction\" only")
        return _regression(spec, val_fraction)
    return _reconstruction(spec, val_fraction, image_size, normal, input_noise, cache_dir)


def _diabetes():
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes(scaled=False)  # features in their own units: age, sex, BMI, blood pressure, 6 serum values
    x = bunch.data.astype(np.float32)
    y = bunch.target.astype(np.float32).reshape(-1, 1)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=SPLIT_SEED)
    return "diabetes", x_train, y_train, x_test, y_test, 1.0, ["disease progression"]


def _regression(spec: str, val_fraction: float) -> Dataset:
    scheme, _, arg = spec.partition(":")
    if scheme == "diabetes" and not arg:
        name, x_train, y_train, x_test, y_test, scale, labels = _diabetes()
    elif scheme == "npz" and arg:
        path = Path(arg).expanduser()
        arrays = _task_npz(path, _NPZ_KEYS)
        name = f"npz:{path.name}"
        x_train, x_test = _task_samples(name, arrays["x_train"], arrays["x_test"])
        y_train, y_test = (_float_targets(name, split, arrays[f"y_{split}"], len(x))
                           for split, x in (("train", x_train), ("test", x_test)))
        if y_train.shape[1] != y_test.shape[1]:
            raise InputError(f"{name}: y_train has {y_train.shape[1]} target(s) per sample but y_test {y_test.shape[1]}")
        scale = 1.0 / 255.0 if x_train.dtype == np.uint8 else 1.0
        labels = ["y"] if y_train.shape[1] == 1 else [f"y{i}" for i in range(y_train.shape[1])]
    elif scheme not in ("digits", "folder", *FETCHABLE):
        raise unknown_source(spec)
    else:
        raise InputError(f"data {spec!r} cannot train a regression: use diabetes or npz:FILE (float y_train, y_test)")
    if len(x_train) < 2:
        raise InputError(f"{name}: the train split needs at least 2 samples to hold some out for validation")
    x_tr, x_val, y_tr, y_val = train_test_split(x_train, y_train, test_size=val_fraction, random_state=SPLIT_SEED)
    x_offset = 0.0
    if x_tr.ndim == 2 and x_tr.dtype != np.uint8:  # flat features: standardised, as for classification
        scale, x_offset = _standardisation(x_tr)
    offset = y_tr.astype(np.float64).mean(axis=0)
    spread = y_tr.astype(np.float64).std(axis=0)
    spread = np.where(spread > 0, spread, 1.0)
    return Dataset(name, x_tr, y_tr, x_val, y_val, x_test, y_test, scale=scale, offset=x_offset, labels=tuple(labels),
                   task="regression", target_scale=tuple(float(v) for v in spread),
                   target_offset=tuple(float(v) for v in offset))


def _reconstruction(spec: str, val_fraction: float, image_size: int | None, normal: list[int] | None,
                    input_noise: float, cache_dir: Path | None = None) -> Dataset:
    if not (input_noise >= 0 and math.isfinite(input_noise)):
        raise InputError(f"data.input_noise must be a finite number >= 0, got {input_noise}")
    scheme, _, arg = spec.partition(":")
    anomaly = None
    x_only = False
    if scheme == "npz" and arg:
        path = Path(arg).expanduser()
        with _open_npz_members(path) as members:
            x_only = "y_train.npy" not in members or "y_test.npy" not in members
    if x_only:
        keys = ("x_train", "x_test") + ((ANOMALY_KEY,) if ANOMALY_KEY + ".npy" in members else ())
        arrays = _task_npz(path, keys)
        name = f"npz:{path.name}"
        x_train, x_test = _task_samples(name, arrays["x_train"], arrays["x_test"])
        if normal is not None:
            raise InputError(f"{name} has no labels (y_train, y_test): data.normal needs a labelled source; mark "
                             f"anomalous test samples with an {ANOMALY_KEY} array instead")
        if ANOMALY_KEY in arrays:
            anomaly = _anomaly_flags(name, arrays[ANOMALY_KEY], len(x_test))
        scale, x_offset = (1.0 / 255.0 if x_train.dtype == np.uint8 else 1.0), 0.0
    else:
        labelled = load_dataset(spec, val_fraction, image_size, cache_dir=cache_dir)  # validated as a classification source
        name, scale, x_offset = labelled.name, labelled.scale, labelled.offset
        x_train = np.concatenate([labelled.x_train, labelled.x_val])
        y_train = np.concatenate([labelled.y_train, labelled.y_val])
        x_test, y_test = labelled.x_test, labelled.y_test
        if normal is not None:
            classes = sorted(set(int(c) for c in normal))
            bad = [c for c in classes if not 0 <= c < labelled.num_classes]
            if not classes or bad:
                raise InputError(f"data.normal {normal}: give class indices in 0..{labelled.num_classes - 1} "
                                 f"({name} has classes {', '.join(labelled.labels)})")
            x_train = x_train[np.isin(y_train, classes)]
            anomaly = (~np.isin(y_test, classes)).astype(np.int64)
            name = f"{name}[normal {','.join(labelled.labels[c] for c in classes)}]"
    if len(x_train) < 2:
        raise InputError(f"{name}: reconstruction needs at least 2 training samples")
    x_tr, x_val = train_test_split(x_train, test_size=val_fraction, random_state=SPLIT_SEED)
    if x_only and x_tr.ndim == 2 and x_tr.dtype != np.uint8:  # flat features: standardised
        scale, x_offset = _standardisation(x_tr)
    flags = np.zeros(len(x_test), dtype=np.int64) if anomaly is None else anomaly

    def zeros(x):
        return np.zeros(len(x), dtype=np.int64)

    return Dataset(name, x_tr, zeros(x_tr), x_val, zeros(x_val), x_test, flags, scale=scale, offset=x_offset,
                   labels=("normal", "anomalous"), task="reconstruction", input_noise=float(input_noise))


class _open_npz_members:
    """The member names of an npz (no array is read)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        if not self.path.is_file():
            raise InputError(f"npz: {self.path} does not exist")
        if not zipfile.is_zipfile(self.path):
            raise InputError(f"npz: {self.path} is not an .npz archive; write one with numpy.savez(path, x_train=..., ...)")
        with zipfile.ZipFile(self.path) as z:
            return {info.filename for info in z.infolist()}

    def __exit__(self, *exc):
        return False


def _task_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise InputError(f"npz: {path} does not exist")
    _check_npz_headers(path, keys)
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in keys}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"npz: {path} is not a readable .npz without pickled objects ({e})") from None


def _task_samples(name: str, x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Samples as the classification sources check them: shapes, dtypes, finite values, NCHW images."""
    for split, x in (("train", x_train), ("test", x_test)):
        if x.ndim < 2 or x.ndim > 4 or 0 in x.shape[1:]:
            raise InputError(f"{name}: {split} samples of shape {x.shape[1:]} are neither flat vectors nor images "
                             "(give (N, features), (N, H, W), (N, C, H, W) or (N, H, W, C) with no zero dimension)")
        _check_samples(name, split, x)
        if len(x) == 0:
            raise InputError(f"{name}: the {split} split is empty")
    if (x_train.dtype == np.uint8) != (x_test.dtype == np.uint8):
        raise InputError(f"{name}: x_train is {x_train.dtype} but x_test is {x_test.dtype}; save both with the same dtype")
    x_train, x_test = _image_layout(x_train), _image_layout(x_test)
    if x_train.dtype != np.uint8:
        with np.errstate(over="ignore"):
            x_train, x_test = x_train.astype(np.float32), x_test.astype(np.float32)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise InputError(f"{name}: train samples have shape {x_train.shape[1:]} but test samples {x_test.shape[1:]}")
    for split, x in (("train", x_train), ("test", x_test)):
        if x.dtype != np.uint8 and not np.isfinite(x).all():
            raise InputError(f"{name}: the {split} samples contain NaN or infinite values; clean them first")
    return x_train, x_test


def _float_targets(name: str, split: str, y: np.ndarray, n: int) -> np.ndarray:
    """Regression targets as float32 (N, k)."""
    if not (np.issubdtype(y.dtype, np.floating) or np.issubdtype(y.dtype, np.integer)):
        raise InputError(f"{name}: y_{split} is {y.dtype}; regression targets must be numbers")
    if y.ndim == 1:
        y = y.reshape(-1, 1)
    if y.ndim != 2 or len(y) != n or not 1 <= y.shape[1] <= MAX_TARGETS:
        raise InputError(f"{name}: y_{split} has shape {y.shape}; give ({n},) or ({n}, k) targets, k <= {MAX_TARGETS}")
    with np.errstate(over="ignore"):
        y = y.astype(np.float32)
    if not np.isfinite(y).all():
        raise InputError(f"{name}: y_{split} holds NaN or infinite values (or values beyond float32)")
    return y


def _anomaly_flags(name: str, flags: np.ndarray, n: int) -> np.ndarray:
    flags = flags.reshape(-1) if flags.ndim == 2 and flags.shape[1] == 1 else flags
    if flags.ndim != 1 or len(flags) != n:
        raise InputError(f"{name}: {ANOMALY_KEY} has shape {flags.shape}; give one flag per test sample ({n},)")
    if flags.dtype == np.bool_:
        return flags.astype(np.int64)
    if not np.issubdtype(flags.dtype, np.integer) and not np.issubdtype(flags.dtype, np.floating):
        raise InputError(f"{name}: {ANOMALY_KEY} is {flags.dtype}; give 0 (normal) or 1 (anomalous) per test sample")
    if not np.isin(flags, (0, 1)).all():
        raise InputError(f"{name}: {ANOMALY_KEY} must hold 0 (normal) or 1 (anomalous) only")
    return flags.astype(np.int64)
