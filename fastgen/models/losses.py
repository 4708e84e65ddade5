"""GAN objectives on discriminator outputs, and the regularizers of the discriminator.

Kinds (:data:`GAN_LOSSES`), with r = D's outputs on real data and f on generated data:

- ``"non_saturating"``: D minimizes ``-mean log sigmoid(r) - mean log(1 - sigmoid(f))``,
  G minimizes ``-mean log sigmoid(f)``;
- ``"minimax"``: the same D loss, G minimizes ``mean log(1 - sigmoid(f))`` (the saturating form);
- ``"hinge"``: D ``mean relu(1 - r) + mean relu(1 + f)``, G ``-mean f``;
- ``"least_squares"`` (LSGAN, targets 0/1): D ``(mean (r - 1)^2 + mean f^2) / 2``,
  G ``mean (f - 1)^2 / 2``;
- ``"wgan_gp"``: D ``mean f - mean r``, G ``-mean f``; add :func:`gradient_penalty` to D's loss.

The two BCE kinds run through fastgen's fused loss ops (:class:`fastgen.nn.GANLoss`: loss,
gradient and the D(x), D(G(z)) means in one pass). The others are a few elementwise ops that
PyTorch already runs as well as a kernel would.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fastgen.nn import GANLoss
from fastgen.reference import DLossOutput, GLossOutput

__all__ = ["GAN_LOSSES", "GANObjective", "gradient_penalty", "r1_penalty"]

GAN_LOSSES = ("non_saturating", "minimax", "hinge", "least_squares", "wgan_gp")
_BCE_LOSSES = ("non_saturating", "minimax")


def _mean_output(t: Tensor) -> Tensor:
    return t.detach().float().mean()


class GANObjective:
    """The D and G losses of one GAN kind (see the module docstring).

    Args:
        kind: one of :data:`GAN_LOSSES`.
        label_smoothing: one-sided smoothing of the real targets, in [0, 1); BCE kinds only.

    ``d_loss`` and ``g_loss`` return :class:`~fastgen.reference.DLossOutput` /
    :class:`~fastgen.reference.GLossOutput`. Their logging fields are the means of
    D = sigmoid(output) for the BCE kinds, and of the raw outputs (critic values) for the others.
    """

    def __init__(self, kind: str = "non_saturating", label_smoothing: float = 0.0) -> None:
        if kind not in GAN_LOSSES:
            raise ValueError(f"loss: expected one of {', '.join(GAN_LOSSES)}, got {kind!r}")
        if label_smoothing and kind not in _BCE_LOSSES:
            raise ValueError(f"label_smoothing: only the {' and '.join(_BCE_LOSSES)} losses take it, "
                             f"got {label_smoothing!r} with {kind!r}")
        self.kind = kind
        self._bce = GANLoss(kind, label_smoothing) if kind in _BCE_LOSSES else None

    def d_loss(self, real: Tensor, fake: Tensor) -> DLossOutput:
        """Discriminator loss on its outputs ``real`` and ``fake`` (any shapes; 0-dim result)."""
        if self._bce is not None:
            return self._bce.d_loss(real, fake)
        if self.kind == "hinge":
            loss = torch.relu(1.0 - real).mean() + torch.relu(1.0 + fake).mean()
        elif self.kind == "least_squares":
            loss = 0.5 * ((real - 1.0).square().mean() + fake.square().mean())
        else:  # wgan_gp
            loss = fake.mean() - real.mean()
        return DLossOutput(loss, _mean_output(real), _mean_output(fake))

    def g_loss(self, fake: Tensor) -> GLossOutput:
        """Generator loss on the discriminator's outputs for generated data (0-dim result)."""
        if self._bce is not None:
            return self._bce.g_loss(fake)
        loss = 0.5 * (fake - 1.0).square().mean() if self.kind == "least_squares" else -fake.mean()
        return GLossOutput(loss, _mean_output(fake))

    def __repr__(self) -> str:
        return f"GANObjective(kind={self.kind!r})"


def gradient_penalty(critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor) -> Tensor:
    """WGAN-GP penalty ``mean (||grad_x critic(x_hat)|| - 1)^2`` at random interpolates (Gulrajani et al., 2017).

    Args:
        critic: maps a batch shaped like ``real`` to outputs ``(B,)`` (bind labels in a closure);
            the penalty differentiates it twice, which fastgen's fused ops support.
        real, fake: ``(B, ...)`` batches of the same shape; ``fake`` is detached here.

    Returns:
        0-dim tensor with a graph to the critic's parameters (create_graph), ready to be weighted
        (usually by 10) and added to the critic's loss. Draws ``B`` uniforms from the global RNG.
    """
    alpha = torch.rand((real.shape[0],) + (1,) * (real.dim() - 1), device=real.device, dtype=real.dtype)
    mixed = torch.lerp(real.detach(), fake.detach(), alpha).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1.0).square().mean()


def r1_penalty(real_outputs: Tensor, real: Tensor) -> Tensor:
    """R1 penalty ``mean ||grad_x D(x)||^2`` on real data (Mescheder et al., 2018).

    Args:
        real_outputs: D's outputs ``(B,)`` computed from ``real`` (fastgen's fused layers are
            twice differentiable).
        real: the real batch ``(B, ...)``; it must have had ``requires_grad_(True)`` before D ran.

    Returns:
        0-dim tensor with a graph to D's parameters; the usual weighting is ``gamma / 2``.
    """
    if not real.requires_grad:
        raise ValueError("real: call real.requires_grad_(True) before computing D's outputs on it")
    (grad,) = torch.autograd.grad(real_outputs.sum(), real, create_graph=True)
    return grad.flatten(1).square().sum(dim=1).mean()
