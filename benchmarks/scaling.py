"""Data-parallel scaling row: DCGAN training images/s on 1 GPU and on N GPUs (torchrun, NCCL).

Weak scaling: every process keeps the same per-GPU batch, so N GPUs train a global batch N times
larger; the row reports images/s for each world size, the speedup and the efficiency (speedup / N).
Each world size is one ``torchrun --nproc-per-node N -m fastgen train gan`` run on random IDX
images (the content does not change the speed); images/s is rank 0's throughput over the steps
after the warm-up (the trainer's last metrics window).

    python -m benchmarks.scaling              # every GPU of the machine; JSON row and a table line
    python -m benchmarks.scaling --gpus 4

With fewer than two GPUs the row is skipped and says so. ``device="cpu"`` runs the same plumbing on
gloo processes (a check of the measurement, not a benchmark).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastgen.train.factory import IMAGE_MODELS

__all__ = ["scaling_row", "markdown_line"]

#: The DCGAN of the GPU report's training row: 64x64, width 64, latent 100.
MODEL_ARGS = ("gan", "--image-size", "64", "--width", "64", "--latent-size", "100")
_IMAGES = 4096


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _random_idx(folder: Path) -> None:
    from fastgen.data import write_idx

    rng = np.random.default_rng(0)
    write_idx(folder / "train-images-idx3-ubyte", rng.integers(0, 256, (_IMAGES, 28, 28), dtype=np.uint8))
    write_idx(folder / "train-labels-idx1-ubyte", (np.arange(_IMAGES) % 10).astype(np.uint8))


def _images_per_s(world_size: int, device: str, model: tuple[str, ...], per_gpu_batch: int, steps: int,
                  out_dir: Path, options: tuple[str, ...], timeout_s: float) -> float:
    """Rank 0's images/s over the second ``steps`` steps of a ``world_size``-process run of ``2 * steps``
    (the first window is the warm-up: compilation, autotuning)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world_size),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "fastgen", "train",
               *model, "--batch-size", str(per_gpu_batch * world_size), "--steps", str(2 * steps),
               "--log-every", str(steps), "--sample-every", str(2 * steps), "--checkpoint-every", str(2 * steps),
               "--device", device, "--out-dir", str(out_dir), "--no-progress", *options]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode:
        raise RuntimeError(f"scaling: the {world_size}-process run failed (exit {done.returncode}):\n"
                           f"{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return float(records[-1]["images_per_s"])


def scaling_row(gpus: int | None = None, *, device: str = "cuda", model: tuple[str, ...] = MODEL_ARGS,
                per_gpu_batch: int = 128, steps: int = 30, data_dir: str | None = None, extra: tuple[str, ...] = (),
                timeout_s: float = 300) -> dict[str, Any]:
    """Images/s of training ``model`` (MODEL then its train options; default DCGAN-64) on 1 and on
    ``gpus`` processes (default: every GPU).

    ``steps`` steps are timed after as many warm-up steps (the trainer logs one metrics window
    each). ``extra`` adds train options (``("--compile",)``, ``("--sync-bn",)``).

    Returns:
        ``{"row": "ddp-scaling", "world_sizes": [1, N], "images_per_s": [..], "speedup", "efficiency",
        "per_gpu_batch", ...}``, or ``{"row": "ddp-scaling", "skipped": reason}`` with fewer than two GPUs.

    Raises:
        ValueError: ``gpus`` below 2 or above the GPUs present; ``device`` not "cuda" or "cpu".
        RuntimeError: a run failed (its stderr's tail in the message).
    """
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device: expected 'cuda' or 'cpu', got {device!r}")
    available = torch.cuda.device_count() if device == "cuda" else os.cpu_count() or 1
    if device == "cuda" and available < 2:
        return {"row": "ddp-scaling", "skipped": f"needs at least 2 CUDA GPUs, this machine has {available}"}
    gpus = available if gpus is None else gpus
    if not 2 <= gpus <= available:
        raise ValueError(f"gpus: expected 2..{available} ({device}), got {gpus}")
    world_sizes = [1, gpus]
    with tempfile.TemporaryDirectory(prefix="fastgen-scaling-") as tmp:
        if model[0] in IMAGE_MODELS and data_dir is None:
            data_dir = str(Path(tmp) / "idx")
            Path(data_dir).mkdir()
            _random_idx(Path(data_dir))
        options = ("--data-dir", data_dir, *extra) if model[0] in IMAGE_MODELS else extra
        speeds = [_images_per_s(n, device, model, per_gpu_batch, steps, Path(tmp) / f"run{n}", options, timeout_s)
                  for n in world_sizes]
    speedup = speeds[1] / speeds[0]
    return {"row": "ddp-scaling", "model": " ".join(model), "device": device,
            "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
            "world_sizes": world_sizes, "per_gpu_batch": per_gpu_batch, "steps": steps, "options": list(extra),
            "images_per_s": speeds, "speedup": speedup, "efficiency": speedup / gpus}


def markdown_line(row: dict[str, Any]) -> str:
    """The row as one markdown table line (| row | 1 proc | N procs | speedup | efficiency |)."""
    if "skipped" in row:
        return f"| {row['row']} | skipped: {row['skipped']} | | | |"
    (one, many), n = row["images_per_s"], row["world_sizes"][1]
    return (f"| {row['row']} ({row['per_gpu_batch']} per process) | {one:.0f} images/s | {many:.0f} images/s on {n} "
            f"| {row['speedup']:.2f}x | {100 * row['efficiency']:.0f}% |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, help="processes of the data-parallel run (default: every GPU)")
    parser.add_argument("--per-gpu-batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="timed steps, after as many warm-up steps")
    parser.add_argument("--data-dir", help="MNIST-family IDX files (default: random images)")
    parser.add_argument("--compile", action="store_true", help="train with --compile")
    args = parser.parse_args(argv)
    row = scaling_row(args.gpus, per_gpu_batch=args.per_gpu_batch, steps=args.steps, data_dir=args.data_dir,
                      extra=("--compile",) if args.compile else ())
    print(json.dumps(row))
    print(markdown_line(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
