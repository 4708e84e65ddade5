"""Modules over fastgen's fused ops (:mod:`fastgen.functional`)."""

from __future__ import annotations

import torch
import torch.distributed as dist
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


def _bn_arguments(bn: nn.BatchNorm2d, sync_bn: bool, process_group) -> dict:
    """The BN keywords of conv_bn_act / bn_act for a BatchNorm2d's state, as its own forward
    would use them (momentum None: cumulative average; num_batches_tracked counted here), and
    the process group of a synchronized layer in training (torch.nn.SyncBatchNorm's rule)."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    use_running = not bn.training or bn.track_running_stats
    group = None
    if sync_bn and bn.training and dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD if process_group is None else process_group
    return dict(running_mean=bn.running_mean if use_running else None,
                running_var=bn.running_var if use_running else None,
                training=bn.training or bn.running_mean is None, momentum=momentum, eps=bn.eps,
                process_group=group)


class _ConvNormAct(nn.Sequential):
    """``nn.Sequential(conv, bn, act)`` (or ``(conv, act)`` without BN) run as one fused op.

    Being that Sequential, its parameters and buffers have its keys ("0.weight", "1.weight",
    "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"), so checkpoints load
    either way. BN follows torch's BatchNorm2d: momentum None (cumulative average),
    track_running_stats False and num_batches_tracked all behave as there.
    :func:`convert_sync_batchnorm` synchronizes the BN over a process group.
    """

    _conv_type: type[nn.Module] = nn.Conv2d
    # Set by convert_sync_batchnorm: BN statistics over process_group (None: the default group).
    sync_bn: bool = False
    process_group = None

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
        return F.conv_bn_act(x, conv.weight, bn.weight, bn.bias,
                             **_bn_arguments(bn, self.sync_bn, self.process_group), **geometry)


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
    return _fuse_runs(module, with_bn_only=False)


def _fuse_runs(module: nn.Module, with_bn_only: bool) -> nn.Module:
    """:func:`fuse`; ``with_bn_only``: only the runs that hold a BatchNorm2d."""
    for seq in [m for m in module.modules() if type(m) is nn.Sequential]:
        children = list(seq)
        fused: list[nn.Module] = []
        i = 0
        while i < len(children):
            run = _fusable_run(children, i)
            if run and with_bn_only and type(children[i + 1]) is not nn.BatchNorm2d:
                run = 0
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


class BNAct(nn.BatchNorm2d):
    """BatchNorm2d -> activation, fused (:func:`fastgen.functional.bn_act`); a BatchNorm2d
    itself, so its state_dict keys and its BN attributes (eps, momentum None, affine,
    track_running_stats) are those of ``nn.BatchNorm2d``.

    Args: as nn.BatchNorm2d, then ``activation`` ("identity" by default, "relu", "leaky_relu"
    with ``negative_slope``, "tanh", "sigmoid"). Input and output ``(N, C, H, W)``.
    """

    sync_bn: bool = False
    process_group = None

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *,
                 activation: str = "identity", negative_slope: float = 0.2, device=None,
                 dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device,
                         dtype=dtype)
        activations.check_activation(activation)
        self.activation, self.negative_slope = activation, negative_slope

    @classmethod
    def from_torch(cls, bn: nn.BatchNorm2d) -> BNAct:
        """A BNAct (identity activation) over ``bn``'s very parameters and buffers, in its
        training mode."""
        if type(bn) is not nn.BatchNorm2d:
            raise TypeError(f"bn: expected an nn.BatchNorm2d, got {type(bn).__name__}")
        module = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                     device="meta")
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(module, name, getattr(bn, name))
        return module.train(bn.training)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        return F.bn_act(x, self.weight, self.bias,
                        **_bn_arguments(self, self.sync_bn, self.process_group),
                        activation=self.activation, negative_slope=self.negative_slope)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"


def convert_sync_batchnorm(module: nn.Module, process_group: object | None = None) -> nn.Module:
    """Synchronize every BatchNorm of ``module`` over a ``torch.distributed`` process group,
    through fastgen's fused statistics (``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` for
    fastgen layers).

    In training mode a synchronized BN normalizes with the mean and variance of the batches of
    all ranks of the group together (each rank's per-channel (count, mean, M2) merged with
    Chan's formula after one all_gather of 3 * C values), updates the running statistics from
    them identically on every rank (unbiased variance with the global count), and its backward
    takes the global means of the two per-channel gradient sums (one all_reduce of 2 * C + 1
    values). So, with equal parameters, W ranks computing on their shards give the outputs and
    input gradients of one process computing on the concatenated batch. The BN parameters'
    gradients are each rank's own sums, as torch.nn.SyncBatchNorm returns them, for
    DistributedDataParallel to average with the other parameters' gradients. Eval mode, and
    training without an initialized process group or with a group of one rank, run exactly as
    before conversion. Every rank of the group must run the same synchronized layers in the
    same order. Second derivatives (gradient penalties) through a synchronized BN raise.

    Conversion, in place (parameters and buffers are shared, never copied):

    - fastgen's :class:`ConvBNAct` / :class:`ConvTransposeBNAct` with BN, and :class:`BNAct`,
      are marked synchronized;
    - a conv -> nn.BatchNorm2d (-> activation) run inside an nn.Sequential becomes one fused
      layer, as :func:`fuse` does (that Sequential's state_dict keys change: "1.weight" ->
      "0.1.weight"; load checkpoints before converting);
    - any other nn.BatchNorm2d becomes a synchronized :class:`BNAct` (same state_dict keys).

    Args:
        module: the model (training or eval mode, on any device).
        process_group: the group to synchronize over; None: the default (WORLD) group, looked up
            at each forward, so the model may be converted before ``init_process_group``.

    Returns:
        ``module``, or a new :class:`BNAct` when ``module`` itself is an nn.BatchNorm2d.

    Raises:
        TypeError: ``module`` is not an nn.Module, ``process_group`` neither a ProcessGroup nor
            None.
        NotImplementedError: a BatchNorm other than nn.BatchNorm2d (BatchNorm1d/3d, a subclass)
            that fastgen cannot fuse; torch.nn.SyncBatchNorm layers are left as they are.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
    if process_group is not None and not (dist.is_available()
                                          and isinstance(process_group, dist.ProcessGroup)):
        raise TypeError(f"process_group: expected a torch.distributed ProcessGroup or None, got "
                        f"{type(process_group).__name__}")
    for name, bn in module.named_modules():
        if (isinstance(bn, nn.modules.batchnorm._BatchNorm)
                and type(bn) not in (nn.BatchNorm2d, BNAct, nn.SyncBatchNorm)):
            raise NotImplementedError(f"module: {name or 'module'} is a {type(bn).__name__}; "
                                      "fastgen synchronizes nn.BatchNorm2d only")
    _fuse_runs(module, with_bn_only=True)
    if type(module) is nn.BatchNorm2d:
        module = BNAct.from_torch(module)
    for parent in list(module.modules()):
        for key, child in list(parent._modules.items()):
            if type(child) is nn.BatchNorm2d and not isinstance(parent, _ConvNormAct):
                parent._modules[key] = BNAct.from_torch(child)
    for layer in module.modules():
        if isinstance(layer, BNAct) or (isinstance(layer, _ConvNormAct)
                                        and isinstance(layer[1], nn.BatchNorm2d)):
            layer.sync_bn, layer.process_group = True, process_group
    return module


__all__ += ["ConvBNAct", "ConvTransposeBNAct", "from_torch", "fuse", "BNAct",
            "convert_sync_batchnorm"]
