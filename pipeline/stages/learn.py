"""learn: teach the model one more task without losing the ones it knows (task-incremental).

    [[tasks]]
    name = "low"
    data = "low"            # a named dataset: this task's samples and labels
    [[tasks]]
    name = "high"
    data = "high"

    [[stages]]
    kind = "learn"
    task = "low"
    method = "finetune"
    [[stages]]
    kind = "learn"
    task = "high"
    method = "lwf"          # finetune | features | joint | lwf | ewc | packnet | piggyback | icarl

Each task gets its own output head: the first learn stage replaces the model's output layer by
``ConcatHeads({task: head})`` (``edgec.modules``), later ones append a head, so one invoke computes
every task and each task owns a range of output columns. The per-task state (columns, labels, data
set, method; EWC Fishers and anchors; PackNet weight owners; Piggyback masks) lives in the checkpoint's
``extensions`` (namespaces ``tasks``, ``ewc``, ``packnet``, ``piggyback``); the export stage reads it to evaluate
and gate every task and to write the manifest's ``tasks`` section. Algorithms:
``algorithms/continual.py``, ``algorithms/piggyback.py``. After training, every task learned so far is
evaluated on its test split (one row of the forgetting matrix: ``info.task_accuracy``; regression:
``info.task_r2``).

Tasks (``pipeline/objectives.py``): classification and regression (each head outputs its task's
targets; the losses are the objective's: MSE on standardized targets, LwF keeps the old heads'
outputs by MSE instead of a softened KL, the EWC Fisher is the Gaussian one). ``joint`` and
``piggyback`` are for classification only, and reconstruction is refused: see :func:`refusal`.

``icarl`` is class-incremental instead (``algorithms/icarl.py``): one stage, one task, one head over
the task's classes, which arrive in ``class_steps``; rehearsal of ``memory`` exemplars per class and
distillation on the old classes. The exemplar memory is not kept after the stage.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from edgec.base.checkpoint import Checkpoint
from edgec.base.data import Dataset
from edgec.base.errors import ConfigError

from ..algorithms import continual as cl
from ..algorithms import icarl
from ..algorithms import piggyback as pb
from ..artifact import CHECKPOINT_FILE, Artifact
from ..extensions import EWC_EXT, PACKNET_EXT, PIGGYBACK_EXT, TASKS_EXT
from ..modelinfo import model_info
from ..objectives import objective_for
from ..stage import Probe, Stage, StageConfig, StageContext
from ..inference import accuracy
from ..training import OptimConfig, fit, resolve_device, seed_everything

MAIN = "main"
METHODS = ("finetune", "features", "joint", "lwf", "ewc", "packnet", "piggyback", "icarl")
NEEDS_OLD_DATA = ("joint",)
# keys that only one method reads: setting one with another method is an error, not a silent no-op
METHOD_KEYS = {
    "freeze": "finetune", "backbone_lr": "finetune",
    "lambda_old": "lwf", "temperature": "lwf", "warmup_epochs": "lwf",
    "ewc_lambda": "ewc", "ewc_mode": "ewc", "ewc_decay": "ewc", "fisher_samples": "ewc",
    "prune": "packnet", "retrain_epochs": "packnet",
    "old_samples": "joint",
    "mask_init": "piggyback", "mask_threshold": "piggyback", "mask_lr": "piggyback", "mask_keep": "piggyback",
    "task_biases": "piggyback",
    "class_steps": "icarl", "memory": "icarl", "distill": "icarl", "classifier": "icarl",
}
# methods that keep every earlier task exactly: each later task must use the same method
EXCLUSIVE = {"packnet": PACKNET_EXT, "piggyback": PIGGYBACK_EXT}
EXT_VERSION = 1


def refusal(method: str, task: str) -> str | None:
    """Why ``method`` cannot learn a task of kind ``task`` (None when it can)."""
    if task == "reconstruction":
        return (f"learn: method = \"{method}\" cannot learn task = \"reconstruction\": an autoencoder's output is its "
                "whole input, so tasks cannot own output columns (heads); train an autoencoder per task "
                "(train, or grow wider / deeper first)")
    if task != "classification" and method == "icarl":
        return (f"learn: method = \"icarl\" adds classes to a classifier; task = \"{task}\" has no classes: use "
                "finetune, features, lwf, ewc or packnet")
    if task == "regression" and method == "joint":
        return ("learn: method = \"joint\" trains every task's samples through one label space, which task = "
                "\"regression\" does not have; use finetune, features, lwf, ewc or packnet")
    if task == "regression" and method == "piggyback":
        return ("learn: method = \"piggyback\" is implemented for classification tasks only; for task = "
                "\"regression\" use packnet (also no forgetting) or finetune, features, lwf, ewc")
    return None


class LearnConfig(StageConfig, OptimConfig):
    task: str | None = Field(None, description="the task this stage learns (a [[tasks]] name); required")
    method: Literal["finetune", "features", "joint", "lwf", "ewc", "packnet", "piggyback", "icarl"] = Field(
        "finetune", description="finetune | features | joint | lwf | ewc | packnet | piggyback | icarl (see the README)")
    epochs: int = Field(10, ge=0, description="0 with head = \"keep\": adopt the output layer as this task's head untrained")
    patience: int = Field(10, ge=1)
    head: Literal["new", "keep"] = Field(
        "new", description="first learn stage only: \"keep\" makes the model's current output layer this task's head "
        "(its width must equal the task's classes; e.g. a model already trained for it), \"new\" replaces it")
    # finetune
    freeze: list[str] = Field(default_factory=list, description="finetune: module prefixes whose weights stay fixed")
    backbone_lr: float = Field(1.0, gt=0, le=1, description="finetune: learning-rate scale of the shared backbone")
    # lwf
    lambda_old: float = Field(1.0, ge=0, description="lwf: weight of the old heads' distillation term")
    temperature: float = Field(2.0, gt=0, description="lwf: softmax temperature T")
    warmup_epochs: int = Field(0, ge=0, description="lwf: epochs training the new head alone first (Li & Hoiem's warm-up)")
    # ewc
    ewc_lambda: float = Field(100.0, ge=0, description="ewc: penalty strength lambda")
    ewc_mode: Literal["separate", "online"] = Field("separate", description="ewc: a Fisher per task, or one running Fisher")
    ewc_decay: float = Field(1.0, gt=0, le=1, description="ewc online: F <- decay * F + F_task")
    fisher_samples: int = Field(1024, ge=1, description="ewc: training samples the Fisher is estimated on")
    # packnet
    prune: float = Field(0.5, ge=0, lt=1, description="packnet: fraction of this task's weights freed for later tasks")
    retrain_epochs: int = Field(2, ge=0, description="packnet: epochs retraining the kept weights after pruning")
    # piggyback
    mask_init: float = Field(1e-2, description="piggyback: initial mask score of every weight (Mallya et al.: 1e-2)")
    mask_threshold: float = Field(5e-3, description="piggyback: a weight is kept while its score is above this (5e-3)")
    mask_lr: float = Field(1e-4, gt=0, description="piggyback: Adam learning rate of the mask scores (the head uses lr)")
    mask_keep: float = Field(0.0, ge=0, description="piggyback: weight of the penalty sum(max(0, mask_init - score)) that "
                             "keeps weights in the mask (fewer dropped weights: a smaller bundle, lower accuracy)")
    task_biases: bool = Field(False, description="piggyback: each task also trains its own copy of the masked layers' "
                              "biases (a few bytes per task in the bundle)")
    # icarl (class-incremental)
    class_steps: list[list[int]] | None = Field(None, description="icarl: the task's classes in the order they arrive, "
                                                "e.g. [[0, 1], [2, 3]]; disjoint, covering every class")
    memory: int = Field(20, ge=0, le=10_000, description="icarl: exemplars kept per class (herding); 0: no rehearsal")
    distill: float = Field(1.0, ge=0, description="icarl: weight of the old classes' logit distillation (0: none)")
    classifier: Literal["nme", "head"] = Field(
        "nme", description="icarl: \"nme\" makes the head the nearest-mean-of-exemplars classifier after each step; "
        "\"head\" keeps the trained head")
    # joint
    old_samples: int | None = Field(None, ge=1, description="joint: at most this many training samples per old task")

    @model_validator(mode="after")
    def _method_keys(self):
        for key in sorted(self.model_fields_set & set(METHOD_KEYS)):
            if METHOD_KEYS[key] != self.method:
                raise ValueError(f"{key} applies to method = \"{METHOD_KEYS[key]}\", not \"{self.method}\"")
        if self.method == "icarl" and not self.class_steps:
            raise ValueError("method = \"icarl\" needs class_steps = [[0, 1], [2, 3], ...] (the classes of each step)")
        if self.method == "icarl" and self.memory == 0 and self.classifier == "nme":
            raise ValueError("classifier = \"nme\" needs exemplars (memory >= 1); with memory = 0 set classifier = \"head\"")
        if self.head == "new" and self.epochs == 0:
            raise ValueError("epochs = 0 only adopts an existing head (head = \"keep\"); a new head needs training")
        return self


# --- task state -------------------------------------------------------------------------------------


def task_state(extensions) -> dict[str, Any]:
    """The ``tasks`` extension (a fresh one when absent): ``{"version", "heads" (ConcatHeads path),
    "order" [names], "tasks" {name: {head, columns [a, b], labels, data, method, stage}},
    "history" [{"stage", "task", "accuracy" {name: acc}}]}``."""
    state = extensions.get(TASKS_EXT)
    if state is None:
        return {"version": EXT_VERSION, "heads": None, "order": [], "tasks": {}, "history": []}
    if state.get("version") != EXT_VERSION:
        raise ConfigError(f"the model's task state has version {state.get('version')}; this edgec reads {EXT_VERSION}")
    return copy.deepcopy(state)


class _Digests:
    """Data set digests are content hashes of every split: compute each once."""

    def __init__(self):
        self._seen: dict[int, tuple[Dataset, str]] = {}

    def __call__(self, data: Dataset) -> str:
        hit = self._seen.get(id(data))
        if hit is None or hit[0] is not data:
            hit = (data, data.digest)
            self._seen[id(data)] = hit
        return hit[1]


_digest = _Digests()


def _resolve(datasets, tasks, fallback: Dataset, name: str, cfg_data: str | None) -> tuple[str, Dataset]:
    """(data set name, data set) of task ``name``: its [[tasks]] data, else the stage's ``data``."""
    declared = tasks.get(name) if tasks else None
    if declared is not None:
        if cfg_data is not None and cfg_data != declared:
            raise ConfigError(f"task {name!r} reads data {declared!r} ([[tasks]]) but the stage says data = {cfg_data!r}; "
                              "drop the stage's data key")
        data_name = declared
    elif tasks:
        raise ConfigError(f"task {name!r} is not declared; add [[tasks]] name = {name!r}, data = \"...\" "
                          f"(declared: {', '.join(tasks)})")
    else:
        data_name = cfg_data or MAIN
    if data_name in (datasets or {}):
        return data_name, datasets[data_name]
    return data_name, fallback


def _old_data(datasets, state, name: str) -> Dataset | None:
    entry = state["tasks"].get(name)
    return (datasets or {}).get(entry["data"]) if entry else None


class LearnStage(Stage):
    kind = "learn"
    version = 1
    writes_extensions = (TASKS_EXT, EWC_EXT, PACKNET_EXT, PIGGYBACK_EXT)
    Config = LearnConfig

    def reached_bundle(self, info: dict[str, Any], reached: list[str]) -> list[str]:
        return [*reached, f"{self.kind} ({self.id})"]  # a task head (and the method's weights) reach the bundle

    @classmethod
    def report_section(cls, doc, summary, manifest) -> None:
        from edgec.report.continual import forgetting_section

        forgetting_section(doc, summary, manifest)

    # --- plan time ---------------------------------------------------------------------------------

    def check(self, probe: Probe) -> Probe:
        cfg = self.config
        if not cfg.task:
            raise ConfigError("a learn stage needs task = \"NAME\" (one of the [[tasks]])")
        resolve_device(cfg.device)
        data_name, data = _resolve(probe.datasets, probe.tasks, probe.data, cfg.task, cfg.data)
        state = task_state(probe.extensions)
        self._check_plan(state, probe.extensions, probe.datasets, data, data_name)
        model = copy.deepcopy(probe.model)
        state = self._place_head(model, state, data, data_name, probe.sample(), seed=0)
        extensions = dict(probe.extensions)
        extensions[TASKS_EXT] = state
        if cfg.method in EXCLUSIVE:
            ext = EXCLUSIVE[cfg.method]
            marker = dict(extensions.get(ext) or {"tasks": []})
            marker["tasks"] = list(marker.get("tasks", [])) + [cfg.task]
            extensions[ext] = marker
        if cfg.method == "ewc":
            extensions[EWC_EXT] = {"mode": cfg.ewc_mode, "planned": True}
        arch = Checkpoint(probe.arch, model.state_dict()).with_model(model, probe.trust).arch
        return probe.evolve(model=model, arch=arch, extensions=extensions)

    def _check_plan(self, state, extensions, datasets, data: Dataset, data_name: str) -> None:
        cfg, tasks = self.config, state["tasks"]
        why = refusal(cfg.method, data.task)
        if why:
            raise ConfigError(why)
        if data.task != "classification" and "temperature" in cfg.model_fields_set:
            raise ConfigError(f"learn: temperature softens logits; task = \"{data.task}\" heads output values, "
                              "which lwf keeps by MSE: drop temperature")
        if cfg.method == "icarl":
            self._check_icarl(tasks, data)
        if cfg.task in tasks:
            have = tasks[cfg.task]["columns"][1] - tasks[cfg.task]["columns"][0]
            if have != data.num_classes:
                raise ConfigError(f"task {cfg.task!r} has a head of {have} classes but its data {data.name} has "
                                  f"{data.num_classes}")
            if cfg.head == "keep":
                raise ConfigError(f"head = \"keep\" adopts the output layer for a new task; task {cfg.task!r} already has a head")
        elif cfg.head == "keep" and tasks:
            raise ConfigError("head = \"keep\" applies to the first learn stage only (the model already has task heads)")
        self._check_exclusive(state, extensions)
        ewc = extensions.get(EWC_EXT)
        if cfg.method == "ewc" and ewc and ewc.get("mode") != cfg.ewc_mode:
            raise ConfigError(f"earlier ewc stages used ewc_mode = {ewc.get('mode')!r}; keep one mode per model")
        need = []
        if cfg.method in NEEDS_OLD_DATA:
            need = [t for t in state["order"] if t != cfg.task]
        elif cfg.method == "ewc":  # tasks learned by other methods have no Fisher yet: it is estimated on their data
            need = [t for t in state["order"] if t != cfg.task and tasks[t]["method"] != "ewc"]
        for name in need:
            old = _old_data(datasets, state, name)
            if old is None:
                why = ("joint trains on every task's data" if cfg.method == "joint" else
                       "ewc needs its Fisher, estimated on its data")
                raise ConfigError(f"method {cfg.method!r} needs the data of task {name!r} ({why}); declare it in [[tasks]] "
                                  "or choose lwf / ewc / packnet, which learn without old data")
            if old.input_shape != data.input_shape:
                raise ConfigError(f"task {name!r} has inputs {list(old.input_shape)}, task {cfg.task!r} "
                                  f"{list(data.input_shape)}; one model needs one input shape")

    def _check_icarl(self, tasks, data: Dataset) -> None:
        if self.config.task in tasks:
            raise ConfigError(f"task {self.config.task!r} already has a head; icarl learns all of a task's classes in one "
                              "stage (list every step in class_steps)")
        icarl.check_class_steps(self.config.class_steps, data.num_classes)
        icarl.check_memory_size(self.config.memory, data)

    def _check_exclusive(self, state, extensions) -> None:
        """PackNet and Piggyback keep every earlier task exactly, but only tasks learned their way."""
        cfg, tasks = self.config, state["tasks"]
        for method, ext in EXCLUSIVE.items():
            owned = list((extensions.get(ext) or {}).get("tasks", []))
            if cfg.method == method:
                others = [t for t in state["order"] if t not in owned]
                if others:
                    why = ("divides the weights between the tasks it learns" if method == "packnet" else
                           "freezes the backbone that every task's mask selects from")
                    raise ConfigError(f"{method} {why}; task {others[0]!r} was learned with "
                                      f"{tasks[others[0]]['method']}, so it is not protected. Learn every task with "
                                      f"{method}")
                if cfg.task in owned:
                    raise ConfigError(f"task {cfg.task!r} was already learned with {method}, which learns each task once")
            elif owned:
                raise ConfigError(f"tasks {', '.join(owned)} were learned with {method}; method {cfg.method!r} would "
                                  f"overwrite their frozen weights. Use method = \"{method}\" for later tasks too")

    def _place_head(self, model: nn.Module, state: dict, data: Dataset, data_name: str, example: torch.Tensor,
                    seed: int) -> dict:
        """Add (or find) the task's head on ``model`` in place; returns the updated state."""
        cfg = self.config
        if cfg.freeze:
            names = {n for n, _ in model.named_modules()}
            bad = [p for p in cfg.freeze if p not in names]
            if bad:
                raise ConfigError(f"freeze: the model has no module {bad[0]!r}; modules: "
                                  f"{', '.join(n for n in names if n and '.' not in n)}")
        if cfg.task not in state["tasks"]:
            if cfg.head == "keep":
                path = cl.find_output_layer(model, example)
                layer = cl.get_module(model, path)
                if layer.out_features != data.num_classes:
                    raise ConfigError(f"head = \"keep\": the output layer {path!r} has {layer.out_features} outputs but "
                                      f"task {cfg.task!r} has {data.num_classes} classes")
                cl.set_module(model, path, cl.ConcatHeads({cl.head_key(cfg.task): layer}))
            else:
                taken = {cl.head_key(t) for t in state["tasks"]}
                if cl.head_key(cfg.task) in taken:
                    raise ConfigError(f"task names {cfg.task!r} and another differ only in '-' / '_'; rename one")
                path = cl.add_task_head(model, example, cfg.task, data.num_classes, seed)
            state["heads"] = path
            state["order"].append(cfg.task)
            state["tasks"][cfg.task] = {"head": cl.head_key(cfg.task), "columns": None, "labels": list(data.labels),
                                        "data": data_name, "method": cfg.method, "stage": self.id}
        else:
            state["tasks"][cfg.task].update(method=cfg.method, stage=self.id)
        heads = state["heads"]
        if cl.find_heads(model) != heads:
            raise ConfigError(f"the model's task heads are expected at {heads!r}, but the model has none there")
        cols = cl.head_columns(model, heads)
        for name in state["order"]:
            state["tasks"][name]["columns"] = list(cols[state["tasks"][name]["head"]])
        return state

    def key_material(self, ctx: StageContext) -> dict[str, Any]:
        # the task's own data and every other task's (joint trains on them, EWC may estimate their
        # Fisher, every stage evaluates them): all of them decide this stage's output
        tasks = {name: _digest(ctx.datasets[d]) for name, d in sorted((ctx.tasks or {}).items()) if d in ctx.datasets}
        _, data = _resolve(ctx.datasets, ctx.tasks, ctx.data, self.config.task, self.config.data)
        return {**super().key_material(ctx), "data": _digest(data), "tasks": tasks,
                "device": resolve_device(self.config.device)}

    # --- run ---------------------------------------------------------------------------------------

    def run(self, source: Artifact, ctx: StageContext, out_dir: Path) -> dict[str, Any]:
        cfg = self.config
        data_name, data = _resolve(ctx.datasets, ctx.tasks, ctx.data, cfg.task, cfg.data)
        ckpt = source.checkpoint()
        model = ckpt.build(ctx.trust)
        state = task_state(ckpt.extensions)
        self._check_plan(state, ckpt.extensions, ctx.datasets, data, data_name)
        example = torch.from_numpy(data.to_input(data.x_train[:2]))
        state = self._place_head(model, state, data, data_name, example, seed=ctx.seed + 7919 * (len(state["order"]) + 1))
        extensions = {k: v for k, v in ckpt.extensions.items()}
        heads_path = state["heads"]
        cols = tuple(state["tasks"][cfg.task]["columns"])
        old_cols = {t: tuple(state["tasks"][t]["columns"]) for t in state["order"] if t != cfg.task}
        head = cl.get_module(model, heads_path)[cl.head_key(cfg.task)]
        backbone = [(n, p) for n, p in model.named_parameters() if not cl.under_any(n, [heads_path])]
        new_head = list(head.parameters())
        seed_everything(ctx.seed)
        extra: dict[str, Any] = {}
        training = cl.TaskTraining(
            model, data, cfg.task, cols, backbone, new_head, heads_path, state, extensions,
            train=lambda view, params, **kw: self._fit(view, data, ctx, params, **kw),
            task_loss=objective_for(data).loss, label=self.id)

        if cfg.method == "features":  # the backbone (BatchNorm statistics included) stays as it is
            result = self._fit(cl.TaskView(model, cols, cl.norm_modules(model)), data, ctx, new_head)
        elif cfg.method == "finetune":
            trainable = [p for n, p in backbone if not cl.under_any(n, cfg.freeze)]
            scale = cl.UpdateScale(trainable, cfg.backbone_lr)
            view = cl.TaskView(model, cols, cl.norm_modules(model, cfg.freeze) if cfg.freeze else ())
            task_loss = objective_for(data).loss

            def loss_fn(logits, x, y):
                scale.before()
                return task_loss(logits, x, y)

            result = self._fit(view, data, ctx, trainable + new_head, loss_fn=loss_fn, after_step=scale.after)
        elif cfg.method == "lwf":
            result = cl.learn_lwf(training, old_cols, lambda_old=cfg.lambda_old, temperature=cfg.temperature,
                                  warmup_epochs=cfg.warmup_epochs, device=resolve_device(cfg.device))
        elif cfg.method == "ewc":
            result = cl.learn_ewc(training, lambda name: _old_data(ctx.datasets, state, name), self._ewc_settings(ctx))
        elif cfg.method == "joint":
            result = self._joint(model, data, ctx, state, extensions, backbone, heads_path)
        elif cfg.method == "icarl":
            result, extra = self._icarl(model, data, ctx, cols, head)
        elif cfg.method == "piggyback":
            result, extra = self._piggyback(model, data, ctx, cols, heads_path, new_head, extensions)
        else:
            result, extra = cl.learn_packnet(training, prune=cfg.prune, retrain_epochs=cfg.retrain_epochs)
        if cfg.method == "ewc":
            cl.store_fisher(training, self._ewc_settings(ctx))

        info = model_info(cl.TaskView(model, cols), data)
        figure = info.get("metric", "accuracy")  # regression: "r2" (R^2 may be negative: not an accuracy)
        row = evaluate_tasks(model, state, extensions, ctx.datasets, {cfg.task: data})
        state["history"].append({"stage": self.id, "task": cfg.task, figure: row})
        extensions[TASKS_EXT] = state
        out = ckpt.with_model(model, ctx.trust)
        out.extensions = extensions
        out.save(out_dir / CHECKPOINT_FILE)
        info.update({"task": cfg.task, "method": cfg.method, f"task_{figure}": row, "tasks": list(state["order"]),
                     "columns": {t: state["tasks"][t]["columns"] for t in state["order"]}, **extra})
        if cfg.method in EXCLUSIVE:
            info[figure] = row.get(cfg.task, info[figure])  # task k's own (masked) model
        info.update(epochs_run=result.epochs_run, best_epoch=result.best_epoch)
        return info

    def _fit(self, view: nn.Module, data: Dataset, ctx: StageContext, params, *, epochs: int | None = None,
             label: str | None = None, **hooks):
        cfg = self.config if epochs is None else self.config.model_copy(update={"epochs": epochs, "patience": max(epochs, 1)})
        return fit(view, data, cfg, ctx.seed, ctx.console, label=label or self.id, parameters=params, **hooks)

    def _ewc_settings(self, ctx: StageContext) -> cl.EWCSettings:
        cfg = self.config
        return cl.EWCSettings(lam=cfg.ewc_lambda, mode=cfg.ewc_mode, decay=cfg.ewc_decay, samples=cfg.fisher_samples,
                              seed=ctx.seed, device=resolve_device(cfg.device))

    def _joint(self, model, data, ctx, state, extensions, backbone, heads_path):
        """Every task's data at once (the upper bound): each sample's loss is the cross-entropy over
        its own task's columns."""
        cfg = self.config
        parts = []
        for name in state["order"]:
            d = data if name == cfg.task else _old_data(ctx.datasets, state, name)
            cap = None if name == cfg.task else cfg.old_samples
            parts.append((name, d, state["tasks"][name]["columns"][0], cap))
        joint = concat_tasks(parts, seed=ctx.seed)
        width = state["tasks"][state["order"][-1]]["columns"][1]
        task_of_col = torch.zeros(width, dtype=torch.long)
        for i, name in enumerate(state["order"]):
            a, b = state["tasks"][name]["columns"]
            task_of_col[a:b] = i

        def loss_fn(logits, x, y):
            own = task_of_col.to(y.device)[y]
            mask = task_of_col.to(y.device)[None, :] == own[:, None]
            return F.cross_entropy(logits.masked_fill(~mask, float("-inf")), y)

        heads = cl.get_module(model, heads_path)
        params = [p for _, p in backbone] + [p for t in state["order"] for p in heads[state["tasks"][t]["head"]].parameters()]
        return fit(model, joint, cfg, ctx.seed, ctx.console, label=self.id, loss_fn=loss_fn, parameters=params)

    def _icarl(self, model, data, ctx, cols, head):
        cfg = self.config

        def fit_step(view, part, loss_fn, k):
            return self._fit(view, part, ctx, list(model.parameters()), loss_fn=loss_fn, label=f"{self.id} step {k}")

        result, figures = icarl.learn_class_steps(model, head, cols, data, cfg.class_steps, cfg.memory, cfg.distill,
                                                  cfg.classifier == "nme", fit_step, accuracy)
        return result, {"icarl": figures}

    def _piggyback(self, model, data, ctx, cols, heads_path, new_head, extensions):
        """Mask scores over the frozen backbone (moving at mask_lr), the task's own biases (with
        task_biases) and the new head (at lr)."""
        cfg = self.config
        names = cl.prunable_weights(model, heads_path)
        view = pb.MaskedTaskView(model, cols, names, cfg.mask_init, cfg.mask_threshold, cl.norm_modules(model),
                                 score_unit=cfg.mask_lr / cfg.lr, task_biases=cfg.task_biases)

        def loss_fn(logits, x, y):
            loss = F.cross_entropy(logits, y)
            return loss + cfg.mask_keep * view.keep_penalty() if cfg.mask_keep else loss

        result = self._fit(view, data, ctx, list(view.scores) + list(view.biases) + new_head, loss_fn=loss_fn)
        masks = view.masks()
        pg = extensions.get(PIGGYBACK_EXT) or {}
        packed = {n: pb.pack_mask(m) for n, m in masks.items()}
        pg = {"tasks": list(pg.get("tasks", [])) + [cfg.task], "masks": {**dict(pg.get("masks") or {}), cfg.task: packed},
              "biases": {**dict(pg.get("biases") or {}), **({cfg.task: view.task_biases()} if cfg.task_biases else {})}}
        extensions[PIGGYBACK_EXT] = pg
        kept = sum(int(m.sum()) for m in masks.values()) / max(1, sum(m.numel() for m in masks.values()))
        return result, {"piggyback": {"kept": kept, "masked_weights": int(sum(m.numel() for m in masks.values()))}}


# --- evaluation -----------------------------------------------------------------------------------------


def evaluate_tasks(model: nn.Module, state, extensions, datasets, known: dict[str, Dataset] | None = None) -> dict[str, float]:
    """Test accuracy (regression: R^2) of every task whose data is at hand, on its own columns (one
    forgetting-matrix row)."""
    row = {}
    for name in state["order"]:
        d = (known or {}).get(name) or (datasets or {}).get(state["tasks"][name]["data"])
        if d is None:
            continue
        view = cl.TaskView(cl.task_model(model, extensions, name), tuple(state["tasks"][name]["columns"]))
        if d.task == "classification":
            row[name] = accuracy(view, d.x_test, d.y_test, d)
        else:
            figures = objective_for(d).model_metrics(view)
            row[name] = figures[figures["metric"]]
    return row


def concat_tasks(parts, seed: int) -> Dataset:
    """One data set of several tasks' samples; labels become output columns (label + the task's
    first column). ``parts``: (name, data, first column, max training samples or None)."""
    first = parts[0][1]
    for name, d, _, _ in parts:
        if (d.scale, d.offset, d.x_train.dtype) != (first.scale, first.offset, first.x_train.dtype):
            raise ConfigError(f"joint: task {name!r} preprocesses its data differently from task {parts[0][0]!r}")
    rng = np.random.default_rng(seed)
    splits = {}
    for split in ("train", "val", "test"):
        xs, ys = [], []
        for _, d, start, cap in parts:
            x, y = getattr(d, f"x_{split}"), getattr(d, f"y_{split}")
            if split == "train" and cap is not None and cap < len(y):
                keep = np.sort(rng.choice(len(y), cap, replace=False))
                x, y = x[keep], y[keep]
            xs.append(x)
            ys.append(y + start)
        splits[f"x_{split}"], splits[f"y_{split}"] = np.concatenate(xs), np.concatenate(ys)
    labels = tuple(f"{name}:{label}" for name, d, _, _ in parts for label in d.labels)
    return dataclasses.replace(first, name="joint[" + ",".join(p[0] for p in parts) + "]", labels=labels, **splits)
