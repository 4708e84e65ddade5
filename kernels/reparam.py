"""Reparameterized Gaussian sampling with its KL term, and the diagonal-Gaussian log-density.

Sampling, for mu and logvar of shape (B, D) and S samples per row:

    lv       = min(logvar, LOGVAR_MAX)                    (the clamp, see below)
    std      = exp(0.5 * lv)
    z[s]     = mu + std * eps[s],   eps ~ N(0, I) drawn by Philox, never stored
    kl       = 0.5 * sum_j (mu^2 + exp(lv) - 1 - lv)      (B,), KL(N(mu, diag exp(lv)) || N(0, I))

and its backward, for the upstream gradients gz (like z) and gkl (B,):

    dmu      = sum_s gz[s] + gkl * mu
    dlogvar  = (0.5 * std * sum_s gz[s] * eps[s] + 0.5 * gkl * (exp(lv) - 1)) * [logvar <= LOGVAR_MAX]

The backward regenerates eps from (key, offset) instead of reading it back.

Seeding: the key and the first counter come in ``seed_offset``, an int64 tensor (key, offset) on
the inputs' device that the kernels load themselves. Nothing is read on the host, so a call can
be captured in a CUDA graph and replayed with fresh noise by rewriting ``seed_offset`` (drawn on
the device, e.g. with ``torch.randint``, which the graph replays with the generator's new state).

Noise layout: element (s, b, j) of z is lane j % 4 of the Philox-4x32-10 block at counter
``offset + (s * B + b) * ceil(D / 4) + j // 4`` under ``key`` (0 <= key < 2**62); one block gives four
normals by Box-Muller (``tl.randn4x``). The 64-bit counter fills two 32-bit Philox words (triton
>= 3.4 splits an int64 offset so), so counters past 2**32 never wrap. A call uses
:func:`counters_used` counters; the mapping does not depend on block sizes, so forward and
backward agree whatever tiles they run. Box-Muller on 31-bit uniforms clamped at 1e-7 bounds
|eps| by 5.68 (probability 1.3e-8 of a true normal lying beyond).

Clamp: exp(lv) must stay finite in fp32 and so must a row's sum of D of them, so logvar is
clamped at LOGVAR_MAX = 80 (exp(80) = 5.5e34; a row of 6000 such terms still fits in fp32). As
for torch.clamp, the gradient is zero where logvar > LOGVAR_MAX. logvar in [-80, 80] gives
finite z, KL and gradients in fp32 and bf16; fp16 outputs overflow to inf where the value
passes fp16's range (|x| > 65504), as any fp16 op's would.

Log-density of z (B, D) or (S, B, D) under N(mu, diag exp(logvar)), mu and logvar (B, D)
shared by the S samples (or the standard normal, mu = 0, lv = 0), with the same clamp:

    r        = (z - mu) * exp(-0.5 * lv)
    out      = -0.5 * sum_j (r^2 + lv + log(2 pi))        (B,) or (S, B)
    dz       = -g * r * exp(-0.5 * lv)
    dmu      = sum_s g[s] * r[s] * exp(-0.5 * lv)
    dlogvar  = sum_s 0.5 * g[s] * (r[s]^2 - 1) * [logvar <= LOGVAR_MAX]

Math is fp32 (fp64 for fp64 inputs, so gradcheck runs on these kernels); outputs take the input
dtype. Each program owns whole rows, so every sum over D or over samples is a fixed-order loop:
no atomics, bit-identical reruns. Host wrappers take contiguous tensors; fastgen's op layer
validates inputs and draws ``seed_offset`` from torch's generator.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import tl_acc_dtype, to_acc

LOGVAR_MAX = 80.0
LOG_2PI = math.log(2.0 * math.pi)
# Widest column block; wider latents loop over D inside a program.
MAX_BLOCK_D = 1024
# Elements a program holds per step on the GPU, and per thread: 4 fp32 are one 16-byte access,
# and few enough live values (Philox state, int64 offsets) to stay near 60 registers; 16 a thread
# (4096-element tiles) took 200-247 registers on sm_90, one 256-thread CTA per SM.
GPU_TILE = 512
ELEMENTS_PER_THREAD = 4
INTERPRETER_TILE = 2**16


def counters_used(samples: int, n_rows: int, n_cols: int) -> int:
    """Philox counters one sampling call consumes: one 4-normal block per 4 columns of a row."""
    return samples * n_rows * triton.cdiv(n_cols, 4)


def _tiles(t: torch.Tensor, n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_D, num_warps): whole rows per program, GPU_TILE elements a step (one row of
    up to MAX_BLOCK_D columns), ELEMENTS_PER_THREAD each thread.

    CPU tensors run through Triton's interpreter, whose cost is per operation rather than per
    element: there, one program takes up to INTERPRETER_TILE elements. The noise does not depend
    on the tiles.
    """
    block_d = min(MAX_BLOCK_D, max(16, triton.next_power_of_2(n_cols)))
    if not t.is_cuda:
        return max(1, min(triton.next_power_of_2(n_rows), INTERPRETER_TILE // block_d)), block_d, 1
    block_b = max(1, min(triton.next_power_of_2(n_rows), GPU_TILE // block_d))
    warps = min(8, max(1, block_b * block_d // (32 * ELEMENTS_PER_THREAD)))
    return block_b, block_d, warps


def _rows_cols_samples(z: torch.Tensor, mu: torch.Tensor | None) -> tuple[int, int, int]:
    """z seen as S samples of (B, D) sharing mu's rows; without mu, one sample of all z's rows."""
    n_cols = z.shape[-1]
    n_rows = z.numel() // n_cols if mu is None else mu.shape[0]
    return n_rows, n_cols, z.numel() // (n_rows * n_cols)


@triton.jit
def _philox_key_offset(seed_offset_ptr):
    """(key, first counter), int64, loaded on the device: no host read, so launches can be captured."""
    return tl.load(seed_offset_ptr), tl.load(seed_offset_ptr + 1)


@triton.jit
def _normal_tile(key, offset, rows, col0, quads_per_row, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """eps for columns [col0, col0 + BLOCK_D) of the global sample rows ``rows`` (int64, (BLOCK_B,)),
    float32 (BLOCK_B, BLOCK_D). col0 is a multiple of 4: block q gives columns 4q .. 4q + 3."""
    quads = col0 // 4 + tl.arange(0, BLOCK_D // 4)
    counters = offset + rows[:, None] * quads_per_row + quads[None, :]
    n0, n1, n2, n3 = tl.randn4x(key, counters)
    # join stacks on a new last axis, so the outer join's index varies fastest: the flattened
    # order is n0, n1, n2, n3, each block's lanes in consecutive columns.
    return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (BLOCK_B, BLOCK_D))


@triton.jit
def _reparam_fwd_kernel(mu_ptr, logvar_ptr, z_ptr, kl_ptr, seed_offset_ptr, n_rows, n_cols, samples,
                        LOGVAR_MAX: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                        ACC: tl.constexpr):
    """z[s] = mu + exp(0.5 * lv) * eps[s] for every sample s, kl per row; BLOCK_B rows per program.
    seed_offset_ptr: int64 (Philox key, first counter)."""
    key, offset = _philox_key_offset(seed_offset_ptr)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < n_rows
    quads_per_row = (n_cols + 3) // 4
    kl_terms = tl.zeros([BLOCK_B, BLOCK_D], dtype=ACC)
    for col0 in range(0, n_cols, BLOCK_D):
        cols = col0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        offs = rows[:, None] * n_cols + cols[None, :]
        mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(ACC)
        lv = tl.minimum(tl.load(logvar_ptr + offs, mask=mask, other=0.0).to(ACC), LOGVAR_MAX,
                        propagate_nan=tl.PropagateNan.ALL)
        std = tl.exp(0.5 * lv)
        kl_terms += tl.where(mask, mu * mu + std * std - 1.0 - lv, 0.0)
        # Sample s lives at rows s * n_rows + rows of z seen as (S * B, D); stepping an int64
        # row vector keeps the index 64-bit.
        sample_rows = rows
        for _ in range(samples):
            eps = _normal_tile(key, offset, sample_rows, col0, quads_per_row, BLOCK_B, BLOCK_D).to(ACC)
            z = mu + std * eps
            tl.store(z_ptr + sample_rows[:, None] * n_cols + cols[None, :], z.to(z_ptr.dtype.element_ty), mask=mask)
            sample_rows += n_rows
    tl.store(kl_ptr + rows, (0.5 * tl.sum(kl_terms, axis=1)).to(kl_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _reparam_bwd_kernel(mu_ptr, logvar_ptr, grad_z_ptr, grad_kl_ptr, grad_mu_ptr, grad_logvar_ptr,
                        seed_offset_ptr, n_rows, n_cols, samples, LOGVAR_MAX: tl.constexpr,
                        HAS_GRAD_Z: tl.constexpr, HAS_GRAD_KL: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """dmu and dlogvar from gz (summed over samples, eps regenerated) and gkl; BLOCK_B rows per program."""
    key, offset = _philox_key_offset(seed_offset_ptr)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < n_rows
    quads_per_row = (n_cols + 3) // 4
    if HAS_GRAD_KL:
        grad_kl = tl.load(grad_kl_ptr + rows, mask=row_mask, other=0.0).to(ACC)[:, None]
    for col0 in range(0, n_cols, BLOCK_D):
        cols = col0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        offs = rows[:, None] * n_cols + cols[None, :]
        logvar = tl.load(logvar_ptr + offs, mask=mask, other=0.0).to(ACC)
        lv = tl.minimum(logvar, LOGVAR_MAX, propagate_nan=tl.PropagateNan.ALL)
        std = tl.exp(0.5 * lv)
        grad_mu = tl.zeros([BLOCK_B, BLOCK_D], dtype=ACC)
        grad_lv = tl.zeros([BLOCK_B, BLOCK_D], dtype=ACC)
        if HAS_GRAD_Z:
            grad_z_eps = tl.zeros([BLOCK_B, BLOCK_D], dtype=ACC)
            sample_rows = rows
            for _ in range(samples):
                eps = _normal_tile(key, offset, sample_rows, col0, quads_per_row, BLOCK_B, BLOCK_D).to(ACC)
                grad_z = tl.load(grad_z_ptr + sample_rows[:, None] * n_cols + cols[None, :], mask=mask,
                                 other=0.0).to(ACC)
                grad_mu += grad_z
                grad_z_eps += grad_z * eps
                sample_rows += n_rows
            grad_lv = 0.5 * std * grad_z_eps
        if HAS_GRAD_KL:  # only the KL's gradient reads mu
            mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(ACC)
            grad_mu += grad_kl * mu
            grad_lv += 0.5 * grad_kl * (std * std - 1.0)
        grad_lv = tl.where(logvar <= LOGVAR_MAX, grad_lv, 0.0)
        tl.store(grad_mu_ptr + offs, grad_mu.to(grad_mu_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_logvar_ptr + offs, grad_lv.to(grad_logvar_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gaussian_params(mu_ptr, logvar_ptr, offs, mask, LOGVAR_MAX: tl.constexpr, HAS_PARAMS: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """(mu, lv, inv_std, logvar) of a tile: lv the clamped logvar, inv_std = exp(-0.5 * lv); the
    standard normal (mu = lv = logvar = 0, inv_std = 1) without params."""
    if HAS_PARAMS:
        mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(ACC)
        logvar = tl.load(logvar_ptr + offs, mask=mask, other=0.0).to(ACC)
        lv = tl.minimum(logvar, LOGVAR_MAX, propagate_nan=tl.PropagateNan.ALL)
        inv_std = tl.exp(-0.5 * lv)
    else:
        mu = tl.zeros([BLOCK_B, BLOCK_D], dtype=ACC)
        logvar = mu
        lv = mu
        inv_std = mu + 1.0
    return mu, lv, inv_std, logvar


@triton.jit
def _log_normal_fwd_kernel(z_ptr, mu_ptr, logvar_ptr, out_ptr, n_rows, n_cols, samples,
                           log_2pi: tl.float64, LOGVAR_MAX: tl.constexpr, HAS_PARAMS: tl.constexpr,
                           BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """out[s, b] = -0.5 * sum_j (r^2 + lv + log 2pi) for every sample s; BLOCK_B rows per program."""
    log_2pi = to_acc(log_2pi, ACC)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < n_rows
    sample_rows = rows
    for _ in range(samples):
        terms = tl.zeros([BLOCK_B, BLOCK_D], dtype=ACC)
        for col0 in range(0, n_cols, BLOCK_D):
            cols = col0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (cols < n_cols)[None, :]
            z = tl.load(z_ptr + sample_rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0).to(ACC)
            mu, lv, inv_std, logvar = _gaussian_params(mu_ptr, logvar_ptr, rows[:, None] * n_cols + cols[None, :],
                                                       mask, LOGVAR_MAX, HAS_PARAMS, BLOCK_B, BLOCK_D, ACC)
            r = (z - mu) * inv_std
            terms += tl.where(mask, r * r + lv + log_2pi, 0.0)
        tl.store(out_ptr + sample_rows, (-0.5 * tl.sum(terms, axis=1)).to(out_ptr.dtype.element_ty),
                 mask=row_mask)
        sample_rows += n_rows


@triton.jit
def _log_normal_bwd_kernel(z_ptr, mu_ptr, logvar_ptr, grad_out_ptr, grad_z_ptr, grad_mu_ptr,
                           grad_logvar_ptr, n_rows, n_cols, samples, LOGVAR_MAX: tl.constexpr,
                           HAS_PARAMS: tl.constexpr, WRITE_GRAD_Z: tl.constexpr,
                           BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """dz per sample, and dmu, dlogvar summed over samples (HAS_PARAMS); BLOCK_B rows per program."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < n_rows
    for col0 in range(0, n_cols, BLOCK_D):
        cols = col0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        offs = rows[:, None] * n_cols + cols[None, :]
        mu, lv, inv_std, logvar = _gaussian_params(mu_ptr, logvar_ptr, offs, mask, LOGVAR_MAX, HAS_PARAMS,
                                                   BLOCK_B, BLOCK_D, ACC)
        grad_mu = tl.zeros([BLOCK_B, BLOCK_D], dtype=ACC)
        grad_lv = tl.zeros([BLOCK_B, BLOCK_D], dtype=ACC)
        sample_rows = rows
        for _ in range(samples):
            z_offs = sample_rows[:, None] * n_cols + cols[None, :]
            z = tl.load(z_ptr + z_offs, mask=mask, other=0.0).to(ACC)
            r = (z - mu) * inv_std
            grad_out = tl.load(grad_out_ptr + sample_rows, mask=row_mask, other=0.0).to(ACC)[:, None]
            grad_mu += grad_out * r * inv_std
            grad_lv += 0.5 * grad_out * (r * r - 1.0)
            if WRITE_GRAD_Z:
                tl.store(grad_z_ptr + z_offs, (-grad_out * r * inv_std).to(grad_z_ptr.dtype.element_ty), mask=mask)
            sample_rows += n_rows
        if HAS_PARAMS:
            tl.store(grad_mu_ptr + offs, grad_mu.to(grad_mu_ptr.dtype.element_ty), mask=mask)
            grad_lv = tl.where(logvar <= LOGVAR_MAX, grad_lv, 0.0)
            tl.store(grad_logvar_ptr + offs, grad_lv.to(grad_logvar_ptr.dtype.element_ty), mask=mask)


def _check_seed_offset(seed_offset: torch.Tensor, mu: torch.Tensor) -> None:
    """Shape, dtype and device only: the values stay on the device (no sync, capture-safe)."""
    if not isinstance(seed_offset, torch.Tensor):
        raise TypeError(f"seed_offset: expected an int64 tensor (key, first counter), got {type(seed_offset).__name__}")
    if seed_offset.dtype != torch.int64 or seed_offset.shape != (2,) or not seed_offset.is_contiguous():
        raise ValueError(f"seed_offset: expected a contiguous int64 tensor of shape (2,), got "
                         f"{seed_offset.dtype} of shape {tuple(seed_offset.shape)}, strides {seed_offset.stride()}")
    if seed_offset.device != mu.device:
        raise ValueError(f"seed_offset: expected it on mu's device {mu.device}, got {seed_offset.device}")


def reparameterize_forward(mu: torch.Tensor, logvar: torch.Tensor, samples: int,
                           seed_offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch: z for ``samples`` draws of eps at Philox (key, offset), and the KL per row.

    Args:
        mu, logvar: contiguous ``(B, D)``, one floating dtype.
        samples: S >= 1.
        seed_offset: int64 ``(2,)`` on mu's device: the Philox key (0 <= key < 2**62) and the first
            counter (>= 0; the call uses :func:`counters_used` from it). The kernel reads both on
            the device, so a call can be captured in a CUDA graph and replayed with new values.

    Returns:
        z: ``(B, D)`` when S = 1, else ``(S, B, D)``, in ``mu``'s dtype.
        kl: ``(B,)`` in ``mu``'s dtype.
    """
    _check_seed_offset(seed_offset, mu)
    n_rows, n_cols = mu.shape
    z = torch.empty(mu.shape if samples == 1 else (samples, n_rows, n_cols), dtype=mu.dtype, device=mu.device)
    kl = torch.empty(n_rows, dtype=mu.dtype, device=mu.device)
    block_b, block_d, warps = _tiles(mu, n_rows, n_cols)
    _reparam_fwd_kernel[(triton.cdiv(n_rows, block_b),)](
        mu, logvar, z, kl, seed_offset, n_rows, n_cols, samples, LOGVAR_MAX=LOGVAR_MAX,
        BLOCK_B=block_b, BLOCK_D=block_d, ACC=tl_acc_dtype(mu.dtype), num_warps=warps)
    return z, kl


def reparameterize_backward(mu: torch.Tensor, logvar: torch.Tensor, grad_z: torch.Tensor | None,
                            grad_kl: torch.Tensor | None, samples: int, seed_offset: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch: dmu and dlogvar, regenerating the forward's eps from ``seed_offset``.

    Args:
        mu, logvar: the forward's contiguous ``(B, D)`` inputs.
        grad_z: contiguous, ``S * B * D`` elements laid out as z, or None (z unused).
        grad_kl: contiguous ``(B,)``, or None (kl unused).
        samples, seed_offset: the forward's (the same values: keep the tensor, or a copy of it,
            unchanged until the backward has run).

    Returns:
        (grad_mu, grad_logvar), ``(B, D)`` each in ``mu``'s dtype.
    """
    _check_seed_offset(seed_offset, mu)
    n_rows, n_cols = mu.shape
    grad_mu, grad_logvar = torch.empty_like(mu), torch.empty_like(mu)
    block_b, block_d, warps = _tiles(mu, n_rows, n_cols)
    _reparam_bwd_kernel[(triton.cdiv(n_rows, block_b),)](
        mu, logvar, mu if grad_z is None else grad_z, mu if grad_kl is None else grad_kl,
        grad_mu, grad_logvar, seed_offset, n_rows, n_cols, samples, LOGVAR_MAX=LOGVAR_MAX,
        HAS_GRAD_Z=grad_z is not None, HAS_GRAD_KL=grad_kl is not None,
        BLOCK_B=block_b, BLOCK_D=block_d, ACC=tl_acc_dtype(mu.dtype), num_warps=warps)
    return grad_mu, grad_logvar


def log_normal_diag_forward(z: torch.Tensor, mu: torch.Tensor | None, logvar: torch.Tensor | None
                            ) -> torch.Tensor:
    """One launch: the log-density of each row of z, summed over its D columns.

    Args:
        z: contiguous, S * B rows of D (``(B, D)`` or ``(S, B, D)``).
        mu, logvar: contiguous ``(B, D)`` shared by the S samples, or both None (standard normal).

    Returns:
        ``z.shape[:-1]`` in ``z``'s dtype.
    """
    n_rows, n_cols, samples = _rows_cols_samples(z, mu)
    out = torch.empty(z.shape[:-1], dtype=z.dtype, device=z.device)
    block_b, block_d, warps = _tiles(z, n_rows, n_cols)
    _log_normal_fwd_kernel[(triton.cdiv(n_rows, block_b),)](
        z, z if mu is None else mu, z if logvar is None else logvar, out, n_rows, n_cols, samples,
        LOG_2PI, LOGVAR_MAX=LOGVAR_MAX, HAS_PARAMS=mu is not None, BLOCK_B=block_b,
        BLOCK_D=block_d, ACC=tl_acc_dtype(z.dtype), num_warps=warps)
    return out


def log_normal_diag_backward(z: torch.Tensor, mu: torch.Tensor | None, logvar: torch.Tensor | None,
                             grad_out: torch.Tensor, write_grad_z: bool
                             ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """One launch: dz, and dmu and dlogvar summed over the samples.

    Args:
        z, mu, logvar: the forward's contiguous inputs.
        grad_out: contiguous, shaped like the forward's output.
        write_grad_z: False when z needs no gradient (dz is then None and never written).

    Returns:
        (grad_z, grad_mu, grad_logvar); the last two are None without mu, logvar.
    """
    n_rows, n_cols, samples = _rows_cols_samples(z, mu)
    grad_z = torch.empty_like(z) if write_grad_z else None
    grad_mu = grad_logvar = None
    if mu is not None:
        grad_mu, grad_logvar = torch.empty_like(mu), torch.empty_like(mu)
    block_b, block_d, warps = _tiles(z, n_rows, n_cols)
    _log_normal_bwd_kernel[(triton.cdiv(n_rows, block_b),)](
        z, z if mu is None else mu, z if logvar is None else logvar, grad_out,
        z if grad_z is None else grad_z, z if grad_mu is None else grad_mu,
        z if grad_logvar is None else grad_logvar, n_rows, n_cols, samples, LOGVAR_MAX=LOGVAR_MAX,
        HAS_PARAMS=mu is not None, WRITE_GRAD_Z=write_grad_z, BLOCK_B=block_b, BLOCK_D=block_d,
        ACC=tl_acc_dtype(z.dtype), num_warps=warps)
    return grad_z, grad_mu, grad_logvar
