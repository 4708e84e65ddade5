"""Ahead-of-time compile report: every Triton kernel specialization fastgen can launch, compiled
for sm_90a (H100/H200) and sm_80 (A100) on a machine without a GPU, and what its cubin says.

    python benchmarks/compile_report.py [--target sm90a|sm80|all] [--subset ci|full] [--jobs N]

writes ``benchmarks/results/compile-<target>.{md,json}`` (``--out`` elsewhere).

How the specializations are found, so that a new variant cannot be forgotten:

1. Every host function of the kernel modules is called with small CPU tensors, once per argument
   value that reaches a constexpr (activation, transposed, store_pre, training, ...) and per dtype,
   while the kernels' launches are intercepted: nothing runs, the launch's arguments are recorded.
   Every ``*_kernel`` of a module must be launched by some call, or the plan fails.
2. The CPU-only choices in a recorded launch (interpreter tiles) are replaced by the GPU's: each
   tile candidate of the conv tuners for the target (``Tuner.candidates_for``), the CUDA block
   sizes of the elementwise passes, and the tiles the reparameterization and BCE host code pick
   on CUDA over a sweep of shapes. fp32 GEMMs compile once more with TF32.
3. Triton's own launch binder specializes the arguments for the target as a launch would: 16-byte
   aligned pointers and integers divisible by 16 get ``tt.divisibility``, integers equal to 1
   become constants. Aligned shapes round every integer argument other than 1 up to a multiple
   of 16; one more variant per kernel has misaligned pointers and no integer divisible by 16.

Each specialization is compiled with ``triton.compile`` in a process pool (without
TRITON_INTERPRET, which the test suite sets); ``cuobjdump`` (shipped with triton) reads the
registers and local memory from the cubin and counts wgmma (HGMMA), mma (HMMA), cp.async
(LDGSTS) and TMA (UTMALDG) instructions in its SASS. Occupancy follows the CUDA occupancy
calculator: registers are allocated per warp in units of 256, shared memory per block with 1 KB
reserved by the driver.

The ``ci`` subset (the CI gate, tests/test_compile_gate.py, a few minutes on 2 cores) keeps the
aligned default-tile specializations (of shape-chosen tiles, the largest) in fp32, TF32 and bf16
with one activation (CI_ACTIVATION), every tuner candidate for one variant per GEMM kernel and
dtype and host function, and the misaligned variant of each kernel.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass(frozen=True)
class Target:
    """A GPU the report compiles for, with the per-block and per-SM limits occupancy depends on."""

    name: str
    arch: int
    smem_per_block: int  # the most one block may opt in to
    smem_per_sm: int
    regs_per_sm: int = 65536
    max_threads_per_sm: int = 2048
    max_ctas_per_sm: int = 32


TARGETS = {
    "sm90a": Target("sm90a", 90, smem_per_block=227 * 1024, smem_per_sm=228 * 1024),
    "sm80": Target("sm80", 80, smem_per_block=163 * 1024, smem_per_sm=164 * 1024),
}
DTYPES = ("fp32", "tf32", "fp16", "bf16")
SASS_COUNTS = {"wgmma": "HGMMA", "mma": "HMMA", "cp_async": "LDGSTS", "tma": "UTMALDG"}


@dataclasses.dataclass(frozen=True)
class Spec:
    """One specialization: a kernel, the host call that launches it, dtype, tile, alignment."""

    kernel: str  # module.kernel
    variant: str  # the host call, e.g. conv_affine_act_forward(transposed=True, activation='tanh')
    dtype: str  # DTYPES
    tile: str  # the GPU-chosen constexprs and launch options
    default: bool  # the tuner's untimed default; of tiles chosen by shape, the largest
    tuner: str | None  # the tuner whose candidate the tile is, if any
    aligned: bool
    ci: bool  # in the CI gate's subset


# ----------------------------------------------------------------------------------------------
# The plan: host calls with intercepted launches, GPU tiles substituted


@dataclasses.dataclass
class FakeTensor:
    """What the launch binder needs of a tensor argument: its dtype and address."""

    dtype: Any
    address: int

    def data_ptr(self) -> int:
        return self.address


@dataclasses.dataclass
class Launch:
    """One recorded launch: kernel, the host call, positional arguments and keyword arguments."""

    kernel: Any
    variant: str
    dtype: str
    args: tuple
    kwargs: dict


def _record(kernels: list, variant: str, dtype: str, call: Callable[[], object]) -> list[Launch]:
    """Run ``call`` with the launches of ``kernels`` intercepted: the launches it would make."""
    import torch

    launches = []
    for kernel in kernels:
        def run(*args, grid, warmup, _kernel=kernel, **kwargs):
            args = tuple(FakeTensor(a.dtype, 0) if isinstance(a, torch.Tensor) else a for a in args)
            launches.append(Launch(_kernel, variant, dtype, args, kwargs))

        kernel.run = run  # shadows JITFunction.run: fn[grid](...) ends here
    try:
        call()
    finally:
        for kernel in kernels:
            del kernel.run
    return launches


def _kernels(module) -> list:
    from triton.runtime.jit import JITFunction

    return [v for k, v in vars(module).items() if isinstance(v, JITFunction) and k.endswith("_kernel")]


def _calls(**domains) -> Iterator[dict]:
    """Every combination of the keyword values in ``domains``."""
    keys = list(domains)
    for values in itertools.product(*domains.values()):
        yield dict(zip(keys, values))


def _label(name: str, kwargs: dict) -> str:
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"


Tiles = list[tuple[dict, bool, "str | None"]]  # (constexpr and option overrides, default, tuner name)
# The dtypes the conv GEMM family is planned in (TF32 follows from fp32), as torch dtype names.
GEMM_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _conv_launches(target: Target) -> Iterator[tuple[Launch, Tiles]]:
    """Launches of kernels/conv_bn_act.py with their GPU tiles."""
    import torch
    from fastgen.activations import ACTIVATIONS
    from fastgen.kernels import conv_bn_act as K

    acts = tuple(ACTIVATIONS)  # names label the variants; the kernels take each one's code
    code = lambda name: ACTIVATIONS[name].code  # noqa: E731
    bools = (False, True)
    n, hw, c = 2, 16, 64

    def tensors(dtype):
        x = torch.randn(n, hw, hw, c, dtype=dtype)
        out = torch.randn(n, hw // 2, hw // 2, c, dtype=dtype)  # the conv's output, k4 s2 p1
        w = torch.randn(c, c, 4, 4, dtype=dtype)
        coef = torch.randn(8, c)
        return x, out, w, coef

    affine = torch.randn(2, n, c)  # a per-sample BN affine (gamma, beta rows), coef's dtype

    geom = dict(stride=(2, 2), padding=(1, 1))
    calls = {
        "conv_stats_forward": (dict(transposed=bools), lambda x, o, w, coef, transposed: (
            K.conv_stats_forward(o if transposed else x, w, (hw, hw) if transposed else (hw // 2,) * 2,
                                 transposed=transposed, **geom))),
        "conv_affine_act_forward": (dict(transposed=bools, activation=acts, store_pre=bools),
                                    lambda x, o, w, coef, transposed, activation, store_pre: (
            K.conv_affine_act_forward(o if transposed else x, w, (hw, hw) if transposed else (hw // 2,) * 2,
                                      transposed=transposed, coef=coef, activation=code(activation),
                                      negative_slope=0.2, store_pre=store_pre, channels_last=True, **geom))),
        "conv_input_grad": (dict(transposed=bools, activation=acts), lambda x, o, w, coef, transposed, activation: (
            K.conv_input_grad(x if transposed else o, x if transposed else o, coef, w,
                              (hw // 2,) * 2 if transposed else (hw, hw), transposed=transposed,
                              activation=code(activation), negative_slope=0.2, **geom))),
        "conv_weight_grad": (dict(transposed=bools, activation=acts), lambda x, o, w, coef, transposed, activation: (
            K.conv_weight_grad(o if transposed else x, x if transposed else o, x if transposed else o, coef,
                               w.shape, transposed=transposed, activation=code(activation), negative_slope=0.2,
                               dtype=torch.float32, **geom))),
        "bn_partial_stats": ({}, lambda x, o, w, coef: K.bn_partial_stats(x)),
        "bn_combine_stats": (dict(running=bools), lambda x, o, w, coef, running: K.bn_combine_stats(
            torch.rand(3, 4, c), coef[0], coef[1], coef[2] if running else None,
            coef[3] if running else None, 0.1, 1e-5)),
        "bn_act_apply": (dict(activation=acts, channels_last=bools, per_sample=bools),
                         lambda x, o, w, coef, activation, channels_last, per_sample: (
            K.bn_act_apply(x, coef, code(activation), 0.2, channels_last, affine if per_sample else None))),
        "bn_act_grad_coef": (dict(activation=acts, training=bools), lambda x, o, w, coef, activation, training: (
            K.bn_act_grad_coef(x, x, coef, code(activation), 0.2, training))),
        "bn_act_sample_grad_coef": (dict(activation=acts, training=bools), lambda x, o, w, coef, activation, training: (
            K.bn_act_sample_grad_coef(x, x, coef, affine, code(activation), 0.2, training))),
        "bn_act_input_grad": (dict(activation=acts, per_sample=bools), lambda x, o, w, coef, activation, per_sample: (
            K.bn_act_input_grad(x, x, coef, code(activation), 0.2, affine if per_sample else None))),
        "conv_plain_forward": (dict(transposed=bools), lambda x, o, w, coef, transposed: (
            K.conv_plain_forward(o if transposed else x, w, (hw, hw) if transposed else (hw // 2,) * 2,
                                 transposed=transposed, **geom))),
        "conv_plain_grads": (dict(transposed=bools), lambda x, o, w, coef, transposed: (
            K.conv_plain_grads(x if transposed else o, o if transposed else x, w, transposed=transposed,
                               mask=(True, True), **geom))),
    }
    yield from _gemm_family_tiles(_record_calls(_kernels(K), calls, tensors), target)


def _record_calls(kernels: list, calls: dict, tensors: Callable) -> list[Launch]:
    """The launches of ``kernels`` by each host call of ``calls`` (name -> (keyword domains,
    call(*tensors(dtype), **kwargs))) for every combination of its keywords, in fp32, fp16, bf16."""
    import torch

    launches = []
    for dtype_name, torch_name in GEMM_DTYPES.items():
        data = tensors(getattr(torch, torch_name))
        for name, (domains, call) in calls.items():
            for kwargs in _calls(**domains):
                launches += _record(kernels, _label(name, kwargs), dtype_name,
                                    functools.partial(call, *data, **kwargs))
    return launches


def _gemm_family_tiles(launches: list[Launch], target: Target) -> Iterator[tuple[Launch, Tiles]]:
    """GPU tiles for launches of the conv GEMM family (kernels/conv_bn_act.py and the modules
    built on its GEMMs): the conv tuners' candidates, the CUDA blocks of the elementwise passes
    (BLOCK_M, BLOCK_C), else the launch's own; fp32 GEMMs once more with TF32."""
    import torch
    from fastgen.kernels import conv_bn_act as K

    cuda = torch.device("cuda", 0)
    # As the host code asks the tuners: candidates that fit the target for this dtype and variant.
    gemm = {K._conv_gemm_kernel: (K.GEMM_TUNER, ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
                                  lambda kw, size: K.gemm_operand_tiles(kw["BN_GRAD"], kw["MODULATE"], size)),
            K._conv_wgrad_kernel: (K.WGRAD_TUNER, ("BLOCK_G", "BLOCK_D", "BLOCK_M"),
                                   lambda kw, size: K.wgrad_operand_tiles(
                                       kw["BN_GRAD_G"], kw["BN_GRAD_G"] or kw["BN_GRAD_D"],
                                       kw["MODULATE"], size))}
    for launch in launches:
        if launch.kernel in gemm:
            tuner, names, operand_tiles = gemm[launch.kernel]
            dtype = getattr(torch, GEMM_DTYPES[launch.dtype])
            candidates = tuner.candidates_for(cuda, dtype, (target.arch // 10, 0),
                                              operand_tiles(launch.kwargs, dtype.itemsize))
            tiles = [(dict(zip(names, (t.m, t.n, t.k)), num_warps=t.num_warps, num_stages=t.num_stages),
                      i == 0, tuner.name) for i, t in enumerate(candidates)]
        elif "BLOCK_C" in launch.kwargs and "BLOCK_T" not in launch.kwargs:
            tiles = [(dict(zip(("BLOCK_M", "BLOCK_C"), K.ELEMENTWISE_BLOCKS)), True, None)]
        else:
            tiles = [({}, True, None)]
        yield launch, tiles
        if launch.dtype == "fp32" and "PRECISION" in launch.kwargs:
            yield dataclasses.replace(launch, dtype="tf32"), [(dict(PRECISION="tf32", **o), d, t) for o, d, t in tiles]


def _modconv_launches(target: Target) -> Iterator[tuple[Launch, Tiles]]:
    """Launches of kernels/modconv.py: its own kernels and the modulated variants of the conv
    GEMMs it launches (MODULATE, the MODULATED epilogue, NOISE), up 1 (conv) and 2 (transposed)."""
    import torch
    from fastgen.activations import ACTIVATIONS
    from fastgen.kernels import conv_bn_act as K
    from fastgen.kernels import modconv as M

    acts = tuple(ACTIVATIONS)
    code = lambda name: ACTIVATIONS[name].code  # noqa: E731
    bools, ups = (False, True), (1, 2)
    n, hw, c = 2, 16, 64
    out_hw = {1: hw, 2: 2 * hw - 1}  # kernel 3, padding 1

    def tensors(dtype):
        x = torch.randn(n, hw, hw, c, dtype=dtype)
        outs = {up: torch.randn(n, size, size, c, dtype=dtype) for up, size in out_hw.items()}
        w = torch.randn(c, c, 3, 3, dtype=dtype)
        scales = torch.rand(n, c) + 0.5  # styles and demod, float32
        noises = {up: torch.randn(n, 1, size, size, dtype=dtype) for up, size in out_hw.items()}
        return x, outs, w, scales, noises

    strength, bias = torch.ones(1), torch.randn(c)
    calls = {
        "demodulation": ({}, lambda x, outs, w, s, noises: M.demodulation(w, s, 1e-8)),
        "modconv_forward": (dict(up=ups, activation=acts, noise=bools, store_pre=bools),
                            lambda x, outs, w, s, noises, up, activation, noise, store_pre: (
            M.modconv_forward(x, w, s, s, noises[up] if noise else None, strength, bias,
                              (out_hw[up],) * 2, 1, up, code(activation), 0.2, 2**0.5, store_pre,
                              True))),
        "epilogue_grads": (dict(activation=acts, noise=bools), lambda x, outs, w, s, noises, activation, noise: (
            M.epilogue_grads(outs[1], outs[1], s, noises[1] if noise else None, strength, bias,
                             code(activation), 0.2, 2**0.5))),
        "modconv_input_grad": (dict(up=ups), lambda x, outs, w, s, noises, up: (
            M.modconv_input_grad(outs[up], x, w, s, s, 1, up))),
        "modconv_weight_grad": (dict(up=ups), lambda x, outs, w, s, noises, up: (
            M.modconv_weight_grad(x, outs[up], s, s, w.shape, 1, up, torch.float32))),
    }
    kernels = _kernels(M) + [K._conv_gemm_kernel, K._conv_wgrad_kernel]
    yield from _gemm_family_tiles(_record_calls(kernels, calls, tensors), target)


def _bce_launches(target: Target) -> Iterator[tuple[Launch, Tiles]]:
    """Launches of kernels/bce.py: its block sizes depend on the shape only, so a sweep of row
    lengths (and so of the partial sums' lengths) reaches every one."""
    import torch
    from fastgen.kernels import bce as K

    for dtype_name, dtype in {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.items():
        sweep = [2**i for i in range(0, 23, 2)]
        for n_cols in sweep:
            x = torch.randn(n_cols, dtype=dtype)
            largest = n_cols == sweep[-1]
            for elementwise in (False, True):
                kwargs = dict(n_cols=n_cols, elementwise=elementwise)
                yield from _shape_tiles(_record(_kernels(K), _label("bce_forward", kwargs), dtype_name,
                                                lambda: K.bce_forward(x, x, 1, elementwise, 1.0)), largest)
            yield from _shape_tiles(_record(_kernels(K), _label("scale_grad", dict(n_cols=n_cols)), dtype_name,
                                            lambda: K.scale_grad(x, torch.ones(()), 1, n_cols // 2, 1.0, 2.0)),
                                    largest)
        for has_real in (False, True):
            x = torch.randn(256, dtype=dtype)
            yield from _shape_tiles(_record(
                _kernels(K), _label("gan_loss_forward", dict(real=has_real)), dtype_name,
                lambda: K.gan_loss_forward(x if has_real else None, x, 1.0, 0.0, 1 / 256, 1 / 256)))


def _reparam_launches(target: Target) -> Iterator[tuple[Launch, Tiles]]:
    """Launches of kernels/reparam.py, with the (BLOCK_B, BLOCK_D, num_warps) its host code picks
    on CUDA over a sweep of (rows, columns); CI compiles the largest tile (the widest row)."""
    import torch
    from fastgen.kernels import reparam as K

    class OnCuda:  # _tiles asks only whether the tensor is on CUDA
        is_cuda = True

    tiles = list(dict.fromkeys(K._tiles(OnCuda(), 2**b, 2**d) for d in range(0, 14) for b in range(0, 21)))
    tiles.sort(key=lambda t: (t[0] * t[1], t[1]))
    gpu_tiles = [(dict(BLOCK_B=b, BLOCK_D=d, num_warps=w), i == len(tiles) - 1, None)
                 for i, (b, d, w) in enumerate(tiles)]
    bools = (False, True)
    for dtype_name, dtype in {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.items():
        mu, lv = torch.randn(8, 32, dtype=dtype), torch.randn(8, 32, dtype=dtype)
        z, gkl = torch.randn(2, 8, 32, dtype=dtype), torch.randn(8, dtype=dtype)
        seed_offset = torch.tensor([1, 0])  # (Philox key, first counter), read on the device
        calls = [("reparameterize_forward", {}, lambda: K.reparameterize_forward(mu, lv, 2, seed_offset))]
        calls += [("reparameterize_backward", dict(grad_z=gz, grad_kl=gk),
                   lambda gz=gz, gk=gk: K.reparameterize_backward(mu, lv, z if gz else None, gkl if gk else None,
                                                                 2, seed_offset))
                  for gz, gk in itertools.product(bools, bools) if gz or gk]
        calls += [("log_normal_diag_forward", dict(params=p),
                   lambda p=p: K.log_normal_diag_forward(z, mu if p else None, lv if p else None))
                  for p in bools]
        calls += [("log_normal_diag_backward", dict(params=p, write_grad_z=g),
                   lambda p=p, g=g: K.log_normal_diag_backward(z, mu if p else None, lv if p else None,
                                                               torch.randn(2, 8, dtype=dtype), g))
                  for p, g in itertools.product(bools, bools)]
        for name, kwargs, call in calls:
            for launch in _record(_kernels(K), _label(name, kwargs), dtype_name, call):
                yield launch, gpu_tiles


def _shape_tiles(launches: list[Launch], default: bool = True) -> Iterator[tuple[Launch, Tiles]]:
    """Launches whose tiles the host code already chose for the shape, as on CUDA."""
    for launch in launches:
        yield launch, [({}, default, None)]


MODULES: dict[str, Callable[[Target], Iterator[tuple[Launch, Tiles]]]] = {
    "conv_bn_act": _conv_launches, "modconv": _modconv_launches, "bce": _bce_launches,
    "reparam": _reparam_launches}


def _aligned_int(value: int, aligned: bool) -> int:
    """An integer argument of an aligned (divisible by 16) or misaligned shape; 1 stays 1, as the
    JIT makes it a constant."""
    if isinstance(value, bool) or not isinstance(value, int) or value == 1:
        return value
    rounded = -(-value // 16) * 16
    return rounded if aligned else rounded + 3


def _fake_args(args: tuple, aligned: bool) -> tuple:
    """Arguments of an aligned shape (16-byte aligned pointers) or a misaligned one."""
    return tuple(FakeTensor(a.dtype, 0 if aligned else a.dtype.itemsize) if isinstance(a, FakeTensor)
                 else _aligned_int(a, aligned) for a in args)


def _tile_label(kwargs: dict) -> str:
    keys = sorted(k for k in kwargs if k.startswith("BLOCK"))
    return " ".join([f"{k}={kwargs[k]}" for k in keys]
                    + [f"warps={kwargs.get('num_warps', 4)}", f"stages={kwargs.get('num_stages', 3)}"])


@functools.cache
def plan(target_name: str) -> tuple[list[Spec], list[tuple]]:
    """Every specialization for ``target_name`` and its (kernel, args, kwargs), in a fixed order.

    Raises:
        RuntimeError: a ``*_kernel`` of a module is launched by none of the host calls.
    """
    target = TARGETS[target_name]
    specs, payloads, seen = [], [], set()
    for module, launches in MODULES.items():
        per_kernel: dict[str, list[int]] = {}
        for launch, tiles in launches(target):
            name = f"{module}.{launch.kernel.__name__}"
            for overrides, default, tuner in tiles:
                args, kwargs = _fake_args(launch.args, aligned=True), {**launch.kwargs, **overrides}
                key = (name, repr(args), repr(sorted(kwargs.items())))
                if key in seen:
                    continue
                seen.add(key)
                per_kernel.setdefault(name, []).append(len(specs))
                specs.append(Spec(name, launch.variant, launch.dtype, _tile_label(kwargs), default, tuner,
                                  True, False))
                payloads.append((launch.kernel, args, kwargs))
        kernels = {f"{module}.{k.__name__}" for k in _kernels(importlib.import_module(f"fastgen.kernels.{module}"))}
        if missing := kernels - per_kernel.keys():
            raise RuntimeError(f"no host call in compile_report.MODULES[{module!r}] launches {sorted(missing)}")
        for name, indices in per_kernel.items():
            _mark_ci(specs, indices)
            # The misaligned variant: the kernel's first CI specialization in the narrowest dtype.
            first = min((i for i in indices if specs[i].ci),
                        key=lambda i: (specs[i].dtype not in ("bf16", "fp16"), i))  # _mark_ci keeps one
            kernel, args, kwargs = payloads[first]
            specs.append(dataclasses.replace(specs[first], aligned=False))
            payloads.append((kernel, _fake_args(args, aligned=False), kwargs))
    return specs, payloads


# The CI gate compiles one activation: the longest (exp and an odd series), the others differ
# from it only by a shorter epilogue or operand prologue; and of store_pre, the epilogue that
# stores both outputs.
CI_ACTIVATION = "tanh"
# fp16 compiles as bf16 does (2-byte operands, the same MMA shapes): the full report has it.
CI_DTYPES = ("fp32", "tf32", "bf16")


def specs_of(target_name: str) -> list[Spec]:
    """``plan(target_name)``'s specializations."""
    return plan(target_name)[0]


def _mark_ci(specs: list[Spec], indices: list[int]) -> None:
    """The CI subset of one kernel: default tiles of the variants with no activation or CI_ACTIVATION
    (and store_pre), and every candidate of a tuner for the first of those variants of each host
    function and dtype (shared memory differs between them: BN_GRAD loads two A tiles)."""
    def gated(s: Spec) -> bool:
        return s.dtype in CI_DTYPES and "store_pre=False" not in s.variant and (
            "activation=" not in s.variant or f"activation={CI_ACTIVATION!r}" in s.variant)

    first_variant = {}
    for i in indices:
        if gated(specs[i]):
            first_variant.setdefault((specs[i].variant.split("(")[0], specs[i].dtype), specs[i].variant)
    for i in indices:
        s = specs[i]
        every_tile = s.tuner is not None and first_variant.get((s.variant.split("(")[0], s.dtype)) == s.variant
        specs[i] = dataclasses.replace(s, ci=gated(s) and (s.default or every_tile))
    if not any(specs[i].ci for i in indices):  # every variant of it has an activation: the first
        specs[indices[0]] = dataclasses.replace(specs[indices[0]], ci=True)


# ----------------------------------------------------------------------------------------------
# Compiling one specialization, reading its cubin


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _worker_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported in this process
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton's default, stated (no warning)


def compile_one(target_name: str, index: int) -> dict:
    """Compile specialization ``index`` of ``plan(target_name)``; its report row's measured part."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = TARGETS[target_name]
    kernel, args, kwargs = plan(target_name)[1][index]
    gpu = GPUTarget("cuda", target.arch, 32)
    backend = make_backend(gpu)
    kwargs = {"debug": False, **kwargs}
    start = time.perf_counter()
    try:  # as JITFunction.run specializes a launch
        bound, specialization, options = create_function_from_signature(
            kernel.signature, kernel.params, backend)(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization,
                                                                  options)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=gpu,
                                  options=options.__dict__)
    except Exception as err:  # the compiler's verdict is the report's content
        message = str(err).strip().splitlines()
        return {"compiled": False, "error": f"{type(err).__name__}: {message[-1] if message else ''}"[:300],
                "compile_s": round(time.perf_counter() - start, 2)}
    row = {"compiled": True, "error": None, "compile_s": round(time.perf_counter() - start, 2),
           "num_warps": compiled.metadata.num_warps, **_read_cubin(compiled.asm["cubin"])}
    row["shared"] = compiled.metadata.shared + row.pop("static_shared")
    return row


def _read_cubin(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(re.findall(r"\b(REG|LOCAL|SHARED|STACK):(\d+)", usage))
    opcodes = Counter(m.split(".")[0] for m in re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)",
                                                        sass, re.M))
    return {"regs": int(fields["REG"]), "local_bytes": int(fields["LOCAL"]), "stack_bytes": int(fields["STACK"]),
            "static_shared": int(fields["SHARED"]), **{k: opcodes[op] for k, op in SASS_COUNTS.items()}}


def occupancy(row: dict, target: Target) -> dict:
    """CTAs per SM that registers, shared memory and threads allow (the occupancy calculator)."""
    from fastgen.kernels._tuning import RESERVED_SHARED_MEMORY_PER_BLOCK

    warps = row["num_warps"]
    regs_per_warp = -(-row["regs"] * 32 // 256) * 256
    by_regs = (target.regs_per_sm // regs_per_warp) // warps
    by_smem = target.smem_per_sm // (row["shared"] + RESERVED_SHARED_MEMORY_PER_BLOCK)
    by_threads = target.max_threads_per_sm // (32 * warps)
    return {"ctas_by_regs": by_regs, "ctas_by_smem": by_smem,
            "ctas_per_sm": min(by_regs, by_smem, by_threads, target.max_ctas_per_sm),
            "fits_shared": row["shared"] <= target.smem_per_block, "spills": row["local_bytes"] > 0}


def build(target_name: str, subset: str = "full", jobs: int | None = None,
          modules: tuple[str, ...] = tuple(MODULES), match: str = "") -> list[dict]:
    """Compile the ``subset`` ("ci" or "full") of ``modules``' kernels for ``target_name``: one row
    per specialization (those whose "kernel variant dtype tile" matches the regex ``match``)."""
    interpret = os.environ.pop("TRITON_INTERPRET", None)  # the workers inherit the environment
    try:
        with ProcessPoolExecutor(jobs or os.cpu_count(), initializer=_worker_init,
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            # The plan needs compiled-mode kernels: this process may be in the interpreter's.
            specs = pool.submit(specs_of, target_name).result()
            indices = [i for i, s in enumerate(specs)
                       if (subset == "full" or s.ci) and s.kernel.split(".")[0] in modules
                       and re.search(match, f"{s.kernel} {s.variant} {s.dtype} {s.tile}")]
            rows = list(pool.map(compile_one, [target_name] * len(indices), indices, chunksize=2))
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret
    target = TARGETS[target_name]
    out = []
    for i, row in zip(indices, rows):
        if row["compiled"]:
            row.update(occupancy(row, target))
        out.append({**dataclasses.asdict(specs[i]), **row})
    return out


# ----------------------------------------------------------------------------------------------
# Writing the report


def summary(rows: list[dict]) -> dict:
    """Counts over the rows: specializations, compiled, spilling, over shared memory, < 2 CTAs/SM."""
    ok = [r for r in rows if r["compiled"]]
    return {"specializations": len(rows), "compiled": len(ok), "failed": len(rows) - len(ok),
            "spilling": sum(r["spills"] for r in ok), "over_shared_memory": sum(not r["fits_shared"] for r in ok),
            "at_255_registers": sum(r["regs"] >= 255 for r in ok),
            "below_2_ctas_per_sm": sum(r["fits_shared"] and r["ctas_per_sm"] < 2 for r in ok)}


def write(target_name: str, rows: list[dict], out_dir: Path, seconds: float, subset: str) -> None:
    """``compile-<target>.json`` (every row) and ``.md`` (summary, problems, a table per kernel)."""
    import triton

    target = TARGETS[target_name]
    meta = {"target": dataclasses.asdict(target), "triton": triton.__version__, "subset": subset,
            "planned": len(specs_of(target_name)), "compile_seconds": round(seconds), "summary": summary(rows)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"compile-{target_name}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# Ahead-of-time compile report: {target_name}",
             "",
             f"Generated by `python benchmarks/compile_report.py --target {target_name} --subset {subset}` "
             f"(triton {triton.__version__}): {len(rows)} of the {meta['planned']} specializations planned, "
             f"{round(seconds)} s of compiles. Limits: {target.smem_per_block // 1024} KB shared memory per block, "
             f"{target.smem_per_sm // 1024} KB and {target.regs_per_sm} registers per SM. "
             "Columns: registers per thread, local memory per thread (spills), shared memory per block (KB), "
             "CTAs per SM allowed by registers / by shared memory / in all, then instruction counts in the "
             "SASS: wgmma (HGMMA), mma (HMMA), cp.async (LDGSTS), TMA (UTMALDG). `*` marks an untuned "
             "launch's default tile; `unaligned` a launch with misaligned pointers and no integer divisible by 16.",
             "", "## Summary", "", "| " + " | ".join(meta["summary"]) + " |",
             "|" + "---|" * len(meta["summary"]), "| " + " | ".join(map(str, meta["summary"].values())) + " |", ""]
    problems = [r for r in rows if not r["compiled"] or r["spills"] or not r["fits_shared"]]
    lines += ["## Problems (failed, spilling or over shared memory)", ""]
    lines += [f"- `{r['kernel']}` {r['variant']} {r['dtype']} {r['tile']}: "
              + (r["error"] if not r["compiled"] else
                 f"{r['local_bytes']} B local, {r['shared'] / 1024:.1f} KB shared") for r in problems] or ["None."]
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        lines += ["", f"## {kernel}", "",
                  "| variant | dtype | tile | regs | local | smem KB | CTAs reg/smem/all | wgmma | mma | cp.async | TMA |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["kernel"] != kernel:
                continue
            tile = ("*" if r["default"] else "") + r["tile"] + ("" if r["aligned"] else " unaligned")
            if not r["compiled"]:
                lines.append(f"| {r['variant']} | {r['dtype']} | {tile} | failed: {r['error']} |||||||||")
                continue
            lines.append(f"| {r['variant']} | {r['dtype']} | {tile} | {r['regs']} | {r['local_bytes']} | "
                         f"{r['shared'] / 1024:.1f} | {r['ctas_by_regs']}/{r['ctas_by_smem']}/{r['ctas_per_sm']} | "
                         + " | ".join(str(r[k]) for k in SASS_COUNTS) + " |")
    (out_dir / f"compile-{target_name}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=[*TARGETS, "all"], default="all")
    parser.add_argument("--subset", choices=["ci", "full"], default="full")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: all cores)")
    parser.add_argument("--modules", default=",".join(MODULES), help="kernel modules, comma-separated")
    parser.add_argument("--match", default="", help='only specializations whose "kernel variant '
                        'dtype tile" matches this regex (trying a kernel change)')
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    _worker_init()
    for name in TARGETS if args.target == "all" else [args.target]:
        start = time.perf_counter()
        rows = build(name, args.subset, args.jobs, tuple(args.modules.split(",")), args.match)
        write(name, rows, args.out, time.perf_counter() - start, args.subset)
        for r in rows if args.match else []:
            print(f"{r['kernel']} {r['variant']} {r['dtype']} {r['tile']}: " + (
                f"{r['regs']} regs, {r['local_bytes']} B local, {r['shared'] / 1024:.1f} KB, "
                f"{r['ctas_per_sm']} CTAs/SM, " + ", ".join(f"{k} {r[k]}" for k in SASS_COUNTS)
                if r["compiled"] else r["error"]))
        print(name, json.dumps(summary(rows)))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
