"""Deterministic auto-encoder, and the encoder / decoder networks and likelihoods the VAE shares.

Data: flat vectors ``(D,)`` or images ``(C, H, W)`` (1 or 3 channels; 28x28 and 32x32 are the
usual sizes, any H, W that survive the stride-2 stages work).

Architectures:

- ``"mlp"``: flatten, then Linear + activation (``mlp_activation``: ReLU, or SiLU, which trains
  to a lower reconstruction error on Fashion-MNIST) for each width in ``hidden`` (default
  (512, 256)), then a Linear to the output; the decoder mirrors it and reshapes to the data's shape.
- ``"conv"`` (images only): for each channel count in ``hidden`` (default (32, 64)) a 4x4 stride-2
  conv block (BatchNorm + LeakyReLU(0.2); no BN on the first, as in DCGAN) halving H and W, then a
  Linear from the flattened features. The decoder: Linear + ReLU to those features, 4x4 stride-2
  transposed-conv blocks (BatchNorm + ReLU) whose output_padding restores odd sizes
  (28 -> 14 -> 7 -> 3 comes back as 3 -> 7 -> 14 -> 28), and a last transposed conv with bias to
  C channels, without BN or activation. ``mlp_activation`` does not apply (the fused blocks'
  activations are fixed).

Likelihoods of x given a decoder output:

- ``"bernoulli"``: the output holds logits; ``-log p(x|z)`` is the per-sample BCE with logits
  (fastgen's fused ``bce_with_logits(..., reduction="per_sample")``); x in [0, 1].
- ``"gaussian"``: the output is the mean of N(mean, sigma^2 I); ``-log p(x|z) = 0.5 * sum((x -
  mean) / sigma)^2 + D * (log sigma + 0.5 * log(2 pi))`` per sample. The auto-encoder uses
  sigma = 1; the VAE learns log sigma.

Conv blocks are fastgen's fused :class:`fastgen.nn.ConvBNAct` / ``ConvTransposeBNAct`` (the
state_dict of ``nn.Sequential(conv, bn, act)``). Models in training mode update BatchNorm
statistics on every forward, sampling included: call ``.eval()`` to evaluate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fastgen import functional as F
from fastgen.models._layers import conv_block

__all__ = ["AutoEncoder", "ARCHS", "LIKELIHOODS", "MLP_ACTIVATIONS", "check_config", "check_batch", "check_positive",
           "build_encoder", "build_decoder", "reconstruction_nll", "output_mean"]

ARCHS = ("mlp", "conv")
LIKELIHOODS = ("bernoulli", "gaussian")
DEFAULT_HIDDEN = {"mlp": (512, 256), "conv": (32, 64)}
MLP_ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU}


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_positive(name: str, value: object) -> int:
    """``value`` if it is a positive int, else a ValueError naming ``name``."""
    if not _is_positive_int(value):
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def check_config(input_shape: Sequence[int], arch: str, likelihood: str, hidden: Sequence[int] | None,
                 mlp_activation: str = "relu") -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validate a model's configuration; returns (input_shape, hidden) as tuples, hidden defaulted."""
    shape = tuple(input_shape) if isinstance(input_shape, Sequence) else ()
    if len(shape) not in (1, 3) or not all(map(_is_positive_int, shape)):
        raise ValueError(f"input_shape: expected (D,) or (C, H, W) of positive ints, got {input_shape!r}")
    if arch not in ARCHS:
        raise ValueError(f"arch: expected one of {', '.join(ARCHS)}, got {arch!r}")
    if arch == "conv" and len(shape) != 3:
        raise ValueError(f"arch: 'conv' needs an image input_shape (C, H, W), got {shape}")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood: expected one of {', '.join(LIKELIHOODS)}, got {likelihood!r}")
    if mlp_activation not in MLP_ACTIVATIONS:
        raise ValueError(f"mlp_activation: expected one of {', '.join(MLP_ACTIVATIONS)}, got {mlp_activation!r}")
    widths = DEFAULT_HIDDEN[arch] if hidden is None else tuple(hidden)
    if not widths or not all(map(_is_positive_int, widths)):
        raise ValueError(f"hidden: expected a non-empty sequence of positive ints, got {hidden!r}")
    if arch == "conv" and min(shape[1:]) >> len(widths) < 1:
        raise ValueError(f"hidden: {len(widths)} stride-2 stages do not fit an image of {shape[1]}x{shape[2]}")
    return shape, widths


def _spatial_sizes(shape: tuple[int, ...], stages: int) -> list[tuple[int, int]]:
    """(H, W) before each stride-2 stage and after the last: a 4x4 stride-2 pad-1 conv floors H / 2."""
    sizes = [shape[1:]]
    for _ in range(stages):
        sizes.append((sizes[-1][0] // 2, sizes[-1][1] // 2))
    return sizes


def build_encoder(input_shape: tuple[int, ...], out_features: int, arch: str, hidden: tuple[int, ...],
                  mlp_activation: str = "relu") -> nn.Sequential:
    """The network ``(B, *input_shape) -> (B, out_features)`` (arguments as :func:`check_config` returns)."""
    if arch == "mlp":
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), MLP_ACTIVATIONS[mlp_activation]()]
            width = h
        return nn.Sequential(*layers, nn.Linear(width, out_features))
    channels = (input_shape[0], *hidden)
    blocks = [conv_block(c_in, c_out, transposed=False, batch_norm=i > 0, activation="leaky_relu")
              for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:]))]
    h, w = _spatial_sizes(input_shape, len(hidden))[-1]
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(hidden[-1] * h * w, out_features))


def build_decoder(in_features: int, input_shape: tuple[int, ...], arch: str, hidden: tuple[int, ...],
                  mlp_activation: str = "relu") -> nn.Sequential:
    """The network ``(B, in_features) -> (B, *input_shape)`` mirroring :func:`build_encoder`."""
    if arch == "mlp":
        layers: list[nn.Module] = []
        width = in_features
        for h in reversed(hidden):
            layers += [nn.Linear(width, h), MLP_ACTIVATIONS[mlp_activation]()]
            width = h
        return nn.Sequential(*layers, nn.Linear(width, math.prod(input_shape)), nn.Unflatten(1, input_shape))
    sizes = _spatial_sizes(input_shape, len(hidden))
    h, w = sizes[-1]
    layers = [nn.Linear(in_features, hidden[-1] * h * w), nn.ReLU(), nn.Unflatten(1, (hidden[-1], h, w))]
    channels = (input_shape[0], *hidden)
    for stage in reversed(range(len(hidden))):
        (h_out, w_out), (h_in, w_in) = sizes[stage], sizes[stage + 1]
        last = stage == 0
        layers.append(conv_block(channels[stage + 1], channels[stage], transposed=True,
                                  output_padding=(h_out - 2 * h_in, w_out - 2 * w_in), batch_norm=not last,
                                  activation="identity" if last else "relu"))
    return nn.Sequential(*layers)


def reconstruction_nll(output: Tensor, x: Tensor, likelihood: str, log_sigma: Tensor | None = None) -> Tensor:
    """``-log p(x|z)`` per sample, ``(B,)``, for a decoder output of x's shape.

    Args:
        output: logits ("bernoulli") or the mean ("gaussian").
        x: the data, ``(B, ...)``.
        log_sigma: the Gaussian's 0-dim log standard deviation (None for sigma = 1).
    """
    if likelihood == "bernoulli":
        return F.bce_with_logits(output, x, reduction="per_sample")
    residual = (x - output).flatten(1)
    if log_sigma is not None:
        residual = residual * torch.exp(-log_sigma)
    log_norm = 0.5 * math.log(2 * math.pi) + (0.0 if log_sigma is None else log_sigma)
    return 0.5 * residual.square().sum(1) + residual.shape[1] * log_norm


def output_mean(output: Tensor, likelihood: str) -> Tensor:
    """The data-space mean of p(x|z): sigmoid of the logits, or the Gaussian mean as it is."""
    return torch.sigmoid(output) if likelihood == "bernoulli" else output


def check_batch(x: object, input_shape: tuple[int, ...], name: str = "x") -> Tensor:
    """x must be a floating tensor of shape ``(B, *input_shape)``."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    if tuple(x.shape[1:]) != input_shape or x.dim() != len(input_shape) + 1:
        raise ValueError(f"{name}: expected shape (B, {', '.join(map(str, input_shape))}), got {tuple(x.shape)}")
    return x


class AutoEncoder(nn.Module):
    """Encoder -> code of size ``code_size`` -> decoder, trained by reconstruction.

    Args:
        input_shape: ``(D,)`` or ``(C, H, W)``.
        code_size: size of the code.
        arch: "mlp" or "conv" (images only); see the module docstring.
        likelihood: "bernoulli" (decoder logits, BCE loss, data in [0, 1]) or "gaussian"
            (decoder mean, unit-variance Gaussian negative log-likelihood).
        hidden: layer widths ("mlp") or channel counts per stride-2 stage ("conv").
        mlp_activation: "relu" or "silu", the hidden activation of the "mlp" arch.

    ``forward(x)`` returns the decoder output (logits for "bernoulli") of x's shape;
    ``loss(x)`` the per-sample loss ``(B,)`` to average and minimize.
    """

    def __init__(self, input_shape: Sequence[int], code_size: int, *, arch: str = "mlp",
                 likelihood: str = "bernoulli", hidden: Sequence[int] | None = None,
                 mlp_activation: str = "relu") -> None:
        super().__init__()
        self.input_shape, hidden = check_config(input_shape, arch, likelihood, hidden, mlp_activation)
        self.code_size = check_positive("code_size", code_size)
        self.arch, self.likelihood, self.hidden, self.mlp_activation = arch, likelihood, hidden, mlp_activation
        self.encoder = build_encoder(self.input_shape, code_size, arch, hidden, mlp_activation)
        self.decoder = build_decoder(code_size, self.input_shape, arch, hidden, mlp_activation)

    def encode(self, x: Tensor) -> Tensor:
        """``(B, *input_shape)`` -> code ``(B, code_size)``."""
        return self.encoder(check_batch(x, self.input_shape))

    def decode(self, code: Tensor) -> Tensor:
        """Code ``(B, code_size)`` -> decoder output ``(B, *input_shape)`` (logits or mean)."""
        return self.decoder(check_batch(code, (self.code_size,), "code"))

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def reconstruct(self, x: Tensor) -> Tensor:
        """The reconstruction in data space (probabilities for "bernoulli"), x's shape."""
        return output_mean(self(x), self.likelihood)

    def loss(self, x: Tensor) -> Tensor:
        """Per-sample negative log-likelihood of x given its reconstruction, ``(B,)``."""
        return reconstruction_nll(self(x), x, self.likelihood)

    def extra_repr(self) -> str:
        return (f"input_shape={self.input_shape}, code_size={self.code_size}, arch={self.arch!r}, "
                f"likelihood={self.likelihood!r}, hidden={self.hidden}, mlp_activation={self.mlp_activation!r}")
