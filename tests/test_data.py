import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from edgec.data import load_dataset, read_idx
from edgec.errors import InputError


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
    assert flat.input_shape == (5,) and flat.num_classes == 4 and flat.scale == 1.0
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
