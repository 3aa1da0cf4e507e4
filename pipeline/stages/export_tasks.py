"""export for a multi-task model (the ``learn`` stage's ``tasks`` extension): one bundle, every task.

* Shared backbone (finetune, features, joint, lwf, ewc): ONE model file computes every task's head in
  one invoke; the manifest's ``tasks`` section says which output columns belong to which task.
* PackNet: a model file per task (task k's model uses the weights of tasks <= k; every file has the
  same graph and the same per-channel weight scales), the last task's being ``model.<ext>``. The
  transport payload of ``model.<ext>`` is as for any bundle; ``model.tasks.edgt`` adds every other
  task's file as a per-byte task level (which task's model a weight byte first appears in, stored
  in order of the weight's magnitude) plus a residual for the bytes masking does not explain
  (biases, activation scales). A device downloads both, ``edgec_ondevice.tasks`` rebuilds every
  file byte for byte, and N tasks ship in about one model's bytes.
* Piggyback: a model file per task (the frozen backbone masked by the task's mask), and
  ``model.<ext>`` is the unmasked backbone (with every head), which no task runs: it is the base
  that ``model.tasks.edgt`` rebuilds every task's file from, with one bit per weight byte per task
  (kept or zero; every task keeps each channel's largest weight, so the int8 scales are the
  backbone's) plus the residual for biases and activation scales.

Every task is evaluated on its own test split in the real runtime beside the torch reference (its
own columns, its own model) and the refuse-to-ship gate applies to each task. Calibration samples
are class-stratified from every task's train split (PackNet: each task's model from its own task).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgec.calibration.samples import calibration_digest, select_calibration_indices
from edgec.base.errors import ConfigError

from ..algorithms.continual import encode_task_models, task_model
from ..algorithms.piggyback import encode_masked_models
from ..bundle import write_bundle, write_eval_set, write_fp32_fallback, write_test_vectors
from ..extensions import PACKNET_EXT, PIGGYBACK_EXT, TASKS_EXT
from ..manifest import create_manifest, output_atol
from ..parity import enforce_parity, measure_parity
from .export_conversion import Conversion

TASKS_TRANSPORT = "model.tasks.edgt"


def task_datasets(state: dict, datasets, fallback=None) -> dict:
    """Each task's data set (by the name its learn stage recorded); ConfigError naming a missing one."""
    out = {}
    for name in state["order"]:
        data_name = state["tasks"][name]["data"]
        d = (datasets or {}).get(data_name)
        if d is None and fallback is not None and data_name == "main":
            d = fallback
        if d is None:
            raise ConfigError(f"export: task {name!r} was learned on data {data_name!r}, which this build does not load; "
                              f"declare it ([[tasks]] name = {name!r}, data = {data_name!r}) so every task is evaluated")
        if getattr(d, "task", "classification") != "classification":
            raise ConfigError(f"export: task {name!r} reads {d.name}, which is not a classification data set; a "
                              "multi-task bundle ships classification tasks only: export a model per task instead")
        out[name] = d
    first = out[state["order"][0]]
    for name, d in out.items():
        if (d.input_shape, d.scale, d.offset, str(d.x_test.dtype)) != (first.input_shape, first.scale, first.offset,
                                                                       str(first.x_test.dtype)):
            raise ConfigError(f"export: task {name!r} preprocesses its inputs differently from task {state['order'][0]!r}; "
                              "one bundle has one preprocessing")
    return out


def is_packnet(extensions) -> bool:
    state = extensions[TASKS_EXT]
    pk = extensions.get(PACKNET_EXT) or {}
    return bool(pk.get("tasks")) and list(pk["tasks"]) == list(state["order"])


def is_piggyback(extensions) -> bool:
    state = extensions[TASKS_EXT]
    pg = extensions.get(PIGGYBACK_EXT) or {}
    return bool(pg.get("tasks")) and list(pg["tasks"]) == list(state["order"])


@dataclass(frozen=True)
class _Tasks:
    """The multi-task model to export: its tasks in order, their data, and which model file serves each."""

    state: dict
    datas: dict
    model: torch.nn.Module  # the whole network (Piggyback: the unmasked backbone)
    models: dict  # task -> the model that computes it (PackNet, Piggyback: the task's own; else the whole)
    files: dict  # task -> its model file
    top_file: str  # model.<ext>: the last task's model (Piggyback: the backbone)
    own_files: bool  # a model file per task (PackNet, Piggyback)
    piggyback: bool

    @property
    def order(self) -> list[str]:
        return self.state["order"]

    def columns(self, t: str) -> tuple[int, int]:
        a, b = self.state["tasks"][t]["columns"]
        return a, b

    @property
    def top_model(self) -> torch.nn.Module:
        return self.model if self.piggyback else self.models[self.order[-1]]


def _tasks(ckpt, ctx) -> _Tasks:
    state = ckpt.extensions[TASKS_EXT]
    order, fmt = state["order"], ctx.target.format
    piggyback = is_piggyback(ckpt.extensions)
    own_files = is_packnet(ckpt.extensions) or piggyback
    model = ckpt.build(ctx.trust)
    top_file = f"model.{fmt}"
    return _Tasks(
        state=state, datas=task_datasets(state, ctx.datasets, ctx.data), model=model,
        models={t: (task_model(model, ckpt.extensions, t) if own_files else model) for t in order},
        files={t: (top_file if (not own_files or (t == order[-1] and not piggyback)) else f"model.{t}.{fmt}")
               for t in order},
        top_file=top_file, own_files=own_files, piggyback=piggyback)


def run_tasks(conversion: Conversion, ckpt, ctx, out_dir: Path) -> dict[str, Any]:
    cfg, target = conversion.config, ctx.target
    tasks = _tasks(ckpt, ctx)
    order = tasks.order
    per_task = max(1, cfg.calibration.samples // len(order))
    calib = {t: d.to_input(d.x_train[select_calibration_indices(d.y_train, min(per_task, len(d.y_train)), seed=0)])
             for t, d in tasks.datas.items()}
    calibration = np.concatenate([calib[t] for t in order])
    example = torch.from_numpy(calibration[:1])
    exported = {}
    if tasks.piggyback:  # the base of the payload: the backbone every mask selects from, calibrated on every task
        exported[tasks.top_file] = conversion.convert(tasks.model, example, out_dir / tasks.top_file, calibration)
    for t in order:
        if tasks.files[t] not in exported:
            exported[tasks.files[t]] = conversion.convert(tasks.models[t], example, out_dir / tasks.files[t],
                                                          calib[t] if tasks.own_files else calibration)
    extra_files = write_fp32_fallback(out_dir, tasks.top_model, example, target, conversion.precision)
    metrics, outputs_of, refs_of = _evaluate(conversion, tasks, exported, out_dir, target)
    tasks_meta = _write_eval_files(conversion, tasks, exported, out_dir, metrics, outputs_of, refs_of)
    payload = _write_tasks_payload(tasks, out_dir)
    column_labels = [f"{t}:{label}" for t in order for label in tasks.state["tasks"][t]["labels"]]
    aggregate = _aggregate(metrics, order)
    transport = {}

    def manifest(size: dict[str, Any]) -> dict[str, Any]:
        if payload is not None:
            transport.update(payload, total_bytes=size["transport_bytes"] + payload["bytes"])
        return create_manifest(
            target=target, converter=conversion.converter, precision=conversion.precision.name,
            model_file=tasks.top_file, extra_files=extra_files, exported=exported[tasks.top_file],
            data=tasks.datas[order[0]], metrics=aggregate, size=size, labels=column_labels,
            tasks={"tasks": tasks_meta, "shared_model": not tasks.own_files, "transport": transport or None})

    size = write_bundle(out_dir, target=target, labels=column_labels, model_file=tasks.top_file,
                        codebooks=[c.detach().cpu().numpy() for c in ckpt.codebooks.values()],
                        reference_fp32_bytes=4 * sum(p.numel() for p in tasks.model.parameters()), manifest=manifest)
    info = {
        **{k: aggregate[k] for k in ("accuracy", "reference_accuracy", "top1_agreement", "max_abs_diff")},
        "precision": conversion.precision.name,
        "params": sum(p.numel() for p in tasks.model.parameters()),
        "nonzero_params": int(sum(int(torch.count_nonzero(p)) for p in tasks.model.parameters())),
        "fp32_bytes": size["reference_fp32_bytes"],
        "model_bytes": size["model_bytes"],
        "transport_bytes": transport["total_bytes"] if transport else size["transport_bytes"],
        "calibration_digest": calibration_digest(calibration),
        "tasks": {t: {k: metrics[t][k] for k in ("accuracy", "reference_accuracy", "top1_agreement", "eval_accuracy")}
                  for t in order},
        "task_order": list(order),
    }
    if transport:
        info["tasks_transport"] = transport
    return info


def _evaluate(conversion: Conversion, tasks: _Tasks, exported: dict, out_dir: Path, target):
    """Every task on its own test split, in the real runtime, beside its torch reference (its own
    columns, its own model); the parity gate applies to each. Returns (metrics, outputs, references)."""
    parities, outputs_of, refs_of = {}, {}, {}
    for t in tasks.order:
        d, (a, b) = tasks.datas[t], tasks.columns(t)
        x_test = d.to_input(d.x_test)
        with torch.no_grad():
            refs_of[t] = tasks.models[t](torch.from_numpy(x_test)).numpy()
        outputs_of[t] = conversion.run(out_dir / tasks.files[t], exported[tasks.files[t]], x_test)
        parities[t] = measure_parity(refs_of[t][:, a:b], outputs_of[t][:, a:b], d.y_test)
    enforce_parity(parities, target.budgets,
                   conversion.advice(target, sum(len(d.y_train) for d in tasks.datas.values())))
    return {t: p.as_dict() for t, p in parities.items()}, outputs_of, refs_of


def _write_eval_files(conversion, tasks: _Tasks, exported, out_dir: Path, metrics, outputs_of, refs_of) -> list[dict]:
    """Each task's eval set (and, with a model file per task, its test vectors), the bundle's test
    vectors; each task's figures into ``metrics``. Returns the manifest's ``tasks`` entries."""
    cfg, order = conversion.config, tasks.order
    tasks_meta, vectors = [], []
    per_vectors = max(1, cfg.test_vectors // len(order))
    for t in order:
        d, (a, b), spec = tasks.datas[t], tasks.columns(t), tasks.state["tasks"][t]
        eval_idx = select_calibration_indices(d.y_test, min(cfg.eval_samples, len(d.y_test)), seed=0)
        write_eval_set(out_dir, f"eval.{t}.npz", d.x_test[eval_idx], d.y_test[eval_idx])
        m = metrics[t]
        m["eval_samples"] = int(len(eval_idx))
        m["eval_accuracy"] = float((outputs_of[t][eval_idx, a:b].argmax(1) == d.y_test[eval_idx]).mean())
        vec_idx = eval_idx[:per_vectors]
        task_vectors = (d.to_input(d.x_test)[vec_idx], outputs_of[t][vec_idx], refs_of[t][vec_idx])
        entry = {"name": t, "labels": list(spec["labels"]), "columns": [int(a), int(b)], "data": spec["data"],
                 "method": spec["method"], "model_file": tasks.files[t], "eval_file": f"eval.{t}.npz", "metrics": m}
        if tasks.own_files:  # task t's own model: its own test vectors (the top-level ones are the last task's model)
            write_test_vectors(out_dir, f"test_vectors.{t}.npz", *task_vectors)
            outputs = exported[tasks.files[t]].outputs
            entry.update(test_vectors_file=f"test_vectors.{t}.npz", outputs=outputs, atol=output_atol(outputs[0]))
        tasks_meta.append(entry)
        if not tasks.own_files or t == order[-1]:
            vectors.append(task_vectors)
    if tasks.own_files:  # the top-level model (the last task's; Piggyback's backbone) on inputs of every task
        vectors = []
        for t in order:
            d = tasks.datas[t]
            idx = select_calibration_indices(d.y_test, min(cfg.eval_samples, len(d.y_test)), seed=0)[:per_vectors]
            x = d.to_input(d.x_test[idx])
            with torch.no_grad():
                reference = tasks.top_model(torch.from_numpy(x)).numpy()
            vectors.append((x, conversion.run(out_dir / tasks.top_file, exported[tasks.top_file], x), reference))
    write_test_vectors(out_dir, "test_vectors.npz", *(np.concatenate(part) for part in zip(*vectors)))
    return tasks_meta


def _write_tasks_payload(tasks: _Tasks, out_dir: Path) -> dict[str, Any] | None:
    """PackNet's task levels / Piggyback's bit masks (``model.tasks.edgt``) rebuilding every task's model
    file from ``model.<ext>``; its record for the manifest, less ``total_bytes`` (the bundle writer's)."""
    order = tasks.order
    if not (tasks.piggyback or (tasks.own_files and len(order) > 1)):
        return None
    top_bytes = (out_dir / tasks.top_file).read_bytes()
    others = {tasks.files[t]: (out_dir / tasks.files[t]).read_bytes()
              for t in (order if tasks.piggyback else order[:-1])}
    payload = (encode_masked_models if tasks.piggyback else encode_task_models)(top_bytes, tasks.top_file, others)
    (out_dir / TASKS_TRANSPORT).write_bytes(payload)
    return {"file": TASKS_TRANSPORT, "bytes": len(payload), "base_file": tasks.top_file, "model_files": list(others),
            "models_bytes": len(top_bytes) + sum(len(v) for v in others.values())}


def _aggregate(metrics: dict[str, dict[str, Any]], order: list[str]) -> dict[str, Any]:
    """The bundle's figures over its tasks: means of accuracies, the worst agreement, SNR and difference."""
    return {
        "reference_accuracy": float(np.mean([metrics[t]["reference_accuracy"] for t in order])),
        "accuracy": float(np.mean([metrics[t]["accuracy"] for t in order])),
        "top1_agreement": float(min(metrics[t]["top1_agreement"] for t in order)),
        "decided_agreement": float(min(metrics[t]["decided_agreement"] for t in order)),
        "logit_snr_db": float(min(metrics[t]["logit_snr_db"] for t in order)),
        "max_abs_diff": float(max(metrics[t]["max_abs_diff"] for t in order)),
        "test_samples": int(sum(metrics[t]["test_samples"] for t in order)),
        "eval_samples": int(sum(metrics[t]["eval_samples"] for t in order)),
        "eval_accuracy": float(np.mean([metrics[t]["eval_accuracy"] for t in order])),
    }
