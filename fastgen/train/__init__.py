"""Training: one trainer for GANs, auto-encoders and VAEs, with checkpoints, logging and pictures.

``python -m fastgen train`` drives it from the command line (:mod:`fastgen.cli`); in Python::

    from fastgen.train import TrainConfig, Trainer
    trainer = Trainer.create(TrainConfig.resolve("gan2d", steps=2000, out_dir="runs/grid"))
    trainer.fit()
"""

from fastgen.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fastgen.train.config import MODELS, TrainConfig
from fastgen.train.inference import evaluate, generate, load_run, save_sample_picture
from fastgen.train.trainer import AutoencoderTrainer, GANTrainer, NonFiniteLossError, Trainer

__all__ = ["MODELS", "TrainConfig", "Trainer", "GANTrainer", "AutoencoderTrainer", "NonFiniteLossError",
           "CheckpointError", "save_checkpoint", "load_checkpoint", "load_run", "generate", "evaluate",
           "save_sample_picture"]
