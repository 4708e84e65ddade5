"""StyleGAN2's modulated convolution (fastgen.functional.modulated_conv2d): the reference against
per-sample convolutions, the Triton kernels (CPU interpreter) against the float64 reference
forward and backward (x, weight, styles, noise, noise_strength, bias), the op's registration
(opcheck, second order) and input validation."""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

import fastgen
from fastgen import functional as FF
from fastgen import reference
from fastgen.kernels import modconv as kernels
from tests.conftest import DEVICE, TOL, rel_err


class Case(NamedTuple):
    batch: int
    c_in: int
    c_out: int
    hw: tuple[int, int]
    kernel: int
    padding: int
    up: int
    demodulate: bool
    noise: str  # "" none, "plain" noise alone, "strength" noise * a learned strength
    bias: bool
    activation: str
    gain: float


SQRT2 = math.sqrt(2.0)
# Odd sizes that break the tiles: batch 1 and 3, 5 -> 7 and 3 -> 33 channels, spatial 5..7 and
# not square, kernels 1, 3, 4, padding 0..2, up 1 and 2, each epilogue term on and off.
CASES = [
    Case(3, 5, 7, (5, 6), 3, 1, 1, True, "", False, "identity", 1.0),
    Case(3, 5, 7, (7, 5), 3, 1, 1, True, "strength", True, "leaky_relu", SQRT2),
    Case(3, 5, 7, (6, 6), 1, 0, 1, False, "", True, "leaky_relu", SQRT2),
    Case(1, 3, 33, (5, 7), 3, 2, 1, True, "plain", False, "tanh", 1.0),
    Case(3, 5, 7, (5, 6), 3, 1, 2, True, "strength", True, "leaky_relu", SQRT2),
    Case(3, 5, 7, (6, 5), 3, 0, 2, False, "", False, "identity", 1.0),
    Case(2, 5, 7, (5, 5), 4, 1, 2, True, "", True, "sigmoid", 1.0),
]


def _out_hw(case: Case) -> tuple[int, int]:
    if case.up == 1:
        return tuple(i + 2 * case.padding - case.kernel + 1 for i in case.hw)
    return tuple((i - 1) * 2 - 2 * case.padding + case.kernel for i in case.hw)


def _inputs(case: Case, dtype=torch.float32) -> dict:
    """Fresh leaves of a case: the positional tensors x, weight, styles and the keyword tensors."""
    leaf = lambda *shape: torch.randn(*shape, dtype=dtype, device=DEVICE).requires_grad_()  # noqa: E731
    tensors = dict(x=leaf(case.batch, case.c_in, *case.hw),
                   weight=leaf(case.c_out, case.c_in, case.kernel, case.kernel),
                   styles=leaf(case.batch, case.c_in))
    if case.noise:
        tensors["noise"] = leaf(case.batch, 1, *_out_hw(case))
    if case.noise == "strength":
        tensors["noise_strength"] = leaf(())
    if case.bias:
        tensors["bias"] = leaf(case.c_out)
    return tensors


def _call(fn, case: Case, tensors: dict) -> torch.Tensor:
    x, weight, styles = tensors["x"], tensors["weight"], tensors["styles"]
    extra = {k: v for k, v in tensors.items() if k not in ("x", "weight", "styles")}
    return fn(x, weight, styles, demodulate=case.demodulate, padding=case.padding, up=case.up,
              activation=case.activation, negative_slope=0.2, gain=case.gain, **extra)


def _float64(tensors: dict) -> dict:
    return {k: v.detach().double().requires_grad_() for k, v in tensors.items()}


def test_reference_is_stylegan2s_per_sample_convolution():
    """The reference's grouped convolution against its definition, one sample at a time, for up
    1 and 2 (the per-sample weight transposed to conv_transpose2d's (C_in, C_out, kH, kW))."""
    torch.manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, dtype=torch.float64)  # noqa: E731
    x, weight, styles = randn(3, 5, 6, 5), randn(7, 5, 3, 3), randn(3, 5)
    noise, strength, bias = randn(3, 1, 11, 9), randn(1), randn(7)
    for up in (1, 2):
        extra = dict(noise=noise, noise_strength=strength, bias=bias) if up == 2 else {}
        out = reference.modulated_conv2d(x, weight, styles, padding=1, up=up,
                                         activation="leaky_relu", gain=SQRT2, **extra)
        for b in range(3):
            w = weight * styles[b].view(1, -1, 1, 1)
            w = w / (w.square().sum((1, 2, 3), keepdim=True) + 1e-8).sqrt()
            if up == 1:
                y = F.conv2d(x[b:b + 1], w, padding=1)
            else:
                y = F.conv_transpose2d(x[b:b + 1], w.transpose(0, 1), stride=2, padding=1)
                y = y + strength * noise[b:b + 1] + bias.view(1, -1, 1, 1)
            assert rel_err(out[b:b + 1], F.leaky_relu(y, 0.2) * SQRT2) < 1e-13


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"up{c.up}-k{c.kernel}-p{c.padding}-"
                         f"{'demod' if c.demodulate else 'mod'}-{c.noise or 'nonoise'}-"
                         f"{'bias' if c.bias else 'nobias'}-{c.activation}")
def test_triton_forward_backward_against_the_reference(nan_poison, case):
    torch.manual_seed(CASES.index(case))
    tensors = _inputs(case)
    with fastgen.use_backend("triton"):
        out = _call(FF.modulated_conv2d, case, tensors)
    ref_tensors = _float64(tensors)
    ref = _call(reference.modulated_conv2d, case, ref_tensors)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert rel_err(out, ref) < TOL
    grad = torch.randn_like(out)
    with fastgen.use_backend("triton"):
        grads = torch.autograd.grad(out, list(tensors.values()), grad)
    ref_grads = torch.autograd.grad(ref, list(ref_tensors.values()), grad.double())
    for name, g, r in zip(tensors, grads, ref_grads):
        assert g.shape == r.shape, name
        assert rel_err(g, r) < TOL, name


def test_channels_last_in_channels_last_out_and_no_grad_saves_nothing():
    case = CASES[1]
    torch.manual_seed(1)
    tensors = {k: v.detach() for k, v in _inputs(case).items()}
    tensors["x"] = tensors["x"].contiguous(memory_format=torch.channels_last)
    with fastgen.use_backend("triton"):
        out = _call(FF.modulated_conv2d, case, tensors)
        _, y, demod = torch.ops.fastgen.modulated_conv2d(
            tensors["x"], tensors["weight"], tensors["styles"], None, None, None, True, 1, 1,
            1e-8, "identity", 0.2, 1.0, False)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert rel_err(out, _call(reference.modulated_conv2d, case, _float64(tensors))) < TOL
    assert y.numel() == 0 and demod.numel() == 0


def test_demodulation_kernel_over_several_blocks():
    """More output channels than a program's block and more (C_in, tap) columns than a step's."""
    torch.manual_seed(2)
    weight, styles = torch.randn(37, 19, 3, 3, device=DEVICE), torch.randn(2, 19, device=DEVICE)
    d = kernels.demodulation(weight, styles, 1e-8)
    assert d.shape == (2, 37) and d.dtype == torch.float32
    assert rel_err(d, reference.demodulation(weight.double(), styles.double())) < TOL


@pytest.mark.parametrize("name", ("triton", "reference"))
def test_reference_backend_and_triton_agree_with_the_reference(name):
    """The op on each backend, float64 (the kernels accumulate in float64 for float64 inputs)."""
    case = CASES[4]
    torch.manual_seed(3)
    tensors = _inputs(case, torch.float64)
    with fastgen.use_backend(name):
        out = _call(FF.modulated_conv2d, case, tensors)
        grads = torch.autograd.grad(out.square().sum(), list(tensors.values()))
    ref_tensors = _float64(tensors)
    ref = _call(reference.modulated_conv2d, case, ref_tensors)
    ref_grads = torch.autograd.grad(ref.square().sum(), list(ref_tensors.values()))
    # float64 throughout but for the leaky slope, a float32 in the reference path's derivative
    # (fastgen.activations) and, with the gain, a float32 kernel argument
    tol = 1e-9 if name == "reference" else 1e-7
    assert rel_err(out, ref) < tol
    for name_, g, r in zip(tensors, grads, ref_grads):
        assert rel_err(g, r) < tol, name_


@pytest.mark.parametrize("name", ("triton", "reference"))
def test_opcheck(name):
    """Schema, fake implementation, autograd registration and AOT dispatch of the forward op
    (with the saved tensors, and without them: the backward then recomputes them); schema and
    fake implementation of the backward op (its autograd: test_second_derivatives_*)."""
    torch.manual_seed(4)
    leaf = lambda *shape: torch.randn(*shape).requires_grad_()  # noqa: E731
    x, weight, styles = leaf(2, 3, 4, 5), leaf(4, 3, 3, 3), leaf(2, 3)
    noise, strength, bias = leaf(2, 1, 7, 9), leaf(1), leaf(4)
    ops = torch.ops.fastgen
    args = (x, weight, styles, noise, strength, bias, True, 1, 2, 1e-8, "leaky_relu", 0.2, SQRT2)
    with fastgen.use_backend(name):
        torch.library.opcheck(ops.modulated_conv2d, (*args, True))
        if name == "reference":  # the same op code on both paths, the interpreter's is slow
            torch.library.opcheck(ops.modulated_conv2d, (*args, False))
        _, y, demod = ops.modulated_conv2d(*args, True)
        torch.library.opcheck(
            ops.modulated_conv2d_backward,
            (torch.randn(2, 4, 7, 9), *args[:6], y.detach(), demod, *args[6:],
             [True, True, True, False, True, True]),
            test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("name", ("triton", "reference"))
def test_second_derivatives_are_the_references(name):
    """A gradient penalty through the op: ||d<out, v>/dx||^2 (create_graph=True), differentiated
    in every input and in v (the backward op's output gradient), against the reference's."""
    case = CASES[1]
    torch.manual_seed(5)
    tensors = _inputs(case)
    v = torch.randn(case.batch, case.c_out, *_out_hw(case), device=DEVICE).requires_grad_()

    def penalty(fn, ts, v):
        (dx,) = torch.autograd.grad(_call(fn, case, ts), ts["x"], v, create_graph=True)
        return torch.autograd.grad(dx.square().sum(), [*ts.values(), v], allow_unused=True)

    with fastgen.use_backend(name):
        grads = penalty(FF.modulated_conv2d, tensors, v)
    ref_grads = penalty(reference.modulated_conv2d, _float64(tensors), v.detach().double().requires_grad_())
    for key, g, r in zip([*tensors, "v"], grads, ref_grads):
        assert (g is None) == (r is None), key
        if r is not None:
            assert rel_err(g, r) < TOL, key


def test_autocast_casts_x_weight_and_styles():
    torch.manual_seed(7)
    x, weight, styles = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3), torch.randn(2, 3)
    with fastgen.use_backend("reference"), torch.autocast("cpu", dtype=torch.bfloat16):
        out = FF.modulated_conv2d(x, weight, styles, padding=1, bias=torch.randn(4))
    assert out.dtype == torch.bfloat16


def _bad(**changes):
    x, weight, styles = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3), torch.randn(2, 3)
    args = dict(x=x, weight=weight, styles=styles)
    args.update(changes)
    return args


@pytest.mark.parametrize("args, error, match", [
    (_bad(x=torch.randn(3, 5, 5)), ValueError, "x: expected a 4-d tensor"),
    (_bad(styles=torch.randn(2, 4)), ValueError, r"styles: expected shape \(B, C_in\)"),
    (_bad(weight=torch.randn(4, 2, 3, 3)), ValueError, "x: expected 2 channels"),
    (_bad(styles=torch.randn(2, 3, dtype=torch.float64)), TypeError, "expected one dtype"),
    (_bad(styles=torch.ones(2, 3, dtype=torch.long)), TypeError, "styles: expected a floating"),
    (_bad(up=3), ValueError, "up: expected 1 or 2"),
    (_bad(padding=-1), ValueError, "padding: expected an int >= 0"),
    (_bad(padding=(1, 1)), TypeError, "padding: expected an int"),
    (_bad(x=torch.randn(2, 3, 2, 2)), ValueError, "x: spatial size"),
    (_bad(noise=torch.randn(2, 3, 3, 3)), ValueError, r"noise: expected shape \(B, 1, H_out, W_out\)"),
    (_bad(noise=torch.randn(2, 1, 3, 3), noise_strength=torch.randn(2)), ValueError,
     "noise_strength: expected a 0-dim or"),
    (_bad(noise_strength=torch.randn(())), ValueError, "noise_strength: given without noise"),
    (_bad(bias=torch.randn(3)), ValueError, r"bias: expected shape \(4,\)"),
    (_bad(activation="gelu"), ValueError, "activation: expected one of"),
    (_bad(eps=0.0), ValueError, "eps: expected a positive value"),
    (_bad(gain="2"), TypeError, "gain: expected a float"),
])
def test_bad_arguments_name_the_argument(args, error, match):
    with pytest.raises(error, match=match):
        FF.modulated_conv2d(args.pop("x"), args.pop("weight"), args.pop("styles"), **args)


def test_backward_beyond_a_cuda_grid_axis_is_a_clear_error():
    """The epilogue backward puts the samples on the grid's third axis (at most 65535): a larger
    batch is a ValueError naming y before any launch, not a failed launch."""
    y = torch.zeros(65536, 1, 1, 1)
    with pytest.raises(ValueError, match="y: 65536 samples"):
        kernels.epilogue_grads(y, y, torch.ones(65536, 1), None, None, None, 0, 0.2, 1.0)
