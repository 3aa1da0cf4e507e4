"""share: k-means weight sharing with linear initialisation, then centroid fine-tuning (Han et al.).

Each conv/linear weight keeps at most 2**bits distinct non-zero values; zeros stay zero. The
codebooks are stored in the checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from ..artifact import CHECKPOINT_FILE, Artifact
from ..compression_info import compressed_model_info
from ..algorithms.sharing import CentroidTrainer, apply_sharing, cluster_weights, resolve_bits
from ..stage import Probe, StageConfig, StageContext
from ..training import OptimConfig, TrainingStage, fit


class ShareConfig(StageConfig, OptimConfig):
    bits: int | dict[str, int] = Field(
        default_factory=lambda: {"conv": 8, "linear": 5},
        description="bits per shared value (k = 2**bits): one for all layers, or per layer name/type",
    )
    epochs: int = Field(5, ge=0, description="centroid fine-tuning epochs (0: no fine-tuning)")
    lr: float = Field(1e-4, gt=0)


class ShareStage(TrainingStage):
    kind = "share"
    version = 1
    compresses = True
    Config = ShareConfig

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
        codebooks, assignments = cluster_weights(model, bits=self.config.bits)
        apply_sharing(model, codebooks, assignments)
        if self.config.epochs > 0:
            # Pruned weights are outside every cluster, so write_back keeps them at zero.
            with CentroidTrainer(model, codebooks, assignments) as trainer:
                fit(model, ctx.data, self.config, ctx.seed, ctx.console, label=self.id,
                    parameters=trainer.parameters(), after_step=trainer.write_back)
                codebooks = trainer.codebooks()
        ckpt.state_dict, ckpt.codebooks = model.state_dict(), codebooks
        ckpt.save(out_dir / CHECKPOINT_FILE)
        return compressed_model_info(model, ckpt, ctx.data)
