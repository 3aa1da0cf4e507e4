from pathlib import Path

import pytest

from support import MNIST_DIR


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own stage cache; nothing touches ~/.cache."""
    monkeypatch.setenv("EDGEC_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def mnist_dir() -> Path:
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST not found at {MNIST_DIR}")
    return MNIST_DIR
