"""edgec checkpoints: architecture + weights (+ pruning masks and codebooks) in one file.

A checkpoint is a plain dict of tensors, strings and numbers, so ``torch.load(weights_only=True)``
reads it without unpickling code. The architecture is stored as a spec (zoo name or
``package.module:factory`` plus keyword arguments), so ``--weights ckpt.pt`` needs no ``--model``.
"""

from __future__ import annotations

import importlib
import io
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, InputError
from .zoo import ZOO

FORMAT = "edgec-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    arch: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    codebooks: dict[str, torch.Tensor] = field(default_factory=dict)

    def build(self) -> nn.Module:
        """A fresh eval-mode model with these weights (the checkpoint itself is untouched)."""
        model = build_model(self.arch)
        try:
            model.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as e:
            first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
            raise InputError(f"weights do not fit the model {describe_arch(self.arch)}: {first}") from None
        return model.eval()

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "arch": self.arch,
            "state_dict": self.state_dict,
            "masks": self.masks,
            "codebooks": self.codebooks,
        }

    def save(self, path: Path) -> None:
        # Serialise to memory first: torch.save on a path leaves a partial file on failure.
        buf = io.BytesIO()
        torch.save(self.to_dict(), buf)
        path.write_bytes(buf.getvalue())


def zoo_arch(name: str, input_shape, num_classes: int, **kwargs) -> dict[str, Any]:
    if name not in ZOO:
        raise ConfigError(f"unknown model {name!r}: use one of {', '.join(ZOO)} or package.module:factory")
    return {
        "kind": "zoo",
        "name": name,
        "kwargs": {"input_shape": list(input_shape), "num_classes": int(num_classes), **kwargs},
    }


def factory_arch(factory: str, **kwargs) -> dict[str, Any]:
    if ":" not in factory:
        raise ConfigError(f"model {factory!r} is neither a zoo name ({', '.join(ZOO)}) nor package.module:factory")
    return {"kind": "factory", "factory": factory, "kwargs": kwargs}


def describe_arch(arch: dict[str, Any]) -> str:
    return arch["name"] if arch["kind"] == "zoo" else arch["factory"]


def build_model(arch: dict[str, Any]) -> nn.Module:
    if arch["kind"] == "zoo":
        try:
            return ZOO[arch["name"]](**arch["kwargs"])
        except TypeError as e:  # an unknown keyword in [model] args
            raise ConfigError(f"model {arch['name']!r}: {e}; check [model] args") from None
    module_name, _, attr = arch["factory"].partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise InputError(
            f"cannot import model factory {arch['factory']!r} ({e}); make the module importable (PYTHONPATH) "
            "and check the name"
        ) from None
    model = factory(**arch["kwargs"])
    if not isinstance(model, nn.Module):
        raise InputError(f"model factory {arch['factory']!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_checkpoint(path: Path) -> Checkpoint:
    """Load an edgec checkpoint written by this module."""
    obj = _safe_load(path)
    if not (isinstance(obj, dict) and obj.get("format") == FORMAT):
        raise InputError(f"{path} is not an edgec checkpoint")
    if obj.get("format_version", 0) > FORMAT_VERSION:
        raise InputError(f"{path} has checkpoint format {obj['format_version']}; upgrade edgec to read it")
    return Checkpoint(obj["arch"], obj["state_dict"], obj.get("masks", {}), obj.get("codebooks", {}))


def load_weights(path: Path) -> Checkpoint | dict[str, torch.Tensor]:
    """Read ``--weights``: an edgec checkpoint, or a plain state dict (which then needs ``--model``)."""
    obj = _safe_load(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return load_checkpoint(path)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # the common {"state_dict": ..., "epoch": ...} training checkpoint
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return obj
    raise InputError(
        f"{path} is not a state dict (a mapping of parameter names to tensors); save one with "
        "torch.save(model.state_dict(), path)"
    )


def _safe_load(path: Path) -> Any:
    if not path.is_file():
        raise InputError(f"weights file {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise InputError(
            f"{path} holds pickled code or objects that weights_only loading refuses; "
            "re-save it as a plain state dict: torch.save(model.state_dict(), path)"
        ) from None
    except Exception as e:  # garbage bytes surface as struct, EOF, zip or runtime errors alike
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise InputError(f"{path} is not a readable torch file ({reason}); save it with torch.save") from None
