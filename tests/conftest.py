import os
import shutil
from pathlib import Path

import pytest
import torch

from edgec.base import emulation
from support import MNIST_DIR


@pytest.fixture(scope="session", autouse=True)
def _session_cache_key(tmp_path_factory):
    """One cache key for the whole session, set before any fixture runs: module-scoped fixtures build
    into caches that later tests reuse, which another key would (rightly) refuse. Tests of the key
    itself set their own folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config")))
        mp.setenv("EDGEC_CACHE_DIR", str(tmp_path_factory.mktemp("session-cache")))  # module fixtures' default
        mp.delenv("EDGEC_CACHE_KEY_FILE", raising=False)
        yield


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own stage cache; nothing touches ~/.cache or ~/.config."""
    monkeypatch.setenv("EDGEC_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def mnist_dir() -> Path:
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST not found at {MNIST_DIR}")
    return MNIST_DIR


@pytest.fixture
def one_torch_thread():
    """Training tests whose figures are compared with thresholds run on one thread: the result then
    does not depend on how many cores the machine lends."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def arm64_cache() -> Path:
    """The emulated arm64 Python's folder (tests that run bundles under qemu-aarch64); skipped where
    qemu-user-static is missing or EDGEC_SKIP_EMULATION=1."""
    if os.environ.get("EDGEC_SKIP_EMULATION") == "1":
        pytest.skip("EDGEC_SKIP_EMULATION=1")
    if shutil.which("qemu-aarch64-static") is None:
        pytest.skip("qemu-aarch64-static not found (apt-get install qemu-user-static)")
    return emulation.DEFAULT_CACHE_DIR
