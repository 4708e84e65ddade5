"""GAN models (DCGAN, conditional, MLP) and GAN objectives / regularizers."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastgen
from fastgen import reference
from fastgen.models import (GAN_LOSSES, DCGANDiscriminator, DCGANGenerator, GANObjective, MLPDiscriminator,
                            MLPGenerator, gradient_penalty, r1_penalty)
from fastgen.models._layers import conv_block
from fastgen.nn import ConvBNAct, ConvTransposeBNAct
from tests.conftest import rel_err

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _reference_backend():
    """The DCGANs' fused layers run on the PyTorch reference here (the Triton interpreter is slow);
    the backend tests below switch to Triton inside (the innermost use_backend wins)."""
    with fastgen.use_backend("reference"):
        yield


@pytest.mark.parametrize("image_size,channels", [(32, 1), (32, 3), (64, 1), (64, 3)])
def test_dcgan_shapes_and_range(image_size, channels):
    g = DCGANGenerator(16, channels, image_size, width=4)
    d = DCGANDiscriminator(channels, image_size, width=4)
    x = g(torch.randn(5, 16))
    assert x.shape == (5, channels, image_size, image_size)
    assert x.abs().max() <= 1.0  # tanh output
    assert d(x).shape == (5,)
    assert d.features(x).shape == (5, 4 * image_size // 8, 4, 4)


def test_dcgan_width_multiplier_and_layout():
    g = DCGANGenerator(100, 1, 32, width=8)
    # 4x4 layer has width * S / 8 channels, halved at each stride-2 stage: 32 -> 16 -> 8 -> 1.
    assert [block[0].out_channels for block in g.net] == [32, 16, 8, 1]
    d = DCGANDiscriminator(1, 64, width=8)
    assert [block[0].out_channels for block in d.body] == [8, 16, 32, 64]
    # Every block is a fused Sequential(conv, BN, act) or (conv, act): conv and BN keep indices 0 and 1.
    assert all(isinstance(block, ConvTransposeBNAct) for block in g.net)
    assert all(isinstance(block, ConvBNAct) for block in [*d.body, d.out])
    keys = set(g.state_dict())
    assert {"net.0.0.weight", "net.0.1.weight", "net.0.1.running_mean", "net.3.0.weight", "net.3.0.bias"} <= keys
    assert "net.0.0.bias" not in keys  # BN follows: no conv bias


def test_dcgan_init_statistics():
    g = DCGANGenerator(100, 3, 64, width=64)
    w = g.net[1][0].weight  # 512 x 256 x 4 x 4
    assert abs(w.mean().item()) < 1e-3
    assert w.std().item() == pytest.approx(0.02, rel=0.02)
    bn = g.net[1][1].weight
    assert bn.mean().item() == pytest.approx(1.0, abs=0.01)
    assert bn.std().item() == pytest.approx(0.02, rel=0.25)


@pytest.mark.parametrize("bad", [28, 48, 8, 0])
def test_dcgan_rejects_image_size(bad):
    with pytest.raises(ValueError, match="image_size"):
        DCGANGenerator(image_size=bad)
    with pytest.raises(ValueError, match="image_size"):
        DCGANDiscriminator(image_size=bad)


def test_conditional_generator_uses_labels():
    g = DCGANGenerator(8, 1, 32, width=4, num_classes=10).eval()
    z = torch.randn(1, 8).expand(10, 8)
    x = g(z, torch.arange(10))
    assert not torch.allclose(x[0], x[1])
    with pytest.raises(ValueError, match="labels"):
        g(z)
    with pytest.raises(ValueError, match="labels"):
        g(z, torch.arange(10).float())
    with pytest.raises(ValueError, match="labels"):
        DCGANGenerator(8, 1, 32, width=4)(z, torch.arange(10))


def test_projection_discriminator():
    d = DCGANDiscriminator(1, 32, width=4, num_classes=10, conditioning="projection").eval()
    with torch.no_grad():
        d.embed.weight.normal_()
    x = torch.randn(1, 1, 32, 32).expand(10, 1, 32, 32)
    logits = d(x, torch.arange(10))
    assert logits.shape == (10,)
    assert logits.unique().numel() == 10
    h = d.features(x)
    expected = d.out(h).flatten() + (d.embed(torch.arange(10)) * h.sum(dim=(2, 3))).sum(1)
    torch.testing.assert_close(logits, expected)


def test_acgan_discriminator():
    d = DCGANDiscriminator(1, 32, width=4, num_classes=10, conditioning="acgan")
    h = d.features(torch.randn(3, 1, 32, 32))
    assert d.head(h).shape == (3,)
    assert d.classify(h).shape == (3, 10)
    with pytest.raises(ValueError, match="labels"):
        d.head(h, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="acgan"):
        DCGANDiscriminator(1, 32, width=4).classify(h)


@pytest.mark.parametrize("conditioning,num_classes", [("none", 10), ("projection", 0), ("bogus", 10)])
def test_discriminator_conditioning_checks(conditioning, num_classes):
    with pytest.raises(ValueError, match="conditioning"):
        DCGANDiscriminator(1, 32, width=4, num_classes=num_classes, conditioning=conditioning)


def test_spectral_norm_bounds_the_weights():
    d = DCGANDiscriminator(1, 32, width=4, spectral_norm=True, batch_norm=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules())
    x = torch.randn(4, 1, 32, 32)
    for _ in range(30):  # power iterations run in training mode
        d(x)
    d.eval()
    for block in [*d.body, d.out]:
        w = block[0].weight  # the normalized weight
        sigma = torch.linalg.matrix_norm(w.flatten(1), ord=2).item()
        assert sigma == pytest.approx(1.0, rel=0.05)
    mlp = MLPDiscriminator(2, 16, 2, spectral_norm=True)
    for _ in range(30):
        mlp(torch.randn(8, 2))
    assert torch.linalg.matrix_norm(mlp.net[0].weight, ord=2).item() == pytest.approx(1.0, rel=0.05)


def test_conv_block_structure():
    block = conv_block(3, 5, 4, 2, 1, transposed=True, batch_norm=False, activation="tanh")
    assert isinstance(block, ConvTransposeBNAct) and block.activation == "tanh" and len(block) == 2
    assert isinstance(block[0], nn.ConvTranspose2d) and block[0].bias is not None
    assert isinstance(block[1], nn.Tanh)
    block = conv_block(3, 5, 4, 2, 1, activation="leaky_relu", spectral_norm=True)
    assert isinstance(block, ConvBNAct) and (block.activation, block.negative_slope) == ("leaky_relu", 0.2)
    assert isinstance(block[1], nn.BatchNorm2d) and block[0].bias is None
    assert nn.utils.parametrize.is_parametrized(block[0], "weight")
    with pytest.raises(ValueError, match="activation"):
        conv_block(3, 5, 4, 2, 1, activation="gelu")


# ----------------------------------------------------------------------------------------------
# The fused layers: state_dict layout, Triton backend against the reference

# The state_dict of the plain-PyTorch layout, Sequential(conv, BN or Identity, act) per block.
G16_KEYS = ["embed.weight",
            *(f"net.{i}.{key}" for i in (0, 1) for key in (
                "0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked")),
            "net.2.0.weight", "net.2.0.bias"]
_SN = ("parametrizations.weight.original", "parametrizations.weight.0._u", "parametrizations.weight.0._v")
D16_ACGAN_SN_KEYS = ["body.0.0.bias", *(f"body.0.0.{key}" for key in _SN),
                     *(f"body.1.0.{key}" for key in _SN),
                     *(f"body.1.1.{key}" for key in ("weight", "bias", "running_mean", "running_var",
                                                     "num_batches_tracked")),
                     "out.0.bias", *(f"out.0.{key}" for key in _SN), "aux.0.weight", "aux.0.bias"]


def _plain_torch(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose fused blocks are nn.Sequential(conv, BN or Identity, act): the model
    as it was written with PyTorch layers."""
    twin = copy.deepcopy(model)
    for parent in list(twin.modules()):
        for name, child in parent.named_children():
            if isinstance(child, (ConvBNAct, ConvTransposeBNAct)):
                layers = list(child)
                setattr(parent, name, nn.Sequential(layers[0], *layers[1:-1] or [nn.Identity()], layers[-1]))
    return twin


def test_state_dict_is_that_of_plain_torch_layers():
    g = DCGANGenerator(8, 1, 16, width=2, num_classes=3)
    d = DCGANDiscriminator(1, 16, width=2, num_classes=3, conditioning="acgan", spectral_norm=True)
    z, labels, x = torch.randn(3, 8), torch.tensor([0, 2, 1]), torch.randn(3, 1, 16, 16)
    for model, keys, inputs in ((g, G16_KEYS, (z, labels)), (d, D16_ACGAN_SN_KEYS, (x,))):
        twin = _plain_torch(model)
        assert list(model.state_dict()) == list(twin.state_dict()) == keys
        # Either way into a model of other weights: then it computes what the source does.
        other = copy.deepcopy(model)
        with torch.no_grad():
            for p in other.parameters():
                p.normal_()
        fused, plain = copy.deepcopy(other), _plain_torch(other)
        fused.load_state_dict(twin.state_dict())
        plain.load_state_dict(model.state_dict())
        for loaded, source in ((fused, twin), (plain, model)):
            torch.testing.assert_close(loaded.eval()(*inputs), source.eval()(*inputs))


@pytest.fixture
def no_tf32(monkeypatch):
    """fp32 convs in full precision on CUDA (both paths use TF32 when cuDNN may): a 1e-5 comparison."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def _assert_close_tensors(name, fused, ref, tol):
    assert (fused is None) == (ref is None), name
    if fused is not None and fused.is_floating_point():
        assert rel_err(fused, ref) < tol, name
    elif fused is not None:
        assert torch.equal(fused, ref), name


def _assert_triton_matches_reference(model, call, inputs):
    """``call(model, x)`` on copies of ``model`` on the Triton and on the reference backend: the same
    outputs (training and eval mode) and, after a backward pass of one random projection, the same
    input and parameter gradients and buffers (BN running statistics, spectral-norm vectors).

    BN runs with momentum None: after the training pass the running statistics are that batch's, so
    eval mode sees activations of a trained model's scale (with 0.1 they shrink towards 0 layer by
    layer, and the comparison would measure the rounding of numbers near 0)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    results = {}
    weights = None
    for backend in ("triton", "reference"):
        m = copy.deepcopy(model)
        x = inputs.clone().requires_grad_()
        with fastgen.use_backend(backend):
            out = call(m, x)
            if weights is None:
                weights = torch.randn_like(out)
            out.backward(weights)
            with torch.no_grad():
                evaluated = call(m.eval(), inputs)
        results[backend] = {"out": out, "eval": evaluated, "x.grad": x.grad,
                            **{f"{n}.grad": p.grad for n, p in m.named_parameters()}, **dict(m.named_buffers())}
    assert results["triton"].keys() == results["reference"].keys()
    for name, fused in results["triton"].items():
        _assert_close_tensors(name, fused, results["reference"][name], 1e-5 if "grad" not in name else 1e-4)


# image size, channels, classes, D's conditioning, spectral norm; width 2 and batch 2 or 3: the Triton side
# runs in the CPU interpreter.
BACKEND_CASES = {
    "dcgan32": (32, 1, 0, "none", False),
    "cgan16-rgb-projection": (16, 3, 3, "projection", False),
    "acgan16-spectral-norm": (16, 1, 3, "acgan", True),
}


@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("case", BACKEND_CASES)
def test_triton_backend_matches_the_reference(case, device):
    size, channels, num_classes, conditioning, spectral_norm = BACKEND_CASES[case]
    labels = torch.tensor([2, 0, 1], device=device) if num_classes else None
    batch = 3 if num_classes else 2
    if conditioning != "acgan":  # the ACGAN's generator is the projection case's
        g = DCGANGenerator(8, channels, size, width=2, num_classes=num_classes).to(device)
        _assert_triton_matches_reference(g, lambda m, z: m(z, labels), torch.randn(batch, 8, device=device))

    def discriminate(m, x):
        """Adversarial logits and the class logits (ACGAN) or the features, side by side."""
        h = m.features(x)
        return torch.cat([m.head(h, labels if conditioning == "projection" else None)[:, None],
                          m.classify(h) if conditioning == "acgan" else h.flatten(1)], dim=1)

    d = DCGANDiscriminator(channels, size, width=2, num_classes=num_classes, conditioning=conditioning,
                           spectral_norm=spectral_norm).to(device)
    _assert_triton_matches_reference(d, discriminate, torch.randn(batch, channels, size, size, device=device))


@pytest.mark.usefixtures("no_tf32")
def test_optimizer_steps_on_triton_match_the_reference(device):
    """Two alternating Adam steps of a tiny DCGAN with the fused BCE loss: the same weights and BN
    statistics on either backend."""
    g0, d0 = DCGANGenerator(8, 1, 16, width=2).to(device), DCGANDiscriminator(1, 16, width=2).to(device)
    real, z = torch.rand(2, 2, 1, 16, 16, device=device) * 2 - 1, torch.randn(2, 2, 8, device=device)
    objective = GANObjective("non_saturating")
    states = {}
    for backend in ("triton", "reference"):
        g, d = copy.deepcopy(g0), copy.deepcopy(d0)
        opt_g = torch.optim.Adam(g.parameters(), 2e-4, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(d.parameters(), 2e-4, betas=(0.5, 0.999))
        with fastgen.use_backend(backend):
            for step in range(2):
                fake = g(z[step])
                opt_d.zero_grad()
                objective.d_loss(d(real[step]), d(fake.detach())).loss.backward()
                opt_d.step()
                opt_g.zero_grad()
                objective.g_loss(d(fake)).loss.backward()
                opt_g.step()
        states[backend] = {**{f"g.{k}": v for k, v in g.state_dict().items()},
                           **{f"d.{k}": v for k, v in d.state_dict().items()}}
    for name, fused in states["triton"].items():
        _assert_close_tensors(name, fused, states["reference"][name], 1e-4)


def test_mlp_models():
    g, d = MLPGenerator(4, 2, 16, 2), MLPDiscriminator(2, 16, 2)
    x = g(torch.randn(7, 4))
    assert x.shape == (7, 2) and d(x).shape == (7,)
    with pytest.raises(ValueError, match="z"):
        g(torch.randn(7, 3))
    with pytest.raises(ValueError, match="hidden"):
        MLPGenerator(hidden=0)


# ----------------------------------------------------------------------------------------------
# Objectives


def _logits(n=37):
    return torch.randn(n, dtype=torch.float64) * 3, torch.randn(n + 5, dtype=torch.float64) * 3


def test_bce_objectives_match_the_reference():
    real, fake = _logits()
    for kind in ("non_saturating", "minimax"):
        obj = GANObjective(kind, label_smoothing=0.1)
        d, ref = obj.d_loss(real, fake), reference.gan_d_loss(real, fake, label_smoothing=0.1)
        torch.testing.assert_close(d.loss, ref.loss)
        torch.testing.assert_close(d.d_real, torch.sigmoid(real).mean().float())
        g = obj.g_loss(fake)
        torch.testing.assert_close(g.loss, reference.gan_g_loss(fake, saturating=kind == "minimax").loss)
    # The minimax G minimizes mean log(1 - D(G(z))).
    expected = torch.log1p(-torch.sigmoid(fake)).mean()
    torch.testing.assert_close(GANObjective("minimax").g_loss(fake).loss, expected)


def test_other_objectives_follow_their_formulas():
    real, fake = _logits()
    cases = {
        "hinge": (F.relu(1 - real).mean() + F.relu(1 + fake).mean(), -fake.mean()),
        "least_squares": (0.5 * ((real - 1) ** 2).mean() + 0.5 * (fake ** 2).mean(), 0.5 * ((fake - 1) ** 2).mean()),
        "wgan_gp": (fake.mean() - real.mean(), -fake.mean()),
    }
    for kind, (d_expected, g_expected) in cases.items():
        obj = GANObjective(kind)
        d = obj.d_loss(real, fake)
        torch.testing.assert_close(d.loss, d_expected)
        torch.testing.assert_close(d.d_real, real.mean().float())
        torch.testing.assert_close(d.d_fake, fake.mean().float())
        torch.testing.assert_close(obj.g_loss(fake).loss, g_expected)
    assert set(cases) | {"non_saturating", "minimax"} == set(GAN_LOSSES)


def test_objective_argument_checks():
    with pytest.raises(ValueError, match="loss"):
        GANObjective("wasserstein")
    with pytest.raises(ValueError, match="label_smoothing"):
        GANObjective("hinge", label_smoothing=0.1)


def test_gradient_penalty_on_a_linear_critic():
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    real, fake = torch.randn(9, 6, dtype=torch.float64), torch.randn(9, 6, dtype=torch.float64)
    gp = gradient_penalty(lambda x: x @ w, real, fake)
    # The critic's gradient is w everywhere: the penalty is (||w|| - 1)^2 and differentiable in w.
    torch.testing.assert_close(gp, (w.norm() - 1) ** 2)
    (grad,) = torch.autograd.grad(gp, w)
    torch.testing.assert_close(grad, 2 * (w.norm() - 1) * w / w.norm())


def test_gradient_penalty_is_per_sample():
    # critic(x) = sum(x^2) / 2 has gradient x: the penalty is the mean of (||x_hat|| - 1)^2.
    real, fake = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    torch.manual_seed(3)
    gp = gradient_penalty(lambda x: 0.5 * x.square().sum(1), real, fake)
    torch.manual_seed(3)
    alpha = torch.rand(5, 1, dtype=torch.float64)
    mixed = real + alpha * (fake - real)
    torch.testing.assert_close(gp, ((mixed.norm(dim=1) - 1) ** 2).mean())


def test_r1_penalty():
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    real = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    r1 = r1_penalty(real @ w, real)
    torch.testing.assert_close(r1, w.square().sum())
    r1.backward()
    torch.testing.assert_close(w.grad, 2 * w.detach())
    with pytest.raises(ValueError, match="requires_grad"):
        r1_penalty(torch.randn(3), torch.randn(3, 2))


def test_objectives_accept_bf16():
    real = torch.randn(8, dtype=torch.bfloat16)
    fake = torch.randn(8, dtype=torch.bfloat16)
    for kind in GAN_LOSSES:
        out = GANObjective(kind).d_loss(real, fake)
        assert math.isfinite(out.loss.float().item())
