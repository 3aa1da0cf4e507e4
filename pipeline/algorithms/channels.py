"""Structured channel pruning with Torch-Pruning (Fang et al., DepGraph, CVPR 2023).

Removing output channels of one layer forces the same removal in every layer coupled to it: the
next layer's input channels, BatchNorm, residual adds, depthwise convolutions, concatenations.
Torch-Pruning's dependency graph finds those groups; the layers come out genuinely smaller (new
shapes, not masks), so the exported graph is smaller and faster. The output layer is never pruned,
so the class count is kept.

- :class:`ChannelSpec`: how much to remove (one ratio, or per layer name / type), by which importance
  (``l2``/``l1`` filter magnitude, ``taylor`` first-order loss change, ``bn`` BatchNorm scale,
  ``lamp``, ``fpgm``), ranked per layer or globally, channel counts rounded down to a multiple of
  ``round_to`` (SIMD-friendly widths).
- :class:`ChannelPruner`: prunes a model in place, one schedule step at a time (iterative pruning:
  the caller retrains between steps). Unstructured pruning masks from earlier stages are carried
  along: every mask is sliced exactly like its weight.
- :func:`prune_channels`: one-shot pruning of a copy (distill derives its students with it).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from edgec.base.errors import ConfigError
from edgec.modules import ConcatHeads

from .pruning import LAYER_TYPES, check_masks, per_layer, prunable_layers, sparsity_schedule, weight_name

IMPORTANCE = ("l2", "l1", "taylor", "bn", "lamp", "fpgm")


def _importance(name: str):
    return {
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "taylor": lambda: tp.importance.GroupTaylorImportance(),
        "bn": lambda: tp.importance.BNScaleImportance(),
        "lamp": lambda: tp.importance.LAMPImportance(p=2),
        "fpgm": lambda: tp.importance.FPGMImportance(p=2),
    }[name]()


@dataclass(frozen=True)
class ChannelSpec:
    """What to remove.

    ``ratio``: the fraction of output channels removed from every prunable layer, or per module
    name / layer type (``{"conv": 0.5, "fc1": 0.25}``; layers named by neither keep their
    channels). With ``global_ranking`` one importance ranking over all layers removes ``ratio`` of
    all channels (layers then lose different fractions, each at most ``max_ratio``).
    ``round_to``: kept channel counts are rounded down to a multiple of it, never below one
    multiple (a layer narrower than ``round_to`` keeps its channels).
    """

    ratio: float | Mapping[str, float]
    importance: str = "l2"
    global_ranking: bool = False
    round_to: int | None = None
    max_ratio: float = 0.9

    def __post_init__(self):
        values = self.ratio.values() if isinstance(self.ratio, Mapping) else [self.ratio]
        for r in values:
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
                raise ConfigError(f"channel pruning ratio must be a number in [0, 1), got {r!r}")
        if isinstance(self.ratio, Mapping) and not self.ratio:
            raise ConfigError("per-layer channel pruning ratios: the table is empty")
        if self.importance not in IMPORTANCE:
            raise ConfigError(f"channel importance must be one of {', '.join(IMPORTANCE)}, got {self.importance!r}")
        if self.global_ranking and isinstance(self.ratio, Mapping):
            raise ConfigError("global channel ranking takes one ratio, not a per-layer table")
        if self.round_to is not None and (isinstance(self.round_to, bool) or not isinstance(self.round_to, int)
                                          or self.round_to < 1):
            raise ConfigError(f"round_to must be an integer >= 1, got {self.round_to!r}")
        if not 0 < self.max_ratio < 1:
            raise ConfigError(f"max_ratio must be in (0, 1), got {self.max_ratio!r}")


def output_layers(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """The Linear/Conv layers whose outputs are the model's outputs: never pruned.

    The last executed Linear/Conv whose output width (dimension 1) is the model output's, plus every
    layer inside a :class:`ConcatHeads` (the task heads of a multi-task model)."""
    executed: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda m, i, o: executed.append(m)) for m in model.modules()
             if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    width = out.shape[1] if out.dim() > 1 else out.shape[-1]
    fixed = [m for m in executed if getattr(m, "out_features", getattr(m, "out_channels", None)) == width][-1:]
    for heads in (m for m in model.modules() if isinstance(m, ConcatHeads)):
        fixed += [m for m in heads.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and m not in fixed]
    return fixed


class _Pruner(tp.pruner.BasePruner):
    def _round_to(self, n_pruned, current_channels, round_to):
        # Torch-Pruning rounds the kept channels down to a multiple of round_to, down to zero (and
        # then skips the layer); keep at least one multiple instead, so a layer is never left out
        # only because ratio x width fell below round_to.
        keep = current_channels - n_pruned
        keep = max(keep - keep % round_to, min(round_to, current_channels))
        return max(current_channels - keep, 0)


def _scheduler(kind: str) -> Callable[[float, int], list[float]]:
    def schedule(ratio: float, steps: int) -> list[float]:
        return [0.0] + (sparsity_schedule(ratio, steps, kind=kind) if ratio > 0 else [0.0] * steps)
    return schedule


def channel_widths(model: nn.Module) -> dict[str, int]:
    """Output channels (features) of every Conv/Linear layer, by module name."""
    return {name: getattr(m, "out_channels", getattr(m, "out_features", 0)) for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))}


class ChannelPruner:
    """Removes channels from ``model`` **in place**, ``steps`` times along a ``schedule`` (linear or
    cubic, as magnitude pruning) to reach ``spec``'s ratios: call :meth:`step` once per step and
    retrain in between. ``masks`` (parameter name -> bool tensor, True = keep) from earlier
    unstructured pruning are sliced with their weights; read them back from :attr:`masks`.

    Raises ConfigError when the dependency graph cannot trace the model or a per-layer table names
    an unknown layer, the output layer, or coupled layers (one residual add, one depthwise chain)
    with different ratios: coupled layers lose the same channels."""

    def __init__(self, model: nn.Module, example: torch.Tensor, spec: ChannelSpec, *, steps: int = 1,
                 schedule: str = "linear", masks: Mapping[str, torch.Tensor] | None = None, setting: str = "ratio"):
        self.model, self.spec = model, spec
        self.masks = dict(masks or {})
        check_masks(model, self.masks)
        if spec.importance == "bn" and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise ConfigError(f"importance \"bn\" ranks channels by BatchNorm scale, but {type(model).__name__} has no "
                              "BatchNorm layer; use \"l2\" or \"taylor\"")
        for p in model.parameters():
            p.requires_grad_(True)  # the dependency graph is traced through autograd
        self.ignored = output_layers(model, example)
        names = {m: n for n, m in model.named_modules()}
        ratio_dict: dict[nn.Module, float] = {}
        if isinstance(spec.ratio, Mapping):
            resolved = per_layer(model, dict(spec.ratio), setting)
            modules = dict(model.named_modules())
            for key in spec.ratio:
                if key not in LAYER_TYPES and modules.get(key) in self.ignored:
                    raise ConfigError(f"{setting}: {key!r} is an output layer (its outputs are the model's); it keeps its "
                                      "channels, remove it from the table")
            by_param = {weight_name(name): modules[name] for name in prunable_layers(model)}
            ratio_dict = {by_param[param]: r for param, r in resolved.items() if by_param[param] not in self.ignored}
        try:
            self.pruner = _Pruner(
                model, example, importance=_importance(spec.importance), global_pruning=spec.global_ranking,
                pruning_ratio=0.0 if isinstance(spec.ratio, Mapping) else float(spec.ratio),
                pruning_ratio_dict=ratio_dict or None, max_pruning_ratio=spec.max_ratio if spec.global_ranking else 1.0,
                iterative_steps=steps, iterative_pruning_ratio_scheduler=_scheduler(schedule),
                ignored_layers=self.ignored, round_to=spec.round_to,
            )
        except ConfigError:
            raise
        except Exception as e:  # the dependency graph could not trace the model
            raise ConfigError(f"structured pruning could not analyse {type(model).__name__} ({type(e).__name__}: {e})") from None
        if ratio_dict:
            self._check_coupled(ratio_dict, names, setting)
        self.steps, self.done = steps, 0

    def _check_coupled(self, ratios: dict[nn.Module, float], names: dict[nn.Module, str], setting: str) -> None:
        DG = self.pruner.DG
        for group in DG.get_all_groups(ignored_layers=self.pruner.ignored_layers, root_module_types=self.pruner.root_module_types):
            named = {}
            for dep, _ in group:
                m = dep.target.module
                if m in ratios and DG.is_out_channel_pruning_fn(dep.handler):
                    named[names[m]] = ratios[m]
            if len(set(named.values())) > 1:
                raise ConfigError(
                    f"{setting}: {', '.join(f'{n} = {r}' for n, r in named.items())}: these layers are coupled (a residual "
                    "add, a depthwise convolution or a concatenation joins their channels), so they lose the same "
                    "channels; give them one ratio")

    def step(self) -> int:
        """One schedule step; returns how many dependency groups lost channels. For ``taylor``
        importance, the gradients of the loss must be in the parameters' ``.grad`` (see
        :func:`accumulate_gradients`)."""
        if self.done >= self.steps:
            raise ConfigError(f"channel pruning has only {self.steps} step(s)")
        self.done += 1
        params = dict(self.model.named_parameters())
        pruned = 0
        try:
            for group in self.pruner.step(interactive=True):
                if not len(group[0].idxs):
                    continue  # round_to left this group as it is
                if pruned == 0:
                    # Every group's importance has been computed (Torch-Pruning ranks all groups before
                    # it yields the first): carry the masks in .grad, which each pruning function
                    # slices exactly like its parameter.
                    for name, p in params.items():
                        p.grad = self.masks[name].to(p.dtype) if name in self.masks else None
                group.prune()
                pruned += 1
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(
                f"structured pruning failed on {type(self.model).__name__} ({type(e).__name__}: {e}); Torch-Pruning could not "
                "follow the channels through it (a reshape of the channel axis, such as a channel shuffle, is a known limit)"
            ) from None
        if pruned:
            params = dict(self.model.named_parameters())
            self.masks = {name: params[name].grad > 0.5 for name in self.masks}
        for p in self.model.parameters():
            p.grad = None
        return pruned


def accumulate_gradients(model: nn.Module, batches, loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """Sum the loss gradients over ``batches`` of (inputs, targets) into ``.grad`` (Taylor importance).
    The model is in eval mode: BatchNorm statistics do not move."""
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        for x, y in batches:
            loss_fn(model(x), x, y).backward()
    finally:
        model.train(was_training)


@torch.no_grad()
def model_cost(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates of the Conv/Linear layers for one sample, and the parameter count."""
    macs = [0]

    def count(m, inputs, out):
        if isinstance(m, nn.Linear):
            macs[0] += out[:1].numel() * m.in_features
        else:  # Conv1d / Conv2d: every output element sums in_channels / groups x kernel products
            macs[0] += out[:1].numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    was_training = model.training
    try:
        model.eval()(example[:1])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {"macs": int(macs[0]), "params": int(sum(p.numel() for p in model.parameters()))}


def channel_report(before: Mapping[str, int], model: nn.Module, cost_before: Mapping[str, int],
                   example: torch.Tensor) -> dict[str, Any]:
    """What channel pruning removed: per layer output channels before -> after, MACs and parameters."""
    after = channel_widths(model)
    cost = model_cost(model, example)
    return {
        "layers": {name: [before[name], after.get(name, before[name])] for name in before},
        "macs": [cost_before["macs"], cost["macs"]],
        "params": [cost_before["params"], cost["params"]],
        "macs_removed": 1 - cost["macs"] / cost_before["macs"] if cost_before["macs"] else 0.0,
    }


def prune_channels(
    model: nn.Module,
    example: torch.Tensor,
    ratio: float,
    *,
    importance: str = "l2",
    global_pruning: bool = False,
    round_to: int | None = None,
) -> nn.Module:
    """A copy of ``model`` with ``ratio`` of the channels of every prunable layer removed."""
    spec = ChannelSpec(ratio, importance=importance, global_ranking=global_pruning, round_to=round_to)
    pruned = copy.deepcopy(model).eval()
    for p in pruned.parameters():
        p.requires_grad_(True)
    if ratio == 0:
        return pruned
    ChannelPruner(pruned, example, spec).step()
    return pruned
