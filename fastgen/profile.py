"""Profiling: where a training step spends its time, how much of it is fastgen's kernels, and what
the GPU did meanwhile.

``python -m fastgen profile MODEL`` profiles the trainer's steps (:mod:`fastgen.cli`);
:func:`profile_steps` does the same for any loop. Mark the phases of a step with :func:`phase`::

    from fastgen.profile import phase, profile_steps

    def step():
        with phase("forward"):
            loss = model(x).square().mean()
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            optimizer.step()
            optimizer.zero_grad()

    run = profile_steps(step, steps=20, warmup=5, out_dir="profile", images_per_step=x.shape[0])
    print(run["step_ms"]["median"])  # profile/summary.md has the rest

A profile directory holds ``trace.json`` (torch.profiler's Chrome trace: chrome://tracing or
https://ui.perfetto.dev), ``summary.md`` and ``summary.json`` and, on CUDA, ``nvml.csv`` and
``nvml.png`` (power, clocks, utilization, memory, temperature and clock-event reasons every 20 ms).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import importlib
import inspect
import itertools
import json
import math
import os
import pkgutil
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from fastgen.backend import triton_available, use_backend

__all__ = ["phase", "profile_steps", "profile_trainer", "write_summary", "format_summary", "fastgen_kernel_names",
           "NvmlSampler", "NvmlUnavailable", "NVML_FIELDS"]

#: Rows of the summary's top-kernel and top-operator tables.
TOP = 20
#: Numeric columns of nvml.csv (after time_s); the last column, throttle_reasons, names the active
#: clock-event reasons joined by "|".
NVML_FIELDS = ("power_w", "sm_clock_mhz", "mem_clock_mhz", "gpu_util_pct", "mem_used_mib", "temperature_c")
# NVML's nvmlClocksEventReason* bits ("throttle reasons" in older drivers): fixed by the NVML API.
_CLOCK_EVENT_REASONS = {0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap",
                        0x8: "hw_slowdown", 0x10: "sync_boost", 0x20: "sw_thermal_slowdown",
                        0x40: "hw_thermal_slowdown", 0x80: "hw_power_brake_slowdown",
                        0x100: "display_clock_setting"}
_CPU_NOTE = ("CPU only: torch.profiler records CPU activities; no NVTX ranges, GPU kernels or NVML samples "
             "(they need a CUDA device)")

# ----------------------------------------------------------------------------------------------
# Phase ranges

# FASTGEN_NVTX=1 emits the NVTX ranges outside torch.profiler too, for Nsight Systems runs
# (`nsys profile -t cuda,nvtx python -m fastgen train ...`).
_NVTX_ALWAYS = os.environ.get("FASTGEN_NVTX", "0") not in ("", "0")
_NO_RANGE = contextlib.nullcontext()
# Names that phase() opened while a profiler ran: the phases of the summary (torch's own
# record_function ranges such as "Optimizer.step#Adam.step" are not phases).
_phase_names: set[str] = set()


class _Range:
    """record_function(name) when a profiler runs and, once CUDA is in use, an NVTX range of the same name."""

    __slots__ = ("name", "_record", "_nvtx")

    def __init__(self, name: str, record: bool) -> None:
        self.name = name
        self._record = torch.profiler.record_function(name) if record else None
        self._nvtx = torch.cuda.is_initialized()

    def __enter__(self) -> None:
        if self._record is not None:
            _phase_names.add(self.name)
            self._record.__enter__()
        if self._nvtx:
            torch.cuda.nvtx.range_push(self.name)

    def __exit__(self, *exc: object) -> None:
        if self._nvtx:
            torch.cuda.nvtx.range_pop()
        if self._record is not None:
            self._record.__exit__(*exc)


def phase(name: str) -> contextlib.AbstractContextManager:
    """A named range around one phase of a step ("D forward", "G backward", ...): a
    ``torch.profiler.record_function`` range and, on CUDA, a ``torch.cuda.nvtx`` range, so the
    torch.profiler trace and Nsight Systems read the same. While no profiler runs it returns a
    shared no-op context (about the cost of a function call), unless ``FASTGEN_NVTX=1`` asks for NVTX.
    """
    record = torch.autograd._profiler_enabled()  # a flag read in C++: no Python-side profiler state
    if not (record or _NVTX_ALWAYS):
        return _NO_RANGE
    return _Range(name, record)


@functools.cache
def fastgen_kernel_names() -> frozenset[str]:
    """The names fastgen's Triton kernels launch under: the ``@triton.jit`` functions of every
    ``fastgen.kernels`` module (a compiled kernel is named after its function). Empty without triton."""
    if not triton_available():
        return frozenset()
    from triton.runtime import KernelInterface

    import fastgen.kernels

    names = set()
    for info in pkgutil.iter_modules(fastgen.kernels.__path__):
        module = importlib.import_module(f"fastgen.kernels.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, KernelInterface):
                while not inspect.isfunction(obj):  # autotuners and heuristics wrap the jit function
                    obj = obj.fn
                names.add(obj.__name__)
    return frozenset(names)


# ----------------------------------------------------------------------------------------------
# NVML sampling


class NvmlUnavailable(RuntimeError):
    """NVML cannot sample this device (nvidia-ml-py missing, no driver, unknown device)."""


def _import_pynvml() -> ModuleType:
    try:
        import pynvml
    except ImportError as err:
        raise NvmlUnavailable(f"nvidia-ml-py is not installed ({err})") from None
    return pynvml


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value  # older nvidia-ml-py returns bytes


class NvmlSampler:
    """Samples one GPU through NVML in a background thread every ``interval_s`` seconds, between
    :meth:`start` and :meth:`stop` (or as a context manager).

    Each sample is a dict: ``time_s`` (seconds since start) and the :data:`NVML_FIELDS` (power W,
    SM and memory clocks MHz, GPU utilization %, memory used MiB, temperature C; ``None`` where the
    device does not report it) and ``throttle_reasons`` (a tuple of reason names).

    Args:
        device: a CUDA ``torch.device`` (found by UUID, so CUDA_VISIBLE_DEVICES is respected) or an
            NVML device index.
        interval_s: seconds between samples.
        nvml: the NVML module (default: ``pynvml`` from nvidia-ml-py).

    Raises:
        ValueError: ``interval_s`` not positive.
        NvmlUnavailable: from :meth:`start` when NVML cannot open the device.
    """

    def __init__(self, device: torch.device | int = 0, *, interval_s: float = 0.02,
                 nvml: ModuleType | None = None) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s: expected a positive number of seconds, got {interval_s!r}")
        self.device = device
        self.interval_s = interval_s
        self._nvml = nvml if nvml is not None else _import_pynvml()
        self.samples: list[dict[str, Any]] = []
        self.device_name: str | None = None
        self.driver_version: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "NvmlSampler":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _handle(self) -> Any:
        nvml = self._nvml
        if isinstance(self.device, torch.device):
            uuid = torch.cuda.get_device_properties(self.device).uuid
            return nvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}".encode())  # bytes: every nvidia-ml-py takes them
        return nvml.nvmlDeviceGetHandleByIndex(self.device)

    def start(self) -> None:
        """Open NVML and start sampling. Raises NvmlUnavailable when NVML cannot open the device."""
        if self._thread is not None:
            raise RuntimeError("NvmlSampler: already started")
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as err:
            raise NvmlUnavailable(f"NVML did not initialize ({err})") from None
        try:
            handle = self._handle()
            self.device_name = _text(nvml.nvmlDeviceGetName(handle))
            self.driver_version = _text(nvml.nvmlSystemGetDriverVersion())
        except nvml.NVMLError as err:
            nvml.nvmlShutdown()
            raise NvmlUnavailable(f"NVML cannot open device {self.device} ({err})") from None
        # Newer NVML calls them clock-event reasons; older nvidia-ml-py only has the throttle name.
        reasons = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            nvml.nvmlDeviceGetCurrentClocksThrottleReasons
        readers: dict[str, Callable[[], Any]] = {
            "power_w": lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1e3,
            "sm_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM),
            "mem_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM),
            "gpu_util_pct": lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu,
            "mem_used_mib": lambda: nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20,
            "temperature_c": lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
            "throttle_reasons": lambda: _reason_names(reasons(handle)),
        }
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(readers,), name="fastgen-nvml", daemon=True)
        self._thread.start()

    def _read(self, reader: Callable[[], Any]) -> Any:
        try:
            return reader()
        except self._nvml.NVMLError:  # not supported on this device (power on some boards, ...)
            return None

    def _run(self, readers: dict[str, Callable[[], Any]]) -> None:
        start = time.perf_counter()
        for tick in itertools.count(1):
            now = time.perf_counter()
            self.samples.append({"time_s": now - start, **{name: self._read(read) for name, read in readers.items()}})
            # Fixed cadence: the next sample is due at start + tick * interval, whatever reading took.
            if self._stop.wait(max(0.0, start + tick * self.interval_s - time.perf_counter())):
                return

    def stop(self) -> list[dict[str, Any]]:
        """Stop sampling, close NVML, and return the samples."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._nvml.nvmlShutdown()
        return self.samples

    def write_csv(self, path: str | Path) -> None:
        """``time_s``, the :data:`NVML_FIELDS` and ``throttle_reasons``, one row per sample."""
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(("time_s", *NVML_FIELDS, "throttle_reasons"))
            for s in self.samples:
                reasons = s["throttle_reasons"]
                writer.writerow((f"{s['time_s']:.4f}", *("" if s[k] is None else _number(s[k]) for k in NVML_FIELDS),
                                 "" if reasons is None else "|".join(reasons)))

    def averages(self) -> dict[str, Any]:
        """Mean of each field over the samples (None where never reported) and, per clock-event
        reason seen, the fraction of samples in which it was active."""
        means = {}
        for name in NVML_FIELDS:
            values = [s[name] for s in self.samples if s[name] is not None]
            means[name] = float(np.mean(values)) if values else None
        reasons = [s["throttle_reasons"] for s in self.samples if s["throttle_reasons"] is not None]
        active = {name: sum(name in r for r in reasons) / len(reasons)
                  for name in _CLOCK_EVENT_REASONS.values() if any(name in r for r in reasons)}
        return {"samples": len(self.samples), "interval_ms": self.interval_s * 1e3, "mean": means,
                "throttle_reasons": active}

    def plot(self, path: str | Path, width: int = 900, panel_height: int = 110) -> None:
        """A PNG of the time series: one panel per field the device reports, then one strip per
        clock-event reason seen (a tick at each sample where it was active)."""
        margin, strip = 150, 14  # the margin holds the reason names
        series = {name: [(s["time_s"], s[name]) for s in self.samples if s[name] is not None] for name in NVML_FIELDS}
        series = {name: points for name, points in series.items() if points}
        reasons = sorted({r for s in self.samples for r in (s["throttle_reasons"] or ())})
        image = Image.new("RGB", (width, len(series) * panel_height + len(reasons) * strip + 30), "white")
        draw = ImageDraw.Draw(image)
        t_end = max((s["time_s"] for s in self.samples), default=0.0) or 1.0

        def x_of(t: float) -> float:
            return margin + (width - margin - 10) * t / t_end

        for row, (name, points) in enumerate(series.items()):
            top, bottom = row * panel_height + 18, (row + 1) * panel_height - 8
            values = [v for _, v in points]
            lo, hi = min(values), max(values)
            draw.rectangle((margin, top - 2, width - 10, bottom + 2), outline="#bbbbbb")
            draw.text((4, top - 16), f"{name}: min {_number(lo)}  mean {_number(float(np.mean(values)))}  "
                                     f"max {_number(hi)}", fill="black")
            xy = [(x_of(t), bottom - (bottom - top) * (v - lo) / ((hi - lo) or 1.0)) for t, v in points]
            draw.line(xy * 2 if len(xy) == 1 else xy, fill="#1f5fbf", width=2)  # one sample: a dot
        y = len(series) * panel_height
        for reason in reasons:
            draw.text((4, y + 1), reason, fill="black")
            for s in self.samples:
                if reason in (s["throttle_reasons"] or ()):
                    draw.line([(x_of(s["time_s"]), y + 2), (x_of(s["time_s"]), y + strip - 2)], fill="#c0392b",
                              width=2)
            y += strip
        draw.text((margin, y + 8), f"time (s), 0 to {t_end:.2f}; one sample every {self.interval_s * 1e3:g} ms",
                  fill="black")
        image.save(path)


def _reason_names(mask: int) -> tuple[str, ...]:
    return tuple(name for bit, name in _CLOCK_EVENT_REASONS.items() if mask & bit)


def _number(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------------------------
# Profiling a loop


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def _timed_steps(step_fn: Callable[[], object], steps: int, sync: Callable[[], None]) -> list[float]:
    """Milliseconds of each step, the device synchronized at each step's end."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step_fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _stats(times_ms: list[float]) -> dict[str, float]:
    return {"median": float(np.median(times_ms)), "p90": float(np.percentile(times_ms, 90)),
            "mean": float(np.mean(times_ms))}


def _phase_stats(events: list[dict], names: set[str], steps: int, cuda: bool) -> dict[str, dict[str, Any]]:
    """Per phase, in order of first appearance: calls per step, CPU ms per step (the range's wall
    time on the host) and, on CUDA, GPU ms per step (the span of its kernels on the GPU timeline)."""
    totals: dict[str, list[float]] = {}  # name -> [calls, CPU us, GPU us]
    for e in sorted(events, key=lambda e: e.get("ts", 0)):
        if e.get("name") in names and e.get("cat") in ("user_annotation", "gpu_user_annotation"):
            entry = totals.setdefault(e["name"], [0, 0.0, 0.0])
            if e["cat"] == "user_annotation":
                entry[0] += 1
                entry[1] += e["dur"]
            else:
                entry[2] += e["dur"]
    return {name: {"calls_per_step": calls / steps, "cpu_ms": cpu_us / 1e3 / steps,
                   "gpu_ms": gpu_us / 1e3 / steps if cuda else None}
            for name, (calls, cpu_us, gpu_us) in totals.items()}


def _kernel_stats(events: list[dict], steps: int, fastgen_names: frozenset[str]) -> dict[str, Any]:
    """GPU kernels of a trace: launches and kernel ms per step, fastgen's share of the kernel time,
    and the :data:`TOP` kernels by total time with call counts."""
    totals: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "kernel":
            entry = totals.setdefault(e["name"], [0, 0.0])
            entry[0] += 1
            entry[1] += e["dur"] / 1e3
    total_ms = sum(ms for _, ms in totals.values())
    fastgen_ms = sum(ms for name, (_, ms) in totals.items() if name in fastgen_names)
    top = sorted(totals.items(), key=lambda item: -item[1][1])[:TOP]
    return {
        "launches_per_step": sum(calls for calls, _ in totals.values()) / steps,
        "gpu_ms_per_step": total_ms / steps,
        "fastgen_share": fastgen_ms / total_ms if total_ms else None,
        "top": [{"name": name, "calls": calls, "total_ms": ms, "share": ms / total_ms, "fastgen": name in fastgen_names}
                for name, (calls, ms) in top],
    }


def _cpu_op_stats(profiler: torch.profiler.profile, exclude: set[str]) -> list[dict[str, Any]]:
    """The :data:`TOP` host operators by self CPU time (the phase ranges themselves excluded)."""
    ops = [e for e in profiler.key_averages() if e.key not in exclude and e.self_cpu_time_total > 0]
    ops.sort(key=lambda e: -e.self_cpu_time_total)
    return [{"name": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3} for e in ops[:TOP]]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def _versions(driver: str | None) -> dict[str, str | None]:
    triton_version = importlib.import_module("triton").__version__ if triton_available() else None
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda, "driver": driver}


def profile_steps(step_fn: Callable[[], object], *, steps: int = 5, warmup: int = 3, out_dir: str | Path,
                  images_per_step: int | None = None, device: torch.device | str | None = None,
                  label: str | None = None, nvml: ModuleType | None = None, nvml_interval_s: float = 0.02,
                  record_shapes: bool = True, with_stack: bool = False, summary: bool = True) -> dict[str, Any]:
    """Profile ``steps`` calls of ``step_fn`` after ``warmup`` calls, and write the results to ``out_dir``.

    The steps run three times over: ``warmup`` untimed calls (compilation, autotuning, allocator
    warm-up), ``steps`` timed calls (the step times, peak memory), then ``steps`` calls under
    torch.profiler (CPU and, on CUDA, CUDA activities; shapes recorded) while NVML samples the GPU.
    Each timed step ends with a device synchronization. Phases are the :func:`phase` ranges.

    Files (``-LABEL`` before the suffix when ``label`` is given): ``trace.json`` (Chrome/Perfetto
    trace); on CUDA ``nvml.csv`` and ``nvml.png``; with ``summary``, ``summary.md`` and ``summary.json``.

    Args:
        step_fn: one step of the loop, no arguments.
        steps: profiled (and timed) steps, >= 1.
        warmup: untimed steps first, >= 0.
        out_dir: the profile directory (created).
        images_per_step: examples per step, for images/s.
        device: where the steps run (default: CUDA when available, else the CPU): synchronization,
            CUDA activities, peak memory and NVML follow it.
        label: names the run in file names and summaries.
        nvml: the NVML module for the sampler (default ``pynvml``).
        nvml_interval_s: seconds between NVML samples.
        record_shapes / with_stack: passed to ``torch.profiler.profile``.
        summary: write summary.md and summary.json for this run alone.

    Returns:
        The run's summary (JSON-serializable): step_ms (median, p90, mean), step_ms_profiled,
        images_per_s, phases, kernels (CUDA), cpu_ops, peak_memory_mib (CUDA), nvml (CUDA),
        notes, files, device, versions.

    Raises:
        TypeError: ``step_fn`` is not callable. ValueError: bad ``steps``, ``warmup``, ``images_per_step``.
    """
    if not callable(step_fn):
        raise TypeError(f"step_fn: expected a callable taking no arguments, got {type(step_fn).__name__}")
    _check_int("steps", steps, 1)
    _check_int("warmup", warmup, 0)
    if images_per_step is not None:
        _check_int("images_per_step", images_per_step, 1)
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"-{label}" if label else ""
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    notes = [] if cuda else [_CPU_NOTE]

    _timed_steps(step_fn, warmup, sync)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    step_ms = _timed_steps(step_fn, steps, sync)
    peak_mib = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None

    sampler = None
    if cuda:
        try:
            sampler = NvmlSampler(device, interval_s=nvml_interval_s, nvml=nvml)
            sampler.start()
        except NvmlUnavailable as err:
            sampler = None
            notes.append(f"no NVML samples: {err}")
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    _phase_names.clear()
    try:
        with torch.profiler.profile(activities=activities, record_shapes=record_shapes,
                                    with_stack=with_stack) as profiler:
            profiled_ms = _timed_steps(step_fn, steps, sync)
    finally:
        if sampler is not None:
            sampler.stop()
    names = set(_phase_names)

    files = {"trace": f"trace{suffix}.json"}
    profiler.export_chrome_trace(str(out / files["trace"]))
    events = json.loads((out / files["trace"]).read_text())["traceEvents"]
    if sampler is not None:
        files |= {"nvml_csv": f"nvml{suffix}.csv", "nvml_plot": f"nvml{suffix}.png"}
        sampler.write_csv(out / files["nvml_csv"])
        sampler.plot(out / files["nvml_plot"])
    median_s = float(np.median(step_ms)) / 1e3
    run = {
        "label": label, "device": _device_name(device), "steps": steps, "warmup": warmup,
        "images_per_step": images_per_step,
        "step_ms": _stats(step_ms), "step_ms_profiled": _stats(profiled_ms),
        "images_per_s": images_per_step / median_s if images_per_step else None,
        "phases": _phase_stats(events, names, steps, cuda),
        "kernels": _kernel_stats(events, steps, fastgen_kernel_names()) if cuda else None,
        "cpu_ops": _cpu_op_stats(profiler, names),
        "peak_memory_mib": peak_mib,
        "nvml": sampler.averages() if sampler is not None else None,
        "notes": notes, "files": files,
        "versions": _versions(sampler.driver_version if sampler is not None else None),
    }
    if summary:
        write_summary({label or "run": run}, out)
    return run


def profile_trainer(trainer: Any, *, steps: int = 5, warmup: int = 3, out_dir: str | Path,
                    label: str | None = None, nvml: ModuleType | None = None) -> dict[str, Any]:
    """:func:`profile_steps` over ``trainer.train_step`` (a :class:`fastgen.train.Trainer`) on the
    run's backend, counting steps as ``fit`` does; writes no summary (see :func:`write_summary`)."""
    def step() -> None:
        trainer.train_step()
        trainer.step += 1

    with use_backend(trainer.config.backend):
        return profile_steps(step, steps=steps, warmup=warmup, out_dir=out_dir, label=label, nvml=nvml,
                             images_per_step=trainer.images_per_step, device=trainer.device, summary=False)


# ----------------------------------------------------------------------------------------------
# Summaries


def _cell(value: float | None, digits: str | None = None) -> str:
    """A table cell: ``digits`` as a format spec, by default 3 significant digits below 100 and none above."""
    if value is None or math.isnan(value):
        return "-"
    return format(value, digits or (".0f" if abs(value) >= 100 else ".3g"))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def format_summary(runs: dict[str, dict[str, Any]], title: str = "fastgen profile") -> str:
    """Markdown of one or more :func:`profile_steps` results side by side (one column per run)."""
    labels = list(runs)
    first = runs[labels[0]]
    versions = first["versions"]
    lines = [f"# {title}", "",
             f"{first['device']}; torch {versions['torch']}, triton {versions['triton'] or 'not installed'}, "
             f"CUDA {versions['cuda'] or '-'}, driver {versions['driver'] or '-'}; "
             f"{first['steps']} profiled steps after {first['warmup']} warm-up steps", ""]
    lines += [f"Note: {note}" for note in dict.fromkeys(n for run in runs.values() for n in run["notes"])]
    lines += ["", "## Step", ""]

    def row(name: str, get: Callable[[dict], float | None], digits: str | None = None) -> list[str]:
        return [name, *(_cell(get(runs[label]), digits) for label in labels)]

    kernels = [run["kernels"] for run in runs.values()]
    rows = [row("step time, median (ms)", lambda r: r["step_ms"]["median"]),
            row("step time, p90 (ms)", lambda r: r["step_ms"]["p90"]),
            row("step time under the profiler, median (ms)", lambda r: r["step_ms_profiled"]["median"]),
            row("images/s", lambda r: r["images_per_s"], ".0f")]
    if all(k is not None for k in kernels):
        rows += [row("GPU kernel time per step (ms)", lambda r: r["kernels"]["gpu_ms_per_step"]),
                 row("kernel launches per step", lambda r: r["kernels"]["launches_per_step"], ".1f"),
                 row("fastgen kernels' share of GPU kernel time (%)",
                     lambda r: None if r["kernels"]["fastgen_share"] is None else 100 * r["kernels"]["fastgen_share"],
                     ".1f"),
                 row("peak memory (MiB)", lambda r: r["peak_memory_mib"], ".0f")]
    lines += _table(["", *labels], rows)
    if {"reference", "triton"} <= set(labels):
        ratio = runs["reference"]["step_ms"]["median"] / runs["triton"]["step_ms"]["median"]
        lines += [f"triton vs reference: {ratio:.2f}x the steps per second (median step time)", ""]

    phases = list(dict.fromkeys(name for run in runs.values() for name in run["phases"]))
    if phases:
        gpu = all(k is not None for k in kernels)
        sides = ("CPU", "GPU") if gpu else ("CPU",)
        header = ["phase", *(f"{label} {side} (ms/step)" for label in labels for side in sides)]
        body = []
        for name in phases:
            cells = []
            for label in labels:
                entry = runs[label]["phases"].get(name, {})
                cells.append(_cell(entry.get("cpu_ms")))
                if gpu:
                    cells.append(_cell(entry.get("gpu_ms")))
            body.append([name, *cells])
        lines += ["## Time per phase", "",
                  "CPU: the range's wall time on the host; GPU: the span of its kernels on the GPU timeline.", "",
                  *_table(header, body)]

    for label, run in runs.items():
        if run["kernels"] is not None:
            lines += [f"## Top kernels by GPU time ({label})", "",
                      *_table(["kernel", "calls", "total (ms)", "share (%)", "fastgen"],
                              [[_short(k["name"]), str(k["calls"]), _cell(k["total_ms"]),
                                _cell(100 * k["share"], ".1f"), "yes" if k["fastgen"] else ""]
                               for k in run["kernels"]["top"]])]
        lines += [f"## Top operators by CPU self time ({label})", "",
                  *_table(["operator", "calls", "self (ms)"],
                          [[_short(op["name"]), str(op["calls"]), _cell(op["self_ms"])] for op in run["cpu_ops"]])]

    nvml = {label: run["nvml"] for label, run in runs.items() if run["nvml"] is not None}
    if nvml:
        body = [[name, *(_cell(n["mean"][name]) for n in nvml.values())] for name in NVML_FIELDS]
        body.append(["clock-event reasons (share of samples)",
                     *(", ".join(f"{r} {100 * f:.0f}%" for r, f in n["throttle_reasons"].items()) or "none"
                       for n in nvml.values())])
        interval = next(iter(nvml.values()))["interval_ms"]
        lines += [f"## NVML (means of samples every {interval:g} ms)", "", *_table(["", *nvml], body)]

    lines += ["## Files", ""]
    lines += [f"- {label}: " + ", ".join(run["files"].values()) for label, run in runs.items()]
    lines += ["- summary.md, summary.json: this summary", ""]
    return "\n".join(lines)


def _short(name: str, width: int = 90) -> str:
    name = name.replace("|", "\\|")
    return name if len(name) <= width else name[:width - 3] + "..."


def write_summary(runs: dict[str, dict[str, Any]], out_dir: str | Path, title: str = "fastgen profile") -> str:
    """Write ``summary.md`` and ``summary.json`` (``{"title", "runs": {label: result}}``) of the
    :func:`profile_steps` results ``runs`` into ``out_dir``; return the markdown."""
    if not runs:
        raise ValueError("runs: expected at least one profile_steps result")
    out = Path(out_dir)
    text = format_summary(runs, title)
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({"title": title, "runs": runs}, indent=2) + "\n")
    return text
