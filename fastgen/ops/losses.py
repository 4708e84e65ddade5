"""BCE with logits and the GAN losses: ``torch.ops.fastgen.bce_with_logits`` and
``torch.ops.fastgen.gan_loss``, their backward ops, and the public functions.

Both forward ops return, beside the loss, the unit gradient dloss/dlogits of every element (the
kernels compute it in the loss's pass), so each backward is one scaling pass. The GAN op covers
the discriminator loss (real and fake logits, label smoothing) and both generator losses as one
weighted BCE of two inputs against constant targets:
``loss = real_weight * sum bce(real, real_target) + fake_weight * sum bce(fake, fake_target)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastgen import backend, reference
from fastgen.ops import _checks, _library
from fastgen.ops._library import (empty, forward_backend, none_if_empty, record_backend,
                                  reference_double_backward)
from fastgen.reference import REDUCTIONS, DLossOutput, GLossOutput

__all__ = ["bce_with_logits", "gan_d_loss", "gan_g_loss", "DLossOutput", "GLossOutput"]


def _unit_grad(logits: Tensor, target: Tensor | float) -> Tensor:
    """dloss/dlogits = sigmoid(x) - t as (1 - t) sigmoid(x) - t sigmoid(-x): each term keeps its
    relative precision at any logit (sigmoid(x) - 1 cancels to 0 from x ~ 17 in float32)."""
    x = logits.double() if logits.dtype == torch.float64 else logits.float()
    return ((1.0 - target) * torch.sigmoid(x) - target * torch.sigmoid(-x)).to(logits.dtype)


# ----------------------------------------------------------------------------------------------
# BCE with logits


def _bce_layout(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """The kernel walks memory order: logits batch-major dense (channels_last decoder outputs stay
    as they are), target with the logits' strides."""
    if not _checks.batch_major_dense(logits):
        logits = logits.contiguous()
    if target.stride() != logits.stride():
        target = torch.empty_like(logits, dtype=target.dtype).copy_(target)
    return logits, target


def _bce_scale(logits: Tensor, reduction: str) -> tuple[int, float]:
    """(rows, factor on each row's sum) of a reduction."""
    n_rows = logits.shape[0] if reduction == "per_sample" else 1
    return n_rows, 1.0 / logits.numel() if reduction == "mean" else 1.0


@torch.library.custom_op("fastgen::bce_with_logits", mutates_args=())
def _bce_op(logits: Tensor, target: Tensor, reduction: str) -> tuple[Tensor, Tensor]:
    """(loss, unit gradient): the loss as :func:`bce_with_logits` returns it, and
    sigmoid(logits) - target laid out as the kernel's logits (batch-major dense)."""
    def fused() -> tuple[Tensor, Tensor]:
        x, t = _bce_layout(logits, target)
        n_rows, scale = _bce_scale(x, reduction)
        loss, grad = _library.bce.bce_forward(x, t, n_rows, reduction == "none", scale)
        return (loss.view(()) if reduction in ("mean", "sum") else loss), grad

    def ref() -> tuple[Tensor, Tensor]:
        x, t = _bce_layout(logits, target)
        return reference.bce_with_logits(x, t, reduction=reduction), _unit_grad(x, t)

    return backend.dispatch("bce_with_logits", (logits, target), fused, ref)


@_bce_op.register_fake
def _(logits: Tensor, target: Tensor, reduction: str) -> tuple[Tensor, Tensor]:
    grad = torch.empty_like(logits if _checks.batch_major_dense(logits) else logits.contiguous())
    if reduction == "none":
        return torch.empty_like(grad), grad
    shape = (logits.shape[0],) if reduction == "per_sample" else ()
    return logits.new_empty(shape), grad


@torch.library.custom_op("fastgen::bce_with_logits_backward", mutates_args=())
def _bce_backward_op(grad_output: Tensor, grad: Tensor, logits: Tensor, target: Tensor,
                     reduction: str, output_mask: list[bool]) -> tuple[Tensor, Tensor]:
    """(dlogits, dtarget) from the forward's unit gradient; empty where ``output_mask`` is False."""
    n_rows, scale = _bce_scale(logits, reduction)
    per_row = grad_output.view(-1, *([1] * (logits.dim() - 1))) if reduction == "per_sample" else grad_output
    grad_target = empty(logits)
    if output_mask[1]:  # -logits: in the wider of the two dtypes, then the target's
        wide = torch.promote_types(logits.dtype, target.dtype)
        grad_target = (logits.to(wide) * (per_row.to(wide) * -scale)).to(target.dtype)
    if not output_mask[0]:
        return empty(grad), grad_target

    def fused() -> Tensor:
        if reduction == "none":
            return grad * grad_output
        return _library.bce.scale_grad(grad, grad_output, n_rows, grad.numel() // n_rows, scale, scale)

    return backend.dispatch("bce_with_logits", (grad, grad_output), fused,
                            lambda: (grad * (per_row * scale)).to(grad.dtype)), grad_target


@_bce_backward_op.register_fake
def _(grad_output, grad, logits, target, reduction, output_mask):
    return (torch.empty_like(grad) if output_mask[0] else empty(grad),
            torch.empty_like(logits, dtype=target.dtype) if output_mask[1] else empty(logits))


def _bce_setup(ctx, inputs, output) -> None:
    record_backend(ctx)
    logits, target, reduction = inputs
    ctx.reduction = reduction
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1], logits, target)


def _bce_backward(ctx, grad_loss: Tensor, _grad_unit: Tensor):
    grad, logits, target = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:2])
    with forward_backend(ctx):
        grad_logits, grad_target = _bce_backward_op(grad_loss, grad, logits, target, ctx.reduction, mask)
    return none_if_empty(grad_logits), none_if_empty(grad_target), None


def _bce_backward_setup(ctx, inputs, output) -> None:
    grad_output, _, logits, target, reduction, _ = inputs
    ctx.reduction = reduction
    ctx.save_for_backward(grad_output, logits, target)


def _bce_double_backward(ctx, gg_logits: Tensor, gg_target: Tensor):
    grad_output, logits, target = ctx.saved_tensors
    d_logits, d_target, d_grad_output = reference_double_backward(
        lambda x, t: reference.bce_with_logits(x, t, reduction=ctx.reduction), (logits, target),
        (grad_output,), (none_if_empty(gg_logits), none_if_empty(gg_target)), "bce_with_logits")
    return d_grad_output, None, d_logits, d_target, None, None


_bce_op.register_autograd(_bce_backward, setup_context=_bce_setup)
_bce_backward_op.register_autograd(_bce_double_backward, setup_context=_bce_backward_setup)


def bce_with_logits(logits: Tensor, target: Tensor, *, reduction: str = "mean") -> Tensor:
    """Binary cross-entropy on logits, loss and gradient in one pass over the data
    (``torch.ops.fastgen.bce_with_logits``).

    Args:
        logits: any non-empty shape, float32 / float16 / bfloat16 (any strides; channels_last
            is used as it is).
        target: same shape and device as ``logits``, floating dtype, values in [0, 1].
        reduction: "none" (per element, ``logits``' shape), "mean" or "sum" (0-dim), or
            "per_sample" (sum over all dimensions but the first: ``(B,)``, the negative
            log-likelihood of a Bernoulli decoder per sample).

    Returns:
        The loss in ``logits``' dtype, accumulated in float32. Finite for any finite logits;
        differentiable twice (the second derivatives are the reference's).
    """
    _checks.tensor("logits", logits)
    _checks.tensor("target", target)
    _checks.same_device(logits=logits, target=target)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if target.shape != logits.shape:
        raise ValueError(f"target: expected the shape of logits {tuple(logits.shape)}, got {tuple(target.shape)}")
    if reduction == "per_sample" and logits.dim() == 0:
        raise ValueError("logits: reduction 'per_sample' needs a batch dimension, got a 0-dim tensor")
    return _bce_op(logits, target, reduction)[0]


# ----------------------------------------------------------------------------------------------
# GAN losses


def _weighted_bce_sum(real: Tensor | None, fake: Tensor, real_target: float, fake_target: float,
                      real_weight: float, fake_weight: float) -> Tensor:
    """The GAN op's loss in reference math."""
    loss = reference.bce_with_logits(fake, torch.full_like(fake, fake_target), reduction="sum") * fake_weight
    if real is not None:
        loss = loss + reference.bce_with_logits(real, torch.full_like(real, real_target),
                                                reduction="sum") * real_weight
    return loss


@torch.library.custom_op("fastgen::gan_loss", mutates_args=())
def _gan_op(real: Tensor | None, fake: Tensor, real_target: float, fake_target: float,
            real_weight: float, fake_weight: float) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, stats, unit gradient): stats float32 ``(2,)`` = mean sigmoid(real) (0 without real),
    mean sigmoid(fake); the unit gradient ``(n_real + n_fake,)`` of real then fake, fake's dtype."""
    tensors = (fake,) if real is None else (real, fake)

    def fused() -> tuple[Tensor, Tensor, Tensor]:
        return _library.bce.gan_loss_forward(None if real is None else real.contiguous(),
                                             fake.contiguous(), real_target, fake_target,
                                             real_weight, fake_weight)

    def ref() -> tuple[Tensor, Tensor, Tensor]:
        loss = _weighted_bce_sum(real, fake, real_target, fake_target, real_weight, fake_weight)
        d_fake = torch.sigmoid(fake.float()).mean()
        d_real = d_fake.new_zeros(()) if real is None else torch.sigmoid(real.float()).mean()
        grads = [_unit_grad(fake, fake_target).reshape(-1)]
        if real is not None:
            grads.insert(0, _unit_grad(real, real_target).reshape(-1).to(fake.dtype))
        return loss.to(fake.dtype), torch.stack([d_real, d_fake]), torch.cat(grads)

    return backend.dispatch("gan_loss", tensors, fused, ref)


@_gan_op.register_fake
def _(real, fake, real_target, fake_target, real_weight, fake_weight):
    n_real = 0 if real is None else real.numel()
    return (fake.new_empty(()), fake.new_empty(2, dtype=torch.float32),
            fake.new_empty(n_real + fake.numel()))


@torch.library.custom_op("fastgen::gan_loss_backward", mutates_args=())
def _gan_backward_op(grad_loss: Tensor, grad: Tensor, real: Tensor | None, fake: Tensor,
                     real_target: float, fake_target: float, real_weight: float,
                     fake_weight: float) -> Tensor:
    """The flat gradient of real then fake, ``grad * grad_loss * weight`` (real's weight on the
    first ``real.numel()`` elements). real and fake are there for the second derivatives."""
    n_real = 0 if real is None else real.numel()

    def ref() -> Tensor:
        weights = torch.full_like(grad, fake_weight)
        weights[:n_real] = real_weight
        return (grad * grad_loss * weights).to(grad.dtype)

    return backend.dispatch(
        "gan_loss", (grad, grad_loss),
        lambda: _library.bce.scale_grad(grad, grad_loss, 1, n_real, real_weight, fake_weight), ref)


@_gan_backward_op.register_fake
def _(grad_loss, grad, real, fake, real_target, fake_target, real_weight, fake_weight):
    return torch.empty_like(grad)


def _gan_setup(ctx, inputs, output) -> None:
    record_backend(ctx)
    real, fake, *ctx.params = inputs
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(output[2], real, fake)


def _gan_backward(ctx, grad_loss: Tensor, _grad_stats: Tensor, _grad_unit: Tensor):
    grad, real, fake = ctx.saved_tensors
    with forward_backend(ctx):
        flat = _gan_backward_op(grad_loss, grad, real, fake, *ctx.params)
    # Disjoint views of one buffer: the two gradients never write each other's elements.
    n_real = 0 if real is None else real.numel()
    grad_real = None if real is None else flat[:n_real].view(real.shape)
    return grad_real, flat[n_real:].view(fake.shape), None, None, None, None


def _gan_backward_setup(ctx, inputs, output) -> None:
    grad_loss, _, real, fake, *ctx.params = inputs
    ctx.save_for_backward(grad_loss, real, fake)


def _gan_double_backward(ctx, gg_flat: Tensor):
    grad_loss, real, fake = ctx.saved_tensors
    n_real = 0 if real is None else real.numel()
    gg_real = None if real is None else gg_flat[:n_real].view(real.shape)
    d_real, d_fake, d_grad_loss = reference_double_backward(
        lambda r, f: _weighted_bce_sum(r, f, *ctx.params), (real, fake), (grad_loss,),
        (gg_real, gg_flat[n_real:].view(fake.shape)), "gan_loss")
    return d_grad_loss, None, d_real, d_fake, None, None, None, None


_gan_op.register_autograd(_gan_backward, setup_context=_gan_setup)
_gan_backward_op.register_autograd(_gan_double_backward, setup_context=_gan_backward_setup)


def gan_d_loss(real_logits: Tensor, fake_logits: Tensor, *, label_smoothing: float = 0.0) -> DLossOutput:
    """Discriminator loss ``-mean log D(x) - mean log(1 - D(G(z)))`` with D(x) means for logging
    (``torch.ops.fastgen.gan_loss``).

    One pass over the logits computes the loss, the gradient for both inputs and the means of D(x)
    and D(G(z)) (two launches: per-chunk partials, then their fixed-order sum); backward is one
    more launch. Differentiable twice (gradient penalties).

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
    _checks.tensor("real_logits", real_logits)
    _checks.tensor("fake_logits", fake_logits)
    _checks.same_device(real_logits=real_logits, fake_logits=fake_logits)
    _checks.same_dtype(real_logits=real_logits, fake_logits=fake_logits)
    smoothing = _checks.unit_interval("label_smoothing", label_smoothing, closed=False)
    loss, stats, _ = _gan_op(real_logits, fake_logits, 1.0 - smoothing, 0.0,
                             1.0 / real_logits.numel(), 1.0 / fake_logits.numel())
    return DLossOutput(loss, stats[0], stats[1])


def gan_g_loss(fake_logits: Tensor, *, saturating: bool = False) -> GLossOutput:
    """Generator loss on D's logits for generated data, with the mean of D(G(z)) for logging
    (``torch.ops.fastgen.gan_loss``).

    ``saturating=False`` (non-saturating, the usual choice): ``-mean log D(G(z))``.
    ``saturating=True`` (the original minimax form): ``mean log(1 - D(G(z)))``, which G minimizes.

    Args:
        fake_logits: any non-empty shape, float32 / float16 / bfloat16.

    Returns:
        ``GLossOutput(loss, d_fake)``: loss 0-dim in the logits' dtype; d_fake 0-dim float32
        without gradient.
    """
    _checks.tensor("fake_logits", fake_logits)
    weight = 1.0 / fake_logits.numel()
    target, weight = (0.0, -weight) if saturating else (1.0, weight)
    loss, stats, _ = _gan_op(None, fake_logits, 0.0, target, 0.0, weight)
    return GLossOutput(loss, stats[1])
