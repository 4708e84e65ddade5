"""Class-conditional BatchNorm (BigGAN): bn_act and conv_bn_act with a per-sample affine, gamma and
beta of shape (N, C). The Triton kernels (CPU interpreter) against the float64 reference, forward
(output, running statistics) and backward (dx, dweight, per-sample dgamma and dbeta), on shapes
whose row blocks end inside a sample; the registered ops (opcheck), second derivatives, the
argument checks, the per-channel form as the special case of equal rows, and a synchronized BN
over two gloo ranks. This file is also that test's worker: ``python tests/test_conditional_bn.py
RANK PORT OUT_DIR``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import fastgen
from fastgen import functional as FF
from fastgen import reference
from fastgen.kernels import conv_bn_act as kernels
from tests.conftest import TOL, rel_err, spawn_ranks

BATCH, CHANNELS = 3, 5
# (gamma, beta) per sample (True) or per channel (False); None: no such parameter.
AFFINES = {"both": (True, True), "gamma": (True, False), "beta": (False, True),
           "gamma_only": (True, None)}


@pytest.fixture(autouse=True)
def poisoned(nan_poison):
    """Unwritten kernel outputs show as NaN."""


def _inputs(x_shape, w_shape, affine: tuple, dtype: torch.dtype, seed: int = 0,
            param_dtype: torch.dtype | None = None) -> dict:
    """x, weight (None without a conv: BN of x alone), gamma and beta per sample (N, C), per
    channel (C,) or None as ``affine`` says, running statistics; ``param_dtype``: the BN
    parameters' and buffers' dtype (default ``dtype``)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(s, generator=g, dtype=torch.float64)  # noqa: E731
    batch, channels = x_shape[0], CHANNELS if w_shape else x_shape[1]
    params = [None if per_sample is None else
              (rand(*((batch, channels) if per_sample else (channels,))) + shift).to(param_dtype or dtype)
              for per_sample, shift in zip(affine, (1.0, 0.0))]
    return dict(x=rand(*x_shape).to(dtype), weight=None if w_shape is None else 0.3 * rand(*w_shape).to(dtype),
                gamma=params[0], beta=params[1], running_mean=rand(channels).to(param_dtype or dtype),
                running_var=(rand(channels).abs() + 0.5).to(param_dtype or dtype))


def _run(fn, inputs: dict, kwargs: dict, grad_out: torch.Tensor | None = None, dtype=None):
    """fn's output, running statistics after the call and gradients of (out * grad_out).sum()
    for every tensor input but the buffers; inputs copied (cast to ``dtype``) first."""
    cast = {k: None if v is None else v.detach().to(dtype or v.dtype, copy=True)
            for k, v in inputs.items()}
    leaves = [cast[k].requires_grad_() for k in ("x", "weight", "gamma", "beta") if cast[k] is not None]
    args = [cast["x"]] + ([cast["weight"]] if cast["weight"] is not None else [])
    out = fn(*args, cast["gamma"], cast["beta"], cast["running_mean"], cast["running_var"], **kwargs)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return [out, cast["running_mean"], cast["running_var"], *grads], grad_out


def _check_against_reference(fused_fn, ref_fn, inputs: dict, kwargs: dict) -> None:
    ref, grad_out = _run(ref_fn, inputs, kwargs, dtype=torch.float64)
    with fastgen.use_backend("triton"):
        got, _ = _run(fused_fn, inputs, kwargs, grad_out)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.shape == b.shape, i
        assert rel_err(a, b) < TOL, (i, rel_err(a, b))


# 15 x 11 = 165 pixels per sample: two interpreter row blocks (128), the second ending inside it.
@pytest.mark.parametrize("affine, activation", [
    ("both", "identity"), ("both", "relu"), ("both", "leaky_relu"), ("gamma", "leaky_relu"),
    ("beta", "relu"), ("gamma_only", "leaky_relu")], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_act_matches_the_reference(affine, training, activation):
    inputs = _inputs((BATCH, CHANNELS, 15, 11), None, AFFINES[affine], torch.float32)
    kwargs = dict(training=training, momentum=0.3, activation=activation, negative_slope=0.1)
    _check_against_reference(FF.bn_act, reference.bn_act, inputs, kwargs)


@pytest.mark.parametrize("shape, training", [((1, 5, 1, 3), True), ((2, 5, 1, 1), False),
                                             ((4, 3, 1, 1), True), ((3, 1, 1, 1), False)], ids=str)
def test_bn_act_batch_and_pixel_edges(shape, training):
    """One sample, one pixel per sample, one channel (not in training: with two values per
    channel dx is mostly cancellation, which fp32 cannot match to 1e-5)."""
    inputs = _inputs(shape, None, AFFINES["both"], torch.float32)
    _check_against_reference(FF.bn_act, reference.bn_act, inputs,
                             dict(training=training, activation="leaky_relu"))


def test_bn_act_float16():
    """float16 activations with float32 parameters (as under autocast): statistics and the affine
    in float32, within fp16's tolerance."""
    inputs = _inputs((BATCH, CHANNELS, 7, 5), None, AFFINES["both"], torch.float16,
                     param_dtype=torch.float32)
    ref, grad_out = _run(reference.bn_act, inputs, dict(activation="relu"), dtype=torch.float64)
    with fastgen.use_backend("triton"):
        got, _ = _run(FF.bn_act, inputs, dict(activation="relu"), grad_out.half())
    assert got[0].dtype == torch.float16 and got[4].dtype == torch.float32
    for i, (a, b) in enumerate(zip(got, ref)):
        assert rel_err(a, b) < 1e-2, i


CONVS = {  # (x shape, weight shape, geometry)
    "conv": ((BATCH, 3, 7, 5), (CHANNELS, 3, 3, 3), dict(stride=1, padding=1)),
    "convT": ((BATCH, 4, 3, 5), (4, CHANNELS, 4, 3),
              dict(stride=2, padding=1, output_padding=1, transposed=True)),
}


@pytest.fixture(params=["fused", "cudnn-gemm"])
def implementation(request, monkeypatch):
    """Which conv implementation the Triton backend runs (as the CUDA tuner may choose)."""
    tuner = FF.CONV_IMPLEMENTATION_TUNER
    monkeypatch.setattr(tuner, "candidates", (request.param,))
    monkeypatch.setattr(tuner, "interpreter", request.param)
    monkeypatch.setattr(tuner, "chosen", {})
    return request.param


@pytest.mark.parametrize("conv, training, activation", [
    ("conv", True, "relu"), ("convT", True, "relu"), ("conv", False, "leaky_relu"),
    ("convT", False, "leaky_relu"), ("convT", True, "identity")], ids=str)
def test_conv_bn_act_matches_the_reference(implementation, conv, training, activation):
    x_shape, w_shape, geometry = CONVS[conv]
    inputs = _inputs(x_shape, w_shape, AFFINES["both"], torch.float32)
    kwargs = dict(geometry, training=training, momentum=0.3, activation=activation)
    _check_against_reference(FF.conv_bn_act, reference.conv_bn_act, inputs, kwargs)


def test_conv_bn_act_mixed_affine():
    """A per-sample gamma with a per-channel beta: beta's gradient is summed over the samples."""
    x_shape, w_shape, geometry = CONVS["conv"]
    inputs = _inputs(x_shape, w_shape, AFFINES["gamma"], torch.float32)
    _check_against_reference(FF.conv_bn_act, reference.conv_bn_act, inputs,
                             dict(geometry, activation="leaky_relu"))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_equal_rows_are_the_per_channel_affine(training, backend):
    """gamma and beta repeated over the batch give the per-channel op's numbers; the per-sample
    gradients sum to the per-channel ones."""
    per_channel = _inputs((BATCH, CHANNELS, 4, 5), None, (False, False), torch.float32)
    per_sample = dict(per_channel, gamma=per_channel["gamma"].expand(BATCH, CHANNELS).contiguous(),
                      beta=per_channel["beta"].expand(BATCH, CHANNELS).contiguous())
    kwargs = dict(training=training, activation="leaky_relu")
    with fastgen.use_backend(backend):
        want, grad_out = _run(FF.bn_act, per_channel, kwargs)
        got, _ = _run(FF.bn_act, per_sample, kwargs, grad_out)
    for i, (a, b) in enumerate(zip(got[:4], want[:4])):  # out, running stats, dx
        assert rel_err(a, b) < TOL, i
    for a, b in zip(got[4:], want[4:]):  # dgamma, dbeta
        assert a.shape == (BATCH, CHANNELS) and rel_err(a.sum(0), b) < TOL


def test_per_sample_kernels_are_deterministic():
    """Reruns are bit-identical: fixed-order reductions over per-sample tiles."""
    x_shape, w_shape, geometry = CONVS["convT"]
    inputs = _inputs(x_shape, w_shape, AFFINES["both"], torch.float32)
    with fastgen.use_backend("triton"):
        first, grad_out = _run(FF.conv_bn_act, inputs, geometry)
        second, _ = _run(FF.conv_bn_act, inputs, geometry, grad_out)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_sample_grad_coef_kernel():
    """The per-sample reduction pass itself: per-sample sums over (h, w) of g and g * xhat, and
    the channel rows weighted by gamma[n] (bn_act_sample_grad_coef's contract)."""
    g = torch.Generator().manual_seed(3)
    n, h, w, c = BATCH, 13, 11, 17  # 143 rows per sample: blocks of 128 end inside a sample
    y, dout = (torch.randn(n, h, w, c, generator=g) for _ in range(2))
    mean, rstd = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5
    fwd_coef = torch.stack([rstd, -mean * rstd, mean, rstd])
    affine = torch.stack([torch.randn(n, c, generator=g) + 1, torch.randn(n, c, generator=g)])
    coef, sample_grads = kernels.bn_act_sample_grad_coef(dout, y, fwd_coef, affine, 2, 0.1, True)
    xhat = ((y - mean) * rstd).double()
    z = xhat * affine[0, :, None, None].double() + affine[1, :, None, None].double()
    dz = dout.double() * torch.where(z > 0, 1.0, 0.1)
    dgamma, dbeta = (dz * xhat).sum((1, 2)), dz.sum((1, 2))
    assert rel_err(sample_grads[0], dgamma) < TOL and rel_err(sample_grads[1], dbeta) < TOL
    weighted = (dgamma * affine[0].double()).sum(0), (dbeta * affine[0].double()).sum(0)
    assert rel_err(coef[kernels.DGAMMA.value], weighted[0]) < TOL
    assert rel_err(coef[kernels.DBETA.value], weighted[1]) < TOL
    assert rel_err(coef[kernels.DGAMMA_MEAN.value], weighted[0] / (n * h * w)) < TOL
    assert rel_err(coef[kernels.DBETA_MEAN.value], weighted[1] / (n * h * w)) < TOL
    assert torch.equal(coef[:4], fwd_coef)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_opcheck_with_per_sample_affine(backend):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 3, 4, generator=g)
    gamma, beta = torch.randn(2, 3, generator=g) + 1, torch.randn(2, 3, generator=g)
    rm, rv = torch.zeros(3), torch.ones(3)
    w = torch.randn(3, 3, 3, 3, generator=g)
    ops = torch.ops.fastgen
    samples = [
        (ops.bn_act, (x, gamma, beta, rm.clone(), rv.clone(), True, 0.1, 1e-5, "relu", 0.2)),
        (ops.bn_act, (x, gamma, None, rm.clone(), rv.clone(), False, 0.1, 1e-5, "leaky_relu", 0.2)),
        (ops.conv_bn_act, (x, w, gamma, beta[0], rm.clone(), rv.clone(), [1, 1], [1, 1], [0, 0],
                           False, True, 0.1, 1e-5, "leaky_relu", 0.2, True)),
    ]
    with fastgen.use_backend(backend):
        for op, args in samples:
            torch.library.opcheck(op, args)


SECOND_ORDER = {  # op, its functions (fused, reference), input shapes (x, [weight,] gamma, beta), keywords
    "bn_act": (FF.bn_act, reference.bn_act, ((2, 3, 3, 2), (2, 3), (2, 3)),
               dict(activation="leaky_relu")),
    "conv_bn_act": (FF.conv_bn_act, reference.conv_bn_act, ((2, 3, 4, 4), (3, 3, 3, 3), (2, 3), (3,)),
                    dict(padding=1, activation="tanh")),
}


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("op", SECOND_ORDER)
def test_second_derivatives_are_the_references(op, backend, training):
    """d/dinputs of a squared-gradient penalty through the op with a per-sample affine (the
    reference's double backward), float64."""
    fused, ref, shapes, kw = SECOND_ORDER[op]
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]
    rm, rv = torch.randn(3, dtype=torch.float64, generator=g), torch.rand(3, dtype=torch.float64) + 0.5

    def second_order(fn):
        out = fn(*inputs, rm.clone(), rv.clone(), training=training, **kw)
        grads = torch.autograd.grad(out, inputs, torch.ones_like(out).cumsum(0), create_graph=True)
        return [t.detach() for t in grads], torch.autograd.grad(sum(t.square().sum() for t in grads), inputs)

    with fastgen.use_backend(backend):
        grads, seconds = second_order(fused)
    ref_grads, ref_seconds = second_order(ref)
    for got, want in zip(grads + list(seconds), ref_grads + list(ref_seconds)):
        assert rel_err(got, want) < 1e-7


@pytest.mark.parametrize("name, shape", [
    ("bn_weight", (BATCH + 1, CHANNELS)), ("bn_bias", (BATCH, CHANNELS + 1)),
    ("bn_weight", (CHANNELS + 1,)), ("bn_bias", (BATCH, CHANNELS, 1)), ("bn_weight", (1, CHANNELS)),
])
def test_bad_affine_shapes_are_named(name, shape):
    x = torch.randn(BATCH, CHANNELS, 4, 4)
    params = {"bn_weight": None, "bn_bias": None, name: torch.randn(shape)}
    with pytest.raises(ValueError, match=rf"{name}: expected shape \({CHANNELS},\) \(per channel\) "
                                         rf"or \({BATCH}, {CHANNELS}\) \(per sample\)"):
        FF.bn_act(x, params["bn_weight"], params["bn_bias"], None, None)
    w = torch.randn(CHANNELS, CHANNELS, 1, 1)
    with pytest.raises(ValueError, match=rf"{name}: expected shape"):
        FF.conv_bn_act(x, w, params["bn_weight"], params["bn_bias"], None, None)


def test_more_samples_than_a_grid_axis_is_a_clear_error():
    n = kernels.MAX_GRID_Z + 1
    y, coef, affine = torch.zeros(n, 1, 1, 1), torch.zeros(4, 1), torch.zeros(2, n, 1)
    with pytest.raises(ValueError, match=f"y: {n} samples; a per-sample BN affine takes at most"):
        kernels.bn_act_apply(y, coef, 0, 0.0, False, affine)


# ----------------------------------------------------------------------------------------------
# Synchronized BN with a per-sample affine: two gloo ranks on loopback, shards of 1 and 2 samples


SHARDS = (1, 2)


def _sync_inputs() -> tuple[dict, torch.Tensor]:
    inputs = _inputs((sum(SHARDS), CHANNELS, 5, 3), None, AFFINES["both"], torch.float32, seed=4)
    grad_out = torch.randn(inputs["x"].shape, generator=torch.Generator().manual_seed(5))
    return inputs, grad_out


def _sync_worker(rank: int, port: int, out_dir: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=len(SHARDS))
    inputs, grad_out = _sync_inputs()
    shard = {k: v if k.startswith("running") else v.split(SHARDS)[rank] for k, v in inputs.items()
             if v is not None}
    kwargs = dict(activation="leaky_relu", momentum=0.3, process_group=dist.group.WORLD)
    results = {}
    for backend in ("triton", "reference"):
        with fastgen.use_backend(backend):
            results[backend] = _run(FF.bn_act, dict(shard, weight=None), kwargs,
                                    grad_out.split(SHARDS)[rank])[0]
    dist.destroy_process_group()
    torch.save(results, out_dir / f"rank{rank}.pt")


def test_synchronized_shards_equal_the_whole_batch(tmp_path):
    """Per-sample affine with a process group: output, dx and the per-sample dgamma, dbeta
    (concatenated over the ranks) and the running statistics (on every rank) are the whole
    batch's, on both backends."""
    ranks = spawn_ranks(__file__, len(SHARDS), tmp_path, timeout_s=300)
    inputs, grad_out = _sync_inputs()
    want, _ = _run(reference.bn_act, inputs, dict(activation="leaky_relu", momentum=0.3), grad_out,
                   dtype=torch.float64)
    for backend in ("triton", "reference"):
        got = [r[backend] for r in ranks]
        for i in (0, 3, 4, 5):  # out, dx, dgamma, dbeta: per sample
            assert rel_err(torch.cat([g[i] for g in got]), want[i]) < TOL, (backend, i)
        for i in (1, 2):  # running statistics
            assert all(rel_err(g[i], want[i]) < TOL for g in got), (backend, i)


if __name__ == "__main__":
    _sync_worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
