"""The build report (edgec.report): built from a real tiny build made through the CLI."""

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgec.base.errors import InputError
from edgec.report import ASSETS_DIR, IMAGES, REPORT_HTML, REPORT_MD, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TARGET = "desktop-gpu"  # onnx: the quickest export; the tflite path runs the same report code
BUILD = [
    "build", "--target", TARGET, "--epochs", "2", "--stages", "train,prune,share,export",
    "--set", "prune.steps=1", "--set", "prune.retrain.epochs=1", "--set", "share.epochs=1",
    "--set", "export.precision=fp32", "--json",
]
SECTIONS = ["Stages", "Budgets", "Accuracy against size", "Accuracy budget", "Sparsity per layer", "Weight sharing",
            "Confusion matrix of the shipped bundle", "Latency"]


def _edgec(*args, cwd, env):
    proc = subprocess.run([sys.executable, "-m", "edgec", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"edgec {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny build (train, prune, share, export) and a short real bench of its bundle, kept pristine:
    tests that change things work on copies."""
    tmp = tmp_path_factory.mktemp("report")
    env = {**os.environ, "EDGEC_CACHE_DIR": str(tmp / "cache"), "COLUMNS": "160"}
    _edgec(*BUILD, "--out", tmp / "out", cwd=tmp, env=env)
    build_dir = tmp / "out" / TARGET
    _edgec("bench", build_dir / "bundle", "--no-sweep", "--warmup", "2", "--runs", "30", "--min-seconds", "0.1",
           "--batch-sizes", "1", "--no-write-recommended", "--json", tmp / "bench.json", cwd=tmp, env=env)
    return build_dir, tmp / "bench.json"


@pytest.fixture(scope="module")
def report(built, tmp_path_factory):
    """The full report: bench.json dropped into the build directory, as a user would."""
    build_dir = tmp_path_factory.mktemp("full") / TARGET
    shutil.copytree(built[0], build_dir)
    shutil.copy(built[1], build_dir / "bench.json")
    return write_report(build_dir)


def _copy(built, tmp_path) -> Path:
    dest = tmp_path / TARGET
    shutil.copytree(built[0], dest)
    return dest


def _check_png(data: bytes) -> np.ndarray:
    import matplotlib.image

    assert data[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(io.BytesIO(data), format="png")
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    flat = pixels.reshape(-1, pixels.shape[2])
    assert len(np.unique(flat[:: max(1, len(flat) // 20000)], axis=0)) > 10, "image is (nearly) one colour"
    return pixels


def _html_images(page: str) -> list[str]:
    return re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)


def test_report_writes_html_markdown_and_every_plot(report):
    assert report["html"].name == REPORT_HTML and report["markdown"].name == REPORT_MD
    assert report["assets"].name == ASSETS_DIR and report["html"].parent == report["assets"].parent
    assert set(IMAGES) <= set(report), f"missing plots: {set(IMAGES) - set(report)}"
    for name in IMAGES:
        assert report[name] == report["assets"] / f"{name}.png"
        _check_png(report[name].read_bytes())
    page = report["html"].read_text()
    for section in SECTIONS:
        assert f"<h2>{section}</h2>" in page
    assert "skipped" not in page, "nothing should be skipped when the cache, bundle and bench are all there"


def test_html_is_self_contained_and_embeds_the_same_pngs(report):
    page = report["html"].read_text()
    embedded = _html_images(page)
    assert len(embedded) == len(IMAGES) == page.count("<img ")
    on_disk = {report[name].read_bytes() for name in IMAGES}
    for data in embedded:
        png = base64.b64decode(data)
        _check_png(png)
        assert png in on_disk
    # nothing fetched from anywhere: every src / href is a data: URI or an in-page anchor
    for attr in re.findall(r'\b(?:src|href|srcset|poster|action)\s*=\s*"([^"]*)"', page, flags=re.I):
        assert attr.startswith(("data:", "#")), attr
    assert not re.search(r"<(link|script|iframe|object|embed|base)\b", page, flags=re.I)
    assert not re.search(r"url\(|@import|https?://|file://", page, flags=re.I)


def test_markdown_twin_links_the_png_files(report):
    md = report["markdown"].read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(links) == sorted(f"{ASSETS_DIR}/{name}.png" for name in IMAGES)
    for link in links:
        assert (report["markdown"].parent / link).is_file()
    for section in SECTIONS:
        assert f"## {section}" in md


def test_stage_table_and_budgets_match_the_build(report):
    from edgec.budgets import check_budgets
    from edgec.targets.profile import Budgets

    build_dir = report["html"].parent
    summary = json.loads((build_dir / "build.json").read_text())
    manifest = json.loads((build_dir / "bundle" / "manifest.json").read_text())
    bench = json.loads((build_dir / "bench.json").read_text())
    md = report["markdown"].read_text()
    table = md.split("## Stages")[1].split("##")[0]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in table.splitlines() if line.startswith("| ") and "---" not in line}
    for s in summary["stages"]:
        row = rows[s["stage"]]
        assert row[1] == ("cached" if s["cached"] else "ran")
        assert row[2] == f"{s['info']['accuracy']:.4f}"
        assert row[4] == f"{s['info']['params']:,}" and row[5] == f"{s['info']['nonzero_params']:,}"
    export = rows["export"]
    assert export[10] == f"{manifest['size']['model_bytes']:,}" and export[11] == f"{manifest['size']['transport_bytes']:,}"
    assert rows["share"][9] == f"{summary['stages'][2]['info']['deep_compression_bytes']:,}"

    expected = check_budgets(manifest, Budgets.model_validate(manifest["target"]["profile"]["budgets"]), bench)
    budgets = md.split("## Budgets")[1].split("##")[0]
    for r in expected:
        line = next(x for x in budgets.splitlines() if x.startswith(f"| {r['budget']} |"))
        assert line.rstrip(" |").endswith("ok" if r["ok"] else "VIOLATED")
    assert all(r["ok"] is not None for r in expected)  # the bench result supplies p95


def test_cleared_cache_and_missing_bench_are_notes_not_failures(built, tmp_path):
    build_dir = _copy(built, tmp_path)
    first = write_report(build_dir, bench=built[1])
    assert "weight_sharing" in first and "latency" in first
    summary = json.loads((build_dir / "build.json").read_text())
    summary["config"]["cache_dir"] = str(tmp_path / "emptied-cache")  # as if `rm -rf` the cache
    (build_dir / "build.json").write_text(json.dumps(summary))
    out = write_report(build_dir)  # no bench.json in the dir, no bench=
    assert "weight_sharing" not in out and "latency" not in out
    assert not (build_dir / ASSETS_DIR / "weight_sharing.png").exists(), "stale plot left behind"
    assert not (build_dir / ASSETS_DIR / "latency.png").exists()
    for name in ("accuracy_vs_bytes", "sparsity", "confusion", "accuracy_budget", "sensitivity"):
        _check_png(out[name].read_bytes())
    page = out["html"].read_text()
    assert "no longer in the stage cache" in page and "no bench result" in page
    assert len(_html_images(page)) == 5  # accuracy_vs_bytes, sparsity, confusion, accuracy_budget, sensitivity
    md = out["markdown"].read_text()
    assert "| max_p95_ms |" in md and "unknown (no bench result)" in md


def test_accuracy_budget_section_matches_the_build(report):
    """Accuracy after every stage against the budget line, and the budgeted prune's levels and curves."""
    build_dir = report["html"].parent
    summary = json.loads((build_dir / "build.json").read_text())
    record = summary["accuracy_budget"]
    section = report["markdown"].read_text().split("## Accuracy budget")[1].split("\n## ")[0]
    assert f"drop {record['drop_pt']:+.2f} pt against a budget of {record['budget_pt']:g} pt" in section
    for s in record["stages"]:
        assert f"| {s['stage']} | {s['val']:.4f} | {s['drop_pt']:+.2f} |" in section
    sensitivity = next(s["info"]["sensitivity"] for s in summary["stages"] if s["kind"] == "prune")
    for t in sensitivity["trials"]:
        assert f"| {t['drop_pt']:+.2f} | {'accepted' if t['accepted'] else 'rejected'} |" in section
    assert "report/accuracy_budget.png" in section and "report/sensitivity.png" in section


@pytest.mark.parametrize("path, value, field", [
    (("accuracy_budget", "drop_pt"), "0.5", "accuracy_budget.drop_pt"),
    (("accuracy_budget", "budget_pt"), float("nan"), "accuracy_budget.budget_pt"),
    (("accuracy_budget", "stages"), [{"stage": "x", "val": 0.9, "drop_pt": 0.1}] * 5000, "accuracy_budget.stages"),
    (("prune", "curves"), {"fc": [{"sparsity": 1.5, "drop_pt": 0.0}]}, "sensitivity.curves.fc[0].sparsity"),
    (("prune", "trials"), [{"level": -1, "drop_pt": 0.0, "accepted": True}], "sensitivity.trials[0].level"),
    (("prune", "chosen"), {"fc": "0.5"}, "sensitivity.chosen.fc"),
])
def test_hostile_budget_fields_are_refused_in_one_line(built, tmp_path, path, value, field):
    build_dir = _copy(built, tmp_path)
    summary = json.loads((build_dir / "build.json").read_text())
    owner = summary["accuracy_budget"] if path[0] == "accuracy_budget" else \
        next(s["info"]["sensitivity"] for s in summary["stages"] if s["kind"] == "prune")
    owner[path[1]] = value
    (build_dir / "build.json").write_text(json.dumps(summary))
    with pytest.raises(InputError, match="rebuild with `edgec build`") as refused:
        write_report(build_dir)
    assert field in str(refused.value) and "\n" not in str(refused.value)


def test_a_level_index_beyond_the_levels_is_shown_not_followed(built, tmp_path):
    """A trial naming a level the record does not have (edited file) is drawn as unknown, not an IndexError."""
    build_dir = _copy(built, tmp_path)
    summary = json.loads((build_dir / "build.json").read_text())
    sensitivity = next(s["info"]["sensitivity"] for s in summary["stages"] if s["kind"] == "prune")
    sensitivity["trials"] = [{"level": 60, "drop_pt": 0.0, "accepted": True}]
    (build_dir / "build.json").write_text(json.dumps(summary))
    out = write_report(build_dir)
    assert "| 60 | ? | +0.00 | accepted |" in out["markdown"].read_text()


def test_model_only_build_skips_bundle_sections(built, tmp_path):
    build_dir = _copy(built, tmp_path)
    shutil.rmtree(build_dir / "bundle")
    summary = json.loads((build_dir / "build.json").read_text())
    summary["stages"] = [s for s in summary["stages"] if s["stage"] != "export"]
    (build_dir / "build.json").write_text(json.dumps(summary))
    out = write_report(build_dir)
    assert "confusion" not in out and {"accuracy_vs_bytes", "sparsity", "weight_sharing"} <= set(out)
    page = out["html"].read_text()
    assert "budgets: skipped, no bundle in this build" in page


def test_bench_with_per_run_samples_draws_a_histogram(built, tmp_path):
    build_dir = _copy(built, tmp_path)
    bench = json.loads(built[1].read_text())
    rng = np.random.default_rng(0)
    bench["latency_ms"]["samples"] = (0.05 + rng.gamma(2.0, 0.01, 500)).tolist()
    path = tmp_path / "samples.json"
    path.write_text(json.dumps(bench))
    out = write_report(build_dir, bench=path)
    _check_png(out["latency"].read_bytes())
    assert "histogram of 500 per-run latencies" in out["markdown"].read_text()


def test_bad_inputs_raise_input_error(built, tmp_path):
    with pytest.raises(InputError, match="not an edgec build directory"):
        write_report(tmp_path)
    not_bench = tmp_path / "x.json"
    not_bench.write_text('{"schema": "something-else"}')
    with pytest.raises(InputError, match="not an edgec bench result"):
        write_report(built[0], bench=not_bench)
    # a stray bench.json in the build dir is only a note
    build_dir = _copy(built, tmp_path)
    shutil.copy(not_bench, build_dir / "bench.json")
    out = write_report(build_dir)
    assert "latency" not in out and "bench.json ignored" in out["markdown"].read_text()


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


def _run_chromium(exe: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_html_renders_in_headless_chromium(report, tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("Chromium not found (apt-get install -y chromium): cannot render the report in a browser")
    url = report["html"].resolve().as_uri()
    dom = _run_chromium(exe, tmp_path / "p1", "--dump-dom", url).stdout
    imgs = re.findall(r"<img [^>]*>", dom)
    assert len(imgs) == len(IMAGES) and all('src="data:image/png;base64,' in i for i in imgs)
    assert "<h1>edgec build report: desktop-gpu</h1>" in dom and dom.count("<table>") >= 3

    # The browser decoded every image: a copy of the page with a probe that records naturalWidth on load.
    probe = tmp_path / "probe.html"
    probe.write_text(report["html"].read_text().replace("</body>", (
        "<script>window.addEventListener('load',function(){var r=[];document.querySelectorAll('img').forEach("
        "function(i){r.push(i.complete&&i.naturalWidth>0?'ok':'broken')});var p=document.createElement('pre');"
        "p.id='probe';p.textContent=r.join(' ');document.body.appendChild(p);});</script></body>")))
    dom = _run_chromium(exe, tmp_path / "p2", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()).stdout
    found = re.search(r'<pre id="probe">([^<]*)</pre>', dom)
    assert found, "the probe script did not run"
    assert found.group(1).split() == ["ok"] * len(IMAGES)

    shot = tmp_path / "page.png"
    # tall enough for the first plots below the summary tables (the stages, budgets and accuracy budget)
    proc = _run_chromium(exe, tmp_path / "p3", f"--screenshot={shot}", "--window-size=1280,5000", url)
    assert shot.is_file(), proc.stderr[-2000:]
    pixels = _check_png(shot.read_bytes())
    assert pixels.shape[:2] == (5000, 1280)
    rgb = pixels[..., :3]
    assert (rgb.std(axis=(0, 1)) > 0.02).any(), "screenshot is blank"
    coloured = (np.abs(rgb - rgb.mean(axis=2, keepdims=True)).max(axis=2) > 0.1).mean()
    assert coloured > 0.005, "no coloured plot pixels in the first 5000 pixels of the page"
