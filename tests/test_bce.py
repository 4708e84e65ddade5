"""The fused BCE / GAN loss kernels (kernels/bce.py) against the float64 reference.

Every check forces the Triton path (the CPU interpreter here, the GPU compiler on CUDA).
"""

import pytest
import torch

import fastgen
from fastgen import functional as F
from fastgen import reference as R
from tests.conftest import rel_err

FP32_TOL = 1e-5
SIZES = [1, 7, 1000, 4097, 100_000]
PER_SAMPLE_SHAPES = [(1, 1), (7, 1), (8, 125), (17, 241), (4, 3, 50, 167)]


@pytest.fixture(autouse=True)
def triton_on_device(device):
    # Factory calls without device= land on `device`: the GPU when there is one.
    with fastgen.use_backend("triton"), device:
        yield


def _grads(out, inputs, grad_output):
    return torch.autograd.grad(out, inputs, grad_output)


def _check_bce(shape, reduction, *, target_grad=True, logits_scale=3.0):
    logits = (torch.randn(shape) * logits_scale).requires_grad_()
    target = torch.rand(shape).requires_grad_(target_grad)
    out = F.bce_with_logits(logits, target, reduction=reduction)
    ref = R.bce_with_logits(logits.double(), target.double(), reduction=reduction)
    assert out.dtype == logits.dtype and out.shape == ref.shape
    assert rel_err(out, ref) < FP32_TOL
    grad_output = torch.randn_like(out)  # != 1 on purpose
    inputs = (logits, target) if target_grad else (logits,)
    for got, want in zip(_grads(out, inputs, grad_output), _grads(ref, inputs, grad_output.double())):
        assert rel_err(got, want) < FP32_TOL


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_bce_matches_reference(size, reduction, nan_poison):
    _check_bce((size,), reduction, target_grad=size < 5000)


@pytest.mark.parametrize("shape", PER_SAMPLE_SHAPES)
def test_bce_per_sample_matches_reference(shape, nan_poison):
    _check_bce(shape, "per_sample")


@pytest.mark.parametrize("reduction", ["none", "mean", "sum", "per_sample"])
def test_bce_extreme_logits_are_finite_and_exact(reduction):
    logits = torch.tensor([[1e4, -1e4, 100.0, -100.0, 20.0, -20.0, 0.0, 1e-3]] * 3).requires_grad_()
    target = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.25], [0.5, 0.5, 1.0]]).repeat_interleave(3, 1)[:, :8]
    out = F.bce_with_logits(logits, target, reduction=reduction)
    ref = R.bce_with_logits(logits.double(), target.double(), reduction=reduction)
    (grad,) = torch.autograd.grad(out.sum(), logits)
    (ref_grad,) = torch.autograd.grad(ref.sum(), logits)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert rel_err(out, ref) < FP32_TOL and rel_err(grad, ref_grad) < FP32_TOL


def test_bce_tiny_losses_keep_relative_precision():
    # softplus(-30) = 9.4e-14: log(1 + e) would round it to 0; the kernel's log1p must not.
    logits = torch.full((64,), -30.0)
    out = F.bce_with_logits(logits, torch.zeros(64), reduction="none")
    ref = R.bce_with_logits(logits.double(), torch.zeros(64, dtype=torch.float64), reduction="none")
    assert rel_err(out, ref) < FP32_TOL


def _logits_over_the_range() -> torch.Tensor:
    """Logits covering [-1e4, 1e4]: a uniform grid, log-spaced magnitudes of both signs and the
    values where sigmoid(x) - 1 loses its digits in fp32 (15, 17, ...)."""
    magnitudes = torch.logspace(-3, 4, 701)
    special = torch.tensor([15.0, 17.0, 20.0, 30.0, 50.0, 80.0, 87.0, 88.0, 100.0, 1e4])
    grid = torch.linspace(-1e4, 1e4, 4001)
    return torch.cat([grid, magnitudes, -magnitudes, special, -special, torch.zeros(1)])


def _assert_exact_gradient(got, x, t, weight=1.0):
    """Per element: got = weight * ((1 - t) sigmoid(x) - t sigmoid(-x)) to 1e-5 relative to the
    magnitude of the two terms (which is the value itself whenever t is 0 or 1), wherever that
    magnitude is a normal fp32 number."""
    x, t = x.detach().double(), torch.as_tensor(t, dtype=torch.float64)
    pos, neg = weight * (1 - t) * torch.sigmoid(x), weight * t * torch.sigmoid(-x)
    err = (got.double() - (pos - neg)).abs()
    bound = FP32_TOL * (pos.abs() + neg.abs()) + torch.finfo(torch.float32).tiny
    worst = (err / bound).argmax()
    assert (err <= bound).all(), (f"logit {x.flatten()[worst].item()}: got {got.flatten()[worst].item()}, "
                                  f"exact {(pos - neg).flatten()[worst].item()}")


@pytest.mark.parametrize("target", ["zeros", "ones", "smoothed", "random"])
def test_bce_gradient_keeps_relative_precision_at_any_logit(target):
    # sigmoid(x) - 1 would give -3.58e-7 at x = 15 (exact -3.06e-7) and 0 from 17 up (exact -4.1e-8).
    logits = _logits_over_the_range().requires_grad_()
    t = {"zeros": torch.zeros_like(logits), "ones": torch.ones_like(logits),
         "smoothed": torch.full_like(logits, 0.9), "random": torch.rand_like(logits)}[target]
    (grad,) = torch.autograd.grad(F.bce_with_logits(logits, t, reduction="sum"), logits)
    _assert_exact_gradient(grad, logits, t)


def test_gan_gradients_keep_relative_precision_at_any_logit():
    logits = _logits_over_the_range().requires_grad_()
    n = logits.numel()
    (grad,) = torch.autograd.grad(F.gan_g_loss(logits).loss, logits)
    _assert_exact_gradient(grad, logits, 1.0, weight=1.0 / n)
    (grad,) = torch.autograd.grad(F.gan_g_loss(logits, saturating=True).loss, logits)
    _assert_exact_gradient(grad, logits, 0.0, weight=-1.0 / n)
    fake = logits.detach()[::2].clone().requires_grad_()
    real_grad, fake_grad = torch.autograd.grad(F.gan_d_loss(logits, fake, label_smoothing=0.1).loss, (logits, fake))
    _assert_exact_gradient(real_grad, logits, 0.9, weight=1.0 / n)
    _assert_exact_gradient(fake_grad, fake, 0.0, weight=1.0 / fake.numel())


@pytest.mark.parametrize("layout", ["channels_last", "transposed_view", "target_other_layout"])
def test_bce_accepts_any_layout(layout):
    logits = torch.randn(3, 5, 6, 7)
    target = torch.rand(3, 5, 6, 7)
    if layout == "channels_last":
        logits = logits.to(memory_format=torch.channels_last)
        target = target.to(memory_format=torch.channels_last)
    elif layout == "transposed_view":
        logits = logits.transpose(1, 3)
        target = target.transpose(1, 3)
    else:
        logits = logits.to(memory_format=torch.channels_last)
    logits.requires_grad_()
    for reduction in ["none", "per_sample", "mean"]:
        out = F.bce_with_logits(logits, target, reduction=reduction)
        ref = R.bce_with_logits(logits.double(), target.double(), reduction=reduction)
        assert rel_err(out, ref) < FP32_TOL
        go = torch.randn_like(out)
        assert rel_err(_grads(out, logits, go)[0], _grads(ref, logits, go.double())[0]) < FP32_TOL


def test_bce_target_in_another_dtype():
    logits = torch.randn(4, 9, requires_grad=True)
    target = torch.rand(4, 9, dtype=torch.float64, requires_grad=True)
    out = F.bce_with_logits(logits, target, reduction="per_sample")
    ref = R.bce_with_logits(logits.double(), target, reduction="per_sample")
    assert out.dtype == torch.float32 and rel_err(out, ref) < FP32_TOL
    grads = _grads(out.sum(), (logits, target), None)
    assert grads[1].dtype == torch.float64
    for got, want in zip(grads, _grads(ref.sum(), (logits, target), None)):
        assert rel_err(got, want) < FP32_TOL


def test_bce_float16_within_half_tolerance():
    logits = torch.randn(3000).half().requires_grad_()
    target = torch.rand(3000).half()
    out = F.bce_with_logits(logits, target, reduction="mean")
    ref = R.bce_with_logits(logits.double(), target.double(), reduction="mean")
    assert out.dtype == torch.float16 and rel_err(out, ref) < 1e-2
    (grad,) = torch.autograd.grad(out, logits)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    assert grad.dtype == torch.float16 and rel_err(grad, ref_grad) < 1e-2


def test_bce_never_writes_its_inputs_and_is_deterministic():
    logits = torch.randn(5, 999, requires_grad=True)
    target = torch.rand(5, 999)
    saved = logits.detach().clone(), target.clone()
    versions = logits._version, target._version
    first = F.bce_with_logits(logits, target, reduction="mean")
    (first_grad,) = torch.autograd.grad(first, logits)
    second = F.bce_with_logits(logits, target, reduction="mean")
    (second_grad,) = torch.autograd.grad(second, logits)
    assert torch.equal(first, second) and torch.equal(first_grad, second_grad)
    assert torch.equal(logits.detach(), saved[0]) and torch.equal(target, saved[1])
    assert (logits._version, target._version) == versions


def test_bce_backward_twice_with_retain_graph():
    logits = torch.randn(6, 10, requires_grad=True)
    loss = F.bce_with_logits(logits, torch.rand(6, 10), reduction="sum")
    loss.backward(retain_graph=True)
    first = logits.grad.clone()
    loss.backward()
    assert torch.allclose(logits.grad, 2 * first)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum", "per_sample"])
def test_bce_gradcheck_float64(reduction):
    logits = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    target = torch.rand(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, t: F.bce_with_logits(x, t, reduction=reduction), (logits, target))


# ----------------------------------------------------------------------------------------------
# GAN losses


@pytest.mark.parametrize("n_real, n_fake", [(1, 1), (7, 7), (1000, 1000), (4097, 33), (100_000, 100_000)])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_gan_d_loss_matches_reference(n_real, n_fake, label_smoothing, nan_poison):
    real = (torch.randn(n_real, 1) * 3).requires_grad_()
    fake = (torch.randn(n_fake) * 3).requires_grad_()
    out = F.gan_d_loss(real, fake, label_smoothing=label_smoothing)
    ref = R.gan_d_loss(real.double(), fake.double(), label_smoothing=label_smoothing)
    assert out.loss.dtype == torch.float32 and out.loss.shape == ()
    assert rel_err(out.loss, ref.loss) < FP32_TOL
    assert abs(out.d_real.item() - ref.d_real.item()) < 1e-6
    assert abs(out.d_fake.item() - ref.d_fake.item()) < 1e-6
    assert not out.d_real.requires_grad and not out.d_fake.requires_grad
    grad_output = torch.tensor(-2.5)
    got = _grads(out.loss, (real, fake), grad_output)
    want = _grads(ref.loss, (real, fake), grad_output.double())
    assert got[0].shape == real.shape and got[1].shape == fake.shape
    for g, w in zip(got, want):
        assert rel_err(g, w) < FP32_TOL


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("saturating", [False, True])
def test_gan_g_loss_matches_reference(size, saturating, nan_poison):
    fake = (torch.randn(size) * 3).requires_grad_()
    out = F.gan_g_loss(fake, saturating=saturating)
    ref = R.gan_g_loss(fake.double(), saturating=saturating)
    assert rel_err(out.loss, ref.loss) < FP32_TOL
    assert abs(out.d_fake.item() - ref.d_fake.item()) < 1e-6
    grad_output = torch.tensor(0.75)
    (got,) = _grads(out.loss, fake, grad_output)
    (want,) = _grads(ref.loss, fake, grad_output.double())
    assert rel_err(got, want) < FP32_TOL


def test_gan_losses_extreme_logits():
    real = torch.tensor([1e4, -1e4, 50.0, -50.0], requires_grad=True)
    fake = torch.tensor([-1e4, 1e4, 0.0], requires_grad=True)
    d = F.gan_d_loss(real, fake, label_smoothing=0.1)
    g_sat = F.gan_g_loss(fake, saturating=True)
    g_ns = F.gan_g_loss(fake)
    for out, ref in [(d.loss, R.gan_d_loss(real.double(), fake.double(), label_smoothing=0.1).loss),
                     (g_sat.loss, R.gan_g_loss(fake.double(), saturating=True).loss),
                     (g_ns.loss, R.gan_g_loss(fake.double()).loss)]:
        assert torch.isfinite(out) and rel_err(out, ref) < FP32_TOL
        grads = torch.autograd.grad(out, (real, fake), allow_unused=True)
        assert all(torch.isfinite(g).all() for g in grads if g is not None)


def test_float64_runs_at_float64_precision():
    # Targets and weights reach the kernels as float64 scalars: as float32 they would round
    # 1 - 0.1 and 1/N and cost float64 inputs 8 digits.
    real = torch.randn(7, dtype=torch.float64, requires_grad=True)
    fake = torch.randn(6, dtype=torch.float64, requires_grad=True)
    target = torch.rand(7, dtype=torch.float64)
    for fused, ref in [(lambda r, f: F.gan_d_loss(r, f, label_smoothing=0.1).loss,
                        lambda r, f: R.gan_d_loss(r, f, label_smoothing=0.1).loss),
                       (lambda r, f: F.gan_g_loss(f, saturating=True).loss + F.gan_g_loss(f).loss,
                        lambda r, f: R.gan_g_loss(f, saturating=True).loss + R.gan_g_loss(f).loss),
                       (lambda r, f: F.bce_with_logits(r, target), lambda r, f: R.bce_with_logits(r, target))]:
        out, want = fused(real, fake), ref(real, fake)
        assert rel_err(out, want) < 1e-13
        for got, exact in zip(torch.autograd.grad(out, (real, fake), allow_unused=True),
                              torch.autograd.grad(want, (real, fake), allow_unused=True)):
            assert (got is None) == (exact is None) and (got is None or rel_err(got, exact) < 1e-13)


def test_gan_losses_gradcheck_float64():
    real = torch.randn(5, dtype=torch.float64, requires_grad=True)
    fake = torch.randn(3, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r, f: F.gan_d_loss(r, f, label_smoothing=0.2).loss, (real, fake))
    for saturating in (False, True):
        assert torch.autograd.gradcheck(lambda f: F.gan_g_loss(f, saturating=saturating).loss, (fake,))


def _launch_grids(monkeypatch, kernel_name):
    """Record the grid of every launch of kernels/bce.py's ``kernel_name``."""
    from fastgen.kernels import bce

    grids = []
    original = getattr(bce, kernel_name)

    class Recording:
        def __getitem__(self, grid):
            grids.append(grid)
            return original[grid]

    monkeypatch.setattr(bce, kernel_name, Recording())
    return grids


def test_gan_loss_forward_spreads_patchgan_logits_over_programs(monkeypatch):
    # 256 x 1 x 30 x 30 PatchGAN logits per input: one program per GAN_BLOCK logits of each.
    from fastgen.kernels import bce

    grids = _launch_grids(monkeypatch, "_gan_loss_fwd_kernel")
    F.gan_d_loss(torch.randn(256, 1, 30, 30), torch.randn(256, 1, 30, 30))
    F.gan_g_loss(torch.randn(256, 1, 30, 30))
    per_input = -(-256 * 900 // bce.GAN_BLOCK)
    assert grids == [(2 * per_input,), (per_input,)]


@pytest.mark.parametrize("n_real, n_fake", [(1, 1), (1000, 1), (1, 1000), (230_401, 1000), (1000, 230_401)])
def test_gan_losses_split_over_programs_match_reference_and_repeat_bit_for_bit(n_real, n_fake):
    real = (torch.randn(n_real) * 4).requires_grad_()
    fake = (torch.randn(n_fake) * 4).requires_grad_()

    def run():
        d = F.gan_d_loss(real, fake, label_smoothing=0.1)
        g = F.gan_g_loss(fake)
        grads = torch.autograd.grad(d.loss + g.loss, (real, fake))
        return (d.loss, d.d_real, d.d_fake, g.loss, g.d_fake, *grads)

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    real64, fake64 = real.detach().double().requires_grad_(), fake.detach().double().requires_grad_()
    d_ref = R.gan_d_loss(real64, fake64, label_smoothing=0.1)
    g_ref = R.gan_g_loss(fake64)
    ref_grads = torch.autograd.grad(d_ref.loss + g_ref.loss, (real64, fake64))
    for got, want in zip(first, (d_ref.loss, d_ref.d_real, d_ref.d_fake, g_ref.loss, g_ref.d_fake, *ref_grads)):
        assert rel_err(got, want) < FP32_TOL


def test_modules_use_the_fused_ops():
    real, fake = torch.randn(9, requires_grad=True), torch.randn(9, requires_grad=True)
    for kind, saturating in [("minimax", True), ("non_saturating", False)]:
        loss = fastgen.nn.GANLoss(kind, label_smoothing=0.2)
        assert torch.equal(loss.d_loss(real, fake).loss, F.gan_d_loss(real, fake, label_smoothing=0.2).loss)
        assert torch.equal(loss.g_loss(fake).loss, F.gan_g_loss(fake, saturating=saturating).loss)
    logits, target = torch.randn(4, 6), torch.rand(4, 6)
    module = fastgen.nn.BCEWithLogits("per_sample")
    assert torch.equal(module(logits, target), F.bce_with_logits(logits, target, reduction="per_sample"))
    assert "per_sample" in repr(module) and "minimax" in repr(fastgen.nn.GANLoss("minimax"))


# ----------------------------------------------------------------------------------------------
# Bad input: each error names the argument


@pytest.mark.parametrize("call, error, words", [
    (lambda: F.bce_with_logits(torch.randn(4, 3), torch.rand(4, 2)), ValueError, ["target", "(4, 3)"]),
    (lambda: F.bce_with_logits(torch.randn(4), torch.rand(4), reduction="avg"), ValueError,
     ["reduction", "per_sample", "'avg'"]),
    (lambda: F.bce_with_logits(torch.randint(0, 2, (4,)), torch.rand(4)), TypeError, ["logits", "int64"]),
    (lambda: F.bce_with_logits(torch.randn(4), torch.ones(4, dtype=torch.int32)), TypeError, ["target"]),
    (lambda: F.bce_with_logits(torch.randn(0), torch.rand(0)), ValueError, ["logits", "non-empty"]),
    (lambda: F.bce_with_logits(torch.randn(4), torch.rand(4, device="meta")), ValueError,
     ["logits on", "target on meta"]),
    (lambda: F.bce_with_logits(torch.tensor(1.0), torch.tensor(1.0), reduction="per_sample"), ValueError,
     ["logits", "batch dimension"]),
    (lambda: F.bce_with_logits([0.5], torch.rand(1)), TypeError, ["logits", "list"]),
    (lambda: F.gan_d_loss(torch.randn(4), torch.randn(4).double()), TypeError, ["real_logits", "fake_logits"]),
    (lambda: F.gan_d_loss(torch.randn(4), torch.randn(0)), ValueError, ["fake_logits", "non-empty"]),
    (lambda: F.gan_d_loss(torch.randn(4), torch.randn(4, device="meta")), ValueError, ["fake_logits on meta"]),
    (lambda: F.gan_d_loss(torch.randn(4), torch.randn(4), label_smoothing=1.0), ValueError, ["label_smoothing"]),
    (lambda: F.gan_g_loss(torch.arange(4)), TypeError, ["fake_logits"]),
    (lambda: fastgen.nn.GANLoss("wasserstein"), ValueError, ["kind", "minimax", "non_saturating"]),
    (lambda: fastgen.nn.GANLoss(label_smoothing=-0.1), ValueError, ["label_smoothing"]),
    (lambda: fastgen.nn.BCEWithLogits("avg"), ValueError, ["reduction"]),
])
def test_bad_input_names_the_argument(call, error, words):
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value)
