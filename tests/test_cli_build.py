"""End-to-end: drive the real `edgec` CLI in a subprocess."""

import json
import time
from pathlib import Path

import pytest
import torch

from support import run_cli

# The whole default chain, with a few epochs per training stage.
FAST = ["--set", "budget.enforce=false", "--epochs", "8", "--set", "prune.steps=1", "--set", "retrain.epochs=6", "--set", "share.epochs=1",
        "--set", "distill.epochs=8"]


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
    assert cfg["seed"] == 5 and cfg["stages"][0] == {**cfg["stages"][0], "kind": "train", "id": "train", "lr": 0.02}
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
        (["--set", "train.epochs=-1"], "stage 'train': epochs"),
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
    proc = run_cli("--debug", "build", "--target", "toaster", cwd=tmp_path, check=2)  # the same exit code as without --debug
    assert "Traceback" in proc.stderr and "ConfigError" in proc.stderr


# Explicit sparsities (used as given) that cost more than the accuracy budget: this test is about stage
# instances, so the budget is recorded and not enforced.
LIST_FORM = """
[budget]
enforce = false
[[stages]]
kind = "train"
epochs = 20
[[stages]]
kind = "prune"
id = "prune-coarse"
sparsity = 0.5
steps = 1
[[stages]]
kind = "retrain"
epochs = 5
[[stages]]
kind = "prune"
id = "prune-fine"
sparsity = 0.8
steps = 1
[[stages]]
kind = "retrain"
epochs = 5
[[stages]]
kind = "export"
"""


@pytest.mark.parametrize("target", ["rpi", "mobile", "desktop-gpu"])
def test_list_form_stage_instances_build_for_every_target(tmp_path, target):
    (tmp_path / "edgec.toml").write_text(LIST_FORM)
    out = json.loads(run_cli("build", "--target", target, "--cache-dir", tmp_path / "c", "--json", cwd=tmp_path).stdout)
    assert [s["id"] for s in out["stages"]] == ["train", "prune-coarse", "retrain", "prune-fine", "retrain-2", "export"]
    manifest = json.loads((tmp_path / "edgec-out" / target / "bundle" / "manifest.json").read_text())
    assert [(step["stage"], step["kind"]) for step in manifest["lineage"]][1:4:2] == [("prune-coarse", "prune"), ("prune-fine", "prune")]
    coarse, fine = ({r["layer"]: r["sparsity"] for r in s["info"]["sparsity"]["layers"]}
                     for s in out["stages"] if s["kind"] == "prune")
    for layer, sparsity in coarse.items():
        assert fine[layer] >= sparsity - 1e-9
    assert fine["fc.weight"] >= 0.79
    run_cli("verify", tmp_path / "edgec-out" / target / "bundle", cwd=tmp_path)


def test_config_error_in_the_last_stage_costs_no_training(tmp_path):
    (tmp_path / "edgec.toml").write_text('stages = ["train", "prune", "retrain", "share", "export"]\n[share]\nbits = { nope = 4 }\n')
    start = time.perf_counter()
    proc = run_cli("build", "--cache-dir", tmp_path / "c", cwd=tmp_path, check=2)
    assert time.perf_counter() - start < 60
    assert "stage 'share'" in proc.stderr and "no prunable layer named 'nope'" in proc.stderr
    assert "run    " not in proc.stdout + proc.stderr  # no stage ran
    assert not (tmp_path / "c" / "train").exists()


def test_user_model_outside_the_zoo_builds_with_the_default_chain(tmp_path):
    """distill derives the student of a user model by channel pruning instead of failing after training."""
    fast = ["--epochs", "2", "--set", "prune.steps=1", "--set", "retrain.epochs=1", "--set", "share.epochs=1",
            "--set", "distill.epochs=2", "--set", "distill.width=0.5", "--set", "model.args.channels=16", "--precision", "fp32"]
    out = json.loads(run_cli("build", "--model", "fixtures.user_models:make", *fast, "--json", cwd=tmp_path,
                             env={"PYTHONPATH": str(Path(__file__).parent)}).stdout)
    distill = next(s for s in out["stages"] if s["kind"] == "distill")
    assert distill["info"]["params"] < distill["info"]["teacher"]["params"] / 2


def test_weights_naming_an_unnamed_factory_are_refused_before_import(tmp_path):
    (tmp_path / "evil_factory.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('imported').write_text('yes')\n"
        "import torch\ndef make(**kw):\n    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))\n"
    )
    torch.save({"format": "edgec-checkpoint", "format_version": 2,
                "arch": {"base": {"kind": "factory", "factory": "evil_factory:make", "kwargs": {}}, "edits": []},
                "state_dict": {"1.weight": torch.zeros(10, 64), "1.bias": torch.zeros(10)},
                "masks": {}, "codebooks": {}, "extensions": {}}, tmp_path / "w.pt")
    proc = run_cli("build", "--weights", tmp_path / "w.pt", cwd=tmp_path, check=2, env={"PYTHONPATH": str(tmp_path)})
    assert "names the model factory 'evil_factory:make'" in proc.stderr and "--model evil_factory:make" in proc.stderr
    assert not (tmp_path / "imported").exists()


def test_signed_build_verifies_with_its_key_only(tmp_path):
    run_cli("keys", "generate", "--out", tmp_path / "keys", cwd=tmp_path)
    run_cli("keys", "generate", "--out", tmp_path / "other", cwd=tmp_path)
    proc = run_cli("build", "--stages", "train,export", "--epochs", "5", "--sign-key", tmp_path / "nope.key", cwd=tmp_path, check=2)
    assert "run    " not in proc.stdout + proc.stderr  # a bad key costs no training
    run_cli("build", "--stages", "train,export", "--epochs", "10", "--sign-key", tmp_path / "keys" / "edgec.key", cwd=tmp_path)
    bundle = tmp_path / "edgec-out" / "rpi" / "bundle"
    assert (bundle / "manifest.sig").is_file()
    run_cli("verify", bundle, "--public-key", tmp_path / "keys" / "edgec.pub", cwd=tmp_path)
    run_cli("verify", bundle, "--public-key", tmp_path / "other" / "edgec.pub", cwd=tmp_path, check=1)
