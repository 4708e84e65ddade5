"""Fixtures shared by the tests: NaN-poisoned allocations, the relative-error measure, the CLI
runner, a small IDX data set and the metrics log reader."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

#: Where kernel tests put their tensors: CUDA when there is one (compiled kernels), else the CPU
#: (the Triton interpreter, which the root conftest switches on without CUDA).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: The relative error to float64 an fp32 result may have (DESIGN.md).
TOL = 1e-5


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
    """:data:`DEVICE` as a torch.device."""
    return torch.device(DEVICE)


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread, and CI's two cores are shared: with torch's
    threads waiting on busy cores a 128x64 matmul can take tens of milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> str:
    """A small MNIST-style data set: 96 train / 40 test random 28x28 images with labels 0..9."""
    from fastgen.data import write_idx

    folder = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    for split, n in (("train", 96), ("t10k", 40)):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{split}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
    return str(folder)


def read_metrics(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl records without the timing field (which differs run to run)."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        record.pop("images_per_s", None)
    return records


def spawn_ranks(script: str, world: int, out_dir: Path, timeout_s: float) -> list[dict]:
    """Run ``python script RANK PORT OUT_DIR`` for ranks 0..world-1 (real processes, a free
    loopback port for their gloo rendezvous, the Triton interpreter, one thread each), bounded in
    time; every rank must exit 0 and save ``OUT_DIR/rank{RANK}.pt``, which is returned in order."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = str(Path(__file__).resolve().parents[1])  # workers import tests.conftest
    env = os.environ | {"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
                        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    procs = [subprocess.Popen([sys.executable, script, str(rank), str(port), str(out_dir)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(world)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=timeout_s)[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"the {world} ranks did not finish within {timeout_s} s")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(world)]
