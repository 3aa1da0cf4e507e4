"""Real processes hammering one stage cache and one published directory.

3 worker processes (multiprocessing, spawn) get, put and force-put the same few keys, now and then
replace an entry with a forged one (another stage's entry, a file rehashed without a new digest),
and publish_directory one final folder, for EDGEC_STRESS_SECONDS (default 20) in total. One worker
runs without RENAME_EXCHANGE (the rename-aside fallback). Every get must return None or the right
artifact, every put the right artifact, no process may see an error, and at the end every entry is
valid, the published folder is one complete result, and no temp or trash folder is left.
"""

import hashlib
import json
import multiprocessing
import os
import queue
import random
import sys
import time
import traceback
from pathlib import Path

from edgec.pipeline import publish as publish_mod
from edgec.pipeline.cache import ENTRY_FILE, StageCache, stable_hash
from edgec.pipeline.publish import make_temp_dir, publish_directory, replace_directory

WORKERS = 3
KEYS = ("k0", "k1", "k2")
STAGE = "train"
PUBLISHED = ("a", "b", "sub/c", "done")

# Spawned children import this file by the name tests/ (on sys.path) gives it; make the
# functions they run picklable under that name.
_IMPORT_NAME = "test_cache_stress"
if __name__ != _IMPORT_NAME:
    sys.modules.setdefault(_IMPORT_NAME, sys.modules[__name__])


def seconds() -> float:
    return float(os.environ.get("EDGEC_STRESS_SECONDS", "20"))


def payload(key: str) -> dict[str, bytes]:
    """A key's files: the same every time, as a real stage's output is for a key."""
    return {"weights.bin": hashlib.sha256(key.encode()).digest() * 512, "sub/info.txt": f"{key}\n".encode() * 50}


def expected_digest(key: str) -> str:
    files = {name: hashlib.sha256(data).hexdigest() for name, data in sorted(payload(key).items())}
    return stable_hash({"kind": "model", "files": files})


def build_for(key: str, rng: random.Random):
    def build(out: Path) -> dict:
        for name, data in payload(key).items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(data)
        if rng.random() < 0.3:
            time.sleep(rng.uniform(0, 0.01))  # a slower stage widens the race windows
        return {"key": key}

    return build


def check_artifact(art, key: str, what: str) -> None:
    if art.kind != "model" or art.digest != expected_digest(key) or art.info != {"key": key}:
        raise AssertionError(f"{what} {key}: wrong artifact {art}")


def forge(root: Path, key: str, rng: random.Random) -> None:
    """Atomically replace an entry with one the cache must refuse."""
    stage_dir = root / STAGE
    stage_dir.mkdir(parents=True, exist_ok=True)  # a forge may come before the first put
    tmp = make_temp_dir(stage_dir)
    try:
        for name, data in payload(key).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        files = {n: hashlib.sha256(d).hexdigest() for n, d in sorted(payload(key).items())}
        entry = {"kind": "model", "stage": STAGE, "key": key, "files": files, "info": {"key": key, "forged": True}}
        if rng.random() < 0.5:  # another stage's entry moved here
            entry.update(stage="prune", digest=stable_hash({"kind": "model", "files": files}))
        else:  # a file changed and rehashed, the digest not
            entry["digest"] = stable_hash({"kind": "model", "files": files})
            (tmp / "weights.bin").write_bytes(b"forged")
            entry["files"]["weights.bin"] = hashlib.sha256(b"forged").hexdigest()
        (tmp / ENTRY_FILE).write_text(json.dumps(entry))
        replace_directory(tmp, stage_dir / key)
    finally:
        publish_mod.remove_tree(tmp)


def fill_for(token: str, rng: random.Random):
    def fill(tmp: Path) -> None:
        for name in PUBLISHED:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(token)
            if rng.random() < 0.1:
                time.sleep(0.002)

    return fill


def read_published(final: Path) -> dict[str, str] | None:
    """One consistent snapshot of the published folder (through one directory handle), or None
    when it was replaced and deleted while being read."""
    try:
        dir_fd = os.open(final, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return None
    try:
        out = {}
        for name in PUBLISHED:
            fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
            try:
                out[name] = os.read(fd, 1 << 16).decode()
            finally:
                os.close(fd)
        return out
    except FileNotFoundError:
        return None
    finally:
        os.close(dir_fd)


def _worker(wid: int, root: str, final: str, duration: float, ready, start, results) -> None:
    errors: list[str] = []
    counts: dict[str, int] = {}
    rng = random.Random(wid * 7919 + os.getpid())
    if wid == WORKERS - 1:
        publish_mod._exchange_ok = False  # this one replaces by rename-aside + rename
    try:
        cache = StageCache(Path(root))
        ready.put(wid)
        if not start.wait(300):
            raise TimeoutError("never told to start")
        begin = time.monotonic()
        deadline = begin + duration
        n = 0
        while (now := time.monotonic()) < deadline:
            n += 1
            key = rng.choice(KEYS)
            r = rng.random()
            try:
                if r < 0.40:
                    op = "get"
                    art = cache.get(STAGE, key)
                    if art is not None:
                        check_artifact(art, key, op)
                elif r < 0.60:
                    op = "put"
                    check_artifact(cache.put(STAGE, key, "model", build_for(key, rng)), key, op)
                elif r < 0.72:
                    op = "force"
                    check_artifact(cache.put(STAGE, key, "model", build_for(key, rng), force=True), key, op)
                elif r < 0.76 and now < deadline - duration * 0.2:
                    op = "forge"
                    forge(Path(root), key, rng)
                elif r < 0.92:
                    op = "publish"
                    publish_directory(Path(final), fill_for(f"{wid}-{n}", rng))
                else:
                    op = "read-published"
                    snap = read_published(Path(final))
                    if snap is not None and len(set(snap.values())) != 1:
                        raise AssertionError(f"published folder mixes results: {snap}")
                counts[op] = counts.get(op, 0) + 1
            except Exception:  # noqa: BLE001
                errors.append(f"worker {wid} op {n}:\n{traceback.format_exc()}")
        # End: everyone puts every key at once; a forged entry left over is replaced.
        for key in KEYS:
            try:
                check_artifact(cache.put(STAGE, key, "model", build_for(key, rng)), key, "final put")
            except Exception:  # noqa: BLE001
                errors.append(f"worker {wid} final put {key}:\n{traceback.format_exc()}")
    except Exception:  # noqa: BLE001
        errors.append(f"worker {wid}:\n{traceback.format_exc()}")
    results.put((wid, counts, errors))


_worker.__module__ = _IMPORT_NAME


def test_processes_share_one_cache_and_one_published_folder(tmp_path):
    root = tmp_path / "cache"
    final = tmp_path / "out" / "rpi"
    publish_directory(final, fill_for("initial", random.Random(0)))
    duration = seconds()
    ctx = multiprocessing.get_context("spawn")
    ready, results, start = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(target=_worker, args=(wid, str(root), str(final), duration, ready, start, results), daemon=True)
        for wid in range(WORKERS)
    ]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=300)  # spawned children import torch: slow on a loaded machine
        start.set()
        reports = {}
        for _ in procs:
            wid, counts, errors = results.get(timeout=duration + 300)
            reports[wid] = (counts, errors)
        for p in procs:
            p.join(timeout=60)
    except queue.Empty:
        raise AssertionError(f"a worker hung or died: exit codes {[p.exitcode for p in procs]}") from None
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()

    errors = [e for counts, errs in reports.values() for e in errs]
    assert errors == [], "\n".join(errors[:5])
    assert [p.exitcode for p in procs] == [0] * WORKERS
    for wid, (counts, _) in sorted(reports.items()):
        assert sum(counts.values()) >= 5, f"worker {wid} did almost nothing: {counts}"
    totals = {op: sum(c.get(op, 0) for c, _ in reports.values()) for op in ("get", "put", "force", "publish")}
    print("operations per worker:", {wid: counts for wid, (counts, _) in sorted(reports.items())})
    assert all(totals.values()), totals

    # Every entry is valid (checked without discarding anything), nothing else is in the cache.
    cache = StageCache(root, collect=False)
    for key in KEYS:
        check = cache._check(STAGE, key)
        assert check.status == "valid", (key, check)
        check_artifact(check.artifact, key, "end")
    assert sorted(os.listdir(root / STAGE)) == sorted(KEYS)  # no temp or trash folder left
    assert os.listdir(root) == [STAGE]

    snap = read_published(final)
    assert snap is not None and len(set(snap.values())) == 1, snap
    assert sorted(p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file()) == sorted(PUBLISHED)
    assert os.listdir(final.parent) == ["rpi"]
