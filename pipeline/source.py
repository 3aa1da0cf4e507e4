"""The pipeline's input: the user's model, freshly initialised or loaded from ``--weights``."""

from __future__ import annotations

from pathlib import Path

import torch

from edgec.base import architecture
from edgec.base.architecture import ModelTrust
from edgec.base.checkpoint import Checkpoint, load_weights
from edgec.base.data import Dataset, physical_memory
from edgec.base.errors import ConfigError, InputError
from edgec.zoo import ZOO

from .artifact import CHECKPOINT_FILE, MODEL, Artifact
from .cache import StageCache, sha256_file, stable_hash
from .modelinfo import model_info
from .training import seed_everything

VERSION = 2


def resolve_arch(name: str | None, args: dict, weights: Path | None, data: Dataset,
                 trust: ModelTrust) -> tuple[dict, Checkpoint | None]:
    """The architecture record, and the checkpoint when ``weights`` is an edgec checkpoint. A
    checkpoint naming a factory the user did not name is refused before anything is imported."""
    loaded = load_weights(weights) if weights else None
    if isinstance(loaded, Checkpoint):
        base = loaded.arch["base"]
        named = base["name"] if base["kind"] == "zoo" else base["factory"]
        if name and name != named:
            raise ConfigError(f"--model {name} disagrees with the checkpoint's model {named}; drop --model")
        trust.require(base, str(weights))
        return loaded.arch, loaded
    if not name:
        if weights is None:
            raise ConfigError("no model given: name one with --model (or [model] name), or pass --weights")
        raise ConfigError(f"{weights} is a plain state dict: say which model it belongs to with --model")
    base = (architecture.zoo_base(name, data.input_shape, data.num_classes, **args) if name in ZOO
            else architecture.factory_base(name, **_factory_args(name, args, data)))
    arch = architecture.record(base)
    _require_fits_memory(arch, trust)
    if loaded is None:
        return arch, None
    ckpt = Checkpoint(arch, loaded, origin=str(weights))
    ckpt.build(trust)  # raises InputError naming the first mismatching tensor
    return arch, ckpt


# Training holds each parameter four times (weights, gradients, two optimiser moments), fp32.
TRAINING_BYTES_PER_PARAMETER = 4 * 4


def _require_fits_memory(arch: dict, trust: ModelTrust) -> None:
    """Refuse, before anything is allocated, a model (sized on the meta device) that could not be
    trained in this machine's memory: huge [model] args would otherwise fail in the allocator."""
    shapes = architecture.dry_shapes(arch, trust, "the model")
    memory = physical_memory()
    if shapes is None or not memory:
        return
    params = architecture.parameter_count(shapes)
    if params * TRAINING_BYTES_PER_PARAMETER > memory:
        raise ConfigError(
            f"model {architecture.describe(arch)} has {params:,} parameters ({params * 4 / 2**30:.1f} GiB as fp32, about "
            f"{params * TRAINING_BYTES_PER_PARAMETER / 2**30:.1f} GiB to train); this machine has {memory / 2**30:.1f} GiB "
            "of memory: choose smaller [model] args (widths, channels)"
        )


def _factory_args(factory: str, args: dict, data: Dataset) -> dict:
    """A user factory gets what the zoo gets (input_shape, in_channels, num_classes) when its
    signature accepts them and [model] args does not set them."""
    import inspect

    module, _, attr = factory.partition(":")
    try:
        params = inspect.signature(getattr(architecture.import_user_module(module), attr)).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return dict(args)  # the build reports the import error with its fix
    offered = {"input_shape": list(data.input_shape), "num_classes": data.num_classes}
    if data.is_image:
        offered["in_channels"] = data.input_shape[0]
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {**{k: v for k, v in offered.items() if k in params or accepts_any}, **args}


def make_source(
    name: str | None, args: dict, weights: Path | None, data: Dataset, seed: int, cache: StageCache, trust: ModelTrust
) -> Artifact:
    arch, loaded = resolve_arch(name, args, weights, data, trust)
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
            ckpt = Checkpoint(arch, architecture.build(arch, trust).state_dict())
        model = ckpt.build(trust)
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
    if data.task != "classification":  # regression / reconstruction: the objective knows the output it needs
        from .objectives import objective_for

        objective_for(data).check_output(out, data)
        return
    if out.dim() != 2 or out.shape != (2, data.num_classes):
        raise InputError(
            f"the model outputs shape {list(out.shape[1:])} per sample but the data has {data.num_classes} classes"
        )
