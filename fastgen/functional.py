"""The functional API of fastgen's fused ops: validation, backend dispatch and autograd.

Each public function has the signature and semantics of its reference in
:mod:`fastgen.reference`. Inputs are validated here, once, for both paths; then
:func:`fastgen.backend.dispatch` runs the Triton kernels (through the autograd Functions below)
or the reference.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from fastgen import backend, reference
from fastgen.kernels._tuning import Tuner
from fastgen.reference import REDUCTIONS, DLossOutput, GLossOutput

__all__ = ["bce_with_logits", "gan_d_loss", "gan_g_loss", "DLossOutput", "GLossOutput",
           "reparameterize", "log_normal_diag"]


def _kernels(family: str):
    """The kernel module ``fastgen.kernels.<family>``, imported on first use so that fastgen
    imports without triton."""
    return importlib.import_module(f"fastgen.kernels.{family}")


def _differentiable_once(op: str) -> Callable[[Callable], Callable]:
    """Decorates the backward of a fused Function. Its gradients come from kernels and carry no
    graph, so a backward with ``create_graph=True`` (a gradient penalty, a double backward) would
    give gradients whose own derivatives are silently zero: it raises instead."""
    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def first_order(ctx, *grads):
            if torch.is_grad_enabled() and not torch.compiler.is_compiling():
                raise RuntimeError(
                    f"fastgen.{op}: the fused backward cannot be differentiated again "
                    "(create_graph=True, e.g. a gradient penalty); run the pass it differentiates "
                    "under fastgen.use_backend('reference')")
            return backward(ctx, *grads)
        return first_order
    return decorate


# ----------------------------------------------------------------------------------------------
# Input checks shared by the ops: each error names the argument and what was expected.


def _check_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor, got shape {tuple(t.shape)}")
    return t


def _check_same_device(**tensors: Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"expected all tensors on one device, got {listed}")


def _check_same_dtype(**tensors: Tensor) -> None:
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{name} is {dt}" for name, dt in dtypes.items())
        raise TypeError(f"expected one dtype, got {listed}")


def _batch_major_dense(t: Tensor) -> bool:
    """Dense with the batch dimension outermost: a flat walk of memory visits rows one by one."""
    return (t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
            or (t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)))


# ----------------------------------------------------------------------------------------------
# BCE with logits


class _BCEWithLogits(torch.autograd.Function):
    """Loss and dloss/dlogits from one kernel pass; backward scales the stored gradient."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, reduction: str) -> Tensor:
        # The kernel walks memory order: give target the logits' strides (channels_last
        # decoder outputs stay channels_last, no copy of the big tensor).
        if not _batch_major_dense(logits):
            logits = logits.contiguous()
        if target.stride() != logits.stride():
            target = torch.empty_like(logits, dtype=target.dtype).copy_(target)
        n_rows = logits.shape[0] if reduction == "per_sample" else 1
        scale = 1.0 / logits.numel() if reduction == "mean" else 1.0
        loss, grad = _kernels("bce").bce_forward(logits, target, n_rows, reduction == "none", scale)
        ctx.reduction, ctx.scale, ctx.n_rows = reduction, scale, n_rows
        ctx.target_dtype = target.dtype
        # Only d/dtarget = -logits needs the logits; most targets are data without gradient.
        ctx.save_for_backward(grad, logits if ctx.needs_input_grad[1] else None)
        return loss.view(()) if reduction in ("mean", "sum") else loss

    @staticmethod
    @_differentiable_once("bce_with_logits")
    def backward(ctx, grad_output: Tensor):
        grad, logits = ctx.saved_tensors
        grad_logits = grad_target = None
        if ctx.reduction == "none":
            if ctx.needs_input_grad[0]:
                grad_logits = grad * grad_output
        elif ctx.needs_input_grad[0]:
            n_cols = grad.numel() // ctx.n_rows
            grad_logits = _kernels("bce").scale_grad(grad, grad_output, ctx.n_rows, n_cols, ctx.scale, ctx.scale)
        if ctx.needs_input_grad[1]:
            if ctx.reduction == "per_sample":
                grad_output = grad_output.view(-1, *([1] * (logits.dim() - 1)))
            grad_target = (logits * (grad_output * -ctx.scale)).to(ctx.target_dtype)
        return grad_logits, grad_target, None


def bce_with_logits(logits: Tensor, target: Tensor, *, reduction: str = "mean") -> Tensor:
    """Binary cross-entropy on logits, loss and gradient in one pass over the data.

    Args:
        logits: any non-empty shape, float32 / float16 / bfloat16 (any strides; channels_last
            is used as it is).
        target: same shape and device as ``logits``, floating dtype, values in [0, 1].
        reduction: "none" (per element, ``logits``' shape), "mean" or "sum" (0-dim), or
            "per_sample" (sum over all dimensions but the first: ``(B,)``, the negative
            log-likelihood of a Bernoulli decoder per sample).

    Returns:
        The loss in ``logits``' dtype, accumulated in float32. Finite for any finite logits.
    """
    _check_tensor("logits", logits)
    _check_tensor("target", target)
    _check_same_device(logits=logits, target=target)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if target.shape != logits.shape:
        raise ValueError(f"target: expected the shape of logits {tuple(logits.shape)}, got {tuple(target.shape)}")
    if reduction == "per_sample" and logits.dim() == 0:
        raise ValueError("logits: reduction 'per_sample' needs a batch dimension, got a 0-dim tensor")
    return backend.dispatch(
        "bce_with_logits", (logits, target),
        lambda: _BCEWithLogits.apply(logits, target, reduction),
        lambda: reference.bce_with_logits(logits, target, reduction=reduction))


# ----------------------------------------------------------------------------------------------
# GAN losses


class _GANLoss(torch.autograd.Function):
    """Weighted BCE of real and fake logits against constant targets, one launch each way.

    Returns (loss, stats) with stats = [mean D(real), mean D(fake)] (float32, no gradient).
    """

    @staticmethod
    def forward(ctx, real: Tensor | None, fake: Tensor, real_target: float, fake_target: float,
                real_weight: float, fake_weight: float) -> tuple[Tensor, Tensor]:
        real_flat = None if real is None else real.contiguous()
        loss, stats, grad = _kernels("bce").gan_loss_forward(
            real_flat, fake.contiguous(), real_target, fake_target, real_weight, fake_weight)
        ctx.save_for_backward(grad)
        ctx.real_shape = None if real is None else real.shape
        ctx.fake_shape = fake.shape
        ctx.weights = (real_weight, fake_weight)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    @_differentiable_once("gan_d_loss / gan_g_loss")
    def backward(ctx, grad_loss: Tensor, _grad_stats: Tensor):
        (grad,) = ctx.saved_tensors
        n_real = 0 if ctx.real_shape is None else ctx.real_shape.numel()
        scaled = _kernels("bce").scale_grad(grad, grad_loss, 1, n_real, *ctx.weights)
        # Disjoint views of one buffer: the two gradients never write each other's elements.
        grad_real = None if ctx.real_shape is None else scaled[:n_real].view(ctx.real_shape)
        grad_fake = scaled[n_real:].view(ctx.fake_shape)
        return grad_real, grad_fake, None, None, None, None


def gan_d_loss(real_logits: Tensor, fake_logits: Tensor, *, label_smoothing: float = 0.0) -> DLossOutput:
    """Discriminator loss ``-mean log D(x) - mean log(1 - D(G(z)))`` with D(x) means for logging.

    One kernel launch computes the loss, the gradient for both inputs and the means of D(x) and
    D(G(z)); backward is one more launch.

    Args:
        real_logits: D's logits on real data, any non-empty shape (typically ``(B,)`` or
            ``(B, 1)``), float32 / float16 / bfloat16.
        fake_logits: D's logits on generated data, same dtype and device; its size may differ
            from ``real_logits``' (each term is a mean over its own elements).
        label_smoothing: one-sided smoothing s in [0, 1): real targets are ``1 - s``.

    Returns:
        ``DLossOutput(loss, d_real, d_fake)``: loss 0-dim in the logits' dtype; d_real, d_fake
        0-dim float32 without gradient.
    """
    _check_tensor("real_logits", real_logits)
    _check_tensor("fake_logits", fake_logits)
    _check_same_device(real_logits=real_logits, fake_logits=fake_logits)
    _check_same_dtype(real_logits=real_logits, fake_logits=fake_logits)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing: expected a value in [0, 1), got {label_smoothing!r}")

    def fused() -> DLossOutput:
        loss, stats = _GANLoss.apply(real_logits, fake_logits, 1.0 - label_smoothing, 0.0,
                                     1.0 / real_logits.numel(), 1.0 / fake_logits.numel())
        return DLossOutput(loss, stats[0], stats[1])

    return backend.dispatch(
        "gan_d_loss", (real_logits, fake_logits), fused,
        lambda: reference.gan_d_loss(real_logits, fake_logits, label_smoothing=label_smoothing))


def gan_g_loss(fake_logits: Tensor, *, saturating: bool = False) -> GLossOutput:
    """Generator loss on D's logits for generated data, with the mean of D(G(z)) for logging.

    ``saturating=False`` (non-saturating, the usual choice): ``-mean log D(G(z))``.
    ``saturating=True`` (the original minimax form): ``mean log(1 - D(G(z)))``, which G minimizes.

    Args:
        fake_logits: any non-empty shape, float32 / float16 / bfloat16.

    Returns:
        ``GLossOutput(loss, d_fake)``: loss 0-dim in the logits' dtype; d_fake 0-dim float32
        without gradient.
    """
    _check_tensor("fake_logits", fake_logits)

    def fused() -> GLossOutput:
        weight = 1.0 / fake_logits.numel()
        target, weight = (0.0, -weight) if saturating else (1.0, weight)
        loss, stats = _GANLoss.apply(None, fake_logits, 0.0, target, 0.0, weight)
        return GLossOutput(loss, stats[1])

    return backend.dispatch(
        "gan_g_loss", (fake_logits,), fused,
        lambda: reference.gan_g_loss(fake_logits, saturating=saturating))


# ----------------------------------------------------------------------------------------------
# Conv + BatchNorm + activation
#
# Three modes share one autograd Function: "train" (batch statistics, running-stat update),
# "eval" (running statistics folded into a per-channel scale and shift) and "bias" (a conv bias,
# no BN). The kernels compute the new running statistics into new tensors; the functions below
# copy them into the caller's buffers, outside autograd, as torch's batch_norm does in place.


class _ConvSpec(NamedTuple):
    stride: tuple[int, int]
    padding: tuple[int, int]
    output_padding: tuple[int, int]
    transposed: bool
    mode: str  # "train" | "eval" | "bias"
    momentum: float
    eps: float
    activation: str
    negative_slope: float


def _pair(name: str, value: int | tuple[int, int], minimum: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= minimum for v in pair):
        raise ValueError(f"{name}: expected an int >= {minimum} or a pair of them, got {value!r}")
    return pair


def _nhwc(t: Tensor) -> Tensor:
    """(N, C, H, W) -> its (N, H, W, C) contiguous form (free for channels_last tensors)."""
    return t.permute(0, 2, 3, 1).contiguous()


def _channels_last_out(x: Tensor) -> bool:
    """Outputs keep the input's memory format, as PyTorch's conv and BN do (so ``.view`` works
    where it worked before): channels_last for a channels_last input, NCHW otherwise."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _affine_or_default(param: Tensor | None, fill: float, channels: int, like: Tensor) -> Tensor:
    if param is not None:
        return param
    return torch.full((channels,), fill, dtype=_kernels("conv_bn_act").acc_dtype(like.dtype), device=like.device)


def _folded_coef(spec: _ConvSpec, gamma: Tensor | None, beta: Tensor | None,
                 running_mean: Tensor | None, running_var: Tensor | None, channels: int,
                 like: Tensor) -> Tensor:
    """Rows zscale, zshift, mean, rstd of z = y * zscale + zshift for the "eval" and "bias" modes."""
    acc = _kernels("conv_bn_act").acc_dtype(like.dtype)
    shift = _affine_or_default(beta, 0.0, channels, like).to(acc)
    if spec.mode == "bias":
        ones = torch.ones(channels, dtype=acc, device=like.device)
        return torch.stack([ones, shift, torch.zeros_like(ones), ones])
    rstd = torch.rsqrt(running_var.to(acc) + spec.eps)
    zscale = _affine_or_default(gamma, 1.0, channels, like).to(acc) * rstd
    mean = running_mean.to(acc)
    return torch.stack([zscale, shift - mean * zscale, mean, rstd])


def _batch_stats(part: Tensor, spec: _ConvSpec, gamma: Tensor | None, beta: Tensor | None,
                 running_mean: Tensor | None, running_var: Tensor | None, like: Tensor) -> Tensor:
    """Batch statistics (bn_combine_stats rows) from per-tile partials."""
    channels = part.shape[2]
    return _kernels("conv_bn_act").bn_combine_stats(part, _affine_or_default(gamma, 1.0, channels, like),
                                            _affine_or_default(beta, 0.0, channels, like),
                                            running_mean, running_var, spec.momentum, spec.eps)


def _param_grads(spec: _ConvSpec, coef: Tensor, gamma: Tensor | None, beta: Tensor | None,
                 needs: tuple[bool, bool]) -> tuple[Tensor | None, Tensor | None]:
    """(d gamma, d beta) from the gradient coefficients (beta is the bias in mode "bias")."""
    dgamma, dbeta = _kernels("conv_bn_act").param_grads(coef)
    return (dgamma.to(gamma.dtype) if needs[0] and spec.mode != "bias" else None,
            dbeta.to(beta.dtype) if needs[1] else None)


class _ConvBNAct(torch.autograd.Function):
    """act(BN(conv(x))) or act(conv(x) + bias). Returns (out, stats): stats holds the new running
    mean and var in rows 4 and 5 in mode "train" (no gradient; empty otherwise).

    Saves x (NHWC), the weight, the pre-BN y and the per-channel coefficients; backward
    recomputes z and the activation from y.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, gamma: Tensor | None, beta: Tensor | None,
                running_mean: Tensor | None, running_var: Tensor | None,
                spec: _ConvSpec) -> tuple[Tensor, Tensor]:
        kernels = _kernels("conv_bn_act")
        x_nhwc = _nhwc(x)
        out_hw = _conv_out_hw(tuple(x.shape[2:]), tuple(weight.shape[2:]), spec.stride,
                              spec.padding, spec.output_padding, spec.transposed)
        conv_args = (x_nhwc, weight, out_hw, spec.stride, spec.padding, spec.transposed)
        if spec.mode == "train":
            y, part = kernels.conv_stats_forward(*conv_args)
            stats = _batch_stats(part, spec, gamma, beta, running_mean, running_var, x)
            coef = stats[:4]
            out = kernels.bn_act_apply(y, coef, spec.activation, spec.negative_slope,
                                       _channels_last_out(x))
        else:
            channels = weight.shape[1] if spec.transposed else weight.shape[0]
            coef = _folded_coef(spec, gamma, beta, running_mean, running_var, channels, x)
            out, y = kernels.conv_affine_act_forward(*conv_args, coef, spec.activation,
                                                     spec.negative_slope,
                                                     any(ctx.needs_input_grad[:4]),
                                                     _channels_last_out(x))
            stats = coef.new_empty(0)
        ctx.spec = spec
        ctx.save_for_backward(x_nhwc, weight, y, coef, gamma, beta)
        ctx.mark_non_differentiable(stats)
        return out, stats

    @staticmethod
    @_differentiable_once("conv_bn_act")
    def backward(ctx, grad_out: Tensor, _grad_stats: Tensor):
        kernels = _kernels("conv_bn_act")
        spec = ctx.spec
        x_nhwc, weight, y, fwd_coef, gamma, beta = ctx.saved_tensors
        dout = _nhwc(grad_out.to(y.dtype))
        coef = kernels.bn_act_grad_coef(dout, y, fwd_coef, spec.activation, spec.negative_slope,
                                        training=spec.mode == "train")
        grad_args = (spec.stride, spec.padding, spec.transposed, spec.activation, spec.negative_slope)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = kernels.conv_input_grad(dout, y, coef, weight, tuple(x_nhwc.shape[1:3]),
                                         *grad_args).permute(0, 3, 1, 2)
        if ctx.needs_input_grad[1]:
            dw = kernels.conv_weight_grad(x_nhwc, dout, y, coef, weight.shape, *grad_args,
                                          dtype=weight.dtype)
        dgamma, dbeta = _param_grads(spec, coef, gamma, beta, ctx.needs_input_grad[2:4])
        return dx, dw, dgamma, dbeta, None, None, None


class _BNAct(torch.autograd.Function):
    """act(BN(x)) ("train" or "eval" mode); returns (out, stats) as _ConvBNAct. Saves x and
    the per-channel coefficients."""

    @staticmethod
    def forward(ctx, x: Tensor, gamma: Tensor | None, beta: Tensor | None,
                running_mean: Tensor | None, running_var: Tensor | None,
                spec: _ConvSpec) -> tuple[Tensor, Tensor]:
        kernels = _kernels("conv_bn_act")
        x_nhwc = _nhwc(x)
        if spec.mode == "train":
            stats = _batch_stats(kernels.bn_partial_stats(x_nhwc), spec, gamma, beta,
                                 running_mean, running_var, x)
            coef = stats[:4]
        else:
            coef = _folded_coef(spec, gamma, beta, running_mean, running_var, x.shape[1], x)
            stats = coef.new_empty(0)
        out = kernels.bn_act_apply(x_nhwc, coef, spec.activation, spec.negative_slope,
                                   _channels_last_out(x))
        ctx.spec = spec
        ctx.save_for_backward(x_nhwc, coef, gamma, beta)
        ctx.mark_non_differentiable(stats)
        return out, stats

    @staticmethod
    @_differentiable_once("bn_act")
    def backward(ctx, grad_out: Tensor, _grad_stats: Tensor):
        kernels = _kernels("conv_bn_act")
        spec = ctx.spec
        x_nhwc, fwd_coef, gamma, beta = ctx.saved_tensors
        dout = _nhwc(grad_out.to(x_nhwc.dtype))
        coef = kernels.bn_act_grad_coef(dout, x_nhwc, fwd_coef, spec.activation,
                                        spec.negative_slope, training=spec.mode == "train")
        dx = None
        if ctx.needs_input_grad[0]:
            dx = kernels.bn_act_input_grad(dout, x_nhwc, coef, spec.activation,
                                           spec.negative_slope).permute(0, 3, 1, 2)
        dgamma, dbeta = _param_grads(spec, coef, gamma, beta, ctx.needs_input_grad[1:3])
        return dx, dgamma, dbeta, None, None, None


def _check_activation(activation: str) -> None:
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"activation: expected one of {', '.join(reference.ACTIVATIONS)}, "
                         f"got {activation!r}")


def _check_4d(name: str, t: object) -> Tensor:
    _check_tensor(name, t)
    if t.dim() != 4:
        raise ValueError(f"{name}: expected a 4-d tensor, got shape {tuple(t.shape)}")
    return t


def _check_channel_vectors(channels: int, **vectors: Tensor | None) -> None:
    for name, v in vectors.items():
        if v is not None:
            _check_tensor(name, v)
            if v.shape != (channels,):
                raise ValueError(f"{name}: expected shape ({channels},), got {tuple(v.shape)}")


def _check_bn(x_name: str, x: Tensor, out_shape: tuple[int, ...], training: bool,
              bn_weight: Tensor | None, bn_bias: Tensor | None, running_mean: Tensor | None,
              running_var: Tensor | None, momentum: float, eps: float) -> None:
    """BN checks shared by conv_bn_act and bn_act; ``out_shape`` is the BN input's shape."""
    _check_channel_vectors(out_shape[1], bn_weight=bn_weight, bn_bias=bn_bias,
                           running_mean=running_mean, running_var=running_var)
    present = {x_name: x, **{name: v for name, v in (("bn_weight", bn_weight), ("bn_bias", bn_bias),
               ("running_mean", running_mean), ("running_var", running_var)) if v is not None}}
    _check_same_device(**present)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean, running_var: pass both or neither")
    if not training and running_mean is None:
        raise ValueError("running_mean, running_var: eval mode (training=False) needs running statistics")
    if training and out_shape[0] * out_shape[2] * out_shape[3] <= 1:
        # PyTorch's own message (torch.nn.functional._verify_batch_size)
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{torch.Size(out_shape)}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum: expected a value in [0, 1], got {momentum!r}")
    if not eps > 0.0:
        raise ValueError(f"eps: expected a positive value, got {eps!r}")


def _check_conv(x: Tensor, weight: Tensor, stride: int | tuple[int, int],
                padding: int | tuple[int, int], output_padding: int | tuple[int, int],
                transposed: bool) -> tuple[_ConvSpec, tuple[int, int, int, int]]:
    """Conv checks; returns the spec's geometry (mode etc. still to fill in) and the output shape."""
    _check_4d("x", x)
    _check_4d("weight", weight)
    _check_same_device(x=x, weight=weight)
    _check_same_dtype(x=x, weight=weight)
    stride = _pair("stride", stride, 1)
    padding = _pair("padding", padding, 0)
    output_padding = _pair("output_padding", output_padding, 0)
    if not transposed and output_padding != (0, 0):
        raise ValueError(f"output_padding: only a transposed conv takes it, got {output_padding!r}")
    if any(o >= s for o, s in zip(output_padding, stride)):
        raise ValueError(f"output_padding: must be smaller than stride {stride}, got {output_padding}")
    in_channels, out_channels = weight.shape[:2] if transposed else weight.shape[1::-1]
    if x.shape[1] != in_channels:
        raise ValueError(f"x: expected {in_channels} channels (weight {tuple(weight.shape)}), "
                         f"got {x.shape[1]}")
    out_hw = _conv_out_hw(tuple(x.shape[2:]), tuple(weight.shape[2:]), stride, padding,
                                    output_padding, transposed)
    if min(out_hw) < 1:
        raise ValueError(f"x: spatial size {tuple(x.shape[2:])} is too small for kernel "
                         f"{tuple(weight.shape[2:])} with padding {padding}: output {out_hw}")
    spec = _ConvSpec(stride, padding, output_padding, transposed, "", 0.0, 0.0, "", 0.0)
    return spec, (x.shape[0], out_channels, *out_hw)


def _conv_out_hw(in_hw: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int],
                 padding: tuple[int, int], output_padding: tuple[int, int],
                 transposed: bool) -> tuple[int, int]:
    """Output (H, W) of a Conv2d (or ConvTranspose2d), as PyTorch computes it."""
    if transposed:
        return tuple((i - 1) * s - 2 * p + k + o
                     for i, k, s, p, o in zip(in_hw, kernel, stride, padding, output_padding))
    return tuple((i + 2 * p - k) // s + 1 for i, k, s, p in zip(in_hw, kernel, stride, padding))


@torch.compiler.disable
def _apply_fused(function: type[torch.autograd.Function], running_mean: Tensor | None,
                 running_var: Tensor | None, *args) -> Tensor:
    """``function.apply(*args)`` -> (out, stats); copies new running statistics into the buffers.

    torch.compile runs this eagerly (a graph break): Triton's launcher is not traceable until
    the ops are registered with torch.library.triton_op (DESIGN.md, Backend).
    """
    out, stats = function.apply(*args)
    if running_mean is not None and stats.numel():
        with torch.no_grad():
            running_mean.copy_(stats[4])
            running_var.copy_(stats[5])
    return out


def _autocast_conv_inputs(x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """x and weight in torch.autocast's dtype when autocast is on, as autocast casts F.conv2d's
    inputs (BN parameters and running statistics stay float32). A custom autograd Function is
    not autocast by itself, so fused layers would otherwise run a mixed-precision model in fp32."""
    if not (isinstance(x, Tensor) and isinstance(weight, Tensor)):
        return x, weight  # the checks that follow name the bad argument
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return x.to(dtype), weight.to(dtype)
    return x, weight


# Which implementation a conv layer runs on the Triton backend:
# - "fused": the implicit-GEMM kernels (_ConvBNAct);
# - "cudnn-gemm": torch's conv (cuDNN), then fastgen's fused BN statistics and apply (_BNAct);
#   without BN, torch's conv with its bias and the activation, i.e. the reference.
# Triton GEMMs can lose to cuDNN's at some shapes (DESIGN.md). So on CUDA both are timed once per
# shape (forward, and backward when gradients are needed) and the faster runs. The policy is
# kernels/_tuning.py's: FASTGEN_AUTOTUNE=0 or deterministic mode keep "fused".
CONV_IMPLEMENTATIONS = ("fused", "cudnn-gemm")
CONV_IMPLEMENTATION_TUNER: Tuner[str] = Tuner("conv_bn_act implementation", CONV_IMPLEMENTATIONS,
                                              interpreter="fused")


def _conv_fused(x: Tensor, weight: Tensor, gamma: Tensor | None, beta: Tensor | None,
                running_mean: Tensor | None, running_var: Tensor | None, spec: _ConvSpec) -> Tensor:
    return _apply_fused(_ConvBNAct, running_mean, running_var, x, weight, gamma, beta, running_mean,
                        running_var, spec)


def _conv_cudnn_gemm(x: Tensor, weight: Tensor, gamma: Tensor | None, beta: Tensor | None,
                     running_mean: Tensor | None, running_var: Tensor | None,
                     spec: _ConvSpec) -> Tensor:
    bias = beta if spec.mode == "bias" else None
    if spec.transposed:
        y = torch.nn.functional.conv_transpose2d(x, weight, bias, spec.stride, spec.padding,
                                                 spec.output_padding)
    else:
        y = torch.nn.functional.conv2d(x, weight, bias, spec.stride, spec.padding)
    # cuDNN also answers a channels_last weight in channels_last: follow x alone, as "fused" does
    channels_last = _channels_last_out(x)
    y = y.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if spec.mode == "bias":
        return reference.activate(y, spec.activation, spec.negative_slope)
    return _apply_fused(_BNAct, running_mean, running_var, y, gamma, beta, running_mean,
                        running_var, spec)


_CONV_IMPLEMENTATION_FNS = {"fused": _conv_fused, "cudnn-gemm": _conv_cudnn_gemm}


@torch.compiler.disable
def _conv_triton(x: Tensor, weight: Tensor, gamma: Tensor | None, beta: Tensor | None,
                 running_mean: Tensor | None, running_var: Tensor | None, spec: _ConvSpec) -> Tensor:
    """The Triton backend's conv layer: the implementation chosen for this shape."""
    params = (x, weight, gamma, beta)
    grads = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in params)
    # Which gradients a step needs changes its cost (a frozen D needs dx only). momentum and eps
    # change no cost (and momentum=None changes every step): not in the key.
    key = (tuple(x.shape), tuple(weight.shape), x.dtype, _channels_last_out(x), grads,
           spec._replace(momentum=0.0, eps=0.0), torch.backends.cudnn.allow_tf32)

    def trial(implementation: str) -> None:
        """One step on detached copies; no running-statistics update. Identity saved-tensor hooks
        keep the trial out of any enclosing ones (torch.utils.checkpoint would count its tensors)."""
        leaves = [None if t is None else t.detach().requires_grad_(g) for t, g in zip(params, grads)]
        stats = (running_mean, running_var) if spec.mode == "eval" else (None, None)
        with torch.set_grad_enabled(any(grads)), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            out = _CONV_IMPLEMENTATION_FNS[implementation](*leaves, *stats, spec)
            if any(grads):
                torch.autograd.grad(out, [t for t, g in zip(leaves, grads) if g], out.detach())

    implementation = CONV_IMPLEMENTATION_TUNER.choose(key, x.device, lambda c: c, trial)
    return _CONV_IMPLEMENTATION_FNS[implementation](x, weight, gamma, beta, running_mean,
                                                    running_var, spec)


def conv_bn_act(x: Tensor, weight: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None,
                running_mean: Tensor | None, running_var: Tensor | None, *,
                stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                output_padding: int | tuple[int, int] = 0, transposed: bool = False,
                training: bool = True, momentum: float = 0.1, eps: float = 1e-5,
                activation: str = "relu", negative_slope: float = 0.2) -> Tensor:
    """Conv2d (or ConvTranspose2d), no bias, then BatchNorm2d, then an activation, fused.

    The numbers of ``nn.Sequential(nn.Conv2d(..., bias=False) or nn.ConvTranspose2d(...,
    bias=False), nn.BatchNorm2d(C_out), act)``; in training mode ``running_mean``/``running_var``
    are updated in place (momentum, unbiased variance) as torch does. Training: an implicit-GEMM
    conv storing the pre-BN output and per-tile statistics, a deterministic combine, one
    normalize + activate pass. Eval: one launch, BN folded into the conv's epilogue. On CUDA,
    where cuDNN's conv with the fused BN passes around it is timed faster for a shape, that runs
    instead (``CONV_IMPLEMENTATIONS``; ``FASTGEN_AUTOTUNE=0`` keeps the fused kernels).

    Args:
        x: ``(N, C_in, H, W)``, float32 / float16 / bfloat16 (float64 runs too), any memory format.
        weight: ``(C_out, C_in, kH, kW)`` for a conv, ``(C_in, C_out, kH, kW)`` when
            ``transposed``; x's dtype and device. Groups and dilation are not supported.
        bn_weight, bn_bias: ``(C_out,)`` BN affine parameters, or None for no affine transform.
        running_mean, running_var: ``(C_out,)`` float buffers, or None (training only).
        stride, padding, output_padding: ints or pairs; output_padding only when ``transposed``
            and smaller than stride.
        training: batch statistics (and running-stat update) or running statistics.
        activation: "identity", "relu", "leaky_relu" (``negative_slope``), "tanh" or "sigmoid".

    Returns:
        ``(N, C_out, H_out, W_out)`` in x's dtype and memory format (channels_last in,
        channels_last out; otherwise contiguous). Under ``torch.autocast``, x and weight are
        first cast to the autocast dtype, as for ``F.conv2d``.
    """
    x, weight = _autocast_conv_inputs(x, weight)
    spec, out_shape = _check_conv(x, weight, stride, padding, output_padding, transposed)
    _check_bn("x", x, out_shape, training, bn_weight, bn_bias, running_mean, running_var, momentum, eps)
    _check_activation(activation)
    spec = spec._replace(mode="train" if training else "eval", momentum=float(momentum),
                         eps=float(eps), activation=activation, negative_slope=float(negative_slope))

    return backend.dispatch(
        "conv_bn_act", (x, weight),
        lambda: _conv_triton(x, weight, bn_weight, bn_bias, running_mean, running_var, spec),
        lambda: reference.conv_bn_act(
            x, weight, bn_weight, bn_bias, running_mean, running_var, stride=stride,
            padding=padding, output_padding=output_padding, transposed=transposed,
            training=training, momentum=momentum, eps=eps, activation=activation,
            negative_slope=negative_slope))


def conv_bias_act(x: Tensor, weight: Tensor, bias: Tensor | None, *,
                  stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                  output_padding: int | tuple[int, int] = 0, transposed: bool = False,
                  activation: str = "relu", negative_slope: float = 0.2) -> Tensor:
    """Conv2d (or ConvTranspose2d) + optional bias + activation in one launch (a layer without BN:
    a DCGAN discriminator's first layer, the generator's Tanh output).

    Args as :func:`conv_bn_act`; ``bias``: ``(C_out,)`` or None. Backward recomputes the
    activation from the saved conv output.

    Returns:
        ``(N, C_out, H_out, W_out)`` in x's dtype.
    """
    x, weight = _autocast_conv_inputs(x, weight)
    spec, out_shape = _check_conv(x, weight, stride, padding, output_padding, transposed)
    _check_channel_vectors(out_shape[1], bias=bias)
    if bias is not None:
        _check_same_device(x=x, bias=bias)
    _check_activation(activation)
    spec = spec._replace(mode="bias", activation=activation, negative_slope=float(negative_slope))
    return backend.dispatch(
        "conv_bias_act", (x, weight),
        lambda: _conv_triton(x, weight, None, bias, None, None, spec),
        lambda: reference.conv_bias_act(x, weight, bias, stride=stride, padding=padding,
                                        output_padding=output_padding, transposed=transposed,
                                        activation=activation, negative_slope=negative_slope))


def bn_act(x: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None,
           running_mean: Tensor | None, running_var: Tensor | None, *, training: bool = True,
           momentum: float = 0.1, eps: float = 1e-5, activation: str = "relu",
           negative_slope: float = 0.2) -> Tensor:
    """BatchNorm2d + activation (conv_bn_act without the conv): statistics, combine and apply
    passes in training, one pass in eval; running statistics updated in place as torch does.

    Args:
        x: ``(N, C, H, W)``, floating, any memory format. Other arguments as :func:`conv_bn_act`.

    Returns:
        ``(N, C, H, W)`` in x's dtype.
    """
    _check_4d("x", x)
    _check_bn("x", x, tuple(x.shape), training, bn_weight, bn_bias, running_mean, running_var,
              momentum, eps)
    _check_activation(activation)
    spec = _ConvSpec((1, 1), (0, 0), (0, 0), False, "train" if training else "eval",
                     float(momentum), float(eps), activation, float(negative_slope))

    return backend.dispatch(
        "bn_act", (x,),
        lambda: _apply_fused(_BNAct, running_mean, running_var, x, bn_weight, bn_bias, running_mean,
                             running_var, spec),
        lambda: reference.bn_act(x, bn_weight, bn_bias, running_mean, running_var,
                                 training=training, momentum=momentum, eps=eps,
                                 activation=activation, negative_slope=negative_slope))


__all__ += ["conv_bn_act", "conv_bias_act", "bn_act"]


# ----------------------------------------------------------------------------------------------
# Reparameterization
#
# The noise comes from Philox inside the kernels, keyed by (seed, offset) taken from torch's
# generator, so torch.manual_seed repeats a run; the reference path draws torch.randn instead:
# the two paths give different numbers from the same distribution.


# Philox keys stay below 2**63 (one kernel signature); the tag keeps fastgen's noise apart from
# the streams torch's own CUDA random ops draw under the same generator seed.
_PHILOX_KEY_TAG = 0x3C6E_F372_FE94_F82B
_PHILOX_KEY_MASK = 2**63 - 1


def _philox_seed_offset(generator: torch.Generator | None, device: torch.device,
                        counters: int) -> tuple[int, int]:
    """(key, first counter) for a call that uses ``counters`` Philox counters.

    CUDA: the generator's seed and Philox offset, the offset then advanced past this call's
    counters (rounded up to torch's unit of 4), as torch's own CUDA random ops do: no launch, no
    sync. ``torch.manual_seed`` resets both, so a run repeats, and successive calls never share a
    counter. Not capturable in a CUDA graph (the offset is read on the host).
    Elsewhere (the CPU generator is a Mersenne Twister, with no offset): a fresh 62-bit key drawn
    from the generator per call, counters from 0.
    """
    if device.type == "cuda":
        if generator is None:
            index = device.index if device.index is not None else torch.cuda.current_device()
            generator = torch.cuda.default_generators[index]
        seed, offset = generator.initial_seed(), generator.get_offset()
        generator.set_offset(offset + -(-counters // 4) * 4)
    else:
        seed = int(torch.randint(2**62, (), generator=generator).item())
        offset = 0
    return (seed ^ _PHILOX_KEY_TAG) & _PHILOX_KEY_MASK, offset


def _check_gaussian(mu: Tensor, logvar: Tensor) -> None:
    _check_tensor("mu", mu)
    _check_tensor("logvar", logvar)
    if mu.dim() != 2:
        raise ValueError(f"mu: expected shape (B, D) (rank 2), got shape {tuple(mu.shape)}")
    if logvar.shape != mu.shape:
        raise ValueError(f"logvar: expected the shape of mu {tuple(mu.shape)}, got {tuple(logvar.shape)}")
    _check_same_device(mu=mu, logvar=logvar)
    _check_same_dtype(mu=mu, logvar=logvar)


class _Reparameterize(torch.autograd.Function):
    """z and the KL in one launch; backward regenerates eps from the saved (seed, offset)."""

    @staticmethod
    def forward(ctx, mu: Tensor, logvar: Tensor, samples: int, seed: int, offset: int
                ) -> tuple[Tensor, Tensor]:
        mu, logvar = mu.contiguous(), logvar.contiguous()
        z, kl = _kernels("reparam").reparameterize_forward(mu, logvar, samples, seed, offset)
        ctx.save_for_backward(mu, logvar)
        ctx.samples, ctx.seed, ctx.offset = samples, seed, offset
        # An unused output gets None, not zeros: the kernel then skips that term (and the RNG).
        ctx.set_materialize_grads(False)
        return z, kl

    @staticmethod
    @_differentiable_once("reparameterize")
    def backward(ctx, grad_z: Tensor | None, grad_kl: Tensor | None):
        if grad_z is None and grad_kl is None:
            return None, None, None, None, None
        mu, logvar = ctx.saved_tensors
        grad_mu, grad_logvar = _kernels("reparam").reparameterize_backward(
            mu, logvar, None if grad_z is None else grad_z.contiguous(),
            None if grad_kl is None else grad_kl.contiguous(), ctx.samples, ctx.seed, ctx.offset)
        return grad_mu, grad_logvar, None, None, None


def reparameterize(mu: Tensor, logvar: Tensor, *, samples: int = 1,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Draw ``z = mu + exp(0.5 * logvar) * eps``, ``eps ~ N(0, I)``, and the KL term to N(0, I).

    One kernel launch forward, one backward; eps is never stored: the backward regenerates it
    from the Philox (seed, offset) of the forward. logvar is clamped at 80 (zero gradient above),
    so logvar in [-80, 80] gives finite z, KL and gradients (fp32 math; fp16 outputs overflow
    where values pass 65504).

    Args:
        mu, logvar: ``(B, D)``, one floating dtype (float32 / float16 / bfloat16; float64 runs in
            float64), one device.
        samples: draws per row, >= 1; ``samples > 1`` gives z a leading sample dimension (IWAE).
        generator: where the noise's seed comes from: a generator on mu's device type, or None
            for the default one. ``torch.manual_seed(s)`` then the same calls gives the same z,
            bit for bit; successive calls use fresh noise.

    Returns:
        z: ``(B, D)``, or ``(samples, B, D)`` when ``samples > 1``, in mu's dtype.
        kl: ``(B,)`` in mu's dtype, ``0.5 * sum_j (mu^2 + exp(logvar) - 1 - logvar)``.
    """
    _check_gaussian(mu, logvar)
    if isinstance(samples, bool) or not isinstance(samples, int):
        raise TypeError(f"samples: expected an int, got {type(samples).__name__}")
    if samples < 1:
        raise ValueError(f"samples: expected at least 1, got {samples}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != mu.device.type:
            raise ValueError(f"generator: expected a generator on mu's device type {mu.device.type!r}, "
                             f"got one on {generator.device}")

    def fused() -> tuple[Tensor, Tensor]:
        counters = _kernels("reparam").counters_used(samples, *mu.shape)
        seed, offset = _philox_seed_offset(generator, mu.device, counters)
        return _Reparameterize.apply(mu, logvar, samples, seed, offset)

    return backend.dispatch(
        "reparameterize", (mu, logvar), fused,
        lambda: reference.reparameterize(mu, logvar, samples=samples, generator=generator))


class _LogNormalDiag(torch.autograd.Function):
    """Log-density rows in one launch; backward in one launch from the saved inputs."""

    @staticmethod
    def forward(ctx, z: Tensor, mu: Tensor | None, logvar: Tensor | None) -> Tensor:
        z = z.contiguous()
        if mu is not None:
            mu, logvar = mu.contiguous(), logvar.contiguous()
        ctx.save_for_backward(z, mu, logvar)
        return _kernels("reparam").log_normal_diag_forward(z, mu, logvar)

    @staticmethod
    @_differentiable_once("log_normal_diag")
    def backward(ctx, grad_out: Tensor):
        z, mu, logvar = ctx.saved_tensors
        return _kernels("reparam").log_normal_diag_backward(
            z, mu, logvar, grad_out.contiguous(), ctx.needs_input_grad[0])


def log_normal_diag(z: Tensor, mu: Tensor | None = None, logvar: Tensor | None = None) -> Tensor:
    """``log N(z; mu, diag(exp(logvar)))`` summed over the last dimension, in one pass over z.

    With z from :func:`reparameterize`, ``log_normal_diag(z)`` is log p(z) under the prior and
    ``log_normal_diag(z, mu, logvar)`` is log q(z|x): the importance weight of an IWAE bound is
    ``log p(x|z) + log_normal_diag(z) - log_normal_diag(z, mu, logvar)``, with no temporary the
    size of z. logvar is clamped at 80 as in :func:`reparameterize`.

    Args:
        z: ``(B, D)`` or ``(S, B, D)``, floating.
        mu, logvar: ``(B, D)``, shared by the S samples, z's dtype and device; or both None for
            the standard normal N(0, I).

    Returns:
        ``z.shape[:-1]`` (``(B,)`` or ``(S, B)``) in z's dtype.
    """
    _check_tensor("z", z)
    if z.dim() not in (2, 3):
        raise ValueError(f"z: expected shape (B, D) or (S, B, D), got shape {tuple(z.shape)}")
    if (mu is None) != (logvar is None):
        raise ValueError("mu, logvar: give both, or neither for the standard normal")
    if mu is not None:
        _check_gaussian(mu, logvar)
        if z.shape[-2:] != mu.shape:
            raise ValueError(f"z: expected shape (..., {mu.shape[0]}, {mu.shape[1]}) to match mu, "
                             f"got {tuple(z.shape)}")
        _check_same_device(z=z, mu=mu)
        _check_same_dtype(z=z, mu=mu)
    tensors = (z,) if mu is None else (z, mu, logvar)
    return backend.dispatch(
        "log_normal_diag", tensors, lambda: _LogNormalDiag.apply(z, mu, logvar),
        lambda: reference.log_normal_diag(z, mu, logvar))
