"""Which implementation of a fused op runs: the Triton kernels or the pure-PyTorch reference.

Backends:

- ``"auto"`` (default): Triton when every tensor of the call is on CUDA and triton imports (or,
  with ``TRITON_INTERPRET=1``, on CPU tensors too: that is how the tests run the kernels); the
  reference otherwise. A Triton failure (compile error, unsupported dtype, ...) warns once,
  is remembered for that op, and the call falls back to the reference. Running out of memory
  (``torch.OutOfMemoryError``, the same class as ``torch.cuda.OutOfMemoryError``, and
  ``MemoryError``) is not a failure of the kernel: it propagates and the op keeps its kernel.
  ``KeyboardInterrupt`` and ``SystemExit`` are not ``Exception`` and are never caught.
- ``"triton"``: always Triton; a failure raises.
- ``"reference"``: always the reference in :mod:`fastgen.reference`.

The choice comes from, in order: the innermost :func:`use_backend` context, the environment
variable ``FASTGEN_BACKEND``, then ``"auto"``.

Fused backwards run under the backend their forward ran under (the op layer saves
``get_backend()`` in the forward: autograd runs CUDA backwards on its own threads, which do not
see the forward's :func:`use_backend` context), and can fail too (a backward kernel is compiled
on first use). Where the reference computes the same gradients from what the forward saved (the
losses, the log-density, every conv and BN op), the backward is one more :func:`dispatch`: under
"auto" a failure warns once, marks the op failed (later calls run the reference forward and
backward) and returns the reference's gradients. Where it cannot (the sampler: the reference
cannot regenerate the fused path's noise), the backward of a fused forward
(:func:`chooses_triton` at the forward) runs through :func:`guard` without a reference, and a
failure raises after being remembered. Under "triton" every failure raises.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

BACKENDS = ("auto", "triton", "reference")

T = TypeVar("T")

_local = threading.local()
# op name -> the error that made "auto" give up on its Triton path for this process.
_failed_ops: dict[str, str] = {}


def _validate(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def get_backend() -> str:
    """The backend in force: the innermost ``use_backend`` context, else ``FASTGEN_BACKEND``, else "auto"."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    return _validate(os.environ.get("FASTGEN_BACKEND", "auto").strip().lower(), "FASTGEN_BACKEND")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed fastgen ops on backend ``name`` ("auto", "triton" or "reference").

    Contexts nest and are per thread::

        with fastgen.use_backend("reference"):
            loss = fastgen.functional.bce_with_logits(logits, target)
    """
    _validate(name, "use_backend")
    stack = _local.__dict__.setdefault("stack", [])
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


@functools.cache
def triton_available() -> bool:
    """True when ``import triton`` works in this process."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising anything at import
        return False
    return True


def interpreter_enabled() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_can_run_on(tensors: tuple[torch.Tensor, ...]) -> bool:
    if interpreter_enabled():
        return True
    return all(t.is_cuda for t in tensors)


def chooses_triton(op: str, tensors: tuple[torch.Tensor, ...]) -> bool:
    """Whether :func:`dispatch` would run ``op`` on these tensors on the Triton path (for "triton",
    also where it would raise instead). Asked right after a forward, it tells the path that
    forward took: a Triton failure under "auto" has marked the op failed by then."""
    backend = get_backend()
    if backend == "reference":
        return False
    if backend == "triton":
        return True
    return op not in _failed_ops and triton_available() and _triton_can_run_on(tensors)


def dispatch(op: str, tensors: tuple[torch.Tensor, ...], triton_impl: Callable[[], T],
             reference_impl: Callable[[], T]) -> T:
    """Run ``op`` on the backend in force.

    ``tensors`` are the call's tensor arguments (they decide the device); the two callables take
    no arguments and compute the op's result on their path. Input validation belongs before this
    call: only failures of the Triton path itself are caught here, and only under "auto".
    """
    backend = get_backend()
    if backend == "reference":
        return reference_impl()
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"fastgen.{op}: backend 'triton' was requested but triton is not installed")
        if not _triton_can_run_on(tensors):
            raise RuntimeError(
                f"fastgen.{op}: backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the "
                f"CPU interpreter); got tensors on {sorted({str(t.device) for t in tensors})}")
        return triton_impl()
    if not chooses_triton(op, tensors):
        return reference_impl()
    return _auto(op, triton_impl, reference_impl)


def guard(op: str, triton_impl: Callable[[], T], reference_impl: Callable[[], T] | None = None, *,
          backend: str | None = None) -> T:
    """Run a Triton step of ``op`` that :func:`dispatch` did not choose itself: a fused backward.

    Args:
        op: the op's name, as given to :func:`dispatch` (a failure here disables its forward too).
        triton_impl: runs the Triton step.
        reference_impl: computes the same result on the reference path, or None when the caller
            cannot (the failure then propagates, after being remembered under "auto").
        backend: the backend the op's forward ran under; defaults to :func:`get_backend`.

    Under "auto" a failure warns once, is remembered for ``op`` and returns ``reference_impl()``;
    running out of memory propagates. Under any other backend a failure raises.
    """
    if (backend or get_backend()) != "auto":
        return triton_impl()
    return _auto(op, triton_impl, reference_impl)


# Out of memory says nothing about the kernel: the reference would need memory too, and the fix
# (a smaller batch, freeing caches) is the caller's.
_NOT_KERNEL_FAILURES = (torch.OutOfMemoryError, MemoryError)


def _auto(op: str, triton_impl: Callable[[], T], reference_impl: Callable[[], T] | None) -> T:
    """"auto"'s handling of a Triton failure: warn once, remember, fall back (or re-raise)."""
    try:
        return triton_impl()
    except _NOT_KERNEL_FAILURES:
        raise
    except Exception as err:  # the Triton path failed; "auto" promises a working op regardless
        if op not in _failed_ops:
            _failed_ops[op] = f"{type(err).__name__}: {err}"
            warnings.warn(
                f"fastgen.{op}: the Triton kernel failed ({_failed_ops[op]}); falling back to the "
                f"PyTorch reference for the rest of this process. Set FASTGEN_BACKEND=triton to "
                f"raise instead.", RuntimeWarning, stacklevel=4)
        if reference_impl is None:
            raise
        return reference_impl()


def failed_ops() -> dict[str, str]:
    """The ops whose Triton path failed under "auto" in this process, with the error (a copy)."""
    return dict(_failed_ops)


def reset_failures() -> None:
    """Forget remembered Triton failures so "auto" tries the kernels again (mainly for tests)."""
    _failed_ops.clear()
