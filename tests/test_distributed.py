"""Data-parallel training (torchrun, gloo, 2 processes on loopback): the same losses as one process on
the global batch, one run directory, resume, a dead rank ends the other; the sharded sampler."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from fastgen.data import BatchSampler
from fastgen.train import TrainConfig, Trainer, load_checkpoint
from fastgen.train import distributed
from tests.conftest import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

# Tiny runs: the launches dominate (about 6 s of imports per process on a busy 2-core machine).
GAN2D = ["gan2d", "--hidden", "16", "--depth", "2", "--batch-size", "8"]
DCGAN = ["gan", "--width", "4", "--latent-size", "8", "--batch-size", "8"]
COMMON = ["--backend", "reference", "--device", "cpu", "--log-every", "1", "--no-progress", "--threads", "1"]
LAUNCH_TIMEOUT_S = 180
#: fp32 tolerance: the ranks' gradients are averaged by DDP, the logged values by an all-reduce.
RTOL, ATOL = 1e-5, 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return env | {"OMP_NUM_THREADS": "1"} | extra


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc-per-node 2 -m fastgen train ARGS`` on loopback."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
               "127.0.0.1", "--master-port", str(_free_port()), "-m", "fastgen", "train", *args, *COMMON]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _one_process(model_args: list[str], out_dir, **options):
    """The same run in this process, from the CLI's arguments (model, then --name value pairs)."""
    names = [a[2:].replace("-", "_") for a in model_args[1::2]]
    values = {name: int(value) for name, value in zip(names, model_args[2::2])}
    config = TrainConfig.resolve(model_args[0], out_dir=str(out_dir), backend="reference", device="cpu",
                                 log_every=1, **values, **options)
    trainer = Trainer.create(config, progress=False)
    trainer.fit()
    return trainer


def _assert_same_metrics(got, want):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for name in a:
            assert a[name] == pytest.approx(b[name], rel=RTOL, abs=ATOL), (a["step"], name)


# ----------------------------------------------------------------------------------------------
# torchrun


def test_gan2d_matches_one_process_writes_one_run_and_resumes(tmp_path):
    run = tmp_path / "runs" / "ddp"
    first = _torchrun(*GAN2D, "--steps", "2", "--out-dir", str(run))
    assert "x2 processes (gloo)" in first.stdout and first.stdout.count("trained gan2d") == 1
    _torchrun("gan2d", "--steps", "3", "--resume", str(run))  # every rank resumes from the checkpoint
    _assert_same_metrics(read_metrics(run), read_metrics(_one_process(GAN2D, tmp_path / "one", steps=3).run_dir))

    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["ddp"]  # rank 0 alone writes
    names = {p.name for p in run.iterdir()}
    assert {"checkpoint.pt", "config.json", "metrics.jsonl", "samples"} <= names
    assert not [name for name in names if ".tmp" in name]  # every write completed (atomic, by rank 0)
    config = json.loads((run / "config.json").read_text())
    assert (config["world_size"], config["dist_backend"], config["batch_size"]) == (2, "gloo", 8)
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["step"] == 3 and len(state["rank_rng"]) == 2
    # Each rank has its own stream; the shared one (the latents) is apart from both.
    assert not torch.equal(state["rank_rng"][0]["torch_cpu"], state["rank_rng"][1]["torch_cpu"])


def test_dcgan_with_sync_bn_matches_one_process(tmp_path, image_dir):
    """BN statistics over the global batch make the run the one-process run, to fp32 tolerance."""
    run = tmp_path / "ddp"
    _torchrun(*DCGAN, "--steps", "2", "--sync-bn", "--data-dir", image_dir, "--out-dir", str(run))
    one = _one_process(DCGAN, tmp_path / "one", steps=2, data_dir=image_dir, sync_bn=True)
    _assert_same_metrics(read_metrics(run), read_metrics(one.run_dir))
    # Synchronized running statistics: rank 0's checkpoint holds the whole batch's.
    saved = load_checkpoint(run / "checkpoint.pt")["models"]
    for name, module in one.models.items():
        for key, value in module.state_dict().items():
            if "running" in key:
                torch.testing.assert_close(saved[name][key], value, rtol=RTOL, atol=ATOL)


HANG_TIMEOUT_S = 10


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_a_dead_or_hung_rank_makes_the_other_stop_with_a_message(tmp_path, stop):
    """Two processes of an env:// launch without torchrun (nothing else stops the survivor): kill
    rank 1 mid-run, or freeze it (its connection stays open: only the collective timeout, here
    FASTGEN_DIST_TIMEOUT_S, ends the wait); rank 0 exits non-zero, naming itself and its step."""
    run = tmp_path / "run"
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "FASTGEN_DIST_TIMEOUT_S": str(HANG_TIMEOUT_S)}
    command = [sys.executable, "-m", "fastgen", "train", *GAN2D, "--steps", "1000000", "--out-dir", str(run),
               *COMMON]
    ranks = [subprocess.Popen(command, env=_env(**env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text():
            assert time.monotonic() < deadline and all(p.poll() is None for p in ranks), "the run did not start"
            time.sleep(0.2)
        ranks[1].send_signal(stop)
        stopped = time.monotonic()
        _, err = ranks[0].communicate(timeout=60)
        waited = time.monotonic() - stopped
    finally:
        for process in ranks:
            process.kill()
            process.communicate()
    assert ranks[0].returncode not in (0, None)
    assert "fastgen train: rank 0 of 2 stopped at step" in err and "another process died" in err, err[-3000:]
    assert waited < 60
    if stop == signal.SIGSTOP:
        assert waited > HANG_TIMEOUT_S - 1, "it stopped before the timeout: not by the timeout"


def test_bad_timeout_variable(monkeypatch):
    monkeypatch.setenv("FASTGEN_DIST_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="FASTGEN_DIST_TIMEOUT_S: expected a positive number of seconds"):
        distributed.timeout()
    monkeypatch.setenv("FASTGEN_DIST_TIMEOUT_S", "2.5")
    assert distributed.timeout().total_seconds() == 2.5


# ----------------------------------------------------------------------------------------------
# In this process


def test_a_group_of_one_trains_as_one_process(tmp_path, monkeypatch):
    """torchrun --nproc-per-node 1: a gloo group, recorded in the config, and the plain run's numbers."""
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
                        "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    try:
        grouped = _one_process(GAN2D, tmp_path / "grouped", steps=2)
    finally:
        distributed.shutdown()
    assert (grouped.config.world_size, grouped.config.dist_backend) == (1, "gloo")
    for name in ("MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name)
    plain = _one_process(GAN2D, tmp_path / "plain", steps=2)
    assert (plain.config.world_size, plain.config.dist_backend) == (None, None)
    assert read_metrics(grouped.run_dir) == read_metrics(plain.run_dir)


def test_sampler_shards_are_the_global_batches():
    """Rank shards side by side are the one-process batches, across epochs and a resume."""
    whole = BatchSampler(10, 4, seed=3)
    shards = [BatchSampler(10, 4, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(7):  # 2 batches an epoch (drop_last): several epochs
        parts = [next(s) for s in shards]
        assert [len(p) for p in parts] == [2, 2]
        assert torch.equal(torch.cat(parts), next(whole))
    resumed = BatchSampler(10, 4, seed=3, rank=1, world_size=2)
    resumed.load_state_dict(shards[0].state_dict())  # the state is global: rank 0's resumes rank 1
    assert torch.equal(next(resumed), next(shards[1]))


@pytest.mark.parametrize("options, error, match", [
    (dict(batch_size=6, world_size=4), ValueError, r"batch_size \(6\) must be a multiple of world_size \(4\)"),
    (dict(rank=2, world_size=2), ValueError, r"rank must be < world_size \(2\), got 2"),
    (dict(world_size=2, drop_last=False), ValueError, "drop_last must be True when sharded"),
    (dict(world_size=0), ValueError, "world_size"),
    (dict(rank=1.0, world_size=2), TypeError, "rank"),
])
def test_sampler_shard_errors(options, error, match):
    with pytest.raises(error, match=match):
        BatchSampler(100, options.pop("batch_size", 8), **options)


def test_rank_seeds_differ_and_repeat():
    seeds = [distributed.rank_seed(0, rank) for rank in range(4)] + [distributed.rank_seed(1, 0),
                                                                     distributed.rank_seed(0, 0, 5)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**32 for s in seeds)
    assert distributed.rank_seed(0, 1) == seeds[1]


def test_one_process_context():
    context, device = distributed.setup(torch.device("cpu"))
    assert (context, device) == (distributed.Context(), torch.device("cpu"))
    module, values = torch.nn.Linear(2, 2), torch.rand(3)
    assert context.wrap(module, device) is module and context.mean(values) is values
    assert context.all_gather("x") == ["x"] and context.broadcast("x") == "x" and context.is_main


def test_recorded_fields_are_not_options():
    with pytest.raises(ValueError, match="world_size: not an option"):
        TrainConfig.resolve("gan2d", world_size=2)
    config = TrainConfig.resolve("gan2d")
    config.world_size = 0
    with pytest.raises(ValueError, match="world_size: expected a positive integer"):
        config.validate()


# ----------------------------------------------------------------------------------------------
# The benchmark's scaling row


def test_scaling_row_skips_below_two_gpus_and_checks_its_arguments():
    from benchmarks.scaling import markdown_line, scaling_row

    if torch.cuda.device_count() < 2:
        row = scaling_row()
        assert row == {"row": "ddp-scaling",
                       "skipped": f"needs at least 2 CUDA GPUs, this machine has {torch.cuda.device_count()}"}
        assert "skipped: needs at least 2 CUDA GPUs" in markdown_line(row)
    with pytest.raises(ValueError, match="device: expected 'cuda' or 'cpu'"):
        scaling_row(device="tpu")
    with pytest.raises(ValueError, match="gpus: expected 2.."):
        scaling_row(1, device="cpu")


def test_scaling_markdown_line():
    from benchmarks.scaling import markdown_line

    row = {"row": "ddp-scaling", "per_gpu_batch": 64, "world_sizes": [1, 4], "images_per_s": [100.0, 350.0],
           "speedup": 3.5, "efficiency": 0.875}
    assert markdown_line(row) == "| ddp-scaling (64 per process) | 100 images/s | 350 images/s on 4 | 3.50x | 88% |"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs at least 2 CUDA GPUs")
def test_gpu_scaling_row():
    from benchmarks.scaling import markdown_line, scaling_row

    row = scaling_row(2, per_gpu_batch=32, steps=5)
    assert row["world_sizes"] == [1, 2] and all(speed > 0 for speed in row["images_per_s"])
    assert row["speedup"] == pytest.approx(row["images_per_s"][1] / row["images_per_s"][0])
    assert "on 2" in markdown_line(row)
