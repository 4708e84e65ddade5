"""Using a run's models: load them from a checkpoint, sample, draw the sample picture, evaluate."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fastgen.backend import use_backend
from fastgen.classifier import CLASSIFIER_VERSION, classifier_features, load_classifier
from fastgen.data import load_mnist_family, mixture2d
from fastgen.metrics import (bits_per_dim, density_coverage, evaluate_mixture, frechet_distance, kid, pca_fit,
                             pca_mse, precision_recall)
from fastgen.models.gmm import GaussianMixture
from fastgen.train.checkpoint import CheckpointError, load_checkpoint
from fastgen.train.config import TrainConfig
from fastgen.train.factory import (CONDITIONAL_MODELS, IMAGE_GAN_MODELS, MNIST_CLASSES, Dataset, build_models,
                                   generator_for_sampling, load_dataset, resolve_device)
from fastgen.train.images import save_image_grid, save_scatter

__all__ = ["CHECKPOINT_FILE", "checkpoint_path", "fixed_rng", "load_run", "generate", "reconstruct",
           "save_sample_picture", "evaluate", "IMAGE_EVAL_SAMPLES", "NLL_SAMPLES", "TRAINING_EVAL_SAMPLES",
           "TRAINING_NLL_SAMPLES"]

CHECKPOINT_FILE = "checkpoint.pt"
#: Samples of the 2D-mixture evaluation (the standard protocol).
MIXTURE_EVAL_SAMPLES = 2500
#: Generated images of the image-GAN evaluation (against the 10,000 test images).
IMAGE_EVAL_SAMPLES = 10_000
#: Importance samples of the VAE's NLL estimate, and of its IWAE bound (Burda et al. 2016).
NLL_SAMPLES, IWAE_SAMPLES = 1000, 50
#: The GMM baseline of the VAE: diagonal components fitted by EM on a seeded subset of the train
#: split (all 60,000 images in float64 took over 20 CPU minutes and 9 GB). Its variance floor is
#: that of 8-bit quantization noise, (1/255)^2 / 12: finer detail than the data holds.
GMM_COMPONENTS, GMM_REG_COVAR, GMM_TRAIN_IMAGES = 10, 1 / (12 * 255**2), 10_000
#: The cheaper evaluation of ``train --eval-every``: samples per model (generated images; test
#: images scored by a VAE; the default elsewhere) and the VAE's NLL importance samples.
TRAINING_EVAL_SAMPLES = {"gan": 2000, "cgan": 2000, "stylegan": 2000, "biggan": 2000, "vae": 1000}
TRAINING_NLL_SAMPLES = 100
_EVAL_BATCH = 1000


def checkpoint_path(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory holding :data:`CHECKPOINT_FILE`."""
    path = Path(path)
    return path / CHECKPOINT_FILE if path.is_dir() else path


@contextlib.contextmanager
def fixed_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block on the global RNGs seeded by ``seed`` (CPU, and ``device``'s when it is CUDA),
    then put their previous states back: sampling for pictures never shifts a run's random stream."""
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def _device_of(models: dict[str, nn.Module]) -> torch.device:
    return next(next(iter(models.values())).parameters()).device


def load_run(path: str | os.PathLike, device: str = "auto") -> tuple[TrainConfig, dict[str, nn.Module], int]:
    """The config, models (eval mode, on ``device``) and step of a checkpoint file or run directory.

    Raises:
        FileNotFoundError: no checkpoint there. CheckpointError: the file is not a valid checkpoint.
    """
    state = load_checkpoint(checkpoint_path(path))
    try:
        config = TrainConfig.from_dict(state["config"])
        models = build_models(config, resolve_device(device))
        for name, module in models.items():
            module.load_state_dict(state["models"][name])
            module.eval()
    except (KeyError, RuntimeError, TypeError) as err:
        raise CheckpointError(f"{checkpoint_path(path)}: the checkpoint does not match its config ({err})") from None
    return config, models, int(state["step"])


@torch.no_grad()
def generate(config: TrainConfig, models: dict[str, nn.Module], n: int, *, labels: Tensor | None = None,
             seed: int = 0, truncation: float = 1.0) -> Tensor:
    """``n`` float32 samples in data space, drawn with ``seed`` (the global RNG state is kept).

    GAN images are in [-1, 1] ``(n, 1, S, S)`` (StyleGAN2's unbounded output clamped); VAE images in
    [0, 1]; gan2d points ``(n, 2)``. ``labels`` (``(n,)`` int64, conditional models: cgan, biggan)
    default to ``0, 1, ..., 9, 0, 1, ...``. ``truncation`` (stylegan only): psi in [0, 1], the
    truncation trick in W (1: none).

    Raises:
        ValueError: an auto-encoder (no prior to sample from), labels for an unconditional model,
            labels out of range, or truncation for a model other than stylegan.
    """
    if config.model == "ae":
        raise ValueError("model: an auto-encoder has no prior to sample from; train a vae to sample")
    if truncation != 1.0 and config.model != "stylegan":
        raise ValueError(f"truncation: only a stylegan samples with truncation, this is a {config.model}")
    device = _device_of(models)
    if config.model in CONDITIONAL_MODELS:
        labels = torch.arange(n) % MNIST_CLASSES if labels is None else labels
        if labels.shape != (n,) or labels.min() < 0 or labels.max() >= MNIST_CLASSES:
            raise ValueError(f"labels: expected {n} class labels in 0..{MNIST_CLASSES - 1}, got {labels.tolist()}")
        labels = labels.to(device)
    elif labels is not None:
        raise ValueError(f"labels: only a {' or '.join(CONDITIONAL_MODELS)} takes class labels, "
                         f"this is a {config.model}")
    options = {"truncation": truncation} if config.model == "stylegan" else {}
    with fixed_rng(seed, device):
        if config.model == "vae":
            with _eval_mode(models["model"]) as vae:
                return vae.sample(n).float()
        with _eval_mode(generator_for_sampling(models)) as generator:
            z = torch.randn(n, generator.latent_size, device=device)
            samples = generator(z, labels, **options)
    if config.model in IMAGE_GAN_MODELS:
        samples = samples.clamp(-1.0, 1.0)
    return samples.float().contiguous()


@torch.no_grad()
def reconstruct(model: nn.Module, x: Tensor) -> Tensor:
    """An AE's or VAE's reconstruction of ``x`` in data space ([0, 1] images; a VAE decodes the
    posterior mean), float32."""
    with _eval_mode(model):
        return model.reconstruct(x).float()


def save_sample_picture(config: TrainConfig, models: dict[str, nn.Module], path: str | os.PathLike, *,
                        seed: int = 0, n: int | None = None, labels: Tensor | None = None,
                        dataset: Dataset | None = None, nrow: int = 8, truncation: float = 1.0) -> None:
    """The run's picture as a PNG: a grid of samples (``nrow`` per row; cgan and biggan by default one
    class per row; stylegan with ``truncation`` psi), originals over reconstructions (AE, from
    ``dataset``), or a scatter of ``n`` (2500) points over rings of 3 std around the mixture's modes
    (gan2d)."""
    if config.model == "gan2d":
        points = generate(config, models, n or MIXTURE_EVAL_SAMPLES, seed=seed)
        mixture = mixture2d(config.mixture)
        # Rings of 3 std: the region where the evaluation counts a sample as high quality.
        save_scatter(points, path, means=mixture.means, radius=3 * mixture.std)
        return
    if config.model == "ae":
        if dataset is None:
            raise ValueError("dataset: an auto-encoder's picture shows reconstructions of data; pass dataset")
        originals = dataset.inputs[:n or 32]
        recons = reconstruct(models["model"], originals)
        # Rows of 8 originals, each followed by the row of their reconstructions.
        rows = torch.stack([originals.float().reshape(-1, 8, *originals.shape[1:]),
                            recons.reshape(-1, 8, *recons.shape[1:])], dim=1)
        save_image_grid(rows.flatten(0, 2), path, value_range=(0.0, 1.0), scale=2)
        return
    if config.model in CONDITIONAL_MODELS and labels is None:
        labels = torch.arange(MNIST_CLASSES).repeat_interleave(8)  # one class per row of 8
    n = len(labels) if labels is not None else (n or 64)
    images = generate(config, models, n, labels=labels, seed=seed, truncation=truncation)
    save_image_grid(images, path, nrow=nrow, value_range=(0.0, 1.0) if config.model == "vae" else (-1.0, 1.0),
                    scale=2)


def _chunk_seeds(seed: int, chunks: int) -> list[int]:
    """Independent seeds for the chunks of one draw (chunk i of seed s never equals chunk 0 of s + i)."""
    return torch.randint(2**62, (chunks,), generator=torch.Generator().manual_seed(seed)).tolist()


def _generate_chunked(config: TrainConfig, models: dict[str, nn.Module], labels: Tensor | None, n: int,
                      seed: int) -> Tensor:
    """:func:`generate` in chunks of :data:`_EVAL_BATCH`, on the CPU (bounded memory for any ``n``)."""
    sizes = [min(_EVAL_BATCH, n - start) for start in range(0, n, _EVAL_BATCH)]
    label_chunks = labels.split(sizes) if labels is not None else [None] * len(sizes)
    return torch.cat([generate(config, models, size, labels=chunk, seed=chunk_seed).cpu()
                      for size, chunk, chunk_seed in zip(sizes, label_chunks, _chunk_seeds(seed, len(sizes)))])


@functools.lru_cache(maxsize=1)
def _classifier() -> nn.Module:
    return load_classifier()


@functools.lru_cache(maxsize=4)
def _real_features(data_dir: str | None, split: str, n: int | None, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """(features, logits, labels) of ``n`` images of a split drawn with ``seed`` (all for None),
    classes taken in turn (0, 1, ..., 9, 0, ...: the labels a cgan is evaluated on); cached: floors
    and the test reference are computed once per process, also when training evaluates every N
    steps."""
    images, labels = load_mnist_family(data_dir, split, pad_to_32=True)
    if n is not None and n < len(images):
        shuffled = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        one_hot = torch.nn.functional.one_hot(labels[shuffled], MNIST_CLASSES)
        turn = (one_hot.cumsum(0) * one_hot).sum(1)  # k for the k-th image of its class
        index = shuffled[torch.argsort(turn * MNIST_CLASSES + labels[shuffled], stable=True)[:n]]
        images, labels = images[index], labels[index]
    features = classifier_features(_classifier(), images)
    return features, _classifier().head(features), labels


def _feature_metrics(real: Tensor, fake: Tensor, seed: int) -> dict[str, float]:
    """FD, KID, precision / recall (k = 3), density / coverage (k = 5) of ``fake`` against ``real``."""
    kid_mean, kid_std = kid(real, fake, generator=torch.Generator().manual_seed(seed))
    precision, recall = precision_recall(real, fake)
    density, coverage = density_coverage(real, fake)
    return {"fd": frechet_distance(real, fake), "kid": kid_mean, "kid_std": kid_std, "precision": precision,
            "recall": recall, "density": density, "coverage": coverage}


def _class_metrics(real: Tensor, real_labels: Tensor, fake: Tensor, fake_logits: Tensor,
                   fake_labels: Tensor) -> dict[str, Any]:
    """Label fidelity (the classifier's accuracy on the images of each label) and FD per class."""
    per_class = [frechet_distance(real[real_labels == c], fake[fake_labels == c]) for c in range(MNIST_CLASSES)]
    return {"label_fidelity": (fake_logits.argmax(1) == fake_labels).double().mean().item(),
            "per_class_fd": per_class, "per_class_fd_mean": sum(per_class) / len(per_class)}


@functools.lru_cache(maxsize=2)
def _floor(data_dir: str | None, n: int, seed: int, conditional: bool) -> dict[str, Any]:
    """The metrics of ``n`` train images against the test split (computed once per process)."""
    real, _, real_labels = _real_features(data_dir, "test", None, 0)
    train, train_logits, train_labels = _real_features(data_dir, "train", n, seed)
    floor = _feature_metrics(real, train, seed)
    if conditional:
        floor |= _class_metrics(real, real_labels, train, train_logits, train_labels)
    return floor


def _evaluate_image_gan(config: TrainConfig, models: dict[str, nn.Module], n: int, seed: int) -> dict[str, Any]:
    """Metrics of ``n`` generated images in the shipped classifier's features against the whole
    test split, and their floors: the same metrics of ``n`` train images against the test split."""
    conditional = config.model in CONDITIONAL_MODELS
    if conditional and n < 2 * MNIST_CLASSES:
        raise ValueError(f"num_samples: per-class metrics need two samples per class, {2 * MNIST_CLASSES} "
                         f"in all; got {n}")
    real, _, real_labels = _real_features(config.data_dir, "test", None, 0)
    labels = torch.arange(n) % MNIST_CLASSES if conditional else None
    fake = classifier_features(_classifier(), _generate_chunked(config, models, labels, n, seed))
    record = _feature_metrics(real, fake, seed)
    if conditional:
        record |= _class_metrics(real, real_labels, fake, _classifier().head(fake), labels)
    return {"feature_network": CLASSIFIER_VERSION, "samples": n, "reference": "test split", **record,
            "floor": dict(_floor(config.data_dir, n, seed, conditional))}


# Baselines depend on (model, data_dir, image_size, latent_size, seed) only: runs that share them
# share one fit per process.
_BaselineKey = tuple[str, str | None, int, int, int]


def _baseline_key(config: TrainConfig) -> _BaselineKey:
    return config.model, config.data_dir, config.image_size, config.latent_size, config.seed


def _flat_train_split(key: _BaselineKey) -> Tensor:
    """The train split as the run's model sees it, flattened to ``(N, D)`` float64 on the CPU."""
    model, data_dir, image_size, _, _ = key
    config = TrainConfig(model=model, data_dir=data_dir, image_size=image_size)
    return load_dataset(config, torch.device("cpu"), "train").inputs.flatten(1).double()


@functools.lru_cache(maxsize=2)
def _pca(key: _BaselineKey) -> tuple[Tensor, Tensor]:
    return pca_fit(_flat_train_split(key), key[3])


@functools.lru_cache(maxsize=2)
def _gmm(key: _BaselineKey) -> GaussianMixture:
    train = _flat_train_split(key)
    subset = torch.randperm(len(train), generator=torch.Generator().manual_seed(key[4]))[:GMM_TRAIN_IMAGES]
    return GaussianMixture(GMM_COMPONENTS, covariance_type="diag", reg_covar=GMM_REG_COVAR,
                           seed=key[4]).fit(train[subset])


@torch.no_grad()
def evaluate(config: TrainConfig, models: dict[str, nn.Module], *, seed: int = 0, data_dir: str | None = None,
             num_samples: int | None = None, nll_samples: int = NLL_SAMPLES) -> dict[str, Any]:
    """The run's metrics, each beside its floor or baseline.

    - gan2d: mode coverage of 2500 samples (see :mod:`fastgen.metrics`).
    - gan / cgan / stylegan / biggan: FD, KID, precision, recall, density and coverage of
      ``num_samples`` (10,000) generated images against the test split, in the features of the
      shipped classifier (``feature_network`` names its version); the conditional cgan and biggan
      add label fidelity and per-class FD; ``floor`` holds the same metrics for as many train
      images. A stylegan is evaluated without truncation.
    - ae / vae: over the first ``num_samples`` test images (all by default), the per-sample loss
      and reconstruction MSE; ae: PCA's test MSE at the same code size (fitted on the train
      split) and the ratio; vae: ELBO, IWAE bound (k = 50) and importance-sampled NLL (k =
      ``nll_samples``) in nats per image and bits per dimension, beside a diagonal GaussianMixture
      fitted on 10,000 train images.

    Deterministic for ``seed``.

    Raises:
        ValueError: ``num_samples`` below 2 or ``nll_samples`` below 1.
    """
    if num_samples is not None and num_samples < 2:
        raise ValueError(f"num_samples: expected at least 2, got {num_samples}")
    if nll_samples < 1:
        raise ValueError(f"nll_samples: expected at least 1, got {nll_samples}")
    if data_dir is not None:
        config = TrainConfig.from_dict({**config.to_dict(), "data_dir": data_dir})
    with use_backend(config.backend):  # the run's ops (the Triton interpreter would crawl on a CPU)
        if config.model == "gan2d":
            samples = generate(config, models, num_samples or MIXTURE_EVAL_SAMPLES, seed=seed)
            return evaluate_mixture(samples, mixture2d(config.mixture)).as_dict()
        if config.model in IMAGE_GAN_MODELS:
            return _evaluate_image_gan(config, models, num_samples or IMAGE_EVAL_SAMPLES, seed)
        return _evaluate_autoencoder(config, models["model"], num_samples, nll_samples, seed)


def _evaluate_autoencoder(config: TrainConfig, model: nn.Module, n: int | None, nll_samples: int,
                          seed: int) -> dict[str, Any]:
    """An AE's or VAE's record on the first ``n`` test images (see :func:`evaluate`)."""
    device = next(model.parameters()).device
    test = load_dataset(config, device, "test").inputs[:n]
    totals = {"loss": 0.0, "mse": 0.0} | ({"elbo": 0.0, "iwae_bound": 0.0, "nll": 0.0}
                                         if config.model == "vae" else {})
    with fixed_rng(seed, device), _eval_mode(model):
        for x in test.split(_EVAL_BATCH):
            totals["loss"] += model.loss(x).double().sum().item()
            totals["mse"] += (reconstruct(model, x) - x).square().flatten(1).mean(1).double().sum().item()
            if config.model == "vae":
                totals["elbo"] += model.elbo(x).double().sum().item()
                totals["iwae_bound"] += model.iwae_bound(x, IWAE_SAMPLES).double().sum().item()
                totals["nll"] += model.nll(x, nll_samples).double().sum().item()
    record = {"split": "test", "samples": len(test)} | {name: total / len(test) for name, total in totals.items()}
    flat_test = test.flatten(1).double().cpu()
    if config.model == "ae":
        pca = pca_mse(flat_test, *_pca(_baseline_key(config)))
        return record | {"pca_mse": pca, "mse_over_pca": record["mse"] / pca}
    dims = flat_test.shape[1]
    gmm_nll = -_gmm(_baseline_key(config)).log_prob(flat_test).mean().item()
    return record | {"likelihood": config.likelihood, "iwae_k": IWAE_SAMPLES, "nll_k": nll_samples,
                     "elbo_bpd": bits_per_dim(-record["elbo"], dims), "nll_bpd": bits_per_dim(record["nll"], dims),
                     "gmm_components": GMM_COMPONENTS, "gmm_nll": gmm_nll, "gmm_nll_bpd": bits_per_dim(gmm_nll, dims)}
