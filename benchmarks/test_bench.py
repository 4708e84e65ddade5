"""pytest-benchmark suite: fastgen vs eager vs torch.compile, one group per case (benchmarks/cases.py).

    pytest benchmarks --benchmark-only          # on a CUDA machine
    pytest benchmarks/test_bench.py             # without CUDA: tiny smoke shapes, fastgen
                                                # (Triton interpreter) and eager rows only

Each benchmark times a forward+backward step and is checked against the float64 reference
first, so a fast wrong row fails instead of ranking.
"""

import pytest
import torch

from benchmarks.cases import COMPILED, IMPLS, all_cases, check, make_step

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", all_cases(smoke=not CUDA), ids=lambda c: c.group.replace(" ", "-"))
def test_step(benchmark, case, impl):
    if impl not in case.impls:
        pytest.skip(f"{case.group} has no {impl} implementation")
    if impl in COMPILED and not CUDA:
        pytest.skip("torch.compile rows are measured on CUDA only; the CPU run proves the harness")
    if case.kind in ("model", "train") and impl.startswith("fastgen") and not CUDA:
        pytest.skip("a whole model takes minutes through the interpreter; tests/test_gan_models.py "
                    "checks the fused DCGAN there")
    torch.manual_seed(0)
    inputs = case.make_inputs(DEVICE)
    step = make_step(case, impl, inputs)
    assert check(case, inputs, step()) <= case.tolerance
    benchmark.group = case.group

    def synced_step():
        step()
        if CUDA:
            torch.cuda.synchronize()

    if CUDA:
        benchmark(synced_step)
    else:
        benchmark.pedantic(synced_step, rounds=2, iterations=1)
