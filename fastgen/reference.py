"""Pure-PyTorch references of every fused op: the test oracle and the path that runs without Triton.

Each function here has the same signature and semantics as its fused counterpart in
:mod:`fastgen.functional`. They are written for clarity, from PyTorch's own operators, and import
nothing but torch and fastgen's activation table (:mod:`fastgen.activations`, torch only). Input
validation lives in :mod:`fastgen.ops`, before the backend is chosen, so both paths see the same
checks.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgen.activations import ACTIVATIONS as _ACTIVATION_TABLE, check_activation

ACTIVATIONS = tuple(_ACTIVATION_TABLE)
REDUCTIONS = ("none", "mean", "sum", "per_sample")


class DLossOutput(NamedTuple):
    """Discriminator loss and the logging statistics computed with it.

    loss: 0-dim tensor in the logits' dtype. d_real, d_fake: 0-dim float32 tensors, the means of
    D(x) = sigmoid(real_logits) and D(G(z)) = sigmoid(fake_logits); they carry no gradient.
    """

    loss: Tensor
    d_real: Tensor
    d_fake: Tensor


class GLossOutput(NamedTuple):
    """Generator loss (0-dim, the logits' dtype) and the mean of D(G(z)) (0-dim float32, no gradient)."""

    loss: Tensor
    d_fake: Tensor


# ----------------------------------------------------------------------------------------------
# BCE / GAN losses


def bce_with_logits(logits: Tensor, target: Tensor, *, reduction: str = "mean") -> Tensor:
    """Binary cross-entropy on logits: ``softplus(x) - t * x`` per element, stable for any finite x.

    Args:
        logits: any shape, floating dtype.
        target: same shape as ``logits``, values in [0, 1], floating dtype.
        reduction: "none" (elementwise, ``logits``' shape), "mean" or "sum" (0-dim), or
            "per_sample" (sum over all dimensions but the first: shape ``(B,)``, the negative
            log-likelihood of a Bernoulli decoder per sample).

    Returns:
        The loss in ``logits``' dtype.
    """
    loss = _bce_elementwise(logits, target)
    if reduction == "none":
        return loss
    if reduction == "per_sample":
        return loss.reshape(loss.shape[0], -1).sum(1)
    return loss.mean() if reduction == "mean" else loss.sum()


def _bce_elementwise(logits: Tensor, target: Tensor | float) -> Tensor:
    # softplus is log1p(exp(x)) below its threshold: exact even where the loss is ~1e-14, which
    # PyTorch's own binary_cross_entropy_with_logits rounds to a few digits. The loss is in the
    # logits' dtype whatever the target's (a float32 image against bf16 decoder logits).
    if isinstance(target, Tensor):
        target = target.to(logits.dtype)
    return F.softplus(logits) - target * logits


def gan_d_loss(real_logits: Tensor, fake_logits: Tensor, *, label_smoothing: float = 0.0) -> DLossOutput:
    """Discriminator loss of the minimax GAN: ``-mean log D(x) - mean log(1 - D(G(z)))``.

    With one-sided label smoothing s the real targets are ``1 - s`` (fake targets stay 0).

    Args:
        real_logits: D's logits on real data, any non-empty shape (typically ``(B,)`` or ``(B, 1)``).
        fake_logits: D's logits on generated data, any non-empty shape; its size may differ from
            ``real_logits``'; each term is a mean over its own elements.
        label_smoothing: s in [0, 1).
    """
    loss = (_bce_elementwise(real_logits, 1.0 - label_smoothing).mean()
            + _bce_elementwise(fake_logits, 0.0).mean())
    with torch.no_grad():
        d_real = torch.sigmoid(real_logits.float()).mean()
        d_fake = torch.sigmoid(fake_logits.float()).mean()
    return DLossOutput(loss, d_real, d_fake)


def gan_g_loss(fake_logits: Tensor, *, saturating: bool = False) -> GLossOutput:
    """Generator loss on D's logits for generated data.

    ``saturating=False`` (non-saturating, the usual choice): ``-mean log D(G(z))``.
    ``saturating=True`` (the original minimax form): ``mean log(1 - D(G(z)))``, which G minimizes.
    """
    if saturating:
        loss = -_bce_elementwise(fake_logits, 0.0).mean()
    else:
        loss = _bce_elementwise(fake_logits, 1.0).mean()
    with torch.no_grad():
        d_fake = torch.sigmoid(fake_logits.float()).mean()
    return GLossOutput(loss, d_fake)


# ----------------------------------------------------------------------------------------------
# Reparameterization


# exp(logvar) stays finite in fp32, and so does a row's sum of a few thousand of them.
LOGVAR_MAX = 80.0
LOG_2PI = math.log(2.0 * math.pi)


def reparameterize(mu: Tensor, logvar: Tensor, *, samples: int = 1,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Draw ``z = mu + exp(0.5 * logvar) * eps`` with ``eps ~ N(0, I)``, and the KL term to N(0, I).

    logvar is clamped at :data:`LOGVAR_MAX` (80) first, in z and in the KL alike (zero gradient
    above it, as for ``torch.clamp``), so that logvar in [-80, 80] gives finite results in fp32.
    eps comes from ``torch.randn``: the fused path draws other numbers (Philox) from the same
    distribution.

    Args:
        mu, logvar: ``(B, D)``, floating dtype.
        samples: draws per input row; ``samples > 1`` adds a leading dimension (IWAE).
        generator: the torch generator eps is drawn from (the default one when None).

    Returns:
        z: ``(B, D)``, or ``(samples, B, D)`` when ``samples > 1``, in ``mu``'s dtype.
        kl: ``(B,)``, ``KL(N(mu, diag(exp(logvar))) || N(0, I))
            = 0.5 * sum_j (mu_j^2 + exp(logvar_j) - 1 - logvar_j)``.
    """
    shape = (samples, *mu.shape) if samples > 1 else mu.shape
    eps = torch.randn(shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return reparameterize_with_noise(mu, logvar, eps)


def reparameterize_with_noise(mu: Tensor, logvar: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`reparameterize` with the noise given: ``eps`` is ``(B, D)`` or ``(S, B, D)``.

    The deterministic part of the op: the oracle for the fused path once its noise is known.
    """
    logvar = logvar.clamp(max=LOGVAR_MAX)
    z = mu + torch.exp(0.5 * logvar) * eps
    kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(dim=-1)
    return z, kl


def log_normal_diag(z: Tensor, mu: Tensor | None = None, logvar: Tensor | None = None) -> Tensor:
    """``log N(z; mu, diag(exp(logvar)))`` summed over the last dimension.

    Args:
        z: ``(B, D)`` or ``(S, B, D)`` (S samples sharing the parameters' rows).
        mu, logvar: ``(B, D)``, or both None for the standard normal N(0, I). logvar is clamped at
            :data:`LOGVAR_MAX` as in :func:`reparameterize`.

    Returns:
        ``z.shape[:-1]``: ``-0.5 * sum_j ((z_j - mu_j)^2 exp(-logvar_j) + logvar_j + log(2 pi))``.
    """
    if mu is None:
        return -0.5 * (z.square() + LOG_2PI).sum(dim=-1)
    logvar = logvar.clamp(max=LOGVAR_MAX)
    r = (z - mu) * torch.exp(-0.5 * logvar)
    return -0.5 * (r.square() + logvar + LOG_2PI).sum(dim=-1)


# ----------------------------------------------------------------------------------------------
# Conv + BatchNorm + activation


def activate(x: Tensor, activation: str, negative_slope: float = 0.2) -> Tensor:
    """Apply one of :data:`ACTIVATIONS` ("leaky_relu" uses ``negative_slope``)."""
    return _ACTIVATION_TABLE[check_activation(activation)].fn(x, negative_slope)


def conv_bn_act(x: Tensor, weight: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None,
                running_mean: Tensor | None, running_var: Tensor | None, *,
                stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                output_padding: int | tuple[int, int] = 0, transposed: bool = False,
                training: bool = True, momentum: float = 0.1, eps: float = 1e-5,
                activation: str = "relu", negative_slope: float = 0.2) -> Tensor:
    """Conv2d (or ConvTranspose2d), no bias, then BatchNorm2d, then an activation.

    The same numbers as ``nn.Sequential(nn.Conv2d(..., bias=False) or nn.ConvTranspose2d(...,
    bias=False), nn.BatchNorm2d(C_out), act)``, including the running-statistics update in
    training mode (in place on ``running_mean``/``running_var``, momentum, unbiased variance).

    Args:
        x: ``(N, C_in, H, W)``.
        weight: ``(C_out, C_in, kH, kW)`` for a conv, ``(C_in, C_out, kH, kW)`` when ``transposed``
            (PyTorch's layouts).
        bn_weight, bn_bias: BN affine parameters, or None for no affine transform: ``(C_out,)``
            per channel, or ``(N, C_out)`` per sample (BigGAN's class-conditional BN:
            ``z[n, c] = xhat[n, c] * bn_weight[n, c] + bn_bias[n, c]``; the scale is taken as
            given, so BigGAN's ``1 + embedding`` is the caller's). Either may be per sample while
            the other is per channel.
        running_mean, running_var: ``(C_out,)`` float buffers, or None to use batch statistics only.
        output_padding: only for ``transposed``.
        activation: one of :data:`ACTIVATIONS`.

    Returns:
        ``(N, C_out, H_out, W_out)`` in ``x``'s dtype.
    """
    y = _conv(x, weight, None, stride, padding, output_padding, transposed)
    return bn_act(y, bn_weight, bn_bias, running_mean, running_var, training=training,
                  momentum=momentum, eps=eps, activation=activation, negative_slope=negative_slope)


def _conv(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int | tuple[int, int],
          padding: int | tuple[int, int], output_padding: int | tuple[int, int],
          transposed: bool) -> Tensor:
    if transposed:
        return F.conv_transpose2d(x, weight, bias, stride, padding, output_padding)
    if output_padding not in (0, (0, 0)):
        raise ValueError(f"output_padding: only a transposed conv takes it, got {output_padding!r}")
    return F.conv2d(x, weight, bias, stride, padding)


def conv_bias_act(x: Tensor, weight: Tensor, bias: Tensor | None, *,
                  stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                  output_padding: int | tuple[int, int] = 0, transposed: bool = False,
                  activation: str = "relu", negative_slope: float = 0.2) -> Tensor:
    """Conv2d (or ConvTranspose2d) with an optional bias, then an activation: a layer without BN.

    ``nn.Sequential(nn.Conv2d(...) or nn.ConvTranspose2d(...), act)``, e.g. a DCGAN
    discriminator's first layer or the generator's Tanh output layer. Arguments as
    :func:`conv_bn_act`; ``bias``: ``(C_out,)`` or None.
    """
    return activate(_conv(x, weight, bias, stride, padding, output_padding, transposed),
                    activation, negative_slope)


def bn_act(x: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None,
           running_mean: Tensor | None, running_var: Tensor | None, *, training: bool = True,
           momentum: float = 0.1, eps: float = 1e-5, activation: str = "relu",
           negative_slope: float = 0.2) -> Tensor:
    """BatchNorm2d, then an activation: :func:`conv_bn_act` without the conv. ``x``: ``(N, C, H, W)``;
    ``bn_weight``, ``bn_bias``: ``(C,)`` per channel or ``(N, C)`` per sample (class-conditional BN)."""
    if not any(p is not None and p.dim() == 2 for p in (bn_weight, bn_bias)):
        y = F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    else:  # per-sample affine: normalize (updating the running statistics), then scale and shift
        y = F.batch_norm(x, running_mean, running_var, None, None, training, momentum, eps)
        y = affine(y, bn_weight, bn_bias)
    return activate(y, activation, negative_slope)


def affine(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """``x * weight + bias`` on an ``(N, C, H, W)`` tensor, each of ``weight``, ``bias`` a ``(C,)``
    per-channel or ``(N, C)`` per-sample parameter, or None (1, 0)."""
    def per_pixel(p: Tensor) -> Tensor:
        return p.reshape(-1, x.shape[1], 1, 1)

    if weight is not None:
        x = x * per_pixel(weight)
    return x if bias is None else x + per_pixel(bias)


# ----------------------------------------------------------------------------------------------
# Modulated convolution (StyleGAN2)


def demodulation(weight: Tensor, styles: Tensor, eps: float = 1e-8) -> Tensor:
    """StyleGAN2's demodulation coefficients ``(B, C_out)``:
    ``d[b, o] = 1 / sqrt(sum_{i, kh, kw} (weight[o, i, kh, kw] * styles[b, i])^2 + eps)``.

    Args:
        weight: ``(C_out, C_in, kH, kW)``.
        styles: ``(B, C_in)``.
    """
    return torch.rsqrt(styles.square() @ weight.square().sum((2, 3)).t() + eps)


def modulated_conv2d(x: Tensor, weight: Tensor, styles: Tensor, *, demodulate: bool = True,
                     padding: int = 0, up: int = 1, eps: float = 1e-8, noise: Tensor | None = None,
                     noise_strength: Tensor | None = None, bias: Tensor | None = None,
                     activation: str = "identity", negative_slope: float = 0.2,
                     gain: float = 1.0) -> Tensor:
    """StyleGAN2's modulated convolution with noise, bias, activation and gain, as a grouped conv.

    With per-sample weights ``w'[b, o, i] = weight[o, i] * styles[b, i]``, demodulated when
    ``demodulate`` by ``d[b, o]`` (:func:`demodulation`), and ``y = conv_b(x[b], w'[b])``:

        out = act(d * y + noise_strength * noise + bias) * gain

    ``up=1``: ``conv_b`` is ``F.conv2d(x[b], w'[b], padding=padding)``. ``up=2``: it is
    ``F.conv_transpose2d(x[b], w'[b].transpose(0, 1), stride=2, padding=padding)``: the weight
    keeps its ``(C_out, C_in, kH, kW)`` layout, transposed to conv_transpose2d's
    ``(C_in, C_out, kH, kW)`` (no flip), so ``H_out = 2 * (H - 1) - 2 * padding + kH``.
    StyleGAN2's FIR blur after the upsampling is not part of the op.

    Args:
        x: ``(B, C_in, H, W)``.
        weight: ``(C_out, C_in, kH, kW)``, shared by the batch.
        styles: ``(B, C_in)``, the per-sample input-channel scales.
        demodulate: divide each output channel by the norm of its per-sample weight.
        padding: zero padding, an int (of the conv, or of conv_transpose2d for ``up=2``).
        up: 1 (conv) or 2 (stride-2 transposed conv).
        eps: added to the squared norm in the demodulation.
        noise: ``(B, 1, H_out, W_out)``, broadcast over the channels, or None.
        noise_strength: a 0-dim or ``(1,)`` tensor scaling ``noise`` (None: 1).
        bias: ``(C_out,)`` or None.
        activation: one of :data:`ACTIVATIONS` ("leaky_relu" uses ``negative_slope``).
        gain: the output scale; StyleGAN2 uses ``sqrt(2)`` with leaky_relu(0.2).

    Returns:
        ``(B, C_out, H_out, W_out)`` in ``x``'s dtype.
    """
    batch, c_in = x.shape[:2]
    c_out = weight.shape[0]
    w = weight.unsqueeze(0) * styles.reshape(batch, 1, c_in, 1, 1)
    if demodulate:
        w = w * demodulation(weight, styles, eps).reshape(batch, c_out, 1, 1, 1)
    x = x.reshape(1, batch * c_in, *x.shape[2:])
    if up == 1:
        y = F.conv2d(x, w.reshape(batch * c_out, *weight.shape[1:]), padding=padding, groups=batch)
    else:
        w = w.transpose(1, 2).reshape(batch * c_in, c_out, *weight.shape[2:])
        y = F.conv_transpose2d(x, w, stride=up, padding=padding, groups=batch)
    return noise_bias_act(y.reshape(batch, c_out, *y.shape[2:]), noise, noise_strength, bias,
                          activation, negative_slope, gain)


def noise_bias_act(z: Tensor, noise: Tensor | None, noise_strength: Tensor | None,
                   bias: Tensor | None, activation: str, negative_slope: float,
                   gain: float) -> Tensor:
    """:func:`modulated_conv2d`'s last step on its (demodulated) conv output z ``(B, C, H, W)``:
    ``act(z + noise_strength * noise + bias) * gain`` in z's dtype, each term skipped where None."""
    if noise is not None:
        strength = 1.0 if noise_strength is None else noise_strength.to(z.dtype).reshape(())
        z = z + noise.to(z.dtype) * strength
    if bias is not None:
        z = z + bias.to(z.dtype).reshape(1, -1, 1, 1)
    return activate(z, activation, negative_slope) * gain
