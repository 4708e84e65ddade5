"""Tests for fastgen.data (IDX I/O, MNIST-family loader, 2D mixtures, BatchSampler).

Everything runs on small generated data; nothing depends on the Debian
dataset-fashion-mnist package being installed.
"""

import gzip
import math
import os
import struct

import numpy as np
import pytest
import torch

from fastgen.data import (
    BatchSampler,
    Mixture2D,
    grid25_means,
    load_mnist_family,
    mixture2d,
    read_idx,
    ring8_means,
    write_idx,
)

# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]
)
def test_idx_roundtrip(tmp_path, suffix, dtype):
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    p = tmp_path / f"x-idx3{suffix}"
    write_idx(p, arr)
    out = read_idx(p)
    assert out.dtype == np.dtype(dtype)
    assert out.shape == (3, 4, 5)
    np.testing.assert_array_equal(out, arr)
    assert out.flags.writeable and out.flags.c_contiguous
    torch.from_numpy(out)  # native byte order


def test_idx_roundtrip_1d_labels_and_tensor_input(tmp_path):
    labels = torch.arange(10, dtype=torch.uint8)
    p = tmp_path / "labels-idx1-ubyte.gz"
    write_idx(p, labels)
    np.testing.assert_array_equal(read_idx(str(p)), labels.numpy())


def test_idx_header_is_big_endian(tmp_path):
    p = tmp_path / "a"
    write_idx(p, np.array([1, 256], dtype=np.int32))
    raw = p.read_bytes()
    assert raw[:4] == bytes([0, 0, 0x0C, 1])
    assert struct.unpack(">I", raw[4:8]) == (2,)
    assert struct.unpack(">ii", raw[8:]) == (1, 256)


def _write_raw(path, data, gz=False):
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)


def _header(type_code, dims):
    return bytes([0, 0, type_code, len(dims)]) + struct.pack(">" + "I" * len(dims), *dims)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"\x01\x00\x08\x01" + struct.pack(">I", 2) + b"\x00\x00", "magic"),
        (b"\x00\x07\x08\x01" + struct.pack(">I", 2) + b"\x00\x00", "magic"),
        (_header(0x0A, [2]) + b"\x00\x00", "type code 0x0A"),
        (_header(0x08, [60000, 28, 28]) + b"\x00" * 1000,
         "truncated: header says 60000x28x28 = 47040000 bytes of data, file has 1000"),
        (_header(0x0C, [4]) + b"\x00" * 12, "truncated"),
        (_header(0x08, [2, 2]) + b"\x00" * 5, "trailing bytes"),
        (_header(0x08, [3, 28, 28])[:9], "truncated header"),
        (b"\x00\x00", "truncated header"),
        (b"", "truncated header"),
        (bytes([0, 0, 0x08, 0]), "ndim=0"),
    ],
)
def test_idx_corrupt_files_raise_valueerror_with_path(tmp_path, gz, data, fragment):
    p = tmp_path / ("bad-idx.gz" if gz else "bad-idx")
    _write_raw(p, data, gz=gz)
    with pytest.raises(ValueError) as ei:
        read_idx(p)
    msg = str(ei.value)
    assert str(p) in msg
    assert fragment in msg


def test_idx_truncated_gzip_stream(tmp_path):
    good = tmp_path / "good.gz"
    write_idx(good, np.zeros((50, 28, 28), np.uint8) + np.arange(28, dtype=np.uint8))
    bad = tmp_path / "bad.gz"
    bad.write_bytes(good.read_bytes()[:-20])
    with pytest.raises(ValueError, match="bad.gz"):
        read_idx(bad)


def test_idx_not_gzip_but_gz_suffix(tmp_path):
    p = tmp_path / "plain.gz"
    p.write_bytes(_header(0x08, [1]) + b"\x05")
    with pytest.raises(ValueError) as ei:
        read_idx(p)
    assert str(ei.value).startswith(f"{p}: not a valid gzip file")


def test_idx_gzip_without_gz_suffix_is_bad_magic(tmp_path):
    p = tmp_path / "train-images-idx3-ubyte"
    write_idx(tmp_path / "x.gz", np.zeros((2, 3), np.uint8))
    p.write_bytes((tmp_path / "x.gz").read_bytes())
    with pytest.raises(ValueError) as ei:
        read_idx(p)
    assert str(ei.value) == (
        f"{p}: bad magic number 1f8b0808: IDX files start with two zero bytes "
        "(is this an IDX file? gzip files must end with .gz)"
    )


def test_idx_missing_file(tmp_path):
    p = tmp_path / "nope-idx1-ubyte"
    with pytest.raises(FileNotFoundError, match="nope-idx1-ubyte"):
        read_idx(p)
    with pytest.raises(FileNotFoundError, match="nope-idx1-ubyte.gz"):
        read_idx(tmp_path / "nope-idx1-ubyte.gz")


def test_write_idx_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(ValueError, match="int64"):
        write_idx(tmp_path / "x", np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="dimensions"):
        write_idx(tmp_path / "x", np.uint8(3))


# ---------------------------------------------------------------- MNIST-family loader


def _fake_mnist_dir(root, n_train=20, n_test=7, gz=True, h=28, w=28, label_count=None):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    ext = ".gz" if gz else ""
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, size=(n, h, w), dtype=np.uint8)
        imgs[0, 0, 0] = 0
        imgs[0, 0, 1] = 255
        labels = rng.integers(0, 10, size=(label_count or n,), dtype=np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", imgs)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", labels)
        data[prefix] = (imgs, labels)
    return data


@pytest.mark.parametrize("gz", [True, False])
def test_load_gan_scale(tmp_path, gz):
    data = _fake_mnist_dir(tmp_path / "fm", gz=gz)
    x, y = load_mnist_family(tmp_path / "fm")
    imgs, labels = data["train"]
    assert x.shape == (20, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (20,) and y.dtype == torch.int64
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    expected = torch.from_numpy(imgs).float().div(255).mul(2).sub(1).unsqueeze(1)
    torch.testing.assert_close(x, expected)
    assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))


def test_load_unit_scale_test_split(tmp_path):
    data = _fake_mnist_dir(tmp_path / "fm")
    x, y = load_mnist_family(str(tmp_path / "fm"), "test", scale="unit")
    imgs, labels = data["t10k"]
    assert x.shape == (7, 1, 28, 28)
    assert x.min().item() == 0.0 and x.max().item() == 1.0
    torch.testing.assert_close(x[:, 0], torch.from_numpy(imgs).float() / 255)
    assert y.tolist() == labels.tolist()


@pytest.mark.parametrize("scale, bg", [("gan", -1.0), ("unit", 0.0)])
def test_load_pad_to_32(tmp_path, scale, bg):
    _fake_mnist_dir(tmp_path / "fm")
    x, _ = load_mnist_family(tmp_path / "fm", scale=scale)
    xp, _ = load_mnist_family(tmp_path / "fm", scale=scale, pad_to_32=True)
    assert xp.shape == (20, 1, 32, 32)
    torch.testing.assert_close(xp[:, :, 2:30, 2:30], x)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (xp[:, :, border] == bg).all()


def test_load_count_mismatch(tmp_path):
    _fake_mnist_dir(tmp_path / "fm", label_count=19)
    with pytest.raises(ValueError) as ei:
        load_mnist_family(tmp_path / "fm")
    msg = str(ei.value)
    assert str(tmp_path / "fm") in msg and "20 images" in msg and "19 labels" in msg


def test_load_missing_dir(tmp_path):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(FileNotFoundError) as ei:
        load_mnist_family(missing)
    msg = str(ei.value)
    assert str(missing) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "data_dir" in msg


def test_load_missing_file(tmp_path):
    _fake_mnist_dir(tmp_path / "fm")
    os.remove(tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(FileNotFoundError) as ei:
        load_mnist_family(tmp_path / "fm", "test")
    msg = str(ei.value)
    assert str(tmp_path / "fm") in msg and "t10k-labels-idx1-ubyte" in msg
    assert "apt-get install dataset-fashion-mnist" in msg


def test_load_corrupt_file_names_it(tmp_path):
    _fake_mnist_dir(tmp_path / "fm", gz=False)
    p = tmp_path / "fm" / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte: truncated"):
        load_mnist_family(tmp_path / "fm")


def test_load_invalid_split_and_scale(tmp_path):
    _fake_mnist_dir(tmp_path / "fm")
    with pytest.raises(ValueError, match="'train'.*'test'"):
        load_mnist_family(tmp_path / "fm", "val")
    with pytest.raises(ValueError, match="'gan'.*'unit'"):
        load_mnist_family(tmp_path / "fm", scale="pm1")


# ------------------------------------------------------------------- 2D mixtures


def test_ring8_means():
    m = ring8_means()
    assert m.shape == (8, 2) and m.dtype == torch.float32
    torch.testing.assert_close(m.norm(dim=1), torch.ones(8))
    assert torch.unique(m.round(decimals=4), dim=0).shape[0] == 8
    # consecutive means are 2*pi/8 apart: chord length 2*sin(pi/8)
    d = (m - m.roll(1, dims=0)).norm(dim=1)
    torch.testing.assert_close(d, torch.full((8,), 2 * math.sin(math.pi / 8)))
    torch.testing.assert_close(m[0], torch.tensor([1.0, 0.0]))


def test_grid25_means():
    m = grid25_means()
    assert m.shape == (25, 2) and m.dtype == torch.float32
    assert torch.unique(m, dim=0).shape[0] == 25
    expected = {(float(a), float(b)) for a in (-4, -2, 0, 2, 4) for b in (-4, -2, 0, 2, 4)}
    assert {tuple(r) for r in m.tolist()} == expected


@pytest.mark.parametrize("name, k, std", [("ring8", 8, 0.01), ("grid25", 25, 0.05)])
def test_mixture_sampling(name, k, std):
    mix = mixture2d(name)
    assert isinstance(mix, Mixture2D) and mix.name == name
    assert mix.std == std and mix.means.shape == (k, 2) and mix.num_modes == k
    g = torch.Generator().manual_seed(0)
    n = 8000
    s = mix.sample(n, generator=g)
    assert s.shape == (n, 2) and s.dtype == torch.float32
    d = torch.cdist(s, mix.means)
    dmin, nearest = d.min(dim=1)
    assert (dmin < 6 * std).all()
    # per-coordinate std of the noise
    resid = s - mix.means[nearest]
    assert abs(resid.std().item() - std) < 0.1 * std
    counts = torch.bincount(nearest, minlength=k).float()
    expected = n / k
    assert (counts > 0.7 * expected).all() and (counts < 1.3 * expected).all()


def test_mixture_sampling_reproducible():
    mix = mixture2d("ring8")
    a = mix.sample(10, generator=torch.Generator().manual_seed(3))
    b = mix.sample(10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert mix.sample(0).shape == (0, 2)


def test_mixture_errors():
    with pytest.raises(ValueError, match="'ring8'.*'grid25'"):
        mixture2d("swissroll")
    with pytest.raises(ValueError, match="shape"):
        Mixture2D(torch.zeros(3, 3), 0.1, "bad")
    with pytest.raises(ValueError, match="std"):
        Mixture2D(torch.zeros(3, 2), 0.0, "bad")
    with pytest.raises(ValueError, match="n must be >= 0, got -1"):
        mixture2d("ring8").sample(-1)
    for bad in (2.0, True, "3"):
        with pytest.raises(TypeError, match="n must be an int"):
            mixture2d("ring8").sample(bad)


# ------------------------------------------------------------------ BatchSampler


def _take(it, k):
    return [next(it) for _ in range(k)]


def test_sampler_covers_each_index_once_per_epoch():
    s = BatchSampler(10, 3, seed=0)  # drop_last -> 3 batches/epoch, 1 index dropped
    assert len(s) == 3
    s2 = BatchSampler(12, 4, seed=5)
    for epoch in range(3):
        batches = _take(s2, 3)
        assert all(b.dtype == torch.int64 and b.shape == (4,) for b in batches)
        assert sorted(torch.cat(batches).tolist()) == list(range(12))
        assert s2.epoch == epoch
    batches = _take(s, 3)
    flat = torch.cat(batches).tolist()
    assert len(set(flat)) == 9 and all(0 <= i < 10 for i in flat)


def test_sampler_no_drop_last_partial_batch():
    s = BatchSampler(10, 4, seed=1, drop_last=False)
    assert len(s) == 3
    b = _take(s, 3)
    assert [len(x) for x in b] == [4, 4, 2]
    assert sorted(torch.cat(b).tolist()) == list(range(10))
    assert len(next(s)) == 4 and s.epoch == 1


def test_sampler_permutations_differ_across_epochs_and_seeds():
    s = BatchSampler(50, 50, seed=0)
    perms = [next(s).tolist() for _ in range(4)]
    assert len({tuple(p) for p in perms}) == 4
    other = BatchSampler(50, 50, seed=1)
    assert next(other).tolist() != perms[0]
    # deterministic across instances
    assert next(BatchSampler(50, 50, seed=0)).tolist() == perms[0]


def test_sampler_permutation_is_numpy_pcg64():
    """Permutations come from NumPy's PCG64 seeded by [seed, epoch], not torch's RNG."""
    s = BatchSampler(20, 20, seed=7)
    for epoch in range(3):
        expected = np.random.Generator(np.random.PCG64([7, epoch])).permutation(20)
        perm = s.permutation(epoch)
        assert perm.dtype == torch.int64
        assert perm.tolist() == expected.tolist()
        assert next(s).tolist() == expected.tolist()
    # negative seeds are taken mod 2**64
    assert torch.equal(BatchSampler(5, 5, seed=-1).permutation(0),
                       BatchSampler(5, 5, seed=2**64 - 1).permutation(0))


@pytest.mark.parametrize("consumed", [0, 1, 2, 3, 5, 7])
@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_resume(consumed, drop_last):
    a = BatchSampler(17, 5, seed=42, drop_last=drop_last)
    _take(a, consumed)
    state = a.state_dict()
    assert all(isinstance(v, int) for v in state.values())
    expected = _take(a, 8)
    b = BatchSampler(17, 5, seed=42, drop_last=drop_last)
    next(b)  # some other position, must be overwritten
    b.load_state_dict(state)
    got = _take(b, 8)
    assert all(torch.equal(x, y) for x, y in zip(expected, got))


def test_sampler_state_mismatch_and_validation():
    s = BatchSampler(10, 2, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        s.load_state_dict(BatchSampler(10, 5, seed=0).state_dict())
    with pytest.raises(ValueError, match="seed"):
        s.load_state_dict(BatchSampler(10, 2, seed=1).state_dict())
    with pytest.raises(ValueError, match="missing"):
        s.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="batch_size"):
        BatchSampler(10, 0)
    with pytest.raises(ValueError, match="batch_size"):
        BatchSampler(10, 11)
    BatchSampler(10, 11, drop_last=False)
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        BatchSampler(0, 1)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        BatchSampler(10, 2.0)
    with pytest.raises(TypeError, match="n must be an int"):
        BatchSampler(True, 1)
    with pytest.raises(TypeError, match="seed must be an int"):
        BatchSampler(10, 2, seed=None)
    with pytest.raises(TypeError, match="drop_last must be a bool"):
        BatchSampler(10, 2, drop_last=1)
    with pytest.raises(TypeError, match="epoch must be an int"):
        s.load_state_dict({"epoch": 1.0, "position": 0})
    with pytest.raises(ValueError, match="position must be <= n"):
        s.load_state_dict({"epoch": 0, "position": 11})
    assert iter(s) is s
