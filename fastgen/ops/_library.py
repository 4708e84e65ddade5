"""What every op family shares: the one guarded import of the Triton kernels, and the helpers of
the ``torch.library`` registration (absent outputs, second-order gradients).

Each fused op is a ``torch.library.custom_op`` in the namespace ``fastgen`` whose body picks the
backend (:func:`fastgen.backend.dispatch`) at run time: a traced graph holds ``fastgen.*`` ops
whatever the device and backend. Its backward is a registered op too, whose own autograd formula
differentiates the reference (:func:`reference_double_backward`), so ``create_graph=True``
(gradient penalties) gives the reference's second derivatives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fastgen import backend

if backend.triton_available():
    from fastgen.kernels import bce, conv_bn_act, modconv, reparam
else:  # fastgen imports and trains without triton: the reference path only
    bce = conv_bn_act = modconv = reparam = None


def empty(like: Tensor) -> Tensor:
    """The stand-in for an output an op does not produce (a custom op cannot return None)."""
    return like.new_empty(0)


def none_if_empty(t: Tensor) -> Tensor | None:
    return None if t.numel() == 0 else t


def record_backend(ctx) -> None:
    """In an op's setup_context: remember the backend its forward ran under."""
    ctx.backend = backend.get_backend()


def forward_backend(ctx) -> contextlib.AbstractContextManager:
    """In an op's backward: run under the forward's backend. Autograd may run a backward on
    another thread (one per CUDA device), where the forward's ``use_backend`` context is absent."""
    return backend.use_backend(ctx.backend)


def reference_double_backward(forward: Callable[..., Tensor | tuple[Tensor, ...]],
                              primals: Sequence[Tensor | None], grad_outputs: Sequence[Tensor],
                              grads_of_grads: Sequence[Tensor | None], op: str
                              ) -> tuple[Tensor | None, ...]:
    """The autograd formula of a backward op, from the reference.

    A backward op maps (primals, grad_outputs) to ``g = d<forward(primals), grad_outputs>/d
    primals``. Given the gradients of the loss with respect to g (``grads_of_grads``, one per
    primal, None where g was unused), this returns that loss's gradients with respect to every
    primal and every grad_output (None where zero): second derivatives of the reference, which
    computes the same function as the fused kernels.

    Third derivatives (``create_graph=True`` through this formula) would be silently zero, since
    the reference is rebuilt on detached copies: they raise instead.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(f"fastgen.{op}: third-order derivatives through a fused op are not "
                           "supported; run that pass under fastgen.use_backend('reference') "
                           "without the fused ops")
    with torch.enable_grad():
        leaves = [None if p is None else p.detach().requires_grad_(p.is_floating_point())
                  for p in primals]
        grad_leaves = [g.detach().requires_grad_() for g in grad_outputs]
        outputs = forward(*leaves)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        wrt = [(i, p) for i, p in enumerate(leaves) if p is not None and p.requires_grad]
        firsts = torch.autograd.grad(outputs, [p for _, p in wrt], grad_leaves, create_graph=True,
                                     allow_unused=True)
        pairs = [(first, grads_of_grads[i]) for (i, _), first in zip(wrt, firsts)
                 if first is not None and first.requires_grad and grads_of_grads[i] is not None]
        if not pairs:
            return (None,) * (len(primals) + len(grad_outputs))
        seconds = torch.autograd.grad([f for f, _ in pairs], [p for _, p in wrt] + grad_leaves,
                                      [g for _, g in pairs], allow_unused=True)
    by_primal = {i: s for (i, _), s in zip(wrt, seconds)}
    return (*(by_primal.get(i) for i in range(len(primals))), *seconds[len(wrt):])
