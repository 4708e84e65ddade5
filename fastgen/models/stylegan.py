"""StyleGAN2-small (Karras et al., 2020): a style-based generator and a residual discriminator for
small square images (Fashion-MNIST 32x32, 1 channel; any power of two >= 16, 1 or 3 channels).

Generator, ``z -> w -> image``:

- mapping network: ``z`` normalized to unit second moment, then ``mapping_layers`` dense layers
  (leaky ReLU) with a learning-rate multiplier ``lr_mul`` (0.01), giving ``w`` of the latent's size;
  ``w_avg``, a buffer, tracks the mean ``w`` in training (``w_avg <- lerp(mean w, w_avg, 0.995)``);
- truncation at sampling: ``w <- w_avg + psi (w - w_avg)``;
- synthesis network: a learned constant 4x4 input and a 3x3 modulated conv at 4x4, then per
  doubling of the resolution an up-sampling layer (a bilinear 2x resize and a 3x3 modulated conv:
  StyleGAN2's transposed conv and FIR blur in the other order, see :data:`UPSAMPLES`) and a 3x3
  modulated conv, each with per-pixel noise (a learned strength), bias and leaky ReLU 0.2 with
  gain sqrt(2); a 1x1 toRGB (modulated, not demodulated) per resolution, whose outputs sum
  through bilinear up-sampling (StyleGAN2's skip generator). No output activation: images are
  unbounded around [-1, 1];
- style mixing regularization: in training, with probability ``style_mixing`` (0.9), the layers
  from a random cutoff on take the ``w`` of a second latent. The draws come from torch's global RNG,
  so a seeded run repeats exactly.

Every modulated conv is :func:`fastgen.functional.modulated_conv2d` (the fused op: modulation in
the GEMM prologue, demodulation, noise, bias, activation and gain in its epilogue). Its layer
indices follow StyleGAN2: layer ``i`` reads ``ws[:, i]``, and each toRGB reads the index of the
next block's first conv, so ``num_ws = convs + 1``.

Discriminator: a 1x1 fromRGB, residual blocks (conv3x3, conv3x3, 2x2 average pooling; skip: pooling
and a 1x1 conv; sum / sqrt(2)) down to 4x4, then the minibatch standard deviation feature, a
conv3x3, a dense layer and the logit. Its convs are :func:`fastgen.functional.conv_bias_act`
(twice differentiable: R1 works through them).

Equalized learning rate throughout: weights are stored N(0, 1) (the mapping layers' N(0, 1 /
lr_mul^2)) and multiplied at run time by ``lr_mul / sqrt(fan_in)``, so Adam's steps are alike for
every layer. Channel widths: ``width * min(image_size / r, 4)`` at resolution r (``width`` at full
resolution, at most ``4 width``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastgen import functional
from fastgen.models.gan import _check_labels, _check_positive, _num_stages

__all__ = ["StyleGAN2Generator", "StyleGAN2Discriminator", "EqualLinear", "EqualConv2d", "minibatch_stddev",
           "NOISE_MODES", "UPSAMPLES"]

#: ``noise_mode`` of the generator: fresh per-pixel noise, or none (a deterministic image of w).
NOISE_MODES = ("random", "none")
#: ``upsample`` of the generator, how a synthesis block doubles the resolution. "bilinear": a 2x
#: bilinear resize, then the block's 3x3 modulated conv. Bilinear 2x (half-pixel centers) is
#: zero insertion filtered by [1, 3, 3, 1] / 4 per axis, and the two linear filters commute, so up to
#: the border this is StyleGAN2's up layer (a 3x3 stride-2 transposed conv, then the FIR blur
#: [1, 3, 3, 1]) with the conv after the blur. "transposed": a 4x4 stride-2 modulated transposed
#: conv (the op's ``up=2``) without the blur, whose output carries a 2-pixel checkerboard; the
#: runs before the option used it. For white input the resize keeps under half the variance
#: (0.39 inside the border), so a bilinear up layer starts at about 2/3 of a 3x3 layer's output
#: scale, as StyleGAN2's blurred up layer does (a test measures it).
UPSAMPLES = ("bilinear", "transposed")
# Leaky ReLU with StyleGAN's gain: sqrt(2) keeps the activations' second moment.
_SLOPE, _ACT_GAIN = 0.2, math.sqrt(2.0)
# The widest layer is this many times the full-resolution width.
_MAX_WIDTH_FACTOR = 4


def _channels(width: int, image_size: int, resolution: int) -> int:
    return width * min(image_size // resolution, _MAX_WIDTH_FACTOR)


def _gain(activation: str) -> float:
    # leaky_relu(s x) = s leaky_relu(x) for s > 0: the activation's gain folds into the weight and bias.
    if activation not in ("identity", "leaky_relu"):
        raise ValueError(f"activation: expected 'identity' or 'leaky_relu', got {activation!r}")
    return _ACT_GAIN if activation == "leaky_relu" else 1.0


class EqualLinear(nn.Module):
    """Dense layer with equalized learning rate: ``act(x @ (g W)^T + g_b b)`` with
    ``g = lr_mul / sqrt(in_features)``, ``g_b = lr_mul`` (times sqrt(2) for leaky ReLU).

    ``weight`` (out, in) is stored N(0, 1 / lr_mul^2) and ``bias`` (out,) as ``bias_init / lr_mul``:
    the effective initial weight is N(0, 1 / in_features) and the effective bias ``bias_init``.

    Args:
        in_features, out_features: sizes.
        activation: "identity" or "leaky_relu" (slope 0.2, gain sqrt(2)).
        lr_mul: learning-rate multiplier (0.01 in the mapping network).
        bias_init: initial effective bias (1 for the style affines: styles start at 1).

    Shapes: ``(B, in_features) -> (B, out_features)``, any float dtype.
    """

    def __init__(self, in_features: int, out_features: int, *, activation: str = "identity",
                 lr_mul: float = 1.0, bias_init: float = 0.0) -> None:
        super().__init__()
        if not lr_mul > 0:
            raise ValueError(f"lr_mul: expected a positive number, got {lr_mul!r}")
        self.activation = activation
        gain = _gain(activation)
        self.weight_gain = gain * lr_mul / math.sqrt(_check_positive("in_features", in_features))
        self.bias_gain = gain * lr_mul
        self.weight = nn.Parameter(torch.randn(_check_positive("out_features", out_features), in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), bias_init / lr_mul))

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight * self.weight_gain, self.bias * self.bias_gain)
        return F.leaky_relu(out, _SLOPE) if self.activation == "leaky_relu" else out


class EqualConv2d(nn.Module):
    """Conv2d (stride 1, "same" padding) with equalized learning rate and a fused bias + activation:
    :func:`fastgen.functional.conv_bias_act` with weight ``g W``, ``g = 1 / sqrt(C_in k^2)`` (times
    sqrt(2) for leaky ReLU, as the bias). ``weight`` (C_out, C_in, k, k) is stored N(0, 1).

    Shapes: ``(B, C_in, H, W) -> (B, C_out, H, W)``, float32 (bf16 under autocast).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, bias: bool = True,
                 activation: str = "leaky_relu") -> None:
        super().__init__()
        self.activation = activation
        gain = _gain(activation)
        fan_in = _check_positive("in_channels", in_channels) * _check_positive("kernel_size", kernel_size) ** 2
        self.weight_gain, self.bias_gain = gain / math.sqrt(fan_in), gain
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(_check_positive("out_channels", out_channels), in_channels,
                                               kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias * self.bias_gain if self.bias is not None else None
        return functional.conv_bias_act(x, self.weight * self.weight_gain, bias, padding=self.padding,
                                        activation=self.activation, negative_slope=_SLOPE)


class _ModulatedLayer(nn.Module):
    """One synthesis layer: style affine ``w -> styles`` and a modulated conv.

    Conv layers (``to_rgb=False``): demodulated, per-pixel noise with a learned strength, bias,
    leaky ReLU with gain sqrt(2), a 3x3 conv (padding 1). ``up=2`` doubles the resolution first, as
    ``upsample`` says (see :data:`UPSAMPLES`). toRGB (``to_rgb=True``): a 1x1 conv, not
    demodulated, with bias, linear; its equalized-lr gain scales the styles (cheaper than the
    weight, same product).
    """

    def __init__(self, w_dim: int, in_channels: int, out_channels: int, *, up: int = 1, to_rgb: bool = False,
                 upsample: str = "bilinear") -> None:
        super().__init__()
        self.transposed = up == 2 and upsample == "transposed"
        kernel_size = 1 if to_rgb else (4 if self.transposed else 3)
        self.up, self.to_rgb = up, to_rgb
        self.padding = 0 if to_rgb else 1
        self.style_gain = 1.0 / math.sqrt(in_channels * kernel_size ** 2) if to_rgb else 1.0
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.noise_strength = None if to_rgb else nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor, w: Tensor, noise_mode: str) -> Tensor:
        styles = self.affine(w) * self.style_gain
        if self.to_rgb:
            return functional.modulated_conv2d(x, self.weight, styles, demodulate=False, bias=self.bias)
        conv_up = 2 if self.transposed else 1
        if self.up == 2 and not self.transposed:
            # Modulation scales input channels, so it commutes with the (per-channel) resize.
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        noise = None
        if noise_mode == "random":
            size = x.shape[-1] * conv_up
            noise = torch.randn(x.shape[0], 1, size, size, device=x.device, dtype=x.dtype)
        # A stride-2 4x4 transposed conv meets 4 of its 16 taps per output pixel, so its
        # demodulated output (normalized over all 16) has half the unit std; StyleGAN2's FIR
        # filter after it (gain up^2) restores it. Without the filter, x2 through leaky ReLU's
        # positive homogeneity: act(2y + s*n + b) * g = act(y + s/2*n + b/2) * 2g.
        scale = float(conv_up)
        strength = self.noise_strength / scale if noise is not None else None
        return functional.modulated_conv2d(
            x, self.weight, styles, padding=self.padding, up=conv_up, noise=noise,
            noise_strength=strength, bias=self.bias / scale if self.transposed else self.bias,
            activation="leaky_relu", negative_slope=_SLOPE, gain=_ACT_GAIN * scale)


class StyleGAN2Generator(nn.Module):
    """StyleGAN2-small generator (see the module docstring): ``forward(z)`` maps ``(B, latent_size)``
    float to images ``(B, channels, S, S)`` of z's dtype (unbounded; the data lie in [-1, 1]).

    Args:
        latent_size: size of z and of w.
        channels: image channels (1 or 3).
        image_size: S, a power of two >= 16.
        width: channels at full resolution (``width * min(S / r, 4)`` at resolution r).
        mapping_layers: dense layers of the mapping network (StyleGAN2: 8; 4 here by default).
        lr_mul: learning-rate multiplier of the mapping network.
        style_mixing: probability of style mixing per training batch, in [0, 1].
        w_avg_beta: decay of the ``w_avg`` running mean.
        upsample: how a block doubles the resolution, one of :data:`UPSAMPLES`.

    Attributes: ``latent_size``, ``num_classes`` (0), ``num_ws`` (the per-layer ws the synthesis reads),
    ``upsample``, buffer ``w_avg`` ``(latent_size,)`` float32.
    """

    def __init__(self, latent_size: int = 64, channels: int = 1, image_size: int = 32, width: int = 16, *,
                 mapping_layers: int = 4, lr_mul: float = 0.01, style_mixing: float = 0.9,
                 w_avg_beta: float = 0.995, upsample: str = "bilinear") -> None:
        super().__init__()
        stages = _num_stages(image_size)
        self.latent_size = w_dim = _check_positive("latent_size", latent_size)
        self.num_classes = 0
        _check_positive("channels", channels)
        _check_positive("width", width)
        if not 0.0 <= style_mixing <= 1.0:
            raise ValueError(f"style_mixing: expected a probability in [0, 1], got {style_mixing!r}")
        if not 0.0 <= w_avg_beta < 1.0:
            raise ValueError(f"w_avg_beta: expected a number in [0, 1), got {w_avg_beta!r}")
        if upsample not in UPSAMPLES:
            raise ValueError(f"upsample: expected one of {', '.join(UPSAMPLES)}, got {upsample!r}")
        self.style_mixing, self.w_avg_beta, self.upsample = style_mixing, w_avg_beta, upsample
        self.mapping_net = nn.Sequential(*[
            EqualLinear(w_dim, w_dim, activation="leaky_relu", lr_mul=lr_mul)
            for _ in range(_check_positive("mapping_layers", mapping_layers))])
        self.register_buffer("w_avg", torch.zeros(w_dim))
        hidden = _channels(width, image_size, 4)
        self.const = nn.Parameter(torch.randn(hidden, 4, 4))
        # convs[0] at 4x4, then (up-conv, conv) per resolution; rgbs[k] at the k-th resolution.
        self.convs = nn.ModuleList([_ModulatedLayer(w_dim, hidden, hidden)])
        self.rgbs = nn.ModuleList([_ModulatedLayer(w_dim, hidden, channels, to_rgb=True)])
        for stage in range(1, stages + 1):
            out = _channels(width, image_size, 4 * 2 ** stage)
            self.convs.extend([_ModulatedLayer(w_dim, hidden, out, up=2, upsample=upsample),
                               _ModulatedLayer(w_dim, out, out)])
            self.rgbs.append(_ModulatedLayer(w_dim, out, channels, to_rgb=True))
            hidden = out
        self.num_ws = len(self.convs) + 1

    def _map(self, z: Tensor) -> Tensor:
        # z normalized to unit second moment (StyleGAN's pixel norm), then the dense layers.
        return self.mapping_net(z * torch.rsqrt(z.square().mean(dim=1, keepdim=True) + 1e-8))

    def mapping(self, z: Tensor, truncation: float = 1.0) -> Tensor:
        """``(B, latent_size)`` latents to ``w`` ``(B, latent_size)``; updates ``w_avg`` in training;
        truncation ``psi`` in [0, 1] pulls w toward ``w_avg`` (psi 1: none, 0: ``w_avg`` itself)."""
        if z.dim() != 2 or z.shape[1] != self.latent_size:
            raise ValueError(f"z: expected shape (B, {self.latent_size}), got {tuple(z.shape)}")
        if isinstance(truncation, bool) or not isinstance(truncation, (int, float)) or not 0.0 <= truncation <= 1.0:
            raise ValueError(f"truncation: expected psi in [0, 1], got {truncation!r}")
        w = self._map(z)
        if self.training:
            with torch.no_grad():
                self.w_avg.copy_(w.detach().float().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        return self._truncate(w, truncation)

    def _truncate(self, w: Tensor, truncation: float) -> Tensor:
        return w if truncation == 1.0 else torch.lerp(self.w_avg.to(w.dtype), w, truncation)

    def synthesis(self, ws: Tensor, noise_mode: str = "random") -> Tensor:
        """Per-layer styles ``ws`` ``(B, num_ws, latent_size)`` to images ``(B, channels, S, S)``;
        ``noise_mode``: "random" (fresh per-pixel noise from the global RNG) or "none"."""
        if ws.dim() != 3 or ws.shape[1:] != (self.num_ws, self.latent_size):
            raise ValueError(f"ws: expected shape (B, {self.num_ws}, {self.latent_size}), got {tuple(ws.shape)}")
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode: expected one of {', '.join(NOISE_MODES)}, got {noise_mode!r}")
        x = self.const.to(ws.dtype).expand(ws.shape[0], -1, -1, -1)
        x = self.convs[0](x, ws[:, 0], noise_mode)
        image = self.rgbs[0](x, ws[:, 1], noise_mode)
        for stage in range(1, len(self.rgbs)):
            i = 2 * stage - 1
            x = self.convs[i](x, ws[:, i], noise_mode)
            x = self.convs[i + 1](x, ws[:, i + 1], noise_mode)
            image = F.interpolate(image, scale_factor=2, mode="bilinear", align_corners=False)
            image = image + self.rgbs[stage](x, ws[:, i + 2], noise_mode)
        return image

    def _mix(self, z: Tensor, ws: Tensor, probability: float, truncation: float) -> Tensor:
        """Style mixing: with ``probability``, layers from a cutoff drawn in [1, num_ws) on take the
        w of a fresh latent, truncated as the first (one cutoff per batch, as StyleGAN2). Tensor ops
        only (no host sync)."""
        w2 = self._truncate(self._map(torch.randn_like(z)), truncation).to(ws.dtype)
        cutoff = torch.randint(1, self.num_ws, (), device=z.device)
        cutoff = torch.where(torch.rand((), device=z.device) < probability, cutoff, self.num_ws)
        second = torch.arange(self.num_ws, device=z.device) >= cutoff
        return torch.where(second[None, :, None], w2[:, None], ws)

    def forward(self, z: Tensor, labels: Tensor | None = None, *, truncation: float = 1.0,
                mixing: float | None = None, noise_mode: str = "random") -> Tensor:
        """Images ``(B, channels, S, S)`` from ``z`` ``(B, latent_size)``.

        Args:
            labels: None (the model is unconditional; an error otherwise).
            truncation: psi in [0, 1] (see :meth:`mapping`).
            mixing: style-mixing probability; None: ``style_mixing`` in training, 0 in eval mode.
            noise_mode: "random" or "none" (see :meth:`synthesis`).
        """
        _check_labels(labels, z.shape[0], 0)
        probability = (self.style_mixing if self.training else 0.0) if mixing is None else mixing
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"mixing: expected a probability in [0, 1], got {mixing!r}")
        w = self.mapping(z, truncation)
        ws = w[:, None].expand(-1, self.num_ws, -1)
        if probability > 0.0:
            ws = self._mix(z, ws, probability, truncation)
        return self.synthesis(ws, noise_mode)


def minibatch_stddev(x: Tensor, group_size: int = 4) -> Tensor:
    """StyleGAN's minibatch standard deviation feature: ``(B, C, H, W) -> (B, C + 1, H, W)``.

    Samples ``i, i + B/G, i + 2B/G, ...`` form a group of ``G = min(group_size, B)``; the extra
    channel holds, for every sample of a group, the mean over (C, H, W) of the group's standard
    deviation. Lets the discriminator see a batch's variety (against mode collapse).

    Raises:
        ValueError: the batch is not a multiple of the group size.
    """
    if x.dim() != 4:
        raise ValueError(f"x: expected (B, C, H, W), got shape {tuple(x.shape)}")
    batch, _, height, width = x.shape
    group = min(_check_positive("group_size", group_size), batch)
    if batch % group:
        raise ValueError(f"x: the batch ({batch}) must be a multiple of the minibatch-stddev group size ({group})")
    y = x.float().reshape(group, -1, *x.shape[1:])
    std = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (B / G,)
    feature = std.to(x.dtype).repeat(group)[:, None, None, None].expand(batch, 1, height, width)
    return torch.cat([x, feature], dim=1)


class _DiscriminatorBlock(nn.Module):
    """Residual down-block: ``(conv3x3, conv3x3, avg-pool 2) + (avg-pool 2, conv1x1)``, over sqrt(2).
    ``(B, C_in, H, W) -> (B, C_out, H/2, W/2)``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv0 = EqualConv2d(in_channels, in_channels, 3)
        self.conv1 = EqualConv2d(in_channels, out_channels, 3)
        self.skip = EqualConv2d(in_channels, out_channels, 1, bias=False, activation="identity")

    def forward(self, x: Tensor) -> Tensor:
        h = F.avg_pool2d(self.conv1(self.conv0(x)), 2)
        return (h + self.skip(F.avg_pool2d(x, 2))) * (1.0 / _ACT_GAIN)


class StyleGAN2Discriminator(nn.Module):
    """StyleGAN2-small residual discriminator: ``forward(x)`` maps ``(B, C, S, S)`` to logits ``(B,)``
    (see the module docstring).

    Args:
        channels, image_size, width: as for :class:`StyleGAN2Generator`.
        mbstd_group: group size of :func:`minibatch_stddev` (the batch must be a multiple of it,
            or smaller).
    """

    def __init__(self, channels: int = 1, image_size: int = 32, width: int = 16, *, mbstd_group: int = 4) -> None:
        super().__init__()
        stages = _num_stages(image_size)
        self.channels, self.image_size = _check_positive("channels", channels), image_size
        _check_positive("width", width)
        self.num_classes = 0
        self.mbstd_group = _check_positive("mbstd_group", mbstd_group)
        self.from_rgb = EqualConv2d(channels, _channels(width, image_size, image_size), 1)
        self.blocks = nn.Sequential(*[
            _DiscriminatorBlock(_channels(width, image_size, image_size >> i),
                                _channels(width, image_size, image_size >> (i + 1)))
            for i in range(stages)])
        hidden = _channels(width, image_size, 4)
        self.conv = EqualConv2d(hidden + 1, hidden, 3)
        self.fc = EqualLinear(hidden * 16, hidden, activation="leaky_relu")
        self.out = EqualLinear(hidden, 1)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        expected = (self.channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x: expected shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        _check_labels(labels, x.shape[0], 0)
        h = self.blocks(self.from_rgb(x))
        h = self.conv(minibatch_stddev(h, self.mbstd_group))
        return self.out(self.fc(h.flatten(1))).flatten()
