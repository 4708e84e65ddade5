"""fastgen.nn.ConvBNAct / ConvTransposeBNAct, from_torch and fuse: state_dict compatibility with
nn.Sequential(conv, bn, act), torch's BatchNorm bookkeeping, and converted models giving the
original numbers (Triton kernels through the CPU interpreter)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastgen
from fastgen.nn import ConvBNAct, ConvTransposeBNAct, from_torch, fuse
from tests.conftest import TOL

# Modules and models are built on the CPU here: these run the kernels through the interpreter.
# On a CUDA machine the kernels' own tests (tests/test_conv_bn_act.py) run compiled instead.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="interpreter tests of the modules; CUDA runs the kernel tests")


@pytest.fixture(autouse=True)
def triton_backend():
    with fastgen.use_backend("triton"):
        yield


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape and torch.isfinite(out).all()
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def randomize_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN parameters and running statistics (fresh modules have 1, 0, 0, 1)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g))
                if m.track_running_stats:
                    m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return module


def torch_twin(module: nn.Module) -> nn.Sequential:
    """An nn.Sequential of the same layers, loaded from ``module``'s state_dict."""
    conv = module[0]
    if isinstance(conv, nn.ConvTranspose2d):
        twin_conv = nn.ConvTranspose2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                                       conv.stride, conv.padding, conv.output_padding,
                                       bias=conv.bias is not None)
    else:
        twin_conv = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                              conv.padding, bias=conv.bias is not None)
    twin = nn.Sequential(twin_conv, *[copy.deepcopy(m) for m in list(module)[1:]])
    twin.load_state_dict(module.state_dict())
    return twin.train(module.training)


def assert_same_step(fused: nn.Module, twin: nn.Module, x: torch.Tensor) -> None:
    """Forward and backward of both agree: outputs, parameter gradients, buffers."""
    xf = x.clone().requires_grad_()
    xt = x.clone().requires_grad_()
    out_f, out_t = fused(xf), twin(xt)
    assert rel_err(out_f, out_t) < TOL
    grad = torch.randn_like(out_t)
    out_f.backward(grad)
    out_t.backward(grad)
    assert rel_err(xf.grad, xt.grad) < TOL
    for (name, p_f), (_, p_t) in zip(fused.named_parameters(), twin.named_parameters()):
        assert rel_err(p_f.grad, p_t.grad) < TOL, name
    for (name, b_f), (_, b_t) in zip(fused.named_buffers(), twin.named_buffers()):
        if b_f.is_floating_point():
            assert rel_err(b_f, b_t) < TOL, name
        else:
            assert torch.equal(b_f, b_t), name


KEYS = ["0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"]


@pytest.mark.parametrize("make", [
    lambda: ConvBNAct(3, 5, 3, 2, 1, activation="leaky_relu"),
    lambda: ConvTransposeBNAct(5, 3, 4, 2, 1, 1, activation="relu"),
    lambda: ConvBNAct(3, 5, (3, 1), 1, (1, 0), activation="tanh", momentum=None),
], ids=["conv", "conv_transpose", "momentum_none"])
def test_state_dict_and_training_steps_match_torch(make):
    torch.manual_seed(0)
    fused = randomize_bn(make())
    assert list(fused.state_dict()) == KEYS
    twin = torch_twin(fused)
    fused.load_state_dict(twin.state_dict())  # and back
    x = torch.randn(3, fused[0].in_channels, 5, 5)
    for _ in range(2):  # two steps: num_batches_tracked and the momentum=None average
        assert_same_step(fused, twin, x)
    assert fused[1].num_batches_tracked.item() == 2
    fused.eval()
    twin.eval()
    assert_same_step(fused, twin, x)
    assert fused[1].num_batches_tracked.item() == 2


def test_without_batch_norm_and_without_running_stats():
    torch.manual_seed(1)
    plain = ConvTransposeBNAct(4, 1, 4, 2, 1, batch_norm=False, activation="tanh")
    assert list(plain.state_dict()) == ["0.weight", "0.bias"]
    assert_same_step(plain, torch_twin(plain), torch.randn(2, 4, 3, 3))
    stateless = randomize_bn(ConvBNAct(3, 4, 3, padding=1, track_running_stats=False, affine=False))
    for mode in (True, False):  # without running stats eval mode uses batch statistics too
        stateless.train(mode).zero_grad(set_to_none=True)
        assert_same_step(stateless, torch_twin(stateless), torch.randn(2, 3, 4, 4))


def tiny_dcgan(nz: int = 8, width: int = 8) -> tuple[nn.Sequential, nn.Sequential]:
    """A 16x16, one-channel DCGAN built from torch layers, as users write it."""
    g = nn.Sequential(
        nn.ConvTranspose2d(nz, 2 * width, 4, 1, 0, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(True),
        nn.ConvTranspose2d(2 * width, width, 4, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(True),
        nn.ConvTranspose2d(width, 1, 4, 2, 1, bias=False), nn.Tanh())
    d = nn.Sequential(
        nn.Conv2d(1, width, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(width, 2 * width, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * width),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(2 * width, 1, 4, 1, 0, bias=False), nn.Flatten())
    for m in (*g.modules(), *d.modules()):
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
    return randomize_bn(g, 1), randomize_bn(d, 2)


def test_fuse_dcgan_gives_the_original_numbers():
    torch.manual_seed(2)
    g, d = tiny_dcgan()
    fused_g, fused_d = fuse(copy.deepcopy(g)), fuse(copy.deepcopy(d))
    assert [type(m) for m in fused_g] == [ConvTransposeBNAct] * 3
    assert [type(m) for m in fused_d] == [ConvBNAct, ConvBNAct, nn.Conv2d, nn.Flatten]
    z = torch.randn(3, 8, 1, 1)
    for train in (True, False):
        for model, twin in ((fused_g, g), (fused_d, d)):
            model.train(train)
            twin.train(train)
        fake_f, fake_t = fused_g(z), g(z)
        assert rel_err(fake_f, fake_t) < TOL
        score_f, score_t = fused_d(fake_f), d(fake_t)
        assert rel_err(score_f, score_t) < TOL
        score_f.sum().backward()
        score_t.sum().backward()
        # fuse shares the parameters: compare them in their original order
        for p_f, p_t in zip((*fused_g.parameters(), *fused_d.parameters()),
                            (*g.parameters(), *d.parameters())):
            assert rel_err(p_f.grad, p_t.grad) < 1e-4
            p_f.grad = p_t.grad = None
    for b_f, b_t in zip(fused_g.buffers(), g.buffers()):
        assert rel_err(b_f.double(), b_t.double()) < TOL


def test_from_torch_shares_parameters():
    conv, bn, act = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.LeakyReLU(0.1)
    fused = from_torch(conv, bn, act)
    assert isinstance(fused, ConvBNAct) and fused[0] is conv and fused[1] is bn
    assert (fused.activation, fused.negative_slope) == ("leaky_relu", pytest.approx(0.1))
    assert isinstance(from_torch(nn.ConvTranspose2d(3, 4, 3), None, nn.Sigmoid()), ConvTransposeBNAct)


def test_fuse_leaves_unsupported_runs():
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, groups=2, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, dilation=2, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.GELU(),  # conv bias before BN, unknown activation
        nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)))
    before = [type(m) for m in model]
    fuse(model)
    assert [type(m) for m in model] == before
    assert [type(m) for m in model[-1]] == [ConvBNAct]  # nested containers are fused too


@pytest.mark.parametrize("args, error, match", [
    ((nn.Conv2d(4, 4, 3, groups=2, bias=False), nn.BatchNorm2d(4)), NotImplementedError, "groups"),
    ((nn.Conv2d(4, 4, 3, dilation=2, bias=False), None), NotImplementedError, "dilation"),
    ((nn.Conv2d(4, 4, 3, padding="same", bias=False), None), NotImplementedError, "padding"),
    ((nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)), NotImplementedError, "bias before BatchNorm"),
    ((nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(4), nn.GELU()), NotImplementedError, "GELU"),
    ((nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(5)), ValueError, "expected 4 features"),
    ((nn.Linear(4, 4), None), TypeError, "takes an nn.Conv2d"),
    ((nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm1d(4)), TypeError, "BatchNorm2d"),
])
def test_from_torch_errors(args, error, match):
    with pytest.raises(error, match=match):
        from_torch(*args)


def test_conv_type_checked_and_bad_input_reaches_validation():
    with pytest.raises(TypeError, match="ConvTranspose2d"):
        ConvTransposeBNAct.from_torch(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="unknown|activation"):
        ConvBNAct(3, 4, 3, activation="gelu")
    layer = ConvBNAct(3, 4, 3)
    with pytest.raises(ValueError, match="x: expected a 4-d"):
        layer(torch.randn(3, 5, 5))
    with pytest.raises(ValueError, match="x: expected 3 channels"):
        layer(torch.randn(2, 4, 5, 5))


def test_reference_backend_is_torch():
    torch.manual_seed(3)
    fused = randomize_bn(ConvTransposeBNAct(4, 3, 3, 2, 1, 1, activation="sigmoid"))
    twin = torch_twin(fused)
    x = torch.randn(2, 4, 3, 3)
    with fastgen.use_backend("reference"):
        assert torch.equal(fused(x), twin(x))
    assert torch.equal(fused[1].running_mean, twin[1].running_mean)


def test_torch_compile_runs_the_fused_path_eagerly():
    """Under torch.compile the fused op is a graph break (not traced): same numbers as eager."""
    torch.manual_seed(4)
    layer = randomize_bn(ConvBNAct(3, 5, 3, 2, 1, activation="leaky_relu"))
    twin = copy.deepcopy(layer)
    x = torch.randn(2, 3, 6, 6)
    compiled = torch.compile(nn.Sequential(layer, nn.Tanh()), backend="aot_eager")
    assert_same_step(compiled, nn.Sequential(twin, nn.Tanh()), x)
