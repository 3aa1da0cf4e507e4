"""Continual learning: one model, several tasks, each with its own output head (task-incremental).

What the ``learn`` stage is made of; no pipeline code here: each method's training procedure
(``learn_lwf``, ``learn_ewc``, ``learn_packnet``) gets the model with the task's head placed and a
``train`` callback (the stage's training loop) in a :class:`TaskTraining`.

* Heads: the model's output layer becomes ``ConcatHeads({task: head})``; every task adds a head, so
  one invoke computes every task and each task owns a range of output columns.
* Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2018): while task B trains, the old
  heads are kept close to what the network answered on B's data before B's training started:
  ``lambda_old * T^2 * KL(softmax(old_before / T) || softmax(old_now / T))`` per old head, plus the
  new task's cross-entropy. No old data needed. For regression heads (outputs are values, not
  logits) the term is ``lambda_old * MSE(old_now, old_before)`` per old head.
* Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017): the diagonal Fisher information of
  each finished task, ``F_i = E_x E_{y ~ p(y|x)} (d log p(y|x) / d theta_i)^2`` (the expectation over
  y taken exactly, over the task's classes), and the penalty ``lambda / 2 * sum_i F_i (theta_i -
  theta*_i)^2``. For regression heads the likelihood is Gaussian with unit variance (on standardized
  targets): ``F_i = E_x sum_k (d f_k(x) / d theta_i)^2``. Online EWC (Schwarz et al., ICML 2018,
  "Progress & Compress"): one running Fisher ``F <- decay * F + F_task`` anchored at the latest weights.
* PackNet (Mallya & Lazebnik, CVPR 2018): after a task trains its free weights, the smallest
  ``prune`` fraction of them (by magnitude, per layer) is freed again, the rest is retrained
  briefly and frozen; the next task trains only freed weights. An ``owner`` map per weight tensor
  (0: free, k: task k) holds every task's mask: task k's model uses the weights with owner <= k.

Implementations checked against Avalanche 0.6 (``LwFPlugin``, ``EWCPlugin``, ``PackNetModel``).
Differences: Avalanche's LwF omits T^2 and its EWC uses mini-batch gradients squared (an
underestimate of the Fisher) and no 1/2; PackNet here also freezes BatchNorm (Avalanche refuses it).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgec.base.data import Dataset
from edgec.base.errors import ConfigError
from edgec.modules import ConcatHeads

from ..extensions import EWC_EXT, PACKNET_EXT, PIGGYBACK_EXT
from . import piggyback as pb


def head_key(task: str) -> str:
    """The ConcatHeads child name of a task (module names cannot hold '-')."""
    return task.replace("-", "_")


# --- heads -------------------------------------------------------------------------------------------


def find_heads(model: nn.Module) -> str | None:
    """Path of the model's ConcatHeads module, or None."""
    found = [name for name, m in model.named_modules() if isinstance(m, ConcatHeads)]
    if len(found) > 1:
        raise ConfigError(f"the model has {len(found)} ConcatHeads modules ({', '.join(found)}); edgec expects one")
    return found[0] if found else None


def find_output_layer(model: nn.Module, example: torch.Tensor) -> str:
    """The module whose output *is* the model's output: the last ``nn.Linear`` called in forward
    whose output equals the model output exactly (found by tracing with forward hooks)."""
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [m.register_forward_hook(lambda mod, i, o, name=name: calls.append((name, o)))
               for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for name, o in reversed(calls):
        if isinstance(o, torch.Tensor) and o.shape == out.shape and torch.equal(o, out):
            return name
    raise ConfigError(
        "cannot find the model's output layer: no nn.Linear produces the model's output directly (the last "
        "operation of forward must be a Linear layer, e.g. no softmax after it), so task heads cannot be added")


def get_module(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    *parents, leaf = path.split(".")
    parent = model.get_submodule(".".join(parents)) if parents else model
    setattr(parent, leaf, module)


def new_head(in_features: int, classes: int, seed: int, bias: bool = True) -> nn.Linear:
    """A freshly initialised head (torch's default Linear init), reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(in_features, classes, bias=bias)
    bound = 1 / math.sqrt(in_features)
    with torch.no_grad():
        head.weight.copy_(torch.empty_like(head.weight).uniform_(-bound, bound, generator=gen))
        if bias:
            head.bias.copy_(torch.empty_like(head.bias).uniform_(-bound, bound, generator=gen))
    return head


def add_task_head(model: nn.Module, example: torch.Tensor, task: str, classes: int, seed: int) -> str:
    """Give ``model`` a head for ``task`` (in place); returns the ConcatHeads path. The first call
    replaces the output layer by ``ConcatHeads({task: new head})``; later calls append a head."""
    path = find_heads(model)
    if path is None:
        path = find_output_layer(model, example)
        old = get_module(model, path)
        set_module(model, path, ConcatHeads({head_key(task): new_head(old.in_features, classes, seed, old.bias is not None)}))
        return path
    heads = get_module(model, path)
    if head_key(task) in heads:
        raise ConfigError(f"task {task!r} already has a head")
    first = next(iter(heads.values()))
    heads[head_key(task)] = new_head(first.in_features, classes, seed, first.bias is not None)
    return path


def head_columns(model: nn.Module, path: str) -> dict[str, tuple[int, int]]:
    """Output columns of each head (by ConcatHeads key), in the order ConcatHeads concatenates them."""
    cols, start = {}, 0
    for key, head in get_module(model, path).items():
        cols[key] = (start, start + head.out_features)
        start += head.out_features
    return cols


class TaskView(nn.Module):
    """The model seen through one task's output columns, for the shared training loop (whose
    validation accuracy then measures this task). ``last`` keeps the full output of the last call
    (every head) for losses that read other heads (LwF). Modules in ``frozen_norms`` stay in eval
    mode while training (a frozen backbone's BatchNorm statistics must not move)."""

    def __init__(self, model: nn.Module, columns: tuple[int, int], frozen_norms: Iterable[nn.Module] = ()):
        super().__init__()
        self.model = model
        self.columns = columns
        self._frozen = list(frozen_norms)
        self.last: torch.Tensor | None = None

    def forward(self, x):
        for m in self._frozen:
            m.eval()
        self.last = self.model(x)
        return self.last[:, self.columns[0]:self.columns[1]]


def norm_modules(model: nn.Module, prefixes: Iterable[str] | None = None) -> list[nn.Module]:
    """BatchNorm modules (all, or those under one of ``prefixes``)."""
    prefixes = list(prefixes) if prefixes is not None else None
    return [m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and (prefixes is None or any(_under(name, p) for p in prefixes))]


def _under(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def under_any(name: str, prefixes: Iterable[str]) -> bool:
    return any(_under(name, p) for p in prefixes)


class UpdateScale:
    """Scale the optimizer's update of some parameters by ``scale`` (a per-group learning-rate scale
    that works for any optimizer, Adam included, whose step does not scale with the gradient):
    ``before()`` snapshots them (call it in the loss), ``after()`` rescales the step they took."""

    def __init__(self, params: list[nn.Parameter], scale: float):
        self.params, self.scale = params, scale
        self._before: list[torch.Tensor] = []

    def before(self) -> None:
        if self.scale != 1.0:
            self._before = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def after(self) -> None:
        if self.scale != 1.0 and self._before:
            for p, b in zip(self.params, self._before):
                p.copy_(b + self.scale * (p - b))


# --- LwF --------------------------------------------------------------------------------------------


def lwf_loss(current: torch.Tensor, recorded: torch.Tensor, columns: Mapping[str, tuple[int, int]],
             temperature: float | None) -> torch.Tensor:
    """``T^2 * sum over old heads of KL(softmax(recorded / T) || softmax(current / T))`` (batch mean);
    with ``temperature`` None (regression heads) ``sum over old heads of MSE(current, recorded)``.
    ``current`` and ``recorded`` are full model outputs; ``columns`` the old heads' column ranges."""
    total = current.new_zeros(())
    if temperature is None:
        for a, b in columns.values():
            total = total + F.mse_loss(current[:, a:b], recorded[:, a:b])
        return total
    t = temperature
    for a, b in columns.values():
        total = total + F.kl_div(F.log_softmax(current[:, a:b] / t, dim=1), F.log_softmax(recorded[:, a:b] / t, dim=1),
                                 reduction="batchmean", log_target=True)
    return t * t * total


# --- EWC --------------------------------------------------------------------------------------------


def diagonal_fisher(model: nn.Module, x: torch.Tensor, columns: tuple[int, int], names: list[str],
                    chunk: int = 16, likelihood: str = "categorical") -> dict[str, torch.Tensor]:
    """Diagonal Fisher information of the named parameters for one task, averaged over the samples
    ``x`` (model inputs): ``E_x sum_y p(y|x) (d log p(y|x) / d theta)^2`` over the task's columns,
    the expectation over y exact. ``likelihood = "gaussian"`` (regression, unit variance): ``E_x sum_k
    (d f_k(x) / d theta)^2``, the same sum with the output columns in place of the classes and weight 1.
    Per-sample gradients with ``torch.func`` (vmap of grad), in eval mode."""
    from torch.func import functional_call, grad, vmap

    was_training = model.training
    model.eval()
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in names}
    buffers = {n: b for n, b in model.named_buffers()}
    a, b = columns
    classes = b - a

    gaussian = likelihood == "gaussian"

    def log_prob(p, xi, yi):  # gaussian: the output column yi (its gradient is the score's)
        out = functional_call(model, ({**frozen, **p}, buffers), (xi.unsqueeze(0),))[0, a:b]
        return (out if gaussian else F.log_softmax(out, dim=0)).gather(0, yi.reshape(1)).squeeze(0)

    per_sample = vmap(grad(log_prob), in_dims=(None, 0, 0))
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    try:
        for i in range(0, len(x), chunk):
            xb = x[i:i + chunk]
            with torch.no_grad():
                logits = model(xb)[:, a:b]
                probs = torch.ones_like(logits) if gaussian else F.softmax(logits, dim=1)  # (n, classes)
            xs = xb.repeat_interleave(classes, dim=0)
            ys = torch.arange(classes).repeat(len(xb))
            w = probs.reshape(-1)
            grads = per_sample(params, xs, ys)
            for n, g in grads.items():
                fisher[n] += torch.einsum("k,k...->...", w, g.pow(2))
    finally:
        model.train(was_training)
    return {n: f / len(x) for n, f in fisher.items()}


def ewc_penalty(named: Mapping[str, torch.Tensor], anchors: list[tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]],
                strength: float) -> torch.Tensor:
    """``strength / 2 * sum over (fisher, anchor) pairs of sum_i F_i (theta_i - theta*_i)^2``."""
    total = None
    for fisher, anchor in anchors:
        for n, f in fisher.items():
            term = (f * (named[n] - anchor[n]).pow(2)).sum()
            total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return 0.5 * strength * total


# --- PackNet ----------------------------------------------------------------------------------------


def prunable_weights(model: nn.Module, heads_path: str) -> list[str]:
    """Names of the weight tensors PackNet divides between tasks: Linear and Conv weights outside
    the task heads (each task owns its head whole)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and not _under(name, heads_path):
            out.append(f"{name}.weight")
    return out


def shared_frozen_after_first(model: nn.Module, heads_path: str, prunable: list[str]) -> list[str]:
    """Parameters outside the heads that PackNet freezes after the first task: biases and
    BatchNorm (they cannot be split between tasks)."""
    return [n for n, _ in model.named_parameters() if n not in prunable and not _under(n.rsplit(".", 1)[0], heads_path)]


@torch.no_grad()
def packnet_prune(params: Mapping[str, torch.Tensor], owner: Mapping[str, torch.Tensor], task_id: int,
                  fraction: float) -> dict[str, torch.Tensor]:
    """Per layer, of the weights this task trained (owner 0), free the smallest ``fraction`` by
    magnitude (set to zero, stay owner 0) and give the rest to ``task_id``. Returns the new owners;
    zeroes the freed weights in ``params`` in place."""
    new_owner = {}
    for n, w in params.items():
        own = owner[n].clone()
        free = own == 0
        k = int(round(fraction * int(free.sum())))
        if k > 0:
            # exactly k: the smallest magnitudes among the free weights, ties broken by position
            order = torch.argsort(torch.where(free, w.abs(), torch.full_like(w, float("inf"))).flatten(), stable=True)
            freed = torch.zeros(w.numel(), dtype=torch.bool)
            freed[order[:k]] = True
            freed = freed.view_as(w)
        else:
            freed = torch.zeros_like(free)
        own[free & ~freed] = task_id
        w[freed] = 0.0
        new_owner[n] = own
    return new_owner


class PackNetEnforcer:
    """During task ``task_id``'s training: weights owned by earlier tasks keep their values, weights
    not ``trainable`` stay at their values (zero for freed weights), and each trainable weight is
    clamped to its output channel's largest frozen magnitude, so every task's model keeps the same
    per-channel int8 scales (that is what lets the bundle ship the weight values once)."""

    def __init__(self, params: Mapping[str, nn.Parameter], trainable: Mapping[str, torch.Tensor]):
        self.params = params
        self.trainable = trainable
        self.values = {n: p.detach().clone() for n, p in params.items()}
        self.bound = {}
        for n, p in params.items():
            frozen = ~trainable[n]
            rows = p.detach().abs().mul(frozen).reshape(p.shape[0], -1).amax(dim=1)
            self.bound[n] = torch.where(rows > 0, rows, torch.full_like(rows, float("inf")))

    @torch.no_grad()
    def __call__(self) -> None:
        for n, p in self.params.items():
            t = self.trainable[n]
            b = self.bound[n].view(-1, *([1] * (p.dim() - 1)))
            clamped = torch.maximum(torch.minimum(p, b), -b)
            p.copy_(torch.where(t, clamped, self.values[n]))


@torch.no_grad()
def apply_task_mask(model: nn.Module, owner: Mapping[str, torch.Tensor], task_id: int) -> nn.Module:
    """Task ``task_id``'s model (in place): weights of later tasks (owner > task_id) set to zero."""
    params = dict(model.named_parameters())
    for n, own in owner.items():
        params[n].mul_((own <= task_id).to(params[n].dtype))
    return model


def owner_fractions(owner: Mapping[str, torch.Tensor], tasks: int) -> list[float]:
    """Share of the divided weights owned by each task 1..tasks, then the free share."""
    total = sum(o.numel() for o in owner.values()) or 1
    counts = np.zeros(tasks + 1)
    for o in owner.values():
        counts += np.bincount(o.flatten().numpy().astype(np.int64), minlength=tasks + 1)[: tasks + 1]
    return [float(c / total) for c in list(counts[1:]) + [counts[0]]]


# --- PackNet transport: the task models as one base file + levels + residuals ------------------------


def encode_task_models(base: bytes, base_name: str, files: Mapping[str, bytes]) -> bytes:
    """The tasks transport payload (format and decoder: ``edgec.ondevice.tasks``) for ``files``,
    given in task order (level 1, 2, ...), each rebuilt from ``base`` (the last task's model file).

    A byte's level is 1 + the last task whose file has a zero where ``base`` does not: for a PackNet
    weight, the task owning it. Levels are stored only inside the byte ranges where some are above 1
    (the divided weight buffers), in order of decreasing |int8| magnitude of the base byte (zeros of
    the base, whose level does not matter, end up in one run). What masking does not explain (biases
    and activation scales that differ between the files) is a byte-wise residual per file, nearly
    all zeros, the residuals in one section. The payload is decoded again before it is kept."""
    from edgec.ondevice import tasks as fmt

    from .tasks_payload import TasksPayloadWriter, level_regions

    base_arr = np.frombuffer(base, dtype=np.uint8)
    levels = np.ones(len(base), dtype=np.uint8)
    masked_files = [(name, data) for name, data in files.items() if len(data) == len(base)]
    for level, (_, data) in enumerate(masked_files, start=1):
        arr = np.frombuffer(data, dtype=np.uint8)
        levels[(arr == 0) & (base_arr != 0)] = level + 1
    regions = level_regions(levels)
    writer = TasksPayloadWriter(base, base_name)
    if masked_files:
        positions = fmt.region_positions(regions, len(base))
        writer.header["regions"] = regions
        writer.header["levels"] = writer.add(
            levels[positions][fmt.magnitude_order(base_arr[positions].tobytes())].tobytes())
        residuals = []
        for level, (_, data) in enumerate(masked_files, start=1):
            masked = np.where(levels <= level, base_arr, 0).astype(np.uint8)
            residuals.append((np.frombuffer(data, dtype=np.uint8) - masked).astype(np.uint8).tobytes())
        writer.header["residuals"] = writer.add(b"".join(residuals))
    rebuilt = {name: {"mode": "masked", "level": level} for level, (name, _) in enumerate(masked_files, start=1)}
    return writer.finish(files, rebuilt)


# --- the methods' training procedures (the learn stage orchestrates them) --------------------------


@dataclass
class TaskTraining:
    """What a method trains: ``model`` with task ``task``'s head placed, its output ``cols``, the
    shared ``backbone`` (name, parameter) pairs, the ``new_head``'s parameters, the heads' module path,
    the ``tasks`` extension ``state``, the checkpoint ``extensions`` (updated in place) and
    ``train(view, params, *, epochs=None, label=None, loss_fn=None, after_step=None)``, the training
    loop (returns its fit result); ``task_loss(logits, x, y)`` is the task's own loss."""

    model: nn.Module
    data: Dataset
    task: str
    cols: tuple[int, int]
    backbone: list[tuple[str, nn.Parameter]]
    new_head: list[nn.Parameter]
    heads_path: str
    state: dict[str, Any]
    extensions: dict[str, Any]
    train: Callable[..., Any]
    task_loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    label: str


def learn_lwf(t: TaskTraining, old_cols: Mapping[str, tuple[int, int]], *, lambda_old: float, temperature: float,
              warmup_epochs: int, device: str):
    """Learning without Forgetting: the new task's loss plus ``lambda_old`` times the old heads'
    distance from what they answered before training (a frozen copy of the model)."""
    if warmup_epochs:
        view = TaskView(t.model, t.cols, norm_modules(t.model))
        t.train(view, t.new_head, epochs=warmup_epochs, label=f"{t.label} warm-up (new head)")
    # Li & Hoiem record the old heads' responses to the new task's data before training it; a
    # frozen copy in eval mode gives exactly those responses for every batch (and follows
    # augmented inputs, which a table recorded once could not).
    teacher = copy.deepcopy(t.model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    view = TaskView(t.model, t.cols)
    heads = get_module(t.model, t.heads_path)
    old_heads = [p for name in old_cols for p in heads[t.state["tasks"][name]["head"]].parameters()]
    # regression outputs are values, not logits: the old heads keep them by MSE (no temperature)
    temperature = temperature if t.data.task == "classification" else None

    def loss_fn(logits, x, y):
        loss = t.task_loss(logits, x, y)
        if old_cols and lambda_old > 0:
            with torch.no_grad():
                recorded = teacher(x)
            loss = loss + lambda_old * lwf_loss(view.last, recorded, old_cols, temperature)
        return loss

    teacher.to(device)
    return t.train(view, [p for _, p in t.backbone] + old_heads + t.new_head, loss_fn=loss_fn)


@dataclass(frozen=True)
class EWCSettings:
    """The ewc method's keys (see the learn stage's config)."""

    lam: float
    mode: str  # "separate" | "online"
    decay: float
    samples: int
    seed: int
    device: str


def learn_ewc(t: TaskTraining, old_data: Callable[[str], Dataset], ewc_cfg: EWCSettings):
    """Elastic Weight Consolidation: the task's loss plus the Fisher-weighted distance from every old
    task's weights. Old tasks learned by other methods get their Fisher first, on their data
    (``old_data(name)``)."""
    ewc = t.extensions.get(EWC_EXT) or {"mode": ewc_cfg.mode, "tasks": {}, "online": None}
    for name in t.state["order"]:
        if name == t.task or name in ewc["tasks"]:
            continue
        fisher = ewc_fisher(t.model, old_data(name), tuple(t.state["tasks"][name]["columns"]), t.backbone, ewc_cfg)
        merge_fisher(ewc, name, fisher, {n: p.detach().clone() for n, p in t.backbone}, ewc_cfg)
    t.extensions[EWC_EXT] = ewc
    if ewc.get("online") is not None:  # one running Fisher, anchored at the last task's weights
        pairs = [(ewc["online"]["fisher"], ewc["online"]["anchor"])]
    else:
        pairs = [(e["fisher"], e["anchor"]) for name, e in ewc["tasks"].items() if name != t.task]
    device = ewc_cfg.device
    pairs = [({n: f.to(device) for n, f in fi.items()}, {n: a.to(device) for n, a in an.items()}) for fi, an in pairs]
    named = dict(t.backbone)

    def loss_fn(logits, x, y):
        loss = t.task_loss(logits, x, y)
        if pairs and ewc_cfg.lam > 0:
            loss = loss + ewc_penalty(named, pairs, ewc_cfg.lam)
        return loss

    return t.train(TaskView(t.model, t.cols), list(named.values()) + t.new_head, loss_fn=loss_fn)


def ewc_fisher(model: nn.Module, data: Dataset, cols: tuple[int, int], backbone, ewc_cfg: EWCSettings
               ) -> dict[str, torch.Tensor]:
    """The diagonal Fisher of the backbone on ``samples`` training samples of ``data`` (seeded)."""
    gen = np.random.default_rng(ewc_cfg.seed)
    n = min(ewc_cfg.samples, len(data.y_train))
    idx = np.sort(gen.choice(len(data.y_train), n, replace=False))
    x = torch.from_numpy(data.to_input(data.x_train[idx]))
    likelihood = "categorical" if data.task == "classification" else "gaussian"
    return diagonal_fisher(model, x, cols, [name for name, _ in backbone], likelihood=likelihood)


def merge_fisher(ewc: dict[str, Any], name: str, fisher, anchor, ewc_cfg: EWCSettings) -> None:
    """Record task ``name``'s Fisher and anchor: its own (separate), or into the running sum (online)."""
    if ewc_cfg.mode == "separate":
        ewc["tasks"][name] = {"fisher": fisher, "anchor": anchor}
        return
    online = ewc.get("online")
    if online is not None:
        fisher = {n: ewc_cfg.decay * online["fisher"][n] + f for n, f in fisher.items()}
    ewc["online"] = {"fisher": fisher, "anchor": anchor}
    ewc["tasks"][name] = {}  # recorded as consolidated (its Fisher is in the running sum)


def store_fisher(t: TaskTraining, ewc_cfg: EWCSettings) -> None:
    """After an ewc task trained: its own Fisher, anchored at the weights it ended with."""
    ewc = t.extensions.get(EWC_EXT) or {"mode": ewc_cfg.mode, "tasks": {}, "online": None}
    fisher = ewc_fisher(t.model, t.data, t.cols, t.backbone, ewc_cfg)
    merge_fisher(ewc, t.task, fisher, {n: p.detach().clone() for n, p in t.backbone}, ewc_cfg)
    t.extensions[EWC_EXT] = ewc


def learn_packnet(t: TaskTraining, *, prune: float, retrain_epochs: int):
    """PackNet: train the free weights, free the smallest ``prune`` fraction of them again, retrain
    the kept ones, and record them as this task's in the owner map. Returns (fit result, info)."""
    prunable = prunable_weights(t.model, t.heads_path)
    params = dict(t.model.named_parameters())
    pk = t.extensions.get(PACKNET_EXT)
    if pk is None:
        pk = {"owner": {n: torch.zeros(params[n].shape, dtype=torch.uint8) for n in prunable}, "tasks": []}
    pk = {"owner": dict(pk["owner"]), "tasks": list(pk["tasks"])}
    task_id = len(pk["tasks"]) + 1
    if task_id > 255:
        raise ConfigError("packnet keeps at most 255 tasks in one model")
    owner = pk["owner"]
    free = {n: owner[n] == 0 for n in prunable}
    if task_id > 1 and sum(int(f.sum()) for f in free.values()) == 0:
        raise ConfigError(f"packnet: no free weights left for task {t.task!r}; the previous task kept all of its "
                          "weights (prune = 0)")
    first = task_id == 1
    shared = shared_frozen_after_first(t.model, t.heads_path, prunable)
    trainable_shared = [params[n] for n in shared] if first else []
    view = TaskView(t.model, t.cols, [] if first else norm_modules(t.model))
    weights = {n: params[n] for n in prunable}
    trained = list(weights.values()) + trainable_shared + t.new_head
    result = t.train(view, trained, after_step=PackNetEnforcer(weights, free))
    with torch.no_grad():
        new_owner = packnet_prune({n: params[n].data for n in prunable}, owner, task_id, prune)
    if prune > 0 and retrain_epochs > 0:
        kept = {n: new_owner[n] == task_id for n in prunable}
        t.train(view, trained, epochs=retrain_epochs, label=f"{t.label} retrain after pruning",
                after_step=PackNetEnforcer(weights, kept))
    pk = {"owner": new_owner, "tasks": pk["tasks"] + [t.task]}
    t.extensions[PACKNET_EXT] = pk
    shares = owner_fractions(new_owner, task_id)
    return result, {"packnet": {"task_id": task_id, "owned": dict(zip(pk["tasks"], shares[:-1])), "free": shares[-1]}}


def task_model(model: nn.Module, extensions: Mapping[str, Any], task: str) -> nn.Module:
    """The model task ``task`` runs: the model itself, or for PackNet a copy with the weights of
    later tasks removed, for Piggyback a copy with the backbone masked by the task's mask."""
    pg = extensions.get(PIGGYBACK_EXT)
    if pg and task in (pg.get("masks") or {}):
        return pb.apply_masks(copy.deepcopy(model), pg["masks"][task], (pg.get("biases") or {}).get(task))
    pk = extensions.get(PACKNET_EXT)
    if not pk or task not in pk.get("tasks", []) or "owner" not in pk:
        return model
    return apply_task_mask(copy.deepcopy(model), pk["owner"], pk["tasks"].index(task) + 1)
