"""The small layer helpers the models share: one fused conv block builder, the activation
module, spectral norm, in one place."""

from __future__ import annotations

from torch import nn

from fastgen import activations
from fastgen.nn import ConvBNAct, ConvTransposeBNAct


def spectral(layer: nn.Module, enabled: bool) -> nn.Module:
    """``layer`` with spectral norm on its weight when ``enabled`` (parametrized in place)."""
    return nn.utils.parametrizations.spectral_norm(layer) if enabled else layer


def activation(name: str) -> nn.Module:
    """The torch module of a fused activation; leaky ReLU with DCGAN's slope 0.2."""
    return activations.module(name, activations.LEAKY_SLOPE)


def conv_block(in_channels: int, out_channels: int, kernel_size: int = 4, stride: int = 2,
               padding: int = 1, *, transposed: bool = False,
               output_padding: int | tuple[int, int] = 0, batch_norm: bool = True,
               activation: str = "relu", spectral_norm: bool = False) -> ConvBNAct | ConvTransposeBNAct:
    """Conv2d or ConvTranspose2d, BatchNorm2d, activation as one fused module: children 0 (conv),
    1 (BN) and 2 (activation), or 0 and 1 without BN; the activations own no tensors, so the
    state_dict keys are those of ``nn.Sequential(conv, bn or nn.Identity(), act)``.

    The conv has a bias only without BN (BN's shift makes it redundant). Leaky ReLU uses DCGAN's
    slope 0.2. Spectral norm parametrizes the conv in place: the fused forward reads its
    normalized weight.
    """
    if transposed:
        block = ConvTransposeBNAct(in_channels, out_channels, kernel_size, stride, padding,
                                   output_padding, batch_norm=batch_norm, activation=activation,
                                   negative_slope=activations.LEAKY_SLOPE)
    else:
        block = ConvBNAct(in_channels, out_channels, kernel_size, stride, padding,
                          batch_norm=batch_norm, activation=activation,
                          negative_slope=activations.LEAKY_SLOPE)
    spectral(block[0], spectral_norm)  # parametrizes in place: block[0] stays the conv
    return block
