"""What a model learns, as one object per task kind: stages ask it instead of assuming labels.

``task = "classification" | "reconstruction" | "regression"`` (``BuildConfig.task``) is carried by
the :class:`~edgec.base.data.Dataset` every stage reads; :func:`objective_for` returns its objective:

=====================  ================================  =================================  ==========================
                       classification                    reconstruction (autoencoder)       regression
=====================  ================================  =================================  ==========================
training target        the label                         the (clean) input, flattened       (y - offset) / scale
loss                   cross entropy                     MSE (noisy input when denoising)   MSE on standardized targets
early stopping         validation accuracy               validation MSE (lower)             validation MSE (lower)
test metrics           accuracy                          MSE; ROC AUC of the per-sample     MAE, RMSE, R^2 (real units)
                                                         error when anomalies are marked
distillation           alpha T^2 KL + (1-alpha) CE       alpha MSE(student, teacher) + (1-alpha) task loss; hints as before
int8 calibration       class-stratified                  random (seed 0), plus the samples  stratified over target
                                                         with the extreme input values      quantiles
int8 output range      as calibrated                     widened to cover the input range   widened to cover the targets
export gate            top-1 agreement, accuracy drop    relative output error, AUC drop    relative output error, R^2 drop
=====================  ================================  =================================  ==========================

The figures are computed by ``edgec/ondevice/metrics.py`` (numpy only), the same code the bundle's
runner uses on the device. Classification keeps its own code paths in the stages (unchanged);
:class:`Classification` is here so that ``fit`` asks every task the same questions.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgec.calibration.samples import quantile_bins, select_calibration_indices
from edgec.base.data import Dataset
from edgec.base.errors import ConfigError, InputError, RunError
from edgec.ondevice import metrics as M

from .inference import accuracy, predict

DEFAULT_MAX_RELATIVE_ERROR = 0.1


class Objective:
    task: ClassVar[str]
    val_name: ClassVar[str]  # what the training progress bar shows
    initial_best: ClassVar[float] = -math.inf  # fit keeps the weights of the highest validation score
    augment: ClassVar[bool] = False  # shifts / rotations of training images leave the target as it is

    def __init__(self, data: Dataset):
        self.data = data

    # --- shapes ---------------------------------------------------------------------------------
    def check_output(self, out: torch.Tensor, data: Dataset) -> None:
        """Raise InputError when model outputs ``out`` (on 2 samples) cannot serve this task."""

    def check_probe(self, probe) -> None:
        """Plan-time check (train, distill): the model's outputs fit the task."""
        try:
            self.check_output(probe.outputs(), probe.data)
        except InputError as e:
            raise ConfigError(str(e)) from None

    # --- training -------------------------------------------------------------------------------
    def train_targets(self, data: Dataset) -> np.ndarray:
        return data.y_train

    def train_inputs(self, xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return xb

    def loss(self, out: torch.Tensor, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def val_score(self, model: nn.Module, data: Dataset) -> float:
        """Higher is better."""
        raise NotImplementedError

    def shown(self, score: float) -> float:
        """A validation score as the progress bar shows it (errors as positive numbers)."""
        return -score

    def distill_loss(self, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, alpha: float) -> torch.Tensor:
        """alpha * MSE(student, teacher) + (1 - alpha) * the task loss."""
        soft = F.mse_loss(student, teacher)
        return alpha * soft + (1 - alpha) * self.loss(student, student, target)

    # --- figures --------------------------------------------------------------------------------
    def outputs_metrics(self, outputs: np.ndarray, split: str) -> dict[str, Any]:
        """Task figures from float model outputs on the ``split`` ("val" | "test") of the data."""
        data = self.data
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        return M.task_metrics(data.task, outputs, y, model_inputs=data.to_input(x), postprocessing=self.postprocessing())

    def model_metrics(self, model: nn.Module) -> dict[str, Any]:
        """What model_info records for this task: test figures, the validation headline, the headline's name."""
        test = self.outputs_metrics(predict(model, self.data.x_test, self.data).numpy(), "test")
        val = self.outputs_metrics(predict(model, self.data.x_val, self.data).numpy(), "val")
        name, _, _ = M.headline(self.data.task, test)
        figures = {k: v for k, v in test.items() if k not in ("samples", "anomalous")}
        return {"task": self.data.task, "metric": name, **figures,
                **{f"val_{k}": v for k, v in val.items() if k in ("mse", "r2", "auc", "mae", "rmse") and v is not None}}

    def postprocessing(self) -> dict[str, Any] | None:
        return None

    # --- export ---------------------------------------------------------------------------------
    def after_conversion(self, path, fmt: str, exported) -> dict[str, Any] | None:
        """Adjust the exported model file (before it is evaluated); None when nothing was done."""
        return None

    def calibration_indices(self, count: int) -> np.ndarray:
        raise NotImplementedError

    def eval_indices(self, count: int) -> np.ndarray:
        raise NotImplementedError

    def export_metrics(self, reference: np.ndarray, outputs: np.ndarray) -> dict[str, Any]:
        """The export stage's figures: the task's metrics of the torch reference and of the
        exported model on the whole test split, the headline's drop and the relative output error."""
        ref = self.outputs_metrics(reference, "test")
        got = self.outputs_metrics(outputs, "test")
        name, value, higher = M.headline(self.data.task, got)
        _, ref_value, _ = M.headline(self.data.task, ref)
        drop = None
        if value is not None and ref_value is not None:
            drop = (ref_value - value) if higher else (value - ref_value) / max(ref_value, 1e-12)
        out = {"task": self.data.task, "metric": name, "metric_drop": drop,
               "relative_error": M.relative_error(outputs, reference),
               "max_abs_diff": float(np.abs(reference.astype(np.float64) - outputs.astype(np.float64)).max()),
               "test_samples": int(len(self.data.x_test))}
        for key, v in got.items():
            if key not in ("samples", "anomalous"):
                out[key] = v
                out[f"reference_{key}"] = ref[key]
        if got.get("anomalous") is not None:
            out["anomalous_test_samples"] = got["anomalous"]
        return out

    def eval_metrics(self, outputs: np.ndarray, idx: np.ndarray) -> dict[str, Any]:
        """Figures of the exported model on the shipped eval set (what verify on the device checks)."""
        data = self.data
        got = M.task_metrics(data.task, outputs[idx], data.y_test[idx], model_inputs=data.to_input(data.x_test[idx]),
                             postprocessing=self.postprocessing())
        return {f"eval_{k}": v for k, v in got.items() if k not in ("samples",)}

    @staticmethod
    def gate(metrics: dict[str, Any], max_drop: float, max_relative_error: float) -> list[str]:
        """Why the exported model must not ship ([] when it may)."""
        problems = []
        if metrics["relative_error"] > max_relative_error:
            problems.append(f"relative output error {metrics['relative_error']:.4f} > {max_relative_error} (RMS of "
                            "exported - reference outputs over the reference's standard deviation)")
        name, drop = metrics["metric"], metrics["metric_drop"]
        if drop is not None and drop > max_drop:
            how = "relative increase" if name == "mse" else "drop"
            problems.append(f"{name} {metrics[name]:.4f} vs reference {metrics['reference_' + name]:.4f}: {how} "
                            f"{drop:.4f} > {max_drop}")
        return problems

    def manifest_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"task": self.data.task}
        if self.postprocessing() is not None:
            fields["postprocessing"] = self.postprocessing()
        return fields

    def export_info(self, metrics: dict[str, Any]) -> dict[str, Any]:
        keep = ("task", "metric", "metric_drop", "relative_error", "max_abs_diff", "mse", "reference_mse", "auc",
                "reference_auc", "mae", "reference_mae", "rmse", "reference_rmse", "r2", "reference_r2",
                "output_range", "target_range")
        return {k: metrics[k] for k in keep if k in metrics}


class Classification(Objective):
    task = "classification"
    val_name = "acc"
    initial_best = -1.0
    augment = True

    def check_probe(self, probe) -> None:
        from .checks import require_outputs_match_classes

        require_outputs_match_classes(probe)

    def loss(self, out, x, target):
        return F.cross_entropy(out, target)

    def val_score(self, model, data):
        return accuracy(model, data.x_val, data.y_val, data)

    def shown(self, score):
        return score

    def calibration_indices(self, count):
        return select_calibration_indices(self.data.y_train, count, seed=0)

    def eval_indices(self, count):
        return select_calibration_indices(self.data.y_test, count, seed=0)


class Reconstruction(Objective):
    task = "reconstruction"
    val_name = "mse"

    def check_output(self, out, data):
        features = math.prod(data.input_shape)
        if out.dim() not in (2, 4) or out[0].numel() != features:
            raise InputError(
                f"task = \"reconstruction\": the model outputs {list(out.shape[1:])} per sample but must reconstruct its "
                f"input {list(data.input_shape)} ({features} values, flat or in the input's shape); use the zoo's "
                "autoencoder or conv-autoencoder")

    def train_targets(self, data):
        return data.to_input(data.x_train).reshape(len(data.x_train), -1)

    def train_inputs(self, xb, gen):
        if not self.data.input_noise:
            return xb
        noise = torch.randn(xb.shape, generator=gen) * self.data.input_noise
        return xb + noise.to(xb.device)

    def loss(self, out, x, target):
        return F.mse_loss(out.reshape(len(out), -1), target.reshape(len(target), -1))

    def distill_loss(self, student, teacher, target, alpha):
        return alpha * F.mse_loss(student, teacher) + (1 - alpha) * self.loss(student, student, target)

    def val_score(self, model, data):
        out = predict(model, data.x_val, data).numpy()
        return -float(M.reconstruction_errors(out, data.to_input(data.x_val)).mean())

    def calibration_indices(self, count):
        """Random (seed 0), and the samples holding each input feature's minimum and maximum first:
        the int8 output range is observed on the reconstructions of these inputs."""
        x = self.data.x_train.reshape(len(self.data.x_train), -1)
        extremes = np.unique(np.concatenate([x.argmax(axis=0), x.argmin(axis=0)]))
        rng = np.random.default_rng(0)
        extremes = rng.permutation(extremes)[: max(1, count // 4)]
        rest = rng.permutation(np.setdiff1d(np.arange(len(x)), extremes))[: max(0, count - len(extremes))]
        return np.sort(np.concatenate([extremes, rest])).astype(np.int64)

    def eval_indices(self, count):
        """Normal and anomalous test samples in equal shares where both are marked."""
        return select_calibration_indices(self.data.y_test, count, seed=0)

    def after_conversion(self, path, fmt, exported):
        """The int8 output range must cover the input range (the histogram observer clips the rare
        extreme values of the reconstructions it sees): widen it, exactly (algorithms/output_range.py)."""
        from .algorithms.output_range import widen_output

        x = self.data.to_input(self.data.x_train)
        done = widen_output(path, fmt, exported.outputs[0], float(x.min()), float(x.max()))
        if done is not None:
            exported.conversion["output_range_widened"] = done
        return done

    def export_metrics(self, reference, outputs):
        out = super().export_metrics(reference, outputs)
        targets = self.data.to_input(self.data.x_test)
        out["target_range"] = [float(targets.min()), float(targets.max())]
        return out


class Regression(Objective):
    task = "regression"
    val_name = "mse"

    def check_output(self, out, data):
        k = len(data.labels)
        if out.dim() != 2 or out.shape[1] != k:
            raise InputError(
                f"task = \"regression\": the model outputs {list(out.shape[1:])} per sample but the data {data.name} has "
                f"{k} target(s) per sample; give the model {k} output(s)")

    def standardize(self, y: np.ndarray) -> np.ndarray:
        scale = np.asarray(self.data.target_scale, dtype=np.float64)
        offset = np.asarray(self.data.target_offset, dtype=np.float64)
        return ((y.astype(np.float64) - offset) / scale).astype(np.float32)

    def train_targets(self, data):
        return self.standardize(data.y_train)

    def loss(self, out, x, target):
        return F.mse_loss(out, target)

    def val_score(self, model, data):
        out = predict(model, data.x_val, data).numpy()
        return -float(np.mean((out.astype(np.float64) - self.standardize(data.y_val)) ** 2))

    def postprocessing(self):
        return {"scale": [float(v) for v in self.data.target_scale], "offset": [float(v) for v in self.data.target_offset]}

    def after_conversion(self, path, fmt, exported):
        """The int8 output range must cover the (standardized) training targets: the histogram observer
        clips the rare extreme predictions, which would saturate there (algorithms/output_range.py)."""
        from .algorithms.output_range import widen_output

        y = self.standardize(self.data.y_train)
        done = widen_output(path, fmt, exported.outputs[0], float(y.min()), float(y.max()))
        if done is not None:
            exported.conversion["output_range_widened"] = done
        return done

    def _stratified(self, y: np.ndarray, count: int) -> np.ndarray:
        return select_calibration_indices(quantile_bins(self.standardize(y).mean(axis=1)), count, seed=0)

    def calibration_indices(self, count):
        """Spread over the range of the targets (10 quantile bins of the mean standardized target)."""
        return self._stratified(self.data.y_train, count)

    def eval_indices(self, count):
        return self._stratified(self.data.y_test, count)


OBJECTIVES: dict[str, type[Objective]] = {o.task: o for o in (Classification, Reconstruction, Regression)}


def objective_for(data: Dataset) -> Objective:
    task = getattr(data, "task", "classification")
    if task not in OBJECTIVES:
        raise ConfigError(f"unknown task {task!r}: use {', '.join(OBJECTIVES)}")
    return OBJECTIVES[task](data)


def check_model_outputs(probe) -> None:
    """The plan-time output check of train and distill, for the probe's task."""
    objective_for(probe.data).check_probe(probe)


def refuse_on_mismatch(metrics: dict[str, Any], target, max_drop: float | None, max_relative_error: float | None,
                       remedies: str) -> None:
    """The export gate beyond classification: RunError (no bundle written) when the exported model's
    outputs are too far from the reference's or the task's headline figure dropped too much."""
    drop = target.budgets.max_export_drop if max_drop is None else max_drop
    if metrics["metric"] == "mse" and max_drop is None:
        drop = math.inf  # no anomaly marked: the relative output error bounds the reconstructions (MSE is not a 0..1 figure)
    rel = DEFAULT_MAX_RELATIVE_ERROR if max_relative_error is None else max_relative_error
    problems = Objective.gate(metrics, drop, rel)
    if problems:
        raise RunError("exported model does not match the reference (" + "; ".join(problems) + f"); no bundle written; {remedies}")
