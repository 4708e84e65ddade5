"""Block shapes for the GEMM kernels, chosen per problem shape by timing the real launch.

Triton's ``@triton.autotune`` cannot serve these kernels: the number of row tiles, and with it
the per-tile statistics buffer the host allocates before the launch, depends on the block shape.
A :class:`TileTuner` instead receives the whole host-side launch as a function of a
:class:`TileConfig`, times it once for every candidate that fits the shape, keeps the fastest
per key (shape, dtype, kernel variant) for the rest of the process, and runs it.

Policy (:func:`tuning_enabled`):

- the interpreter (CPU tensors) runs the tuner's ``interpreter`` config;
- on CUDA the candidates are timed, unless ``FASTGEN_AUTOTUNE=0``, PyTorch's deterministic
  mode (``torch.use_deterministic_algorithms`` or ``torch.backends.cudnn.deterministic``) is
  on, or a CUDA graph is being captured; then the first candidate that fits runs untimed. Every
  config is deterministic on its own, but two configs sum in different orders: timing may pick
  different configs in two processes, as ``cudnn.benchmark`` may pick different algorithms;
- a candidate that fails to compile or launch (shared memory, registers) drops out; when all
  fail, :class:`NoTileConfigError` is raised, which the backend's "auto" rule turns into the
  reference path.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """A GEMM tile: ``m`` x ``n`` output block, ``k`` reduction step, and Triton launch options."""

    m: int
    n: int
    k: int
    num_warps: int = 4
    num_stages: int = 3


class NoTileConfigError(RuntimeError):
    """No candidate block shape compiles and runs for this problem."""


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


class TileTuner:
    """Chooses and remembers a :class:`TileConfig` per key for one kernel.

    Args:
        name: the kernel's name, for error messages.
        candidates: configs to time on CUDA, the untimed default first.
        interpreter: the config for CPU tensors (the Triton interpreter), fitted like the others.
    """

    def __init__(self, name: str, candidates: Sequence[TileConfig], interpreter: TileConfig) -> None:
        self.name = name
        self.candidates = tuple(candidates)
        self.interpreter = interpreter
        self.chosen: dict[Hashable, TileConfig] = {}
        self.benchmark_ms: Callable[[Callable[[], object]], float] = _benchmark_ms

    def run(self, key: Hashable, device: torch.device, fit: Callable[[TileConfig], TileConfig],
            launch: Callable[[TileConfig], T]) -> T:
        """``launch(config)`` with this key's config.

        Args:
            key: everything the best config may depend on (shapes, dtype, kernel variant).
            fit: adapts a candidate to the problem (e.g. shrinks tiles wider than the matrix);
                candidates that become equal are timed once.
            launch: allocates the outputs, launches the kernel with the config, returns them.
                It must have no other effect: timing calls it several times.
        """
        configs = self.candidates if device.type == "cuda" else (self.interpreter,)
        configs = list(dict.fromkeys(fit(c) for c in configs))
        if not tuning_enabled(device):
            return launch(configs[0])
        key = (device.index, key)
        if key not in self.chosen:
            self.chosen[key] = self._fastest(key, configs, launch)
        return launch(self.chosen[key])

    def _fastest(self, key: Hashable, configs: list[TileConfig],
                 launch: Callable[[TileConfig], object]) -> TileConfig:
        times: dict[TileConfig, float] = {}
        failures: list[str] = []
        for config in configs:
            try:
                times[config] = self.benchmark_ms(functools.partial(launch, config))
            except Exception as err:  # this config does not compile or launch here; the rest may
                failures.append(f"{config}: {type(err).__name__}: {err}")
        if not times:
            raise NoTileConfigError(f"{self.name}: no block shape compiles and runs for {key}: "
                                    + "; ".join(failures))
        return min(times, key=times.__getitem__)
