"""The GPU session's plan: the phases, the jobs and rows in each, what each costs, and whether
the whole fits the time a GPU is lent for (benchmarks/session.py runs it).

Every estimate is a sum of the cost constants below, so it can be checked by hand and corrected
by measurement: a session's summary prints estimated against measured seconds per phase, and
its ``session.json`` keeps the measured seconds of every job and every row.

The session runs on a cold cache (a fresh Triton and Inductor cache directory): first a pool of
worker processes compiles, in parallel, everything the report will run (one job per row that
compiles something: fastgen's Triton kernels, torch.compile graphs) while the GPU-marked tests
run in shards beside them; then the rows are timed one at a time, each first call now a cache
hit. Compiles are CPU work: the pool has one worker per CPU core.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from benchmarks.cases import Case

BUDGET_S = 540.0  # 9 minutes: a GPU is lent for about 15, starting the machine included
DEVICE_CPU_CORES = 16  # the device machine (one H100/H200)

# --- Measured: triton.compile of fastgen's conv GEMM for sm_90a (a GPUTarget, the divisibility a
# launch gives) with triton 3.9 on this project's 2-core CI CPU, 2026-12-01: 1.1-3.7 s per
# specialization (mean 2.0 s) over the 5 tile candidates and the plain / transposed / BN-gradient
# variants; an elementwise kernel 0.2 s. Rounded up: triton 3.6 on the device may differ.
TRITON_GEMM_COMPILE_S = 2.5  # one conv GEMM or weight-gradient specialization
TRITON_KERNEL_COMPILE_S = 0.5  # one elementwise / reduction kernel

# --- Estimates, not measured yet (no GPU has run fastgen): replace them with a session's numbers.
PROCESS_START_S = 6.0  # python3, import torch / triton / fastgen, CUDA context
OP_KERNELS = 4  # a fused loss or sampler: forward, partial-sum reduction, backward, spare
LAYER_KERNELS = 10  # a conv layer beside its GEMMs: statistics, combine, apply, their backwards
CUDNN_GEMM_KERNELS = 4  # the cuDNN-conv + fused BN row: its BN passes
MODEL_LAYER_KERNELS = 3  # per layer of a whole model: variants its layer row lacks (bias, running stats)
# torch.compile of one step function (forward and backward graphs) on a cold cache, by row kind.
INDUCTOR_COMPILE_S = {"op": 15.0, "layer": 20.0, "model": 60.0, "train": 150.0}
MAX_AUTOTUNE_COMPILE_S = {"op": 60.0, "layer": 240.0, "model": 600.0, "train": 900.0}
# Timing phase, per row: the first call of a warmed row (dynamo tracing, cache loads, the tile
# tuners timing their candidates), then do_bench (25 ms warm-up, 100 ms), a CUDA-graph median
# (50 ms), the peak-memory run and the float64 check (benchmarks/run.py).
FIRST_CALL_S = {"op": 1.0, "layer": 2.0, "model": 8.0, "train": 20.0}
TIMING_S = 1.0
BENCH_START_S = 12.0  # run.py: process start, copy bandwidth and matmul rate
ROW_LIMIT_S = 90.0  # a row past this is stopped and reported (e.g. its warm job failed: a cold compile)
JOB_LIMIT_FACTOR = 3.0  # a warm job or test shard past this many times its estimate is stopped,
JOB_LIMIT_MIN_S = 60.0  # but never before this: 16 processes starting at once start slowly
TEST_S = 10.0  # one GPU-marked test on a cold cache, FASTGEN_AUTOTUNE=0 (default tiles only)
TEST_SHARD_S = 60.0  # tests per shard: about this many seconds each
FACTS_S = 10.0  # nvidia-smi, NVML, versions
COLLECT_S = 10.0  # pytest --collect-only of the tests to run
COLLECT_LIMIT_S = 60.0  # its hard limit (it runs before the plan exists)
SUMMARY_S = 2.0


@dataclass
class Job:
    """A process in the compile+tests phase: a warm job (one row's first call) or a test shard."""

    name: str
    est_s: float
    after: tuple[str, ...] = ()  # jobs whose kernels this one reuses: it starts when they end
    case: str = ""  # warm job: the row's case group and implementation
    impl: str = ""
    tests: tuple[str, ...] = ()  # test shard: pytest node ids


@dataclass
class Row:
    case: Case
    impl: str
    bench_s: float


@dataclass
class Plan:
    workers: int
    budget_s: float
    flags: tuple[str, ...]
    rows: list[Row]
    jobs: list[Job]
    n_tests: int
    phases: dict[str, float] = field(default_factory=dict)  # name -> estimated seconds

    @property
    def total_s(self) -> float:
        return sum(self.phases.values())

    @property
    def fits(self) -> bool:
        return self.total_s <= self.budget_s


def _gemm_specializations(case: Case) -> int:
    """Conv GEMM and weight-gradient specializations one layer row compiles: every tile candidate
    of the tuners (kernels/conv_bn_act.py), for the forward and, with backward, the input and
    weight gradients."""
    from fastgen.kernels import conv_bn_act

    gemm, wgrad = len(conv_bn_act.GEMM_TUNER.candidates), len(conv_bn_act.WGRAD_TUNER.candidates)
    return gemm + (gemm + wgrad if case.backward else 0)


def compile_s(case: Case, impl: str) -> float:
    """Seconds of compiling the first call of ``impl`` pays on a cold cache (its warm job, less
    the process start); 0 for eager PyTorch."""
    seconds = 0.0
    if impl.startswith("fastgen"):
        if case.kind == "op":
            seconds += OP_KERNELS * TRITON_KERNEL_COMPILE_S
        elif case.kind == "layer":
            kernels = CUDNN_GEMM_KERNELS if impl == "fastgen-cudnn-gemm" else LAYER_KERNELS
            gemms = 0 if impl == "fastgen-cudnn-gemm" else _gemm_specializations(case)
            seconds += gemms * TRITON_GEMM_COMPILE_S + kernels * TRITON_KERNEL_COMPILE_S
        else:  # the layers' kernels come from their rows' jobs (``after``); the losses here
            losses = 2 * OP_KERNELS if case.kind == "train" else 0
            seconds += (len(case.layers) * MODEL_LAYER_KERNELS + losses) * TRITON_KERNEL_COMPILE_S
    if impl in ("compile", "fastgen-compile"):
        seconds += INDUCTOR_COMPILE_S[case.kind]
    elif impl == "compile-max-autotune":
        seconds += MAX_AUTOTUNE_COMPILE_S[case.kind]
    return seconds


def bench_s(case: Case, impl: str) -> float:
    """Seconds a warmed row takes in the timing phase."""
    return (FIRST_CALL_S[case.kind] if impl != "eager" else 0.0) + TIMING_S


def warm_jobs(selected: list[tuple[Case, tuple[str, ...]]]) -> list[Job]:
    """One job per row that compiles something; a model's or training step's fastgen rows start
    after the fastgen rows of their layers (same dtype, fwd+bwd), whose kernels they reuse."""
    layer_jobs: dict[tuple[str, object], str] = {}
    for case, impls in selected:
        if case.kind == "layer" and case.backward and "fastgen" in impls:
            layer_jobs[(case.layers[0], case.dtype)] = f"{case.group} | fastgen"
    jobs = []
    for case, impls in selected:
        for impl in impls:
            if impl == "eager":
                continue
            after = ()
            if case.kind in ("model", "train") and impl.startswith("fastgen"):
                after = tuple(layer_jobs[key] for key in ((name, case.dtype) for name in case.layers)
                              if key in layer_jobs)
            jobs.append(Job(f"{case.group} | {impl}", PROCESS_START_S + compile_s(case, impl), after,
                            case=case.group, impl=impl))
    return jobs


def test_shards(node_ids: list[str]) -> list[Job]:
    """The tests split round-robin into shards of about TEST_SHARD_S seconds each."""
    if not node_ids:
        return []
    n = max(1, math.ceil(len(node_ids) * TEST_S / TEST_SHARD_S))
    shards = [tuple(node_ids[i::n]) for i in range(n)]
    return [Job(f"tests {i + 1}/{n}", PROCESS_START_S + len(ids) * TEST_S, tests=ids)
            for i, ids in enumerate(shards) if ids]


def critical_paths(jobs: list[Job]) -> dict[str, float]:
    """Each job's estimate plus the longest chain of jobs that wait for it: the scheduling
    priority (longest first), as in list scheduling with precedence."""
    waiting = {job.name: [j for j in jobs if job.name in j.after] for job in jobs}
    paths: dict[str, float] = {}

    def path(job: Job) -> float:
        if job.name not in paths:
            paths[job.name] = job.est_s + max((path(j) for j in waiting[job.name]), default=0.0)
        return paths[job.name]

    for job in jobs:
        path(job)
    return paths


def simulate(jobs: list[Job], workers: int) -> float:
    """Seconds until the last job ends when ``workers`` processes take the ready jobs, longest
    critical path first, and each job lasts its estimate: the phase's estimate."""
    priority = critical_paths(jobs)
    pending, running, done, now = list(jobs), [], set(), 0.0
    while pending or running:
        ready = sorted((j for j in pending if set(j.after) <= done), key=lambda j: -priority[j.name])
        for job in ready[:workers - len(running)]:
            pending.remove(job)
            running.append((now + job.est_s, job.name))
        if not running:
            raise ValueError(f"jobs wait for jobs that never run: {[j.name for j in pending]}")
        running.sort()
        now, name = running.pop(0)
        done.add(name)
    return now


def make_plan(selected: list[tuple[Case, tuple[str, ...]]], test_ids: list[str], workers: int,
              budget_s: float = BUDGET_S, flags: tuple[str, ...] = ()) -> Plan:
    """The plan for these rows and tests on ``workers`` CPU cores."""
    if workers < 1:
        raise ValueError(f"workers: expected at least 1, got {workers}")
    rows = [Row(case, impl, bench_s(case, impl)) for case, impls in selected for impl in impls]
    jobs = warm_jobs(selected) + test_shards(test_ids)
    plan = Plan(workers, budget_s, flags, rows, jobs, len(test_ids))
    plan.phases = {
        "facts": FACTS_S,
        "collect": COLLECT_S,
        "compile+tests": simulate(jobs, workers),
        "bench": BENCH_START_S + sum(r.bench_s for r in rows),
        "summary": SUMMARY_S,
    }
    return plan


def limits(estimates: dict[str, float], remaining_s: float) -> dict[str, float]:
    """Hard time limits for the phases still to run: the remaining time shared in proportion to
    their estimates, so each gets at least its estimate when the plan fits, and slack left by an
    early phase goes to the later ones."""
    total = sum(estimates.values())
    return {name: remaining_s * est / total for name, est in estimates.items()}


PHASE_WHAT = {
    "facts": "NVML device facts, nvidia-smi, versions",
    "collect": "pytest --collect-only: the tests to run",
    "compile+tests": "warm jobs (Triton kernels, torch.compile graphs; cold caches) and test shards",
    "bench": "rows timed one at a time, checked against float64",
    "summary": "summary.md and session.json",
}


def format_plan(plan: Plan) -> str:
    """The plan as text: phases with estimate and hard limit, the jobs, the rows."""
    lines = [f"GPU session plan: {plan.workers} CPU workers, budget {plan.budget_s:.0f} s"
             + (f", with {', '.join(plan.flags)}" if plan.flags else "")]
    hard = limits(plan.phases, plan.budget_s)
    lines.append(f"{'phase':<15}{'estimate':>10}{'limit':>9}  what")
    for name, est in plan.phases.items():
        what = PHASE_WHAT[name]
        if name == "compile+tests":
            warm = sum(1 for j in plan.jobs if not j.tests)
            what += (f": {warm} warm jobs, {len(plan.jobs) - warm} shards of {plan.n_tests} tests, "
                     f"{sum(j.est_s for j in plan.jobs):.0f} s of work on {plan.workers} workers")
        elif name == "bench":
            what += f": {len(plan.rows)} rows"
        lines.append(f"{name:<15}{est:>9.0f}s{hard[name]:>8.0f}s  {what}")
    verdict = "fits" if plan.fits else f"OVER the budget by {plan.total_s - plan.budget_s:.0f} s"
    lines.append(f"{'total':<15}{plan.total_s:>9.0f}s{plan.budget_s:>8.0f}s  {verdict}")
    lines.append("\nwarm jobs and test shards (estimated seconds, process start included):")
    lines += [f"  {job.est_s:6.1f}  {job.name}" + (f"  (after {len(job.after)} layer jobs)" if job.after else "")
              for job in sorted(plan.jobs, key=lambda j: -j.est_s)]
    lines.append("\nrows (estimated seconds in the timing phase):")
    lines += [f"  {row.bench_s:6.1f}  {row.case.group} | {row.impl}" for row in plan.rows]
    return "\n".join(lines)
