from pathlib import Path

import pytest
import torch
from rich.console import Console

from edgec.base import architecture
from edgec.base.architecture import ModelTrust
from edgec.base.checkpoint import Checkpoint
from edgec.base.data import load_dataset
from edgec.base.errors import ConfigError
from edgec.pipeline.artifact import BUNDLE, CHECKPOINT_FILE, MODEL
from edgec.pipeline.cache import StageCache
from edgec.pipeline.runner import check_chain, run_chain
from edgec.pipeline.stage import Stage, StageConfig, StageContext


class ScaleConfig(StageConfig):
    factor: float = 2.0


class Scale(Stage):
    """Multiplies every weight: cheap, deterministic, and visible in the output."""

    kind = "scale"
    Config = ScaleConfig
    runs = 0

    def run(self, source, ctx, out_dir: Path):
        Scale.runs += 1
        ckpt = source.checkpoint()
        ckpt.state_dict = {k: v * self.config.factor for k, v in ckpt.state_dict.items()}
        ckpt.save(out_dir / CHECKPOINT_FILE)
        return {"factor": self.config.factor}


class Offset(Scale):
    kind = "offset"


class Pack(Stage):
    kind = "pack"
    produces = BUNDLE
    Config = ScaleConfig

    def run(self, source, ctx, out_dir):
        (out_dir / "x").write_text("bundle")
        return {}


@pytest.fixture
def setup(tmp_path):
    data = load_dataset("digits")
    cache = StageCache(tmp_path)
    arch = architecture.record(architecture.zoo_base("mlp", data.input_shape, data.num_classes, widths=[8]))
    torch.manual_seed(0)

    def build_source(out):
        Checkpoint(arch, architecture.build(arch, ModelTrust()).state_dict()).save(out / CHECKPOINT_FILE)
        return {}

    source = cache.put("source", "s", MODEL, build_source)
    ctx = StageContext(data=data, seed=0, target=None, console=Console(quiet=True))
    Scale.runs = 0
    return source, ctx, cache


def test_second_run_is_all_cache_hits(setup):
    source, ctx, cache = setup
    chain = [Scale(ScaleConfig(factor=2)), Offset(ScaleConfig(factor=3))]
    first = run_chain(chain, source, ctx, cache)
    second = run_chain(chain, source, ctx, cache)
    assert [s.cached for s in first] == [False, False]
    assert [s.cached for s in second] == [True, True]
    assert Scale.runs == 2
    assert [s.artifact.digest for s in first] == [s.artifact.digest for s in second]


def test_config_change_reruns_that_stage_and_after_only(setup):
    source, ctx, cache = setup
    run_chain([Scale(ScaleConfig(factor=2)), Offset(ScaleConfig(factor=3))], source, ctx, cache)
    steps = run_chain([Scale(ScaleConfig(factor=2)), Offset(ScaleConfig(factor=5))], source, ctx, cache)
    assert [s.cached for s in steps] == [True, False]


def test_force_reruns_from_stage(setup):
    source, ctx, cache = setup
    chain = [Scale(ScaleConfig()), Offset(ScaleConfig())]
    run_chain(chain, source, ctx, cache)
    steps = run_chain(chain, source, ctx, cache, force_from=1)
    assert [s.cached for s in steps] == [True, False]


def test_corrupt_entry_is_rebuilt_not_served(setup):
    source, ctx, cache = setup
    chain = [Scale(ScaleConfig())]
    (step,) = run_chain(chain, source, ctx, cache)
    (step.artifact.path / CHECKPOINT_FILE).write_bytes(b"corrupt")
    (again,) = run_chain(chain, source, ctx, cache)
    assert not again.cached and again.artifact.digest == step.artifact.digest


def test_input_is_never_mutated(setup):
    source, ctx, cache = setup
    before = (source.path / CHECKPOINT_FILE).read_bytes()
    run_chain([Scale(ScaleConfig(factor=7))], source, ctx, cache)
    assert (source.path / CHECKPOINT_FILE).read_bytes() == before


def test_chain_is_validated_before_any_work(setup):
    source, ctx, cache = setup
    with pytest.raises(ConfigError, match="consumes a model but the stage before it produces a bundle"):
        check_chain([Pack(ScaleConfig()), Scale(ScaleConfig())], source, ctx)
    assert Scale.runs == 0
    check_chain([Scale(ScaleConfig()), Pack(ScaleConfig())], source, ctx)
