"""Offline evaluation: PCA baseline, every model's record from `evaluate` and `fastgen eval`."""

import json
import math

import pytest
import torch
from PIL import Image

from fastgen.classifier import CLASSIFIER_VERSION
from fastgen.metrics import bits_per_dim, pca_fit, pca_mse
from fastgen.train import TrainConfig, Trainer, evaluate
from fastgen.train.factory import load_dataset
from fastgen.train.inference import TRAINING_EVAL_SAMPLES
from fastgen.train.plots import plot_run, plot_series, read_series
from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

FEATURE_METRICS = {"fd", "kid", "kid_std", "precision", "recall", "density", "coverage"}


def _trained(model, image_dir, out_dir, steps=2, **options):
    small = {"gan": dict(width=4, latent_size=8, batch_size=8), "cgan": dict(width=4, latent_size=8, batch_size=8),
             "ae": dict(hidden=[32], latent_size=4, batch_size=16),
             "vae": dict(hidden=[32], latent_size=4, batch_size=16)}[model]
    config = TrainConfig.resolve(model, data_dir=image_dir, out_dir=str(out_dir), steps=steps, backend="reference",
                                 sample_every=1000, checkpoint_every=1000, **small, **options)
    trainer = Trainer.create(config, progress=False)
    trainer.fit()
    return trainer


def test_pca_known_answer():
    # Axis-aligned data: the components are the axes by variance, and the residual of k
    # components is the sum of the dropped eigenvalues of the scatter matrix / (n D).
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(500, 4, generator=generator, dtype=torch.float64) * torch.tensor([0.5, 3.0, 0.1, 1.0]) + 7
    mean, components = pca_fit(x, 2)
    torch.testing.assert_close(mean, x.mean(0))
    assert components.shape == (2, 4)
    torch.testing.assert_close(components.abs().argmax(1), torch.tensor([1, 3]))
    eigenvalues = torch.linalg.eigvalsh((x - mean).T @ (x - mean))
    assert pca_mse(x, mean, components) == pytest.approx(eigenvalues[:2].sum().item() / (500 * 4), rel=1e-10)
    assert pca_mse(x, *pca_fit(x, 4)) == pytest.approx(0.0, abs=1e-20)
    with pytest.raises(ValueError, match="components"):
        pca_fit(x, 5)
    with pytest.raises(ValueError, match="data"):
        pca_mse(torch.randn(3, 5), mean, components)


def test_bits_per_dim():
    assert bits_per_dim(784 * math.log(2), 784) == pytest.approx(1.0)


@pytest.mark.parametrize("model", ["gan", "cgan"])
def test_image_gan_record(model, image_dir, tmp_path):
    trainer = _trained(model, image_dir, tmp_path)
    record = evaluate(trainer.config, trainer.models, num_samples=30, seed=1)
    assert record["feature_network"] == CLASSIFIER_VERSION and record["samples"] == 30
    assert FEATURE_METRICS <= record.keys() and FEATURE_METRICS <= record["floor"].keys()
    assert all(math.isfinite(record[k]) for k in FEATURE_METRICS)
    # Train images are far closer to test images than two steps of training are.
    assert record["floor"]["fd"] < record["fd"]
    assert record == evaluate(trainer.config, trainer.models, num_samples=30, seed=1)  # deterministic
    assert evaluate(trainer.config, trainer.models, num_samples=30, seed=2)["fd"] != record["fd"]
    if model == "cgan":
        assert 0.0 <= record["label_fidelity"] <= 1.0 and len(record["per_class_fd"]) == 10
        assert record["per_class_fd_mean"] == pytest.approx(sum(record["per_class_fd"]) / 10)
        assert {"label_fidelity", "per_class_fd"} <= record["floor"].keys()
        with pytest.raises(ValueError, match="num_samples"):
            evaluate(trainer.config, trainer.models, num_samples=19)
    else:
        assert "label_fidelity" not in record


def test_autoencoder_record_beside_pca(image_dir, tmp_path):
    trainer = _trained("ae", image_dir, tmp_path)
    record = evaluate(trainer.config, trainer.models, num_samples=20)
    assert record["samples"] == 20
    train = trainer.data.inputs.flatten(1).double()  # the trainer holds the train split
    inputs = load_dataset(trainer.config, torch.device("cpu"), "test").inputs[:20].flatten(1).double()
    assert record["pca_mse"] == pytest.approx(pca_mse(inputs, *pca_fit(train, 4)), rel=1e-9)
    assert record["mse_over_pca"] == pytest.approx(record["mse"] / record["pca_mse"])


def test_vae_record_beside_gmm(image_dir, tmp_path):
    trainer = _trained("vae", image_dir, tmp_path)
    record = evaluate(trainer.config, trainer.models, num_samples=8, nll_samples=20)
    assert record["nll_k"] == 20 and record["likelihood"] == "bernoulli"
    # ELBO <= IWAE(50) on average for one model; the NLL estimate with k=20 sits near -IWAE.
    assert record["elbo"] <= record["iwae_bound"] + 1.0
    assert record["nll_bpd"] == pytest.approx(bits_per_dim(record["nll"], 784))
    assert record["elbo_bpd"] == pytest.approx(bits_per_dim(-record["elbo"], 784))
    assert math.isfinite(record["gmm_nll"]) and record["gmm_nll_bpd"] == pytest.approx(
        bits_per_dim(record["gmm_nll"], 784))
    assert record == evaluate(trainer.config, trainer.models, num_samples=8, nll_samples=20)


def test_evaluate_rejects_bad_counts(image_dir, tmp_path):
    trainer = _trained("ae", image_dir, tmp_path, steps=1)
    with pytest.raises(ValueError, match="num_samples"):
        evaluate(trainer.config, trainer.models, num_samples=1)
    with pytest.raises(ValueError, match="nll_samples"):
        evaluate(trainer.config, trainer.models, nll_samples=0)


def test_eval_command_prints_one_record(capsys, image_dir, tmp_path):
    _trained("gan", image_dir, tmp_path / "run")
    code, out, err = run_cli(capsys, "eval", str(tmp_path / "run"), "--num-samples", "20", "--seed", "3")
    assert code == 0, err
    record = json.loads(out)
    assert record["model"] == "gan" and record["samples"] == 20 and "floor" in record
    code, _, err = run_cli(capsys, "eval", str(tmp_path / "run"), "--num-samples", "0")
    assert code == 2 and "num-samples" in err


def test_eval_every_logs_records_without_changing_training(image_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(TRAINING_EVAL_SAMPLES, "gan", 30)
    plain = _trained("gan", image_dir, tmp_path / "plain", steps=3)
    evaluated = _trained("gan", image_dir, tmp_path / "evaluated", steps=3, eval_every=2)
    lines = [json.loads(line) for line in (evaluated.run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluations = [line for line in lines if "eval" in line]
    assert [line["step"] for line in evaluations] == [2, 3]  # every 2 steps and at the end
    assert all(line["eval"]["samples"] == 30 and FEATURE_METRICS <= line["eval"].keys() for line in evaluations)
    assert evaluations[-1]["eval"] == evaluate(evaluated.config, evaluated.models, num_samples=30, seed=0)
    losses = [{k: v for k, v in line.items() if k != "images_per_s"} for line in lines if "eval" not in line]
    assert losses == [{k: v for k, v in json.loads(line).items() if k != "images_per_s"}
                      for line in (plain.run_dir / "metrics.jsonl").read_text().splitlines()]
    for name in ("losses.png", "eval.png"):
        with Image.open(evaluated.run_dir / name) as picture:
            assert picture.format == "PNG" and picture.width > 0
    assert (plain.run_dir / "losses.png").exists() and not (plain.run_dir / "eval.png").exists()


def test_eval_every_option_is_checked():
    with pytest.raises(ValueError, match="eval_every"):
        TrainConfig.resolve("gan", eval_every=-1)
    assert TrainConfig.resolve("vae", eval_every=5).eval_every == 5


def test_read_series_flattens_floors_and_skips_bad_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0, "images_per_s": 10}\n'
                    '{"step": 2, "eval": {"fd": 3.0, "per_class_fd": [1, 2], "floor": {"fd": 0.5}, '
                    '"feature_network": "x", "kid": NaN}}\n'
                    '{"step": 3, "loss": 1.0}\n{"step": 4, "lo')
    train, evaluation = read_series(path)
    assert train == {"loss": [(1, 2.0), (3, 1.0)], "images_per_s": [(1, 10.0)]}
    assert evaluation == {"fd": [(2, 3.0)], "floor.fd": [(2, 0.5)]}
    assert plot_run(tmp_path) == [tmp_path / "losses.png", tmp_path / "eval.png"]
    with pytest.raises(ValueError, match="series"):
        plot_series({}, tmp_path / "empty.png")
