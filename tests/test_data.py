"""Tests for layerwise.data: file readers, data search, cache, noise and batch streaming."""

from __future__ import annotations

import dataclasses
import gzip
import struct
from pathlib import Path

import pytest
import torch

from layerwise import data
from layerwise.errors import DataError
from tests.helpers import SHARED_DATA


def spec_named(name: str) -> data.DatasetSpec:
    return {spec.name: spec for spec in data.builtin_datasets()}[name]


def write_idx(path: Path, values: torch.Tensor) -> None:
    """Write uint8 ``values`` as an IDX file (gzipped when the name ends in .gz)."""
    header = bytes([0, 0, 0x08, values.dim()]) + b"".join(struct.pack(">I", d) for d in values.shape)
    content = header + bytes(values.flatten().tolist())
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(content)


def write_mnist_like(folder: Path, n_train: int = 6, n_test: int = 4) -> dict:
    """A tiny fake MNIST in ``folder``; returns the tensors written per split."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, 10, (n,), dtype=torch.uint8, generator=generator)
        image_file, label_file = data.IDX_FILES[split]
        write_idx(folder / f"{image_file}.gz", images)
        write_idx(folder / f"{label_file}.gz", labels)
        written[split] = (images.unsqueeze(1), labels.long())
    return written


@pytest.fixture
def no_mirrors(monkeypatch):
    """Search only the data root the test gives, never the real mirrors."""
    monkeypatch.setattr(data, "MIRROR_DIRS", [])
    monkeypatch.delenv(data.DATA_ENV_VAR, raising=False)


# --------------------------------------------------------------------------- readers


@pytest.mark.parametrize("name", ["values.idx.gz", "values.idx"])
def test_idx_round_trip(tmp_path, name):
    values = torch.arange(2 * 3 * 5, dtype=torch.uint8).reshape(2, 3, 5)
    write_idx(tmp_path / name, values)
    decoded = data.read_idx(tmp_path / name)
    assert decoded.dtype == torch.uint8
    assert torch.equal(decoded, values)


def test_idx_truncated_file_is_a_data_error(tmp_path):
    path = tmp_path / "short.idx"
    path.write_bytes(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 10) + bytes(3))
    with pytest.raises(DataError, match="corrupt"):
        data.read_idx(path)


def test_cifar_reader_on_three_records(tmp_path):
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = [7, 0, 9]
    records = b"".join(
        bytes([label]) + bytes(image.flatten().tolist()) for label, image in zip(labels, images, strict=True)
    )
    (tmp_path / "test_batch.bin").write_bytes(records)
    decoded_images, decoded_labels = data.read_cifar_batches([tmp_path / "test_batch.bin"])
    assert torch.equal(decoded_images, images)
    assert decoded_labels.dtype == torch.int64
    assert decoded_labels.tolist() == labels


def test_cifar_loader_finds_batches_under_the_data_root(tmp_path, no_mirrors):
    folder = tmp_path / "cifar10" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    (folder / "test_batch.bin").write_bytes(bytes([4]) + bytes(3072) + bytes([2]) + bytes(range(256)) * 12)
    images, labels = data.load_split(spec_named("cifar10"), "test", tmp_path)
    assert images.shape == (2, 3, 32, 32)
    assert labels.tolist() == [4, 2]


# --------------------------------------------------------------------------- search and errors


def test_data_roots_order(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    monkeypatch.setattr(data, "MIRROR_DIRS", [mirror, tmp_path / "absent", mirror])
    monkeypatch.setenv(data.DATA_ENV_VAR, str(tmp_path / "env"))
    assert data.data_roots(tmp_path / "arg") == [tmp_path / "arg", mirror]
    assert data.data_roots(None) == [tmp_path / "env", mirror]
    monkeypatch.delenv(data.DATA_ENV_VAR)
    assert data.data_roots(None)[0] == Path.home() / ".cache" / "layerwise" / "data"


def test_missing_dataset_names_files_and_folders(tmp_path, no_mirrors):
    with pytest.raises(DataError) as info:
        data.load_split(spec_named("mnist"), "train", tmp_path)
    message = str(info.value)
    assert "train-images-idx3-ubyte.gz" in message
    assert "train-labels-idx1-ubyte.gz" in message
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "$LAYERWISE_DATA/mnist" in message and "--data-root" in message


def test_missing_cifar_mentions_fetch(tmp_path, no_mirrors):
    with pytest.raises(DataError, match="test_batch.bin") as info:
        data.load_split(spec_named("cifar10"), "test", tmp_path)
    assert "cifar10/fetch" in str(info.value)


def test_unknown_split(tmp_path, no_mirrors):
    with pytest.raises(DataError, match="train, test"):
        data.load_split(spec_named("mnist"), "validation", tmp_path)


def test_loader_finds_torchvision_layout(tmp_path, no_mirrors):
    written = write_mnist_like(tmp_path / "MNIST" / "raw")
    images, labels = data.load_split(spec_named("mnist"), "test", tmp_path)
    assert torch.equal(images, written["test"][0])
    assert torch.equal(labels, written["test"][1])


# --------------------------------------------------------------------------- cache


def test_second_load_reads_the_cache(tmp_path, no_mirrors):
    written = write_mnist_like(tmp_path / "mnist")
    calls = []

    def loader_once(split, dirs):
        if calls:
            raise AssertionError("the loader ran twice: the cache was not used")
        calls.append(split)
        return spec_named("mnist").loader(split, dirs)

    spec = dataclasses.replace(spec_named("mnist"), loader=loader_once)
    first = data.load_split(spec, "train", tmp_path)
    assert (tmp_path / "cache" / "mnist-train.pt").is_file()
    second = data.load_split(spec, "train", tmp_path)
    for got in (first, second):
        assert torch.equal(got[0], written["train"][0]) and torch.equal(got[1], written["train"][1])
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")]


def test_corrupt_cache_is_rebuilt(tmp_path, no_mirrors):
    written = write_mnist_like(tmp_path / "mnist")
    cache = tmp_path / "cache" / "mnist-test.pt"
    cache.parent.mkdir()
    cache.write_bytes(b"not a torch file")
    images, _ = data.load_split(spec_named("mnist"), "test", tmp_path)
    assert torch.equal(images, written["test"][0])


def test_unwritable_root_skips_the_cache(tmp_path, no_mirrors, monkeypatch):
    write_mnist_like(tmp_path / "mnist")

    def refuse(*args, **kwargs):
        raise PermissionError("read-only")

    monkeypatch.setattr(data.tempfile, "mkstemp", refuse)
    images, _ = data.load_split(spec_named("mnist"), "test", tmp_path)
    assert images.shape == (4, 1, 28, 28)
    assert not (tmp_path / "cache" / "mnist-test.pt").exists()


# --------------------------------------------------------------------------- noise


def grey(n: int, shape=(1, 8, 8)) -> torch.Tensor:
    return torch.full((n, *shape), 0.5)


def test_noise_is_deterministic_per_seed_and_index():
    indices = torch.tensor([3, 17, 42])
    a = data.add_gaussian_noise(grey(3), 0.1, indices, seed=5)
    b = data.add_gaussian_noise(grey(3), 0.1, indices, seed=5)
    assert torch.equal(a, b)
    assert not torch.equal(a, data.add_gaussian_noise(grey(3), 0.1, indices, seed=6))


def test_noise_differs_between_indices():
    noisy = data.add_gaussian_noise(grey(2), 0.1, torch.tensor([0, 1]), seed=0)
    assert not torch.equal(noisy[0], noisy[1])


def test_noise_is_independent_of_batch_split_and_order():
    indices = torch.arange(10)
    whole = data.add_gaussian_noise(grey(10), 0.2, indices, seed=1)
    halves = torch.cat(
        [
            data.add_gaussian_noise(grey(5), 0.2, indices[:5], seed=1),
            data.add_gaussian_noise(grey(5), 0.2, indices[5:], seed=1),
        ]
    )
    assert torch.equal(whole, halves)
    reversed_batch = data.add_gaussian_noise(grey(10), 0.2, indices.flip(0), seed=1)
    assert torch.equal(reversed_batch.flip(0), whole)


def test_noise_statistics_on_mid_grey():
    sigma = 0.1  # small enough that clipping at 0 and 1 (5 sigma away) does not matter
    noisy = data.add_gaussian_noise(grey(200, (1, 28, 28)), sigma, torch.arange(200), seed=0)
    deviation = noisy - 0.5
    assert abs(deviation.mean().item()) < 0.002
    assert deviation.std().item() == pytest.approx(sigma, rel=0.02)


def test_noise_is_clipped():
    images = torch.cat([torch.zeros(4, 1, 8, 8), torch.ones(4, 1, 8, 8)])
    noisy = data.add_gaussian_noise(images, 1.0, torch.arange(8), seed=0)
    assert noisy.min().item() == 0.0 and noisy.max().item() == 1.0
    assert not torch.equal(noisy, images)


def test_zero_sigma_is_identity():
    images = torch.rand(3, 1, 4, 4)
    assert data.add_gaussian_noise(images, 0.0, torch.arange(3), seed=0) is images


@pytest.mark.parametrize("sigma", [-1.0, 1.5, float("nan")])
def test_bad_sigma_is_a_data_error(sigma):
    with pytest.raises(DataError, match="sigma"):
        data.add_gaussian_noise(grey(1), sigma, torch.arange(1), seed=0)


# --------------------------------------------------------------------------- BatchStream


def tiny_stream(n=10, **kwargs) -> data.BatchStream:
    images = torch.arange(n, dtype=torch.uint8).reshape(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    labels = torch.arange(n) % 10
    options = dict(batch_size=4, shuffle=True, seed=0)
    options.update(kwargs)
    return data.BatchStream(spec_named("mnist"), images, labels, **options)


def epoch_indices(stream: data.BatchStream, epoch: int) -> list[int]:
    stream.set_epoch(epoch)
    return [i for _, _, idx in stream for i in idx.tolist()]


def test_stream_covers_every_sample_once_per_epoch():
    stream = tiny_stream()
    assert len(stream) == 3
    batches = list(stream)
    assert [len(y) for _, y, _ in batches] == [4, 4, 2]
    assert sorted(epoch_indices(stream, 0)) == list(range(10))
    for x, y, idx in batches:
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 2, 2)
        assert y.dtype == torch.int64 and idx.dtype == torch.int64
        assert torch.equal(y, idx % 10)  # labels travel with their images


def test_stream_drop_last():
    stream = tiny_stream(drop_last=True)
    assert len(stream) == 2
    assert len(epoch_indices(stream, 0)) == 8


def test_stream_order_reproducible_and_changes_by_epoch():
    first, again = tiny_stream(n=50), tiny_stream(n=50)
    assert epoch_indices(first, 3) == epoch_indices(again, 3)
    assert epoch_indices(first, 3) != epoch_indices(first, 4)
    assert epoch_indices(tiny_stream(n=50, shuffle=False), 7) == list(range(50))


def test_stream_normalises():
    stream = tiny_stream(shuffle=False)
    x, _, idx = next(iter(stream))
    expected = (idx.float() / 255 - 0.1307) / 0.3081
    assert torch.allclose(x[:, 0, 0, 0], expected)


def test_stream_noise_fixed_for_eval_and_fresh_for_training():
    def pixels(stream, epoch):
        stream.set_epoch(epoch)
        return torch.cat([x for x, _, _ in stream])

    evaluation = tiny_stream(shuffle=False, noise=0.2, noise_seed=9)
    assert torch.equal(pixels(evaluation, 0), pixels(evaluation, 1))
    smaller_batches = tiny_stream(shuffle=False, noise=0.2, noise_seed=9, batch_size=3)
    assert torch.equal(pixels(evaluation, 0), pixels(smaller_batches, 0))

    training = tiny_stream(noise=0.2, noise_seed=9)

    def by_index(epoch):
        training.set_epoch(epoch)
        rows = {i: x for xb, _, idx in training for i, x in zip(idx.tolist(), xb, strict=True)}
        return torch.stack([rows[i] for i in range(10)])

    assert not torch.equal(by_index(0), by_index(1))


# --------------------------------------------------------------------------- real data


@pytest.mark.integration
def test_real_mnist(tmp_path, monkeypatch):
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"no MNIST at {SHARED_DATA / 'mnist'}")
    monkeypatch.setattr(data, "MIRROR_DIRS", [SHARED_DATA])
    spec = spec_named("mnist")
    for split, n in (("train", 60000), ("test", 10000)):
        images, labels = data.load_split(spec, split, tmp_path)
        assert images.shape == (n, 1, 28, 28) and images.dtype == torch.uint8
        assert labels.shape == (n,) and set(labels.unique().tolist()) == set(range(10))
