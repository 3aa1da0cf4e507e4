"""Piggyback settings on Permuted-MNIST, judged on the VALIDATION split only (BENCHMARKS.md).

    python benchmarks/piggyback_sweep.py [--data ../shared/data/mnist] p2:1e-3:1e-2:2e-5:5e-3[:biases][:e7][:L0] ...

The benchmark's backbone (MLP 784-256-256 trained on task p1 with its recipe: 4 epochs, Adam 2e-3,
cosine) is trained once; then each setting ``task:mask_lr:mask_init:mask_keep:lr`` learns that
task's mask and a new head over it with the learn stage's own pieces (``MaskedTaskView``, the keep
penalty, the scores in units of ``mask_lr / lr``, ``fit``'s best validation epoch); a ``:biases``
suffix also trains the task's own biases (``task_biases``), ``:eN`` trains N epochs, ``:LN`` masks
only hidden layer N's weights (default: both hidden layers, as the learn stage does). Printed per
setting, one JSON line: the best validation accuracy, the share of weights the mask drops (per
layer too) and the bytes its coded flips take in the bundle (``mask_codec``'s smallest coding and
position order, LZMA as the tasks payload compresses them). Test accuracy is never looked at.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console

from edgec.base.data import load_dataset
from edgec.data_views import permute_features
from edgec.ondevice import mask_codec
from edgec.pipeline.algorithms import piggyback as pb
from edgec.pipeline.algorithms.transport_codec import compress_section
from edgec.pipeline.training import OptimConfig, fit
from edgec.zoo import MLP

ROOT = Path(__file__).resolve().parents[1]
TRAIN = OptimConfig(epochs=4, batch_size=64, lr=2e-3, patience=4, device="cpu")  # continual.py's TRAIN
MASKED = ["hidden.0.weight", "hidden.1.weight"]


def int8_bytes(weight: torch.Tensor) -> bytes:
    """The weight as the bundle's int8 bytes (symmetric, one scale per output channel): what the
    mask coding's magnitude order reads."""
    w = weight.detach().reshape(weight.shape[0], -1)
    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
    return torch.round(w / scale).to(torch.int8).numpy().tobytes()


def coded_bytes(flips: np.ndarray, base: bytes) -> int:
    """The fewest bytes the flips take in the bundle (every coding and position order, LZMA)."""
    return min(len(compress_section(mask_codec.encode(flips[mask_codec.position_order(o, base)], c)[0])[0])
               for c in mask_codec.CODINGS for o in mask_codec.ORDERS)


def learn_mask(backbone: dict, data, mask_lr: float, init: float, keep: float, lr: float, new_head: bool,
               biases: bool = False, epochs: int = TRAIN.epochs, masked: list[str] = MASKED) -> dict:
    model = MLP(data.input_shape, 10, widths=(256, 256))
    model.load_state_dict(backbone)
    if new_head:
        torch.manual_seed(1)
        model.out.reset_parameters()
    for p in model.parameters():
        p.requires_grad_(False)
    head = list(model.out.parameters())
    for p in head:
        p.requires_grad_(True)
    view = pb.MaskedTaskView(model, (0, 10), masked, init, 5e-3, score_unit=mask_lr / lr, task_biases=biases)

    def loss_fn(logits, x, y):
        return F.cross_entropy(logits, y) + keep * view.keep_penalty()

    cfg = TRAIN.model_copy(update={"lr": lr, "epochs": epochs, "patience": epochs})
    r = fit(view, data, cfg, 0, Console(quiet=True), label="mask", loss_fn=loss_fn,
            parameters=list(view.scores) + list(view.biases) + head)
    masks = view.masks()
    flips = np.concatenate([(~masks[n]).numpy().reshape(-1) for n in masked])
    return {"val_accuracy": round(r.best_val_accuracy, 4), "dropped": round(float(flips.mean()), 4),
            "dropped_per_layer": [round(float((~masks[n]).float().mean()), 4) for n in masked],
            "coded_bytes": coded_bytes(flips, b"".join(int8_bytes(backbone[n]) for n in masked))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "mnist")
    parser.add_argument("settings", nargs="+",
                        help="task:mask_lr:mask_init:mask_keep:lr[:biases][:eN][:LN], e.g. p2:1e-3:1e-2:1e-5:1e-2:biases:e7")
    args = parser.parse_args()
    torch.set_num_threads(1)
    mnist = load_dataset(f"mnist:{args.data.resolve()}", 0.1)
    first = permute_features(mnist, 1)
    torch.manual_seed(0)  # the backbone's initial weights (fit seeds only the training itself)
    model = MLP(first.input_shape, 10, widths=(256, 256))
    fit(model, first, TRAIN, 0, Console(quiet=True), label="backbone")
    backbone = {k: v.clone() for k, v in model.state_dict().items()}
    for setting in args.settings:
        task, *values = setting.split(":")
        mask_lr, init, keep, lr = map(float, values[:4])
        epochs = int(next((v[1:] for v in values[4:] if v.startswith("e")), TRAIN.epochs))
        masked = [f"hidden.{v[1:]}.weight" for v in values[4:] if v.startswith("L")] or MASKED
        start = time.perf_counter()
        row = learn_mask(backbone, permute_features(mnist, int(task[1:])), mask_lr, init, keep, lr, task != "p1",
                         biases="biases" in values[4:], epochs=epochs, masked=masked)
        print(json.dumps({"setting": setting, **row, "seconds": round(time.perf_counter() - start)}), flush=True)


if __name__ == "__main__":
    main()
