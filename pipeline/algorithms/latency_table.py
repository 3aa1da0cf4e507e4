"""Measured latency of a model at narrower widths: the lookup table of latency-driven channel pruning.

NetAdapt (Yang et al., ECCV 2018) chooses where to remove channels by latency *measured* on the
target platform, not by FLOPs: on a CPU whose int8 kernels are bound by per-operator overhead, half
the MACs can cost the same time. The table here holds, for one model, input shape, target and
thread count, the p50 of the whole model exported for the target (TFLite int8 for rpi, ONNX Runtime
for desktop: the bundle's own format, precision and runtime) and timed in that runtime on this host,
or (``latency_device = "emulated-arm64"``, TFLite) on an emulated Raspberry Pi 4 core under qemu:

- ``dense_ms``: the model as it is;
- ``groups[g]["ms"][w]``: only channel group ``g`` (the layers Torch-Pruning couples: a residual
  add, a depthwise convolution) narrowed to the fraction ``w`` of its channels;
- ``narrowest_ms``: every group at the narrowest fraction (what width can buy here at most).

All of them are timed in one process in alternating rounds and each is recorded as the dense p50
times its median per-round ratio to the dense model (:class:`LatencyMeter`): timed one process after
another on a busy host (or under qemu), the same model measured 50-110 ms and the table was noise.

Conversions take seconds each, so the table is cached in the build's stage cache under a key of
everything that decides it: the architecture, the input shape, the target's format and precision,
the runtime and its version, the device (this CPU's model, or the emulated core) and the thread
count (:func:`table_key`).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgec.base.errors import ConfigError

from .channels import ChannelPruner, ChannelSpec
from .pruning import prunable_layers

TABLE_VERSION = 3  # 2: the device (host or emulated-arm64) is part of the key; 3: timed in paired rounds
TABLE_FILE = "latency_table.json"
CACHE_STAGE = "latency-table"
RUNTIME_OF_FORMAT = {"tflite": "tflite", "onnx": "onnxruntime"}
TIMING_RUNS, TIMING_SECONDS, WARMUP_RUNS = 10, 0.05, 5  # per round, on this host
ROUNDS = 7  # alternating rounds: the median of per-round ratios to the reference (5: identical models +-10%)


@dataclass(frozen=True)
class ChannelGroup:
    """Layers whose output channels are removed together; ``name`` is the first of them."""

    name: str
    layers: tuple[str, ...]
    channels: int


def channel_groups(model: nn.Module, example: torch.Tensor) -> list[ChannelGroup]:
    """The model's prunable channel groups (output layers excluded), in graph order."""
    probe = copy.deepcopy(model).eval()
    pruner = ChannelPruner(probe, example, ChannelSpec(0.0)).pruner
    names = {m: n for n, m in probe.named_modules()}
    layers = prunable_layers(probe)
    groups = []
    for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types):
        members = []
        for dep, _ in group:
            name = names.get(dep.target.module)
            if name in layers and pruner.DG.is_out_channel_pruning_fn(dep.handler) and name not in members:
                members.append(name)
        if members:
            root = dict(probe.named_modules())[members[0]]
            width = getattr(root, "out_channels", None) or getattr(root, "out_features")
            groups.append(ChannelGroup(members[0], tuple(members), int(width)))
    return groups


def narrowed(model: nn.Module, example: torch.Tensor, groups: Sequence[ChannelGroup], keep: dict[str, float], *,
             importance: str = "l2", round_to: int | None = None,
             masks: dict[str, torch.Tensor] | None = None) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A copy of ``model`` whose group ``g`` keeps the fraction ``keep[g]`` of its channels (the
    least important by ``importance`` go), and ``masks`` sliced to the new shapes."""
    pruned = copy.deepcopy(model).eval()
    by_name = {g.name: g for g in groups}
    ratios = {layer: 1.0 - keep[name] for name in keep if keep[name] < 1.0 for layer in by_name[name].layers}
    if not ratios:
        return pruned, dict(masks or {})
    pruner = ChannelPruner(pruned, example, ChannelSpec(ratios, importance=importance, round_to=round_to),
                           masks=masks or {}, setting="prune (latency table)")
    pruner.step()
    return pruned, pruner.masks


def runtime_identity(target) -> dict[str, Any]:
    """The runtime this target's bundles run in, with its version (part of the table's key)."""
    from edgec.ondevice.runtimes import import_runtime

    runtime = import_runtime(RUNTIME_OF_FORMAT[target.format])
    return {"name": runtime.name, "package": runtime.package, "version": runtime.version}


def host_identity() -> dict[str, Any]:
    from edgec.ondevice.machine import machine_info

    info = machine_info()
    return {"cpu": info["cpu"], "machine": info["machine"], "cpu_features": info["cpu_features"]}


def table_key(model: nn.Module, input_shape: Sequence[int], target, threads: int, widths: Sequence[float], *,
              importance: str, round_to: int | None, runtime: dict[str, Any], host: dict[str, Any],
              device: str = "host") -> dict[str, Any]:
    """Everything that decides the table (hashed into its cache key). The weights are not in it:
    latency depends on shapes, and ``importance`` only picks which channels go."""
    return {"version": TABLE_VERSION, "architecture": repr(model),
            "shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
            "input_shape": [int(d) for d in input_shape], "target": {"format": target.format, "precision": target.precision},
            "runtime": runtime, "host": host, "device": device, "threads": int(threads), "widths": [float(w) for w in widths],
            "round_to": round_to, "importance": importance}


def paired_p50s_ms(round_p50s: Sequence[Sequence[float]]) -> list[float]:
    """From ``[round][model]`` p50s: the first model's median p50, and each other model's as that times
    the median of its per-round ratio to the first (figures of one round share the machine's load)."""
    p50s = np.asarray(round_p50s, dtype=np.float64)
    reference = float(np.median(p50s[:, 0]))
    return [reference * float(np.median(p50s[:, i] / p50s[:, 0])) for i in range(p50s.shape[1])]


class LatencyMeter:
    """Times models exported as the target's bundles are (format, precision, runtime; batch 1) on this
    host or on ``emulated`` (an ``edgec.base.emulation.Arm64Python``; TFLite only), all of one call in
    one process in alternating rounds, so their ratios survive a busy machine (:func:`paired_p50s_ms`).
    Exports are kept under ``folder`` for the meter's life, one per architecture and set of weight
    shapes (latency depends on shapes, and a conversion costs 10-100 s): the reference timed again, or a
    group too narrow to lose a channel at ``round_to``, is not converted again."""

    def __init__(self, example: torch.Tensor, calibration: np.ndarray, target, threads: int, folder: Path, emulated=None):
        self.example, self.calibration, self.target, self.threads = example, calibration, target, threads
        self.folder, self.emulated = Path(folder), emulated
        self._exports: dict[str, tuple[Path, dict]] = {}  # architecture and shapes -> (file, io)

    def p50s_ms(self, models: Sequence[nn.Module]) -> list[float]:
        """p50 ms of each model; the first is the reference the others are timed against."""
        return paired_p50s_ms(self._rounds(models))

    def speedup(self, reference: nn.Module, candidate: nn.Module) -> dict[str, Any]:
        """``candidate``'s speedup over ``reference``, timed together in as many rounds as ``edgec bench
        --baseline`` times them: the per-round ratios' median, spread and lower confidence bound
        (``edgec.ondevice.paired.summarize_ratios``: the figure ``edgec check --min-speedup`` judges)."""
        from edgec.ondevice.paired import DEFAULT_ROUNDS, summarize_ratios

        rounds = np.asarray(self._rounds([reference, candidate], DEFAULT_ROUNDS), dtype=np.float64)
        return summarize_ratios(rounds[:, 0] / rounds[:, 1])

    def _rounds(self, models: Sequence[nn.Module], rounds: int = ROUNDS) -> list[list[float]]:
        exported = [self._export(m) for m in models]
        if self.emulated is not None:
            from edgec.base.emulation import emulated_round_p50s_ms

            return emulated_round_p50s_ms(self.emulated, [path for path, _ in exported], self.threads, rounds=rounds)
        return self._host_rounds(exported, rounds)

    def _export(self, model: nn.Module) -> tuple[Path, dict]:
        from edgec.base.quiet import native_logs_captured
        from edgec.targets.onnx_export import export_onnx
        from edgec.targets.tflite_export import export_tflite

        key = repr(model) + repr([(name, tuple(t.shape)) for name, t in model.state_dict().items()])
        if key not in self._exports:
            path = self.folder / f"model-{len(self._exports)}.{self.target.format}"
            export = export_tflite if self.target.format == "tflite" else export_onnx
            with native_logs_captured():
                done = export(model, self.example, path, precision=self.target.precision, calibration=self.calibration)
            self._exports[key] = (path, {"input": done.inputs[0], "output": done.outputs[0]})
        return self._exports[key]

    def _host_rounds(self, exported: list[tuple[Path, dict]], rounds: int) -> list[list[float]]:
        from edgec.ondevice.runtimes import open_model
        from edgec.ondevice.timing import summarize, timed_loop

        runners = [open_model(str(path), RUNTIME_OF_FORMAT[self.target.format], {"threads": self.threads}, io_meta=io)
                   for path, io in exported]
        try:
            steps = [runner.prepare(self.example.numpy()) for runner in runners]
            for step in steps:
                timed_loop(step, WARMUP_RUNS)
            rows = []
            for r in range(rounds):
                row = [0.0] * len(steps)
                for i in (range(len(steps)) if r % 2 == 0 else reversed(range(len(steps)))):
                    row[i] = float(summarize(timed_loop(steps[i], TIMING_RUNS, TIMING_SECONDS)[0])["p50"])
                rows.append(row)
        finally:
            for runner in runners:
                runner.close()
        return rows


Measure = Callable[[Sequence[nn.Module]], list[float]]


def build_table(model: nn.Module, example: torch.Tensor, groups: Sequence[ChannelGroup], widths: Sequence[float],
                measure: Measure, *, importance: str = "l2", round_to: int | None = None,
                progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Measure the table (see the module docstring); ``measure(models) -> p50 ms of each``, all timed
    together against the first (the dense model)."""
    if not groups:
        raise ConfigError("prune: the model has no channel group that can be narrowed (only output layers)")
    candidates = []
    for i, group in enumerate(groups):
        progress(f"latency table: narrowing group {i + 1}/{len(groups)} ({group.name}, {group.channels} channels)")
        candidates += [narrowed(model, example, groups, {group.name: w}, importance=importance, round_to=round_to)[0]
                       for w in widths]
    narrowest = {g.name: min(widths) for g in groups}
    candidates.append(narrowed(model, example, groups, narrowest, importance=importance, round_to=round_to)[0])
    progress(f"latency table: exporting {len(candidates) + 1} models (one conversion per shape), timing them together")
    dense_ms, *ms = measure([model, *candidates])
    table: dict[str, Any] = {"widths": [float(w) for w in widths], "dense_ms": dense_ms, "groups": {},
                             "narrowest_ms": ms[-1]}
    for i, group in enumerate(groups):
        table["groups"][group.name] = {"layers": list(group.layers), "channels": group.channels,
                                       "ms": {str(w): ms[i * len(widths) + j] for j, w in enumerate(widths)}}
    return table


def cached_table(cache, key_material: dict[str, Any], build: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """(table, served from the cache): ``build()`` once per key, kept in the build's stage cache."""
    from ..artifact import read_verified
    from ..cache import stable_hash

    if cache is None:
        return build(), False
    key = stable_hash(key_material)
    hit = cache.get(CACHE_STAGE, key)
    if hit is not None:
        return json.loads(read_verified(hit, TABLE_FILE)), True

    def write(out: Path) -> dict[str, Any]:
        (out / TABLE_FILE).write_text(json.dumps(build(), indent=1))
        return {"key": key}

    entry = cache.put(CACHE_STAGE, key, CACHE_STAGE, write)
    return json.loads(read_verified(entry, TABLE_FILE)), False


def best_speedup(table: dict[str, Any]) -> float:
    """What width buys here at most: dense p50 / every group at its narrowest."""
    return table["dense_ms"] / max(table["narrowest_ms"], 1e-9)
