"""Data-parallel training on torch.distributed, as ``torchrun`` launches it.

``torchrun --nproc-per-node N -m fastgen train MODEL ...`` starts N processes and sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (across nodes too, through torchrun's own
rendezvous). Each process joins the group with ``env://``: NCCL on CUDA (one process per GPU,
device ``cuda:LOCAL_RANK``), gloo on the CPU. What the trainer does with the group:

* ``--batch-size`` is the global batch: every rank draws the sampler's global batch and keeps its
  equal, disjoint slice (:class:`~fastgen.data.BatchSampler` ``rank``/``world_size``).
* The modules of the trainer's passes are wrapped in :class:`DistributedDataParallel`, which
  averages gradients. Each rank's loss is a mean over its shard, and the shards are equal, so the
  average is the gradient of the global-mean loss: the update of one process on the whole batch.
  Buffers are not broadcast before each forward (``broadcast_buffers=False``): with ``--sync-bn``
  BatchNorm's batch statistics, hence running statistics, are global and alike on every rank;
  without it each rank normalizes by its shard's statistics and the checkpoint keeps rank 0's
  running statistics. Under ``--compile`` DDP wraps the compiled modules (a compiled DDP module
  breaks the graph at DDP's hooks, which fullgraph refuses).
* Logged values are all-reduced to global means in one collective per update, which is also the
  NaN guard's vote: every rank sees the same numbers, so every rank stops at the same step.
* Randomness: model initialization and the GAN latents come from a stream alike on every rank
  (each rank draws the latents of the global batch and keeps its rows, so a run sees the latents
  of one process); everything else random (the VAE's noise, WGAN-GP's interpolation weights) comes
  from per-rank streams seeded by :func:`rank_seed`.
* Rank 0 alone writes the run directory; every rank resumes from the same checkpoint.

A rank that dies ends the others: torchrun stops the remaining workers, gloo's collectives fail as
soon as a peer's connection closes, and a collective that a hung rank never joins gives up after
:data:`TIMEOUT` (the environment variable FASTGEN_DIST_TIMEOUT_S, in seconds, overrides it).
"""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["TIMEOUT", "Context", "setup", "shutdown", "rank_seed", "launched", "timeout"]

# No buffer broadcast before each forward (BN statistics: see above); torch 2.13 renamed the option.
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})
#: How long a collective waits for the other ranks before it fails (a rank that hangs or died).
TIMEOUT = timedelta(minutes=10)


def timeout() -> timedelta:
    """:data:`TIMEOUT`, or FASTGEN_DIST_TIMEOUT_S seconds when set.

    Raises:
        ValueError: FASTGEN_DIST_TIMEOUT_S is not a positive number.
    """
    text = os.environ.get("FASTGEN_DIST_TIMEOUT_S")
    if text is None:
        return TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not seconds > 0 or math.isinf(seconds):
        raise ValueError(f"FASTGEN_DIST_TIMEOUT_S: expected a positive number of seconds, got {text!r}")
    return timedelta(seconds=seconds)


def launched() -> bool:
    """Whether this process was started by torchrun (or another env:// launcher)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def rank_seed(seed: int, rank: int, *more: int) -> int:
    """A 32-bit seed for ``rank``'s own random stream, derived from the run's ``seed`` (and any
    further ints, such as the step of a resume) by NumPy's SeedSequence: streams of different
    ranks do not overlap in practice and repeat from run to run."""
    return int(np.random.SeedSequence([seed, rank, *more]).generate_state(1)[0])


@dataclass(frozen=True)
class Context:
    """This process's place in the run: ``rank`` of ``world_size`` over ``backend`` ("nccl",
    "gloo"; None without a process group). One process is ``Context()``."""

    rank: int = 0
    world_size: int = 1
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """Data parallel: more than one process. A group of one trains exactly as one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0, the one that writes logs, pictures and checkpoints."""
        return self.rank == 0

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """``module`` in DistributedDataParallel (gradients averaged over the ranks); ``module``
        itself for one process."""
        if not self.enabled:
            return module
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                       **_NO_BUFFER_SYNC)

    def mean(self, values: Tensor) -> Tensor:
        """The mean over the ranks of ``values`` (any shape, float), in one all-reduce."""
        if not self.enabled:
            return values
        total = values.clone()
        dist.all_reduce(total)  # SUM: gloo has no AVG
        return total / self.world_size

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        if not self.enabled:
            return [obj]
        objects: list[Any] = [None] * self.world_size
        dist.all_gather_object(objects, obj)
        return objects

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (picklable) on every rank."""
        if not self.enabled:
            return obj
        objects = [obj]
        dist.broadcast_object_list(objects, src=0)
        return objects[0]


def setup(device: torch.device) -> tuple[Context, torch.device]:
    """Join the process group torchrun describes (``env://``), or use the one already initialized;
    return this process's context and device (``cuda:LOCAL_RANK`` for a CUDA ``device``).

    Without a group or torchrun's variables this is one process: ``(Context(), device)``.

    Raises:
        ValueError: LOCAL_RANK names a GPU this machine does not have; a bad FASTGEN_DIST_TIMEOUT_S.
    """
    if not dist.is_available() or not (dist.is_initialized() or launched()):
        return Context(), device
    if device.type == "cuda":
        index = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
        if index >= torch.cuda.device_count():
            raise ValueError(f"device: LOCAL_RANK is {index} but this machine has {torch.cuda.device_count()} "
                             f"CUDA devices; start at most one process per GPU (torchrun --nproc-per-node)")
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                timeout=timeout())
    return Context(dist.get_rank(), dist.get_world_size(), dist.get_backend()), device


def shutdown() -> None:
    """Leave the process group, if this process is in one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
