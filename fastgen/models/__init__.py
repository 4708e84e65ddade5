"""Generative models built from fastgen's modules."""

from fastgen.models.ae import AutoEncoder
from fastgen.models.gmm import GaussianMixture
from fastgen.models.vae import VAE

__all__ = ["GaussianMixture", "AutoEncoder", "VAE"]
