"""The trainer: bit-exact resume, NaN guard, run directory, objectives, AE/VAE, config checks."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fastgen.backend import use_backend
from fastgen.train import NonFiniteLossError, TrainConfig, Trainer, evaluate, generate, load_run
from fastgen.train.checkpoint import CheckpointError, load_checkpoint
from fastgen.train.trainer import EMA
from tests.conftest import read_metrics


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(model, out_dir, **options):
    small = {
        "gan2d": dict(hidden=16, depth=2, batch_size=32),
        "gan": dict(width=4, latent_size=8, batch_size=8),
        "cgan": dict(width=4, latent_size=8, batch_size=8),
        "ae": dict(hidden=[32], latent_size=4, batch_size=16),
        "vae": dict(hidden=[32], latent_size=4, batch_size=16),
    }[model]
    base = dict(small, backend="reference", log_every=1, sample_every=1000, checkpoint_every=1000)
    return TrainConfig.resolve(model, out_dir=str(out_dir), **(base | options))


def _train(config):
    trainer = Trainer.create(config, progress=False)
    trainer.fit()
    return trainer


def _assert_same_state(a, b):
    def flat(tree, prefix=""):
        if isinstance(tree, dict):
            for key, value in tree.items():
                yield from flat(value, f"{prefix}/{key}")
        elif isinstance(tree, (list, tuple)):
            for i, value in enumerate(tree):
                yield from flat(value, f"{prefix}/{i}")
        else:
            yield prefix, tree

    items_a, items_b = dict(flat(a)), dict(flat(b))
    assert items_a.keys() == items_b.keys()
    for key, value in items_a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, items_b[key]), key
        else:
            assert value == items_b[key], key


RESUME_CASES = {
    "gan2d": ("gan2d", {}),
    "gan2d-wgan-gp-r1-sn": ("gan2d", dict(loss="wgan_gp", n_critic=2, r1_gamma=1.0, spectral_norm=True)),
    "gan64": ("gan", dict(image_size=64, width=2)),
    "cgan-acgan": ("cgan", dict(conditioning="acgan", loss="hinge")),
    "vae": ("vae", {}),
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_resume_is_bit_exact(tmp_path, image_dir, case):
    """N steps straight vs N/2 steps, a resume in a fresh trainer, N/2 more: same losses, same
    weights, optimizer states, data order and RNG states, bit for bit."""
    model, options = RESUME_CASES[case]
    # A finished run continued with more steps stretches an lr_decay schedule; a killed run keeps
    # it (test_lr_decay_schedule_and_resume_after_a_kill).
    options = dict(options, lr_decay=0.0)
    if model != "gan2d":
        options = dict(options, data_dir=image_dir)
    steps = 6
    straight = _train(_config(model, tmp_path / "straight", steps=steps, checkpoint_every=3, **options))
    _train(_config(model, tmp_path / "split", steps=steps // 2, **options))
    resumed = Trainer.resume(tmp_path / "split", steps=steps, progress=False)
    assert resumed.step == steps // 2
    resumed.fit()
    assert read_metrics(tmp_path / "split") == read_metrics(tmp_path / "straight")
    assert [r["step"] for r in read_metrics(tmp_path / "split")] == list(range(1, steps + 1))
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    for part in ("models", "optimizers", "sampler", "rng", "step"):
        _assert_same_state(a[part], b[part])
    assert straight.step == resumed.step == steps


@pytest.mark.parametrize("model", ["gan2d", "ae"])
def test_lr_decay_schedule_and_resume_after_a_kill(tmp_path, image_dir, model):
    """--lr-decay 0.5 over 6 steps: factors 1, 1, 1, 1, 2/3, 1/3 on every optimizer's configured
    rate; a run killed after its step-3 checkpoint resumes on the same schedule, bit for bit."""
    options = dict(steps=6, checkpoint_every=3, lr_decay=0.5, **({} if model == "gan2d" else dict(data_dir=image_dir)))
    straight = Trainer.create(_config(model, tmp_path / "straight", **options), progress=False)
    factors, take_step = [], straight.train_step
    straight.train_step = lambda: factors.append(straight.learning_rate_factor()) or take_step()
    straight.fit()
    assert factors == pytest.approx([1, 1, 1, 1, 2 / 3, 1 / 3])
    rates = {"generator": "lr_g", "discriminator": "lr_d", "model": "lr"}
    for name, opt in straight.optimizers.items():
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([getattr(straight.config, rates[name]) / 3])
    straight.step = 9  # past the end (profile steps on): 0, never negative
    assert straight.learning_rate_factor() == 0.0

    killed = Trainer.create(_config(model, tmp_path / "killed", **options), progress=False)
    take_killed_step = killed.train_step

    def killed_in_step_5():
        if killed.step == 4:
            raise KeyboardInterrupt
        return take_killed_step()

    killed.train_step = killed_in_step_5
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    Trainer.resume(tmp_path / "killed", progress=False).fit()
    assert read_metrics(tmp_path / "killed") == read_metrics(tmp_path / "straight")
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "killed" / "checkpoint.pt")
    for part in ("models", "optimizers", "rng", "step"):
        _assert_same_state(a[part], b[part])


def test_a_run_from_before_the_options_keeps_relu_and_a_constant_rate(tmp_path, image_dir):
    """A config.json / checkpoint written before mlp_activation and lr_decay existed (keys absent)
    rebuilds the ReLU model it trained and keeps its constant learning rate."""
    values = _config("ae", tmp_path / "old", data_dir=image_dir, steps=4).to_dict()
    assert values.pop("mlp_activation") == "silu" and values.pop("lr_decay") == 1.0  # today's AE defaults
    trainer = Trainer.create(TrainConfig.from_dict(values), progress=False)
    kinds = {type(m) for m in trainer.models["model"].modules()}
    assert torch.nn.ReLU in kinds and torch.nn.SiLU not in kinds
    trainer.step = 3
    assert trainer.learning_rate_factor() == 1.0


def test_resume_drops_log_records_past_the_checkpoint(tmp_path):
    """Records written after the last checkpoint (and a line cut short by a kill) are dropped."""
    _train(_config("gan2d", tmp_path / "run", steps=2))
    log = tmp_path / "run" / "metrics.jsonl"
    log.write_text(log.read_text() + '{"step": 3, "d_loss": 1.0}\n{"step": 4, "d_lo')
    Trainer.resume(tmp_path / "run", steps=4, progress=False).fit()
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]
    assert all("g_loss" in r for r in read_metrics(tmp_path / "run"))


def test_runs_repeat_and_seeds_differ(tmp_path):
    _train(_config("gan2d", tmp_path / "a", steps=3))
    _train(_config("gan2d", tmp_path / "b", steps=3))
    _train(_config("gan2d", tmp_path / "c", steps=3, seed=1))
    assert read_metrics(tmp_path / "a") == read_metrics(tmp_path / "b")
    assert read_metrics(tmp_path / "a") != read_metrics(tmp_path / "c")


def test_run_directory(tmp_path, image_dir):
    config = _config("cgan", tmp_path / "run", steps=4, data_dir=image_dir, sample_every=2, checkpoint_every=2,
                     log_every=2)
    _train(config)
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text()) == config.to_dict()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    for record in records:
        assert set(record) == {"step", "d_loss", "d_real", "d_fake", "g_loss", "images_per_s"}
        assert 0 < record["d_real"] < 1 and 0 < record["d_fake"] < 1 and record["images_per_s"] > 0
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_000002.png", "step_000004.png"]
    with Image.open(run / "samples" / "step_000004.png") as picture:
        # Ten classes, one row of 8 each: 10 rows of 32x32 tiles with 2-pixel gaps, doubled.
        assert picture.size == (2 * (8 * 34 + 2), 2 * (10 * 34 + 2))
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 4


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = Trainer.create(_config("gan2d", tmp_path / "run", steps=8, checkpoint_every=2), progress=False)
    d_loss = trainer.objective.d_loss

    def poisoned(real, fake):
        out = d_loss(real, fake)
        return out._replace(loss=out.loss * math.nan) if trainer.step >= 4 else out

    trainer.objective.d_loss = poisoned
    with pytest.raises(NonFiniteLossError, match=r"step 5: non-finite d_loss=nan.*checkpoint.pt \(step 4\)"):
        trainer.fit()
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["step"] == 4
    assert all(torch.isfinite(t).all() for t in state["models"]["discriminator"].values())
    # The failed update was not applied.
    assert all(torch.isfinite(p).all() for p in trainer.models["discriminator"].parameters())


@pytest.mark.parametrize("options", [
    dict(loss="minimax"), dict(loss="least_squares"), dict(loss="hinge", spectral_norm=True),
    dict(loss="non_saturating", label_smoothing=0.1, r1_gamma=0.5), dict(loss="wgan_gp", n_critic=3),
    dict(ema=0.0),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_gan2d_objectives_train(tmp_path, options):
    trainer = _train(_config("gan2d", tmp_path / "run", steps=3, **options))
    records = read_metrics(tmp_path / "run")
    assert all(math.isfinite(v) for r in records for v in r.values())
    extra = {"gp"} if trainer.config.loss == "wgan_gp" else set()
    extra |= {"r1"} if trainer.config.r1_gamma else set()
    assert set(records[-1]) == {"step", "d_loss", "d_real", "d_fake", "g_loss"} | extra
    assert ("generator_ema" in trainer.models) == (options.get("ema") != 0.0)


def test_projection_cgan_samples_follow_labels(tmp_path, image_dir):
    trainer = _train(_config("cgan", tmp_path / "run", steps=2, data_dir=image_dir))
    config, models, step = load_run(tmp_path / "run")
    assert step == 2 and config == trainer.config
    labels = torch.tensor([3, 3, 7])
    with use_backend("reference"):  # generate runs on the backend in force: not the Triton interpreter
        x = generate(config, models, 3, labels=labels, seed=5)
        assert x.shape == (3, 1, 32, 32) and x.abs().max() <= 1
        torch.testing.assert_close(generate(config, models, 3, labels=labels, seed=5), x)
    with pytest.raises(ValueError, match="labels"):
        generate(config, models, 3, labels=torch.tensor([0, 1, 10]))


@pytest.mark.parametrize("model", ["ae", "vae"])
def test_autoencoders_train_and_evaluate(tmp_path, image_dir, model):
    trainer = _train(_config(model, tmp_path / "run", steps=30, data_dir=image_dir, sample_every=30))
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    config, models, _ = load_run(tmp_path / "run")
    metrics = evaluate(config, models)
    assert metrics["samples"] == 40 and metrics["mse"] > 0
    assert ("elbo" in metrics) == (model == "vae")
    if model == "vae":
        assert metrics["elbo"] < 0 and generate(config, models, 4).shape == (4, 1, 28, 28)
    else:
        with pytest.raises(ValueError, match="auto-encoder"):
            generate(config, models, 4)
    assert (trainer.run_dir / "samples" / "step_000030.png").exists()


def test_ema():
    live, avg = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        live.weight.fill_(2.0)
        live.running_mean.fill_(4.0)
    live.num_batches_tracked.fill_(7)
    EMA(avg, live).update(0.75)
    torch.testing.assert_close(avg.weight, torch.full((3,), 1.25))  # 0.75 * 1 + 0.25 * 2
    torch.testing.assert_close(avg.running_mean, torch.full((3,), 4.0))  # buffers: copied
    assert avg.num_batches_tracked.item() == 7


def test_resume_refuses_to_change_the_run(tmp_path):
    _train(_config("gan2d", tmp_path / "run", steps=2))
    with pytest.raises(ValueError, match="lr_g: cannot be changed when resuming"):
        Trainer.resume(tmp_path / "run", lr_g=0.1)
    corrupt = tmp_path / "bad" / "checkpoint.pt"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        Trainer.resume(corrupt)


@pytest.mark.parametrize("model,options,match", [
    ("gan", dict(steps=-1), "steps"),
    ("gan", dict(steps=0), "steps"),
    ("gan", dict(image_size=28), "image_size"),
    ("vae", dict(loss="hinge"), "loss: not an option of model 'vae'"),
    ("gan", dict(loss="hinge", label_smoothing=0.1), "label_smoothing"),
    ("gan", dict(ema=1.0), "ema"),
    ("ae", dict(lr_decay=1.5), "lr_decay: expected a fraction"),
    ("gan2d", dict(lr_decay=-0.1), "lr_decay: expected a fraction"),
    ("ae", dict(hidden=[0]), "hidden"),
    ("gan", dict(compile=1), "compile: expected a bool"),
    ("stylegan", dict(upsample="nearest"), "upsample: expected one of"),
    ("gan", dict(upsample="bilinear"), "upsample: not an option of model 'gan'"),
    ("gan3d", {}, "model"),
])
def test_config_errors_name_the_option(model, options, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.resolve(model, **options)


def test_missing_data_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Trainer.create(_config("gan", tmp_path / "run", data_dir=str(tmp_path / "nowhere")), progress=False)


@pytest.mark.parametrize("model,options", [
    ("gan", dict(image_dir=True)),
    ("gan2d", dict(r1_gamma=0.5)),
    ("gan2d", dict(loss="wgan_gp", n_critic=2)),
    ("vae", dict(image_dir=True)),
], ids=["gan", "gan2d-r1", "gan2d-wgan_gp", "vae"])
def test_compile_trains_like_eager(tmp_path, image_dir, model, options):
    """--compile: the forward passes and losses under torch.compile(fullgraph=True), fastgen's
    ops inside the graph; a penalty's twice-differentiated pass stays eager. Same losses as an
    eager run (Inductor on the CPU reorders float sums: close, not bit-equal)."""
    if options.pop("image_dir", False):
        options["data_dir"] = image_dir
    torch._dynamo.reset()
    eager = read_metrics(_train(_config(model, tmp_path / "eager", steps=2, **options)).run_dir)
    compiled = _train(_config(model, tmp_path / "compiled", steps=2, compile=True, **options))
    assert json.loads((compiled.run_dir / "config.json").read_text())["compile"] is True
    for got, want in zip(read_metrics(compiled.run_dir), eager):
        assert got.keys() == want.keys()
        for name in got:
            assert math.isclose(got[name], want[name], rel_tol=1e-3, abs_tol=1e-5), name


def test_cuda_graphs_needs_cuda(tmp_path):
    with pytest.raises(ValueError, match="cuda_graphs: needs a CUDA device"):
        Trainer.create(_config("gan2d", tmp_path / "run", device="cpu", cuda_graphs=True), progress=False)


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["gan", "vae"])
def test_gpu_cuda_graphs_train(tmp_path, image_dir, model):
    """--cuda-graphs: Inductor's CUDA graphs replay the steps on the fused ops (Triton backend)."""
    trainer = _train(_config(model, tmp_path / "run", steps=4, device="cuda", backend="triton",
                             cuda_graphs=True, data_dir=image_dir))
    records = read_metrics(trainer.run_dir)
    assert len(records) == 4 and all(math.isfinite(v) for r in records for v in r.values())
