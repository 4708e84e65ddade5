"""AutoEncoder and VAE (fastgen/models/ae.py, vae.py): shapes, training, bounds, the fused path.

Training runs on the reference backend (the interpreter would take minutes); one test runs the
models through the Triton kernels.
"""

import pytest
import torch
from torch import nn

import fastgen
from fastgen import functional as F
from fastgen.models import VAE, AutoEncoder
from tests.conftest import rel_err

CONFIGS = [((1, 28, 28), "mlp"), ((1, 28, 28), "conv"), ((3, 32, 32), "mlp"), ((3, 32, 32), "conv"),
           ((20,), "mlp"), ((3, 13, 9), "conv")]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def reference_backend():
    with fastgen.use_backend("reference"):
        yield


def _toy_binary_data(n: int = 512, dim: int = 24, prototypes: int = 4) -> torch.Tensor:
    """Binary vectors: a few random prototypes with 5% of the bits flipped."""
    gen = torch.Generator().manual_seed(0)
    protos = (torch.rand(prototypes, dim, generator=gen) < 0.5).float()
    x = protos[torch.randint(prototypes, (n,), generator=gen)]
    flips = (torch.rand(n, dim, generator=gen) < 0.05).float()
    return (x + flips) % 2


def _train(model, data: torch.Tensor, steps: int, lr: float = 3e-3) -> tuple[float, float]:
    """Adam on ``model.loss(batch).mean()``; returns the full-data mean loss before and after."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        before = model.loss(data).mean().item()
    for _ in range(steps):
        batch = data[torch.randint(len(data), (128,), generator=gen)]
        loss = model.loss(batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = model.loss(data).mean().item()
    return before, after


@pytest.fixture(scope="module")
def trained_vae():
    torch.manual_seed(0)
    data = _toy_binary_data()
    with fastgen.use_backend("reference"):
        vae = VAE(data.shape[1:], 4, hidden=(64,))
        before, after = _train(vae, data, steps=400)
    return vae.eval(), data, before, after


# ----------------------------------------------------------------------------------------------
# Shapes and the interface


@pytest.mark.parametrize("input_shape, arch", CONFIGS)
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_autoencoder_shapes(input_shape, arch, likelihood, reference_backend):
    ae = AutoEncoder(input_shape, 7, arch=arch, likelihood=likelihood, hidden=(8, 16))
    x = torch.rand(3, *input_shape)
    code = ae.encode(x)
    assert code.shape == (3, 7) and ae.decode(code).shape == x.shape and ae(x).shape == x.shape
    assert ae.loss(x).shape == (3,) and ae.reconstruct(x).shape == x.shape
    if likelihood == "bernoulli":
        assert ((ae.reconstruct(x) > 0) & (ae.reconstruct(x) < 1)).all()


@pytest.mark.parametrize("input_shape, arch", CONFIGS)
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_vae_shapes(input_shape, arch, likelihood, reference_backend):
    vae = VAE(input_shape, 5, arch=arch, likelihood=likelihood, hidden=(8, 16))
    x = torch.rand(4, *input_shape)
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (4, 5)
    assert vae(x).shape == x.shape and vae.reconstruct(x).shape == x.shape
    assert vae.sample(6).shape == (6, *input_shape)
    for out in (vae.elbo(x), vae.loss(x), vae.iwae_bound(x, 3), vae.nll(x, k=5, max_batch=8)):
        assert out.shape == (4,) and torch.isfinite(out).all()
    assert (vae.log_sigma is not None) == (likelihood == "gaussian")


def test_default_hidden_and_repr():
    assert AutoEncoder((1, 28, 28), 16, arch="conv").hidden == (32, 64)
    vae = VAE((784,), 10, beta=4.0)
    assert vae.hidden == (512, 256) and "beta=4.0" in repr(vae)
    assert sum(p.numel() for p in vae.encoder[-1].parameters()) == 256 * 20 + 20  # mu and logvar heads


@pytest.mark.parametrize("make", [AutoEncoder, VAE])
def test_mlp_activation(make):
    """ReLU by default, SiLU on request, in every hidden layer of the encoder and the decoder."""
    def activations(model):
        return [type(m) for m in [*model.encoder, *model.decoder] if not isinstance(m, (nn.Linear, nn.Flatten,
                                                                                     nn.Unflatten))]
    assert activations(make((784,), 8)) == [nn.ReLU] * 4
    assert activations(make((784,), 8, mlp_activation="silu")) == [nn.SiLU] * 4
    assert "mlp_activation='silu'" in repr(make((784,), 8, mlp_activation="silu"))


def test_loss_is_reconstruction_plus_beta_kl(reference_backend):
    torch.manual_seed(0)
    x = torch.rand(6, 1, 28, 28)
    for likelihood in ("bernoulli", "gaussian"):
        vae = VAE((1, 28, 28), 3, likelihood=likelihood, beta=2.5, hidden=(32,))
        torch.manual_seed(1)
        loss = vae.loss(x)
        torch.manual_seed(1)
        elbo = vae.elbo(x)
        mu, logvar = vae.encode(x)
        kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum(1)
        # loss = -(log p(x|z) - beta kl) and elbo = log p(x|z) - kl with the same z.
        assert rel_err(loss, -elbo + 1.5 * kl) < 1e-5
        torch.manual_seed(1)
        z, _ = F.reparameterize(mu, logvar)
        recon = vae.decode(z)
        if likelihood == "bernoulli":
            log_px = -torch.nn.functional.binary_cross_entropy_with_logits(recon, x, reduction="none").sum((1, 2, 3))
        else:
            log_px = torch.distributions.Normal(recon, vae.log_sigma.exp()).log_prob(x).sum((1, 2, 3))
        assert rel_err(elbo, log_px - kl) < 1e-5


def test_autoencoder_gaussian_loss_is_unit_variance_nll(reference_backend):
    ae = AutoEncoder((12,), 3, likelihood="gaussian", hidden=(16,))
    x = torch.randn(5, 12)
    want = -torch.distributions.Normal(ae(x), 1.0).log_prob(x).sum(1)
    assert rel_err(ae.loss(x), want) < 1e-6


# ----------------------------------------------------------------------------------------------
# Training and bounds


def test_vae_training_lowers_the_loss(trained_vae):
    _, _, before, after = trained_vae
    assert after < 0.6 * before


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_autoencoder_training_lowers_the_loss(arch, likelihood, reference_backend):
    torch.manual_seed(0)
    if arch == "mlp":
        data, shape = _toy_binary_data(256, 16), (16,)
    else:  # 8x8 images: bright squares at random places
        data, shape = torch.zeros(256, 1, 8, 8), (1, 8, 8)
        corners = torch.randint(0, 5, (256, 2))
        for img, (r, c) in zip(data, corners.tolist()):
            img[0, r:r + 4, c:c + 4] = 1.0
    ae = AutoEncoder(shape, 4, arch=arch, likelihood=likelihood, hidden=(32,) if arch == "mlp" else (8, 16))
    before, after = _train(ae, data, steps=200, lr=1e-2)
    drop = before - after
    assert drop > 0.3 * abs(before) if likelihood == "bernoulli" else drop > 1.0


def test_gaussian_vae_learns_sigma(reference_backend):
    torch.manual_seed(0)
    latent = torch.randn(512, 2)
    data = latent @ torch.randn(2, 10) + 0.1 * torch.randn(512, 10)
    vae = VAE((10,), 2, likelihood="gaussian", hidden=(32,))
    before, after = _train(vae, data, steps=300, lr=1e-2)
    assert after < before - 5.0 and vae.log_sigma.exp().item() < 0.6


def test_bounds_are_ordered_on_a_trained_model(trained_vae, reference_backend):
    vae, data, _, _ = trained_vae
    x = data[:256]
    torch.manual_seed(2)
    with torch.no_grad():  # means over 256 inputs and several draws
        elbo = torch.stack([vae.elbo(x) for _ in range(20)]).mean().item()
        iwae = {k: torch.stack([vae.iwae_bound(x, k) for _ in range(reps)]).mean().item()
                for k, reps in [(1, 20), (10, 5)]}
    log_px = -torch.stack([vae.nll(x) for _ in range(3)]).mean().item()  # k = 100
    # E[iwae_1] = E[elbo]; the bound tightens with k and stays below log p(x) <= 0 (binary data).
    # Seen on three seeds: iwae_10 - elbo 0.25 .. 0.5, log p(x) estimate - iwae_10 0.08 .. 0.13.
    assert abs(iwae[1] - elbo) < 0.2
    assert elbo + 0.1 < iwae[10] < log_px - 0.02 < 0


def test_iwae_bound_increases_with_k_on_average(trained_vae, reference_backend):
    vae, data, _, _ = trained_vae
    x = data[:128]
    torch.manual_seed(3)
    with torch.no_grad():
        means = [torch.stack([vae.iwae_bound(x, k) for _ in range(10)]).mean().item() for k in (1, 5, 50)]
    assert means[0] < means[1] < means[2]


def test_nll_chunking_does_not_change_the_estimate(trained_vae, reference_backend):
    vae, data, _, _ = trained_vae
    x = data[:50]
    torch.manual_seed(4)
    whole = torch.stack([vae.nll(x, k=40) for _ in range(5)]).mean()
    torch.manual_seed(5)
    chunked = torch.stack([vae.nll(x, k=40, max_batch=60) for _ in range(5)]).mean()  # one sample per chunk
    assert abs(whole - chunked) < 0.1
    assert not vae.nll(x, k=3).requires_grad


def test_iwae_bound_trains_through_its_gradient(reference_backend):
    torch.manual_seed(0)
    data = _toy_binary_data(256, 16)
    vae = VAE((16,), 3, hidden=(32,))
    opt = torch.optim.Adam(vae.parameters(), lr=1e-2)
    first = -vae.iwae_bound(data, 5).mean().item()
    for _ in range(100):
        loss = -vae.iwae_bound(data[torch.randint(256, (64,))], 5).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert -vae.iwae_bound(data, 5).mean().item() < 0.8 * first


# ----------------------------------------------------------------------------------------------
# The fused path


def test_models_run_through_the_triton_kernels(device, monkeypatch):
    from fastgen.kernels import reparam as kernels

    launches = []
    sampler = kernels.reparameterize_forward
    monkeypatch.setattr(kernels, "reparameterize_forward",
                        lambda *args: launches.append(1) or sampler(*args))
    torch.manual_seed(0)
    x = (torch.rand(6, 1, 8, 8) < 0.5).float().to(device)
    vae = VAE((1, 8, 8), 3, arch="conv", hidden=(4,)).to(device)
    ae = AutoEncoder((1, 8, 8), 3, hidden=(16,)).to(device)
    with fastgen.use_backend("triton"):
        loss = vae.loss(x)
        assert launches, "the VAE's sampler ran the fused kernel"
        loss.mean().backward()
        iwae = vae.iwae_bound(x, 4, max_batch=12)
        ae_fused = ae.loss(x)
    grads = [p.grad for p in vae.parameters() if p.requires_grad]
    assert torch.isfinite(loss).all() and torch.isfinite(iwae).all()
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    with fastgen.use_backend("reference"):
        assert rel_err(ae_fused, ae.loss(x)) < 1e-5  # deterministic: both paths agree exactly


# ----------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("make, error, words", [
    (lambda: AutoEncoder((1, 28), 8), ValueError, ["input_shape"]),
    (lambda: AutoEncoder((784,), 8, arch="conv"), ValueError, ["arch", "conv"]),
    (lambda: AutoEncoder((784,), 8, arch="resnet"), ValueError, ["arch", "mlp"]),
    (lambda: AutoEncoder((784,), 0), ValueError, ["code_size"]),
    (lambda: AutoEncoder((784,), 8, likelihood="poisson"), ValueError, ["likelihood", "bernoulli"]),
    (lambda: AutoEncoder((1, 8, 8), 8, arch="conv", hidden=(4, 4, 4, 4)), ValueError, ["hidden", "8x8"]),
    (lambda: AutoEncoder((784,), 8, hidden=()), ValueError, ["hidden"]),
    (lambda: VAE((784,), 8, mlp_activation="gelu"), ValueError, ["mlp_activation", "relu, silu", "gelu"]),
    (lambda: VAE((784,), 8, beta=-1.0), ValueError, ["beta"]),
    (lambda: VAE((784,), 0), ValueError, ["latent_size"]),
    (lambda: VAE((4,), 2, hidden=(8,)).elbo(torch.rand(3, 5)), ValueError, ["x", "(B, 4)", "(3, 5)"]),
    (lambda: VAE((4,), 2, hidden=(8,)).iwae_bound(torch.rand(3, 4), 0), ValueError, ["k"]),
    (lambda: VAE((4,), 2, hidden=(8,)).decode(torch.rand(3, 3)), ValueError, ["z", "(B, 2)"]),
    (lambda: AutoEncoder((4,), 2, hidden=(8,)).loss(torch.ones(3, 4, dtype=torch.int64)), TypeError, ["x"]),
])
def test_bad_configuration_names_the_argument(make, error, words):
    with pytest.raises(error) as info:
        make()
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("k", [1, 7, 100])
def test_iwae_bound_with_equal_weights_is_that_weight(k, reference_backend):
    # q(z|x) = p(z) and a decoder that ignores z: every log weight is log p(x|z) exactly, and the
    # bound's -log k normalization must give it back for any k.
    vae = VAE((4,), 2, hidden=(8,))
    with torch.no_grad():
        for layer in (vae.encoder[-1], vae.decoder[-2]):
            layer.weight.zero_()
        vae.encoder[-1].bias.zero_()
    x = torch.rand(3, 4)
    want = vae.log_likelihood(vae.decoder[-2].bias.expand(3, 4), x)
    assert rel_err(vae.iwae_bound(x, k, max_batch=9), want) < 1e-6
