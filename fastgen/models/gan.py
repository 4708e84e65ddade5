"""GAN generators and discriminators: DCGAN (unconditional and class-conditional) and MLPs for 2D data.

DCGAN (Radford et al., 2016) for square images of side 32 or 64 (any power of two >= 16), 1 or 3
channels, with a width multiplier: the generator upsamples a latent vector from 4x4 by strided
transposed convolutions (BN + ReLU, tanh output in [-1, 1]); the discriminator mirrors it with
strided convolutions (LeakyReLU 0.2, BN after the first layer) down to 4x4 and one logit per image.
Weights start from N(0, 0.02), BN scales from N(1, 0.02), as in the paper.

Class-conditional variants:

- generator: a learned label embedding concatenated to the latent vector;
- discriminator ``conditioning="projection"`` (Miyato & Koyama, 2018): the logit gains
  ``<embed(y), sum-pooled features>``;
- discriminator ``conditioning="acgan"`` (Odena et al., 2017): an auxiliary head classifies the
  image; the adversarial logit does not see the label.

Every conv layer is built by :func:`_conv_block` as fastgen's fused conv-BN-activation module
(:class:`fastgen.nn.ConvBNAct` / :class:`~fastgen.nn.ConvTransposeBNAct`): the Triton kernels on
CUDA, the PyTorch reference elsewhere, as :func:`fastgen.use_backend` picks, with the state_dict
of ``nn.Sequential(conv, bn, act)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fastgen.models._layers import activation as _activation, conv_block, spectral as _spectral

__all__ = ["DCGANGenerator", "DCGANDiscriminator", "MLPGenerator", "MLPDiscriminator",
           "CONDITIONINGS", "init_dcgan_weights"]

CONDITIONINGS = ("none", "projection", "acgan")


def init_dcgan_weights(module: nn.Module) -> None:
    """DCGAN initialization, in place: conv/linear/embedding weights N(0, 0.02), BN scale N(1, 0.02),
    biases 0. Apply with ``model.apply(init_dcgan_weights)``."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
        # Under spectral norm the trained tensor is parametrizations.weight.original.
        weight = (module.parametrizations.weight.original
                  if nn.utils.parametrize.is_parametrized(module, "weight") else module.weight)
        nn.init.normal_(weight, 0.0, 0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def _check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def _num_stages(image_size: int) -> int:
    """Stride-2 stages between 4x4 and ``image_size``; the size must be a power of two >= 16."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16 \
            or image_size & (image_size - 1):
        raise ValueError(f"image_size: expected a power of two >= 16 (32 or 64), got {image_size!r}")
    return int(math.log2(image_size)) - 2


def _check_labels(labels: Tensor | None, batch: int, num_classes: int) -> Tensor | None:
    if num_classes == 0:
        if labels is not None:
            raise ValueError("labels: this model is unconditional (num_classes=0), got labels")
        return None
    if labels is None:
        raise ValueError(f"labels: this model is conditional on {num_classes} classes, got None")
    if labels.shape != (batch,) or labels.dtype != torch.int64:
        raise ValueError(f"labels: expected int64 of shape ({batch},), got {labels.dtype} {tuple(labels.shape)}")
    return labels


class DCGANGenerator(nn.Module):
    """DCGAN generator: ``forward(z, labels=None)`` maps ``(B, latent_size)`` to ``(B, C, S, S)`` in [-1, 1].

    Args:
        latent_size: size of z.
        channels: image channels (1 or 3).
        image_size: S, a power of two >= 16 (32 or 64 for the DCGAN shapes).
        width: channels of the last hidden layer; the 4x4 layer has ``width * S / 8``.
        num_classes: 0 for an unconditional generator; otherwise labels ``(B,)`` int64 in
            ``[0, num_classes)`` are embedded (``embed_size``) and concatenated to z.
    """

    def __init__(self, latent_size: int = 100, channels: int = 1, image_size: int = 32, width: int = 64, *,
                 num_classes: int = 0, embed_size: int = 32) -> None:
        super().__init__()
        stages = _num_stages(image_size)
        self.latent_size = _check_positive("latent_size", latent_size)
        _check_positive("channels", channels)
        _check_positive("width", width)
        self.num_classes = num_classes
        self.embed = None
        in_channels = latent_size
        if num_classes:
            self.embed = nn.Embedding(_check_positive("num_classes", num_classes),
                                      _check_positive("embed_size", embed_size))
            in_channels += embed_size
        hidden = width * 2 ** (stages - 1)
        layers = [conv_block(in_channels, hidden, 4, 1, 0, transposed=True)]
        for _ in range(stages - 1):
            layers.append(conv_block(hidden, hidden // 2, 4, 2, 1, transposed=True))
            hidden //= 2
        layers.append(conv_block(hidden, channels, 4, 2, 1, transposed=True, batch_norm=False,
                                  activation="tanh"))
        self.net = nn.Sequential(*layers)
        self.apply(init_dcgan_weights)

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.latent_size:
            raise ValueError(f"z: expected shape (B, {self.latent_size}), got {tuple(z.shape)}")
        labels = _check_labels(labels, z.shape[0], self.num_classes)
        if labels is not None:
            z = torch.cat([z, self.embed(labels).to(z.dtype)], dim=1)
        return self.net(z[:, :, None, None])


class DCGANDiscriminator(nn.Module):
    """DCGAN discriminator: ``forward(x, labels=None)`` maps ``(B, C, S, S)`` to logits ``(B,)``.

    The pieces are public for objectives that need them: ``features(x)`` (``(B, F, 4, 4)``),
    ``head(h, labels)`` (adversarial logits ``(B,)``) and, with ``conditioning="acgan"``,
    ``classify(h)`` (class logits ``(B, num_classes)``).

    Args:
        channels, image_size, width: as for :class:`DCGANGenerator`.
        num_classes: classes of a conditional model (0 for unconditional).
        conditioning: "none", "projection" (label enters the logit by projection) or "acgan"
            (auxiliary classifier head); "none" exactly when ``num_classes == 0``.
        batch_norm: BN after every conv but the first. Turn it off for per-sample penalties
            (WGAN-GP) and with spectral norm.
        spectral_norm: spectral normalization of every conv weight (Miyato et al., 2018).
    """

    def __init__(self, channels: int = 1, image_size: int = 32, width: int = 64, *, num_classes: int = 0,
                 conditioning: str = "none", batch_norm: bool = True, spectral_norm: bool = False) -> None:
        super().__init__()
        stages = _num_stages(image_size)
        _check_positive("channels", channels)
        _check_positive("width", width)
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning: expected one of {', '.join(CONDITIONINGS)}, got {conditioning!r}")
        if (conditioning == "none") != (num_classes == 0):
            raise ValueError(f"conditioning: {conditioning!r} does not go with num_classes={num_classes}; "
                             "use 'none' exactly for unconditional models")
        self.num_classes = num_classes
        self.conditioning = conditioning
        layers = [conv_block(channels, width, 4, 2, 1, batch_norm=False, activation="leaky_relu",
                              spectral_norm=spectral_norm)]
        hidden = width
        for _ in range(stages - 1):
            layers.append(conv_block(hidden, hidden * 2, 4, 2, 1, batch_norm=batch_norm,
                                      activation="leaky_relu", spectral_norm=spectral_norm))
            hidden *= 2
        self.body = nn.Sequential(*layers)
        self.out = conv_block(hidden, 1, 4, 1, 0, batch_norm=False, activation="identity",
                               spectral_norm=spectral_norm)
        self.embed = nn.Embedding(num_classes, hidden) if conditioning == "projection" else None
        self.aux = (conv_block(hidden, num_classes, 4, 1, 0, batch_norm=False, activation="identity")
                    if conditioning == "acgan" else None)
        self.apply(init_dcgan_weights)

    def features(self, x: Tensor) -> Tensor:
        """``(B, C, S, S)`` images to the ``(B, F, 4, 4)`` features the heads read."""
        return self.body(x)

    def head(self, h: Tensor, labels: Tensor | None = None) -> Tensor:
        """Adversarial logits ``(B,)`` from features; ``labels`` only with projection conditioning."""
        logits = self.out(h).flatten()
        if self.conditioning != "projection":
            if labels is not None:
                raise ValueError(f"labels: discriminator conditioning {self.conditioning!r} takes no labels")
            return logits
        labels = _check_labels(labels, h.shape[0], self.num_classes)
        return logits + (self.embed(labels).to(h.dtype) * h.sum(dim=(2, 3))).sum(dim=1)

    def classify(self, h: Tensor) -> Tensor:
        """ACGAN class logits ``(B, num_classes)`` from features."""
        if self.aux is None:
            raise ValueError("classify: only a discriminator with conditioning='acgan' has a classifier")
        return self.aux(h).flatten(1)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.head(self.features(x), labels)


def _mlp(sizes: list[int], activation: str, spectral_norm: bool = False) -> nn.Sequential:
    """Linear layers between consecutive ``sizes``, ``activation`` after all but the last."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(_spectral(nn.Linear(fan_in, fan_out), spectral_norm))
        if i < len(sizes) - 2:
            layers.append(_activation(activation))
    return nn.Sequential(*layers)


class MLPGenerator(nn.Module):
    """MLP generator for low-dimensional data: ``forward(z)`` maps ``(B, latent_size)`` to ``(B, out_features)``.

    Args:
        latent_size: size of z.
        out_features: data dimension (2 for the ring8 / grid25 mixtures).
        hidden: units per hidden layer; depth: number of hidden layers (ReLU).
    """

    def __init__(self, latent_size: int = 16, out_features: int = 2, hidden: int = 128, depth: int = 3) -> None:
        super().__init__()
        self.latent_size = _check_positive("latent_size", latent_size)
        self.num_classes = 0
        sizes = [latent_size] + [_check_positive("hidden", hidden)] * _check_positive("depth", depth)
        self.net = _mlp(sizes + [_check_positive("out_features", out_features)], "relu")

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.latent_size:
            raise ValueError(f"z: expected shape (B, {self.latent_size}), got {tuple(z.shape)}")
        _check_labels(labels, z.shape[0], 0)
        return self.net(z)


class MLPDiscriminator(nn.Module):
    """MLP discriminator for low-dimensional data: ``forward(x)`` maps ``(B, in_features)`` to logits ``(B,)``.

    Args:
        in_features: data dimension.
        hidden, depth: hidden layer width and count (LeakyReLU 0.2).
        spectral_norm: spectral normalization of every weight.
    """

    def __init__(self, in_features: int = 2, hidden: int = 128, depth: int = 3, *,
                 spectral_norm: bool = False) -> None:
        super().__init__()
        self.num_classes = 0
        self.conditioning = "none"
        sizes = [_check_positive("in_features", in_features)]
        sizes += [_check_positive("hidden", hidden)] * _check_positive("depth", depth)
        self.net = _mlp(sizes + [1], "leaky_relu", spectral_norm)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        _check_labels(labels, x.shape[0], 0)
        return self.net(x).flatten()
