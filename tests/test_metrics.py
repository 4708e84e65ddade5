"""Tests for fastgen.metrics.mode_coverage / evaluate_mixture on hand-made sets."""

import math
from types import SimpleNamespace

import pytest
import torch

from fastgen.data import mixture2d, ring8_means, grid25_means
from fastgen.metrics import ModeCoverage, evaluate_mixture, mode_coverage


@pytest.mark.parametrize("means_fn, std", [(ring8_means, 0.01), (grid25_means, 0.05)])
def test_all_modes_exact(means_fn, std):
    means = means_fn()
    k = means.shape[0]
    samples = means.repeat(10, 1)
    r = mode_coverage(samples, means, std)
    assert isinstance(r, ModeCoverage)
    assert r.modes_covered == k and r.num_modes == k
    assert r.high_quality_fraction == 1.0
    assert r.reverse_kl == pytest.approx(0.0, abs=1e-12)
    assert r.counts == [10] * k


def test_all_at_one_mode():
    means = ring8_means()
    samples = means[3].expand(50, 2)
    r = mode_coverage(samples, means, 0.01)
    assert r.modes_covered == 1 and r.high_quality_fraction == 1.0
    assert r.reverse_kl == pytest.approx(math.log(8), rel=1e-12)
    assert r.counts == [0, 0, 0, 50, 0, 0, 0, 0]


def test_off_mode_samples():
    means = grid25_means()
    samples = torch.tensor([[1.0, 1.0], [100.0, -3.0], [-3.0, 3.0]])  # all far away
    r = mode_coverage(samples, means, 0.05)
    assert r.modes_covered == 0 and r.high_quality_fraction == 0.0
    assert r.reverse_kl == math.inf and r.counts == [0] * 25


def test_mixed_case_exact():
    means = ring8_means().double()
    std = 0.01  # threshold 0.03
    samples = torch.stack([
        means[0], means[0], means[0],                   # 3 at mode 0
        means[1],                                       # 1 at mode 1
        means[2] + torch.tensor([0.02, 0.0], dtype=torch.float64),   # within 3 std of mode 2
        means[3] + torch.tensor([0.0, 0.05], dtype=torch.float64),   # 5 std off mode 3: LQ
        torch.tensor([10.0, 10.0], dtype=torch.float64),             # far away
        torch.tensor([0.0, 0.0], dtype=torch.float64),               # centre: far from all
    ])
    r = mode_coverage(samples, means, std)
    assert r.counts == [3, 1, 1, 0, 0, 0, 0, 0]
    assert r.modes_covered == 3
    assert r.high_quality_fraction == 5 / 8
    expected_kl = 0.6 * math.log(8 * 0.6) + 2 * 0.2 * math.log(8 * 0.2)
    assert r.reverse_kl == pytest.approx(expected_kl, rel=1e-12)
    # a looser threshold picks up the mode-3 sample
    r5 = mode_coverage(samples, means, std, threshold_std=6.0)
    assert r5.modes_covered == 4 and r5.high_quality_fraction == 6 / 8


def test_exact_threshold_is_high_quality():
    """Distance exactly threshold_std * std counts as high quality (``<=``)."""
    means = ring8_means()
    on_boundary = means[0] + torch.tensor([0.75, 0.0])  # (1.75, 0): 3 * 0.25 from mode 0
    r = mode_coverage(on_boundary[None], means, 0.25)
    assert r.high_quality_fraction == 1.0 and r.counts == [1, 0, 0, 0, 0, 0, 0, 0]
    just_outside = torch.tensor([[math.nextafter(1.75, math.inf), 0.0]], dtype=torch.float64)
    r = mode_coverage(just_outside, means, 0.25)
    assert r.high_quality_fraction == 0.0 and r.modes_covered == 0


def test_nonfinite_samples_are_low_quality():
    means = ring8_means()
    samples = torch.stack([means[0], torch.tensor([float("nan"), 0.0]), torch.tensor([float("inf"), 1.0])])
    r = mode_coverage(samples, means, 0.01)
    assert r.counts[0] == 1 and sum(r.counts) == 1
    assert r.high_quality_fraction == pytest.approx(1 / 3)


def test_evaluate_mixture_on_true_samples():
    mix = mixture2d("grid25")
    s = mix.sample(5000, generator=torch.Generator().manual_seed(0))
    r = evaluate_mixture(s, mix)
    assert r.modes_covered == 25 and r.num_modes == 25
    assert r.high_quality_fraction > 0.97  # chi2(2) mass within 3 std ~ 0.989
    assert r.reverse_kl < 0.02
    # duck typing
    r2 = evaluate_mixture(s, SimpleNamespace(means=mix.means, std=mix.std))
    assert r2 == r
    assert r.as_dict()["modes_covered"] == 25


def test_shape_validation():
    means = ring8_means()
    with pytest.raises(ValueError, match="samples"):
        mode_coverage(torch.zeros(5, 3), means, 0.01)
    with pytest.raises(ValueError, match="samples"):
        mode_coverage(torch.zeros(5), means, 0.01)
    with pytest.raises(ValueError, match="samples"):
        mode_coverage(torch.zeros(0, 2), means, 0.01)
    with pytest.raises(ValueError, match="means"):
        mode_coverage(torch.zeros(5, 2), torch.zeros(8), 0.01)
    with pytest.raises(ValueError, match="std"):
        mode_coverage(torch.zeros(5, 2), means, 0.0)
    with pytest.raises(ValueError, match="threshold_std"):
        mode_coverage(torch.zeros(5, 2), means, 0.01, threshold_std=-1)
    with pytest.raises(TypeError, match="means"):
        evaluate_mixture(torch.zeros(5, 2), object())


def test_type_validation_and_array_likes():
    means = ring8_means()
    with pytest.raises(TypeError, match="samples must have a real"):
        mode_coverage(torch.zeros(5, 2, dtype=torch.bool), means, 0.01)
    with pytest.raises(TypeError, match="samples must have a real"):
        mode_coverage(torch.zeros(5, 2, dtype=torch.complex64), means, 0.01)
    with pytest.raises(TypeError, match="means must have a real"):
        mode_coverage(torch.zeros(5, 2), means.to(torch.complex64), 0.01)
    # array-likes and integer dtypes are accepted
    r = mode_coverage([[1, 0], [0, 1]], means.tolist(), 0.01)
    assert r.counts == [1, 0, 1, 0, 0, 0, 0, 0] and r.modes_covered == 2


# ----------------------------------------------------------------------------------------------
# Feature-space metrics

import fastgen.metrics  # noqa: E402
from fastgen.metrics import density_coverage, frechet_distance, gaussian_stats, kid, precision_recall  # noqa: E402


def _gaussian(n, mean, std, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, len(mean), generator=gen, dtype=torch.float64) * torch.tensor(std) + torch.tensor(mean)


def test_frechet_distance_closed_form_between_known_gaussians():
    # Commuting (diagonal) covariances: FD = ||mu1 - mu2||^2 + sum (s1 - s2)^2 over the stds.
    f64 = dict(dtype=torch.float64)
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0], **f64), torch.tensor([1.0, 1.0, 0.5], **f64)
    s1, s2 = torch.tensor([1.0, 2.0, 0.5], **f64), torch.tensor([3.0, 0.1, 0.5], **f64)
    expected = float((mu1 - mu2).square().sum() + (s1 - s2).square().sum())
    fd = frechet_distance((mu1, torch.diag(s1 ** 2)), (mu2, torch.diag(s2 ** 2)))
    assert fd == pytest.approx(expected, rel=1e-12)
    # A rotated pair: the distance is rotation invariant.
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    rotated = frechet_distance((q @ mu1, q @ torch.diag(s1 ** 2) @ q.T), (q @ mu2, q @ torch.diag(s2 ** 2) @ q.T))
    assert rotated == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_identical_and_near_singular_sets():
    x = _gaussian(500, [0.0] * 8, [1.0] * 8, 0)
    assert frechet_distance(x, x) < 1e-6
    # Rank-deficient features (16 dims spanned by 4): still real, accurate, and 0 against itself.
    low = _gaussian(300, [0.0] * 4, [1.0] * 4, 1) @ torch.randn(4, 16, dtype=torch.float64,
                                                                generator=torch.Generator().manual_seed(2))
    assert frechet_distance(low, low) < 1e-6
    shifted = frechet_distance(low, low + 1.0)
    assert shifted == pytest.approx(16.0, rel=1e-9)  # the mean shift alone: 16 * 1^2


def test_gaussian_stats_and_bad_input():
    x = _gaussian(10000, [1.0, -1.0], [2.0, 0.5], 3)
    mean, cov = gaussian_stats(x)
    assert torch.allclose(mean, torch.tensor([1.0, -1.0], dtype=torch.float64), atol=0.05)
    assert torch.allclose(cov.diagonal(), torch.tensor([4.0, 0.25], dtype=torch.float64), rtol=0.05)
    with pytest.raises(ValueError, match="fake: expected 2 features"):
        frechet_distance(x, torch.zeros(5, 3))
    with pytest.raises(ValueError, match="real: expected finite"):
        precision_recall(torch.full((4, 2), float("nan")), x)


def test_kid_is_zero_for_one_distribution_and_grows_with_a_shift():
    x, y = _gaussian(400, [0.0] * 4, [1.0] * 4, 4), _gaussian(400, [0.0] * 4, [1.0] * 4, 5)
    same, same_std = kid(x, y, subsets=20, subset_size=200, generator=torch.Generator().manual_seed(0))
    assert abs(same) < 3 * same_std + 1e-3
    far, _ = kid(x, y + 2.0, subsets=20, subset_size=200, generator=torch.Generator().manual_seed(0))
    assert far > 0.5


def test_kid_known_answer_on_two_points():
    # Subsets of 2 rows of d = 1, k(a, b) = (ab + 1)^3, x = {0, 1}, y = {2, 2}: the off-diagonal
    # k_xx = k(0, 1) = 1, k_yy = k(2, 2) = 125, mean k_xy = (1 + 1 + 27 + 27) / 4 = 14:
    # MMD^2 = 1 + 125 - 2 * 14 = 98.
    x = torch.tensor([[0.0], [1.0]])
    assert kid(x, torch.tensor([[2.0], [2.0]]), subsets=3, subset_size=2)[0] == pytest.approx(98.0)


def test_precision_recall_identical_disjoint_and_known_answer():
    x = _gaussian(300, [0.0, 0.0], [1.0, 1.0], 6)
    assert precision_recall(x, x, k=3) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0, k=3) == (0.0, 0.0)
    # Real points 0, 1, 2, 3 on a line (k = 1: every radius 1); fake 0.5 and 10: precision 1/2;
    # the fake radii are 9.5 each (the other fake point), so every real point is covered: recall 1.
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    fake = torch.tensor([[0.5], [10.0]])
    assert precision_recall(real, fake, k=1) == (0.5, 1.0)


def test_density_coverage_identical_disjoint_and_known_answer():
    x = _gaussian(400, [0.0, 0.0], [1.0, 1.0], 7)
    # Identical sets: each ball holds its centre and its k neighbours (the k-th on its edge).
    assert density_coverage(x, x, k=5) == (pytest.approx(6 / 5), 1.0)
    # An independent draw of the same distribution: density about 1.
    density, coverage = density_coverage(x, _gaussian(400, [0.0, 0.0], [1.0, 1.0], 17), k=5)
    assert density == pytest.approx(1.0, abs=0.15) and coverage > 0.9
    assert density_coverage(x, x + 100.0, k=5) == (0.0, 0.0)
    # Real 0, 1, 2, 3 with k = 1 (radius 1 each); fake 0.5 lies in the balls of 0 and 1,
    # fake 3 in those of 2 and 3: density = 4 / (1 * 2) = 2, coverage = 4 / 4.
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    assert density_coverage(real, torch.tensor([[0.5], [3.0]]), k=1) == (2.0, 1.0)
    with pytest.raises(ValueError, match="k: expected fewer than the 4 rows"):
        density_coverage(real, real, k=4)
    with pytest.raises(ValueError, match="k: expected an int >= 1"):
        precision_recall(real, real, k=0)
    with pytest.raises(ValueError, match="subset_size: expected an int >= 2"):
        kid(real, real, subset_size=1)
    with pytest.raises(ValueError, match="fake: expected finite statistics"):
        frechet_distance(real, (torch.zeros(1), torch.full((1, 1), float("nan"))))


def test_neighbour_metrics_do_not_depend_on_the_chunking(monkeypatch):
    """Distances go in blocks of rows (bounded memory for 10k x 10k sets): blocks of 7 rows give
    the numbers of one block."""
    x = _gaussian(60, [0.0] * 3, [1.0] * 3, 8)
    y = _gaussian(50, [0.3] * 3, [1.0] * 3, 9)
    whole = precision_recall(x, y), density_coverage(x, y)
    monkeypatch.setattr(fastgen.metrics, "_DISTANCE_CHUNK", 7)
    assert (precision_recall(x, y), density_coverage(x, y)) == whole
