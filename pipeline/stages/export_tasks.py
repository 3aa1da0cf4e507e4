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

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgec.calibration.samples import calibration_digest, select_calibration_indices
from edgec.errors import ConfigError, RunError
from edgec.targets.onnx_export import export_onnx

from ..algorithms.continual import encode_task_models, task_model
from ..algorithms.piggyback import encode_masked_models
from ..algorithms.transport_codec import encode_transport
from ..extensions import PACKNET_EXT, PIGGYBACK_EXT, TASKS_EXT
from ..manifest import create_manifest, write_manifest
from ..parity import parity_problems

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


def run_tasks(stage, ckpt, ctx, out_dir: Path, precision: str, compare, ondevice: Path, runner_template: Path,
              runtime_of_format: dict) -> dict[str, Any]:
    cfg, target = stage.config, ctx.target
    state = ckpt.extensions[TASKS_EXT]
    order = state["order"]
    datas = task_datasets(state, ctx.datasets, ctx.data)
    first = datas[order[0]]
    piggyback = is_piggyback(ckpt.extensions)
    own_files = is_packnet(ckpt.extensions) or piggyback  # a model file per task
    model = ckpt.build(ctx.trust)
    fmt = target.format
    runtime_name = runtime_of_format[fmt]
    top_file = f"model.{fmt}"

    per_task = max(1, cfg.calibration.samples // len(order))
    calib = {}
    for name, d in datas.items():
        idx = select_calibration_indices(d.y_train, min(per_task, len(d.y_train)), seed=0)
        calib[name] = d.to_input(d.x_train[idx])
    calibration = np.concatenate([calib[t] for t in order])
    example = torch.from_numpy(calibration[:1])

    models = {t: (task_model(model, ckpt.extensions, t) if own_files else model) for t in order}
    files = {t: (top_file if (not own_files or (t == order[-1] and not piggyback)) else f"model.{t}.{fmt}")
             for t in order}
    exported = {}
    if piggyback:  # the base of the payload: the backbone every mask selects from, calibrated on every task
        exported[top_file] = stage._convert(model, example, out_dir / top_file, precision, calibration, fmt)
    for t in order:
        if files[t] in exported:
            continue
        exported[files[t]] = stage._convert(models[t], example, out_dir / files[t], precision,
                                            calib[t] if own_files else calibration, fmt)
    extra_files = []
    if target.fp32_fallback and precision != "fp32":
        export_onnx(model if piggyback else models[order[-1]], example, out_dir / "model.fp32.onnx", precision="fp32")
        extra_files.append("model.fp32.onnx")

    from edgec.ondevice.runtimes import open_model

    metrics, outputs_of, refs_of = {}, {}, {}
    for t in order:
        d, (a, b) = datas[t], state["tasks"][t]["columns"]
        x_test = d.to_input(d.x_test)
        with torch.no_grad():
            ref = models[t](torch.from_numpy(x_test)).numpy()
        ex = exported[files[t]]
        runner = open_model(str(out_dir / files[t]), runtime_name, io_meta={"input": ex.inputs[0], "output": ex.outputs[0]})
        out = runner.run_model_input(x_test)
        runner.close()
        metrics[t] = compare(ref[:, a:b], out[:, a:b], d.y_test)
        outputs_of[t], refs_of[t] = out, ref
    problems = [f"task {t!r}: {p}" for t in order for p in parity_problems(metrics[t], target.budgets)]
    if problems:
        raise RunError("exported model does not match the reference for " + "; ".join(problems) + "; no bundle written; "
                       + stage._remedies(precision, target, sum(len(d.y_train) for d in datas.values())))

    tasks_meta = []
    vec_inputs, vec_expected, vec_ref = [], [], []
    per_vectors = max(1, cfg.test_vectors // len(order))
    for t in order:
        d, (a, b) = datas[t], state["tasks"][t]["columns"]
        eval_idx = select_calibration_indices(d.y_test, min(cfg.eval_samples, len(d.y_test)), seed=0)
        eval_file = f"eval.{t}.npz"
        np.savez_compressed(out_dir / eval_file, x=d.x_test[eval_idx], y=d.y_test[eval_idx])
        m = metrics[t]
        m["eval_samples"] = int(len(eval_idx))
        m["eval_accuracy"] = float((outputs_of[t][eval_idx, a:b].argmax(1) == d.y_test[eval_idx]).mean())
        x_test = d.to_input(d.x_test)
        vec_idx = eval_idx[:per_vectors]
        entry = {"name": t, "labels": list(state["tasks"][t]["labels"]), "columns": [int(a), int(b)],
                 "data": state["tasks"][t]["data"], "method": state["tasks"][t]["method"], "model_file": files[t],
                 "eval_file": eval_file, "metrics": m}
        if own_files:
            # task t's own model: its own test vectors (the top-level ones are the last task's model)
            vec_file = f"test_vectors.{t}.npz"
            np.savez_compressed(out_dir / vec_file, inputs=x_test[vec_idx], expected=outputs_of[t][vec_idx],
                                reference=refs_of[t][vec_idx])
            ex = exported[files[t]]
            entry.update(test_vectors_file=vec_file, outputs=ex.outputs, atol=_atol(ex.outputs[0]))
        tasks_meta.append(entry)
        if not own_files or t == order[-1]:
            vec_inputs.append(x_test[vec_idx])
            vec_expected.append(outputs_of[t][vec_idx])
            vec_ref.append(refs_of[t][vec_idx])
    if own_files:  # the top-level model (the last task's; Piggyback's backbone) on inputs of every task
        top = exported[top_file]
        runner = open_model(str(out_dir / top_file), runtime_name, io_meta={"input": top.inputs[0], "output": top.outputs[0]})
        vec_inputs, vec_expected, vec_ref = [], [], []
        for t in order:
            d = datas[t]
            idx = select_calibration_indices(d.y_test, min(cfg.eval_samples, len(d.y_test)), seed=0)[:per_vectors]
            x = d.to_input(d.x_test[idx])
            vec_inputs.append(x)
            vec_expected.append(runner.run_model_input(x))
            with torch.no_grad():
                vec_ref.append((model if piggyback else models[order[-1]])(torch.from_numpy(x)).numpy())
        runner.close()
    np.savez_compressed(out_dir / "test_vectors.npz", inputs=np.concatenate(vec_inputs),
                        expected=np.concatenate(vec_expected), reference=np.concatenate(vec_ref))
    column_labels = [f"{t}:{label}" for t in order for label in state["tasks"][t]["labels"]]
    (out_dir / "labels.txt").write_text("\n".join(column_labels) + "\n")
    (out_dir / "requirements.txt").write_text("\n".join(target.requirements) + "\n")
    shutil.copytree(ondevice, out_dir / "edgec_ondevice", ignore=shutil.ignore_patterns("__pycache__", "run_bundle.py"))
    shutil.copy2(runner_template, out_dir / "run.py")

    top_bytes = (out_dir / top_file).read_bytes()
    transport = out_dir / f"{top_file}.edgt"
    codebooks = [c.detach().cpu().numpy() for c in ckpt.codebooks.values()]
    transport.write_bytes(encode_transport(top_bytes, codebooks))
    size = {
        "reference_fp32_bytes": 4 * sum(p.numel() for p in model.parameters()),
        "model_bytes": len(top_bytes),
        "transport_bytes": transport.stat().st_size,
        "transport_file": transport.name,
    }
    tasks_transport = None
    if piggyback or (own_files and len(order) > 1):
        others = {files[t]: (out_dir / files[t]).read_bytes() for t in (order if piggyback else order[:-1])}
        encode = encode_masked_models if piggyback else encode_task_models
        payload = encode(top_bytes, top_file, others)
        (out_dir / TASKS_TRANSPORT).write_bytes(payload)
        tasks_transport = {"file": TASKS_TRANSPORT, "bytes": len(payload), "base_file": top_file,
                           "model_files": list(others),
                           "total_bytes": size["transport_bytes"] + len(payload),
                           "models_bytes": len(top_bytes) + sum(len(v) for v in others.values())}
    stage._refuse_on_budget(size, target)

    aggregate = {
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
    manifest = create_manifest(
        target=target, runtime_name=runtime_name, precision=precision, model_file=top_file, extra_files=extra_files,
        exported=exported[top_file], data=first, metrics=aggregate, size=size,
        tasks={"tasks": tasks_meta, "shared_model": not own_files, "transport": tasks_transport})
    manifest["labels"] = column_labels
    write_manifest(out_dir, manifest)
    info = {
        "accuracy": aggregate["accuracy"],
        "reference_accuracy": aggregate["reference_accuracy"],
        "top1_agreement": aggregate["top1_agreement"],
        "max_abs_diff": aggregate["max_abs_diff"],
        "precision": precision,
        "params": sum(p.numel() for p in model.parameters()),
        "nonzero_params": int(sum(int(torch.count_nonzero(p)) for p in model.parameters())),
        "fp32_bytes": size["reference_fp32_bytes"],
        "model_bytes": size["model_bytes"],
        "transport_bytes": size["transport_bytes"] if tasks_transport is None else tasks_transport["total_bytes"],
        "calibration_digest": calibration_digest(calibration),
        "tasks": {t: {k: metrics[t][k] for k in ("accuracy", "reference_accuracy", "top1_agreement", "eval_accuracy")}
                  for t in order},
        "task_order": list(order),
    }
    if tasks_transport is not None:
        info["tasks_transport"] = tasks_transport
    return info


def _atol(output: dict[str, Any]) -> float:
    from ..manifest import _atol as atol

    return atol(output)
