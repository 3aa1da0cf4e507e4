"""grow: make a trained model wider, deeper or give it more classes without changing what it computes
(Net2Net: Chen, Goodfellow, Shlens, ICLR 2016; the algorithm is in ``algorithms/net2net.py``).

    [[stages]]
    kind = "grow"
    wider = { "hidden.0" = 300 }     # Net2WiderNet: layer -> new width (units / channels)
    deeper = ["hidden.0"]            # Net2DeeperNet: an identity layer after the layer's ReLU
    classes = 10                     # more outputs; the old classes' outputs are unchanged
    noise = 0.05                     # symmetry breaking, x each layer's weight std (zero-sum: the function is kept)

Function preservation is a gate: the grown model's outputs (eval mode, the whole test split of the
stage's data, old classes' columns) must match the source's within 1e-4, with identical top-1 for a
classifier, or the stage fails naming the step that broke it. ``wider`` and ``deeper`` keep the
function of any model, so they serve every task (``pipeline/objectives.py``); ``classes`` is for
classifiers only (refused at plan time for regression and reconstruction). The gate applies with
``noise = 0``; with noise the difference is reported in the stage's info. The grown architecture is
recorded in the checkpoint (``Checkpoint.with_model``), so every later stage, ``--weights`` and
``bench --reference`` rebuild it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator
from torch import nn

from edgec.base import architecture
from edgec.base.data import Dataset
from edgec.base.errors import ConfigError, RunError

from ..algorithms.net2net import grow
from ..artifact import CHECKPOINT_FILE, Artifact
from ..modelinfo import model_info
from ..objectives import objective_for
from ..stage import Probe, Stage, StageConfig, StageContext
from ..inference import predict

TOLERANCE = 1e-4
CALIBRATION_SAMPLES = 2048  # training samples for the new BatchNorms' statistics and the new classes' bias


class GrowConfig(StageConfig):
    wider: dict[str, int] = Field(default_factory=dict, description="Net2WiderNet: layer name -> new width (units or "
                                  "channels); Linear -> Linear, Conv2d -> Conv2d, Conv2d -> Flatten -> Linear")
    deeper: list[str] = Field(default_factory=list, description="Net2DeeperNet: insert an identity layer (plus an "
                              "identity BatchNorm after convs that have one) after each named layer's ReLU")
    classes: int | None = Field(None, ge=2, le=100_000, description="extend the output layer to this many classes; the old "
                                "classes' outputs are unchanged")
    noise: float = Field(0.05, ge=0, le=1, description="symmetry breaking for replicated units, relative to each "
                         "layer's weight std; zero-sum over a unit's replicas, so the function is kept (0: none)")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="seed of the replica mapping and the noise; "
                             "default the build's seed")

    @field_validator("wider", mode="before")
    @classmethod
    def _dotted(cls, value):
        """``wider = { features.0.0 = 32 }`` (unquoted: TOML nests it) means the layer "features.0.0"."""
        def flat(table, prefix=""):
            for key, v in table.items():
                name = f"{prefix}.{key}" if prefix else str(key)
                yield from flat(v, name) if isinstance(v, dict) else [(name, v)]

        return dict(flat(value)) if isinstance(value, dict) else value

    @field_validator("wider")
    @classmethod
    def _widths(cls, value):
        for layer, width in value.items():
            if not 1 <= width <= 65536:
                raise ValueError(f"wider.{layer}: the width must be from 1 to 65536, got {width}")
        return value

    @field_validator("deeper")
    @classmethod
    def _distinct(cls, value):
        if len(set(value)) != len(value):
            raise ValueError(f"deeper lists a layer twice: {value}")
        return value


class GrowStage(Stage):
    kind = "grow"
    version = 1
    Config = GrowConfig

    def reached_bundle(self, info: dict[str, Any], reached: list[str]) -> list[str]:
        return [*reached, f"{self.kind} ({self.id})"]  # a changed architecture reaches the bundle

    def _grow(self, model: nn.Module, example: torch.Tensor, calibration: torch.Tensor, seed: int):
        cfg = self.config
        return list(grow(model, wider=cfg.wider, deeper=cfg.deeper, classes=cfg.classes, example=example,
                         calibration=calibration, seed=cfg.seed if cfg.seed is not None else seed, noise=cfg.noise))

    def check(self, probe: Probe) -> Probe:
        """Grow the probe model now (cheap: no training), so a bad layer name, an activation that is
        not ReLU or a layer with several consumers fails before any stage runs, and later stages'
        checks see the grown model."""
        cfg = self.config
        if not cfg.wider and not cfg.deeper and cfg.classes is None:
            raise ConfigError("grow needs at least one of wider = { layer = width }, deeper = [layer] or classes = N")
        task = getattr(probe.data, "task", "classification")
        if cfg.classes is not None and task != "classification":
            raise ConfigError(f"grow: classes = N adds classes to a classifier; this build's task is {task!r}: use "
                              "wider / deeper (they keep the function for any task)")
        example = probe.sample()
        steps = self._grow(probe.model, example, example, 0)
        grown = steps[-1][1] if steps else probe.model
        base = architecture.build(architecture.record(probe.arch["base"]), probe.trust, "the model")
        arch = architecture.record(probe.arch["base"], architecture.diff_edits(base, grown))
        return probe.evolve(model=grown.eval(), arch=arch)

    def run(self, source: Artifact, ctx: StageContext, out_dir: Path) -> dict[str, Any]:
        data = ctx.data
        ckpt = source.checkpoint()
        model = ckpt.build(ctx.trust)
        example = torch.from_numpy(data.to_input(data.x_train[:2]))
        calibration = torch.from_numpy(data.to_input(data.x_train[:CALIBRATION_SAMPLES]))
        steps = self._grow(model, example, calibration, ctx.seed)
        grown = steps[-1][1] if steps else model
        reference = predict(model, data.x_test, data)
        classifier = data.task == "classification"
        gate = compare(reference, predict(grown, data.x_test, data), classifier)
        if self.config.noise == 0 and not gate["passed"]:
            raise RunError(self._culprit(steps, reference, data))
        if not gate["passed"]:
            ctx.console.print(f"[yellow]grow[/]: with noise = {self.config.noise} the grown model's outputs differ by "
                              f"{gate['max_abs_diff']:.2e} from the source's")
        ckpt.with_model(grown.eval(), ctx.trust).save(out_dir / CHECKPOINT_FILE)
        return {
            **model_info(grown, data),
            **source_figures(model, reference, data),  # on this stage's data
            "source_params": sum(p.numel() for p in model.parameters()),
            "steps": [{"op": s.op, "layer": s.layer, **s.detail} for s, _ in steps],
            "function_preserved": {**gate, "tolerance": TOLERANCE, "test_samples": len(data.y_test),
                                   "enforced": self.config.noise == 0},
        }

    def _culprit(self, steps, reference: torch.Tensor, data: Dataset) -> str:
        """The first step whose model no longer computes the source's function."""
        classifier = data.task == "classification"
        for step, model in steps:
            result = compare(reference, predict(model, data.x_test, data), classifier)
            if not result["passed"]:
                break
        top1 = f", top-1 agreement {result['top1_agreement']:.4f}" if classifier else ""
        what = "logit" if classifier else "output"
        return (f"grow: {step.op} {step.layer!r} changed the model's function: max |{what} difference| "
                f"{result['max_abs_diff']:.3g} (allowed {TOLERANCE:g}){top1} on the {len(data.y_test)} test samples; "
                "this is a bug in grow for this model: please report it")


def compare(reference: torch.Tensor, grown: torch.Tensor, classifier: bool = True) -> dict[str, Any]:
    """The gate: the old classes' outputs within TOLERANCE and, for a classifier, the same top-1 among
    them; also the top-1 agreement over all outputs (new classes included). Regression and
    reconstruction outputs are compared by value only (their argmax means nothing)."""
    old = grown[:, : reference.shape[1]]
    diff = float((old - reference).abs().max()) if len(reference) else 0.0
    if not classifier:
        return {"max_abs_diff": diff, "passed": diff <= TOLERANCE}
    top1 = float((old.argmax(1) == reference.argmax(1)).float().mean()) if len(reference) else 1.0
    top1_all = float((grown.argmax(1) == reference.argmax(1)).float().mean()) if len(reference) else 1.0
    return {"max_abs_diff": diff, "top1_agreement": top1, "top1_agreement_all_outputs": top1_all,
            "passed": diff <= TOLERANCE and top1 == 1.0}


def source_figures(model: nn.Module, reference: torch.Tensor, data: Dataset) -> dict[str, Any]:
    """The source model's headline figure on the test split: ``source_accuracy``, or the task's
    (``source_r2``, ``source_auc``, ``source_mse``)."""
    if data.task == "classification":
        return {"source_accuracy": float((reference.argmax(1).numpy() == data.y_test).mean())}
    metrics = objective_for(data).model_metrics(model)
    return {f"source_{metrics['metric']}": metrics[metrics["metric"]]}
