"""On-device augmentation (``data.augment``: random crop with zero padding, horizontal flip) and
the noise space (``data.noise_space``, ``eval --noise-space``).

- augmentation draws depend on (seed, epoch, sample index) alone: not on the batch size, the
  order or a data-parallel shard, so a resumed or data-parallel run sees the same images;
- crops and flips match a plain per-sample implementation (``F.pad`` and slicing);
- off by default (the very same tensors as before), never in evaluation streams;
- ``normalized`` noise is ``x_norm + std * n`` exactly, unclipped; ``pixel`` noise is unchanged;
- the recipe keys, the eval report's ``noise_space`` and the command-line option.
"""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import layerwise as lw
from layerwise import data
from layerwise.errors import DataError, LayerwiseError, RecipeError
from layerwise.factory import parse_recipe
from tests.helpers import assert_one_line_error, make_finished_run, tiny_recipe


def mnist_spec() -> data.DatasetSpec:
    return {spec.name: spec for spec in data.builtin_datasets()}["mnist"]


def fake_images(n: int, shape=(1, 8, 8), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def stream(images: torch.Tensor, **options) -> data.BatchStream:
    settings = {"batch_size": 4, "shuffle": True, "seed": 3}
    settings.update(options)
    return data.BatchStream(mnist_spec(), images, torch.arange(len(images)) % 10, **settings)


def by_index(batches: data.BatchStream, epoch: int) -> dict[int, torch.Tensor]:
    """Every sample the stream yields in ``epoch``, keyed by its dataset index."""
    batches.set_epoch(epoch)
    return {i: x for xb, _, idx in batches for i, x in zip(idx.tolist(), xb, strict=True)}


def reference(images: torch.Tensor, padding: int, dy: torch.Tensor, dx: torch.Tensor, flips: torch.Tensor):
    """The plain way: pad each image with zeros, slice the window at (dy, dx), mirror it if drawn."""
    height, width = images.shape[-2:]
    out = []
    for image, row, column, flip in zip(images, dy.tolist(), dx.tolist(), flips.tolist(), strict=True):
        window = F.pad(image, (padding,) * 4)[:, row : row + height, column : column + width]
        out.append(window.flip(-1) if flip else window)
    return torch.stack(out)


# --------------------------------------------------------------------------- the draws and the images


def test_draws_depend_on_seed_epoch_and_index_only():
    indices = torch.tensor([5, 0, 123456789012, 7])
    dy, dx, flips = data.augment_draws(indices, seed=1, epoch=2, crop_padding=4)
    again = data.augment_draws(indices.flip(0), seed=1, epoch=2, crop_padding=4)
    assert [torch.equal(a, b.flip(0)) for a, b in zip((dy, dx, flips), again, strict=True)] == [True] * 3
    alone = data.augment_draws(indices[2:3], seed=1, epoch=2, crop_padding=4)
    assert (int(alone[0]), int(alone[1]), bool(alone[2])) == (int(dy[2]), int(dx[2]), bool(flips[2]))
    many = torch.arange(4000)
    draws = data.augment_draws(many, seed=1, epoch=2, crop_padding=4)
    for other in (data.augment_draws(many, seed=1, epoch=3, crop_padding=4),
                  data.augment_draws(many, seed=2, epoch=2, crop_padding=4),
                  data.augment_draws(many, seed=1 + 2**32, epoch=2, crop_padding=4)):
        assert not torch.equal(draws[0], other[0]) and not torch.equal(draws[2], other[2])
    offsets = torch.cat(draws[:2])
    assert offsets.dtype == torch.int64 and set(offsets.unique().tolist()) == set(range(9))
    assert 0.45 < draws[2].float().mean().item() < 0.55  # about half the images flipped
    assert abs(torch.corrcoef(torch.stack(draws[:2]).float())[0, 1].item()) < 0.05  # rows and columns independent


def test_crops_and_flips_match_a_per_sample_reference():
    images = fake_images(64, shape=(3, 6, 5)).float() / 255
    indices = torch.arange(100, 164)
    for padding, flip in ((2, False), (0, True), (3, True)):
        out = data.augment_images(images, indices, 7, 1, crop_padding=padding, flip=flip)
        dy, dx, flips = data.augment_draws(indices, 7, 1, padding)
        flips = flips & flip
        assert out.shape == images.shape
        assert torch.equal(out, reference(images, padding, dy, dx, flips))


def test_a_flip_mirrors_and_a_crop_shifts():
    image = torch.arange(1, 17, dtype=torch.float32).reshape(1, 1, 4, 4)  # no symmetry, no zero
    images, indices = image.expand(40, 1, 4, 4), torch.arange(40)
    flipped = data.augment_images(images, indices, 0, 1, flip=True)
    mirrored = [torch.equal(x, image[0].flip(-1)) for x in flipped]
    kept = [torch.equal(x, image[0]) for x in flipped]
    assert all(m != k for m, k in zip(mirrored, kept, strict=True)) and any(mirrored) and any(kept)
    assert mirrored == data.augment_draws(indices, 0, 1, 0)[2].tolist()

    shifted = data.augment_images(images, indices, 0, 1, crop_padding=1)
    dy, dx, _ = data.augment_draws(indices, 0, 1, 1)
    for x, row, column in zip(shifted, dy.tolist(), dx.tolist(), strict=True):
        # offset 1 is the original place; 0 shifts the content down/right, 2 up/left, with zeros coming in
        source = image[0, 0]
        expected = torch.zeros(4, 4)
        rows, columns = slice(max(0, 1 - row), min(4, 5 - row)), slice(max(0, 1 - column), min(4, 5 - column))
        expected[rows, columns] = source[max(0, row - 1) : min(4, row + 3), max(0, column - 1) : min(4, column + 3)]
        assert torch.equal(x[0], expected)
    assert {(r, c) for r, c in zip(dy.tolist(), dx.tolist(), strict=True)} != {(1, 1)}


def test_off_returns_the_input_itself():
    images = torch.rand(3, 1, 4, 4)
    assert data.augment_images(images, torch.arange(3), 0, 1) is images


@pytest.mark.parametrize("padding, flip, message", [(-1, False, "out of range"), (8, False, "0 \\(off\\) to 7"),
                                                    (1.5, False, "integer"), (0, "yes", "true or false")])
def test_bad_augment_settings_are_data_errors(padding, flip, message):
    with pytest.raises(DataError, match=message):
        stream(fake_images(4), crop_padding=padding, flip=flip)


# --------------------------------------------------------------------------- the stream


def test_off_by_default_gives_the_same_tensors_as_before():
    images = fake_images(10)
    default, explicit = stream(images), stream(images, crop_padding=0, flip=False, noise_space="pixel")
    default.set_epoch(2), explicit.set_epoch(2)
    for (x, y, idx), (x2, y2, idx2) in zip(default, explicit, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(idx, idx2)
        assert torch.equal(x, (images[idx].float() / 255 - 0.1307) / 0.3081)


def test_stream_augmentation_is_per_sample_whatever_the_batch_size_or_shard():
    images = fake_images(24)
    options = {"crop_padding": 2, "flip": True, "noise": 0.1}
    whole = by_index(stream(images, **options), 5)
    assert sorted(whole) == list(range(24))
    smaller = by_index(stream(images, batch_size=3, **options), 5)
    assert all(torch.equal(whole[i], smaller[i]) for i in range(24))
    halves = {**by_index(stream(images, shard=(0, 2), **options), 5),
              **by_index(stream(images, shard=(1, 2), **options), 5)}
    assert sorted(halves) == list(range(24)) and all(torch.equal(whole[i], halves[i]) for i in range(24))
    assert all(torch.equal(whole[i], x) for i, x in by_index(stream(images, **options), 5).items())  # a rerun
    assert any(not torch.equal(whole[i], x) for i, x in by_index(stream(images, **options), 6).items())


def test_stream_augments_before_noise_and_normalisation():
    images = fake_images(8)
    augmented = stream(images, shuffle=False, crop_padding=3, flip=True, noise=0.2, noise_seed=4)
    augmented.set_epoch(2)
    x, _, idx = next(iter(augmented))
    expected = data.augment_images(images[idx].float() / 255, idx, 3, 2, crop_padding=3, flip=True)
    expected = (data.add_gaussian_noise(expected, 0.2, idx, 4) - 0.1307) / 0.3081
    assert torch.equal(x, expected)
    # the padding is black before normalisation: on white images, a crop off the centre brings in (0 - mean) / std
    white = stream(torch.full((8, 1, 8, 8), 255, dtype=torch.uint8), shuffle=False, batch_size=8, crop_padding=3)
    white.set_epoch(2)
    x, _, idx = next(iter(white))
    black = (torch.zeros(()) - torch.tensor(0.1307)) / torch.tensor(0.3081)
    dy, dx, _ = data.augment_draws(idx, 3, 2, 3)
    expected_black = 64 - (8 - (dy - 3).abs()) * (8 - (dx - 3).abs())
    assert torch.equal((x == black).sum(dim=(1, 2, 3)), expected_black) and expected_black.any()


# --------------------------------------------------------------------------- noise space


def test_normalized_noise_is_added_after_normalisation_without_clipping():
    images = torch.cat([torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.full((4, 1, 8, 8), 255, dtype=torch.uint8)])
    noisy = stream(images, shuffle=False, batch_size=8, noise=0.8, noise_seed=2, noise_space="normalized")
    x, _, idx = next(iter(noisy))
    clean = (images[idx].float() / 255 - 0.1307) / 0.3081
    assert torch.equal(x, clean + 0.8 * data.gaussian_noise(tuple(x.shape), idx, 2, x.device))
    assert x.min() < -0.1307 / 0.3081 and x.max() > (1 - 0.1307) / 0.3081  # beyond what [0, 1] pixels give
    assert torch.equal(data.add_normalized_noise(clean, 0.0, idx, 2), clean)


def test_pixel_noise_is_unchanged():
    images = fake_images(8)
    pixel = stream(images, shuffle=False, noise=0.3, noise_seed=2, noise_space="pixel")
    x, _, idx = next(iter(pixel))
    expected = (data.add_gaussian_noise(images[idx].float() / 255, 0.3, idx, 2) - 0.1307) / 0.3081
    assert torch.equal(x, expected)
    x_default, _, _ = next(iter(stream(images, shuffle=False, noise=0.3, noise_seed=2)))
    assert torch.equal(x, x_default)


def test_an_unknown_noise_space_is_a_data_error():
    with pytest.raises(DataError, match="noise space 'clipped' is unknown; use pixel"):
        stream(fake_images(4), noise_space="clipped")


# --------------------------------------------------------------------------- recipe and training


def test_recipe_keys_default_off_and_are_validated():
    recipe = parse_recipe(tiny_recipe(), "tiny")
    assert recipe.to_dict()["data"]["augment"] == {"crop_padding": 0, "flip": False}
    assert recipe.data.noise_space == "pixel"
    ok = parse_recipe(tiny_recipe(augment={"crop_padding": 4, "flip": True}, noise_space="normalized"), "tiny")
    assert (ok.data.augment.crop_padding, ok.data.augment.flip, ok.data.noise_space) == (4, True, "normalized")
    with pytest.raises(RecipeError) as bad:
        parse_recipe(tiny_recipe(augment={"crop_padding": -1, "flip": "yes", "rotate": 1}, noise_space="raw"), "tiny")
    problems = "\n".join(bad.value.problems)
    assert "data.augment.crop_padding: expected a value >= 0, found -1" in problems
    assert "data.augment.flip: expected true or false" in problems
    assert "data.augment.rotate: unknown key" in problems
    assert "data.noise_space: expected one of 'pixel', 'normalized', found 'raw'" in problems
    with pytest.raises(RecipeError, match=r"data\.augment\.crop_padding: expected a value below 28, the size of "
                                          r"'mnist' images \(28x28\), found 28"):
        parse_recipe(tiny_recipe(augment={"crop_padding": 28}), "tiny")
    overridden = parse_recipe(tiny_recipe(), "tiny", ["data.augment.crop_padding=2", "data.noise_space=normalized"])
    assert overridden.data.augment.crop_padding == 2 and overridden.data.noise_space == "normalized"


def write_fake_mnist(root: Path, n_train: int = 40, n_test: int = 20) -> Path:
    """A fake MNIST under ``root/mnist`` (IDX, gzipped); returns ``root``."""
    folder = root / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = fake_images(n, shape=(28, 28), seed=n), torch.arange(n, dtype=torch.uint8) % 10
        for name, values in zip(data.IDX_FILES[split], (images, labels), strict=True):
            header = bytes([0, 0, 0x08, values.dim()]) + b"".join(struct.pack(">I", d) for d in values.shape)
            with gzip.open(folder / f"{name}.gz", "wb") as f:
                f.write(header + bytes(values.flatten().tolist()))
    return root


@pytest.fixture
def fake_root(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MIRROR_DIRS", [])
    return write_fake_mnist(tmp_path / "data")


def test_prepare_augments_the_training_stream_only(fake_root):
    from layerwise.train_run import prepare

    recipe = parse_recipe(tiny_recipe(batch_size=8, validation=10, train_noise=0.1, noise_space="normalized",
                                      augment={"crop_padding": 4, "flip": True}), "tiny")
    session = prepare(recipe, fake_root)
    train = session.train_stream
    assert (train.crop_padding, train.flip, train.noise_space) == (4, True, "normalized")
    for evaluation in (session.test_stream, session.val_stream):
        assert (evaluation.crop_padding, evaluation.flip, evaluation.noise_space) == (0, False, "normalized")


# --------------------------------------------------------------------------- eval, the CLI and the API


@pytest.mark.parametrize("space, report_name", [("pixel", "noise-latest.json"),
                                                 ("normalized", "noise-normalized-latest.json")])
def test_eval_records_the_noise_space(fake_root, tmp_path, cli, space, report_name):
    run = make_finished_run(tmp_path / "run")
    result = cli("eval", str(run), "--noise", "0.5", "--noise-space", space, "--data-root", str(fake_root),
                 "--device", "cpu", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert (report["noise_space"], report["train_noise_space"]) == (space, "pixel")
    assert [row["noise"] for row in report["results"]] == [0.0, 0.5]
    assert json.loads((run / "eval" / report_name).read_text()) == report
    other = "noise-normalized-latest.json" if space == "pixel" else "noise-latest.json"
    assert not (run / "eval" / other).exists()  # the spaces are never mixed
    (row,) = json.loads(cli("compare", str(run), "--json").out)  # and compare shows each in its own place
    accuracies = {f"{r['noise']:g}": r["acc"] for r in report["results"]}
    fields = {"pixel": "noise", "normalized": "noise_normalized"}
    assert row["runs"][0][fields[space]] == accuracies and row["runs"][0][f"{fields[space]}_epoch"] == 1
    other_field = fields["normalized" if space == "pixel" else "pixel"]
    assert row["runs"][0][other_field] == {} and set(row[other_field]) == set()


def test_eval_table_names_the_space(fake_root, tmp_path, cli):
    run = make_finished_run(tmp_path / "run")
    result = cli("eval", str(run), "--noise", "0.5", "--noise-space", "normalized", "--data-root", str(fake_root),
                 "--device", "cpu", "--no-progress")
    assert result.code == 0, result.err
    assert "test noise std (normalized)" in result.out


def test_a_bad_noise_space_option_is_one_line(cli, tmp_path):
    assert_one_line_error(cli("eval", str(tmp_path), "--noise-space", "pixels"),
                          "--noise-space: expected pixel or normalized, found 'pixels'")


def test_api_evaluate_takes_the_noise_space(fake_root, tmp_path):
    run = make_finished_run(tmp_path / "run")
    pixel = lw.evaluate(run, "mnist", noise=[0.8], data_root=fake_root)
    normalized = lw.evaluate(run, "mnist", noise=[0.8], noise_space="normalized", data_root=fake_root)
    assert list(pixel) == list(normalized) == [0.0, 0.8] and pixel[0.0] == normalized[0.0]
    with pytest.raises(LayerwiseError, match="noise space 'both' is unknown"):
        lw.evaluate(run, "mnist", noise=[0.8], noise_space="both", data_root=fake_root)


def test_api_batches_take_augment_and_noise_space(fake_root):
    batches = lw.batches("mnist", batch_size=8, seed=2, noise=0.1, noise_space="normalized",
                         augment={"crop_padding": 2, "flip": True}, data_root=fake_root)
    assert (batches.stream.crop_padding, batches.stream.flip, batches.stream.noise_space) == (2, True, "normalized")
    first = [x for x, _ in batches]
    images, labels = data.load_split(mnist_spec(), "train", fake_root)
    same = data.BatchStream(mnist_spec(), images, labels, batch_size=8, shuffle=True, seed=2, noise=0.1,
                            noise_seed=2, noise_space="normalized", crop_padding=2, flip=True)
    same.set_epoch(1)  # lw.batches numbers epochs from 1, as layerwise train does
    assert all(torch.equal(a, b) for a, (b, _, _) in zip(first, same, strict=True))
    assert lw.batches("mnist", data_root=fake_root).stream.crop_padding == 0
    with pytest.raises(RecipeError, match=r"^batches: augment\.crop_padding: expected a value >= 0, found -1$"):
        lw.batches("mnist", augment={"crop_padding": -1}, data_root=fake_root)
    with pytest.raises(DataError, match="out of range"):
        lw.batches("mnist", augment={"crop_padding": 28}, data_root=fake_root)


# --------------------------------------------------------------------------- the device


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_augmentation_and_noise_on_the_gpu_match_the_cpu():
    images = fake_images(64, shape=(3, 32, 32))
    options = {"crop_padding": 4, "flip": True, "noise": 0.3, "noise_seed": 1}
    for space in ("pixel", "normalized"):
        on_cpu = stream(images, noise_space=space, **options)
        on_gpu = stream(images, noise_space=space, device="cuda", **options)
        on_cpu.set_epoch(3), on_gpu.set_epoch(3)
        for (x, _, idx), (x_gpu, _, idx_gpu) in zip(on_cpu, on_gpu, strict=True):
            assert x_gpu.device.type == "cuda" and torch.equal(idx, idx_gpu)
            # the draws are integer hashes, identical on both devices; ndtri may differ in the last bit
            torch.testing.assert_close(x_gpu.cpu(), x, rtol=0, atol=1e-5)
    indices = torch.arange(1000)
    cpu_draws = data.augment_draws(indices, 5, 2, 4)
    gpu_draws = data.augment_draws(indices, 5, 2, 4, "cuda")
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu_draws, gpu_draws, strict=True))
