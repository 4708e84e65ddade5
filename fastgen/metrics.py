"""Evaluation metrics: mode coverage of 2D Gaussian mixtures, and the sample-quality metrics of
image generators in a feature space (Fréchet distance, KID, precision / recall, density /
coverage).

Mode coverage (ring8 / grid25) is the standard evaluation from the GAN mode-collapse literature
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

The feature-space metrics take two sets of feature vectors ``(n, d)`` (real and generated, e.g.
the penultimate layer of a classifier) and compute in float64 on the CPU; pairwise distances go
in chunks, so 10k x 10k sets run in bounded memory.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = ["ModeCoverage", "mode_coverage", "evaluate_mixture", "frechet_distance",
           "gaussian_stats", "kid", "precision_recall", "density_coverage", "pca_fit", "pca_mse",
           "bits_per_dim"]

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


# ----------------------------------------------------------------------------------------------
# Feature-space metrics


def _check_features(name: str, x: Any, dim: int | None = None, minimum: int = 2) -> torch.Tensor:
    """``x`` as a finite float64 CPU tensor ``(n, d)`` with ``n >= minimum`` (and ``d == dim``)."""
    x = torch.as_tensor(x)
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64, torch.uint8)):
        raise TypeError(f"{name}: expected a real tensor, got dtype {x.dtype}")
    if x.dim() != 2 or x.shape[0] < minimum:
        raise ValueError(f"{name}: expected shape (n, d) with n >= {minimum}, got {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name}: expected {dim} features per row (as the other set), got {x.shape[1]}")
    x = x.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: expected finite values")
    return x


def gaussian_stats(features: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(d,)`` and covariance ``(d, d)`` (unbiased) of ``features`` ``(n, d)``, float64."""
    x = _check_features("features", features)
    mean = x.mean(0)
    centered = x - mean
    return mean, centered.T @ centered / (x.shape[0] - 1)


def _psd_eigenvalues(values: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a PSD matrix with its rounding noise (below d * eps * the largest, or
    negative) set to 0: the square root would turn noise of 1e-14 into an error of 1e-7."""
    floor = values.abs().max() * values.shape[0] * torch.finfo(values.dtype).eps
    return torch.where(values > floor, values, 0.0)


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric PSD matrix by eigendecomposition: stays real and
    accurate where the matrix is near-singular, where Newton-Schulz iterations and scipy's sqrtm
    lose digits or return complex noise."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * _psd_eigenvalues(values).sqrt()) @ vectors.T


def frechet_distance(real: Any, fake: Any) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, "GANs
    trained by a two time-scale update rule converge to a local Nash equilibrium"; FID with
    Inception features):

        FD = ||mu_r - mu_f||^2 + tr(S_r + S_f - 2 (S_r^1/2 S_f S_r^1/2)^1/2)

    in float64; the trace of the matrix root is the sum of the square roots of the eigenvalues
    of the symmetric PSD matrix ``S_r^1/2 S_f S_r^1/2``, which equals ``tr((S_r S_f)^1/2)``.

    Args:
        real, fake: features ``(n, d)`` and ``(m, d)``, or ``(mean, covariance)`` pairs from
            :func:`gaussian_stats`.

    Returns:
        FD >= 0 (0 for identical sets, up to rounding).
    """
    (mu_r, cov_r), (mu_f, cov_f) = (_stats(real, "real"), _stats(fake, "fake"))
    if mu_r.shape != mu_f.shape:
        raise ValueError(f"fake: expected {mu_r.shape[0]} features (as real), got {mu_f.shape[0]}")
    root_r = _psd_sqrt(cov_r)
    product = root_r @ cov_f @ root_r
    cross = _psd_eigenvalues(torch.linalg.eigvalsh((product + product.T) / 2)).sqrt().sum()
    value = (mu_r - mu_f).square().sum() + cov_r.trace() + cov_f.trace() - 2 * cross
    return max(float(value), 0.0)


def _stats(x: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, covariance) from features, or as given in a tuple (float64, CPU, checked)."""
    if isinstance(x, tuple):
        mean, cov = (torch.as_tensor(t).detach().to(device="cpu", dtype=torch.float64) for t in x)
        if mean.dim() != 1 or cov.shape != (mean.shape[0], mean.shape[0]):
            raise ValueError(f"{name}: expected (mean (d,), covariance (d, d)), got shapes "
                             f"{tuple(mean.shape)}, {tuple(cov.shape)}")
        if not (torch.isfinite(mean).all() and torch.isfinite(cov).all()):
            raise ValueError(f"{name}: expected finite statistics")
        return mean, cov
    try:
        return gaussian_stats(x)
    except (TypeError, ValueError) as err:
        raise type(err)(str(err).replace("features", name, 1)) from None


def kid(real: Any, fake: Any, *, subsets: int = 100, subset_size: int = 1000,
        generator: torch.Generator | None = None) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs"): the unbiased
    estimate of MMD^2 with the cubic polynomial kernel ``k(a, b) = (a.b / d + 1)^3``, averaged
    over ``subsets`` random subsets of ``min(subset_size, n, m)`` rows of each set.

    Returns:
        (mean, standard deviation) over the subsets; the mean is about 0 for one distribution
        (it may be slightly negative: the estimate is unbiased).
    """
    x = _check_features("real", real)
    y = _check_features("fake", fake, x.shape[1])
    for name, value, minimum in (("subsets", subsets, 1), ("subset_size", subset_size, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    size = min(subset_size, x.shape[0], y.shape[0])
    d = x.shape[1]
    values = []
    for _ in range(subsets):
        a = x[torch.randperm(x.shape[0], generator=generator)[:size]]
        b = y[torch.randperm(y.shape[0], generator=generator)[:size]]
        k_aa, k_bb, k_ab = ((u @ v.T / d + 1) ** 3 for u, v in ((a, a), (b, b), (a, b)))
        off_diagonal = size * (size - 1)
        values.append((k_aa.sum() - k_aa.diagonal().sum()) / off_diagonal
                      + (k_bb.sum() - k_bb.diagonal().sum()) / off_diagonal - 2 * k_ab.mean())
    values = torch.stack(values)
    return float(values.mean()), float(values.std(unbiased=False))


# Rows of a distance block: a 10k x 10k comparison holds 1024 x 10k float64 (80 MB) at a time.
_DISTANCE_CHUNK = 1024


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances, each pair computed the same way whatever the block it is in
    (``cdist``'s matmul form rounds by block shape, and a point on a k-NN radius would be in or
    out by rounding)."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def _check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected an int >= 1, got {k!r}")
    return k


def _balls_containing(queries: torch.Tensor, points: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """For each query row, how many ``points`` balls (centre, radius) contain it: ``(n_queries,)``."""
    counts = torch.empty(queries.shape[0], dtype=torch.int64)
    for start in range(0, queries.shape[0], _DISTANCE_CHUNK):
        dist = _distances(queries[start:start + _DISTANCE_CHUNK], points)
        counts[start:start + _DISTANCE_CHUNK] = (dist <= radii[None, :]).sum(1)
    return counts


def _knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each row to its k-th nearest other row."""
    if _check_k(k) >= x.shape[0]:
        raise ValueError(f"k: expected fewer than the {x.shape[0]} rows of a set, got {k}")
    radii = torch.empty(x.shape[0], dtype=torch.float64)
    for start in range(0, x.shape[0], _DISTANCE_CHUNK):
        dist = _distances(x[start:start + _DISTANCE_CHUNK], x)
        radii[start:start + _DISTANCE_CHUNK] = dist.kthvalue(k + 1, dim=1).values  # +1: itself
    return radii


def precision_recall(real: Any, fake: Any, *, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, "Improved precision and recall
    metric for assessing generative models"): each set's manifold is the union of balls around
    its rows with radius the distance to the k-th nearest neighbour in the same set;
    precision = fraction of fake rows inside the real manifold, recall = fraction of real rows
    inside the fake manifold.
    """
    x = _check_features("real", real)
    y = _check_features("fake", fake, x.shape[1])
    precision = (_balls_containing(y, x, _knn_radii(x, k)) > 0).double().mean()
    recall = (_balls_containing(x, y, _knn_radii(y, k)) > 0).double().mean()
    return float(precision), float(recall)


def density_coverage(real: Any, fake: Any, *, k: int = 5) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020, "Reliable fidelity and diversity metrics for
    generative models"), with B(x_i, r_i) the ball around real row i of radius its k-NN distance:

        density  = 1 / (k m) * sum_j sum_i 1[y_j in B(x_i, r_i)]
        coverage = 1 / n * sum_i 1[some y_j in B(x_i, r_i)]

    Density is about 1 for matching distributions (it can exceed 1); coverage is in [0, 1].
    """
    x = _check_features("real", real)
    y = _check_features("fake", fake, x.shape[1])
    radii = _knn_radii(x, k)
    density = _balls_containing(y, x, radii).sum() / (k * y.shape[0])
    covered = torch.zeros(x.shape[0], dtype=torch.bool)
    for start in range(0, y.shape[0], _DISTANCE_CHUNK):
        dist = _distances(y[start:start + _DISTANCE_CHUNK], x)
        covered |= (dist <= radii[None, :]).any(0)
    return float(density), float(covered.double().mean())


# ----------------------------------------------------------------------------------------------
# Baselines of auto-encoders and density models


def pca_fit(data: Any, components: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal component analysis (the optimal linear auto-encoder, Baldi & Hornik 1989): the
    mean ``(D,)`` and the ``components`` leading eigenvectors ``(components, D)`` of the
    covariance of ``data`` ``(n, D)`` (any trailing shape is flattened), by ``torch.linalg.eigh``
    in float64."""
    x = _check_features("data", torch.as_tensor(data).flatten(1))
    if not 1 <= components <= x.shape[1]:
        raise ValueError(f"components: expected 1..{x.shape[1]}, got {components}")
    mean = x.mean(0)
    centered = x - mean
    _, vectors = torch.linalg.eigh(centered.T @ centered)  # eigenvalues ascending
    return mean, vectors[:, -components:].flip(1).T.contiguous()


def pca_mse(data: Any, mean: torch.Tensor, components: torch.Tensor) -> float:
    """Mean squared error per element of the PCA reconstruction
    ``mean + (x - mean) V^T V`` of ``data`` ``(n, ...)``, with ``V`` = ``components`` ``(k, D)``."""
    x = _check_features("data", torch.as_tensor(data).flatten(1), mean.shape[0], minimum=1)
    centered = x - mean
    residual = centered - centered @ components.T @ components
    return float(residual.square().mean())


def bits_per_dim(nats_per_item: float, dims: int) -> float:
    """A negative log-likelihood in nats per item as bits per dimension: ``nats / (dims ln 2)``."""
    return nats_per_item / (dims * math.log(2))
