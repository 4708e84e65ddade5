"""The GPU report: every benchmark case, fastgen against eager and torch.compile, in one run.

    python benchmarks/run.py                 # on a CUDA machine; writes benchmarks/results/
    python benchmarks/run.py --smoke --out-dir /tmp/r   # tiny shapes on CPU: proves the harness

For every row: median time with CUDA events after warm-up (``triton.testing.do_bench``) and,
for these launch-bound steps, the median under a CUDA graph (``do_bench_cudagraph``) where the
step can be captured; effective GB/s on the case's floor bytes (the same for every row, so the
column reads as a speed ratio) and fastgen's own traffic as a share of the copy bandwidth
measured in the same run; peak extra memory; and the largest relative error against the
float64 reference. Device name, clocks, power and memory come from NVML. The report is written
as ``<device>-<date>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cases import COMPILE_MODES, IMPLS, Case, all_cases, check, make_step  # noqa: E402


def _median_ms(fn, cuda: bool, cudagraph: bool = False) -> float:
    if not cuda:  # smoke mode: wall clock, a few calls
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    import triton.testing

    if cudagraph:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_bandwidth_gbs(device: torch.device, cuda: bool) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second) on a 1 GiB buffer."""
    numel = (1 << 28) if cuda else (1 << 20)
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), cuda)
    return 2 * src.nbytes / (ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device, cuda: bool) -> float:
    """bf16 (fp32 on CPU) matmul rate on square operands: the compute floor for conv rows."""
    n, dtype = (8192, torch.bfloat16) if cuda else (256, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = _median_ms(lambda: a @ b, cuda)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def nvml_info() -> dict:
    """Device name, driver, clocks, power and memory from NVML; {} where NVML is unavailable."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as err:  # no NVIDIA driver here: the report says so instead of failing
        return {"nvml_error": f"{type(err).__name__}: {err}"}
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        driver = pynvml.nvmlSystemGetDriverVersion()
        return {
            "name": name.decode() if isinstance(name, bytes) else name,
            "driver": driver.decode() if isinstance(driver, bytes) else driver,
            "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "sm_clock_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            "power_w": pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3,
            "power_limit_w": pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1e3,
            "memory_used_mib": mem.used / 2**20,
            "memory_total_mib": mem.total / 2**20,
            "temperature_c": pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
        }
    finally:
        pynvml.nvmlShutdown()


def tuned_choices() -> dict[str, dict[str, str]]:
    """What the tuners chose in this run (conv implementation, block shapes), per problem key."""
    from fastgen import functional
    from fastgen.kernels import conv_bn_act

    tuners = (functional.CONV_IMPLEMENTATION_TUNER, conv_bn_act.GEMM_TUNER, conv_bn_act.WGRAD_TUNER)
    return {tuner.name: {str(key): str(choice) for key, choice in tuner.chosen.items()}
            for tuner in tuners}


def run_case(case: Case, impls: tuple[str, ...], device: torch.device, cuda: bool,
             copy_gbs: float, matmul_tflops: float) -> list[dict]:
    """Time every implementation of ``case`` on the same inputs; one dict per row."""
    torch.manual_seed(0)
    inputs = case.make_inputs(device)
    rows = []
    for impl in (i for i in impls if i in case.impls):
        row = {"family": case.family, "case": case.name, "impl": impl}
        try:
            step = make_step(case, impl, inputs)
            outputs = step()  # warm-up and compilation, outside every timing
            row["max_rel_err"] = check(case, inputs, outputs)
            row["ok"] = row["max_rel_err"] <= case.tolerance
            if cuda:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                step()
                torch.cuda.synchronize()
                row["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            row["ms"] = _median_ms(step, cuda)
            row["ms_cudagraph"] = None
            if cuda:
                try:
                    row["ms_cudagraph"] = _median_ms(step, cuda, cudagraph=True)
                except Exception as err:  # e.g. max-autotune's own CUDA graphs cannot nest
                    row["cudagraph_error"] = f"{type(err).__name__}: {err}"[:200]
            best_ms = min(t for t in (row["ms"], row["ms_cudagraph"]) if t is not None)
            row["floor_gbs"] = case.floor_bytes / (best_ms * 1e-3) / 1e9
            if case.flops:
                row["tflops"] = case.flops / (best_ms * 1e-3) / 1e12
                row["tflops_pct_of_matmul"] = 100 * row["tflops"] / matmul_tflops
            if impl == "fastgen" and case.traffic_bytes is not None:
                row["traffic_gbs"] = case.traffic_bytes / (best_ms * 1e-3) / 1e9
                row["traffic_pct_of_copy"] = 100 * row["traffic_gbs"] / copy_gbs
        except Exception as err:  # one failing baseline must not hide the others
            row["error"] = f"{type(err).__name__}: {err}"[:300]
            row["ok"] = False
        rows.append(row)
    by_impl = {r["impl"]: r for r in rows}
    for row in rows:
        for base in ("eager", "compile"):
            if "ms" in row and "ms" in by_impl.get(base, {}):
                row[f"speedup_vs_{base}"] = _best(by_impl[base]) / _best(row)
    return rows


def _best(row: dict) -> float:
    return min(t for t in (row["ms"], row.get("ms_cudagraph")) if t is not None)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    env, lines = report["environment"], []
    lines.append(f"# fastgen benchmark report: {env['device']}, {report['date']}\n")
    lines.append(f"torch {env['torch']}, triton {env['triton']}, python {env['python']}, "
                 f"fastgen {env['fastgen']}{' (smoke mode: numbers mean nothing)' if report['smoke'] else ''}\n")
    if env.get("nvml"):
        lines.append("NVML: " + ", ".join(f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in env["nvml"].items()) + "\n")
    lines.append(f"Measured peaks: copy {report['copy_gbs']:.0f} GB/s, matmul {report['matmul_tflops']:.1f} TFLOP/s.\n")
    lines.append("Times are medians of fwd+bwd steps: CUDA events after warm-up, and under a CUDA graph "
                 "where the step captures. Speedups use the faster of the two for each row. "
                 "floor GB/s = the least bytes any implementation must move / time; fastgen's own "
                 "traffic (where known exactly) as % of the copy bandwidth; TFLOP/s counts the "
                 "conv GEMMs (fwd+bwd = 3x fwd) against the matmul rate measured here.\n")
    lines.append("| op | case | impl | ms | ms (graph) | vs eager | vs compile | floor GB/s | "
                 "traffic % copy | TFLOP/s | % matmul | peak MiB | max rel err | ok |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['family']} | {r['case']} | {r['impl']} | error: {r['error']} |||||||||||")
            continue
        lines.append(
            f"| {r['family']} | {r['case']} | {r['impl']} | {_fmt(r['ms'], '.4f')} | "
            f"{_fmt(r.get('ms_cudagraph'), '.4f')} | {_fmt(r.get('speedup_vs_eager'), '.2f')} | "
            f"{_fmt(r.get('speedup_vs_compile'), '.2f')} | {_fmt(r.get('floor_gbs'), '.0f')} | "
            f"{_fmt(r.get('traffic_pct_of_copy'), '.0f')} | {_fmt(r.get('tflops'), '.1f')} | "
            f"{_fmt(r.get('tflops_pct_of_matmul'), '.0f')} | {_fmt(r.get('peak_extra_mib'), '.1f')} | "
            f"{r['max_rel_err']:.1e} | {'yes' if r['ok'] else 'NO'} |")
    chosen = report.get("tuned", {}).get("conv_bn_act implementation", {})
    if chosen:
        lines.append("\nThe fastgen rows' conv layers ran, per shape, the implementation timed "
                     "faster (fused kernels, or cuDNN's conv with the fused BN passes):\n")
        lines += [f"- {choice}: `{key}`" for key, choice in chosen.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU (through the Triton interpreter), no torch.compile rows")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--only", default="", help="regular expression on 'family case' to select rows")
    parser.add_argument("--tag", default="", help="appended to the report's file names (a part of a session)")
    parser.add_argument("--skip", default="", help="comma-separated implementations not to run, e.g. "
                        "compile-max-autotune (minutes of compiles per conv shape)")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        parser.error("no CUDA device: run with --smoke to check the harness on the CPU")
    device = torch.device("cuda" if cuda else "cpu")
    skipped = {name.strip() for name in args.skip.split(",") if name.strip()}
    if skipped - set(IMPLS):
        parser.error(f"--skip: unknown implementations {sorted(skipped - set(IMPLS))}; expected some of {', '.join(IMPLS)}")
    impls = tuple(i for i in IMPLS if i not in skipped and (cuda or i not in COMPILE_MODES))
    import triton

    import fastgen

    date = dt.datetime.now(dt.timezone.utc)
    device_name = torch.cuda.get_device_name() if cuda else f"cpu-{platform.machine()}"
    report = {
        "date": date.isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "environment": {"device": device_name, "torch": torch.__version__, "triton": triton.__version__,
                        "python": platform.python_version(), "fastgen": fastgen.__version__,
                        "nvml": nvml_info() if cuda else {}},
        "copy_gbs": copy_bandwidth_gbs(device, cuda),
        "matmul_tflops": matmul_tflops(device, cuda),
        "rows": [],
    }
    for case in all_cases(smoke=args.smoke):
        if re.search(args.only, case.group):
            report["rows"] += run_case(case, impls, device, cuda, report["copy_gbs"], report["matmul_tflops"])
            print(f"done: {case.group}", flush=True)

    report["tuned"] = tuned_choices()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{re.sub(r'[^A-Za-z0-9]+', '-', device_name).strip('-').lower()}-{date:%Y-%m-%d}"
    if args.tag:
        stem += "-" + re.sub(r"[^A-Za-z0-9]+", "-", args.tag).strip("-").lower()
    (args.out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (args.out_dir / f"{stem}.md").write_text(table)
    print(table)
    return 0 if all(r["ok"] for r in report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
