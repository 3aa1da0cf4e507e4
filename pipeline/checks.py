"""Plan-time checks several stages share."""

from __future__ import annotations

from edgec.base.errors import ConfigError

from .stage import Probe


def require_outputs_match_classes(probe: Probe) -> None:
    """The model's output width must equal the class count of the data the stage trains on."""
    out = probe.outputs()
    if out.dim() != 2 or out.shape[1] != probe.data.num_classes:
        raise ConfigError(
            f"the model outputs {list(out.shape[1:])} per sample but the data {probe.data.name} has "
            f"{probe.data.num_classes} classes; give the model that many outputs (or grow it)"
        )
