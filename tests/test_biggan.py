"""BigGAN-small: shapes, label checks, hierarchical latent, class-conditional BN, spectral norm,
orthogonal regularization, gradients, BN modes, EMA, and the fused path against the reference."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastgen
from fastgen.models.biggan import (BigGANDiscriminator, BigGANGenerator, ConditionalBatchNorm2d, _DownBlock,
                                   _UpBlock, orthogonal_regularization)
from fastgen.nn import convert_sync_batchnorm
from fastgen.train.trainer import EMA
from tests.test_gan_models import _assert_triton_matches_reference

pytestmark = pytest.mark.usefixtures("one_thread")

# Tiny models: 16x16 (two residual blocks in G and D), width 4, z of 6 = three chunks of 2.
TINY = dict(image_size=16, width=4)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _reference_backend():
    """The fused layers run on the PyTorch reference (the Triton interpreter is slow); the backend
    test switches to Triton inside (the innermost use_backend wins)."""
    with fastgen.use_backend("reference"):
        yield


def _tiny(num_classes=3, channels=1, spectral_norm=True):
    g = BigGANGenerator(6, num_classes, channels, embed_size=3, spectral_norm=spectral_norm, **TINY)
    d = BigGANDiscriminator(channels, num_classes=num_classes, spectral_norm=spectral_norm, **TINY)
    return g, d


def _num_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("image_size,channels", [(16, 1), (32, 3)])
def test_shapes_and_range(image_size, channels):
    g = BigGANGenerator(8, 4, channels, image_size, width=4, embed_size=3)
    d = BigGANDiscriminator(channels, image_size, width=4, num_classes=4)
    assert (g.latent_size, g.num_classes) == (8, 4)
    assert g.chunk_sizes == ([3, 3, 2] if image_size == 16 else [2, 2, 2, 2])
    labels = torch.tensor([0, 3, 1, 2, 1])
    x = g(torch.randn(5, 8), labels)
    assert x.shape == (5, channels, image_size, image_size) and x.dtype == torch.float32
    assert x.abs().max() <= 1.0  # tanh
    assert d.features(x).shape == (5, 4)
    assert d(x, labels).shape == (5,)


def test_documented_parameter_counts():
    """The sizes the module docstring states (S = 32, 1 channel, 10 classes, z 64, embedding 32)."""
    counts = {width: (_num_params(BigGANGenerator(width=width)), _num_params(BigGANDiscriminator(width=width)))
              for width in (16, 32, 64)}
    assert counts == {16: (28_753, 12_241), 32: (86_369, 48_033), 64: (289_153, 190_273)}


def test_argument_and_label_checks():
    g, d = _tiny()
    z, x, labels = torch.randn(2, 6), torch.randn(2, 1, 16, 16), torch.tensor([0, 2])
    for bad in (None, labels.float(), torch.tensor([0, 1, 2]), torch.tensor([[0], [1]])):
        with pytest.raises(ValueError, match="labels"):
            g(z, bad)
        with pytest.raises(ValueError, match="labels"):
            d(x, bad)
    with pytest.raises(ValueError, match="z"):
        g(torch.randn(2, 5), labels)
    with pytest.raises(ValueError, match="num_classes"):
        BigGANGenerator(num_classes=0)
    with pytest.raises(ValueError, match="num_classes"):
        BigGANDiscriminator(num_classes=0)
    with pytest.raises(ValueError, match="latent_size"):
        BigGANGenerator(3, image_size=32)  # 4 chunks needed
    for bad in (28, 8):
        with pytest.raises(ValueError, match="image_size"):
            BigGANGenerator(image_size=bad)
        with pytest.raises(ValueError, match="image_size"):
            BigGANDiscriminator(image_size=bad)
    with pytest.raises(ValueError, match="width"):
        BigGANDiscriminator(width=0)
    with pytest.raises(ValueError, match="cond"):
        ConditionalBatchNorm2d(4, 5)(torch.randn(2, 4, 3, 3), torch.randn(2, 4))


def test_hierarchical_latent():
    """z_0 reaches the input layer only, chunk i + 1 (next to the class embedding) block i's
    condition only; changing any one chunk changes the image."""
    g, _ = _tiny()
    g.eval()
    z, labels = torch.randn(2, 6), torch.tensor([1, 2])
    seen = {}
    g.linear.register_forward_pre_hook(lambda m, args: seen.__setitem__("linear", args[0]))
    for i, block in enumerate(g.blocks):
        block.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[1]))
    out = g(z, labels)
    y = g.embed(labels)
    torch.testing.assert_close(seen["linear"], z[:, :2])
    for i in range(2):
        torch.testing.assert_close(seen[i], torch.cat([y, z[:, 2 * i + 2:2 * i + 4]], dim=1))
    for start in (0, 2, 4):
        changed = z.clone()
        changed[:, start:start + 2] = torch.randn(2, 2)
        assert (g(changed, labels) - out).abs().amax(dim=(1, 2, 3)).min() > 1e-4, start


def test_class_conditioning():
    """One z, every label: every image differs, in eval mode (running statistics) and in training
    mode, where the whole batch shares its BN statistics and only the per-sample affine tells the
    samples apart."""
    g, d = _tiny(num_classes=4)
    z, labels = torch.randn(1, 6).expand(4, 6), torch.arange(4)
    for mode in (True, False):
        x = g.train(mode)(z, labels)
        assert torch.cdist(x.flatten(1), x.flatten(1)).add(torch.eye(4)).min() > 1e-3, mode
    logits = d(torch.randn(1, 1, 16, 16).expand(4, 1, 16, 16), labels)
    assert logits.unique().numel() == 4


def test_conditional_batchnorm_formula():
    """relu(BN without affine(x) * (1 + W_gamma c) + W_beta c), the running statistics as
    nn.BatchNorm2d updates them, in training and eval mode."""
    cbn = ConditionalBatchNorm2d(3, 5, spectral_norm=False, momentum=0.3)
    torch_bn = nn.BatchNorm2d(3, momentum=0.3, affine=False)
    x, c = torch.randn(4, 3, 5, 2) * 2 + 1, torch.randn(4, 5)
    gamma, beta = 1 + c @ cbn.scale.weight.T, c @ cbn.shift.weight.T
    # Its BN is one that convert_sync_batchnorm synchronizes; without a process group, as before.
    assert convert_sync_batchnorm(cbn) is cbn and cbn.bn.sync_bn
    for training in (True, False):
        cbn.train(training), torch_bn.train(training)
        expected = F.relu(torch_bn(x) * gamma[:, :, None, None] + beta[:, :, None, None])
        torch.testing.assert_close(cbn(x, c), expected)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(cbn.bn, name), getattr(torch_bn, name))
    assert not cbn.bn.affine and cbn.bn.num_batches_tracked == 1


def test_spectral_norm_on_g_and_d():
    """Every conv and linear weight of G and D (D's embedding too, G's shared embedding not) is
    spectrally normalized: after power iterations its largest singular value is 1."""
    g, d = _tiny()
    for model in (g, d):
        layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        assert len(layers) == (16 if model is g else 6)
        assert all(nn.utils.parametrize.is_parametrized(m, "weight") for m in layers)
    assert nn.utils.parametrize.is_parametrized(d.embed, "weight")
    assert not nn.utils.parametrize.is_parametrized(g.embed, "weight")
    z, x, labels = torch.randn(3, 6), torch.randn(3, 1, 16, 16), torch.tensor([0, 1, 2])
    for _ in range(30):  # power iterations run in training mode
        g(z, labels), d(x, labels)
    for layer in (g.blocks[1].conv1[0], g.blocks[0].bn2.scale, d.blocks[0].skip[0], d.embed):
        sigma = torch.linalg.matrix_norm(layer.weight.detach().flatten(1), ord=2).item()
        assert sigma == pytest.approx(1.0, rel=0.05)
    plain, _ = _tiny(spectral_norm=False)
    assert not any(nn.utils.parametrize.is_parametrized(m) for m in plain.modules())


def test_fresh_models_are_normalized_in_eval_mode():
    """Without a training step (eval mode runs no power iteration: sampling an untrained model,
    the EMA copy), every normalized weight of freshly built G and D already has sigma 1: the
    orthogonal initialization leaves no stale power-iteration vectors."""
    for model in _tiny():
        model.eval()
        layers = [m for m in model.modules() if nn.utils.parametrize.is_parametrized(m, "weight")]
        assert layers
        for layer in layers:
            sigma = torch.linalg.matrix_norm(layer.weight.detach().flatten(1), ord=2).item()
            assert sigma == pytest.approx(1.0, rel=1e-3), layer


def test_orthogonal_regularization_known_answers():
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    layer = nn.Linear(5, 3, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(2 * q[:3])  # orthogonal rows of norm 2: only the norms differ from I
    assert orthogonal_regularization(layer, beta=1.0).item() == pytest.approx(0.0, abs=1e-12)
    # W W^T = [[5, 11], [11, 25]] for W = [[1, 2], [3, 4]]: off-diagonal 11 twice, R = 2 * 11^2 = 242.
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    conv = nn.Conv2d(1, 2, (1, 2), dtype=torch.float64)  # weight (2, 1, 1, 2): W as (out, in * kH * kW)
    with torch.no_grad():
        conv.weight.copy_(w.view(2, 1, 1, 2))
    model = nn.Sequential(layer, nn.Embedding(4, 3), conv)  # the embedding does not count
    r = orthogonal_regularization(model, beta=0.5)
    torch.testing.assert_close(r, torch.tensor(121.0, dtype=torch.float64))
    # Under spectral norm the raw weight is penalized, and its gradient is 4 beta (W W^T * (1 - I)) W.
    nn.utils.parametrizations.spectral_norm(conv)
    r = orthogonal_regularization(model, beta=0.5)
    torch.testing.assert_close(r, torch.tensor(121.0, dtype=torch.float64))
    r.backward()
    off_diagonal = torch.tensor([[0.0, 11.0], [11.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(conv.parametrizations.weight.original.grad.view(2, 2), 2 * off_diagonal @ w)
    assert orthogonal_regularization(nn.ReLU()).item() == 0.0
    for bad in (-1.0, float("nan"), True):
        with pytest.raises(ValueError, match="beta"):
            orthogonal_regularization(layer, bad)
    with pytest.raises(TypeError, match="module"):
        orthogonal_regularization(w)


def test_gradients_reach_every_parameter():
    """One G and D step: every parameter (the shared embedding, the conditional BNs' linear maps,
    D's projection embedding, the raw weights under spectral norm) gets a finite, non-zero gradient;
    so does the orthogonal regularization of every conv and linear weight."""
    g, d = _tiny()
    labels = torch.tensor([0, 1, 2, 1])
    x = g(torch.randn(4, 6), labels)
    (d(x, labels).sum() + d(torch.randn(4, 1, 16, 16), labels).sum()).backward()
    for model in (g, d):
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    g.zero_grad()
    with torch.no_grad():  # off the orthogonal initialization, where the regularization's gradient is ~0
        for p in g.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    orthogonal_regularization(g).backward()
    # Every conv and linear weight but the 1-channel output conv's (one filter: nothing to decorrelate).
    conv_and_linear = [name for name, p in g.named_parameters()
                       if p.dim() > 1 and p.shape[0] > 1 and "embed" not in name]
    assert len(conv_and_linear) == 15
    for name, p in g.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (name in conv_and_linear), name


def test_eval_is_deterministic_and_train_mode_uses_batch_statistics():
    g, d = _tiny()
    z, labels, x = torch.randn(4, 6), torch.tensor([0, 1, 2, 0]), torch.randn(4, 1, 16, 16)
    g(z, labels)  # one training step moves the running statistics off their initial values
    g.eval(), d.eval()
    state = copy.deepcopy(g.state_dict())
    torch.testing.assert_close(g(z, labels), g(z, labels), rtol=0, atol=0)
    torch.testing.assert_close(d(x, labels), d(x, labels), rtol=0, atol=0)
    # In eval mode an image depends on its own z and label only.
    torch.testing.assert_close(g(z[:2], labels[:2]), g(z, labels)[:2])
    for key, value in g.state_dict().items():  # eval mode updates no buffer (BN, spectral norm)
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)
    # In training mode BN normalizes with the batch's statistics: the rest of the batch matters.
    g.train()
    assert not torch.allclose(g(z[:2], labels[:2]), g(z, labels)[:2], atol=1e-4)
    assert not torch.equal(g.blocks[0].bn1.bn.running_mean, state["blocks.0.bn1.bn.running_mean"])


def test_ema_copy_of_the_generator():
    """The trainer's EMA pairs G's parameters and buffers with a deep copy's: decay 0 copies G,
    and the average of two generators interpolates their parameters and copies their buffers
    (BN statistics, spectral norm's power-iteration vectors)."""
    g, _ = _tiny()
    z, labels = torch.randn(3, 6), torch.tensor([2, 0, 1])
    g(z, labels)
    average = copy.deepcopy(g).eval().requires_grad_(False)
    with torch.no_grad():
        for p in g.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    g(z, labels)
    ema = EMA(average, g)
    ema.update(0.0)
    torch.testing.assert_close(average(z, labels), g.eval()(z, labels), rtol=0, atol=0)
    before = {k: v.clone() for k, v in average.state_dict().items()}
    with torch.no_grad():
        for p in g.parameters():
            p.add_(1.0)
    ema.update(0.75)
    parameters = dict(g.named_parameters())
    for key, value in average.state_dict().items():
        live = g.state_dict()[key]
        expected = 0.75 * before[key] + 0.25 * live if key in parameters else live
        torch.testing.assert_close(value, expected, msg=key)


def test_triton_backend_matches_the_reference(device, monkeypatch):
    """The residual blocks on the fused path against the reference: an up-block (two class-conditional
    bn_act with per-sample gamma and beta, 3x3 and 1x1 convs) and a pre-activation down-block (conv with
    its fused ReLU, 3x3 and 1x1 convs), with spectral norm. Outputs in training and eval mode, input
    and parameter gradients, BN and spectral-norm buffers. Blocks, not whole models: the models add
    only plain PyTorch around them (embedding, linear layers, split, pooling, projection), and whole
    models take minutes in the interpreter."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    up = _UpBlock(2, 3, cond_size=4, spectral_norm=True).to(device)
    cond = torch.randn(3, 4, device=device)
    _assert_triton_matches_reference(up, lambda m, x: m(x, cond), torch.randn(3, 2, 4, 4, device=device))
    down = _DownBlock(2, 3, downsample=True, preactivation=True, spectral_norm=True).to(device)
    _assert_triton_matches_reference(down, lambda m, x: m(x), torch.randn(3, 2, 8, 8, device=device))
