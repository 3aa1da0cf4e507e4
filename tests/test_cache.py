import json

import pytest

from edgec.pipeline.cache import ENTRY_FILE, StageCache, stable_hash


def write(payload):
    def build(out):
        (out / "a.bin").write_bytes(payload)
        return {"n": len(payload)}

    return build


def test_put_then_get_roundtrip(tmp_path):
    cache = StageCache(tmp_path)
    art = cache.put("train", "k1", "model", write(b"abc"))
    again = cache.get("train", "k1")
    assert again is not None and again.digest == art.digest and again.info == {"n": 3}


def test_digest_depends_on_content_only(tmp_path):
    cache = StageCache(tmp_path)
    assert cache.put("s", "k1", "model", write(b"x")).digest == cache.put("s", "k2", "model", write(b"x")).digest
    assert cache.put("s", "k3", "model", write(b"y")).digest != cache.get("s", "k1").digest


def test_corrupt_entry_is_discarded(tmp_path):
    cache = StageCache(tmp_path)
    art = cache.put("train", "k", "model", write(b"abc"))
    (art.path / "a.bin").write_bytes(b"abd")
    assert cache.get("train", "k") is None
    assert not art.path.exists()


def test_missing_entry_file_is_discarded(tmp_path):
    cache = StageCache(tmp_path)
    art = cache.put("train", "k", "model", write(b"abc"))
    (art.path / ENTRY_FILE).unlink()
    assert cache.get("train", "k") is None


def test_failed_build_leaves_nothing(tmp_path):
    cache = StageCache(tmp_path)

    def boom(out):
        (out / "half.bin").write_bytes(b"half")
        raise RuntimeError("stage failed")

    with pytest.raises(RuntimeError):
        cache.put("train", "k", "model", boom)
    assert cache.get("train", "k") is None
    assert list((tmp_path / "train").iterdir()) == []


def test_stable_hash_is_order_independent():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})
    json.dumps({})  # keys are canonical JSON
