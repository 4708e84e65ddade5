"""Argument checks shared by the op families: each error names the argument and what was expected.

They run in the public functions, before the ``torch.ops.fastgen`` op is called, so every backend
sees the same checks and a bad call never reaches a kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor


def tensor(name: str, t: object) -> Tensor:
    """``t`` if it is a non-empty floating-point tensor."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor, got shape {tuple(t.shape)}")
    return t


def four_d(name: str, t: object) -> Tensor:
    """``t`` if it is a non-empty floating-point (N, C, H, W) tensor."""
    tensor(name, t)
    if t.dim() != 4:
        raise ValueError(f"{name}: expected a 4-d tensor, got shape {tuple(t.shape)}")
    return t


def same_device(**tensors: Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"expected all tensors on one device, got {listed}")


def same_dtype(**tensors: Tensor) -> None:
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{name} is {dt}" for name, dt in dtypes.items())
        raise TypeError(f"expected one dtype, got {listed}")


def channel_vectors(channels: int, **vectors: Tensor | None) -> None:
    """Each given vector is a floating ``(channels,)`` tensor."""
    for name, v in vectors.items():
        if v is not None:
            tensor(name, v)
            if v.shape != (channels,):
                raise ValueError(f"{name}: expected shape ({channels},), got {tuple(v.shape)}")


def pair(name: str, value: int | tuple[int, int], minimum: int) -> list[int]:
    """An int or a pair of ints, each >= ``minimum``, as a two-element list (an op's ``int[2]``)."""
    pair_ = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair_) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum
                                  for v in pair_):
        raise ValueError(f"{name}: expected an int >= {minimum} or a pair of them, got {value!r}")
    return list(pair_)


def unit_interval(name: str, value: float, *, closed: bool) -> float:
    """``value`` as a float in [0, 1] (``closed``) or [0, 1)."""
    ok = 0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0
    if not ok:
        raise ValueError(f"{name}: expected a value in [0, 1{']' if closed else ')'}, got {value!r}")
    return float(value)


def batch_major_dense(t: Tensor) -> bool:
    """Dense with the batch dimension outermost: a flat walk of memory visits rows one by one."""
    return (t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
            or (t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)))
