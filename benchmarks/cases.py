"""Benchmark cases shared by the pytest-benchmark suites and ``benchmarks/run.py``.

A case is one op at one shape and dtype. Each implementation ("fastgen", "eager", "compile",
"compile-max-autotune") is a *step*: forward and backward on the same inputs, returning the
loss and the input gradients, so every row does the work of a training step and every row can
be checked against the float64 reference. Baselines are written the way a PyTorch user writes
them, in their best dtype, never a strawman.

``smoke=True`` shrinks every shape so the harness runs in seconds on a CPU (through the Triton
interpreter); its numbers mean nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as TF
from torch import Tensor

import fastgen
from fastgen import functional as F
from fastgen import reference as R

IMPLS = ("fastgen", "eager", "compile", "compile-max-autotune")
COMPILE_MODES = {"compile": "default", "compile-max-autotune": "max-autotune"}

Step = Callable[[], tuple[Tensor, ...]]
Outputs = Tensor | tuple[Tensor, ...]


@dataclass
class Case:
    """One op at one shape.

    make_inputs(device) returns the inputs (leaves that require grad where the op has gradients);
    fns maps "fastgen" and "eager" to a function of the inputs returning the op's output(s)
    (compile rows compile the eager function); each step backpropagates ones into every output.
    expected(inputs, outputs) gives the float64 values the step's outputs and input gradients
    should have (see :func:`reference_expected`; a random op derives them from its outputs).
    floor_bytes is the least traffic any implementation needs (read each input, write each
    output and gradient once); traffic_bytes is what fastgen's kernels actually move, fwd + bwd.
    """

    family: str
    name: str
    make_inputs: Callable[[torch.device], tuple[Tensor, ...]]
    fns: dict[str, Callable[..., Outputs]]
    expected: Callable[[tuple[Tensor, ...], tuple[Tensor, ...]], tuple[Tensor, ...]]
    floor_bytes: int
    traffic_bytes: int
    tolerance: float

    @property
    def group(self) -> str:
        return f"{self.family} {self.name}"


def _as_tuple(outputs: Outputs) -> tuple[Tensor, ...]:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def _fwd_bwd(fn: Callable[..., Outputs], inputs: tuple[Tensor, ...],
             grad_outputs: list[Tensor] | None = None) -> tuple[Tensor, ...]:
    """(outputs..., gradients of the inputs that require grad), ones as upstream gradients."""
    outputs = _as_tuple(fn(*inputs))
    if grad_outputs is None:
        grad_outputs = [torch.ones_like(o) for o in outputs]
    grads = torch.autograd.grad(outputs, [t for t in inputs if t.requires_grad], grad_outputs)
    return (*(o.detach() for o in outputs), *grads)


def make_step(case: Case, impl: str, inputs: tuple[Tensor, ...]) -> Step:
    """The fwd+bwd step of ``impl`` on ``inputs``: returns (outputs..., input gradients...)."""
    fn = torch.compile(case.fns["eager"], mode=COMPILE_MODES[impl]) if impl in COMPILE_MODES else case.fns[impl]
    backend = (lambda: fastgen.use_backend("triton")) if impl == "fastgen" else contextlib.nullcontext
    with backend(), torch.no_grad():
        # The upstream gradients are allocated once, outside the timed step.
        grad_outputs = [torch.ones_like(o) for o in _as_tuple(fn(*inputs))]

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
    worst = 0.0
    for out, ref in zip(outputs, case.expected(inputs, outputs), strict=True):
        out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
        if not torch.isfinite(out).all():
            return float("inf")
        worst = max(worst, ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item())
    return worst


# ----------------------------------------------------------------------------------------------
# BCE / GAN losses


def _eager_d_loss(real: Tensor, fake: Tensor) -> Tensor:
    loss = (TF.binary_cross_entropy_with_logits(real, torch.ones_like(real))
            + TF.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
    # The logging means a training loop reads: the fused op returns them from the same pass.
    torch.sigmoid(real.detach()).mean(), torch.sigmoid(fake.detach()).mean()
    return loss


def _eager_g_loss(fake: Tensor) -> Tensor:
    torch.sigmoid(fake.detach()).mean()
    return TF.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))


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
            {"fastgen": lambda r, f: F.gan_d_loss(r, f).loss, "eager": _eager_d_loss},
            reference_expected(lambda r, f: R.gan_d_loss(r, f).loss),
            floor_bytes=2 * 2 * size, traffic_bytes=2 * 2 * size + 2 * 2 * size, tolerance=1e-5))
        cases.append(Case(
            "gan_g_loss", f"B={b} fp32",
            lambda device, b=b: (_logits((b, 1), torch.float32, device),),
            {"fastgen": lambda f: F.gan_g_loss(f).loss, "eager": _eager_g_loss},
            reference_expected(lambda f: R.gan_g_loss(f).loss),
            floor_bytes=2 * size, traffic_bytes=4 * size, tolerance=1e-5))
    shape = (2, 3, 8, 8) if smoke else (256, 3, 64, 64)
    dtype = torch.float32 if smoke else torch.bfloat16  # the interpreter has no bf16
    numel = torch.Size(shape).numel()
    for reduction in ("mean", "per_sample"):
        item = dtype.itemsize
        cases.append(Case(
            f"bce_with_logits[{reduction}]", f"{'x'.join(map(str, shape))} {str(dtype)[6:]}",
            lambda device: (_logits(shape, dtype, device), torch.rand(shape, device=device).to(dtype)),
            {"fastgen": lambda x, t, r=reduction: F.bce_with_logits(x, t, reduction=r),
             "eager": _eager_recon(reduction)},
            reference_expected(lambda x, t, r=reduction: R.bce_with_logits(x, t, reduction=r)),
            # floor: read logits and target, write dlogits; fastgen: + write and re-read the
            # stored gradient (forward), then write the scaled one (backward).
            floor_bytes=3 * item * numel, traffic_bytes=5 * item * numel,
            tolerance=1e-5 if dtype == torch.float32 else 1e-2))
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
    """reparameterize forward + backward (gradients from z and the KL) at 65536x512."""
    rows, cols = (64, 48) if smoke else (65536, 512)
    cases = []
    for dtype in ((torch.float32,) if smoke else (torch.bfloat16, torch.float32)):
        item = dtype.itemsize

        def make_inputs(device, dtype=dtype):
            return (torch.randn(rows, cols, device=device).to(dtype).requires_grad_(),
                    (torch.randn(rows, cols, device=device) - 1).to(dtype).requires_grad_())

        cases.append(Case(
            "reparameterize", f"{rows}x{cols} {str(dtype)[6:]}", make_inputs,
            {"fastgen": lambda mu, lv: F.reparameterize(mu, lv), "eager": lambda mu, lv: R.reparameterize(mu, lv)},
            _reparam_expected,
            # fwd: read mu, logvar, write z; bwd: read mu, logvar, dz, write dmu, dlogvar. The
            # noise is regenerated, never stored, so fastgen moves exactly the floor.
            floor_bytes=8 * item * rows * cols, traffic_bytes=8 * item * rows * cols,
            tolerance=1e-5 if dtype == torch.float32 else 2e-2))
    return cases


def all_cases(smoke: bool = False) -> list[Case]:
    """Every benchmark case, op family by op family."""
    return loss_cases(smoke) + reparam_cases(smoke)
