"""Hostile search records: a restarted ``edgec search`` reuses ``OUT/trials/<id>.json`` only when it is
the record this search would have written for the job's point. An edited point imports no code; a
swapped, mistyped, damaged, oversized record or one copied from another search config is ignored
with one line and its trial runs again, never a traceback."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from edgec.base.errors import ConfigError
from edgec.search import make_setup, search
from edgec.search import space as sp
from edgec.search.output import to_toml
from edgec.search.records import MAX_RECORD_BYTES, TrialStore
from edgec.search.runner import SearchContext
from edgec.search.trial import named_factories, resolve
from support import run_cli

# two cheap trials on the built-in digits (fp32 export: the export never refuses them)
BASE = {
    "seed": 0,
    "model": {"name": "mlp", "args": {"widths": [16]}},
    "stages": ["train", "export"],
    "train": {"epochs": 1},
    "export": {"precision": "fp32"},
}
SEARCH = {"space": {"train.lr": [0.01, 0.02]}, "objectives": ["accuracy", "transport_bytes"],
          "latency": {"repeats": 1, "runs": 10, "min_seconds": 0.01, "warmup": 0},
          "best": {"minimize": "transport_bytes", "max_accuracy_drop": None}}
RAW = {**BASE, "search": SEARCH}
SENTINEL = "edgec_hostile_sentinel"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished search (its trials/ folder and its stage cache): every test restarts it."""
    root = tmp_path_factory.mktemp("hostile")
    result = search(RAW, targets=["rpi"], out=root / "out", cache_dir=root / "cache")
    assert [t["status"] for t in result.summary["trials"]] == ["ok", "ok"]
    return root


def _restart(finished: Path, tmp_path: Path) -> dict[float, Path]:
    """A copy of the finished search's trials/ in tmp_path/out: its record files by learning rate."""
    shutil.copytree(finished / "out" / "trials", tmp_path / "out" / "trials")
    paths = sorted((tmp_path / "out" / "trials").glob("*.json"))
    return {json.loads(p.read_text())["point"]["train.lr"]: p for p in paths}


def _search_again(finished: Path, tmp_path: Path):
    text = io.StringIO()
    result = search(RAW, targets=["rpi"], out=tmp_path / "out", cache_dir=finished / "cache",
                    console=Console(file=text, width=300))
    return result, [line for line in text.getvalue().splitlines() if line.startswith("ignored")]


def _sentinel(tmp_path: Path, monkeypatch) -> tuple[Path, dict]:
    """A module that leaves a trace file when imported, on sys.path, and a point that names it."""
    trace = tmp_path / "imported.trace"
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / f"{SENTINEL}.py").write_text(
        f"from pathlib import Path\nPath({str(trace)!r}).write_text('imported')\ndef make(**kw):\n    raise SystemExit\n")
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    return trace, {"model.name": f"{SENTINEL}:make", "train.lr": 0.02}


def _runpy(tmp_path: Path, monkeypatch) -> tuple[Path, dict]:
    """The issue's attack: runpy:run_path of a script that leaves a trace file."""
    trace = tmp_path / "ran.trace"
    (tmp_path / "evil.py").write_text(f"from pathlib import Path\nPath({str(trace)!r}).write_text('ran')\n")
    return trace, {"model.name": "runpy:run_path", "model.args": {"path_name": str(tmp_path / "evil.py")}}


@pytest.mark.parametrize("attack", [_runpy, _sentinel], ids=["runpy", "sentinel-module"])
def test_an_edited_point_imports_nothing_and_the_trial_reruns(finished, tmp_path, monkeypatch, attack):
    trace, point = attack(tmp_path, monkeypatch)
    paths = _restart(finished, tmp_path)
    record = json.loads(paths[0.02].read_text())
    paths[0.02].write_text(json.dumps({**record, "point": point}))
    result, ignored = _search_again(finished, tmp_path)
    assert not trace.exists() and SENTINEL not in __import__("sys").modules
    assert len(ignored) == 1 and paths[0.02].name in ignored[0] and "does not hash to its id" in ignored[0]
    assert result.outcome.ran == [record["id"]]  # rerun from the cache; the other trial reused
    assert [t["point"] for t in result.summary["trials"]] == [{"train.lr": 0.01}, {"train.lr": 0.02}]
    assert all(t["status"] == "ok" for t in result.summary["trials"])
    assert json.loads(paths[0.02].read_text())["point"] == {"train.lr": 0.02}  # the store holds the real record again


def test_cli_edited_record_runs_no_code(finished, tmp_path):
    """The issue's exact reproduction through the CLI: evil.py in the working folder never runs."""
    (tmp_path / "search.toml").write_text(to_toml(RAW))
    (tmp_path / "evil.py").write_text("open('pwned', 'w').write('ran')\n")
    paths = _restart(finished, tmp_path)
    record = json.loads(paths[0.01].read_text())
    record["point"] = {"model.name": "runpy:run_path", "model.args": {"path_name": "evil.py"}}
    paths[0.01].write_text(json.dumps(record))
    proc = run_cli("search", "-c", "search.toml", "-t", "rpi", "--out", "out", "--cache-dir", finished / "cache",
                   cwd=tmp_path)
    assert not (tmp_path / "pwned").exists()
    assert "Traceback" not in proc.stdout + proc.stderr and "warning" not in proc.stdout
    assert len(re.findall(r"^ignored trials/", proc.stdout, re.M)) == 1


def _swap(paths):
    a, b = json.loads(paths[0.01].read_text()), json.loads(paths[0.02].read_text())
    paths[0.01].write_text(json.dumps({**a, "point": b["point"]}))
    paths[0.02].write_text(json.dumps({**b, "point": a["point"]}))
    return 2, "does not hash to its id"


def _metric_as_text(paths):
    record = json.loads(paths[0.02].read_text())
    record["targets"]["rpi"]["metrics"]["accuracy"] = "0.99"
    paths[0.02].write_text(json.dumps(record))
    return 1, "targets.rpi.ok.metrics.accuracy: input should be a valid number"


def _targets_as_list(paths):
    record = json.loads(paths[0.02].read_text())
    paths[0.02].write_text(json.dumps({**record, "targets": ["rpi"], "number": "7"}))
    return 1, "input should be a valid"


def _truncated(paths):
    paths[0.02].write_text(paths[0.02].read_text()[:200])
    return 1, "not valid JSON"


def _garbage(paths):
    paths[0.02].write_bytes(os.urandom(64) + b"\xff\xfe")
    return 1, "not valid JSON"


def _oversized(paths):
    text = paths[0.02].read_text()  # a valid record, padded past the limit: refused before parsing
    paths[0.02].write_text(text + " " * (MAX_RECORD_BYTES + 1 - len(text)))
    return 1, "byte limit"


@pytest.mark.parametrize("damage", [_swap, _metric_as_text, _targets_as_list, _truncated, _garbage, _oversized],
                         ids=lambda f: f.__name__.strip("_"))
def test_a_damaged_record_is_ignored_with_one_line_and_rerun(finished, tmp_path, damage):
    paths = _restart(finished, tmp_path)
    ids = {lr: p.stem for lr, p in paths.items()}  # a record's id is its file name
    count, why = damage(paths)
    result, ignored = _search_again(finished, tmp_path)
    assert len(ignored) == count and all(why in line for line in ignored), ignored
    rerun = [ids[0.01], ids[0.02]] if count == 2 else [ids[0.02]]
    assert sorted(result.outcome.ran) == sorted(rerun)
    assert [t["point"]["train.lr"] for t in result.summary["trials"]] == [0.01, 0.02]
    assert all(t["status"] == "ok" for t in result.summary["trials"])


# -- the store alone (no trial runs) -----------------------------------------------------------------

def _context(raw: dict, out: Path) -> SearchContext:
    setup = make_setup(raw, targets=["rpi"], out=out, cache_dir=out / "cache")
    return SearchContext(base=setup.base, targets=tuple(setup.targets), out=setup.out, cache_dir=setup.cache_dir,
                         threads=setup.search.cpus_per_trial, latency=setup.search.latency.model_dump(),
                         factories=setup.factories)


def _load(ctx: SearchContext) -> tuple[dict, list[str]]:
    text = io.StringIO()
    found = TrialStore(ctx.out).load(ctx, Console(file=text, width=300))
    return found, text.getvalue().splitlines()


def test_a_record_of_another_search_config_is_not_reused(finished, tmp_path):
    """Same point, another base config: even renamed to this search's id, its config gives it away."""
    paths = _restart(finished, tmp_path)
    other = _context({**RAW, "seed": 1}, tmp_path / "out")
    record = json.loads(paths[0.02].read_text())
    forged = {**record, "id": other.trial_id(record["point"])}
    (paths[0.02].parent / f"{forged['id']}.json").write_text(json.dumps(forged))
    found, lines = _load(other)
    assert found == {}
    about_forged = [line for line in lines if forged["id"] in line]
    assert len(about_forged) == 1 and "config is not what this search config gives" in about_forged[0]
    assert len(lines) == 3  # the two originals are of another search too
    assert set(_load(_context(RAW, tmp_path / "out"))[0]) == {json.loads(p.read_text())["id"] for p in paths.values()}


def test_a_huge_or_special_file_is_refused_before_reading(finished, tmp_path):
    paths = _restart(finished, tmp_path)
    with open(paths[0.01], "r+b") as f:
        f.truncate(64 * 1024**3)  # sparse: 64 GiB that were never written
    paths[0.02].unlink()
    paths[0.02].symlink_to("/dev/zero")
    found, lines = _load(_context(RAW, tmp_path / "out"))
    assert found == {}
    assert len(lines) == 2 and any("byte limit" in line for line in lines)
    assert any("not a regular file" in line for line in lines)


def test_a_point_names_only_factories_the_search_config_names():
    factories = named_factories(BASE, SEARCH["space"])
    with pytest.raises(ConfigError, match="runpy:run_path.*the search config does not"):
        resolve(BASE, {"model.name": "runpy:run_path"}, factories)
    space = {"model.name": ["mlp", "mypkg.models:net"]}  # a factory the user lists in the space is named
    assert "mypkg.models:net" in named_factories(BASE, space)
    assert resolve(BASE, {"train.lr": 0.02}, factories).model.name == "mlp"


def test_tpe_reuses_only_points_its_space_draws():
    spec = sp.parse_search({"strategy": "tpe", "trials": 2, "space": {"train.lr": {"low": 1e-3, "high": 1e-1},
                                                                      "share.bits": [4, 5]}})
    assert sp.params_from_point(spec, {"train.lr": 0.01, "share.bits": 5}) == {"p0": 0.01, "p1": 1}
    for bad in ({"train.lr": 0.01, "share.bits": 5, "model.name": "runpy:run_path"},  # a key the space lacks
                {"train.lr": 0.01, "share.bits": 5.0},  # 5.0 is not the listed 5
                {"train.lr": True, "share.bits": 4}):
        assert sp.params_from_point(spec, bad) is None
