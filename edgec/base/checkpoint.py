"""edgec checkpoints: architecture record + weights (+ masks, codebooks, stage state) in one file.

A checkpoint is a plain dict of tensors, strings and numbers, so ``torch.load(weights_only=True)``
reads it without unpickling code. The architecture is a record (:mod:`edgec.base.architecture`): a base
model plus plain-data edits, so ``--weights ckpt.pt`` needs no ``--model`` for zoo models and any
model a stage changed (wider, deeper, fewer channels, new heads) can be rebuilt.

Format 2 (format 1, whose ``arch`` was the base alone, still loads)::

    {"format": "edgec-checkpoint", "format_version": 2,
     "arch": {"base": {...}, "edits": [...]},
     "state_dict": {name: tensor}, "masks": {param: bool tensor}, "codebooks": {param: tensor},
     "extensions": {namespace: plain data or tensors}}   # stage state, e.g. per-task masks
"""

from __future__ import annotations

import io
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import architecture
from .architecture import ModelTrust
from .errors import InputError

FORMAT = "edgec-checkpoint"
FORMAT_VERSION = 2
_KEYS = {
    1: {"format", "format_version", "arch", "state_dict", "masks", "codebooks"},
    2: {"format", "format_version", "arch", "state_dict", "masks", "codebooks", "extensions"},
}


@dataclass
class Checkpoint:
    arch: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    codebooks: dict[str, torch.Tensor] = field(default_factory=dict)
    extensions: dict[str, Any] = field(default_factory=dict)
    origin: str = "the checkpoint"

    def build(self, trust: ModelTrust) -> nn.Module:
        """A fresh eval-mode model with these weights (the checkpoint itself is untouched).

        The record is first built on the meta device and its shapes compared with the weights, so a
        file cannot make edgec allocate more than the weights it holds."""
        expected = {k: tuple(v.shape) for k, v in self.state_dict.items()}
        shapes = architecture.dry_shapes(self.arch, trust, self.origin)
        if shapes is not None and shapes != expected:
            raise InputError(f"weights do not fit the model {architecture.describe(self.arch)}: {_first_difference(shapes, expected)}")
        model = architecture.build(self.arch, trust, self.origin)
        try:
            model.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as e:
            first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
            raise InputError(f"weights do not fit the model {architecture.describe(self.arch)}: {first}") from None
        return model.eval()

    def with_model(self, model: nn.Module, trust: ModelTrust) -> Checkpoint:
        """A new checkpoint for ``model``, whose modules a stage may have changed: the record gets the
        edits that rebuild it; masks and codebooks of parameters whose shape changed are dropped."""
        base = architecture.build(architecture.record(self.arch["base"]), trust, self.origin)
        arch = architecture.record(self.arch["base"], architecture.diff_edits(base, model))
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        keep = lambda d: {k: v for k, v in d.items() if k in state and _fits(v, state[k])}  # noqa: E731
        return Checkpoint(arch, state, keep(self.masks), keep(self.codebooks), dict(self.extensions), self.origin)

    def first_nonfinite(self) -> str | None:
        """The name of the first weight, buffer or codebook holding NaN or an infinity, or None."""
        for table in (self.state_dict, self.codebooks):
            for name, t in table.items():
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    return name
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "arch": self.arch,
            "state_dict": self.state_dict,
            "masks": self.masks,
            "codebooks": self.codebooks,
            "extensions": self.extensions,
        }

    def save(self, path: Path) -> None:
        # Serialise to memory first: torch.save on a path leaves a partial file on failure.
        buf = io.BytesIO()
        torch.save(self.to_dict(), buf)
        path.write_bytes(buf.getvalue())


def _fits(aux: torch.Tensor, weight: torch.Tensor) -> bool:
    return aux.dim() <= 1 or aux.shape == weight.shape


def _first_difference(a: dict, b: dict) -> str:
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            return f"{k}: the model has {list(a[k]) if k in a else 'no such tensor'}, the weights {list(b[k]) if k in b else 'none'}"
    return "shapes differ"


def load_checkpoint(path: Path, data: bytes | None = None) -> Checkpoint:
    """Load an edgec checkpoint; everything in it is checked before anything is built. ``data``: the
    file's bytes, already read (and checked) by the caller; ``path`` then only names it."""
    return _from_dict(_safe_load(path, data), path)


def _from_dict(obj: Any, path: Path) -> Checkpoint:
    if not (isinstance(obj, dict) and obj.get("format") == FORMAT):
        raise InputError(f"{path} is not an edgec checkpoint")
    version = obj.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise InputError(f"{path}: format_version {version!r} is not a checkpoint version")
    if version > FORMAT_VERSION:
        raise InputError(f"{path} has checkpoint format {version}; upgrade edgec to read it")
    unknown = set(obj) - _KEYS[version]
    if unknown:
        raise InputError(f"{path}: keys {sorted(unknown)} are not part of checkpoint format {version}; the file was altered "
                         "or written by another tool")
    arch = obj.get("arch")
    if version == 1:
        arch = {"base": arch, "edits": []}
    arch = architecture.validate_record(arch, str(path))
    state = obj.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise InputError(f"{path}: state_dict is not a mapping of names to tensors")
    tables = {}
    for key in ("masks", "codebooks"):
        table = obj.get(key, {})
        if not isinstance(table, dict) or not all(k in state and isinstance(v, torch.Tensor) for k, v in table.items()):
            raise InputError(f"{path}: {key} must map parameter names of state_dict to tensors")
        tables[key] = table
    extensions = obj.get("extensions", {})
    if not isinstance(extensions, dict) or not all(isinstance(k, str) for k in extensions):
        raise InputError(f"{path}: extensions must map namespaces to data")
    return Checkpoint(arch, state, tables["masks"], tables["codebooks"], extensions, origin=str(path))


def load_weights(path: Path) -> Checkpoint | dict[str, torch.Tensor]:
    """Read ``--weights``: an edgec checkpoint, or a plain state dict (which then needs ``--model``)."""
    obj = _safe_load(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return _from_dict(obj, path)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # the common {"state_dict": ..., "epoch": ...} training checkpoint
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return obj
    raise InputError(
        f"{path} is not a state dict (a mapping of parameter names to tensors); save one with "
        "torch.save(model.state_dict(), path)"
    )


def _other_format(path: Path, data: bytes | None) -> str | None:
    """What ``path`` is when its first bytes (or, for formats without a magic number, its suffix) say
    it is a known file that is not a torch checkpoint: samples, an exported model, an archive."""
    if data is None:
        with open(path, "rb") as f:
            head = f.read(8)
    else:
        head = data[:8]
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy array (.npy)"
    if head[4:8] == b"TFL3":
        return "a TFLite model"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path if data is None else io.BytesIO(data)) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return None
        if names and all(n.endswith(".npy") for n in names):
            return "a NumPy archive (.npz)"
        return None  # torch.save writes zip files too
    if head.startswith((b"\x1f\x8b", b"\x89PNG", b"\xff\xd8\xff")):
        return "a gzip file" if head[0] == 0x1F else "an image"
    if path.suffix.lower() in (".onnx", ".tflite", ".npy", ".npz", ".json", ".toml", ".csv", ".txt"):
        return f"a {path.suffix.lower()} file"
    return None


def _safe_load(path: Path, data: bytes | None = None) -> Any:
    if data is None and not path.is_file():
        raise InputError(f"weights file {path} does not exist")
    other = _other_format(path, data)
    if other:
        raise InputError(f"{path} is {other}, not a model checkpoint; --weights takes an edgec checkpoint or a "
                         "state dict saved with torch.save(model.state_dict(), path)")
    try:
        return torch.load(path if data is None else io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise InputError(
            f"{path} holds pickled code or objects that weights_only loading refuses; "
            "re-save it as a plain state dict: torch.save(model.state_dict(), path)"
        ) from None
    except Exception as e:  # garbage bytes surface as struct, EOF, zip or runtime errors alike
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise InputError(f"{path} is not a readable torch file ({reason}); save it with torch.save") from None
