"""Backend choice: names, environment, context manager, fallback under "auto"."""

import subprocess
import sys
import warnings

import pytest
import torch

import fastgen
from fastgen import backend
from fastgen import functional as F


@pytest.fixture(autouse=True)
def clean_failures(monkeypatch, device):
    monkeypatch.delenv("FASTGEN_BACKEND", raising=False)
    backend.reset_failures()
    with device:  # tensors where the kernels run: CUDA, or the CPU through the interpreter
        yield
    backend.reset_failures()


def _kernel_calls(monkeypatch, name: str = "bce_forward", fail: BaseException | None = None) -> list[str]:
    """Record the calls of ``fastgen.kernels.bce.<name>`` (which raise ``fail`` instead, when given):
    whether a call ran the Triton path, whatever op layer sits above the kernels."""
    from fastgen.kernels import bce

    calls = []
    original = getattr(bce, name)

    def recorded(*args, **kwargs):
        calls.append(name)
        if fail is not None:
            raise fail
        return original(*args, **kwargs)

    monkeypatch.setattr(bce, name, recorded)
    return calls


def _loss(device=None):
    return F.bce_with_logits(torch.randn(3, 4, requires_grad=True, device=device), torch.rand(3, 4, device=device))


def test_default_is_auto_and_env_and_context_override(monkeypatch):
    assert fastgen.get_backend() == "auto"
    monkeypatch.setenv("FASTGEN_BACKEND", "reference")
    assert fastgen.get_backend() == "reference"
    with fastgen.use_backend("triton"):
        assert fastgen.get_backend() == "triton"
        with fastgen.use_backend("auto"):
            assert fastgen.get_backend() == "auto"
        assert fastgen.get_backend() == "triton"
    assert fastgen.get_backend() == "reference"


def test_unknown_backend_lists_the_valid_ones(monkeypatch):
    with pytest.raises(ValueError, match="use_backend.*'cuda'.*auto, triton, reference"):
        with fastgen.use_backend("cuda"):
            pass
    monkeypatch.setenv("FASTGEN_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTGEN_BACKEND.*'fast'.*auto, triton, reference"):
        fastgen.get_backend()


def test_each_backend_runs_its_path(monkeypatch):
    calls = _kernel_calls(monkeypatch)
    with fastgen.use_backend("reference"):
        _loss()
    assert calls == []
    with fastgen.use_backend("triton"):
        _loss()
    assert len(calls) == 1
    # "auto" runs the kernels on CUDA tensors, and on CPU tensors under the interpreter that
    # conftest switches on without CUDA.
    _loss()
    assert len(calls) == 2


def _break_kernel(monkeypatch) -> list[str]:
    return _kernel_calls(monkeypatch, fail=RuntimeError("simulated compile failure"))


def test_auto_warns_once_remembers_and_falls_back(monkeypatch):
    calls = _break_kernel(monkeypatch)
    with pytest.warns(RuntimeWarning, match="bce_with_logits.*simulated compile failure.*FASTGEN_BACKEND=triton"):
        loss = _loss()
    assert torch.isfinite(loss) and len(calls) == 1  # the reference's result
    assert "simulated compile failure" in backend.failed_ops()["bce_with_logits"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no second warning, no second try
        _loss()
    assert len(calls) == 1
    # Other ops keep their kernels.
    gan_calls = _kernel_calls(monkeypatch, "gan_loss_forward")
    F.gan_g_loss(torch.randn(4, requires_grad=True))
    assert gan_calls == ["gan_loss_forward"]


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory"), MemoryError()])
def test_auto_lets_out_of_memory_through_and_keeps_the_kernel(monkeypatch, error):
    from fastgen.kernels import bce

    kernel = bce.bce_forward
    _kernel_calls(monkeypatch, fail=error)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning either
        with pytest.raises(type(error)):
            _loss()
    assert backend.failed_ops() == {}
    monkeypatch.setattr(bce, "bce_forward", kernel)  # memory is back: the next call runs the kernel
    calls = _kernel_calls(monkeypatch)
    _loss()
    assert calls == ["bce_forward"]


def _failing(error=RuntimeError("simulated backward failure")):
    def run():
        raise error
    return run


def test_guard_runs_the_triton_step_when_it_works():
    assert backend.guard("op", lambda: "triton", lambda: "reference", backend="auto") == "triton"
    assert backend.failed_ops() == {}


def test_guard_under_auto_falls_back_remembers_and_disables_the_forward(monkeypatch):
    with pytest.warns(RuntimeWarning, match="fastgen.bce_with_logits.*simulated backward failure"):
        assert backend.guard("bce_with_logits", _failing(), lambda: "reference") == "reference"
    assert "simulated backward failure" in backend.failed_ops()["bce_with_logits"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no second warning
        assert backend.guard("bce_with_logits", _failing(), lambda: "reference") == "reference"
    calls = _kernel_calls(monkeypatch)
    _loss()
    assert calls == []  # later forwards run the reference


def test_guard_without_a_reference_remembers_then_raises():
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="simulated backward failure"):
        backend.guard("bce_with_logits", _failing())
    assert "bce_with_logits" in backend.failed_ops()


def test_guard_takes_the_forward_backend_over_the_current_one():
    # The forward ran under "triton": its backward raises, even where the thread's backend is auto.
    with pytest.raises(RuntimeError, match="simulated backward failure"):
        backend.guard("op", _failing(), lambda: "reference", backend="triton")
    with fastgen.use_backend("triton"), pytest.warns(RuntimeWarning):
        assert backend.guard("op", _failing(), lambda: "reference", backend="auto") == "reference"
    assert list(backend.failed_ops()) == ["op"]


def test_guard_lets_out_of_memory_through():
    with pytest.raises(torch.cuda.OutOfMemoryError):
        backend.guard("op", _failing(torch.cuda.OutOfMemoryError("CUDA out of memory")), lambda: "reference")
    assert backend.failed_ops() == {}


def test_triton_backend_raises_instead_of_falling_back(monkeypatch):
    _break_kernel(monkeypatch)
    with fastgen.use_backend("triton"), pytest.raises(RuntimeError, match="simulated compile failure"):
        _loss()
    assert backend.failed_ops() == {}


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with fastgen.use_backend("triton"), pytest.raises(RuntimeError, match="needs CUDA tensors.*cpu"):
        _loss("cpu")
    # "auto" quietly takes the reference for CPU tensors when the interpreter is off.
    calls = _kernel_calls(monkeypatch)
    _loss("cpu")
    assert calls == []


def test_validation_errors_are_not_swallowed_by_auto():
    with pytest.raises(ValueError, match="target"):
        F.bce_with_logits(torch.randn(3), torch.rand(4))
    assert backend.failed_ops() == {}


def test_fastgen_imports_and_trains_without_triton():
    # A process where `import triton` fails: fastgen must import and run the reference path.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, fastgen\n"
        "from fastgen import functional as F\n"
        "x = torch.randn(4, 3, requires_grad=True)\n"
        "F.bce_with_logits(x, torch.rand(4, 3)).backward()\n"
        "assert x.grad is not None and not fastgen.backend.triton_available()\n"
        "with fastgen.use_backend('triton'):\n"
        "    try:\n"
        "        F.gan_g_loss(torch.randn(4))\n"
        "    except RuntimeError as e:\n"
        "        assert 'triton is not installed' in str(e)\n"
        "    else:\n"
        "        raise AssertionError('expected an error')\n"
        "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_compiled_module_runs_on_the_reference_path():
    loss_fn = fastgen.nn.GANLoss()

    @torch.compile(backend="eager")
    def step(real, fake):
        return loss_fn.d_loss(real, fake).loss + loss_fn.g_loss(fake).loss

    real, fake = torch.randn(8), torch.randn(8, requires_grad=True)
    with fastgen.use_backend("reference"):
        expected = loss_fn.d_loss(real, fake).loss + loss_fn.g_loss(fake).loss
        assert torch.allclose(step(real, fake), expected)


@pytest.mark.gpu
def test_compiled_module_runs_the_kernels_on_cuda():
    loss_fn = fastgen.nn.GANLoss()
    real = torch.randn(256, device="cuda")
    fake = torch.randn(256, device="cuda", requires_grad=True)
    compiled = torch.compile(lambda r, f: loss_fn.d_loss(r, f).loss + loss_fn.g_loss(f).loss)
    out = compiled(real, fake)
    out.backward()
    with fastgen.use_backend("reference"):
        ref = loss_fn.d_loss(real, fake.detach()).loss + loss_fn.g_loss(fake.detach()).loss
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6) and torch.isfinite(fake.grad).all()
