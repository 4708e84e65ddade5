"""Modules over fastgen's fused ops (:mod:`fastgen.functional`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastgen import activations, functional as F
from fastgen.reference import REDUCTIONS, DLossOutput, GLossOutput

__all__ = ["BCEWithLogits", "GANLoss", "Reparameterize"]


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


class Reparameterize(nn.Module):
    """Gaussian sampling by reparameterization: ``forward(mu, logvar) -> (z, kl)``.

    ``z = mu + exp(0.5 * logvar) * eps`` with eps ~ N(0, I) (Philox in the kernel, never stored)
    and ``kl = KL(N(mu, diag(exp(logvar))) || N(0, I))`` per row, in one kernel launch.

    Args:
        samples: draws per row, >= 1; z is ``(samples, B, D)`` when ``samples > 1`` (IWAE).

    ``forward`` takes an optional ``generator``. See :func:`fastgen.functional.reparameterize`
    for shapes, dtypes and seeding.
    """

    def __init__(self, samples: int = 1) -> None:
        super().__init__()
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples: expected an int >= 1, got {samples!r}")
        self.samples = samples

    def forward(self, mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None
                ) -> tuple[Tensor, Tensor]:
        return F.reparameterize(mu, logvar, samples=self.samples, generator=generator)

    def extra_repr(self) -> str:
        return f"samples={self.samples}"


# ----------------------------------------------------------------------------------------------
# Conv + BatchNorm + activation

def _unsupported_conv(conv: nn.Conv2d | nn.ConvTranspose2d) -> str | None:
    """Why the fused op cannot run ``conv`` (None when it can)."""
    if conv.groups != 1:
        return f"groups={conv.groups} is not supported (only 1)"
    if tuple(conv.dilation) != (1, 1):
        return f"dilation={tuple(conv.dilation)} is not supported (only 1)"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return (f"padding={conv.padding!r}, padding_mode={conv.padding_mode!r} is not supported "
                "(only explicit zero padding)")
    return None


class _ConvNormAct(nn.Sequential):
    """``nn.Sequential(conv, bn, act)`` (or ``(conv, act)`` without BN) run as one fused op.

    Being that Sequential, its parameters and buffers have its keys ("0.weight", "1.weight",
    "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"), so checkpoints load
    either way. BN follows torch's BatchNorm2d: momentum None (cumulative average),
    track_running_stats False and num_batches_tracked all behave as there.
    """

    _conv_type: type[nn.Module] = nn.Conv2d

    def __init__(self, conv: nn.Module, bn: nn.BatchNorm2d | None, act: nn.Module | None) -> None:
        if not isinstance(conv, self._conv_type):
            raise TypeError(f"conv: {type(self).__name__} takes an nn.{self._conv_type.__name__}, "
                            f"got {type(conv).__name__}")
        reason = _unsupported_conv(conv)
        if reason is not None:
            raise NotImplementedError(f"conv: {reason}")
        if bn is not None:
            if type(bn) is not nn.BatchNorm2d:
                raise TypeError(f"bn: expected an nn.BatchNorm2d or None, got {type(bn).__name__}")
            if bn.num_features != conv.out_channels:
                raise ValueError(f"bn: expected {conv.out_channels} features (conv.out_channels), "
                                 f"got {bn.num_features}")
            if conv.bias is not None:
                raise NotImplementedError("conv: a bias before BatchNorm is not supported "
                                          "(training-mode BN cancels it); build the conv with "
                                          "bias=False")
        activation = activations.name_of(act)
        if activation is None:
            names = ", ".join(row.module.__name__ for row in activations.ACTIVATIONS.values())
            raise NotImplementedError(f"act: {type(act).__name__} is not supported; expected one "
                                      f"of {names} or None")
        act = nn.Identity() if act is None else act
        super().__init__(*(m for m in (conv, bn, act) if m is not None))
        self.activation, self.negative_slope = activation

    @classmethod
    def from_torch(cls, conv: nn.Module, bn: nn.BatchNorm2d | None = None,
                   act: nn.Module | None = None) -> _ConvNormAct:
        """The fused module over these very modules (parameters and buffers shared, not copied).

        Raises NotImplementedError for groups, dilation, non-zero padding modes, a conv bias
        before BN, or an activation other than ReLU, LeakyReLU, Tanh, Sigmoid, Identity, None.
        """
        module = cls.__new__(cls)
        _ConvNormAct.__init__(module, conv, bn, act)
        return module

    def forward(self, x: Tensor) -> Tensor:
        conv = self[0]
        transposed = isinstance(conv, nn.ConvTranspose2d)
        geometry = dict(stride=conv.stride, padding=conv.padding, transposed=transposed,
                        output_padding=conv.output_padding if transposed else 0,
                        activation=self.activation, negative_slope=self.negative_slope)
        if not isinstance(self[1], nn.BatchNorm2d):
            return F.conv_bias_act(x, conv.weight, conv.bias, **geometry)
        bn = self[1]
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                momentum = 1.0 / float(bn.num_batches_tracked)
        use_running = not bn.training or bn.track_running_stats
        return F.conv_bn_act(
            x, conv.weight, bn.weight, bn.bias, bn.running_mean if use_running else None,
            bn.running_var if use_running else None,
            training=bn.training or bn.running_mean is None, momentum=momentum, eps=bn.eps,
            **geometry)


class ConvBNAct(_ConvNormAct):
    """Conv2d (no bias) -> BatchNorm2d -> activation, fused; ``batch_norm=False`` gives
    Conv2d (with bias) -> activation.

    Args:
        in_channels, out_channels, kernel_size, stride, padding: as nn.Conv2d (ints or pairs).
        batch_norm: include the BatchNorm2d (eps, momentum, affine, track_running_stats as there).
        activation: "identity", "relu", "leaky_relu" (``negative_slope``), "tanh" or "sigmoid".

    Input ``(N, C_in, H, W)`` in any memory format; output ``(N, C_out, H_out, W_out)``. The
    state_dict is that of ``nn.Sequential(conv, bn, act)``. See :func:`fastgen.functional.conv_bn_act`.
    """

    _conv_type = nn.Conv2d

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0, *,
                 batch_norm: bool = True, activation: str = "relu", negative_slope: float = 0.2,
                 eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None) -> None:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                         bias=not batch_norm, device=device, dtype=dtype)
        bn = (nn.BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats,
                             device=device, dtype=dtype) if batch_norm else None)
        super().__init__(conv, bn, activations.module(activation, negative_slope))


class ConvTransposeBNAct(_ConvNormAct):
    """ConvTranspose2d (no bias) -> BatchNorm2d -> activation, fused (phase-decomposed transposed
    conv); ``batch_norm=False`` gives ConvTranspose2d (with bias) -> activation.

    Args as :class:`ConvBNAct`, plus ``output_padding`` (smaller than stride) as
    nn.ConvTranspose2d. The state_dict is that of ``nn.Sequential(conv_transpose, bn, act)``.
    """

    _conv_type = nn.ConvTranspose2d

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                 output_padding: int | tuple[int, int] = 0, *, batch_norm: bool = True,
                 activation: str = "relu", negative_slope: float = 0.2, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None) -> None:
        conv = nn.ConvTranspose2d(in_channels, out_channels, kernel_size, stride, padding,
                                  output_padding, bias=not batch_norm, device=device, dtype=dtype)
        bn = (nn.BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats,
                             device=device, dtype=dtype) if batch_norm else None)
        super().__init__(conv, bn, activations.module(activation, negative_slope))


def from_torch(conv: nn.Module, bn: nn.BatchNorm2d | None = None,
               act: nn.Module | None = None) -> ConvBNAct | ConvTransposeBNAct:
    """:class:`ConvBNAct` or :class:`ConvTransposeBNAct` (by the conv's type) over the given
    modules, sharing their parameters and buffers; see ``_ConvNormAct.from_torch``."""
    cls = ConvTransposeBNAct if isinstance(conv, nn.ConvTranspose2d) else ConvBNAct
    return cls.from_torch(conv, bn, act)


def _fusable_run(children: list[nn.Module], i: int) -> int:
    """Length of the conv[-bn][-act] run starting at children[i] that from_torch takes (0: none).

    A conv alone is left alone: fusing it gains nothing.
    """
    conv = children[i]
    if not isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)) or _unsupported_conv(conv) is not None:
        return 0
    j = i + 1
    if (j < len(children) and type(children[j]) is nn.BatchNorm2d and conv.bias is None
            and children[j].num_features == conv.out_channels):
        j += 1
    if j < len(children) and activations.name_of(children[j]) is not None:
        j += 1
    return j - i if j - i > 1 else 0


def fuse(module: nn.Module) -> nn.Module:
    """Replace, in place, every conv -> BatchNorm2d -> activation run (also conv -> BN and
    conv -> activation) inside the nn.Sequential containers of ``module`` by a fused
    :class:`ConvBNAct` / :class:`ConvTransposeBNAct` sharing the same parameters and buffers.

    Unsupported runs (groups, dilation, a conv bias before BN, other activations) stay as they
    are. A fused run becomes one child of its Sequential, so the state_dict keys of that
    Sequential change ("3.weight" -> "3.0.weight", ...): load checkpoints before fusing.
    Returns ``module``.
    """
    for seq in [m for m in module.modules() if type(m) is nn.Sequential]:
        children = list(seq)
        fused: list[nn.Module] = []
        i = 0
        while i < len(children):
            run = _fusable_run(children, i)
            if run:
                parts = children[i:i + run]
                bn = parts[1] if run > 1 and type(parts[1]) is nn.BatchNorm2d else None
                act = parts[-1] if parts[-1] is not bn and len(parts) > 1 else None
                fused.append(from_torch(parts[0], bn, act))
                i += run
            else:
                fused.append(children[i])
                i += 1
        if len(fused) != len(children):
            for key in list(seq._modules):
                del seq._modules[key]
            for index, child in enumerate(fused):
                seq.add_module(str(index), child)
    return module


__all__ += ["ConvBNAct", "ConvTransposeBNAct", "from_torch", "fuse"]
