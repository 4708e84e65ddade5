"""Data sources for fastgen: MNIST-family IDX files, synthetic 2D mixtures and a
checkpointable shuffling batch sampler.

Only torch, numpy and the standard library are used here.

Contents
--------
* :func:`read_idx` / :func:`write_idx` -- strict reader/writer for the IDX format
  used by MNIST, Fashion-MNIST and KMNIST (raw or gzip-compressed files).
* :func:`load_mnist_family` -- load one split of an MNIST-family data set as a
  float32 image tensor ``(N, 1, H, W)`` and int64 labels ``(N,)``.  By default it
  reads the Debian package ``dataset-fashion-mnist`` from
  :data:`DEFAULT_FASHION_MNIST_DIR`.
* :func:`ring8_means`, :func:`grid25_means`, :class:`Mixture2D`,
  :func:`mixture2d` -- the 2D Gaussian mixtures of the GAN mode-collapse
  literature (8 modes on a ring, 25 modes on a grid).
* :class:`BatchSampler` -- infinite, seeded, shuffling index sampler whose state
  (epoch, position) can be saved and restored exactly.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

PathLike = str | os.PathLike

__all__ = [
    "IDX_TYPES",
    "read_idx",
    "write_idx",
    "DEFAULT_FASHION_MNIST_DIR",
    "MNIST_FAMILY_FILES",
    "load_mnist_family",
    "ring8_means",
    "grid25_means",
    "RING8_STD",
    "GRID25_STD",
    "Mixture2D",
    "MIXTURE2D_NAMES",
    "mixture2d",
    "BatchSampler",
]

# ---------------------------------------------------------------------------
# IDX format
# ---------------------------------------------------------------------------

#: IDX type code -> numpy dtype (big-endian, as stored on disk).
IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# numpy dtype (native/any byte order, keyed by kind+itemsize) -> IDX type code.
_DTYPE_TO_IDX: dict[tuple[str, int], int] = {
    (dt.kind, dt.itemsize): code for code, dt in IDX_TYPES.items()
}


def _type_names() -> str:
    return ", ".join(f"0x{c:02X} ({IDX_TYPES[c].name})" for c in sorted(IDX_TYPES))


def _check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as an int; TypeError if it is not one (bools rejected), ValueError if < ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _read_bytes(path: str) -> bytes:
    """Read a whole file, transparently gunzipping ``*.gz``.

    ``open`` errors (``FileNotFoundError``, ``IsADirectoryError``, ...) propagate
    as they are (they name the path); a corrupt or truncated gzip stream becomes
    a ``ValueError`` naming ``path``.
    """
    if not path.endswith(".gz"):
        with open(path, "rb") as f:
            return f.read()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path}: not a valid gzip file ({type(e).__name__}: {e})") from e


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST / Fashion-MNIST / KMNIST format).

    The file may be raw or gzip-compressed (path ending in ``.gz``).

    Layout: 4 magic bytes ``00 00 <type> <ndim>``, then ``ndim`` big-endian uint32
    dimension sizes, then the data in C order, big-endian.  Supported type codes:
    0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64.

    Args:
        path: file to read.

    Returns:
        ``numpy.ndarray`` of shape given by the header (e.g. ``(60000, 28, 28)``
        uint8 for MNIST images, ``(60000,)`` uint8 for labels), in native byte
        order, writable and C-contiguous.

    Raises:
        OSError: from ``open`` (e.g. ``FileNotFoundError``), naming the path.
        ValueError: bad magic number, unknown type code, ``ndim == 0``, truncated
            header, truncated data or trailing bytes (message names the path and
            what was wrong).
    """
    path = os.fspath(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(
            f"{path}: truncated header: need 4 magic bytes, file has {len(raw)} bytes"
        )
    z0, z1, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    if z0 != 0 or z1 != 0:
        raise ValueError(
            f"{path}: bad magic number {raw[:4].hex()}: IDX files start with two "
            f"zero bytes (is this an IDX file? gzip files must end with .gz)"
        )
    if type_code not in IDX_TYPES:
        raise ValueError(
            f"{path}: unknown IDX type code 0x{type_code:02X}; valid codes: {_type_names()}"
        )
    if ndim == 0:
        raise ValueError(f"{path}: IDX header has ndim=0; expected at least 1 dimension")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(
            f"{path}: truncated header: ndim={ndim} needs {header_len} header bytes, "
            f"file has {len(raw)}"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_TYPES[type_code]
    n_items = math.prod(dims)
    expected = n_items * dtype.itemsize
    actual = len(raw) - header_len
    if actual != expected:
        what = "truncated" if actual < expected else "trailing bytes"
        shape_s = "x".join(str(d) for d in dims)
        unit = "" if dtype.itemsize == 1 else f" x {dtype.itemsize} bytes ({dtype.name})"
        raise ValueError(
            f"{path}: {what}: header says {shape_s}{unit} = {expected} bytes of data, "
            f"file has {actual}"
        )
    arr = np.frombuffer(raw, dtype=dtype, count=n_items, offset=header_len).reshape(dims)
    # native byte order + own writable memory, so torch.from_numpy works.
    return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: PathLike, array: Any) -> None:
    """Write ``array`` as an IDX file (gzip-compressed when ``path`` ends in ``.gz``).

    Args:
        path: destination file.
        array: array-like (numpy array or CPU tensor) with at least one dimension
            and dtype uint8, int8, int16, int32, float32 or float64.

    Raises:
        ValueError: unsupported dtype, zero dimensions, or a dimension >= 2**32.
    """
    path = os.fspath(path)
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    arr = np.asarray(array)
    key = (arr.dtype.kind, arr.dtype.itemsize)
    if key not in _DTYPE_TO_IDX:
        raise ValueError(
            f"{path}: cannot write dtype {arr.dtype} as IDX; supported: "
            f"uint8, int8, int16, int32, float32, float64"
        )
    if arr.ndim == 0 or arr.ndim > 255:
        raise ValueError(f"{path}: IDX needs 1..255 dimensions, array has {arr.ndim}")
    if any(d >= 2**32 for d in arr.shape):
        raise ValueError(f"{path}: dimension too large for IDX: {arr.shape}")
    code = _DTYPE_TO_IDX[key]
    header = bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    payload = np.ascontiguousarray(arr, dtype=IDX_TYPES[code]).tobytes()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header)
        f.write(payload)


# ---------------------------------------------------------------------------
# MNIST family loader
# ---------------------------------------------------------------------------

#: Where Debian's ``dataset-fashion-mnist`` package installs Fashion-MNIST.  It
#: ships ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
#: ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz``.
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

#: split -> (images base name, labels base name).  Each is looked up raw and
#: with ``.gz``.
MNIST_FAMILY_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_SCALES = ("gan", "unit")
_INSTALL_HINT = (
    "install the Debian package with `apt-get install dataset-fashion-mnist` "
    f"(files go to {DEFAULT_FASHION_MNIST_DIR}) or pass data_dir= pointing at a "
    "directory with the MNIST-style IDX files"
)


def _find_file(data_dir: str, base: str) -> str:
    """``data_dir/base`` if it is a file, else ``data_dir/base.gz``."""
    for name in (base, base + ".gz"):
        p = os.path.join(data_dir, name)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"{data_dir}: missing {base} or {base}.gz; {_INSTALL_HINT}")


def load_mnist_family(
    data_dir: PathLike | None = None,
    split: str = "train",
    *,
    scale: str = "gan",
    pad_to_32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of an MNIST-family data set (Fashion-MNIST, MNIST, KMNIST).

    Files looked up in ``data_dir``, raw or ``.gz`` (the Debian layout):
    ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte`` (split ``"train"``),
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (split ``"test"``).

    Args:
        data_dir: directory with the IDX files; ``None`` means
            :data:`DEFAULT_FASHION_MNIST_DIR` (Debian ``dataset-fashion-mnist``).
        split: ``"train"`` or ``"test"``.
        scale: ``"gan"`` maps pixels 0..255 to [-1, 1]; ``"unit"`` to [0, 1].
        pad_to_32: zero-pad each image (28x28 for this family) to 32x32 with
            the background value (-1 for ``"gan"``, 0 for ``"unit"``); the image
            is centred (for 28x28: 2 pixels on each side).

    Returns:
        ``(images, labels)``: ``images`` float32 tensor ``(N, 1, H, W)`` (``H = W
        = 32`` when padded), ``labels`` int64 tensor ``(N,)``.

    Raises:
        ValueError: invalid ``split``/``scale`` (lists valid values), malformed
            IDX files, images not uint8 ``(N, H, W)``, labels not 1-D, image and
            label counts differ, or images larger than 32x32 with ``pad_to_32``.
        FileNotFoundError: ``data_dir`` or one of the files is missing (message
            names ``data_dir`` and the file, with an install hint).
    """
    if split not in MNIST_FAMILY_FILES:
        raise ValueError(
            f"invalid split {split!r}; valid values: {', '.join(map(repr, MNIST_FAMILY_FILES))}"
        )
    if scale not in _SCALES:
        raise ValueError(f"invalid scale {scale!r}; valid values: {', '.join(map(repr, _SCALES))}")
    data_dir = DEFAULT_FASHION_MNIST_DIR if data_dir is None else os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"{data_dir}: data directory does not exist; {_INSTALL_HINT}")

    img_base, lbl_base = MNIST_FAMILY_FILES[split]
    img_path = _find_file(data_dir, img_base)
    lbl_path = _find_file(data_dir, lbl_base)
    images = read_idx(img_path)
    labels = read_idx(lbl_path)

    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{img_path}: expected uint8 images of shape (N, H, W), got "
            f"{images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(
            f"{lbl_path}: expected integer labels of shape (N,), got "
            f"{labels.dtype} {labels.shape}"
        )
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{data_dir}: split {split!r} has {images.shape[0]} images "
            f"({os.path.basename(img_path)}) but {labels.shape[0]} labels "
            f"({os.path.basename(lbl_path)})"
        )

    x = torch.from_numpy(images).unsqueeze(1).to(torch.float32).div_(255.0)
    if scale == "gan":
        x.mul_(2.0).sub_(1.0)
    if pad_to_32:
        h, w = x.shape[-2:]
        if h > 32 or w > 32:
            raise ValueError(f"{img_path}: cannot pad {h}x{w} images to 32x32")
        top, left = (32 - h) // 2, (32 - w) // 2
        bg = -1.0 if scale == "gan" else 0.0
        x = torch.nn.functional.pad(x, (left, 32 - w - left, top, 32 - h - top), value=bg)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


# ---------------------------------------------------------------------------
# Synthetic 2D mixtures
# ---------------------------------------------------------------------------

#: Per-component standard deviation of the ring-of-8 mixture.
RING8_STD = 0.01
#: Per-component standard deviation of the 5x5 grid mixture.
GRID25_STD = 0.05


def ring8_means() -> torch.Tensor:
    """Means of the ring-of-8 mixture: float32 ``(8, 2)``.

    Eight distinct points on the unit circle at angles ``2*pi*k/8``, ``k = 0..7``
    (note ``linspace(0, 2*pi, 8)`` would give only 7 distinct points).
    """
    angles = 2.0 * math.pi * torch.arange(8, dtype=torch.float64) / 8.0
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=1).to(torch.float32)


def grid25_means() -> torch.Tensor:
    """Means of the 5x5 grid mixture: float32 ``(25, 2)``, all of ``{-4,-2,0,2,4}^2``.

    Row ``5*i + j`` is ``(v[i], v[j])`` with ``v = (-4, -2, 0, 2, 4)``.
    """
    v = torch.tensor([-4.0, -2.0, 0.0, 2.0, 4.0])
    gx, gy = torch.meshgrid(v, v, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)


@dataclass
class Mixture2D:
    """Equal-weight isotropic Gaussian mixture in 2D.

    Attributes:
        means: float32 tensor ``(K, 2)`` of component means.
        std: per-coordinate standard deviation shared by all components.
        name: short identifier (e.g. ``"ring8"``).
    """

    means: torch.Tensor
    std: float
    name: str = "mixture"

    def __post_init__(self) -> None:
        self.means = torch.as_tensor(self.means, dtype=torch.float32)
        if self.means.ndim != 2 or self.means.shape[1] != 2 or self.means.shape[0] < 1:
            raise ValueError(f"means must have shape (K, 2) with K >= 1, got {tuple(self.means.shape)}")
        self.std = float(self.std)
        if not (self.std > 0 and math.isfinite(self.std)):
            raise ValueError(f"std must be a positive finite number, got {self.std}")

    @property
    def num_modes(self) -> int:
        """Number of components ``K``."""
        return int(self.means.shape[0])

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` samples: float32 tensor ``(n, 2)`` on CPU.

        The component of each sample is chosen uniformly at random, then Gaussian
        noise with standard deviation :attr:`std` is added to its mean.

        Args:
            n: number of samples (>= 0).
            generator: optional CPU ``torch.Generator`` for reproducibility.

        Raises:
            TypeError: ``n`` is not an int.
            ValueError: ``n < 0``.
        """
        n = _check_int("n", n, 0)
        comp = torch.randint(self.num_modes, (n,), generator=generator)
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float32)
        return self.means[comp] + self.std * noise


_MIXTURES = {"ring8": (ring8_means, RING8_STD), "grid25": (grid25_means, GRID25_STD)}
#: Names accepted by :func:`mixture2d`.
MIXTURE2D_NAMES: tuple[str, ...] = tuple(_MIXTURES)


def mixture2d(name: str) -> Mixture2D:
    """Build a standard 2D mixture by name.

    ``"ring8"``: 8 modes on the unit circle, std 0.01.
    ``"grid25"``: 25 modes at ``{-4,-2,0,2,4}^2``, std 0.05.

    Raises:
        ValueError: unknown name (message lists the valid names).
    """
    if not isinstance(name, str) or name not in _MIXTURES:
        raise ValueError(
            f"unknown mixture {name!r}; valid names: {', '.join(map(repr, MIXTURE2D_NAMES))}"
        )
    means_fn, std = _MIXTURES[name]
    return Mixture2D(means_fn(), std, name)


# ---------------------------------------------------------------------------
# Checkpointable batch sampler
# ---------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


class BatchSampler:
    """Infinite shuffling sampler over indices ``0..n-1`` with exact resume.

    Each epoch uses a fresh permutation
    ``np.random.Generator(np.random.PCG64([seed mod 2**64, epoch])).permutation(n)``,
    so the whole state is two ints (``epoch``, ``position``) and a restored
    sampler yields exactly the same batches.  The permutations depend only on
    NumPy's PCG64 bit generator and ``Generator.permutation``, not on torch's
    RNG, so they do not change with the torch version (or process, or device).

    Iterating yields int64 tensors of shape ``(batch_size,)`` (the last batch of
    an epoch may be shorter when ``drop_last=False``), epoch after epoch forever.

    Sharded for data-parallel training (``world_size > 1``), ``batch_size`` is the
    global batch: every rank walks the same global order and yields its slice
    ``[rank * b, (rank + 1) * b)`` of each batch, ``b = batch_size // world_size``,
    so the ranks together see exactly the batches of one process. The state
    stays global: any rank's state_dict resumes every rank.

    Args:
        n: number of items (> 0).
        batch_size: items per (global) batch (> 0; <= n when ``drop_last``; a
            multiple of ``world_size``).
        seed: base seed (any int; only ``seed mod 2**64`` matters).
        drop_last: drop the incomplete final batch of each epoch (required when
            sharded: every rank takes an equal share).
        rank: this process's shard, ``0 <= rank < world_size``.
        world_size: number of shards.

    Raises:
        TypeError: ``n``/``batch_size``/``seed``/``rank``/``world_size`` not ints,
            ``drop_last`` not a bool.
        ValueError: ``n < 1``, ``batch_size < 1``, ``batch_size > n`` with
            ``drop_last``, ``rank`` out of range, ``batch_size`` not divisible by
            ``world_size``, or sharded without ``drop_last``.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int = 0, drop_last: bool = True, rank: int = 0,
                 world_size: int = 1) -> None:
        self.n = _check_int("n", n, 1)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seed = _check_int("seed", seed)
        if not isinstance(drop_last, bool):
            raise TypeError(f"drop_last must be a bool, got {type(drop_last).__name__} {drop_last!r}")
        self.drop_last = drop_last
        if drop_last and self.batch_size > self.n:
            raise ValueError(
                f"batch_size ({self.batch_size}) > n ({self.n}) with drop_last=True "
                f"would yield no batches"
            )
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be < world_size ({self.world_size}), got {self.rank}")
        if self.batch_size % self.world_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of world_size "
                             f"({self.world_size}): it is the global batch, split equally over the ranks")
        if self.world_size > 1 and not drop_last:
            raise ValueError("drop_last must be True when sharded (world_size > 1): every rank takes an "
                             "equal share of every batch")
        self.epoch = 0
        self.position = 0  # index into the current epoch's permutation
        self._perm: torch.Tensor | None = None
        self._perm_epoch = -1

    def __len__(self) -> int:
        """Number of batches in one epoch."""
        if self.drop_last:
            return self.n // self.batch_size
        return -(-self.n // self.batch_size)

    def permutation(self, epoch: int) -> torch.Tensor:
        """The int64 permutation ``(n,)`` used for ``epoch`` (see the class docstring)."""
        rng = np.random.Generator(np.random.PCG64([self.seed & _MASK64, epoch]))
        return torch.from_numpy(rng.permutation(self.n).astype(np.int64))

    def _current_perm(self) -> torch.Tensor:
        if self._perm_epoch != self.epoch:
            self._perm = self.permutation(self.epoch)
            self._perm_epoch = self.epoch
        return self._perm

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        remaining = self.n - self.position
        if remaining <= 0 or (self.drop_last and remaining < self.batch_size):
            self.epoch += 1
            self.position = 0
        perm = self._current_perm()
        end = min(self.position + self.batch_size, self.n)
        shard = (end - self.position) // self.world_size  # the whole batch for one process
        start = self.position + self.rank * shard
        batch = perm[start:start + shard].clone()
        self.position = end
        return batch

    def state_dict(self) -> dict[str, int]:
        """Plain-int state: ``n``, ``batch_size``, ``seed``, ``drop_last``, ``epoch``, ``position``."""
        return {
            "n": self.n,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "drop_last": int(self.drop_last),
            "epoch": self.epoch,
            "position": self.position,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`.

        Raises:
            TypeError: ``epoch``/``position`` not ints.
            ValueError: missing keys, or ``n``/``batch_size``/``seed``/``drop_last``
                differ from this sampler's (the batches would not match), or
                ``epoch``/``position`` out of range.
        """
        missing = [k for k in ("epoch", "position") if k not in state]
        if missing:
            raise ValueError(f"BatchSampler state is missing keys: {missing}")
        for key in ("n", "batch_size", "seed", "drop_last"):
            if key in state and int(state[key]) != int(getattr(self, key)):
                raise ValueError(
                    f"BatchSampler state has {key}={state[key]!r} but this sampler has "
                    f"{key}={getattr(self, key)!r}"
                )
        epoch = _check_int("epoch", state["epoch"], 0)
        position = _check_int("position", state["position"], 0)
        if position > self.n:
            raise ValueError(f"position must be <= n ({self.n}), got {position}")
        self.epoch = epoch
        self.position = position

    def __repr__(self) -> str:
        return (
            f"BatchSampler(n={self.n}, batch_size={self.batch_size}, seed={self.seed}, "
            f"drop_last={self.drop_last}, epoch={self.epoch}, position={self.position})"
        )
