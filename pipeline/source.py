"""The pipeline's input: the user's model, freshly initialised or loaded from ``--weights``."""

from __future__ import annotations

from pathlib import Path

import torch

from edgec.checkpoint import Checkpoint, build_model, describe_arch, factory_arch, load_weights, zoo_arch
from edgec.data import Dataset
from edgec.errors import ConfigError, InputError
from edgec.zoo import ZOO

from .artifact import CHECKPOINT_FILE, MODEL, Artifact
from .cache import StageCache, sha256_file, stable_hash
from .modelinfo import model_info
from .training import seed_everything

VERSION = 1


def resolve_arch(name: str | None, args: dict, weights: Path | None, data: Dataset) -> tuple[dict, Checkpoint | None]:
    """The architecture spec, and the checkpoint when ``weights`` is an edgec checkpoint."""
    loaded = load_weights(weights) if weights else None
    if isinstance(loaded, Checkpoint):
        if name and name != describe_arch(loaded.arch):
            raise ConfigError(
                f"--model {name} disagrees with the checkpoint's model {describe_arch(loaded.arch)}; drop --model"
            )
        return loaded.arch, loaded
    if not name:
        if weights is None:
            raise ConfigError("no model given: name one with --model (or [model] name), or pass --weights")
        raise ConfigError(f"{weights} is a plain state dict: say which model it belongs to with --model")
    arch = zoo_arch(name, data.input_shape, data.num_classes, **args) if name in ZOO else factory_arch(name, **args)
    if loaded is None:
        return arch, None
    ckpt = Checkpoint(arch, loaded)
    ckpt.build()  # raises InputError naming the first mismatching key
    return arch, ckpt


def make_source(
    name: str | None, args: dict, weights: Path | None, data: Dataset, seed: int, cache: StageCache
) -> Artifact:
    arch, loaded = resolve_arch(name, args, weights, data)
    key = stable_hash(
        {"source": VERSION, "arch": arch, "weights": sha256_file(weights) if weights else None, "seed": seed}
    )
    cached = cache.get("source", key)
    if cached is not None:
        return cached

    def build(out: Path) -> dict:
        if loaded is not None:
            ckpt = loaded
        else:
            seed_everything(seed)
            ckpt = Checkpoint(arch, build_model(arch).state_dict())
        model = ckpt.build()
        _check_output(model, data)
        ckpt.save(out / CHECKPOINT_FILE)
        return model_info(model, data)

    return cache.put("source", key, MODEL, build)


def _check_output(model: torch.nn.Module, data: Dataset) -> None:
    example = torch.from_numpy(data.to_input(data.x_train[:2]))
    try:
        with torch.no_grad():
            out = model(example)
    except Exception as e:  # a user model that cannot take this data's samples
        raise InputError(
            f"the model cannot run on this data's samples of shape {list(data.input_shape)}: {e}"
        ) from None
    if out.shape != (2, data.num_classes):
        raise InputError(
            f"the model outputs shape {list(out.shape[1:])} per sample but the data has {data.num_classes} classes"
        )
