"""StyleGAN2's modulated convolution with noise, bias and activation:
``torch.ops.fastgen.modulated_conv2d``, its backward op, and the public function.

The forward op returns, beside the output, what the Triton backward needs: the modulated but not
demodulated conv output ``y = conv(x * styles, weight)`` ``(B, C_out, H_out, W_out)`` in
channels_last memory (the kernels' NHWC) and the demodulation coefficients ``demod``
``(B, C_out)`` (float32; float64 for float64 inputs; ones without demodulation), both empty when no
gradient is needed. Then ``out = act(demod * y + noise_strength * noise + bias) * gain``.

Backward, with ``z = demod * y + noise_strength * noise + bias`` (every path):

    dz = dout * gain * act'(z)
    dbias[o] = sum_{b,p} dz,   dnoise[b,p] = noise_strength * sum_o dz,
    dnoise_strength = sum_{b,p} noise * sum_o dz,   ddemod[b,o] = sum_p dz * y,   dy = demod * dz
    y's gradients: the conv's input gradient g = conv^T(dy, weight), dx = styles * g,
        dstyles[b,i] = sum_p x * g,  dweight[o,i] = sum_b conv-weight-gradient(x * styles, dy)
    demodulation, demod = (styles^2 @ W2^T + eps)^-1/2 with W2[o,i] = sum_{kh,kw} weight^2:
        e = -demod^3 / 2 * ddemod,  dstyles += 2 styles * (e @ W2),
        dweight += 2 weight * (e^T @ styles^2)

The reference path computes the same formulas in torch (one shared-weight convolution of
``x * styles`` and its ``convolution_backward``; ``fastgen.reference``'s grouped conv with
per-sample weights is the oracle the tests compare with); the Triton path is kernels/modconv.py
(the GEMMs, the demodulation and the dz pass in Triton; the fixed-order sums of the dz pass's
partials, the noise gradients, ``sum_p x * g`` and the demodulation chain in torch, here and
there).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fastgen import activations, backend, reference
from fastgen.ops import _checks, _library
from fastgen.ops.conv import _acc, _autocast_inputs, _channels_last_out, _nchw_view, _nhwc
from fastgen.ops._library import (empty, forward_backend, none_if_empty, record_backend,
                                  reference_double_backward)

__all__ = ["modulated_conv2d"]

# Gradients the backward op can return, in its output order.
_GRAD_NAMES = ("x", "weight", "styles", "noise", "noise_strength", "bias")


class _Spec(NamedTuple):
    """The op's non-tensor arguments, in one value the helpers pass along."""

    demodulate: bool
    padding: int
    up: int
    eps: float
    activation: str
    negative_slope: float
    gain: float

    @property
    def act_code(self) -> int:
        return activations.ACTIVATIONS[self.activation].code


def _out_hw(in_hw: tuple[int, ...], kernel: tuple[int, ...], padding: int,
            up: int) -> tuple[int, int]:
    """(H_out, W_out): a conv's for ``up=1``, a stride-2 conv_transpose2d's for ``up=2``."""
    if up == 1:
        return tuple(i + 2 * padding - k + 1 for i, k in zip(in_hw, kernel))
    return tuple((i - 1) * up - 2 * padding + k for i, k in zip(in_hw, kernel))


def _demod(weight: Tensor, styles: Tensor, spec: _Spec) -> Tensor:
    """The reference path's demodulation coefficients (B, C_out) in the accumulation dtype."""
    acc = _acc(weight.dtype)
    if not spec.demodulate:
        return torch.ones((styles.shape[0], weight.shape[0]), dtype=acc, device=weight.device)
    return reference.demodulation(weight.to(acc), styles.to(acc), spec.eps)


# ----------------------------------------------------------------------------------------------
# Forward on each path: (out, y NHWC or None, demod or None)


def _shared_conv_args(spec: _Spec) -> tuple:
    """aten.convolution's arguments after (input, weight, bias) for the shared-weight conv."""
    transposed = spec.up != 1
    return [spec.up] * 2, [spec.padding] * 2, [1, 1], transposed, [0, 0], 1


def _shared_weight(weight: Tensor, spec: _Spec) -> Tensor:
    """The weight in aten.convolution's layout: conv_transpose2d's (C_in, C_out, kH, kW) for up=2."""
    return weight if spec.up == 1 else weight.transpose(0, 1)


def _forward_reference(x: Tensor, weight: Tensor, styles: Tensor, noise: Tensor | None,
                       noise_strength: Tensor | None, bias: Tensor | None, spec: _Spec,
                       save_pre: bool):
    # The kernels' formulation in torch: one conv with the shared weight of x scaled by styles,
    # the demodulation on its output (no per-sample weights; reference.py's grouped conv is the
    # oracle the tests compare with).
    xs = x * styles[:, :, None, None].to(x.dtype)
    y = torch.ops.aten.convolution(xs, _shared_weight(weight, spec), None, *_shared_conv_args(spec))
    demod = _demod(weight, styles, spec)
    z = y * demod[:, :, None, None].to(y.dtype) if spec.demodulate else y  # demod is ones otherwise
    out = reference.noise_bias_act(z, noise, noise_strength, bias, spec.activation,
                                   spec.negative_slope, spec.gain)
    if not save_pre:
        return out, None, None
    return out, _nhwc(y), demod


def _forward_triton(x: Tensor, weight: Tensor, styles: Tensor, noise: Tensor | None,
                    noise_strength: Tensor | None, bias: Tensor | None, spec: _Spec,
                    save_pre: bool):
    kernels = _library.modconv
    demod = kernels.demodulation(weight, styles, spec.eps) if spec.demodulate else None
    out_hw = _out_hw(tuple(x.shape[2:]), tuple(weight.shape[2:]), spec.padding, spec.up)
    out, y = kernels.modconv_forward(
        _nhwc(x), weight, styles, demod, noise, noise_strength, bias, out_hw, spec.padding,
        spec.up, spec.act_code, spec.negative_slope, spec.gain, save_pre, _channels_last_out(x))
    if save_pre and demod is None:
        demod = torch.ones((x.shape[0], weight.shape[0]), dtype=_acc(x.dtype), device=x.device)
    return out, y, demod


# ----------------------------------------------------------------------------------------------
# Backward on each path: (dx, dweight, dstyles, dnoise, dnoise_strength, dbias), None where the
# mask says no


def _epilogue_grads_reference(grad_out: Tensor, y: Tensor, demod: Tensor, noise: Tensor | None,
                              noise_strength: Tensor | None, bias: Tensor | None, spec: _Spec):
    """(dz NHWC, ddemod (B, C_out), dbias (C_out,), sum_o dz (B, H_out, W_out)) in the
    accumulation dtype, from the saved y (NHWC)."""
    acc = demod.dtype
    y = y.to(acc)
    z = y * demod[:, None, None, :] if spec.demodulate else y  # demod is ones otherwise
    if noise is not None:
        strength = 1.0 if noise_strength is None else noise_strength.to(acc).reshape(())
        z = z + strength * noise[:, 0, :, :, None].to(acc)
    if bias is not None:
        z = z + bias.to(acc)
    act = activations.ACTIVATIONS[spec.activation]
    dz = act.backward(_nhwc(grad_out).to(acc) * spec.gain, z, spec.negative_slope)
    return dz, (dz * y).sum((1, 2)), dz.sum((0, 1, 2)), dz.sum(3)


def _shared_conv_grads(dy: Tensor, x: Tensor, weight: Tensor, styles: Tensor, spec: _Spec,
                       need_w: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    """(dx, dweight, dstyles) of y = conv(x * styles, weight) in torch (dy NCHW): the shared-weight
    conv's backward g = conv^T(dy, weight), dx = styles * g, dstyles = sum_p x * g."""
    styles4 = styles[:, :, None, None].to(x.dtype)
    g, dweight, _ = torch.ops.aten.convolution_backward(
        dy, x * styles4, _shared_weight(weight, spec), None, *_shared_conv_args(spec),
        [True, need_w, False])
    dstyles = (x * g).sum((2, 3), dtype=_acc(x.dtype))
    if dweight is not None and spec.up != 1:
        dweight = dweight.transpose(0, 1)
    return g * styles4, dweight, dstyles


def _backward_reference(grad_out: Tensor, x: Tensor, weight: Tensor, styles: Tensor,
                        noise: Tensor | None, noise_strength: Tensor | None, bias: Tensor | None,
                        y: Tensor, demod: Tensor, spec: _Spec, mask: tuple[bool, ...]):
    dz, ddemod, dbias, dz_pixels = _epilogue_grads_reference(grad_out, y, demod, noise,
                                                             noise_strength, bias, spec)
    dy = _nchw_view((dz * demod[:, None, None, :] if spec.demodulate else dz).to(x.dtype))
    dx, dweight, dstyles = _shared_conv_grads(dy, x, weight, styles, spec, mask[1])
    return (dx, dweight, dstyles, *_noise_grads(dz_pixels, noise, noise_strength, mask), dbias,
            ddemod)


def _backward_triton(grad_out: Tensor, x: Tensor, weight: Tensor, styles: Tensor,
                     noise: Tensor | None, noise_strength: Tensor | None, bias: Tensor | None,
                     y: Tensor, demod: Tensor, spec: _Spec, mask: tuple[bool, ...]):
    kernels = _library.modconv
    dz, ddemod, dbias, dz_pixels = kernels.epilogue_grads(
        _nhwc(grad_out.to(x.dtype)), y, demod, noise, noise_strength, bias, spec.act_code,
        spec.negative_slope, spec.gain)
    x_nhwc = _nhwc(x)
    dx = dstyles = dweight = None
    if mask[0] or mask[2]:
        dx, dstyles = kernels.modconv_input_grad(dz, x_nhwc, weight, styles, demod, spec.padding,
                                                 spec.up)
    if mask[1]:
        dweight = kernels.modconv_weight_grad(x_nhwc, dz, styles, demod, weight.shape,
                                              spec.padding, spec.up, demod.dtype)
    return (dx, dweight, dstyles, *_noise_grads(dz_pixels, noise, noise_strength, mask), dbias,
            ddemod)


def _noise_grads(dz_pixels: Tensor, noise: Tensor | None, noise_strength: Tensor | None,
                 mask: tuple[bool, ...]) -> tuple[Tensor | None, Tensor | None]:
    """(dnoise (B, 1, H_out, W_out), dnoise_strength) from ``sum_o dz`` (B, H_out, W_out)."""
    if noise is None:
        return None, None
    dnoise = None
    if mask[3]:
        strength = 1.0 if noise_strength is None else noise_strength.to(dz_pixels.dtype).reshape(())
        dnoise = (dz_pixels * strength).unsqueeze(1)
    dstrength = (dz_pixels * noise[:, 0].to(dz_pixels.dtype)).sum() if mask[4] else None
    return dnoise, dstrength


def _add_demodulation_grads(dweight: Tensor | None, dstyles: Tensor | None, ddemod: Tensor,
                            weight: Tensor, styles: Tensor, demod: Tensor
                            ) -> tuple[Tensor | None, Tensor | None]:
    """The demodulation chain (module docstring), in torch: small (B, C_out, C_in) contractions;
    a gradient that is None stays None."""
    acc = demod.dtype
    e = -0.5 * demod.pow(3) * ddemod
    w = weight.to(acc)
    s = styles.to(acc)
    if dstyles is not None:
        dstyles = dstyles.to(acc) + 2.0 * s * (e @ w.square().sum((2, 3)))
    if dweight is not None:
        dweight = dweight.to(acc) + 2.0 * w * (e.t() @ s.square())[:, :, None, None]
    return dweight, dstyles


# ----------------------------------------------------------------------------------------------
# The ops


def _spec_of(demodulate: bool, padding: int, up: int, eps: float, activation: str,
             negative_slope: float, gain: float) -> _Spec:
    return _Spec(demodulate, padding, up, eps, activation, negative_slope, gain)


@torch.library.custom_op("fastgen::modulated_conv2d", mutates_args=())
def _modconv_op(x: Tensor, weight: Tensor, styles: Tensor, noise: Tensor | None,
                noise_strength: Tensor | None, bias: Tensor | None, demodulate: bool, padding: int,
                up: int, eps: float, activation: str, negative_slope: float, gain: float,
                save_pre: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(out, y, demod): y (the conv output before demodulation, channels_last) and demod
    (B, C_out) are empty without ``save_pre``."""
    spec = _spec_of(demodulate, padding, up, eps, activation, negative_slope, gain)
    args = (x, weight, styles, noise, noise_strength, bias, spec, save_pre)
    out, y, demod = backend.dispatch("modulated_conv2d", (x, weight, styles),
                                     lambda: _forward_triton(*args),
                                     lambda: _forward_reference(*args))
    out = out.contiguous(memory_format=torch.channels_last if _channels_last_out(x)
                         else torch.contiguous_format)
    if y is None:
        return out, empty(x), empty(x)
    return out, _nchw_view(y), demod


@_modconv_op.register_fake
def _(x, weight, styles, noise, noise_strength, bias, demodulate, padding, up, eps, activation,
      negative_slope, gain, save_pre):
    shape = (x.shape[0], weight.shape[0], *_out_hw(tuple(x.shape[2:]), tuple(weight.shape[2:]),
                                                     padding, up))
    fmt = torch.channels_last if _channels_last_out(x) else torch.contiguous_format
    out = x.new_empty(shape).contiguous(memory_format=fmt)
    if not save_pre:
        return out, empty(x), empty(x)
    return (out, x.new_empty(shape).contiguous(memory_format=torch.channels_last),
            x.new_empty(shape[:2], dtype=_acc(x.dtype)))


@torch.library.custom_op("fastgen::modulated_conv2d_backward", mutates_args=())
def _modconv_backward_op(grad_out: Tensor, x: Tensor, weight: Tensor, styles: Tensor,
                         noise: Tensor | None, noise_strength: Tensor | None, bias: Tensor | None,
                         y: Tensor, demod: Tensor, demodulate: bool, padding: int, up: int,
                         eps: float, activation: str, negative_slope: float, gain: float,
                         output_mask: list[bool]
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dstyles, dnoise, dnoise_strength, dbias) of modulated_conv2d from the
    forward's y and demod; empty where ``output_mask`` is False or the input is None."""
    spec = _spec_of(demodulate, padding, up, eps, activation, negative_slope, gain)
    mask = tuple(output_mask)
    args = (grad_out, x, weight, styles, noise, noise_strength, bias, _nhwc(y), demod, spec, mask)
    dx, dweight, dstyles, dnoise, dstrength, dbias, ddemod = backend.dispatch(
        "modulated_conv2d", (grad_out, x, weight, styles),
        lambda: _backward_triton(*args), lambda: _backward_reference(*args))
    if demodulate and (mask[1] or mask[2]):
        dweight, dstyles = _add_demodulation_grads(dweight, dstyles, ddemod, weight, styles, demod)
    grads = (dx, dweight, dstyles, dnoise, dstrength, dbias)
    inputs = (x, weight, styles, noise, noise_strength, bias)
    return tuple(_grad_output(g, t, m, i == 0, x)
                 for i, (g, t, m) in enumerate(zip(grads, inputs, mask)))


def _grad_output(grad: Tensor | None, like: Tensor | None, wanted: bool, channels_last: bool,
                 x: Tensor) -> Tensor:
    """A backward op's output in a fixed layout: like's shape and dtype (dx channels_last, the
    others contiguous), or empty."""
    if not wanted or like is None or grad is None:
        return empty(x)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return grad.reshape(like.shape).to(like.dtype, copy=True).contiguous(memory_format=fmt)


@_modconv_backward_op.register_fake
def _(grad_out, x, weight, styles, noise, noise_strength, bias, y, demod, demodulate, padding, up,
      eps, activation, negative_slope, gain, output_mask):
    inputs = (x, weight, styles, noise, noise_strength, bias)
    return tuple(
        torch.empty_like(t, memory_format=torch.channels_last if i == 0 else torch.contiguous_format)
        if m and t is not None else empty(x)
        for i, (t, m) in enumerate(zip(inputs, output_mask)))


def _modconv_setup(ctx, inputs, output) -> None:
    record_backend(ctx)
    x, weight, styles, noise, noise_strength, bias, *args, _ = inputs
    ctx.args = tuple(args)
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(x, weight, styles, noise, noise_strength, bias, output[1], output[2])


def _modconv_backward(ctx, grad_out: Tensor, *_):
    *inputs, y, demod = ctx.saved_tensors
    with forward_backend(ctx):
        if y.numel() == 0:  # a forward called without save_pre: recompute what it did not keep
            _, y, demod = _modconv_op(*inputs, *ctx.args, True)
        grads = _modconv_backward_op(grad_out, *inputs, y, demod, *ctx.args,
                                     list(ctx.needs_input_grad[:6]))
    return (*(none_if_empty(g) for g in grads), *([None] * 8))


def _modconv_backward_setup(ctx, inputs, output) -> None:
    grad_out, x, weight, styles, noise, noise_strength, bias, _, _, *args, _ = inputs
    ctx.spec = _spec_of(*args)
    ctx.save_for_backward(grad_out, x, weight, styles, noise, noise_strength, bias)


def _modconv_double_backward(ctx, *grads_of_grads: Tensor):
    grad_out, *primals = ctx.saved_tensors
    spec = ctx.spec

    def forward(x, weight, styles, noise, noise_strength, bias):
        return reference.modulated_conv2d(
            x, weight, styles, demodulate=spec.demodulate, padding=spec.padding, up=spec.up,
            eps=spec.eps, noise=noise, noise_strength=noise_strength, bias=bias,
            activation=spec.activation, negative_slope=spec.negative_slope, gain=spec.gain)

    *d_primals, d_grad_out = reference_double_backward(
        forward, primals, (grad_out,), tuple(none_if_empty(g) for g in grads_of_grads),
        "modulated_conv2d")
    return d_grad_out, *d_primals, None, None, *([None] * 8)


_modconv_op.register_autograd(_modconv_backward, setup_context=_modconv_setup)
_modconv_backward_op.register_autograd(_modconv_double_backward,
                                       setup_context=_modconv_backward_setup)


# ----------------------------------------------------------------------------------------------
# Public function


def _check(x: Tensor, weight: Tensor, styles: Tensor, noise: Tensor | None,
           noise_strength: Tensor | None, bias: Tensor | None, padding: int, up: int,
           eps: float, gain: float) -> None:
    _checks.four_d("x", x)
    _checks.four_d("weight", weight)
    _checks.tensor("styles", styles)
    present = {"x": x, "weight": weight, "styles": styles}
    _checks.same_dtype(**present)
    if styles.shape != (x.shape[0], x.shape[1]):
        raise ValueError(f"styles: expected shape (B, C_in) = {(x.shape[0], x.shape[1])}, got "
                         f"{tuple(styles.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"x: expected {weight.shape[1]} channels (weight {tuple(weight.shape)}), "
                         f"got {x.shape[1]}")
    for name, value in (("padding", padding), ("up", up)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if up not in (1, 2):
        raise ValueError(f"up: expected 1 or 2, got {up!r}")
    if padding < 0:
        raise ValueError(f"padding: expected an int >= 0, got {padding!r}")
    out_hw = _out_hw(tuple(x.shape[2:]), tuple(weight.shape[2:]), padding, up)
    if min(out_hw) < 1:
        raise ValueError(f"x: spatial size {tuple(x.shape[2:])} is too small for kernel "
                         f"{tuple(weight.shape[2:])} with padding {padding} and up {up}: output "
                         f"{out_hw}")
    if noise is not None:
        _checks.four_d("noise", noise)
        expected = (x.shape[0], 1, *out_hw)
        if noise.shape != expected:
            raise ValueError(f"noise: expected shape (B, 1, H_out, W_out) = {expected}, got "
                             f"{tuple(noise.shape)}")
        present["noise"] = noise
    if noise_strength is not None:
        _checks.tensor("noise_strength", noise_strength)
        if noise_strength.shape not in ((), (1,)):
            raise ValueError(f"noise_strength: expected a 0-dim or (1,) tensor, got shape "
                             f"{tuple(noise_strength.shape)}")
        if noise is None:
            raise ValueError("noise_strength: given without noise")
        present["noise_strength"] = noise_strength
    _checks.channel_vectors(weight.shape[0], bias=bias)
    if bias is not None:
        present["bias"] = bias
    _checks.same_device(**present)
    if not eps > 0.0:
        raise ValueError(f"eps: expected a positive value, got {eps!r}")
    if not isinstance(gain, (int, float)) or isinstance(gain, bool):
        raise TypeError(f"gain: expected a float, got {type(gain).__name__}")


def modulated_conv2d(x: Tensor, weight: Tensor, styles: Tensor, *, demodulate: bool = True,
                     padding: int = 0, up: int = 1, eps: float = 1e-8, noise: Tensor | None = None,
                     noise_strength: Tensor | None = None, bias: Tensor | None = None,
                     activation: str = "identity", negative_slope: float = 0.2,
                     gain: float = 1.0) -> Tensor:
    """StyleGAN2's modulated convolution, demodulation, noise injection, bias, activation and gain,
    fused (``torch.ops.fastgen.modulated_conv2d``)::

        out = act(demod * conv(x * styles, weight) + noise_strength * noise + bias) * gain

    the numbers of :func:`fastgen.reference.modulated_conv2d` (per-sample weights
    ``weight[o, i] * styles[b, i]``, demodulated by ``demod[b, o] = (sum_{i,kh,kw} (weight[o, i]
    * styles[b, i])^2 + eps)^-1/2``). The Triton path is one implicit GEMM with the shared weight:
    the styles scale the input channels as the GEMM loads them, the epilogue applies demod, noise,
    bias, activation and gain; per-sample weights are never built. Differentiable in every tensor
    argument, twice (the second derivatives are the reference's).

    Args:
        x: ``(B, C_in, H, W)``, float32 / float16 / bfloat16 (float64 runs too), any memory format.
        weight: ``(C_out, C_in, kH, kW)`` for both ``up`` values; x's dtype and device.
        styles: ``(B, C_in)``, x's dtype.
        demodulate: divide each output channel by its per-sample weight's norm.
        padding: zero padding (an int): of the conv for ``up=1``, of ``conv_transpose2d`` for
            ``up=2``.
        up: 1 (a conv) or 2 (a stride-2 transposed conv with the per-sample weight transposed to
            ``(C_in, C_out, kH, kW)``, not flipped: ``H_out = 2 * (H - 1) - 2 * padding + kH``).
            StyleGAN2's FIR blur after the upsampling is not part of the op (StyleGAN2-small
            up-samples by a bilinear resize and ``up=1`` unless told otherwise).
        eps: added to the squared norm before the demodulation's rsqrt.
        noise: ``(B, 1, H_out, W_out)`` (broadcast over channels), or None.
        noise_strength: a 0-dim or ``(1,)`` tensor (typically learned) scaling ``noise``; None:
            the noise is added as it is.
        bias: ``(C_out,)`` or None.
        activation: "identity", "relu", "leaky_relu" (``negative_slope``), "tanh" or "sigmoid".
        gain: the output scale; StyleGAN2 uses ``activation="leaky_relu"``,
            ``negative_slope=0.2`` and ``gain=sqrt(2)``.

    Returns:
        ``(B, C_out, H_out, W_out)`` in x's dtype and memory format (channels_last in,
        channels_last out; otherwise contiguous). Under ``torch.autocast``, x, weight and styles
        are first cast to the autocast dtype, as for ``F.conv2d``.
    """
    x, weight, styles = _autocast_inputs(x, weight, styles)
    _check(x, weight, styles, noise, noise_strength, bias, padding, up, eps, gain)
    activations.check_activation(activation)
    tensors = (x, weight, styles, noise, noise_strength, bias)
    save_pre = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return _modconv_op(*tensors, bool(demodulate), padding, up, float(eps), activation,
                       float(negative_slope), float(gain), save_pre)[0]
