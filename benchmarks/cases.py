"""Benchmark cases shared by the pytest-benchmark suites, ``benchmarks/run.py`` and the GPU session.

A case is one op at one shape and dtype. Each implementation is a *step* on the same inputs:

- "fastgen": fastgen's fused ops (the Triton kernels);
- "fastgen-compile": the fastgen model inside ``torch.compile`` (whole models and the training
  step): fastgen ops in a compiled graph, however the ops reach the compiler;
- "fastgen-cudnn-gemm" (conv-BN layers): cuDNN's conv with fastgen's fused BN statistics and
  apply around it, the alternative DESIGN.md asks the dispatch to pick where it is faster;
- "eager": plain PyTorch, written the way a PyTorch user writes it (channels_last, bf16
  autocast), never a strawman;
- "compile", "compile-max-autotune": the eager function under ``torch.compile``.

A step is forward and backward, returning the op's outputs and the input gradients, so every row
does the work of a training step and can be checked against the float64 reference; every
implementation of a case returns the same outputs (the GAN losses' logging means too), so a
compiler cannot win by dropping work the others do. A "train" case's step is a whole DCGAN
training step (both updates, Adam) and returns the losses, logging means and all gradients.

``smoke=True`` shrinks every shape so the harness runs in seconds on a CPU (through the Triton
interpreter); its numbers mean nothing.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

import fastgen
import fastgen.models
import fastgen.nn
from fastgen import functional as F
from fastgen import reference as R

IMPLS = ("fastgen", "fastgen-compile", "fastgen-cudnn-gemm", "eager", "compile", "compile-max-autotune")
# A compiled implementation: (the implementation it compiles, torch.compile mode).
COMPILED = {"fastgen-compile": ("fastgen", "default"), "compile": ("eager", "default"),
            "compile-max-autotune": ("eager", "max-autotune")}
KINDS = ("op", "layer", "model", "train")  # what a row costs to compile (benchmarks/plan.py)
# Extra rows behind a flag (benchmarks/session.py, run.py --with): the report's bars do not need
# them, and max-autotune alone costs minutes of compiles per conv shape; "stylegan": the StyleGAN2
# and BigGAN layers (no bar; the 9-minute session has no room for them beside the bars' rows).
FLAGS = ("fp32", "fwd", "max-autotune", "stylegan")
IMPL_FLAGS = {"compile-max-autotune": "max-autotune"}
EAGER_COMPILED = ("compile", "compile-max-autotune")

Step = Callable[[], tuple[Tensor, ...]]
Outputs = Tensor | tuple[Tensor, ...]


@dataclass
class Case:
    """One op at one shape.

    make_inputs(device) returns the inputs (leaves that require grad where the op has gradients);
    fns maps "fastgen", "eager" and optionally "fastgen-cudnn-gemm" to a function of the inputs
    returning the op's output(s); the compiled implementations in ``compiled`` compile one of
    them. Each step backpropagates fixed random gradients (:func:`_upstream`) into every output
    that requires grad. A "train" case instead gets its step from ``build(impl)`` (a fresh
    model and optimizers per call) and the step does its own backward.
    expected(inputs, outputs) gives the float64 values the step's outputs and input gradients
    should have (see :func:`reference_expected`; a random op derives them from its outputs).
    floor_bytes is the least traffic any implementation needs (read each input, write each
    output and gradient once; 0: not computed); traffic_bytes is what fastgen's kernels actually
    move, where it is known exactly; flops counts the GEMM work (0 for elementwise ops).
    ``backward=False`` times the forward alone (under no_grad).

    For the GPU session: kind (one of KINDS) sets what the row costs to compile, with dtype and
    layers (the DCGAN64_LAYERS a conv row runs; their kernels are shared); flag (one of
    FLAGS, or None for the rows that decide the bars) names the option that adds the case;
    images counts the images per step (training steps report images/s); graphable=False skips
    the CUDA-graph timing; bar = (least speedup vs eager, vs compile) the issues ask for.
    """

    family: str
    name: str
    make_inputs: Callable[[torch.device], tuple[Tensor, ...]]
    fns: dict[str, Callable[..., Outputs]]
    expected: Callable[[tuple[Tensor, ...], tuple[Tensor, ...]], tuple[Tensor, ...]]
    floor_bytes: int
    traffic_bytes: int | None
    tolerance: float
    kind: str
    dtype: torch.dtype = torch.float32
    layers: tuple[str, ...] = ()
    flops: int = 0
    backward: bool = True
    compiled: tuple[str, ...] = EAGER_COMPILED
    build: Callable[[str], Callable[..., Outputs]] | None = None
    flag: str | None = None
    images: int = 0
    graphable: bool = True
    bar: tuple[float, float | None] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.flag is not None and self.flag not in FLAGS:
            raise ValueError(f"flag: expected None or one of {', '.join(FLAGS)}, got {self.flag!r}")

    @property
    def group(self) -> str:
        return f"{self.family} {self.name}"

    @property
    def impls(self) -> tuple[str, ...]:
        """The implementations this case has, in IMPLS order."""
        return tuple(i for i in IMPLS if i in self.fns or i in self.compiled)


def select(cases: Iterable[Case], flags: Iterable[str] = (), only: str = "",
           skip: Iterable[str] = ()) -> list[tuple[Case, tuple[str, ...]]]:
    """The (case, implementations) pairs to run: the cases that decide the bars, plus those and
    the implementations that ``flags`` add, whose group matches the regular expression ``only``,
    without the implementations in ``skip``."""
    flags, skip = set(flags), set(skip)
    for name, values, known in (("flags", flags, FLAGS), ("skip", skip, IMPLS)):
        if values - set(known):
            raise ValueError(f"{name}: unknown {sorted(values - set(known))}; expected some of {', '.join(known)}")
    chosen = []
    for case in cases:
        if (case.flag is None or case.flag in flags) and re.search(only, case.group):
            impls = tuple(i for i in case.impls
                          if i not in skip and (i not in IMPL_FLAGS or IMPL_FLAGS[i] in flags))
            if impls:
                chosen.append((case, impls))
    return chosen


def _as_tuple(outputs: Outputs) -> tuple[Tensor, ...]:
    return tuple(outputs) if isinstance(outputs, tuple) else (outputs,)


def _upstream(output: Tensor) -> Tensor:
    """The upstream gradient for ``output``: fixed random numbers (ones would make BatchNorm's
    input gradient vanish), the same for every implementation and for the reference."""
    gen = torch.Generator(output.device).manual_seed(0)
    return torch.randn(output.shape, generator=gen, device=output.device).to(output.dtype)


def _fwd_bwd(fn: Callable[..., Outputs], inputs: tuple[Tensor, ...],
             grad_outputs: list[Tensor] | None = None) -> tuple[Tensor, ...]:
    """(outputs..., gradients of the inputs that require grad) for the :func:`_upstream`
    gradients of the outputs that require grad (logging outputs carry none). An empty
    ``grad_outputs`` list is filled on the first call and reused by later ones."""
    outputs = _as_tuple(fn(*inputs))
    differentiable = [o for o in outputs if o.requires_grad]
    if grad_outputs is None:
        grad_outputs = []
    if not grad_outputs:
        grad_outputs += [_upstream(o) for o in differentiable]
    grads = torch.autograd.grad(differentiable, [t for t in inputs if t.requires_grad], grad_outputs)
    return (*(o.detach() for o in outputs), *grads)


def _implementation(case: Case, impl: str) -> Callable[..., Outputs]:
    if case.build is not None:
        return case.build(impl)
    if impl in COMPILED:
        base, mode = COMPILED[impl]
        return torch.compile(case.fns[base], mode=mode)
    return case.fns[impl]


def make_step(case: Case, impl: str, inputs: tuple[Tensor, ...]) -> Step:
    """The step of ``impl`` on ``inputs``: (outputs..., input gradients...), the outputs alone
    for a forward-only case, or what a training step returns."""
    fn = _implementation(case, impl)
    backend = (lambda: fastgen.use_backend("triton")) if impl.startswith("fastgen") else contextlib.nullcontext
    if case.kind == "train" or not case.backward:
        grad_mode = contextlib.nullcontext if case.kind == "train" else torch.no_grad

        def forward() -> tuple[Tensor, ...]:
            with backend(), grad_mode():
                return _as_tuple(fn(*inputs))
        return forward

    grad_outputs: list[Tensor] = []  # made on the first call, the untimed warm-up

    def step() -> tuple[Tensor, ...]:
        with backend():
            return _fwd_bwd(fn, inputs, grad_outputs)

    return step


def reference_expected(reference: Callable[..., Outputs]):
    """``expected`` for a deterministic op: its reference, fwd+bwd, on float64 copies of the inputs."""
    def expected(inputs: tuple[Tensor, ...], outputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return _fwd_bwd(reference, tuple(t.detach().double().requires_grad_(t.requires_grad) for t in inputs))
    return expected


def check(case: Case, inputs: tuple[Tensor, ...], outputs: tuple[Tensor, ...]) -> float:
    """Largest relative error ||out - ref|| / ||ref|| of a step's outputs against float64."""
    expected = case.expected(inputs, outputs)
    if not case.backward:
        expected = expected[:len(outputs)]
    worst = 0.0
    for out, ref in zip(outputs, expected, strict=True):
        out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
        if not torch.isfinite(out).all():
            return float("inf")
        worst = max(worst, ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item())
    return worst


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


# ----------------------------------------------------------------------------------------------
# BCE / GAN losses. Every implementation returns the loss and the logging means D(x), D(G(z)):
# the fused op computes them in the same pass, and a compiled baseline must not drop them.


def _eager_d_loss(real: Tensor, fake: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    loss = (TF.binary_cross_entropy_with_logits(real, torch.ones_like(real))
            + TF.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
    return loss, torch.sigmoid(real.detach().float()).mean(), torch.sigmoid(fake.detach().float()).mean()


def _eager_g_loss(fake: Tensor) -> tuple[Tensor, Tensor]:
    loss = TF.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
    return loss, torch.sigmoid(fake.detach().float()).mean()


def _eager_recon(reduction: str) -> Callable[[Tensor, Tensor], Tensor]:
    def loss(logits: Tensor, target: Tensor) -> Tensor:
        if reduction == "per_sample":
            return TF.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).sum(1)
        return TF.binary_cross_entropy_with_logits(logits, target, reduction=reduction)
    return loss


def _logits(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, grad: bool = True) -> Tensor:
    return (torch.randn(shape, device=device) * 3).to(dtype).requires_grad_(grad)


def loss_cases(smoke: bool = False) -> list[Case]:
    """GAN D and G losses over B logits, and the BCE reconstruction loss of a 64x64 RGB decoder."""
    cases = []
    batch_sizes = [64] if smoke else [256, 4096, 65536]
    for b in batch_sizes:
        size = 4 * b  # fp32 logits
        cases.append(Case(
            "gan_d_loss", f"B={b} fp32",
            lambda device, b=b: (_logits((b, 1), torch.float32, device), _logits((b, 1), torch.float32, device)),
            {"fastgen": lambda r, f: tuple(F.gan_d_loss(r, f)), "eager": _eager_d_loss},
            reference_expected(lambda r, f: tuple(R.gan_d_loss(r, f))),
            floor_bytes=2 * 2 * size, traffic_bytes=2 * 2 * size + 2 * 2 * size, tolerance=1e-5,
            kind="op", bar=(5.0, None)))
        cases.append(Case(
            "gan_g_loss", f"B={b} fp32",
            lambda device, b=b: (_logits((b, 1), torch.float32, device),),
            {"fastgen": lambda f: tuple(F.gan_g_loss(f)), "eager": _eager_g_loss},
            reference_expected(lambda f: tuple(R.gan_g_loss(f))),
            floor_bytes=2 * size, traffic_bytes=4 * size, tolerance=1e-5, kind="op", bar=(5.0, None)))
    shape = (2, 3, 8, 8) if smoke else (256, 3, 64, 64)
    dtype = torch.float32 if smoke else torch.bfloat16  # the interpreter has no bf16
    numel = torch.Size(shape).numel()
    for reduction in ("mean", "per_sample"):
        item = dtype.itemsize
        cases.append(Case(
            f"bce_with_logits[{reduction}]", f"{'x'.join(map(str, shape))} {_dtype_name(dtype)}",
            lambda device: (_logits(shape, dtype, device), torch.rand(shape, device=device).to(dtype)),
            {"fastgen": lambda x, t, r=reduction: F.bce_with_logits(x, t, reduction=r),
             "eager": _eager_recon(reduction)},
            reference_expected(lambda x, t, r=reduction: R.bce_with_logits(x, t, reduction=r)),
            # floor: read logits and target, write dlogits; fastgen: + write and re-read the
            # stored gradient (forward), then write the scaled one (backward).
            floor_bytes=3 * item * numel, traffic_bytes=5 * item * numel,
            tolerance=1e-5 if dtype == torch.float32 else 1e-2, kind="op", dtype=dtype, bar=(2.0, None)))
    return cases


# ----------------------------------------------------------------------------------------------
# Reparameterization


def _reparam_expected(inputs: tuple[Tensor, ...], outputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    # Each implementation draws its own noise: recover it from z, then check z, the KL and both
    # gradients against the float64 reference given that noise.
    mu, logvar = (t.detach().double().requires_grad_() for t in inputs)
    eps = (outputs[0].double() - mu.detach()) * torch.exp(-0.5 * logvar.detach().clamp(max=R.LOGVAR_MAX))
    return _fwd_bwd(lambda m, v: R.reparameterize_with_noise(m, v, eps), (mu, logvar))


def reparam_cases(smoke: bool = False) -> list[Case]:
    """reparameterize forward + backward (gradients from z and the KL) at 65536x512; bf16
    decides the bar, fp32 is behind the "fp32" flag."""
    rows, cols = (64, 48) if smoke else (65536, 512)
    cases = []
    for dtype in ((torch.float32,) if smoke else (torch.bfloat16, torch.float32)):
        item = dtype.itemsize

        def make_inputs(device, dtype=dtype):
            return (torch.randn(rows, cols, device=device).to(dtype).requires_grad_(),
                    (torch.randn(rows, cols, device=device) - 1).to(dtype).requires_grad_())

        cases.append(Case(
            "reparameterize", f"{rows}x{cols} {_dtype_name(dtype)}", make_inputs,
            {"fastgen": lambda mu, lv: F.reparameterize(mu, lv), "eager": lambda mu, lv: R.reparameterize(mu, lv)},
            _reparam_expected,
            # fwd: read mu, logvar, write z; bwd: read mu, logvar, dz, write dmu, dlogvar. The
            # noise is regenerated, never stored, so fastgen moves exactly the floor.
            floor_bytes=8 * item * rows * cols, traffic_bytes=8 * item * rows * cols,
            tolerance=1e-5 if dtype == torch.float32 else 2e-2, kind="op", dtype=dtype,
            flag="fp32" if dtype == torch.float32 and not smoke else None, bar=(3.0, None)))
    return cases


# ----------------------------------------------------------------------------------------------
# Conv + BN + activation: every layer of the 64x64 DCGAN (width 64, z of 100), and whole G and D

# name: (transposed, c_in, c_out, input size, stride, padding, batch norm, activation); kernel 4.
DCGAN64_LAYERS = {
    "G1": (True, 100, 512, 1, 1, 0, True, "relu"),
    "G2": (True, 512, 256, 4, 2, 1, True, "relu"),
    "G3": (True, 256, 128, 8, 2, 1, True, "relu"),
    "G4": (True, 128, 64, 16, 2, 1, True, "relu"),
    "G5": (True, 64, 3, 32, 2, 1, False, "tanh"),
    "D1": (False, 3, 64, 64, 2, 1, False, "leaky_relu"),
    "D2": (False, 64, 128, 32, 2, 1, True, "leaky_relu"),
    "D3": (False, 128, 256, 16, 2, 1, True, "leaky_relu"),
    "D4": (False, 256, 512, 8, 2, 1, True, "leaky_relu"),
    "D5": (False, 512, 1, 4, 1, 0, False, "identity"),
}
# The smoke run's one layer: D2's form (conv, stride 2, BN, leaky ReLU) at 16 -> 32 channels and
# 8x8, small enough for the interpreter's fwd+bwd in seconds (D2 itself takes minutes there).
SMOKE_LAYERS = {"D2": (False, 16, 32, 8, 2, 1, True, "leaky_relu")}
KERNEL = 4
CONV_TOLERANCE = {torch.float32: 5e-3, torch.bfloat16: 5e-2}  # fp32 convs may use TF32, as torch's
# The bar of issue 4, on whole G and D fwd+bwd: >= 1.5x eager and >= 1.2x torch.compile.
MODEL_BAR = (1.5, 1.2)


def _layer_fn(functional, layer: tuple) -> Callable[..., Tensor]:
    transposed, _, _, _, stride, padding, bn, activation = layer
    kw = dict(stride=stride, padding=padding, transposed=transposed, activation=activation,
              negative_slope=0.2)
    if bn:  # batch statistics only: the running-statistics update is C floats, not worth a row
        return lambda x, w, gamma, beta: functional.conv_bn_act(x, w, gamma, beta, None, None, **kw)
    return lambda x, w: functional.conv_bias_act(x, w, None, **kw)


def _cudnn_gemm_layer_fn(layer: tuple) -> Callable[..., Tensor]:
    """A conv-BN-act layer as torch's conv (cuDNN) followed by fastgen's fused bn_act."""
    transposed, _, _, _, stride, padding, _, activation = layer
    conv = TF.conv_transpose2d if transposed else TF.conv2d

    def run(x: Tensor, w: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
        y = conv(x, w, stride=stride, padding=padding)
        return F.bn_act(y, gamma, beta, None, None, activation=activation, negative_slope=0.2)

    return run


def _layer_geometry(layer: tuple, batch: int) -> tuple[int, int, int, int]:
    """(x, weight, y) element counts and the fwd GEMM FLOPs of one layer."""
    transposed, c_in, c_out, size, stride, padding, _, _ = layer
    out = (size - 1) * stride - 2 * padding + KERNEL if transposed else (size + 2 * padding - KERNEL) // stride + 1
    x, w, y = batch * c_in * size * size, c_in * c_out * KERNEL * KERNEL, batch * c_out * out * out
    # Every output (conv) or input (transposed) pixel meets every tap once.
    return x, w, y, 2 * w * batch * (size * size if transposed else out * out)


def layer_cases(smoke: bool = False) -> list[Case]:
    """Every DCGAN 64x64 layer at batch 256: bf16 fwd+bwd decides the bars; forward-only rows
    are behind the "fwd" flag and fp32 behind "fp32"."""
    batch = 2 if smoke else 256
    dtypes = (torch.float32,) if smoke else (torch.bfloat16, torch.float32)
    layers = SMOKE_LAYERS if smoke else DCGAN64_LAYERS
    cases = []
    for dtype in dtypes:
        item = dtype.itemsize
        for name, layer in layers.items():
            transposed, c_in, c_out, size, _, _, bn, _ = layer
            x_count, w_count, y_count, flops = _layer_geometry(layer, batch)
            w_shape = (c_in, c_out, KERNEL, KERNEL) if transposed else (c_out, c_in, KERNEL, KERNEL)

            def make_inputs(device, c_in=c_in, size=size, w_shape=w_shape, bn=bn, c_out=c_out, dtype=dtype):
                x = torch.randn(batch, c_in, size, size, device=device).to(dtype, memory_format=torch.channels_last)
                w = (torch.randn(w_shape, device=device) * 0.05).to(dtype)
                affine = (torch.rand(c_out, device=device) + 0.5, torch.randn(c_out, device=device)) if bn else ()
                return tuple(t.requires_grad_() for t in (x, w, *affine))

            fns = {"fastgen": _layer_fn(F, layer), "eager": _layer_fn(R, layer)}
            if bn:
                fns["fastgen-cudnn-gemm"] = _cudnn_gemm_layer_fn(layer)
            for backward in (False, True):
                flag = None if smoke else "fp32" if dtype == torch.float32 else None if backward else "fwd"
                cases.append(Case(
                    "conv_bn_act" if bn else "conv_bias_act",
                    f"DCGAN64 {name} B={batch} {_dtype_name(dtype)} {'fwd+bwd' if backward else 'fwd'}",
                    make_inputs, fns,
                    reference_expected(_layer_fn(R, layer)),
                    floor_bytes=item * ((3 * x_count + 3 * w_count + 2 * y_count) if backward
                                        else (x_count + w_count + y_count)),
                    traffic_bytes=None, tolerance=1e-4 if smoke else CONV_TOLERANCE[dtype],
                    kind="layer", dtype=dtype, layers=(name,), flops=3 * flops if backward else flops,
                    backward=backward, flag=flag))
    return cases


# ----------------------------------------------------------------------------------------------
# StyleGAN2 and BigGAN layers (issue 14)

# StyleGAN2 at 256 px: 512 channels from 8x8 to 64x64 (3x3, padding 1, demodulated, noise, bias,
# leaky ReLU with gain sqrt(2)); batch 32. Eager is StyleGAN2's own grouped-conv formulation.
MODCONV_SIZES = (8, 16, 32, 64)
MODCONV_CHANNELS, MODCONV_BATCH, MODCONV_KERNEL = 512, 32, 3


def _modconv_fn(functional) -> Callable[..., Tensor]:
    return lambda x, w, s, noise, strength, bias: functional.modulated_conv2d(
        x, w, s, padding=MODCONV_KERNEL // 2, noise=noise, noise_strength=strength, bias=bias,
        activation="leaky_relu", negative_slope=0.2, gain=2 ** 0.5)


def modconv_cases(smoke: bool = False) -> list[Case]:
    """modulated_conv2d fwd+bwd at StyleGAN2 256px layer shapes, bf16 (smoke: one tiny fp32 case)."""
    channels, batch = (8, 2) if smoke else (MODCONV_CHANNELS, MODCONV_BATCH)
    dtype = torch.float32 if smoke else torch.bfloat16
    cases = []
    for size in (6,) if smoke else MODCONV_SIZES:
        x_count, w_count = batch * channels * size * size, channels * channels * MODCONV_KERNEL ** 2

        def make_inputs(device, size=size):
            x = torch.randn(batch, channels, size, size, device=device).to(dtype, memory_format=torch.channels_last)
            w = torch.randn(channels, channels, MODCONV_KERNEL, MODCONV_KERNEL, device=device).to(dtype)
            s = (torch.randn(batch, channels, device=device) * 0.2 + 1).to(dtype)
            noise = torch.randn(batch, 1, size, size, device=device).to(dtype)
            strength, bias = torch.full((1,), 0.1, device=device), torch.randn(channels, device=device) * 0.1
            return (*(t.requires_grad_() for t in (x, w, s)), noise,
                    strength.to(dtype).requires_grad_(), bias.to(dtype).requires_grad_())

        cases.append(Case(
            "modulated_conv2d", f"StyleGAN2 {size}x{size} C={channels} B={batch} {_dtype_name(dtype)} fwd+bwd",
            make_inputs, {"fastgen": _modconv_fn(F), "eager": _modconv_fn(R)}, reference_expected(_modconv_fn(R)),
            # read x, w, styles; write out; read it back with x, w; write dx, dw (as a conv layer)
            floor_bytes=dtype.itemsize * (3 * x_count + 3 * w_count + 2 * x_count),
            traffic_bytes=None, tolerance=1e-4 if smoke else CONV_TOLERANCE[dtype], kind="layer",
            dtype=dtype, layers=(f"StyleGAN2-{size}",), flops=3 * 2 * w_count * batch * size * size,
            flag=None if smoke else "stylegan"))
    return cases


def conditional_bn_cases(smoke: bool = False) -> list[Case]:
    """bn_act with per-sample (BigGAN class-conditional) gamma and beta ``(B, C)``, training,
    ReLU, fwd+bwd: a BigGAN-128 generator block's BN at batch 256, bf16."""
    batch, channels, size = (3, 5, 5) if smoke else (256, 256, 32)
    dtype = torch.float32 if smoke else torch.bfloat16
    numel = batch * channels * size * size

    def make_inputs(device):
        x = torch.randn(batch, channels, size, size, device=device).to(dtype, memory_format=torch.channels_last)
        gamma = 1 + 0.1 * torch.randn(batch, channels, device=device)
        beta = 0.1 * torch.randn(batch, channels, device=device)
        return tuple(t.requires_grad_() for t in (x, gamma, beta))

    def fn(functional):
        return lambda x, gamma, beta: functional.bn_act(x, gamma, beta, None, None, activation="relu")

    return [Case(
        "bn_act[per-sample affine]", f"{batch}x{channels}x{size}x{size} {_dtype_name(dtype)} fwd+bwd",
        make_inputs, {"fastgen": fn(F), "eager": fn(R)}, reference_expected(fn(R)),
        # read x; write out; read dout and x (or y) back; write dx (gamma/beta are B x C, small)
        floor_bytes=dtype.itemsize * 4 * numel, traffic_bytes=None,
        tolerance=1e-4 if smoke else 2e-2, kind="op", dtype=dtype, flag=None if smoke else "stylegan")]


# ----------------------------------------------------------------------------------------------
# Whole DCGAN G and D, and a full training step, built from fastgen's own models
# (fastgen.models.DCGANGenerator / DCGANDiscriminator). Their plain-PyTorch twins (eager,
# compile) have the same modules, parameters and state_dict keys, unfused.


def _unfused(model: nn.Module) -> nn.Module:
    """A copy of a fastgen model with every fused conv-BN-act block as the plain
    ``nn.Sequential(conv, bn, act)`` it stands for (same parameters, same keys)."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (fastgen.nn.ConvBNAct, fastgen.nn.ConvTransposeBNAct)):
                setattr(module, name, nn.Sequential(*child))
    return model


def _dcgan(kind: str, smoke: bool) -> nn.Module:
    """fastgen's DCGAN generator ("G") or discriminator ("D"): 64x64 RGB, width 64, z of 100
    (smoke: 16x16, width 8)."""
    size, width = (16, 8) if smoke else (64, 64)
    if kind == "G":
        return fastgen.models.DCGANGenerator(latent_size=100, channels=3, image_size=size, width=width)
    return fastgen.models.DCGANDiscriminator(channels=3, image_size=size, width=width)


def _to_device(model: nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> nn.Module:
    return model.to(device=device, dtype=dtype, memory_format=torch.channels_last)


def _model_case(kind: str, dtype: torch.dtype, batch: int, smoke: bool) -> Case:
    fused = _dcgan(kind, smoke)
    plain = _unfused(fused)
    names = [n for n, _ in fused.named_parameters()]
    models: dict[tuple[int, torch.device], nn.Module] = {}

    def on(model: nn.Module, device: torch.device) -> nn.Module:
        key = (id(model), device)
        if key not in models:
            models[key] = _to_device(model, device)
        return models[key]

    def fn(model: nn.Module) -> Callable[..., Tensor]:
        def run(x: Tensor, *params: Tensor) -> Tensor:
            with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
                return torch.func.functional_call(on(model, x.device), dict(zip(names, params)), (x,)).float()
        return run

    size = 16 if smoke else 64
    in_shape = (batch, fused.latent_size) if kind == "G" else (batch, 3, size, size)

    def make_inputs(device: torch.device) -> tuple[Tensor, ...]:
        on(fused, device), on(plain, device)  # placed here, never inside a compiled call
        x = torch.randn(in_shape, device=device)
        if x.dim() == 4:
            x = x.to(memory_format=torch.channels_last)
        return (x.requires_grad_(), *(p.detach().to(device).clone().requires_grad_() for p in fused.parameters()))

    reference_model = copy.deepcopy(plain).double()

    def expected(inputs: tuple[Tensor, ...], outputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        device = inputs[0].device
        ref = lambda x, *p: torch.func.functional_call(on(reference_model, device), dict(zip(names, p)), (x,))
        return _fwd_bwd(ref, tuple(t.detach().double().requires_grad_() for t in inputs))

    layers = [layer for name, layer in DCGAN64_LAYERS.items() if name[0] == kind]
    sizes = [_layer_geometry(layer, batch) for layer in layers]
    item = dtype.itemsize
    return Case(
        "dcgan64", f"{kind} B={batch} {_dtype_name(dtype)}", make_inputs,
        {"fastgen": fn(fused), "eager": fn(plain)}, expected,
        floor_bytes=0 if smoke else sum(item * (3 * x + 3 * w + 2 * y) for x, w, y, _ in sizes),
        traffic_bytes=None, tolerance=CONV_TOLERANCE[dtype], kind="model", dtype=dtype,
        layers=tuple(name for name in DCGAN64_LAYERS if name[0] == kind),
        flops=0 if smoke else 3 * sum(f for *_, f in sizes),
        compiled=("fastgen-compile", *EAGER_COMPILED),
        flag="fp32" if dtype == torch.float32 and not smoke else None, bar=MODEL_BAR)


class DCGANTrainStep:
    """One DCGAN training step, as ``fastgen.train.GANTrainer`` takes it with one critic step:
    D on a real and a generated batch (non-saturating loss, Adam lr 2e-4, betas (0.5, 0.999)),
    then G through the updated D; autocast to ``dtype`` unless it is float32 or float64,
    channels_last models. ``compile_mode`` wraps G and D in ``torch.compile``, as a user
    compiles a model. Each instance trains its own copies of the templates, from their state.

    ``step(real (B, 3, S, S), z (B, 100))`` returns (d_loss, g_loss, D(x) mean, D(G(z)) mean,
    D's gradients..., G's gradients...) of that step.
    """

    def __init__(self, generator: nn.Module, discriminator: nn.Module, d_loss: Callable, g_loss: Callable,
                 dtype: torch.dtype, compile_mode: str | None = None) -> None:
        self.templates = (generator, discriminator)
        self.d_loss, self.g_loss, self.dtype, self.compile_mode = d_loss, g_loss, dtype, compile_mode
        self.state: tuple | None = None

    def _build(self, device: torch.device) -> tuple:
        param_dtype = torch.float64 if self.dtype == torch.float64 else None
        G, D = (_to_device(copy.deepcopy(m), device, param_dtype) for m in self.templates)
        betas = (0.5, 0.999)
        optimizers = (torch.optim.Adam(G.parameters(), 2e-4, betas), torch.optim.Adam(D.parameters(), 2e-4, betas))
        run_G, run_D = (torch.compile(m, mode=self.compile_mode) if self.compile_mode else m for m in (G, D))
        return G, D, run_G, run_D, *optimizers

    def __call__(self, real: Tensor, z: Tensor) -> tuple[Tensor, ...]:
        if self.state is None:
            self.state = self._build(real.device)
        G, D, run_G, run_D, opt_g, opt_d = self.state
        autocast = torch.autocast(real.device.type, dtype=self.dtype,
                                  enabled=self.dtype not in (torch.float32, torch.float64))
        with autocast:
            fake = run_G(z)
            d_loss, d_real, d_fake = self.d_loss(run_D(real), run_D(fake.detach()))
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        D.requires_grad_(False)  # G's step needs gradients through D, not for D's weights
        try:
            with autocast:
                g_loss, _ = self.g_loss(run_D(fake))
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
        finally:
            D.requires_grad_(True)
        return (d_loss.detach(), g_loss.detach(), d_real, d_fake,
                *(p.grad for p in D.parameters()), *(p.grad for p in G.parameters()))


def _train_case(dtype: torch.dtype, batch: int, smoke: bool) -> Case:
    G, D = _dcgan("G", smoke), _dcgan("D", smoke)
    plain = (_unfused(G), _unfused(D))
    losses = {"fastgen": (lambda r, f: tuple(F.gan_d_loss(r, f)), lambda f: tuple(F.gan_g_loss(f))),
              "eager": (_eager_d_loss, _eager_g_loss)}
    templates = {"fastgen": (G, D), "eager": plain}

    def build(impl: str) -> DCGANTrainStep:
        base, mode = COMPILED.get(impl, (impl, None))
        return DCGANTrainStep(*templates[base], *losses[base], dtype, compile_mode=mode)

    size = 16 if smoke else 64

    def make_inputs(device: torch.device) -> tuple[Tensor, ...]:
        real = torch.rand(batch, 3, size, size, device=device).mul(2).sub(1)
        return real.to(memory_format=torch.channels_last), torch.randn(batch, G.latent_size, device=device)

    def expected(inputs: tuple[Tensor, ...], outputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        real, z = (t.detach().double() for t in inputs)
        return DCGANTrainStep(*plain, *losses["eager"], torch.float64)(real, z)

    return Case(
        "train", f"DCGAN{size} step B={batch} {_dtype_name(dtype)}", make_inputs,
        {impl: build(impl) for impl in templates},  # make_step calls build: a fresh state per step
        expected,
        floor_bytes=0, traffic_bytes=None, tolerance=CONV_TOLERANCE[dtype], kind="train", dtype=dtype,
        layers=tuple(DCGAN64_LAYERS),
        compiled=("fastgen-compile", *EAGER_COMPILED), build=build,
        images=batch, graphable=False, flag="fp32" if dtype == torch.float32 and not smoke else None)


def model_cases(smoke: bool = False) -> list[Case]:
    """Whole DCGAN-64 G and D fwd+bwd, and a full training step, at batch 256 (bf16 decides the
    bars; fp32 is behind the "fp32" flag). Smoke: 16x16 models at batch 2, fp32."""
    batch = 2 if smoke else 256
    cases = []
    for dtype in (torch.float32,) if smoke else (torch.bfloat16, torch.float32):
        cases += [_model_case(kind, dtype, batch, smoke) for kind in "GD"]
        cases.append(_train_case(dtype, batch, smoke))
    return cases


def all_cases(smoke: bool = False) -> list[Case]:
    """Every benchmark case, op family by op family."""
    return (loss_cases(smoke) + reparam_cases(smoke) + layer_cases(smoke) + modconv_cases(smoke)
            + conditional_bn_cases(smoke) + model_cases(smoke))
