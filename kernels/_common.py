"""Helpers shared by the kernel modules (torch and triton only)."""

import torch
import triton.language as tl


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for inputs of ``dtype``: float64 for float64 (so gradcheck runs on the
    kernels), else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc_dtype(dtype: torch.dtype) -> tl.dtype:
    """:func:`acc_dtype` as a Triton dtype, for a kernel's ``ACC`` constexpr."""
    return tl.float64 if dtype == torch.float64 else tl.float32
