from pathlib import Path

import pytest

from support import MNIST_DIR


@pytest.fixture(scope="session")
def _session_config_home(tmp_path_factory) -> Path:
    """One cache key for the session: module-scoped fixtures build into caches that later tests reuse,
    which a key per test would (rightly) refuse. Tests of the key itself set their own folder."""
    return tmp_path_factory.mktemp("config")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch, _session_config_home):
    """Every test gets its own stage cache; nothing touches ~/.cache or ~/.config."""
    monkeypatch.setenv("EDGEC_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(_session_config_home))
    monkeypatch.delenv("EDGEC_CACHE_KEY_FILE", raising=False)


@pytest.fixture
def mnist_dir() -> Path:
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST not found at {MNIST_DIR}")
    return MNIST_DIR
