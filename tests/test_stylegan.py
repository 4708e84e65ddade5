"""StyleGAN2-small (fastgen.models.stylegan), and `train stylegan | biggan` end to end: losses,
bit-exact resume, sampling with truncation and labels, evaluation."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastgen.backend import use_backend
from fastgen.models.stylegan import (EqualConv2d, EqualLinear, StyleGAN2Discriminator, StyleGAN2Generator,
                                     minibatch_stddev)
from fastgen.train import TrainConfig, Trainer
from fastgen.train.checkpoint import load_checkpoint
from tests.conftest import read_metrics, run_cli
from tests.test_train import _assert_same_state

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def reference_backend():
    """The models' fused ops on the PyTorch reference (the Triton interpreter is tested per op)."""
    with use_backend("reference"):
        yield


def _generator(**options):
    torch.manual_seed(0)
    return StyleGAN2Generator(8, 1, 16, 2, mapping_layers=2, **options)


# ----------------------------------------------------------------------------------------------
# The modules


def test_shapes_and_layer_count():
    g = _generator()
    assert g.num_ws == 6  # the 4x4 conv, two per up-block (8, 16), and the last toRGB
    x = g(torch.randn(3, 8))
    assert x.shape == (3, 1, 16, 16) and x.dtype == torch.float32 and torch.isfinite(x).all()
    d = StyleGAN2Discriminator(1, 16, 2)
    assert d(x).shape == (3,)
    rgb = StyleGAN2Generator(8, 3, 32, 2, mapping_layers=1)
    assert rgb(torch.randn(2, 8)).shape == (2, 3, 32, 32)
    assert StyleGAN2Discriminator(3, 32, 2)(torch.randn(2, 3, 32, 32)).shape == (2,)


def test_truncation_zero_draws_the_image_of_w_avg():
    g = _generator().eval()
    with torch.no_grad():
        g.w_avg.normal_()
        z = torch.randn(4, 8)
        images = g(z, truncation=0.0, noise_mode="none")
        of_w_avg = g.synthesis(g.w_avg.expand(1, g.num_ws, -1), noise_mode="none")
        torch.testing.assert_close(images, of_w_avg.expand(4, -1, -1, -1))
        half = g(z, truncation=0.5, noise_mode="none")
        # psi = 0.5: w halfway between w_avg and w(z).
        expected = g.synthesis(torch.lerp(g.w_avg, g.mapping(z), 0.5)[:, None].expand(-1, g.num_ws, -1), "none")
        torch.testing.assert_close(half, expected)
        assert not torch.allclose(half[0], half[1])


def test_w_avg_follows_the_mean_w_in_training_only():
    g = _generator(w_avg_beta=0.9)
    z = torch.randn(5, 8)
    with torch.no_grad():
        w = g.eval().mapping(z)
        assert g.w_avg.abs().max() == 0  # eval mode: unchanged
        g.train().mapping(z)
    torch.testing.assert_close(g.w_avg, 0.1 * w.mean(0))


def test_style_mixing_takes_the_second_latents_w_from_a_cutoff_on():
    g = _generator().train()
    z = torch.randn(3, 8)
    torch.manual_seed(1)
    mixed = g(z, mixing=1.0, noise_mode="none")
    torch.manual_seed(1)
    z2 = torch.randn_like(z)  # the generator's first draw
    with torch.no_grad():
        w, w2 = g.mapping(z), g.mapping(z2)
        plain = g.synthesis(w[:, None].expand(-1, g.num_ws, -1), "none")
        candidates = [g.synthesis(torch.cat([w[:, None].expand(-1, cutoff, -1),
                                             w2[:, None].expand(-1, g.num_ws - cutoff, -1)], dim=1), "none")
                      for cutoff in range(1, g.num_ws)]
    assert not torch.allclose(mixed, plain)
    assert sum(torch.allclose(mixed, c, atol=1e-5) for c in candidates) == 1
    # Probability 0, and eval mode by default: no mixing.
    torch.testing.assert_close(g(z, mixing=0.0, noise_mode="none"), plain)
    torch.testing.assert_close(g.eval()(z, noise_mode="none"), plain)


def test_truncation_applies_to_the_mixed_latent_too():
    """psi = 0 with mixing: both latents' w become w_avg, so the image is w_avg's at every layer."""
    g = _generator().eval()
    with torch.no_grad():
        g.w_avg.normal_()
        expected = g.synthesis(g.w_avg.expand(2, g.num_ws, -1), "none")
        mixed = g(torch.randn(2, 8), truncation=0.0, mixing=1.0, noise_mode="none")
    torch.testing.assert_close(mixed, expected)


def test_transposed_upsampling_keeps_the_signal_scale():
    """A transposed up layer (4x4 stride-2, 4 of 16 taps per output pixel) has the output scale
    of a 3x3 layer: demodulation alone would halve it (StyleGAN2's FIR filter has gain 4)."""
    from fastgen.models.stylegan import _ModulatedLayer

    torch.manual_seed(0)
    x, w = torch.randn(8, 64, 8, 8), torch.zeros(8, 4)  # w = 0: styles = the affine's bias, 1
    layers = {up: _ModulatedLayer(4, 64, 64, up=up, upsample="transposed") for up in (1, 2)}
    assert layers[2].weight.shape[-1] == 4
    stds = {up: layer(x, w, "none").std().item() for up, layer in layers.items()}
    assert stds[2] == pytest.approx(stds[1], rel=0.1), stds


def test_bilinear_upsampling_is_stylegan2s_filtered_transposed_conv():
    """The bilinear up layer is the 3x3 layer on the 2x bilinear resize of its input, and, inside
    a 2-pixel border (bilinear clamps, upfirdn pads with zeros), StyleGAN2's up layer: a 3x3
    stride-2 transposed conv (zero insertion, then the conv), then the FIR blur [1, 3, 3, 1] (gain 4)."""
    from fastgen.models.stylegan import _ModulatedLayer

    torch.manual_seed(0)
    x, w = torch.randn(2, 5, 6, 7), torch.randn(2, 4)
    up = _ModulatedLayer(4, 5, 3, up=2)
    plain = _ModulatedLayer(4, 5, 3)
    plain.load_state_dict(up.state_dict())
    resized = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(up(x, w, "none"), plain(resized, w, "none"))

    # The linear part alone (one weight, no styles): bilinear + conv vs transposed conv + FIR blur.
    weight = torch.randn(3, 5, 3, 3)
    ours = F.conv2d(resized, weight, padding=1)
    zeros = torch.zeros(2, 5, 12, 14)
    zeros[..., ::2, ::2] = x
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0]) / 4  # per axis, sum 2: sum 4 in 2D fills the zeros
    blur = (taps[:, None] * taps[None, :]).expand(3, 1, 4, 4)
    stylegan2 = F.conv2d(F.pad(F.conv2d(zeros, weight, padding=1), (2, 1, 2, 1)), blur, groups=3)
    torch.testing.assert_close(ours[..., 2:-2, 2:-2], stylegan2[..., 2:-2, 2:-2])

    # The smoothing costs scale on white input, as in StyleGAN2: about 2/3 of a 3x3 layer's.
    x, w = torch.randn(8, 64, 8, 8), torch.zeros(8, 4)
    stds = [layer(x, w, "none").std().item() for layer in (_ModulatedLayer(4, 64, 64, up=2), _ModulatedLayer(4, 64, 64))]
    assert 0.55 < stds[0] / stds[1] < 0.8, stds


def test_equalized_learning_rate_scales_weights_at_run_time():
    torch.manual_seed(0)
    mapping = EqualLinear(400, 300, activation="leaky_relu", lr_mul=0.01)
    # Stored N(0, 1 / lr_mul^2); the effective weight lr_mul / sqrt(fan_in) times that: N(0, 1 / fan_in).
    assert math.isclose(mapping.weight.std().item(), 100.0, rel_tol=0.02)
    x = torch.randn(5, 400)
    with torch.no_grad():
        mapping.bias.normal_()
        expected = math.sqrt(2) * F.leaky_relu(F.linear(x, mapping.weight * 0.01 / 20.0, mapping.bias * 0.01), 0.2)
    torch.testing.assert_close(mapping(x), expected)
    affine = EqualLinear(16, 4, bias_init=1.0)
    torch.testing.assert_close(affine(torch.zeros(2, 16)), torch.ones(2, 4))

    conv = EqualConv2d(3, 5, 3)
    assert math.isclose(conv.weight.std().item(), 1.0, rel_tol=0.3)
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(2, 3, 6, 6)
    expected = math.sqrt(2) * F.leaky_relu(F.conv2d(x, conv.weight / math.sqrt(27), conv.bias, padding=1), 0.2)
    torch.testing.assert_close(conv(x), expected)


def test_minibatch_stddev_known_answer():
    x = torch.randn(4, 2, 3, 3)
    out = minibatch_stddev(x, group_size=2)
    assert out.shape == (4, 3, 3, 3)
    torch.testing.assert_close(out[:, :2], x)
    for i in range(2):  # groups: samples (0, 2) and (1, 3)
        pair = x[[i, i + 2]]
        std = (pair - pair.mean(0)).square().mean(0).add(1e-8).sqrt().mean()
        torch.testing.assert_close(out[[i, i + 2], 2], std.expand(2, 3, 3))
    assert minibatch_stddev(torch.randn(3, 2, 2, 2), group_size=4).shape == (3, 3, 2, 2)  # group of 3
    with pytest.raises(ValueError, match="multiple of the minibatch-stddev group size"):
        minibatch_stddev(torch.randn(6, 2, 2, 2), group_size=4)


@pytest.mark.parametrize("call,match", [
    (lambda g, d: g(torch.randn(2, 7)), "z: expected shape"),
    (lambda g, d: g(torch.randn(2, 8), torch.tensor([0, 1])), "labels: this model is unconditional"),
    (lambda g, d: g(torch.randn(2, 8), truncation=1.5), "truncation"),
    (lambda g, d: g(torch.randn(2, 8), mixing=-0.1), "mixing"),
    (lambda g, d: g(torch.randn(2, 8), noise_mode="const"), "noise_mode"),
    (lambda g, d: g.synthesis(torch.randn(2, 5, 8)), "ws: expected shape"),
    (lambda g, d: d(torch.randn(2, 1, 32, 32)), "x: expected shape"),
    (lambda g, d: StyleGAN2Generator(8, 1, 24), "image_size"),
    (lambda g, d: StyleGAN2Generator(8, style_mixing=1.5), "style_mixing"),
    (lambda g, d: StyleGAN2Generator(8, upsample="nearest"), "upsample: expected one of bilinear, transposed"),
    (lambda g, d: EqualLinear(4, 4, activation="tanh"), "activation"),
])
def test_bad_input_is_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call(_generator(), StyleGAN2Discriminator(1, 16, 2))


# ----------------------------------------------------------------------------------------------
# Training, resuming, sampling, evaluating


def _config(model, out_dir, data_dir, **options):
    small = {"stylegan": dict(width=2, latent_size=8, mapping_layers=2, r1_every=2),
             "biggan": dict(width=4, latent_size=8)}[model]
    base = dict(small, data_dir=data_dir, batch_size=8, backend="reference", log_every=1, sample_every=1000,
                checkpoint_every=1000)
    return TrainConfig.resolve(model, out_dir=str(out_dir), **(base | options))


@pytest.mark.parametrize("batch_size,world_size,refused", [(6, None, 6), (24, 4, 6), (16, 4, None), (2, None, None)])
def test_a_batch_the_stddev_groups_cannot_split_is_refused_before_training(batch_size, world_size, refused, tmp_path):
    """A process's batch against minibatch-stddev groups of min(4, batch): 6 samples (alone, or 24 over
    4 processes) are refused when the models are built, naming batch_size; 16 over 4 and 2 alone pass."""
    from fastgen.train.factory import build_models

    config = dataclasses.replace(_config("stylegan", tmp_path, None, batch_size=batch_size), world_size=world_size)
    if refused:
        with pytest.raises(ValueError, match=f"batch_size: .*groups of 4.*got {refused}"):
            build_models(config, torch.device("cpu"))
    else:
        assert {"generator", "discriminator"} <= set(build_models(config, torch.device("cpu")))


@pytest.mark.parametrize("model,options", [("stylegan", {}), ("stylegan", {"upsample": "transposed"}),
                                           ("biggan", {})])
def test_training_moves_and_resumes_bit_exactly(tmp_path, image_dir, model, options):
    """6 steps straight vs 3 steps, a resume in a fresh trainer, 3 more: the same losses, weights
    (EMA and w_avg included), optimizer states, data order and RNG states, bit for bit. StyleGAN2
    with either up-sampling (runs from before the option resume with the transposed one)."""
    straight = Trainer.create(_config(model, tmp_path / "straight", image_dir, steps=6, **options), progress=False)
    first = {name: p.detach().clone() for name, p in straight.models["generator"].named_parameters()}
    straight.fit()
    Trainer.create(_config(model, tmp_path / "split", image_dir, steps=3, **options), progress=False).fit()
    resumed = Trainer.resume(tmp_path / "split", steps=6, progress=False)
    resumed.fit()
    records = read_metrics(tmp_path / "straight")
    assert read_metrics(tmp_path / "split") == records
    a, b = (load_checkpoint(tmp_path / run / "checkpoint.pt") for run in ("straight", "split"))
    for part in ("models", "optimizers", "sampler", "rng", "step"):
        _assert_same_state(a[part], b[part])

    assert all(math.isfinite(v) for r in records for v in r.values())
    assert len({r["d_loss"] for r in records}) == 6 and len({r["g_loss"] for r in records}) == 6
    generator = straight.models["generator"]
    assert all(not torch.equal(p, first[name]) for name, p in generator.named_parameters()
               if p.requires_grad), "a generator weight did not train"
    if model == "stylegan":
        # Lazy R1 every 2 steps: on steps 0, 2, 4 (records 1, 3, 5).
        assert [r["step"] for r in records if "r1" in r] == [1, 3, 5]
        assert generator.w_avg.abs().sum() > 0
    else:
        assert all(r["ortho"] > 0 for r in records)


def test_a_run_from_before_the_upsample_option_rebuilds_its_transposed_convs(tmp_path):
    """A config.json / checkpoint without the key rebuilds the 4x4 transposed up-convs it trained;
    today's default is the bilinear resize and 3x3 conv."""
    from fastgen.train.factory import build_models

    def up_kernel(values):
        generator = build_models(TrainConfig.from_dict(values), torch.device("cpu"))["generator"]
        return generator.convs[1].weight.shape[-1]

    values = _config("stylegan", tmp_path, None).to_dict()
    assert values["upsample"] == "bilinear" and up_kernel(values) == 3
    del values["upsample"]
    assert up_kernel(values) == 4


def test_lazy_r1_is_weighted_by_its_interval(tmp_path, image_dir):
    """On its steps, R1 every 2 steps with gamma g is R1 every step with gamma 2 g (step 0: both)."""
    def first_step(run, **options):
        trainer = Trainer.create(_config("stylegan", tmp_path / run, image_dir, steps=1, **options), progress=False)
        trainer.fit()
        return {name: trainer.models[name].state_dict() for name in ("discriminator", "generator")}

    every_step = first_step("every", r1_every=1, r1_gamma=1.0)
    _assert_same_state(first_step("lazy", r1_every=2, r1_gamma=0.5), every_step)
    unscaled = first_step("unscaled", r1_every=1, r1_gamma=0.5)["discriminator"]
    assert any(not torch.equal(unscaled[k], v) for k, v in every_step["discriminator"].items())


def test_cli_trains_samples_and_evaluates(tmp_path, capsys, image_dir):
    fast = ["--data-dir", image_dir, "--batch-size", "8", "--backend", "reference", "--no-progress"]
    runs = {model: tmp_path / model for model in ("stylegan", "biggan")}
    for model, size in (("stylegan", ["--width", "2", "--latent-size", "8", "--mapping-layers", "2"]),
                        ("biggan", ["--width", "4", "--latent-size", "8"])):
        code, out, err = run_cli(capsys, "train", model, "--steps", "2", "--out-dir", str(runs[model]), *size, *fast)
        assert code == 0, err
        assert json.loads((runs[model] / "config.json").read_text())["model"] == model

    def sample(run, *options):
        path = tmp_path / "s.npy"
        code, _, err = run_cli(capsys, "sample", str(run), "--out", str(path), *options)
        assert code == 0, err
        return np.load(path)

    plain = sample(runs["stylegan"], "--num", "4")
    truncated = sample(runs["stylegan"], "--num", "4", "--truncation", "0.7")
    assert plain.shape == truncated.shape == (4, 1, 32, 32) and np.abs(truncated).max() <= 1
    assert not np.allclose(plain, truncated)
    np.testing.assert_array_equal(sample(runs["stylegan"], "--num", "4", "--truncation", "0.7"), truncated)
    assert sample(runs["biggan"], "--labels", "2,5", "--num", "3").shape == (6, 1, 32, 32)
    assert run_cli(capsys, "sample", str(runs["stylegan"]), "--out", str(tmp_path / "s.png"), "--truncation",
                   "0.7")[0] == 0

    for run, options, match in [(runs["biggan"], ["--truncation", "0.7"], "truncation: only a stylegan"),
                                (runs["stylegan"], ["--labels", "1"], "labels: only a cgan or biggan"),
                                (runs["stylegan"], ["--truncation", "1.5"], "expected a number in")]:
        code, _, err = run_cli(capsys, "sample", str(run), "--out", str(tmp_path / "x.npy"), *options)
        assert code == 2 and match in err, err

    for model, run in runs.items():
        code, out, err = run_cli(capsys, "eval", str(run), "--num-samples", "20")
        assert code == 0, err
        record = json.loads(out)
        assert record["model"] == model and record["samples"] == 20 and record["fd"] > 0
        assert ("label_fidelity" in record) == (model == "biggan")


@pytest.mark.parametrize("model", ["stylegan", "biggan"])
def test_cuda_defaults_apply_on_cuda_only(model, monkeypatch, capsys):
    """On CUDA (asked for, or found by "auto") the two models take their CUDA_DEFAULTS; on the
    CPU their CPU defaults; an explicit option wins over both; --help shows both."""
    from fastgen.train.config import CUDA_DEFAULTS, DEFAULTS

    cuda = CUDA_DEFAULTS[model]
    cpu = TrainConfig.resolve(model, device="cpu")
    assert all(getattr(cpu, k) == DEFAULTS[model][k] for k in cuda)
    assert all(getattr(TrainConfig.resolve(model, device="cuda"), k) == v for k, v in cuda.items())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert all(getattr(TrainConfig.resolve(model), k) == v for k, v in cuda.items())
    assert TrainConfig.resolve(model, width=4).width == 4
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert TrainConfig.resolve(model).width == DEFAULTS[model]["width"]
    _, out, _ = run_cli(capsys, "train", model, "--help")
    assert f"on CUDA: {cuda['width']})" in " ".join(out.split())
