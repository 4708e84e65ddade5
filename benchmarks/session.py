"""One GPU session, one command, inside the time a GPU is lent for (benchmarks/gpu_session.sh).

    python3 -m benchmarks.session OUT              # on the device machine (PYTHONPATH=.)
    python3 -m benchmarks.session OUT --dry-run    # the plan only; status 1 when over budget
    python3 -m benchmarks.session OUT --with fp32,max-autotune --budget-s 1800   # longer leases

Phases, each with an estimate (benchmarks/plan.py) and a hard time limit:

1. facts: NVML device facts, torch's device properties, versions, ``nvidia-smi -q``
   (OUT/device.json, OUT/nvidia-smi.txt).
2. collect: the tests to run: the GPU-marked ones (``--tests all``: the whole suite).
3. compile+tests: on a fresh Triton and Inductor cache, one process per CPU core: a warm job per
   row that compiles something (its first call: fastgen's Triton kernels, torch.compile graphs)
   and the tests in shards (FASTGEN_AUTOTUNE=0; OUT/tests/), side by side.
4. bench: ``run.py`` times the rows one at a time, each first call now a cache hit
   (OUT/<device>-<date>-session.json and .md; the JSON is rewritten after every case).
5. summary: OUT/summary.md (also printed) and OUT/session.json, written whatever happened before.

A phase's limit is the budget left, shared among the phases still to run in proportion to their
estimates: a phase past its limit is killed (its whole process group) and the session goes on,
so the summary is always written inside the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import plan as P  # noqa: E402
from benchmarks.cases import COMPILED, FLAGS, all_cases, select  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TEST_SELECTIONS = {"gpu": ["-m", "gpu"], "all": [], "none": None}
_RUNNING: set[subprocess.Popen] = set()  # killed on the way out, whatever ends the session


def _kill(proc: subprocess.Popen) -> None:
    """Kill a process started by _start and everything it started (its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    _RUNNING.discard(proc)


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    _RUNNING.add(proc)
    return proc


def run_process(cmd: list[str], env: dict[str, str], limit_s: float, log: Path) -> dict:
    """Run ``cmd`` with output to ``log``; kill it at ``limit_s``. {"status", "rc", "seconds"}."""
    start = time.monotonic()
    proc = _start(cmd, env, log)
    try:
        rc = proc.wait(timeout=max(limit_s, 0.0))
    except subprocess.TimeoutExpired:
        _kill(proc)
        return {"status": "timeout", "rc": None, "seconds": time.monotonic() - start}
    _RUNNING.discard(proc)
    return {"status": "ok" if rc == 0 else "failed", "rc": rc, "seconds": time.monotonic() - start}


def run_pool(jobs: list[P.Job], workers: int, limit_s: float,
             launch: Callable[[P.Job], subprocess.Popen], poll_s: float = 0.1) -> dict[str, dict]:
    """Run the jobs, ``workers`` at a time, ready jobs by longest critical path first (as
    plan.simulate assumes); a job waits for the jobs in its ``after`` to end (whatever their
    status). A job past JOB_LIMIT_FACTOR times its estimate (and JOB_LIMIT_MIN_S), and every job
    still running at ``limit_s``, is killed. Returns {name: {"status", "rc", "seconds", "est_s"}}; jobs never
    started get status "not run"."""
    priority = P.critical_paths(jobs)
    pending = sorted(jobs, key=lambda j: -priority[j.name])
    running: dict[str, tuple[subprocess.Popen, float, P.Job]] = {}
    results: dict[str, dict] = {}
    deadline = time.monotonic() + limit_s
    while pending or running:
        now = time.monotonic()
        ready = [j for j in pending if set(j.after) <= results.keys()]
        for job in ready[:workers - len(running)] if now < deadline else []:
            pending.remove(job)
            running[job.name] = (launch(job), now, job)
        for name, (proc, start, job) in list(running.items()):
            rc = proc.poll()
            job_limit = max(P.JOB_LIMIT_FACTOR * job.est_s, P.JOB_LIMIT_MIN_S)
            if rc is None and now < deadline and now - start < job_limit:
                continue
            _kill(proc)  # also what a finished job left running in its group (compile workers)
            status = "timeout" if rc is None else "ok" if rc == 0 else "failed"
            results[name] = {"status": status, "rc": rc, "seconds": now - start, "est_s": job.est_s}
            del running[name]
        if now >= deadline and not running:
            break
        time.sleep(poll_s)
    for job in pending:
        results[job.name] = {"status": "not run", "rc": None, "seconds": 0.0, "est_s": job.est_s}
    return results


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def write_facts(path: str) -> None:
    """The device facts (NVML, torch's device properties, versions) as JSON, and ``nvidia-smi
    -q`` beside them: the facts phase, run in its own process."""
    import platform

    import torch
    import triton

    from benchmarks.run import nvml_info

    facts = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
             "cuda": torch.version.cuda, "cpu_count": os.cpu_count(), "nvml": nvml_info()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts |= {"device": props.name, "capability": f"sm_{props.major}{props.minor}",
                  "sm_count": props.multi_processor_count, "memory_gib": props.total_memory / 2**30,
                  "cudnn": torch.backends.cudnn.version()}
    Path(path).write_text(json.dumps(facts, indent=2))
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "-q"], capture_output=True, text=True, timeout=30)
        (Path(path).parent / "nvidia-smi.txt").write_text(smi.stdout + smi.stderr)


def collect_tests(selection: str, env: dict[str, str], limit_s: float) -> tuple[list[str], dict]:
    """Node ids of the tests ``selection`` names (TEST_SELECTIONS), by pytest --collect-only."""
    if TEST_SELECTIONS[selection] is None:
        return [], {"status": "ok", "rc": 0, "seconds": 0.0}
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
           *TEST_SELECTIONS[selection], "tests"]
    start = time.monotonic()
    try:
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit_s)
    except subprocess.TimeoutExpired:
        return [], {"status": "timeout", "rc": None, "seconds": time.monotonic() - start}
    ids = [line.strip() for line in out.stdout.splitlines() if "::" in line]
    status = "ok" if out.returncode in (0, 5) else "failed"  # 5: no test selected
    return ids, {"status": status, "rc": out.returncode, "seconds": time.monotonic() - start}


def _test_counts(test_dir: Path) -> dict:
    """Totals over the shards' junit XML files, and the failing tests' names."""
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed": []}
    for xml in sorted(test_dir.glob("shard-*.xml")):
        for suite in ET.parse(xml).getroot().iter("testsuite"):
            for key in ("tests", "failures", "errors", "skipped"):
                counts[key] += int(suite.get(key, 0))
        for case in ET.parse(xml).getroot().iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                counts["failed"].append(f"{case.get('classname')}::{case.get('name')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _ms(row: dict) -> str:
    """A row's best median: CUDA events or, where it captured, the CUDA graph."""
    return f"{min(t for t in (row['ms'], row.get('ms_cudagraph')) if t is not None):.4f}"


def _device_line(out: Path) -> str:
    facts = json.loads((out / "device.json").read_text()) if (out / "device.json").exists() else {}
    nvml = facts.get("nvml", {})
    head = (f"fastgen GPU session: {facts.get('device', nvml.get('name', 'no device facts'))} "
            f"({facts.get('capability', '?')}), torch {facts.get('torch', '?')}, triton {facts.get('triton', '?')}")
    if not nvml or "nvml_error" in nvml:
        return f"{head}; NVML: {nvml.get('nvml_error', 'no facts')}"
    return (f"{head}; NVML: SM {nvml.get('sm_clock_mhz', '?')}/{nvml.get('sm_clock_max_mhz', '?')} MHz, "
            f"{nvml.get('power_w', 0):.0f}/{nvml.get('power_limit_w', 0):.0f} W, {nvml.get('temperature_c', '?')} C, "
            f"throttle reasons {nvml.get('throttle_reasons', '?')}")


def summarize(plan: P.Plan, phases: dict[str, dict], jobs: dict[str, dict], out: Path) -> str:
    """The one-screen summary: device, phases (estimated, limit, measured), tests, compile and
    timing seconds against their estimates, and per case fastgen's ratios against eager and
    torch.compile, with the bar and correctness."""
    lines = [_device_line(out)]
    total = sum(p.get("seconds", 0.0) for p in phases.values())
    lines.append("phases (estimate / limit / measured s): " + ", ".join(
        f"{name} {plan.phases[name]:.0f}/{p.get('limit_s', 0):.0f}/{p.get('seconds', 0):.0f} {p['status']}"
        for name, p in phases.items()) + f"; total {total:.0f} of {plan.budget_s:.0f} s")
    tests = _test_counts(out / "tests")
    shards = [r for name, r in jobs.items() if name.startswith("tests ")]
    lines.append(f"tests ({plan.n_tests} collected, FASTGEN_AUTOTUNE=0): {tests['passed']} passed, "
                 f"{tests['failures'] + tests['errors']} failed, {tests['skipped']} skipped; shards: "
                 + (", ".join(r["status"] for r in shards) or "none"))
    lines += [f"  FAILED {name}" for name in tests["failed"][:8]]
    warm = {name: r for name, r in jobs.items() if not name.startswith("tests ")}
    statuses = Counter(r["status"] for r in warm.values())
    lines.append(f"warm jobs: {len(warm)} ({', '.join(f'{n} {s}' for s, n in sorted(statuses.items()))}), "
                 f"{sum(r['seconds'] for r in warm.values()):.0f} s of worker time (estimated "
                 f"{sum(r['est_s'] for r in warm.values()):.0f})")
    lines += [f"  {r['status'].upper()} {name} ({r['seconds']:.0f} s, estimated {r['est_s']:.0f})"
              for name, r in warm.items() if r["status"] != "ok"][:8]

    reports = sorted(out.glob("*-session.json"))
    rows = json.loads(reports[-1].read_text())["rows"] if reports else []
    by_key = {(f"{r['family']} {r['case']}", r["impl"]): r for r in rows}
    planned = {(row.case.group, row.impl): row for row in plan.rows}
    first = sum(r.get("first_call_s", 0.0) for r in rows)
    first_est = sum(planned[key].bench_s - P.TIMING_S for key in by_key if key in planned)
    lines.append(f"timing phase: first calls {first:.0f} s (estimated {first_est:.0f}), timing and checks "
                 f"{sum(r.get('row_s', 0.0) for r in rows) - first:.0f} s (estimated {P.TIMING_S * len(rows):.0f})")

    lines.append(f"\n{'case':<44}{'fastgen ms':>11}{'vs eager':>9}{'vs compile':>11}  {'bar':<11}ok")
    for case in {row.case.group: row.case for row in plan.rows}.values():
        fast = by_key.get((case.group, "fastgen"))
        if fast is None or "ms" not in fast:
            lines.append(f"{case.group:<44}{'not run' if fast is None else 'error: ' + fast['error'][:50]}")
            continue
        eager, compiled = fast.get("speedup_vs_eager"), fast.get("speedup_vs_compile")
        bar = ""
        if case.bar:
            met = eager is not None and eager >= case.bar[0] and (
                case.bar[1] is None or (compiled is not None and compiled >= case.bar[1]))
            bar = f"{case.bar[0]:g}/{case.bar[1] or '-'} {'MET' if met else 'no'}"
        ok = all(r.get("ok") for (group, _), r in by_key.items() if group == case.group)
        images = f"  {fast['images_per_s']:.0f} img/s" if "images_per_s" in fast else ""
        lines.append(f"{case.group:<44}{_ms(fast):>11}{_ratio(eager):>9}{_ratio(compiled):>11}  "
                     f"{bar:<11}{'yes' if ok else 'NO'}{images}")
        inside = by_key.get((case.group, "fastgen-compile"))
        if inside is not None and "ms" in inside:
            lines.append(f"{'  fastgen inside torch.compile':<44}{_ms(inside):>11}"
                         f"{_ratio(inside.get('speedup_vs_eager')):>9}{_ratio(inside.get('speedup_vs_compile')):>11}")
    bad = [f"  {group} | {impl}: " + (r.get("error") or f"max rel err {r['max_rel_err']:.1e}")
           for (group, impl), r in by_key.items() if not r.get("ok")]
    missing = [key for key in planned if key not in by_key]
    lines.append(f"\nrows: {len(rows)} run of {len(plan.rows)} planned, {len(bad)} wrong or failed"
                 + (f", {len(missing)} not run" if missing else ""))
    lines += bad[:8]
    return "\n".join(lines) + "\n"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_session.sh", description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, help="output folder (needed unless --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and its estimate, run nothing")
    parser.add_argument("--with", dest="flags", default="",
                        help=f"comma-separated extra rows, some of {', '.join(FLAGS)}: longer than the budget allows")
    parser.add_argument("--only", default="", help="regular expression on 'family case': the rows to run")
    parser.add_argument("--tests", choices=tuple(TEST_SELECTIONS), default="gpu",
                        help="which tests: the GPU-marked ones (default), the whole suite, or none")
    parser.add_argument("--budget-s", type=float, default=P.BUDGET_S,
                        help=f"seconds the whole session may take (default {P.BUDGET_S:.0f})")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"parallel compile processes (default: the CPU cores here with CUDA, else the "
                        f"device machine's {P.DEVICE_CPU_CORES})")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny rows on the CPU through the Triton interpreter: checks the session's logic")
    args = parser.parse_args(argv)
    if args.out is None and not args.dry_run:
        parser.error("OUT: the output folder is required (or --dry-run)")
    if args.budget_s <= 0:
        parser.error(f"--budget-s: expected a positive number of seconds, got {args.budget_s:g}")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers: expected at least 1, got {args.workers}")
    try:
        re.compile(args.only)
    except re.error as err:
        parser.error(f"--only: not a regular expression ({err})")
    args.flag_set = tuple(sorted({f.strip() for f in args.flags.split(",") if f.strip()}))
    unknown = set(args.flag_set) - set(FLAGS)
    if unknown:
        parser.error(f"--with: unknown {sorted(unknown)}; expected some of {', '.join(FLAGS)}")
    return args


def _env(cache: Path | None, smoke: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if cache is not None:  # a fresh cache: the session pays, and measures, every compile
        env |= {"TRITON_CACHE_DIR": str(cache / "triton"), "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
                "TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}
    if smoke:
        env["TRITON_INTERPRET"] = "1"
    return env


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import torch

    workers = args.workers or (os.cpu_count() if torch.cuda.is_available() else P.DEVICE_CPU_CORES)
    selected = select(all_cases(smoke=args.smoke), args.flag_set, args.only)
    if args.smoke:  # no torch.compile rows on the CPU (run.py --smoke drops them too)
        selected = [(c, tuple(i for i in impls if i not in COMPILED)) for c, impls in selected]
    start = time.monotonic()
    test_ids, collected = collect_tests(args.tests, _env(None, args.smoke), P.COLLECT_LIMIT_S)
    plan = P.make_plan(selected, test_ids, workers, args.budget_s, args.flag_set)
    text = P.format_plan(plan)
    if collected["status"] != "ok":
        text += f"\n\nWARNING: collecting the tests {collected['status']} (rc {collected['rc']})"
    over = (f"The plan's estimate, {plan.total_s:.0f} s, exceeds the budget of {plan.budget_s:.0f} s: "
            "drop rows (--only, --with) or raise --budget-s.")
    if args.dry_run:
        print(text)
        if not plan.fits:
            print(f"\n{over}", file=sys.stderr)
        return 0 if plan.fits else 1
    if not plan.fits:  # the limits still end the session inside the budget: late phases are cut
        text += f"\n\nWARNING: {over}"
        print(f"WARNING: {over} Running anyway: the phase limits cut what does not fit.", flush=True)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.txt").write_text(text + "\n")
    phases: dict[str, dict] = {"collect": collected | {"limit_s": P.COLLECT_LIMIT_S}}
    jobs: dict[str, dict] = {}
    remaining = dict(plan.phases)
    remaining.pop("collect")
    cache = Path(tempfile.mkdtemp(prefix="fastgen-session-cache-"))  # removed at the end
    env = _env(cache, args.smoke)
    flags = ["--with", ",".join(args.flag_set)] + (["--smoke"] if args.smoke else [])

    def limit(name: str) -> float:
        budget_left = args.budget_s - (time.monotonic() - start)
        return P.limits(remaining, budget_left)[name]

    def launch(job: P.Job) -> subprocess.Popen:
        if job.tests:
            index = job.name.split()[1].split("/")[0]
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   f"--junitxml={out / 'tests' / f'shard-{index}.xml'}", *job.tests]
            return _start(cmd, env | {"FASTGEN_AUTOTUNE": "0"}, out / "tests" / f"shard-{index}.log")
        cmd = [sys.executable, "benchmarks/run.py", "--warm", "--only", f"^{re.escape(job.case)}$",
               "--impls", job.impl, *flags]
        # Many compiling processes side by side: one compile thread each.
        return _start(cmd, env | {"TORCHINDUCTOR_COMPILE_THREADS": "1"}, out / "warm" / f"{_slug(job.name)}.log")

    sigterm = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally below still runs
    try:
        for name in list(remaining):
            if name == "summary":
                break
            phase_limit = limit(name)
            if name == "facts":
                facts = f"from benchmarks.session import write_facts; write_facts({str(out / 'device.json')!r})"
                cmd = [sys.executable, "-c", facts]
                result = run_process(cmd, env, phase_limit, out / "facts.log")
            elif name == "compile+tests":
                phase_start = time.monotonic()
                jobs = run_pool(plan.jobs, workers, phase_limit, launch)
                statuses = {r["status"] for r in jobs.values()}
                result = {"status": "ok" if statuses <= {"ok"} else "timeout" if statuses & {"timeout", "not run"}
                          else "failed", "seconds": time.monotonic() - phase_start}
            else:  # bench
                cmd = [sys.executable, "benchmarks/run.py", "--out-dir", str(out), "--tag", "session",
                       "--only", args.only, "--row-limit-s", str(P.ROW_LIMIT_S), *flags]
                result = run_process(cmd, env, phase_limit, out / "bench.log")
            phases[name] = result | {"limit_s": phase_limit}
            remaining.pop(name)
            print(f"{name}: {result['status']} in {result['seconds']:.0f} s (estimate {plan.phases[name]:.0f}, "
                  f"limit {phase_limit:.0f})", flush=True)
    finally:
        for proc in list(_RUNNING):
            _kill(proc)
        signal.signal(signal.SIGTERM, sigterm)
        shutil.rmtree(cache, ignore_errors=True)
        summary_start = time.monotonic()
        try:
            summary = summarize(plan, phases, jobs, out)
        except Exception as err:  # a summary of what is known beats none
            summary = f"summary failed: {type(err).__name__}: {err}\nphases: {json.dumps(phases)}\n"
        (out / "summary.md").write_text(summary)
        phases["summary"] = {"status": "ok", "seconds": time.monotonic() - summary_start, "limit_s": P.SUMMARY_S}
        (out / "session.json").write_text(json.dumps({
            "plan": {"workers": plan.workers, "budget_s": plan.budget_s, "flags": plan.flags,
                     "estimate_s": plan.phases, "total_s": plan.total_s, "tests": plan.n_tests},
            "phases": phases, "jobs": jobs, "seconds": time.monotonic() - start}, indent=2))
        print(summary)
    return 0 if all(p["status"] == "ok" for p in phases.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
