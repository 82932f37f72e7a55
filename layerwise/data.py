"""Datasets: finding the files, decoding them, caching them, and streaming batches.

Everything here works on whole in-memory tensors. The built-in datasets are small enough
(MNIST and Fashion-MNIST 47 MB, CIFAR-10 180 MB as uint8) that a ``DataLoader`` with worker
processes and PIL would only add overhead: a batch is an index slice of one tensor.

The files are read in their official formats by our own readers (IDX for MNIST-style data,
the CIFAR-10 *binary* version), so no download code and no numpy are needed. The decoded
tensors are cached as a ``.pt`` file under the writable data root, which makes every load
after the first one a single ``torch.load``.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from layerwise.errors import DataError

SPLITS = ("train", "test")

# Read-only places that may already hold the datasets, searched after the writable root.
# A relative path is resolved against the current working directory at search time.
# Tests replace this list to make sure nothing is found.
MIRROR_DIRS: list[Path] = [
    Path("..") / "shared" / "data",
    Path(__file__).resolve().parents[1] / ".." / "shared" / "data",
    Path("/usr/share/datasets"),
]

DATA_ENV_VAR = "LAYERWISE_DATA"
DEFAULT_DATA_ROOT = Path("~") / ".cache" / "layerwise" / "data"

Loader = Callable[[str, list[Path]], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class DatasetSpec:
    """What the trainer needs to know about a dataset, plus how to load it.

    ``loader(split, search_dirs)`` returns ``(images, labels)``: uint8 images of shape
    ``(N, C, H, W)`` and int64 labels of shape ``(N,)``. ``split`` is ``"train"`` or
    ``"test"``. When the files are not found it raises :class:`DataError` naming the missing
    files and where to put them.
    """

    name: str
    shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    mean: tuple[float, ...]  # per channel, in [0, 1] pixel space
    std: tuple[float, ...]
    loader: Loader
    files_hint: str = ""  # optional human text about the files needed


# --------------------------------------------------------------------------- where data lives


def data_roots(data_root: str | Path | None) -> list[Path]:
    """The folders to search for datasets, the writable one first.

    The first entry is ``data_root`` if given, else ``$LAYERWISE_DATA``, else
    ``~/.cache/layerwise/data``; it is returned even if it does not exist yet, since the
    cache is written there. Then come the read-only mirrors of :data:`MIRROR_DIRS` that
    exist (``../shared/data`` from the working directory and from the repository, and
    ``/usr/share/datasets``), without duplicates.
    """
    if data_root:
        writable = Path(data_root)
    elif os.environ.get(DATA_ENV_VAR):
        writable = Path(os.environ[DATA_ENV_VAR])
    else:
        writable = DEFAULT_DATA_ROOT
    roots = [writable.expanduser().resolve()]
    for mirror in MIRROR_DIRS:
        path = mirror.expanduser().resolve()
        if path.is_dir() and path not in roots:
            roots.append(path)
    return roots


def find_folder(search_dirs: list[Path], folders: tuple[str, ...], files: list[str]) -> Path | None:
    """The first ``root/folder`` that holds every one of ``files`` (each plain or ``.gz``).

    Roots are tried in order, and within a root the folder names in order, so a copy in the
    writable root wins over a mirror.
    """
    for root in search_dirs:
        for folder in folders:
            candidate = root / folder
            if all(_existing_file(candidate, name) for name in files):
                return candidate
    return None


def _existing_file(folder: Path, name: str) -> Path | None:
    """``folder/name`` or ``folder/name.gz``, whichever exists (the plain file first)."""
    for path in (folder / name, folder / f"{name}.gz"):
        if path.is_file():
            return path
    return None


def missing_data_error(
    dataset: str,
    split: str,
    files: list[str],
    search_dirs: list[Path],
    folders: tuple[str, ...],
    extra_hint: str = "",
) -> DataError:
    """A :class:`DataError` listing the files needed, the folders searched and how to fix it.

    The first line is the error on its own (what is missing), since that is the line a user
    reads and a log keeps; the folders searched and the ways to fix it follow.
    """
    searched = "\n".join(f"  {root / folder}" for root in search_dirs for folder in folders)
    message = (
        f"dataset '{dataset}' ({split} split) not found: no data folder has {', '.join(files)} "
        f"(gzipped or not)\nSearched, in order:\n{searched}\n"
        f"Put them in {search_dirs[0] / folders[0]}, or in ${DATA_ENV_VAR}/{folders[0]}, "
        f"or in DIR/{folders[0]} and pass --data-root DIR."
    )
    if extra_hint:
        message += f"\n{extra_hint}"
    return DataError(message)


# --------------------------------------------------------------------------- file readers


def _read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when the name ends in ``.gz``."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read {path}: {exc}; delete it and fetch it again") from exc


def read_idx(path: Path) -> torch.Tensor:
    """Decode an IDX file of unsigned bytes (MNIST's format), gzipped or not.

    The header is two zero bytes, a type code (0x08 for uint8), the number of dimensions,
    then each dimension as a big-endian uint32; the values follow in row-major order.
    """
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number); fetch it again")
    type_code, ndim = data[2], data[3]
    if type_code != 0x08:
        raise DataError(f"{path}: IDX type code {type_code:#04x} is not supported, only 0x08 (uint8)")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DataError(f"{path} is truncated (incomplete IDX header); fetch it again")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header_size + math.prod(dims)
    if len(data) != expected:
        raise DataError(
            f"{path} has {len(data)} bytes but its IDX header {dims} implies {expected}; "
            "the file is corrupt, fetch it again"
        )
    if expected == header_size:  # no values: frombuffer refuses an empty buffer, and load_split says "no samples"
        return torch.empty(dims, dtype=torch.uint8)
    # bytearray: torch.frombuffer wants a writable buffer; the tensor keeps it alive.
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=header_size).reshape(dims)


CIFAR_RECORD_BYTES = 1 + 3 * 32 * 32


def read_cifar_batches(paths: list[Path], num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode CIFAR-10 binary batch files: records of 1 label byte then 3072 CHW pixel bytes.

    Each file's labels are checked to be below ``num_classes``, so that a bad byte is reported
    with the file it is in.
    """
    images, labels = [], []
    for path in paths:
        data = _read_bytes(path)
        if len(data) == 0 or len(data) % CIFAR_RECORD_BYTES:
            raise DataError(
                f"{path} has {len(data)} bytes, not a whole number of {CIFAR_RECORD_BYTES}-byte "
                "CIFAR-10 records; the file is corrupt, fetch it again"
            )
        records = torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(-1, CIFAR_RECORD_BYTES)
        labels.append(records[:, 0].long())
        check_samples(labels[-1], num_classes, "cifar10", "", str(path))
        images.append(records[:, 1:].reshape(-1, 3, 32, 32))
    return torch.cat(images), torch.cat(labels)


# --------------------------------------------------------------------------- built-in loaders


IDX_FILES = {
    "train": ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"],
    "test": ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"],
}

CIFAR_FILES = {
    "train": [f"data_batch_{i}.bin" for i in range(1, 6)],
    "test": ["test_batch.bin"],
}

# Folder names tried under each data root, in order (ours first, then torchvision's).
MNIST_FOLDERS = ("mnist", "MNIST/raw")
FASHION_MNIST_FOLDERS = ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw")
CIFAR10_FOLDERS = ("cifar10/cifar-10-batches-bin", "cifar-10-batches-bin", "cifar10")


def _load_idx_dataset(
    name: str, folders: tuple[str, ...], num_classes: int, split: str, search_dirs: list[Path]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loader for MNIST-style datasets: one IDX image file and one IDX label file per split."""
    files = IDX_FILES[split]
    folder = find_folder(search_dirs, folders, files)
    if folder is None:
        all_files = [f"{f}.gz" for s in SPLITS for f in IDX_FILES[s]]
        hint = f"The dataset is the 4 files {', '.join(all_files)}."
        raise missing_data_error(name, split, [f"{f}.gz" for f in files], search_dirs, folders, hint)
    image_path, label_path = (_existing_file(folder, f) for f in files)
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
        raise DataError(
            f"{folder}: images {tuple(images.shape)} and labels {tuple(labels.shape)} do not "
            "match (expected (N, H, W) and (N,)); fetch the files again"
        )
    labels = labels.long()
    # Checked here as well as in load_split, because only the loader knows which file is wrong.
    check_samples(labels, num_classes, name, split, str(label_path))
    return images.unsqueeze(1), labels


def _load_cifar10(split: str, search_dirs: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Loader for the CIFAR-10 binary version (``cifar-10-batches-bin``)."""
    files = CIFAR_FILES[split]
    folders = CIFAR10_FOLDERS
    folder = find_folder(search_dirs, folders, files)
    if folder is None:
        hint = (
            "The files come from the official 'CIFAR-10 binary version' (cifar-10-binary.tar.gz); "
            "offline, rebuild them with ../shared/data/cifar10/fetch DEST, which writes "
            f"DEST/cifar-10-batches-bin (e.g. DEST=${DATA_ENV_VAR}/cifar10)."
        )
        raise missing_data_error("cifar10", split, files, search_dirs, folders, hint)
    return read_cifar_batches([_existing_file(folder, f) for f in files])


def builtin_datasets() -> list[DatasetSpec]:
    """The datasets layerwise ships: mnist, fashion_mnist and cifar10."""
    idx_files = [f"{f}.gz" for split in SPLITS for f in IDX_FILES[split]]
    idx_hint = f"the 4 IDX files {', '.join(idx_files)}"
    return [
        DatasetSpec(
            name="mnist",
            shape=(1, 28, 28),
            num_classes=10,
            mean=(0.1307,),
            std=(0.3081,),
            loader=functools.partial(_load_idx_dataset, "mnist", MNIST_FOLDERS, 10),
            files_hint=f"{idx_hint} in a folder {' or '.join(MNIST_FOLDERS)}",
        ),
        DatasetSpec(
            name="fashion_mnist",
            shape=(1, 28, 28),
            num_classes=10,
            mean=(0.2860,),
            std=(0.3530,),
            loader=functools.partial(_load_idx_dataset, "fashion_mnist", FASHION_MNIST_FOLDERS, 10),
            files_hint=f"{idx_hint} in a folder {' or '.join(FASHION_MNIST_FOLDERS)}",
        ),
        DatasetSpec(
            name="cifar10",
            shape=(3, 32, 32),
            num_classes=10,
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2470, 0.2435, 0.2616),
            loader=_load_cifar10,
            files_hint=(
                "the CIFAR-10 binary version, data_batch_1..5.bin and test_batch.bin, in a folder "
                f"{' or '.join(CIFAR10_FOLDERS)}"
            ),
        ),
    ]


# --------------------------------------------------------------------------- loading + cache


def load_split(
    spec: DatasetSpec, split: str, data_root: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded ``(uint8 images (N, C, H, W), int64 labels (N,))`` of one split.

    A cache ``<writable root>/cache/<name>-<split>.pt`` is read when present; otherwise the
    dataset's loader decodes the files and the cache is written for next time (atomically, so
    a concurrent run never reads half a file; silently skipped where the root is read-only).
    """
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}' for dataset '{spec.name}'; use one of {', '.join(SPLITS)}")
    roots = data_roots(data_root)
    cache_path = roots[0] / "cache" / f"{spec.name}-{split}.pt"
    remove_stale_cache_temporaries(cache_path.parent)
    cached = _read_cache(cache_path, spec)
    if cached is not None:
        return cached
    images, labels = spec.loader(split, roots)
    _check_loaded(spec, split, images, labels)
    _write_cache(cache_path, images, labels)
    return images, labels


def check_samples(labels: torch.Tensor, num_classes: int, dataset: str, split: str, source: str) -> None:
    """Raise :class:`DataError` naming ``source`` unless there are samples and every label is a class.

    Without this, a label out of range fails deep inside the first batch's cross-entropy (or,
    on a GPU, as a device-side assert), and an empty test set evaluates to an accuracy of 0.
    """
    what = f"dataset '{dataset}'" + (f" ({split} split)" if split else "")
    if len(labels) == 0:
        raise DataError(f"{source}: {what} has no samples; expected at least one. The file is empty or "
                        "truncated; fetch it again")
    outside = (labels < 0) | (labels >= num_classes)
    if bool(outside.any()):
        index = int(outside.nonzero()[0, 0])
        raise DataError(
            f"{source}: {what} has {int(outside.sum())} label(s) outside 0..{num_classes - 1} "
            f"(the first: {int(labels[index])} at sample {index}); expected one of its {num_classes} "
            "classes. The file is corrupt or belongs to another dataset; fetch it again"
        )


def _check_loaded(spec: DatasetSpec, split: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Refuse loader output that the rest of layerwise would misread (mainly for plugin loaders).

    Built-in loaders check the labels themselves, naming the file; this check covers every
    loader, a plugin's included, which can only be named by its dataset.
    """
    expected = (len(images), *spec.shape)
    if (
        images.dtype != torch.uint8
        or tuple(images.shape) != expected
        or labels.dtype != torch.int64
        or tuple(labels.shape) != (len(images),)
    ):
        raise DataError(
            f"dataset '{spec.name}' ({split}): its loader returned images {images.dtype} "
            f"{tuple(images.shape)} and labels {labels.dtype} {tuple(labels.shape)}, expected uint8 "
            f"(N, {', '.join(map(str, spec.shape))}) and int64 (N,); fix the dataset's loader"
        )
    check_samples(labels, spec.num_classes, spec.name, split, f"the labels from {loader_name(spec.loader)}")


def loader_name(loader: Loader) -> str:
    """A loader as its author knows it, ``module.function``, to name it in errors."""
    function = getattr(loader, "func", loader)  # functools.partial
    module, name = getattr(function, "__module__", None), getattr(function, "__qualname__", None)
    return f"loader {module}.{name}" if module and name else f"loader {function!r}"


def _read_cache(path: Path, spec: DatasetSpec) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached split, or None if there is no usable cache (missing, corrupt or stale)."""
    if not path.is_file():
        return None
    try:
        content = torch.load(path, weights_only=True)
        images, labels = content["images"], content["labels"]
    except Exception:  # a corrupt cache is rebuilt, never fatal
        return None
    if (
        not isinstance(images, torch.Tensor)
        or not isinstance(labels, torch.Tensor)
        or images.dtype != torch.uint8
        or tuple(images.shape[1:]) != spec.shape
        or labels.dtype != torch.int64
        or tuple(labels.shape) != (len(images),)
    ):
        return None
    try:
        check_samples(labels, spec.num_classes, spec.name, "", str(path))
    except DataError:
        # Only ever written from checked data, so the file was damaged or replaced since:
        # rebuilding it from the dataset's files (checked again) is the fix.
        return None
    return images, labels


# A temporary cache file untouched for this long belongs to a write that was killed. The wait
# spares a write still running in another process (a concurrent run, another rank): its file's
# modification time moves while it writes, and a whole split is written in well under this.
STALE_TEMPORARY_SECONDS = 600


def remove_stale_cache_temporaries(folder: Path) -> None:
    """Delete the ``.<name>.*.tmp`` files that :func:`_write_cache` calls killed half-way left in ``folder``.

    A SIGKILL or a power cut during a write cannot be caught, and each such file is as large
    as the split (29 MB for MNIST's train split), so they are cleaned up at the next load.
    """
    now = time.time()
    for path in folder.glob(".*.tmp"):
        try:
            if now - path.stat().st_mtime > STALE_TEMPORARY_SECONDS:
                path.unlink()
        except OSError:  # gone meanwhile, or a read-only root: nothing to do
            pass


def _write_cache(path: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Save the split next to a temporary name, then rename it into place; skip on any OS error."""
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save({"images": images.contiguous(), "labels": labels.contiguous()}, f)
        os.chmod(tmp_name, 0o644)  # mkstemp makes it private; a shared data root needs it readable
        os.replace(tmp_name, path)
    except BaseException as exc:  # Ctrl-C included: never leave a half-written temporary behind
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)
        if not isinstance(exc, OSError):
            raise


# --------------------------------------------------------------------------- noise

_MASK32 = 0xFFFFFFFF
# Rows of a noise call processed at once: bounds the int64 temporaries to a few tens of MB.
_NOISE_CHUNK_ELEMENTS = 1 << 21


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32 variant) of values in [0, 2^32), in int64 (or Python ints).

    Both multipliers are below 2^31, so every product stays below 2^63: the int64 arithmetic
    never overflows and gives the same bits on every device.
    """
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def _sample_keys(seed_key: torch.Tensor | int, indices: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per sample (int64 ``indices``, any value) under the scalar ``seed_key``."""
    sample_key = _hash32(seed_key ^ (indices & _MASK32))
    return _hash32(sample_key ^ ((indices >> 32) & _MASK32))  # indices beyond 2^32 too


NOISE_SPACES = ("pixel", "normalized")


def check_noise_space(space: str) -> None:
    """Raise :class:`DataError` unless ``space`` is ``pixel`` or ``normalized``."""
    if space not in NOISE_SPACES:
        raise DataError(f"noise space {space!r} is unknown; use pixel (added in [0, 1] pixel space, then clipped, "
                        f"before normalisation) or normalized (added after normalisation, not clipped)")


def check_noise_sigma(sigma: float) -> None:
    """Raise :class:`DataError` unless ``0 <= sigma <= 1`` (noise is in [0, 1] pixel units)."""
    if not 0.0 <= sigma <= 1.0:  # also refuses NaN
        raise DataError(
            f"noise sigma {sigma} is out of range: it is a standard deviation in [0, 1] pixel "
            "units, so use a value from 0 (no noise) to 1"
        )


def gaussian_noise(
    shape: tuple[int, ...], indices: torch.Tensor, seed: int, device: torch.device
) -> torch.Tensor:
    """Standard normal noise of ``shape`` (B, ...) where row b depends only on (seed, indices[b]).

    Counter-based, so no generator state is involved: each value is a hash of
    (seed, sample index, pixel position) mapped to a uniform in (0, 1), then through the
    inverse normal CDF. The pixel positions are hashed before they are combined with the
    sample key so that two samples never get shifted copies of the same pattern.
    """
    per_sample = math.prod(shape[1:])
    indices = indices.to(device=device, dtype=torch.int64)
    seed_key = _hash32(torch.tensor(seed & _MASK32, dtype=torch.int64, device=device))
    sample_key = _sample_keys(seed_key, indices)
    pixels = torch.arange(per_sample, dtype=torch.int64, device=device)
    pixel_key = _hash32((pixels + 0x9E3779B9) & _MASK32)

    noise = torch.empty(len(indices), per_sample, dtype=torch.float32, device=device)
    rows = max(1, _NOISE_CHUNK_ELEMENTS // max(per_sample, 1))
    for start in range(0, len(indices), rows):
        bits = _hash32(sample_key[start : start + rows, None] ^ pixel_key[None, :])
        # 23 bits + 1/2 is exact in float32 and strictly inside (0, 1): ndtri stays finite.
        uniform = ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))
        noise[start : start + rows] = torch.special.ndtri(uniform)
    return noise.reshape(shape)


def add_gaussian_noise(
    images01: torch.Tensor, sigma: float, indices: torch.Tensor, seed: int
) -> torch.Tensor:
    """``images01`` (float, (B, C, H, W), in [0, 1]) plus N(0, sigma^2) noise, clipped to [0, 1].

    The noise of a sample depends only on ``(seed, indices[b])``: a noisy test set is the same
    in every run, whatever the batch size or order. ``sigma == 0`` returns the input itself.
    """
    noisy = with_noise(images01, sigma, indices, seed)
    return noisy if noisy is images01 else noisy.clamp_(0.0, 1.0)


def add_normalized_noise(
    images: torch.Tensor, sigma: float, indices: torch.Tensor, seed: int
) -> torch.Tensor:
    """``images`` (normalised, (B, C, H, W)) plus ``sigma`` times the same per-sample noise as
    :func:`add_gaussian_noise`, not clipped: the authors' published notebook adds
    ``std * randn`` after ``Normalize``, so ``sigma`` is in units of the dataset's std.

    ``sigma == 0`` returns the input itself.
    """
    return with_noise(images, sigma, indices, seed)


def with_noise(images: torch.Tensor, sigma: float, indices: torch.Tensor, seed: int) -> torch.Tensor:
    """``images + sigma * noise`` with each sample's noise seeded by ``(seed, indices[b])``, as a
    new tensor; ``images`` itself when ``sigma == 0``."""
    check_noise_sigma(sigma)
    if sigma == 0:
        return images
    if len(indices) != len(images):
        raise ValueError(f"{len(indices)} indices for a batch of {len(images)} images")
    noise = gaussian_noise(tuple(images.shape), indices, seed, images.device)
    return images + sigma * noise.to(images.dtype)


# --------------------------------------------------------------------------- augmentation

# Keeps the augmentation's draws apart from the noise's, which hash the same seed and indices.
_AUGMENT_SALT = 0x5A17C0DE


def check_augment(crop_padding: int, flip: bool, shape: tuple[int, ...]) -> None:
    """Raise :class:`DataError` unless ``0 <= crop_padding < min(H, W)`` of ``shape`` (C, H, W)."""
    if isinstance(crop_padding, bool) or not isinstance(crop_padding, int):
        raise DataError(f"augment crop_padding: expected an integer, found {crop_padding!r}")
    if not isinstance(flip, bool):
        raise DataError(f"augment flip: expected true or false, found {flip!r}")
    smallest = min(shape[-2:])
    if not 0 <= crop_padding < smallest:
        raise DataError(f"augment crop_padding {crop_padding} is out of range: expected 0 (off) to {smallest - 1}, "
                        f"less than the images' {shape[-2]}x{shape[-1]} pixels")


def augment_draws(
    indices: torch.Tensor, seed: int, epoch: int, crop_padding: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each sample's ``(dy, dx, flip)``: crop offsets in ``[0, 2 * crop_padding]`` (int64) and a
    horizontal-flip bit (bool), all ``(B,)``.

    Counter-based like the noise: sample b's draws depend only on (seed, epoch, indices[b]), so
    they are the same whatever the batch size, the order, or the share of a data-parallel rank.
    """
    device = torch.device(device)
    indices = indices.to(device=device, dtype=torch.int64)
    # The scalar key in Python integers (_hash32 works on them too): no host-to-device copy per batch.
    key = _hash32(_AUGMENT_SALT)
    for value in (seed, epoch):  # both halves of each, so seeds beyond 2^32 differ too
        for half in (value & _MASK32, (value >> 32) & _MASK32):
            key = _hash32(key ^ half)
    sample_key = _sample_keys(key, indices)
    # Three independent 32-bit draws per sample: row offset, column offset, flip.
    bits = _hash32(sample_key[:, None] ^ _hash32(torch.arange(1, 4, dtype=torch.int64, device=device)))
    span = 2 * crop_padding + 1  # the modulo's bias is below span / 2^32
    return bits[:, 0] % span, bits[:, 1] % span, (bits[:, 2] >> 31).bool()


def augment_images(
    images: torch.Tensor, indices: torch.Tensor, seed: int, epoch: int, *, crop_padding: int = 0,
    flip: bool = False,
) -> torch.Tensor:
    """Random crops of ``images`` (float, (B, C, H, W), before normalisation) padded with zeros
    by ``crop_padding`` on each side, and with ``flip`` random horizontal flips: one gather on
    the images' device, no loop over samples.

    Sample b is the window at offset ``(dy, dx)`` of :func:`augment_draws` in the padded image,
    mirrored left-right when its flip bit is set. Both off returns the input itself.
    """
    if not crop_padding and not flip:
        return images
    if len(indices) != len(images):
        raise ValueError(f"{len(indices)} indices for a batch of {len(images)} images")
    check_augment(crop_padding, flip, tuple(images.shape[1:]))
    batch, channels, height, width = images.shape
    device = images.device
    dy, dx, flipped = augment_draws(indices, seed, epoch, crop_padding, device)
    if not flip:
        flipped = torch.zeros_like(flipped)
    padded = torch.nn.functional.pad(images, (crop_padding,) * 4) if crop_padding else images
    rows = dy[:, None] + torch.arange(height, device=device)  # (B, H)
    columns = torch.arange(width, device=device)
    columns = dx[:, None] + torch.where(flipped[:, None], width - 1 - columns, columns)  # (B, W)
    samples = torch.arange(batch, device=device)[:, None, None, None]
    planes = torch.arange(channels, device=device)[None, :, None, None]
    return padded[samples, planes, rows[:, None, :, None], columns[:, None, None, :]]


# --------------------------------------------------------------------------- batches


class BatchStream:
    """Iterates a whole in-memory dataset in batches by index slicing (no DataLoader, no PIL).

    Each item is ``(x, y, idx)``: ``x`` float32 normalised images ``(B, C, H, W)`` and ``y``
    int64 labels ``(B,)``, both on ``device``, and ``idx`` the int64 dataset indices ``(B,)``
    of the batch, on the CPU (for bookkeeping without a device sync).

    The order of epoch ``e`` comes from a generator seeded with ``seed + e`` (see
    :meth:`set_epoch`), so it is reproducible and a resumed run continues identically.
    Noise, if any, is seeded with ``noise_seed + e`` when shuffling (training: fresh noise
    each epoch) and ``noise_seed`` otherwise (evaluation: the same noisy set every time).
    ``noise_space`` says where it is added: ``pixel`` (in [0, 1] before normalisation, then
    clipped) or ``normalized`` (after normalisation, not clipped); see :func:`add_normalized_noise`.

    ``crop_padding`` and ``flip`` augment the images (see :func:`augment_images`), before any
    noise and normalisation, drawn per sample from ``(seed, e, index)``: a training option
    (off by default), which evaluation streams leave off.

    ``shard=(rank, world)`` yields only this rank's contiguous share of each batch (the batch's
    indices split in ``world`` parts, taken before any image is decoded or noised): ranks that
    build the same stream together see exactly the batches of the unsharded stream. Equal shares
    need a ``batch_size`` divisible by ``world`` and ``drop_last`` (see :mod:`layerwise.distributed`).
    """

    def __init__(
        self,
        spec: DatasetSpec,
        images_uint8: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int,
        noise: float = 0.0,
        noise_seed: int = 0,
        device: str | torch.device = "cpu",
        drop_last: bool = False,
        shard: tuple[int, int] = (0, 1),
        noise_space: str = "pixel",
        crop_padding: int = 0,
        flip: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        rank, world = shard
        if not 0 <= rank < world:
            raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
        if images_uint8.dtype != torch.uint8 or len(images_uint8) != len(labels):
            raise ValueError(
                f"expected uint8 images and as many labels, got {images_uint8.dtype} "
                f"{tuple(images_uint8.shape)} and {tuple(labels.shape)}"
            )
        check_noise_sigma(noise)
        check_noise_space(noise_space)
        check_augment(crop_padding, flip, tuple(images_uint8.shape[1:]))
        self.spec = spec
        self.device = torch.device(device)
        # Moved once, so that a batch on a GPU is an on-device gather with no host copies.
        self.images = images_uint8.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        channels = (1, len(spec.mean), 1, 1)
        self.mean = torch.tensor(spec.mean, dtype=torch.float32, device=self.device).reshape(channels)
        self.std = torch.tensor(spec.std, dtype=torch.float32, device=self.device).reshape(channels)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.noise = noise
        self.noise_seed = noise_seed
        self.noise_space = noise_space
        self.crop_padding = crop_padding
        self.flip = flip
        self.drop_last = drop_last
        self.shard = shard
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order (and training noise) the next iteration uses."""
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def epoch_order(self) -> torch.Tensor:
        """The dataset indices in this epoch's order (CPU int64)."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        # A CPU generator: the same order whatever the device.
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = self.epoch_order()
        order_on_device = order.to(self.device)  # one copy per epoch, not per batch
        noise_seed = self.noise_seed + (self.epoch if self.shuffle else 0)
        rank, world = self.shard
        for b in range(len(self)):
            batch = slice(b * self.batch_size, (b + 1) * self.batch_size)
            idx, idx_cpu = order_on_device[batch], order[batch]
            if world > 1:
                idx, idx_cpu = idx.tensor_split(world)[rank], idx_cpu.tensor_split(world)[rank]
            x = self.images[idx].to(torch.float32).div_(255.0)
            x = augment_images(x, idx, self.seed, self.epoch, crop_padding=self.crop_padding, flip=self.flip)
            if self.noise_space == "pixel":
                x = add_gaussian_noise(x, self.noise, idx, noise_seed)
            x = x.sub_(self.mean).div_(self.std)  # x is a fresh tensor: in place is safe
            if self.noise_space == "normalized":
                x = add_normalized_noise(x, self.noise, idx, noise_seed)
            yield x, self.labels[idx], idx_cpu
