"""The command line: the grid25 GAN run, sample / eval, resume, help, and one-line errors for bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastgen import backend
from fastgen.data import DEFAULT_FASHION_MNIST_DIR
from fastgen.train.checkpoint import FORMAT
from fastgen.train.config import DEFAULTS
from tests.conftest import run_cli

FAST = ["--backend", "reference", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _eval(capsys, run_dir):
    code, out, err = run_cli(capsys, "eval", str(run_dir))
    assert code == 0, err
    return json.loads(out)


def _cli_env():
    """The environment of a real `python -m fastgen` process: no Triton interpreter, one thread each."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return env | {"OMP_NUM_THREADS": "1"}


def test_grid25_gan_covers_the_modes(tmp_path, capsys):
    """The CI run of the mode-collapse benchmark with gan2d's defaults (seed 0; the README's table
    has seeds 0-2): all 25 modes with >= 90% high-quality samples, issue 12's bar."""
    run = tmp_path / "seed0"
    process = subprocess.run([sys.executable, "-m", "fastgen", "train", "gan2d", "--seed", "0", "--out-dir", str(run),
                              "--backend", "reference", "--no-progress"],
                             env=_cli_env(), capture_output=True, text=True, timeout=900)
    assert process.returncode == 0, process.stderr
    metrics = _eval(capsys, run)
    assert metrics["num_modes"] == 25 and metrics["step"] == DEFAULTS["gan2d"]["steps"]
    assert metrics["modes_covered"] == 25, metrics
    assert metrics["high_quality_fraction"] >= 0.90, metrics


def test_default_backend_trains(tmp_path, capsys):
    """No --backend: "auto" (under the tests' TRITON_INTERPRET=1, the Triton loss kernels on CPU)."""
    backend.reset_failures()
    code, _, err = run_cli(capsys, "train", "gan2d", "--steps", "3", "--hidden", "16", "--out-dir", str(tmp_path / "r"),
                        "--no-progress")
    assert code == 0, err
    assert backend.failed_ops() == {}
    record = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 3 and 0 < record["d_real"] < 1


@pytest.mark.skipif(not os.path.isdir(DEFAULT_FASHION_MNIST_DIR), reason="dataset-fashion-mnist not installed")
def test_train_without_a_model_is_the_fashion_mnist_dcgan(tmp_path, capsys):
    run = tmp_path / "main"
    code, out, err = run_cli(capsys, "train", "--steps", "2", "--out-dir", str(run), *FAST)
    assert code == 0, err
    config = json.loads((run / "config.json").read_text())
    assert (config["model"], config["image_size"], config["data_dir"]) == ("gan", 32, None)
    assert (config["lr_g"], config["lr_d"], config["beta1"], config["beta2"]) == (2e-4, 2e-4, 0.5, 0.999)
    assert f"samples:       {run / 'samples' / 'step_000002.png'}" in out
    with Image.open(run / "samples" / "step_000002.png") as picture:
        assert picture.size == (2 * (8 * 34 + 2),) * 2


def test_sample_and_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(capsys, "train", "gan2d", "--steps", "4", "--hidden", "16", "--threads", "1", "--out-dir", str(run),
                *FAST)[0] == 0
    code, out, _ = run_cli(capsys, "sample", str(run), "--out", str(tmp_path / "s.npy"), "--num", "10")
    assert code == 0 and out.strip() == str(tmp_path / "s.npy")
    samples = np.load(tmp_path / "s.npy")
    assert samples.shape == (10, 2) and samples.dtype == np.float32
    assert run_cli(capsys, "sample", str(run / "checkpoint.pt"), "--out", str(tmp_path / "s.png"))[0] == 0
    assert Image.open(tmp_path / "s.png").size == (512, 512)

    code, _, err = run_cli(capsys, "train", "gan2d", "--resume", str(run), "--steps", "6", "--no-progress")
    assert code == 0, err
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 6]  # log_every 100: the last step of each leg
    code, _, err = run_cli(capsys, "train", "gan2d", "--resume", str(run), "--no-progress")
    assert code == 2 and "already at step 6" in err


def test_sample_cgan_labels(tmp_path, capsys, monkeypatch):
    # `sample` has no --backend option: the environment keeps the DCGAN off the Triton interpreter.
    monkeypatch.setenv("FASTGEN_BACKEND", "reference")
    # A cgan needs images: a tiny MNIST-style set.
    from fastgen.data import write_idx
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "train-images-idx3-ubyte", rng.integers(0, 256, (16, 28, 28), dtype=np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", (np.arange(16) % 10).astype(np.uint8))
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "cgan", "--steps", "1", "--width", "4", "--batch-size", "8",
                        "--data-dir", str(tmp_path), "--out-dir", str(run), *FAST)
    assert code == 0, err
    assert run_cli(capsys, "sample", str(run), "--labels", "2,5", "--num", "3", "--out", str(tmp_path / "c.npy"))[0] == 0
    assert np.load(tmp_path / "c.npy").shape == (6, 1, 32, 32)
    assert run_cli(capsys, "sample", str(run), "--labels", "2,5", "--out", str(tmp_path / "c.png"))[0] == 0
    assert Image.open(tmp_path / "c.png").size == (2 * (8 * 34 + 2), 2 * (2 * 34 + 2))
    code, _, err = run_cli(capsys, "eval", str(run))
    assert code == 2 and "t10k-images-idx3-ubyte" in err  # the cgan's metrics need the test split


def test_help(capsys):
    for argv, expected in [(["--help"], "train"), (["train", "--help"], "gan2d"),
                           (["train", "gan", "--help"], "--lr-g LR"), (["train", "vae", "--help"], "--beta B"),
                           (["sample", "--help"], "--labels"), (["eval", "--help"], "mode coverage")]:
        code, out, _ = run_cli(capsys, *argv)
        assert code == 0 and expected in out, argv
    _, out, _ = run_cli(capsys, "train", "gan", "--help")
    assert "(default: 0.0002)" in out and "dataset-fashion-mnist" in out and "--hidden" not in out
    for model in ("gan", "vae", "gan2d"):
        _, out, _ = run_cli(capsys, "train", model, "--help")
        assert "--compile, --no-compile" in out and "--cuda-graphs, --no-cuda-graphs" in out, model


def _one_line_error(code, err, *needles):
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


def test_bad_input_gives_one_line_and_exit_code_2(tmp_path, capsys):
    cases = [
        (["train", "gan3d"], ["invalid choice: 'gan3d'"]),
        (["train", "--steps", "-5"], ["--steps", "positive integer"]),
        (["train", "gan2d", "--steps", "ten"], ["--steps"]),
        (["train", "gan2d", "--image-size", "32"], ["unrecognized arguments"]),
        (["train", "gan", "--data-dir", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "r")],
         ["nowhere", "does not exist"]),
        (["train", "gan", "--image-size", "48", "--out-dir", str(tmp_path / "r")], ["image_size"]),
        (["sample", str(tmp_path / "missing.pt")], ["no such checkpoint"]),
        (["eval", str(tmp_path / "missing")], ["no such checkpoint"]),
        (["sample", str(tmp_path), "--labels", "11"], ["--labels"]),
        (["frobnicate"], ["invalid choice"]),
    ]
    for argv, needles in cases:
        _one_line_error(*run_cli(capsys, *argv)[::2], *needles)

    evil = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "config": {"model": "gan2d"}, "payload": Image.new("L", (1, 1))}, evil)
    _one_line_error(*run_cli(capsys, "sample", str(evil))[::2], "pickled Python objects")

    run = tmp_path / "run"
    assert run_cli(capsys, "train", "gan2d", "--steps", "1", "--hidden", "8", "--out-dir", str(run), *FAST)[0] == 0
    _one_line_error(*run_cli(capsys, "train", "gan2d", "--steps", "1", "--out-dir", str(run), *FAST)[::2],
                    "already holds a run")
    _one_line_error(*run_cli(capsys, "train", "gan2d", "--resume", str(run), "--lr-g", "0.1")[::2],
                    "lr_g: cannot be changed when resuming")
    _one_line_error(*run_cli(capsys, "sample", str(run), "--labels", "1")[::2], "only a cgan")
    _one_line_error(*run_cli(capsys, "sample", str(run), "--out", str(tmp_path / "x.jpg"))[::2], ".png or .npy")
    _one_line_error(*run_cli(capsys, "train", "cgan", "--resume", str(run))[::2], "is a gan2d run")


def test_bad_input_in_a_real_process(tmp_path):
    """The real entry point: exit status 2 and one line on stderr, no traceback."""
    done = subprocess.run([sys.executable, "-m", "fastgen", "train", "--data-dir", str(tmp_path / "none"),
                           "--out-dir", str(tmp_path / "r")], capture_output=True, text=True, env=_cli_env(),
                          timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    _one_line_error(done.returncode, done.stderr, "does not exist", "dataset-fashion-mnist")
