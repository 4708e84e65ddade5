"""Checkpoint files: atomic writes (also under SIGKILL), weights_only loads, RNG state round trip."""

import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from fastgen.train.checkpoint import (FORMAT, CheckpointError, capture_rng_state, load_checkpoint,
                                      restore_rng_state, save_checkpoint)


def _draws():
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(1).tolist(),
            [random.random() for _ in range(3)], random.gauss(0, 1))


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(11)
    np.random.seed(12)
    random.seed(13)
    np.random.randn(1)  # leaves a cached gaussian in numpy's state
    random.gauss(0, 1)  # and in Python's
    save_checkpoint({"rng": capture_rng_state()}, tmp_path / "c.pt")
    expected = _draws()
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    restore_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    assert _draws() == expected


def test_round_trip_of_tensors_and_plain_values(tmp_path):
    state = {"step": 7, "models": {"g": {"w": torch.randn(3, 4)}}, "betas": (0.5, 0.999), "flag": None,
             "name": "gan", "states": [torch.tensor(3.0), {"exp_avg": torch.randn(2)}]}
    save_checkpoint(state, tmp_path / "c.pt")
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert loaded["format"] == FORMAT
    assert loaded["step"] == 7 and loaded["betas"] == (0.5, 0.999) and loaded["flag"] is None
    torch.testing.assert_close(loaded["models"]["g"]["w"], state["models"]["g"]["w"])
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]  # no temporary file left behind


def test_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
    real_save = torch.save

    def save_half_then_die(obj, f):
        real_save(obj, f)
        f.truncate(f.tell() // 2)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", save_half_then_die)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    loaded = load_checkpoint(path)
    assert loaded["step"] == 1 and loaded["w"].sum() == 1000
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]


_SAVER = textwrap.dedent("""
    import sys, torch
    from fastgen.train.checkpoint import save_checkpoint
    path, marker = sys.argv[1], sys.argv[2]
    weights = torch.randn(4_000_000)
    step = 0
    while True:
        step += 1
        w = weights + step
        save_checkpoint({"step": step, "w": w, "sum": w.sum()}, path)
        if step == 1:
            open(marker, "w").close()
""")


def test_sigkill_during_a_save_leaves_a_loadable_checkpoint(tmp_path):
    """A process saving a 16 MB checkpoint in a loop is killed; the kill lands inside a save (its
    temporary file is left behind) and the checkpoint on disk is a complete one."""
    path, marker = tmp_path / "c.pt", tmp_path / "first-save-done"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    rng = random.Random(0)
    killed_mid_save = False
    for _ in range(3):  # each kill has a high chance of landing mid-save; retry the rare miss
        marker.unlink(missing_ok=True)
        child = subprocess.Popen([sys.executable, "-c", _SAVER, str(path), str(marker)], env=env)
        try:
            deadline = time.monotonic() + 120
            while not marker.exists():
                assert child.poll() is None, "the saving process died"
                assert time.monotonic() < deadline, "the saving process made no checkpoint"
                time.sleep(0.01)
            time.sleep(rng.uniform(0.05, 0.3))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        state = load_checkpoint(path)
        assert state["step"] >= 1
        assert state["w"].numel() == 4_000_000 and state["w"].sum() == state["sum"]
        leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".c.pt.tmp-")]
        if leftovers:
            killed_mid_save = True
            break
    assert killed_mid_save


class _Payload:
    """Unpickling this runs code: exactly what a checkpoint must never be able to do."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


class _Plain:
    pass


@pytest.mark.parametrize("obj", [_Payload(), _Plain()], ids=["code", "object"])
def test_pickled_objects_are_refused(tmp_path, monkeypatch, obj):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "step": 1, "extra": obj}, path)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_plain_pickle_file_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(_Payload(), protocol=2))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_truncated_and_foreign_files(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint({"w": torch.randn(10_000)}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"w": torch.randn(3)}, foreign)
    with pytest.raises(CheckpointError, match="not a fastgen checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
