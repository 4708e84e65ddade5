"""Choices made per problem shape by timing the real launch: GEMM block shapes, and which
implementation of an op runs.

Triton's ``@triton.autotune`` cannot serve the conv kernels: the number of row tiles, and with
it the per-tile statistics buffer the host allocates before the launch, depends on the block
shape. A :class:`Tuner` instead receives the whole host-side launch as a function of a
candidate (a :class:`TileConfig`, or any hashable, e.g. an implementation's name), times it once
for every candidate that fits the shape, and keeps the fastest per key (shape, dtype, kernel
variant) for the rest of the process.

Policy (:func:`tuning_enabled`):

- the interpreter (CPU tensors) runs the tuner's ``interpreter`` candidate;
- on CUDA the candidates are timed the first time a key is seen, unless ``FASTGEN_AUTOTUNE=0``,
  PyTorch's deterministic mode (``torch.use_deterministic_algorithms`` or
  ``torch.backends.cudnn.deterministic``) is on, or a CUDA graph is being captured; then a key
  already timed keeps its choice and a new one takes the first candidate that fits, untimed.
  Timing may pick differently in two processes, as ``cudnn.benchmark`` may: two tile configs
  sum in different orders, and the "cudnn-gemm" conv implementation runs cuDNN's backward,
  which may use atomics. With tuning off, the fused kernels with their default tiles run, and
  they repeat bit for bit;
- a candidate that fails to compile or launch (shared memory, registers) drops out; when all
  fail, :class:`NoCandidateError` is raised, which the backend's "auto" rule turns into the
  reference path.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

import torch

T = TypeVar("T")
C = TypeVar("C", bound=Hashable)


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """A GEMM tile: ``m`` x ``n`` output block, ``k`` reduction step, and Triton launch options."""

    m: int
    n: int
    k: int
    num_warps: int = 4
    num_stages: int = 3


class NoCandidateError(RuntimeError):
    """No candidate compiles and runs for this problem."""


def tuning_enabled(device: torch.device) -> bool:
    """Whether launches on ``device`` time the candidates (module docstring, "Policy")."""
    if device.type != "cuda" or os.environ.get("FASTGEN_AUTOTUNE", "1").strip() == "0":
        return False
    if torch.are_deterministic_algorithms_enabled() or torch.backends.cudnn.deterministic:
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _benchmark_ms(fn: Callable[[], object]) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")


class Tuner(Generic[C]):
    """Chooses and remembers a candidate per key for one kernel or op.

    Args:
        name: the kernel's or op's name, for error messages.
        candidates: what to time on CUDA, the untimed default first.
        interpreter: the candidate for CPU tensors (the Triton interpreter), fitted like the others.
    """

    def __init__(self, name: str, candidates: Sequence[C], interpreter: C) -> None:
        self.name = name
        self.candidates = tuple(candidates)
        self.interpreter = interpreter
        self.chosen: dict[Hashable, C] = {}
        self.benchmark_ms: Callable[[Callable[[], object]], float] = _benchmark_ms

    def candidates_for(self, device: torch.device) -> tuple[C, ...]:
        """The candidates on ``device``: all of them on CUDA, the interpreter's elsewhere."""
        return self.candidates if device.type == "cuda" else (self.interpreter,)

    def choose(self, key: Hashable, device: torch.device, fit: Callable[[C], C],
               launch: Callable[[C], object]) -> C:
        """This key's candidate, timed with ``launch`` the first time the key is seen.

        Args:
            key: everything the best candidate may depend on (shapes, dtype, kernel variant).
            fit: adapts a candidate to the problem (e.g. shrinks tiles wider than the matrix);
                candidates that become equal are timed once.
            launch: runs the work with a candidate. It must have no lasting effect: timing calls
                it several times.
        """
        tuned_key = (device.index, key)
        if tuned_key in self.chosen:  # also while tuning is off, e.g. during CUDA-graph capture
            return self.chosen[tuned_key]
        candidates = self.candidates_for(device)
        if not tuning_enabled(device):
            return fit(candidates[0])
        candidates = list(dict.fromkeys(fit(c) for c in candidates))
        self.chosen[tuned_key] = self._fastest(tuned_key, candidates, launch)
        return self.chosen[tuned_key]

    def run(self, key: Hashable, device: torch.device, fit: Callable[[C], C],
            launch: Callable[[C], T]) -> T:
        """``launch(self.choose(...))``: for launches that allocate their outputs and do nothing else."""
        return launch(self.choose(key, device, fit, launch))

    def _fastest(self, key: Hashable, candidates: list[C], launch: Callable[[C], object]) -> C:
        times: dict[C, float] = {}
        failures: list[str] = []
        for candidate in candidates:
            try:
                times[candidate] = self.benchmark_ms(functools.partial(launch, candidate))
            except Exception as err:  # this candidate does not compile or launch here; the rest may
                failures.append(f"{candidate}: {type(err).__name__}: {err}")
        if not times:
            raise NoCandidateError(f"{self.name}: no candidate compiles and runs for {key}: "
                                    + "; ".join(failures))
        return min(times, key=times.__getitem__)
