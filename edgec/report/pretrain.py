"""The build report's pretraining section (builds with a ``pretrain`` stage): what each layer of the
stacked denoising autoencoders keeps of the input, and the per-layer gradient norms of the supervised
loss from the source's weights and from the pretrained ones (the vanishing-gradient diagnostic).

The reconstructions come from the stage's ``reconstructions.npz`` in the stage cache, read as hostile
input: numeric arrays only (no pickles), every header's size checked before its data is read, and
every shape range-checked before anything is drawn.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .document import Doc, Image, Table, fmt_metric
from .plots import figure, png

IMAGES = ("pretrain_reconstructions", "pretrain_gradients")  # written only for builds with a pretrain stage
RECONSTRUCTIONS_FILE = "reconstructions.npz"  # as pipeline/stages/pretrain.py writes it
MAX_NPZ_BYTES = 64 << 20
MAX_SAMPLES = 64
MAX_LAYERS = 64
MAX_IMAGE_SIDE = 1024


class BadReconstructions(ValueError):
    """reconstructions.npz is not what the pretrain stage writes."""


def pretrain_section(doc: Doc, summary: dict[str, Any]) -> None:
    stages = [s for s in summary.get("stages", []) if s.get("kind") == "pretrain" and (s.get("info") or {}).get("pretrain")]
    if not stages:
        return
    stage = stages[-1]
    info = stage["info"]["pretrain"]
    doc.h2("Pretraining (stacked denoising autoencoders)")
    if len(stages) > 1:
        doc.p(f"{len(stages)} pretrain stages; shown: `{stage['id']}`, the last.")
    doc.p(f"`{stage['id']}`: each hidden layer trained as a tied-weight autoencoder ReLU(W^T ReLU(W x)) on "
          f"{info.get('noise')} noise (level {info.get('level')}), {info.get('epochs', '?')} epochs per layer, the layers "
          "below it frozen.")
    _layer_table(doc, info)
    _gradients(doc, info)
    _reconstructions(doc, summary, stage)


def _layer_table(doc: Doc, info: dict[str, Any]) -> None:
    grads = info.get("grad_norms") or {}
    before, after = grads.get("before") or [], grads.get("pretrained") or []
    rows = []
    for i, layer in enumerate(info.get("layers") or []):
        losses = layer.get("loss") or []
        rows.append([f"`{layer.get('layer')}`", f"{layer.get('in')} -> {layer.get('out')}",
                     fmt_metric(losses[0] if losses else None), fmt_metric(losses[-1] if losses else None),
                     fmt_metric(layer.get("val_loss")),
                     fmt_metric(before[i] if i < len(before) else None), fmt_metric(after[i] if i < len(after) else None)])
    doc.table(Table(["layer", "units", "loss, first epoch", "loss, last epoch", "validation loss (clean)",
                     "grad norm, before", "grad norm, pretrained"], rows, right={2, 3, 4, 5, 6}))
    doc.p("Losses: mean squared reconstruction error of the layer's own input (training: from the corrupted input; "
          "validation: from the clean one). Grad norm: L2 norm of the layer's weight gradient under the "
          "classification loss, mean over the first 8 training batches, with the weights before the stage (the random "
          "initialisation when pretrain comes first) and after it.")


def _gradients(doc: Doc, info: dict[str, Any]) -> None:
    grads = info.get("grad_norms") or {}
    layers, before, after = grads.get("layers") or [], grads.get("before") or [], grads.get("pretrained") or []
    if not layers or len(before) != len(layers) or len(after) != len(layers):
        doc.skipped("gradient norms plot", "the stage recorded no per-layer gradient norms")
        return
    try:
        image = plot_gradient_norms(layers, before, after)
    except Exception as e:
        doc.skipped("gradient norms plot", f"the plot failed ({type(e).__name__}: {e})")
        return
    doc.image(Image("pretrain_gradients", "Gradient norms per hidden layer", image,
                    "L2 norm of each hidden layer's weight gradient under the classification loss (log scale), from "
                    "the weights before pretraining and from the pretrained ones; lower layers with far smaller "
                    "gradients than upper ones are the vanishing gradients pretraining is meant to ease."))


def _reconstructions(doc: Doc, summary: dict[str, Any], stage: dict[str, Any]) -> None:
    what = "layer reconstructions"
    cache = (summary.get("config") or {}).get("cache_dir")
    path = Path(cache).expanduser() / "pretrain" / str(stage.get("key")) / RECONSTRUCTIONS_FILE if cache else None
    if path is None or not stage.get("key") or not path.is_file():
        doc.skipped(what, f"{RECONSTRUCTIONS_FILE} of `{stage['id']}` is no longer in the stage cache; rebuild to bring it back")
        return
    try:
        shape, rows = read_reconstructions(path)
    except BadReconstructions as e:
        doc.skipped(what, str(e))
        return
    if len(shape) != 3 or shape[0] not in (1, 3):
        doc.skipped(what, f"inputs of shape {list(shape)} are not images")
        return
    try:
        image = plot_reconstructions(shape, rows)
    except Exception as e:
        doc.skipped(what, f"the plot failed ({type(e).__name__}: {e})")
        return
    doc.image(Image("pretrain_reconstructions", "What each layer keeps of the input", image,
                    "Validation images (top row) and, per hidden layer, the image decoded back through the tied "
                    "decoders of that layer and every layer below it (no noise)."))


def read_reconstructions(path: Path) -> tuple[tuple[int, ...], dict[str, np.ndarray]]:
    """``(image shape, {"input": (n, features), "layer1": ..., ...})`` from a pretrain stage's
    reconstructions.npz, or BadReconstructions saying what is wrong."""
    from edgec.ondevice.errors import BundleError
    from edgec.ondevice.manifest import load_npz

    try:
        with open(path, "rb") as f:
            arrays = load_npz(f, RECONSTRUCTIONS_FILE, MAX_NPZ_BYTES, keys=("image_shape", "input", "layer1"))
    except (BundleError, OSError) as e:
        raise BadReconstructions(f"{RECONSTRUCTIONS_FILE} is unreadable ({getattr(e, 'message', e)})") from None
    dims = arrays.pop("image_shape")
    if dims.ndim != 1 or not 1 <= dims.size <= 3 or dims.dtype.kind not in "iu" or not all(1 <= d <= MAX_IMAGE_SIDE for d in dims):
        raise BadReconstructions(f"image_shape {dims.tolist()[:8]} is not 1 to 3 sides of 1..{MAX_IMAGE_SIDE}")
    shape = tuple(int(d) for d in dims)
    expected = [f"layer{i}" for i in range(1, len(arrays))]
    if sorted(arrays) != sorted(["input", *expected]) or len(expected) > MAX_LAYERS:
        raise BadReconstructions(f"it holds {sorted(arrays)[:8]}; expected input and layer1..layerN (N <= {MAX_LAYERS})")
    n_in = arrays["input"].shape
    if len(n_in) != 2 or not 1 <= n_in[0] <= MAX_SAMPLES or n_in[1] != math.prod(shape):
        raise BadReconstructions(f"input has shape {list(n_in)}; expected (1..{MAX_SAMPLES}, {math.prod(shape)})")
    for name in ["input", *expected]:
        a = arrays[name]
        if a.shape != n_in or a.dtype.kind != "f" or not np.isfinite(a).all():
            raise BadReconstructions(f"{name} is {list(a.shape)} {a.dtype}; expected finite floats of shape {list(n_in)}")
    return shape, {name: arrays[name] for name in ["input", *expected]}


def plot_reconstructions(shape: tuple[int, ...], rows: dict[str, np.ndarray]) -> bytes:
    """One row per entry of ``rows`` (the input, then each layer), one column per sample."""
    n = len(rows["input"])
    fig, axes = figure(1.1 * n + 0.8, 1.1 * len(rows) + 0.3, (len(rows), n), squeeze=False)
    lo, hi = float(rows["input"].min()), float(rows["input"].max())
    for r, (name, values) in enumerate(rows.items()):
        for j in range(n):
            img = values[j].reshape(shape)
            pic = img[0] if shape[0] == 1 else np.clip((img.transpose(1, 2, 0) - lo) / max(hi - lo, 1e-12), 0, 1)
            ax = axes[r][j]
            ax.imshow(pic, cmap="gray" if shape[0] == 1 else None, vmin=lo, vmax=hi)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(name, fontsize=8)
    return png(fig)


def plot_gradient_norms(layers: list[str], before: list[float], after: list[float]) -> bytes:
    fig, ax = figure(max(4.5, 1.2 * len(layers) + 2), 3.4)
    x = np.arange(len(layers))
    ax.bar(x - 0.2, before, 0.4, label="before pretrain", color="#999999")
    ax.bar(x + 0.2, after, 0.4, label="pretrained", color="#1f77b4")
    ax.set_xticks(x, layers, fontsize=8)
    if min(before + after) > 0:
        ax.set_yscale("log")
    ax.set_ylabel("weight gradient L2 norm")
    ax.set_xlabel("hidden layer (input side first)")
    ax.legend(fontsize=8)
    return png(fig)
