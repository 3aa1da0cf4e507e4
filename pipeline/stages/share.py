"""share: k-means weight sharing with linear initialisation, then centroid fine-tuning (Han et al.).

Each conv/linear weight keeps at most 2**bits distinct non-zero values; zeros stay zero. The
codebooks are stored in the checkpoint. Without ``bits`` the stage chooses them per layer by
validation sensitivity within its share of the accuracy budget (``algorithms/bit_allocation.py``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import Field
from torch import nn

from ..accuracy_budget import allowance_pt, stage_baseline
from ..algorithms.bit_allocation import BITS, CONFIDENCE_GUARD_PT, bit_curves, bit_levels
from ..algorithms.sensitivity import search_level
from ..artifact import CHECKPOINT_FILE, Artifact
from ..compression_info import compressed_model_info
from ..algorithms.sharing import CentroidTrainer, apply_sharing, cluster_weights, resolve_bits
from ..stage import Probe, StageConfig, StageContext
from ..training import OptimConfig, TrainingStage, fit

BIT_SEARCH_VERSION = 2  # bump when the bit allocation chooses differently for the same inputs


class ShareConfig(StageConfig, OptimConfig):
    bits: int | dict[str, int] | None = Field(
        None,
        description="bits per shared value (k = 2**bits): one for all layers, or per layer name/type; default: chosen "
        "per layer by validation sensitivity (8 down to 2), the fewest that keep the model after fine-tuning within "
        "the stage's share of the accuracy budget",
    )
    epochs: int = Field(5, ge=0, description="centroid fine-tuning epochs (0: no fine-tuning)")
    lr: float = Field(1e-4, gt=0)


class ShareStage(TrainingStage):
    kind = "share"
    version = 1
    compresses = True
    Config = ShareConfig

    @property
    def budgeted(self) -> bool:
        """No bits set: the stage chooses them per layer within the budget."""
        return self.config.bits is None

    def key_material(self, ctx: StageContext) -> dict[str, Any]:
        material = super().key_material(ctx)
        if self.budgeted:
            material["budget"] = {"allowance_pt": allowance_pt("share", ctx.budget_pt), "bits": list(BITS),
                                  "search": BIT_SEARCH_VERSION,
                                  "reference": ctx.reference.digest if ctx.reference is not None else None}
        return material

    def reached_bundle(self, info: dict[str, Any], reached: list[str]) -> list[str]:
        return [*reached, f"weight-shared ({self.id})"]

    @classmethod
    def report_section(cls, doc, summary, manifest) -> None:
        from edgec.report.sections import sharing_section

        sharing_section(doc, summary)

    def check(self, probe: Probe) -> Probe:
        super().check(probe)
        resolve_bits(probe.model, self.config.bits)
        return probe

    def run(self, source: Artifact, ctx: StageContext, out_dir: Path) -> dict[str, Any]:
        ckpt = source.checkpoint()
        model = ckpt.build(ctx.trust)
        search = None
        if self.budgeted:
            model, codebooks, bits, search = self._budgeted_share(model, ctx)
        else:
            bits = resolve_bits(model, self.config.bits)
            codebooks = self._share(model, self.config.bits, ctx)
        ckpt.state_dict, ckpt.codebooks = model.state_dict(), codebooks
        ckpt.save(out_dir / CHECKPOINT_FILE)
        info = {**compressed_model_info(model, ckpt, ctx.data), "bits": bits}
        return info if search is None else {**info, "bit_search": search}

    def _share(self, model: nn.Module, bits, ctx: StageContext, label: str = "") -> dict:
        """Share ``model``'s weights in place at ``bits`` and fine-tune the centroids: the codebooks."""
        codebooks, assignments = cluster_weights(model, bits=bits)
        apply_sharing(model, codebooks, assignments)
        if self.config.epochs > 0:
            # Pruned weights are outside every cluster, so write_back keeps them at zero.
            with CentroidTrainer(model, codebooks, assignments) as trainer:
                fit(model, ctx.data, self.config, ctx.seed, ctx.console, label=f"{self.id}{label}",
                    parameters=trainer.parameters(), after_step=trainer.write_back)
                codebooks = trainer.codebooks()
        return codebooks

    def _budgeted_share(self, model: nn.Module, ctx: StageContext):
        """(model, codebooks, bits per weight, record): the fewest bits per layer, ranked by sensitivity,
        whose validation figure after fine-tuning stays within the share's allowance counted from the
        trained reference; 8 bits everywhere (the gentlest) when no level does, which the budget then
        reports."""
        baseline = stage_baseline(model, ctx, "share")
        allowance, reference = baseline.allowance, baseline.reference
        curves = bit_curves(model, lambda candidate: baseline.drop(candidate, base=baseline.entering))
        levels = bit_levels(curves)
        results = {}

        def trial(bits: dict[str, int]):
            candidate = copy.deepcopy(model)
            codebooks = self._share(candidate, bits, ctx, label=f" trial {_shown(bits)}")
            figures = baseline.judge(candidate, CONFIDENCE_GUARD_PT)
            results[str(bits)] = (candidate, codebooks, figures["drop_pt"])
            return figures, None

        index, _, tried = search_level(levels, trial, key="bits")
        chosen = levels[0 if index is None else index]["bits"]
        if str(chosen) not in results:  # no level met the share and the gentlest was not tried
            trial(chosen)
        model, codebooks, drop = results[str(chosen)]
        missed = "" if index is not None else " - no level within it, 8 bits kept"
        ctx.console.print(f"{self.id}: bits per layer {_shown(chosen)} ({0.0 - drop:+.1f} pt from the trained model; "
                          f"share {allowance:.2g} pt){missed}")
        record = {"allowance_pt": allowance, "confidence_guard_pt": CONFIDENCE_GUARD_PT, "reference_val": reference,
                  "candidates": list(BITS), "curves": curves, "levels": levels, "trials": tried, "chosen": chosen,
                  "drop_pt": drop, "met": index is not None}
        return model, codebooks, resolve_bits(model, chosen), record


def _shown(bits: dict[str, int]) -> str:
    return ", ".join(f"{name or 'model'} {b}" for name, b in bits.items())
