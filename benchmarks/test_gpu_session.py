"""The GPU session's logic on the CPU (benchmarks/session.py, plan.py, gpu_session.sh): the dry
run's plan, its options, the scheduler and its limits, and tiny sessions end to end (smoke rows
through the Triton interpreter)."""

import contextlib
import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import plan as P
from benchmarks import session as S
from benchmarks.cases import DCGAN64_LAYERS, all_cases, select

REPO = Path(__file__).resolve().parent.parent
# The rows that decide the bars, and the implementations each must have.
OPS = ([f"{loss} B={b} fp32" for loss in ("gan_d_loss", "gan_g_loss") for b in (256, 4096, 65536)]
       + [f"bce_with_logits[{r}] 256x3x64x64 bf16" for r in ("mean", "per_sample")]
       + ["reparameterize 65536x512 bf16"])
LAYERS = [f"{'conv_bn_act' if layer[6] else 'conv_bias_act'} DCGAN64 {name} B=256 bf16 fwd+bwd"
          for name, layer in DCGAN64_LAYERS.items()]
MODELS = ["dcgan64 G B=256 bf16", "dcgan64 D B=256 bf16", "train DCGAN64 step B=256 bf16"]
BASE = {"fastgen", "eager", "compile"}


def _main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = S.main(argv)
        except SystemExit as exit_:
            rc = exit_.code
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def dry_run() -> tuple[int, str, str]:
    # The collect limit is the GPU machine's (16 idle cores); CI collects on 2 busy ones.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(P, "COLLECT_LIMIT_S", 600.0)
        return _main(["--dry-run"])


def _planned_rows(text: str) -> dict[str, set[str]]:
    rows: dict[str, set[str]] = {}
    for group, impl in re.findall(r"^ +[\d.]+ +(.+) \| (\S+)$", text.split("\nrows (")[1], re.M):
        rows.setdefault(group, set()).add(impl)
    return rows


def test_dry_run_plans_every_row_that_decides_a_bar_within_budget(dry_run):
    rc, text, _ = dry_run
    assert rc == 0
    rows = _planned_rows(text)
    for group in OPS:
        assert rows[group] == BASE, group
    for group in LAYERS:
        extra = {"fastgen-cudnn-gemm"} if group.startswith("conv_bn_act") else set()
        assert rows[group] == BASE | extra, group
    for group in MODELS:  # fastgen's own model inside torch.compile, beside eager and compiled PyTorch
        assert rows[group] == BASE | {"fastgen-compile"}, group
    assert set(rows) == set(OPS + LAYERS + MODELS), "the slower rows stay behind their flags"
    phases = dict(re.findall(r"^(facts|collect|compile\+tests|bench|summary) +(\d+)s +\d+s", text, re.M))
    assert list(phases) == ["facts", "collect", "compile+tests", "bench", "summary"]
    total = int(re.search(r"^total +(\d+)s +540s +fits$", text, re.M).group(1))
    assert abs(total - sum(map(int, phases.values()))) <= len(phases)  # rounding
    assert total <= 540
    tests = int(re.search(r"shards of (\d+) tests", text).group(1))
    assert tests > 0, "the GPU-marked tests are collected and planned"


def test_the_estimate_is_a_sum_of_the_cost_constants():
    from fastgen.kernels import conv_bn_act

    cases = {c.group: c for c in all_cases()}
    layer, loss = cases[LAYERS[1]], cases[OPS[0]]
    plan = P.make_plan([(loss, ("fastgen", "eager")), (layer, ("fastgen", "compile"))], ["t1", "t2"], workers=1)
    gemms = 2 * len(conv_bn_act.GEMM_TUNER.candidates) + len(conv_bn_act.WGRAD_TUNER.candidates)
    jobs = {job.name: job.est_s for job in plan.jobs}
    assert jobs == {
        f"{loss.group} | fastgen": P.PROCESS_START_S + P.OP_KERNELS * P.TRITON_KERNEL_COMPILE_S,
        f"{layer.group} | fastgen": P.PROCESS_START_S + gemms * P.TRITON_GEMM_COMPILE_S
        + P.LAYER_KERNELS * P.TRITON_KERNEL_COMPILE_S,
        f"{layer.group} | compile": P.PROCESS_START_S + P.INDUCTOR_COMPILE_S["layer"],
        "tests 1/1": P.PROCESS_START_S + 2 * P.TEST_S}
    assert plan.phases["compile+tests"] == pytest.approx(sum(jobs.values()))  # one worker: serial
    assert plan.phases["bench"] == pytest.approx(
        P.BENCH_START_S + 4 * P.TIMING_S + P.FIRST_CALL_S["op"] + 2 * P.FIRST_CALL_S["layer"])


def test_model_rows_wait_for_their_layers_kernels():
    selected = select(all_cases(), only="DCGAN64 G|dcgan64 G")
    plan = P.make_plan(selected, [], workers=16)
    (model,) = [j for j in plan.jobs if j.name == "dcgan64 G B=256 bf16 | fastgen"]
    assert model.after == tuple(f"{group} | fastgen" for group in LAYERS[:5])
    assert P.simulate(plan.jobs, 16) == pytest.approx(
        max(j.est_s for j in plan.jobs if j.name in model.after)
        + max(j.est_s for j in plan.jobs if j.after))


def test_flags_add_rows_and_a_dry_run_over_budget_fails():
    fp32 = {c.group for c, _ in select(all_cases(), ["fp32"])} - {c.group for c, _ in select(all_cases())}
    assert "dcgan64 G B=256 fp32" in fp32 and "reparameterize 65536x512 fp32" in fp32
    rc, text, err = _main(["--dry-run", "--with", "max-autotune", "--tests", "none"])
    assert rc == 1 and "compile-max-autotune" in text and "OVER the budget" in text
    assert "exceeds the budget of 540 s" in err
    rc, text, _ = _main(["--dry-run", "--with", "max-autotune", "--tests", "none", "--budget-s", "3600"])
    assert rc == 0 and "fits" in text


@pytest.mark.parametrize("argv, message", [
    (["--dry-run", "--with", "fp64"], "--with: unknown ['fp64']"),
    (["--dry-run", "--budget-s", "0"], "--budget-s: expected a positive number"),
    (["--dry-run", "--workers", "0"], "--workers: expected at least 1"),
    (["--dry-run", "--only", "("], "--only: not a regular expression"),
    (["--dry-run", "--tests", "some"], "--tests: invalid choice: 'some'"),
    ([], "OUT: the output folder is required"),
])
def test_bad_options_fail_with_a_clear_message(argv, message):
    rc, _, err = _main(argv)
    assert rc == 2 and message in err


def test_the_shell_command_passes_options_and_fails_clearly():
    done = subprocess.run(["bash", "benchmarks/gpu_session.sh", "/tmp/unused", "--with", "nope"], cwd=REPO,
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert done.returncode == 2 and "--with: unknown ['nope']" in done.stderr


def test_simulate_and_limits():
    jobs = [P.Job("a", 3.0), P.Job("b", 2.0), P.Job("c", 2.0)]
    assert P.simulate(jobs, 2) == 4.0 and P.simulate(jobs, 1) == 7.0
    assert P.simulate([P.Job("a", 3.0), P.Job("b", 1.0), P.Job("c", 2.0, after=("b",))], 2) == 3.0
    with pytest.raises(ValueError, match="never run"):
        P.simulate([P.Job("a", 1.0, after=("missing",))], 2)
    limits = P.limits({"x": 10.0, "y": 30.0}, 80.0)
    assert limits == {"x": 20.0, "y": 60.0}


def _sleeper(seconds: dict[str, float], log_dir: Path, started: dict[str, float]):
    def launch(job: P.Job):
        started[job.name] = time.monotonic()
        return S._start(["sleep", str(seconds[job.name])], {"PATH": "/usr/bin:/bin"}, log_dir / f"{job.name}.log")
    return launch


def test_run_pool_respects_order_and_kills_what_runs_past_its_limits(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "JOB_LIMIT_MIN_S", 0.0)
    jobs = [P.Job("first", 1.0), P.Job("then", 1.0, after=("first",)),
            P.Job("hangs", 0.2),  # sleeps 30 s: killed at JOB_LIMIT_FACTOR x its estimate
            P.Job("late", 50.0), P.Job("never", 1.0, after=("late",))]
    seconds = {"first": 0.3, "then": 0.1, "hangs": 30, "late": 30, "never": 0.1}
    started: dict[str, float] = {}
    begin = time.monotonic()
    results = S.run_pool(jobs, 4, 3.0, _sleeper(seconds, tmp_path, started))
    assert time.monotonic() - begin < 5, "the phase ends at its limit"
    assert started["then"] >= started["first"] + 0.3
    assert {name: r["status"] for name, r in results.items()} == {
        "first": "ok", "then": "ok", "hangs": "timeout", "late": "timeout", "never": "not run"}
    assert results["hangs"]["seconds"] < 2 and not S._RUNNING


def test_a_session_past_its_limits_still_writes_the_summary(tmp_path, monkeypatch):
    """Every phase gets a tenth of a second: each is killed, and the summary says what ran."""
    monkeypatch.setattr(P, "limits", lambda estimates, remaining: dict.fromkeys(estimates, 0.1))
    rc, out, _ = _main([str(tmp_path), "--smoke", "--only", "gan_g_loss", "--tests", "none", "--workers", "1"])
    assert rc == 1
    summary = (tmp_path / "summary.md").read_text()
    assert "facts 10/0/0 timeout" in summary and "bench" in summary and "timeout" in summary
    assert "rows: 0 run of 2 planned, 0 wrong or failed, 2 not run" in summary
    assert "gan_g_loss B=64 fp32" in summary and "not run" in summary
    session = json.loads((tmp_path / "session.json").read_text())
    assert {p["status"] for name, p in session["phases"].items() if name in ("facts", "bench")} == {"timeout"}
    assert not S._RUNNING


def test_smoke_session_end_to_end(tmp_path):
    rc, out, _ = _main([str(tmp_path), "--smoke", "--only", "gan_g_loss", "--tests", "none", "--workers", "2"])
    assert rc == 0, out
    summary = (tmp_path / "summary.md").read_text()
    assert out.endswith(summary + "\n")
    assert re.search(r"^gan_g_loss B=64 fp32 +[\d.]+ +[\d.]+x +- +5/- (MET|no) +yes$", summary, re.M)
    assert "rows: 2 run of 2 planned, 0 wrong or failed" in summary
    assert "warm jobs: 1 (1 ok)" in summary
    session = json.loads((tmp_path / "session.json").read_text())
    assert list(session["phases"]) == ["collect", "facts", "compile+tests", "bench", "summary"]
    assert all(p["status"] == "ok" for p in session["phases"].values())
    assert session["jobs"]["gan_g_loss B=64 fp32 | fastgen"]["status"] == "ok"
    (report,) = tmp_path.glob("*-session.json")
    assert {r["impl"] for r in json.loads(report.read_text())["rows"]} == {"fastgen", "eager"}
    assert (tmp_path / "device.json").exists() and (tmp_path / "plan.txt").exists()
