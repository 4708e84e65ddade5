"""The block-shape tuner (kernels/_tuning.py): which config runs, timing once per key, configs that
fail, and the policy switches. Timing is faked, so these run without a GPU."""

from __future__ import annotations

import pytest
import torch
from triton.runtime.errors import OutOfResources

from fastgen.activations import ACTIVATIONS
from fastgen.kernels import _tuning
from fastgen.kernels._tuning import NoCandidateError, TileConfig, Tuner

CUDA = torch.device("cuda", 0)  # never touched: the launches below are fakes
A, B, C = TileConfig(64, 64, 32), TileConfig(128, 64, 32), TileConfig(128, 128, 64, num_warps=8)
INTERPRETER = TileConfig(128, 32, 32)


class FakeTimer:
    """Stands for triton.testing.do_bench: runs the launch once, returns a set time per config."""

    def __init__(self, times: dict[TileConfig, float | Exception]) -> None:
        self.times = times
        self.timed: list[TileConfig] = []

    def __call__(self, fn) -> float:
        config = fn()
        self.timed.append(config)
        result = self.times[config]
        if isinstance(result, Exception):
            raise result
        return result


@pytest.fixture
def tuning_on(monkeypatch):
    monkeypatch.delenv("FASTGEN_AUTOTUNE", raising=False)
    monkeypatch.setattr(_tuning, "tuning_enabled", lambda device: device.type == "cuda")


class Launches(list):
    """A fake launch: records the configs it ran with and returns the config as its output."""

    def __call__(self, config: TileConfig) -> TileConfig:
        self.append(config)
        return config


def make_tuner(times) -> tuple[Tuner, FakeTimer, Launches]:
    tuner = Tuner("test kernel", [A, B, C], interpreter=INTERPRETER)
    tuner.benchmark_ms = timer = FakeTimer(times)
    return tuner, timer, Launches()


def identity(config):
    return config


def test_the_fastest_config_runs_and_is_remembered(tuning_on):
    tuner, timer, launch = make_tuner({A: 3.0, B: 1.0, C: 2.0})
    assert tuner.run("shape", CUDA, identity, launch) == B
    assert timer.timed == [A, B, C] and launch[-1] == B
    assert tuner.run("shape", CUDA, identity, launch) == B
    assert timer.timed == [A, B, C], "a known key is not timed again"
    timer.times = {A: 0.5, B: 1.0, C: 2.0}
    assert tuner.run("other shape", CUDA, identity, launch) == A
    assert tuner.chosen == {(0, "shape"): B, (0, "other shape"): A}


def test_configs_that_fit_alike_are_timed_once(tuning_on):
    small = TileConfig(16, 16, 16)
    tuner, timer, launch = make_tuner({small: 1.0})
    assert tuner.run("k", CUDA, lambda c: small, launch) == small
    assert timer.timed == [small]


def test_a_config_that_fails_drops_out(tuning_on):
    tuner, timer, launch = make_tuner({A: OutOfResources(300_000, 232_448, "shared memory"), B: 2.0, C: 1.5})
    assert tuner.run("k", CUDA, identity, launch) == C


def test_no_config_that_runs_is_a_clear_error(tuning_on):
    tuner, _, launch = make_tuner({c: OutOfResources(300_000, 100_000, "shared memory") for c in (A, B, C)})
    with pytest.raises(NoCandidateError, match=r"test kernel: no candidate .* OutOfResources"):
        tuner.run("k", CUDA, identity, launch)
    assert tuner.chosen == {}


def test_cpu_tensors_run_the_interpreter_config_untimed(tuning_on):
    tuner, timer, launch = make_tuner({})
    fit = lambda c: TileConfig(c.m, 16, c.k)  # noqa: E731
    assert tuner.run("k", torch.device("cpu"), fit, launch) == TileConfig(128, 16, 32)
    assert timer.timed == []


@pytest.mark.parametrize("switch", ["env", "deterministic", "cudnn_deterministic"])
def test_untimed_default_when_tuning_is_off(monkeypatch, switch):
    """FASTGEN_AUTOTUNE=0 or PyTorch's deterministic modes: the first candidate, never timed, so
    two processes pick the same config and repeat bit for bit."""
    monkeypatch.delenv("FASTGEN_AUTOTUNE", raising=False)
    if switch == "env":
        monkeypatch.setenv("FASTGEN_AUTOTUNE", "0")
    elif switch == "deterministic":
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    else:
        monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    assert not _tuning.tuning_enabled(CUDA)
    tuner, timer, launch = make_tuner({})
    assert tuner.run("k", CUDA, identity, launch) == A
    assert timer.timed == []


def test_policy_defaults(monkeypatch):
    monkeypatch.delenv("FASTGEN_AUTOTUNE", raising=False)
    assert not _tuning.tuning_enabled(torch.device("cpu"))
    if not torch.cuda.is_available():
        assert _tuning.tuning_enabled(CUDA), "tuning is on by default for CUDA tensors"


def test_choose_returns_the_fastest_candidate_of_any_kind(tuning_on):
    """Candidates need only be hashable (the conv layer's implementations are names); choose()
    times them and returns the winner without running it again."""
    tuner = Tuner("implementation", ["fused", "cudnn-gemm"], interpreter="fused")
    tuner.benchmark_ms = timer = FakeTimer({"fused": 2.0, "cudnn-gemm": 1.0})
    launch = Launches()
    assert tuner.choose("shape", CUDA, identity, launch) == "cudnn-gemm"
    assert launch == ["fused", "cudnn-gemm"] and timer.timed == ["fused", "cudnn-gemm"]
    assert tuner.choose("shape", torch.device("cpu"), identity, launch) == "fused"


def test_a_timed_key_keeps_its_choice_while_tuning_is_off(monkeypatch, tuning_on):
    """E.g. a CUDA graph captured after warm-up replays the tuned config, not the default."""
    tuner, timer, launch = make_tuner({A: 3.0, B: 1.0, C: 2.0})
    assert tuner.choose("shape", CUDA, identity, launch) == B
    monkeypatch.setattr(_tuning, "tuning_enabled", lambda device: False)
    assert tuner.choose("shape", CUDA, identity, launch) == B
    assert tuner.choose("new shape", CUDA, identity, launch) == A
    assert timer.timed == [A, B, C]


@pytest.mark.parametrize("n, bucket", [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (100, 128), (128, 128)])
def test_batch_bucket_is_the_next_power_of_two(n, bucket):
    assert _tuning.batch_bucket(n) == bucket


@pytest.mark.parametrize("n", [0, -3, 2.0, True])
def test_batch_bucket_rejects_what_is_not_a_batch_size(n):
    with pytest.raises(ValueError, match="n: expected a batch size"):
        _tuning.batch_bucket(n)


def test_conv_tiles_are_chosen_per_batch_bucket(monkeypatch):
    """A smaller last batch (here 13 after 16) or an eval batch in the same bucket reuses the
    bucket's tiles instead of compiling and timing again: same key, same fitted candidates."""
    from fastgen.kernels import conv_bn_act as K

    seen = []

    def spy(tuner):
        def run(key, device, fit, launch, *operands):
            seen.append((tuner.name, key, [fit(c) for c in tuner.candidates]))
            return torch.zeros(1, 1, 1, 1, 1)  # the launch's output; nothing runs
        return run

    for tuner in (K.GEMM_TUNER, K.WGRAD_TUNER):
        monkeypatch.setattr(tuner, "run", spy(tuner))
    weight = torch.randn(16, 8, 3, 3)
    for n in (16, 13, 9):
        x, dout = torch.randn(n, 5, 5, 8), torch.randn(n, 5, 5, 16)
        K.conv_stats_forward(x, weight, (5, 5), (1, 1), (1, 1), False)
        K.conv_weight_grad(x, dout, dout, torch.randn(8, 16), weight.shape, (1, 1), (1, 1), False,
                           ACTIVATIONS["relu"].code, 0.0, torch.float32)
    gemm, wgrad = seen[0::2], seen[1::2]
    assert all(s == gemm[0] for s in gemm) and all(s == wgrad[0] for s in wgrad)
    x = torch.randn(8, 5, 5, 8)  # the next bucket down is another key
    K.conv_stats_forward(x, weight, (5, 5), (1, 1), (1, 1), False)
    assert seen[-1][1] != gemm[0][1]


BIG = TileConfig(128, 128, 64, num_warps=8)  # fp32: 64 KB of operands per pipeline stage


def test_operands_loaded_twice_per_step_take_twice_the_buffers():
    """dL/dy computed while loading (BN_GRAD) takes dL/dout's and y's tiles per stage, and the
    computed tile once more: BIG's fp32 fits an A100's 163 KB with one A tile (128 KB), not with
    two (224 KB). (The compile report found 256x64x32 fp32 input gradients at 177.5 KB on sm_80.)"""
    tuner = Tuner("test kernel", [BIG, A], interpreter=INTERPRETER)
    assert BIG.shared_bytes(4, (8, 0), (2, 1)) == (2 * (2 * 128 * 64 + 64 * 128) + 128 * 64) * 4
    assert TileConfig(256, 64, 32, 8).shared_bytes(4, (8, 0), (2, 1)) > 163 * 1024
    assert set(tuner.candidates_for(CUDA, torch.float32, (8, 0))) == {BIG, A}
    assert tuner.candidates_for(CUDA, torch.float32, (8, 0), (2, 1)) == (A,)


@pytest.mark.parametrize("dtype, capability, kept", [
    (torch.float32, (9, 0), [BIG, A]), (torch.float32, (8, 0), [A, BIG]), (torch.float32, (8, 6), [A]),
    (torch.bfloat16, (8, 6), [A, BIG]), (torch.float32, (7, 2), [BIG, A]), (None, (8, 6), [BIG, A])])
def test_tiles_that_cannot_fit_shared_memory_are_left_out(dtype, capability, kept):
    """Statically, per GPU and dtype: BIG's 3 stages of fp32 operands (2 before sm_90) fit an H100
    block (227 KB) and an A100's (163 KB), not an RTX 3090's (99 KB); an unknown GPU, or no dtype,
    keeps every candidate (a failing launch drops out when timed). Before sm_90, A (room for two
    blocks per SM, BIG not) goes first."""
    tuner = Tuner("test kernel", [BIG, A], interpreter=INTERPRETER)
    assert list(tuner.candidates_for(CUDA, dtype, capability)) == kept
    assert tuner.candidates_for(torch.device("cpu"), dtype, capability) == (INTERPRETER,)


def test_before_sm90_the_default_leaves_room_for_a_second_block(monkeypatch):
    """sm_80, fp32, two A tiles per step (an input gradient through BN, a modulated conv): the
    first candidate's 96 KB allow one block per SM, so the 64x64 tile (56 KB) becomes the untimed
    default, the rest keep their order. One A tile (48 KB), bf16, or sm_90 (where the estimate
    is only an upper bound): the order stays."""
    wide, mid, small = TileConfig(128, 64, 32), TileConfig(128, 128, 32, num_warps=8), TileConfig(64, 64, 32)
    tuner = Tuner("test kernel", [wide, BIG, mid, small], interpreter=INTERPRETER)
    assert wide.shared_bytes(4, (8, 0), (2, 1)) == 96 * 1024 and not wide.fits_twice(4, (8, 0), (2, 1))
    assert small.shared_bytes(4, (8, 0), (2, 1)) == 56 * 1024 and small.fits_twice(4, (8, 0), (2, 1))
    assert tuner.candidates_for(CUDA, torch.float32, (8, 0), (2, 1)) == (small, wide, mid)
    for dtype, capability, tiles in [(torch.float32, (8, 0), (1, 1)), (torch.bfloat16, (8, 0), (2, 1)),
                                     (torch.float32, (9, 0), (2, 1))]:
        assert tuner.candidates_for(CUDA, dtype, capability, tiles)[0] == wide
    assert not small.fits_twice(4, (7, 2), (1, 1))  # unknown GPU: no claim
    # sm_86 (99 KB per block, 100 KB per SM): nothing fits twice, the order stays.
    assert tuner.candidates_for(CUDA, torch.float32, (8, 6), (2, 1)) == (wide, small)
    # Exactly two blocks, each with the driver's 1 KB: fits; 1 byte more: does not.
    two = TileConfig(64, 64, 32, num_stages=2)  # one buffer on sm_80: (64 x 32 + 32 x 64) x 4 B = 16 KB
    assert two.shared_bytes(4, (8, 0)) == 16 * 1024 and two.fits_twice(4, (8, 0))
    monkeypatch.setitem(_tuning.SHARED_MEMORY_PER_BLOCK, (8, 0), 2 * 17 * 1024 - 1024)
    assert two.fits_twice(4, (8, 0))
    monkeypatch.setitem(_tuning.SHARED_MEMORY_PER_BLOCK, (8, 0), 2 * 17 * 1024 - 1024 - 1)
    assert not two.fits_twice(4, (8, 0))


def test_the_conv_gemm_default_on_an_a100_leaves_room_for_two_blocks():
    """The real tuner: an fp32 input gradient through BN on sm_80 starts with 64x64x32."""
    from fastgen.kernels import conv_bn_act as K

    tiles = K.gemm_operand_tiles(True, False, 4)
    assert K.GEMM_TUNER.candidates_for(CUDA, torch.float32, (8, 0), tiles)[0] == TileConfig(64, 64, 32)
    assert K.GEMM_TUNER.candidates_for(CUDA, torch.float32, (9, 0), tiles)[0] == K.GEMM_TUNER.candidates[0]


def test_no_tile_that_fits_is_a_clear_error(monkeypatch, tuning_on):
    tuner = Tuner("test kernel", [BIG], interpreter=INTERPRETER)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 6))
    with pytest.raises(NoCandidateError, match="test kernel: no candidate fits"):
        tuner.run("k", CUDA, identity, Launches(), torch.float32)
