"""The resolved configuration of a training run: per-model defaults, validation, JSON round trip.

A :class:`TrainConfig` holds plain values only (str, int, float, bool, None) so that it goes into
``config.json`` and into checkpoints loaded with ``torch.load(weights_only=True)`` as it is.
Options that do not apply to a model stay ``None``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch

from fastgen.backend import BACKENDS
from fastgen.data import MIXTURE2D_NAMES
from fastgen.models.ae import ARCHS, LIKELIHOODS, MLP_ACTIVATIONS
from fastgen.models.gan import CONDITIONINGS
from fastgen.models.losses import GAN_LOSSES
from fastgen.models.stylegan import UPSAMPLES

__all__ = ["MODELS", "TrainConfig", "RESUME_OPTIONS", "RECORDED", "CUDA_DEFAULTS"]

MODELS = ("gan", "cgan", "stylegan", "biggan", "ae", "vae", "gan2d")
DEVICES = ("auto", "cpu", "cuda")

_RUN = dict(seed=0, device="auto", backend="auto", amp=True, compile=False, cuda_graphs=False, sync_bn=False,
            log_every=50, eval_every=0, out_dir=None, lr_decay=0.0)
# The main job: DCGAN on Fashion-MNIST 32x32, sized to finish in minutes on a 2-core CPU.
_GAN = dict(_RUN, data_dir=None, image_size=32, steps=2500, batch_size=64, width=32, latent_size=100,
            loss="non_saturating", label_smoothing=0.0, n_critic=1, gp_weight=10.0, r1_gamma=0.0,
            spectral_norm=False, lr_g=2e-4, lr_d=2e-4, beta1=0.5, beta2=0.999, ema=0.999,
            sample_every=500, checkpoint_every=500)
# StyleGAN2-small: StyleGAN2's objective (non-saturating, lazy R1 every 16 steps, Adam lr 0.0025
# with betas (0, 0.99)) at a width that trains on a CPU: about 0.3 s of CPU time per step.
_STYLEGAN = dict(_RUN, data_dir=None, image_size=32, steps=2000, batch_size=32, width=8, latent_size=64,
                 mapping_layers=4, style_mixing=0.9, upsample="bilinear", loss="non_saturating",
                 label_smoothing=0.0, n_critic=1,
                 gp_weight=10.0, r1_gamma=0.1, r1_every=16, lr_g=2.5e-3, lr_d=2.5e-3, beta1=0.0, beta2=0.99,
                 ema=0.999, sample_every=500, checkpoint_every=500)
# BigGAN-small: hinge loss, spectral norm in G and D, orthogonal regularization of G, Adam betas
# (0, 0.999) as BigGAN; width 16 and batch 32 for a CPU: about 0.38 s of CPU time per step. Adam
# 5e-4 draws every class by step 1,500 (2e-4: blobs until about 2,500; README, NOTES); CUDA
# keeps it, unmeasured there.
_BIGGAN = dict(_GAN, batch_size=32, width=16, latent_size=64, loss="hinge", spectral_norm=True, ortho_reg=1e-4,
               lr_g=5e-4, lr_d=5e-4, beta1=0.0, beta2=0.999)
# AE and VAE: the MLP on 28x28 Fashion-MNIST; the VAE's defaults as measured in the README.
_AUTOENCODER = dict(_RUN, data_dir=None, image_size=28, steps=3000, batch_size=128, latent_size=16, arch="mlp",
                    mlp_activation="relu", likelihood="bernoulli", hidden=None, lr=1e-3, beta1=0.9, beta2=0.999,
                    sample_every=1000, checkpoint_every=1000)
# The auto-encoder as non-linear PCA, tuned for test MSE (issue 12's bar: at most 0.5x PCA's at
# code 30 in 10 CPU minutes): SiLU (ReLU ends near 0.55x PCA) and a learning rate falling linearly
# over the whole run. The Bernoulli likelihood's sigmoid mean beats a unit Gaussian's on MSE itself.
_AE = dict(_AUTOENCODER, mlp_activation="silu", steps=18000, lr_decay=1.0, sample_every=5000, checkpoint_every=5000)
#: What changes on CUDA (``--device cuda``, or ``auto`` with a GPU) for the models whose CPU
#: defaults are sized down to train in minutes on a CPU: StyleGAN2's 8 mapping layers and wider,
#: longer runs. Not measured on a GPU yet (none has run fastgen); explicit options win.
CUDA_DEFAULTS: dict[str, dict[str, Any]] = {
    "stylegan": dict(width=32, batch_size=64, mapping_layers=8, steps=20000, sample_every=1000,
                     checkpoint_every=1000),
    "biggan": dict(width=64, batch_size=64, steps=20000, sample_every=1000, checkpoint_every=1000),
}
DEFAULTS: dict[str, dict[str, Any]] = {
    "gan": _GAN,
    "cgan": dict(_GAN, conditioning="projection"),
    "stylegan": _STYLEGAN,
    "biggan": _BIGGAN,
    # Tuned on grid25 (seeds 0-2: 25/25 modes, 92.3-93.8% high quality): a wide batch, a high
    # learning rate, Adam betas (0, 0.99) and R1 as in StyleGAN2, and a short EMA make the clusters
    # sharp; the rates falling linearly over the second half settle them (88-90% without).
    "gan2d": dict(_RUN, mixture="grid25", steps=6000, batch_size=1024, latent_size=16, hidden=64, depth=3,
                  loss="non_saturating", label_smoothing=0.0, n_critic=1, gp_weight=10.0, r1_gamma=0.1,
                  spectral_norm=False, lr_g=3e-3, lr_d=3e-3, lr_decay=0.5, beta1=0.0, beta2=0.99, ema=0.99,
                  amp=False, log_every=100, sample_every=1000, checkpoint_every=1000),
    "ae": _AE,
    "vae": dict(_AUTOENCODER, beta=1.0),
}

#: Facts about the run that the trainer records (config.json, checkpoints), not options: the number
#: of processes in its torch.distributed group and their backend (both None: no process group).
RECORDED = ("world_size", "dist_backend")
#: Options a resumed run may change; the rest would make the continuation a different run.
RESUME_OPTIONS = ("steps", "device", "backend", "compile", "cuda_graphs", "log_every", "sample_every",
                  "checkpoint_every", "eval_every")


@dataclass
class TrainConfig:
    """Every option of a run; see ``python -m fastgen train MODEL --help`` for their meaning.

    Build one with :meth:`resolve` (defaults of the model + overrides, validated).
    """

    model: str
    # run
    seed: int | None = None
    device: str | None = None
    backend: str | None = None
    amp: bool | None = None
    compile: bool | None = None
    cuda_graphs: bool | None = None
    sync_bn: bool | None = None
    out_dir: str | None = None
    steps: int | None = None
    batch_size: int | None = None
    log_every: int | None = None
    eval_every: int | None = None  # 0: off (None: a run from before the option)
    sample_every: int | None = None
    checkpoint_every: int | None = None
    # data
    data_dir: str | None = None
    image_size: int | None = None
    mixture: str | None = None
    # models
    width: int | None = None
    latent_size: int | None = None
    hidden: int | list[int] | None = None  # gan2d: units per layer; ae/vae: widths per layer
    depth: int | None = None
    mapping_layers: int | None = None  # stylegan
    style_mixing: float | None = None  # stylegan: probability per batch
    upsample: str | None = None  # stylegan (None: a run from before the option, "transposed")
    conditioning: str | None = None
    spectral_norm: bool | None = None
    arch: str | None = None
    mlp_activation: str | None = None  # ae/vae (None: a run from before the option, ReLU)
    likelihood: str | None = None
    beta: float | None = None
    # objective and optimizer
    loss: str | None = None
    label_smoothing: float | None = None
    n_critic: int | None = None
    gp_weight: float | None = None
    r1_gamma: float | None = None
    r1_every: int | None = None  # stylegan: lazy R1
    ortho_reg: float | None = None  # biggan: orthogonal regularization of G
    lr: float | None = None
    lr_g: float | None = None
    lr_d: float | None = None
    lr_decay: float | None = None  # 0: constant (None: a run from before the option)
    beta1: float | None = None
    beta2: float | None = None
    ema: float | None = None
    # recorded by the trainer (RECORDED)
    world_size: int | None = None
    dist_backend: str | None = None

    @classmethod
    def resolve(cls, model: str, **overrides: Any) -> "TrainConfig":
        """The model's defaults updated with ``overrides`` (``None`` values mean "default"), validated.

        Raises:
            ValueError: unknown model, an option that does not apply to it, or an invalid value;
                the message names the option.
        """
        if model not in MODELS:
            raise ValueError(f"model: expected one of {', '.join(MODELS)}, got {model!r}")
        values = dict(DEFAULTS[model])
        device = overrides.get("device") or values["device"]
        if model in CUDA_DEFAULTS and (device == "cuda" or device == "auto" and torch.cuda.is_available()):
            values.update(CUDA_DEFAULTS[model])
        for name, value in overrides.items():
            if value is None:
                continue
            if name not in values:
                raise ValueError(f"{name}: not an option of model {model!r}")
            values[name] = value
        if values["out_dir"] is None:
            values["out_dir"] = f"runs/{model}-{time.strftime('%Y%m%d-%H%M%S')}"
        config = cls(model=model, **values)
        config.validate()
        return config

    def validate(self) -> None:
        """Check every option that applies to the model; raise ValueError naming the first bad one."""
        applies = DEFAULTS[self.model]
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name not in ("model", *RECORDED) and field.name not in applies and value is not None:
                raise ValueError(f"{field.name}: not an option of model {self.model!r}")
        _positive_ints(self, "steps", "batch_size", "log_every", "sample_every", "checkpoint_every", "width",
                       "latent_size", "depth", "n_critic", "world_size", "mapping_layers", "r1_every")
        if self.dist_backend is not None and not isinstance(self.dist_backend, str):
            raise ValueError(f"dist_backend: expected a backend name or None, got {self.dist_backend!r}")
        if self.model == "gan2d":
            _positive_ints(self, "hidden")
        elif self.hidden is not None and (not isinstance(self.hidden, list) or not self.hidden or any(
                isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in self.hidden)):
            raise ValueError(f"hidden: expected a non-empty list of positive integers, got {self.hidden!r}")
        _choice(self, "device", DEVICES)
        _choice(self, "backend", BACKENDS)
        _choice(self, "mixture", MIXTURE2D_NAMES)
        _choice(self, "loss", GAN_LOSSES)
        _choice(self, "conditioning", CONDITIONINGS[1:])
        _choice(self, "arch", ARCHS)
        _choice(self, "mlp_activation", tuple(MLP_ACTIVATIONS))
        _choice(self, "upsample", UPSAMPLES)
        _choice(self, "likelihood", LIKELIHOODS)
        _choice(self, "image_size", (28, 32, 64) if self.model in ("ae", "vae") else (32, 64))
        for name in ("compile", "cuda_graphs", "sync_bn"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        if self.eval_every is not None and (not isinstance(self.eval_every, int) or isinstance(self.eval_every, bool)
                                            or self.eval_every < 0):
            raise ValueError(f"eval_every: expected a non-negative integer (0: off), got {self.eval_every!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {self.seed!r}")
        for name in ("lr", "lr_g", "lr_d", "beta"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name}: expected a positive number, got {value!r}")
        for name in ("gp_weight", "r1_gamma", "ortho_reg"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"{name}: expected a number >= 0, got {value!r}")
        for name in ("beta1", "beta2", "ema", "label_smoothing"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise ValueError(f"{name}: expected a number in [0, 1), got {value!r}")
        if self.lr_decay is not None and not 0 <= self.lr_decay <= 1:
            raise ValueError(f"lr_decay: expected a fraction of the run in [0, 1], got {self.lr_decay!r}")
        if self.style_mixing is not None and not 0 <= self.style_mixing <= 1:
            raise ValueError(f"style_mixing: expected a probability in [0, 1], got {self.style_mixing!r}")
        if self.label_smoothing and self.loss not in ("non_saturating", "minimax"):
            raise ValueError(f"label_smoothing: only the non_saturating and minimax losses take it, "
                             f"got {self.label_smoothing} with loss {self.loss!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (for config.json and checkpoints)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; validates. Raises ValueError on unknown fields."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown or "model" not in values:
            raise ValueError(f"config: unknown fields {unknown}" if unknown else "config: no 'model' field")
        if values["model"] not in MODELS:
            raise ValueError(f"model: expected one of {', '.join(MODELS)}, got {values['model']!r}")
        config = cls(**values)
        config.validate()
        return config


def _positive_ints(config: TrainConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")


def _choice(config: TrainConfig, name: str, choices: tuple) -> None:
    value = getattr(config, name)
    if value is not None and value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(str, choices))}, got {value!r}")
