"""The reparameterization sampler and the diagonal-Gaussian log-density:
``torch.ops.fastgen.reparameterize`` and ``torch.ops.fastgen.log_normal_diag``, their backward
ops, and the public functions.

The noise comes from Philox inside the kernels, keyed by an int64 device tensor
``seed_offset = (key, first counter)`` that the public function draws with ``torch.randint`` from
torch's generator: no host read, so a training step can be captured in a CUDA graph, and
``torch.manual_seed`` repeats a run. The backward regenerates eps from the same tensor instead of
storing it. The reference path draws its eps with ``torch.randn`` from a generator seeded by the
same key (other numbers, the same distribution; it reads the key on the host).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastgen import backend, reference
from fastgen.ops import _checks, _library
from fastgen.ops._library import (empty, forward_backend, none_if_empty, record_backend,
                                  reference_double_backward)

__all__ = ["reparameterize", "log_normal_diag"]

# Keys are drawn below 2**62: one kernel signature (int64), and distinct calls collide with
# probability 2**-62.
_KEY_BOUND = 2**62


def _seed_offset(generator: torch.Generator | None, device: torch.device) -> Tensor:
    """A fresh (key, first counter = 0) int64 tensor on ``device``, drawn from ``generator``
    (the default one when None) by a device-side random op: capturable, repeatable."""
    key = torch.randint(_KEY_BOUND, (1,), generator=generator, device=device, dtype=torch.int64)
    return torch.cat([key, torch.zeros_like(key)])


def _reference_noise(mu: Tensor, samples: int, seed_offset: Tensor) -> Tensor:
    """The reference path's eps: ``torch.randn`` from a generator seeded by (key, counter)."""
    shape = (samples, *mu.shape) if samples > 1 else mu.shape
    seed = hash(tuple(seed_offset.tolist())) & (2**63 - 1)  # ints hash to themselves: repeatable
    generator = torch.Generator(device=mu.device).manual_seed(seed)
    return torch.randn(shape, generator=generator, device=mu.device, dtype=mu.dtype)


def _fused_or_reference(fused: bool, triton_impl, reference_impl):
    """A step of the backward on the forward's path. The two paths draw different noise, so the
    backward of a fused forward has no reference fallback: a failure raises (after "auto" has
    remembered it), never gradients for another eps."""
    if fused:
        return backend.guard("reparameterize", triton_impl)
    return reference_impl()


def _noise(mu: Tensor, samples: int, seed_offset: Tensor, fused: bool) -> Tensor:
    """The eps a call with this ``seed_offset`` used on its path (the fused forward with mu = 0,
    logvar = 0 returns exactly its eps)."""
    zeros = torch.zeros_like(mu)
    return _fused_or_reference(
        fused, lambda: _library.reparam.reparameterize_forward(zeros, zeros, samples, seed_offset)[0],
        lambda: _reference_noise(mu, samples, seed_offset))


@torch.library.custom_op("fastgen::reparameterize", mutates_args=())
def _reparam_op(mu: Tensor, logvar: Tensor, seed_offset: Tensor, samples: int) -> tuple[Tensor, Tensor]:
    """(z, kl) for eps drawn at ``seed_offset``."""
    mu, logvar = mu.contiguous(), logvar.contiguous()
    return backend.dispatch(
        "reparameterize", (mu, logvar, seed_offset),
        lambda: _library.reparam.reparameterize_forward(mu, logvar, samples, seed_offset),
        lambda: reference.reparameterize_with_noise(mu, logvar, _reference_noise(mu, samples, seed_offset)))


@_reparam_op.register_fake
def _(mu, logvar, seed_offset, samples):
    shape = (samples, *mu.shape) if samples > 1 else mu.shape
    return mu.new_empty(shape), mu.new_empty(mu.shape[0])


@torch.library.custom_op("fastgen::reparameterize_backward", mutates_args=())
def _reparam_backward_op(mu: Tensor, logvar: Tensor, grad_z: Tensor | None, grad_kl: Tensor | None,
                         seed_offset: Tensor, samples: int, fused: bool) -> tuple[Tensor, Tensor]:
    """(dmu, dlogvar), regenerating the forward's eps on the forward's path (``fused``); a None
    gradient skips its term."""
    mu, logvar = mu.contiguous(), logvar.contiguous()
    grad_z = None if grad_z is None else grad_z.contiguous()
    grad_kl = None if grad_kl is None else grad_kl.contiguous()

    def ref() -> tuple[Tensor, Tensor]:
        eps = _reference_noise(mu, samples, seed_offset)
        return _reparam_vjp(mu, logvar, eps, grad_z, grad_kl)

    return _fused_or_reference(
        fused,
        lambda: _library.reparam.reparameterize_backward(mu, logvar, grad_z, grad_kl, samples, seed_offset),
        ref)


@_reparam_backward_op.register_fake
def _(mu, logvar, grad_z, grad_kl, seed_offset, samples, fused):
    return torch.empty_like(mu), torch.empty_like(mu)


def _sum_samples(t: Tensor) -> Tensor:
    """(S, B, D) -> (B, D) summed over the samples; (B, D) as it is."""
    return t.sum(0) if t.dim() == 3 else t


def _reparam_vjp(mu: Tensor, logvar: Tensor, eps: Tensor, grad_z: Tensor | None,
                 grad_kl: Tensor | None) -> tuple[Tensor, Tensor]:
    """The reference's (dmu, dlogvar) for known noise, in closed form (no autograd inside an op):
    dmu = sum_s dz + dkl mu, dlogvar = [sum_s dz eps std / 2 + dkl (exp(logvar) - 1) / 2] where
    logvar < LOGVAR_MAX (the clamp's zero gradient above)."""
    lv = logvar.clamp(max=reference.LOGVAR_MAX)
    grad_mu, grad_lv = torch.zeros_like(mu), torch.zeros_like(mu)
    if grad_z is not None:
        grad_mu = grad_mu + _sum_samples(grad_z)
        grad_lv = grad_lv + _sum_samples(grad_z * eps) * (0.5 * torch.exp(0.5 * lv))
    if grad_kl is not None:
        grad_mu = grad_mu + grad_kl[:, None] * mu
        grad_lv = grad_lv + grad_kl[:, None] * (0.5 * torch.expm1(lv))
    return grad_mu, torch.where(logvar <= reference.LOGVAR_MAX, grad_lv, 0.0)


def _reparam_setup(ctx, inputs, output) -> None:
    record_backend(ctx)
    mu, logvar, seed_offset, ctx.samples = inputs
    ctx.fused = backend.chooses_triton("reparameterize", (mu, logvar, seed_offset))
    ctx.save_for_backward(mu, logvar, seed_offset)
    # An unused output gets None, not zeros: the kernel then skips that term (and the RNG).
    ctx.set_materialize_grads(False)


def _reparam_backward(ctx, grad_z: Tensor | None, grad_kl: Tensor | None):
    if grad_z is None and grad_kl is None:
        return None, None, None, None
    mu, logvar, seed_offset = ctx.saved_tensors
    with forward_backend(ctx):
        grad_mu, grad_logvar = _reparam_backward_op(mu, logvar, grad_z, grad_kl, seed_offset,
                                                    ctx.samples, ctx.fused)
    return grad_mu, grad_logvar, None, None


def _reparam_backward_setup(ctx, inputs, output) -> None:
    record_backend(ctx)
    mu, logvar, grad_z, grad_kl, seed_offset, ctx.samples, ctx.fused = inputs
    ctx.save_for_backward(mu, logvar, grad_z, grad_kl, seed_offset)


def _reparam_double_backward(ctx, gg_mu: Tensor, gg_logvar: Tensor):
    mu, logvar, grad_z, grad_kl, seed_offset = ctx.saved_tensors
    with forward_backend(ctx):
        eps = _noise(mu, ctx.samples, seed_offset, ctx.fused)
    shapes = ((ctx.samples, *mu.shape) if ctx.samples > 1 else mu.shape, mu.shape[:1])
    grads = [torch.zeros(s, dtype=mu.dtype, device=mu.device) if g is None else g
             for g, s in zip((grad_z, grad_kl), shapes)]
    d_mu, d_logvar, d_grad_z, d_grad_kl = reference_double_backward(
        lambda m, lv: reference.reparameterize_with_noise(m, lv, eps), (mu, logvar), grads,
        (gg_mu, gg_logvar), "reparameterize")
    return (d_mu, d_logvar, None if grad_z is None else d_grad_z,
            None if grad_kl is None else d_grad_kl, None, None, None)


_reparam_op.register_autograd(_reparam_backward, setup_context=_reparam_setup)
_reparam_backward_op.register_autograd(_reparam_double_backward, setup_context=_reparam_backward_setup)


def _check_gaussian(mu: Tensor, logvar: Tensor) -> None:
    _checks.tensor("mu", mu)
    _checks.tensor("logvar", logvar)
    if mu.dim() != 2:
        raise ValueError(f"mu: expected shape (B, D) (rank 2), got shape {tuple(mu.shape)}")
    if logvar.shape != mu.shape:
        raise ValueError(f"logvar: expected the shape of mu {tuple(mu.shape)}, got {tuple(logvar.shape)}")
    _checks.same_device(mu=mu, logvar=logvar)
    _checks.same_dtype(mu=mu, logvar=logvar)


def reparameterize(mu: Tensor, logvar: Tensor, *, samples: int = 1,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Draw ``z = mu + exp(0.5 * logvar) * eps``, ``eps ~ N(0, I)``, and the KL term to N(0, I)
    (``torch.ops.fastgen.reparameterize``).

    One kernel launch forward, one backward; eps is never stored: the backward regenerates it
    from the Philox key of the forward, a device tensor drawn from ``generator`` (so the call can
    be captured in a CUDA graph). logvar is clamped at 80 (zero gradient above), so logvar in
    [-80, 80] gives finite z, KL and gradients (fp32 math; fp16 outputs overflow where values
    pass 65504). Differentiable twice.

    Args:
        mu, logvar: ``(B, D)``, one floating dtype (float32 / float16 / bfloat16; float64 runs in
            float64), one device.
        samples: draws per row, >= 1; ``samples > 1`` gives z a leading sample dimension (IWAE).
        generator: where the noise's key comes from: a generator on mu's device type, or None
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
    return _reparam_op(mu, logvar, _seed_offset(generator, mu.device), samples)


@torch.library.custom_op("fastgen::log_normal_diag", mutates_args=())
def _log_normal_op(z: Tensor, mu: Tensor | None, logvar: Tensor | None) -> Tensor:
    z = z.contiguous()
    if mu is not None:
        mu, logvar = mu.contiguous(), logvar.contiguous()
    tensors = (z,) if mu is None else (z, mu, logvar)
    return backend.dispatch("log_normal_diag", tensors,
                            lambda: _library.reparam.log_normal_diag_forward(z, mu, logvar),
                            lambda: reference.log_normal_diag(z, mu, logvar))


@_log_normal_op.register_fake
def _(z, mu, logvar):
    return z.new_empty(z.shape[:-1])


@torch.library.custom_op("fastgen::log_normal_diag_backward", mutates_args=())
def _log_normal_backward_op(grad_out: Tensor, z: Tensor, mu: Tensor | None, logvar: Tensor | None,
                            output_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """(dz, dmu, dlogvar); empty where not asked for or without mu, logvar."""
    z, grad_out = z.contiguous(), grad_out.contiguous()
    if mu is not None:
        mu, logvar = mu.contiguous(), logvar.contiguous()
    tensors = (z, grad_out) if mu is None else (z, grad_out, mu, logvar)

    def ref() -> tuple[Tensor | None, ...]:
        """Closed form (no autograd inside an op): with r = (z - mu) exp(-logvar / 2),
        dz = -g r exp(-logvar / 2), dmu = -sum_s dz, dlogvar = sum_s g (r^2 - 1) / 2 below the clamp."""
        g = grad_out[..., None]
        if mu is None:
            return (-g * z,)
        lv = logvar.clamp(max=reference.LOGVAR_MAX)
        inv_std = torch.exp(-0.5 * lv)
        r = (z - mu) * inv_std
        grad_z = -g * r * inv_std
        grad_lv = _sum_samples(0.5 * g * (r.square() - 1.0))
        return grad_z, -_sum_samples(grad_z), torch.where(logvar <= reference.LOGVAR_MAX, grad_lv, 0.0)

    grads = backend.dispatch(
        "log_normal_diag", tensors,
        lambda: _library.reparam.log_normal_diag_backward(z, mu, logvar, grad_out, output_mask[0]), ref)
    grads = [*grads, None, None][:3]
    return tuple(empty(z) if g is None or not m else g for g, m in zip(grads, output_mask))


@_log_normal_backward_op.register_fake
def _(grad_out, z, mu, logvar, output_mask):
    like = (z, mu, logvar)
    return tuple(torch.empty_like(t) if m and t is not None else empty(z) for t, m in zip(like, output_mask))


def _log_normal_setup(ctx, inputs, output) -> None:
    record_backend(ctx)
    ctx.save_for_backward(*inputs)


def _log_normal_backward(ctx, grad_out: Tensor):
    z, mu, logvar = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], mu is not None and ctx.needs_input_grad[1],
            logvar is not None and ctx.needs_input_grad[2]]
    with forward_backend(ctx):
        grads = _log_normal_backward_op(grad_out, z, mu, logvar, mask)
    return tuple(none_if_empty(g) for g in grads)


def _log_normal_backward_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:4])


def _log_normal_double_backward(ctx, gg_z: Tensor, gg_mu: Tensor, gg_logvar: Tensor):
    grad_out, z, mu, logvar = ctx.saved_tensors
    d_z, d_mu, d_logvar, d_grad_out = reference_double_backward(
        reference.log_normal_diag, (z, mu, logvar), (grad_out,),
        tuple(none_if_empty(g) for g in (gg_z, gg_mu, gg_logvar)), "log_normal_diag")
    return d_grad_out, d_z, d_mu, d_logvar, None


_log_normal_op.register_autograd(_log_normal_backward, setup_context=_log_normal_setup)
_log_normal_backward_op.register_autograd(_log_normal_double_backward,
                                          setup_context=_log_normal_backward_setup)


def log_normal_diag(z: Tensor, mu: Tensor | None = None, logvar: Tensor | None = None) -> Tensor:
    """``log N(z; mu, diag(exp(logvar)))`` summed over the last dimension, in one pass over z
    (``torch.ops.fastgen.log_normal_diag``).

    With z from :func:`reparameterize`, ``log_normal_diag(z)`` is log p(z) under the prior and
    ``log_normal_diag(z, mu, logvar)`` is log q(z|x): the importance weight of an IWAE bound is
    ``log p(x|z) + log_normal_diag(z) - log_normal_diag(z, mu, logvar)``, with no temporary the
    size of z. logvar is clamped at 80 as in :func:`reparameterize`. Differentiable twice.

    Args:
        z: ``(B, D)`` or ``(S, B, D)``, floating.
        mu, logvar: ``(B, D)``, shared by the S samples, z's dtype and device; or both None for
            the standard normal N(0, I).

    Returns:
        ``z.shape[:-1]`` (``(B,)`` or ``(S, B)``) in z's dtype.
    """
    _checks.tensor("z", z)
    if z.dim() not in (2, 3):
        raise ValueError(f"z: expected shape (B, D) or (S, B, D), got shape {tuple(z.shape)}")
    if (mu is None) != (logvar is None):
        raise ValueError("mu, logvar: give both, or neither for the standard normal")
    if mu is not None:
        _check_gaussian(mu, logvar)
        if z.shape[-2:] != mu.shape:
            raise ValueError(f"z: expected shape (..., {mu.shape[0]}, {mu.shape[1]}) to match mu, "
                             f"got {tuple(z.shape)}")
        _checks.same_device(z=z, mu=mu)
        _checks.same_dtype(z=z, mu=mu)
    return _log_normal_op(z, mu, logvar)
