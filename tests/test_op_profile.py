"""Per-operator latency tables (`edgec bench --ops`, `run.py bench --ops`) on both runtimes."""

import json
import math
import subprocess
import sys

import pytest

from edgec.ondevice import load_bundle
from edgec.ondevice.op_profile import profile_ops, render_ops


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    from edgec.api import build

    tmp = tmp_path_factory.mktemp("ops")
    config = {"model": {"name": "cnn-small"}, "stages": [{"kind": "train", "epochs": 4},
                                                        {"kind": "export", "eval_samples": 50}]}
    return {t: build(config, target=t, out=tmp / "out", cache_dir=tmp / "cache")
            for t in ("rpi", "desktop-gpu")}


@pytest.mark.parametrize("target,conv", [("rpi", "CONV_2D"), ("desktop-gpu", "Conv")])
def test_every_operator_is_timed_and_the_shares_add_up(bundles, target, conv):
    profile = profile_ops(load_bundle(str(bundles[target].bundle)), {"threads": 1}, runs=10, min_seconds=0.0)
    ops = profile["ops"]
    assert ops and conv in {o["type"] for o in ops}
    assert all(o["mean_us"] > 0 and o["shape"] for o in ops)
    assert math.isclose(sum(o["share"] for o in ops), 1.0, rel_tol=1e-6)
    assert profile["graph_us"] > 0 and profile["sum_us"] == pytest.approx(sum(o["mean_us"] for o in ops))
    if target == "rpi":  # the int8 graph's ops all run in XNNPACK here; the flag is a real bool per op
        assert all(isinstance(o["delegated"], bool) for o in ops) and any(o["delegated"] for o in ops)
    lines = render_ops(profile)
    assert lines[0].startswith("per-op profile") and "whole graph" in lines[-1]


def test_xnnpack_off_shows_operators_that_are_not_delegated(bundles):
    profile = profile_ops(load_bundle(str(bundles["rpi"].bundle)), {"threads": 1, "xnnpack": False}, runs=5,
                          min_seconds=0.0)
    assert profile["ops"] and not any(o["delegated"] for o in profile["ops"])


def test_cli_bench_ops_in_json_report_and_on_the_device_runner(bundles, tmp_path):
    from edgec.report import write_report
    from support import run_cli

    result = bundles["rpi"]
    out = tmp_path / "bench.json"
    shown = run_cli("bench", result.bundle, "--ops", "--no-sweep", "--runs", "10", "--min-seconds", "0.01",
                    "--batch-sizes", "1", "--no-write-recommended", "--json", out, cwd=tmp_path)
    assert "per-op profile" in shown.stdout
    data = json.loads(out.read_text())
    assert data["ops_profile"]["ops"] and data["ops_profile"]["method"]
    write_report(result.build_dir, bench=out)
    assert (result.build_dir / "report" / "ops.png").is_file()
    device = subprocess.run([sys.executable, str(result.bundle / "run.py"), "bench", "--ops", "--no-sweep", "--runs",
                             "5", "--min-seconds", "0.01", "--batch-sizes", "1", "--no-write-recommended", "--json", "-"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert device.returncode == 0, device.stderr
    assert json.loads(device.stdout)["ops_profile"]["ops"]
