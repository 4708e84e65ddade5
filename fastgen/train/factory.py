"""What a run is made of, built from its :class:`~fastgen.train.config.TrainConfig`: device, data, models."""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import Tensor, nn

from fastgen.data import load_mnist_family, mixture2d
from fastgen.models import VAE, AutoEncoder
from fastgen.models.biggan import BigGANDiscriminator, BigGANGenerator
from fastgen.models.gan import DCGANDiscriminator, DCGANGenerator, MLPDiscriminator, MLPGenerator
from fastgen.models.stylegan import StyleGAN2Discriminator, StyleGAN2Generator
from fastgen.train.config import TrainConfig

__all__ = ["GAN_MODELS", "IMAGE_MODELS", "IMAGE_GAN_MODELS", "CONDITIONAL_MODELS", "Dataset", "resolve_device", "load_dataset", "build_models",
           "generator_for_sampling", "MIXTURE_TRAIN_SIZE"]

GAN_MODELS = ("gan", "cgan", "stylegan", "biggan", "gan2d")
IMAGE_GAN_MODELS = ("gan", "cgan", "stylegan", "biggan")
IMAGE_MODELS = IMAGE_GAN_MODELS + ("ae", "vae")
#: The GANs whose generator and discriminator take class labels.
CONDITIONAL_MODELS = ("cgan", "biggan")
#: The MNIST family (Fashion-MNIST, MNIST, KMNIST): grey images, ten classes.
MNIST_CHANNELS, MNIST_CLASSES = 1, 10
#: Points drawn once from a 2D mixture to form gan2d's training set.
MIXTURE_TRAIN_SIZE = 100_000


class Dataset(NamedTuple):
    """Training inputs ``(N, ...)`` float32 and labels ``(N,)`` int64 (None for 2D mixtures), on one device."""

    inputs: Tensor
    labels: Tensor | None


def resolve_device(name: str) -> torch.device:
    """"auto" is CUDA when available, else the CPU; "cuda" without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was requested but this machine has no usable CUDA device")
    return torch.device(name)


def load_dataset(config: TrainConfig, device: torch.device, split: str = "train") -> Dataset:
    """The run's data on ``device``: MNIST-family images in [-1, 1] (GANs) or [0, 1] (AE/VAE), padded
    to 32x32 unless ``image_size`` is 28 (64x64 models upsample batches from 32x32 on the fly); or
    :data:`MIXTURE_TRAIN_SIZE` points of a 2D mixture drawn with the run's seed.

    Raises:
        FileNotFoundError / ValueError: from :func:`fastgen.data.load_mnist_family`.
    """
    if config.model == "gan2d":
        generator = torch.Generator().manual_seed(config.seed)
        points = mixture2d(config.mixture).sample(MIXTURE_TRAIN_SIZE, generator)
        return Dataset(points.to(device), None)
    scale = "unit" if config.model in ("ae", "vae") else "gan"
    images, labels = load_mnist_family(config.data_dir, split, scale=scale, pad_to_32=config.image_size != 28)
    if images.shape[1:] != (MNIST_CHANNELS, min(config.image_size, 32), min(config.image_size, 32)):
        raise ValueError(f"data_dir: expected 28x28 grey images (the MNIST family), got {tuple(images.shape[1:])}")
    if labels.min() < 0 or labels.max() >= MNIST_CLASSES:
        raise ValueError(f"data_dir: expected labels 0..{MNIST_CLASSES - 1}, got {labels.min()}..{labels.max()}")
    return Dataset(images.to(device), labels.to(device))


def _discriminator_batch_norm(config: TrainConfig) -> bool:
    # BN mixes samples: it breaks WGAN-GP's per-sample gradient penalty and fights spectral norm.
    return not (config.spectral_norm or config.loss == "wgan_gp")


def build_models(config: TrainConfig, device: torch.device) -> dict[str, nn.Module]:
    """Freshly initialized models of the run (drawing from the global torch RNG), on ``device``.

    Keys: "generator", "discriminator" and, with ``ema > 0``, "generator_ema" (a copy of the
    generator that :class:`~fastgen.train.trainer.Trainer` averages) for GANs; "model" for AE/VAE.
    """
    if config.model == "gan2d":
        generator = MLPGenerator(config.latent_size, 2, config.hidden, config.depth)
        models = {"generator": generator,
                  "discriminator": MLPDiscriminator(2, config.hidden, config.depth,
                                                    spectral_norm=config.spectral_norm)}
    elif config.model in ("gan", "cgan"):
        num_classes = MNIST_CLASSES if config.model == "cgan" else 0
        generator = DCGANGenerator(config.latent_size, MNIST_CHANNELS, config.image_size, config.width,
                                   num_classes=num_classes)
        discriminator = DCGANDiscriminator(
            MNIST_CHANNELS, config.image_size, config.width, num_classes=num_classes,
            conditioning=config.conditioning or "none", batch_norm=_discriminator_batch_norm(config),
            spectral_norm=config.spectral_norm)
        models = {"generator": generator, "discriminator": discriminator}
    elif config.model == "stylegan":
        discriminator = StyleGAN2Discriminator(MNIST_CHANNELS, config.image_size, config.width)
        # Each process's batch must split into minibatch-stddev groups; say so before step 1.
        local_batch = config.batch_size // (config.world_size or 1)
        group = min(discriminator.mbstd_group, local_batch)
        if local_batch % group:
            raise ValueError(f"batch_size: StyleGAN2's discriminator takes groups of {group} samples "
                             f"(minibatch standard deviation); expected a multiple of {group} per process, "
                             f"got {local_batch}")
        models = {"generator": StyleGAN2Generator(config.latent_size, MNIST_CHANNELS, config.image_size, config.width,
                                                  mapping_layers=config.mapping_layers,
                                                  style_mixing=config.style_mixing,
                                                  # A run from before the option used the transposed conv.
                                                  upsample=config.upsample or "transposed"),
                  "discriminator": discriminator}
    elif config.model == "biggan":
        models = {"generator": BigGANGenerator(config.latent_size, MNIST_CLASSES, MNIST_CHANNELS, config.image_size,
                                               config.width, spectral_norm=config.spectral_norm),
                  "discriminator": BigGANDiscriminator(MNIST_CHANNELS, config.image_size, config.width, MNIST_CLASSES,
                                                       spectral_norm=config.spectral_norm)}
    else:
        size = config.image_size
        # A run from before mlp_activation (None) trained with ReLU.
        options = {"arch": config.arch, "likelihood": config.likelihood,
                   "mlp_activation": config.mlp_activation or "relu"}
        if config.hidden is not None:
            options["hidden"] = config.hidden
        if config.model == "vae":
            model = VAE((MNIST_CHANNELS, size, size), config.latent_size, beta=config.beta, **options)
        else:
            model = AutoEncoder((MNIST_CHANNELS, size, size), config.latent_size, **options)
        models = {"model": model}
    if config.model in GAN_MODELS and config.ema:
        models["generator_ema"] = copy.deepcopy(models["generator"])
    models = {name: module.to(device) for name, module in models.items()}
    if config.model in ("gan", "cgan"):
        # Channels-last runs the convolutions faster on CPUs (oneDNN) and GPUs (cuDNN, bf16).
        models = {name: module.to(memory_format=torch.channels_last) for name, module in models.items()}
    if "generator_ema" in models:
        models["generator_ema"].eval().requires_grad_(False)
    return models


def generator_for_sampling(models: dict[str, nn.Module]) -> nn.Module:
    """The weights to sample from: the EMA generator when the run keeps one."""
    return models.get("generator_ema", models.get("generator"))
