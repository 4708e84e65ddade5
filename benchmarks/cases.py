"""Benchmark cases shared by the pytest-benchmark suites and ``benchmarks/run.py``.

A case is one op at one shape and dtype. Each implementation ("fastgen", "eager", "compile",
"compile-max-autotune", and for conv-BN layers "fastgen-cudnn-gemm": cuDNN's conv with fastgen's
fused BN statistics and apply around it, the alternative DESIGN.md asks the dispatch to pick
where it is measured faster) is a *step*: forward and backward on the same inputs, returning the
loss and the input gradients, so every row does the work of a training step and every row can
be checked against the float64 reference. Baselines are written the way a PyTorch user writes
them, in their best dtype, never a strawman.

``smoke=True`` shrinks every shape so the harness runs in seconds on a CPU (through the Triton
interpreter); its numbers mean nothing.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as TF
from torch import Tensor

import fastgen
import fastgen.nn
from fastgen import functional as F
from fastgen import reference as R

IMPLS = ("fastgen", "fastgen-cudnn-gemm", "eager", "compile", "compile-max-autotune")
COMPILE_MODES = {"compile": "default", "compile-max-autotune": "max-autotune"}

Step = Callable[[], tuple[Tensor, ...]]
Outputs = Tensor | tuple[Tensor, ...]


@dataclass
class Case:
    """One op at one shape.

    make_inputs(device) returns the inputs (leaves that require grad where the op has gradients);
    fns maps "fastgen", "eager" and optionally "fastgen-cudnn-gemm" to a function of the inputs
    returning the op's output(s) (compile rows compile the eager function); each step
    backpropagates fixed random gradients (:func:`_upstream`) into every output.
    expected(inputs, outputs) gives the float64 values the step's outputs and input gradients
    should have (see :func:`reference_expected`; a random op derives them from its outputs).
    floor_bytes is the least traffic any implementation needs (read each input, write each
    output and gradient once); traffic_bytes is what fastgen's kernels actually move, where it
    is known exactly; flops counts the GEMM work (0 for elementwise ops). ``backward=False``
    times the forward alone (under no_grad).
    """

    family: str
    name: str
    make_inputs: Callable[[torch.device], tuple[Tensor, ...]]
    fns: dict[str, Callable[..., Outputs]]
    expected: Callable[[tuple[Tensor, ...], tuple[Tensor, ...]], tuple[Tensor, ...]]
    floor_bytes: int
    traffic_bytes: int | None
    tolerance: float
    flops: int = 0
    backward: bool = True

    @property
    def group(self) -> str:
        return f"{self.family} {self.name}"

    @property
    def impls(self) -> tuple[str, ...]:
        """The implementations this case has, in IMPLS order."""
        return tuple(i for i in IMPLS if i in self.fns or i in COMPILE_MODES)


def _as_tuple(outputs: Outputs) -> tuple[Tensor, ...]:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def _upstream(output: Tensor) -> Tensor:
    """The upstream gradient for ``output``: fixed random numbers (ones would make BatchNorm's
    input gradient vanish), the same for every implementation and for the reference."""
    gen = torch.Generator(output.device).manual_seed(0)
    return torch.randn(output.shape, generator=gen, device=output.device).to(output.dtype)


def _fwd_bwd(fn: Callable[..., Outputs], inputs: tuple[Tensor, ...],
             grad_outputs: list[Tensor] | None = None) -> tuple[Tensor, ...]:
    """(outputs..., gradients of the inputs that require grad) for the :func:`_upstream` gradients."""
    outputs = _as_tuple(fn(*inputs))
    if grad_outputs is None:
        grad_outputs = [_upstream(o) for o in outputs]
    grads = torch.autograd.grad(outputs, [t for t in inputs if t.requires_grad], grad_outputs)
    return (*(o.detach() for o in outputs), *grads)


def make_step(case: Case, impl: str, inputs: tuple[Tensor, ...]) -> Step:
    """The step of ``impl`` on ``inputs``: (outputs..., input gradients...), or the outputs alone
    for a forward-only case."""
    fn = torch.compile(case.fns["eager"], mode=COMPILE_MODES[impl]) if impl in COMPILE_MODES else case.fns[impl]
    backend = (lambda: fastgen.use_backend("triton")) if impl.startswith("fastgen") else contextlib.nullcontext
    if not case.backward:
        def forward() -> tuple[Tensor, ...]:
            with backend(), torch.no_grad():
                return _as_tuple(fn(*inputs))
        return forward

    with backend(), torch.no_grad():
        # The upstream gradients are made once, outside the timed step.
        grad_outputs = [_upstream(o) for o in _as_tuple(fn(*inputs))]

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
KERNEL = 4
CONV_TOLERANCE = {torch.float32: 5e-3, torch.bfloat16: 5e-2}  # fp32 convs may use TF32, as torch's


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


def _dcgan_model(kind: str) -> torch.nn.Sequential:
    """The plain-PyTorch DCGAN 64x64 generator ("G") or discriminator ("D"), DCGAN init."""
    blocks = []
    for name, (transposed, c_in, c_out, _, stride, padding, bn, activation) in DCGAN64_LAYERS.items():
        if name[0] != kind:
            continue
        conv_type = torch.nn.ConvTranspose2d if transposed else torch.nn.Conv2d
        blocks.append(conv_type(c_in, c_out, KERNEL, stride, padding, bias=False))
        if bn:
            blocks.append(torch.nn.BatchNorm2d(c_out))
        blocks.append({"relu": torch.nn.ReLU(), "tanh": torch.nn.Tanh(), "identity": torch.nn.Identity(),
                       "leaky_relu": torch.nn.LeakyReLU(0.2)}[activation])
    model = torch.nn.Sequential(*blocks)
    for p in model.parameters():
        torch.nn.init.normal_(p, 1.0 if p.dim() == 1 else 0.0, 0.02)
    return model


def _model_case(kind: str, dtype: torch.dtype, batch: int) -> Case:
    torch_model = _dcgan_model(kind)
    fused = fastgen.nn.fuse(copy.deepcopy(torch_model))
    layers = [layer for name, layer in DCGAN64_LAYERS.items() if name[0] == kind]
    in_shape = (batch, layers[0][1], layers[0][3], layers[0][3])
    models = {}

    def on(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        key = (id(model), device)
        if key not in models:
            models[key] = model.to(device, memory_format=torch.channels_last)
        return models[key]

    def fn(model: torch.nn.Module) -> Callable[..., Tensor]:
        # fuse() nests each conv-BN-act run in a block: same parameters, in order, other names.
        names = [n for n, _ in model.named_parameters()]

        def run(x: Tensor, *params: Tensor) -> Tensor:
            with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
                return torch.func.functional_call(on(model, x.device), dict(zip(names, params)), (x,)).float()
        return run

    def make_inputs(device: torch.device) -> tuple[Tensor, ...]:
        x = torch.randn(in_shape, device=device).to(memory_format=torch.channels_last).requires_grad_()
        return (x, *(p.detach().to(device).clone().requires_grad_() for p in torch_model.parameters()))

    reference_model = copy.deepcopy(torch_model).double()
    names = [n for n, _ in torch_model.named_parameters()]

    def expected(inputs: tuple[Tensor, ...], outputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        device = inputs[0].device
        ref = lambda x, *p: torch.func.functional_call(on(reference_model, device), dict(zip(names, p)), (x,))
        return _fwd_bwd(ref, tuple(t.detach().double().requires_grad_() for t in inputs))

    sizes = [_layer_geometry(layer, batch) for layer in layers]
    item = dtype.itemsize
    return Case(
        "dcgan64", f"{kind} B={batch} {str(dtype)[6:]}", make_inputs,
        {"fastgen": fn(fused), "eager": fn(torch_model)}, expected,
        floor_bytes=sum(item * (3 * x + 3 * w + 2 * y) for x, w, y, _ in sizes), traffic_bytes=None,
        tolerance=CONV_TOLERANCE[dtype], flops=3 * sum(f for *_, f in sizes))


def conv_cases(smoke: bool = False) -> list[Case]:
    """Every DCGAN 64x64 layer at batch 256, forward and forward + backward, and whole G and D."""
    batch = 2 if smoke else 256
    dtypes = (torch.float32,) if smoke else (torch.bfloat16, torch.float32)
    layer_names = ["D2"] if smoke else list(DCGAN64_LAYERS)  # the interpreter is slow: one smoke layer
    cases = []
    for dtype in dtypes:
        item = dtype.itemsize
        for name in layer_names:
            layer = DCGAN64_LAYERS[name]
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
                cases.append(Case(
                    "conv_bn_act" if bn else "conv_bias_act",
                    f"DCGAN64 {name} B={batch} {str(dtype)[6:]} {'fwd+bwd' if backward else 'fwd'}",
                    make_inputs, fns,
                    reference_expected(_layer_fn(R, layer)),
                    floor_bytes=item * ((3 * x_count + 3 * w_count + 2 * y_count) if backward
                                        else (x_count + w_count + y_count)),
                    traffic_bytes=None, tolerance=1e-4 if smoke else CONV_TOLERANCE[dtype],
                    flops=3 * flops if backward else flops, backward=backward))
        if not smoke:  # whole models through the interpreter take minutes: GPU rows only
            cases += [_model_case(kind, dtype, batch) for kind in "GD"]
    return cases


def all_cases(smoke: bool = False) -> list[Case]:
    """Every benchmark case, op family by op family."""
    return loss_cases(smoke) + reparam_cases(smoke) + conv_cases(smoke)
