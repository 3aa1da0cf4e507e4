"""Class-incremental learning with a bounded exemplar memory: iCaRL (Rebuffi, Kolesnikov, Sperl,
Lampert, "iCaRL: Incremental Classifier and Representation Learning", CVPR 2017).

One classifier, one head; the classes arrive in steps (``class_steps = [[0, 1], [2, 3], ...]``, class
indices of the data set). Step k trains on the new classes' training samples plus the exemplar
memory (``memory`` samples of every class seen before):

* classification: cross-entropy over every class seen so far (the head's columns of classes not
  seen yet are masked out, so the head grows step by step);
* distillation on the old classes: ``T^2 * KL(softmax(old / T) || softmax(now / T))`` over the old
  classes' logits, ``old`` from a frozen copy of the model as it was before the step (T = 2);
* after the step, each new class's exemplars are chosen by herding: greedily, the training sample
  that brings the mean of the chosen ones' L2-normalised features (the head's input) closest to the
  class mean. Exemplars of earlier classes are kept (the memory grows by ``memory`` per class).

Differences from the paper: classification with the network's head (the bundle ships the network
alone), not the nearest mean of exemplars; softmax cross-entropy plus KL distillation instead of
per-class sigmoids (the PyCIL formulation, Zhou et al. 2021). With ``memory = 0`` and
``distill = 0`` a step is plain fine-tuning on the new classes (the benchmark's lower bound).
The memory lives only while the stage runs: it is not written to the checkpoint nor the bundle.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgec.base.data import Dataset
from edgec.base.errors import ConfigError

TEMPERATURE = 2.0
MAX_MEMORY_BYTES = 1 << 30  # the exemplar memory is held in RAM next to the data set: at most 1 GiB


def check_class_steps(steps: Sequence[Sequence[int]], num_classes: int) -> None:
    """Plan-time check: disjoint steps of class indices in range, covering every class of the data."""
    seen: set[int] = set()
    for k, step in enumerate(steps, start=1):
        if not step:
            raise ConfigError(f"learn: class_steps step {k} is empty; give each step at least one class index")
        for c in step:
            if not 0 <= c < num_classes:
                raise ConfigError(f"learn: class_steps step {k} has class {c}, not in 0..{num_classes - 1} (the data "
                                  f"has {num_classes} classes)")
            if c in seen:
                raise ConfigError(f"learn: class {c} is in two class_steps; each class arrives in one step")
            seen.add(c)
    missing = sorted(set(range(num_classes)) - seen)
    if missing:
        raise ConfigError(f"learn: class_steps leave classes {missing} out; the one head covers every class of the "
                          "data: add them to a step, or keep only the classes you want with [data.NAME] classes = [...]")


def check_memory_size(memory: int, data: Dataset) -> int:
    """Bytes the exemplar memory will take; refused above MAX_MEMORY_BYTES before anything is allocated."""
    sample = int(np.prod(data.input_shape)) * data.x_train.dtype.itemsize
    size = memory * data.num_classes * sample
    if size > MAX_MEMORY_BYTES:
        raise ConfigError(f"learn: memory = {memory} exemplars x {data.num_classes} classes x {sample} B per sample = "
                          f"{size / 2**20:.0f} MiB, over the {MAX_MEMORY_BYTES >> 20} MiB limit; lower memory")
    return size


def herding(features: torch.Tensor, m: int) -> np.ndarray:
    """Indices of ``min(m, n)`` distinct rows of ``features`` (n x d) chosen by iCaRL's herding: each
    pick minimises the distance between the class mean and the mean of the picks so far (features
    L2-normalised, as in the paper)."""
    f = F.normalize(features.double(), dim=1)
    mean = f.mean(0)
    chosen: list[int] = []
    total = torch.zeros_like(mean)
    available = torch.ones(len(f), dtype=torch.bool)
    for k in range(1, min(m, len(f)) + 1):
        dist = ((mean - (total + f) / k) ** 2).sum(1).masked_fill(~available, float("inf"))
        i = int(torch.argmin(dist))
        chosen.append(i)
        available[i] = False
        total += f[i]
    return np.array(chosen, dtype=np.int64)


class SeenClasses(nn.Module):
    """The model with the logits of classes not seen yet masked out (-inf): the head as it has grown.
    ``last_full`` keeps the full output of the last call (the distillation reads the old columns)."""

    def __init__(self, model: nn.Module, columns: tuple[int, int], seen: Sequence[int]):
        super().__init__()
        self.model, self.columns = model, columns
        mask = torch.ones(columns[1] - columns[0], dtype=torch.bool)
        mask[list(seen)] = False
        self.register_buffer("unseen", mask, persistent=False)

    def forward(self, x):
        self.last_full = self.model(x)
        return self.last_full[:, self.columns[0]:self.columns[1]].masked_fill(self.unseen, float("-inf"))


def penultimate(model: nn.Module, head: nn.Module, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """The head's input (the feature vector iCaRL's herding works in) for model inputs ``x``, eval mode."""
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda mod, inputs, out: captured.append(inputs[0].detach().flatten(1)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch):
                model(x[i:i + batch])
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(captured)


@torch.no_grad()
def nearest_mean_head(model: nn.Module, head: nn.Linear, data: Dataset, store: "ExemplarMemory") -> None:
    """Make ``head`` iCaRL's nearest-mean-of-exemplars classifier (in place): row c is the L2-normalised
    mean of class c's normalised exemplar features, the bias zero. With every mean of norm 1,
    ``argmin_c ||phi(x)/|phi(x)| - mu_c||`` is ``argmax_c mu_c . phi(x)``: a linear layer, so the
    classifier ships as an ordinary network. Classes without exemplars get a zero row."""
    head.weight.zero_()
    if head.bias is not None:
        head.bias.zero_()
    for c, x in store.x.items():
        feats = F.normalize(penultimate(model, head, torch.from_numpy(data.to_input(x))), dim=1)
        head.weight[c] = F.normalize(feats.mean(0), dim=0)


@dataclasses.dataclass
class ExemplarMemory:
    """Raw training samples (as the data set stores them) and their labels, per class."""

    x: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)

    def add(self, label: int, samples: np.ndarray) -> None:
        self.x[label] = np.ascontiguousarray(samples)

    def arrays(self, like: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self.x:
            return like[:0], np.zeros(0, dtype=np.int64)
        labels = sorted(self.x)
        return (np.concatenate([self.x[c] for c in labels]),
                np.concatenate([np.full(len(self.x[c]), c, dtype=np.int64) for c in labels]))

    @property
    def samples(self) -> int:
        return sum(len(v) for v in self.x.values())


def step_data(data: Dataset, new: Sequence[int], seen: Sequence[int], memory: ExemplarMemory) -> Dataset:
    """Step k's data set: the new classes' training samples plus the exemplars; validation and test
    over every class seen so far (labels stay the data set's class indices)."""
    def only(x, y, classes):
        keep = np.isin(y, list(classes))
        return x[keep], y[keep]

    x_new, y_new = only(data.x_train, data.y_train, new)
    x_mem, y_mem = memory.arrays(data.x_train)
    x_val, y_val = only(data.x_val, data.y_val, seen)
    x_test, y_test = only(data.x_test, data.y_test, seen)
    return dataclasses.replace(data, x_train=np.concatenate([x_new, x_mem]), y_train=np.concatenate([y_new, y_mem]),
                               x_val=x_val, y_val=y_val, x_test=x_test, y_test=y_test)


def step_loss(view: SeenClasses, teacher: nn.Module | None, old: Sequence[int], distill: float) -> Callable:
    """Cross-entropy over the seen classes plus ``distill`` x the old classes' logit distillation."""
    a = view.columns[0]
    old_cols = torch.tensor([a + c for c in old], dtype=torch.long)

    def loss_fn(logits, x, y):
        loss = F.cross_entropy(logits, y)
        if teacher is not None and len(old_cols) and distill > 0:
            with torch.no_grad():
                before = teacher(x)[:, old_cols.to(x.device)]
            now = view.last_full[:, old_cols.to(x.device)]
            t = TEMPERATURE
            kd = F.kl_div(F.log_softmax(now / t, dim=1), F.log_softmax(before / t, dim=1), reduction="batchmean",
                          log_target=True)
            loss = loss + distill * t * t * kd
        return loss

    return loss_fn


def frozen_copy(model: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def learn_class_steps(model: nn.Module, head: nn.Module, columns: tuple[int, int], data: Dataset,
                      steps: Sequence[Sequence[int]], memory: int, distill: float, nme: bool,
                      fit_step: Callable[[nn.Module, Dataset, Callable, int], object],
                      accuracy: Callable[[nn.Module, np.ndarray, np.ndarray, Dataset], float]) -> tuple[object, dict]:
    """Train ``model`` (in place) through the class steps; ``fit_step(view, step data, loss_fn, k)``
    trains one step and returns its fit result. Returns the last step's fit result and per-step
    figures: accuracy over the classes seen so far (validation and test), and the memory's size; the
    memory itself is dropped on return."""
    store, seen, rows = ExemplarMemory(), [], []
    for k, new in enumerate(steps, start=1):
        old = list(seen)
        seen = old + list(new)
        teacher = frozen_copy(model) if old and distill > 0 else None
        view = SeenClasses(model, columns, seen)
        part = step_data(data, new, seen, store)
        result = fit_step(view, part, step_loss(view, teacher, old, distill), k)
        if memory:
            for c in new:
                x_c = data.x_train[data.y_train == c]
                feats = penultimate(model, head, torch.from_numpy(data.to_input(x_c)))
                store.add(c, x_c[herding(feats, memory)])
        trained = copy.deepcopy(head.state_dict())
        if nme:
            nearest_mean_head(model, head, data, store)
        old_test = np.isin(part.y_test, old)
        rows.append({"step": k, "classes": list(new),
                     "val_accuracy": accuracy(view, part.x_val, part.y_val, part),
                     "test_accuracy": accuracy(view, part.x_test, part.y_test, part),
                     "old_classes_accuracy": accuracy(view, part.x_test[old_test], part.y_test[old_test], part)
                     if old else None,
                     "exemplars": store.samples})
        if nme and k < len(steps):
            head.load_state_dict(trained)  # the next step trains (and distils from) the trained head
    return result, {"steps": rows, "final_accuracy": rows[-1]["test_accuracy"],
            "average_incremental_accuracy": float(np.mean([r["test_accuracy"] for r in rows])),
            "memory_samples": store.samples, "memory_bytes": int(sum(v.nbytes for v in store.x.values()))}
