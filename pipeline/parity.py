"""The export parity gate: does the exported file compute the same function as the torch model?

Its job is catching conversion faults (a layer dropped or mis-quantized, an eval-mode Dropout once
gave 0.41 top-1 agreement), not judging the accuracy int8 rounding costs: that is the accuracy
budget's (accuracy_budget.py). Raw top-1 agreement punishes near-ties, samples whose two best
classes are closer than the rounding error, which flip under int8 without anything being wrong. So
agreement is counted only on samples whose reference top-1 margin exceeds the observed error bound
(twice the 99th percentile of the per-sample largest |logit difference|: one logit may rise by it
while the top one falls by it), and a floor on the outputs' signal-to-noise ratio catches a model
whose error is so large that few samples are left to count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgec.base.errors import RunError

MIN_DECIDED_FRACTION = 0.5  # fewer samples clear the error bound: the error itself is the fault
ERROR_PERCENTILE = 99.0


@dataclass(frozen=True)
class Parity:
    """How closely the exported model's outputs follow the reference's on one test split."""

    reference_accuracy: float
    accuracy: float
    top1_agreement: float  # raw, near-ties included
    decided_agreement: float  # on the samples whose reference top-1 margin exceeds the error bound
    decided_samples: int
    margin_bound: float
    logit_snr_db: float
    max_abs_diff: float
    test_samples: int

    def as_dict(self) -> dict[str, Any]:
        """The figures as the manifest's ``metrics`` and the stage's info record them."""
        return dataclasses.asdict(self)

    def problems(self, budgets) -> list[str]:
        """What makes the exported model a conversion fault (empty: it computes the reference's function)."""
        problems = []
        decided = self.decided_samples / max(self.test_samples, 1)
        if decided < MIN_DECIDED_FRACTION:
            problems.append(f"outputs differ from the reference by up to {self.margin_bound / 2:.3g}: only {decided:.0%} "
                            f"of the samples have a top-1 margin above that error bound")
        elif self.decided_agreement < budgets.min_agreement:
            problems.append(f"top-1 agreement {self.decided_agreement:.4f} < {budgets.min_agreement} on the "
                            f"{self.decided_samples} samples whose top-1 margin exceeds the error bound "
                            f"{self.margin_bound:.3g}")
        if self.logit_snr_db < budgets.min_logit_snr_db:
            problems.append(f"output SNR {self.logit_snr_db:.1f} dB < {budgets.min_logit_snr_db:g} dB")
        return problems

    def passes(self, budgets) -> bool:
        return not self.problems(budgets)


class ParityMismatch(RunError):
    """The exported model does not compute the reference's function: no bundle is written.

    ``problems``: each failed check (a task's prefixed with its name); ``remedies``: what to try."""

    def __init__(self, problems: list[str], remedies: str):
        self.problems, self.remedies = list(problems), remedies
        super().__init__("exported model does not match the reference (" + "; ".join(problems)
                         + f"); no bundle written; {remedies}")


def measure_parity(reference: np.ndarray, outputs: np.ndarray, labels: np.ndarray) -> Parity:
    """Accuracy of both, raw and margin-aware top-1 agreement, the error bound and the logit SNR."""
    ref = reference.astype(np.float64)
    out = outputs.astype(np.float64)
    ref_top1, out_top1 = ref.argmax(1), out.argmax(1)
    diff = np.abs(out - ref)
    bound = 2.0 * float(np.percentile(diff.max(1), ERROR_PERCENTILE)) if len(ref) else 0.0
    ordered = np.sort(ref, axis=1)
    margin = ordered[:, -1] - ordered[:, -2] if ref.shape[1] > 1 else np.full(len(ref), np.inf)
    decided = margin > bound
    centred_ref = ref - ref.mean(1, keepdims=True)  # logits are shift-invariant under softmax
    centred_err = (out - ref) - (out - ref).mean(1, keepdims=True)
    noise = float((centred_err ** 2).sum())
    snr = float("inf") if noise == 0 else 10.0 * float(np.log10(max((centred_ref ** 2).sum(), 1e-300) / noise))
    return Parity(
        reference_accuracy=float((ref_top1 == labels).mean()),
        accuracy=float((out_top1 == labels).mean()),
        top1_agreement=float((ref_top1 == out_top1).mean()),
        decided_agreement=float((ref_top1[decided] == out_top1[decided]).mean()) if decided.any() else 0.0,
        decided_samples=int(decided.sum()),
        margin_bound=bound,
        logit_snr_db=min(snr, 999.0),
        max_abs_diff=float(diff.max()) if diff.size else 0.0,
        test_samples=int(len(labels)),
    )


def enforce_parity(parities: Mapping[str | None, Parity], budgets, remedies: str) -> None:
    """The gate: ParityMismatch naming every problem of every model (keyed by task name; None: the
    bundle's one model), or nothing when each computes its reference's function."""
    problems = [f"task {name!r}: {p}" if name is not None else p
                for name, parity in parities.items() for p in parity.problems(budgets)]
    if problems:
        raise ParityMismatch(problems, remedies)
