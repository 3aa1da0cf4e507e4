"""Net2Net: grow a trained network into a wider or deeper one that computes the same function.

Chen, Goodfellow, Shlens, "Net2Net: Accelerating Learning via Knowledge Transfer", ICLR 2016
(arXiv:1511.05641).

* **Net2WiderNet** (:func:`widen`): layer ``L`` goes from ``n`` to ``q`` units by the random mapping
  ``g`` of the paper: ``g(j) = j`` for ``j < n`` and ``g(j)`` drawn uniformly from ``0..n-1`` for
  ``j >= n``. Unit ``j`` of the wider layer copies the incoming weights and bias of unit ``g(j)``;
  everything channel-wise between ``L`` and the next layer (BatchNorm's weight, bias, running mean
  and variance; activations, pooling, dropout) follows the mapping; the next layer's incoming weights
  of unit ``j`` are those of ``g(j)`` divided by the replica count ``|{k: g(k) = g(j)}|``. Linear ->
  Linear, Conv2d -> Conv2d and Conv2d -> Flatten -> Linear (each channel's block of input columns,
  one per spatial position).
* **Net2DeeperNet** (:func:`deepen`): a new layer initialised to the identity (Linear: identity
  matrix; Conv2d: identity kernel with same padding; zero bias) goes after ``L``'s activation,
  followed by a BatchNorm when ``L`` has one, set to undo its own normalisation (running statistics
  measured on data, weight = sqrt(var + eps), bias = mean), as in section 2.3 of the paper. Valid
  only after an idempotent activation (ReLU, ReLU6): ``relu(I · relu(x)) = relu(x)``.
* :func:`extend_classes`: the output Linear gets more rows; the old classes' outputs are unchanged.

Symmetry breaking (``noise``). Replicas of one unit have equal incoming weights and, after the
division, equal outgoing weights, so they would get equal gradients forever. The noise is added to
the replicas' outgoing weights and is *zero-sum over the replicas of each unit*: replicas ``r`` of
unit ``i`` get ``U[:, i] / c + e_r`` with ``sum_r e_r = 0``, so the next layer still receives exactly
the old unit's contribution and the function is preserved with noise too (up to float rounding),
while each replica's incoming weights now get a different gradient. The noise is Gaussian with a
standard deviation of ``noise`` times the std of that layer's weights. (Adding independent noise, as
the Keras mnist_net2net example does, changes the function by about that much.) Identity layers
have no symmetric units and get no noise.

The layer graph comes from ``torch.fx`` (so models that apply activations functionally work) with
shapes from one sample. A layer whose output reaches several consumers (a residual add, a
concatenation, a second head) cannot be widened: the other consumers would see the new units. Every
function here returns a new model and leaves its input untouched; the new modules are plain
``torch.nn`` types (Linear, Conv2d, BatchNorm, ReLU, Sequential), so an architecture record can
describe them.
"""

from __future__ import annotations

import copy
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from edgec.base.errors import ConfigError

Init = Literal["net2net", "random"]

LAYER_TYPES = (nn.Linear, nn.Conv2d)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)

_RELU_MODULES = {nn.ReLU: nn.ReLU, nn.ReLU6: nn.ReLU6}
_RELU_FUNCTIONS = {torch.relu: nn.ReLU, torch.relu_: nn.ReLU, F.relu: nn.ReLU, F.relu_: nn.ReLU, F.relu6: nn.ReLU6}
_RELU_METHODS = {"relu": nn.ReLU, "relu_": nn.ReLU}
_ACT_MODULES = (nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU, nn.ELU,
                nn.Softplus, nn.Mish, nn.Hardtanh, nn.PReLU, nn.SELU, nn.CELU)
_ACT_FUNCTIONS = {torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, F.gelu, F.silu, F.hardswish, F.hardsigmoid,
                  F.leaky_relu, F.elu, F.softplus, F.mish, F.hardtanh, F.selu, F.celu}
_ACT_METHODS = {"sigmoid", "tanh", "sigmoid_", "tanh_"}
_MAXPOOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool2d)
_MAXPOOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.adaptive_max_pool2d}
_PASS_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                 *_MAXPOOL_MODULES)
_PASS_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.avg_pool2d, F.adaptive_avg_pool2d, *_MAXPOOL_FUNCTIONS}
_PASS_METHODS = {"contiguous"}
_SCALAR_OPS = {operator.mul, operator.truediv, operator.add, operator.sub, torch.mul, torch.div}
_FLATTEN_FUNCTIONS = {torch.flatten}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}
_SHAPE_QUERIES = {"size", "dim"}


# --- the traced graph ---------------------------------------------------------------------------


@dataclass
class Traced:
    """The model's fx graph with shapes (from one sample) and how often each module is called."""

    model: nn.Module
    graph: fx.Graph
    modules: dict[str, nn.Module]
    calls: Counter

    def node(self, path: str) -> fx.Node:
        return next(n for n in self.graph.nodes if n.op == "call_module" and n.target == path)

    def layers(self) -> list[str]:
        """Linear and Conv2d layers in the order the forward pass calls them."""
        seen: list[str] = []
        for n in self.graph.nodes:
            if n.op == "call_module" and isinstance(self.modules[n.target], LAYER_TYPES) and n.target not in seen:
                seen.append(n.target)
        return seen

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.modules.get(node.target) if node.op == "call_module" else None


def trace(model: nn.Module, example: torch.Tensor) -> Traced:
    """Trace ``model`` with torch.fx and record every node's output shape for ``example``."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # data-dependent control flow, unsupported Python
        raise ConfigError(f"grow: cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); grow needs a model without data-dependent "
                          "control flow in forward") from None
    was_training = model.training
    model.eval()  # shape propagation must not move BatchNorm statistics
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example)
    finally:
        model.train(was_training)
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    return Traced(model, gm.graph, dict(model.named_modules()), calls)


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def describe(node: fx.Node, traced: Traced) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(traced.modules[node.target]).__name__})"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        if node.target in (operator.add, torch.add) and _tensor_args(node) >= 2:
            return f"a residual add ({node.name})"
        if node.target is torch.cat:
            return f"a concatenation ({node.name})"
        return f"{name} ({node.name})"
    if node.op == "call_method":
        return f".{node.target}() ({node.name})"
    if node.op == "output":
        return "the model output"
    return f"{node.op} {node.target}"


def _tensor_args(node: fx.Node) -> int:
    flat = [a for a in node.args if isinstance(a, fx.Node)]
    flat += [a for a in node.kwargs.values() if isinstance(a, fx.Node)]
    for a in node.args:
        if isinstance(a, (list, tuple)):
            flat += [x for x in a if isinstance(x, fx.Node)]
    return len(flat)


def value_users(node: fx.Node) -> list[fx.Node]:
    """The nodes that consume ``node``'s values (shape queries such as ``x.size(0)`` do not)."""
    users = []
    for u in node.users:
        if u.op == "call_method" and u.target in _SHAPE_QUERIES:
            continue
        if u.op == "call_function" and u.target is getattr and len(u.args) > 1 and u.args[1] in ("shape", "dtype", "device"):
            continue
        users.append(u)
    return users


def _only_input(node: fx.Node, source: fx.Node) -> bool:
    """``node`` reads ``source`` as its first argument and no other tensor value."""
    if not node.args or node.args[0] is not source:
        return False
    others = [a for a in list(node.args[1:]) + list(node.kwargs.values()) if isinstance(a, fx.Node)]
    if node.op == "call_method" and node.target in ("view", "reshape"):
        return True  # size arguments computed from shape queries
    return not others


_FUNCTION_KINDS = ((_RELU_FUNCTIONS, "relu"), (_ACT_FUNCTIONS, "act"), (_MAXPOOL_FUNCTIONS, "maxpool"),
                   (_PASS_FUNCTIONS, "pass"), (_FLATTEN_FUNCTIONS, "flatten"))
_METHOD_KINDS = ((_RELU_METHODS, "relu"), (_ACT_METHODS, "act"), (_PASS_METHODS, "pass"), (_FLATTEN_METHODS, "flatten"))


def classify(node: fx.Node, traced: Traced, source: fx.Node) -> str:
    """What ``node`` is to a unit flowing from ``source``: layer | bn | relu | act | maxpool | pass |
    flatten | output | other."""
    if node.op == "output":
        return "output"
    if node.op == "call_module":
        m = traced.modules[node.target]
        if type(m) in LAYER_TYPES:
            return "layer"
        if type(m) in BN_TYPES:
            return "bn"
        if type(m) in _RELU_MODULES:
            return "relu"
        if isinstance(m, _ACT_MODULES):
            return "act"
        if isinstance(m, _MAXPOOL_MODULES):
            return "maxpool"
        if isinstance(m, _PASS_MODULES):
            return "pass"
        if isinstance(m, nn.Flatten):
            return "flatten"
        return "other"
    if node.op == "call_function":
        if not _only_input(node, source) and node.target not in _SCALAR_OPS:
            return "other"
        kind = _kind_of(node.target, _FUNCTION_KINDS)
        if kind is not None:
            return kind
        if node.target in _SCALAR_OPS and _tensor_args(node) == 1 and source in node.args:
            return "pass"  # x * 2, x + 1: elementwise with a number
        return "other"
    if node.op == "call_method" and _only_input(node, source):
        return _kind_of(node.target, _METHOD_KINDS) or "other"
    return "other"


def _kind_of(target, table) -> str | None:
    return next((kind for targets, kind in table if target in targets), None)


def _relu_type(node: fx.Node, traced: Traced) -> type[nn.Module]:
    if node.op == "call_module":
        return _RELU_MODULES[type(traced.modules[node.target])]
    if node.op == "call_function":
        return _RELU_FUNCTIONS[node.target]
    return _RELU_METHODS[node.target]


def _is_channel_flatten(node: fx.Node, source: fx.Node) -> bool:
    """(N, C, *S) -> (N, C * prod(S)): channel-major, so channel c owns a contiguous block."""
    before, after = _shape(source), _shape(node)
    if before is None or after is None or len(before) < 2 or len(after) != 2:
        return False
    size = 1
    for s in before[1:]:
        size *= s
    return after[0] == before[0] and after[1] == size


def _multi_consumer_error(what: str, layer: str, node: fx.Node, users: list[fx.Node], traced: Traced) -> ConfigError:
    via = "" if node.op == "call_module" and node.target == layer else f" (through {describe(node, traced)})"
    if not users:
        return ConfigError(f"{what}: the output of {layer!r}{via} is not used")
    names = ", ".join(describe(u, traced) for u in users)
    return ConfigError(
        f"{what}: {layer!r} cannot be grown: its output{via} feeds {len(users)} consumers ({names}); only a layer whose "
        "output reaches a single next layer can be (a residual add or a second consumer would see the new units)")


def _require_single_call(traced: Traced, path: str, what: str) -> None:
    if traced.calls[path] != 1:
        raise ConfigError(f"{what}: module {path!r} is called {traced.calls[path]} times in forward; grow can change "
                          "only a module that is used once")


# --- Net2WiderNet -------------------------------------------------------------------------------


@dataclass
class WiderPlan:
    layer: str
    batchnorms: list[str] = field(default_factory=list)
    consumer: str | None = None
    spatial: int = 1  # input columns of the consumer per unit (Conv2d -> Flatten -> Linear: H*W)


def wider_plan(traced: Traced, layer: str) -> WiderPlan:
    """Follow ``layer``'s output to the next Linear/Conv2d; refuse anything grow cannot map."""
    what = "grow.wider"
    module = traced.modules.get(layer)
    if type(module) not in LAYER_TYPES:
        raise _unknown_layer(what, layer, traced)
    _require_single_call(traced, layer, what)
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        raise ConfigError(f"{what}: {layer!r} is a grouped convolution (groups={module.groups}); grow widens only "
                          "ordinary convolutions")
    start = traced.node(layer)
    if isinstance(module, nn.Linear) and len(_shape(start) or ()) != 2:
        raise ConfigError(f"{what}: {layer!r} outputs shape {list(_shape(start) or [])}; grow widens a Linear whose "
                          "output is (batch, features)")
    plan = WiderPlan(layer)
    node, flattened = start, False
    while True:
        users = value_users(node)
        if len(users) != 1:
            raise _multi_consumer_error(what, layer, node, users, traced)
        user = users[0]
        kind = classify(user, traced, node)
        if kind == "layer":
            consumer = traced.modules[user.target]
            _require_single_call(traced, user.target, what)
            if isinstance(consumer, nn.Conv2d) and (consumer.groups != 1 or isinstance(module, nn.Linear) or flattened):
                raise ConfigError(f"{what}: {layer!r} feeds {describe(user, traced)}, which grow cannot widen into "
                                  "(a grouped/depthwise convolution, or a reshape in between)")
            if isinstance(consumer, nn.Linear) and isinstance(module, nn.Conv2d) and not flattened:
                raise ConfigError(f"{what}: {layer!r} (Conv2d) reaches {describe(user, traced)} without a flatten; "
                                  "grow maps Conv2d -> Flatten -> Linear only")
            plan.consumer = user.target
            width = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            fan_in = consumer.in_features if isinstance(consumer, nn.Linear) else consumer.in_channels
            if fan_in % width:
                raise ConfigError(f"{what}: {describe(user, traced)} takes {fan_in} inputs, not a multiple of the "
                                  f"{width} units of {layer!r}")
            plan.spatial = fan_in // width
            return plan
        if kind == "output":
            raise ConfigError(f"{what}: {layer!r} is the output layer (its width is the number of classes); grow "
                              "it with classes = N")
        if kind == "bn":
            _require_single_call(traced, user.target, what)
            plan.batchnorms.append(user.target)
        elif kind == "flatten":
            if flattened or not _is_channel_flatten(user, node):
                raise ConfigError(f"{what}: {layer!r} feeds {describe(user, traced)}, a reshape grow cannot map to "
                                  "its units")
            flattened = True
        elif kind not in ("relu", "act", "maxpool", "pass"):
            if _tensor_args(user) > 1:
                via = "" if node is start else f" (through {describe(node, traced)})"
                raise ConfigError(f"{what}: {layer!r} cannot be grown: its output{via} feeds {describe(user, traced)}, "
                                  "which also reads another tensor (the other operand would not see the new units)")
            raise ConfigError(f"{what}: {layer!r} feeds {describe(user, traced)}, which grow cannot map unit by "
                              "unit; only BatchNorm, activations, pooling, dropout and a flatten may stand between "
                              "a widened layer and the next Linear/Conv2d")
        node = user


def _unknown_layer(what: str, layer: str, traced: Traced) -> ConfigError:
    return ConfigError(f"{what}: {layer!r} is not a Linear or Conv2d layer of the model; layers in forward order: "
                       f"{', '.join(traced.layers())}")


def widen(model: nn.Module, layer: str, width: int, *, example: torch.Tensor, generator: torch.Generator,
          noise: float = 0.0, init: Init = "net2net") -> nn.Module:
    """A copy of ``model`` with ``layer`` widened to ``width`` units (Net2WiderNet).

    ``init = "random"`` is the random-pad baseline: old units kept as they are, new units (their
    incoming and outgoing weights) freshly initialised as torch initialises a new layer."""
    traced = trace(model, example)
    plan = wider_plan(traced, layer)
    old = traced.modules[layer]
    n = old.out_features if isinstance(old, nn.Linear) else old.out_channels
    if width < n:
        raise ConfigError(f"grow.wider: {layer!r} has {n} units; the new width {width} must be at least that")
    grown = copy.deepcopy(model)
    if width == n:
        return grown
    g = torch.cat([torch.arange(n), torch.randint(0, n, (width - n,), generator=generator)])
    counts = torch.bincount(g, minlength=n).to(old.weight.dtype)
    fresh = _seeded(generator)

    with torch.no_grad():
        new = _resized(old, out=width)
        if init == "net2net":
            new.weight.copy_(old.weight[g])
            if old.bias is not None:
                new.bias.copy_(old.bias[g])
        else:
            ref = fresh(lambda: _resized(old, out=width))
            new.load_state_dict(ref.state_dict())
            new.weight[:n] = old.weight
            if old.bias is not None:
                new.bias[:n] = old.bias
        _set(grown, layer, new)

        for path in plan.batchnorms:
            bn = traced.modules[path]
            nbn = type(bn)(width, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                           track_running_stats=bn.track_running_stats)
            for name in ("weight", "bias", "running_mean", "running_var"):
                src, dst = getattr(bn, name), getattr(nbn, name)
                if src is None:
                    continue
                if init == "net2net":
                    dst.copy_(src[g])
                else:
                    dst[:n] = src  # new channels keep BatchNorm's defaults
            if bn.num_batches_tracked is not None:
                nbn.num_batches_tracked.copy_(bn.num_batches_tracked)
            _set(grown, path, nbn)

        cons = traced.modules[plan.consumer]
        s = plan.spatial
        ncons = _resized(cons, inputs=width * s)
        u = cons.weight.reshape(cons.weight.shape[0], n, s, *cons.weight.shape[2:])  # (out, unit, spatial, kh, kw)
        if init == "net2net":
            shape = (1, width, 1) + (1,) * (u.dim() - 3)
            w = u[:, g] / counts[g].reshape(shape)
            if noise > 0:
                eps = torch.randn(w.shape, generator=generator, dtype=w.dtype) * (noise * cons.weight.std())
                group_sum = torch.zeros_like(u).index_add_(1, g, eps)
                eps -= (group_sum / counts.reshape((1, n, 1) + (1,) * (u.dim() - 3)))[:, g]  # zero-sum per unit
                w += eps
        else:
            ref = fresh(lambda: _resized(cons, inputs=width * s))
            w = ref.weight.reshape(u.shape[0], width, *u.shape[2:]).clone()
            w[:, :n] = u
        ncons.weight.copy_(w.reshape(ncons.weight.shape))
        if cons.bias is not None:
            ncons.bias.copy_(cons.bias)
        _set(grown, plan.consumer, ncons)
    return grown


def _resized(m: nn.Module, out: int | None = None, inputs: int | None = None) -> nn.Module:
    """``m``'s kind with other widths (its initial weights are overwritten; the global RNG is left alone)."""
    with torch.random.fork_rng(devices=[]):
        return _resized_module(m, out, inputs)


def _resized_module(m: nn.Module, out: int | None, inputs: int | None) -> nn.Module:
    if isinstance(m, nn.Linear):
        return nn.Linear(inputs or m.in_features, out or m.out_features, bias=m.bias is not None,
                         dtype=m.weight.dtype, device=m.weight.device)
    return nn.Conv2d(inputs or m.in_channels, out or m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                     m.groups, m.bias is not None, m.padding_mode, dtype=m.weight.dtype, device=m.weight.device)


def _seeded(generator: torch.Generator):
    """Build modules with torch's default initialisation, drawn from ``generator`` (the global RNG
    is left alone)."""

    def build(make):
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return make()

    return build


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


# --- Net2DeeperNet ------------------------------------------------------------------------------


@dataclass
class DeeperPlan:
    layer: str
    wrap: str  # the module replaced by Sequential(it, activation, new layer[, new BatchNorm])
    activation: type[nn.Module]
    batchnorm: bool


def deeper_plan(traced: Traced, layer: str) -> DeeperPlan:
    """Find ``layer``'s activation; the new layer goes right after it."""
    what = "grow.deeper"
    module = traced.modules.get(layer)
    if type(module) not in LAYER_TYPES:
        raise _unknown_layer(what, layer, traced)
    _require_single_call(traced, layer, what)
    node = traced.node(layer)
    between: list[fx.Node] = []
    while True:
        users = value_users(node)
        if len(users) != 1:
            raise _multi_consumer_error(what, layer, node, users, traced)
        user = users[0]
        kind = classify(user, traced, node)
        if kind == "relu":
            break
        if kind == "act":
            raise ConfigError(f"{what}: the activation after {layer!r} is {describe(user, traced)}, which is not "
                              "idempotent; an identity layer preserves the function only after ReLU (relu(relu(x)) = "
                              "relu(x))")
        if kind in ("bn", "pass", "maxpool"):
            between.append(user)
            node = user
            continue
        raise ConfigError(f"{what}: {layer!r} has no activation after it (its output goes to "
                          f"{describe(user, traced)}); Net2DeeperNet inserts the new layer after a ReLU")
    bns = [n for n in between if classify(n, traced, n.args[0]) == "bn"]
    if node.op == "call_module" and traced.calls[node.target] == 1:
        wrap = node.target
    elif all(classify(n, traced, n.args[0]) == "maxpool" for n in between):
        wrap = layer  # relu commutes with max pooling: L -> ReLU -> new -> pool -> relu computes the same
    else:
        raise ConfigError(f"{what}: cannot insert a layer after {layer!r}: the activation's input "
                          f"{describe(node, traced)} is not a module used once, which grow could wrap")
    return DeeperPlan(layer, wrap, _relu_type(user, traced), bool(bns))


def deepen(model: nn.Module, layer: str, *, example: torch.Tensor, calibration: torch.Tensor | None = None,
           init: Init = "net2net", generator: torch.Generator | None = None) -> nn.Module:
    """A copy of ``model`` with an identity layer inserted after ``layer``'s activation (Net2DeeperNet).

    ``init = "random"`` inserts a freshly initialised layer instead (the random-pad baseline)."""
    traced = trace(model, example)
    plan = deeper_plan(traced, layer)
    old = traced.modules[layer]
    grown = copy.deepcopy(model)
    width = old.out_features if isinstance(old, nn.Linear) else old.out_channels
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    with torch.no_grad():
        with torch.random.fork_rng(devices=[]):  # initial weights overwritten below; the global RNG is left alone
            if isinstance(old, nn.Linear):
                new = nn.Linear(width, width)
                bn = nn.BatchNorm1d(width) if plan.batchnorm else None
            else:
                k = old.kernel_size[0] if old.kernel_size[0] == old.kernel_size[1] and old.kernel_size[0] % 2 else 3
                new = nn.Conv2d(width, width, k, padding=k // 2)
                bn = nn.BatchNorm2d(width) if plan.batchnorm else None
        if init == "net2net":
            new.weight.zero_()
            new.bias.zero_()
            if isinstance(new, nn.Linear):
                new.weight.copy_(torch.eye(width))
            else:
                new.weight[torch.arange(width), torch.arange(width), k // 2, k // 2] = 1.0
        else:
            new.load_state_dict(_seeded(generator)(lambda: type(new)(*_ctor(new))).state_dict())
        new = new.to(old.weight.dtype)
        tail = grown.get_submodule(plan.wrap)
        block = nn.Sequential(tail, plan.activation(), new, *([bn.to(old.weight.dtype)] if bn is not None else []))
        _set(grown, plan.wrap, block)
    if bn is not None and init == "net2net":
        _undo_normalisation(grown, bn, calibration if calibration is not None else example)
    return grown


def _ctor(m: nn.Module) -> tuple:
    if isinstance(m, nn.Linear):
        return (m.in_features, m.out_features)
    return (m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding)


@torch.no_grad()
def _undo_normalisation(model: nn.Module, bn: nn.modules.batchnorm._BatchNorm, inputs: torch.Tensor) -> None:
    """Set ``bn`` to the identity on ``inputs``' statistics: running mean/var = the statistics of its
    input, weight = sqrt(var + eps), bias = mean. In eval mode it is then exactly the identity; in
    training mode (batch statistics) nearly so."""
    seen: list[torch.Tensor] = []
    handle = bn.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(inputs), 512):
            model(inputs[i : i + 512])
    finally:
        handle.remove()
        model.train(was_training)
    x = torch.cat(seen).double()
    dims = [0] + list(range(2, x.dim()))
    mean, var = x.mean(dims), x.var(dims, unbiased=False)
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)
    bn.weight.copy_(torch.sqrt(var + bn.eps))
    bn.bias.copy_(mean)


# --- new classes --------------------------------------------------------------------------------


def output_layer(traced: Traced) -> str:
    """The Linear whose output is the model's output (through Identity/Dropout at most)."""
    out = next(n for n in traced.graph.nodes if n.op == "output")
    node = out.args[0]
    while isinstance(node, fx.Node):
        if node.op == "call_module" and type(traced.modules[node.target]) is nn.Linear:
            if len(value_users(node)) == 1:
                return node.target
            break
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if src is None or not _identity_like(node, traced, src):
            break
        node = src
    raise ConfigError("grow.classes: the model's output is not a Linear layer's output (through Identity/Dropout at "
                      f"most; found {describe(node, traced) if isinstance(node, fx.Node) else type(node).__name__}); "
                      "grow can add classes only to a Linear output layer")


def _identity_like(node: fx.Node, traced: Traced, source: fx.Node) -> bool:
    """Identity in eval mode: Identity, Dropout, .contiguous()."""
    if classify(node, traced, source) != "pass":
        return False
    if node.op == "call_module":
        return isinstance(traced.modules[node.target], (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d))
    return node.target in (F.dropout, F.dropout1d, F.dropout2d, "contiguous")


def extend_classes(model: nn.Module, num_classes: int, *, example: torch.Tensor, generator: torch.Generator,
                   calibration: torch.Tensor | None = None, noise: float = 0.0) -> nn.Module:
    """A copy of ``model`` whose output Linear has ``num_classes`` rows; the old rows are kept.

    The new rows start at zero weights (plus ``noise`` times the layer's weight std) and a bias one
    below the smallest top logit the model produces on ``calibration``, so the model's predictions
    do not move until it is trained on the new classes."""
    traced = trace(model, example)
    layer = output_layer(traced)
    _require_single_call(traced, layer, "grow.classes")
    old: nn.Linear = traced.modules[layer]
    n = old.out_features
    if num_classes < n:
        raise ConfigError(f"grow.classes: the model has {n} outputs already; classes = {num_classes} would drop some")
    grown = copy.deepcopy(model)
    if num_classes == n:
        return grown
    with torch.no_grad():
        new = _resized(old, out=num_classes)
        new.weight.zero_()
        new.weight[:n] = old.weight
        if noise > 0:
            new.weight[n:] = torch.randn(num_classes - n, old.in_features, generator=generator,
                                         dtype=old.weight.dtype) * (noise * old.weight.std())
        if old.bias is not None:
            was_training = model.training
            model.eval()
            inputs = calibration if calibration is not None else example
            logits = torch.cat([model(inputs[i : i + 512]) for i in range(0, len(inputs), 512)])
            model.train(was_training)
            new.bias[:n] = old.bias
            new.bias[n:] = logits.max(1).values.min() - 1.0
        _set(grown, layer, new)
    return grown


# --- all of it ----------------------------------------------------------------------------------


@dataclass
class Step:
    op: Literal["wider", "deeper", "classes"]
    layer: str
    detail: dict[str, Any]


def plan_order(traced: Traced, wider: dict[str, int], deeper: list[str]) -> tuple[list[str], list[str]]:
    """Wider and deeper layers in forward order; unknown names refused with the list of layers."""
    layers = traced.layers()
    for what, names in (("grow.wider", list(wider)), ("grow.deeper", deeper)):
        for name in names:
            if name not in layers:
                raise _unknown_layer(what, name, traced)
    return sorted(wider, key=layers.index), sorted(deeper, key=layers.index)


def grow(model: nn.Module, *, wider: dict[str, int] | None = None, deeper: list[str] | None = None,
         classes: int | None = None, example: torch.Tensor, calibration: torch.Tensor | None = None, seed: int = 0,
         noise: float = 0.0, init: Init = "net2net") -> Iterator[tuple[Step, nn.Module]]:
    """Grow ``model`` step by step: every wider layer (forward order), every deeper one, then the
    classes. Yields each step and the model after it; each step draws from its own generator, seeded
    by (seed, step number), so a step replays identically."""
    wider, deeper = dict(wider or {}), list(deeper or [])
    if len(set(deeper)) != len(deeper):
        raise ConfigError(f"grow.deeper lists a layer twice: {deeper}")
    wide_order, deep_order = plan_order(trace(model, example), wider, deeper)
    current = model
    number = 0

    def gen() -> torch.Generator:
        return torch.Generator().manual_seed((seed * 1_000_003 + number) % 2**63)

    for layer in wide_order:
        before = _width(current, layer)
        current = widen(current, layer, wider[layer], example=example, generator=gen(), noise=noise, init=init)
        number += 1
        yield Step("wider", layer, {"from": before, "to": wider[layer]}), current
    for layer in deep_order:
        traced = trace(current, example)
        plan = deeper_plan(traced, layer)
        current = deepen(current, layer, example=example, calibration=calibration, init=init, generator=gen())
        number += 1
        inserted = f"{plan.wrap}.2"
        yield Step("deeper", layer, {"inserted": inserted, "type": type(current.get_submodule(inserted)).__name__,
                                     "batchnorm": plan.batchnorm}), current
    if classes is not None:
        traced = trace(current, example)
        head = output_layer(traced)
        before = traced.modules[head].out_features
        current = extend_classes(current, classes, example=example, generator=gen(), calibration=calibration,
                                 noise=noise)
        number += 1
        yield Step("classes", head, {"from": before, "to": classes}), current


def _width(model: nn.Module, layer: str) -> int:
    m = model.get_submodule(layer)
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels
