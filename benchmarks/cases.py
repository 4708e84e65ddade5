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


@dataclass
class Case:
    """One op at one shape.

    make_inputs(device) returns the inputs (leaves that require grad where the op has gradients);
    loss_fns maps "fastgen" and "eager" to a function of the inputs returning the scalar or vector
    loss (compile rows compile the eager function); reference computes the same loss in float64.
    floor_bytes is the least traffic any implementation needs (read each input, write each
    gradient once); traffic_bytes is what fastgen's kernels actually move, forward + backward.
    """

    family: str
    name: str
    make_inputs: Callable[[torch.device], tuple[Tensor, ...]]
    loss_fns: dict[str, Callable[..., Tensor]]
    reference: Callable[..., Tensor]
    floor_bytes: int
    traffic_bytes: int
    tolerance: float

    @property
    def group(self) -> str:
        return f"{self.family} {self.name}"


def make_step(case: Case, impl: str, inputs: tuple[Tensor, ...]) -> Step:
    """The fwd+bwd step of ``impl`` on ``inputs``: returns (loss, *grads of inputs needing grad)."""
    if impl in COMPILE_MODES:
        loss_fn = torch.compile(case.loss_fns["eager"], mode=COMPILE_MODES[impl])
    else:
        loss_fn = case.loss_fns[impl]
    backend = (lambda: fastgen.use_backend("triton")) if impl == "fastgen" else contextlib.nullcontext
    wrt = [t for t in inputs if t.requires_grad]

    def step() -> tuple[Tensor, ...]:
        with backend():
            loss = loss_fn(*inputs)
            grads = torch.autograd.grad(loss, wrt, torch.ones_like(loss))
        return (loss.detach(), *grads)

    return step


def check(case: Case, inputs: tuple[Tensor, ...], outputs: tuple[Tensor, ...]) -> float:
    """Largest relative error ||out - ref|| / ||ref|| of the step's outputs against float64."""
    ref_inputs = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    ref_loss = case.reference(*ref_inputs)
    ref_grads = torch.autograd.grad(ref_loss, [t for t in ref_inputs if t.requires_grad],
                                    torch.ones_like(ref_loss))
    worst = 0.0
    for out, ref in zip(outputs, (ref_loss, *ref_grads)):
        out = out.detach().double().cpu()
        ref = ref.detach().cpu()
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
            lambda r, f: R.gan_d_loss(r, f).loss,
            floor_bytes=2 * 2 * size, traffic_bytes=2 * 2 * size + 2 * 2 * size, tolerance=1e-5))
        cases.append(Case(
            "gan_g_loss", f"B={b} fp32",
            lambda device, b=b: (_logits((b, 1), torch.float32, device),),
            {"fastgen": lambda f: F.gan_g_loss(f).loss, "eager": _eager_g_loss},
            lambda f: R.gan_g_loss(f).loss,
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
            lambda x, t, r=reduction: R.bce_with_logits(x, t, reduction=r),
            # floor: read logits and target, write dlogits; fastgen: + write and re-read the
            # stored gradient (forward), then write the scaled one (backward).
            floor_bytes=3 * item * numel, traffic_bytes=5 * item * numel,
            tolerance=1e-5 if dtype == torch.float32 else 1e-2))
    return cases


def all_cases(smoke: bool = False) -> list[Case]:
    """Every benchmark case, op family by op family."""
    return loss_cases(smoke)
