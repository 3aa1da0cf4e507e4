"""The architecture record: how to rebuild, from plain data alone, any model a stage produced.

A record is a *base* (a zoo model or the user's ``package.module:factory``, with keyword arguments)
plus a list of *edits* replayed on a freshly built base::

    {"base": {"kind": "zoo", "name": "mlp", "kwargs": {...}},
     "edits": [{"op": "set_module", "path": "hidden.0", "module": {"type": "Linear", "args": {...}}}]}

A stage may change a model in any way that replaces modules (widened or channel-pruned layers,
inserted layers, new heads): :func:`diff_edits` compares the rebuilt base with the changed model and
records each changed module as a *module spec* of an allow-listed type. The user's ``forward`` code
is untouched, so this works for zoo and user models alike.

Why hand-written: torch.fx / torch.export graphs serialise code, and pickled modules run code on
load; a checkpoint must load with ``torch.load(weights_only=True)`` and import nothing. So module
types come from a fixed allow-list and a file can never name code: a factory named inside a file is
called only when it is the one the user gave (:class:`ModelTrust`).
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from edgec.modules import ConcatHeads
from edgec.zoo import ZOO

from .errors import ConfigError, InputError
from .suggest import did_you_mean

# --- module specs ------------------------------------------------------------------------------


def _tuple(v):
    return list(v) if isinstance(v, tuple) else v


def _conv_args(m):
    return {
        "in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": _tuple(m.kernel_size),
        "stride": _tuple(m.stride), "padding": _tuple(m.padding), "dilation": _tuple(m.dilation),
        "groups": m.groups, "bias": m.bias is not None, "padding_mode": m.padding_mode,
    }


def _bn_args(m):
    return {"num_features": m.num_features, "eps": m.eps, "momentum": m.momentum, "affine": m.affine,
            "track_running_stats": m.track_running_stats}


def _pool_args(m):
    return {"kernel_size": _tuple(m.kernel_size), "stride": _tuple(m.stride), "padding": _tuple(m.padding)}


# type name -> (class, constructor arguments read from an instance)
LEAF_TYPES: dict[str, tuple[type[nn.Module], Callable[[nn.Module], dict[str, Any]]]] = {
    "Linear": (nn.Linear, lambda m: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}),
    "Conv1d": (nn.Conv1d, _conv_args),
    "Conv2d": (nn.Conv2d, _conv_args),
    "BatchNorm1d": (nn.BatchNorm1d, _bn_args),
    "BatchNorm2d": (nn.BatchNorm2d, _bn_args),
    "LayerNorm": (nn.LayerNorm, lambda m: {"normalized_shape": list(m.normalized_shape), "eps": m.eps,
                                           "elementwise_affine": m.elementwise_affine}),
    "Dropout": (nn.Dropout, lambda m: {"p": m.p}),
    "Flatten": (nn.Flatten, lambda m: {"start_dim": m.start_dim, "end_dim": m.end_dim}),
    "MaxPool2d": (nn.MaxPool2d, _pool_args),
    "AvgPool2d": (nn.AvgPool2d, _pool_args),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, lambda m: {"output_size": _tuple(m.output_size)}),
    **{name: (getattr(nn, name), lambda m: {}) for name in (
        "Identity", "ReLU", "ReLU6", "Hardswish", "Hardsigmoid", "SiLU", "GELU", "Sigmoid", "Tanh")},
}
CONTAINER_TYPES = {"Sequential": nn.Sequential, "ModuleList": nn.ModuleList, "ModuleDict": nn.ModuleDict,
                   "ConcatHeads": ConcatHeads}
_TYPE_OF = {cls: name for name, (cls, _) in LEAF_TYPES.items()} | {cls: name for name, cls in CONTAINER_TYPES.items()}


def describable(module: nn.Module) -> bool:
    return type(module) in _TYPE_OF


def module_spec(module: nn.Module, path: str = "") -> dict[str, Any]:
    """Plain-data description of an allow-listed module (containers recursively)."""
    name = _TYPE_OF.get(type(module))
    if name is None:
        raise ConfigError(
            f"cannot record module {path or '<model>'} of type {type(module).__name__} in the architecture record; "
            f"changed modules must be one of {', '.join(sorted(_TYPE_OF.values()))}"
        )
    if name in CONTAINER_TYPES:
        return {"type": name, "children": {k: module_spec(m, f"{path}.{k}" if path else k) for k, m in module._modules.items()}}
    return {"type": name, "args": LEAF_TYPES[name][1](module)}


def make_module(spec: Any, where: str = "module") -> nn.Module:
    """Build a module from a spec read from a file: only allow-listed types and argument names."""
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise InputError(f"architecture record: {where} is not a module spec")
    kind = spec["type"]
    if kind in CONTAINER_TYPES:
        children = spec.get("children")
        if set(spec) != {"type", "children"} or not isinstance(children, dict):
            raise InputError(f"architecture record: {where} ({kind}) needs exactly 'type' and 'children'")
        for k in children:
            check_module_name(k, CONTAINER_TYPES[kind], f"architecture record: {where} ({kind})")
        built = {k: make_module(v, f"{where}.{k}") for k, v in children.items()}
        if issubclass(CONTAINER_TYPES[kind], nn.ModuleDict):
            return CONTAINER_TYPES[kind](built)
        container = CONTAINER_TYPES[kind]()
        for k, m in built.items():
            container.add_module(k, m)
        return container
    if kind not in LEAF_TYPES:
        raise InputError(f"architecture record: {where} has module type {kind!r}, which edgec does not build; "
                         "the file was not written by this edgec version or was altered")
    args = spec.get("args", {})
    if set(spec) - {"type", "args"} or not isinstance(args, dict) or not all(_plain(v) for v in args.values()):
        raise InputError(f"architecture record: {where} ({kind}) has keys or arguments edgec does not know")
    cls, reader = LEAF_TYPES[kind]
    try:
        with torch.device("meta"):
            probe = cls(**args)  # argument names and ranges checked without allocating
        if reader(probe) != args and args:
            raise TypeError("arguments do not round-trip")
    except (TypeError, ValueError, RuntimeError) as e:
        raise InputError(f"architecture record: {where} ({kind}) has invalid arguments {args} ({e})") from None
    return cls(**args)


def check_module_name(name: Any, owner: type[nn.Module], where: str) -> None:
    """A module name read from a file: an identifier or an index, never a dunder and never a name
    that ``owner`` (the class the module would be set on) already has, such as ``update`` of a
    ModuleDict or ``forward``: torch refuses or silently shadows those."""
    if not isinstance(name, str) or not (name.isidentifier() or name.isdigit()) or name.startswith("__") \
            or hasattr(owner, name):
        raise InputError(f"{where} names a module {str(name)[:40]!r}, which is not a valid module name (letters, digits and "
                         "'_', not a name of a torch.nn.Module attribute); the file was altered or not written by edgec")


def _plain(v) -> bool:
    if isinstance(v, (bool, int, float, str)) or v is None:
        return True
    return isinstance(v, list) and len(v) <= 8 and all(isinstance(x, (int, float)) for x in v)


# --- records -----------------------------------------------------------------------------------


def zoo_base(name: str, input_shape, num_classes: int, **kwargs) -> dict[str, Any]:
    if name not in ZOO:
        raise ConfigError(f"unknown model {name!r}{did_you_mean(name, ZOO)}: use one of {', '.join(ZOO)} or package.module:factory")
    return {"kind": "zoo", "name": name, "kwargs": {"input_shape": list(input_shape), "num_classes": int(num_classes), **kwargs}}


def factory_base(factory: str, **kwargs) -> dict[str, Any]:
    module, sep, attr = factory.partition(":")
    if not sep or not module or not attr.isidentifier() or not all(p.isidentifier() for p in module.split(".")):
        raise ConfigError(f"model {factory!r} is neither a zoo name ({', '.join(ZOO)}) nor package.module:factory"
                          f"{did_you_mean(factory, ZOO)}")
    return {"kind": "factory", "factory": factory, "kwargs": kwargs}


def record(base: dict[str, Any], edits: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"base": base, "edits": list(edits or [])}


def describe(arch: dict[str, Any]) -> str:
    base = arch["base"]
    name = base["name"] if base["kind"] == "zoo" else base["factory"]
    return f"{name} (+{len(arch['edits'])} edits)" if arch["edits"] else name


def validate_record(arch: Any, origin: str) -> dict[str, Any]:
    """Structure check of a record read from a file; unknown keys are refused, never dropped."""
    if not isinstance(arch, dict) or set(arch) != {"base", "edits"}:
        raise InputError(f"{origin}: the architecture record has unexpected keys {sorted(arch) if isinstance(arch, dict) else arch!r}")
    base, edits = arch["base"], arch["edits"]
    if not isinstance(base, dict) or base.get("kind") not in ("zoo", "factory"):
        raise InputError(f"{origin}: the architecture base must be a zoo model or a factory")
    expected = {"kind", "name", "kwargs"} if base["kind"] == "zoo" else {"kind", "factory", "kwargs"}
    if set(base) != expected or not isinstance(base["kwargs"], dict) or not all(isinstance(k, str) for k in base["kwargs"]):
        raise InputError(f"{origin}: the architecture base has keys {sorted(base)}; expected {sorted(expected)}")
    if not isinstance(edits, list) or len(edits) > 10_000:
        raise InputError(f"{origin}: the architecture edits must be a list")
    for i, edit in enumerate(edits):
        if not isinstance(edit, dict) or set(edit) != {"op", "path", "module"} or edit["op"] != "set_module" \
                or not isinstance(edit["path"], str) or not edit["path"]:
            raise InputError(f"{origin}: architecture edit {i} is not a set_module edit this edgec version knows")
        for part in edit["path"].split("."):
            check_module_name(part, nn.Module, f"{origin}: architecture edit {i}")
    return arch


@dataclass(frozen=True)
class ModelTrust:
    """Which user factories may be imported. A factory named inside a file (checkpoint, cache entry,
    teacher) is called only when it is one the user named in the config or on the command line."""

    factories: frozenset[str] = frozenset()

    def require(self, base: dict[str, Any], origin: str) -> None:
        if base["kind"] == "factory" and base["factory"] not in self.factories:
            raise InputError(
                f"{origin} names the model factory {base['factory']!r}; edgec imports a factory only when you name it: "
                f"pass --model {base['factory']} (or [model] name) if you trust that code"
            )


def import_user_module(name: str):
    """A module of a factory the user named (trust.require has passed): from the import path, else
    from the current folder, as ``python -m`` would find it. The folder is searched after the
    installed packages, so a file there never shadows one of them, and only for this import."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        if e.name != name.split(".")[0] or cwd in sys.path:
            raise
    sys.path.append(cwd)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(cwd)


def build_base(base: dict[str, Any], trust: ModelTrust, origin: str) -> nn.Module:
    trust.require(base, origin)
    kwargs = base["kwargs"]
    if base["kind"] == "zoo":
        if base["name"] not in ZOO:
            raise InputError(f"{origin}: unknown zoo model {base['name']!r}")
        try:
            return ZOO[base["name"]](**kwargs)
        except TypeError as e:  # an unknown keyword in [model] args
            raise ConfigError(f"model {base['name']!r}: {e}; check [model] args") from None
    module_name, _, attr = base["factory"].partition(":")
    try:
        factory = getattr(import_user_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise InputError(
            f"cannot import model factory {base['factory']!r} ({e}; looked on the import path and in the current folder "
            f"{os.getcwd()}); run edgec where the module is, or put its folder on PYTHONPATH, and check the name"
        ) from None
    try:
        model = factory(**kwargs)
    except ConfigError:
        raise
    except Exception as e:  # the user's code failed: say so in one line
        raise InputError(f"model factory {base['factory']!r} raised {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise InputError(f"model factory {base['factory']!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build(arch: dict[str, Any], trust: ModelTrust, origin: str = "the model") -> nn.Module:
    """A freshly initialised model for ``arch``: the base, then every edit replayed in order."""
    model = build_base(arch["base"], trust, origin)
    for edit in arch["edits"]:
        set_module(model, edit["path"], make_module(edit["module"], f"edit of {edit['path']!r}"), origin)
    return model


def dry_shapes(arch: dict[str, Any], trust: ModelTrust, origin: str) -> dict[str, tuple[int, ...]] | None:
    """Parameter and buffer shapes of ``arch`` built on the meta device (no memory allocated), or
    None when the base cannot be built there (then the real build is the check)."""
    trust.require(arch["base"], origin)
    try:
        with torch.device("meta"):
            model = build(arch, trust, origin)
    except (InputError, ConfigError):
        raise
    except Exception:
        return None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def set_module(model: nn.Module, path: str, module: nn.Module, origin: str = "the model") -> None:
    *parents, leaf = path.split(".")
    node = model
    for part in parents:
        child = node._modules.get(part)
        if child is None:
            raise InputError(f"{origin}: an architecture edit names {path!r}, but the model has no module {part!r} there")
        node = child
    if leaf not in node._modules:
        check_module_name(leaf, type(node), f"{origin}: architecture edit {path!r}")
    if leaf in node.__dict__ and leaf not in node._modules:
        raise InputError(f"{origin}: an architecture edit names {path!r}, which is not a module slot")
    setattr(node, leaf, module)


def diff_edits(base: nn.Module, changed: nn.Module) -> list[dict[str, Any]]:
    """The set_module edits that turn ``base`` into ``changed`` (shapes and module types; weights
    are the state dict's business)."""
    edits: list[dict[str, Any]] = []
    _diff("", base, changed, edits)
    return edits


def _diff(path: str, a: nn.Module | None, b: nn.Module, edits: list) -> None:
    if describable(b):
        if a is not None and describable(a) and _same_spec(a, b, path):
            return
        if a is not None and type(a) is type(b) and type(b) in CONTAINER_TYPES.values() and set(a._modules) <= set(b._modules):
            for k, child in b._modules.items():
                _diff(f"{path}.{k}" if path else k, a._modules.get(k), child, edits)
            return
        if not path:
            raise ConfigError("a stage replaced the whole model; edgec records changes to its modules only")
        edits.append({"op": "set_module", "path": path, "module": module_spec(b, path)})
        return
    if a is None or not _same_class(type(a), type(b)):
        raise ConfigError(
            f"module {path or '<model>'} became a {type(b).__name__}, which cannot be recorded (only allow-listed torch.nn "
            "modules can be added or replaced)"
        )
    for name, t in list(b._parameters.items()) + list(b._buffers.items()):
        old = a._parameters.get(name, a._buffers.get(name))
        if (old is None) != (t is None) or (t is not None and old.shape != t.shape):
            raise ConfigError(f"parameter {path + '.' if path else ''}{name} of {type(b).__name__} changed shape; edgec can "
                              "record only whole-module changes")
    if set(a._modules) - set(b._modules):
        raise ConfigError(f"module {path or '<model>'} lost children {sorted(set(a._modules) - set(b._modules))}")
    for k, child in b._modules.items():
        if child is not None:
            _diff(f"{path}.{k}" if path else k, a._modules.get(k), child, edits)


def _same_class(a: type, b: type) -> bool:
    """The same class, or the same class definition: a factory that defines its block class inside
    itself makes a new class object on every call, so the rebuilt base's blocks are never ``is`` the
    trained model's."""
    return a is b or (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def _same_spec(a: nn.Module, b: nn.Module, path: str) -> bool:
    try:
        return module_spec(a, path) == module_spec(b, path)
    except ConfigError:  # a container holding the user's own modules (a Sequential of blocks): compare child by child
        return False


def parameter_count(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes.values())
