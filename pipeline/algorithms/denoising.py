"""Greedy layer-wise pretraining of an MLP's hidden layers as stacked denoising autoencoders.

Vincent, Larochelle, Bengio, Manzagol, "Extracting and Composing Robust Features with Denoising
Autoencoders", ICML 2008; Vincent et al., "Stacked Denoising Autoencoders", JMLR 2010. Each hidden
layer ``h = ReLU(W x + b)`` is trained, one at a time with the layers below it frozen, as a
tied-weight autoencoder ``x_hat = ReLU(W^T h(x_tilde) + c)`` that reconstructs its clean input ``x``
from a corrupted copy ``x_tilde`` (masking noise: a random fraction of the inputs set to zero, or
additive Gaussian noise). Only ``W`` and ``b`` are kept; the decoder bias ``c`` is discarded. The
normal train stage then fine-tunes the whole network. The decoder's ReLU is dropped only where the
input it reconstructs can be negative (standardised features), which a ReLU could never reach.

The stack is found by running the model, not by reading its class: the hidden layers are the
``nn.Linear`` modules in call order, except the last (the classifier); the first must take the
flattened input and every later one (the classifier too) the ReLU of the layer before, exactly, and
no other module may hold weights or statistics; anything else (a BatchNorm, a residual, another
activation in between) is refused, since the autoencoders would then not be training the function
the network computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgec.base.errors import ConfigError, RunError

ENCODE_CHUNK = 1024  # samples encoded at once when computing a layer's (frozen) inputs


@dataclass
class HiddenLayer:
    name: str
    module: nn.Linear


@dataclass
class Decoder:
    """The discarded half of one layer's autoencoder: ``x_hat = act(W^T h + bias)``."""

    bias: torch.Tensor
    relu: bool  # False where the reconstructed input can be negative


def _linear_calls(model: nn.Module, sample: torch.Tensor) -> list[tuple[nn.Linear, torch.Tensor, torch.Tensor]]:
    """(module, input, output) of every nn.Linear call of one eval-mode forward pass, in call order."""
    calls: list[tuple[nn.Linear, torch.Tensor, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda m, i, o: calls.append((m, i[0].detach(), o.detach())))
             for m in model.modules() if isinstance(m, nn.Linear)]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(sample)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return calls


def hidden_stack(model: nn.Module, sample: torch.Tensor) -> list[HiddenLayer]:
    """The hidden Linear layers in call order (see the module docstring), or ConfigError."""
    names = {m: n for n, m in model.named_modules()}
    calls = _linear_calls(model, sample)
    why = "pretrain needs an MLP whose nn.Linear layers feed each other through ReLU"
    if len(calls) < 2:
        raise ConfigError(f"{why}; this model calls {len(calls)} Linear layer(s) (use the mlp zoo model or a user MLP)")
    if len({id(m) for m, _, _ in calls}) != len(calls):
        raise ConfigError(f"{why}; a Linear layer is called more than once")
    # A module with state of its own (BatchNorm, LayerNorm, PReLU) can be the identity at initialisation,
    # where the values below cannot see it, and not after training.
    for name, module in model.named_modules():
        own_state = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if own_state and not isinstance(module, nn.Linear):
            raise ConfigError(f"{why}; '{name}' ({type(module).__name__}) has weights or statistics of its own")
    flat = sample.flatten(1)
    if calls[0][1].shape != flat.shape or not torch.equal(calls[0][1], flat):
        raise ConfigError(f"{why}; the first Linear layer '{names[calls[0][0]]}' does not take the flattened input")
    for (prev, _, prev_out), (cur, cur_in, _) in zip(calls, calls[1:]):
        if cur_in.shape != prev_out.shape or not torch.allclose(cur_in, torch.relu(prev_out), atol=1e-6):
            raise ConfigError(f"{why}; '{names[cur]}' does not take ReLU('{names[prev]}') as its input")
    return [HiddenLayer(names[m], m) for m, _, _ in calls[:-1]]


def corrupt(x: torch.Tensor, noise: str, level: float, generator: torch.Generator) -> torch.Tensor:
    """Masking noise (a fraction ``level`` of the entries zeroed) or additive N(0, level^2)."""
    if noise == "mask":
        return x * (torch.rand(x.shape, generator=generator) >= level)
    return x + level * torch.randn(x.shape, generator=generator)


@torch.no_grad()
def encode(layers: list[HiddenLayer], x: torch.Tensor, upto: int) -> torch.Tensor:
    """The clean representation that layer ``upto`` receives (the flattened input for layer 0)."""
    h = x.flatten(1)
    for layer in layers[:upto]:
        h = torch.relu(layer.module(h))
    return h


def decode(layer: HiddenLayer, decoder: Decoder, h: torch.Tensor) -> torch.Tensor:
    out = F.linear(h, layer.module.weight.t(), decoder.bias)
    return torch.relu(out) if decoder.relu else out


@torch.no_grad()
def decode_to_input(layers: list[HiddenLayer], decoders: list[Decoder], h: torch.Tensor) -> torch.Tensor:
    """Map the code of layer ``len(decoders) - 1`` back to the input through every tied decoder
    below it: what the stack up to that layer keeps of the input."""
    for layer, decoder in zip(reversed(layers[:len(decoders)]), reversed(decoders)):
        h = decode(layer, decoder, h)
    return h


def train_layer(layers: list[HiddenLayer], index: int, x_train: torch.Tensor, *, epochs: int, batch_size: int,
                lr: float, noise: str, level: float, seed: int,
                on_epoch: Callable[[int, float], None] | None = None) -> tuple[list[float], Decoder]:
    """Train hidden layer ``index`` in place as a denoising autoencoder of the clean codes of the
    layers below it, which stay untouched. Returns (mean reconstruction loss per epoch, the decoder)."""
    layer = layers[index].module
    inputs = torch.cat([encode(layers, x_train[i:i + ENCODE_CHUNK], index)
                        for i in range(0, len(x_train), ENCODE_CHUNK)])
    decoder = Decoder(nn.Parameter(torch.zeros(layer.in_features)), relu=bool((inputs >= 0).all()))
    opt = torch.optim.Adam([layer.weight, layer.bias, decoder.bias], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(len(inputs), generator=gen)
        total = 0.0
        for start in range(0, len(inputs), batch_size):
            clean = inputs[order[start:start + batch_size]]
            loss = F.mse_loss(decode(layers[index], decoder, torch.relu(layer(corrupt(clean, noise, level, gen)))), clean)
            if not torch.isfinite(loss):
                raise RunError(f"pretrain: the reconstruction loss of '{layers[index].name}' became {loss.item()} at "
                               f"epoch {epoch + 1}; lower lr ({lr}) or the noise level ({level})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(clean)
        losses.append(total / len(inputs))
        if on_epoch:
            on_epoch(epoch, losses[-1])
    decoder.bias = decoder.bias.detach()
    return losses, decoder


def reconstruction_loss(layers: list[HiddenLayer], index: int, decoder: Decoder, x: torch.Tensor) -> float:
    """Mean squared error of layer ``index``'s autoencoder on clean inputs (no noise)."""
    with torch.no_grad():
        clean = encode(layers, x, index)
        return float(F.mse_loss(decode(layers[index], decoder, torch.relu(layers[index].module(clean))), clean))


def gradient_norms(model: nn.Module, layers: list[HiddenLayer], x: torch.Tensor, y: torch.Tensor,
                   batch_size: int = 128, batches: int = 8) -> list[float]:
    """Mean L2 norm of each hidden layer's weight gradient under the supervised loss, over the first
    few batches: the diagnostic for vanishing gradients in deep MLPs (lower layers getting far
    smaller gradients than upper ones is what layer-wise pretraining is credited with easing)."""
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
