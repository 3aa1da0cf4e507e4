"""export: convert for the target, check the result in its real runtime, assemble the bundle.

The exported model runs in its runtime (the same on-device code the bundle ships) on the whole
test split beside the torch reference. If top-1 agreement is below the target's minimum or the
accuracy drop exceeds its budget, the stage fails and no bundle is written (optimum-style
"refuse to ship on mismatch").
"""

from __future__ import annotations

import json
import platform
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

import edgec
from edgec.calibration.samples import calibration_digest, select_calibration_indices
from edgec.errors import ConfigError, RunError
from edgec.ondevice.integrity import describe_files
from edgec.ondevice.runtimes import open_model
from edgec.targets.onnx_export import export_onnx
from edgec.targets.tflite_export import export_tflite

from .artifact import BUNDLE, Artifact
from .cache import sha256_file
from .stage import Stage, StageConfig, StageContext
from .transport_codec import encode_transport

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ONDEVICE_PACKAGE = Path(edgec.__file__).parent / "ondevice"
RUNNER_TEMPLATE = ONDEVICE_PACKAGE / "run_bundle.py"
RUNTIME_OF_FORMAT = {"tflite": "tflite", "onnx": "onnxruntime"}
VERSIONED_PACKAGES = ("edgec", "torch", "onnx", "onnxruntime", "litert-torch", "ai-edge-litert", "numpy")


class CalibrationConfig(StageConfig):
    samples: int = Field(512, ge=1, description="representative samples, class-stratified from the train split")
    method: Literal["minmax", "percentile", "entropy"] = Field("minmax", description="ONNX int8 calibration method")


class ExportConfig(StageConfig):
    precision: Literal["int8", "fp16", "fp32"] | None = Field(None, description="default: the target's precision")
    calibration: CalibrationConfig = CalibrationConfig()
    eval_samples: int = Field(1000, ge=1, description="samples of the test split shipped for on-device accuracy")
    test_vectors: int = Field(16, ge=1, description="inputs shipped with their expected outputs")


class ExportStage(Stage):
    name = "export"
    version = 1
    produces = BUNDLE
    target_dependent = True
    Config = ExportConfig

    def key_material(self, ctx: StageContext) -> dict[str, Any]:
        # The on-device runner and the transport encoder shape the bundle: a change to them is a new bundle.
        sources = sorted(ONDEVICE_PACKAGE.glob("*.py")) + [Path(__file__).with_name("transport_codec.py")]
        runner = {p.name: sha256_file(p) for p in sources}
        return {**super().key_material(ctx), "runner": runner}

    def run(self, source: Artifact, ctx: StageContext, out_dir: Path) -> dict[str, Any]:
        cfg, data, target = self.config, ctx.data, ctx.target
        precision = cfg.precision or target.precision
        if precision not in target.precisions:
            raise ConfigError(
                f"export.precision {precision!r} is not offered by target {target.name!r} (choose {', '.join(target.precisions)})"
            )
        ckpt = source.checkpoint()
        model = ckpt.build()
        cal_idx = select_calibration_indices(data.y_train, min(cfg.calibration.samples, len(data.y_train)), seed=0)
        calibration = data.to_input(data.x_train[cal_idx])
        example = torch.from_numpy(calibration[:1])

        model_file = f"model.{target.format}"
        exported = self._convert(model, example, out_dir / model_file, precision, calibration, target.format)
        extra_files = []
        if target.fp32_fallback and precision != "fp32":
            export_onnx(model, example, out_dir / "model.fp32.onnx", precision="fp32")
            extra_files.append("model.fp32.onnx")

        # Reference and exported model on the same inputs: the whole test split.
        x_test = data.to_input(data.x_test)
        with torch.no_grad():
            reference = model(torch.from_numpy(x_test)).numpy()
        runtime_name = RUNTIME_OF_FORMAT[target.format]
        runner = open_model(
            str(out_dir / model_file), runtime_name, io_meta={"input": exported.inputs[0], "output": exported.outputs[0]}
        )
        outputs = runner.run_model_input(x_test)
        runner.close()
        metrics = _compare(reference, outputs, data.y_test)
        self._refuse_on_mismatch(metrics, target)

        eval_idx = select_calibration_indices(data.y_test, min(cfg.eval_samples, len(data.y_test)), seed=0)
        np.savez_compressed(out_dir / "eval.npz", x=data.x_test[eval_idx], y=data.y_test[eval_idx])
        metrics["eval_samples"] = int(len(eval_idx))
        metrics["eval_accuracy"] = float((outputs[eval_idx].argmax(1) == data.y_test[eval_idx]).mean())
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
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "edgec_version": edgec.__version__,
            "target": {"name": target.name, "profile": target.model_dump(mode="json")},
            "runtime": {
                "name": runtime_name,
                "packages": target.requirements,
                "min_version": _min_version(runtime_name),
                "recommended": _recommended(target, runtime_name),
            },
            "precision": precision,
            "model_file": model_file,
            "extra_model_files": extra_files,
            "inputs": exported.inputs,
            "outputs": exported.outputs,
            "preprocessing": {
                "raw_dtype": str(data.x_test.dtype),
                "raw_shape": list(data.input_shape),
                "scale": data.scale,
                "offset": data.offset,
                "layout": "NCHW" if data.is_image else "NC",
            },
            "labels": list(data.labels),
            "metrics": metrics,
            "size": size,
            "tolerance": {"atol": _atol(exported.outputs[0]), "accuracy": 0.01},
            "conversion": exported.conversion,
            "lineage": [],  # filled in by the build, which knows the whole chain
            "versions": _versions(),
        }
        manifest["files"] = describe_files(str(out_dir), sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file()))
        (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        return {
            "accuracy": metrics["accuracy"],
            "reference_accuracy": metrics["reference_accuracy"],
            "top1_agreement": metrics["top1_agreement"],
            "max_abs_diff": metrics["max_abs_diff"],
            "precision": precision,
            "params": sum(p.numel() for p in model.parameters()),
            "nonzero_params": int(sum(int(torch.count_nonzero(p)) for p in model.parameters())),
            "fp32_bytes": size["reference_fp32_bytes"],
            "model_bytes": size["model_bytes"],
            "transport_bytes": size["transport_bytes"],
            "calibration_digest": calibration_digest(calibration),
        }

    def _convert(self, model, example, path, precision, calibration, fmt):
        if fmt == "tflite":
            return export_tflite(model, example, path, precision=precision, calibration=calibration)
        return export_onnx(
            model, example, path, precision=precision, calibration=calibration, calibration_method=self.config.calibration.method
        )

    def _refuse_on_mismatch(self, metrics: dict[str, Any], target) -> None:
        budgets = target.budgets
        drop = metrics["reference_accuracy"] - metrics["accuracy"]
        problems = []
        if metrics["top1_agreement"] < budgets.min_agreement:
            problems.append(f"top-1 agreement {metrics['top1_agreement']:.4f} < {budgets.min_agreement}")
        if drop > budgets.max_accuracy_drop:
            problems.append(
                f"accuracy {metrics['accuracy']:.4f} vs reference {metrics['reference_accuracy']:.4f}: drop {drop:.4f} > {budgets.max_accuracy_drop}"
            )
        if problems:
            raise RunError(
                "exported model does not match the reference (" + "; ".join(problems) + "); no bundle written. "
                "Try more calibration samples (--set export.calibration.samples=2048), another calibration method, "
                "or --precision fp32"
            )


def _compare(reference: np.ndarray, outputs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    ref_top1, out_top1 = reference.argmax(1), outputs.argmax(1)
    return {
        "reference_accuracy": float((ref_top1 == labels).mean()),
        "accuracy": float((out_top1 == labels).mean()),
        "top1_agreement": float((ref_top1 == out_top1).mean()),
        "max_abs_diff": float(np.abs(reference - outputs).max()),
        "test_samples": int(len(labels)),
    }


def _atol(output: dict[str, Any]) -> float:
    """Test-vector tolerance: one quantization step for int8 outputs (runtimes and kernels may
    round differently by one step), a small float tolerance otherwise."""
    q = output.get("quantization")
    if q:
        return float(q["scale"]) * 1.01
    return 1e-3 if output["dtype"] == "float16" else 1e-4


def _recommended(target, runtime_name: str) -> dict[str, Any]:
    if runtime_name == "tflite":
        return {"threads": target.threads, "xnnpack": True}
    return {"threads": target.threads, "provider": target.providers[0], "graph_optimization_level": "all"}


def _min_version(runtime_name: str) -> str:
    return "2.14.0" if runtime_name == "tflite" else "1.20.0"


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for pkg in VERSIONED_PACKAGES:
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return found
