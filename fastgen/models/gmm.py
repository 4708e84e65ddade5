"""Gaussian mixture model fitted by EM: the explicit-density baseline.

:class:`GaussianMixture` is a small, dependency-free (torch only) port of the
semantics of ``sklearn.mixture.GaussianMixture`` (``n_init=1``):

* M-step: ``weights = Nk / sum(Nk)``, ``Nk = sum_n resp[n, k] + 10 * eps``;
  ``reg_covar`` is added to the diagonal of every estimated covariance.
  Covariances (full and diag) are computed in the centred form
  ``sum_n resp[n, k] (x_n - mu_k)^2 / Nk`` (sklearn's diag uses
  ``E[x^2] - mu^2``, which cancels catastrophically for data far from 0).
* Densities are evaluated through the Cholesky factor of the *precision*
  matrix (``precisions_cholesky``), exactly like scikit-learn, so that
  ``log N(x | mu, Sigma) = -D/2 log(2 pi) + log|P| - 1/2 ||(x - mu) P||^2``
  with ``P P^T = Sigma^{-1}``.
* Convergence: the lower bound is the mean per-sample log-likelihood computed
  in the E-step; EM stops when it changes by less than ``tol`` between two
  iterations, or after ``max_iter`` iterations.

All arithmetic is done in ``dtype`` (``torch.float64`` by default: EM on
float32 data loses several digits in the covariance updates and in
``logsumexp``, which makes log-likelihood comparisons and convergence tests
flaky), whatever the dtype of the data. The model follows the device of the
data it is fitted on; inputs to the evaluation methods are cast to ``dtype``
for the computation and results are returned on the input's device and in the
input's dtype.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["GaussianMixture"]

_COVARIANCE_TYPES = ("full", "diag")
_INITS = ("kmeans++", "random")
_PARAM_BUFFERS = ("weights", "means", "covariances", "precisions_cholesky")
_KMEANS_MAX_ITER = 100


def _check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """TypeError unless ``value`` is an int (bools rejected); ValueError if < ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}")
    return value


def _check_nonneg_float(name: str, value: Any) -> float:
    """TypeError unless ``value`` is a real number (bools rejected); ValueError unless >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a float, got {type(value).__name__} {value!r}")
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"`{name}` must be a float >= 0, got {value!r}")
    return float(value)


def _check_data(x: Any, n_features: int | None = None) -> None:
    """Validate an (N, D) floating tensor ``x`` (TypeError: type/dtype, ValueError: shape)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"`x` must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"`x` must have a floating dtype, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"`x` must have shape (N, D) (rank 2), got shape {tuple(x.shape)}")
    if n_features is not None and x.shape[1] != n_features:
        raise ValueError(
            f"`x` has {x.shape[1]} features but the model was fitted with {n_features}"
        )


def _sq_dists(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distances (Na, Nb); clamped since the expansion can go < 0."""
    d2 = (a * a).sum(1, keepdim=True) - 2.0 * a @ b.T + (b * b).sum(1)
    return d2.clamp_min_(0.0)


def _precisions_cholesky(covariances: Tensor, covariance_type: str) -> Tensor:
    """Cholesky factor of the precision matrices (same convention as sklearn).

    full: ``cov = L L^T`` -> ``P = L^{-T}`` (upper triangular, ``P P^T = cov^{-1}``),
    shape (K, D, D). diag: ``1 / sqrt(cov)``, shape (K, D).
    """
    msg = (
        "Fitting the mixture model failed because some components have "
        "ill-defined empirical covariance (for instance caused by singleton "
        "or collapsed samples). Try to decrease the number of components, "
        "or increase reg_covar."
    )
    if covariance_type == "full":
        chol, info = torch.linalg.cholesky_ex(covariances)
        if bool((info != 0).any()):
            raise ValueError(msg)
        eye = torch.eye(
            covariances.shape[-1], dtype=covariances.dtype, device=covariances.device
        ).expand_as(covariances)
        return torch.linalg.solve_triangular(chol, eye, upper=False).transpose(-1, -2)
    if bool((covariances <= 0).any()):
        raise ValueError(msg)
    return covariances.rsqrt()


class GaussianMixture(torch.nn.Module):
    """Gaussian mixture model with EM fitting, in torch.

    Args:
        n_components: number of mixture components ``K`` (>= 1).
        covariance_type: ``"full"`` (one (D, D) covariance per component) or
            ``"diag"`` (one (D,) variance vector per component).
        tol: EM stops when the mean per-sample log-likelihood (lower bound)
            changes by less than ``tol`` between iterations.
        max_iter: maximum number of EM iterations (>= 1).
        reg_covar: non-negative value added to the diagonal of every covariance
            estimate, to keep them positive definite.
        init: ``"kmeans++"`` or ``"random"``. ``"kmeans++"`` is greedy k-means++
            seeding followed by Lloyd iterations (at most 100, until the
            assignments stop changing), the initial responsibilities being the
            hard k-means assignments: the semantics of sklearn's
            ``init_params="kmeans"`` (not of its ``"k-means++"``, which uses
            the seeding alone). ``"random"``
            (uniform random responsibilities, normalised per sample; as in
            sklearn this starts all means near the data mean, where the
            likelihood is flat, so it needs a small ``tol`` to get anywhere).
        seed: seed of the ``torch.Generator`` used by the initialisation;
            ``None`` draws the seed from torch's global RNG at every ``fit``,
            so ``torch.manual_seed`` makes the fit reproducible.
        dtype: floating dtype used for all computations and for the stored
            parameters (default ``torch.float64``, for numerical stability).

    Raises:
        TypeError: an argument of the wrong type (e.g. a float or bool
            ``n_components``, a non-floating ``dtype``).
        ValueError: an out-of-range value or an unknown option.

    Buffers (available after ``fit`` / ``from_parameters``; part of ``state_dict``):
        weights: (K,) mixture weights, sum to 1.
        means: (K, D) component means.
        covariances: (K, D, D) for ``"full"``, (K, D) for ``"diag"``.
        precisions_cholesky: Cholesky factor of the precisions, same shape as
            ``covariances`` (used to evaluate densities).

    Attributes set by ``fit``: ``converged_`` (bool), ``n_iter_`` (int),
    ``lower_bound_`` (float, mean log-likelihood per sample at the last E-step).
    """

    weights: Tensor
    means: Tensor
    covariances: Tensor
    precisions_cholesky: Tensor

    def __init__(
        self,
        n_components: int,
        *,
        covariance_type: str = "full",
        tol: float = 1e-3,
        max_iter: int = 100,
        reg_covar: float = 1e-6,
        init: str = "kmeans++",
        seed: int | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        self.n_components = _check_int("n_components", n_components, 1)
        if covariance_type not in _COVARIANCE_TYPES:
            raise ValueError(
                f"`covariance_type` must be one of {_COVARIANCE_TYPES}, got {covariance_type!r}"
            )
        self.covariance_type = covariance_type
        self.tol = _check_nonneg_float("tol", tol)
        self.max_iter = _check_int("max_iter", max_iter, 1)
        self.reg_covar = _check_nonneg_float("reg_covar", reg_covar)
        if init not in _INITS:
            raise ValueError(f"`init` must be one of {_INITS}, got {init!r}")
        self.init = init
        self.seed = None if seed is None else _check_int("seed", seed)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"`dtype` must be a floating torch.dtype, got {dtype!r}")
        self.dtype = dtype

        self.converged_: bool = False
        self.n_iter_: int = 0
        self.lower_bound_: float = -math.inf

        # Shapes depend on D, unknown until fit: start empty, resized on
        # fit / load (see _load_from_state_dict).
        for name in _PARAM_BUFFERS:
            self.register_buffer(name, torch.empty(0, dtype=dtype))

    # ------------------------------------------------------------------ setup
    @classmethod
    def from_parameters(
        cls,
        weights: Tensor,
        means: Tensor,
        covariances: Tensor,
        *,
        covariance_type: str = "full",
        **kwargs: Any,
    ) -> GaussianMixture:
        """Build a fitted model from given parameters (e.g. sklearn's fitted ones).

        Args:
            weights: (K,) non-negative, summing to 1.
            means: (K, D).
            covariances: (K, D, D) if ``covariance_type == "full"`` else (K, D);
                used as-is (``reg_covar`` is *not* added).
            covariance_type: ``"full"`` or ``"diag"``.
            **kwargs: other constructor arguments (``tol``, ``dtype``, ...).

        Tensors (or array-likes) are converted to the model dtype on the device
        of ``means`` (CPU for non-tensors).
        """
        means_t = torch.as_tensor(means)
        device = means_t.device
        model = cls(int(means_t.shape[0]), covariance_type=covariance_type, **kwargs)
        dtype = model.dtype
        w = torch.as_tensor(weights).to(device=device, dtype=dtype)
        mu = means_t.to(device=device, dtype=dtype)
        cov = torch.as_tensor(covariances).to(device=device, dtype=dtype)
        if mu.dim() != 2:
            raise ValueError(f"`means` must have shape (K, D), got {tuple(mu.shape)}")
        k, d = mu.shape
        if w.shape != (k,):
            raise ValueError(f"`weights` must have shape ({k},), got {tuple(w.shape)}")
        if bool((w < 0).any()) or abs(float(w.sum()) - 1.0) > 1e-5:
            raise ValueError("`weights` must be non-negative and sum to 1")
        expected = (k, d, d) if covariance_type == "full" else (k, d)
        if tuple(cov.shape) != expected:
            raise ValueError(
                f"`covariances` must have shape {expected} for covariance_type="
                f"{covariance_type!r}, got {tuple(cov.shape)}"
            )
        model._set_parameters(w, mu, cov)
        return model

    def _set_parameters(self, weights: Tensor, means: Tensor, covariances: Tensor) -> None:
        self.weights = weights
        self.means = means
        self.covariances = covariances
        self.precisions_cholesky = _precisions_cholesky(covariances, self.covariance_type)

    @property
    def is_fitted(self) -> bool:
        """Whether parameters are available (after fit, from_parameters or load)."""
        return self.means.dim() == 2

    @property
    def n_features(self) -> int:
        """Dimension ``D`` of the data (after fit)."""
        self._check_fitted()
        return int(self.means.shape[1])

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise RuntimeError(
                "This GaussianMixture is not fitted yet: call fit(x) first "
                "(or build it with GaussianMixture.from_parameters / load a state_dict)."
            )

    # --------------------------------------------------------------- fitting
    @torch.no_grad()
    def fit(self, x: Tensor) -> GaussianMixture:
        """Fit the mixture to ``x`` with EM.

        Args:
            x: (N, D) floating tensor, N >= n_components, finite values. The
                parameters are created on ``x.device`` in the model dtype.

        Returns:
            self, with ``weights``, ``means``, ``covariances``,
            ``precisions_cholesky``, ``converged_``, ``n_iter_``, ``lower_bound_`` set.
        """
        _check_data(x)
        n = x.shape[0]
        if n < self.n_components:
            raise ValueError(
                f"`x` has {n} samples but n_components={self.n_components}: "
                "need at least as many samples as components"
            )
        if not bool(torch.isfinite(x).all()):
            raise ValueError("`x` contains NaN or infinite values")
        dtype = self.dtype
        x = x.to(dtype)

        # CPU generator: same draws whatever the data device. seed=None follows
        # torch's global RNG, so torch.manual_seed(s) repeats a run.
        seed = int(torch.randint(2**62, ())) if self.seed is None else self.seed
        gen = torch.Generator().manual_seed(seed)

        if self.init == "kmeans++":
            labels = self._kmeans_labels(x, gen)
            resp = torch.nn.functional.one_hot(labels, self.n_components).to(dtype)
        else:
            resp = torch.rand(n, self.n_components, generator=gen, dtype=dtype).to(x.device)
            resp /= resp.sum(1, keepdim=True)
        self._m_step(x, resp)

        lower_bound = -math.inf
        self.converged_ = False
        for n_iter in range(1, self.max_iter + 1):
            prev = lower_bound
            log_norm, log_resp = self._e_step(x)
            self._m_step(x, log_resp.exp())
            lower_bound = float(log_norm.mean())
            self.n_iter_ = n_iter
            if abs(lower_bound - prev) < self.tol:
                self.converged_ = True
                break
        self.lower_bound_ = lower_bound
        return self

    def _kmeans_labels(self, x: Tensor, gen: torch.Generator) -> Tensor:
        """Greedy k-means++ seeding (as in sklearn) followed by Lloyd iterations."""
        n, _ = x.shape
        k = self.n_components
        n_trials = 2 + int(math.log(k))
        first = int(torch.randint(n, (1,), generator=gen))
        centers = [x[first]]
        closest = _sq_dists(x, x[first : first + 1])[:, 0]
        for _ in range(1, k):
            cum = torch.cumsum(closest, 0)
            u = torch.rand(n_trials, generator=gen, dtype=x.dtype).to(x.device)
            cand = torch.searchsorted(cum, u * cum[-1]).clamp_(max=n - 1)
            # Pick the candidate that reduces the k-means potential the most.
            new_closest = torch.minimum(closest, _sq_dists(x[cand], x))
            best = int(new_closest.sum(1).argmin())
            centers.append(x[cand[best]])
            closest = new_closest[best]
        c = torch.stack(centers)

        labels = _sq_dists(x, c).argmin(1)
        for _ in range(_KMEANS_MAX_ITER):
            counts = torch.bincount(labels, minlength=k).to(x.dtype)
            sums = torch.zeros_like(c).index_add_(0, labels, x)
            # Empty clusters keep their previous center.
            c = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], c)
            new_labels = _sq_dists(x, c).argmin(1)
            if torch.equal(new_labels, labels):
                break
            labels = new_labels
        return labels

    def _m_step(self, x: Tensor, resp: Tensor) -> None:
        """Maximum-likelihood parameters given responsibilities resp (N, K)."""
        d = x.shape[1]
        # 10 * eps avoids division by zero for empty components (as sklearn).
        nk = resp.sum(0) + 10 * torch.finfo(resp.dtype).eps
        means = (resp.T @ x) / nk[:, None]
        if self.covariance_type == "full":
            covs = torch.empty(self.n_components, d, d, dtype=x.dtype, device=x.device)
            eye = torch.eye(d, dtype=x.dtype, device=x.device)
            for k in range(self.n_components):  # loop: O(N D) memory, not O(N K D)
                diff = x - means[k]
                covs[k] = (resp[:, k, None] * diff).T @ diff / nk[k] + self.reg_covar * eye
        else:
            # Centred form (not E[x^2] - mean^2, which cancels for data far from 0).
            diff = x[:, None, :] - means  # (N, K, D)
            covs = (resp[..., None] * diff * diff).sum(0) / nk[:, None] + self.reg_covar
        self._set_parameters(nk / nk.sum(), means, covs)

    def _e_step(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return (log p(x_n)) (N,) and log responsibilities (N, K)."""
        wlp = self._weighted_log_prob(x)
        log_norm = torch.logsumexp(wlp, dim=1)
        return log_norm, wlp - log_norm[:, None]

    def _weighted_log_prob(self, x: Tensor) -> Tensor:
        """log w_k + log N(x_n | mu_k, Sigma_k), shape (N, K); x in compute dtype."""
        d = x.shape[1]
        dev, dt = x.device, x.dtype
        w = self.weights.to(dev, dt)
        mu = self.means.to(dev, dt)
        pc = self.precisions_cholesky.to(dev, dt)
        if self.covariance_type == "full":
            log_det = torch.diagonal(pc, dim1=-2, dim2=-1).log().sum(-1)  # (K,)
            maha = torch.empty(x.shape[0], self.n_components, dtype=dt, device=dev)
            for k in range(self.n_components):
                y = (x - mu[k]) @ pc[k]
                maha[:, k] = (y * y).sum(1)
        else:
            log_det = pc.log().sum(-1)
            y = (x[:, None, :] - mu) * pc  # (N, K, D)
            maha = (y * y).sum(-1)
        return -0.5 * (d * math.log(2 * math.pi) + maha) + log_det + w.log()

    # ------------------------------------------------------------ evaluation
    def _prepare(self, x: Tensor) -> Tensor:
        self._check_fitted()
        _check_data(x, n_features=self.n_features)
        return x.to(self.dtype)

    def log_prob(self, x: Tensor) -> Tensor:
        """Per-sample log density ``log p(x_n)``.

        Args:
            x: (N, D) floating tensor.
        Returns:
            (N,) tensor on ``x.device`` with ``x.dtype``. Differentiable w.r.t. x.
        """
        xc = self._prepare(x)
        return torch.logsumexp(self._weighted_log_prob(xc), dim=1).to(x.dtype)

    def score(self, x: Tensor) -> float:
        """Mean per-sample log-likelihood of ``x`` (N, D), as a Python float."""
        xc = self._prepare(x)
        return float(torch.logsumexp(self._weighted_log_prob(xc), dim=1).mean())

    def predict_proba(self, x: Tensor) -> Tensor:
        """Posterior responsibilities p(k | x_n), (N, K), rows sum to 1, ``x.dtype``."""
        xc = self._prepare(x)
        return self._e_step(xc)[1].exp().to(x.dtype)

    def predict(self, x: Tensor) -> Tensor:
        """Most likely component per sample, (N,) int64."""
        xc = self._prepare(x)
        return self._weighted_log_prob(xc).argmax(1)

    @torch.no_grad()
    def sample(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draw ``n`` samples.

        Args:
            n: number of samples (>= 0).
            generator: optional ``torch.Generator``; random numbers are drawn on
                its device (then moved to the parameters' device).
        Returns:
            x: (n, D) in the parameters' dtype and device.
            component: (n,) int64, the component each sample was drawn from.
        """
        self._check_fitted()
        n = _check_int("n", n, 0)
        dev, dt = self.means.device, self.means.dtype
        d = self.n_features
        if n == 0:
            return torch.empty(0, d, dtype=dt, device=dev), torch.empty(
                0, dtype=torch.long, device=dev
            )
        gdev = generator.device if generator is not None else dev
        comp = torch.multinomial(
            self.weights.to(gdev), n, replacement=True, generator=generator
        ).to(dev)
        z = torch.randn(n, d, generator=generator, dtype=dt, device=gdev).to(dev)
        if self.covariance_type == "full":
            chol = torch.linalg.cholesky(self.covariances)  # Sigma = L L^T
            x = self.means[comp] + torch.einsum("nij,nj->ni", chol[comp], z)
        else:
            x = self.means[comp] + self.covariances.sqrt()[comp] * z
        return x, comp

    def n_parameters(self) -> int:
        """Number of free parameters (for BIC/AIC), as in sklearn."""
        k, d = self.n_components, self.n_features
        cov = k * d * (d + 1) // 2 if self.covariance_type == "full" else k * d
        return cov + k * d + k - 1

    def bic(self, x: Tensor) -> float:
        """Bayesian information criterion on ``x`` (N, D); lower is better."""
        return -2.0 * self.score(x) * x.shape[0] + self.n_parameters() * math.log(x.shape[0])

    def aic(self, x: Tensor) -> float:
        """Akaike information criterion on ``x`` (N, D); lower is better."""
        return -2.0 * self.score(x) * x.shape[0] + 2.0 * self.n_parameters()

    # ----------------------------------------------------------- state dict
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "n_components": self.n_components,
            "covariance_type": self.covariance_type,
            "converged_": self.converged_,
            "n_iter_": self.n_iter_,
            "lower_bound_": self.lower_bound_,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        for key in ("n_components", "covariance_type"):
            if state[key] != getattr(self, key):
                raise RuntimeError(
                    f"state_dict has {key}={state[key]!r} but this model has "
                    f"{key}={getattr(self, key)!r}"
                )
        self.converged_ = bool(state["converged_"])
        self.n_iter_ = int(state["n_iter_"])
        self.lower_bound_ = float(state["lower_bound_"])

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Buffers are created empty (D unknown before fit): resize them to the
        # stored shapes so the default copy in the parent does not reject them.
        for name in _PARAM_BUFFERS:
            src = state_dict.get(prefix + name)
            cur = self._buffers[name]
            if isinstance(src, Tensor) and cur is not None and cur.shape != src.shape:
                self._buffers[name] = torch.empty(src.shape, dtype=self.dtype, device=cur.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return (
            f"n_components={self.n_components}, covariance_type={self.covariance_type!r}, "
            f"tol={self.tol}, max_iter={self.max_iter}, reg_covar={self.reg_covar}, "
            f"init={self.init!r}, seed={self.seed}, dtype={self.dtype}"
        )
