"""The torch.library layer (fastgen/ops): every fused op is a registered ``torch.ops.fastgen`` op
that passes ``opcheck``, is differentiable twice (the reference's second derivatives), traces
into ``torch.compile(fullgraph=True)`` with no graph break, and draws its noise from a device
tensor (capturable in a CUDA graph). The Triton kernels run through the interpreter on CPU."""

from __future__ import annotations

import copy

import pytest
import torch

import fastgen
from fastgen import functional as F
from fastgen import reference as R
from fastgen.models import DCGANDiscriminator, DCGANGenerator, VAE, gradient_penalty, r1_penalty
from fastgen.nn import GANLoss
from tests.conftest import rel_err

BACKENDS = ("triton", "reference")
OPS = ("bce_with_logits", "gan_loss", "reparameterize", "log_normal_diag", "conv_bn_act",
       "conv_bias_act", "bn_act")


def test_every_fused_op_and_its_backward_is_registered():
    for name in OPS:
        backward = "conv_bn_act_backward" if name == "conv_bias_act" else f"{name}_backward"
        assert hasattr(torch.ops.fastgen, name) and hasattr(torch.ops.fastgen, backward)
    assert hasattr(torch.ops.fastgen, "update_running_stats")


def _leaf(*shape, dtype=torch.float32, positive=False):
    t = torch.randn(*shape, dtype=dtype)
    return (t.abs() + 0.5 if positive else t).requires_grad_()


def _op_samples(dtype=torch.float32):
    """(op, args) pairs covering every op's variants on small shapes."""
    ops = torch.ops.fastgen
    conv = lambda **kw: dict(stride=[1, 1], padding=[1, 1], output_padding=[0, 0], transposed=False, **kw)  # noqa: E731
    x, w = _leaf(2, 3, 5, 4, dtype=dtype), _leaf(4, 3, 3, 3, dtype=dtype)
    wt = _leaf(3, 4, 4, 4, dtype=dtype)
    g, b = _leaf(4, dtype=dtype, positive=True), _leaf(4, dtype=dtype)
    rm, rv = torch.randn(4, dtype=dtype), torch.rand(4, dtype=dtype) + 0.5
    geometry = conv()
    samples = [
        (ops.bce_with_logits, (_leaf(3, 5, dtype=dtype), torch.rand(3, 5, dtype=dtype), "mean")),
        (ops.bce_with_logits, (_leaf(3, 5, dtype=dtype), torch.rand(3, 5, dtype=dtype), "per_sample")),
        (ops.bce_with_logits, (_leaf(2, 3, dtype=dtype), torch.rand(2, 3, dtype=dtype), "none")),
        # a float64 target against the logits' dtype (an fp32 image against fp16 logits): the
        # loss keeps the logits' dtype on every path
        (ops.bce_with_logits, (_leaf(2, 3, dtype=dtype), torch.rand(2, 3, dtype=torch.float64), "sum")),
        (ops.gan_loss, (_leaf(5, dtype=dtype), _leaf(7, dtype=dtype), 0.9, 0.0, 0.2, 1 / 7)),
        (ops.gan_loss, (None, _leaf(6, 1, dtype=dtype), 0.0, 1.0, 0.0, 1 / 6)),
        (ops.reparameterize, (_leaf(3, 5, dtype=dtype), _leaf(3, 5, dtype=dtype), torch.tensor([7, 0]), 1)),
        (ops.reparameterize, (_leaf(3, 5, dtype=dtype), _leaf(3, 5, dtype=dtype), torch.tensor([9, 4]), 2)),
        (ops.log_normal_diag, (_leaf(2, 3, 4, dtype=dtype), _leaf(3, 4, dtype=dtype), _leaf(3, 4, dtype=dtype))),
        (ops.log_normal_diag, (_leaf(3, 4, dtype=dtype), None, None)),
        (ops.conv_bn_act, (x, w, g, b, rm.clone(), rv.clone(), *geometry.values(), True, 0.1, 1e-5,
                           "leaky_relu", 0.2, True)),
        (ops.conv_bn_act, (x, w, g, b, rm.clone(), rv.clone(), *geometry.values(), False, 0.1, 1e-5,
                           "tanh", 0.2, True)),
        (ops.conv_bias_act, (x, wt, b, [2, 2], [1, 1], [1, 1], True, "sigmoid", 0.2, True)),
        (ops.bn_act, (x, g[:3], b[:3], rm[:3].clone(), rv[:3].clone(), True, 0.1, 1e-5, "relu", 0.2)),
        (ops.bn_act, (x, None, None, rm[:3].clone(), rv[:3].clone(), False, 0.1, 1e-5, "identity", 0.2)),
    ]
    return samples


@pytest.mark.parametrize("name", BACKENDS)
def test_opcheck_every_op(name):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of every op,
    on both backends; the running statistics are outputs, never written by the op."""
    torch.manual_seed(0)
    with fastgen.use_backend(name):
        for op, args in _op_samples():
            torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", BACKENDS)
def test_update_running_stats_declares_its_mutation(name):
    rm, rv = torch.zeros(3), torch.ones(3)
    with fastgen.use_backend(name):
        torch.library.opcheck(torch.ops.fastgen.update_running_stats, (rm, rv, torch.randn(2, 3)))
    schema = str(torch.ops.fastgen.update_running_stats.default._schema)
    assert "Tensor(a0!) running_mean" in schema and "Tensor(a1!) running_var" in schema


# ----------------------------------------------------------------------------------------------
# Second derivatives


def _second_order(fn, inputs):
    """Gradients of ||d out / d inputs||^2 (a gradient penalty's shape) with respect to inputs."""
    out = fn(*inputs)
    upstream = torch.randn_like(out, generator=torch.Generator().manual_seed(1)) if out.dim() else None
    grads = torch.autograd.grad(out, inputs, upstream, create_graph=True)
    penalty = sum(g.square().sum() for g in grads)
    return [g.detach() for g in grads], torch.autograd.grad(penalty, inputs)


def _penalty_cases():
    """(name, fused function, reference function, input shapes) for every public op."""
    conv = dict(padding=1, activation="tanh")
    tconv = dict(stride=2, padding=1, output_padding=1, transposed=True, activation="leaky_relu")
    return [
        ("conv_bn_act train", lambda x, w, g, b: F.conv_bn_act(x, w, g, b, None, None, **conv),
         lambda x, w, g, b: R.conv_bn_act(x, w, g, b, None, None, **conv),
         [(2, 3, 5, 4), (4, 3, 3, 3), (4,), (4,)]),
        ("conv_transpose_bn_act train", lambda x, w, g, b: F.conv_bn_act(x, w, g, b, None, None, **tconv),
         lambda x, w, g, b: R.conv_bn_act(x, w, g, b, None, None, **tconv),
         [(2, 3, 3, 3), (3, 2, 3, 3), (2,), (2,)]),
        ("conv_bn_act eval",
         lambda x, w, g, b: F.conv_bn_act(x, w, g, b, torch.full((4,), 0.1, dtype=x.dtype),
                                          torch.full((4,), 1.5, dtype=x.dtype), training=False, **conv),
         lambda x, w, g, b: R.conv_bn_act(x, w, g, b, torch.full((4,), 0.1, dtype=x.dtype),
                                          torch.full((4,), 1.5, dtype=x.dtype), training=False, **conv),
         [(2, 3, 5, 4), (4, 3, 3, 3), (4,), (4,)]),
        ("conv_bias_act", lambda x, w, b: F.conv_bias_act(x, w, b, stride=2, activation="sigmoid"),
         lambda x, w, b: R.conv_bias_act(x, w, b, stride=2, activation="sigmoid"),
         [(2, 3, 5, 5), (4, 3, 3, 3), (4,)]),
        ("bn_act", lambda x, g, b: F.bn_act(x, g, b, None, None, activation="leaky_relu"),
         lambda x, g, b: R.bn_act(x, g, b, None, None, activation="leaky_relu"),
         [(3, 4, 2, 3), (4,), (4,)]),
        ("bce_with_logits", lambda x, t: F.bce_with_logits(x, t.sigmoid(), reduction="per_sample"),
         lambda x, t: R.bce_with_logits(x, t.sigmoid(), reduction="per_sample"), [(3, 7), (3, 7)]),
        ("gan_d_loss", lambda r, f: F.gan_d_loss(r, f, label_smoothing=0.1).loss,
         lambda r, f: R.gan_d_loss(r, f, label_smoothing=0.1).loss, [(5,), (6,)]),
        ("gan_g_loss minimax", lambda f: F.gan_g_loss(f, saturating=True).loss,
         lambda f: R.gan_g_loss(f, saturating=True).loss, [(6,)]),
        ("log_normal_diag", F.log_normal_diag, R.log_normal_diag, [(2, 3, 4), (3, 4), (3, 4)]),
    ]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("case", _penalty_cases(), ids=lambda c: c[0])
def test_second_derivatives_are_the_references(case, name):
    """d/dinputs of a squared-gradient penalty through each fused op, against the reference's
    own double backward (float64)."""
    _, fused, ref, shapes = case
    inputs = [torch.randn(s, dtype=torch.float64, generator=torch.Generator().manual_seed(i)).requires_grad_()
              for i, s in enumerate(shapes)]
    with fastgen.use_backend(name):
        grads, seconds = _second_order(fused, inputs)
    ref_grads, ref_seconds = _second_order(ref, inputs)
    for got, want in zip(grads + list(seconds), ref_grads + list(ref_seconds)):
        assert rel_err(got, want) < 1e-7


def test_reparameterize_second_derivatives_regenerate_the_noise():
    """The double backward of the sampler uses the forward's eps (regenerated, never stored)."""
    mu = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    seed_offset = torch.tensor([123, 0])
    for name in BACKENDS:
        with fastgen.use_backend(name):
            z, kl = torch.ops.fastgen.reparameterize(mu, logvar, seed_offset, 2)
            eps = (z - mu) / torch.exp(0.5 * logvar)
            grads, seconds = _second_order(
                lambda m, lv: torch.ops.fastgen.reparameterize(m, lv, seed_offset, 2)[0].square().sum()
                + torch.ops.fastgen.reparameterize(m, lv, seed_offset, 2)[1].sum(), [mu, logvar])
        ref_grads, ref_seconds = _second_order(
            lambda m, lv: R.reparameterize_with_noise(m, lv, eps.detach())[0].square().sum()
            + R.reparameterize_with_noise(m, lv, eps.detach())[1].sum(), [mu, logvar])
        for got, want in zip(grads + list(seconds), ref_grads + list(ref_seconds)):
            assert rel_err(got, want) < 1e-7, name


@pytest.mark.parametrize("name", BACKENDS)
def test_gradgradcheck_float64(name):
    """Finite differences of the backward ops themselves (float64), on every family. The conv's
    finite differences take hundreds of interpreted conv launches: it is checked on the
    reference path (its double backward is the same reference math on both paths, and the
    fused first backward is checked by test_second_derivatives_are_the_references)."""
    gen = torch.Generator().manual_seed(0)
    leaf = lambda *s: torch.randn(*s, dtype=torch.float64, generator=gen).requires_grad_()  # noqa: E731
    conv = [(lambda x, w, g, b: F.conv_bn_act(x, w, g, b, None, None, padding=1, activation="tanh"),
             (leaf(2, 2, 3, 3), leaf(3, 2, 2, 2), leaf(3), leaf(3)))]
    checks = (conv if name == "reference" else []) + [
        (lambda x, g, b: F.bn_act(x, g, b, None, None, activation="sigmoid"), (leaf(2, 3, 2, 2), leaf(3), leaf(3))),
        (lambda x, t: F.bce_with_logits(x, t.sigmoid(), reduction="sum"), (leaf(3, 4), leaf(3, 4))),
        (lambda r, f: F.gan_d_loss(r, f).loss, (leaf(4), leaf(5))),
        (F.log_normal_diag, (leaf(2, 3), leaf(2, 3), leaf(2, 3))),
        (lambda m, lv: torch.ops.fastgen.reparameterize(m, lv, torch.tensor([5, 0]), 1)[0],
         (leaf(2, 3), leaf(2, 3))),
    ]
    with fastgen.use_backend(name):
        for fn, inputs in checks:
            assert torch.autograd.gradgradcheck(fn, inputs)


def test_failed_fused_sampler_backward_raises_instead_of_using_other_noise(monkeypatch):
    """The reference draws other noise than the fused forward did: when the fused backward fails
    under "auto", the op is remembered as failed and the error propagates, never gradients for
    another eps."""
    from fastgen.kernels import reparam as kernels

    def broken(*args, **kwargs):
        raise RuntimeError("simulated backward compile failure")

    mu = torch.randn(3, 4, requires_grad=True)
    z, _ = F.reparameterize(mu, torch.zeros(3, 4))
    monkeypatch.setattr(kernels, "reparameterize_backward", broken)
    try:
        with pytest.warns(RuntimeWarning, match="reparameterize"), \
                pytest.raises(RuntimeError, match="simulated backward compile failure"):
            z.sum().backward()
        assert "reparameterize" in fastgen.backend.failed_ops()
        # Later calls run the reference, forward and backward, consistently.
        z, _ = F.reparameterize(mu, torch.zeros(3, 4))
        (grad,) = torch.autograd.grad(z.sum(), mu)
        assert torch.equal(grad, torch.ones_like(mu))
    finally:
        fastgen.backend.reset_failures()


def test_third_derivatives_raise():
    """Second derivatives with a graph (for a third) would be silently zero: they raise."""
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(F.gan_g_loss(x).loss, x, create_graph=True)
    torch.autograd.grad(g.square().sum(), x, retain_graph=True)  # second order: fine
    with pytest.raises(RuntimeError, match="third-order"):
        torch.autograd.grad(g.square().sum(), x, create_graph=True)


def _tiny_gan(batch_norm: bool = True):
    torch.manual_seed(0)
    return (DCGANGenerator(latent_size=8, image_size=16, width=4),
            DCGANDiscriminator(image_size=16, width=4, batch_norm=batch_norm))


@pytest.mark.parametrize("penalty", ["r1", "wgan_gp"])
def test_gradient_penalties_train_on_the_fused_discriminator(penalty):
    """R1 and WGAN-GP through the fused D (Triton kernels): the penalty and its gradients for
    every D parameter match the reference backend's."""
    _, disc = _tiny_gan(batch_norm=penalty == "r1")
    real = torch.rand(4, 1, 16, 16) * 2 - 1
    fake = torch.rand(4, 1, 16, 16) * 2 - 1
    results = {}
    for name in BACKENDS:
        d = copy.deepcopy(disc)
        torch.manual_seed(1)
        with fastgen.use_backend(name):
            if penalty == "r1":
                x = real.clone().requires_grad_()
                value = r1_penalty(d(x), x)
            else:
                value = gradient_penalty(d, real, fake)
            # (the last layer's bias moves no input gradient: no gradient for it)
            grads = torch.autograd.grad(value, list(d.parameters()), allow_unused=True)
        results[name] = (value.detach(), [torch.zeros(()) if g is None else g for g in grads])
    (value, grads), (ref_value, ref_grads) = results["triton"], results["reference"]
    assert rel_err(value, ref_value) < 1e-4
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < 1e-3


# ----------------------------------------------------------------------------------------------
# torch.compile


def _gan_losses(gen, disc, loss, z, real):
    """D's and G's losses of one DCGAN step (forward passes and the fused losses)."""
    fake = gen(z)
    d = loss.d_loss(disc(real), disc(fake.detach()))
    g = loss.g_loss(disc(fake))
    return d.loss, g.loss, d.d_real, d.d_fake


def _vae_loss(vae, x):
    return (vae.loss(x).mean(),)


def _graph_breaks(fn, *args) -> int:
    explanation = torch._dynamo.explain(fn)(*args)
    assert explanation.graph_count >= 1
    return explanation.graph_break_count


def _train_step(models, optimizers, losses_fn, *args):
    """One step: the (compiled or eager) losses, backward, then each optimizer's step."""
    outs = losses_fn(*models, *args)
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    sum(o for o in outs[: len(optimizers)]).backward()
    for opt in optimizers:
        opt.step()
    return [o.detach() for o in outs]


def _compare_compiled(models, losses_fn, args, backend):
    eager_models = copy.deepcopy(models)
    opt = lambda ms: [torch.optim.Adam(m.parameters(), lr=1e-2) for m in ms]  # noqa: E731
    compiled = torch.compile(losses_fn, backend=backend, fullgraph=True)
    torch.manual_seed(3)
    eager_out = _train_step(eager_models, opt(eager_models), losses_fn, *args)
    torch.manual_seed(3)
    compiled_out = _train_step(models, opt(models), compiled, *args)
    for got, want in zip(compiled_out, eager_out):
        assert rel_err(got, want) < 1e-5
    for m, e in zip(models, eager_models):
        for (name, got), want in zip(m.state_dict().items(), e.state_dict().values()):
            tol = 0 if not got.is_floating_point() else 1e-4
            assert got.dtype == want.dtype and (rel_err(got, want) <= tol or torch.equal(got, want)), name


@pytest.mark.parametrize("name", BACKENDS)
def test_compiled_dcgan_step_has_no_graph_break_and_matches_eager(name):
    """G and D forward and the fused losses trace as one graph (fullgraph, zero breaks); the
    compiled step's losses, weights and BN buffers after Adam match eager's (aot_eager)."""
    gen, disc = _tiny_gan()
    loss = GANLoss("non_saturating", label_smoothing=0.1)
    z, real = torch.randn(4, 8), torch.rand(4, 1, 16, 16) * 2 - 1
    with fastgen.use_backend(name):
        assert _graph_breaks(lambda g, d: _gan_losses(g, d, loss, z, real), gen, disc) == 0
        _compare_compiled([gen, disc], lambda g, d: _gan_losses(g, d, loss, z, real), (), "aot_eager")


@pytest.mark.parametrize("name", BACKENDS)
def test_compiled_vae_step_has_no_graph_break_and_matches_eager(name):
    """The VAE step (encoder, sampler, decoder, BCE) under fullgraph: the noise key is drawn in
    the graph, so eager and compiled runs from one seed draw the same eps."""
    torch.manual_seed(0)
    # The conv VAE on the reference; the MLP one keeps the interpreter to the sampler and losses.
    vae = VAE((1, 8, 8), 4, arch="conv", hidden=(4, 8)) if name == "reference" else VAE((1, 8, 8), 4, hidden=(16,))
    x = torch.rand(3, 1, 8, 8)
    with fastgen.use_backend(name):
        assert _graph_breaks(_vae_loss, vae, x) == 0
        _compare_compiled([vae], _vae_loss, (x,), "aot_eager")


def test_inductor_compiles_the_dcgan_step():
    """Inductor (CPU) around the fastgen ops: the same losses, weights and buffers as eager (on
    the reference backend: Inductor's own C++ compiles are the slow part here)."""
    gen, disc = _tiny_gan()
    loss = GANLoss("minimax")
    z, real = torch.randn(4, 8), torch.rand(4, 1, 16, 16) * 2 - 1
    step = lambda g, d: _gan_losses(g, d, loss, z, real)  # noqa: E731
    with fastgen.use_backend("reference"):
        _compare_compiled([gen, disc], step, (), "inductor")


def test_sampler_reads_no_host_generator_state_when_compiled():
    """The key comes from a device-side randint inside the graph (fullgraph would fail on a host
    read such as ``.item()``), and torch.manual_seed repeats compiled draws exactly."""
    mu, logvar = torch.randn(4, 6), torch.randn(4, 6)
    sample = torch.compile(lambda m, lv: F.reparameterize(m, lv, samples=2), backend="aot_eager",
                           fullgraph=True)
    explanation = torch._dynamo.explain(lambda m, lv: F.reparameterize(m, lv))(mu, logvar)
    assert explanation.graph_break_count == 0
    code = "\n".join(g.code for g in explanation.graphs)
    assert "randint" in code and "fastgen.reparameterize" in code
    torch.manual_seed(5)
    first = sample(mu, logvar)
    torch.manual_seed(5)
    again = sample(mu, logvar)
    torch.manual_seed(5)
    eager = F.reparameterize(mu, logvar, samples=2)
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(first, again, eager))
    assert not torch.equal(first[0][0], first[0][1])  # two samples, two draws


# ----------------------------------------------------------------------------------------------
# CUDA graphs


def _capture_and_replay(step, *static_inputs):
    """Capture ``step`` in a CUDA graph after warm-up on a side stream; replay it twice."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step(*static_inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(*static_inputs)
    graph.replay()
    first = [o.clone() for o in out]
    graph.replay()
    return first, out


@pytest.mark.gpu
def test_gpu_vae_step_captures_in_a_cuda_graph():
    torch.manual_seed(0)
    vae = VAE((1, 16, 16), 8, arch="conv", hidden=(16, 32)).cuda()
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3, capturable=True)
    x = torch.rand(32, 1, 16, 16, device="cuda")

    def step(x):
        opt.zero_grad(set_to_none=False)
        loss = vae.loss(x).mean()
        loss.backward()
        opt.step()
        return (loss.detach(),)

    with fastgen.use_backend("triton"):
        first, second = _capture_and_replay(step, x)
    assert torch.isfinite(first[0]) and torch.isfinite(second[0])
    assert not torch.equal(first[0], second[0])  # fresh noise and new weights on each replay


@pytest.mark.gpu
def test_gpu_dcgan_step_captures_in_a_cuda_graph():
    torch.manual_seed(0)
    gen = DCGANGenerator(latent_size=32, image_size=32, width=16).cuda()
    disc = DCGANDiscriminator(image_size=32, width=16).cuda()
    opts = [torch.optim.Adam(m.parameters(), lr=2e-4, betas=(0.5, 0.999), capturable=True)
            for m in (gen, disc)]
    loss = GANLoss()
    z, real = torch.randn(32, 32, device="cuda"), torch.rand(32, 1, 32, 32, device="cuda") * 2 - 1

    def step(z, real):
        for opt in opts:
            opt.zero_grad(set_to_none=False)
        d_loss, g_loss, _, _ = _gan_losses(gen, disc, loss, z, real)
        (d_loss + g_loss).backward()
        for opt in opts:
            opt.step()
        return d_loss.detach(), g_loss.detach()

    with fastgen.use_backend("triton"):
        first, second = _capture_and_replay(step, z, real)
    assert all(torch.isfinite(t) for t in first + list(second))
    assert not torch.equal(first[0], second[0])
