"""The feature network that ships with fastgen: a small CNN classifier of Fashion-MNIST.

Sample-quality metrics (Fréchet distance, KID, precision / recall, density / coverage) are
computed in the penultimate layer of this network rather than in Inception-v3's: its weights
ship inside the package (``fastgen/weights/``, checked by sha256), so the metrics run offline and
any two users of the same fastgen version compute them in the same features. The numbers are
comparable between fastgen runs of one :data:`CLASSIFIER_VERSION`, never with published FIDs.

The weights are regenerated (bit for bit on the same CPU build of torch) by::

    python -m fastgen.classifier --seed 0 --threads 1

which trains on the train split of ``dataset-fashion-mnist`` for :data:`EPOCHS` epochs and prints
the test accuracy and the file's sha256 (the value of :data:`WEIGHTS_SHA256`).

The network takes images ``(N, 1, 32, 32)`` in [-1, 1] (fastgen's GAN data: 28x28 padded with
the background); :func:`prepare_images` converts [0, 1] images, 28x28 and 64x64 ones.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastgen.data import load_mnist_family

__all__ = ["CLASSIFIER_VERSION", "WEIGHTS_FILE", "WEIGHTS_SHA256", "FEATURES", "EPOCHS", "FeatureClassifier",
           "prepare_images", "load_classifier", "classifier_features", "classifier_logits", "train_classifier",
           "main"]

#: Named in every metrics record: features (and so metric values) change with it.
CLASSIFIER_VERSION = "fmnist-cnn-v1"
WEIGHTS_FILE = Path(__file__).parent / "weights" / "fmnist_classifier.pt"
#: sha256 of :data:`WEIGHTS_FILE`'s bytes, printed by ``python -m fastgen.classifier``.
WEIGHTS_SHA256 = "50aa94c4469dc6324759018c19bc8198a90782505e0c95c050609b0870331739"
#: Width of the penultimate layer: the feature dimension of the metrics.
FEATURES = 128
EPOCHS = 8
_BATCH = 500


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]


class FeatureClassifier(nn.Module):
    """Three conv-BN-ReLU-maxpool stages (32 -> 16 -> 8 -> 4 pixels, 16/32/64 channels), a
    128-unit ReLU layer (the features) and a linear layer to the 10 classes (155k weights, 2.7M
    multiply-adds an image: sized to train in minutes on one CPU thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(*_block(1, 16), *_block(16, 32), *_block(32, 64), nn.Flatten(),
                                  nn.Linear(64 * 4 * 4, FEATURES), nn.ReLU())
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURES, 10)

    def features(self, x: Tensor) -> Tensor:
        """``(N, 1, 32, 32)`` images in [-1, 1] -> penultimate activations ``(N, 128)``."""
        if x.dim() != 4 or x.shape[1:] != (1, 32, 32):
            raise ValueError(f"x: expected images (N, 1, 32, 32), got {tuple(x.shape)}; see prepare_images")
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, 1, 32, 32)`` images in [-1, 1] -> class logits ``(N, 10)``."""
        return self.head(self.dropout(self.features(x)))


def prepare_images(images: Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """Images as the classifier takes them: float32 ``(N, 1, 32, 32)`` in [-1, 1] on the CPU.

    Args:
        images: ``(N, 1, S, S)`` with S = 28 (padded by 2 pixels of background, as fastgen's
            data), 32, or 64 (2x2 average pooling: fastgen's 64x64 models upsample 32x32 data).
        value_range: the (black, white) pixel values of ``images``: (-1, 1) for GANs, (0, 1) for
            AE / VAE.
    """
    if not isinstance(images, Tensor) or not images.is_floating_point():
        raise TypeError(f"images: expected a floating tensor, got {getattr(images, 'dtype', type(images))}")
    if images.dim() != 4 or images.shape[1] != 1 or images.shape[2] != images.shape[3] \
            or images.shape[2] not in (28, 32, 64):
        raise ValueError(f"images: expected (N, 1, S, S) with S in 28, 32, 64, got {tuple(images.shape)}")
    low, high = value_range
    if not high > low:
        raise ValueError(f"value_range: expected (low, high) with high > low, got {value_range}")
    x = (images.detach().float().cpu() - low) * (2.0 / (high - low)) - 1.0
    if x.shape[2] == 28:
        x = F.pad(x, (2, 2, 2, 2), value=-1.0)
    elif x.shape[2] == 64:
        x = F.avg_pool2d(x, 2)
    return x


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_classifier(path: str | os.PathLike | None = None, *, sha256: str | None = WEIGHTS_SHA256) -> FeatureClassifier:
    """The shipped classifier (CPU, eval mode), its file checked against ``sha256`` before
    ``torch.load(weights_only=True)`` reads it.

    Args:
        path: weights file (default: :data:`WEIGHTS_FILE`).
        sha256: expected hex digest (default: :data:`WEIGHTS_SHA256`); None skips the check
            (for weights you trained yourself).

    Raises:
        ValueError: the file's digest differs (a corrupt or foreign file).
    """
    path = WEIGHTS_FILE if path is None else Path(path)
    if sha256 is not None and (actual := _sha256(path)) != sha256:
        raise ValueError(f"path: {path} has sha256 {actual}, expected {sha256} (classifier {CLASSIFIER_VERSION}); "
                         "reinstall fastgen or regenerate it with `python -m fastgen.classifier`")
    with torch.random.fork_rng(devices=[]):  # the initialization it overwrites must not shift a run's RNG
        model = FeatureClassifier()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval().requires_grad_(False)


@torch.no_grad()
def _batched(fn: Callable[[Tensor], Tensor], images: Tensor, value_range: tuple[float, float]) -> Tensor:
    return torch.cat([fn(prepare_images(chunk, value_range)) for chunk in images.split(_BATCH)])


def classifier_features(model: FeatureClassifier, images: Tensor,
                        value_range: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """Penultimate features ``(N, 128)`` float32 of ``images`` (see :func:`prepare_images`)."""
    return _batched(model.features, images, value_range)


def classifier_logits(model: FeatureClassifier, images: Tensor,
                      value_range: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """Class logits ``(N, 10)`` float32 of ``images`` (see :func:`prepare_images`)."""
    return _batched(model, images, value_range)


def _accuracy(model: FeatureClassifier, images: Tensor, labels: Tensor) -> float:
    model.eval()
    return (classifier_logits(model, images).argmax(1) == labels).double().mean().item()


def train_classifier(data_dir: str | os.PathLike | None = None, out: str | os.PathLike = WEIGHTS_FILE, *,
                     seed: int = 0, epochs: int = EPOCHS, batch_size: int = 128, lr: float = 3e-3,
                     log: bool = True) -> float:
    """Train the classifier on the train split of ``data_dir`` and save its state dict to ``out``.

    Deterministic for a seed on one CPU build: AdamW with a one-cycle learning rate, random
    horizontal flips, dropout 0.3.

    Returns:
        Accuracy (0..1) on the test split.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs, batch_size: expected >= 1, got {epochs}, {batch_size}")
    images, labels = load_mnist_family(data_dir, "train", pad_to_32=True)
    test_images, test_labels = load_mnist_family(data_dir, "test", pad_to_32=True)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # initialization and dropout
    model = FeatureClassifier()
    steps_per_epoch = -(-len(images) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * steps_per_epoch)
    for epoch in range(epochs):
        model.train()
        start = time.perf_counter()
        for index in torch.randperm(len(images), generator=generator).split(batch_size):
            x = images[index]
            flip = torch.rand(len(index), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            loss = F.cross_entropy(model(x), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        if log:
            print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}, test accuracy "
                  f"{_accuracy(model, test_images, test_labels):.4f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    accuracy = _accuracy(model, test_images, test_labels)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, out)
    return accuracy


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fastgen.classifier``: train the feature network, print accuracy and sha256."""
    parser = argparse.ArgumentParser(prog="python -m fastgen.classifier", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="MNIST-family IDX files (default: Debian's dataset-fashion-mnist)")
    parser.add_argument("--out", default=str(WEIGHTS_FILE), help="weights file (default: the packaged one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--threads", type=int, help="CPU threads of PyTorch")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    accuracy = train_classifier(args.data_dir, args.out, seed=args.seed, epochs=args.epochs)
    print(f"test accuracy {accuracy:.4f}; {args.out} sha256 {_sha256(Path(args.out))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
