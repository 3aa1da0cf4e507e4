import dataclasses

import pytest
import torch
from rich.console import Console

from edgec.base import architecture
from edgec.base.architecture import ModelTrust
from edgec.base.checkpoint import Checkpoint
from edgec.config import load_config
from edgec.base.data import load_dataset
from edgec.base.errors import ConfigError
from edgec.pipeline.artifact import CHECKPOINT_FILE, MODEL
from edgec.pipeline.cache import StageCache
from edgec.pipeline.stages.distill import DistillConfig, DistillStage, distillation_loss
from edgec.pipeline.runner import check_chain, run_chain
from edgec.pipeline.stage import StageContext
from edgec.pipeline.stages.train import TrainConfig, TrainStage
from support import zoo_source


def test_loss_matches_hand_computation():
    s, t, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([0])
    T, a = 2.0, 0.5
    ps, pt = torch.softmax(s / T, 1), torch.softmax(t / T, 1)
    kl = (pt * (pt.log() - ps.log())).sum()
    ce = -torch.log_softmax(s, 1)[0, 0]
    assert distillation_loss(s, t, y, T, a).item() == pytest.approx((a * T * T * kl + (1 - a) * ce).item(), rel=1e-6)


@pytest.mark.parametrize(
    "override, message",
    [({"distill.temperature": 0}, "temperature must be > 0"), ({"distill.alpha": 1.5}, "alpha must be in \\[0, 1\\]")],
)
def test_bad_hyperparameters(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override)


@pytest.fixture(scope="module")
def teacher_setup(tmp_path_factory):
    """A trained CNN teacher on the digits (a few seconds)."""
    data = load_dataset("digits")
    cache = StageCache(tmp_path_factory.mktemp("cache"))
    source = zoo_source(cache, "cnn-small", data, channels=[32, 64])
    ctx = StageContext(data=data, seed=0, target=None, console=Console(quiet=True))
    (step,) = run_chain([TrainStage(TrainConfig(epochs=30, patience=10))], source, ctx, cache)
    return step.artifact, ctx, cache


def test_student_matches_or_beats_scratch_twin(teacher_setup):
    teacher, ctx, cache = teacher_setup
    cfg = DistillConfig(student="mlp", student_args={"widths": [16]}, epochs=40, lr=1e-2, patience=10,
                        temperature=4, alpha=0.9, baseline=True)
    (step,) = run_chain([DistillStage(cfg)], teacher, ctx, cache)
    info = step.artifact.info
    assert info["params"] * 10 < info["teacher"]["params"]
    assert info["accuracy"] >= info["baseline"]["accuracy"]


def test_width_scaled_student_and_hint(teacher_setup):
    teacher, ctx, cache = teacher_setup
    cfg = DistillConfig(width=0.25, epochs=2, hint_layers=("features.1", "features.1"))
    (step,) = run_chain([DistillStage(cfg)], teacher, ctx, cache)
    student = step.artifact.checkpoint()
    assert student.arch["base"]["kwargs"]["width"] == 0.25
    assert "adapter" not in " ".join(student.state_dict)  # the hint adapter is not shipped


def test_student_with_other_output_size_is_refused(teacher_setup, tmp_path, monkeypatch):
    teacher, ctx, cache = teacher_setup
    module = tmp_path / "odd_models.py"
    module.write_text("import torch\ndef make():\n    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    trusted = dataclasses.replace(ctx, trust=ModelTrust(frozenset({"odd_models:make"})))
    with pytest.raises(ConfigError, match="student outputs \\[3\\].*teacher outputs \\[10\\]"):
        check_chain([DistillStage(DistillConfig(student="odd_models:make", epochs=1))], teacher, trusted)


def test_bad_hint_layer(teacher_setup):
    teacher, ctx, cache = teacher_setup
    with pytest.raises(ConfigError, match="no module 'nope'"):
        check_chain([DistillStage(DistillConfig(epochs=1, hint_layers=("nope", "features.1")))], teacher, ctx)


def test_student_of_a_user_model_is_derived_by_channel_pruning(tmp_path):
    """A teacher that is not a zoo model gets a student with `width` of its channels (Torch-Pruning),
    recorded as architecture edits that rebuild it from the user's factory."""
    from fixtures.user_models import make

    data = load_dataset("digits")
    trust = ModelTrust(frozenset({"fixtures.user_models:make"}))
    arch = architecture.record(architecture.factory_base("fixtures.user_models:make", channels=16))
    torch.manual_seed(0)
    teacher = architecture.build(arch, trust)
    cache = StageCache(tmp_path)
    source = cache.put("source", "s", MODEL, lambda out: Checkpoint(arch, teacher.state_dict()).save(out / CHECKPOINT_FILE) or {})
    ctx = StageContext(data=data, seed=0, target=None, console=Console(quiet=True), trust=trust)
    (step,) = run_chain([DistillStage(DistillConfig(width=0.5, epochs=1))], source, ctx, cache)
    student_ckpt = step.artifact.checkpoint()
    assert student_ckpt.arch["edits"], "channel pruning must be recorded as edits"
    student = student_ckpt.build(trust)
    assert student.stem[0].out_channels == 8 and student.head.out_features == 10
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in make(channels=16).parameters()) / 2
