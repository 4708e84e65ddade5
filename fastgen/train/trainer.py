"""One training loop for GANs (DCGAN, class-conditional, StyleGAN2, BigGAN, 2D MLP), auto-encoders and VAEs.

A run lives in its directory::

    config.json      the resolved TrainConfig
    metrics.jsonl    one JSON object per logged step: step, losses, D(x), D(G(z)), images_per_s;
                     with eval_every, also {"step", "eval": the record of `fastgen eval`}
    losses.png       the training records over steps (and eval.png, the evaluations), redrawn
                     with the sample pictures (fastgen.train.plots)
    samples/         step_XXXXXX.png every sample_every steps and at the end
    checkpoint.pt    the latest checkpoint (atomic; see fastgen.train.checkpoint)

Determinism: the run seeds torch, numpy and ``random`` from ``seed``; data order comes from a
:class:`~fastgen.data.BatchSampler`; pictures are drawn on a forked RNG. A checkpoint holds all of
that state, so on the CPU a resumed run repeats the losses and weights of an uninterrupted one
bit for bit. On CUDA, bf16 autocast (``amp``) runs the forward passes.

Under torchrun the trainer is data parallel (:mod:`fastgen.train.distributed`): ``batch_size`` is
the global batch, the passes run in DistributedDataParallel, logged values are global means and
rank 0 alone writes the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from fastgen.backend import use_backend
from fastgen.data import BatchSampler
from fastgen.models.biggan import orthogonal_regularization
from fastgen.models.losses import GANObjective, gradient_penalty, r1_penalty
from fastgen.nn import convert_sync_batchnorm
from fastgen.profile import phase
from fastgen.train.checkpoint import (CheckpointError, atomic_write_bytes, capture_rng_state, load_checkpoint,
                                      restore_rng_state, save_checkpoint)
from fastgen.train import distributed
from fastgen.train.config import RESUME_OPTIONS, TrainConfig
from fastgen.train.factory import CONDITIONAL_MODELS, GAN_MODELS, build_models, load_dataset, resolve_device
from fastgen.train.inference import (CHECKPOINT_FILE, TRAINING_EVAL_SAMPLES, TRAINING_NLL_SAMPLES, checkpoint_path,
                                     evaluate, save_sample_picture)
from fastgen.train.plots import plot_run

__all__ = ["Trainer", "GANTrainer", "AutoencoderTrainer", "NonFiniteLossError", "EMA",
           "CONFIG_FILE", "METRICS_FILE"]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
# EMA decay warms up as (1 + step) / (10 + step) so early weights do not linger in short runs.
_EMA_WARMUP = 10
# The profiler ranges (fastgen.profile.phase) of each optimizer's backward and update.
_UPDATE_PHASES = {"discriminator": ("D backward", "D optimizer"), "generator": ("G backward", "G optimizer"),
                  "model": ("backward", "optimizer")}
# The option that holds each optimizer's learning rate (before --lr-decay scales it).
_LEARNING_RATES = {"discriminator": "lr_d", "generator": "lr_g", "model": "lr"}


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite: the run stopped before applying that update."""


class EMA:
    """Exponential moving average of a module's weights into a copy of it:
    ``average <- decay * average + (1 - decay) * model`` over the parameters; the buffers are
    copied, as StyleGAN2 does: BN running statistics, spectral norm's power-iteration vectors
    (an average of unit vectors is not one) and StyleGAN's ``w_avg`` (already an average; its
    average would lag the generator by another 1 / (1 - decay) steps) are the live model's.

    The tensors are paired once: ``load_state_dict`` copies in place, so the pairs stay valid.
    """

    def __init__(self, average: nn.Module, model: nn.Module) -> None:
        pairs = list(zip(average.parameters(), model.parameters(), strict=True))
        self._averages = [avg for avg, _ in pairs]
        self._lives = [live for _, live in pairs]
        self._copies = list(zip(average.buffers(), model.buffers(), strict=True))

    @torch.no_grad()
    def update(self, decay: float) -> None:
        torch._foreach_lerp_(self._averages, self._lives, 1.0 - decay)
        for avg, live in self._copies:
            avg.copy_(live)


def _seed_all(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _default_rng_state(device: torch.device) -> Tensor:
    """The state of torch's default generator of ``device``."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _adam(model: nn.Module, lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
    # foreach: one kernel per op over all tensors (the CUDA default; on the CPU it saves the
    # per-tensor overhead that dominates small models).
    return torch.optim.Adam(model.parameters(), lr, betas=betas, foreach=True)


class Trainer:
    """The loop shared by every objective: data, models, optimizers, logging, pictures, checkpoints.

    Build one with :meth:`create` (a new run) or :meth:`resume` (from a checkpoint), then call
    :meth:`fit`. Subclasses define the optimizers and one training step.

    Args:
        config: the resolved run configuration.
        progress: show a tqdm progress bar (losses and throughput) on stderr.

    Raises:
        ValueError / FileNotFoundError: bad device or data (the message names the option).
    """

    images_per_step: int

    def __init__(self, config: TrainConfig, *, progress: bool = True) -> None:
        self.dist, self.device = distributed.setup(resolve_device(config.device))
        # Recorded with a process group only (a plain run's config stays as it was resolved). Every
        # rank writes to rank 0's directory (a default one is named after each rank's clock).
        grouped = self.dist.backend is not None
        self.config = config = dataclasses.replace(
            config, world_size=self.dist.world_size if grouped else None, dist_backend=self.dist.backend,
            out_dir=self.dist.broadcast(config.out_dir))
        self.progress = progress and self.dist.is_main
        self.amp = bool(config.amp) and self.device.type == "cuda"
        self.run_dir = Path(config.out_dir)
        _seed_all(config.seed)  # alike on every rank: the same initial weights and latents
        self.data = load_dataset(config, self.device)
        self.sampler = BatchSampler(len(self.data.inputs), config.batch_size, seed=config.seed,
                                    rank=self.dist.rank, world_size=self.dist.world_size)
        self.models = build_models(config, self.device)
        if config.sync_bn:
            self._synchronize_batch_norm()
        # Data parallel: the stream alike on every rank moves to its own generator (the GAN
        # latents of the global batch); the default generators become the rank's own stream.
        self._shared_rng: torch.Generator | None = None
        if self.dist.enabled:
            self._shared_rng = torch.Generator(self.device)
            self._shared_rng.set_state(_default_rng_state(self.device))
            _seed_all(distributed.rank_seed(config.seed, self.dist.rank))
        self.optimizers = self._build_optimizers()
        if config.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs: needs a CUDA device, got device {self.device.type!r}")
        self.step = 0
        self.saved_step: int | None = None  # step of the checkpoint on disk, if any

    @staticmethod
    def create(config: TrainConfig, *, progress: bool = True) -> "Trainer":
        """The trainer for ``config.model``: :class:`GANTrainer` or :class:`AutoencoderTrainer`."""
        trainer_type = GANTrainer if config.model in GAN_MODELS else AutoencoderTrainer
        return trainer_type(config, progress=progress)

    @staticmethod
    def resume(path: str | Path, *, progress: bool = True, **overrides: Any) -> "Trainer":
        """Continue the run of checkpoint ``path`` (a file or run directory), in that directory.

        ``overrides`` may change only :data:`~fastgen.train.config.RESUME_OPTIONS` (``steps`` to
        train further, ``device``, ...); ``None`` values are ignored.

        Raises:
            FileNotFoundError / CheckpointError: no valid checkpoint at ``path``.
            ValueError: an option that a resume cannot change.
        """
        path = checkpoint_path(path)
        state = load_checkpoint(path)
        values = dict(state["config"])
        for name, value in overrides.items():
            if value is None:
                continue
            if name not in RESUME_OPTIONS:
                raise ValueError(f"{name}: cannot be changed when resuming (a resume continues the same run); "
                                 f"a resume may change {', '.join(RESUME_OPTIONS)}")
            values[name] = value
        values["out_dir"] = str(path.parent)
        trainer = Trainer.create(TrainConfig.from_dict(values), progress=progress)
        trainer.load_state_dict(state)
        return trainer

    # ------------------------------------------------------------------------------------------
    # State

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs, as tensors and plain values (for ``weights_only`` loading).

        Data parallel, a collective (every rank calls it): it adds every rank's RNG states
        (``rank_rng``) and the shared stream's (``shared_rng``); the rest is alike on every rank.
        """
        state = {
            "config": self.config.to_dict(),
            "step": self.step,
            "models": {name: module.state_dict() for name, module in self.models.items()},
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "sampler": self.sampler.state_dict(),
            "rng": capture_rng_state(),
        }
        if self._shared_rng is not None:
            state["rank_rng"] = self.dist.all_gather(state["rng"])
            state["shared_rng"] = self._shared_rng.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output. Raises CheckpointError when it does not fit this run."""
        try:
            for name, module in self.models.items():
                module.load_state_dict(state["models"][name])
            for name, optimizer in self.optimizers.items():
                optimizer.load_state_dict(state["optimizers"][name])
            self.sampler.load_state_dict(state["sampler"])
            self.step = self.saved_step = int(state["step"])
            restore_rng_state(state["rng"])
            if self._shared_rng is not None:
                self._load_rank_streams(state)
        except (KeyError, RuntimeError, TypeError, ValueError) as err:
            raise CheckpointError(f"the checkpoint does not fit this run ({type(err).__name__}: {err})") from None

    def _load_rank_streams(self, state: dict[str, Any]) -> None:
        # A checkpoint of one process (or of another world size) continues its stream as the
        # shared one and starts fresh rank streams, seeded by the step so they never repeat.
        self._shared_rng.set_state(state.get("shared_rng", _default_rng_state(self.device)))
        ranks = state.get("rank_rng", [])
        if len(ranks) == self.dist.world_size:
            restore_rng_state(ranks[self.dist.rank])
        else:
            _seed_all(distributed.rank_seed(self.config.seed, self.dist.rank, self.step))

    def _synchronize_batch_norm(self) -> None:
        """``--sync-bn``: BatchNorm statistics over the whole global batch (fastgen.nn's fused
        layers merge them across ranks; without a process group they are unchanged); the EMA
        copy only runs in eval mode and stays as it is."""
        for name in ("generator", "discriminator", "model"):
            if name in self.models:
                self.models[name] = convert_sync_batchnorm(self.models[name])

    @property
    def checkpoint_file(self) -> Path:
        return self.run_dir / CHECKPOINT_FILE

    def save_checkpoint(self) -> None:
        """Write the run's state to ``checkpoint.pt`` atomically (rank 0; every rank calls it)."""
        state = self.state_dict()
        if self.dist.is_main:
            save_checkpoint(state, self.checkpoint_file)
        self.saved_step = self.step

    # ------------------------------------------------------------------------------------------
    # The loop

    def fit(self) -> dict[str, float]:
        """Train from the current step to ``config.steps``; return the last metrics record.

        Raises:
            NonFiniteLossError: a loss became NaN/inf (the checkpoint on disk is the last good one).
            ValueError: the run is already at ``config.steps``.
        """
        cfg = self.config
        if self.step >= cfg.steps:
            raise ValueError(f"steps: the run is already at step {self.step}; pass more steps to continue it")
        main = self.dist.is_main  # rank 0 alone writes the run directory
        if main:
            (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.run_dir / CONFIG_FILE, (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())
            self._drop_metrics_after(self.step)
        # Each value is averaged over the steps that logged it (lazy R1 logs every r1_every steps).
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        window_steps, window_seconds, record = 0, 0.0, {}
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress, unit="step",
                   desc=f"{cfg.model} {self.device.type}", dynamic_ncols=True)
        try:
            with use_backend(cfg.backend):
                while self.step < cfg.steps:
                    start = time.perf_counter()
                    values = self.train_step()
                    window_seconds += time.perf_counter() - start
                    self.step += 1
                    window_steps += 1
                    for name, value in values.items():
                        sums[name] = sums.get(name, 0.0) + value
                        counts[name] = counts.get(name, 0) + 1
                    bar.update()
                    last = self.step == cfg.steps
                    if self.step % cfg.log_every == 0 or last:
                        record = {"step": self.step, **{k: v / counts[k] for k, v in sums.items()},
                                  "images_per_s": window_steps * self.images_per_step / window_seconds}
                        if main:
                            self._append_metrics(record)
                        bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k != "step"}, refresh=False)
                        sums, counts, window_steps, window_seconds = {}, {}, 0, 0.0
                    if main and cfg.eval_every and (self.step % cfg.eval_every == 0 or last):
                        self._append_metrics({"step": self.step, "eval": self.evaluate()})
                    if main and (self.step % cfg.sample_every == 0 or last):
                        self.save_samples(self.run_dir / "samples" / f"step_{self.step:06d}.png")
                        plot_run(self.run_dir, METRICS_FILE)
                    if self.step % cfg.checkpoint_every == 0 or last:
                        self.save_checkpoint()
        finally:
            bar.close()
        return record

    def evaluate(self) -> dict[str, Any]:
        """The record of ``fastgen eval`` on fewer samples (:data:`TRAINING_EVAL_SAMPLES`), with the
        run's seed; it draws on forked RNGs, so it never changes the training that follows."""
        return evaluate(self.config, self.models, seed=self.config.seed,
                        num_samples=TRAINING_EVAL_SAMPLES.get(self.config.model),
                        nll_samples=TRAINING_NLL_SAMPLES)

    def train_step(self) -> dict[str, float]:
        """One optimization step; returns the logged values of that step."""
        raise NotImplementedError

    def _build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def save_samples(self, path: Path) -> None:
        """Write the run's sample picture (see :func:`~fastgen.train.inference.save_sample_picture`)."""
        save_sample_picture(self.config, self.models, path, seed=self.config.seed, dataset=self.data)

    def _next_batch(self, with_labels: bool = False) -> tuple[Tensor, Tensor | None]:
        index = next(self.sampler).to(self.device)
        x = self.data.inputs[index]
        if x.dim() == 4:
            if x.shape[-1] < self.config.image_size:  # 64x64 models: upsample the stored 32x32 images
                x = F.interpolate(x, size=self.config.image_size, mode="bilinear", align_corners=False)
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self.data.labels[index] if with_labels else None

    def _shared_randn(self, rows: int, *size: int) -> Tensor:
        """Standard normal noise ``(rows, *size)`` for this rank's shard of ``rows`` examples. Data
        parallel, every rank draws the noise of the global batch from the shared stream and keeps
        its rows: the ranks together see the noise of one process."""
        if self._shared_rng is None:
            return torch.randn(rows, *size, device=self.device)
        noise = torch.randn(rows * self.dist.world_size, *size, generator=self._shared_rng, device=self.device)
        return noise[self.dist.rank * rows:(self.dist.rank + 1) * rows]

    def _compiled(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` under torch.compile with ``--compile`` (one graph: fullgraph, fastgen's ops
        included), and replayed as CUDA graphs with ``--cuda-graphs`` (Inductor's
        "reduce-overhead" mode); ``fn`` itself otherwise."""
        cfg = self.config
        if not (cfg.compile or cfg.cuda_graphs):
            return fn
        return torch.compile(fn, fullgraph=True, mode="reduce-overhead" if cfg.cuda_graphs else None)

    def _begin_step(self) -> None:
        """Marks a new iteration for Inductor's CUDA graphs: the previous step's graph outputs
        may now be overwritten."""
        if self.config.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def _apply(self, optimizer: str, loss: Tensor, logged: dict[str, Tensor]) -> dict[str, float]:
        """Backward ``loss``, check the logged values (one device sync; data parallel, their global
        means in one all-reduce, so every rank takes the same decision), then step ``optimizer``."""
        opt = self.optimizers[optimizer]
        backward, update = _UPDATE_PHASES[optimizer]
        with phase(backward):
            opt.zero_grad(set_to_none=True)
            loss.backward()
        with phase(update):
            means = self.dist.mean(torch.stack([t.detach().float() for t in logged.values()]))
            values = dict(zip(logged, means.tolist()))
            bad = [f"{name}={value}" for name, value in values.items() if not math.isfinite(value)]
            if bad:
                kept = (f"the last good checkpoint is {self.checkpoint_file} (step {self.saved_step})"
                        if self.saved_step is not None else "no checkpoint had been written yet")
                raise NonFiniteLossError(f"step {self.step + 1}: non-finite {', '.join(bad)}; stopped before "
                                         f"applying this update; {kept}")
            lr = getattr(self.config, _LEARNING_RATES[optimizer]) * self.learning_rate_factor()
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
        return values

    def learning_rate_factor(self) -> float:
        """The factor on every configured learning rate at the current step (``lr_decay``).

        With ``lr_decay = f > 0`` it is 1 until the last ``f * steps`` steps, then falls linearly:
        ``(steps - step) / (f * steps)`` for the 0-based step about to be taken, so the last step
        still moves. It depends on the step and the configuration only, so a resumed run continues
        the same schedule (resuming with more ``steps`` stretches it to the new end: the rate
        jumps back up to that point of the new schedule)."""
        decay = (self.config.lr_decay or 0.0) * self.config.steps
        # 0 past the end (``profile`` may step beyond it): a negative rate would climb the loss.
        return max(0.0, min(1.0, (self.config.steps - self.step) / decay)) if decay > 0 else 1.0

    def _drop_metrics_after(self, step: int) -> None:
        # A run resumed from step k continues the log from k: records past k were never
        # checkpointed, and a kill may have cut the last line short.
        path = self.run_dir / METRICS_FILE
        if not path.exists():
            return
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if _record_step(line) <= step]
        if len(kept) != len(lines):
            atomic_write_bytes(path, "".join(kept).encode())

    def _append_metrics(self, record: dict[str, float]) -> None:
        with open(self.run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")


def _record_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a line that is not a complete record."""
    try:
        return json.loads(line)["step"] if line.endswith("\n") else math.inf
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


class _Discriminate(nn.Module):
    """D's passes as one module's forward, for DDP (which averages the gradients of calls through
    its module's forward): adversarial logits ``(B,)`` and, for ACGAN, class logits ``(B, K)`` (its
    logits ignore labels). ``eager=True`` runs the pass uncompiled (one that a penalty
    differentiates twice), otherwise as ``compiled`` makes it."""

    def __init__(self, discriminator: nn.Module, acgan: bool,
                 compiled: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        super().__init__()
        self.discriminator = discriminator
        self.acgan = acgan
        self._compiled_pass = compiled(self._pass)

    def forward(self, x: Tensor, labels: Tensor | None, eager: bool = False) -> tuple[Tensor, Tensor | None]:
        return (self._pass if eager else self._compiled_pass)(x, labels)

    def _pass(self, x: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if self.acgan:
            features = self.discriminator.features(x)
            return self.discriminator.head(features), self.discriminator.classify(features)
        return self.discriminator(x, labels), None


class _MeanLoss(nn.Module):
    """An AE/VAE's loss as a module's forward (for DDP): the batch mean of ``model.loss(x)``, a scalar."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.loss(x).mean()


class GANTrainer(Trainer):
    """Alternating updates: ``n_critic`` discriminator steps, each on a fresh real batch, then one
    generator step on the last critic step's generated batch; Adam for both (DCGAN defaults
    lr 2e-4, betas (0.5, 0.999)); the EMA generator follows after each generator step.

    R1 is lazy with ``r1_every`` (StyleGAN2): it runs on the steps that are multiples of
    ``r1_every``, weighted ``r1_gamma / 2 * r1_every`` so that its mean weight stays ``r1_gamma / 2``.
    With ``ortho_reg`` (BigGAN), the generator's loss adds ``ortho_reg`` times its orthogonal
    regularization (:func:`~fastgen.models.biggan.orthogonal_regularization`).

    Logged per step: ``d_loss``, ``d_real`` (D(x)), ``d_fake`` (D(G(z))), ``g_loss``, and when they
    apply ``gp``, ``r1``, ``ortho`` (unweighted penalties; ``r1`` averaged over the steps that
    compute it), ``d_class``, ``g_class`` (ACGAN cross-entropies).
    """

    def __init__(self, config: TrainConfig, *, progress: bool = True) -> None:
        super().__init__(config, progress=progress)
        self.objective = GANObjective(config.loss, config.label_smoothing)
        self.conditional = config.model in CONDITIONAL_MODELS
        self.acgan = config.conditioning == "acgan"
        self.images_per_step = config.batch_size * config.n_critic
        self.ema = (EMA(self.models["generator_ema"], self.models["generator"])
                    if "generator_ema" in self.models else None)
        # The passes under --compile, in DDP when data parallel. DDP goes around the compiled
        # module: torch.compile of a DDP module breaks the graph at DDP's hooks, which --compile's
        # fullgraph refuses. A pass that a penalty differentiates twice (R1's real pass, WGAN-GP's
        # interpolates) stays eager: a compiled backward is differentiable once.
        discriminate = _Discriminate(self.models["discriminator"], self.acgan, self._compiled)
        self._generate = self.dist.wrap(self._compiled(self.models["generator"]), self.device)
        self._discriminate = self.dist.wrap(discriminate, self.device)
        # G's step runs D frozen: no D gradient to average, so D's plain module (DDP expects a
        # gradient for every parameter of a pass through it).
        self._judge = discriminate

    def _build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        betas = (self.config.beta1, self.config.beta2)
        return {
            "generator": _adam(self.models["generator"], self.config.lr_g, betas),
            "discriminator": _adam(self.models["discriminator"], self.config.lr_d, betas),
        }

    def _discriminator_step(self, real: Tensor, fake: Tensor, labels: Tensor | None) -> dict[str, float]:
        cfg = self.config
        r1_every = cfg.r1_every or 1  # None: a model without lazy R1
        r1 = bool(cfg.r1_gamma) and self.step % r1_every == 0
        if r1:
            real.requires_grad_(True)
        with self._autocast(), phase("D forward"):
            real_logits, real_classes = self._discriminate(real, labels, eager=r1)
            fake_logits, fake_classes = self._discriminate(fake, labels)
        with self._autocast(), phase("D loss"):
            out = self.objective.d_loss(real_logits, fake_logits)
            loss = out.loss
            logged = {"d_loss": out.loss, "d_real": out.d_real, "d_fake": out.d_fake}
            if self.acgan:
                logged["d_class"] = (F.cross_entropy(real_classes.float(), labels)
                                     + F.cross_entropy(fake_classes.float(), labels))
                loss = loss + logged["d_class"]
            if cfg.loss == "wgan_gp":
                logged["gp"] = gradient_penalty(lambda x: self._discriminate(x, labels, eager=True)[0], real, fake)
                loss = loss + cfg.gp_weight * logged["gp"]
            if r1:
                logged["r1"] = r1_penalty(real_logits, real)
                loss = loss + 0.5 * cfg.r1_gamma * r1_every * logged["r1"]
        return self._apply("discriminator", loss, logged)

    def _generator_step(self, fake: Tensor, labels: Tensor | None) -> dict[str, float]:
        discriminator = self.models["discriminator"]
        discriminator.requires_grad_(False)  # G's step needs gradients through D, not for D's weights
        try:
            # G's loss is D's verdict on the generated batch: D's forward pass belongs to it.
            with self._autocast(), phase("G loss"):
                fake_logits, fake_classes = self._judge(fake, labels)
                out = self.objective.g_loss(fake_logits)
                loss = out.loss
                logged = {"g_loss": out.loss}
                if self.acgan:
                    logged["g_class"] = F.cross_entropy(fake_classes.float(), labels)
                    loss = loss + logged["g_class"]
            if self.config.ortho_reg:  # on the weights themselves: outside autocast
                logged["ortho"] = orthogonal_regularization(self.models["generator"], beta=1.0)
                loss = loss + self.config.ortho_reg * logged["ortho"]
            return self._apply("generator", loss, logged)
        finally:
            discriminator.requires_grad_(True)

    def train_step(self) -> dict[str, float]:
        generator = self.models["generator"]
        values: dict[str, float] = {}
        self._begin_step()
        for critic_step in range(self.config.n_critic):
            # Conditional models generate the classes of the real batch.
            real, labels = self._next_batch(with_labels=self.conditional)
            z = self._shared_randn(real.shape[0], generator.latent_size)
            # Only the last critic step's fake batch feeds the generator step: keep its graph.
            with self._autocast(), torch.set_grad_enabled(critic_step == self.config.n_critic - 1), \
                    phase("G forward"):
                fake = self._generate(z, labels)
            values = self._discriminator_step(real, fake.detach(), labels)
        values |= self._generator_step(fake, labels)
        if self.ema is not None:
            with phase("EMA"):
                self.ema.update(min(self.config.ema, (1 + self.step) / (_EMA_WARMUP + self.step)))
        return values


class AutoencoderTrainer(Trainer):
    """Minimizes the mean of ``model.loss(x)`` (AE: reconstruction loss; VAE: negative beta-ELBO)
    with Adam. Logged per step: ``loss``."""

    def __init__(self, config: TrainConfig, *, progress: bool = True) -> None:
        super().__init__(config, progress=progress)
        self.images_per_step = config.batch_size
        self._loss = self.dist.wrap(self._compiled(_MeanLoss(self.models["model"])), self.device)

    def _build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"model": _adam(self.models["model"], self.config.lr, (self.config.beta1, self.config.beta2))}

    def train_step(self) -> dict[str, float]:
        x, _ = self._next_batch()
        self._begin_step()
        with self._autocast(), phase("forward"):  # the model's forward pass and its loss
            loss = self._loss(x)
        return self._apply("model", loss, {"loss": loss})
