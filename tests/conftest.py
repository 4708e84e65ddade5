"""Fixtures shared by the tests: NaN-poisoned allocations, the relative-error measure, the CLI runner."""

import pytest
import torch


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``fastgen.cli.main(argv)`` -> (exit code, stdout, stderr); argparse's exits count as
    return codes."""
    from fastgen.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf, so NaN never passes."""
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


@pytest.fixture
def nan_poison(monkeypatch):
    """Fill every floating tensor that torch.empty / torch.empty_like allocate with NaN, so an
    element a kernel forgets to write shows up in the result."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poisoned(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poisoned(empty_like(*a, **k)))


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests put their tensors: CUDA when there is one (compiled kernels), else the
    CPU (the Triton interpreter, which the root conftest switches on without CUDA)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread, and CI's two cores are shared: with torch's
    threads waiting on busy cores a 128x64 matmul can take tens of milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
