"""Modules over fastgen's fused ops (:mod:`fastgen.functional`)."""

from __future__ import annotations

from torch import Tensor, nn

from fastgen import functional as F
from fastgen.reference import REDUCTIONS, DLossOutput, GLossOutput

__all__ = ["BCEWithLogits", "GANLoss"]


class GANLoss(nn.Module):
    """The GAN objective on discriminator logits: ``d_loss(real, fake)`` and ``g_loss(fake)``.

    Args:
        kind: "minimax" (G minimizes ``mean log(1 - D(G(z)))``, the saturating form of the
            original paper) or "non_saturating" (G minimizes ``-mean log D(G(z))``). The
            discriminator's loss is the same for both.
        label_smoothing: one-sided smoothing of D's real targets, in [0, 1).

    Both methods return named tuples whose logging fields (means of D(x), D(G(z))) come from
    the same kernel pass as the loss. The module has no ``forward``: call the method you mean.
    """

    KINDS = ("minimax", "non_saturating")

    def __init__(self, kind: str = "non_saturating", label_smoothing: float = 0.0) -> None:
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"kind: expected one of {', '.join(self.KINDS)}, got {kind!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing: expected a value in [0, 1), got {label_smoothing!r}")
        self.kind = kind
        self.label_smoothing = label_smoothing

    def d_loss(self, real_logits: Tensor, fake_logits: Tensor) -> DLossOutput:
        """Discriminator loss; see :func:`fastgen.functional.gan_d_loss`."""
        return F.gan_d_loss(real_logits, fake_logits, label_smoothing=self.label_smoothing)

    def g_loss(self, fake_logits: Tensor) -> GLossOutput:
        """Generator loss; see :func:`fastgen.functional.gan_g_loss`."""
        return F.gan_g_loss(fake_logits, saturating=self.kind == "minimax")

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, label_smoothing={self.label_smoothing}"


class BCEWithLogits(nn.Module):
    """Binary cross-entropy on logits; ``forward(logits, target)``.

    Args:
        reduction: "none", "mean", "sum" or "per_sample" (sum over all but the first dimension,
            the negative log-likelihood of a Bernoulli decoder per sample).

    See :func:`fastgen.functional.bce_with_logits` for shapes and dtypes.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {', '.join(REDUCTIONS)}, got {reduction!r}")
        self.reduction = reduction

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.bce_with_logits(logits, target, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"
