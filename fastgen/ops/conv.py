"""Conv2d / ConvTranspose2d + BatchNorm + activation, conv + bias + activation, BN + activation:
``torch.ops.fastgen.conv_bn_act``, ``conv_bias_act``, ``bn_act``, their backward ops, and the
public functions.

Forward ops return, beside the output, what their backward needs: the pre-activation conv output
y (N, C, H, W) in channels_last memory (the kernels' NHWC), the per-channel coefficients ``coef``
(4, C) of ``z = y * zscale + zshift`` (rows zscale, zshift, mean, rstd, float32; float64 for
float64 inputs), and in training the new running mean and var (2, C). The public functions copy
those into the caller's buffers through ``torch.ops.fastgen.update_running_stats``, an op that
declares the mutation, so a compiled graph keeps it. Modes: "train" (batch statistics),
"eval" (running statistics folded into coef) and "bias" (a conv bias, no BN). With a per-sample
BN affine (gamma or beta of shape (N, C): class-conditional BN) coef only normalizes and the
kernels apply the affine beside it (fastgen/kernels/conv_bn_act.py); the backward ops then return
per-sample dgamma, dbeta (summed over the samples for a per-channel parameter).

On the Triton backend a conv layer runs one of two implementations, chosen per shape on CUDA by
timing (:data:`CONV_IMPLEMENTATION_TUNER`): "fused" (implicit-GEMM kernels with the BN
statistics in the epilogue and dL/dy computed on the fly in the backward GEMMs) or "cudnn-gemm"
(torch's conv, then fastgen's fused BN passes). Triton GEMMs can lose to cuDNN's at some shapes
(DESIGN.md). Both give the same y and coef, so the backward may run either.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgen import activations, backend, reference
from fastgen.kernels._tuning import Tuner, batch_bucket
from fastgen.ops import _checks, _library, sync_bn
from fastgen.ops._library import (empty, forward_backend, none_if_empty, record_backend,
                                  reference_double_backward)

__all__ = ["conv_bn_act", "conv_bias_act", "bn_act", "CONV_IMPLEMENTATIONS",
           "CONV_IMPLEMENTATION_TUNER"]

CONV_IMPLEMENTATIONS = ("fused", "cudnn-gemm")
CONV_IMPLEMENTATION_TUNER: Tuner[str] = Tuner("conv_bn_act implementation", CONV_IMPLEMENTATIONS,
                                              interpreter="fused")


class _Spec(NamedTuple):
    """Everything but the tensors: the op arguments, in one value the helpers pass along."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    output_padding: tuple[int, int]
    transposed: bool
    mode: str  # "train" | "eval" | "bias"
    momentum: float
    eps: float
    activation: str
    negative_slope: float
    group: str = ""  # process group name of a synchronized BN ("": none; fastgen.ops.sync_bn)

    @property
    def act_code(self) -> int:
        return activations.ACTIVATIONS[self.activation].code


def _spec(stride, padding, output_padding, transposed, mode, momentum, eps, activation,
          negative_slope, group: str = "") -> _Spec:
    return _Spec(tuple(stride), tuple(padding), tuple(output_padding), transposed, mode,
                 momentum, eps, activation, negative_slope, group)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _nhwc(t: Tensor) -> Tensor:
    """(N, C, H, W) -> its (N, H, W, C) contiguous form (free for channels_last tensors)."""
    return t.permute(0, 2, 3, 1).contiguous()


def _nchw_view(t: Tensor) -> Tensor:
    """An NHWC tensor seen as (N, C, H, W): channels_last strides, no copy."""
    return t.permute(0, 3, 1, 2)


def _channels_last_out(x: Tensor) -> bool:
    """Outputs keep the input's memory format, as PyTorch's conv and BN do (so ``.view`` works
    where it worked before): channels_last for a channels_last input, NCHW otherwise."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _out_format(x: Tensor) -> torch.memory_format:
    return torch.channels_last if _channels_last_out(x) else torch.contiguous_format


def conv_out_hw(in_hw: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int],
                padding: tuple[int, int], output_padding: tuple[int, int],
                transposed: bool) -> tuple[int, int]:
    """Output (H, W) of a Conv2d (or ConvTranspose2d), as PyTorch computes it."""
    if transposed:
        return tuple((i - 1) * s - 2 * p + k + o
                     for i, k, s, p, o in zip(in_hw, kernel, stride, padding, output_padding))
    return tuple((i + 2 * p - k) // s + 1 for i, k, s, p in zip(in_hw, kernel, stride, padding))


def _out_channels(weight: Tensor, transposed: bool) -> int:
    return weight.shape[1] if transposed else weight.shape[0]


def _conv_torch(x: Tensor, weight: Tensor, spec: _Spec) -> Tensor:
    if spec.transposed:
        return F.conv_transpose2d(x, weight, None, spec.stride, spec.padding, spec.output_padding)
    return F.conv2d(x, weight, None, spec.stride, spec.padding)


# ----------------------------------------------------------------------------------------------
# Coefficients z = y * zscale + zshift


def _per_sample(gamma: Tensor | None, beta: Tensor | None) -> bool:
    """Whether the BN affine is per sample (class-conditional BN): gamma or beta is (N, C)."""
    return any(p is not None and p.dim() == 2 for p in (gamma, beta))


def _coef_affine(gamma: Tensor | None, beta: Tensor | None
                 ) -> tuple[Tensor | None, Tensor | None]:
    """The affine parameters coef folds in: both per-channel ones, or none when the affine is per
    sample (coef then only normalizes, xhat = y * zscale + zshift, and the per-sample affine
    z = xhat * gamma[n] + beta[n] is applied beside it)."""
    return (None, None) if _per_sample(gamma, beta) else (gamma, beta)


def _sample_affine(gamma: Tensor | None, beta: Tensor | None, batch: int, channels: int,
                   like: Tensor) -> Tensor | None:
    """The per-sample affine for the kernels: (2, N, C) rows gamma, beta in coef's dtype
    (per-channel or missing parameters broadcast), or None when the affine is per channel."""
    if not _per_sample(gamma, beta):
        return None
    return torch.stack([_affine(p, fill, channels, like).expand(batch, channels)
                        for p, fill in ((gamma, 1.0), (beta, 0.0))]).contiguous()


def _affine(param: Tensor | None, fill: float, channels: int, like: Tensor) -> Tensor:
    acc = _acc(like.dtype)
    if param is not None:
        return param.to(acc)
    return torch.full((channels,), fill, dtype=acc, device=like.device)


def _folded_coef(spec: _Spec, gamma: Tensor | None, beta: Tensor | None,
                 running_mean: Tensor | None, running_var: Tensor | None, channels: int,
                 like: Tensor) -> Tensor:
    """coef of the "eval" (running statistics) and "bias" modes."""
    shift = _affine(beta, 0.0, channels, like)
    if spec.mode == "bias":
        ones = torch.ones_like(shift)
        return torch.stack([ones, shift, torch.zeros_like(ones), ones])
    acc = _acc(like.dtype)
    rstd = torch.rsqrt(running_var.to(acc) + spec.eps)
    zscale = _affine(gamma, 1.0, channels, like) * rstd
    mean = running_mean.to(acc)
    return torch.stack([zscale, shift - mean * zscale, mean, rstd])


def _batch_coef(y: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float,
                group: str = "") -> tuple[Tensor, Tensor | int, Tensor]:
    """coef from y's batch statistics, in torch (the reference path), with the count and biased
    variance they come from; with a process group, those of every rank's batch together."""
    var, mean = torch.var_mean(y.to(_acc(y.dtype)), dim=(0, 2, 3), unbiased=False)
    count = y.numel() // y.shape[1]
    if group:
        local = torch.stack([torch.full_like(mean, count), mean, var * count])
        count, mean, m2 = sync_bn.merge_stats(sync_bn.all_gather_stats(local, group))
        var = m2 / count
    return _stats_coef(mean, torch.rsqrt(var + eps), gamma, beta, y), count, var


def _stats_coef(mean: Tensor, rstd: Tensor, gamma: Tensor | None, beta: Tensor | None,
                like: Tensor) -> Tensor:
    """coef (4, C) from a batch's mean and 1 / sqrt(var + eps)."""
    zscale = _affine(gamma, 1.0, like.shape[1], like) * rstd
    return torch.stack([zscale, _affine(beta, 0.0, like.shape[1], like) - mean * zscale, mean, rstd])


def _bn_act_reference(y: Tensor, coef: Tensor, gamma: Tensor | None, beta: Tensor | None,
                      spec: _Spec) -> Tensor:
    """act(BN(y)) in reference math, differentiable in y, gamma and beta (per channel or per
    sample); "eval" reads its constant statistics from coef, "bias" adds beta (the conv bias)."""
    if spec.mode == "train":
        return reference.bn_act(y, gamma, beta, None, None, training=True, momentum=0.0,
                                eps=spec.eps, activation=spec.activation,
                                negative_slope=spec.negative_slope)
    per_channel = (1, -1, 1, 1)
    z = y if spec.mode == "bias" else (y - coef[2].to(y.dtype).view(per_channel)) * coef[3].to(y.dtype).view(per_channel)
    z = reference.affine(z, gamma if spec.mode == "eval" else None, beta)
    return reference.activate(z.to(y.dtype), spec.activation, spec.negative_slope)


# ----------------------------------------------------------------------------------------------
# Forward and backward on each path. A conv's forward returns (out, y NHWC or None, coef,
# new running statistics (2, C) or None); its backward (dx, dw, dgamma, dbeta), None where the
# mask says no.


def _forward_triton(implementation: str, x: Tensor, weight: Tensor, gamma: Tensor | None,
                    beta: Tensor | None, running_mean: Tensor | None, running_var: Tensor | None,
                    spec: _Spec, save_pre: bool):
    kernels = _library.conv_bn_act
    channels = _out_channels(weight, spec.transposed)
    channels_last = _channels_last_out(x)
    folded = None if spec.mode == "train" else _folded_coef(
        spec, *_coef_affine(gamma, beta), running_mean, running_var, channels, x)
    if implementation == "fused":
        out_hw = conv_out_hw(tuple(x.shape[2:]), tuple(weight.shape[2:]), spec.stride, spec.padding,
                             spec.output_padding, spec.transposed)
        conv_args = (_nhwc(x), weight, out_hw, spec.stride, spec.padding, spec.transposed)
        if folded is None:
            y, part = kernels.conv_stats_forward(*conv_args)
        elif not _per_sample(gamma, beta):
            out, y = kernels.conv_affine_act_forward(*conv_args, folded, spec.act_code,
                                                     spec.negative_slope, save_pre, channels_last)
            return out, y, folded, None
        else:  # a per-sample affine cannot be folded into the GEMM: the conv, then the apply pass
            y = kernels.conv_plain_forward(*conv_args)
    else:
        y = _nhwc(_conv_torch(x, weight, spec))
        if folded is None:
            part = kernels.bn_partial_stats(y)
    if folded is not None:
        out = kernels.bn_act_apply(y, folded, spec.act_code, spec.negative_slope, channels_last,
                                   _sample_affine(gamma, beta, y.shape[0], channels, y))
        return out, y, folded, None
    return _apply_batch_stats(y, part, gamma, beta, running_mean, running_var, spec, channels_last)


def _apply_batch_stats(y: Tensor, part: Tensor, gamma: Tensor | None, beta: Tensor | None,
                       running_mean: Tensor | None, running_var: Tensor | None, spec: _Spec,
                       channels_last: bool):
    """Training BN on an NHWC y from its per-tile partial statistics: combine, then apply (a
    per-sample affine beside the coefficients). A synchronized BN combines the ranks' statistics
    instead, each its tiles merged: (3, W, C)."""
    kernels = _library.conv_bn_act
    channels = y.shape[3]
    if spec.group:
        part = sync_bn.all_gather_stats(sync_bn.merge_stats(part), spec.group)
    coef_gamma, coef_beta = _coef_affine(gamma, beta)
    stats = kernels.bn_combine_stats(part, _affine(coef_gamma, 1.0, channels, y),
                                     _affine(coef_beta, 0.0, channels, y), running_mean,
                                     running_var, spec.momentum, spec.eps)
    out = kernels.bn_act_apply(y, stats[:4], spec.act_code, spec.negative_slope, channels_last,
                               _sample_affine(gamma, beta, y.shape[0], channels, y))
    # Outputs of an op may not alias each other, and start at their storage's first element.
    return out, y, stats[:4], None if running_mean is None else stats[4:].clone()


def _forward_reference(x: Tensor, weight: Tensor | None, gamma: Tensor | None, beta: Tensor | None,
                       running_mean: Tensor | None, running_var: Tensor | None, spec: _Spec):
    """The reference's forward, with the coefficients the backward ops take (weight None: BN only)."""
    y = x if weight is None else _conv_torch(x, weight, spec)
    channels = y.shape[1]
    if spec.mode == "train" and not spec.group and not _per_sample(gamma, beta):
        # torch's batch norm: the output, the running update (on copies) and the statistics
        acc = _acc(y.dtype)
        running = None if running_mean is None else torch.stack([running_mean.to(acc), running_var.to(acc)])
        bn, mean, rstd = torch.ops.aten.native_batch_norm(
            y, gamma, beta, *((None, None) if running is None else running), True, spec.momentum, spec.eps)
        coef = _stats_coef(mean.to(acc), rstd.to(acc), gamma, beta, y)
        out = reference.activate(bn, spec.activation, spec.negative_slope)
    elif spec.mode == "train":
        coef, count, var = _batch_coef(y, *_coef_affine(gamma, beta), spec.eps, spec.group)
        running = None
        if running_mean is not None:  # torch's batch_norm updates them in place: on copies
            running = torch.stack([running_mean.to(coef.dtype), running_var.to(coef.dtype)])
        if spec.group:  # global statistics: torch's update rule, applied to them here
            if running is not None:
                new = torch.stack([coef[2], var * count / (count - 1)])
                running = (1.0 - spec.momentum) * running + spec.momentum * new
            out = _bn_act_reference(y, coef, gamma, beta, spec._replace(mode="eval"))
        else:
            out = reference.bn_act(y, gamma, beta, None if running is None else running[0],
                                   None if running is None else running[1], training=True,
                                   momentum=spec.momentum, eps=spec.eps,
                                   activation=spec.activation, negative_slope=spec.negative_slope)
    else:
        coef = _folded_coef(spec, *_coef_affine(gamma, beta), running_mean, running_var, channels, y)
        out = _bn_act_reference(y, coef, gamma, beta, spec)
        running = None
    return out.contiguous(memory_format=_out_format(x)), _nhwc(y), coef, running


def _conv_key(x: Tensor, weight: Tensor, spec: _Spec, per_sample: bool) -> tuple:
    # momentum and eps change no cost (and momentum=None changes every step): not in the key. A
    # smaller last batch takes its bucket's choice, as the tile tuners' keys do. A synchronized
    # BN runs the same kernels; a per-sample affine other ones.
    return ((batch_bucket(x.shape[0]), *x.shape[1:]), tuple(weight.shape), x.dtype,
            _channels_last_out(x), spec._replace(momentum=0.0, eps=0.0, group=""),
            torch.backends.cudnn.allow_tf32, per_sample)


def _implementation(x: Tensor, weight: Tensor, gamma: Tensor | None, beta: Tensor | None,
                    running_mean: Tensor | None, running_var: Tensor | None, spec: _Spec) -> str:
    """The conv implementation for this shape: timed once per key (the tuner's policy,
    kernels/_tuning.py: on CUDA), forward and backward with every gradient, on the very inputs
    (the trial writes no buffer and saves no tensor). A synchronized BN's trial runs
    unsynchronized: no rank waits in a collective on another's timing."""
    spec = spec._replace(group="")

    def trial(implementation: str) -> None:
        stats = (running_mean, running_var) if spec.mode == "eval" else (None, None)
        out, y, coef, _ = _forward_triton(implementation, x, weight, gamma, beta, *stats, spec, True)
        _backward_triton(implementation, out, x, weight, y, coef, gamma, beta, spec,
                         (True, True, True, True))

    return CONV_IMPLEMENTATION_TUNER.choose(_conv_key(x, weight, spec, _per_sample(gamma, beta)),
                                            x.device, lambda c: c, trial)


def _grad_coef(dout: Tensor, y: Tensor, coef: Tensor, gamma: Tensor | None, beta: Tensor | None,
               spec: _Spec, mask: tuple[bool, ...]
               ) -> tuple[Tensor, Tensor | None, tuple[Tensor, Tensor]]:
    """bn_act_grad_coef, or bn_act_sample_grad_coef for a per-sample affine (NHWC dout, y): the
    coefficients of dL/dy, the per-sample affine (2, N, C) they go with (None: per channel) and
    (dgamma, dbeta), (C,) or per sample (N, C). A synchronized BN's dL/dy, when asked for (dx or
    dw), takes the global means of dz and dz * xhat (rows dbeta / n, dgamma / n; with a
    per-sample affine dz * gamma[n]); dgamma and dbeta stay the local sums."""
    kernels = _library.conv_bn_act
    act = (spec.act_code, spec.negative_slope)
    training = spec.mode == "train"
    affine = _sample_affine(gamma, beta, y.shape[0], y.shape[-1], coef)
    if affine is None:
        grad_coef = kernels.bn_act_grad_coef(dout, y, coef, *act, training=training)
        grads = kernels.param_grads(grad_coef)
    else:
        grad_coef, sample_grads = kernels.bn_act_sample_grad_coef(dout, y, coef, affine, *act,
                                                                  training=training)
        grads = (sample_grads[0], sample_grads[1])
    if spec.group and (mask[0] or mask[1]):
        dbeta, dgamma, count = sync_bn.all_reduce_grad_sums(
            grad_coef[kernels.DBETA.value], grad_coef[kernels.DGAMMA.value],
            dout.numel() // dout.shape[-1], spec.group)
        grad_coef = grad_coef.clone()
        grad_coef[kernels.DBETA_MEAN.value] = dbeta / count
        grad_coef[kernels.DGAMMA_MEAN.value] = dgamma / count
    return grad_coef, affine, grads


def _backward_triton(implementation: str, grad_out: Tensor, x: Tensor, weight: Tensor, y: Tensor,
                     coef: Tensor, gamma: Tensor | None, beta: Tensor | None, spec: _Spec,
                     mask: tuple[bool, ...]):
    """The "fused" implementation computes dL/dy inside its GEMMs; with a per-sample affine, and
    for "cudnn-gemm", bn_act_input_grad stores dL/dy and plain GEMMs (fastgen's or torch's) follow."""
    kernels = _library.conv_bn_act
    dout = _nhwc(grad_out.to(y.dtype))
    grad_coef, affine, (dgamma, dbeta) = _grad_coef(dout, y, coef, gamma, beta, spec, mask)
    dx = dw = None
    act = (spec.act_code, spec.negative_slope)
    if implementation == "fused" and affine is None:
        if mask[0]:
            dx = _nchw_view(kernels.conv_input_grad(dout, y, grad_coef, weight, tuple(x.shape[2:]),
                                                    spec.stride, spec.padding, spec.transposed, *act))
        if mask[1]:
            dw = kernels.conv_weight_grad(_nhwc(x), dout, y, grad_coef, weight.shape, spec.stride,
                                          spec.padding, spec.transposed, *act, dtype=weight.dtype)
    elif mask[0] or mask[1]:
        dy = kernels.bn_act_input_grad(dout, y, grad_coef, *act, affine)
        if implementation == "fused":
            dx, dw = kernels.conv_plain_grads(dy, _nhwc(x), weight, spec.stride, spec.padding,
                                              spec.transposed, mask[:2])
            dx = None if dx is None else _nchw_view(dx)
        else:
            dx, dw = _conv_torch_backward(_nchw_view(dy), x, weight, spec, mask)
    return dx, dw, dgamma, dbeta


def _conv_torch_backward(dy: Tensor, x: Tensor, weight: Tensor, spec: _Spec,
                         mask: tuple[bool, ...]) -> tuple[Tensor | None, Tensor | None]:
    dx, dw, _ = torch.ops.aten.convolution_backward(
        dy, x, weight, None, list(spec.stride), list(spec.padding), [1, 1], spec.transposed,
        list(spec.output_padding), 1, [mask[0], mask[1], False])
    return dx, dw


def _backward_reference(grad_out: Tensor, x: Tensor, weight: Tensor | None, y: Tensor, coef: Tensor,
                        gamma: Tensor | None, beta: Tensor | None, spec: _Spec,
                        mask: tuple[bool, ...]):
    """BN + activation backward in closed form on the saved y (NHWC), then torch's conv backward
    (weight None: BN only, dy is dx). Autograd is off inside an op's body, hence no autograd here:

        dz = dout * act'(z),  dbeta = sum dz,  dgamma = sum dz * xhat,  xhat = (y - mean) * rstd,
        dy = zscale * dz                                  (eval, bias: constant statistics)
        dy = zscale * (dz - mean(dz) - xhat * mean(dz * xhat))   (train: batch statistics)

    A per-sample affine (coef normalizes only: zscale = rstd) sums dbeta and dgamma per sample,
    over (h, w), and scales dz by gamma[n] before the same two lines (module docstring of
    fastgen.kernels.conv_bn_act). A synchronized BN takes those two means over every rank (when
    dx or dw is asked for). The common case (train, per-channel affine, one process) runs the
    same math as torch's native_batch_norm_backward, and act' is torch's activation backward.
    """
    acc = coef.dtype
    y = y.to(acc)
    zscale, zshift, mean, rstd = coef
    z = torch.addcmul(zshift, y, zscale)
    affine = _sample_affine(gamma, beta, y.shape[0], y.shape[-1], y)
    if affine is not None:
        gamma_n, beta_n = affine[:, :, None, None, :]  # (N, 1, 1, C) against NHWC
        z = torch.addcmul(beta_n, z, gamma_n)
    dz = activations.ACTIVATIONS[spec.activation].backward(_nhwc(grad_out).to(acc), z, spec.negative_slope)
    if spec.mode == "train" and affine is None and not spec.group:
        # Batch statistics, per-channel affine, one process: torch's fused batch-norm backward
        # (dy, dgamma, dbeta in one pass over channels_last views of the NHWC tensors).
        dy, dgamma, dbeta = torch.ops.aten.native_batch_norm_backward(
            _nchw_view(dz), _nchw_view(y), None if gamma is None else gamma.to(acc), None, None, mean,
            rstd, True, spec.eps, [True, True, True])
        return _conv_reference_grads(dy.to(x.dtype), x, weight, dgamma, dbeta, spec, mask)
    rows = tuple(range(dz.dim() - 1)) if affine is None else (1, 2)
    dbeta = dz.sum(rows)
    if spec.mode == "bias":
        dy, dgamma = dz, None
    else:
        xhat = (y - mean) * rstd
        dgamma = (dz * xhat).sum(rows)
        if affine is not None:
            dz = dz * gamma_n
        if spec.mode == "train":
            sums = (dbeta, dgamma)
            if affine is not None:  # the per-channel sums of dz * gamma[n]
                sums = ((dbeta * affine[0]).sum(0), (dgamma * affine[0]).sum(0))
            sums = (*sums, dz.numel() // dz.shape[-1])
            if spec.group and (mask[0] or mask[1]):
                sums = sync_bn.all_reduce_grad_sums(*sums, spec.group)
            dz = dz - (sums[0] + xhat * sums[1]) / sums[2]
        dy = dz * zscale
    return _conv_reference_grads(_nchw_view(dy.to(x.dtype)), x, weight, dgamma, dbeta, spec, mask)


def _conv_reference_grads(dy: Tensor, x: Tensor, weight: Tensor | None, dgamma: Tensor | None,
                          dbeta: Tensor, spec: _Spec, mask: tuple[bool, ...]):
    """(dx, dw, dgamma, dbeta) from dL/dy (N, C, H, W): torch's conv backward (BN only: dy is dx)."""
    if weight is None:
        return dy, None, dgamma, dbeta
    dx, dw = _conv_torch_backward(dy, x, weight, spec, mask) if mask[0] or mask[1] else (None, None)
    return dx, dw, dgamma, dbeta


def _backward_outputs(grads, x: Tensor, weight: Tensor | None, gamma: Tensor | None,
                      beta: Tensor | None, mask: list[bool]) -> tuple[Tensor, ...]:
    """The backward op's outputs in fixed layouts (dx channels_last, dw contiguous, parameter
    gradients in their dtypes), empty where not asked for."""
    dx, dw, dgamma, dbeta = grads
    like = (x, weight, gamma, beta)
    outs = []
    for i, (g, t, m) in enumerate(zip((dx, dw, dgamma, dbeta), like, mask)):
        if not m or t is None or g is None:
            outs.append(empty(x))
        elif i == 0:
            outs.append(g.to(x.dtype).contiguous(memory_format=torch.channels_last))
        else:  # a per-sample gradient (N, C) of a per-channel parameter: summed over the samples
            outs.append((g.sum(0) if g.dim() > t.dim() else g).to(t.dtype, copy=True).contiguous())
    return tuple(outs)


def _backward_fake(x: Tensor, weight: Tensor | None, gamma: Tensor | None, beta: Tensor | None,
                   mask: list[bool]) -> tuple[Tensor, ...]:
    outs = []
    for i, (t, m) in enumerate(zip((x, weight, gamma, beta), mask)):
        if not m or t is None:
            outs.append(empty(x))
        else:
            outs.append(torch.empty_like(t, memory_format=torch.channels_last if i == 0 else torch.contiguous_format))
    return tuple(outs)


# ----------------------------------------------------------------------------------------------
# The ops


def _conv_forward(x: Tensor, weight: Tensor, gamma: Tensor | None, beta: Tensor | None,
                  running_mean: Tensor | None, running_var: Tensor | None, spec: _Spec,
                  save_pre: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The body of the conv forward ops: (out, y or empty, coef, running or empty)."""
    def triton_path():
        implementation = _implementation(x, weight, gamma, beta, running_mean, running_var, spec)
        return _forward_triton(implementation, x, weight, gamma, beta, running_mean, running_var,
                               spec, save_pre)

    out, y, coef, running = backend.dispatch(
        "conv_bn_act", (x, weight), triton_path,
        lambda: _forward_reference(x, weight, gamma, beta, running_mean, running_var, spec))
    keep_y = y is not None and (save_pre or spec.mode == "train")
    if keep_y and y.untyped_storage().data_ptr() == out.untyped_storage().data_ptr():
        y = y.clone()  # identity activation on the reference path: outputs may not alias
    return (out, _nchw_view(y) if keep_y else empty(x), coef,
            empty(coef) if running is None else running)


def _conv_forward_fake(x: Tensor, weight: Tensor, running_mean: Tensor | None, spec: _Spec,
                       save_pre: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    channels = _out_channels(weight, spec.transposed)
    hw = conv_out_hw(tuple(x.shape[2:]), tuple(weight.shape[2:]), spec.stride, spec.padding,
                     spec.output_padding, spec.transposed)
    shape = (x.shape[0], channels, *hw)
    acc = _acc(x.dtype)
    y = (x.new_empty(shape).contiguous(memory_format=torch.channels_last)
         if save_pre or spec.mode == "train" else empty(x))
    running = (x.new_empty((2, channels), dtype=acc)
               if spec.mode == "train" and running_mean is not None else x.new_empty(0, dtype=acc))
    return (x.new_empty(shape).contiguous(memory_format=_out_format(x)), y,
            x.new_empty((4, channels), dtype=acc), running)


@torch.library.custom_op("fastgen::conv_bn_act", mutates_args=())
def _conv_bn_act_op(x: Tensor, weight: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None,
                    running_mean: Tensor | None, running_var: Tensor | None, stride: list[int],
                    padding: list[int], output_padding: list[int], transposed: bool,
                    training: bool, momentum: float, eps: float, activation: str,
                    negative_slope: float, save_pre: bool, process_group: str = ""
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, y, coef, new running statistics): y is empty in eval without ``save_pre``, the
    running statistics when not training or without buffers. Buffers are not written.
    ``process_group``: the group name of a synchronized BN ("": none; :mod:`fastgen.ops.sync_bn`)."""
    spec = _spec(stride, padding, output_padding, transposed, "train" if training else "eval",
                 momentum, eps, activation, negative_slope, process_group)
    return _conv_forward(x, weight, bn_weight, bn_bias, running_mean, running_var, spec, save_pre)


@_conv_bn_act_op.register_fake
def _(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, output_padding,
      transposed, training, momentum, eps, activation, negative_slope, save_pre, process_group=""):
    spec = _spec(stride, padding, output_padding, transposed, "train" if training else "eval",
                 momentum, eps, activation, negative_slope)
    return _conv_forward_fake(x, weight, running_mean, spec, save_pre)


@torch.library.custom_op("fastgen::conv_bias_act", mutates_args=())
def _conv_bias_act_op(x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int],
                      padding: list[int], output_padding: list[int], transposed: bool,
                      activation: str, negative_slope: float, save_pre: bool
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """(out, y, coef): y (the conv output before the bias) empty without ``save_pre``."""
    spec = _spec(stride, padding, output_padding, transposed, "bias", 0.0, 0.0, activation,
                 negative_slope)
    return _conv_forward(x, weight, None, bias, None, None, spec, save_pre)[:3]


@_conv_bias_act_op.register_fake
def _(x, weight, bias, stride, padding, output_padding, transposed, activation, negative_slope,
      save_pre):
    spec = _spec(stride, padding, output_padding, transposed, "bias", 0.0, 0.0, activation,
                 negative_slope)
    return _conv_forward_fake(x, weight, None, spec, save_pre)[:3]


@torch.library.custom_op("fastgen::conv_bn_act_backward", mutates_args=())
def _conv_backward_op(grad_out: Tensor, x: Tensor, weight: Tensor, y: Tensor, coef: Tensor,
                      bn_weight: Tensor | None, bn_bias: Tensor | None, stride: list[int],
                      padding: list[int], output_padding: list[int], transposed: bool, mode: str,
                      eps: float, activation: str, negative_slope: float,
                      output_mask: list[bool], process_group: str = ""
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dw, dgamma, dbeta) of conv_bn_act ("train" / "eval") or conv_bias_act ("bias":
    bn_bias is the conv bias, dbeta its gradient); empty where ``output_mask`` is False."""
    spec = _spec(stride, padding, output_padding, transposed, mode, 0.0, eps, activation,
                 negative_slope, process_group)
    mask = tuple(output_mask)

    def triton_path():
        key = _conv_key(x, weight, spec, _per_sample(bn_weight, bn_bias))
        implementation = CONV_IMPLEMENTATION_TUNER.chosen.get(
            (x.device.index, key), CONV_IMPLEMENTATION_TUNER.interpreter)
        return _backward_triton(implementation, grad_out, x, weight, _nhwc(y), coef, bn_weight,
                                bn_bias, spec, mask)

    grads = backend.dispatch(
        "conv_bn_act", (grad_out, x, weight), triton_path,
        lambda: _backward_reference(grad_out, x, weight, _nhwc(y), coef, bn_weight, bn_bias, spec, mask))
    return _backward_outputs(grads, x, weight, bn_weight, bn_bias, output_mask)


@_conv_backward_op.register_fake
def _(grad_out, x, weight, y, coef, bn_weight, bn_bias, stride, padding, output_padding, transposed,
      mode, eps, activation, negative_slope, output_mask, process_group=""):
    return _backward_fake(x, weight, bn_weight, bn_bias, output_mask)


def _conv_setup(ctx, inputs, output, mode: str) -> None:
    record_backend(ctx)
    if mode == "bias":
        x, weight, bias, stride, padding, output_padding, transposed, activation, slope, _ = inputs
        gamma, beta, eps, group = None, bias, 0.0, ""
    else:
        (x, weight, gamma, beta, _, _, stride, padding, output_padding, transposed, training, _,
         eps, activation, slope, _, group) = inputs
        mode = "train" if training else "eval"
    ctx.mark_non_differentiable(*output[1:])
    ctx.args = (stride, padding, output_padding, transposed, mode, eps, activation, slope)
    ctx.group = group
    ctx.save_for_backward(x, weight, output[1], output[2], gamma, beta)


def _conv_backward(ctx, grad_out: Tensor, *_):
    x, weight, y, coef, gamma, beta = ctx.saved_tensors
    mode = ctx.args[4]
    needs = ctx.needs_input_grad
    if mode == "bias":
        mask = [needs[0], needs[1], False, needs[2]]
    else:
        mask = [needs[0], needs[1], needs[2], needs[3]]
    with forward_backend(ctx):
        grads = _conv_backward_op(grad_out, x, weight, y, coef, gamma, beta, *ctx.args, mask,
                                  ctx.group)
    dx, dw, dgamma, dbeta = (none_if_empty(g) for g in grads)
    if mode == "bias":
        return dx, dw, dbeta, None, None, None, None, None, None, None
    return dx, dw, dgamma, dbeta, *([None] * 13)


def _no_sync_double_backward(spec: _Spec, op: str) -> None:
    if spec.group:  # the reference's second derivatives hold the local batch's statistics
        raise NotImplementedError(f"fastgen.{op}: second derivatives through a synchronized "
                                  "BatchNorm are not supported")


def _conv_backward_setup(ctx, inputs, output) -> None:
    grad_out, x, weight, y, coef, gamma, beta, *args, _, group = inputs
    ctx.spec = _spec(*args[:4], args[4], 0.0, *args[5:], group)
    ctx.save_for_backward(grad_out, x, weight, coef, gamma, beta)


def _conv_double_backward(ctx, gg_x: Tensor, gg_w: Tensor, gg_gamma: Tensor, gg_beta: Tensor):
    grad_out, x, weight, coef, gamma, beta = ctx.saved_tensors
    spec = ctx.spec
    _no_sync_double_backward(spec, "conv_bn_act")
    d_x, d_w, d_gamma, d_beta, d_grad_out = reference_double_backward(
        lambda x_, w_, g_, b_: _bn_act_reference(_conv_torch(x_, w_, spec), coef, g_, b_, spec),
        (x, weight, gamma, beta), (grad_out,),
        tuple(none_if_empty(g) for g in (gg_x, gg_w, gg_gamma, gg_beta)), "conv_bn_act")
    return d_grad_out, d_x, d_w, None, None, d_gamma, d_beta, *([None] * 10)


_conv_bn_act_op.register_autograd(
    _conv_backward, setup_context=lambda ctx, inputs, output: _conv_setup(ctx, inputs, output, "bn"))
_conv_bias_act_op.register_autograd(
    _conv_backward, setup_context=lambda ctx, inputs, output: _conv_setup(ctx, inputs, output, "bias"))
_conv_backward_op.register_autograd(_conv_double_backward, setup_context=_conv_backward_setup)


@torch.library.custom_op("fastgen::bn_act", mutates_args=())
def _bn_act_op(x: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None,
               running_mean: Tensor | None, running_var: Tensor | None, training: bool,
               momentum: float, eps: float, activation: str, negative_slope: float,
               process_group: str = "") -> tuple[Tensor, Tensor, Tensor]:
    """(out, coef, new running statistics or empty) of BN + activation (buffers not written);
    ``process_group`` as for conv_bn_act."""
    spec = _bn_spec(training, momentum, eps, activation, negative_slope, process_group)

    def triton_path():
        x_nhwc = _nhwc(x)
        if spec.mode == "eval":
            coef = _folded_coef(spec, *_coef_affine(bn_weight, bn_bias), running_mean, running_var,
                                x.shape[1], x)
            out = _library.conv_bn_act.bn_act_apply(
                x_nhwc, coef, spec.act_code, negative_slope, _channels_last_out(x),
                _sample_affine(bn_weight, bn_bias, *x.shape[:2], x))
            return out, None, coef, None
        return _apply_batch_stats(x_nhwc, _library.conv_bn_act.bn_partial_stats(x_nhwc), bn_weight,
                                  bn_bias, running_mean, running_var, spec, _channels_last_out(x))

    out, _, coef, running = backend.dispatch(
        "bn_act", (x,), triton_path,
        lambda: _forward_reference(x, None, bn_weight, bn_bias, running_mean, running_var, spec))
    return out, coef, empty(coef) if running is None else running


def _bn_spec(training: bool, momentum: float, eps: float, activation: str,
             negative_slope: float, group: str = "") -> _Spec:
    return _Spec((1, 1), (0, 0), (0, 0), False, "train" if training else "eval", momentum, eps,
                 activation, negative_slope, group)


@_bn_act_op.register_fake
def _(x, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, activation,
      negative_slope, process_group=""):
    acc = _acc(x.dtype)
    channels = x.shape[1]
    running = (x.new_empty((2, channels), dtype=acc) if training and running_mean is not None
               else x.new_empty(0, dtype=acc))
    return (x.new_empty(x.shape).contiguous(memory_format=_out_format(x)),
            x.new_empty((4, channels), dtype=acc), running)


@torch.library.custom_op("fastgen::bn_act_backward", mutates_args=())
def _bn_act_backward_op(grad_out: Tensor, x: Tensor, coef: Tensor, bn_weight: Tensor | None,
                        bn_bias: Tensor | None, training: bool, eps: float, activation: str,
                        negative_slope: float, output_mask: list[bool], process_group: str = ""
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dgamma, dbeta) of bn_act; empty where ``output_mask`` is False."""
    spec = _bn_spec(training, 0.0, eps, activation, negative_slope, process_group)
    mask = (output_mask[0], False, *output_mask[1:])

    def triton_path():
        kernels = _library.conv_bn_act
        dout, x_nhwc = _nhwc(grad_out.to(x.dtype)), _nhwc(x)
        grad_coef, affine, grads = _grad_coef(dout, x_nhwc, coef, bn_weight, bn_bias, spec, mask)
        dx = None
        if mask[0]:
            dx = _nchw_view(kernels.bn_act_input_grad(dout, x_nhwc, grad_coef, spec.act_code,
                                                      negative_slope, affine))
        return (dx, None, *grads)

    grads = backend.dispatch(
        "bn_act", (grad_out, x), triton_path,
        lambda: _backward_reference(grad_out, x, None, _nhwc(x), coef, bn_weight, bn_bias, spec, mask))
    dx, _, dgamma, dbeta = _backward_outputs(grads, x, None, bn_weight, bn_bias, list(mask))
    return dx, dgamma, dbeta


@_bn_act_backward_op.register_fake
def _(grad_out, x, coef, bn_weight, bn_bias, training, eps, activation, negative_slope, output_mask,
      process_group=""):
    dx, _, dgamma, dbeta = _backward_fake(x, None, bn_weight, bn_bias,
                                          [output_mask[0], False, *output_mask[1:]])
    return dx, dgamma, dbeta


def _bn_act_setup(ctx, inputs, output) -> None:
    record_backend(ctx)
    x, gamma, beta, _, _, training, _, eps, activation, slope, group = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.args = (training, eps, activation, slope)
    ctx.group = group
    ctx.save_for_backward(x, output[1], gamma, beta)


def _bn_act_backward(ctx, grad_out: Tensor, *_):
    x, coef, gamma, beta = ctx.saved_tensors
    with forward_backend(ctx):
        grads = _bn_act_backward_op(grad_out, x, coef, gamma, beta, *ctx.args,
                                    list(ctx.needs_input_grad[:3]), ctx.group)
    return (*(none_if_empty(g) for g in grads), *([None] * 8))


def _bn_act_backward_setup(ctx, inputs, output) -> None:
    grad_out, x, coef, gamma, beta, training, eps, activation, slope, _, group = inputs
    ctx.spec = _bn_spec(training, 0.0, eps, activation, slope, group)
    ctx.save_for_backward(grad_out, x, coef, gamma, beta)


def _bn_act_double_backward(ctx, gg_x: Tensor, gg_gamma: Tensor, gg_beta: Tensor):
    grad_out, x, coef, gamma, beta = ctx.saved_tensors
    _no_sync_double_backward(ctx.spec, "bn_act")
    d_x, d_gamma, d_beta, d_grad_out = reference_double_backward(
        lambda x_, g_, b_: _bn_act_reference(x_, coef, g_, b_, ctx.spec), (x, gamma, beta),
        (grad_out,), tuple(none_if_empty(g) for g in (gg_x, gg_gamma, gg_beta)), "bn_act")
    return d_grad_out, d_x, None, d_gamma, d_beta, *([None] * 6)


_bn_act_op.register_autograd(_bn_act_backward, setup_context=_bn_act_setup)
_bn_act_backward_op.register_autograd(_bn_act_double_backward, setup_context=_bn_act_backward_setup)


@torch.library.custom_op("fastgen::update_running_stats",
                         mutates_args=("running_mean", "running_var"))
def _update_running_stats(running_mean: Tensor, running_var: Tensor, new: Tensor) -> None:
    """Copies a forward op's new running statistics ``new`` (2, C) into the BN buffers."""
    running_mean.copy_(new[0])
    running_var.copy_(new[1])


@_update_running_stats.register_fake
def _(running_mean, running_var, new) -> None:
    return None


def _store_running(running_mean: Tensor | None, running_var: Tensor | None, new: Tensor) -> None:
    if running_mean is not None and new.numel():
        _update_running_stats(running_mean, running_var, new)


# ----------------------------------------------------------------------------------------------
# Public functions


def _check_bn(x_name: str, x: Tensor, out_shape: tuple[int, ...], training: bool,
              bn_weight: Tensor | None, bn_bias: Tensor | None, running_mean: Tensor | None,
              running_var: Tensor | None, momentum: float, eps: float) -> None:
    """BN checks shared by conv_bn_act and bn_act; ``out_shape`` is the BN input's shape."""
    _checks.channel_vectors(out_shape[1], running_mean=running_mean, running_var=running_var)
    for name, param in (("bn_weight", bn_weight), ("bn_bias", bn_bias)):
        if param is not None:
            _checks.tensor(name, param)
            if param.shape not in ((out_shape[1],), tuple(out_shape[:2])):
                raise ValueError(f"{name}: expected shape ({out_shape[1]},) (per channel) or "
                                 f"{tuple(out_shape[:2])} (per sample), got {tuple(param.shape)}")
    present = {x_name: x, **{name: v for name, v in (("bn_weight", bn_weight), ("bn_bias", bn_bias),
               ("running_mean", running_mean), ("running_var", running_var)) if v is not None}}
    _checks.same_device(**present)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean, running_var: pass both or neither")
    if not training and running_mean is None:
        raise ValueError("running_mean, running_var: eval mode (training=False) needs running statistics")
    if training and out_shape[0] * out_shape[2] * out_shape[3] <= 1:
        # PyTorch's own message (torch.nn.functional._verify_batch_size)
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{torch.Size(out_shape)}")
    _checks.unit_interval("momentum", momentum, closed=True)
    if not eps > 0.0:
        raise ValueError(f"eps: expected a positive value, got {eps!r}")


def _check_conv(x: Tensor, weight: Tensor, stride: int | tuple[int, int],
                padding: int | tuple[int, int], output_padding: int | tuple[int, int],
                transposed: bool) -> tuple[tuple[list[int], list[int], list[int]], tuple[int, ...]]:
    """Conv checks; returns (stride, padding, output_padding) as lists and the output shape."""
    _checks.four_d("x", x)
    _checks.four_d("weight", weight)
    _checks.same_device(x=x, weight=weight)
    _checks.same_dtype(x=x, weight=weight)
    stride = _checks.pair("stride", stride, 1)
    padding = _checks.pair("padding", padding, 0)
    output_padding = _checks.pair("output_padding", output_padding, 0)
    if not transposed and output_padding != [0, 0]:
        raise ValueError(f"output_padding: only a transposed conv takes it, got {tuple(output_padding)!r}")
    if any(o >= s for o, s in zip(output_padding, stride)):
        raise ValueError(f"output_padding: must be smaller than stride {tuple(stride)}, "
                         f"got {tuple(output_padding)}")
    in_channels, out_channels = weight.shape[:2] if transposed else weight.shape[1::-1]
    if x.shape[1] != in_channels:
        raise ValueError(f"x: expected {in_channels} channels (weight {tuple(weight.shape)}), "
                         f"got {x.shape[1]}")
    out_hw = conv_out_hw(tuple(x.shape[2:]), tuple(weight.shape[2:]), stride, padding,
                         output_padding, transposed)
    if min(out_hw) < 1:
        raise ValueError(f"x: spatial size {tuple(x.shape[2:])} is too small for kernel "
                         f"{tuple(weight.shape[2:])} with padding {tuple(padding)}: output {out_hw}")
    return (stride, padding, output_padding), (x.shape[0], out_channels, *out_hw)


def _autocast_inputs(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """The tensors (x first: a conv's inputs) in torch.autocast's dtype when autocast is on for
    x's device, as autocast casts F.conv2d's inputs (BN parameters and running statistics are not
    passed here: they stay float32). A custom op is not autocast by itself, so fused layers would
    otherwise run a mixed-precision model in fp32."""
    x = tensors[0]
    if not isinstance(x, Tensor):
        return tensors  # the checks that follow name the bad argument
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return tuple(t.to(dtype) if isinstance(t, Tensor) else t for t in tensors)
    return tensors


def _sync_group(process_group: object | None, training: bool) -> str:
    """The ops' process_group argument: a group name in training only (eval BN uses running
    statistics, nothing to synchronize)."""
    name = sync_bn.group_name(process_group)
    return name if training else ""


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def conv_bn_act(x: Tensor, weight: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None,
                running_mean: Tensor | None, running_var: Tensor | None, *,
                stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                output_padding: int | tuple[int, int] = 0, transposed: bool = False,
                training: bool = True, momentum: float = 0.1, eps: float = 1e-5,
                activation: str = "relu", negative_slope: float = 0.2,
                process_group: object | None = None) -> Tensor:
    """Conv2d (or ConvTranspose2d), no bias, then BatchNorm2d, then an activation, fused
    (``torch.ops.fastgen.conv_bn_act``).

    The numbers of ``nn.Sequential(nn.Conv2d(..., bias=False) or nn.ConvTranspose2d(...,
    bias=False), nn.BatchNorm2d(C_out), act)``; in training mode ``running_mean``/``running_var``
    are updated in place (momentum, unbiased variance) as torch does. Training: an implicit-GEMM
    conv storing the pre-BN output and per-tile statistics, a deterministic combine, one
    normalize + activate pass. Eval: one launch, BN folded into the conv's epilogue. On CUDA,
    where cuDNN's conv with the fused BN passes around it is timed faster for a shape, that runs
    instead (``CONV_IMPLEMENTATIONS``; ``FASTGEN_AUTOTUNE=0`` keeps the fused kernels).
    Differentiable twice (gradient penalties); the second derivatives are the reference's.

    Args:
        x: ``(N, C_in, H, W)``, float32 / float16 / bfloat16 (float64 runs too), any memory format.
        weight: ``(C_out, C_in, kH, kW)`` for a conv, ``(C_in, C_out, kH, kW)`` when
            ``transposed``; x's dtype and device. Groups and dilation are not supported.
        bn_weight, bn_bias: BN affine parameters, or None for no affine transform: ``(C_out,)``
            per channel, or ``(N, C_out)`` per sample (class-conditional BN, BigGAN:
            ``z[n, c] = xhat[n, c] * bn_weight[n, c] + bn_bias[n, c]``, the scale taken as
            given: BigGAN's ``1 + embedding`` is the caller's). One may be per sample and the
            other per channel. A per-sample layer runs the conv and the BN passes apart (its
            affine cannot be folded into the GEMM), and its gradients are per sample.
        running_mean, running_var: ``(C_out,)`` float buffers, or None (training only).
        stride, padding, output_padding: ints or pairs; output_padding only when ``transposed``
            and smaller than stride.
        training: batch statistics (and running-stat update) or running statistics.
        activation: "identity", "relu", "leaky_relu" (``negative_slope``), "tanh" or "sigmoid".
        process_group: a ``torch.distributed`` ProcessGroup: in training, the batch statistics
            (and the running-statistics update) are those of every rank's batch together, and
            dL/dx uses their global means (:mod:`fastgen.ops.sync_bn`); every rank of the group
            must call. None, or a group of one rank: this rank's batch alone.

    Returns:
        ``(N, C_out, H_out, W_out)`` in x's dtype and memory format (channels_last in,
        channels_last out; otherwise contiguous). Under ``torch.autocast``, x and weight are
        first cast to the autocast dtype, as for ``F.conv2d``.
    """
    x, weight = _autocast_inputs(x, weight)
    geometry, out_shape = _check_conv(x, weight, stride, padding, output_padding, transposed)
    _check_bn("x", x, out_shape, training, bn_weight, bn_bias, running_mean, running_var, momentum, eps)
    activations.check_activation(activation)
    out, _, _, running = _conv_bn_act_op(
        x, weight, bn_weight, bn_bias, running_mean, running_var, *geometry, transposed, training,
        float(momentum), float(eps), activation, float(negative_slope),
        _needs_grad(x, weight, bn_weight, bn_bias), _sync_group(process_group, training))
    _store_running(running_mean, running_var, running)
    return out


def conv_bias_act(x: Tensor, weight: Tensor, bias: Tensor | None, *,
                  stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                  output_padding: int | tuple[int, int] = 0, transposed: bool = False,
                  activation: str = "relu", negative_slope: float = 0.2) -> Tensor:
    """Conv2d (or ConvTranspose2d) + optional bias + activation in one launch (a layer without BN:
    a DCGAN discriminator's first layer, the generator's Tanh output;
    ``torch.ops.fastgen.conv_bias_act``).

    Args as :func:`conv_bn_act`; ``bias``: ``(C_out,)`` or None. Backward recomputes the
    activation from the saved conv output. Differentiable twice.

    Returns:
        ``(N, C_out, H_out, W_out)`` in x's dtype.
    """
    x, weight = _autocast_inputs(x, weight)
    geometry, out_shape = _check_conv(x, weight, stride, padding, output_padding, transposed)
    _checks.channel_vectors(out_shape[1], bias=bias)
    if bias is not None:
        _checks.same_device(x=x, bias=bias)
    activations.check_activation(activation)
    return _conv_bias_act_op(x, weight, bias, *geometry, transposed, activation,
                             float(negative_slope), _needs_grad(x, weight, bias))[0]


def bn_act(x: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None,
           running_mean: Tensor | None, running_var: Tensor | None, *, training: bool = True,
           momentum: float = 0.1, eps: float = 1e-5, activation: str = "relu",
           negative_slope: float = 0.2, process_group: object | None = None) -> Tensor:
    """BatchNorm2d + activation (conv_bn_act without the conv; ``torch.ops.fastgen.bn_act``):
    statistics, combine and apply passes in training, one pass in eval; running statistics
    updated in place as torch does. Differentiable twice.

    Args:
        x: ``(N, C, H, W)``, floating, any memory format. Other arguments (``bn_weight``,
            ``bn_bias``: ``(C,)`` per channel or ``(N, C)`` per sample, class-conditional BN;
            ``process_group``: synchronized BN) as :func:`conv_bn_act`.

    Returns:
        ``(N, C, H, W)`` in x's dtype.
    """
    _checks.four_d("x", x)
    _check_bn("x", x, tuple(x.shape), training, bn_weight, bn_bias, running_mean, running_var,
              momentum, eps)
    activations.check_activation(activation)
    out, _, running = _bn_act_op(x, bn_weight, bn_bias, running_mean, running_var, training,
                                 float(momentum), float(eps), activation, float(negative_slope),
                                 _sync_group(process_group, training))
    _store_running(running_mean, running_var, running)
    return out
