"""Choices made per problem shape by timing the real launch: GEMM block shapes, and which
implementation of an op runs.

Triton's ``@triton.autotune`` cannot serve the conv kernels: the number of row tiles, and with
it the per-tile statistics buffer the host allocates before the launch, depends on the block
shape. A :class:`Tuner` instead receives the whole host-side launch as a function of a
candidate (a :class:`TileConfig`, or any hashable, e.g. an implementation's name), times it once
for every candidate that fits the shape, and keeps the fastest per key (shape, dtype, kernel
variant) for the rest of the process. Keys hold the batch size's bucket (:func:`batch_bucket`),
not the batch size, as Triton's autotune keys hold bucketed dimensions: a smaller last batch or
an eval batch in the same bucket takes the bucket's choice instead of compiling and timing again.

Tile candidates whose operand pipeline cannot fit a GPU's shared memory
(:meth:`TileConfig.shared_bytes` against :data:`SHARED_MEMORY_PER_BLOCK`) are left out for that
GPU and dtype before anything is timed; ``benchmarks/compile_report.py`` checks, by compiling
them for sm_90a and sm_80, that every candidate left in fits.

Policy (:func:`tuning_enabled`):

- the interpreter (CPU tensors) runs the tuner's ``interpreter`` candidate;
- on CUDA the candidates are timed the first time a key is seen, unless ``FASTGEN_AUTOTUNE=0``,
  PyTorch's deterministic mode (``torch.use_deterministic_algorithms`` or
  ``torch.backends.cudnn.deterministic``) is on, or a CUDA graph is being captured; then a key
  already timed keeps its choice and a new one takes the first of :meth:`Tuner.candidates_for`
  (before sm_90, the first with room for two blocks per SM), untimed.
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


# The most shared memory one block may use (the opt-in maximum), by compute capability; an SM
# has 1 KB more, which the driver reserves per resident block.
SHARED_MEMORY_PER_BLOCK = {(8, 0): 163 * 1024, (8, 6): 99 * 1024, (8, 7): 163 * 1024,
                           (8, 9): 99 * 1024, (9, 0): 227 * 1024, (10, 0): 227 * 1024,
                           (12, 0): 99 * 1024}
RESERVED_SHARED_MEMORY_PER_BLOCK = 1024


def batch_bucket(n: int) -> int:
    """The batch size a tuning key holds for a batch of ``n``: the next power of two."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a batch size >= 1, got {n!r}")
    return 1 << (n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """A GEMM tile: ``m`` x ``n`` output block, ``k`` reduction step, and Triton launch options."""

    m: int
    n: int
    k: int
    num_warps: int = 4
    num_stages: int = 3

    def shared_bytes(self, itemsize: int, capability: tuple[int, int],
                     operand_tiles: tuple[int, int] = (1, 1)) -> int:
        """Shared memory of the software pipeline's operand buffers: per stage, ``operand_tiles``
        m x k and k x n tiles of ``itemsize`` bytes (2 where an operand is computed from two
        loaded tensors, as dL/dy from dL/dout and y; the computed tile then passes through shared
        memory once more on its way to the MMA). Triton keeps ``num_stages`` buffers on sm_90 and
        later, ``num_stages - 1`` before; the epilogue reuses the same memory. Against the sm_80
        compile report: from about 3 KB under (the kernel's static shared memory) to 16 KB over
        (the per-sample scales of a modulated GEMM in 2-byte dtypes or TF32, which need no buffer
        of their own); an upper bound on sm_90a."""
        buffers = self.num_stages if capability >= (9, 0) else max(1, self.num_stages - 1)
        a_tiles, b_tiles = operand_tiles
        a, b = self.m * self.k, self.k * self.n
        return (buffers * (a_tiles * a + b_tiles * b) + (a_tiles - 1) * a + (b_tiles - 1) * b) * itemsize

    def fits(self, itemsize: int, capability: tuple[int, int],
             operand_tiles: tuple[int, int] = (1, 1)) -> bool:
        """Whether the operand buffers fit a block's shared memory on ``capability`` (True for a
        GPU missing from SHARED_MEMORY_PER_BLOCK: a failing launch then drops out when timed)."""
        limit = SHARED_MEMORY_PER_BLOCK.get(tuple(capability))
        return limit is None or self.shared_bytes(itemsize, capability, operand_tiles) <= limit

    def fits_twice(self, itemsize: int, capability: tuple[int, int],
                   operand_tiles: tuple[int, int] = (1, 1)) -> bool:
        """Whether two blocks' operand buffers fit one SM's shared memory (False for a GPU missing
        from SHARED_MEMORY_PER_BLOCK). Registers are not counted: a tile of 8 warps above 128
        registers a thread stays at one block whatever this says."""
        limit = SHARED_MEMORY_PER_BLOCK.get(tuple(capability))
        per_block = self.shared_bytes(itemsize, capability, operand_tiles) + RESERVED_SHARED_MEMORY_PER_BLOCK
        return limit is not None and 2 * per_block <= limit + RESERVED_SHARED_MEMORY_PER_BLOCK


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
        candidates: what to time on CUDA, in order of preference for the untimed default
            (:meth:`candidates_for` may move one forward before sm_90).
        interpreter: the candidate for CPU tensors (the Triton interpreter), fitted like the others.
    """

    def __init__(self, name: str, candidates: Sequence[C], interpreter: C) -> None:
        self.name = name
        self.candidates = tuple(candidates)
        self.interpreter = interpreter
        self.chosen: dict[Hashable, C] = {}
        self.benchmark_ms: Callable[[Callable[[], object]], float] = _benchmark_ms

    def candidates_for(self, device: torch.device, dtype: torch.dtype | None = None,
                       capability: tuple[int, int] | None = None,
                       operand_tiles: tuple[int, int] = (1, 1)) -> tuple[C, ...]:
        """The candidates on ``device``: the interpreter's on the CPU; on CUDA every candidate
        except the tiles whose operands of ``dtype`` cannot fit the GPU's shared memory.

        Before sm_90, where :meth:`TileConfig.shared_bytes` is close, the first candidate whose
        buffers leave room for a second block per SM (:meth:`TileConfig.fits_twice`) goes first,
        as the untimed default, when the first does not: one block of 4 warps per SM leaves its
        latencies unhidden. (The compile report found sm_80's fp32 / TF32 defaults of the GEMMs
        that load two A tiles per step, input gradients through BN and modulated convs, at 96 KB:
        one block per SM; 64x64 tiles take 56 KB.) From sm_90 on the estimate is an upper bound
        and the order stays; the sm_90a report finds every default at two blocks or more (sm_100
        and sm_120 have no report).

        Args:
            dtype: the GEMM operands' dtype; None keeps every candidate.
            capability: the GPU's compute capability; None asks ``device``.
            operand_tiles: tiles loaded per stage for each operand (TileConfig.shared_bytes).
        """
        if device.type != "cuda":
            return (self.interpreter,)
        if dtype is None:
            return self.candidates
        if capability is None:
            capability = torch.cuda.get_device_capability(device)
        itemsize = torch.empty((), dtype=dtype).element_size()
        kept = [c for c in self.candidates
                if not isinstance(c, TileConfig) or c.fits(itemsize, capability, operand_tiles)]
        if tuple(capability) < (9, 0) and kept and isinstance(kept[0], TileConfig):
            roomy = next((c for c in kept if isinstance(c, TileConfig)
                          and c.fits_twice(itemsize, capability, operand_tiles)), None)
            if roomy is not None:  # moving the first to the front changes nothing
                kept.remove(roomy)
                kept.insert(0, roomy)
        return tuple(kept)

    def choose(self, key: Hashable, device: torch.device, fit: Callable[[C], C],
               launch: Callable[[C], object], dtype: torch.dtype | None = None,
               operand_tiles: tuple[int, int] = (1, 1)) -> C:
        """This key's candidate, timed with ``launch`` the first time the key is seen.

        Args:
            key: everything the best candidate may depend on (shapes with the batch size
                bucketed by :func:`batch_bucket`, dtype, kernel variant).
            fit: adapts a candidate to the problem (e.g. shrinks tiles wider than the matrix);
                candidates that become equal are timed once. It must give the same config for
                every problem of a key.
            launch: runs the work with a candidate. It must have no lasting effect: timing calls
                it several times.
            dtype, operand_tiles: the operands, for :meth:`candidates_for`.

        Raises:
            NoCandidateError: no candidate fits this GPU, or none compiles and runs.
        """
        tuned_key = (device.index, key)
        if tuned_key in self.chosen:  # also while tuning is off, e.g. during CUDA-graph capture
            return self.chosen[tuned_key]
        candidates = self.candidates_for(device, dtype, operand_tiles=operand_tiles)
        if not candidates:
            raise NoCandidateError(f"{self.name}: no candidate fits this GPU's shared memory for {dtype}")
        if not tuning_enabled(device):
            return fit(candidates[0])
        candidates = list(dict.fromkeys(fit(c) for c in candidates))
        self.chosen[tuned_key] = self._fastest(tuned_key, candidates, launch)
        return self.chosen[tuned_key]

    def run(self, key: Hashable, device: torch.device, fit: Callable[[C], C],
            launch: Callable[[C], T], dtype: torch.dtype | None = None,
            operand_tiles: tuple[int, int] = (1, 1)) -> T:
        """``launch(self.choose(...))``: for launches that allocate their outputs and do nothing else."""
        return launch(self.choose(key, device, fit, launch, dtype, operand_tiles))

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
