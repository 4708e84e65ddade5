"""Mode-coverage evaluation for 2D Gaussian mixtures (ring8 / grid25).

This is the standard evaluation from the GAN mode-collapse literature
(e.g. Unrolled GAN, VEEGAN, PacGAN):

* each sample is assigned to its nearest mixture mean (Euclidean distance);
* a sample is **high quality** when that distance is at most
  ``threshold_std * std`` (3 standard deviations by default);
* a mode is **covered** when it is the nearest mean of at least one
  high-quality sample;
* **reverse KL** is ``KL(p_hist || uniform)`` where ``p_hist`` is the normalised
  histogram of nearest modes computed over the *high-quality samples only*
  (low-quality samples are ignored rather than being forced onto some mode).
  With ``K`` modes this is ``sum_k p_k * log(K * p_k)`` with ``0 * log 0 = 0``;
  it is 0 for a perfectly balanced generator and ``log K`` when every
  high-quality sample falls on one mode.  With no high-quality samples it is
  ``inf``.

Only torch, numpy and the standard library are used; mixtures are duck-typed
(anything with ``.means`` and ``.std``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = ["ModeCoverage", "mode_coverage", "evaluate_mixture"]

_CHUNK = 65536


@dataclass
class ModeCoverage:
    """Result of :func:`mode_coverage`.

    Attributes:
        modes_covered: number of modes that are the nearest mean of at least one
            high-quality sample.
        num_modes: total number of modes ``K``.
        high_quality_fraction: fraction (0..1) of all samples within
            ``threshold_std * std`` of their nearest mean.
        reverse_kl: ``KL(p_hist || uniform)`` over high-quality samples (nats);
            ``inf`` when there are none.
        counts: per-mode number of high-quality samples (length ``K``).
    """

    modes_covered: int
    num_modes: int
    high_quality_fraction: float
    reverse_kl: float
    counts: list[int]

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict view (e.g. for JSON logging)."""
        return asdict(self)


def _check_points(name: str, x: Any) -> torch.Tensor:
    """``x`` (tensor or array-like) as a float64 CPU tensor of shape ``(n, 2)``, ``n >= 1``."""
    x = torch.as_tensor(x)
    if x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must have a real (floating or integer) dtype, got {x.dtype}")
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"{name} must have shape (n, 2), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")
    return x.detach().to(device="cpu", dtype=torch.float64)


def mode_coverage(
    samples: torch.Tensor,
    means: torch.Tensor,
    std: float,
    *,
    threshold_std: float = 3.0,
) -> ModeCoverage:
    """Mode coverage, sample quality and reverse KL of 2D samples.

    Args:
        samples: tensor ``(n, 2)`` (any real dtype/device; computed in float64
            on CPU).  Non-finite rows (NaN/inf) count as low quality.
        means: tensor ``(K, 2)`` of mode centres (finite).
        std: per-mode standard deviation (> 0).
        threshold_std: a sample is high quality when its Euclidean distance to
            the nearest mean is ``<= threshold_std * std`` (> 0).

    Returns:
        :class:`ModeCoverage`.  ``reverse_kl`` is ``KL(p_hist || uniform)`` in
        nats where ``p_hist`` is the nearest-mode histogram of the
        *high-quality* samples (``0 * log 0 = 0``); ``inf`` if there are no
        high-quality samples.

    Raises:
        TypeError: complex or bool ``samples``/``means``.
        ValueError: wrong shapes (message names ``samples`` or ``means``), empty
            inputs, non-finite means, or non-positive ``std``/``threshold_std``.
    """
    x = _check_points("samples", samples)
    m = _check_points("means", means)
    if not torch.isfinite(m).all():
        raise ValueError("means must be finite")
    std = float(std)
    threshold_std = float(threshold_std)
    if not (std > 0 and math.isfinite(std)):
        raise ValueError(f"std must be a positive finite number, got {std}")
    if not (threshold_std > 0 and math.isfinite(threshold_std)):
        raise ValueError(f"threshold_std must be a positive finite number, got {threshold_std}")

    n, k = x.shape[0], m.shape[0]
    radius = threshold_std * std
    counts = torch.zeros(k, dtype=torch.int64)
    n_hq = 0
    for start in range(0, n, _CHUNK):
        xc = x[start:start + _CHUNK]
        finite = torch.isfinite(xc).all(dim=1)
        d2 = ((xc[:, None, :] - m[None, :, :]) ** 2).sum(dim=-1)  # (c, K)
        d2 = torch.where(finite[:, None], d2, torch.full_like(d2, math.inf))
        min_d2, nearest = d2.min(dim=1)
        hq = finite & (min_d2.sqrt() <= radius)
        n_hq += int(hq.sum())
        counts += torch.bincount(nearest[hq], minlength=k)

    if n_hq == 0:
        reverse_kl = math.inf
    else:
        p = counts[counts > 0].double() / n_hq
        # 0 * log 0 = 0: empty modes are left out; clamp tiny negative rounding.
        reverse_kl = max(float((p * (p * k).log()).sum()), 0.0)
    return ModeCoverage(
        modes_covered=int((counts > 0).sum()),
        num_modes=k,
        high_quality_fraction=n_hq / n,
        reverse_kl=reverse_kl,
        counts=counts.tolist(),
    )


def evaluate_mixture(samples: torch.Tensor, mixture: Any, *, threshold_std: float = 3.0) -> ModeCoverage:
    """:func:`mode_coverage` against a mixture object.

    Args:
        samples: tensor ``(n, 2)``.
        mixture: any object with ``.means`` (``(K, 2)``) and ``.std`` (float),
            e.g. ``fastgen.data.Mixture2D`` (duck-typed, not imported here).
        threshold_std: see :func:`mode_coverage`.
    """
    try:
        means, std = mixture.means, mixture.std
    except AttributeError as e:
        raise TypeError(
            f"mixture must have .means and .std attributes, got {type(mixture).__name__}"
        ) from e
    return mode_coverage(samples, means, std, threshold_std=threshold_std)
