"""The stage protocol carries what the build does per kind: no kind strings special-cased elsewhere.

A stage defined here (``noise``, the design doc's worked example) is built through the real build,
summarised and reported without touching any other file; prune refuses another mode's keys; the
stage package registers every module without a hand list; the modules import without cycles."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import Field

import edgec.pipeline.stages  # noqa: F401  (importing the package registers every stage kind)
from edgec.pipeline.artifact import CHECKPOINT_FILE
from edgec.pipeline.modelinfo import model_info
from edgec.pipeline.stage import Stage, StageConfig
from support import run_cli

ROOT = Path(__file__).resolve().parents[1]


class NoiseConfig(StageConfig):
    std: float = Field(0.01, gt=0)


def _noise_stage():
    """Define (and so register) the worked example's stage: Gaussian noise on every weight, nothing
    compressed; it describes nothing as reaching the bundle and draws a report section of its own."""

    class NoiseStage(Stage):
        kind = "noise"
        Config = NoiseConfig

        def run(self, source, ctx, out_dir):
            ckpt = source.checkpoint()
            model = ckpt.build(ctx.trust)
            gen = torch.Generator().manual_seed(ctx.seed)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * self.config.std)
            ckpt.with_model(model, ctx.trust).save(out_dir / CHECKPOINT_FILE)
            return model_info(model, ctx.data)

        @classmethod
        def report_section(cls, doc, summary, manifest):
            doc.h2("Weight noise")
            doc.p(", ".join(f"`{s['id']}`" for s in summary["stages"] if s["kind"] == cls.kind))

    return NoiseStage


@pytest.fixture
def noise_stage(monkeypatch):
    """The noise kind, registered for this test only."""
    monkeypatch.setattr(Stage, "registry", dict(Stage.registry))
    return _noise_stage()


def test_a_new_stage_builds_and_is_not_reported_as_compression(noise_stage, tmp_path):
    """A kind that does not compress is neither listed under what reached the bundle nor taken as the
    first compression (uncompressed.pt is the model before prune, i.e. after noise); its own report
    section appears."""
    from edgec.api import build
    from edgec.base.checkpoint import load_checkpoint
    from edgec.report import write_report

    cache = tmp_path / "cache"
    result = build({"budget": {"enforce": False}, "stages": [
        {"kind": "train", "epochs": 1},
        {"kind": "noise", "std": 0.001},
        {"kind": "prune", "mode": "global", "sparsity": 0.5, "steps": 1},
        {"kind": "export", "precision": "fp32", "eval_samples": 50},
    ]}, target="desktop-gpu", out=tmp_path / "out", cache_dir=cache)
    reached = result.summary["reached_bundle"]
    assert len(reached) == 1 and reached[0].startswith("pruned (prune, 50% of weights zero"), reached
    noise = next(s for s in result.stages if s.kind == "noise")
    after_noise = load_checkpoint(cache / "noise" / noise.key / CHECKPOINT_FILE).state_dict
    uncompressed = torch.load(result.build_dir / "uncompressed.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(uncompressed[k], v) for k, v in after_noise.items())
    markdown = write_report(result.build_dir)["markdown"].read_text()
    assert "## Weight noise\n" in markdown and "`noise`" in markdown
    assert "## Weight sharing" not in markdown  # a kind's section only where the build has that kind


def test_reached_bundle_follows_each_stage_description(noise_stage):
    """Distill starts over (its teacher's compression does not reach the bundle); noise adds nothing."""
    from types import SimpleNamespace

    from edgec.api import compression_reaching_the_end

    registry = Stage.registry
    stages = [registry["prune"](registry["prune"].Config(mode="global", sparsity=0.5), "p1"),
              registry["distill"](registry["distill"].Config(), "d"), noise_stage(NoiseConfig(), "n"),
              registry["share"](registry["share"].Config(), "s")]
    infos = [{"sparsity": {"total": {"sparsity": 0.5}}}, {"params": 1234}, {}, {}]
    steps = [SimpleNamespace(artifact=SimpleNamespace(info=info)) for info in infos]
    assert compression_reaching_the_end(stages, steps) == ["distilled student (d, 1,234 params)", "weight-shared (s)"]
    assert [s.compresses for s in stages] == [True, True, False, True]


@pytest.mark.parametrize("key, mode, owner", [
    ("prune.ratio=0.3", None, "channels"),
    ("prune.sparsity=0.5", "channels", "layer\" or \"global"),
    ("prune.quality=0.5", "global", "threshold"),
])
def test_a_prune_key_of_another_mode_is_refused_with_one_line(tmp_path, key, mode, owner):
    """Before: accepted silently (and hashed into the cache key). Refused at plan time, exit 2."""
    args = ["build", "--stages", "train,prune", "--set", key] + (["--set", f"prune.mode={mode}"] if mode else [])
    proc = run_cli(*args, cwd=tmp_path, check=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    name = key.split(".")[1].split("=")[0]
    assert f"{name} applies to mode = \"{owner}\", not \"{mode or 'layer'}\"" in lines[0]
    assert not (tmp_path / "edgec-out").exists()


def test_prune_config_is_the_config_of_its_mode():
    from edgec.pipeline.stages.prune import PRUNE_MODES, ChannelPruneConfig, PruneConfig

    assert type(PruneConfig(mode="channels", ratio=0.25)) is ChannelPruneConfig
    assert type(PruneConfig.model_validate({"sparsity": 0.5})) is PRUNE_MODES["layer"]
    assert "ratio" not in PruneConfig(mode="layer").model_dump()  # --print-config shows the mode's keys only


def test_every_stage_module_registers_without_a_hand_list():
    """Importing the package (in a fresh interpreter) imports every module file in it, and every Stage
    subclass they define with a kind is the registry's entry for that kind; the package names none."""
    package = ROOT / "pipeline" / "stages"
    modules = sorted(p.stem for p in package.glob("*.py") if p.stem != "__init__")
    code = (
        "import sys, edgec.pipeline.stages as pkg\n"
        "from edgec.pipeline.stage import Stage\n"
        f"for name in {modules!r}:\n"
        "    module = sys.modules[f'edgec.pipeline.stages.{name}']\n"
        "    for obj in vars(module).values():\n"
        "        if isinstance(obj, type) and issubclass(obj, Stage) and 'kind' in vars(obj) and obj.__module__ == module.__name__:\n"
        "            assert Stage.registry[obj.kind] is obj, obj\n"
        "            print(obj.kind)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert {"train", "prune", "learn", "export", "qat"} <= set(proc.stdout.split())
    init = ast.parse((package / "__init__.py").read_text())
    named = {a.name for node in ast.walk(init) if isinstance(node, ast.ImportFrom) for a in node.names}
    assert not named & set(modules), f"stages/__init__.py lists modules by hand: {named & set(modules)}"


def test_stages_know_each_other_only_through_the_protocol():
    """The generic runner reads no converter module; export_tasks does not import the learn stage
    (no import cycle anywhere: tests/test_import_cycles.py)."""
    from test_import_cycles import import_graph, package_modules

    graph = import_graph(package_modules())
    assert "edgec.pipeline.stages.learn" not in graph["edgec.pipeline.stages.export_tasks"]
    runner = (ROOT / "pipeline" / "runner.py").read_text()
    assert "targets" not in runner


@pytest.mark.parametrize("module", ["edgec.pipeline.training", "edgec.pipeline.objectives",
                                    "edgec.pipeline.algorithms.continual", "edgec.pipeline.runner"])
def test_modules_import_on_their_own(module):
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
