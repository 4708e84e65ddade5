"""Variational auto-encoder (Kingma & Welling, 2014) with beta weighting and importance-weighted bounds.

The encoder maps x to the mean and log-variance of q(z|x) = N(mu, diag(exp(logvar))); z is drawn
by fastgen's fused reparameterization (noise regenerated in backward, KL in the same pass); the
decoder gives p(x|z), Bernoulli (logits) or Gaussian (mean, with a learned global log sigma).
Networks and likelihoods are those of :mod:`fastgen.models.ae`.

- ``elbo(x)``: ``log p(x|z) - KL(q(z|x) || N(0, I))``, one z per sample, ``(B,)``.
- ``loss(x)``: ``-(log p(x|z) - beta * KL)`` per sample (beta = 1: the negative ELBO).
- ``iwae_bound(x, k)``: ``log (1/k) sum_i p(x, z_i) / q(z_i|x)``, z_i ~ q(z|x) (Burda et al.,
  2016); ``E[elbo] <= E[iwae_bound(x, k)] <= E[iwae_bound(x, k + 1)] <= log p(x)``.
- ``nll(x, k=100)``: ``-iwae_bound(x, k)`` without gradient, the usual estimate of -log p(x).

The importance weights use ``log_normal_diag`` for log p(z) and log q(z|x); the k samples go
through the decoder in chunks of at most ``max_batch`` decoder inputs, so memory stays bounded
for any k.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fastgen import functional as F
from fastgen.models.ae import (build_decoder, build_encoder, check_batch, check_config, check_positive,
                               output_mean, reconstruction_nll)
from fastgen.nn import Reparameterize

__all__ = ["VAE"]


class VAE(nn.Module):
    """Gaussian-encoder VAE on vectors or images.

    Args:
        input_shape: ``(D,)`` or ``(C, H, W)``.
        latent_size: size of z.
        arch: "mlp" or "conv" (images only), as for :class:`fastgen.models.AutoEncoder`.
        likelihood: "bernoulli" (decoder logits, data in [0, 1]) or "gaussian" (decoder mean and a
            learned scalar ``log_sigma``).
        beta: weight of the KL term in ``loss`` (beta-VAE; 1 for the plain VAE), >= 0.
        hidden: layer widths ("mlp") or channel counts per stride-2 stage ("conv").
        mlp_activation: "relu" or "silu", the hidden activation of the "mlp" arch.

    A plain ``nn.Module``: train with any loop on ``loss(x).mean()``.
    """

    def __init__(self, input_shape: Sequence[int], latent_size: int, *, arch: str = "mlp",
                 likelihood: str = "bernoulli", beta: float = 1.0, hidden: Sequence[int] | None = None,
                 mlp_activation: str = "relu") -> None:
        super().__init__()
        self.input_shape, hidden = check_config(input_shape, arch, likelihood, hidden, mlp_activation)
        self.latent_size = check_positive("latent_size", latent_size)
        if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not beta >= 0:
            raise ValueError(f"beta: expected a number >= 0, got {beta!r}")
        self.arch, self.likelihood, self.beta, self.hidden = arch, likelihood, float(beta), hidden
        self.mlp_activation = mlp_activation
        self.encoder = build_encoder(self.input_shape, 2 * latent_size, arch, hidden, mlp_activation)
        self.decoder = build_decoder(latent_size, self.input_shape, arch, hidden, mlp_activation)
        self.reparameterize = Reparameterize()
        self.log_sigma = nn.Parameter(torch.zeros(())) if likelihood == "gaussian" else None

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, *input_shape)`` -> (mu, logvar) of q(z|x), ``(B, latent_size)`` each."""
        mu, logvar = self.encoder(check_batch(x, self.input_shape)).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: Tensor) -> Tensor:
        """``(N, latent_size)`` -> decoder output ``(N, *input_shape)``: logits or the Gaussian mean."""
        return self.decoder(check_batch(z, (self.latent_size,), "z"))

    def log_likelihood(self, output: Tensor, x: Tensor) -> Tensor:
        """``log p(x|z)`` per sample, ``(N,)``, for a decoder output of x's shape."""
        return -reconstruction_nll(output, x, self.likelihood, self.log_sigma)

    def _log_likelihood_and_kl(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(log p(x|z), KL(q(z|x) || N(0, I))), one z ~ q(z|x) per sample, ``(B,)`` each."""
        z, kl = self.reparameterize(*self.encode(x))
        return self.log_likelihood(self.decode(z), x), kl

    def forward(self, x: Tensor) -> Tensor:
        """The decoder output (logits for "bernoulli") for one z ~ q(z|x), x's shape."""
        z, _ = self.reparameterize(*self.encode(x))
        return self.decode(z)

    def elbo(self, x: Tensor) -> Tensor:
        """The evidence lower bound ``log p(x|z) - KL`` per sample (one z each), ``(B,)``."""
        log_px, kl = self._log_likelihood_and_kl(x)
        return log_px - kl

    def loss(self, x: Tensor) -> Tensor:
        """``-(log p(x|z) - beta * KL)`` per sample, ``(B,)``: the negative ELBO for beta = 1."""
        log_px, kl = self._log_likelihood_and_kl(x)
        return self.beta * kl - log_px

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws from the model in data space: the mean of p(x|z) for z ~ N(0, I), ``(n, *input_shape)``."""
        param = next(self.parameters())
        z = torch.randn(check_positive("n", n), self.latent_size, generator=generator,
                        device=param.device, dtype=param.dtype)
        return output_mean(self.decode(z), self.likelihood)

    def reconstruct(self, x: Tensor) -> Tensor:
        """The mean of p(x|z = mu(x)) in data space (probabilities for "bernoulli"), x's shape."""
        mu, _ = self.encode(x)
        return output_mean(self.decode(mu), self.likelihood)

    def iwae_bound(self, x: Tensor, k: int, *, max_batch: int = 4096) -> Tensor:
        """The importance-weighted bound with ``k`` samples per input, ``(B,)``.

        ``log (1/k) sum_i exp(log p(x|z_i) + log p(z_i) - log q(z_i|x))``; k = 1 is the ELBO
        (with log q in place of the analytic KL). The decoder sees at most
        ``max(max_batch, B)`` inputs at a time.
        """
        check_positive("k", k)
        check_positive("max_batch", max_batch)
        mu, logvar = self.encode(x)
        batch = x.shape[0]
        chunk = max(1, max_batch // batch)
        log_weights = []
        for start in range(0, k, chunk):
            samples = min(chunk, k - start)
            z, _ = F.reparameterize(mu, logvar, samples=samples)
            z = z.reshape(samples, batch, self.latent_size)
            x_rep = x.unsqueeze(0).expand(samples, *x.shape).reshape(samples * batch, *self.input_shape)
            log_px = self.log_likelihood(self.decode(z.reshape(samples * batch, -1)), x_rep).view(samples, batch)
            log_weights.append(log_px + F.log_normal_diag(z) - F.log_normal_diag(z, mu, logvar))
        return torch.logsumexp(torch.cat(log_weights), dim=0) - math.log(k)

    def nll(self, x: Tensor, k: int = 100, *, max_batch: int = 4096) -> Tensor:
        """Importance-sampled estimate of ``-log p(x)`` per sample, ``(B,)``: ``-iwae_bound(x, k)``,
        computed without gradient (an over-estimate on average, tightening as k grows)."""
        with torch.no_grad():
            return -self.iwae_bound(x, k, max_batch=max_batch)

    def extra_repr(self) -> str:
        return (f"input_shape={self.input_shape}, latent_size={self.latent_size}, arch={self.arch!r}, "
                f"likelihood={self.likelihood!r}, beta={self.beta}, hidden={self.hidden}, "
                f"mlp_activation={self.mlp_activation!r}")
