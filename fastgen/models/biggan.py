"""BigGAN-small (Brock et al., 2019): a class-conditional GAN for square images of side 16, 32 or 64.

The ingredients of BigGAN at a size that trains on a CPU:

- **shared class embedding**: one ``nn.Embedding(num_classes, embed_size)`` in the generator feeds
  every conditional BN (instead of one embedding per layer);
- **hierarchical latent**: z ``(B, latent_size)`` is split into ``blocks + 1`` chunks
  (:func:`torch.tensor_split`, sizes differ by at most 1); the first goes to the initial linear
  layer, chunk ``i + 1`` is concatenated with the class embedding into the condition ``c_i`` of
  residual up-block ``i``;
- **class-conditional BatchNorm** in the generator (:class:`ConditionalBatchNorm2d`): the batch is
  normalized without an affine of its own, then scaled and shifted per sample,
  ``gamma = 1 + W_gamma c``, ``beta = W_beta c`` (linear maps without bias);
- **projection discriminator** (Miyato & Koyama, 2018): ``D(x, y) = w . phi(x) + <embed(y), phi(x)>``
  with ``phi(x)`` the sum-pooled ReLU features;
- **spectral norm** on every conv and linear weight of G and D (and D's embedding, as BigGAN's
  SNEmbedding), torch's parametrization: the fused layers read the normalized weight;
- **orthogonal regularization** (optional, :func:`orthogonal_regularization`, BigGAN eq. 3);
- **EMA of G**: the trainer's ``ema`` option keeps an averaged copy (parameters and buffers: BN
  running statistics and spectral-norm vectors are plain buffers).

Generator, with ``blocks = log2(S) - 2`` residual up-blocks of ``width`` channels each::

    z -> split -> linear(z_0) -> (width, 4, 4)
      -> [UpBlock(c_i)] x blocks                                  (4 -> S)
      -> BN -> ReLU -> conv3x3 -> tanh                            (channels, S, S) in [-1, 1]

    UpBlock(x, c):  h = conv3x3(up(ReLU(CBN(x, c))))
                    out = conv3x3(ReLU(CBN(h, c))) + up(conv1x1(x))

(``up``: nearest-neighbour x2; the 1x1 skip conv runs before the upsampling, which it commutes
with, on a quarter of the pixels.) Discriminator, ``blocks`` residual blocks of ``width`` channels,
all but the last halving the resolution (S -> 8, then one block at 8x8, BigGAN's CIFAR layout)::

    x -> DBlock(no pre-activation) -> [DBlock] x (blocks - 1) -> ReLU -> sum over H, W = phi
      -> linear(phi) + <embed(y), phi>                            (B,) logits

    DBlock(x):  h = conv3x3(ReLU(conv3x3(ReLU(x))))  [avgpool2]    (first block: no ReLU on x)
                out = h + conv1x1([avgpool2] x)                    (identity skip when shapes match)

Fused ops: every conditional or plain BN runs with its ReLU as one :func:`fastgen.functional.bn_act`
(per-sample gamma/beta ``(B, C)`` for the conditional ones); every conv is fastgen's fused conv
(:class:`fastgen.nn.ConvBNAct` without BN: conv + bias + activation, the discriminator's first conv of
a block with its ReLU, the output conv with its tanh). Both run the Triton kernels on
CUDA and the PyTorch reference elsewhere, as :func:`fastgen.use_backend` picks.

Sizes (S = 32, 1 channel, 10 classes, ``latent_size=64``, ``embed_size=32``), generator and
discriminator parameters: ``width=16``, 28,753 and 12,241; ``width=32`` (the default), 86,369 and
48,033; ``width=64``, 289,153 and 190,273.
Weights start orthogonal (BigGAN's ``G_init='ortho'``), biases at 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastgen import functional
from fastgen.models._layers import activation as _activation, spectral
from fastgen.models.gan import _check_labels, _check_positive, _num_stages
from fastgen.nn import BNAct, ConvBNAct, _bn_arguments

__all__ = ["BigGANGenerator", "BigGANDiscriminator", "ConditionalBatchNorm2d", "orthogonal_regularization",
           "init_biggan_weights"]


def _trained_weight(module: nn.Module) -> Tensor:
    """The weight parameter an optimizer updates: ``parametrizations.weight.original`` under
    spectral norm, ``weight`` otherwise."""
    if nn.utils.parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def init_biggan_weights(module: nn.Module) -> None:
    """BigGAN initialization, in place: conv, linear and embedding weights orthogonal (the raw
    weight under spectral norm), their biases 0. Apply with ``model.apply(init_biggan_weights)``.

    Spectral norm is registered anew on a re-initialized weight: its power-iteration vectors must
    belong to the new weight (eval mode iterates no more, so stale ones would scale the weight by
    the old weight's sigma)."""
    if isinstance(module, (nn.Conv2d, nn.Linear, nn.Embedding)):
        spectral_norm = nn.utils.parametrize.is_parametrized(module, "weight")
        if spectral_norm:
            nn.utils.parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        nn.init.orthogonal_(module.weight)
        if spectral_norm:
            spectral(module, True)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


def orthogonal_regularization(module: nn.Module, beta: float = 1e-4) -> Tensor:
    """BigGAN's orthogonal regularization (Brock et al., 2019, eq. 3) of a module's weights:

        R = beta * sum over layers of || W W^T * (1 - I) ||_F^2

    with ``W`` a conv or linear layer's trained weight as a matrix ``(out, in * kH * kW)``
    (``(in, out * kH * kW)`` for a transposed conv: its first dimension, as BigGAN flattens) and
    ``*`` the elementwise product: the squared inner products between different filters are
    penalized, not the filters' norms (which spectral norm sets). Embeddings and 1-D parameters
    (biases, BN) are not regularized. Under spectral norm the raw weight
    (``parametrizations.weight.original``) is the one penalized, as in BigGAN.

    Args:
        module: any module; every ``nn.Conv2d``, ``nn.ConvTranspose2d`` and ``nn.Linear`` in it
            counts.
        beta: the strength, >= 0 (BigGAN: 1e-4).

    Returns:
        A 0-dim tensor in the weights' dtype on their device (differentiable); 0 for a module
        without such layers. Add it to the loss of the model's optimizer.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0.0:
        raise ValueError(f"beta: expected a number >= 0, got {beta!r}")
    terms = []
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            w = _trained_weight(layer).flatten(1)
            gram = w @ w.T
            terms.append((gram - torch.diag_embed(gram.diagonal())).square().sum())
    if not terms:
        param = next(module.parameters(), None)
        return torch.zeros((), device=None if param is None else param.device)
    return beta * torch.stack(terms).sum()


class ConditionalBatchNorm2d(nn.Module):
    """Class-conditional BatchNorm2d + activation, fused: ``forward(x, cond)``.

    ``out = act((x - mean) / sqrt(var + eps) * gamma + beta)`` with the batch statistics in training
    (the running ones in eval, updated as torch's BatchNorm2d does) and a per-sample affine
    ``gamma = 1 + W_gamma cond``, ``beta = W_beta cond`` (linear maps without bias), in one
    :func:`fastgen.functional.bn_act` call.

    The BN itself is the child ``bn``, a :class:`fastgen.nn.BNAct` without affine that holds the
    running statistics, eps, momentum and the activation, so
    :func:`fastgen.nn.convert_sync_batchnorm` synchronizes it like any other BN.

    Args:
        num_features: C.
        cond_size: size of the condition vector.
        activation: applied after the affine ("relu" by default; see :mod:`fastgen.activations`).
        spectral_norm: spectral norm on the two linear maps (BigGAN's G).
        eps, momentum: as nn.BatchNorm2d.

    Shapes: x ``(B, C, H, W)`` floating, cond ``(B, cond_size)`` of x's dtype; output as x.
    """

    def __init__(self, num_features: int, cond_size: int, *, activation: str = "relu",
                 spectral_norm: bool = True, eps: float = 1e-5, momentum: float | None = 0.1) -> None:
        super().__init__()
        _check_positive("num_features", num_features)
        _check_positive("cond_size", cond_size)
        self.bn = BNAct(num_features, eps, momentum, affine=False, activation=activation)
        self.scale = spectral(nn.Linear(cond_size, num_features, bias=False), spectral_norm)
        self.shift = spectral(nn.Linear(cond_size, num_features, bias=False), spectral_norm)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        if cond.shape != (x.shape[0], self.scale.in_features):
            raise ValueError(f"cond: expected shape ({x.shape[0]}, {self.scale.in_features}), "
                             f"got {tuple(cond.shape)}")
        bn = self.bn
        bn._check_input_dim(x)
        return functional.bn_act(x, 1.0 + self.scale(cond), self.shift(cond),
                                 **_bn_arguments(bn, bn.sync_bn, bn.process_group),
                                 activation=bn.activation, negative_slope=bn.negative_slope)


def _conv(in_channels: int, out_channels: int, kernel_size: int, spectral_norm: bool,
          activation: str = "identity", *, bias: bool = True) -> ConvBNAct:
    """A same-size conv (stride 1, padding k // 2) with its activation, fused, and a bias unless a
    training-mode BN follows that would cancel it."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, 1, kernel_size // 2, bias=bias)
    return ConvBNAct.from_torch(spectral(conv, spectral_norm), None, _activation(activation))


def _up(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


class _UpBlock(nn.Module):
    """Generator residual block: CBN-ReLU-up-conv3x3-CBN-ReLU-conv3x3 + up-conv1x1 skip,
    ``(B, C_in, H, W), (B, cond) -> (B, C_out, 2H, 2W)``."""

    def __init__(self, in_channels: int, out_channels: int, cond_size: int, spectral_norm: bool) -> None:
        super().__init__()
        self.bn1 = ConditionalBatchNorm2d(in_channels, cond_size, spectral_norm=spectral_norm)
        self.conv1 = _conv(in_channels, out_channels, 3, spectral_norm, bias=False)  # bn2 cancels a bias
        self.bn2 = ConditionalBatchNorm2d(out_channels, cond_size, spectral_norm=spectral_norm)
        self.conv2 = _conv(out_channels, out_channels, 3, spectral_norm)
        self.skip = _conv(in_channels, out_channels, 1, spectral_norm)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        h = self.conv1(_up(self.bn1(x, cond)))
        return self.conv2(self.bn2(h, cond)) + _up(self.skip(x))


class _DownBlock(nn.Module):
    """Discriminator residual block: [ReLU]-conv3x3-ReLU-conv3x3-[avgpool] + [avgpool]-conv1x1 skip
    (identity when the shape stays), ``(B, C_in, H, W) -> (B, C_out, H / 2 or H, ...)``."""

    def __init__(self, in_channels: int, out_channels: int, *, downsample: bool, preactivation: bool,
                 spectral_norm: bool) -> None:
        super().__init__()
        self.downsample, self.preactivation = downsample, preactivation
        self.conv1 = _conv(in_channels, out_channels, 3, spectral_norm, activation="relu")
        self.conv2 = _conv(out_channels, out_channels, 3, spectral_norm)
        self.skip = (_conv(in_channels, out_channels, 1, spectral_norm)
                     if downsample or in_channels != out_channels else None)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(self.conv1(F.relu(x) if self.preactivation else x))
        skip = x
        if self.downsample:  # the 1x1 skip conv commutes with the 2x2 average: pool first
            h, skip = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        return h + (skip if self.skip is None else self.skip(skip))


class BigGANGenerator(nn.Module):
    """BigGAN-small generator: ``forward(z, labels)`` maps z ``(B, latent_size)`` and labels ``(B,)``
    int64 in ``[0, num_classes)`` to images ``(B, channels, S, S)`` in [-1, 1], in z's dtype.

    Args:
        latent_size: size of z, at least ``blocks + 1 = log2(S) - 1`` (one chunk per slot).
        num_classes: classes of the shared embedding, >= 1 (BigGAN is class-conditional).
        channels: image channels.
        image_size: S, a power of two >= 16.
        width: channels of the 4x4 input and of every residual block.
        embed_size: size of the shared class embedding.
        spectral_norm: spectral norm on every conv and linear weight (not the embedding).

    Attributes: ``latent_size``, ``num_classes``, ``chunk_sizes`` (the split of z: the initial
    linear layer's chunk first, then one per block), ``embed`` (the shared embedding), ``blocks``.
    See the module docstring for the layout.
    """

    def __init__(self, latent_size: int = 64, num_classes: int = 10, channels: int = 1, image_size: int = 32,
                 width: int = 32, embed_size: int = 32, spectral_norm: bool = True) -> None:
        super().__init__()
        blocks = _num_stages(image_size)
        self.latent_size = _check_positive("latent_size", latent_size)
        if latent_size < blocks + 1:
            raise ValueError(f"latent_size: expected at least {blocks + 1} (one chunk for the input layer "
                             f"and each of the {blocks} blocks at image_size {image_size}), got {latent_size}")
        self.num_classes = _check_positive("num_classes", num_classes)
        _check_positive("channels", channels)
        self.width = _check_positive("width", width)
        self.chunk_sizes = [len(c) for c in torch.arange(latent_size).tensor_split(blocks + 1)]
        self.embed = nn.Embedding(num_classes, _check_positive("embed_size", embed_size))
        self.linear = spectral(nn.Linear(self.chunk_sizes[0], width * 4 * 4), spectral_norm)
        self.blocks = nn.ModuleList(_UpBlock(width, width, embed_size + size, spectral_norm)
                                    for size in self.chunk_sizes[1:])
        self.out_bn = BNAct(width, activation="relu")
        self.out = _conv(width, channels, 3, spectral_norm, activation="tanh")
        self.apply(init_biggan_weights)

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.latent_size:
            raise ValueError(f"z: expected shape (B, {self.latent_size}), got {tuple(z.shape)}")
        labels = _check_labels(labels, z.shape[0], self.num_classes)
        chunks = z.split(self.chunk_sizes, dim=1)
        y = self.embed(labels).to(z.dtype)
        h = self.linear(chunks[0]).view(z.shape[0], self.width, 4, 4)
        for block, chunk in zip(self.blocks, chunks[1:]):
            h = block(h, torch.cat([y, chunk], dim=1))
        return self.out(self.out_bn(h))


class BigGANDiscriminator(nn.Module):
    """BigGAN-small projection discriminator: ``forward(x, labels)`` maps images ``(B, channels, S, S)``
    and labels ``(B,)`` int64 in ``[0, num_classes)`` to logits ``(B,)`` in x's dtype.

    ``features(x)`` gives ``phi(x)``, the sum-pooled ReLU features ``(B, width)``; ``head(phi, labels)``
    the logits ``linear(phi) + <embed(labels), phi>``.

    Args:
        channels: image channels.
        image_size: S, a power of two >= 16.
        width: channels of every residual block.
        num_classes: classes of the projection embedding, >= 1.
        spectral_norm: spectral norm on every conv and linear weight and on the embedding.
    """

    def __init__(self, channels: int = 1, image_size: int = 32, width: int = 32, num_classes: int = 10,
                 spectral_norm: bool = True) -> None:
        super().__init__()
        blocks = _num_stages(image_size)
        _check_positive("channels", channels)
        _check_positive("width", width)
        self.num_classes = _check_positive("num_classes", num_classes)
        self.blocks = nn.Sequential(*(
            _DownBlock(channels if i == 0 else width, width, downsample=i < blocks - 1, preactivation=i > 0,
                       spectral_norm=spectral_norm) for i in range(blocks)))
        self.linear = spectral(nn.Linear(width, 1), spectral_norm)
        self.embed = spectral(nn.Embedding(num_classes, width), spectral_norm)
        self.apply(init_biggan_weights)

    def features(self, x: Tensor) -> Tensor:
        """``(B, channels, S, S)`` images to ``phi(x)``, ``(B, width)``."""
        return F.relu(self.blocks(x)).sum(dim=(2, 3))

    def head(self, phi: Tensor, labels: Tensor) -> Tensor:
        """Logits ``(B,)`` from features ``(B, width)`` and labels ``(B,)``: the projection."""
        labels = _check_labels(labels, phi.shape[0], self.num_classes)
        return self.linear(phi).flatten() + (self.embed(labels).to(phi.dtype) * phi).sum(dim=1)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        return self.head(self.features(x), labels)
