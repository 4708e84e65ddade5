"""Synchronized BatchNorm (fastgen.ops.sync_bn, fastgen.nn.convert_sync_batchnorm) on two real
gloo processes on loopback.

Each rank runs the synchronized layer on its shard of a batch, forward and backward, on the
Triton path (interpreter) and the reference path. Before joining the group, the ranks share out
the single-process runs on the whole batch (the oracle) and of the converted layer without a
process group (which must give exactly the unconverted numbers). The test process only compares.
This file is also the worker: ``python tests/test_sync_bn.py RANK PORT OUT_DIR``.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fastgen
from fastgen import functional as F
from fastgen.models.gan import DCGANDiscriminator
from fastgen.nn import BNAct, ConvBNAct, ConvTransposeBNAct, convert_sync_batchnorm
from tests.conftest import TOL, spawn_ranks

WORLD = 2
TIMEOUT_S = 300  # both ranks, start to end: a hang fails the test
BACKENDS = ("triton", "reference")


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BN parameters and running statistics (fresh modules have 1, 0, 0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g))
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return module


def _torch_model() -> nn.Module:
    """conv -> BN -> ReLU (fused by the conversion), conv -> LeakyReLU -> BN (a BNAct)."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 5, 3, stride=2), nn.LeakyReLU(0.2), nn.BatchNorm2d(5))


# name -> (module factory, whole-batch input shape, each rank's rows, backends). Whole models run
# on the reference only: the interpreter would take minutes, and the layers test the kernels.
CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], tuple[int, ...],
                       tuple[str, ...]]] = {
    "conv": (lambda: ConvBNAct(3, 5, 3, stride=2, padding=1, activation="leaky_relu"),
             (4, 3, 7, 6), (2, 2), BACKENDS),
    # unequal shards: Chan's combine weighs the ranks by their counts
    "conv_transpose": (lambda: ConvTransposeBNAct(4, 3, 4, stride=2, padding=1, output_padding=1,
                                                  activation="relu"), (4, 4, 3, 5), (3, 1),
                       BACKENDS),
    "bn_act": (lambda: BNAct(5, activation="tanh"), (4, 5, 3, 4), (2, 2), BACKENDS),
    "torch_model": (_torch_model, (4, 3, 6, 6), (2, 2), ("reference",)),
    "dcgan_d": (lambda: DCGANDiscriminator(channels=1, image_size=16, width=4), (4, 1, 16, 16),
                (2, 2), ("reference",)),
}
RUNS = [(name, backend) for name, case in CASES.items() for backend in case[3]]


def _seeded(factory: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return factory()


def _step(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> dict:
    """One training forward and backward of loss = sum(out * weight): outputs, input and
    parameter gradients, buffers (in module order: the same for a model and its conversion)."""
    x = x.clone().requires_grad_()
    out = module(x)
    (out * weight[:, :out[0].numel()].reshape(out.shape)).sum().backward()
    return dict(out=out.detach(), dx=x.grad, grads=[p.grad for p in module.parameters()],
                buffers=[b.clone() for b in module.buffers()])


def _inputs(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    shape = CASES[name][1]
    g = torch.Generator().manual_seed(len(name))
    return torch.randn(shape, generator=g), torch.randn(shape[0], 64 * 64 * 8, generator=g)


def _shard(t: torch.Tensor, rows: tuple[int, ...], rank: int) -> torch.Tensor:
    return t.split(list(rows))[rank]


def _worker(rank: int, port: int, out_dir: Path) -> None:
    torch.set_num_threads(1)
    results = {}
    # The single-process oracle and the conversion without a process group, shared out.
    for name, backend in RUNS[rank::WORLD]:
        module = _randomize(_seeded(CASES[name][0]), 1).train()
        x, w = _inputs(name)
        with fastgen.use_backend(backend):
            results["whole", name, backend] = _step(copy.deepcopy(module), x, w)
            results["unsynced", name, backend] = _step(convert_sync_batchnorm(module), x, w)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    for name, backend in RUNS:
        module = convert_sync_batchnorm(_randomize(_seeded(CASES[name][0]), 1).train())
        x, w = _inputs(name)
        rows = CASES[name][2]
        with fastgen.use_backend(backend):
            results["synced", name, backend] = _step(module, _shard(x, rows, rank),
                                                     _shard(w, rows, rank))
    # Second derivatives through a synchronized BN raise (on every rank alike).
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    layer = convert_sync_batchnorm(ConvBNAct(3, 4, 3))
    with fastgen.use_backend("reference"):
        (dx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
        try:
            dx.square().sum().backward()
            results["double_backward"] = "no error"
        except NotImplementedError as error:
            results["double_backward"] = str(error)
    dist.destroy_process_group()
    torch.save(results, out_dir / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Both ranks' results, from one launch of two worker processes."""
    out_dir = tmp_path_factory.mktemp("sync_bn")
    return spawn_ranks(__file__, WORLD, out_dir, TIMEOUT_S)


def _whole(ranks: list[dict], kind: str, name: str, backend: str) -> dict:
    """A single-process run ("whole" or "unsynced"), from the rank that ran it."""
    return next(r[kind, name, backend] for r in ranks if (kind, name, backend) in r)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape and torch.isfinite(out).all()
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("name, backend", RUNS)
def test_synchronized_shards_equal_the_whole_batch(ranks, name, backend):
    """Outputs and input gradients (concatenated over the ranks), parameter gradients (summed:
    DDP's average times the world size, as for every parameter) and running statistics (on
    every rank) equal the single process's on the whole batch."""
    whole = _whole(ranks, "whole", name, backend)
    synced = [r["synced", name, backend] for r in ranks]
    assert rel_err(torch.cat([s["out"] for s in synced]), whole["out"]) < TOL
    assert rel_err(torch.cat([s["dx"] for s in synced]), whole["dx"]) < TOL
    for i, grad in enumerate(whole["grads"]):
        assert rel_err(sum(s["grads"][i] for s in synced), grad) < TOL, f"parameter {i}"
    for i, buffer in enumerate(whole["buffers"]):
        if buffer.is_floating_point():
            assert rel_err(synced[0]["buffers"][i], buffer) < TOL, f"buffer {i}"
        else:
            assert torch.equal(synced[0]["buffers"][i], buffer)  # num_batches_tracked
        # one combine of the same gathered statistics: identical on every rank
        assert torch.equal(synced[0]["buffers"][i], synced[1]["buffers"][i])


@pytest.mark.parametrize("name, backend", [run for run in RUNS if run[0] != "torch_model"])
def test_converted_without_a_group_gives_the_unconverted_numbers(ranks, name, backend):
    """No process group: a converted fastgen module runs exactly as before (same ops, no
    collective); bit for bit."""
    whole = _whole(ranks, "whole", name, backend)
    unsynced = _whole(ranks, "unsynced", name, backend)
    for key in ("out", "dx"):
        assert torch.equal(unsynced[key], whole[key])
    for a, b in zip(unsynced["grads"] + unsynced["buffers"], whole["grads"] + whole["buffers"]):
        assert torch.equal(a, b)


def test_converted_torch_model_without_a_group_matches_torch(ranks):
    """A torch model, fused and converted, gives torch's numbers without a process group."""
    whole = _whole(ranks, "whole", "torch_model", "reference")
    unsynced = _whole(ranks, "unsynced", "torch_model", "reference")
    for a, b in zip([unsynced["out"], unsynced["dx"], *unsynced["grads"], *unsynced["buffers"]],
                    [whole["out"], whole["dx"], *whole["grads"], *whole["buffers"]]):
        assert (rel_err(a, b) < TOL) if a.is_floating_point() else torch.equal(a, b)


def test_second_derivatives_through_a_synchronized_bn_raise(ranks):
    for r in ranks:
        assert "second derivatives through a synchronized BatchNorm" in r["double_backward"]


def test_convert_sync_batchnorm_replaces_and_marks_every_batchnorm():
    """conv -> BN (-> act) runs fuse, other BatchNorm2d become BNAct with the same keys, fastgen
    layers are marked; parameters and buffers are shared with the original modules."""
    model = _torch_model()
    bn, bn_alone = model[1], model[5]
    converted = convert_sync_batchnorm(model, None)
    assert converted is model and len(model) == 4
    assert isinstance(model[0], ConvBNAct) and model[0][1] is bn and model[0].sync_bn
    assert type(model[3]) is BNAct and model[3].sync_bn and model[3].process_group is None
    assert model[3].weight is bn_alone.weight and model[3].running_var is bn_alone.running_var
    assert set(model[3].state_dict()) == set(bn_alone.state_dict())
    d = convert_sync_batchnorm(DCGANDiscriminator(channels=1, image_size=16, width=4))
    layers = [m for m in d.modules() if isinstance(m, ConvBNAct)]
    assert [m.sync_bn for m in layers] == [isinstance(m[1], nn.BatchNorm2d) for m in layers]
    root = nn.BatchNorm2d(3)
    as_layer = convert_sync_batchnorm(root)
    assert type(as_layer) is BNAct and as_layer.weight is root.weight and as_layer.sync_bn


def test_convert_sync_batchnorm_errors():
    with pytest.raises(TypeError, match="module"):
        convert_sync_batchnorm("model")
    with pytest.raises(TypeError, match="process_group"):
        convert_sync_batchnorm(nn.BatchNorm2d(3), "world")
    with pytest.raises(NotImplementedError, match="BatchNorm1d"):
        convert_sync_batchnorm(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))
    x, w = torch.randn(2, 3, 4, 4), torch.randn(4, 3, 3, 3)
    with pytest.raises(TypeError, match="process_group"):
        F.conv_bn_act(x, w, None, None, None, None, process_group=0)
    with pytest.raises(TypeError, match="process_group"):
        F.bn_act(x, None, None, None, None, process_group="world")


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
