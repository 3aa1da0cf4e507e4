"""Greedy layer-wise pretraining of an MLP's hidden layers as stacked denoising autoencoders.

Vincent, Larochelle, Bengio, Manzagol, "Extracting and Composing Robust Features with Denoising
Autoencoders", ICML 2008; Vincent et al., "Stacked Denoising Autoencoders", JMLR 2010. Each hidden
layer ``h = ReLU(W x + b)`` is trained, one at a time with the layers below it frozen, as a
tied-weight autoencoder ``x_hat = ReLU(W^T h(x_tilde) + c)`` that reconstructs its clean input ``x``
from a corrupted copy ``x_tilde`` (masking noise: a random fraction of the inputs set to zero, or
additive Gaussian noise). Only ``W`` and ``b`` are kept; the decoder bias ``c`` is discarded. The
normal train stage then fine-tunes the whole network.

The stack is found by running the model, not by reading its class: the hidden layers are the
``nn.Linear`` modules in call order, except the last (the classifier), and each must take the
flattened input (the first) or the ReLU of the layer before, exactly; anything else (a BatchNorm,
a residual, another activation in between) is refused, since the autoencoder would then not be
training the function the network computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgec.errors import ConfigError


@dataclass
class HiddenLayer:
    name: str
    module: nn.Linear


def hidden_stack(model: nn.Module, sample: torch.Tensor) -> list[HiddenLayer]:
    """The hidden Linear layers in call order (see the module docstring), or ConfigError."""
    names = {m: n for n, m in model.named_modules()}
    calls: list[tuple[nn.Linear, torch.Tensor, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda m, i, o: calls.append((m, i[0].detach(), o.detach())))
             for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            model.eval()(sample)
    finally:
        for h in hooks:
            h.remove()
    why = "pretrain needs an MLP whose hidden nn.Linear layers feed each other through ReLU"
    if len(calls) < 2:
        raise ConfigError(f"{why}; this model calls {len(calls)} Linear layer(s) (use the mlp zoo model or a user MLP)")
    if len({id(m) for m, _, _ in calls}) != len(calls):
        raise ConfigError(f"{why}; a Linear layer is called more than once")
    first_in = calls[0][1]
    if first_in.shape != sample.flatten(1).shape or not torch.equal(first_in, sample.flatten(1)):
        raise ConfigError(f"{why}; the first Linear layer '{names[calls[0][0]]}' does not take the flattened input")
    for (prev, _, prev_out), (cur, cur_in, _) in zip(calls[:-2], calls[1:-1]):
        if cur_in.shape != prev_out.shape or not torch.allclose(cur_in, torch.relu(prev_out), atol=1e-6):
            raise ConfigError(f"{why}; '{names[cur]}' does not take ReLU('{names[prev]}') as its input")
    return [HiddenLayer(names[m], m) for m, _, _ in calls[:-1]]


def corrupt(x: torch.Tensor, noise: str, level: float, generator: torch.Generator) -> torch.Tensor:
    if noise == "mask":
        keep = torch.rand(x.shape, generator=generator) >= level
        return x * keep
    return x + level * torch.randn(x.shape, generator=generator)


def encode(layers: list[HiddenLayer], x: torch.Tensor, upto: int) -> torch.Tensor:
    """The clean representation that layer ``upto`` receives (flattened input for layer 0)."""
    h = x.flatten(1)
    for layer in layers[:upto]:
        h = torch.relu(layer.module(h))
    return h


def decode_to_input(layers: list[HiddenLayer], h: torch.Tensor, decoder_biases: list[torch.Tensor]) -> torch.Tensor:
    """Map a representation of layer ``len(decoder_biases) - 1`` back to the input through every
    tied decoder below it: what the stack up to that layer keeps of the input."""
    for layer, c in zip(reversed(layers[:len(decoder_biases)]), reversed(decoder_biases)):
        h = torch.relu(F.linear(h, layer.module.weight.t(), c))
    return h


def train_layer(layers: list[HiddenLayer], index: int, x_train: torch.Tensor, *, epochs: int, batch_size: int,
                lr: float, noise: str, level: float, seed: int, on_epoch=None) -> tuple[list[float], torch.Tensor]:
    """Train hidden layer ``index`` as a denoising autoencoder on the clean codes of the layers below
    (frozen). Returns (mean reconstruction loss per epoch, the trained decoder bias)."""
    layer = layers[index].module
    with torch.no_grad():
        inputs = torch.cat([encode(layers, x_train[i:i + 1024], index) for i in range(0, len(x_train), 1024)])
    bias = nn.Parameter(torch.zeros(layer.in_features))
    opt = torch.optim.Adam([layer.weight, layer.bias, bias], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(len(inputs), generator=gen)
        total, count = 0.0, 0
        for start in range(0, len(inputs), batch_size):
            x = inputs[order[start:start + batch_size]]
            x_hat = torch.relu(F.linear(torch.relu(layer(corrupt(x, noise, level, gen))), layer.weight.t(), bias))
            loss = F.mse_loss(x_hat, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + float(loss) * len(x), count + len(x)
        losses.append(total / max(count, 1))
        if on_epoch:
            on_epoch(epoch, losses[-1])
    return losses, bias.detach()


def gradient_norms(model: nn.Module, layers: list[HiddenLayer], x: torch.Tensor, y: torch.Tensor,
                   batch_size: int = 128, batches: int = 8) -> list[float]:
    """Mean L2 norm of each hidden layer's weight gradient under the supervised loss, over a few
    batches: the diagnostic for vanishing gradients in deep MLPs (larger in lower layers after
    pretraining is the effect the method is credited with)."""
    model.train()
    norms = np.zeros(len(layers))
    n = 0
    for start in range(0, min(len(x), batch_size * batches), batch_size):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[start:start + batch_size]), y[start:start + batch_size]).backward()
        norms += [float(layer.module.weight.grad.norm()) for layer in layers]
        n += 1
    model.zero_grad(set_to_none=True)
    return [float(v) for v in norms / max(n, 1)]
