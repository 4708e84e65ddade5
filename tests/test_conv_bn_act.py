"""Fused conv / transposed conv + BatchNorm + activation: Triton kernels (CPU interpreter) against the
float64 PyTorch reference, forward (output, running statistics) and backward (dx, dW, dgamma,
dbeta), plus determinism, gradcheck and input validation."""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch

from triton.runtime.errors import OutOfResources

import fastgen
from fastgen.activations import ACTIVATIONS
from fastgen import backend
from fastgen import functional as FF
from fastgen import reference
from fastgen.kernels import _tuning
from fastgen.kernels import conv_bn_act as kernels
from fastgen.kernels._tuning import NoCandidateError
from tests.conftest import DEVICE, TOL


class Case(NamedTuple):
    transposed: bool
    n: int
    c_in: int
    c_out: int
    hw: tuple[int, int]
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    output_padding: tuple[int, int]
    activation: str


def _case(transposed, n, c_in, c_out, hw, kernel, stride, padding, output_padding, activation):
    pair = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
    return Case(transposed, n, c_in, c_out, pair(hw), pair(kernel), pair(stride), pair(padding),
                pair(output_padding), activation)


# Shapes that break tilings: batch 1 and 3, channels 1/3/5/17/64, spatial 1/4/7/16, kernels
# 1/3/4/5 (square and not), strides 1/2, paddings 0..2, output_padding 0/1.
CASES = [
    _case(False, 1, 1, 5, 7, 3, 1, 1, 0, "relu"),
    _case(False, 3, 5, 17, 7, 3, 2, 1, 0, "leaky_relu"),
    # (a single-weight channel, C_in 1 and a 1x1 kernel, would have dW = 0 under training BN)
    _case(False, 3, 3, 3, 4, 1, 1, 0, 0, "tanh"),
    _case(False, 1, 17, 1, 16, 4, 2, 1, 0, "sigmoid"),
    _case(False, 3, 3, 5, (7, 5), (5, 3), (2, 1), (2, 0), 0, "identity"),
    _case(False, 3, 5, 3, 4, 4, 1, 0, 0, "leaky_relu"),  # 1x1 output
    _case(False, 3, 3, 64, 1, 1, 1, 0, 0, "relu"),  # 1x1 input
    _case(False, 3, 3, 64, 4, 3, 1, 2, 0, "leaky_relu"),
    _case(True, 1, 5, 3, 4, 4, 2, 1, 0, "relu"),  # the DCGAN generator's layer
    _case(True, 3, 17, 5, 4, 4, 2, 1, 1, "tanh"),
    _case(True, 3, 3, 5, 7, 3, 2, 0, 1, "sigmoid"),
    _case(True, 3, 5, 17, 1, 4, 1, 0, 0, "relu"),  # 1x1 -> 4x4, the generator's first layer
    _case(True, 1, 3, 5, (7, 5), (5, 2), (2, 1), (2, 0), (1, 0), "leaky_relu"),
    _case(True, 3, 5, 3, 7, 1, 2, 0, 1, "identity"),  # phases without any tap
    _case(True, 3, 3, 5, 4, 3, 1, 2, 0, "relu"),
]


def _ids(case: Case) -> str:
    kind = "convT" if case.transposed else "conv"
    return (f"{kind}-n{case.n}-c{case.c_in}x{case.c_out}-{case.hw[0]}x{case.hw[1]}-k{case.kernel[0]}x"
            f"{case.kernel[1]}-s{case.stride[0]}{case.stride[1]}-p{case.padding[0]}{case.padding[1]}-"
            f"op{case.output_padding[0]}{case.output_padding[1]}-{case.activation}")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite values (an unwritten, NaN-poisoned element?)"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


@pytest.fixture(autouse=True)
def nan_poisoned_allocations(monkeypatch):
    """Every floating buffer the kernel wrappers allocate starts as NaN, so unwritten elements show."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(kernels.torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(kernels.torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


@pytest.fixture(autouse=True)
def triton_backend():
    with fastgen.use_backend("triton"):
        yield


@pytest.fixture(autouse=True)
def no_tf32(monkeypatch):
    """fp32 as fp32 on a GPU too (the fused kernels and cuDNN follow this flag); the tests of TF32
    set it themselves."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


class Inputs(NamedTuple):
    x: torch.Tensor
    weight: torch.Tensor
    gamma: torch.Tensor
    beta: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor


def make_inputs(case: Case, dtype=torch.float32, seed: int = 0, device: str = DEVICE) -> Inputs:
    """x and weight in ``dtype``; BN parameters and buffers float32 (float64 with float64 x)."""
    g = torch.Generator().manual_seed(seed)
    w_shape = ((case.c_in, case.c_out) if case.transposed else (case.c_out, case.c_in)) + case.kernel
    bn_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def rand(*shape, low=None, scale=1.0, dtype=dtype):
        t = torch.randn(*shape, generator=g) if low is None else torch.rand(*shape, generator=g) + low
        return (t * scale).to(device, dtype)

    return Inputs(rand(case.n, case.c_in, *case.hw).requires_grad_(),
                  rand(*w_shape, scale=0.3).requires_grad_(),
                  rand(case.c_out, low=0.5, dtype=bn_dtype).requires_grad_(),
                  rand(case.c_out, dtype=bn_dtype).requires_grad_(),
                  rand(case.c_out, dtype=bn_dtype), rand(case.c_out, low=0.5, dtype=bn_dtype))


def conv_kwargs(case: Case, training: bool) -> dict:
    return dict(stride=case.stride, padding=case.padding, output_padding=case.output_padding,
                transposed=case.transposed, training=training, activation=case.activation,
                negative_slope=0.1)


def run_both(case: Case, training: bool, seed: int = 0, dtype=torch.float32, device: str = DEVICE):
    """(fused outputs, reference outputs): out, running mean, running var, dx, dW, dgamma, dbeta."""
    inp = make_inputs(case, dtype, seed, device)
    kw = conv_kwargs(case, training)
    leaves = [t.detach().double().requires_grad_() for t in inp[:4]]
    ref_rm, ref_rv = inp.running_mean.double(), inp.running_var.double()
    ref = reference.conv_bn_act(*leaves, ref_rm, ref_rv, **kw)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1),
                           dtype=torch.float64).to(device)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out)

    rm, rv = inp.running_mean.clone(), inp.running_var.clone()
    out = FF.conv_bn_act(inp.x, inp.weight, inp.gamma, inp.beta, rm, rv, **kw)
    grads = torch.autograd.grad(out, inp[:4], grad_out.to(dtype))
    return (out, rm, rv, *grads), (ref, ref_rm, ref_rv, *ref_grads)


NAMES = ("out", "running_mean", "running_var", "dx", "dweight", "dgamma", "dbeta")


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_train_forward_backward(case):
    fused, ref = run_both(case, training=True)
    for name, a, b in zip(NAMES, fused, ref):
        assert rel_err(a, b) < TOL, name


@pytest.mark.parametrize("case", CASES[1::3] + CASES[9::3], ids=_ids)
def test_eval_forward_backward(case):
    fused, ref = run_both(case, training=False)
    for name, a, b in zip(NAMES, fused, ref):
        if name.startswith("running"):
            assert torch.equal(a, b.float()), f"{name} changed in eval mode"
        else:
            assert rel_err(a, b) < TOL, name


@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
def test_every_activation_train_and_eval(activation):
    transposed = reference.ACTIVATIONS.index(activation) % 2 == 1
    case = _case(transposed, 3, 3, 5, 4, 3, 2, 1, 1 if transposed else 0, activation)
    for training in (True, False):
        fused, ref = run_both(case, training)
        for name, a, b in zip(NAMES, fused, ref):
            assert rel_err(a, b) < TOL, (name, training)


@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-10)])
def test_activations_keep_relative_precision_at_every_scale(activation, dtype, tol):
    """Every element, from 1e-30 to 30 in magnitude: a generator's tanh output of 1e-5 is as exact
    as one of 0.5 (no cancellation in 1 - exp(-2|z|))."""
    magnitudes = torch.logspace(-30, 1.5, 500, dtype=torch.float64)
    z = torch.cat([magnitudes, -magnitudes, torch.tensor([0.0, 0.25, 0.2499999, 0.2500001]).double()])
    x = z.reshape(1, -1, 1, 1).expand(2, -1, 1, 1).to(DEVICE, dtype)
    ones = torch.ones(z.numel(), dtype=dtype, device=DEVICE)
    out = FF.bn_act(x, None, None, ones * 0, ones - 1e-5, training=False, eps=1e-5,
                    activation=activation)
    ref = getattr(torch, activation)(x.double())
    assert ((out.double() - ref).abs() / ref.abs().clamp_min(1e-300)).max().item() < tol


# Half precision moves z by ~1e-3, enough to flip relu / leaky_relu derivatives at a few
# elements and the gradients by a few percent (torch's own fp16 does the same): the reduced
# precision tests use smooth activations; the kinks are tested in fp32 above.
@pytest.mark.parametrize("case", [CASES[1]._replace(activation="tanh"), CASES[9]], ids=_ids)
def test_float16(case):
    fused, ref = run_both(case, training=True, dtype=torch.float16)
    assert fused[0].dtype == fused[3].dtype == fused[4].dtype == torch.float16
    for name, a, b in zip(NAMES, fused, ref):
        assert rel_err(a, b) < 1e-2, name


# The DCGAN 64x64 layers (width 64) at batch 8, generator then discriminator, with smooth
# activations (see test_float16).
DCGAN_CASES = [
    _case(True, 8, 100, 512, 1, 4, 1, 0, 0, "tanh"),
    _case(True, 8, 512, 256, 4, 4, 2, 1, 0, "tanh"),
    _case(True, 8, 128, 64, 16, 4, 2, 1, 0, "tanh"),
    _case(False, 8, 3, 64, 64, 4, 2, 1, 0, "sigmoid"),
    _case(False, 8, 128, 256, 16, 4, 2, 1, 0, "tanh"),
    _case(False, 8, 512, 1, 4, 4, 1, 0, 0, "sigmoid"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 5e-3), (torch.float16, 2e-2),
                                        (torch.bfloat16, 5e-2)], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", DCGAN_CASES, ids=_ids)
def test_gpu_dcgan_layers(monkeypatch, case, dtype, tol):
    """fp32 uses TF32 here (torch.backends.cudnn.allow_tf32, PyTorch's default), hence the looser
    fp32 bound."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    for training in (True, False):
        fused, ref = run_both(case, training, dtype=dtype, device="cuda")
        again, _ = run_both(case, training, dtype=dtype, device="cuda")
        for name, a, b, c in zip(NAMES, fused, ref, again):
            assert rel_err(a, b) < tol, (name, training)
            assert torch.equal(a, c), (name, "not deterministic")


@pytest.mark.gpu
def test_gpu_tuning_times_the_candidates(monkeypatch):
    """With tuning on (the default; the GPU session runs the suite with FASTGEN_AUTOTUNE=0), a
    layer's first call times the implementations and the tiles, and the result is still right."""
    monkeypatch.setenv("FASTGEN_AUTOTUNE", "1")
    tuners = (FF.CONV_IMPLEMENTATION_TUNER, kernels.GEMM_TUNER, kernels.WGRAD_TUNER)
    for tuner in tuners:
        monkeypatch.setattr(tuner, "chosen", {})
    for case in DCGAN_CASES[2:4]:
        fused, ref = run_both(case, training=True, dtype=torch.bfloat16, device="cuda")
        for name, a, b in zip(NAMES, fused, ref):
            assert rel_err(a, b) < 5e-2, (name, case)
    assert len(FF.CONV_IMPLEMENTATION_TUNER.chosen) == 2
    assert set(FF.CONV_IMPLEMENTATION_TUNER.chosen.values()) <= set(FF.CONV_IMPLEMENTATION_TUNER.candidates)
    # the fused implementation's kernels were timed in its trials, whichever won
    assert kernels.GEMM_TUNER.chosen and kernels.WGRAD_TUNER.chosen


@pytest.mark.parametrize("allow_tf32", [True, False])
def test_tf32_exactly_when_cudnn_allows_it(monkeypatch, allow_tf32):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow_tf32)
    cuda = torch.device("cuda", 0)
    assert kernels._precision(torch.float32, cuda) == ("tf32" if allow_tf32 else "ieee")
    assert kernels._precision(torch.float16, cuda) == kernels._precision(torch.bfloat16, cuda) == "ieee"
    assert kernels._precision(torch.float32, torch.device("cpu")) == "ieee"


@pytest.mark.gpu
@pytest.mark.parametrize("case", DCGAN_CASES[1::2], ids=_ids)
def test_gpu_fp32_without_tf32_is_exact(monkeypatch, case):
    """With TF32 off, fp32 on the GPU meets the fp32 bound of DESIGN.md."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    fused, ref = run_both(case, training=True, device="cuda")
    for name, a, b in zip(NAMES, fused, ref):
        assert rel_err(a, b) < 1e-4, name


@pytest.mark.gpu
@pytest.mark.parametrize("transposed", [False, True])
def test_gpu_past_2_31_elements(transposed):
    """Offsets past 2**31 elements (int64 indexing): x, the conv output and dL/dx each hold more
    than 2**31 elements (bf16, ~4.3 GB each); the last sample, whose offsets overflow int32, is
    checked against torch's conv on that sample alone, forward and input gradient."""
    torch.manual_seed(0)
    c_in, c_out, hw = 64, 64, 48
    n = 2**31 // (c_in * hw * hw) + 2
    conv = torch.nn.functional.conv_transpose2d if transposed else torch.nn.functional.conv2d
    x = torch.randn(n, c_in, hw, hw, device="cuda", dtype=torch.bfloat16,
                    memory_format=torch.channels_last).requires_grad_()
    w = (torch.randn(c_in, c_out, 3, 3, device="cuda") * 0.05).to(torch.bfloat16).requires_grad_()
    kw = dict(stride=1, padding=1, transposed=transposed, activation="tanh")
    out = FF.conv_bias_act(x, w, None, **kw)
    assert out.numel() > 2**31
    grad = torch.zeros_like(out)
    grad[-1] = torch.randn_like(out[-1])
    dx, = torch.autograd.grad(out, x, grad)
    last = x[-1:].detach().double().requires_grad_()
    ref = torch.tanh(conv(last, w.detach().double(), stride=1, padding=1))
    ref_dx, = torch.autograd.grad(ref, last, grad[-1:].double())
    assert rel_err(out[-1:], ref) < 2e-2
    assert rel_err(dx[-1:], ref_dx) < 2e-2
    assert dx[:-1].abs().max().item() == 0.0


def test_deterministic_bitwise():
    case = CASES[1]
    first, _ = run_both(case, training=True, seed=3)
    second, _ = run_both(case, training=True, seed=3)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("training", [True, False])  # the apply pass and the GEMM epilogue
def test_memory_formats_in_and_out(training):
    """Any input layout gives the same numbers; the output keeps the input's memory format, as
    PyTorch's conv and BN do."""
    case = CASES[1]
    inp = make_inputs(case)
    kw = conv_kwargs(case, training)
    x = inp.x.detach()
    layouts = {"nchw": x, "channels_last": x.to(memory_format=torch.channels_last),
               "strided": torch.cat([x, x], dim=3)[..., :case.hw[1]]}
    outs = {name: FF.conv_bn_act(t, inp.weight, inp.gamma, inp.beta, inp.running_mean.clone(),
                                 inp.running_var.clone(), **kw) for name, t in layouts.items()}
    for name, out in outs.items():
        assert torch.equal(out, outs["nchw"]), name
        channels_last = name == "channels_last"
        assert out.is_contiguous(memory_format=torch.channels_last) == channels_last, name
        assert out.is_contiguous() != channels_last, name
    outs["nchw"].view(case.n, -1)  # what a Flatten-by-view after the layer relies on


def test_no_affine_no_running_stats():
    case = CASES[9]
    inp = make_inputs(case)
    kw = conv_kwargs(case, True)
    out = FF.conv_bn_act(inp.x, inp.weight, None, None, None, None, **kw)
    ref = reference.conv_bn_act(inp.x.double(), inp.weight.double(), None, None, None, None, **kw)
    assert rel_err(out, ref) < TOL
    dx, = torch.autograd.grad(out.sum(), inp.x)
    ref_x = inp.x.detach().double().requires_grad_()
    ref_dx, = torch.autograd.grad(reference.conv_bn_act(ref_x, inp.weight.double(), None, None, None,
                                                        None, **kw).sum(), ref_x)
    assert rel_err(dx, ref_dx) < 1e-4  # the sum's gradient through BN is ~0: pure rounding


@pytest.mark.parametrize("transposed, training", [(False, True), (True, False)])
def test_gradcheck_float64(transposed, training):
    case = _case(transposed, 2, 2, 3, 3, 3, 2, 1, 1 if transposed else 0, "tanh")
    inp = make_inputs(case, dtype=torch.float64)
    kw = conv_kwargs(case, training)
    rm, rv = (None, None) if training else (inp.running_mean, inp.running_var)
    torch.autograd.gradcheck(lambda *t: FF.conv_bn_act(*t, rm, rv, **kw), tuple(inp[:4]),
                             fast_mode=True)


# ----------------------------------------------------------------------------------------------
# Degenerate forms: no BN (conv + bias + activation), BN without conv


@pytest.mark.parametrize("case", [CASES[3], CASES[11], CASES[12]], ids=_ids)
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv_bias_act(case, with_bias):
    inp = make_inputs(case)
    bias = inp.beta if with_bias else None
    kw = dict(stride=case.stride, padding=case.padding, output_padding=case.output_padding,
              transposed=case.transposed, activation=case.activation, negative_slope=0.1)
    leaves = [inp.x, inp.weight] + ([bias] if with_bias else [])
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference.conv_bias_act(ref_leaves[0], ref_leaves[1], ref_leaves[2] if with_bias else None, **kw)
    grad_out = torch.randn(ref.shape, dtype=torch.float64)
    out = FF.conv_bias_act(inp.x, inp.weight, bias, **kw)
    assert rel_err(out, ref) < TOL
    for a, b in zip(torch.autograd.grad(out, leaves, grad_out.float()),
                    torch.autograd.grad(ref, ref_leaves, grad_out)):
        assert rel_err(a, b) < TOL


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
def test_bn_act(training, activation):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 17, 5, 7, generator=g) * 2 + 1).requires_grad_()
    gamma = (torch.rand(17, generator=g) + 0.5).requires_grad_()
    beta = torch.randn(17, generator=g).requires_grad_()
    rm, rv = torch.randn(17, generator=g), torch.rand(17, generator=g) + 0.5
    kw = dict(training=training, activation=activation, momentum=0.3)
    leaves = [t.detach().double().requires_grad_() for t in (x, gamma, beta)]
    ref_rm, ref_rv = rm.double(), rv.double()
    ref = reference.bn_act(*leaves, ref_rm, ref_rv, **kw)
    grad_out = torch.randn(ref.shape, dtype=torch.float64)
    out = FF.bn_act(x, gamma, beta, rm, rv, **kw)
    assert rel_err(out, ref) < TOL and out.is_contiguous()
    assert rel_err(rm, ref_rm) < TOL and rel_err(rv, ref_rv) < TOL
    for a, b in zip(torch.autograd.grad(out, (x, gamma, beta), grad_out.float()),
                    torch.autograd.grad(ref, leaves, grad_out)):
        assert rel_err(a, b) < TOL


def test_gradcheck_bias_and_bn_forms():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    gamma = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    torch.autograd.gradcheck(
        lambda x, w, b: FF.conv_bias_act(x, w, b, stride=2, padding=1, output_padding=1,
                                         transposed=True, activation="sigmoid"),
        (x, w, b), fast_mode=True)
    torch.autograd.gradcheck(lambda x, gamma: FF.bn_act(x, gamma, None, None, None, activation="tanh"),
                             (x, gamma), fast_mode=True)


# ----------------------------------------------------------------------------------------------
# Bad input


def _args(**over):
    x = torch.randn(2, 3, 5, 5)
    args = dict(x=x, weight=torch.randn(4, 3, 3, 3), bn_weight=torch.ones(4), bn_bias=torch.zeros(4),
                running_mean=torch.zeros(4), running_var=torch.ones(4))
    args.update(over)
    return args


def _call(kwargs=None, **over):
    a = _args(**over)
    return FF.conv_bn_act(a["x"], a["weight"], a["bn_weight"], a["bn_bias"], a["running_mean"],
                          a["running_var"], **(kwargs or {}))


@pytest.mark.parametrize("over, kwargs, error, match", [
    (dict(x=torch.randn(2, 5, 5, 5)), None, ValueError, "x: expected 3 channels"),
    (dict(x=torch.randn(2, 5, 5, 5)), dict(transposed=True), ValueError, "x: expected 4 channels"),
    (dict(x=torch.randn(3, 5, 5)), None, ValueError, "x: expected a 4-d"),
    (dict(weight=torch.randn(4, 3, 3)), None, ValueError, "weight: expected a 4-d"),
    (dict(x=torch.randint(0, 3, (2, 3, 5, 5))), None, TypeError, "x: expected a floating"),
    (dict(weight=torch.randn(4, 3, 3, 3, dtype=torch.float64)), None, TypeError, "expected one dtype"),
    (dict(x=torch.randn(2, 3, 5, 5, device="meta")), None, ValueError, "one device"),
    (dict(running_mean=torch.zeros(4, device="meta")), None, ValueError, "one device"),
    (dict(bn_weight=torch.ones(5)), None, ValueError, r"bn_weight: expected shape \(4,\)"),
    (dict(x=torch.randn(1, 3, 3, 3)), None, ValueError,
     "Expected more than 1 value per channel when training"),
    (dict(running_mean=None, running_var=None), dict(training=False), ValueError, "eval mode"),
    (dict(running_var=None), None, ValueError, "both or neither"),
    (dict(), dict(output_padding=1), ValueError, "output_padding: only a transposed"),
    (dict(x=torch.randn(2, 4, 5, 5)), dict(transposed=True, stride=2, output_padding=2), ValueError,
     "smaller than stride"),
    (dict(), dict(stride=0), ValueError, "stride"),
    (dict(), dict(padding=-1), ValueError, "padding"),
    (dict(x=torch.randn(2, 3, 2, 2)), None, ValueError, "too small"),
    (dict(), dict(activation="gelu"), ValueError, "activation"),
])
def test_bad_input(over, kwargs, error, match):
    with pytest.raises(error, match=match):
        _call(kwargs, **over)


def test_one_value_per_channel_is_pytorchs_error():
    x = torch.randn(1, 3, 3, 3)
    with pytest.raises(ValueError) as ours:
        _call(x=x)
    with pytest.raises(ValueError) as theirs:
        reference.conv_bn_act(x, torch.randn(4, 3, 3, 3), None, None, None, None)
    assert str(ours.value) == str(theirs.value)


def test_reference_backend_matches():
    case = CASES[1]
    inp = make_inputs(case)
    kw = conv_kwargs(case, True)
    with fastgen.use_backend("reference"):
        out = FF.conv_bn_act(inp.x, inp.weight, inp.gamma, inp.beta, None, None, **kw)
    ref = reference.conv_bn_act(inp.x, inp.weight, inp.gamma, inp.beta, None, None, **kw)
    assert torch.equal(out, ref)


# ----------------------------------------------------------------------------------------------
# Kernel pieces that the small shapes above do not reach


def test_chan_combine_over_many_tiles():
    """More tiles than one combine step takes, of uneven sizes (and empty ones): mean, rstd and the
    running-statistics update equal torch's over the whole batch."""
    g = torch.Generator().manual_seed(7)
    n_tiles = 3 * kernels.COMBINE_T + 5
    counts = torch.randint(0, 9, (n_tiles,), generator=g)
    data = torch.randn(int(counts.sum()), 5, generator=g, dtype=torch.float64) * 3 + 2
    chunks = torch.split(data, counts.tolist())
    part = torch.zeros(3, n_tiles, 5, dtype=torch.float32)
    for i, chunk in enumerate(chunks):
        if len(chunk):
            part[0, i] = len(chunk)
            part[1, i] = chunk.mean(0)
            part[2, i] = ((chunk - chunk.mean(0)) ** 2).sum(0)
    gamma, beta = torch.rand(5, generator=g) + 0.5, torch.randn(5, generator=g)
    rm, rv = torch.randn(5, generator=g), torch.rand(5, generator=g) + 0.5
    stats = kernels.bn_combine_stats(part, gamma, beta, rm, rv, 0.25, 1e-5)
    mean, var = data.mean(0), data.var(0, unbiased=False)
    assert rel_err(stats[kernels.MEAN.value], mean) < TOL
    assert rel_err(stats[kernels.RSTD.value], (var + 1e-5).rsqrt()) < TOL
    assert rel_err(stats[4], 0.75 * rm.double() + 0.25 * mean) < TOL
    assert rel_err(stats[5], 0.75 * rv.double() + 0.25 * data.var(0, unbiased=True)) < TOL


@pytest.mark.parametrize("transposed", [False, True])
def test_weight_grad_split_reduction(monkeypatch, transposed):
    """The GPU splits the weight gradient's pixel sum across programs: same result, any split."""
    case = _case(transposed, 3, 3, 5, 16 if not transposed else 14, 3, 1 if not transposed else 2, 1,
                 1 if transposed else 0, "relu")
    monkeypatch.setattr(kernels, "INTERPRETER_WGRAD_PROGRAMS", 1000)
    fused, ref = run_both(case, training=True)
    assert rel_err(fused[4], ref[4]) < TOL


def test_autocast_casts_x_and_weight_like_conv2d():
    # A fused layer inside torch.autocast runs in the autocast dtype (float16 here: the CPU
    # interpreter has no bf16), with float32 parameters, as F.conv2d would.
    case = CASES[1]
    inp = make_inputs(case)
    kw = conv_kwargs(case, training=True)
    device_type = inp.x.device.type
    with torch.autocast(device_type, dtype=torch.float16):
        out = FF.conv_bn_act(inp.x, inp.weight, inp.gamma, inp.beta, None, None, **kw)
        (dx,) = torch.autograd.grad(out.float().sum(), inp.x)
    ref = reference.conv_bn_act(inp.x.detach().half().double(), inp.weight.detach().half().double(),
                                inp.gamma.double(), inp.beta.double(), None, None, **kw)
    assert out.dtype == torch.float16 and dx.dtype == torch.float32
    assert rel_err(out, ref) < 1e-2


# Shapes where every candidate tile is a different split of rows, columns and reduction
# (40 input and 70 output channels, 300 and 75 GEMM rows).
TILING_CASES = [_case(False, 3, 40, 70, 10, 3, 1, 1, 0, "leaky_relu"),
                _case(True, 3, 40, 70, 5, 4, 2, 1, 0, "relu")]


def _force_config(monkeypatch, tuner, config):
    """Make ``tuner`` run ``config`` alone (on CUDA: time it alone; in the interpreter: use it)."""
    monkeypatch.setattr(tuner, "candidates", (config,))
    monkeypatch.setattr(tuner, "interpreter", config)
    monkeypatch.setattr(tuner, "chosen", {})


@pytest.mark.parametrize("tuner_name, config", [
    *(("GEMM_TUNER", c) for c in kernels.GEMM_TUNER.candidates),
    *(("WGRAD_TUNER", c) for c in kernels.WGRAD_TUNER.candidates)], ids=str)
@pytest.mark.parametrize("case", TILING_CASES, ids=_ids)
def test_every_candidate_tile_is_correct(monkeypatch, tuner_name, config, case):
    """The tuner may pick any candidate on a GPU: each one, forward and backward, against float64."""
    _force_config(monkeypatch, getattr(kernels, tuner_name), config)
    fused, ref = run_both(case, training=True)
    for name, a, b in zip(NAMES, fused, ref):
        assert rel_err(a, b) < TOL, name


def test_no_tile_config_falls_back_to_the_reference(monkeypatch, timed_implementations):
    """When no block shape compiles for a shape, "auto" warns and runs the reference; "triton"
    raises the tuner's error."""
    _force_config(monkeypatch, FF.CONV_IMPLEMENTATION_TUNER, "fused")  # on a GPU: cuDNN would win
    monkeypatch.setattr(kernels.GEMM_TUNER, "benchmark_ms", _out_of_shared_memory)
    case = CASES[1]
    inp = make_inputs(case)
    with pytest.raises(NoCandidateError, match="conv_bn_act GEMM: no candidate"):
        FF.conv_bn_act(*inp, **conv_kwargs(case, True))
    backend.reset_failures()
    try:
        with fastgen.use_backend("auto"), pytest.warns(RuntimeWarning, match="NoCandidateError"):
            out = FF.conv_bn_act(*inp, **conv_kwargs(case, True))
        assert "conv_bn_act" in backend.failed_ops()
    finally:
        backend.reset_failures()
    ref = reference.conv_bn_act(*(t.detach() for t in inp), **conv_kwargs(case, True))
    assert rel_err(out, ref) < TOL


@pytest.fixture
def cudnn_gemm(monkeypatch):
    """Conv layers take the "cudnn-gemm" implementation: torch's conv + the fused BN passes."""
    _force_config(monkeypatch, FF.CONV_IMPLEMENTATION_TUNER, "cudnn-gemm")


@pytest.mark.parametrize("case", [CASES[1], CASES[9], CASES[12]], ids=_ids)
@pytest.mark.parametrize("training", [True, False])
def test_cudnn_gemm_implementation(cudnn_gemm, case, training):
    fused, ref = run_both(case, training)
    for name, a, b in zip(NAMES, fused, ref):
        assert rel_err(a, b) < TOL, (name, training)


@pytest.mark.parametrize("case", [CASES[3], CASES[11]], ids=_ids)
def test_cudnn_gemm_implementation_without_bn(cudnn_gemm, case):
    inp = make_inputs(case)
    kw = dict(stride=case.stride, padding=case.padding, output_padding=case.output_padding,
              transposed=case.transposed, activation=case.activation)
    out = FF.conv_bias_act(inp.x, inp.weight, inp.beta, **kw)
    ref = reference.conv_bias_act(inp.x.double(), inp.weight.double(), inp.beta.double(), **kw)
    assert rel_err(out, ref) < TOL


@pytest.fixture
def timed_implementations(monkeypatch):
    """Tuning on, with timers that run each trial once: returns the list of implementations timed.
    Each test pins the candidates it times (a GPU would time both)."""
    timed = []

    def run_once(fn):
        fn()
        timed.append(fn.args[0])
        return 1.0

    monkeypatch.setattr(_tuning, "tuning_enabled", lambda device: True)
    monkeypatch.setattr(FF.CONV_IMPLEMENTATION_TUNER, "benchmark_ms", run_once)
    for tuner in (kernels.GEMM_TUNER, kernels.WGRAD_TUNER):
        monkeypatch.setattr(tuner, "benchmark_ms", lambda fn: (fn(), 1.0)[1])
        monkeypatch.setattr(tuner, "chosen", {})
    return timed


def _out_of_shared_memory(fn):
    """A tuner timer under which no candidate fits in shared memory."""
    raise OutOfResources(300_000, 232_448, "shared memory")


@pytest.mark.parametrize("implementation", FF.CONV_IMPLEMENTATIONS)
def test_timing_an_implementation_leaves_no_trace(monkeypatch, timed_implementations, implementation):
    """The timing trial (forward and backward on detached copies) runs before the chosen
    implementation: the result, its gradients and the running statistics are those of one
    ordinary call, and the choice is kept for the shape."""
    _force_config(monkeypatch, FF.CONV_IMPLEMENTATION_TUNER, implementation)
    fused, ref = run_both(CASES[1], training=True)
    assert timed_implementations == [implementation]
    assert list(FF.CONV_IMPLEMENTATION_TUNER.chosen.values()) == [implementation]
    for name, a, b in zip(NAMES, fused, ref):
        assert rel_err(a, b) < TOL, name
    run_both(CASES[1], training=True, seed=1)
    assert timed_implementations == [implementation], "a shape is timed once"


@pytest.mark.parametrize("implementation", FF.CONV_IMPLEMENTATIONS)
def test_timing_inside_activation_checkpointing(monkeypatch, timed_implementations, implementation):
    """A layer first called inside torch.utils.checkpoint (non-reentrant) is timed there: the
    trial's saved tensors must stay out of the checkpoint's hooks."""
    _force_config(monkeypatch, FF.CONV_IMPLEMENTATION_TUNER, implementation)
    torch.manual_seed(0)
    layer = fastgen.nn.ConvBNAct(5, 17, 3, 2, 1, activation="leaky_relu").to(DEVICE)
    plain = torch.nn.Sequential(layer[0], layer[1], layer[2])
    x = torch.randn(3, 5, 7, 7, device=DEVICE, requires_grad=True)
    out = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
    dx, = torch.autograd.grad(out.square().sum(), x)
    assert timed_implementations == [implementation]
    with fastgen.use_backend("reference"):
        layer[1].running_mean.zero_(), layer[1].running_var.fill_(1.0)
        ref = plain(x)
        ref_dx, = torch.autograd.grad(ref.square().sum(), x)
    assert rel_err(out, ref) < TOL and rel_err(dx, ref_dx) < TOL


def test_cudnn_gemm_output_follows_x_memory_format(cudnn_gemm):
    """cuDNN answers a channels_last weight in channels_last; the layer's output follows x alone,
    as the fused implementation does."""
    case = CASES[9]
    inp = make_inputs(case)
    weight = inp.weight.detach().contiguous(memory_format=torch.channels_last)
    for bn in (True, False):
        kw = dict(stride=case.stride, padding=case.padding, output_padding=case.output_padding,
                  transposed=True, activation="relu")
        out = (FF.conv_bn_act(inp.x, weight, inp.gamma, inp.beta, None, None, **kw) if bn
               else FF.conv_bias_act(inp.x, weight, inp.beta, **kw))
        assert out.is_contiguous(), bn


def test_a_shape_whose_fused_kernels_fail_runs_cudnn_gemm(monkeypatch, timed_implementations):
    """With tuning on, an implementation whose trial fails (here: no tile compiles) drops out for
    that shape: the layer runs cuDNN's conv with the fused BN passes, and "auto" records no
    failure."""
    tuner = FF.CONV_IMPLEMENTATION_TUNER
    monkeypatch.setattr(tuner, "candidates_for", lambda device, *args, **kw: FF.CONV_IMPLEMENTATIONS)
    monkeypatch.setattr(tuner, "chosen", {})
    monkeypatch.setattr(kernels.GEMM_TUNER, "benchmark_ms", _out_of_shared_memory)
    backend.reset_failures()
    with fastgen.use_backend("auto"):
        fused, ref = run_both(CASES[1], training=True)
    assert backend.failed_ops() == {}
    assert timed_implementations == ["cudnn-gemm"], "the fused trial failed before it was timed"
    assert list(tuner.chosen.values()) == ["cudnn-gemm"]
    for name, a, b in zip(NAMES, fused, ref):
        assert rel_err(a, b) < TOL, name


@pytest.mark.parametrize("transposed", [False, True])
def test_more_pixels_than_int32_indexes_is_a_clear_error(transposed):
    """The GEMMs index pixels in int32 (elements in int64): 2**31 pixels is a ValueError naming
    the tensor, raised before anything is allocated or launched."""
    x = torch.zeros(1, 1, 1, 1).expand(2**31, 1, 1, 1)  # no memory behind the batch
    w = torch.zeros(1, 1, 1, 1)
    with pytest.raises(ValueError, match=r"input: 2147483648 pixels"):
        kernels.conv_stats_forward(x, w, (1, 1), (1, 1), (0, 0), transposed)
    with pytest.raises(ValueError, match=r"x: 2147483648 pixels"):
        kernels.conv_weight_grad(x, x, x, torch.zeros(8, 1), w.shape, (1, 1), (0, 0), transposed,
                                 ACTIVATIONS["relu"].code, 0.0, torch.float32)
