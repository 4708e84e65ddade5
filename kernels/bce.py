"""Fused binary cross-entropy with logits and GAN losses: loss and gradient in one pass.

For a logit x and a target t in [0, 1], with e = exp(-|x|) in (0, 1]:

    loss(x, t) = softplus(x) - t * x       = max(x, 0) - t * x + log1p(e)
    dloss/dx   = (1 - t) * sigmoid(x) - t * sigmoid(-x)
    sigmoid(x) = (1 if x >= 0 else e) / (1 + e),  sigmoid(-x) = (e if x >= 0 else 1) / (1 + e)

The gradient is never formed as sigmoid(x) - t: for t = 1 and x = 17 that difference rounds to 0
in fp32 where the exact value is -sigmoid(-17) = -4.1e-8. Written as above, each term is a
product of a target weight and a sigmoid computed to full relative precision, so every gradient
keeps its relative precision at any logit: to the last bits for hard targets (one term is 0),
up to the cancellation inherent in the value near sigmoid(x) = t for soft ones. Nothing
exponentiates a positive number, so loss and gradient are finite for any finite x (+-1e4
included). Math is float32 (float64 for float64 inputs, so gradcheck runs fused).
The GAN losses are BCE with constant targets and signed weights:

    D loss            = mean BCE(real, 1 - smoothing) + mean BCE(fake, 0)
    G non-saturating  = mean BCE(fake, 1)       (= -mean log D(G(z)))
    G saturating      = -mean BCE(fake, 0)      (=  mean log(1 - D(G(z))))

The forward kernels store the unscaled per-element gradient dloss/dx in the logits' dtype; the
backward multiplies it by grad_output times the reduction's weight (1/N for a mean) in fp32,
so the small factor 1/N is applied once, at the end, where fp16 would otherwise lose it.
All sums are per-program partials reduced in a fixed order: no atomics, bit-identical reruns.

Host wrappers take dense tensors and treat them as ``n_rows`` rows of equal length in memory
order; fastgen.functional validates inputs and arranges layouts before calling them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, tl_acc_dtype, to_acc

# Logits per program of the GAN losses: a DCGAN batch is one program, PatchGAN logits
# (256 x 1 x 30 x 30 = 230400) spread over 225 programs per input.
GAN_BLOCK = 1024


def _block_and_warps(n_cols: int) -> tuple[int, int]:
    """Elements per program for rows of ``n_cols``: up to 4096, to keep enough programs in flight."""
    block = min(4096, max(128, triton.next_power_of_2(n_cols)))
    return block, (8 if block >= 4096 else 4)


@triton.jit
def _bce_loss_grad_sigmoid(x, t):
    """Elementwise (loss, dloss/dx, sigmoid(x)) of BCE with logits, fp32 in and out."""
    e = tl.exp(-tl.abs(x))
    one_plus_e = 1.0 + e
    # log1p(e) accurate for tiny e (Goldberg's trick): the interpreter has no libdevice.log1p.
    exact = one_plus_e == 1.0
    log1p_e = tl.where(exact, e, tl.log(one_plus_e) * (e / tl.where(exact, 1.0, one_plus_e - 1.0)))
    loss = tl.maximum(x, 0.0) - t * x + log1p_e
    positive = x >= 0
    sig = tl.where(positive, 1.0, e) / one_plus_e
    sig_neg = tl.where(positive, e, 1.0) / one_plus_e  # sigmoid(-x), not 1 - sigmoid(x)
    return loss, (1.0 - t) * sig - t * sig_neg, sig


@triton.jit
def _gan_loss_fwd_kernel(real_ptr, fake_ptr, grad_ptr, partial_ptr, n_real, n_fake, n_real_chunks,
                         n_chunks, real_target: tl.float64, fake_target: tl.float64,
                         BLOCK: tl.constexpr, ACC: tl.constexpr):
    """One BLOCK of real (programs [0, n_real_chunks)) or fake logits (the rest) against a constant
    target: store dloss/dx (real at grad[0, n_real), fake at grad[n_real, n_real + n_fake)) and the
    chunk's (sum loss, sum sigmoid) at partial[0, pid], partial[1, pid] (partial is (2, n_chunks))."""
    pid = tl.program_id(0).to(tl.int64)
    is_real = pid < n_real_chunks
    offs = tl.where(is_real, pid, pid - n_real_chunks) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < tl.where(is_real, n_real, n_fake)
    x = tl.load(tl.where(is_real, real_ptr, fake_ptr) + offs, mask=mask, other=0.0).to(ACC)
    target = tl.where(is_real, to_acc(real_target, ACC), to_acc(fake_target, ACC))
    loss, grad, sig = _bce_loss_grad_sigmoid(x, target)
    grad_offs = tl.where(is_real, offs, n_real + offs)
    tl.store(grad_ptr + grad_offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)
    tl.store(partial_ptr + pid, tl.sum(tl.where(mask, loss, 0.0), axis=0))
    tl.store(partial_ptr + n_chunks + pid, tl.sum(tl.where(mask, sig, 0.0), axis=0))


@triton.jit
def _gan_loss_sum_kernel(partial_ptr, loss_ptr, stats_ptr, n_real, n_fake, n_real_chunks, n_chunks,
                         real_weight: tl.float64, fake_weight: tl.float64, BLOCK: tl.constexpr):
    """loss = real_weight * sum real losses + fake_weight * sum fake losses, and
    stats = [mean sigmoid(real), mean sigmoid(fake)] (0 for an empty input), summing the chunk
    partials of :func:`_gan_loss_fwd_kernel` in a fixed order."""
    real_loss = tl.zeros([BLOCK], dtype=partial_ptr.dtype.element_ty)
    fake_loss = tl.zeros_like(real_loss)
    real_sig = tl.zeros_like(real_loss)
    fake_sig = tl.zeros_like(real_loss)
    for start in range(0, n_chunks, BLOCK):
        chunks = start + tl.arange(0, BLOCK)
        mask = chunks < n_chunks
        is_real = chunks < n_real_chunks
        loss = tl.load(partial_ptr + chunks, mask=mask, other=0.0)
        sig = tl.load(partial_ptr + n_chunks + chunks, mask=mask, other=0.0)
        real_loss += tl.where(is_real, loss, 0.0)
        fake_loss += tl.where(is_real, 0.0, loss)
        real_sig += tl.where(is_real, sig, 0.0)
        fake_sig += tl.where(is_real, 0.0, sig)
    acc = partial_ptr.dtype.element_ty
    loss = (to_acc(real_weight, acc) * tl.sum(real_loss, axis=0)
            + to_acc(fake_weight, acc) * tl.sum(fake_loss, axis=0))
    tl.store(loss_ptr, loss.to(loss_ptr.dtype.element_ty))
    tl.store(stats_ptr, (tl.sum(real_sig, axis=0) / tl.maximum(n_real, 1)).to(tl.float32))
    tl.store(stats_ptr + 1, (tl.sum(fake_sig, axis=0) / tl.maximum(n_fake, 1)).to(tl.float32))


@triton.jit
def _bce_fwd_kernel(x_ptr, t_ptr, grad_ptr, out_ptr, n_cols, n_chunks,
                    BLOCK: tl.constexpr, ELEMENTWISE: tl.constexpr, ACC: tl.constexpr):
    """One BLOCK of one row: store dloss/dx, and the loss itself (ELEMENTWISE) or its fp32 partial
    sum at out[row, chunk] (out is then (n_rows, n_chunks))."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_chunks
    chunk = pid % n_chunks
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    offs = row * n_cols + cols
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(ACC)
    loss, grad, _ = _bce_loss_grad_sigmoid(x, t)
    tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)
    if ELEMENTWISE:
        tl.store(out_ptr + offs, loss.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + pid, tl.sum(tl.where(mask, loss, 0.0), axis=0).to(out_ptr.dtype.element_ty))


@triton.jit
def _sum_rows_kernel(partial_ptr, out_ptr, n_chunks, scale: tl.float64, BLOCK: tl.constexpr):
    """out[row] = scale * sum(partial[row, :]), in a fixed order."""
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=partial_ptr.dtype.element_ty)
    for start in range(0, n_chunks, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + row * n_chunks + cols, mask=cols < n_chunks, other=0.0)
    scale = to_acc(scale, partial_ptr.dtype.element_ty)
    tl.store(out_ptr + row, (tl.sum(acc, axis=0) * scale).to(out_ptr.dtype.element_ty))


@triton.jit
def _scale_grad_kernel(grad_ptr, grad_output_ptr, out_ptr, n_cols, n_chunks, go_row_stride,
                       split, weight_lo: tl.float64, weight_hi: tl.float64, BLOCK: tl.constexpr,
                       ACC: tl.constexpr):
    """out[r, c] = grad[r, c] * grad_output[r * go_row_stride] * (weight_lo if c < split else weight_hi).

    go_row_stride 0 broadcasts a scalar grad_output; ``split`` gives two inputs packed in one row
    (the D loss's real and fake logits) their own weights.
    """
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_chunks
    cols = (pid % n_chunks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    offs = row * n_cols + cols
    grad = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(ACC)
    grad_output = tl.load(grad_output_ptr + row * go_row_stride).to(ACC)
    weight = tl.where(cols < split, to_acc(weight_lo, ACC), to_acc(weight_hi, ACC))
    tl.store(out_ptr + offs, (grad * (grad_output * weight)).to(out_ptr.dtype.element_ty), mask=mask)


def gan_loss_forward(real: torch.Tensor | None, fake: torch.Tensor, real_target: float,
                     fake_target: float, real_weight: float, fake_weight: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The weighted BCE of real and fake logits, dloss/dx of both, and the D means.

    Two launches: one program per GAN_BLOCK logits of either input, then a fixed-order sum of
    their partials (no atomics: bit-identical reruns).

    Args:
        real: contiguous logits on real data, or None (the generator's loss sees only fakes).
        fake: contiguous logits on generated data, same dtype and device.
        real_target, fake_target: the constant BCE targets.
        real_weight, fake_weight: each input's factor on its summed loss (1/N for a mean; negative
            for the saturating generator loss).

    Returns:
        loss: 0-dim, ``fake``'s dtype.
        stats: float32 ``(2,)``: mean sigmoid(real) (0 without ``real``), mean sigmoid(fake).
        grad: ``(n_real + n_fake,)`` in ``fake``'s dtype, the unweighted dloss/dx of real then fake.
    """
    n_real = 0 if real is None else real.numel()
    n_fake = fake.numel()
    n_real_chunks = triton.cdiv(n_real, GAN_BLOCK)
    n_chunks = n_real_chunks + triton.cdiv(n_fake, GAN_BLOCK)
    grad = torch.empty(n_real + n_fake, dtype=fake.dtype, device=fake.device)
    partial = torch.empty((2, n_chunks), dtype=acc_dtype(fake.dtype), device=fake.device)
    _gan_loss_fwd_kernel[(n_chunks,)](
        fake if real is None else real, fake, grad, partial, n_real, n_fake, n_real_chunks, n_chunks,
        real_target, fake_target, BLOCK=GAN_BLOCK, ACC=tl_acc_dtype(fake.dtype), num_warps=4)
    loss = torch.empty((), dtype=fake.dtype, device=fake.device)
    stats = torch.empty(2, dtype=torch.float32, device=fake.device)
    _gan_loss_sum_kernel[(1,)](partial, loss, stats, n_real, n_fake, n_real_chunks, n_chunks,
                               real_weight, fake_weight,
                               BLOCK=min(1024, triton.next_power_of_2(n_chunks)), num_warps=4)
    return loss, stats, grad


def bce_forward(logits: torch.Tensor, target: torch.Tensor, n_rows: int, elementwise: bool,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE with logits over ``n_rows`` equal rows of dense, identically strided tensors.

    Args:
        logits, target: dense tensors with the same strides, rows outermost in memory; target may
            have another floating dtype.
        n_rows: the number of rows (1 for a full reduction, the batch size for per-sample sums).
        elementwise: return the loss per element (``logits``' shape and strides) instead of per row.
        scale: factor on each row's sum (1/N for a mean); ignored when ``elementwise``.

    Returns:
        loss: ``logits``-like (elementwise) or ``(n_rows,)``, in ``logits``' dtype.
        grad: ``logits``-like, the unscaled dloss/dlogits in ``logits``' dtype.
    """
    n_cols = logits.numel() // n_rows
    block, warps = _block_and_warps(n_cols)
    n_chunks = triton.cdiv(n_cols, block)
    grad = torch.empty_like(logits)
    if elementwise:
        loss = torch.empty_like(logits)
        _bce_fwd_kernel[(n_rows * n_chunks,)](logits, target, grad, loss, n_cols, n_chunks,
                                              BLOCK=block, ELEMENTWISE=True,
                                              ACC=tl_acc_dtype(logits.dtype), num_warps=warps)
        return loss, grad
    partial = torch.empty((n_rows, n_chunks), dtype=acc_dtype(logits.dtype), device=logits.device)
    _bce_fwd_kernel[(n_rows * n_chunks,)](logits, target, grad, partial, n_cols, n_chunks,
                                          BLOCK=block, ELEMENTWISE=False,
                                          ACC=tl_acc_dtype(logits.dtype), num_warps=warps)
    loss = torch.empty(n_rows, dtype=logits.dtype, device=logits.device)
    _sum_rows_kernel[(n_rows,)](partial, loss, n_chunks, scale,
                                BLOCK=min(1024, triton.next_power_of_2(n_chunks)), num_warps=4)
    return loss, grad


def scale_grad(grad: torch.Tensor, grad_output: torch.Tensor, n_rows: int, split: int,
               weight_lo: float, weight_hi: float) -> torch.Tensor:
    """``grad`` (dense, ``n_rows`` rows in memory order) times a per-row or scalar grad_output.

    Args:
        grad: the stored dloss/dx; the result has its dtype and strides.
        grad_output: 0-dim, or ``(n_rows,)`` with any stride.
        split, weight_lo, weight_hi: columns below ``split`` take ``weight_lo``, the rest
            ``weight_hi``.
    """
    n_cols = grad.numel() // n_rows
    block, warps = _block_and_warps(n_cols)
    n_chunks = triton.cdiv(n_cols, block)
    go_row_stride = grad_output.stride(0) if grad_output.dim() else 0
    out = torch.empty_like(grad)
    _scale_grad_kernel[(n_rows * n_chunks,)](grad, grad_output, out, n_cols, n_chunks,
                                             go_row_stride, split, weight_lo, weight_hi,
                                             BLOCK=block, ACC=tl_acc_dtype(grad.dtype),
                                             num_warps=warps)
    return out
