"""export: convert for the target, check the result in its real runtime, assemble the bundle.

The exported model runs in its runtime (the same on-device code the bundle ships) on the whole
test split beside the torch reference. If it is a conversion fault (parity.py: top-1 agreement on
the samples that are not near-ties, output SNR), the stage fails and no bundle is written
(optimum-style "refuse to ship on mismatch"). What accuracy ships is the accuracy budget's decision
(accuracy_budget.py, applied by the build).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from edgec.calibration.samples import calibration_digest
from edgec.base.errors import ConfigError
from edgec.base.quiet import native_logs_captured
from edgec.targets.qat import restore_qat

from ..accuracy_budget import allowance_pt, drop_points, headline, reference_headline
from ..artifact import BUNDLE, Artifact
from ..bundle import shaping_sources, write_bundle, write_eval_set, write_fp32_fallback, write_test_vectors
from ..cache import sha256_file
from ..extensions import QAT_EXT, TASKS_EXT
from ..manifest import create_manifest
from ..objectives import objective_for
from ..stage import Probe, Stage, StageConfig, StageContext, Strict
from .export_conversion import Conversion


class CalibrationConfig(Strict):
    samples: int = Field(512, ge=1, description="representative samples, class-stratified from the train split")
    method: Literal["minmax", "percentile", "entropy"] = Field("minmax", description="ONNX int8 calibration method")


class ExportConfig(StageConfig):
    precision: Literal["int8", "fp16", "fp32"] | None = Field(None, description="default: the target's precision")
    calibration: CalibrationConfig = CalibrationConfig()
    per_channel: bool = Field(True, description="int8: one weight scale per output channel; false: one per weight tensor, "
                              "for delegates (some NPUs, DSPs) that need it (a qat stage must have trained the same)")
    eval_samples: int = Field(1000, ge=1, description="samples of the test split shipped for on-device accuracy")
    test_vectors: int = Field(16, ge=1, description="inputs shipped with their expected outputs")
    max_metric_drop: float | None = Field(None, ge=0, description="regression / reconstruction: largest drop of R^2 or "
                                          "ROC AUC (relative increase of MSE) allowed; default the target's max_export_drop")
    max_relative_error: float | None = Field(None, gt=0, description="regression / reconstruction: largest RMS(exported - "
                                             "reference outputs) / std(reference outputs); default 0.1")


class ExportStage(Stage):
    kind = "export"
    version = 4  # 2: the bundle's validation figure (the accuracy budget), the margin-aware parity gate;
    # 3: Piggyback's tasks payload (magnitude-ordered flips, predicted bias scales); 4: ONNX int8 weights in 7 bits
    produces = BUNDLE
    target_dependent = True
    accepts_extensions = (QAT_EXT,)
    Config = ExportConfig

    def check(self, probe: Probe) -> Probe:
        target = probe.target
        precision = self.config.precision or target.precision
        if precision not in target.precisions:
            raise ConfigError(
                f"precision {precision!r} is not offered by target {target.name!r} (choose {', '.join(target.precisions)})"
            )
        conversion = Conversion.for_target(target, self.config)
        qat = probe.extensions.get(QAT_EXT)
        if conversion.precision.calibrated and isinstance(qat, dict) and qat.get("per_channel") != self.config.per_channel:
            raise ConfigError(f"export.per_channel = {str(self.config.per_channel).lower()} but the qat stage trained "
                              f"per_channel = {str(qat.get('per_channel')).lower()}; set both the same")
        if TASKS_EXT in probe.extensions:  # a multi-task model (learn stages): every task's data must be at hand
            from .export_tasks import task_datasets

            task_datasets(probe.extensions[TASKS_EXT], probe.datasets, probe.data)
        return probe.evolve(kind=BUNDLE, model=None)

    def key_material(self, ctx: StageContext) -> dict[str, Any]:
        # The on-device runner and the transport encoder shape the bundle: a change to them is a new bundle.
        runner = {p.name: sha256_file(p) for p in shaping_sources()}
        # an int8 file over the budget keeps layers float (export_conversion.float_ops_for_budget)
        budget = {"budget_pt": ctx.budget_pt, "reference": ctx.reference.digest if ctx.reference is not None else None}
        return {**super().key_material(ctx), "runner": runner, "budget": budget}

    def run(self, source: Artifact, ctx: StageContext, out_dir: Path) -> dict[str, Any]:
        with native_logs_captured():
            return self._export(source, ctx, out_dir)

    def _export(self, source: Artifact, ctx: StageContext, out_dir: Path) -> dict[str, Any]:
        data, target = ctx.data, ctx.target
        conversion = Conversion.for_target(target, self.config)
        ckpt = source.checkpoint()
        if TASKS_EXT in ckpt.extensions:  # one bundle serving every task the learn stages taught (export_tasks.py)
            from .export_tasks import run_tasks

            return run_tasks(conversion, ckpt, ctx, out_dir)
        model = ckpt.build(ctx.trust)
        qat = ckpt.extensions.get(QAT_EXT) if conversion.precision.calibrated else None  # ranges a qat stage trained
        objective = objective_for(data)  # regression / reconstruction: calibration, gate, eval set (objectives.py)
        calibration = data.to_input(data.x_train[objective.calibration_indices(min(self.config.calibration.samples,
                                                                                   len(data.x_train)))])
        example = torch.from_numpy(calibration[:1])
        # The torch reference of a quantization-aware-trained model is its fake-quantized graph: what it was
        # trained as, and what the int8 file must reproduce.
        with torch.no_grad():
            reference = (restore_qat(model, example, qat) if qat is not None else model)(
                torch.from_numpy(data.to_input(data.x_test))).numpy()
        model_path = out_dir / f"model.{target.format}"
        exported, outputs, metrics = conversion.gated(model, example, model_path, calibration, reference, data, target,
                                                      qat, within_budget=self._budget_judge(conversion, ctx))
        # The bundle on the validation split: what the accuracy budget is judged on (accuracy_budget.py)
        val_name, val_value, _ = headline(data, conversion.run(model_path, exported, data.to_input(data.x_val)),
                                          "val")
        metrics[f"val_{val_name}"] = val_value
        extra_files = write_fp32_fallback(out_dir, model, example, target, conversion.precision)
        self._write_eval_files(out_dir, data, objective, outputs, reference, metrics)
        size = write_bundle(
            out_dir, target=target, labels=data.labels, model_file=model_path.name,
            codebooks=[c.detach().cpu().numpy() for c in ckpt.codebooks.values()],
            reference_fp32_bytes=4 * sum(p.numel() for p in model.parameters()),
            manifest=lambda size: create_manifest(
                target=target, converter=conversion.converter, precision=conversion.precision.name,
                model_file=model_path.name, extra_files=extra_files, exported=exported, data=data, metrics=metrics,
                size=size))
        quality = {k: metrics[k] for k in CLASSIFICATION_INFO} if data.task == "classification" \
            else objective.export_info(metrics)
        quality[f"val_{val_name}"] = val_value
        return {
            **quality,
            "precision": conversion.precision.name,
            **({"mixed_precision": exported.mixed_precision} if exported.mixed_precision is not None else {}),
            "params": sum(p.numel() for p in model.parameters()),
            "nonzero_params": int(sum(int(torch.count_nonzero(p)) for p in model.parameters())),
            "fp32_bytes": size["reference_fp32_bytes"],
            "model_bytes": size["model_bytes"],
            "transport_bytes": size["transport_bytes"],
            **({} if qat is not None else {"calibration_digest": calibration_digest(calibration)}),
        }

    @staticmethod
    def _budget_judge(conversion: Conversion, ctx: StageContext):
        """``within_budget(path, exported)`` for the conversion: the file's validation figure within
        the budget's quantization allowance of the trained reference (None without a reference)."""
        if ctx.reference is None:
            return None
        data, trained = ctx.data, None
        allowance = allowance_pt("quantization", ctx.budget_pt)

        def within_budget(path: Path, exported) -> bool:
            nonlocal trained
            if trained is None:  # measured once, and only for a file that needs judging
                trained = reference_headline(ctx.reference, data, ctx.trust)
            _, value, _ = headline(data, conversion.run(path, exported, data.to_input(data.x_val)), "val")
            return drop_points(trained[1], value, trained[2]) <= allowance + 1e-9

        return within_budget

    def _write_eval_files(self, out_dir: Path, data, objective, outputs, reference, metrics: dict[str, Any]) -> None:
        """The eval set (the device's accuracy check) and the test vectors; their figures into ``metrics``."""
        eval_idx = objective.eval_indices(min(self.config.eval_samples, len(data.y_test)))
        write_eval_set(out_dir, "eval.npz", data.x_test[eval_idx], data.y_test[eval_idx])
        metrics["eval_samples"] = int(len(eval_idx))
        if data.task == "classification":
            metrics["eval_accuracy"] = float((outputs[eval_idx].argmax(1) == data.y_test[eval_idx]).mean())
        else:
            metrics.update(objective.eval_metrics(outputs, eval_idx))
        vec_idx = eval_idx[: self.config.test_vectors]
        write_test_vectors(out_dir, "test_vectors.npz", data.to_input(data.x_test)[vec_idx], outputs[vec_idx],
                           reference[vec_idx])


CLASSIFICATION_INFO = ("accuracy", "reference_accuracy", "top1_agreement", "decided_agreement", "logit_snr_db",
                       "max_abs_diff")  # the parity figures the stage's info (the build summary) reports

