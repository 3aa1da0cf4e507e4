"""distill: teach a smaller student from the incoming (possibly compressed) teacher (Hinton et al. 2015).

loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, y)

For task = "regression" / "reconstruction" (pipeline/objectives.py) the soft targets are the teacher's
outputs themselves: loss = alpha * MSE(student, teacher) + (1 - alpha) * the task's loss (T unused).

With ``hint_layers`` set, the student also learns to match one intermediate feature map of the
teacher through a small learned adapter (FitNets-style "hints"); the adapter is dropped after
training. The output artifact is the student, so stages listed after ``distill`` compress the
student and ``export`` ships it.

Budgeted (no ``student`` and no ``width`` set): students at :data:`WIDTHS` are distilled narrowest
first and the first whose validation figure stays within the distill allowance of the accuracy
budget (counted from the trained model, ``accuracy_budget.allowance_pt``) is the output; when none
does, the teacher is passed on unchanged and the stage says so.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from edgec.base import architecture
from edgec.base.architecture import ModelTrust
from edgec.base.checkpoint import Checkpoint, load_checkpoint
from edgec.base.errors import ConfigError, InputError
from edgec.zoo import ZOO, default_width

from ..accuracy_budget import allowance_pt, stage_baseline
from ..algorithms.channels import prune_channels
from ..artifact import CHECKPOINT_FILE, Artifact
from ..cache import sha256_file
from ..objectives import check_model_outputs, objective_for
from ..modelinfo import model_info
from ..stage import Probe, StageConfig, StageContext
from ..training import OptimConfig, TrainingStage, fit, resolve_device, seed_everything


WIDTHS = (0.25, 0.5, 0.75)  # the budgeted student widths, tried narrowest first


class DistillConfig(StageConfig, OptimConfig):
    # Defaults measured on the built-in digits (cnn-small teacher, half-width student): the
    # student reaches the teacher's accuracy; T=4/alpha=0.9/lr=1e-3 left it 1 point short.
    epochs: int = Field(60, ge=1)
    lr: float = Field(3e-3, gt=0)
    patience: int = Field(10, ge=1)
    student: str | None = Field(
        None, description="zoo name or package.module:factory; default: the teacher at `width` (a zoo teacher's width "
        "argument, otherwise the teacher with that fraction of its channels kept by structured pruning)")
    student_args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the student")
    width: float = Field(0.5, gt=0, le=1, description="width multiplier when the student is derived from the teacher; "
                         "unset (and no student): the narrowest of 0.25 / 0.5 / 0.75 within the accuracy budget's "
                         "distill share, else the teacher is passed on")
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


def make_student(cfg: DistillConfig, teacher: nn.Module, teacher_arch: dict, example: torch.Tensor, input_shape,
                 num_classes: int, trust: ModelTrust, seed: int) -> tuple[nn.Module, dict]:
    """The student and its architecture record.

    A named student is built fresh. Otherwise the student is derived from the teacher: a zoo teacher
    without edits is rebuilt at ``width`` times its width (fresh weights, as in Hinton et al.); any
    other teacher (a user model, a grown or re-headed one) keeps ``width`` of its channels by
    structured pruning, starting from the teacher's own weights."""
    seed_everything(seed)
    base = teacher_arch["base"]
    if cfg.student is not None:
        student_base = (architecture.zoo_base(cfg.student, input_shape, num_classes, **cfg.student_args)
                        if cfg.student in ZOO else architecture.factory_base(cfg.student, **cfg.student_args))
        arch = architecture.record(student_base)
        return architecture.build(arch, trust, "distill.student"), arch
    if base["kind"] == "zoo" and not teacher_arch["edits"]:
        kwargs = {k: v for k, v in base["kwargs"].items() if k not in ("input_shape", "num_classes")}
        kwargs["width"] = cfg.width * kwargs.get("width", default_width(base["name"]))
        arch = architecture.record(architecture.zoo_base(base["name"], input_shape, num_classes, **kwargs))
        return architecture.build(arch, trust, "distill student"), arch
    student = prune_channels(teacher, example, 1 - cfg.width)
    rebuilt_base = architecture.build(architecture.record(base), trust, "distill teacher")
    arch = architecture.record(base, architecture.diff_edits(rebuilt_base, student))
    return student, arch


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
        device = next(student.parameters()).device
        with torch.no_grad():
            teacher(example.to(device)), student(example.to(device))
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


class DistillStage(TrainingStage):
    kind = "distill"
    version = 2
    compresses = True
    Config = DistillConfig

    def reached_bundle(self, info: dict[str, Any], reached: list[str]) -> list[str]:
        if info.get("passed_on") == "teacher":
            return reached  # no student met the accuracy budget: the teacher went on unchanged
        return [f"distilled student ({self.id}, {info.get('params', 0):,} params)"]  # a fresh model: nothing before it

    def _teacher(self, source_ckpt: Checkpoint | None, trust: ModelTrust) -> tuple[nn.Module, Checkpoint]:
        if self.config.teacher is not None:
            if not self.config.teacher.is_file():
                raise InputError(f"distill.teacher {self.config.teacher} does not exist")
            source_ckpt = load_checkpoint(self.config.teacher)
        teacher = source_ckpt.build(trust)
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher, source_ckpt

    def check(self, probe: Probe) -> Probe:
        """Derive the student now (cheap: no training), so a student that cannot be made, a hint
        layer that does not exist or mismatched outputs fail before any stage runs."""
        resolve_device(self.config.device)
        if self.config.teacher is not None:
            teacher, ckpt = self._teacher(None, probe.trust)
            arch = ckpt.arch
        else:
            teacher, arch = probe.model, probe.arch
        data, example = probe.data, probe.sample()
        student, student_arch = make_student(self.config, teacher, arch, example, data.input_shape, data.num_classes,
                                             probe.trust, seed=0)
        self._check_outputs(teacher, student, example)
        if self.config.hint_layers:
            _Hint(teacher, student, self.config.hint_layers, example).remove()
        probe = probe.evolve(model=student, arch=student_arch)
        check_model_outputs(probe)  # classification: outputs match the classes
        return probe

    @staticmethod
    def _check_outputs(teacher: nn.Module, student: nn.Module, example: torch.Tensor) -> None:
        with torch.no_grad():
            t_out, s_out = teacher.eval()(example), student.eval()(example)
        if s_out.shape != t_out.shape:
            raise ConfigError(
                f"distill: the student outputs {list(s_out.shape[1:])} per sample but the teacher outputs {list(t_out.shape[1:])}; "
                "they must match"
            )

    @property
    def budgeted(self) -> bool:
        """Neither a student nor a width set: the width is chosen by validation within the budget."""
        return self.config.student is None and "width" not in self.config.model_fields_set

    def key_material(self, ctx: StageContext) -> dict[str, Any]:
        material = super().key_material(ctx)
        if self.config.teacher is not None:
            material["teacher_sha256"] = sha256_file(self.config.teacher)
        if self.budgeted:
            material["budget"] = {"allowance_pt": allowance_pt("distill", ctx.budget_pt), "widths": list(WIDTHS),
                                  "reference": ctx.reference.digest if ctx.reference is not None else None}
        return material

    def run(self, source: Artifact, ctx: StageContext, out_dir: Path) -> dict[str, Any]:
        teacher, teacher_ckpt = self._teacher(source.checkpoint(), ctx.trust)
        if not self.budgeted:
            return self._distill(self.config, teacher, teacher_ckpt, ctx, out_dir)[1]
        baseline = stage_baseline(teacher, ctx, "distill")
        reference, allowance = baseline.reference, baseline.allowance
        trials = []
        for width in WIDTHS:
            student, info = self._distill(self.config.model_copy(update={"width": width}), teacher, teacher_ckpt, ctx,
                                          out_dir)
            drop = baseline.drop(student)
            trials.append({"width": width, "drop_pt": round(drop, 4), "accepted": drop <= allowance + 1e-9})
            search = {"allowance_pt": allowance, "reference_val": reference, "trials": trials}
            if trials[-1]["accepted"]:
                ctx.console.print(f"{self.id}: student width {width} ({0.0 - drop:+.1f} pt) within {allowance:.2g} pt "
                                  "of the trained model")
                return {**info, "width_search": {**search, "chosen": width}}
        tried = ", ".join(f"{t['width']}: {0.0 - t['drop_pt']:+.1f} pt" for t in trials)
        ctx.console.print(f"{self.id}: no student within {allowance:.2g} pt of the trained model (widths {tried}); "
                          "the teacher is passed on")
        teacher_ckpt.save(out_dir / CHECKPOINT_FILE)
        return {**model_info(teacher, ctx.data), "passed_on": "teacher",
                "width_search": {**search, "chosen": None}}

    def _distill(self, cfg: DistillConfig, teacher: nn.Module, teacher_ckpt: Checkpoint, ctx: StageContext,
                 out_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
        """Distill one student with ``cfg`` into ``out_dir``: (the student, its info)."""
        data = ctx.data
        example = torch.from_numpy(data.to_input(data.x_train[:2]))
        student, arch = make_student(cfg, teacher, teacher_ckpt.arch, example, data.input_shape, data.num_classes,
                                     ctx.trust, ctx.seed)
        self._check_outputs(teacher, student, example)
        teacher.to(resolve_device(cfg.device))
        student.train()
        scratch = copy.deepcopy(student) if cfg.baseline else None

        hint = _Hint(teacher, student, cfg.hint_layers, example) if cfg.hint_layers else None

        objective = objective_for(data)

        def loss_fn(logits, x, y):
            with torch.no_grad():
                teacher_logits = teacher(x)
            if data.task == "classification":
                loss = distillation_loss(logits, teacher_logits, y, cfg.temperature, cfg.alpha)
            else:  # regression / reconstruction: alpha * MSE to the teacher's outputs + (1 - alpha) * task loss
                loss = objective.distill_loss(logits, teacher_logits, y, cfg.alpha)
            return loss + cfg.hint_weight * hint.loss() if hint else loss

        params = list(student.parameters()) + (list(hint.adapter.parameters()) if hint else [])
        result = fit(student, data, cfg, ctx.seed, ctx.console, label=self.id, loss_fn=loss_fn, parameters=params)
        if hint:
            hint.remove()
        Checkpoint(arch, student.state_dict()).save(out_dir / CHECKPOINT_FILE)

        info = {**model_info(student, data), "epochs_run": result.epochs_run, "teacher": model_info(teacher, data)}
        if scratch is not None:
            fit(scratch, data, cfg, ctx.seed, ctx.console, label=f"{self.id} baseline (labels only)")
            info["baseline"] = model_info(scratch, data)
        return student, info
