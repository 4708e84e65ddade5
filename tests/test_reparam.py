"""The reparameterization kernels (kernels/reparam.py): noise statistics, Philox layout and
seeding, forward/backward against the float64 reference given the kernel's own noise, and
log_normal_diag.

The kernel draws Philox noise and the reference torch.randn noise, so the two are never compared
draw for draw: the kernel's noise is read back by running it on mu = 0, logvar = 0 with the same
generator state (z = eps exactly), and the reference is evaluated with that noise.
Every check forces the Triton path (the CPU interpreter here, the GPU compiler on CUDA).
"""

import types

import numpy as np
import pytest
import torch

import fastgen
from fastgen import functional as F
from fastgen import reference as R
from fastgen.kernels import reparam
from tests.conftest import DEVICE, TOL, rel_err

SHAPES = [(1, 1), (7, 3), (129, 257), (1000, 64)]


@pytest.fixture(autouse=True)
def triton_backend():
    with fastgen.use_backend("triton"):
        yield


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(DEVICE).manual_seed(seed)


def _noise(shape, samples: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """The eps a call with generator ``_gen(seed)`` draws: z of mu = 0, logvar = 0."""
    zeros = torch.zeros(shape, dtype=dtype, device=DEVICE)
    return F.reparameterize(zeros, zeros, samples=samples, generator=_gen(seed))[0]


def _gaussian(shape, dtype=torch.float32, logvar_scale=1.0):
    mu = torch.randn(shape, dtype=dtype, device=DEVICE).requires_grad_()
    logvar = (torch.randn(shape, dtype=dtype, device=DEVICE) * logvar_scale).requires_grad_()
    return mu, logvar


def _reference_given_noise(mu, logvar, eps, grad_z, grad_kl):
    """Float64 z, kl and (dmu, dlogvar) of the reference with the noise given."""
    mu64 = mu.detach().double().requires_grad_()
    logvar64 = logvar.detach().double().requires_grad_()
    z, kl = R.reparameterize_with_noise(mu64, logvar64, eps.double())
    grads = torch.autograd.grad((z, kl), (mu64, logvar64), (grad_z.double(), grad_kl.double()))
    return z, kl, grads


# ----------------------------------------------------------------------------------------------
# The noise


def _moments(x: torch.Tensor) -> tuple[float, float, float, float]:
    x = x.double().flatten()
    centered = x - x.mean()
    var = centered.square().mean()
    return (x.mean().item(), var.item(), (centered.pow(3).mean() / var.pow(1.5)).item(),
            (centered.pow(4).mean() / var.square() - 3.0).item())


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.double().flatten(), b.double().flatten()]))[0, 1].item()


def test_noise_is_standard_normal():
    eps = _noise((1000, 1000), 1, seed=11)
    mean, var, skew, kurt = _moments(eps)
    # 1M draws: standard errors 1e-3 (mean), 1.4e-3 (variance), 2.4e-3 (skew), 4.9e-3 (excess
    # kurtosis); the tolerances are about 5 of them.
    assert abs(mean) < 5e-3 and abs(var - 1.0) < 7e-3
    assert abs(skew) < 0.012 and abs(kurt) < 0.025
    # Tails: P(|x| > 3) = 2.7e-3 for a standard normal (standard error 5e-5 here).
    assert abs((eps.abs() > 3).double().mean().item() - 2.6998e-3) < 3e-4
    assert eps.abs().max() < 5.7  # Box-Muller's bound on 31-bit uniforms clamped at 1e-7


def test_noise_has_no_correlation_between_neighbours_samples_or_calls():
    torch.manual_seed(5)
    zeros = torch.zeros(500, 203, device=DEVICE)  # 203 columns: rows end inside a Philox block
    eps = F.reparameterize(zeros, zeros, samples=2)[0]
    again = F.reparameterize(zeros, zeros)[0]
    pairs = [(eps[0, :, :-1], eps[0, :, 1:]),        # column neighbours (lanes of one block)
             (eps[0, :, 0:200:4], eps[0, :, 2:202:4]),  # lanes 0 and 2: Box-Muller's other pair
             (eps[0, :-1], eps[0, 1:]),              # row neighbours
             (eps[0], eps[1]),                       # samples of one call
             (eps[0], again)]                        # successive calls
    for a, b in pairs:
        assert abs(_corr(a, b)) < 6 / a.numel() ** 0.5
    assert not torch.equal(eps[0], eps[1]) and not torch.equal(eps[0], again)


def _philox_normals(seed: int, counters: np.ndarray) -> np.ndarray:
    """Triton's randn4x in numpy: Philox-4x32-10 at counter (lo, hi, 0, 0), key (seed lo, seed hi),
    then Box-Muller on (u1, u2) and (u3, u4). Returns (len(counters), 4) float32."""
    mask = np.uint64(0xFFFFFFFF)
    c0 = counters.astype(np.uint64) & mask
    c1 = counters.astype(np.uint64) >> np.uint64(32)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    a, b = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        prod_a, prod_b = a * c0, b * c2
        c0, c1, c2, c3 = ((prod_b >> np.uint64(32)) ^ c1 ^ k0, prod_b & mask,
                          (prod_a >> np.uint64(32)) ^ c3 ^ k1, prod_a & mask)
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
    words = np.stack([c0, c1, c2, c3], axis=-1).astype(np.uint32).view(np.int32)
    u = (np.where(words < 0, ~words, words).astype(np.float32) * np.float32(4.6566127342e-10))
    r = np.sqrt(np.float32(-2.0) * np.log(np.maximum(np.float32(1e-7), u[:, 0::2])))
    theta = np.float32(2 * np.pi) * u[:, 1::2]
    return np.stack([r[:, 0] * np.cos(theta[:, 0]), r[:, 0] * np.sin(theta[:, 0]),
                     r[:, 1] * np.cos(theta[:, 1]), r[:, 1] * np.sin(theta[:, 1])], axis=-1)


def _seed_offset(key: int, offset: int) -> torch.Tensor:
    return torch.tensor([key, offset], dtype=torch.int64, device=DEVICE)


def _kernel_noise(rows: int, cols: int, samples: int, key: int, offset: int) -> torch.Tensor:
    """The kernel's eps at (key, offset): z of mu = 0, logvar = 0."""
    zeros = torch.zeros(rows, cols, device=DEVICE)
    return reparam.reparameterize_forward(zeros, zeros, samples, _seed_offset(key, offset))[0]


@pytest.mark.parametrize("key", [0x1234_5678_9ABC, 2**62 - 1])
@pytest.mark.parametrize("offset", [0, 2**32 - 6, 3 * 2**40 + 5])
def test_noise_follows_the_documented_philox_layout(key, offset):
    # Element (s, b, j) is lane j % 4 of the block at counter offset + (s * B + b) * ceil(D / 4)
    # + j // 4; near 2**32 the counter's high word must carry, never wrap to 0.
    samples, rows, cols = 2, 5, 10
    eps = _kernel_noise(rows, cols, samples, key, offset).cpu().numpy()
    quads = -(-cols // 4)
    counters = offset + np.arange(samples * rows * quads, dtype=np.uint64)
    want = _philox_normals(key, counters).reshape(samples, rows, quads * 4)[:, :, :cols]
    np.testing.assert_allclose(eps, want, rtol=1e-4, atol=1e-4)  # GPU log / cos / sin round differently
    assert reparam.counters_used(samples, rows, cols) == samples * rows * quads


def test_offsets_past_2_32_shift_and_do_not_wrap():
    rows, cols, key = 8, 16, 987654321  # 4 counters a row
    below = _kernel_noise(rows, cols, 1, key, 2**32 - 12)
    at = _kernel_noise(rows, cols, 1, key, 2**32)
    wrapped = _kernel_noise(rows, cols, 1, key, 0)
    assert torch.equal(below[3:], at[:5])  # the counter is offset + element's block: shifts agree
    assert (below[3:] != wrapped[:5]).all()


def test_kernels_read_the_seed_tensor_on_the_device(monkeypatch):
    # No Python number is made of a tensor (no .item(), no sync): the kernels load key and
    # offset themselves, so new values written into the same tensor give new noise, as a graph
    # replay would.
    def host_read(*args, **kwargs):
        raise AssertionError("the seed was read on the host")

    rows, cols, samples = 6, 10, 2
    zeros = torch.zeros(rows, cols, device=DEVICE)
    seed_offset = _seed_offset(11, 0)
    for name in ("item", "tolist", "__int__", "__index__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    first = reparam.reparameterize_forward(zeros, zeros, samples, seed_offset)[0]
    seed_offset.copy_(torch.tensor([12, 2**33 + 1], dtype=torch.int64))
    second = reparam.reparameterize_forward(zeros, zeros, samples, seed_offset)[0]
    grad_mu, grad_logvar = reparam.reparameterize_backward(
        zeros, zeros, torch.ones_like(second), None, samples, seed_offset)
    monkeypatch.undo()
    assert torch.equal(first, _kernel_noise(rows, cols, samples, 11, 0))
    assert torch.equal(second, _kernel_noise(rows, cols, samples, 12, 2**33 + 1))
    # The backward regenerates the forward's eps from the same tensor: at mu = 0, logvar = 0,
    # dlogvar = 0.5 * sum_s eps[s] and dmu = S.
    assert rel_err(grad_logvar, 0.5 * second.sum(0)) < 1e-6 and torch.equal(grad_mu, torch.full_like(zeros, samples))


@pytest.mark.parametrize("rows, cols", [(7, 3), (33, 200), (5, 1100)])
def test_gpu_tiles_give_the_same_noise_and_results(monkeypatch, rows, cols):
    # The noise does not depend on the tiles: the GPU's small tiles (4 elements a thread, run
    # here in the interpreter) give the interpreter tiles' eps bit for bit, and the same KL and
    # gradients up to summation order.
    mu, logvar = torch.randn(rows, cols, device=DEVICE), torch.randn(rows, cols, device=DEVICE)
    grad_z, grad_kl = torch.randn(2, rows, cols, device=DEVICE), torch.randn(rows, device=DEVICE)
    seed_offset = _seed_offset(5, 7)

    def run():
        z, kl = reparam.reparameterize_forward(mu, logvar, 2, seed_offset)
        return (z, kl, *reparam.reparameterize_backward(mu, logvar, grad_z, grad_kl, 2, seed_offset))

    default = run()
    gpu_tiles = reparam._tiles(types.SimpleNamespace(is_cuda=True), rows, cols)
    block_b, block_d, warps = gpu_tiles
    assert block_b * block_d <= max(reparam.GPU_TILE, block_d)
    assert warps * 32 * reparam.ELEMENTS_PER_THREAD in (block_b * block_d, 32)  # one warp at least
    monkeypatch.setattr(reparam, "_tiles", lambda *args: gpu_tiles)
    tiled = run()
    assert torch.equal(tiled[0], default[0])
    for got, want in zip(tiled[1:], default[1:]):
        assert rel_err(got, want) < 1e-6


def test_seed_offset_must_be_a_device_int64_pair():
    zeros = torch.zeros(3, 4, device=DEVICE)
    for bad, error, words in [
        ((5, 0), TypeError, ["seed_offset", "tuple"]),
        (torch.tensor([5, 0], dtype=torch.int32, device=DEVICE), ValueError, ["seed_offset", "int32"]),
        (torch.tensor([5, 0, 1], dtype=torch.int64, device=DEVICE), ValueError, ["seed_offset", "(3,)"]),
        (torch.tensor([5, 0, 1, 2], dtype=torch.int64, device=DEVICE)[::2], ValueError, ["seed_offset", "(2,)"]),
        (torch.tensor([5, 0], dtype=torch.int64, device="meta"), ValueError, ["seed_offset", "meta"]),
    ]:
        for call in (lambda: reparam.reparameterize_forward(zeros, zeros, 1, bad),
                     lambda: reparam.reparameterize_backward(zeros, zeros, zeros, None, 1, bad)):
            with pytest.raises(error) as info:
                call()
            assert all(word in str(info.value) for word in words), str(info.value)


# ----------------------------------------------------------------------------------------------
# Seeding


def test_manual_seed_repeats_a_run_and_successive_calls_differ():
    mu, logvar = _gaussian((33, 17))

    def two_calls():
        torch.manual_seed(1234)
        return [F.reparameterize(mu, logvar, samples=2)[0] for _ in range(2)]

    first, second = two_calls(), two_calls()
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert (first[0] != first[1]).all()


def test_generator_argument_seeds_the_noise():
    mu, logvar = _gaussian((16, 9))
    same = [F.reparameterize(mu, logvar, generator=_gen(7))[0] for _ in range(2)]
    other = F.reparameterize(mu, logvar, generator=_gen(8))[0]
    assert torch.equal(same[0], same[1])
    assert (same[0] != other).all()
    gen = _gen(7)
    first, second = F.reparameterize(mu, logvar, generator=gen)[0], F.reparameterize(mu, logvar, generator=gen)[0]
    assert torch.equal(first, same[0]) and (first != second).all()


# ----------------------------------------------------------------------------------------------
# Against the reference, given the kernel's noise


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("samples", [1, 5])
def test_matches_reference_given_the_noise(shape, samples, nan_poison):
    mu, logvar = _gaussian(shape)
    z, kl = F.reparameterize(mu, logvar, samples=samples, generator=_gen(3))
    eps = _noise(shape, samples, seed=3)
    assert z.shape == ((samples, *shape) if samples > 1 else shape) and kl.shape == shape[:1]
    assert z.dtype == kl.dtype == torch.float32
    grad_z, grad_kl = torch.randn_like(z), torch.randn_like(kl)
    z_ref, kl_ref, grads_ref = _reference_given_noise(mu, logvar, eps, grad_z, grad_kl)
    assert rel_err(z, z_ref) < TOL and rel_err(kl, kl_ref) < TOL
    grads = torch.autograd.grad((z, kl), (mu, logvar), (grad_z, grad_kl))
    for got, want in zip(grads, grads_ref):
        assert rel_err(got, want) < TOL


def test_backward_regenerates_the_forward_noise():
    mu, logvar = _gaussian((64, 48), logvar_scale=0.5)
    z, _ = F.reparameterize(mu, logvar)
    (grad_logvar,) = torch.autograd.grad(z, logvar, torch.ones_like(z))
    std = (0.5 * logvar.detach()).exp()
    forward_eps = (z.detach() - mu.detach()) / std
    backward_eps = grad_logvar / (0.5 * std)  # dz/dlogvar = 0.5 * std * eps
    assert rel_err(backward_eps, forward_eps) < 1e-5


@pytest.mark.parametrize("used", ["z", "kl"])
def test_one_output_unused(used):
    mu, logvar = _gaussian((9, 13))
    z, kl = F.reparameterize(mu, logvar, samples=3, generator=_gen(4))
    out = z if used == "z" else kl
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (mu, logvar), grad_out)
    eps = _noise((9, 13), 3, seed=4)
    zeros_z, zeros_kl = torch.zeros_like(z), torch.zeros_like(kl)
    _, _, grads_ref = _reference_given_noise(mu, logvar, eps, grad_out if used == "z" else zeros_z,
                                             grad_out if used == "kl" else zeros_kl)
    for got, want in zip(grads, grads_ref):
        assert rel_err(got, want) < TOL


@pytest.mark.parametrize("samples", [1, 3])
def test_gradcheck_float64(samples):
    mu, logvar = _gaussian((4, 6), dtype=torch.float64, logvar_scale=0.5)
    # A fresh generator per call: the same noise every time gradcheck evaluates the function.
    # fast_mode checks random projections of the Jacobian: few calls through the slow interpreter.
    assert torch.autograd.gradcheck(
        lambda m, lv: F.reparameterize(m, lv, samples=samples, generator=_gen(9)), (mu, logvar),
        fast_mode=True)


def test_extreme_logvar_is_finite_and_clamped_at_80():
    logvar = torch.tensor([[-80.0, -40.0, 0.0, 40.0, 79.5, 80.0, 85.0, 1e4]], device=DEVICE).repeat(3, 1)
    mu = torch.randn_like(logvar).requires_grad_()
    logvar.requires_grad_()
    z, kl = F.reparameterize(mu, logvar, samples=2, generator=_gen(5))
    grad_z, grad_kl = torch.randn_like(z), torch.rand_like(kl)
    grads = torch.autograd.grad((z, kl), (mu, logvar), (grad_z, grad_kl))
    for t in (z, kl, *grads):
        assert torch.isfinite(t).all()
    z_ref, kl_ref, grads_ref = _reference_given_noise(mu, logvar, _noise(logvar.shape, 2, seed=5), grad_z, grad_kl)
    assert rel_err(z, z_ref) < TOL and rel_err(kl, kl_ref) < TOL
    for got, want in zip(grads, grads_ref):
        assert rel_err(got, want) < TOL
    assert (grads[1][:, -2:] == 0).all() and (grads[1][:, :-2] != 0).all()  # clamp: no gradient above 80
    assert reparam.LOGVAR_MAX == R.LOGVAR_MAX == 80.0


def test_float16_within_half_tolerance():
    mu, logvar = _gaussian((40, 24), dtype=torch.float16, logvar_scale=0.5)
    z, kl = F.reparameterize(mu, logvar, samples=2, generator=_gen(6))
    assert z.dtype == kl.dtype == torch.float16
    grad_z, grad_kl = torch.randn_like(z), torch.randn_like(kl)
    z_ref, kl_ref, grads_ref = _reference_given_noise(
        mu, logvar, _noise(mu.shape, 2, seed=6), grad_z, grad_kl)
    assert rel_err(z, z_ref) < 1e-2 and rel_err(kl, kl_ref) < 1e-2
    for got, want in zip(torch.autograd.grad((z, kl), (mu, logvar), (grad_z, grad_kl)), grads_ref):
        assert got.dtype == torch.float16 and rel_err(got, want) < 1e-2


def test_any_layout_and_inputs_never_written():
    base_mu, base_logvar = torch.randn(12, 20, device=DEVICE), torch.randn(12, 20, device=DEVICE)
    mu, logvar = base_mu.t().requires_grad_(), base_logvar.t().requires_grad_()  # (20, 12) views
    saved, versions = (mu.detach().clone(), logvar.detach().clone()), (mu._version, logvar._version)
    z, kl = F.reparameterize(mu, logvar, generator=_gen(2))
    contiguous = F.reparameterize(mu.detach().contiguous(), logvar.detach().contiguous(), generator=_gen(2))
    assert torch.equal(z, contiguous[0]) and torch.equal(kl, contiguous[1])
    (z.sum() + kl.sum()).backward()  # expanded (stride 0) upstream gradients
    assert mu.grad.shape == mu.shape and torch.isfinite(logvar.grad).all()
    assert torch.equal(mu.detach(), saved[0]) and torch.equal(logvar.detach(), saved[1])
    assert (mu._version, logvar._version) == versions


def test_module_and_reference_backend_agree_on_shapes():
    mu, logvar = _gaussian((5, 7))
    module = fastgen.nn.Reparameterize(samples=4)
    z, kl = module(mu, logvar, generator=_gen(1))
    assert torch.equal(z, F.reparameterize(mu, logvar, samples=4, generator=_gen(1))[0])
    assert "samples=4" in repr(module)
    with fastgen.use_backend("reference"):
        z_ref, kl_ref = module(mu, logvar)
    assert z_ref.shape == z.shape and z_ref.dtype == z.dtype
    assert rel_err(kl, kl_ref) < TOL  # the KL needs no noise: both paths agree


# ----------------------------------------------------------------------------------------------
# log_normal_diag


@pytest.mark.parametrize("z_shape, params", [((7, 3), True), ((5, 129, 33), True), ((1, 1), True),
                                             ((4, 1000, 20), True), ((6, 11), False), ((3, 8, 5), False)])
def test_log_normal_diag_matches_reference(z_shape, params, nan_poison):
    z = (torch.randn(z_shape, device=DEVICE) * 2).requires_grad_()
    mu, logvar = _gaussian(z_shape[-2:]) if params else (None, None)
    out = F.log_normal_diag(z, mu, logvar)
    inputs = (z, mu, logvar) if params else (z,)
    inputs64 = tuple(t.detach().double().requires_grad_() for t in inputs)
    ref = R.log_normal_diag(*inputs64)
    assert out.shape == z_shape[:-1] and out.dtype == torch.float32
    assert rel_err(out, ref) < TOL
    grad_out = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, inputs, grad_out),
                         torch.autograd.grad(ref, inputs64, grad_out.double())):
        assert rel_err(got, want) < TOL


def test_log_normal_diag_gradcheck_float64_and_params_only():
    z = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    mu, logvar = _gaussian((4, 5), dtype=torch.float64, logvar_scale=0.5)
    assert torch.autograd.gradcheck(F.log_normal_diag, (z, mu, logvar), fast_mode=True)
    assert torch.autograd.gradcheck(F.log_normal_diag, (z,), fast_mode=True)
    out = F.log_normal_diag(z.detach(), mu, logvar)  # z without gradient: dz is never written
    assert all(g is not None for g in torch.autograd.grad(out.sum(), (mu, logvar)))


def test_log_normal_diag_float64_runs_at_float64_precision():
    # log(2 pi) reaches the kernel as a float64 scalar (as float32 it cost 8 digits).
    z = torch.randn(3, 4, 5, dtype=torch.float64, device=DEVICE)
    mu, logvar = _gaussian((4, 5), dtype=torch.float64)
    assert rel_err(F.log_normal_diag(z, mu, logvar), R.log_normal_diag(z, mu, logvar)) < 1e-13
    assert rel_err(F.log_normal_diag(z), R.log_normal_diag(z)) < 1e-13


def test_importance_weights_of_reparameterized_samples():
    # With z = mu + std * eps: log q(z|x) = -0.5 * sum(eps^2 + logvar + log 2pi), exactly.
    mu, logvar = _gaussian((10, 6), logvar_scale=0.5)
    z, _ = F.reparameterize(mu, logvar, samples=4, generator=_gen(12))
    eps = _noise(mu.shape, 4, seed=12).double()
    want = -0.5 * (eps.square() + logvar.detach().double() + R.LOG_2PI).sum(-1)
    assert rel_err(F.log_normal_diag(z, mu, logvar), want) < TOL
    assert rel_err(F.log_normal_diag(z), R.log_normal_diag(z.detach().double())) < TOL


# ----------------------------------------------------------------------------------------------
# Bad input: each error names the argument

_X = torch.randn(4, 3)


@pytest.mark.parametrize("call, error, words", [
    (lambda: F.reparameterize(_X, torch.randn(4, 2)), ValueError, ["logvar", "(4, 3)", "(4, 2)"]),
    (lambda: F.reparameterize(torch.randn(4), torch.randn(4)), ValueError, ["mu", "rank 2"]),
    (lambda: F.reparameterize(torch.randn(2, 4, 3), torch.randn(2, 4, 3)), ValueError, ["mu", "rank 2"]),
    (lambda: F.reparameterize(torch.ones(4, 3, dtype=torch.int64), _X), TypeError, ["mu", "int64"]),
    (lambda: F.reparameterize(_X, torch.ones(4, 3, dtype=torch.int32)), TypeError, ["logvar", "int32"]),
    (lambda: F.reparameterize(_X, _X.double()), TypeError, ["mu", "logvar"]),
    (lambda: F.reparameterize(_X, torch.randn(4, 3, device="meta")), ValueError, ["mu on cpu", "logvar on meta"]),
    (lambda: F.reparameterize(_X, _X, samples=0), ValueError, ["samples", "0"]),
    (lambda: F.reparameterize(_X, _X, samples=2.0), TypeError, ["samples", "float"]),
    (lambda: F.reparameterize(_X, _X, generator=3), TypeError, ["generator"]),
    (lambda: F.reparameterize(_X.to("meta"), _X.to("meta"), generator=torch.Generator()), ValueError,
     ["generator", "'meta'", "cpu"]),
    (lambda: F.reparameterize(torch.randn(0, 3), torch.randn(0, 3)), ValueError, ["mu", "non-empty"]),
    (lambda: F.log_normal_diag(torch.randn(2, 4, 3), _X), ValueError, ["mu, logvar", "both"]),
    (lambda: F.log_normal_diag(torch.randn(2, 4, 4), _X, _X), ValueError, ["z", "(..., 4, 3)"]),
    (lambda: F.log_normal_diag(torch.randn(3), None, None), ValueError, ["z", "(S, B, D)"]),
    (lambda: F.log_normal_diag(_X.double(), _X, _X), TypeError, ["z", "mu"]),
    (lambda: F.log_normal_diag(torch.arange(12).view(4, 3)), TypeError, ["z", "int64"]),
    (lambda: fastgen.nn.Reparameterize(samples=0), ValueError, ["samples"]),
])
def test_bad_input_names_the_argument(call, error, words):
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value)


# ----------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
def test_cuda_offsets_advance_and_manual_seed_resets_them():
    gen = torch.cuda.default_generators[torch.cuda.current_device()]
    mu, logvar = _gaussian((257, 129))
    torch.manual_seed(3)
    start = gen.get_offset()
    z1 = F.reparameterize(mu, logvar, samples=3)[0]
    assert gen.get_offset() - start == -(-reparam.counters_used(3, 257, 129) // 4) * 4
    z2 = F.reparameterize(mu, logvar, samples=3)[0]
    torch.manual_seed(3)
    assert torch.equal(F.reparameterize(mu, logvar, samples=3)[0], z1)
    assert (z1 != z2).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, TOL), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
def test_large_batch_on_gpu(dtype, tol):
    mu, logvar = _gaussian((8192, 512), dtype=dtype, logvar_scale=0.5)
    z, kl = F.reparameterize(mu, logvar, samples=2, generator=_gen(1))
    grad_z, grad_kl = torch.randn_like(z), torch.randn_like(kl)
    z_ref, kl_ref, grads_ref = _reference_given_noise(
        mu, logvar, _noise(mu.shape, 2, seed=1, dtype=torch.float32), grad_z, grad_kl)
    assert rel_err(z, z_ref) < tol and rel_err(kl, kl_ref) < tol
    for got, want in zip(torch.autograd.grad((z, kl), (mu, logvar), (grad_z, grad_kl)), grads_ref):
        assert rel_err(got, want) < tol
    mean, var, skew, kurt = _moments(_noise((4096, 4096), 1, seed=2))
    assert abs(mean) < 1e-3 and abs(var - 1) < 2e-3 and abs(skew) < 3e-3 and abs(kurt) < 6e-3


@pytest.mark.gpu
def test_cuda_graph_capture_replays_with_new_seed_values():
    mu, logvar = _gaussian((300, 70))
    mu, logvar = mu.detach(), logvar.detach()
    grad_z = torch.randn(3, 300, 70, device="cuda")
    seed_offset = _seed_offset(1, 0)

    def step():
        z, kl = reparam.reparameterize_forward(mu, logvar, 3, seed_offset)
        return (z, kl, *reparam.reparameterize_backward(mu, logvar, grad_z, None, 3, seed_offset))

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for key, offset in [(2**62 - 3, 5), (77, 2**40)]:
        seed_offset.copy_(torch.tensor([key, offset]))
        graph.replay()
        for got, want in zip(captured, step()):
            assert torch.equal(got, want)


def test_nan_logvar_propagates(device):
    """A NaN logvar must reach z and the KL (a NaN guard then stops the run): the clamp at
    LOGVAR_MAX propagates NaN, as torch.clamp does (a GPU min would return the bound)."""
    mu = torch.zeros(2, 3, device=device, requires_grad=True)
    logvar = torch.zeros(2, 3, device=device)
    logvar[0, 1] = float("nan")
    logvar.requires_grad_()
    z, kl = F.reparameterize(mu, logvar)
    assert torch.isnan(z[0, 1]) and torch.isnan(kl[0]) and torch.isfinite(kl[1])
    assert torch.isnan(F.log_normal_diag(torch.zeros(2, 3, device=device), mu, logvar)[0])
