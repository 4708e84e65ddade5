"""Helpers shared by the kernel modules (torch and triton only)."""

import torch
import triton
import triton.language as tl


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for inputs of ``dtype``: float64 for float64 (so gradcheck runs on the
    kernels), else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc_dtype(dtype: torch.dtype) -> tl.dtype:
    """:func:`acc_dtype` as a Triton dtype, for a kernel's ``ACC`` constexpr."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def to_acc(value, ACC: tl.constexpr):
    """A float scalar argument as an ``ACC`` value, rounded once.

    Annotate the argument ``tl.float64``: Python floats otherwise arrive as float32, which costs
    float64 inputs half their digits. Adding it to an ``ACC`` zero (not ``tl.cast``, which the
    interpreter applies through float32) rounds it once and keeps elementwise math in ``ACC``.
    """
    return (tl.full((), 0, ACC) + value).to(ACC)
