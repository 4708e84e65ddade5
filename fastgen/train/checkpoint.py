"""Checkpoint files: atomic writes, loads that cannot run code, and the process's RNG states.

A checkpoint is a dict of tensors and plain Python values (str, int, float, bool, None, lists,
tuples, dicts), written with ``torch.save`` and read back with ``torch.load(weights_only=True)``:
the restricted unpickler rebuilds tensors and containers and refuses any other object, so a
checkpoint file can never run code. RNG states are stored in that vocabulary too.

Writes are atomic: the bytes go to a temporary file in the same directory, which is fsynced and
then renamed over the target (``os.replace``), and the directory is fsynced so the rename itself
survives a crash. A process killed during a save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CheckpointError", "FORMAT", "save_checkpoint", "load_checkpoint", "capture_rng_state",
           "restore_rng_state", "atomic_write_bytes"]

FORMAT = "fastgen.checkpoint/1"


class CheckpointError(ValueError):
    """A file that is not a loadable fastgen checkpoint (the message says why)."""


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Any) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync it, rename it to ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically (temporary file + fsync + rename + directory fsync)."""
    _atomic_write(Path(path), lambda f: f.write(data))


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` (tensors and plain values only) to ``path`` atomically, tagged with :data:`FORMAT`."""
    _atomic_write(Path(path), lambda f: torch.save({"format": FORMAT, **state}, f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file holds pickled Python objects (refused, never executed), is
            truncated or not a torch file, or is not a fastgen checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: refused to load: the file contains pickled Python objects, which a fastgen "
            f"checkpoint never holds (torch.load(weights_only=True) stopped at: {reason})") from None
    except Exception as err:  # truncated zip, not a torch file, ...: torch raises several types
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: not a fastgen checkpoint (expected format {FORMAT!r}, found {found!r})")
    return state


def capture_rng_state() -> dict[str, Any]:
    """The states of torch's CPU and CUDA generators, numpy's global RNG and Python's ``random``,
    as tensors and plain values (loadable with ``weights_only=True``)."""
    _, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached)},
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss_next": py_gauss},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`. CUDA states are restored when this process has the
    same number of CUDA devices (a CPU-only process ignores them)."""
    torch.set_rng_state(state["torch_cpu"].cpu())
    cuda = state["torch_cuda"]
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
