"""export: convert for the target, check the result in its real runtime, assemble the bundle.

The exported model runs in its runtime (the same on-device code the bundle ships) on the whole
test split beside the torch reference. If it is a conversion fault (parity.py: top-1 agreement on
the samples that are not near-ties, output SNR), the stage fails and no bundle is written
(optimum-style "refuse to ship on mismatch"). What accuracy ships is the accuracy budget's decision
(accuracy_budget.py, applied by the build).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

import edgec
from edgec.calibration.samples import calibration_digest, select_calibration_indices
from edgec.errors import ConfigError, RunError
from edgec.quiet import native_logs_captured
from edgec.targets.mixed_precision import mixed_precision
from edgec.targets.onnx_export import export_onnx
from edgec.targets.qat import restore_qat
from edgec.targets.tflite_export import export_tflite

from ..artifact import BUNDLE, Artifact
from ..cache import sha256_file
from ..extensions import QAT_EXT, TASKS_EXT
from ..manifest import create_manifest, write_manifest
from ..accuracy_budget import headline
from ..objectives import objective_for, refuse_on_mismatch
from ..parity import parity_metrics, parity_problems
from ..stage import Probe, Stage, StageConfig, StageContext, Strict
from ..algorithms.transport_codec import encode_transport

ONDEVICE_PACKAGE = Path(edgec.__file__).parent / "ondevice"
RUNNER_TEMPLATE = ONDEVICE_PACKAGE / "run_bundle.py"
RUNTIME_OF_FORMAT = {"tflite": "tflite", "onnx": "onnxruntime"}


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
    version = 2  # 2: the bundle's validation figure (the accuracy budget), the margin-aware parity gate
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
        qat = probe.extensions.get(QAT_EXT)
        if precision == "int8" and isinstance(qat, dict) and qat.get("per_channel") != self.config.per_channel:
            raise ConfigError(f"export.per_channel = {str(self.config.per_channel).lower()} but the qat stage trained "
                              f"per_channel = {str(qat.get('per_channel')).lower()}; set both the same")
        if TASKS_EXT in probe.extensions:  # a multi-task model (learn stages): every task's data must be at hand
            from .export_tasks import task_datasets

            task_datasets(probe.extensions[TASKS_EXT], probe.datasets, probe.data)
        return probe.evolve(kind=BUNDLE, model=None)

    def key_material(self, ctx: StageContext) -> dict[str, Any]:
        # The on-device runner and the transport encoder shape the bundle: a change to them is a new bundle.
        sources = sorted(ONDEVICE_PACKAGE.glob("*.py")) + [Path(__file__).parents[1] / "algorithms" / "transport_codec.py"]
        runner = {p.name: sha256_file(p) for p in sources}
        return {**super().key_material(ctx), "runner": runner}

    def run(self, source: Artifact, ctx: StageContext, out_dir: Path) -> dict[str, Any]:
        with native_logs_captured():
            return self._export(source, ctx, out_dir)

    def _export(self, source: Artifact, ctx: StageContext, out_dir: Path) -> dict[str, Any]:
        cfg, data, target = self.config, ctx.data, ctx.target
        precision = cfg.precision or target.precision
        ckpt = source.checkpoint()
        if TASKS_EXT in ckpt.extensions:  # one bundle serving every task the learn stages taught (export_tasks.py)
            from .export_tasks import run_tasks

            return run_tasks(self, ckpt, ctx, out_dir, precision, parity_metrics, ONDEVICE_PACKAGE, RUNNER_TEMPLATE,
                             RUNTIME_OF_FORMAT)
        model = ckpt.build(ctx.trust)
        qat = ckpt.extensions.get(QAT_EXT) if precision == "int8" else None  # int8 ranges trained by a qat stage
        objective = objective_for(data)  # regression / reconstruction: calibration, gate, eval set (objectives.py)
        cal_idx = (select_calibration_indices(data.y_train, min(cfg.calibration.samples, len(data.y_train)), seed=0)
                   if data.task == "classification" else objective.calibration_indices(min(cfg.calibration.samples, len(data.x_train))))
        calibration = data.to_input(data.x_train[cal_idx])
        example = torch.from_numpy(calibration[:1])

        model_file = f"model.{target.format}"
        x_test = data.to_input(data.x_test)
        # The torch reference of a quantization-aware-trained model is its fake-quantized graph: what it was
        # trained as, and what the int8 file must reproduce.
        reference_model = restore_qat(model, example, qat) if qat is not None else model
        with torch.no_grad():
            reference = reference_model(torch.from_numpy(x_test)).numpy()
        runtime_name = RUNTIME_OF_FORMAT[target.format]

        def convert_and_run(calibration: np.ndarray, **options):
            exported = self._convert(model, example, out_dir / model_file, precision, calibration, target.format,
                                     qat=qat, **options)
            if data.task != "classification":  # the int8 output range must cover the input range / the targets
                objective.after_conversion(out_dir / model_file, target.format, exported)
            return exported, _run_exported(out_dir / model_file, runtime_name, exported, x_test)

        exported, outputs = convert_and_run(calibration)
        remedy, tried, attempts, mixed_record = None, [], [], None
        if data.task == "classification":
            metrics = parity_metrics(reference, outputs, data.y_test)
            if precision == "int8" and qat is None and self._mismatch(metrics, target):
                # Remedies that are safe to try (the gate still decides); the first that passes ships.
                for remedy, cal, options in self._automatic_remedies(data, target.format):
                    tried.append(remedy)
                    attempts.append((len(cal) if cal is not None else None, options))
                    exported, outputs = convert_and_run(data.to_input(data.x_train[cal]) if cal is not None else calibration,
                                                        **options)
                    metrics = parity_metrics(reference, outputs, data.y_test)
                    if not self._mismatch(metrics, target):
                        break
                else:
                    remedy = None
            if self._mismatch(metrics, target) and precision == "int8" and qat is None:  # before refusing
                mixed = mixed_precision(
                    target, model, out_dir / model_file, calibration, tried,
                    convert=lambda layers: convert_and_run(calibration, float_ops=layers),
                    passes=lambda run: not self._mismatch(parity_metrics(reference, run[1], data.y_test), target))
                if mixed is not None:
                    (exported, outputs), remedy = mixed.result, "mixed precision"
                    mixed_record = mixed.record(exported)
                    metrics = parity_metrics(reference, outputs, data.y_test)
            if self._mismatch(metrics, target):
                worst = _worst_int8_op(model, out_dir / model_file, calibration) if precision == "int8" else ""
                tried_text = f"tried automatically: {', '.join(tried)}; " if tried else ""
                self._refuse_on_mismatch(metrics, target, worst + tried_text + self._remedies(
                    precision, target, len(data.y_train), qat=qat is not None, attempts=attempts))
        else:
            metrics = objective.export_metrics(reference, outputs)
            refuse_on_mismatch(metrics, target, cfg.max_metric_drop, cfg.max_relative_error,
                               self._remedies(precision, target, len(data.y_train), qat=qat is not None))
        if remedy is not None:
            exported.conversion["remedy"] = remedy
        # The bundle on the validation split: what the accuracy budget is judged on (accuracy_budget.py)
        val_outputs = _run_exported(out_dir / model_file, runtime_name, exported, data.to_input(data.x_val))
        val_name, val_value, _ = headline(data, val_outputs, "val")
        metrics[f"val_{val_name}"] = val_value
        extra_files = []
        if target.fp32_fallback and precision != "fp32":
            export_onnx(model, example, out_dir / "model.fp32.onnx", precision="fp32")
            extra_files.append("model.fp32.onnx")

        eval_idx = (select_calibration_indices(data.y_test, min(cfg.eval_samples, len(data.y_test)), seed=0)
                    if data.task == "classification" else objective.eval_indices(min(cfg.eval_samples, len(data.y_test))))
        np.savez_compressed(out_dir / "eval.npz", x=data.x_test[eval_idx], y=data.y_test[eval_idx])
        metrics["eval_samples"] = int(len(eval_idx))
        if data.task == "classification":
            metrics["eval_accuracy"] = float((outputs[eval_idx].argmax(1) == data.y_test[eval_idx]).mean())
        else:
            metrics.update(objective.eval_metrics(outputs, eval_idx))
        vec_idx = eval_idx[: cfg.test_vectors]
        np.savez_compressed(
            out_dir / "test_vectors.npz", inputs=x_test[vec_idx], expected=outputs[vec_idx], reference=reference[vec_idx]
        )
        (out_dir / "labels.txt").write_text("\n".join(data.labels) + "\n")
        (out_dir / "requirements.txt").write_text("\n".join(target.requirements) + "\n")
        shutil.copytree(ONDEVICE_PACKAGE, out_dir / "edgec_ondevice", ignore=shutil.ignore_patterns("__pycache__", "run_bundle.py"))
        shutil.copy2(RUNNER_TEMPLATE, out_dir / "run.py")

        model_bytes = (out_dir / model_file).stat().st_size
        transport = out_dir / f"{model_file}.edgt"
        codebooks = [c.detach().cpu().numpy() for c in ckpt.codebooks.values()]
        transport.write_bytes(encode_transport((out_dir / model_file).read_bytes(), codebooks))
        size = {
            "reference_fp32_bytes": 4 * sum(p.numel() for p in model.parameters()),
            "model_bytes": model_bytes,
            "transport_bytes": transport.stat().st_size,
            "transport_file": transport.name,
        }
        self._refuse_on_budget(size, target)
        manifest = create_manifest(
            target=target, runtime_name=runtime_name, precision=precision, model_file=model_file, extra_files=extra_files,
            exported=exported, data=data, metrics=metrics, size=size,
        )
        if mixed_record is not None:  # the layers that stay float, for the device and the reader
            manifest["mixed_precision"] = mixed_record
        write_manifest(out_dir, manifest)
        quality = {
            "accuracy": metrics["accuracy"],
            "reference_accuracy": metrics["reference_accuracy"],
            "top1_agreement": metrics["top1_agreement"],
            "decided_agreement": metrics["decided_agreement"],
            "logit_snr_db": metrics["logit_snr_db"],
            "max_abs_diff": metrics["max_abs_diff"],
        } if data.task == "classification" else objective.export_info(metrics)
        quality[f"val_{val_name}"] = val_value
        return {
            **quality,
            "precision": precision,
            **({"mixed_precision": mixed_record} if mixed_record is not None else {}),
            "params": sum(p.numel() for p in model.parameters()),
            "nonzero_params": int(sum(int(torch.count_nonzero(p)) for p in model.parameters())),
            "fp32_bytes": size["reference_fp32_bytes"],
            "model_bytes": size["model_bytes"],
            "transport_bytes": size["transport_bytes"],
            **({} if qat is not None else {"calibration_digest": calibration_digest(calibration)}),
        }

    def _convert(self, model, example, path, precision, calibration, fmt, **options):
        options.setdefault("per_channel", self.config.per_channel)
        if fmt == "tflite":
            return export_tflite(model, example, path, precision=precision, calibration=calibration, **options)
        options.setdefault("calibration_method", self.config.calibration.method)
        return export_onnx(model, example, path, precision=precision, calibration=calibration, **options)

    def _automatic_remedies(self, data, fmt: str):
        """(what, calibration indices or None, converter options) to try when int8 misses the gate:
        the documented remedies that cannot make a passing model worse (the gate re-checks each)."""
        cfg = self.config.calibration
        if fmt == "tflite":
            yield "minmax activation observer", None, {"activation_observer": "minmax"}
        else:
            for method in ("percentile", "entropy"):
                if method != cfg.method:
                    yield f"{method} calibration", None, {"calibration_method": method}
        more = min(4 * cfg.samples, len(data.y_train))
        if more > cfg.samples:
            yield f"{more} calibration samples", select_calibration_indices(data.y_train, more, seed=0), {}

    @staticmethod
    def _mismatch(metrics: dict[str, Any], target) -> bool:
        return bool(parity_problems(metrics, target.budgets))

    def _remedies(self, precision: str, target, train_samples: int, qat: bool = False,
                  attempts: list[tuple[int | None, dict[str, Any]]] = ()) -> str:
        """Only what can change the outcome on this target's converter and was not tried already
        (``attempts``: the automatic remedies' calibration sample counts and converter options)."""
        if precision == "fp32":
            return "check that the model is deterministic in eval mode"
        if qat:  # the int8 ranges come from the qat stage: calibration options do not apply
            return (f"try more quantization-aware training (--set qat.epochs=...), or leave qat out, or --precision "
                    f"{'fp16' if 'fp16' in target.precisions else 'fp32'}")
        tips = []
        samples = max([self.config.calibration.samples] + [n for n, _ in attempts if n is not None])
        if precision == "int8" and samples < train_samples:
            tips.append(f"more calibration samples (--set export.calibration.samples={min(4 * samples, train_samples)}; "
                        f"the train split has {train_samples})")
        methods = {self.config.calibration.method} | {o["calibration_method"] for _, o in attempts if "calibration_method" in o}
        untried = [m for m in ("percentile", "entropy", "minmax") if m not in methods]
        if precision == "int8" and target.format == "onnx" and untried:
            tips.append(f"another calibration method (--set export.calibration.method={untried[0]})")
        if precision == "int8":
            tips.append("training longer (near-tied top-1 classes flip under int8 rounding)")
        tips.append(f"--precision {'fp16' if 'fp16' in target.precisions and precision != 'fp16' else 'fp32'}")
        return "try " + ", ".join(tips)

    def _refuse_on_budget(self, size: dict[str, Any], target) -> None:
        """Size budgets are checked when the bundle is made: a build never 'succeeds' over them."""
        budgets, problems = target.budgets, []
        if budgets.max_model_bytes is not None and size["model_bytes"] > budgets.max_model_bytes:
            problems.append(f"model file {size['model_bytes']:,} bytes > max_model_bytes {budgets.max_model_bytes:,}")
        if budgets.max_transport_bytes is not None and size["transport_bytes"] > budgets.max_transport_bytes:
            problems.append(f"transport payload {size['transport_bytes']:,} bytes > max_transport_bytes "
                            f"{budgets.max_transport_bytes:,}")
        if problems:
            raise RunError(f"the bundle exceeds target {target.name!r}'s size budget ({'; '.join(problems)}); no bundle "
                           "written. Compress more (prune, share, a narrower distill student) or raise the budget in a "
                           "board.toml")

    def _refuse_on_mismatch(self, metrics: dict[str, Any], target, remedies: str) -> None:
        problems = parity_problems(metrics, target.budgets)
        if problems:
            raise RunError(
                "exported model does not match the reference (" + "; ".join(problems) + f"); no bundle written; {remedies}"
            )


def _run_exported(path: Path, runtime_name: str, exported, x: np.ndarray) -> np.ndarray:
    """The exported model's outputs in its real runtime (the on-device runner's code)."""
    from edgec.ondevice.runtimes import open_model

    runner = open_model(str(path), runtime_name, io_meta={"input": exported.inputs[0], "output": exported.outputs[0]})
    try:
        return runner.run_model_input(x)
    finally:
        runner.close()


def _worst_int8_op(model, path: Path, calibration: np.ndarray) -> str:
    """Which op adds the most int8 error (per-layer comparison with float activations), for the message."""
    from edgec.targets.diagnose import int8_layer_errors

    try:
        layers = int8_layer_errors(model, path, calibration)
    except Exception:  # the diagnosis is a hint; never let it hide the refusal itself
        return ""
    if not layers:
        return ""
    worst = layers[0]
    return f"the op adding the most int8 error is {worst['name']} ({worst['op']}, relative error {worst['relative_error']:.3f}); "
