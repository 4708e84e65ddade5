"""The shipped feature network: input preparation, sha256-checked loading, features, training."""

import os
import shutil

import pytest
import torch

from fastgen.classifier import (FEATURES, WEIGHTS_FILE, FeatureClassifier, classifier_features, classifier_logits,
                                load_classifier, prepare_images, train_classifier)
from fastgen.data import DEFAULT_FASHION_MNIST_DIR, load_mnist_family

pytestmark = pytest.mark.usefixtures("one_thread")


def test_prepare_images_pads_rescales_and_pools():
    unit = torch.rand(3, 1, 28, 28)
    x = prepare_images(unit, (0.0, 1.0))
    assert x.shape == (3, 1, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, :, 2:30, 2:30], unit * 2 - 1)
    assert (x[:, :, :2] == -1).all() and (x[:, :, :, 30:] == -1).all()  # background padding
    big = torch.rand(2, 1, 64, 64) * 2 - 1
    torch.testing.assert_close(prepare_images(big), big.reshape(2, 1, 32, 2, 32, 2).mean((3, 5)))
    same = torch.rand(2, 1, 32, 32, dtype=torch.float64) * 2 - 1
    torch.testing.assert_close(prepare_images(same), same.float())


@pytest.mark.parametrize("images, value_range, error, match", [
    (torch.rand(2, 1, 30, 30), (-1.0, 1.0), ValueError, "images"),
    (torch.rand(2, 3, 32, 32), (-1.0, 1.0), ValueError, "images"),
    (torch.rand(1, 32, 32), (-1.0, 1.0), ValueError, "images"),
    (torch.zeros(2, 1, 32, 32, dtype=torch.uint8), (-1.0, 1.0), TypeError, "images"),
    (torch.rand(2, 1, 32, 32), (1.0, 0.0), ValueError, "value_range"),
])
def test_prepare_images_rejects_bad_input(images, value_range, error, match):
    with pytest.raises(error, match=match):
        prepare_images(images, value_range)


def test_shipped_weights_load_small_and_checked(tmp_path):
    assert WEIGHTS_FILE.stat().st_size < 1_000_000
    state = torch.get_rng_state()
    model = load_classifier()
    assert torch.equal(torch.get_rng_state(), state)  # loading inside a training run leaves its RNG alone
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = torch.rand(5, 1, 28, 28)
    features = classifier_features(model, x, (0.0, 1.0))
    assert features.shape == (5, FEATURES) and torch.isfinite(features).all() and (features >= 0).all()
    logits = classifier_logits(model, x, (0.0, 1.0))
    torch.testing.assert_close(logits, model.head(features))  # the features are the penultimate layer
    corrupt = tmp_path / "weights.pt"
    shutil.copy(WEIGHTS_FILE, corrupt)
    with open(corrupt, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(ValueError, match="sha256"):
        load_classifier(corrupt)


def test_features_reject_wrong_shape():
    with pytest.raises(ValueError, match="prepare_images"):
        FeatureClassifier().features(torch.rand(2, 1, 28, 28))


def test_training_is_deterministic_for_a_seed(image_dir, tmp_path):
    accuracies = [train_classifier(image_dir, tmp_path / f"{name}.pt", seed=3, epochs=1, batch_size=32, log=False)
                  for name in ("a", "b")]
    assert accuracies[0] == accuracies[1] and 0.0 <= accuracies[0] <= 1.0
    a, b = (load_classifier(tmp_path / f"{name}.pt", sha256=None).state_dict() for name in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = tmp_path / "c.pt"
    train_classifier(image_dir, other, seed=4, epochs=1, batch_size=32, log=False)
    assert not torch.equal(load_classifier(other, sha256=None).state_dict()["head.weight"], a["head.weight"])


@pytest.mark.skipif(not os.path.isdir(DEFAULT_FASHION_MNIST_DIR), reason="needs dataset-fashion-mnist")
def test_shipped_classifier_accuracy_on_fashion_mnist():
    images, labels = load_mnist_family(split="test", pad_to_32=True)
    predicted = classifier_logits(load_classifier(), images).argmax(1)
    assert (predicted == labels).double().mean() >= 0.92
