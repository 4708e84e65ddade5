"""The one table of the activations fastgen fuses: name -> PyTorch function, module, kernel code.

Every layer of the code base reads it: :mod:`fastgen.reference` (the math), :mod:`fastgen.nn`
(which torch module a fused layer stands for), the models and the benchmarks (names), and the op
layer, which hands the kernels the ``code`` (the ``ACT`` constexpr of ``kernels/conv_bn_act.py``,
whose ``_activate`` implements each code). Imports nothing but torch, so the reference can use it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Activation(NamedTuple):
    """One fusable activation: ``fn(x, negative_slope)`` (the slope is used by leaky_relu only),
    ``backward(dout, x, negative_slope)``, the gradient ``dout * fn'(x)`` through torch's own
    fused backward kernels (one pass, the slope kept in x's dtype), the equivalent torch module
    class, and its code in the Triton kernels."""

    fn: Callable[[Tensor, float], Tensor]
    backward: Callable[[Tensor, Tensor, float], Tensor]
    module: type[nn.Module]
    code: int


_aten = torch.ops.aten

ACTIVATIONS: dict[str, Activation] = {
    "identity": Activation(lambda x, slope: x, lambda dout, x, slope: dout, nn.Identity, 0),
    "relu": Activation(lambda x, slope: F.relu(x), lambda dout, x, slope: _aten.threshold_backward(dout, x, 0),
                       nn.ReLU, 1),
    "leaky_relu": Activation(lambda x, slope: F.leaky_relu(x, slope),
                             lambda dout, x, slope: _aten.leaky_relu_backward(dout, x, slope, False),
                             nn.LeakyReLU, 2),
    "tanh": Activation(lambda x, slope: torch.tanh(x),
                       lambda dout, x, slope: _aten.tanh_backward(dout, torch.tanh(x)), nn.Tanh, 3),
    "sigmoid": Activation(lambda x, slope: torch.sigmoid(x),
                          lambda dout, x, slope: _aten.sigmoid_backward(dout, torch.sigmoid(x)), nn.Sigmoid, 4),
}

LEAKY_SLOPE = 0.2
"""The negative slope of leaky ReLU where none is given (DCGAN's)."""


def check_activation(activation: object) -> str:
    """``activation`` if it names a row of :data:`ACTIVATIONS`, else a ValueError naming it."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    return activation  # type: ignore[return-value]


def module(activation: str, negative_slope: float = LEAKY_SLOPE) -> nn.Module:
    """A torch module computing ``activation`` (``nn.LeakyReLU(negative_slope)`` for leaky_relu)."""
    cls = ACTIVATIONS[check_activation(activation)].module
    return cls(negative_slope) if cls is nn.LeakyReLU else cls()


def name_of(act: nn.Module | None) -> tuple[str, float] | None:
    """(activation, negative_slope) of a torch activation module (None: identity), or None when
    no fused activation computes it."""
    if act is None:
        return "identity", 0.0
    for name, row in ACTIVATIONS.items():
        if type(act) is row.module:
            return name, float(getattr(act, "negative_slope", 0.0))
    return None
