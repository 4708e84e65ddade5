"""Conv2d / ConvTranspose2d as implicit GEMM, fused with BatchNorm and an activation; fwd and bwd.

Everything is channels-last inside: x (N, H, W, C_in), the conv output y (N, Ho, Wo, C_out),
called "pre-BN"; z = y * zscale[c] + zshift[c] is the BN output (or y + bias without BN) and
out = act(z).

Conv as a GEMM with rows m = (n, oh, ow), columns co and reduction k = (r, s, ci):

    y[m, co] = sum_k x[n, oh*S - P + r, ow*S - P + s, ci] * w[r, s, ci, co]   (x = 0 outside)

A program owns a BLOCK_M x BLOCK_N tile of y and walks the reduction in one loop over (tap (r, s),
block of BLOCK_K contiguous channels ci): gathered rows of x, contiguous rows of w.

ConvTranspose2d by phases: y[oh] = sum over taps r with oh = ih*S - P + r of x[ih] w[r], so
output row oh only meets taps r = a (mod S) with a = (oh + P) mod S. Splitting the rows by that
phase gives S*S dense sub-convolutions (per dimension): rows oh = o0 + S*j, taps r = a + S*t,
input ih = j + c0 - t, with o0 = (a - P) mod S and c0 = (o0 + P - a) / S. No zero tap is read.
Both forms share one gather, per dimension:

    ih = j * in_step + in_off + t * t_step,   r = r0 + t * r_step,   oh = o0 + j * out_step
    conv:                (S, -P, 1,  0, 1, 0, 1)
    transposed, phase a: (1, c0, -1, a, S, o0, S)

Backward: the input gradient of a conv is a transposed conv of dL/dy with the same weight, and
the other way round, so one GEMM kernel serves both forwards and both input gradients. The
weight gradient is, over the pixels m = (n, oh, ow) of D,

    dw[r, s, cg, cd] = sum_m G[n, oh*S - P + r, ow*S - P + s, cg] * D[m, cd]

with (G, D) = (x, dL/dy) for a conv and (dL/dy, x) for a transposed conv.

BatchNorm, training: the GEMM epilogue stores y and per-tile, per-channel (count, mean, M2);
a combine kernel merges them in a fixed order with Chan's formula,

    d = mean_b - mean_a,  n = na + nb,  mean = mean_a + d * nb / n,  M2 = M2_a + M2_b + d^2 * na * nb / n,

giving mean, rstd = 1 / sqrt(M2 / n + eps), zscale = gamma * rstd, zshift = beta - mean * zscale
and the new running statistics (momentum, unbiased variance M2 / (n - 1), as torch). A last pass
applies z and the activation. Eval (and conv + bias) applies zscale/zshift in the GEMM epilogue.

BatchNorm backward, recomputing z from the saved y (g = dL/dout * act'(z), xhat = (y - mean) * rstd,
over the n values of a channel):

    dbeta = sum g,  dgamma = sum g * xhat
    dL/dy = zscale * (g - dbeta / n - xhat * dgamma / n)     (training; eval and bias: zscale * g)

One reduction pass gives dbeta and dgamma; the input- and weight-gradient GEMMs compute dL/dy
from (dL/dout, y) while they load their tiles, so dL/dy is never stored. All reductions are
per-tile partials combined in a fixed order: reruns are bit-identical.

Per-sample BN affine (BigGAN's class-conditional BN): gamma and beta are (N, C); the coefficients
then only normalize (zscale = rstd, zshift = -mean * rstd: xhat = y * zscale + zshift) and the
BN kernels take the affine beside them, z = xhat * gamma[n] + beta[n]. With h = g * gamma[n],

    dbeta[n] = sum_(h,w) g,  dgamma[n] = sum_(h,w) g * xhat       (per sample)
    dL/dy = rstd * (h - sum h / n - xhat * sum (h * xhat) / n)    (training; eval: rstd * h)

and sum h = sum_n gamma[n] * dbeta[n], sum h * xhat = sum_n gamma[n] * dgamma[n]: per-sample
partial sums are all the backward reduces. Those kernels launch over (row block, channel block,
sample), so no row block straddles two samples and per-sample values are vectors per program.
The GEMMs' BN prologue and epilogues stay per channel: a per-sample conv layer stores y and
applies BN in its own pass (eval too: conv_plain_forward), and its backward stores dL/dy
(bn_act_input_grad) for the GEMMs to read as a plain operand (conv_plain_grads).

Modulation (StyleGAN2, kernels/modconv.py): the GEMM may scale its A operand per sample and
channel as it loads it, A[n, ..., ca] * mod[n, ca] (MODULATE), and its MODULATED epilogue computes

    out = act(res * escale[n, cb] + bias[cb] + strength * noise[n, oh, ow]) * gain

with per-sample, per-channel scales; the weight gradient scales both its operands the same way.

Host wrappers take NHWC-contiguous activations and PyTorch's weight layouts and return NHWC
tensors, except the activated outputs: (N, C, H, W) in the memory format asked for (the input's),
written by the same store. They allocate every output and never write into their arguments;
fastgen.functional validates the inputs.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, tl_acc_dtype
from ._tuning import TileConfig, Tuner, batch_bucket

# Activations travel as their code (the ACT constexpr), the column ``code`` of fastgen's one
# activation table (fastgen/activations.py): 0 identity, 1 relu, 2 leaky_relu, 3 tanh, 4 sigmoid;
# _activate and _activate_backward below implement each code.

# GEMM tiles (kernels/_tuning.py): on CUDA the candidates that fit a shape are timed once and the
# fastest kept; the first is the untimed default (before sm_90, the first with room for two
# blocks per SM: Tuner.candidates_for). Few candidates: each costs a compile per shape
# and kernel variant. The conv GEMM's (m, n, k) are (pixels, output channels, input channels per
# tap); the weight gradient's (m, n, k) are (C_g, C_d, pixels).
# The interpreter pays per operation, not per element: large tiles keep the CPU tests fast.
GEMM_TUNER = Tuner("conv_bn_act GEMM", [
    TileConfig(128, 64, 32), TileConfig(128, 128, 32, num_warps=8),
    TileConfig(128, 128, 64, num_warps=8), TileConfig(64, 64, 32), TileConfig(256, 64, 32, num_warps=8),
], interpreter=TileConfig(128, 32, 32))
WGRAD_TUNER = Tuner("conv_bn_act weight gradient", [
    TileConfig(64, 64, 32), TileConfig(128, 64, 32), TileConfig(128, 128, 32, num_warps=8),
    TileConfig(64, 64, 64),
], interpreter=TileConfig(32, 32, 128))
# The weight gradient splits its pixel reduction (into chunks of at least 2 * k rows, summed in a
# fixed order) until about this many programs run (GPU, interpreter).
WGRAD_PROGRAMS, INTERPRETER_WGRAD_PROGRAMS = 512, 1
# Elementwise and statistics passes over (M, C) matrices: (rows, channels) per program.
ELEMENTWISE_BLOCKS, INTERPRETER_ELEMENTWISE_BLOCKS = (64, 64), (128, 32)
# Combine kernels: tiles merged per step, channels per program. They walk thousands of tiles
# for a few hundred channels: narrow channel blocks give more programs, fewer serial steps each.
COMBINE_T, COMBINE_C = 128, 16
# Pixels (N * H * W) a conv GEMM's input or output may have: pixel indices are int32.
MAX_PIXELS = 2**31 - 1
# Programs along a CUDA grid's third axis: the samples of a per-sample BN pass.
MAX_GRID_Z = 65535

# Kernels may read only tl.constexpr globals; host code uses their .value.
# Coefficient rows (bn_combine_stats, bn_act_grad_coef): the first four are the forward's.
ZSCALE, ZSHIFT, MEAN, RSTD, DBETA_MEAN, DGAMMA_MEAN, DGAMMA, DBETA = (tl.constexpr(i) for i in range(8))
# GEMM epilogues.
STORE, STATS, AFFINE, MODULATED = (tl.constexpr(i) for i in range(4))


# ----------------------------------------------------------------------------------------------
# Elementwise pieces


@triton.jit
def _activate(z, slope, ACT: tl.constexpr):
    """act(z) for the activation code ACT; tanh and sigmoid never exponentiate a positive number,
    and keep their relative precision near 0."""
    out = z
    if ACT == 1:
        out = tl.maximum(z, 0.0)
    elif ACT == 2:
        out = tl.where(z > 0, z, z * slope)
    elif ACT == 3:
        # tanh|z| = (1 - e) / (1 + e), e = exp(-2|z|), cancels as z -> 0: below 1/4 the odd
        # Taylor series, whose first omitted term is < 1e-11 of the value there.
        a = tl.abs(z)
        e = tl.exp(-2.0 * a)
        z2 = z * z
        series = a * (1.0 + z2 * (-1.0 / 3.0 + z2 * (2.0 / 15.0 + z2 * (-17.0 / 315.0 + z2 * (
            62.0 / 2835.0 + z2 * (-1382.0 / 155925.0 + z2 * 21844.0 / 6081075.0))))))
        t = tl.where(a < 0.25, series, (1.0 - e) / (1.0 + e))
        out = tl.where(z >= 0, t, -t)
    elif ACT == 4:
        e = tl.exp(-tl.abs(z))
        out = tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return out


@triton.jit
def _activate_backward(dout, z, slope, ACT: tl.constexpr):
    """dout * act'(z), with torch's choices at 0 (relu' = 0, leaky_relu' = slope)."""
    g = dout
    if ACT == 1:
        g = tl.where(z > 0, dout, 0.0)
    elif ACT == 2:
        g = tl.where(z > 0, dout, dout * slope)
    elif ACT == 3:
        t = _activate(z, slope, 3)
        g = dout * (1.0 - t * t)
    elif ACT == 4:
        s = _activate(z, slope, 4)
        g = dout * (s * (1.0 - s))
    return g


@triton.jit
def _load_operand(ptr, pre_ptr, coef_ptr, offs, mask, chan, chan_ok, C, slope,
                  BN_GRAD: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr):
    """A tile of a GEMM operand: ptr[offs], or with BN_GRAD dL/dy computed from dL/dout = ptr[offs],
    y = pre_ptr[offs] and the coefficient rows of bn_act_grad_coef at the channels ``chan``
    (broadcastable to the tile). Masked elements are 0: padding of dL/dy, not of dL/dout."""
    v = tl.load(ptr + offs, mask=mask, other=0.0)
    if BN_GRAD:
        zscale = tl.load(coef_ptr + ZSCALE * C + chan, mask=chan_ok, other=0.0)
        zshift = tl.load(coef_ptr + ZSHIFT * C + chan, mask=chan_ok, other=0.0)
        mean = tl.load(coef_ptr + MEAN * C + chan, mask=chan_ok, other=0.0)
        rstd = tl.load(coef_ptr + RSTD * C + chan, mask=chan_ok, other=0.0)
        dbeta_mean = tl.load(coef_ptr + DBETA_MEAN * C + chan, mask=chan_ok, other=0.0)
        dgamma_mean = tl.load(coef_ptr + DGAMMA_MEAN * C + chan, mask=chan_ok, other=0.0)
        y = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(ACC)
        g = _activate_backward(v.to(ACC), y * zscale + zshift, slope, ACT)
        dy = zscale * (g - dbeta_mean - (y - mean) * rstd * dgamma_mean)
        v = tl.where(mask, dy, 0.0).to(ptr.dtype.element_ty)
    return v


@triton.jit
def _modulate(v, mod_ptr, sample, chan, mask, C, MODULATE: tl.constexpr, ACC: tl.constexpr):
    """A GEMM operand tile v scaled per sample and channel (MODULATE): v * mod[sample, chan],
    mod (N, C) in the accumulation dtype, ``sample`` and ``chan`` broadcastable to the tile."""
    if MODULATE:
        scale = tl.load(mod_ptr + sample * C + chan, mask=mask, other=0.0)
        v = (v.to(ACC) * scale).to(v.dtype)
    return v


@triton.jit
def _store_tile_stats(v, row_ok, part_ptr, tile, n_tiles, cols, col_ok, C):
    """part[0..2, tile, cols] = count, mean and M2 of the valid rows of the tile v, per column."""
    count = tl.sum(row_ok.to(v.dtype), axis=0)
    mean = tl.sum(tl.where(row_ok[:, None], v, 0.0), axis=0) / tl.maximum(count, 1.0)
    diff = tl.where(row_ok[:, None], v - mean[None, :], 0.0)
    m2 = tl.sum(diff * diff, axis=0)
    plane = n_tiles.to(tl.int64) * C
    base = part_ptr + tile.to(tl.int64) * C + cols
    tl.store(base, tl.zeros_like(mean) + count, mask=col_ok)
    tl.store(base + plane, mean, mask=col_ok)
    tl.store(base + 2 * plane, m2, mask=col_ok)


# ----------------------------------------------------------------------------------------------
# Implicit-GEMM indexing, shared by the forward, input-gradient and weight-gradient kernels


@triton.jit
def _split_rows(rows, N, H, W):
    """GEMM rows -> (n, h, w) over an (N, H, W) pixel grid, and which rows exist."""
    hw = H * W
    n = rows // hw
    rem = rows - n * hw
    h = rem // W
    return n, h, rem - h * W, rows < N * hw


@triton.jit
def _gather_rows(n, ih, iw, H, W, C, row_ok):
    """int64 offset of pixel (n, ih, iw) in an (N, H, W, C) tensor, and whether it is inside."""
    ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return ((n * H + ih) * W + iw).to(tl.int64) * C, ok


@triton.jit
def _phase(a, S, P, K, HO, TRANSPOSED: tl.constexpr):
    """One dimension's gather parameters (module docstring): rows, taps, in_step, in_off, t_step,
    r0, r_step, o0, out_step. ``a`` is the phase of a transposed conv (0 for a conv)."""
    if TRANSPOSED:
        o0 = (a - P % S + S) % S  # operands kept >= 0: % rounds differently in C and Python
        c0 = (o0 + P - a) // S
        taps = (K - a + S - 1) // S
        rows = (HO - o0 + S - 1) // S
        in_step = 1
        in_off = c0
        t_step = -1
        r0 = a
        r_step = S
        out_step = S
    else:
        o0 = 0
        taps = K
        rows = HO
        in_step = S
        in_off = -P
        t_step = 1
        r0 = 0
        r_step = 1
        out_step = 1
    return rows, taps, in_step, in_off, t_step, r0, r_step, o0, out_step


# ----------------------------------------------------------------------------------------------
# GEMM kernels


@triton.jit
def _conv_gemm_kernel(
        a_ptr, pre_ptr, coef_ptr, mod_ptr, w_ptr, y_ptr, out_ptr, epi_ptr, noise_ptr, strength_ptr,
        part_ptr, N, H, W, C_a, HO, WO, C_b, KH, KW, S_H, S_W, P_H, P_W, out_sn, out_sw, out_sc,
        slope, gain,
        TRANSPOSED: tl.constexpr, BN_GRAD: tl.constexpr, MODULATE: tl.constexpr,
        EPILOGUE: tl.constexpr, NOISE: tl.constexpr, STORE_PRE: tl.constexpr, ACT: tl.constexpr,
        ACC: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """res[m, cb] = sum over taps and ca of A[gathered pixel, ca] * w[r, s, ca, cb].

    A: (N, H, W, C_a), or dL/dy from (dL/dout = a, y = pre, coef) with BN_GRAD, times mod[n, ca]
    with MODULATE; w: (KH, KW, C_a, C_b); the result covers (N, HO, WO, C_b), phase
    program_id(2) of it when TRANSPOSED.
    EPILOGUE STORE: y = res. STATS: y = res and part = per-tile (count, mean, M2).
    AFFINE: out = act(res * epi[0, cb] + epi[1, cb]) * gain.
    MODULATED: out = act(res * epi[n, cb] + epi[N, cb] + strength * noise[n, oh, ow]) * gain
    (noise (N, HO, WO) with NOISE, strength one element).
    AFFINE and MODULATED store y = res too with STORE_PRE. y is NHWC; out has strides (out_sn,
    out_sw, out_sc) for (n, w, c) (h: out_sw * WO; NCHW or NHWC).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    phase = tl.program_id(2)
    rows_h, taps_h, in_step_h, in_off_h, t_step_h, r0, r_step, o0_h, out_step_h = _phase(
        phase // S_W, S_H, P_H, KH, HO, TRANSPOSED)
    rows_w, taps_w, in_step_w, in_off_w, t_step_w, s0, s_step, o0_w, out_step_w = _phase(
        phase % S_W, S_W, P_W, KW, WO, TRANSPOSED)
    # Pixel indices in int32 (the host checks that they fit), element offsets in int64: int64
    # row math held the transposed and BN-gradient variants at 255 registers.
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n, jh, jw, row_ok = _split_rows(rows, N, rows_h, rows_w)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C_b
    ks = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    # One flat loop over (tap, channel block), as Inductor's conv template: Triton pipelines the
    # innermost loop only, and a tap has just a few channel blocks.
    k_blocks = tl.cdiv(C_a, BLOCK_K)
    for step in range(0, taps_h * taps_w * k_blocks):
        tap = step // k_blocks
        th = tap // taps_w
        tw = tap - th * taps_w
        ih = jh * in_step_h + in_off_h + th * t_step_h
        iw = jw * in_step_w + in_off_w + tw * t_step_w
        a_row, a_ok = _gather_rows(n, ih, iw, H, W, C_a, row_ok)
        w_tap = w_ptr + ((r0 + th * r_step) * KW + s0 + tw * s_step) * C_a * C_b
        k = (step - tap * k_blocks) * BLOCK_K + ks
        k_ok = k < C_a
        a_mask = a_ok[:, None] & k_ok[None, :]
        a = _load_operand(a_ptr, pre_ptr, coef_ptr, a_row[:, None] + k[None, :], a_mask,
                          k[None, :], k_ok[None, :], C_a, slope, BN_GRAD, ACT, ACC)
        a = _modulate(a, mod_ptr, n[:, None], k[None, :], a_mask, C_a, MODULATE, ACC)
        w = tl.load(w_tap + k[:, None] * C_b + cols[None, :],
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)

    oh = o0_h + jh * out_step_h
    ow = o0_w + jw * out_step_w
    offs = ((n * HO + oh) * WO + ow).to(tl.int64)[:, None] * C_b + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if EPILOGUE == AFFINE or EPILOGUE == MODULATED:
        if EPILOGUE == AFFINE:
            z = (acc * tl.load(epi_ptr + cols, mask=col_ok, other=0.0)[None, :]
                 + tl.load(epi_ptr + C_b + cols, mask=col_ok, other=0.0)[None, :])
        else:
            escale = tl.load(epi_ptr + n[:, None] * C_b + cols[None, :], mask=mask, other=0.0)
            z = acc * escale + tl.load(epi_ptr + N * C_b + cols, mask=col_ok, other=0.0)[None, :]
            if NOISE:
                noise = tl.load(noise_ptr + (n.to(tl.int64) * HO + oh) * WO + ow, mask=row_ok,
                                other=0.0).to(ACC)
                z += tl.load(strength_ptr).to(ACC) * noise[:, None]
        out = _activate(z, slope, ACT) * gain
        out_offs = (n.to(tl.int64) * out_sn + (oh * WO + ow) * out_sw)[:, None] + cols[None, :] * out_sc
        tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    if (EPILOGUE != AFFINE and EPILOGUE != MODULATED) or STORE_PRE:
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    if EPILOGUE == STATS:
        _store_tile_stats(acc, row_ok, part_ptr, phase * tl.num_programs(0) + pid_m,
                          tl.num_programs(0) * tl.num_programs(2), cols, col_ok, C_b)


@triton.jit
def _conv_wgrad_kernel(
        g_ptr, d_ptr, pre_ptr, coef_ptr, mod_g_ptr, mod_d_ptr, part_ptr,
        N, HG, WG, C_g, HD, WD, C_d, KH, KW, S_H, S_W, P_H, P_W, rows_per_split, slope,
        BN_GRAD_G: tl.constexpr, BN_GRAD_D: tl.constexpr, MODULATE: tl.constexpr,
        ACT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_G: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """part[split, r, s, cg, cd] = sum over this split's pixels m of D of
    G[n, oh*S - P + r, ow*S - P + s, cg] * D[m, cd].

    G: (N, HG, WG, C_g); D: (N, HD, WD, C_d). The one operand that is dL/dy (BN_GRAD_G or
    BN_GRAD_D) is computed from dL/dout at that pointer and y = pre with coef. With MODULATE
    both are scaled per sample and channel: G by mod_g (N, C_g), D by mod_d (N, C_d).
    """
    tiles_g = tl.cdiv(C_g, BLOCK_G)
    tap = tl.program_id(0) // tiles_g
    r = tap // KW
    s = tap - r * KW
    cg = (tl.program_id(0) - tap * tiles_g) * BLOCK_G + tl.arange(0, BLOCK_G)
    cd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cg_ok = cg < C_g
    cd_ok = cd < C_d
    split = tl.program_id(2)
    m_start = split * rows_per_split  # int32 pixel indices, as in the GEMM
    m_end = tl.minimum(m_start + rows_per_split, N * HD * WD)

    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=ACC)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        n, oh, ow, _ = _split_rows(rows, N, HD, WD)
        row_ok = rows < m_end
        g_row, g_ok = _gather_rows(n, oh * S_H - P_H + r, ow * S_W - P_W + s, HG, WG, C_g, row_ok)
        g_mask = cg_ok[:, None] & g_ok[None, :]
        g_t = _load_operand(g_ptr, pre_ptr, coef_ptr, cg[:, None] + g_row[None, :], g_mask,
                            cg[:, None], cg_ok[:, None], C_g, slope, BN_GRAD_G, ACT, ACC)
        g_t = _modulate(g_t, mod_g_ptr, n[None, :], cg[:, None], g_mask, C_g, MODULATE, ACC)
        d_mask = row_ok[:, None] & cd_ok[None, :]
        d = _load_operand(d_ptr, pre_ptr, coef_ptr, rows.to(tl.int64)[:, None] * C_d + cd[None, :],
                          d_mask, cd[None, :], cd_ok[None, :], C_d, slope, BN_GRAD_D, ACT, ACC)
        d = _modulate(d, mod_d_ptr, n[:, None], cd[None, :], d_mask, C_d, MODULATE, ACC)
        acc = tl.dot(g_t, d, acc, input_precision=PRECISION)

    offs = ((split.to(tl.int64) * KH * KW + tap) * C_g + cg)[:, None] * C_d
    tl.store(part_ptr + offs + cd[None, :], acc, mask=cg_ok[:, None] & cd_ok[None, :])


# ----------------------------------------------------------------------------------------------
# BatchNorm + activation kernels over an (M, C) channels-last matrix


@triton.jit
def _row_block(M, HW, BLOCK_M: tl.constexpr, PER_SAMPLE: tl.constexpr):
    """The rows (int64) of the (M, C) matrix this program owns, which exist, and its sample n.
    PER_SAMPLE: the grid's third axis is the sample and a block stays inside its HW rows, so
    per-sample values are vectors; otherwise blocks run over all M rows (one sample axis, n 0)."""
    n = tl.program_id(2)
    local = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = local
    row_ok = local < M
    if PER_SAMPLE:
        rows = n.to(tl.int64) * HW + local
        row_ok = local < HW
    return rows, row_ok, n


@triton.jit
def _coef_rows(coef_ptr, C, cols, col_ok):
    """The forward's coefficient rows zscale, zshift, mean, rstd at ``cols``, as (1, BLOCK_C)."""
    zscale = tl.load(coef_ptr + ZSCALE * C + cols, mask=col_ok, other=0.0)[None, :]
    zshift = tl.load(coef_ptr + ZSHIFT * C + cols, mask=col_ok, other=0.0)[None, :]
    mean = tl.load(coef_ptr + MEAN * C + cols, mask=col_ok, other=0.0)[None, :]
    rstd = tl.load(coef_ptr + RSTD * C + cols, mask=col_ok, other=0.0)[None, :]
    return zscale, zshift, mean, rstd


@triton.jit
def _sample_affine(affine_ptr, n, NC, C, cols, col_ok):
    """gamma[n, cols] and beta[n, cols] of a per-sample affine (2, N, C), as (1, BLOCK_C); NC = N * C."""
    base = affine_ptr + n * C + cols
    gamma = tl.load(base, mask=col_ok, other=0.0)[None, :]
    beta = tl.load(base + NC, mask=col_ok, other=0.0)[None, :]
    return gamma, beta


@triton.jit
def _bn_stats_kernel(y_ptr, part_ptr, M, C, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    """part[:, tile, cols] = (count, mean, M2) of a BLOCK_M-row tile of y (BN without a conv)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < M
    col_ok = cols < C
    v = tl.load(y_ptr + rows[:, None] * C + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                other=0.0).to(ACC)
    _store_tile_stats(v, row_ok, part_ptr, tl.program_id(0), tl.num_programs(0), cols, col_ok, C)


@triton.jit
def _bn_stats_combine_kernel(part_ptr, gamma_ptr, beta_ptr, rmean_ptr, rvar_ptr, stats_ptr,
                             n_tiles, C, momentum, eps, UPDATE_RUNNING: tl.constexpr,
                             BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge per-tile (count, mean, M2) in tile order (Chan); stats rows: zscale, zshift, mean,
    rstd, new running mean, new running var (UPDATE_RUNNING)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    acc_ty = stats_ptr.dtype.element_ty
    count = tl.zeros((BLOCK_C,), dtype=acc_ty)
    mean = tl.zeros((BLOCK_C,), dtype=acc_ty)
    m2 = tl.zeros((BLOCK_C,), dtype=acc_ty)
    plane = n_tiles * C  # partial buffers stay far below 2**31 elements
    for t0 in range(0, n_tiles, BLOCK_T):
        tiles = t0 + tl.arange(0, BLOCK_T)
        offs = tiles.to(tl.int64)[:, None] * C + cols[None, :]
        mask = (tiles < n_tiles)[:, None] & col_ok[None, :]
        t_count = tl.load(part_ptr + offs, mask=mask, other=0.0)
        t_mean = tl.load(part_ptr + plane + offs, mask=mask, other=0.0)
        t_m2 = tl.load(part_ptr + 2 * plane + offs, mask=mask, other=0.0)
        # The BLOCK_T tiles at once (the many-group form of Chan's formula), then Chan with the total.
        b_count = tl.sum(t_count, axis=0)
        b_mean = tl.sum(t_count * t_mean, axis=0) / tl.maximum(b_count, 1.0)
        spread = t_mean - b_mean[None, :]
        b_m2 = tl.sum(t_m2 + t_count * spread * spread, axis=0)
        total = count + b_count
        frac = b_count / tl.maximum(total, 1.0)
        delta = b_mean - mean
        mean += delta * frac
        m2 += b_m2 + delta * delta * count * frac
        count = total
    # Channels past C have count 0; batches reach here with count >= 2 (the caller checks).
    rstd = 1.0 / tl.sqrt(m2 / tl.maximum(count, 1.0) + eps)
    zscale = tl.load(gamma_ptr + cols, mask=col_ok, other=0.0).to(acc_ty) * rstd
    zshift = tl.load(beta_ptr + cols, mask=col_ok, other=0.0).to(acc_ty) - mean * zscale
    tl.store(stats_ptr + ZSCALE * C + cols, zscale, mask=col_ok)
    tl.store(stats_ptr + ZSHIFT * C + cols, zshift, mask=col_ok)
    tl.store(stats_ptr + MEAN * C + cols, mean, mask=col_ok)
    tl.store(stats_ptr + RSTD * C + cols, rstd, mask=col_ok)
    if UPDATE_RUNNING:
        rmean = tl.load(rmean_ptr + cols, mask=col_ok, other=0.0).to(acc_ty)
        rvar = tl.load(rvar_ptr + cols, mask=col_ok, other=0.0).to(acc_ty)
        tl.store(stats_ptr + 4 * C + cols, (1.0 - momentum) * rmean + momentum * mean, mask=col_ok)
        unbiased_var = m2 / tl.maximum(count - 1.0, 1.0)
        tl.store(stats_ptr + 5 * C + cols, (1.0 - momentum) * rvar + momentum * unbiased_var,
                 mask=col_ok)


@triton.jit
def _bn_act_apply_kernel(y_ptr, coef_ptr, affine_ptr, out_ptr, M, C, HW, NC, out_sn, out_sw,
                         out_sc, slope, PER_SAMPLE: tl.constexpr, ACT: tl.constexpr,
                         ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """out = act(z), z = y * zscale + zshift per channel, and with PER_SAMPLE then
    z * gamma[n] + beta[n]; y is NHWC, out has strides (out_sn, out_sw, out_sc) for (n, w, c)
    with HW pixels per sample (NCHW or NHWC)."""
    rows, row_ok, sample = _row_block(M, HW, BLOCK_M, PER_SAMPLE)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    offs = rows[:, None] * C + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    zscale = tl.load(coef_ptr + ZSCALE * C + cols, mask=col_ok, other=0.0)
    zshift = tl.load(coef_ptr + ZSHIFT * C + cols, mask=col_ok, other=0.0)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC)
    z = y * zscale[None, :] + zshift[None, :]
    if PER_SAMPLE:
        gamma, beta = _sample_affine(affine_ptr, sample, NC, C, cols, col_ok)
        z = z * gamma + beta
    out = _activate(z, slope, ACT)
    n = rows // HW
    out_offs = (n * out_sn + (rows - n * HW) * out_sw)[:, None] + cols[None, :] * out_sc
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_act_grad_partials_kernel(dout_ptr, y_ptr, coef_ptr, affine_ptr, part_ptr, M, C, HW, NC,
                                 slope, PER_SAMPLE: tl.constexpr, ACT: tl.constexpr,
                                 ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """part[0, tile, cols] = sum g, part[1, tile, cols] = sum g * xhat over a BLOCK_M-row tile;
    PER_SAMPLE: z takes the per-sample affine and the tiles of sample n are n * blocks + block."""
    rows, row_ok, sample = _row_block(M, HW, BLOCK_M, PER_SAMPLE)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    offs = rows[:, None] * C + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    zscale, zshift, mean, rstd = _coef_rows(coef_ptr, C, cols, col_ok)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC)
    dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(ACC)
    z = y * zscale + zshift
    if PER_SAMPLE:
        gamma, beta = _sample_affine(affine_ptr, sample, NC, C, cols, col_ok)
        z = z * gamma + beta
    g = tl.where(mask, _activate_backward(dout, z, slope, ACT), 0.0)
    tile = sample * tl.num_programs(0) + tl.program_id(0)
    base = part_ptr + tile.to(tl.int64) * C + cols
    tl.store(base, tl.sum(g, axis=0), mask=col_ok)
    plane = (tl.num_programs(0) * tl.num_programs(2)).to(tl.int64) * C
    tl.store(base + plane, tl.sum(g * ((y - mean) * rstd), axis=0), mask=col_ok)


@triton.jit
def _bn_grad_combine_kernel(part_ptr, fwd_coef_ptr, affine_ptr, coef_ptr, sample_grads_ptr,
                            n_tiles, n_samples, C, inv_count, TRAINING: tl.constexpr,
                            PER_SAMPLE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sum the partials in tile order into dbeta, dgamma; write the coefficient rows of
    bn_act_grad_coef (the forward's four rows copied first). PER_SAMPLE: the tiles are the
    n_samples samples' in turn; each sample's sums are its (dgamma[n], dbeta[n]), stored in
    sample_grads (2, N, C), and the channel rows DGAMMA, DBETA sum them weighted by gamma[n]
    (the sums of h * xhat and h, module docstring). Otherwise n_samples is 1."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    acc_ty = coef_ptr.dtype.element_ty
    plane = n_tiles * C  # partial buffers stay far below 2**31 elements
    sample_tiles = n_tiles // n_samples
    dbeta = tl.zeros((BLOCK_C,), dtype=acc_ty)
    dgamma = tl.zeros((BLOCK_C,), dtype=acc_ty)
    for sample in range(0, n_samples):
        sum_g = tl.zeros((BLOCK_T, BLOCK_C), dtype=acc_ty)
        sum_gx = tl.zeros((BLOCK_T, BLOCK_C), dtype=acc_ty)
        for t0 in range(0, sample_tiles, BLOCK_T):
            tiles = t0 + tl.arange(0, BLOCK_T)
            offs = (sample * sample_tiles + tiles).to(tl.int64)[:, None] * C + cols[None, :]
            mask = (tiles < sample_tiles)[:, None] & col_ok[None, :]
            sum_g += tl.load(part_ptr + offs, mask=mask, other=0.0)
            sum_gx += tl.load(part_ptr + plane + offs, mask=mask, other=0.0)
        sample_dbeta = tl.sum(sum_g, axis=0)
        sample_dgamma = tl.sum(sum_gx, axis=0)
        if PER_SAMPLE:
            grads = sample_grads_ptr + sample * C + cols
            tl.store(grads, sample_dgamma, mask=col_ok)
            tl.store(grads + n_samples * C, sample_dbeta, mask=col_ok)
            gamma = tl.load(affine_ptr + sample * C + cols, mask=col_ok, other=0.0)
            sample_dbeta = sample_dbeta * gamma
            sample_dgamma = sample_dgamma * gamma
        dbeta += sample_dbeta
        dgamma += sample_dgamma
    for row in range(0, 4):
        tl.store(coef_ptr + row * C + cols, tl.load(fwd_coef_ptr + row * C + cols, mask=col_ok),
                 mask=col_ok)
    dbeta_mean = tl.zeros_like(dbeta)
    dgamma_mean = tl.zeros_like(dgamma)
    if TRAINING:
        dbeta_mean = dbeta * inv_count
        dgamma_mean = dgamma * inv_count
    tl.store(coef_ptr + DBETA_MEAN * C + cols, dbeta_mean, mask=col_ok)
    tl.store(coef_ptr + DGAMMA_MEAN * C + cols, dgamma_mean, mask=col_ok)
    tl.store(coef_ptr + DGAMMA * C + cols, dgamma, mask=col_ok)
    tl.store(coef_ptr + DBETA * C + cols, dbeta, mask=col_ok)


@triton.jit
def _bn_act_input_grad_kernel(dout_ptr, y_ptr, coef_ptr, affine_ptr, dy_ptr, M, C, HW, NC, slope,
                              PER_SAMPLE: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """dL/dy (BN without a conv: y is the input; a per-sample conv layer's GEMMs read it): the
    GEMM operand's formula, or with PER_SAMPLE zscale * (h - dbeta_mean - xhat * dgamma_mean),
    h = g * gamma[n], with the per-sample affine in z (module docstring)."""
    rows, row_ok, sample = _row_block(M, HW, BLOCK_M, PER_SAMPLE)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    offs = rows[:, None] * C + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if PER_SAMPLE:
        zscale, zshift, mean, rstd = _coef_rows(coef_ptr, C, cols, col_ok)
        dbeta_mean = tl.load(coef_ptr + DBETA_MEAN * C + cols, mask=col_ok, other=0.0)[None, :]
        dgamma_mean = tl.load(coef_ptr + DGAMMA_MEAN * C + cols, mask=col_ok, other=0.0)[None, :]
        gamma, beta = _sample_affine(affine_ptr, sample, NC, C, cols, col_ok)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC)
        dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(ACC)
        g = _activate_backward(dout, (y * zscale + zshift) * gamma + beta, slope, ACT)
        dy = zscale * (g * gamma - dbeta_mean - (y - mean) * rstd * dgamma_mean)
        dy = dy.to(dy_ptr.dtype.element_ty)
    else:
        dy = _load_operand(dout_ptr, y_ptr, coef_ptr, offs, mask, cols[None, :], col_ok[None, :],
                           C, slope, True, ACT, ACC)
    tl.store(dy_ptr + offs, dy, mask=mask)


# ----------------------------------------------------------------------------------------------
# Host wrappers


def _scale_tiles(modulate: bool, itemsize: int) -> int:
    """Operand-sized tiles of the float32 per-sample scales a MODULATE operand loads per step
    (the software pipeline buffers them like the operand: the compile report's sm_80 cubins)."""
    return max(1, 4 // itemsize) if modulate else 0


def gemm_operand_tiles(bn_grad: bool, modulate: bool, itemsize: int) -> tuple[int, int]:
    """Tiles the conv GEMM loads per step for (A, w), operands of ``itemsize`` bytes: A is dL/dy
    from dL/dout and y with BN_GRAD, scaled by per-sample factors with MODULATE."""
    return (1 + bn_grad + _scale_tiles(modulate, itemsize), 1)


def wgrad_operand_tiles(transposed: bool, bn_grad: bool, modulate: bool,
                        itemsize: int) -> tuple[int, int]:
    """Tiles the weight gradient loads per step for (G, D): with ``bn_grad`` the one that is
    dL/dy (D for a conv, G transposed) takes two; with ``modulate`` both are scaled."""
    scales = _scale_tiles(modulate, itemsize)
    dy_g, dy_d = (bn_grad and transposed, bn_grad and not transposed)
    return (1 + dy_g + scales, 1 + dy_d + scales)


def _check_pixels(**pixels: int) -> None:
    """The GEMM kernels index pixels (n, h, w) in int32 and elements in int64: each tensor may
    hold more than 2**31 elements but fewer than MAX_PIXELS pixels (N * H * W)."""
    for name, count in pixels.items():
        if count > MAX_PIXELS:
            raise ValueError(f"{name}: {count} pixels (N * H * W), more than the conv kernels index "
                             f"({MAX_PIXELS}); split the batch")


def _elementwise_blocks(device: torch.device) -> tuple[int, int]:
    return ELEMENTWISE_BLOCKS if device.type == "cuda" else INTERPRETER_ELEMENTWISE_BLOCKS


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    """TF32 for float32 exactly when PyTorch's convolutions may use it."""
    tf32 = dtype == torch.float32 and device.type == "cuda" and torch.backends.cudnn.allow_tf32
    return "tf32" if tf32 else "ieee"


def _tile(size: int, cap: int) -> int:
    """A power-of-two tile edge for ``size`` columns: at least 16 (tl.dot), at most ``cap``."""
    return max(16, min(cap, triton.next_power_of_2(size)))


def _pair_dims(x: torch.Tensor) -> tuple[int, int]:
    """Rows and channels of an NHWC tensor seen as an (M, C) matrix."""
    return x.numel() // x.shape[-1], x.shape[-1]


def _activation_output(n: int, c: int, hw: tuple[int, int], dtype: torch.dtype,
                       device: torch.device, channels_last: bool
                       ) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """An (N, C, H, W) output in either memory format, and its (n, w, c) strides for the kernels."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((n, c, *hw), dtype=dtype, device=device, memory_format=fmt)
    return out, (out.stride(0), out.stride(3), out.stride(1))


def _conv_gemm(a: torch.Tensor, weight: torch.Tensor, out_hw: tuple[int, int],
               stride: tuple[int, int], padding: tuple[int, int], transposed: bool, epilogue: int,
               *, pre: torch.Tensor | None = None, coef: torch.Tensor | None = None,
               modulation: torch.Tensor | None = None, epi: torch.Tensor | None = None,
               noise: torch.Tensor | None = None, noise_strength: torch.Tensor | None = None,
               activation: int = 0, negative_slope: float = 0.0, gain: float = 1.0,
               store_pre: bool = False, channels_last: bool = True):
    """Launch _conv_gemm_kernel with ``epilogue`` (STORE/STATS/AFFINE/MODULATED .value).
    ``weight`` is in PyTorch's layout for a conv (transposed False) or a transposed conv (True);
    A is (N, H, W, C_a), dL/dy from (dL/dout = a, y = pre, coef) when ``pre`` is given, scaled by
    ``modulation`` (N, C_a) when given. ``epi``: AFFINE's (2, C_b) rows zscale, zshift, or
    MODULATED's (N + 1, C_b) per-sample scales then the bias row; ``noise`` (N, HO, WO) and the
    one-element ``noise_strength`` for MODULATED. Returns (y, out, partials), None where the
    epilogue writes nothing there: y (N, HO, WO, C_b), out (N, C_b, HO, WO) channels_last or
    contiguous."""
    N, H, W, C_a = a.shape
    HO, WO = out_hw
    _check_pixels(input=N * H * W, output=N * HO * WO)
    KH, KW = weight.shape[2:]
    taps = (weight.permute(2, 3, 0, 1) if transposed else weight.permute(2, 3, 1, 0)).contiguous()
    C_b = taps.shape[3]
    acc = acc_dtype(a.dtype)
    precision = _precision(a.dtype, a.device)
    n_phases = stride[0] * stride[1] if transposed else 1
    sample_rows = triton.cdiv(HO, stride[0]) * triton.cdiv(WO, stride[1]) if transposed else HO * WO
    phase_rows = N * sample_rows
    activated = epilogue in (AFFINE.value, MODULATED.value)
    y = (torch.empty((N, HO, WO, C_b), dtype=a.dtype, device=a.device)
         if store_pre or not activated else None)
    out, out_strides = None, (0, 0, 0)
    if activated:
        out, out_strides = _activation_output(N, C_b, out_hw, a.dtype, a.device, channels_last)
    dummy = a  # pointer arguments the chosen constexpr branches never touch

    def fit(config: TileConfig) -> TileConfig:  # for the key's batch bucket: one tile per key
        return dataclasses.replace(config, m=_tile(batch_bucket(N) * sample_rows, config.m),
                                   n=_tile(C_b, config.n), k=_tile(C_a, config.k))

    def launch(config: TileConfig) -> torch.Tensor | None:
        grid = (triton.cdiv(phase_rows, config.m), triton.cdiv(C_b, config.n), n_phases)
        part = (torch.empty((3, grid[0] * n_phases, C_b), dtype=acc, device=a.device)
                if epilogue == STATS.value else None)
        _conv_gemm_kernel[grid](
            a, *(dummy if t is None else t for t in (pre, coef, modulation)), taps,
            *(dummy if t is None else t for t in (y, out, epi, noise, noise_strength, part)),
            N, H, W, C_a, HO, WO, C_b, KH, KW, stride[0], stride[1], padding[0], padding[1],
            *out_strides, negative_slope, gain,
            TRANSPOSED=transposed, BN_GRAD=pre is not None, MODULATE=modulation is not None,
            EPILOGUE=epilogue, NOISE=noise is not None, STORE_PRE=store_pre,
            ACT=activation, ACC=tl_acc_dtype(acc), PRECISION=precision,
            BLOCK_M=config.m, BLOCK_N=config.n, BLOCK_K=config.k, num_warps=config.num_warps,
            num_stages=config.num_stages)
        return part

    key = (batch_bucket(N), H, W, C_a, out_hw, C_b, KH, KW, stride, padding, transposed, epilogue,
           pre is not None, modulation is not None, noise is not None, store_pre, a.dtype, precision)
    # With BN_GRAD each step loads two A tiles (dL/dout and y) into the pipeline.
    part = GEMM_TUNER.run(key, a.device, fit, launch, a.dtype,
                          gemm_operand_tiles(pre is not None, modulation is not None, a.element_size()))
    return y, out, part


def conv_stats_forward(x: torch.Tensor, weight: torch.Tensor, out_hw: tuple[int, int],
                       stride: tuple[int, int], padding: tuple[int, int], transposed: bool
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Training forward, first launch: the pre-BN conv output and its per-tile statistics.

    Args:
        x: (N, H, W, C_in) contiguous; weight: PyTorch's (C_out, C_in, kH, kW), or
            (C_in, C_out, kH, kW) when ``transposed``, same dtype.
        out_hw: the conv's (Ho, Wo).

    Returns:
        y: (N, Ho, Wo, C_out) in x's dtype. partials: (3, n_tiles, C_out) float32 (float64 for
        float64 x): count, mean, M2 per tile, for bn_combine_stats.
    """
    y, _, part = _conv_gemm(x, weight, out_hw, stride, padding, transposed, STATS.value)
    return y, part


def conv_affine_act_forward(x: torch.Tensor, weight: torch.Tensor, out_hw: tuple[int, int],
                            stride: tuple[int, int], padding: tuple[int, int], transposed: bool,
                            coef: torch.Tensor, activation: int, negative_slope: float,
                            store_pre: bool, channels_last: bool
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One launch: out = act(conv(x) * zscale + zshift) (eval BN folded, or a conv bias).

    Args as conv_stats_forward, and coef: (>= 2, C_out) float32 rows zscale, zshift.
    store_pre: also return the conv output y (for the backward).
    channels_last: out's memory format (else contiguous NCHW).

    Returns:
        out: (N, C_out, Ho, Wo); y or None: (N, Ho, Wo, C_out); both in x's dtype.
    """
    y, out, _ = _conv_gemm(x, weight, out_hw, stride, padding, transposed, AFFINE.value, epi=coef,
                           activation=activation, negative_slope=negative_slope,
                           store_pre=store_pre, channels_last=channels_last)
    return out, y


def conv_input_grad(dout: torch.Tensor, y: torch.Tensor, coef: torch.Tensor, weight: torch.Tensor,
                    in_hw: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                    transposed: bool, activation: int, negative_slope: float) -> torch.Tensor:
    """dL/dx of the conv (``transposed``: of the transposed conv), with dL/dy computed on the fly.

    Args:
        dout, y: (N, Ho, Wo, C_out) contiguous, dL/dout and the saved pre-BN output.
        coef: (8, C_out) from bn_act_grad_coef. weight: the forward's, PyTorch layout.
        in_hw: the forward input's (H, W).

    Returns:
        (N, H, W, C_in) in dout's dtype.
    """
    dx, _, _ = _conv_gemm(dout, weight, in_hw, stride, padding, not transposed, STORE.value, pre=y,
                          coef=coef, activation=activation, negative_slope=negative_slope)
    return dx


def conv_weight_grad(x: torch.Tensor, dout: torch.Tensor, y: torch.Tensor, coef: torch.Tensor,
                     weight_shape: torch.Size, stride: tuple[int, int], padding: tuple[int, int],
                     transposed: bool, activation: int, negative_slope: float,
                     dtype: torch.dtype) -> torch.Tensor:
    """dL/dweight in PyTorch's layout, with dL/dy computed on the fly.

    Args:
        x: (N, H, W, C_in) the forward input; dout, y: (N, Ho, Wo, C_out); coef: (8, C_out).
        weight_shape: the weight's shape; dtype: the result's dtype.
    """
    return _conv_wgrad(x, dout, weight_shape, stride, padding, transposed, dtype, pre=y, coef=coef,
                       activation=activation, negative_slope=negative_slope)


def _conv_wgrad(x: torch.Tensor, dout: torch.Tensor, weight_shape: torch.Size,
                stride: tuple[int, int], padding: tuple[int, int], transposed: bool,
                dtype: torch.dtype, *, pre: torch.Tensor | None = None,
                coef: torch.Tensor | None = None, activation: int = 0, negative_slope: float = 0.0,
                modulation: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Launch _conv_wgrad_kernel: dL/dweight in PyTorch's layout for x (N, H, W, C_in) and the
    output gradient ``dout`` (N, Ho, Wo, C_out): dL/dy computed from (dout, y = pre, coef) when
    ``pre`` is given, or ``dout`` as it is; ``modulation`` (x_scale (N, C_in), dout_scale
    (N, C_out)) scales both operands per sample and channel."""
    KH, KW = weight_shape[2:]
    # conv: G = x gathered, D = dL/dy; transposed: G = dL/dy gathered, D = x (module docstring)
    g, d = (dout, x) if transposed else (x, dout)
    mod_g, mod_d = (None, None) if modulation is None else (
        modulation[::-1] if transposed else modulation)
    N, HG, WG, C_g = g.shape
    _, HD, WD, C_d = d.shape
    _check_pixels(x=x.numel() // x.shape[-1], dout=dout.numel() // dout.shape[-1])
    acc = acc_dtype(x.dtype)
    precision = _precision(x.dtype, x.device)
    rows = N * HD * WD
    target_programs = WGRAD_PROGRAMS if x.device.type == "cuda" else INTERPRETER_WGRAD_PROGRAMS

    def fit(config: TileConfig) -> TileConfig:
        return dataclasses.replace(config, m=_tile(C_g, config.m), n=_tile(C_d, config.n))

    def launch(config: TileConfig) -> torch.Tensor:
        tiles = KH * KW * triton.cdiv(C_g, config.m) * triton.cdiv(C_d, config.n)
        split = max(1, min(triton.cdiv(target_programs, tiles), rows // (2 * config.k)))
        rows_per_split = triton.cdiv(triton.cdiv(rows, split), config.k) * config.k
        split = triton.cdiv(rows, rows_per_split)
        part = torch.empty((split, KH, KW, C_g, C_d), dtype=acc, device=x.device)
        grid = (KH * KW * triton.cdiv(C_g, config.m), triton.cdiv(C_d, config.n), split)
        _conv_wgrad_kernel[grid](
            g, d, *(g if t is None else t for t in (pre, coef, mod_g, mod_d)), part,
            N, HG, WG, C_g, HD, WD, C_d, KH, KW, stride[0], stride[1],
            padding[0], padding[1], rows_per_split, negative_slope,
            BN_GRAD_G=pre is not None and transposed, BN_GRAD_D=pre is not None and not transposed,
            MODULATE=modulation is not None, ACT=activation,
            ACC=tl_acc_dtype(acc), PRECISION=precision, BLOCK_G=config.m, BLOCK_D=config.n,
            BLOCK_M=config.k, num_warps=config.num_warps, num_stages=config.num_stages)
        return part

    key = (batch_bucket(N), g.shape[1:], d.shape[1:], KH, KW, stride, padding, transposed, x.dtype,
           precision, pre is not None, modulation is not None)
    part = WGRAD_TUNER.run(key, x.device, fit, launch, x.dtype,
                           wgrad_operand_tiles(transposed, pre is not None, modulation is not None,
                                               x.element_size()))
    split = part.shape[0]
    # A fixed-order sum over the splits keeps the result deterministic.
    dw = part[0] if split == 1 else part.sum(0)
    # (KH, KW, C_g, C_d) -> (C_out, C_in, KH, KW) for a conv, (C_in, C_out, KH, KW) transposed
    return dw.permute(3, 2, 0, 1).to(dtype).contiguous()


def bn_partial_stats(y: torch.Tensor) -> torch.Tensor:
    """Per-tile (count, mean, M2) of an NHWC tensor's channels: (3, n_tiles, C), for
    bn_combine_stats (BN without a conv)."""
    M, C = _pair_dims(y)
    block_m, block_c = _elementwise_blocks(y.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(C, block_c))
    acc = acc_dtype(y.dtype)
    part = torch.empty((3, grid[0], C), dtype=acc, device=y.device)
    _bn_stats_kernel[grid](y, part, M, C, ACC=tl_acc_dtype(acc), BLOCK_M=block_m,
                           BLOCK_C=block_c, num_warps=4)
    return part


def bn_combine_stats(part: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                     running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                     momentum: float, eps: float) -> torch.Tensor:
    """Batch statistics from per-tile partials (Chan's formula, fixed order).

    Args:
        part: (3, n_tiles, C) from conv_stats_forward or bn_partial_stats.
        gamma, beta: (C,) BN affine parameters. running_mean, running_var: (C,) or both None.

    Returns:
        (6, C) in part's dtype, rows zscale, zshift, mean, rstd (rows 0..3 are the forward
        coefficients the apply pass and the backward take), then the new running mean and
        running var (unwritten when running stats are None). The running buffers are not touched.
    """
    C = part.shape[2]
    stats = torch.empty((6, C), dtype=part.dtype, device=part.device)
    update = running_mean is not None
    _bn_stats_combine_kernel[(triton.cdiv(C, COMBINE_C),)](
        part, gamma, beta, running_mean if update else gamma, running_var if update else gamma,
        stats, part.shape[1], C, momentum, eps, UPDATE_RUNNING=update, BLOCK_T=COMBINE_T,
        BLOCK_C=COMBINE_C, num_warps=4)
    return stats


def _rows_grid(y: torch.Tensor, affine: torch.Tensor | None) -> tuple[tuple[int, int, int], int, int]:
    """Grid and (BLOCK_M, BLOCK_C) of the BN passes over an NHWC y: row blocks over all N * H * W
    rows, or with a per-sample ``affine`` row blocks within each sample (third axis: the sample)."""
    N, H, W, C = y.shape
    block_m, block_c = _elementwise_blocks(y.device)
    if affine is None:
        return (triton.cdiv(N * H * W, block_m), triton.cdiv(C, block_c), 1), block_m, block_c
    if N > MAX_GRID_Z:
        raise ValueError(f"y: {N} samples; a per-sample BN affine takes at most {MAX_GRID_Z} per "
                         "call (a CUDA grid's third axis): split the batch")
    return (triton.cdiv(H * W, block_m), triton.cdiv(C, block_c), N), block_m, block_c


def _check_affine(y: torch.Tensor, coef: torch.Tensor, affine: torch.Tensor | None) -> None:
    if affine is not None and (affine.shape != (2, y.shape[0], y.shape[3])
                               or affine.dtype != coef.dtype or not affine.is_contiguous()):
        raise ValueError(f"affine: expected a contiguous (2, N, C) = (2, {y.shape[0]}, {y.shape[3]}) "
                         f"{coef.dtype} tensor, got {tuple(affine.shape)} {affine.dtype}")


def bn_act_apply(y: torch.Tensor, coef: torch.Tensor, activation: int, negative_slope: float,
                 channels_last: bool, affine: torch.Tensor | None = None) -> torch.Tensor:
    """out = act(y * zscale + zshift) for an NHWC y (coef rows 0, 1: zscale, zshift).

    Args:
        affine: a per-sample affine (2, N, C) in coef's dtype, rows gamma, beta: then
            out = act((y * zscale + zshift) * gamma[n] + beta[n]) (coef normalizes only).

    Returns:
        (N, C, H, W) in y's dtype, channels_last or contiguous NCHW as asked.
    """
    _check_affine(y, coef, affine)
    N, H, W, C = y.shape
    grid, block_m, block_c = _rows_grid(y, affine)
    out, out_strides = _activation_output(N, C, (H, W), y.dtype, y.device, channels_last)
    _bn_act_apply_kernel[grid](y, coef, coef if affine is None else affine, out, N * H * W, C,
                               H * W, N * C, *out_strides, negative_slope,
                               PER_SAMPLE=affine is not None, ACT=activation,
                               ACC=tl_acc_dtype(coef.dtype), BLOCK_M=block_m, BLOCK_C=block_c,
                               num_warps=4)
    return out


def _grad_coef(dout: torch.Tensor, y: torch.Tensor, fwd_coef: torch.Tensor,
               affine: torch.Tensor | None, activation: int, negative_slope: float,
               training: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reduction pass of bn_act_grad_coef (per channel) and bn_act_sample_grad_coef."""
    _check_affine(y, fwd_coef, affine)
    N, H, W, C = y.shape
    M = N * H * W
    grid, block_m, block_c = _rows_grid(y, affine)
    n_tiles = grid[0] * grid[2]
    part = torch.empty((2, n_tiles, C), dtype=fwd_coef.dtype, device=y.device)
    per_sample = affine is not None
    _bn_act_grad_partials_kernel[grid](dout, y, fwd_coef, affine if per_sample else fwd_coef, part,
                                       M, C, H * W, N * C, negative_slope,
                                       PER_SAMPLE=per_sample, ACT=activation,
                                       ACC=tl_acc_dtype(fwd_coef.dtype), BLOCK_M=block_m,
                                       BLOCK_C=block_c, num_warps=4)
    coef = torch.empty((8, C), dtype=fwd_coef.dtype, device=y.device)
    sample_grads = (torch.empty((2, N, C), dtype=fwd_coef.dtype, device=y.device)
                    if per_sample else None)
    _bn_grad_combine_kernel[(triton.cdiv(C, COMBINE_C),)](
        part, fwd_coef, affine if per_sample else fwd_coef, coef,
        sample_grads if per_sample else coef, n_tiles, grid[2], C, 1.0 / M, TRAINING=training,
        PER_SAMPLE=per_sample, BLOCK_T=COMBINE_T, BLOCK_C=COMBINE_C, num_warps=4)
    return coef, sample_grads


def bn_act_grad_coef(dout: torch.Tensor, y: torch.Tensor, fwd_coef: torch.Tensor, activation: int,
                     negative_slope: float, training: bool) -> torch.Tensor:
    """The backward's reduction pass: dbeta, dgamma and the per-channel coefficients of dL/dy.

    Args:
        dout, y: (N, H, W, C) contiguous: dL/dout and the saved pre-BN values.
        fwd_coef: (>= 4, C) rows zscale, zshift, mean, rstd (batch statistics when ``training``,
            running ones in eval; mean 0 and rstd 1 for a plain bias).
        training: dL/dy includes the batch statistics' terms.

    Returns:
        (8, C) in fwd_coef's dtype, rows zscale, zshift, mean, rstd, dbeta / n, dgamma / n
        (0 unless training), dgamma, dbeta.
    """
    return _grad_coef(dout, y, fwd_coef, None, activation, negative_slope, training)[0]


def bn_act_sample_grad_coef(dout: torch.Tensor, y: torch.Tensor, fwd_coef: torch.Tensor,
                            affine: torch.Tensor, activation: int, negative_slope: float,
                            training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """bn_act_grad_coef for a per-sample affine (module docstring): per-sample partial sums over
    row blocks that stay within a sample, combined in a fixed order.

    Args:
        dout, y: (N, H, W, C) contiguous. fwd_coef: (>= 4, C) rows zscale, zshift, mean, rstd of
            the normalization alone. affine: (2, N, C) rows gamma, beta in fwd_coef's dtype.

    Returns:
        coef: (8, C) as bn_act_grad_coef's, with h = g * gamma[n] in place of g (rows dbeta / n,
        dgamma / n: the means of h and h * xhat, 0 unless training; rows dgamma, dbeta: the
        sums of h * xhat and h, the gradients of a per-channel affine applied after this one);
        for bn_act_input_grad with the same ``affine``.
        sample_grads: (2, N, C), rows dgamma, dbeta per sample (sums over h, w of g * xhat, g).
    """
    return _grad_coef(dout, y, fwd_coef, affine, activation, negative_slope, training)


def bn_act_input_grad(dout: torch.Tensor, y: torch.Tensor, coef: torch.Tensor, activation: int,
                      negative_slope: float, affine: torch.Tensor | None = None) -> torch.Tensor:
    """dL/dy of BN + activation, NHWC, in dout's dtype; coef from bn_act_grad_coef, or with a
    per-sample ``affine`` (2, N, C) from bn_act_sample_grad_coef with the same affine."""
    _check_affine(y, coef, affine)
    N, H, W, C = y.shape
    grid, block_m, block_c = _rows_grid(y, affine)
    dy = torch.empty_like(dout)
    _bn_act_input_grad_kernel[grid](dout, y, coef, coef if affine is None else affine, dy,
                                    N * H * W, C, H * W, N * C, negative_slope,
                                    PER_SAMPLE=affine is not None, ACT=activation,
                                    ACC=tl_acc_dtype(coef.dtype), BLOCK_M=block_m,
                                    BLOCK_C=block_c, num_warps=4)
    return dy


def conv_plain_forward(x: torch.Tensor, weight: torch.Tensor, out_hw: tuple[int, int],
                       stride: tuple[int, int], padding: tuple[int, int], transposed: bool
                       ) -> torch.Tensor:
    """The conv output y alone (STORE epilogue), for the eval forward of a per-sample BN layer:
    its affine varies per sample, so bn_act_apply follows instead of the AFFINE epilogue.

    Args as conv_stats_forward. Returns y: (N, Ho, Wo, C_out) in x's dtype.
    """
    return _conv_gemm(x, weight, out_hw, stride, padding, transposed, STORE.value)[0]


def conv_plain_grads(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                     stride: tuple[int, int], padding: tuple[int, int], transposed: bool,
                     mask: tuple[bool, bool]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dL/dx and dL/dweight from a stored dL/dy (bn_act_input_grad's, for a per-sample BN layer):
    the input- and weight-gradient GEMMs with a plain operand, no BN prologue.

    Args:
        dy: (N, Ho, Wo, C_out) contiguous; x: (N, H, W, C_in) the forward input; weight, stride,
            padding, transposed: the forward's. mask: which of (dx, dw) to compute.

    Returns:
        dx (N, H, W, C_in) in dy's dtype and dw in the weight's layout and dtype, None where
        ``mask`` says no.
    """
    dx = dw = None
    if mask[0]:
        dx = _conv_gemm(dy, weight, tuple(x.shape[1:3]), stride, padding, not transposed,
                        STORE.value)[0]
    if mask[1]:
        dw = _conv_wgrad(x, dy, weight.shape, stride, padding, transposed, weight.dtype)
    return dx, dw


def param_grads(coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgamma, dbeta) rows of bn_act_grad_coef's result (dbeta is d bias for a plain bias)."""
    return coef[DGAMMA.value], coef[DBETA.value]
