"""distill: teach a smaller student from the incoming (possibly compressed) teacher (Hinton et al. 2015).

loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, y)

With ``hint_layers`` set, the student also learns to match one intermediate feature map of the
teacher through a small learned adapter (FitNets-style "hints"); the adapter is dropped after
training. The output artifact is the student, so stages listed after ``distill`` compress the
student and ``export`` ships it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from edgec.checkpoint import Checkpoint, build_model, describe_arch, factory_arch, load_checkpoint, zoo_arch
from edgec.errors import ConfigError, InputError
from edgec.zoo import ZOO

from .artifact import CHECKPOINT_FILE, Artifact
from .cache import sha256_file
from .modelinfo import model_info
from .stage import Stage, StageContext
from .training import OptimConfig, fit, seed_everything


class DistillConfig(OptimConfig):
    # Defaults measured on the built-in digits (cnn-small teacher, half-width student): the
    # student reaches the teacher's accuracy; T=4/alpha=0.9/lr=1e-3 left it 1 point short.
    epochs: int = Field(60, ge=1)
    lr: float = Field(3e-3, gt=0)
    patience: int = Field(10, ge=1)
    student: str | None = Field(None, description="zoo name or package.module:factory; default: the teacher's architecture scaled by `width`")
    student_args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the student")
    width: float = Field(0.5, gt=0, description="width multiplier when the student is the teacher's architecture")
    temperature: float = Field(2.0, description="softmax temperature T (> 0)")
    alpha: float = Field(0.7, description="weight of the soft-target term, in [0, 1]")
    hint_layers: tuple[str, str] | None = Field(None, description="(teacher module, student module) whose outputs the hint loss matches")
    hint_weight: float = Field(1.0, ge=0)
    baseline: bool = Field(False, description="also train the student on labels alone (same epochs and seed) and report it")
    teacher: Path | None = Field(None, description="an edgec checkpoint to use as teacher instead of the previous stage's model")

    @model_validator(mode="after")
    def _check(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        return self


def distillation_loss(student_logits, teacher_logits, labels, temperature: float, alpha: float) -> torch.Tensor:
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1), reduction="batchmean", log_target=True
    )
    return alpha * t * t * soft + (1 - alpha) * F.cross_entropy(student_logits, labels)


def student_arch(cfg: DistillConfig, teacher_arch: dict, input_shape, num_classes: int) -> dict:
    if cfg.student is None:
        if teacher_arch["kind"] != "zoo":
            raise ConfigError(
                f"distill: the teacher {describe_arch(teacher_arch)} is not a zoo model, so it cannot be scaled by "
                "width; name a student with distill.student"
            )
        kwargs = {k: v for k, v in teacher_arch["kwargs"].items() if k not in ("input_shape", "num_classes")}
        kwargs["width"] = cfg.width * kwargs.get("width", 1.0)
        return zoo_arch(teacher_arch["name"], input_shape, num_classes, **kwargs)
    if cfg.student in ZOO:
        return zoo_arch(cfg.student, input_shape, num_classes, **cfg.student_args)
    return factory_arch(cfg.student, **cfg.student_args)


class _Hint(nn.Module):
    """Captures one feature map of teacher and student; a 1x1 conv / linear adapter maps the
    student's channels onto the teacher's."""

    def __init__(self, teacher: nn.Module, student: nn.Module, names: tuple[str, str], example: torch.Tensor):
        super().__init__()
        modules_t, modules_s = dict(teacher.named_modules()), dict(student.named_modules())
        for name, mods, who in ((names[0], modules_t, "teacher"), (names[1], modules_s, "student")):
            if name not in mods:
                raise ConfigError(f"distill.hint_layers: {who} has no module {name!r}; choose one of {', '.join(n for n in mods if n)}")
        self.features: dict[str, torch.Tensor] = {}
        self._handles = [
            modules_t[names[0]].register_forward_hook(lambda m, i, o: self.features.__setitem__("t", o)),
            modules_s[names[1]].register_forward_hook(lambda m, i, o: self.features.__setitem__("s", o)),
        ]
        was_training = student.training
        student.eval()  # probing shapes must not move the student's BatchNorm statistics
        with torch.no_grad():
            teacher(example), student(example)
        student.train(was_training)
        t, s = self.features["t"], self.features["s"]
        if t.dim() != s.dim() or t.shape[2:] != s.shape[2:]:
            raise ConfigError(f"distill.hint_layers: feature maps {list(t.shape[1:])} and {list(s.shape[1:])} differ in spatial shape")
        self.adapter = nn.Conv2d(s.shape[1], t.shape[1], 1) if t.dim() == 4 else nn.Linear(s.shape[1], t.shape[1])

    def loss(self) -> torch.Tensor:
        return F.mse_loss(self.adapter(self.features["s"]), self.features["t"].detach())

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class DistillStage(Stage):
    name = "distill"
    version = 1
    Config = DistillConfig

    def key_material(self, ctx: StageContext) -> dict[str, Any]:
        material = super().key_material(ctx)
        if self.config.teacher is not None:
            material["teacher_sha256"] = sha256_file(self.config.teacher)
        return material

    def run(self, source: Artifact, ctx: StageContext, out_dir: Path) -> dict[str, Any]:
        cfg, data = self.config, ctx.data
        if cfg.teacher is not None:
            if not cfg.teacher.is_file():
                raise InputError(f"distill.teacher {cfg.teacher} does not exist")
            teacher_ckpt = load_checkpoint(cfg.teacher)
        else:
            teacher_ckpt = source.checkpoint()
        teacher = teacher_ckpt.build()
        for p in teacher.parameters():
            p.requires_grad_(False)

        arch = student_arch(cfg, teacher_ckpt.arch, data.input_shape, data.num_classes)
        seed_everything(ctx.seed)
        student = build_model(arch)
        example = torch.from_numpy(data.to_input(data.x_train[:2]))
        with torch.no_grad():
            t_out, s_out = teacher(example), student(example)
        if s_out.shape != t_out.shape:
            raise ConfigError(
                f"distill: the student outputs {list(s_out.shape[1:])} per sample but the teacher outputs {list(t_out.shape[1:])}; "
                "they must match"
            )
        scratch = copy.deepcopy(student) if cfg.baseline else None

        hint = _Hint(teacher, student, cfg.hint_layers, example) if cfg.hint_layers else None

        def loss_fn(logits, x, y):
            with torch.no_grad():
                teacher_logits = teacher(x)
            loss = distillation_loss(logits, teacher_logits, y, cfg.temperature, cfg.alpha)
            return loss + cfg.hint_weight * hint.loss() if hint else loss

        params = list(student.parameters()) + (list(hint.adapter.parameters()) if hint else [])
        result = fit(student, data, cfg, ctx.seed, ctx.console, label="distill", loss_fn=loss_fn, parameters=params)
        if hint:
            hint.remove()
        Checkpoint(arch, student.state_dict()).save(out_dir / CHECKPOINT_FILE)

        info = {**model_info(student, data), "epochs_run": result.epochs_run, "teacher": model_info(teacher, data)}
        if scratch is not None:
            fit(scratch, data, cfg, ctx.seed, ctx.console, label="baseline (labels only)")
            info["baseline"] = model_info(scratch, data)
        return info
