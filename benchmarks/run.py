"""The GPU report: the benchmark cases, fastgen against eager and torch.compile, in one run.

    python benchmarks/run.py                 # on a CUDA machine; writes benchmarks/results/
    python benchmarks/run.py --with fp32,fwd,max-autotune   # and the rows behind those flags
    python benchmarks/run.py --with stylegan --only 'modulated|per-sample'   # the issue-14 layers
    python benchmarks/run.py --smoke --out-dir /tmp/r   # tiny shapes on CPU: proves the harness
    python benchmarks/run.py --plan          # the GPU session's plan (benchmarks/session.py)

For every row: median time with CUDA events after warm-up (``triton.testing.do_bench``) and,
for these launch-bound steps, the median under a CUDA graph (``do_bench_cudagraph``) where the
step can be captured; effective GB/s on the case's floor bytes (the same for every row, so the
column reads as a speed ratio) and fastgen's own traffic as a share of the copy bandwidth
measured in the same run; peak extra memory; and the largest relative error against the
float64 reference; a training step's images/s. Device name, clocks, power and memory come from
NVML. The report is written as ``<device>-<date>.json`` (after every case, so a run stopped
midway keeps its rows) and ``.md``. ``--warm`` only makes each row's first call (its compiles):
the GPU session's warm jobs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import signal
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cases import COMPILED, FLAGS, IMPLS, Case, all_cases, check, make_step, select  # noqa: E402


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
        return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


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
    """Device facts from NVML: name, driver, clocks, power, memory, temperature, PCIe link,
    throttle reasons; {"nvml_error": ...} where NVML is unavailable. A field this device does not
    report is left out."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as err:  # no NVIDIA driver here: the report says so instead of failing
        return {"nvml_error": f"{type(err).__name__}: {err}"}
    try:
        nv = pynvml
        handle = nv.nvmlDeviceGetHandleByIndex(torch.cuda.current_device() if torch.cuda.is_available() else 0)
        fields = {
            "name": lambda: nv.nvmlDeviceGetName(handle),
            "driver": nv.nvmlSystemGetDriverVersion,
            "sm_clock_mhz": lambda: nv.nvmlDeviceGetClockInfo(handle, nv.NVML_CLOCK_SM),
            "sm_clock_max_mhz": lambda: nv.nvmlDeviceGetMaxClockInfo(handle, nv.NVML_CLOCK_SM),
            "mem_clock_mhz": lambda: nv.nvmlDeviceGetClockInfo(handle, nv.NVML_CLOCK_MEM),
            "power_w": lambda: nv.nvmlDeviceGetPowerUsage(handle) / 1e3,
            "power_limit_w": lambda: nv.nvmlDeviceGetEnforcedPowerLimit(handle) / 1e3,
            "memory_used_mib": lambda: nv.nvmlDeviceGetMemoryInfo(handle).used / 2**20,
            "memory_total_mib": lambda: nv.nvmlDeviceGetMemoryInfo(handle).total / 2**20,
            "temperature_c": lambda: nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU),
            "pcie_gen": lambda: nv.nvmlDeviceGetCurrPcieLinkGeneration(handle),
            "pcie_width": lambda: nv.nvmlDeviceGetCurrPcieLinkWidth(handle),
            "throttle_reasons": lambda: hex(nv.nvmlDeviceGetCurrentClocksThrottleReasons(handle)),
            "mig_mode": lambda: nv.nvmlDeviceGetMigMode(handle)[0],
        }
        info = {}
        for key, read in fields.items():
            try:
                value = read()
            except Exception:  # NVMLError_NotSupported and the like: one missing fact, not a failure
                continue
            info[key] = value.decode() if isinstance(value, bytes) else value
        return info
    finally:
        pynvml.nvmlShutdown()


def tuned_choices() -> dict[str, dict[str, str]]:
    """What the tuners chose in this run (conv implementation, block shapes), per problem key."""
    from fastgen import functional
    from fastgen.kernels import conv_bn_act

    tuners = (functional.CONV_IMPLEMENTATION_TUNER, conv_bn_act.GEMM_TUNER, conv_bn_act.WGRAD_TUNER)
    return {tuner.name: {str(key): str(choice) for key, choice in tuner.chosen.items()}
            for tuner in tuners}


class RowTimeout(Exception):
    """A row ran past its time limit."""


@contextmanager
def time_limit(seconds: float | None):
    """Raise RowTimeout in this (main) thread after ``seconds``; None: no limit. Python code is
    interrupted between bytecodes, so a compile stops at once and a kernel call when it returns."""
    if not seconds:
        yield
        return

    def expire(signum, frame):
        raise RowTimeout(f"stopped after its {seconds:.0f} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _fresh_compiles() -> None:
    # Each row compiles its own static graphs, as in the session's warm jobs (one process per
    # row), so its compiles hit their caches: otherwise a function compiled again for another
    # shape recompiles with dynamic shapes, a graph no warm job built.
    torch._dynamo.reset()


def run_case(case: Case, impls: tuple[str, ...], device: torch.device, cuda: bool,
             copy_gbs: float, matmul_tflops: float, row_limit_s: float | None = None) -> list[dict]:
    """Time every implementation of ``case`` on the same inputs; one dict per row."""
    torch.manual_seed(0)
    inputs = case.make_inputs(device)
    rows = []
    for impl in (i for i in impls if i in case.impls):
        row = {"family": case.family, "case": case.name, "impl": impl}
        start = time.perf_counter()
        try:
            with time_limit(row_limit_s):
                _time_row(row, case, impl, inputs, cuda, copy_gbs, matmul_tflops)
        except Exception as err:  # one failing baseline must not hide the others
            row["error"] = f"{type(err).__name__}: {err}"[:300]
            row["ok"] = False
        row["row_s"] = time.perf_counter() - start
        rows.append(row)
    by_impl = {r["impl"]: r for r in rows}
    for row in rows:
        for base in ("eager", "compile"):
            if "ms" in row and "ms" in by_impl.get(base, {}):
                row[f"speedup_vs_{base}"] = _best(by_impl[base]) / _best(row)
    return rows


def _time_row(row: dict, case: Case, impl: str, inputs: tuple, cuda: bool, copy_gbs: float,
              matmul_tflops: float) -> None:
    _fresh_compiles()
    start = time.perf_counter()
    step = make_step(case, impl, inputs)
    outputs = step()  # warm-up and compilation, outside every timing
    if cuda:
        torch.cuda.synchronize()
    row["first_call_s"] = time.perf_counter() - start
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
    if cuda and case.graphable:
        try:
            row["ms_cudagraph"] = _median_ms(step, cuda, cudagraph=True)
        except Exception as err:  # e.g. max-autotune's own CUDA graphs cannot nest
            row["cudagraph_error"] = f"{type(err).__name__}: {err}"[:200]
    best_s = _best(row) * 1e-3
    if case.floor_bytes:
        row["floor_gbs"] = case.floor_bytes / best_s / 1e9
    if case.flops:
        row["tflops"] = case.flops / best_s / 1e12
        row["tflops_pct_of_matmul"] = 100 * row["tflops"] / matmul_tflops
    if case.images:
        row["images_per_s"] = case.images / best_s
    if impl == "fastgen" and case.traffic_bytes is not None:
        row["traffic_gbs"] = case.traffic_bytes / best_s / 1e9
        row["traffic_pct_of_copy"] = 100 * row["traffic_gbs"] / copy_gbs


def warm_case(case: Case, impls: tuple[str, ...], device: torch.device) -> list[dict]:
    """The first call of each implementation, untimed and unchecked: what a warm job does to fill
    the Triton and Inductor caches for the timing run. One dict per row with its seconds."""
    torch.manual_seed(0)
    inputs = case.make_inputs(device)
    rows = []
    for impl in (i for i in impls if i in case.impls):
        _fresh_compiles()
        start = time.perf_counter()
        make_step(case, impl, inputs)()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rows.append({"family": case.family, "case": case.name, "impl": impl,
                     "first_call_s": time.perf_counter() - start})
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
    lines.append("Times are medians of fwd+bwd steps (a training step: both updates): CUDA events after "
                 "warm-up, and under a CUDA graph where the step captures. Speedups use the faster of the "
                 "two for each row. floor GB/s = the least bytes any implementation must move / time; "
                 "fastgen's own traffic (where known exactly) as % of the copy bandwidth; TFLOP/s counts "
                 "the conv GEMMs (fwd+bwd = 3x fwd) against the matmul rate measured here.\n")
    columns = ("op", "case", "impl", "ms", "ms (graph)", "vs eager", "vs compile", "floor GB/s",
               "traffic % copy", "TFLOP/s", "% matmul", "images/s", "peak MiB", "max rel err", "ok")
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['family']} | {r['case']} | {r['impl']} | error: {r['error']} |"
                         + "|" * (len(columns) - 4))
            continue
        lines.append(
            f"| {r['family']} | {r['case']} | {r['impl']} | {_fmt(r['ms'], '.4f')} | "
            f"{_fmt(r.get('ms_cudagraph'), '.4f')} | {_fmt(r.get('speedup_vs_eager'), '.2f')} | "
            f"{_fmt(r.get('speedup_vs_compile'), '.2f')} | {_fmt(r.get('floor_gbs'), '.0f')} | "
            f"{_fmt(r.get('traffic_pct_of_copy'), '.0f')} | {_fmt(r.get('tflops'), '.1f')} | "
            f"{_fmt(r.get('tflops_pct_of_matmul'), '.0f')} | {_fmt(r.get('images_per_s'), '.0f')} | "
            f"{_fmt(r.get('peak_extra_mib'), '.1f')} | {r['max_rel_err']:.1e} | {'yes' if r['ok'] else 'NO'} |")
    if "scaling" in report:
        from benchmarks.scaling import markdown_line

        lines.append("\nData-parallel scaling (weak: a fixed batch per process):\n")
        lines.append("| row | 1 process | N processes | speedup | efficiency |")
        lines.append("|---|---|---|---|---|")
        lines.append(markdown_line(report["scaling"]))
    chosen = report.get("tuned", {}).get("conv_bn_act implementation", {})
    if chosen:
        lines.append("\nThe fastgen rows' conv layers ran, per shape, the implementation timed "
                     "faster (fused kernels, or cuDNN's conv with the fused BN passes):\n")
        lines += [f"- {choice}: `{key}`" for key, choice in chosen.items()]
    return "\n".join(lines) + "\n"


def _names(text: str) -> set[str]:
    return {name.strip() for name in text.split(",") if name.strip()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU (through the Triton interpreter), no torch.compile rows")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--with", dest="flags", default="",
                        help=f"comma-separated extra rows, some of {', '.join(FLAGS)} (the default rows "
                        "decide the bars; max-autotune costs minutes of compiles per conv shape)")
    parser.add_argument("--only", default="", help="regular expression on 'family case' to select rows")
    parser.add_argument("--impls", default="", help=f"comma-separated implementations to run, some of "
                        f"{', '.join(IMPLS)} (default: every one the rows have)")
    parser.add_argument("--skip", default="", help="comma-separated implementations not to run")
    parser.add_argument("--scaling", action="store_true",
                        help="also the data-parallel scaling row (benchmarks/scaling.py: DCGAN-64 training "
                        "images/s on 1 and on every GPU through torchrun; skipped below two GPUs)")
    parser.add_argument("--tag", default="", help="appended to the report's file names (a part of a session)")
    parser.add_argument("--row-limit-s", type=float, default=None,
                        help="stop a row after this many seconds and report it as an error")
    parser.add_argument("--warm", action="store_true",
                        help="only make each row's first call (its compiles), untimed: a GPU session's warm job")
    parser.add_argument("--plan", action="store_true",
                        help="print the GPU session's plan for these rows and exit (status 1 when over budget)")
    args = parser.parse_args(argv)

    if args.plan:
        from benchmarks import session

        return session.main(["--dry-run", "--with", args.flags, "--only", args.only])
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        parser.error("no CUDA device: run with --smoke to check the harness on the CPU")
    device = torch.device("cuda" if cuda else "cpu")
    wanted = _names(args.impls) or set(IMPLS)
    if wanted - set(IMPLS):
        parser.error(f"--impls: unknown implementations {sorted(wanted - set(IMPLS))}; "
                     f"expected some of {', '.join(IMPLS)}")
    try:
        selected = select(all_cases(smoke=args.smoke), _names(args.flags), args.only, _names(args.skip))
    except ValueError as err:
        parser.error(str(err).replace("flags:", "--with:").replace("skip:", "--skip:"))
    # The CPU smoke run proves the harness: no torch.compile rows (Inductor's C++ compiles).
    selected = [(case, impls) for case, impls in
                ((c, tuple(i for i in impls if i in wanted and (cuda or i not in COMPILED))) for c, impls in selected)
                if impls]
    if args.warm:
        for case, impls in selected:
            for row in warm_case(case, impls, device):
                print(json.dumps(row), flush=True)
        return 0
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
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{re.sub(r'[^A-Za-z0-9]+', '-', device_name).strip('-').lower()}-{date:%Y-%m-%d}"
    if args.tag:
        stem += "-" + re.sub(r"[^A-Za-z0-9]+", "-", args.tag).strip("-").lower()

    def save() -> None:
        report["tuned"] = tuned_choices()
        (args.out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2))

    for case, impls in selected:
        report["rows"] += run_case(case, impls, device, cuda, report["copy_gbs"], report["matmul_tflops"],
                                   args.row_limit_s)
        save()  # after every case: a run stopped by its time limit keeps the rows it finished
        print(f"done: {case.group}", flush=True)
    if args.scaling:
        from benchmarks.scaling import scaling_row

        report["scaling"] = scaling_row() if cuda else {"row": "ddp-scaling", "skipped": "no CUDA device"}
    save()
    table = markdown(report)
    (args.out_dir / f"{stem}.md").write_text(table)
    print(table)
    return 0 if all(r["ok"] for r in report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
