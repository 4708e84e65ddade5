"""Using a run's models: load them from a checkpoint, sample, draw the sample picture, evaluate."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fastgen.data import mixture2d
from fastgen.metrics import evaluate_mixture
from fastgen.train.checkpoint import CheckpointError, load_checkpoint
from fastgen.train.config import TrainConfig
from fastgen.train.factory import (MNIST_CLASSES, Dataset, build_models, generator_for_sampling, load_dataset,
                                   resolve_device)
from fastgen.train.images import save_image_grid, save_scatter

__all__ = ["CHECKPOINT_FILE", "checkpoint_path", "fixed_rng", "load_run", "generate", "reconstruct",
           "save_sample_picture", "evaluate"]

CHECKPOINT_FILE = "checkpoint.pt"
#: Samples of the 2D-mixture evaluation (the standard protocol).
MIXTURE_EVAL_SAMPLES = 2500
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
             seed: int = 0) -> Tensor:
    """``n`` float32 samples in data space, drawn with ``seed`` (the global RNG state is kept).

    GAN images are in [-1, 1] ``(n, 1, S, S)``; VAE images in [0, 1]; gan2d points ``(n, 2)``.
    ``labels`` (``(n,)`` int64, cgan only) default to ``0, 1, ..., 9, 0, 1, ...``.

    Raises:
        ValueError: an auto-encoder (no prior to sample from), labels for an unconditional model,
            or labels out of range.
    """
    if config.model == "ae":
        raise ValueError("model: an auto-encoder has no prior to sample from; train a vae to sample")
    device = _device_of(models)
    if config.model == "cgan":
        labels = torch.arange(n) % MNIST_CLASSES if labels is None else labels
        if labels.shape != (n,) or labels.min() < 0 or labels.max() >= MNIST_CLASSES:
            raise ValueError(f"labels: expected {n} class labels in 0..{MNIST_CLASSES - 1}, got {labels.tolist()}")
        labels = labels.to(device)
    elif labels is not None:
        raise ValueError(f"labels: only a cgan takes class labels, this is a {config.model}")
    with fixed_rng(seed, device):
        if config.model == "vae":
            with _eval_mode(models["model"]) as vae:
                return vae.sample(n).float()
        with _eval_mode(generator_for_sampling(models)) as generator:
            z = torch.randn(n, generator.latent_size, device=device)
            samples = generator(z, labels)
    return samples.float().contiguous()


@torch.no_grad()
def reconstruct(model: nn.Module, x: Tensor) -> Tensor:
    """An AE's or VAE's reconstruction of ``x`` in data space ([0, 1] images; a VAE decodes the
    posterior mean), float32."""
    with _eval_mode(model):
        return model.reconstruct(x).float()


def save_sample_picture(config: TrainConfig, models: dict[str, nn.Module], path: str | os.PathLike, *,
                        seed: int = 0, n: int | None = None, labels: Tensor | None = None,
                        dataset: Dataset | None = None, nrow: int = 8) -> None:
    """The run's picture as a PNG: a grid of samples (``nrow`` per row; cgan by default one class per
    row), originals over reconstructions (AE, from ``dataset``), or a scatter of ``n`` (2500) points over
    rings of 3 std around the mixture's modes (gan2d)."""
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
    if config.model == "cgan" and labels is None:
        labels = torch.arange(MNIST_CLASSES).repeat_interleave(8)  # one class per row of 8
    n = len(labels) if labels is not None else (n or 64)
    images = generate(config, models, n, labels=labels, seed=seed)
    save_image_grid(images, path, nrow=nrow, value_range=(0.0, 1.0) if config.model == "vae" else (-1.0, 1.0),
                    scale=2)


@torch.no_grad()
def evaluate(config: TrainConfig, models: dict[str, nn.Module], *, seed: int = 0,
             data_dir: str | None = None) -> dict[str, Any]:
    """The run's metrics: mode coverage of 2500 samples (gan2d, see :mod:`fastgen.metrics`), or the
    per-sample loss, reconstruction MSE and, for a VAE, ELBO averaged over the test split (AE/VAE).

    Raises:
        ValueError: an image GAN (no built-in metric).
    """
    if config.model == "gan2d":
        samples = generate(config, models, MIXTURE_EVAL_SAMPLES, seed=seed)
        return evaluate_mixture(samples, mixture2d(config.mixture)).as_dict()
    if config.model not in ("ae", "vae"):
        raise ValueError(f"model: eval measures gan2d, ae and vae runs; a {config.model} run has no built-in metric")
    if data_dir is not None:
        config = TrainConfig.from_dict({**config.to_dict(), "data_dir": data_dir})
    model = models["model"]
    test = load_dataset(config, _device_of(models), "test")
    totals = {"loss": 0.0, "mse": 0.0} | ({"elbo": 0.0} if config.model == "vae" else {})
    with fixed_rng(seed, _device_of(models)), _eval_mode(model):
        for x in test.inputs.split(_EVAL_BATCH):
            totals["loss"] += model.loss(x).double().sum().item()
            totals["mse"] += (reconstruct(model, x) - x).square().flatten(1).mean(1).double().sum().item()
            if "elbo" in totals:
                totals["elbo"] += model.elbo(x).double().sum().item()
    count = len(test.inputs)
    return {"split": "test", "samples": count} | {name: total / count for name, total in totals.items()}
