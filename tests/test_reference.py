"""The references in fastgen.reference against PyTorch's own modules and formulas."""

import math

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

from fastgen import reference as R

ACTIVATION_MODULES = {
    "identity": lambda slope: nn.Identity(),
    "relu": lambda slope: nn.ReLU(),
    "leaky_relu": lambda slope: nn.LeakyReLU(slope),
    "tanh": lambda slope: nn.Tanh(),
    "sigmoid": lambda slope: nn.Sigmoid(),
}

CONV_CASES = [
    # transposed, c_in, c_out, kernel, stride, padding, output_padding, spatial
    (False, 3, 5, 3, 1, 1, 0, 7),
    (False, 1, 17, 4, 2, 1, 0, 16),
    (False, 5, 4, 5, 2, 2, 0, 9),
    (True, 7, 3, 4, 2, 1, 0, 4),
    (True, 3, 6, 3, 2, 1, 1, 5),
    (True, 4, 4, 1, 1, 0, 0, 6),
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("activation", R.ACTIVATIONS)
@pytest.mark.parametrize("training", [True, False])
def test_conv_bn_act_matches_torch_modules(case, activation, training):
    transposed, c_in, c_out, k, stride, padding, output_padding, size = case
    conv = (nn.ConvTranspose2d(c_in, c_out, k, stride, padding, output_padding, bias=False) if transposed
            else nn.Conv2d(c_in, c_out, k, stride, padding, bias=False)).double()
    bn = nn.BatchNorm2d(c_out, momentum=0.3, eps=1e-4).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    model = nn.Sequential(conv, bn, ACTIVATION_MODULES[activation](0.1)).train(training)
    x = torch.randn(3, c_in, size, size, dtype=torch.float64, requires_grad=True)
    running_mean, running_var = bn.running_mean.clone(), bn.running_var.clone()

    ref = R.conv_bn_act(x, conv.weight, bn.weight, bn.bias, running_mean, running_var, stride=stride,
                        padding=padding, output_padding=output_padding, transposed=transposed,
                        training=training, momentum=0.3, eps=1e-4, activation=activation,
                        negative_slope=0.1)
    expected = model(x)
    torch.testing.assert_close(ref, expected)
    torch.testing.assert_close(running_mean, bn.running_mean)
    torch.testing.assert_close(running_var, bn.running_var)
    go = torch.randn_like(ref)
    params = (x, conv.weight, bn.weight, bn.bias)
    for got, want in zip(torch.autograd.grad(ref, params, go), torch.autograd.grad(expected, params, go)):
        torch.testing.assert_close(got, want)


def test_conv_bn_act_rejects_output_padding_without_transposed():
    with pytest.raises(ValueError, match="output_padding"):
        R.conv_bn_act(torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3), None, None, None, None,
                      output_padding=1)


@pytest.mark.parametrize("activation", R.ACTIVATIONS)
def test_activation_gradients_match_autograd_in_float64(activation):
    """Each activation's backward (fastgen.activations, used by every reference backward) is
    autograd's to float64 precision: no constant rounded through float32."""
    from fastgen import activations

    x = torch.linspace(-3, 3, 61, dtype=torch.float64).requires_grad_()
    dout = torch.linspace(0.5, 2.0, 61, dtype=torch.float64)
    slope = 0.1 + 1e-12  # not a float32 number
    (expected,) = torch.autograd.grad(R.activate(x, activation, slope), x, dout)
    grad = activations.ACTIVATIONS[activation].backward(dout, x.detach(), slope)
    assert grad.dtype == torch.float64
    torch.testing.assert_close(grad, expected, rtol=1e-15, atol=1e-15)


def test_activate_rejects_unknown_names():
    with pytest.raises(ValueError, match="activation.*identity, relu"):
        R.activate(torch.randn(3), "gelu")


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_bce_matches_torch(reduction):
    x, t = torch.randn(6, 5, dtype=torch.float64) * 4, torch.rand(6, 5, dtype=torch.float64)
    torch.testing.assert_close(R.bce_with_logits(x, t, reduction=reduction),
                               TF.binary_cross_entropy_with_logits(x, t, reduction=reduction))


def test_bce_per_sample_sums_all_but_the_batch_dimension():
    x, t = torch.randn(4, 3, 2, 5, dtype=torch.float64), torch.rand(4, 3, 2, 5, dtype=torch.float64)
    elementwise = TF.binary_cross_entropy_with_logits(x, t, reduction="none")
    torch.testing.assert_close(R.bce_with_logits(x, t, reduction="per_sample"), elementwise.sum((1, 2, 3)))
    flat = torch.randn(7, dtype=torch.float64)
    torch.testing.assert_close(R.bce_with_logits(flat, t.flatten()[:7], reduction="per_sample"),
                               TF.binary_cross_entropy_with_logits(flat, t.flatten()[:7], reduction="none"))


def test_gan_losses_match_their_definitions():
    real, fake = torch.randn(9, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    d_real, d_fake = torch.sigmoid(real), torch.sigmoid(fake)
    s = 0.1
    d = R.gan_d_loss(real, fake, label_smoothing=s)
    expected = -((1 - s) * d_real.log() + s * (1 - d_real).log()).mean() - (1 - d_fake).log().mean()
    torch.testing.assert_close(d.loss, expected)
    assert math.isclose(d.d_real.item(), d_real.mean().item(), rel_tol=1e-6)
    assert math.isclose(d.d_fake.item(), d_fake.mean().item(), rel_tol=1e-6)
    torch.testing.assert_close(R.gan_g_loss(fake).loss, -d_fake.log().mean())
    torch.testing.assert_close(R.gan_g_loss(fake, saturating=True).loss, (1 - d_fake).log().mean())


def test_reparameterize_shapes_and_kl():
    mu, logvar = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    z, kl = R.reparameterize(mu, logvar)
    assert z.shape == (6, 4) and kl.shape == (6,)
    z5, _ = R.reparameterize(mu, logvar, samples=5)
    assert z5.shape == (5, 6, 4)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    torch.testing.assert_close(kl, torch.distributions.kl_divergence(q, p).sum(1))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(R.reparameterize(mu, logvar, generator=g1)[0], R.reparameterize(mu, logvar, generator=g2)[0])
