"""fastgen.profile and ``python -m fastgen profile``: phase ranges, traces, summaries, the NVML sampler.

CPU runs are real (tiny models, a few steps); the only stand-in is a fake NVML module handed to the
sampler at its boundary. The GPU-marked tests run the real NVML and CUDA activities.
"""

import csv
import importlib.util
import json
import re
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastgen.kernels
from fastgen.data import write_idx
from fastgen.profile import (NVML_FIELDS, NvmlSampler, NvmlUnavailable, _kernel_stats, _phase_stats,
                             fastgen_kernel_names, format_summary, phase, profile_steps)
from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

GAN_PHASES = ("G forward", "D forward", "D loss", "D backward", "D optimizer", "G loss", "G backward", "G optimizer",
              "EMA")  # in the order a step runs them
GAN2D = ["--hidden", "16", "--batch-size", "32"]


def _annotations(trace_path):
    """Name -> count of the record_function ranges in a Chrome trace (which must be valid JSON)."""
    events = json.loads(Path(trace_path).read_text())["traceEvents"]
    counts = {}
    for e in events:
        if e.get("cat") == "user_annotation":
            counts[e["name"]] = counts.get(e["name"], 0) + 1
    return counts


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """A tiny MNIST-style training set: 32 random 28x28 images, labels 0..9."""
    folder = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    write_idx(folder / "train-images-idx3-ubyte", rng.integers(0, 256, (32, 28, 28), dtype=np.uint8))
    write_idx(folder / "train-labels-idx1-ubyte", (np.arange(32) % 10).astype(np.uint8))
    return str(folder)


# ----------------------------------------------------------------------------------------------
# The command


def test_profile_command_writes_trace_and_summary(tmp_path, capsys):
    out = tmp_path / "prof"
    code, stdout, err = run_cli(capsys, "profile", "gan2d", "--steps", "3", "--warmup", "1", "--n-critic", "2", *GAN2D,
                             "--backend", "reference", "--device", "cpu", "--out", str(out))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["summary.json", "summary.md", "trace.json"]  # no NVML on CPU
    assert stdout.count("CPU only:") == 1 and "no NVTX ranges" in stdout
    assert (out / "summary.md").read_text() in stdout

    run = json.loads((out / "summary.json").read_text())["runs"]["reference"]
    assert (run["steps"], run["warmup"], run["images_per_step"]) == (3, 1, 64)  # two critic batches of 32
    assert list(run["phases"]) == list(GAN_PHASES)
    per_step = {name: p["calls_per_step"] for name, p in run["phases"].items()}
    assert per_step == {name: 2 if name.startswith("D") or name == "G forward" else 1 for name in GAN_PHASES}
    assert all(p["cpu_ms"] > 0 and p["gpu_ms"] is None for p in run["phases"].values())
    assert 0 < run["step_ms"]["median"] <= run["step_ms"]["p90"]
    assert run["images_per_s"] == pytest.approx(64e3 / run["step_ms"]["median"])
    assert run["kernels"] is None and run["nvml"] is None and run["peak_memory_mib"] is None
    assert any(op["name"] == "aten::addmm" for op in run["cpu_ops"])

    # Only the profiled steps are in the trace: each phase as often as it ran in 3 steps.
    counts = _annotations(out / "trace.json")
    assert {name: counts[name] for name in GAN_PHASES} == {name: 3 * n for name, n in per_step.items()}


def test_compare_backends(tmp_path, capsys):
    """Both backends, side by side (on the CPU, the tests' TRITON_INTERPRET=1 runs the triton one)."""
    out = tmp_path / "cmp"
    code, stdout, err = run_cli(capsys, "profile", "gan2d", "--steps", "2", "--warmup", "1", *GAN2D,
                             "--compare-backends", "--out", str(out))
    assert code == 0, err
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert list(runs) == ["reference", "triton"]
    for label, run in runs.items():
        assert run["files"]["trace"] == f"trace-{label}.json" and run["steps"] == 2
        assert set(GAN_PHASES) <= set(_annotations(out / run["files"]["trace"]))
    assert "|  | reference | triton |" in stdout
    assert "| phase | reference CPU (ms/step) | triton CPU (ms/step) |" in stdout
    assert "triton vs reference:" in stdout


@pytest.mark.parametrize("model, options, phases", [
    ("gan", ["--width", "4", "--latent-size", "8", "--batch-size", "8"], GAN_PHASES),
    ("ae", ["--hidden", "32", "--latent-size", "4", "--batch-size", "16"], ("forward", "backward", "optimizer")),
])
def test_profile_image_models(tmp_path, capsys, image_dir, model, options, phases):
    out = tmp_path / model
    code, _, err = run_cli(capsys, "profile", model, "--steps", "1", "--warmup", "1", *options, "--data-dir", image_dir,
                        "--backend", "reference", "--device", "cpu", "--out", str(out))
    assert code == 0, err
    run = json.loads((out / "summary.json").read_text())["runs"]["reference"]
    assert list(run["phases"]) == list(phases)


def test_profile_bad_input(tmp_path, capsys):
    cases = [
        (["profile", "--steps", "0"], "--steps"),  # no MODEL: gan
        (["profile", "gan2d", "--warmup", "-1"], "--warmup"),
        (["profile", "gan2d", "--out-dir", str(tmp_path)], "unrecognized arguments"),
        (["profile", "gan2d", "--compare-backends", "--backend", "triton", "--out", str(tmp_path)],
         "leave out --backend"),
    ]
    for argv, needle in cases:
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, (argv, err)


# ----------------------------------------------------------------------------------------------
# The Python API


def _user_loop():
    """A user's own loop over a small model, its phases marked with fastgen.profile.phase."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.Adam(model.parameters())
    x = torch.randn(8, 16)

    def step():
        with phase("forward"):
            loss = model(x).square().mean()
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            optimizer.step()
            optimizer.zero_grad()
    return step


def test_profile_steps_on_a_user_loop(tmp_path):
    run = profile_steps(_user_loop(), steps=4, warmup=2, out_dir=tmp_path, images_per_step=8, device="cpu",
                        label="mine")
    assert run["steps"] == 4 and run["files"] == {"trace": "trace-mine.json"}
    assert list(run["phases"]) == ["forward", "backward", "optimizer"]  # not torch's "Optimizer.step#Adam.step"
    assert all(p["calls_per_step"] == 1 for p in run["phases"].values())
    counts = _annotations(tmp_path / "trace-mine.json")
    assert counts["forward"] == 4 and counts["Optimizer.step#Adam.step"] == 4
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["runs"]["mine"]["step_ms"] == run["step_ms"]
    assert "| forward |" in (tmp_path / "summary.md").read_text()


def test_profile_steps_checks_its_arguments(tmp_path):
    with pytest.raises(TypeError, match="step_fn"):
        profile_steps(None, out_dir=tmp_path)
    for name, value in (("steps", 0), ("warmup", -1), ("images_per_step", 0), ("steps", 2.5)):
        with pytest.raises(ValueError, match=name):
            profile_steps(lambda: None, out_dir=tmp_path, **{name: value})


def test_phase_costs_next_to_nothing_without_a_profiler():
    """Outside a profiler a phase is a shared no-op context: well under record_function's cost (~1-10 us)."""
    n = 20_000
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            with phase("D forward"):
                pass
        best = min(best, (time.perf_counter() - start) / n)
    assert best < 3e-6, f"{best * 1e6:.2f} us per phase"


def test_fastgen_kernel_names_come_from_the_kernel_modules():
    names = fastgen_kernel_names()
    assert {"_conv_gemm_kernel", "_gan_loss_fwd_kernel", "_reparam_fwd_kernel"} <= names
    sources = "".join(p.read_text() for p in Path(fastgen.kernels.__file__).parent.glob("*.py"))
    jit_functions = set(re.findall(r"@triton\.jit(?:\([^)]*\))?\ndef (\w+)\(", sources))
    assert names == jit_functions


# ----------------------------------------------------------------------------------------------
# Kernel statistics and the GPU sections of the summary (from a synthetic trace)


def _kernel_events():
    def kernel(name, dur_us):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": 0, "dur": dur_us}
    return ([kernel("_conv_gemm_kernel", 100.0)] * 4 + [kernel("void cudnn::conv<float>", 300.0)] * 2
            + [kernel("_bn_act_apply_kernel", 50.0)] * 2
            + [{"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 0, "dur": 5.0}])


def test_kernel_stats():
    stats = _kernel_stats(_kernel_events(), steps=2, fastgen_names=fastgen_kernel_names())
    assert stats["launches_per_step"] == 4
    assert stats["gpu_ms_per_step"] == pytest.approx(1.1 / 2)
    assert stats["fastgen_share"] == pytest.approx(0.5 / 1.1)
    assert [(k["name"], k["calls"], k["fastgen"]) for k in stats["top"]] == [
        ("void cudnn::conv<float>", 2, False), ("_conv_gemm_kernel", 4, True), ("_bn_act_apply_kernel", 2, True)]
    assert stats["top"][0]["total_ms"] == pytest.approx(0.6) and stats["top"][0]["share"] == pytest.approx(0.6 / 1.1)


def test_phase_stats_on_the_gpu_timeline():
    def event(cat, name, ts, dur_us):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur_us}
    events = [event("user_annotation", "D loss", 50, 30.0), event("gpu_user_annotation", "D loss", 60, 80.0),
              event("user_annotation", "D forward", 0, 40.0), event("gpu_user_annotation", "D forward", 10, 200.0),
              event("user_annotation", "D forward", 100, 60.0), event("gpu_user_annotation", "D forward", 120, 100.0),
              event("user_annotation", "Optimizer.step#Adam.step", 200, 500.0)]
    stats = _phase_stats(events, {"D forward", "D loss"}, steps=2, cuda=True)
    assert list(stats) == ["D forward", "D loss"]  # first-appearance order; torch's own ranges are not phases
    assert stats["D forward"] == pytest.approx({"calls_per_step": 1.0, "cpu_ms": 0.05, "gpu_ms": 0.15})
    assert stats["D loss"] == pytest.approx({"calls_per_step": 0.5, "cpu_ms": 0.015, "gpu_ms": 0.04})


# ----------------------------------------------------------------------------------------------
# NVML sampler against a fake NVML module


def _fake_nvml(clock_event_reasons=True):
    """An NVML module stand-in: power unsupported, fixed clocks, alternating clock-event reasons."""
    nvml = types.ModuleType("fake_pynvml")
    nvml.NVML_CLOCK_SM, nvml.NVML_CLOCK_MEM, nvml.NVML_TEMPERATURE_GPU = 1, 2, 0
    nvml.NVMLError = type("NVMLError", (Exception,), {})
    nvml.calls = {"init": 0, "shutdown": 0, "reasons": 0}
    nvml.lock = threading.Lock()

    def count(name):
        with nvml.lock:
            nvml.calls[name] += 1
            return nvml.calls[name]

    def not_supported(handle):
        raise nvml.NVMLError("Not Supported")

    def reasons(handle):
        return 0x4 | 0x40 if count("reasons") % 2 else 0

    nvml.nvmlInit = lambda: count("init")
    nvml.nvmlShutdown = lambda: count("shutdown")
    nvml.nvmlDeviceGetHandleByIndex = lambda index: ("handle", index)
    nvml.nvmlDeviceGetName = lambda handle: b"Fake GPU %d" % handle[1]
    nvml.nvmlSystemGetDriverVersion = lambda: "999.1"
    nvml.nvmlDeviceGetPowerUsage = not_supported
    nvml.nvmlDeviceGetClockInfo = lambda handle, kind: {1: 1980, 2: 2619}[kind]
    nvml.nvmlDeviceGetUtilizationRates = lambda handle: types.SimpleNamespace(gpu=87, memory=40)
    nvml.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(used=3 * 2**30, total=8 * 2**30)
    nvml.nvmlDeviceGetTemperature = lambda handle, sensor: 55
    if clock_event_reasons:
        nvml.nvmlDeviceGetCurrentClocksEventReasons = reasons
    else:  # nvidia-ml-py before the rename
        nvml.nvmlDeviceGetCurrentClocksThrottleReasons = reasons
    return nvml


@pytest.mark.parametrize("clock_event_reasons", [True, False])
def test_nvml_sampler_with_a_fake_nvml(tmp_path, clock_event_reasons):
    nvml = _fake_nvml(clock_event_reasons)
    with NvmlSampler(3, interval_s=0.01, nvml=nvml) as sampler:
        time.sleep(0.25)
    samples = sampler.samples
    assert nvml.calls["init"] == 1 and nvml.calls["shutdown"] == 1
    assert (sampler.device_name, sampler.driver_version) == ("Fake GPU 3", "999.1")
    assert len(samples) >= 5 and nvml.calls["reasons"] == len(samples)  # one NVML read per sample
    times = np.array([s["time_s"] for s in samples])
    assert np.all(np.diff(times) > 0) and 0.005 < np.median(np.diff(times)) < 0.05
    first = samples[0]
    assert first["power_w"] is None  # not supported: a blank, not an error
    assert (first["sm_clock_mhz"], first["mem_clock_mhz"], first["gpu_util_pct"]) == (1980, 2619, 87)
    assert (first["mem_used_mib"], first["temperature_c"]) == (3072, 55)
    assert first["throttle_reasons"] == ("sw_power_cap", "hw_thermal_slowdown") and samples[1]["throttle_reasons"] == ()

    sampler.write_csv(tmp_path / "nvml.csv")
    with open(tmp_path / "nvml.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["time_s", *NVML_FIELDS, "throttle_reasons"]
    assert len(rows) == len(samples) + 1
    assert rows[1][1:] == ["", "1980", "2619", "87", "3072", "55", "sw_power_cap|hw_thermal_slowdown"]
    assert rows[2][-1] == ""

    averages = sampler.averages()
    assert averages["samples"] == len(samples) and averages["interval_ms"] == 10
    assert averages["mean"]["power_w"] is None and averages["mean"]["sm_clock_mhz"] == 1980
    active = (len(samples) + 1) // 2 / len(samples)
    assert averages["throttle_reasons"] == {"sw_power_cap": active, "hw_thermal_slowdown": active}

    sampler.plot(tmp_path / "nvml.png")
    with Image.open(tmp_path / "nvml.png") as picture:
        # Five reported fields (power is not) and two reason strips.
        assert picture.size == (900, 5 * 110 + 2 * 14 + 30)
        pixels = np.asarray(picture.convert("RGB"))
    assert (pixels == (0x1F, 0x5F, 0xBF)).all(axis=-1).any()  # the series were drawn


def test_nvml_sampler_errors():
    with pytest.raises(ValueError, match="interval_s"):
        NvmlSampler(0, interval_s=0, nvml=_fake_nvml())
    nvml = _fake_nvml()

    def no_driver():
        raise nvml.NVMLError("Driver Not Loaded")
    nvml.nvmlInit = no_driver
    with pytest.raises(NvmlUnavailable, match="Driver Not Loaded"):
        NvmlSampler(0, nvml=nvml).start()


def test_summary_gpu_sections(tmp_path):
    """The kernel, memory and NVML sections, from a CPU run given GPU statistics."""
    run = profile_steps(_user_loop(), steps=1, warmup=0, out_dir=tmp_path, device="cpu", summary=False)
    sampler = NvmlSampler(0, interval_s=0.01, nvml=_fake_nvml())
    with sampler:
        time.sleep(0.05)
    run |= {"kernels": _kernel_stats(_kernel_events(), 2, fastgen_kernel_names()), "nvml": sampler.averages(),
            "peak_memory_mib": 123.0}
    text = format_summary({"triton": run})
    assert "| fastgen kernels' share of GPU kernel time (%) | 45.5 |" in text
    assert "| kernel launches per step | 4.0 |" in text and "| peak memory (MiB) | 123 |" in text
    assert "## Top kernels by GPU time (triton)" in text and "| _conv_gemm_kernel | 4 | 0.4 | 36.4 | yes |" in text
    assert "| sm_clock_mhz | 1980 |" in text and "sw_power_cap" in text


# ----------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
def test_nvml_sampler_on_the_gpu():
    pytest.importorskip("pynvml", reason="nvidia-ml-py is not installed")
    device = torch.device("cuda")
    x = torch.randn(4096, 4096, device=device)
    with NvmlSampler(device) as sampler:
        deadline = time.perf_counter() + 0.5
        while time.perf_counter() < deadline:
            x = (x @ x).tanh_()
        torch.cuda.synchronize()
    assert sampler.device_name == torch.cuda.get_device_name(device)
    assert len(sampler.samples) >= 10
    averages = sampler.averages()["mean"]
    assert averages["sm_clock_mhz"] > 0 and averages["mem_used_mib"] > 0 and averages["gpu_util_pct"] > 0


@pytest.mark.gpu
def test_profile_command_on_the_gpu(tmp_path, capsys):
    out = tmp_path / "gpu"
    code, stdout, err = run_cli(capsys, "profile", "gan2d", "--steps", "3", "--warmup", "2", "--compare-backends",
                             "--device", "cuda", "--out", str(out))
    assert code == 0, err
    assert "CPU only" not in stdout
    # Without nvidia-ml-py the summary says so in one line and the rest stands.
    nvml = importlib.util.find_spec("pynvml") is not None
    assert ("## NVML" in stdout) == nvml and ("no NVML samples: nvidia-ml-py is not installed" in stdout) != nvml
    runs = json.loads((out / "summary.json").read_text())["runs"]
    for label, run in runs.items():
        assert run["kernels"]["launches_per_step"] > 0 and run["peak_memory_mib"] > 0
        assert list(run["phases"]) == list(GAN_PHASES)
        assert all(p["gpu_ms"] > 0 for p in run["phases"].values()), run["phases"]
        assert "G forward" in _annotations(out / run["files"]["trace"])
        if nvml:
            assert run["nvml"]["samples"] > 0 and run["versions"]["driver"]
            for name in ("nvml_csv", "nvml_plot"):
                assert (out / run["files"][name]).is_file()
    assert runs["reference"]["kernels"]["fastgen_share"] == 0
    assert runs["triton"]["kernels"]["fastgen_share"] > 0
