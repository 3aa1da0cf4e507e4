"""End-to-end: drive the real `edgec` CLI in a subprocess."""

import json

import pytest
import torch

from support import run_cli

# The whole default chain, with a few epochs per training stage.
FAST = ["--epochs", "3", "--set", "prune.steps=1", "--set", "retrain.epochs=2", "--set", "share.epochs=1",
        "--set", "distill.epochs=3"]


def test_version_and_targets(tmp_path):
    assert run_cli("--version", cwd=tmp_path).stdout.startswith("edgec ")
    listed = json.loads(run_cli("targets", "--json", cwd=tmp_path).stdout)
    assert {"rpi", "mobile", "desktop-gpu"} <= set(listed)
    assert listed["rpi"]["format"] == "tflite" and listed["rpi"]["precision"] == "int8"


def test_help_explains_every_option(tmp_path):
    text = run_cli("build", "--help", cwd=tmp_path).stdout
    for option in ("--target", "--data", "--model", "--weights", "--out", "--cache-dir", "--seed", "--force", "--print-config", "--json"):
        assert option in text


def test_print_config_shows_overrides(tmp_path):
    cfg = json.loads(run_cli("build", "--print-config", "--seed", "5", "--set", "train.lr=0.02", cwd=tmp_path).stdout)
    assert cfg["seed"] == 5 and cfg["train"]["lr"] == 0.02
    assert not (tmp_path / "edgec-out").exists()


def test_build_twice_second_is_all_cache_hits(tmp_path):
    first = json.loads(run_cli("build", "--target", "rpi", *FAST, "--json", cwd=tmp_path).stdout)
    assert first["stages"] and not any(s["cached"] for s in first["stages"])
    second = json.loads(run_cli("build", "--target", "rpi", *FAST, "--json", cwd=tmp_path).stdout)
    assert all(s["cached"] for s in second["stages"])
    assert [s["key"] for s in first["stages"]] == [s["key"] for s in second["stages"]]
    assert (tmp_path / "edgec-out" / "rpi" / "build.json").is_file()
    # --force reruns from the named stage on
    forced = json.loads(run_cli("build", *FAST, "--force", "train", "--json", cwd=tmp_path).stdout)
    assert not forced["stages"][0]["cached"]


def test_builds_are_deterministic(tmp_path):
    digests = []
    for i in range(2):
        out = json.loads(
            run_cli("build", *FAST, "--json", "--cache-dir", tmp_path / f"c{i}", "--out", tmp_path / f"o{i}", cwd=tmp_path).stdout
        )
        digests.append([s["info"]["accuracy"] for s in out["stages"]] + [out["source"]["digest"]])
    assert digests[0] == digests[1]


def test_weights_from_edgec_checkpoint_need_no_model(tmp_path):
    run_cli("build", *FAST, "--stages", "train", "--model", "mlp", cwd=tmp_path)
    ckpt = tmp_path / "edgec-out" / "rpi" / "model.pt"
    assert ckpt.is_file()
    out = json.loads(run_cli("build", *FAST, "--stages", "train", "--weights", ckpt, "--out", tmp_path / "o2", "--json", cwd=tmp_path).stdout)
    assert out["config"]["model"]["name"] is None
    assert out["source"]["accuracy"] > 0.5  # started from the trained weights


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target", "toaster"], "unknown target 'toaster'"),
        (["--model", "resnet-9000"], "'resnet-9000' is neither a zoo name"),
        (["--data", "s3:bucket"], "unknown data spec"),
        (["--data", "mnist:/does/not/exist"], "is not a directory"),
        (["--set", "train.epochs=-1"], "train.epochs"),
        (["--stages", "train,compile"], "unknown stage 'compile'"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_output(tmp_path, args, message):
    proc = run_cli("build", *args, cwd=tmp_path, check=2)
    lines = proc.stderr.strip().splitlines()
    assert message in lines[-1] and "Traceback" not in proc.stderr
    assert not (tmp_path / "edgec-out").exists()


def test_bad_weights_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"junk")
    proc = run_cli("build", "--model", "mlp", "--weights", tmp_path / "junk.pt", cwd=tmp_path, check=2)
    assert "not a readable torch file" in proc.stderr
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "sd.pt")
    proc = run_cli("build", "--weights", tmp_path / "sd.pt", cwd=tmp_path, check=2)
    assert "plain state dict" in proc.stderr and "--model" in proc.stderr
    proc = run_cli("build", "--model", "mlp", "--weights", tmp_path / "sd.pt", cwd=tmp_path, check=2)
    assert "do not fit" in proc.stderr


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = run_cli("build", "--out", blocker / "out", cwd=tmp_path, check=2)
    assert "cannot write to" in proc.stderr


def test_debug_shows_traceback(tmp_path):
    proc = run_cli("--debug", "build", "--target", "toaster", cwd=tmp_path, check=1)
    assert "Traceback" in proc.stderr and "ConfigError" in proc.stderr
