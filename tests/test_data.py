import gzip
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from edgec.base.data import load_dataset, read_idx
from edgec.base.errors import InputError


def write_idx(path, array, gz=False):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


def fake_mnist(folder, n_train=60, n_test=20, gz=True, labels=None):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    write_idx(folder / f"train-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n_train, 28, 28)), gz)
    write_idx(folder / f"train-labels-idx1-ubyte{suffix}", labels if labels is not None else np.arange(n_train) % 10, gz)
    write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n_test, 28, 28)), gz)
    write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", np.arange(n_test) % 10, gz)


def test_digits_is_deterministic_and_shaped():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    assert a.digest == b.digest
    assert len(a.y_train) + len(a.y_val) + len(a.y_test) == 1797
    assert a.x_train.dtype == np.uint8 and a.to_input(a.x_train).max() <= 1.0


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_gz_and_raw(tmp_path, gz):
    fake_mnist(tmp_path, gz=gz)
    ds = load_dataset(f"mnist:{tmp_path}")
    assert ds.input_shape == (1, 28, 28)
    assert len(ds.y_train) + len(ds.y_val) == 60 and len(ds.y_test) == 20


def test_truncated_idx(tmp_path):
    fake_mnist(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(InputError, match="truncated"):
        load_dataset(f"mnist:{tmp_path}")


def test_corrupt_gzip_and_bad_magic(tmp_path):
    (tmp_path / "x.gz").write_bytes(b"not gzip at all")
    with pytest.raises(InputError, match="cannot read"):
        read_idx(tmp_path / "x.gz")
    (tmp_path / "y").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(InputError, match="magic"):
        read_idx(tmp_path / "y")


def test_label_count_mismatch(tmp_path):
    fake_mnist(tmp_path, labels=np.arange(50) % 10)
    with pytest.raises(InputError, match="60 samples but 50 labels"):
        load_dataset(f"mnist:{tmp_path}")


def test_labels_out_of_range(tmp_path):
    labels = np.arange(60) % 10
    labels[3] = 12
    fake_mnist(tmp_path, labels=labels)
    with pytest.raises(InputError, match="label 12 is out of range"):
        load_dataset(f"mnist:{tmp_path}")


def test_missing_mnist_file(tmp_path):
    fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(InputError, match="t10k-labels-idx1-ubyte"):
        load_dataset(f"mnist:{tmp_path}")


def test_npz_flat_and_images(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "flat.npz", x_train=rng.normal(size=(40, 5)), y_train=np.arange(40) % 4,
             x_test=rng.normal(size=(8, 5)), y_test=np.arange(8) % 4)
    flat = load_dataset(f"npz:{tmp_path / 'flat.npz'}")
    assert flat.input_shape == (5,) and flat.num_classes == 4 and len(flat.scale) == len(flat.offset) == 5
    standardised = flat.to_input(flat.x_train)  # flat float features: zero mean, unit variance on train
    assert np.allclose(standardised.mean(0), 0, atol=1e-5) and np.allclose(standardised.std(0), 1, atol=1e-4)
    np.savez(tmp_path / "img.npz", x_train=rng.integers(0, 255, (40, 6, 6, 3), dtype=np.uint8), y_train=np.arange(40) % 2,
             x_test=rng.integers(0, 255, (8, 6, 6, 3), dtype=np.uint8), y_test=np.arange(8) % 2)
    img = load_dataset(f"npz:{tmp_path / 'img.npz'}")
    assert img.input_shape == (3, 6, 6) and img.scale == pytest.approx(1 / 255)


def test_npz_refuses_pickled_objects_and_missing_keys(tmp_path):
    np.savez(tmp_path / "obj.npz", x_train=np.array([{"a": 1}], dtype=object), y_train=np.zeros(1),
             x_test=np.zeros((1, 2)), y_test=np.zeros(1, dtype=int))
    with pytest.raises(InputError, match="pickled"):
        load_dataset(f"npz:{tmp_path / 'obj.npz'}")
    np.savez(tmp_path / "partial.npz", x_train=np.zeros((2, 2)))
    with pytest.raises(InputError, match="lacks y_train"):
        load_dataset(f"npz:{tmp_path / 'partial.npz'}")


def test_empty_dataset(tmp_path):
    np.savez(tmp_path / "empty.npz", x_train=np.zeros((0, 3)), y_train=np.zeros(0, dtype=int),
             x_test=np.zeros((2, 3)), y_test=np.zeros(2, dtype=int))
    with pytest.raises(InputError, match="train split is empty"):
        load_dataset(f"npz:{tmp_path / 'empty.npz'}")


def test_folder_of_images(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (10, 12), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    ds = load_dataset(f"folder:{tmp_path}", image_size=8)
    assert ds.labels == ("cat", "dog") and ds.input_shape == (1, 8, 8)
    (tmp_path / "dog" / "broken.png").write_bytes(b"nope")
    with pytest.raises(InputError, match="broken.png"):
        load_dataset(f"folder:{tmp_path}")


def test_unknown_scheme():
    with pytest.raises(InputError, match="unknown data spec"):
        load_dataset("s3:bucket")


# --- degenerate data: refused with one actionable InputError, before any value-sized allocation ---


def save_npz(path, x_train=None, y_train=None, x_test=None, y_test=None):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.normal(size=(40, 5)) if x_train is None else x_train,
        "y_train": np.arange(40) % 4 if y_train is None else y_train,
        "x_test": rng.normal(size=(8, 5)) if x_test is None else x_test,
        "y_test": np.arange(8) % 4 if y_test is None else y_test,
    }
    np.savez(path, **arrays)
    return f"npz:{path}"


def test_npz_huge_label_refused_without_building_its_class_list(tmp_path):
    y = np.arange(40) % 4
    y[7] = 2**40
    spec = save_npz(tmp_path / "d.npz", y_train=y)
    # in a child with capped memory and time: a regression would try to build 2**40 class names
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
        "from edgec.base.data import load_dataset\n"
        "from edgec.base.errors import InputError\n"
        "try:\n"
        f"    load_dataset({spec!r})\n"
        "except InputError as e:\n"
        "    print(e)\n"
        "    sys.exit(0)\n"
        "sys.exit(1)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "label 1099511627776 is too large (at most 99999)" in proc.stdout


@pytest.mark.parametrize(
    "y_train, message",
    [
        ((np.arange(40) % 4).astype(np.float64), "labels must be integers, got float64"),
        (np.arange(40) % 4 - 1, "label -1 is negative"),
        (np.eye(4, dtype=np.int64)[np.arange(40) % 4], "look one-hot"),
        (np.zeros(40, dtype=np.int64), "only one class"),
    ],
    ids=["float", "negative", "one-hot", "one-class"],
)
def test_npz_bad_labels(tmp_path, y_train, message):
    with pytest.raises(InputError, match=message):
        load_dataset(save_npz(tmp_path / "d.npz", y_train=y_train, y_test=np.zeros(8, dtype=np.int64)))


def test_too_few_samples_names_the_minimum(tmp_path):
    spec = save_npz(tmp_path / "d.npz", x_train=np.ones((3, 5)), y_train=np.array([0, 1, 0]),
                    x_test=np.ones((1, 5)), y_test=np.array([1]))
    with pytest.raises(InputError, match=r"too few samples: class '\d' keeps \d training sample\(s\).*at least 3"):
        load_dataset(spec)
    spec = save_npz(tmp_path / "e.npz", x_test=np.ones((0, 5)), y_test=np.zeros(0, dtype=np.int64))
    with pytest.raises(InputError, match="test split is empty"):
        load_dataset(spec)


def test_npz_split_dtypes_must_match(tmp_path):
    rng = np.random.default_rng(0)
    spec = save_npz(tmp_path / "d.npz", x_train=rng.integers(0, 255, (40, 6, 6), dtype=np.uint8),
                    x_test=rng.random((8, 6, 6)))
    with pytest.raises(InputError, match="x_train is uint8 but x_test is float64; save both splits with the same dtype"):
        load_dataset(spec)


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e300], ids=["nan", "inf", "beyond-float32"])
def test_npz_non_finite_features(tmp_path, bad):
    x = np.random.default_rng(0).normal(size=(40, 5))
    x[3, 2] = bad
    with pytest.raises(InputError, match="train samples contain NaN or infinite values"):
        load_dataset(save_npz(tmp_path / "d.npz", x_train=x))


@pytest.mark.parametrize(
    "shape", [(40, 2, 2, 2, 2), (40, 0), (40, 3, 0, 4), (40,)], ids=["5-d", "zero-features", "zero-height", "1-d"]
)
def test_npz_absurd_shapes(tmp_path, shape):
    with pytest.raises(InputError, match="neither flat vectors nor images"):
        load_dataset(save_npz(tmp_path / "d.npz", x_train=np.ones(shape), x_test=np.ones((8,) + shape[1:])))


def test_npz_not_an_archive_or_lying_header(tmp_path):
    np.save(tmp_path / "plain.npy", np.zeros(3))
    (tmp_path / "plain.npz").write_bytes((tmp_path / "plain.npy").read_bytes())
    with pytest.raises(InputError, match="not an .npz archive"):
        load_dataset(f"npz:{tmp_path / 'plain.npz'}")
    # a header promising 2**40 floats in a few bytes must not make numpy allocate 8 TiB
    import io
    import zipfile

    save_npz(tmp_path / "ok.npz")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (2**40,)})
    with zipfile.ZipFile(tmp_path / "ok.npz") as src, zipfile.ZipFile(tmp_path / "liar.npz", "w") as dst:
        for name in src.namelist():
            dst.writestr(name, header.getvalue() + b"\0" * 64 if name == "x_train.npy" else src.read(name))
    with pytest.raises(InputError, match=r"x_train promises shape \(1099511627776,\).*truncated or corrupt"):
        load_dataset(f"npz:{tmp_path / 'liar.npz'}")


def test_idx_header_cannot_overflow(tmp_path):
    dims = [2**32 - 1] * 8
    (tmp_path / "big").write_bytes(bytes([0, 0, 8, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims) + b"\0" * 16)
    with pytest.raises(InputError, match="truncated or corrupt"):
        read_idx(tmp_path / "big")


def image_folder(root, classes=("cat", "dog"), n=6, size=(10, 12)):
    rng = np.random.default_rng(0)
    for cls in classes:
        (root / cls).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(root / cls / f"{i}.png")


def test_folder_class_name_with_control_character(tmp_path):
    image_folder(tmp_path, classes=("cat", "dog\nhouse"))
    with pytest.raises(InputError, match=r"class folder 'dog\\nhouse' .* control character"):
        load_dataset(f"folder:{tmp_path}")


def test_folder_one_class(tmp_path):
    image_folder(tmp_path, classes=("cat",))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="only 'cat' .* has images; classification needs at least 2"):
        load_dataset(f"folder:{tmp_path}")


def _png_header_only(width, height):
    """A PNG that claims width x height pixels: a decompression bomb needs only its header."""
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_folder_decompression_bomb(tmp_path, monkeypatch):
    image_folder(tmp_path)
    (tmp_path / "dog" / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(InputError, match=r"dog/bomb.png is too large.*shrink or remove it"):
        load_dataset(f"folder:{tmp_path}")
    assert Image.MAX_IMAGE_PIXELS == limit  # the limit is edgec's, not left behind for the process
    # between the limit and twice it PIL only warns: edgec turns the warning into the same refusal
    (tmp_path / "dog" / "bomb.png").unlink()
    monkeypatch.setattr("edgec.base.data.MAX_IMAGE_PIXELS", 80)
    with pytest.raises(InputError, match=r"cat/0.png is too large"):
        load_dataset(f"folder:{tmp_path}")
