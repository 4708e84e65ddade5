"""CI gate: the kernels compile for the GPUs fastgen targets, on a machine without one.

Compiles the CI subset of benchmarks/compile_report.py (default tiles, every tuner candidate of
one variant per GEMM kernel and dtype, one misaligned launch per kernel) for sm_90a and sm_80 and
fails on a specialization that does not compile, spills registers to local memory or needs more
shared memory than a block may have; bf16 conv GEMMs must use tensor cores (wgmma on sm_90a,
mma on sm_80) fed by asynchronous copies (cp.async or TMA), and every default GEMM tile must
leave room for 2 CTAs per SM. A few minutes on 2 cores.
"""

from __future__ import annotations

import os

import pytest

from benchmarks import compile_report

# The conv GEMMs, and their modulated variants that kernels/modconv.py launches.
GEMM_KERNELS = ("conv_bn_act._conv_gemm_kernel", "conv_bn_act._conv_wgrad_kernel",
                "modconv._conv_gemm_kernel", "modconv._conv_wgrad_kernel")


def _cuda_backend() -> bool:
    from triton.backends import backends

    return "nvidia" in backends


@pytest.fixture(scope="module", params=list(compile_report.TARGETS))
def report(request) -> tuple[str, list[dict]]:
    if not _cuda_backend():
        pytest.skip("triton has no CUDA backend installed: nothing to compile for")
    return request.param, compile_report.build(request.param, "ci", jobs=os.cpu_count())


def _name(row: dict) -> str:
    return f"{row['kernel']} {row['variant']} {row['dtype']} {row['tile']}" + ("" if row["aligned"] else " unaligned")


def test_every_specialization_compiles(report):
    target, rows = report
    assert rows and not [f"{_name(r)}: {r['error']}" for r in rows if not r["compiled"]], target


def test_no_specialization_spills(report):
    target, rows = report
    assert not [f"{_name(r)}: {r['local_bytes']} B local" for r in rows if r["compiled"] and r["spills"]], target


def test_every_specialization_fits_shared_memory(report):
    """Including every tile a tuner keeps for this target: the static pruning
    (TileConfig.fits) leaves no candidate that cannot launch."""
    target, rows = report
    assert not [f"{_name(r)}: {r['shared']} B" for r in rows if r["compiled"] and not r["fits_shared"]], target


def test_half_precision_conv_gemms_use_tensor_cores_and_async_copies(report):
    target, rows = report
    tensor_op = "wgmma" if target == "sm90a" else "mma"
    gemms = [r for r in rows if r["kernel"] in GEMM_KERNELS and r["dtype"] in ("bf16", "fp16")
             and r["aligned"] and r["compiled"]]
    assert gemms
    assert not [_name(r) for r in gemms if r[tensor_op] == 0], f"{target}: no {tensor_op}"
    assert not [_name(r) for r in gemms if r["cp_async"] + r["tma"] == 0], f"{target}: loads not pipelined"


def test_default_tiles_keep_two_ctas_per_sm(report):
    """The tiles an untuned launch runs, in fp32, TF32 and bf16 (the CI subset's), leave room for a second CTA per SM
    (registers and shared memory), so one CTA's epilogue overlaps another's main loop."""
    target, rows = report
    defaults = [r for r in rows if r["kernel"] in GEMM_KERNELS and r["default"] and r["aligned"] and r["compiled"]]
    assert {r["dtype"] for r in defaults} >= {"fp32", "tf32", "bf16"}
    assert not [f"{_name(r)}: {r['ctas_per_sm']}" for r in defaults if r["ctas_per_sm"] < 2], target
