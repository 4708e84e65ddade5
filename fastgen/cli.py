"""The command line: ``python -m fastgen train | sample | eval | profile`` (also installed as ``fastgen``).

``python -m fastgen train`` with no arguments is the main job: a DCGAN on Fashion-MNIST 32x32
(from the Debian package ``dataset-fashion-mnist``), a few minutes on a laptop CPU.

Bad input (unknown model, missing data directory, negative steps, unreadable checkpoint) ends
with one line on stderr and exit code 2; a loss that turns NaN/inf ends with exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastgen.backend import BACKENDS, interpreter_enabled
from fastgen.data import DEFAULT_FASHION_MNIST_DIR, MIXTURE2D_NAMES
from fastgen.models.gan import CONDITIONINGS
from fastgen.models.losses import GAN_LOSSES
from fastgen.profile import profile_trainer, write_summary
from fastgen.train import distributed
from fastgen.train.checkpoint import CheckpointError
from fastgen.train.config import (ARCHS, CUDA_DEFAULTS, DEFAULTS, DEVICES, LIKELIHOODS, MLP_ACTIVATIONS, MODELS,
                                  RESUME_OPTIONS, UPSAMPLES, TrainConfig)
from fastgen.train.factory import CONDITIONAL_MODELS, MNIST_CLASSES, resolve_device
from fastgen.train.inference import CHECKPOINT_FILE, evaluate, generate, load_run, save_sample_picture
from fastgen.train.trainer import NonFiniteLossError, Trainer

__all__ = ["main"]

_MODEL_HELP = {
    "gan": "DCGAN on Fashion-MNIST (the default: python -m fastgen train)",
    "cgan": "class-conditional DCGAN (projection discriminator or ACGAN)",
    "stylegan": "StyleGAN2-small on Fashion-MNIST: mapping network, modulated convs, style mixing, lazy R1",
    "biggan": "BigGAN-small, class-conditional: conditional BN, projection D, spectral norm, orthogonal reg.",
    "ae": "auto-encoder on Fashion-MNIST",
    "vae": "variational auto-encoder on Fashion-MNIST",
    "gan2d": "MLP GAN on a 2D Gaussian mixture (ring8 or grid25)",
}


def _number(parse: Callable[[str], float], accept: Callable[[float], bool],
            expected: str) -> Callable[[str], float]:
    """An argparse ``type``: ``parse(text)``, refused unless ``accept`` takes it, with the message
    "expected <expected>, got <text>"."""

    def convert(text: str) -> float:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return convert


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _number(int, lambda v: v >= 0, "a non-negative integer")
_psi = _number(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers such as 512,256; "
                                         f"got {text!r}") from None
    if any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _labels(text: str) -> list[int]:
    try:
        labels = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated class numbers such as 0,3,7; got {text!r}") from None
    if any(not 0 <= label < MNIST_CLASSES for label in labels):
        raise argparse.ArgumentTypeError(f"expected class numbers in 0..{MNIST_CLASSES - 1}, got {text!r}")
    return labels


# name -> (argparse keyword arguments, help), in --help order. Each model's parser takes those in its DEFAULTS.
_TRAIN_OPTIONS: dict[str, tuple[dict[str, Any], str]] = {
    "data_dir": ({"metavar": "DIR"}, f"directory of MNIST-family IDX files, raw or .gz (default: "
                                     f"{DEFAULT_FASHION_MNIST_DIR}, Debian package dataset-fashion-mnist)"),
    "mixture": ({"choices": MIXTURE2D_NAMES}, "2D mixture: 8 modes on a circle or a 5x5 grid"),
    "image_size": ({"type": int, "metavar": "S"}, "image side: 32 or 64 (AE/VAE also 28: unpadded)"),
    "steps": ({"type": _positive_int, "metavar": "N"}, "training steps (generator updates for GANs)"),
    "batch_size": ({"type": _positive_int, "metavar": "B"}, "examples per batch"),
    "loss": ({"choices": GAN_LOSSES}, "GAN objective"),
    "label_smoothing": ({"type": float, "metavar": "S"}, "one-sided label smoothing (BCE losses)"),
    "n_critic": ({"type": _positive_int, "metavar": "K"}, "discriminator updates per generator update"),
    "gp_weight": ({"type": float, "metavar": "W"}, "gradient-penalty weight (loss wgan_gp)"),
    "r1_gamma": ({"type": float, "metavar": "G"}, "R1 penalty gamma on real data (0: off)"),
    "r1_every": ({"type": _positive_int, "metavar": "N"},
                 "lazy R1: the penalty every N steps, weighted by N (StyleGAN2)"),
    "ortho_reg": ({"type": float, "metavar": "BETA"}, "orthogonal regularization of the generator (0: off)"),
    "spectral_norm": ({"action": argparse.BooleanOptionalAction},
                      "spectral norm on the discriminator (biggan: and on the generator)"),
    "conditioning": ({"choices": CONDITIONINGS[1:]}, "how the discriminator sees the class"),
    "width": ({"type": _positive_int, "metavar": "W"},
              "model width (DCGAN, StyleGAN2: channels of the outermost layers; BigGAN: of every block)"),
    "latent_size": ({"type": _positive_int, "metavar": "Z"}, "latent dimension"),
    "hidden": ({"type": _positive_int, "metavar": "H"}, "hidden units per layer"),
    "depth": ({"type": _positive_int, "metavar": "L"}, "hidden layers of the MLPs"),
    "mapping_layers": ({"type": _positive_int, "metavar": "L"}, "dense layers of the mapping network z -> w"),
    "style_mixing": ({"type": float, "metavar": "P"}, "probability of style mixing per training batch"),
    "upsample": ({"choices": UPSAMPLES}, "how StyleGAN2's synthesis doubles the resolution: bilinear resize + "
                 "3x3 conv (StyleGAN2's up layer with its FIR blur, inside a 2-pixel border) or a 4x4 "
                 "stride-2 transposed conv (no blur)"),
    "arch": ({"choices": ARCHS}, "encoder/decoder architecture"),
    "mlp_activation": ({"choices": tuple(MLP_ACTIVATIONS)},
                       "hidden activation of the mlp arch (the conv arch's fused blocks keep LeakyReLU / ReLU)"),
    "likelihood": ({"choices": LIKELIHOODS}, "decoder likelihood (images in [0, 1])"),
    "beta": ({"type": float, "metavar": "B"}, "weight of the KL term (beta-VAE)"),
    "lr": ({"type": float, "metavar": "LR"}, "Adam learning rate"),
    "lr_g": ({"type": float, "metavar": "LR"}, "generator learning rate (Adam)"),
    "lr_d": ({"type": float, "metavar": "LR"}, "discriminator learning rate (Adam)"),
    "lr_decay": ({"type": float, "metavar": "F"},
                 "the last fraction F of the steps lowers every learning rate linearly towards 0 (0: constant)"),
    "beta1": ({"type": float, "metavar": "B1"}, "Adam beta1"),
    "beta2": ({"type": float, "metavar": "B2"}, "Adam beta2"),
    "ema": ({"type": float, "metavar": "DECAY"}, "EMA decay of the generator weights used for samples (0: off)"),
    "seed": ({"type": _non_negative_int, "metavar": "N"}, "random seed (runs repeat exactly on the CPU)"),
    "device": ({"choices": DEVICES}, "where to train"),
    "backend": ({"choices": BACKENDS}, "fused ops: Triton kernels, PyTorch reference, or auto (Triton on CUDA)"),
    "amp": ({"action": argparse.BooleanOptionalAction}, "bf16 autocast (CUDA only)"),
    "compile": ({"action": argparse.BooleanOptionalAction},
                "torch.compile the G and D (or AE/VAE) forward passes and losses, fastgen's ops inside "
                "one graph"),
    "cuda_graphs": ({"action": argparse.BooleanOptionalAction},
                    "also replay them as CUDA graphs (torch.compile mode reduce-overhead; CUDA only)"),
    "sync_bn": ({"action": argparse.BooleanOptionalAction},
                "under torchrun, BatchNorm statistics over the global batch (fastgen.nn.convert_sync_batchnorm); "
                "without it each process normalizes by its own share"),
    "out_dir": ({"metavar": "DIR"}, "run directory (default: runs/MODEL-DATE-TIME)"),
    "log_every": ({"type": _positive_int, "metavar": "N"}, "steps between metrics.jsonl records"),
    "eval_every": ({"type": _non_negative_int, "metavar": "N"},
                   "steps between evaluations logged to metrics.jsonl: the record of `fastgen eval` on fewer "
                   "samples (2000 generated images; a VAE: 1000 test images, NLL with k = 100); 0: off"),
    "sample_every": ({"type": _positive_int, "metavar": "N"}, "steps between sample pictures"),
    "checkpoint_every": ({"type": _positive_int, "metavar": "N"}, "steps between checkpoints"),
}


# Train options that `profile` does not take: it runs its own steps and writes no run directory.
_NOT_PROFILE_OPTIONS = ("steps", "out_dir", "log_every", "eval_every", "sample_every", "checkpoint_every")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _default_text(value: Any) -> str:
    if value is None:
        return "model default"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _add_model_parsers(command: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> list[_Parser]:
    """One subcommand of ``command`` per model, with the train options that model takes (less ``skip``)."""
    models = command.add_subparsers(dest="model", metavar="MODEL", parser_class=_Parser)
    parsers = []
    for model in MODELS:
        sub = models.add_parser(model, help=_MODEL_HELP[model], description=_MODEL_HELP[model])
        for name, (kwargs, text) in _TRAIN_OPTIONS.items():
            if name not in DEFAULTS[model] or name in skip:
                continue
            default = DEFAULTS[model][name]
            if name == "hidden" and model in ("ae", "vae"):
                kwargs, text = {"type": _int_list, "metavar": "W[,W...]"}, ("layer widths (mlp) or channels per "
                                                                            "stride-2 stage (conv)")
            if name not in ("data_dir", "out_dir"):
                cuda = CUDA_DEFAULTS.get(model, {})
                text += f" (default: {_default_text(default)}" + (
                    f"; on CUDA: {_default_text(cuda[name])})" if name in cuda else ")")
            sub.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=text, **kwargs)
        sub.add_argument("--threads", type=_positive_int, metavar="N",
                         help="CPU threads of PyTorch (default: one per core; 1 is faster on a busy machine)")
        parsers.append(sub)
    return parsers


def _build_parser() -> _Parser:
    parser = _Parser(prog="fastgen", description="Train and use generative models (GANs, AE, VAE) with fastgen.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser, required=True)

    train = commands.add_parser("train", help="train a model (default: DCGAN on Fashion-MNIST)",
                                description="Train a model. With no MODEL: gan, the main job.")
    for sub in _add_model_parsers(train):
        sub.add_argument("--resume", metavar="CHECKPOINT", help="continue the run of this checkpoint file or run "
                         f"directory; only {', '.join(RESUME_OPTIONS)} may change")
        sub.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    profile = commands.add_parser(
        "profile", help="profile training steps (torch.profiler, NVTX, NVML)",
        description="Build MODEL and its data as `train` does, run warm-up steps, time N steps, then profile N "
                    "steps with torch.profiler (and NVML on CUDA). Writes trace.json (chrome://tracing, "
                    "ui.perfetto.dev), summary.md, summary.json and, on CUDA, nvml.csv and nvml.png; prints "
                    "the summary. With no MODEL: gan.")
    for sub in _add_model_parsers(profile, skip=_NOT_PROFILE_OPTIONS):
        sub.add_argument("--steps", type=_positive_int, default=5, metavar="N",
                         help="profiled steps (default: 5)")
        sub.add_argument("--warmup", type=_non_negative_int, default=3, metavar="N",
                         help="untimed steps first: compilation, autotuning (default: 3)")
        sub.add_argument("--out", metavar="DIR", help="profile directory (default: profiles/MODEL-DATE-TIME)")
        sub.add_argument("--compare-backends", action="store_true",
                         help="profile the same steps with --backend reference and --backend triton, side by "
                              "side in one summary")

    sample = commands.add_parser("sample", help="draw samples from a checkpoint",
                                 description="Write a PNG grid of samples (or raw samples with --out X.npy) "
                                             "from a GAN, cgan, stylegan, biggan, VAE or gan2d checkpoint.")
    sample.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file or run directory")
    sample.add_argument("--out", default="samples.png", metavar="PATH",
                        help="output: .png picture, or .npy for the raw samples as a float32 array (N, ...): "
                             "images in [-1, 1] (GAN) or [0, 1] (VAE), points for gan2d (default: samples.png)")
    sample.add_argument("--num", type=_positive_int, metavar="N",
                        help="number of samples (default: 64; 2500 for gan2d); cgan, biggan: samples per class "
                             "(default 8)")
    sample.add_argument("--labels", type=_labels, metavar="L[,L...]",
                        help="cgan, biggan: the classes to draw, one row each (default: all ten)")
    sample.add_argument("--truncation", type=_psi, default=1.0, metavar="PSI",
                        help="stylegan: the truncation trick, w pulled toward the mean w by psi in [0, 1] "
                             "(1: none; 0.7 trades variety for quality) (default: 1)")
    sample.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default: 0)")
    sample.add_argument("--device", choices=DEVICES, default="auto", help="(default: auto)")

    evaluate_ = commands.add_parser("eval", help="evaluate a checkpoint",
                                    description="Print a JSON line of metrics: mode coverage, high-quality "
                                                "fraction and reverse KL of 2500 samples (gan2d); FD, KID, "
                                                "precision, recall, density, coverage in the shipped classifier's "
                                                "features against the test split, with the train split's values "
                                                "as floors (gan, cgan, stylegan, biggan), with label fidelity and "
                                                "per-class FD for the conditional cgan and biggan; "
                                                "test-split loss, reconstruction MSE beside PCA's (ae); ELBO, IWAE "
                                                "bound and importance-sampled NLL beside a Gaussian mixture's "
                                                "(vae). Every number stands beside its floor or baseline and is "
                                                "computed offline.")
    evaluate_.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file or run directory")
    evaluate_.add_argument("--data-dir", metavar="DIR", help="data directory (default: the run's)")
    evaluate_.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default: 0)")
    evaluate_.add_argument("--device", choices=DEVICES, default="auto", help="(default: auto)")
    evaluate_.add_argument("--num-samples", type=_positive_int, metavar="N",
                           help="generated samples (default: 10000 images, 2500 points for gan2d), or test images "
                                "scored (ae, vae; default: the whole test split)")
    evaluate_.add_argument("--nll-samples", type=_positive_int, default=1000, metavar="K",
                           help="importance samples per image of the VAE's NLL estimate (default: 1000)")
    return parser


def _prepare_training(args: argparse.Namespace) -> Trainer:
    """A new or resumed trainer; every input error surfaces here, before training starts."""
    options = {name: getattr(args, name) for name in DEFAULTS[args.model] if getattr(args, name) is not None}
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.resume:
        trainer = Trainer.resume(args.resume, progress=args.progress, **options)
        if trainer.config.model != args.model:
            raise ValueError(f"resume: {args.resume} is a {trainer.config.model} run; continue it with "
                             f"`train {trainer.config.model} --resume {args.resume}`")
        if trainer.step >= trainer.config.steps:
            raise ValueError(f"steps: the run is already at step {trainer.step}; pass --steps above it to continue")
    else:
        config = TrainConfig.resolve(args.model, **options)
        if (Path(config.out_dir) / CHECKPOINT_FILE).exists():
            raise ValueError(f"out_dir: {config.out_dir} already holds a run; continue it with --resume "
                             f"{config.out_dir} or choose another --out-dir")
        trainer = Trainer.create(config, progress=args.progress)
    return trainer


def _train(trainer: Trainer) -> int:
    cfg, main = trainer.config, trainer.dist.is_main  # under torchrun, rank 0 speaks for the run
    processes = f" x{trainer.dist.world_size} processes ({cfg.dist_backend})" if trainer.dist.enabled else ""
    if main:
        print(f"training {cfg.model} on {trainer.device.type}{processes} from step {trainer.step} to {cfg.steps}; "
              f"run directory {trainer.run_dir} (samples every {cfg.sample_every} steps)", flush=True)
    start = time.perf_counter()
    try:
        record = trainer.fit()
    except NonFiniteLossError as err:
        print(f"fastgen train: stopped: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fastgen train: interrupted at step {trainer.step}; the last checkpoint is "
              f"{trainer.checkpoint_file} (step {trainer.saved_step})", file=sys.stderr)
        return 130
    except Exception as err:
        # Data parallel, a failure on another process surfaces here as a failed collective (gloo:
        # RuntimeError "Connection reset by peer"; NCCL: DistBackendError): say which process
        # stopped where, keep the traceback.
        if trainer.dist.enabled:
            print(f"fastgen train: rank {trainer.dist.rank} of {trainer.dist.world_size} stopped at step "
                  f"{trainer.step} ({type(err).__name__}; if a collective failed, another process died or hung "
                  f"first: see its log); the last checkpoint is {trainer.checkpoint_file} (step "
                  f"{trainer.saved_step})", file=sys.stderr, flush=True)
        raise
    if not main:
        return 0
    minutes, seconds = divmod(time.perf_counter() - start, 60)
    run = trainer.run_dir
    print(f"trained {trainer.config.model} to step {trainer.step} in {int(minutes)}m{seconds:04.1f}s "
          f"on {trainer.device.type} ({record.get('images_per_s', 0.0):.0f} images/s at the end)")
    print(f"run directory: {run}")
    print(f"samples:       {run / 'samples' / f'step_{trainer.step:06d}.png'}")
    print(f"checkpoint:    {trainer.checkpoint_file}")
    return 0


def _prepare_profile(args: argparse.Namespace) -> dict[str, Trainer]:
    """The trainers to profile, by label: the run's backend, or reference and triton side by side."""
    options = {name: getattr(args, name) for name in DEFAULTS[args.model]
               if name not in _NOT_PROFILE_OPTIONS and getattr(args, name) is not None}
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.compare_backends:
        config = TrainConfig.resolve(args.model, **options)
        return {config.backend: Trainer.create(config, progress=False)}
    if "backend" in options:
        raise ValueError("compare-backends: runs both backends; leave out --backend")
    configs = [TrainConfig.resolve(args.model, **options, backend=backend) for backend in ("reference", "triton")]
    if resolve_device(configs[0].device).type != "cuda" and not interpreter_enabled():
        raise ValueError("compare-backends: the triton backend needs a CUDA device (or TRITON_INTERPRET=1 for "
                         "Triton's CPU interpreter)")
    return {config.backend: Trainer.create(config, progress=False) for config in configs}


def _profile(args: argparse.Namespace, trainers: dict[str, Trainer]) -> int:
    out = Path(args.out or f"profiles/{args.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    device = next(iter(trainers.values())).device
    print(f"profiling {args.model} on {device.type} ({', '.join(trainers)}): {args.warmup} warm-up steps, then "
          f"{args.steps} timed and {args.steps} profiled steps; profile directory {out}", flush=True)
    labelled = len(trainers) > 1
    runs = {label: profile_trainer(trainer, steps=args.steps, warmup=args.warmup, out_dir=out,
                                   label=label if labelled else None)
            for label, trainer in trainers.items()}
    print(write_summary(runs, out, title=f"fastgen profile {args.model}"))
    return 0


def _sample(args: argparse.Namespace) -> int:
    config, models, _ = load_run(args.checkpoint, args.device)
    if config.model == "ae":
        raise ValueError(f"model: {args.checkpoint} is an auto-encoder, which has no prior to sample from; "
                         "train a vae to sample")
    labels = None
    if config.model in CONDITIONAL_MODELS:
        classes = args.labels or list(range(MNIST_CLASSES))
        labels = torch.tensor(classes).repeat_interleave(args.num or 8)
    elif args.labels is not None:
        raise ValueError(f"labels: only a {' or '.join(CONDITIONAL_MODELS)} takes class labels, {args.checkpoint} "
                         f"is a {config.model} run")
    if args.truncation != 1.0 and config.model != "stylegan":
        raise ValueError(f"truncation: only a stylegan samples with truncation, {args.checkpoint} is a "
                         f"{config.model} run")
    out = Path(args.out)
    if out.suffix == ".npy":
        default_num = 2500 if config.model == "gan2d" else 64
        n = len(labels) if labels is not None else (args.num or default_num)
        np.save(out, generate(config, models, n, labels=labels, seed=args.seed,
                              truncation=args.truncation).cpu().numpy())
    elif out.suffix == ".png":
        nrow = (args.num or 8) if labels is not None else 8
        save_sample_picture(config, models, out, seed=args.seed, n=args.num, labels=labels, nrow=nrow,
                            truncation=args.truncation)
    else:
        raise ValueError(f"out: expected a .png or .npy path, got {args.out!r}")
    print(out)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    config, models, step = load_run(args.checkpoint, args.device)
    metrics = evaluate(config, models, seed=args.seed, data_dir=args.data_dir, num_samples=args.num_samples,
                       nll_samples=args.nll_samples)
    print(json.dumps({"model": config.model, "step": step, **metrics}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 training diverged, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # `train` or `profile` alone (or followed by options) runs the default model.
    if argv[:1] in (["train"], ["profile"]) and (len(argv) == 1 or (argv[1].startswith("-")
                                                                     and argv[1] not in ("-h", "--help"))):
        argv.insert(1, "gan")
    args = _build_parser().parse_args(argv)
    command = {"train": _prepare_training, "profile": _prepare_profile, "sample": _sample,
               "eval": _evaluate}[args.command]
    try:
        try:
            result = command(args)
        except (ValueError, FileNotFoundError, CheckpointError) as err:
            print(f"fastgen {args.command}: error: {err}", file=sys.stderr)
            return 2
        # Training and profiling run outside that handler: past setup, an exception is a bug and keeps its
        # traceback.
        if args.command == "profile":
            return _profile(args, result)
        return _train(result) if args.command == "train" else result
    finally:
        distributed.shutdown()  # the process group that a `train` under torchrun joined
