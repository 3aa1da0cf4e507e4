"""How the export stage drives a converter: its settings, the parity gate with the remedies it retries
first, the advice a refusal gives.

Shared by the single-model export (``export.py``) and the multi-task one (``export_tasks.py``). What
differs between formats is asked of the converter (``edgec.targets.converters``), what differs between
precisions of :class:`~edgec.targets.converters.Precision`: nothing here compares their names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgec.calibration.samples import select_calibration_indices
from edgec.targets.converters import Converter, Precision, converter_for
from edgec.targets.mixed_precision import mixed_precision

from ..objectives import objective_for, refuse_on_mismatch
from ..parity import enforce_parity, measure_parity

# (calibration sample count or None, converter options) of each automatic remedy tried
Attempt = tuple[int | None, dict[str, Any]]


@dataclass(frozen=True)
class Conversion:
    """The target's converter at the export's precision, with the export config's converter settings."""

    converter: Converter
    precision: Precision
    config: Any  # the export stage's ExportConfig: per_channel, calibration

    @classmethod
    def for_target(cls, target, config) -> Conversion:
        converter = converter_for(target.format)
        return cls(converter, converter.precision(config.precision or target.precision), config)

    def convert(self, model, example, path: Path, calibration: np.ndarray, qat=None, **options):
        """Write ``model`` to ``path`` (``options``: a remedy's converter options, which override the
        export config's, e.g. another calibration method)."""
        settings = {"per_channel": self.config.per_channel, "calibration_method": self.config.calibration.method,
                    **options}
        return self.converter.convert(model, example, path, precision=self.precision.name, calibration=calibration,
                                      qat=qat, **settings)

    def run(self, path: Path, exported, x: np.ndarray) -> np.ndarray:
        """The exported model's outputs in its real runtime (the on-device runner's code)."""
        from edgec.ondevice.runtimes import open_model

        runner = open_model(str(path), self.converter.runtime,
                            io_meta={"input": exported.inputs[0], "output": exported.outputs[0]})
        try:
            return runner.run_model_input(x)
        finally:
            runner.close()

    def gated(self, model, example, path: Path, calibration: np.ndarray, reference: np.ndarray, data, target,
              qat=None, within_budget: Callable[[Path, Any], bool] | None = None
              ) -> tuple[Any, np.ndarray, dict[str, Any]]:
        """Convert, run the file in its runtime on the test split and gate it against ``reference``
        (int8 classification: retrying the automatic remedies first, then keeping the worst layers float
        where the target allows mixed precision). ``within_budget(path, exported)``: whether the file
        keeps the accuracy budget; an int8 file that passes the gate but not the budget gets the same
        mixed-precision search (:meth:`float_ops_for_budget`). Returns (exported, outputs, metrics)."""
        objective, x_test = objective_for(data), data.to_input(data.x_test)
        advice = lambda **kw: self.advice(target, len(data.y_train), qat=qat is not None, **kw)

        def convert_and_run(calibration: np.ndarray, **options):
            exported = self.convert(model, example, path, calibration, qat=qat, **options)
            objective.after_conversion(path, target.format, exported)  # regression: int8 output range covers the targets
            return exported, self.run(path, exported, x_test)

        exported, outputs = convert_and_run(calibration)
        accepted = (calibration, {})  # the arguments of the file that ships (a remedy's, once one passes)
        if data.task != "classification":
            metrics = objective.export_metrics(reference, outputs)
            refuse_on_mismatch(metrics, target, self.config.max_metric_drop, self.config.max_relative_error, advice())
            return exported, outputs, metrics
        parity, tried, attempts = measure_parity(reference, outputs, data.y_test), [], []
        if self.precision.calibrated and qat is None and not parity.passes(target.budgets):
            # Remedies that are safe to try (the gate still decides); the first that passes ships.
            for remedy, cal, options in self.automatic_remedies(data.y_train):
                tried.append(remedy)
                attempts.append((len(cal) if cal is not None else None, options))
                exported, outputs = convert_and_run(data.to_input(data.x_train[cal]) if cal is not None else calibration,
                                                    **options)
                parity = measure_parity(reference, outputs, data.y_test)
                if parity.passes(target.budgets):
                    exported.conversion["remedy"] = remedy
                    accepted = (data.to_input(data.x_train[cal]) if cal is not None else calibration, options)
                    break
        if not parity.passes(target.budgets) and self.precision.calibrated and qat is None:  # before refusing
            mixed = mixed_precision(
                target, model, path, calibration, tried,
                convert=lambda layers: convert_and_run(calibration, float_ops=layers),
                passes=lambda run: measure_parity(reference, run[1], data.y_test).passes(target.budgets))
            if mixed is not None:
                exported, outputs = mixed.result
                exported.conversion["remedy"] = "mixed precision"
                exported = dataclasses.replace(exported, mixed_precision=mixed.record(exported))
                parity = measure_parity(reference, outputs, data.y_test)
        elif (within_budget is not None and parity.passes(target.budgets) and self.precision.calibrated and qat is None
              and not within_budget(path, exported)):
            exported, outputs = self.float_ops_for_budget(
                target, model, path, accepted, convert_and_run,
                passes=lambda run: (measure_parity(reference, run[1], data.y_test).passes(target.budgets)
                                    and within_budget(path, run[0])))
            parity = measure_parity(reference, outputs, data.y_test)
        if not parity.passes(target.budgets):
            worst = self.converter.diagnose(model, path, calibration) if self.precision.calibrated else ""
            tried_text = f"tried automatically: {', '.join(tried)}; " if tried else ""
            enforce_parity({None: parity}, target.budgets, worst + tried_text + advice(attempts=attempts))
        return exported, outputs, parity.as_dict()

    def float_ops_for_budget(self, target, model, path: Path, accepted: tuple[np.ndarray, dict[str, Any]],
                             convert_and_run, passes) -> tuple[Any, np.ndarray]:
        """int8 passed the gate but lost more than the accuracy budget allows: keep its worst layers
        float (the gate's search, judged by the gate and the budget) and ship the first that meets
        both; else the plain int8 file is written again, recording what was tried, and the budget
        (accuracy_budget.refuse_over_budget) decides."""
        calibration, options = accepted
        tried: list[str] = []
        mixed = mixed_precision(target, model, path, calibration, tried,
                                convert=lambda layers: convert_and_run(calibration, **options, float_ops=layers),
                                passes=passes)
        if mixed is None:
            exported, outputs = convert_and_run(calibration, **options)
            exported.conversion["over_budget_tried"] = tried
            return exported, outputs
        exported, outputs = mixed.result
        exported.conversion["remedy"] = "mixed precision (accuracy budget)"
        return dataclasses.replace(exported, mixed_precision=mixed.record(exported)), outputs

    def automatic_remedies(self, train_labels: np.ndarray) -> Iterator[tuple[str, np.ndarray | None, dict[str, Any]]]:
        """(what, calibration indices or None, converter options) to try when int8 misses the gate: the
        documented remedies that cannot make a passing model worse (the gate re-checks each)."""
        samples = self.config.calibration.samples
        for what, options in self.converter.automatic_remedies(self.config.calibration.method):
            yield what, None, options
        more = min(4 * samples, len(train_labels))
        if more > samples:
            yield f"{more} calibration samples", select_calibration_indices(train_labels, more, seed=0), {}

    def advice(self, target, train_samples: int, qat: bool = False, attempts: list[Attempt] = ()) -> str:
        """Only what can change the outcome on this target's converter and was not tried already
        (``attempts``: the automatic remedies' calibration sample counts and converter options)."""
        if self.precision.lossless:
            return "check that the model is deterministic in eval mode"
        other = next((p for p in ("fp16", "fp32") if p in target.precisions and p != self.precision.name), "fp32")
        if qat:  # the int8 ranges come from the qat stage: calibration options do not apply
            return f"try more quantization-aware training (--set qat.epochs=...), or leave qat out, or --precision {other}"
        tips = []
        if self.precision.calibrated:
            samples = max([self.config.calibration.samples] + [n for n, _ in attempts if n is not None])
            if samples < train_samples:
                tips.append(f"more calibration samples (--set export.calibration.samples="
                            f"{min(4 * samples, train_samples)}; the train split has {train_samples})")
            tips += self.converter.manual_remedies(self.config.calibration.method, [o for _, o in attempts])
            tips.append("training longer (near-tied top-1 classes flip under int8 rounding)")
        tips.append(f"--precision {other}")
        return "try " + ", ".join(tips)
