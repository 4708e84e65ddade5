"""The functional API of fastgen's fused ops: validation, backend dispatch and autograd.

Each public function has the signature and semantics of its reference in
:mod:`fastgen.reference`. Inputs are validated here, once, for both paths; then
:func:`fastgen.backend.dispatch` runs the Triton kernels (through the autograd Functions below)
or the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastgen import backend, reference
from fastgen.reference import REDUCTIONS, DLossOutput, GLossOutput

__all__ = ["bce_with_logits", "gan_d_loss", "gan_g_loss", "DLossOutput", "GLossOutput"]


def _kernels():
    """The Triton kernels, imported on first use so that fastgen imports without triton."""
    from fastgen.kernels import bce
    return bce


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
        loss, grad = _kernels().bce_forward(logits, target, n_rows, reduction == "none", scale)
        ctx.reduction, ctx.scale, ctx.n_rows = reduction, scale, n_rows
        ctx.target_dtype = target.dtype
        # Only d/dtarget = -logits needs the logits; most targets are data without gradient.
        ctx.save_for_backward(grad, logits if ctx.needs_input_grad[1] else None)
        return loss.view(()) if reduction in ("mean", "sum") else loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad, logits = ctx.saved_tensors
        grad_logits = grad_target = None
        if ctx.reduction == "none":
            if ctx.needs_input_grad[0]:
                grad_logits = grad * grad_output
        elif ctx.needs_input_grad[0]:
            n_cols = grad.numel() // ctx.n_rows
            grad_logits = _kernels().scale_grad(grad, grad_output, ctx.n_rows, n_cols, ctx.scale, ctx.scale)
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
        loss, stats, grad = _kernels().gan_loss_forward(
            real_flat, fake.contiguous(), real_target, fake_target, real_weight, fake_weight)
        ctx.save_for_backward(grad)
        ctx.real_shape = None if real is None else real.shape
        ctx.fake_shape = fake.shape
        ctx.weights = (real_weight, fake_weight)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_stats: Tensor):
        (grad,) = ctx.saved_tensors
        n_real = 0 if ctx.real_shape is None else ctx.real_shape.numel()
        scaled = _kernels().scale_grad(grad, grad_loss, 1, n_real, *ctx.weights)
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
