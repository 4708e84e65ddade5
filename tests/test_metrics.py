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
