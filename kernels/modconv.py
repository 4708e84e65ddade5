"""StyleGAN2's modulated convolution on the implicit-GEMM conv of kernels/conv_bn_act.py; fwd and bwd.

Shapes: x (N, C_in, H, W) (NHWC inside), the shared weight w (C_out, C_in, kH, kW), styles s
(N, C_in); ``up=1`` is a conv with w, ``up=2`` a stride-2 transposed conv with w seen as
(C_in, C_out, kH, kW) (StyleGAN2's layout: the same tensor for both). Per-sample weights
w[o, i] * s[n, i] are never built: the conv is linear in its input, so

    y[n, o] = conv(x[n] * s[n], w)[o]                 (the GEMM scales A per sample and channel)
    d[n, o] = 1 / sqrt(sum_i s[n, i]^2 * sum_{kh,kw} w[o, i]^2 + eps)      (_demodulation_kernel)
    z = y * d[n, o] + bias[o] + strength * noise[n, oh, ow],   out = act(z) * gain   (epilogue)

one GEMM launch (its MODULATED epilogue) after the small demodulation kernel. Without
demodulation d = 1. The scaled operand x * s is rounded to x's dtype before the MMA (fp16 / bf16:
as a per-sample weight in that dtype would be); sums accumulate in fp32.

Backward (e = -d^3 / 2 * dd):

    dz = dout * gain * act'(z)                      recomputed from the saved y   (Triton, one pass
    dd[n, o] = sum_p dz * y,  dbias = sum dz,        with per-tile partials; their fixed-order sums
    sum_o dz per pixel (dnoise, dstrength)           and the noise terms are torch)
    dy = dz * d;  g = conv^T(dy, w): the GEMM with A = dz scaled by d (the same prologue),
    dx = s * g in its epilogue, g stored too         (Triton)
    ds[n, i] = sum_p x * g + 2 s[n, i] sum_o e[n, o] sum_{kh,kw} w[o, i]^2     (torch)
    dw = wgrad(x * s, dz * d) + 2 w[o, i] sum_n e[n, o] s[n, i]^2
         (the weight-gradient kernel with both operands scaled; the demodulation term in torch)

The ds and demodulation terms are small (N, C_out, C_in) contractions and one reduction over x;
fastgen/ops/modconv.py runs them. Host wrappers take NHWC-contiguous activations and allocate
every output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, tl_acc_dtype
from .conv_bn_act import (MAX_GRID_Z, MODULATED, _activate_backward, _conv_gemm, _conv_wgrad,
                          _elementwise_blocks)

# The demodulation kernel: output channels per program, reduction columns (C_in * kH * kW) per step.
DEMOD_BLOCKS = (32, 128)


@triton.jit
def _demodulation_kernel(w_ptr, s_ptr, d_ptr, C_out, C_in, KK, eps, ACC: tl.constexpr,
                         BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
    """d[n, o] = 1 / sqrt(sum_{i, t} (w[o, i, t] * s[n, i])^2 + eps); w (C_out, C_in * KK)
    contiguous (KK = kH * kW taps), s (N, C_in); program (n, block of o)."""
    n = tl.program_id(0)
    outs = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    out_ok = outs < C_out
    cols = tl.arange(0, BLOCK_K)
    total = tl.zeros((BLOCK_O, BLOCK_K), dtype=ACC)
    for k0 in range(0, C_in * KK, BLOCK_K):
        k = k0 + cols
        k_ok = k < C_in * KK
        s = tl.load(s_ptr + n * C_in + k // KK, mask=k_ok, other=0.0).to(ACC)
        w = tl.load(w_ptr + outs[:, None] * (C_in * KK) + k[None, :],
                    mask=out_ok[:, None] & k_ok[None, :], other=0.0).to(ACC)
        ws = w * s[None, :]
        total += ws * ws
    d = 1.0 / tl.sqrt(tl.sum(total, axis=1) + eps)
    tl.store(d_ptr + n * C_out + outs, d, mask=out_ok)


@triton.jit
def _modconv_grad_partials_kernel(dout_ptr, y_ptr, epi_ptr, noise_ptr, strength_ptr, dz_ptr,
                                  part_ptr, pixel_part_ptr, N, HW, C, slope, gain,
                                  NOISE: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """dz = dout * gain * act'(z), z = y * epi[n, c] + epi[N, c] (+ strength * noise[n, p]) over
    a (BLOCK_M pixels of sample n) x BLOCK_C tile of NHWC (N, HW, C) tensors; per tile
    part[0, n, tile, c] = sum_p dz * y, part[1, n, tile, c] = sum_p dz and
    pixel_part[channel tile, n, p] = sum_c dz."""
    p_tile = tl.program_id(0)
    c_tile = tl.program_id(1)
    n = tl.program_id(2)
    pixels = p_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = c_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = pixels < HW
    col_ok = cols < C
    mask = p_ok[:, None] & col_ok[None, :]
    offs = (n.to(tl.int64) * HW + pixels)[:, None] * C + cols[None, :]
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC)
    dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(ACC)
    z = (y * tl.load(epi_ptr + n * C + cols, mask=col_ok, other=0.0)[None, :]
         + tl.load(epi_ptr + N * C + cols, mask=col_ok, other=0.0)[None, :])
    if NOISE:
        noise = tl.load(noise_ptr + n.to(tl.int64) * HW + pixels, mask=p_ok, other=0.0).to(ACC)
        z += tl.load(strength_ptr).to(ACC) * noise[:, None]
    dz = tl.where(mask, _activate_backward(dout * gain, z, slope, ACT), 0.0)
    tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
    plane = N * tl.num_programs(0) * C
    base = part_ptr + (n * tl.num_programs(0) + p_tile) * C + cols
    tl.store(base, tl.sum(dz * y, axis=0), mask=col_ok)
    tl.store(base + plane, tl.sum(dz, axis=0), mask=col_ok)
    tl.store(pixel_part_ptr + (c_tile * N + n).to(tl.int64) * HW + pixels, tl.sum(dz, axis=1),
             mask=p_ok)


# ----------------------------------------------------------------------------------------------
# Host wrappers


def _geometry(padding: int, up: int) -> tuple[tuple[int, int], tuple[int, int], bool]:
    """(stride, padding, transposed) of the conv GEMM for ``up``; its weight, PyTorch's layout
    of that conv, is w for a conv and w.transpose(0, 1) for a transposed conv."""
    return (up, up), (padding, padding), up != 1


def _gemm_weight(weight: torch.Tensor, up: int) -> torch.Tensor:
    return weight if up == 1 else weight.transpose(0, 1)


def _epilogue_table(scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """MODULATED's epi: (N + 1, C) rows, the per-sample scales then the bias (zeros without)."""
    bias_row = (torch.zeros_like(scale[:1]) if bias is None
                else bias.to(scale.dtype).reshape(1, -1))
    return torch.cat([scale, bias_row]).contiguous()


def _noise_args(noise: torch.Tensor | None, noise_strength: torch.Tensor | None, like: torch.Tensor
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(noise (N, H, W) contiguous, a one-element strength tensor), or (None, None)."""
    if noise is None:
        return None, None
    strength = (torch.ones(1, dtype=acc_dtype(like.dtype), device=like.device)
                if noise_strength is None else noise_strength.reshape(1))
    return noise.reshape(noise.shape[0], *noise.shape[2:]).contiguous(), strength


def demodulation(weight: torch.Tensor, styles: torch.Tensor, eps: float) -> torch.Tensor:
    """StyleGAN2's demodulation coefficients of ``weight`` (C_out, C_in, kH, kW) for ``styles``
    (N, C_in): (N, C_out) float32 (float64 for float64 inputs)."""
    N, C_in = styles.shape
    C_out = weight.shape[0]
    KK = weight.shape[2] * weight.shape[3]
    acc = acc_dtype(weight.dtype)
    d = torch.empty((N, C_out), dtype=acc, device=weight.device)
    block_o, block_k = DEMOD_BLOCKS
    _demodulation_kernel[(N, triton.cdiv(C_out, block_o))](
        weight.contiguous(), styles.contiguous(), d, C_out, C_in, KK, eps, ACC=tl_acc_dtype(acc),
        BLOCK_O=block_o, BLOCK_K=block_k, num_warps=4)
    return d


def modconv_forward(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor,
                    demod: torch.Tensor | None, noise: torch.Tensor | None,
                    noise_strength: torch.Tensor | None, bias: torch.Tensor | None,
                    out_hw: tuple[int, int], padding: int, up: int, activation: int,
                    negative_slope: float, gain: float, store_pre: bool, channels_last: bool
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One GEMM launch: out = act(demod * conv(x * styles, weight) + strength * noise + bias) * gain.

    Args:
        x: (N, H, W, C_in) contiguous; weight: (C_out, C_in, kH, kW), x's dtype; styles: (N, C_in).
        demod: (N, C_out) from :func:`demodulation`, or None (no demodulation).
        noise: (N, 1, H_out, W_out) or None; noise_strength: one element or None (1).
        bias: (C_out,) or None. out_hw: (H_out, W_out) of the conv (``up=1``) or the stride-2
            transposed conv (``up=2``) with this ``padding``.
        activation: the code of fastgen's activation table.
        store_pre: also return y = conv(x * styles, weight) (for the backward).
        channels_last: out's memory format (else contiguous NCHW).

    Returns:
        out: (N, C_out, H_out, W_out); y or None: (N, H_out, W_out, C_out); both in x's dtype.
    """
    N = x.shape[0]
    acc = acc_dtype(x.dtype)
    stride, pad, transposed = _geometry(padding, up)
    scale = (torch.ones((N, weight.shape[0]), dtype=acc, device=x.device) if demod is None
             else demod.to(acc))
    noise_hw, strength = _noise_args(noise, noise_strength, x)
    y, out, _ = _conv_gemm(x, _gemm_weight(weight, up), out_hw, stride, pad, transposed,
                           MODULATED.value,
                           modulation=styles.to(acc).contiguous(),
                           epi=_epilogue_table(scale, bias), noise=noise_hw,
                           noise_strength=strength, activation=activation,
                           negative_slope=negative_slope, gain=gain, store_pre=store_pre,
                           channels_last=channels_last)
    return out, y


def epilogue_grads(dout: torch.Tensor, y: torch.Tensor, demod: torch.Tensor,
                   noise: torch.Tensor | None, noise_strength: torch.Tensor | None,
                   bias: torch.Tensor | None, activation: int, negative_slope: float, gain: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The epilogue's backward, one pass recomputing z from the saved y.

    Args:
        dout, y: (N, H_out, W_out, C_out) contiguous: dL/dout and the saved y. demod: (N, C_out)
            (ones without demodulation). Others as :func:`modconv_forward`.

    Returns:
        dz: (N, H_out, W_out, C_out) in dout's dtype; dL/ddemod (N, C_out), dL/dbias (C_out,)
        and sum_o dz (N, H_out, W_out), in the accumulation dtype.
    """
    N, HO, WO, C = y.shape
    if N > MAX_GRID_Z:
        raise ValueError(f"y: {N} samples; the modulated conv's backward takes at most {MAX_GRID_Z} "
                         "per call (a CUDA grid's third axis): split the batch")
    HW = HO * WO
    acc = acc_dtype(y.dtype)
    block_p, block_c = _elementwise_blocks(y.device)
    grid = (triton.cdiv(HW, block_p), triton.cdiv(C, block_c), N)
    dz = torch.empty_like(dout)
    part = torch.empty((2, N, grid[0], C), dtype=acc, device=y.device)
    pixel_part = torch.empty((grid[1], N, HW), dtype=acc, device=y.device)
    noise_hw, strength = _noise_args(noise, noise_strength, y)
    _modconv_grad_partials_kernel[grid](
        dout, y, _epilogue_table(demod.to(acc), bias), dz if noise_hw is None else noise_hw,
        dz if strength is None else strength, dz, part, pixel_part, N, HW, C, negative_slope, gain,
        NOISE=noise_hw is not None, ACT=activation, ACC=tl_acc_dtype(acc), BLOCK_M=block_p,
        BLOCK_C=block_c, num_warps=4)
    # Fixed-order sums over the tiles: deterministic.
    sums = part.sum(2)
    return dz, sums[0], sums[1].sum(0), pixel_part.sum(0).reshape(N, HO, WO)


def modconv_input_grad(dz: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                       styles: torch.Tensor, demod: torch.Tensor, padding: int, up: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """dL/dx and the conv's part of dL/dstyles.

    One GEMM: g = conv^T(dz * demod, weight) with dz scaled in the prologue, dx = styles * g in
    the epilogue (g stored too); then sum_p x * g in torch.

    Args:
        dz: (N, H_out, W_out, C_out) from :func:`epilogue_grads`; x: (N, H, W, C_in) the forward
            input; weight, styles, demod (N, C_out), padding, up: the forward's.

    Returns:
        dx: (N, C_in, H, W) channels_last in dz's dtype; (N, C_in) sum over pixels of x * g in
        the accumulation dtype.
    """
    H, W = x.shape[1:3]
    acc = acc_dtype(x.dtype)
    stride, pad, transposed = _geometry(padding, up)
    g, dx, _ = _conv_gemm(dz, _gemm_weight(weight, up), (H, W), stride, pad, not transposed,
                          MODULATED.value,
                          modulation=demod.to(acc).contiguous(),
                          epi=_epilogue_table(styles.to(acc), None), store_pre=True,
                          channels_last=True)
    return dx, (x.to(acc) * g.to(acc)).sum((1, 2))


def modconv_weight_grad(x: torch.Tensor, dz: torch.Tensor, styles: torch.Tensor,
                        demod: torch.Tensor, weight_shape: torch.Size, padding: int, up: int,
                        dtype: torch.dtype) -> torch.Tensor:
    """The conv's part of dL/dweight: wgrad(x * styles, dz * demod), both operands scaled as the
    weight-gradient kernel loads them.

    Args:
        x: (N, H, W, C_in); dz: (N, H_out, W_out, C_out); styles (N, C_in), demod (N, C_out);
        weight_shape: (C_out, C_in, kH, kW); dtype: the result's.

    Returns:
        (C_out, C_in, kH, kW) in ``dtype``.
    """
    acc = acc_dtype(x.dtype)
    stride, pad, transposed = _geometry(padding, up)
    shape = _gemm_weight(torch.empty(weight_shape, device="meta"), up).shape
    dw = _conv_wgrad(x, dz, shape, stride, pad, transposed, dtype,
                     modulation=(styles.to(acc).contiguous(), demod.to(acc).contiguous()))
    return _gemm_weight(dw, up).contiguous()
