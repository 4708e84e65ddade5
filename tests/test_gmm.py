"""Tests for fastgen.models.gmm.GaussianMixture (CPU, fast)."""

from __future__ import annotations

import io
import math

import pytest
import torch

from fastgen.models.gmm import GaussianMixture

TRUE_MEANS = torch.tensor([[-5.0, 0.0], [5.0, 0.0], [0.0, 6.0]], dtype=torch.float64)
TRUE_WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
TRUE_COVS = torch.stack(
    [
        torch.tensor([[1.0, 0.3], [0.3, 0.5]]),
        torch.tensor([[0.6, -0.2], [-0.2, 1.2]]),
        torch.tensor([[0.8, 0.0], [0.0, 0.8]]),
    ]
).double()


def make_data(n: int = 1500, seed: int = 0) -> torch.Tensor:
    """Well-separated 3-component mixture in 2D (exact counts per component)."""
    g = torch.Generator().manual_seed(seed)
    counts = (TRUE_WEIGHTS * n).round().long().tolist()
    chunks = []
    for k, c in enumerate(counts):
        z = torch.randn(c, 2, generator=g, dtype=torch.float64)
        chunks.append(TRUE_MEANS[k] + z @ torch.linalg.cholesky(TRUE_COVS[k]).T)
    x = torch.cat(chunks)
    return x[torch.randperm(n, generator=g)]


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return make_data()


def match_components(est_means: torch.Tensor, true_means: torch.Tensor) -> torch.Tensor:
    """perm[k] = index of the estimated component closest to true component k."""
    perm = torch.cdist(true_means, est_means).argmin(1)
    assert sorted(perm.tolist()) == list(range(len(true_means)))
    return perm


# ------------------------------------------------------------------ recovery
@pytest.mark.parametrize("covariance_type", ["full", "diag"])
@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_fit_recovers_parameters(data, covariance_type, init):
    # "random" init starts all means near the data mean, where the likelihood
    # is flat: with the default tol=1e-3, EM (ours and sklearn's alike) stops
    # after 2 iterations, so use a tight tol for it.
    tol = 1e-3 if init == "kmeans++" else 1e-6
    gmm = GaussianMixture(
        3, covariance_type=covariance_type, init=init, seed=0, tol=tol, max_iter=300
    )
    gmm.fit(data)
    assert gmm.converged_
    perm = match_components(gmm.means, TRUE_MEANS)
    assert torch.allclose(gmm.means[perm], TRUE_MEANS, atol=0.2)
    assert torch.allclose(gmm.weights[perm], TRUE_WEIGHTS, atol=0.02)
    assert torch.isclose(gmm.weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    if covariance_type == "full":
        assert gmm.covariances.shape == (3, 2, 2)
        assert torch.allclose(gmm.covariances[perm], TRUE_COVS, atol=0.2)
    else:
        assert gmm.covariances.shape == (3, 2)
        diag = torch.diagonal(TRUE_COVS, dim1=-2, dim2=-1)
        assert torch.allclose(gmm.covariances[perm], diag, atol=0.2)
    # predict agrees with the (permuted) generating structure on most points
    labels = gmm.predict(data)
    assert labels.shape == (len(data),) and labels.dtype == torch.long
    proba = gmm.predict_proba(data)
    assert proba.shape == (len(data), 3)
    assert torch.allclose(proba.sum(1), torch.ones(len(data), dtype=torch.float64))
    assert torch.equal(proba.argmax(1), labels)


def test_lower_bound_is_mean_loglik_and_float32_input(data):
    gmm = GaussianMixture(3, seed=1, tol=1e-8, max_iter=500).fit(data)
    assert gmm.converged_
    # at convergence the last E-step bound equals the final score
    assert abs(gmm.lower_bound_ - gmm.score(data)) < 1e-6
    # float32 data: computation still in float64, output in float32
    gmm32 = GaussianMixture(3, seed=1, tol=1e-8, max_iter=500).fit(data.float())
    assert gmm32.means.dtype == torch.float64
    lp = gmm32.log_prob(data.float())
    assert lp.dtype == torch.float32 and lp.shape == (len(data),)
    assert abs(gmm32.score(data) - gmm.score(data)) < 1e-4


# ------------------------------------------------------------- vs sklearn
@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_log_prob_matches_sklearn_given_parameters(data, covariance_type):
    skm = pytest.importorskip("sklearn.mixture")
    sk = skm.GaussianMixture(3, covariance_type=covariance_type, random_state=0).fit(data.numpy())
    ours = GaussianMixture.from_parameters(
        torch.from_numpy(sk.weights_),
        torch.from_numpy(sk.means_),
        torch.from_numpy(sk.covariances_),
        covariance_type=covariance_type,
    )
    # also off-data points, far in the tails
    g = torch.Generator().manual_seed(3)
    pts = torch.cat([data, 15 * torch.randn(200, 2, generator=g, dtype=torch.float64)])
    ref = torch.from_numpy(sk.score_samples(pts.numpy()))
    lp = ours.log_prob(pts)
    assert (lp - ref).abs().max().item() < 1e-8
    assert torch.allclose(
        ours.precisions_cholesky, torch.from_numpy(sk.precisions_cholesky_), atol=1e-10
    )
    ref_proba = torch.from_numpy(sk.predict_proba(pts.numpy()))
    assert torch.allclose(ours.predict_proba(pts), ref_proba, atol=1e-8)
    assert abs(ours.bic(data) - sk.bic(data.numpy())) < 1e-6
    assert abs(ours.aic(data) - sk.aic(data.numpy())) < 1e-6


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_independent_fit_reaches_sklearn_optimum(data, covariance_type):
    skm = pytest.importorskip("sklearn.mixture")
    sk = skm.GaussianMixture(
        3, covariance_type=covariance_type, tol=1e-6, max_iter=500, random_state=0
    ).fit(data.numpy())
    ours = GaussianMixture(3, covariance_type=covariance_type, tol=1e-6, max_iter=500, seed=0)
    ours.fit(data)
    assert ours.converged_ and sk.converged_
    assert abs(ours.score(data) - sk.score(data.numpy())) < 1e-3


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_em_step_matches_sklearn_from_same_start(data, covariance_type):
    """One EM iteration from identical parameters gives identical parameters."""
    skm = pytest.importorskip("sklearn.mixture")
    sk = skm.GaussianMixture(
        3, covariance_type=covariance_type, random_state=0, max_iter=2
    ).fit(data.numpy())
    ours = GaussianMixture.from_parameters(
        torch.from_numpy(sk.weights_),
        torch.from_numpy(sk.means_),
        torch.from_numpy(sk.covariances_),
        covariance_type=covariance_type,
    )
    _, log_resp_sk = sk._e_step(data.numpy())
    sk._m_step(data.numpy(), log_resp_sk)
    _, log_resp = ours._e_step(data)
    ours._m_step(data, log_resp.exp())
    assert torch.allclose(ours.means, torch.from_numpy(sk.means_), atol=1e-10)
    assert torch.allclose(ours.covariances, torch.from_numpy(sk.covariances_), atol=1e-10)
    assert torch.allclose(ours.weights, torch.from_numpy(sk.weights_), atol=1e-12)


def test_diag_covariance_is_centred_far_from_origin():
    """Data at 1e4 with std 1e-2: E[x^2] - mean^2 would lose ~12 digits."""
    g = torch.Generator().manual_seed(0)
    x = 1e4 + 1e-2 * torch.randn(2000, 3, generator=g, dtype=torch.float64)
    gmm = GaussianMixture(1, covariance_type="diag", reg_covar=1e-6, seed=0).fit(x)
    expected = ((x - x.mean(0)) ** 2).mean(0) + 1e-6
    rel = ((gmm.covariances[0] - expected).abs() / expected).max().item()
    assert rel < 1e-6
    torch.testing.assert_close(gmm.means[0], x.mean(0), rtol=1e-14, atol=0)
    # the full model agrees on the diagonal
    full = GaussianMixture(1, covariance_type="full", reg_covar=1e-6, seed=0).fit(x)
    torch.testing.assert_close(
        torch.diagonal(full.covariances[0]), gmm.covariances[0], rtol=1e-9, atol=0
    )


# ---------------------------------------------------------------- sampling
@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_sample_statistics(covariance_type):
    covs = TRUE_COVS if covariance_type == "full" else torch.diagonal(TRUE_COVS, dim1=-2, dim2=-1)
    gmm = GaussianMixture.from_parameters(
        TRUE_WEIGHTS, TRUE_MEANS, covs, covariance_type=covariance_type
    )
    n = 40_000
    x, comp = gmm.sample(n, generator=torch.Generator().manual_seed(0))
    assert x.shape == (n, 2) and comp.shape == (n,)
    assert x.dtype == torch.float64 and comp.dtype == torch.long
    freq = torch.bincount(comp, minlength=3).double() / n
    assert torch.allclose(freq, TRUE_WEIGHTS, atol=0.01)
    for k in range(3):
        xk = x[comp == k]
        assert torch.allclose(xk.mean(0), TRUE_MEANS[k], atol=0.05)
        emp_cov = torch.cov(xk.T)
        if covariance_type == "full":
            assert torch.allclose(emp_cov, TRUE_COVS[k], atol=0.06)
        else:
            assert torch.allclose(torch.diagonal(emp_cov), covs[k], atol=0.06)
            assert abs(emp_cov[0, 1].item()) < 0.06
    # seeded generator -> reproducible samples
    x2, comp2 = gmm.sample(n, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(comp, comp2)
    x0, c0 = gmm.sample(0)
    assert x0.shape == (0, 2) and c0.shape == (0,)


# ---------------------------------------------------------- normalization
@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_density_integrates_to_one_2d(covariance_type):
    covs = TRUE_COVS if covariance_type == "full" else torch.diagonal(TRUE_COVS, dim1=-2, dim2=-1)
    gmm = GaussianMixture.from_parameters(
        TRUE_WEIGHTS, TRUE_MEANS, covs, covariance_type=covariance_type
    )
    xs = torch.linspace(-12.0, 12.0, 481, dtype=torch.float64)
    ys = torch.linspace(-7.0, 13.0, 401, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, ys, indexing="ij")
    pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    dens = gmm.log_prob(pts).exp().reshape(len(xs), len(ys))
    total = torch.trapezoid(torch.trapezoid(dens, ys, dim=1), xs, dim=0)
    assert abs(total.item() - 1.0) < 1e-4


def test_density_integrates_to_one_1d_fitted():
    g = torch.Generator().manual_seed(0)
    x = torch.cat(
        [torch.randn(300, 1, generator=g) - 3, 0.5 * torch.randn(200, 1, generator=g) + 2]
    )
    gmm = GaussianMixture(2, seed=0).fit(x.double())
    grid = torch.linspace(-15, 15, 20001, dtype=torch.float64)
    total = torch.trapezoid(gmm.log_prob(grid[:, None]).exp(), grid)
    assert abs(total.item() - 1.0) < 1e-6


def test_log_prob_stable_far_from_data(data):
    gmm = GaussianMixture(3, seed=0).fit(data)
    far = torch.tensor([[1e4, -1e4], [1e6, 0.0]], dtype=torch.float64)
    lp = gmm.log_prob(far)
    assert torch.isfinite(lp).all() and (lp < -1e6).all()
    proba = gmm.predict_proba(far)
    assert torch.isfinite(proba).all()
    assert torch.allclose(proba.sum(1), torch.ones(2, dtype=torch.float64))


def test_log_prob_differentiable(data):
    gmm = GaussianMixture(3, seed=0).fit(data)
    x = data[:5].clone().requires_grad_(True)
    gmm.log_prob(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ------------------------------------------------------ state / determinism
@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_state_dict_round_trip(data, covariance_type):
    gmm = GaussianMixture(3, covariance_type=covariance_type, seed=0).fit(data)
    buf = io.BytesIO()
    torch.save(gmm.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    fresh = GaussianMixture(3, covariance_type=covariance_type)
    with pytest.raises(RuntimeError, match="fit"):
        fresh.log_prob(data)
    fresh.load_state_dict(sd)
    assert fresh.is_fitted
    assert torch.equal(fresh.log_prob(data), gmm.log_prob(data))
    assert fresh.converged_ == gmm.converged_ and fresh.n_iter_ == gmm.n_iter_
    assert fresh.lower_bound_ == gmm.lower_bound_
    for name in ("weights", "means", "covariances", "precisions_cholesky"):
        assert torch.equal(getattr(fresh, name), getattr(gmm, name))
    # loading into an incompatible model fails loudly
    with pytest.raises(RuntimeError, match="n_components=3 but this model has n_components=2"):
        GaussianMixture(2, covariance_type=covariance_type).load_state_dict(sd)


def test_determinism_with_seed(data):
    a = GaussianMixture(3, seed=123).fit(data)
    b = GaussianMixture(3, seed=123).fit(data)
    assert torch.equal(a.means, b.means) and torch.equal(a.covariances, b.covariances)
    assert a.n_iter_ == b.n_iter_ and a.lower_bound_ == b.lower_bound_
    c = GaussianMixture(3, init="random", seed=7).fit(data)
    d = GaussianMixture(3, init="random", seed=7).fit(data)
    assert torch.equal(c.means, d.means)


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_seed_none_follows_torch_global_rng(data, init):
    def fit(s):
        torch.manual_seed(s)
        return GaussianMixture(3, init=init, max_iter=1).fit(data)

    a, b = fit(1), fit(1)
    assert torch.equal(a.means, b.means) and torch.equal(a.covariances, b.covariances)
    assert a.lower_bound_ == b.lower_bound_
    # a different global seed gives a different initialisation
    assert not torch.equal(fit(2).means, a.means)


# ------------------------------------------------------------------ errors
def test_fit_errors_name_x():
    gmm = GaussianMixture(3)
    with pytest.raises(ValueError, match="`x`"):
        gmm.fit(torch.randn(2, 2, dtype=torch.float64))  # N < n_components
    with pytest.raises(ValueError, match="`x`"):
        gmm.fit(torch.randn(10, dtype=torch.float64))  # wrong rank
    with pytest.raises(ValueError, match="`x`"):
        gmm.fit(torch.randn(2, 10, 2))  # wrong rank
    with pytest.raises(TypeError, match="`x` must have a floating dtype"):
        gmm.fit(torch.ones(10, 2, dtype=torch.int64))  # non-floating
    with pytest.raises(TypeError, match="`x` must be a torch.Tensor"):
        gmm.fit([[0.0, 1.0]] * 10)
    bad = torch.randn(10, 2)
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="`x`"):
        gmm.fit(bad)
    bad[3, 1] = float("inf")
    with pytest.raises(ValueError, match="`x`"):
        gmm.fit(bad)


def test_not_fitted_errors():
    gmm = GaussianMixture(2)
    x = torch.randn(5, 2)
    for fn in (gmm.log_prob, gmm.score, gmm.predict, gmm.predict_proba):
        with pytest.raises(RuntimeError, match="fit"):
            fn(x)
    with pytest.raises(RuntimeError, match="fit"):
        gmm.sample(3)


def test_eval_input_errors(data):
    gmm = GaussianMixture(3, seed=0).fit(data)
    with pytest.raises(ValueError, match="`x`"):
        gmm.log_prob(torch.randn(4, 3))  # wrong number of features
    with pytest.raises(TypeError, match="`x` must have a floating dtype"):
        gmm.log_prob(torch.ones(4, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="`n` must be an int"):
        gmm.sample(2.0)
    with pytest.raises(ValueError, match="`n` must be an int >= 0"):
        gmm.sample(-1)


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        ({"n_components": 0}, ValueError, "n_components"),
        ({"n_components": 2.5}, TypeError, "n_components"),
        ({"n_components": True}, TypeError, "n_components"),
        ({"covariance_type": "spherical"}, ValueError, "covariance_type"),
        ({"tol": -1.0}, ValueError, "tol"),
        ({"tol": float("nan")}, ValueError, "tol"),
        ({"tol": "1e-3"}, TypeError, "tol"),
        ({"max_iter": 0}, ValueError, "max_iter"),
        ({"max_iter": 10.0}, TypeError, "max_iter"),
        ({"reg_covar": -1e-3}, ValueError, "reg_covar"),
        ({"reg_covar": None}, TypeError, "reg_covar"),
        ({"init": "kmeans"}, ValueError, "init"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"seed": False}, TypeError, "seed"),
        ({"dtype": torch.int64}, TypeError, "dtype"),
        ({"dtype": None}, TypeError, "dtype"),
    ],
)
def test_constructor_validation(kwargs, exc, name):
    kw = {"n_components": 2, **kwargs}
    n = kw.pop("n_components")
    with pytest.raises(exc, match=f"`{name}`"):
        GaussianMixture(n, **kw)


def test_from_parameters_validation():
    w = torch.tensor([0.5, 0.5])
    mu = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="covariances"):
        GaussianMixture.from_parameters(w, mu, torch.ones(2, 3), covariance_type="full")
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture.from_parameters(
            torch.tensor([0.5, 0.6]), mu, torch.ones(2, 3), covariance_type="diag"
        )
    m = GaussianMixture.from_parameters(w, mu, torch.ones(2, 3), covariance_type="diag")
    # standard normal in 3D at the origin
    lp0 = m.log_prob(torch.zeros(1, 3, dtype=torch.float64)).item()
    assert math.isclose(lp0, -1.5 * math.log(2 * math.pi), rel_tol=1e-12)
