"""Generative models built from fastgen's modules."""

from fastgen.models.ae import AutoEncoder
from fastgen.models.gan import DCGANDiscriminator, DCGANGenerator, MLPDiscriminator, MLPGenerator
from fastgen.models.gmm import GaussianMixture
from fastgen.models.losses import GAN_LOSSES, GANObjective, gradient_penalty, r1_penalty
from fastgen.models.vae import VAE

__all__ = ["DCGANGenerator", "DCGANDiscriminator", "MLPGenerator", "MLPDiscriminator", "GaussianMixture",
           "GAN_LOSSES", "GANObjective", "gradient_penalty", "r1_penalty", "AutoEncoder", "VAE"]
