"""Synchronized BatchNorm: the batch statistics of the concatenated batch of every rank of a
``torch.distributed`` process group, through the fused ops' own statistics.

A synchronized training-mode BN layer (``process_group`` given to :func:`fastgen.functional.conv_bn_act`
or :func:`~fastgen.functional.bn_act`) runs, per rank:

- forward: its local per-channel (count, mean, M2) (the conv epilogue's per-tile partials merged),
  **one all_gather** of that (3, C) tensor, then the combine of the W ranks' statistics with
  Chan's formula (on the Triton path the very kernel that merges the conv's tiles), the apply
  pass, and the running statistics updated from the global mean and unbiased variance (identical
  on every rank);
- backward: its local per-channel sums (sum dz, sum dz * xhat) and count, **one all_reduce** of
  those 2C + 1 values, then dL/dy with the global means. The parameter gradients (dgamma, dbeta)
  stay the local sums, as ``torch.nn.SyncBatchNorm`` returns them: DDP's gradient averaging then
  gives the global gradient divided by the world size, exactly as for the conv weights.

The ops take the group by its name (``ProcessGroup.group_name``; "" for no synchronization),
since an op schema holds no process group. The collectives run eagerly inside the ops, so a
compiled graph keeps one opaque op per layer. Second derivatives through a synchronized layer
are not supported (they would need more collectives) and raise.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["group_name", "merge_stats", "all_gather_stats", "all_reduce_grad_sums"]


def group_name(process_group: object | None) -> str:
    """The op argument for ``process_group``: its name, or "" where BN runs unsynchronized, as
    without a group (None, no initialized default group, or a group of one rank)."""
    if process_group is None:
        return ""
    if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise TypeError(f"process_group: expected a torch.distributed ProcessGroup or None, got "
                        f"{type(process_group).__name__}")
    if not dist.is_initialized() or dist.get_world_size(process_group) == 1:
        return ""
    return process_group.group_name


def _group(name: str) -> dist.ProcessGroup:
    return dist.distributed_c10d._resolve_process_group(name)


def merge_stats(part: Tensor) -> Tensor:
    """Merge per-group (count, mean, M2) into those of their union (Chan's formula for many
    groups at once, the form the combine kernel applies to each block of tiles).

    Args:
        part: (3, G, C) float, rows count, mean, M2 (sum of squared deviations) per group.

    Returns:
        (3, C), part's dtype.
    """
    count, mean, m2 = part
    total = count.sum(0)
    merged = (count * mean).sum(0) / total.clamp_min(1.0)
    spread = mean - merged
    return torch.stack([total, merged, (m2 + count * spread * spread).sum(0)])


def all_gather_stats(local: Tensor, name: str) -> Tensor:
    """Every rank's (count, mean, M2): ``local`` (3, C) -> (3, W, C) in rank order, the layout
    of the combine kernel's per-tile partials (the forward's one collective)."""
    group = _group(name)
    world = dist.get_world_size(group)
    gathered = local.new_empty((world * local.shape[0], local.shape[1]))  # ranks along dim 0
    # torch 2.13 renamed all_gather_into_tensor, the only name in 2.11 and 2.12
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(gathered, local.contiguous(), group=group)
    return gathered.view(world, *local.shape).transpose(0, 1).contiguous()


def all_reduce_grad_sums(dbeta: Tensor, dgamma: Tensor, count: int,
                         name: str) -> tuple[Tensor, Tensor, Tensor]:
    """Global (sum dz, sum dz * xhat, count) from each rank's (C,) sums and its value count per
    channel (the backward's one collective: an all_reduce of 2C + 1 values)."""
    channels = dbeta.numel()
    sums = torch.cat([dbeta, dgamma, dbeta.new_full((1,), float(count))])
    dist.all_reduce(sums, group=_group(name))
    return sums[:channels], sums[channels:2 * channels], sums[2 * channels]
