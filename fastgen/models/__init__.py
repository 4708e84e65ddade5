"""Generative models built from fastgen's modules."""

from fastgen.models.ae import AutoEncoder
from fastgen.models.biggan import BigGANDiscriminator, BigGANGenerator, orthogonal_regularization
from fastgen.models.gan import DCGANDiscriminator, DCGANGenerator, MLPDiscriminator, MLPGenerator
from fastgen.models.gmm import GaussianMixture
from fastgen.models.losses import GAN_LOSSES, GANObjective, gradient_penalty, r1_penalty
from fastgen.models.stylegan import StyleGAN2Discriminator, StyleGAN2Generator
from fastgen.models.vae import VAE

__all__ = ["DCGANGenerator", "DCGANDiscriminator", "MLPGenerator", "MLPDiscriminator", "StyleGAN2Generator",
           "StyleGAN2Discriminator", "BigGANGenerator", "BigGANDiscriminator", "orthogonal_regularization",
           "GaussianMixture", "GAN_LOSSES", "GANObjective", "gradient_penalty", "r1_penalty", "AutoEncoder", "VAE"]
