"""Magnitude pruning of convolution and linear weights (Han et al. 2015, Deep Compression step 1).

Only the ``weight`` of ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Linear`` modules is pruned; biases and
normalisation parameters are kept. Masks are keyed by parameter name (``fc1.weight``), as in the
edgec checkpoint's ``masks``; users name layers by module name (``fc1``) or by type (``"conv"``,
``"linear"``), and a module name wins over its type.

Three ways to choose what to prune (``PruneSpec``):

- ``ThresholdPruning(quality)``: Han's rule, per layer keep ``|w| >= quality * std(w)``, with the
  standard deviation taken over the weights that survived earlier rounds;
- ``LayerSparsity({"fc1": 0.92, "conv": 0.5})``: a target fraction of zeros per named layer (layers
  not named are left as they are);
- ``GlobalSparsity(0.9)``: one magnitude threshold over all prunable weights together.

Target sparsities count the whole layer, earlier rounds included, and a weight pruned once never
comes back: ``compute_masks`` ANDs new masks with ``existing_masks``. Iterative pruning is
``for target in sparsity_schedule(...)``: compute masks, apply them, retrain under a
``MaskEnforcer``.

Typical retraining with the shared loop (``pipeline.training.fit``)::

    masks = compute_masks(model, LayerSparsity({"fc1": 0.92}), existing_masks=masks)
    with MaskEnforcer(model, masks) as enforcer:      # applies the masks, zeroes their gradients
        fit(model, ..., after_step=enforcer.reapply)  # momentum/weight decay cannot revive them
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from edgec.base.errors import ConfigError, InputError

LAYER_TYPES = {"conv": (nn.Conv1d, nn.Conv2d), "linear": (nn.Linear,)}

V = TypeVar("V")


def prunable_layers(model: nn.Module) -> dict[str, tuple[str, nn.Parameter]]:
    """``{module name: (layer type, weight)}`` for every conv/linear module, in model order."""
    layers = {}
    for name, module in model.named_modules():
        for kind, classes in LAYER_TYPES.items():
            if isinstance(module, classes) and isinstance(module.weight, nn.Parameter):
                layers[name] = (kind, module.weight)
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no Conv1d, Conv2d or Linear layer to prune or share")
    return layers


def weight_name(module_name: str) -> str:
    return f"{module_name}.weight" if module_name else "weight"


def prunable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{"fc1.weight": parameter, ...}`` for the conv/linear weights; ConfigError if there are none."""
    return {weight_name(name): weight for name, (_, weight) in prunable_layers(model).items()}


def per_layer(model: nn.Module, values: V | Mapping[str, V], setting: str) -> dict[str, V]:
    """Resolve a setting given for all layers or per module name / layer type to ``{param name: value}``.

    A plain value applies to every prunable layer; in a mapping, a module name wins over its type and
    layers matched by neither are left out. Unknown keys are a ConfigError listing the valid ones.
    """
    layers = prunable_layers(model)
    if not isinstance(values, Mapping):
        return {weight_name(name): values for name in layers}
    unknown = [key for key in values if key not in layers and key not in LAYER_TYPES]
    if unknown:
        raise ConfigError(
            f"{setting}: no prunable layer named {', '.join(map(repr, unknown))}; "
            f"valid layer names: {', '.join(layers)} (or layer types: {', '.join(LAYER_TYPES)})"
        )
    resolved = {}
    for name, (kind, _) in layers.items():
        if name in values:
            resolved[weight_name(name)] = values[name]
        elif kind in values:
            resolved[weight_name(name)] = values[kind]
    return resolved


def _check_sparsity(value: float, setting: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"{setting}: sparsity must be a number in [0, 1), got {value!r}")


@dataclass(frozen=True)
class ThresholdPruning:
    """Han's rule: keep ``|w| >= quality * std(w)``; ``quality`` for all layers or per layer/type."""

    quality: float | Mapping[str, float]

    def __post_init__(self):
        values = self.quality.values() if isinstance(self.quality, Mapping) else [self.quality]
        for q in values:
            if isinstance(q, bool) or not isinstance(q, (int, float)) or not (math.isfinite(q) and q >= 0):
                raise ConfigError(f"pruning quality must be a finite number >= 0, got {q!r}")


@dataclass(frozen=True)
class LayerSparsity:
    """Target fraction of zeros per module name or layer type; unnamed layers are not pruned."""

    sparsity: Mapping[str, float]

    def __post_init__(self):
        if not isinstance(self.sparsity, Mapping) or not self.sparsity:
            raise ConfigError(f"per-layer sparsity must map layer names or types to values, got {self.sparsity!r}")
        for layer, s in self.sparsity.items():
            _check_sparsity(s, f"sparsity of {layer!r}")


@dataclass(frozen=True)
class GlobalSparsity:
    """Target fraction of zeros over all prunable weights, by one magnitude threshold."""

    sparsity: float

    def __post_init__(self):
        _check_sparsity(self.sparsity, "global sparsity")


PruneSpec = ThresholdPruning | LayerSparsity | GlobalSparsity


def check_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, nn.Parameter]:
    """The parameters ``masks`` apply to; InputError if a mask names no parameter or has its shape wrong."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise InputError(f"pruning mask for {name!r} matches no parameter of {type(model).__name__}")
        if mask.dtype != torch.bool or mask.shape != params[name].shape:
            raise InputError(
                f"pruning mask for {name!r} must be a bool tensor of shape {list(params[name].shape)}, "
                f"got {mask.dtype} {list(mask.shape)}"
            )
    return {name: params[name] for name in masks}


def _keep_largest(magnitudes: torch.Tensor, alive: torch.Tensor, keep: int) -> torch.Tensor:
    """Mask of the ``keep`` largest ``magnitudes`` among ``alive`` (ties: the earlier index wins)."""
    scores = torch.where(alive, magnitudes, torch.full_like(magnitudes, -1.0))
    order = torch.argsort(scores.flatten(), descending=True, stable=True)
    mask = torch.zeros(magnitudes.numel(), dtype=torch.bool)
    mask[order[: min(keep, int(alive.sum()))]] = True
    return mask.view_as(magnitudes)


@torch.no_grad()
def compute_masks(
    model: nn.Module, spec: PruneSpec, existing_masks: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """New pruning masks (True = keep), AND-ed with ``existing_masks``; the model is not changed.

    The result holds every layer the spec prunes plus every existing mask, so it can replace the
    checkpoint's ``masks`` as is.
    """
    existing = dict(existing_masks or {})
    check_masks(model, existing)
    weights = prunable_parameters(model)
    alive = {name: existing.get(name, torch.ones_like(w, dtype=torch.bool)) for name, w in weights.items()}
    masks = dict(existing)

    if isinstance(spec, ThresholdPruning):
        for name, quality in per_layer(model, spec.quality, "pruning quality").items():
            w = weights[name].detach()
            survivors = w[alive[name]]
            std = survivors.std() if survivors.numel() > 1 else torch.tensor(0.0)
            masks[name] = alive[name] & (w.abs() >= quality * std)
    elif isinstance(spec, LayerSparsity):
        for name, sparsity in per_layer(model, spec.sparsity, "sparsity").items():
            w = weights[name].detach()
            keep = w.numel() - round(sparsity * w.numel())
            masks[name] = _keep_largest(w.abs(), alive[name], keep)
    elif isinstance(spec, GlobalSparsity):
        flat = torch.cat([w.detach().abs().flatten() for w in weights.values()])
        flat_alive = torch.cat([a.flatten() for a in alive.values()])
        kept = _keep_largest(flat, flat_alive, flat.numel() - round(spec.sparsity * flat.numel()))
        for (name, w), part in zip(weights.items(), kept.split([w.numel() for w in weights.values()])):
            masks[name] = part.view_as(w)
    else:
        raise ConfigError(f"unknown pruning spec {spec!r}")
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Set masked weights of ``model`` (which the caller owns) to +0.0, in place."""
    for name, param in check_masks(model, masks).items():
        param.masked_fill_(~masks[name], 0.0)


class MaskEnforcer:
    """Keeps pruned weights at exactly zero while a model trains.

    On construction it applies the masks and registers gradient hooks that zero the gradients of
    pruned weights, so optimizer state (momentum, Adam moments) never sees them. Momentum from
    before pruning or weight decay can still move a zeroed weight, so call ``reapply()`` after
    every ``optimizer.step()`` (``fit(..., after_step=enforcer.reapply)``). ``remove()`` (or leaving
    the ``with`` block) drops the hooks; the weights stay as they are.
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor]):
        self.model = model
        self.masks = dict(masks)
        params = check_masks(model, self.masks)
        apply_masks(model, self.masks)
        self._handles = [
            param.register_hook(lambda grad, mask=self.masks[name]: grad.masked_fill(~mask, 0.0))
            for name, param in params.items()
        ]

    def reapply(self) -> None:
        apply_masks(self.model, self.masks)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> MaskEnforcer:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def sparsity_schedule(final: float, steps: int, initial: float = 0.0, kind: str = "cubic") -> list[float]:
    """Target sparsity after each of ``steps`` prune-retrain rounds, ending at ``final``.

    ``"cubic"`` is Zhu & Gupta 2017, ``s_t = final + (initial - final) * (1 - t/steps)**3``: it
    prunes hard while many redundant weights remain and gently near the end. ``"linear"`` spaces
    the targets evenly.
    """
    _check_sparsity(final, "final sparsity")
    _check_sparsity(initial, "initial sparsity")
    if initial > final:
        raise ConfigError(f"initial sparsity {initial} is above the final sparsity {final}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"pruning steps must be an integer >= 1, got {steps!r}")
    if kind == "cubic":
        return [final + (initial - final) * (1 - t / steps) ** 3 for t in range(1, steps + 1)]
    if kind == "linear":
        return [initial + (final - initial) * t / steps for t in range(1, steps + 1)]
    raise ConfigError(f"sparsity schedule must be 'cubic' or 'linear', got {kind!r}")


@torch.no_grad()
def sparsity_report(model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None) -> dict:
    """Per prunable weight and in total: ``{"layers": [{layer, params, nonzero, sparsity}], "total": {...}}``.

    ``nonzero`` counts weights that are non-zero and not masked, i.e. what the pruned model keeps.
    """
    masks = dict(masks or {})
    check_masks(model, masks)
    rows = []
    for name, w in prunable_parameters(model).items():
        kept = w != 0
        if name in masks:
            kept &= masks[name]
        nonzero = int(kept.sum())
        rows.append({"layer": name, "params": w.numel(), "nonzero": nonzero, "sparsity": 1 - nonzero / w.numel()})
    params, nonzero = sum(r["params"] for r in rows), sum(r["nonzero"] for r in rows)
    return {"layers": rows, "total": {"params": params, "nonzero": nonzero, "sparsity": 1 - nonzero / params}}
