"""The data layer of the training runner: in-memory data sets, batch augmentation, and a loader.

Design
------
* **Everything in memory, as uint8 tensors.** Every supported data set is small enough (Fashion-MNIST,
  MNIST, CIFAR-10/100, small image folders, synthetic data) to be held as one ``N×C×H×W`` uint8 tensor plus
  an ``N`` int64 label tensor (:class:`ArrayDataset`). uint8 keeps memory and host→device copies 4× smaller
  than float32; conversion to float happens per batch.
* **Augment whole batches, not single images.** With two CPU cores a per-image Python transform pipeline
  (PIL → crop → flip → tensor) starves the model. :class:`BatchAugment` does the random crop (zero padding,
  then per-sample offsets gathered with one vectorized index) and the random horizontal flip (one
  ``torch.where``) for the whole batch at once, then normalizes. AutoAugment is the exception: it is applied
  per image, because torchvision draws one policy per call; it is optional.
* **Randomness is a pure function of seeds.** Subsets and validation splits depend only on ``seed``;
  :class:`BatchLoader` draws each epoch's permutation from ``(seed, epoch)`` and each epoch's augmentation
  from ``(seed, epoch, rank)``, so a run resumed at an epoch boundary sees exactly the batches an
  uninterrupted run would. Augmentation draws its random numbers from an explicit ``torch.Generator``,
  never from the global RNG (AutoAugment, which only knows the global RNG, runs inside a forked RNG state
  seeded from that generator).
* **No silent substitution.** An unknown data set name is an error, and a data set that cannot be found
  raises :class:`DatasetNotFoundError` that lists every place searched and how to get the data; the runner
  never falls back to another (or synthetic) data set.

Data sets
---------
``"fashion-mnist"`` (the default) and ``"mnist"`` are read from the four IDX files (plain or ``.gz``) by a
small reader of our own (:func:`read_idx`). Fashion-MNIST is searched in ``data_dir`` when one is given
(and nowhere else), otherwise in ``$NORMSAM_DATA``, then ``/usr/share/datasets/fashion-mnist`` (Debian's
``dataset-fashion-mnist``); in each
root the files may sit directly in the root, in ``root/fashion-mnist/`` or in torchvision's layout
``root/FashionMNIST/raw/``. MNIST is searched the same way (``root/mnist/``, ``root/MNIST/raw/``) but has no
system path. With ``download=True`` and nothing found, torchvision downloads the files into
``data_dir`` (or ``./data``); calling again with ``download=True`` reuses them without downloading.

``"cifar10"``/``"cifar100"`` use torchvision's pickled format (``root/cifar-10-batches-py``,
``root/cifar-100-python``), which torchvision md5-checks on every load.

``"imagefolder"`` reads ``data_dir/train/<class>/*`` and ``data_dir/val/<class>/*`` (or ``test/``) with
torchvision's ``ImageFolder``, resizing each image (shorter side, then centre crop) to ``image_size``
(default 64). It decodes every image into memory up front, so it is meant for small folders (ImageNet
subsets such as Imagenette at low resolution). Full ImageNet needs a streaming loader, which normsam does
not have yet.

``"synthetic"`` is deterministic, learnable, class-conditional data for tests and benchmarks: one smooth
random prototype image per class plus per-sample noise.

Augmentation presets
--------------------
``"none"`` (normalize only; also the evaluation path), ``"crop"``, ``"crop-flip"``, ``"autoaugment"``
(crop-flip + AutoAugment with the CIFAR-10 policy). Horizontal flips suit clothes (Fashion-MNIST) and
natural images (CIFAR, ImageNet) but are wrong for digits: a mirrored 2, 3, 4, 5, 7 or 9 is not that digit,
so do not use ``"crop-flip"`` or ``"autoaugment"`` with MNIST (:func:`make_augment` warns).
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "AUGMENTS",
    "DATA_ENV_VAR",
    "DEBIAN_FASHION_MNIST_DIR",
    "SYSTEM_SEARCH_DIRS",
    "DatasetNotFoundError",
    "CorruptDataError",
    "ArrayDataset",
    "DataSplits",
    "AugmentParams",
    "Normalize",
    "BatchAugment",
    "BatchLoader",
    "load_data",
    "read_idx",
    "make_augment",
    "stratified_subset_indices",
    "flip_labels",
    "stratified_split_indices",
]

PathLike = Union[str, os.PathLike]

#: Names accepted by :func:`load_data`.
DATASETS: tuple[str, ...] = ("fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder", "synthetic")

#: Names accepted by :func:`make_augment`.
AUGMENTS: tuple[str, ...] = ("none", "crop", "crop-flip", "autoaugment")

#: Environment variable naming a data root, searched after ``data_dir``.
DATA_ENV_VAR = "NORMSAM_DATA"

#: Where Debian's ``dataset-fashion-mnist`` package installs the (gzipped) IDX files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

#: System-wide roots searched last, per IDX data set. Module-level so that tests can monkeypatch it.
SYSTEM_SEARCH_DIRS: dict[str, tuple[Path, ...]] = {
    "fashion-mnist": (DEBIAN_FASHION_MNIST_DIR,),
    "mnist": (),
}

# Published per-channel statistics of the training images (pixel values scaled to [0, 1]).
_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

_IDX_INFO = {
    # name: (pretty name, sub-folders tried in each root, torchvision class name, class names)
    "fashion-mnist": (
        "Fashion-MNIST",
        ("", "fashion-mnist", "FashionMNIST/raw"),
        "FashionMNIST",
        ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
    ),
    "mnist": ("MNIST", ("", "mnist", "MNIST/raw"), "MNIST", [str(d) for d in range(10)]),
}

# IDX type codes -> big-endian numpy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DatasetNotFoundError(FileNotFoundError):
    """A data set's files were not found; the message lists where we looked and how to get them."""


class CorruptDataError(ValueError):
    """A data file exists but is not what it should be (bad magic number, truncated, wrong shape)."""


# --------------------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """Images and labels held in memory: ``images`` uint8 ``N×C×H×W``, ``labels`` int64 ``N``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                "ArrayDataset.images must be a uint8 tensor of shape N×C×H×W, got "
                f"{_describe(self.images)}; convert with (x * 255).round().clamp(0, 255).to(torch.uint8)."
            )
        if not isinstance(self.labels, torch.Tensor) or self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(
                f"ArrayDataset.labels must be an int64 tensor of shape N, got {_describe(self.labels)}; "
                "convert with labels.long()."
            )
        if len(self.images) != len(self.labels):
            raise ValueError(
                f"ArrayDataset has {len(self.images)} images but {len(self.labels)} labels; they must match."
            )

    def __len__(self) -> int:
        return int(self.labels.numel())

    def take(self, indices: torch.Tensor) -> ArrayDataset:
        """A new data set made of the examples at ``indices`` (in that order)."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        return ArrayDataset(self.images[indices], self.labels[indices])


@dataclass
class DataSplits:
    """The splits of one data set plus what a model and the augmentation need to know about it."""

    train: ArrayDataset
    val: ArrayDataset | None
    test: ArrayDataset
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    classes: list[str] = field(default_factory=list)
    #: Where the data came from (a folder, or "synthetic"); for logs.
    source: str = ""
    #: Label noise: positions in ``train`` whose label was replaced, and their original labels.
    noisy_indices: torch.Tensor | None = None
    clean_labels: torch.Tensor | None = None


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


# --------------------------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------------------------------------


def read_idx(path: PathLike) -> torch.Tensor:
    """Read one IDX file (plain, or gzip-compressed when the name ends in ``.gz``) into a tensor.

    The IDX format is a 4-byte magic number (two zero bytes, a type code, the number of dimensions), one
    big-endian int32 per dimension, then the values in C order. Raises :class:`CorruptDataError` when the
    header or the length does not add up.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise CorruptDataError(
            f"cannot read IDX file {path}: {exc}. The file is damaged or not gzip data; delete it and "
            "download or reinstall the data set."
        ) from exc

    if len(raw) < 4:
        raise CorruptDataError(f"IDX file {path} is only {len(raw)} bytes long; it is truncated or empty.")
    zero1, zero2, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero1 != 0 or zero2 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise CorruptDataError(
            f"{path} is not an IDX file: magic number {raw[:4].hex()} (expected 0000 + a type code in "
            f"{sorted(hex(c) for c in _IDX_DTYPES)} + the number of dimensions, e.g. 00000803 for images)."
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CorruptDataError(f"IDX file {path} is truncated inside its header ({len(raw)} bytes).")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - header != expected:
        raise CorruptDataError(
            f"IDX file {path} declares shape {dims} of {dtype.name} ({expected} bytes of data) but holds "
            f"{len(raw) - header} bytes; the file is truncated or damaged."
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    # Native byte order and a writable copy (torch does not take read-only or big-endian buffers).
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def _find_idx_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _idx_candidates(name: str, data_dir: PathLike | None) -> list[tuple[Path, str]]:
    """Folders to search, in order, each with a note saying why it is searched.

    An explicit ``data_dir`` is the only root searched: data found elsewhere would be a silent substitute
    for what was asked for (and the run's config.yaml would record the wrong place).
    """
    _, subdirs, _, _ = _IDX_INFO[name]
    roots: list[tuple[Path, str]] = []
    if data_dir is not None:
        roots.append((Path(data_dir).expanduser(), "data_dir"))
    else:
        env = os.environ.get(DATA_ENV_VAR)
        if env:
            roots.append((Path(env).expanduser(), f"${DATA_ENV_VAR}"))
        for root in SYSTEM_SEARCH_DIRS.get(name, ()):
            roots.append((Path(root), "system"))
    out: list[tuple[Path, str]] = []
    for root, why in roots:
        for sub in subdirs:
            out.append((root / sub if sub else root, why))
    return out


def _read_idx_split(folder: Path, pretty: str) -> tuple[ArrayDataset, ArrayDataset]:
    files = {key: _find_idx_file(folder, stem) for key, stem in _IDX_FILES.items()}
    assert all(files.values())
    splits = []
    for part in ("train", "test"):
        images = read_idx(files[f"{part}_images"])  # type: ignore[arg-type]
        labels = read_idx(files[f"{part}_labels"])  # type: ignore[arg-type]
        if images.dim() != 3 or images.dtype != torch.uint8:
            raise CorruptDataError(
                f"{files[f'{part}_images']} should hold uint8 images N×H×W, got {_describe(images)}."
            )
        if labels.dim() != 1 or len(labels) != len(images):
            raise CorruptDataError(
                f"{files[f'{part}_labels']} should hold {len(images)} labels (one per image in "
                f"{files[f'{part}_images']}), got {_describe(labels)}."
            )
        labels = labels.long()
        if len(labels) and (labels.min() < 0 or labels.max() > 9):
            raise CorruptDataError(
                f"{files[f'{part}_labels']} holds labels outside 0..9 (min {int(labels.min())}, max "
                f"{int(labels.max())}); this is not {pretty}."
            )
        splits.append(ArrayDataset(images.unsqueeze(1).contiguous(), labels))
    return splits[0], splits[1]


def _load_idx_dataset(
    name: str, data_dir: PathLike | None, download: bool
) -> tuple[ArrayDataset, ArrayDataset, str]:
    pretty, _, tv_class, _ = _IDX_INFO[name]
    candidates = _idx_candidates(name, data_dir)
    partial: list[str] = []
    for folder, _ in candidates:
        found = {stem: _find_idx_file(folder, stem) for stem in _IDX_FILES.values()}
        if all(found.values()):
            train, test = _read_idx_split(folder, pretty)
            return train, test, str(folder)
        if any(found.values()):
            missing = [stem for stem, path in found.items() if path is None]
            partial.append(f"{folder} has some of the files but lacks {', '.join(missing)}")

    if download:
        import torchvision.datasets as tvd

        root = Path(data_dir).expanduser() if data_dir is not None else Path("data")
        try:
            getattr(tvd, tv_class)(root=str(root), train=True, download=True)
        except Exception as exc:  # network errors come in many types
            raise DatasetNotFoundError(
                f"downloading {pretty} with torchvision into {root} failed: {exc}. Check the network "
                f"connection, or put the four IDX files into {root} by hand."
            ) from exc
        folder = root / tv_class / "raw"
        if all(_find_idx_file(folder, stem) for stem in _IDX_FILES.values()):
            train, test = _read_idx_split(folder, pretty)
            return train, test, str(folder)
        raise DatasetNotFoundError(
            f"torchvision reported a successful {pretty} download, but the IDX files are not in {folder}."
        )

    raise DatasetNotFoundError(_idx_not_found_message(name, candidates, partial))


def _idx_not_found_message(name: str, candidates: list[tuple[Path, str]], partial: list[str]) -> str:
    pretty, _, tv_class, _ = _IDX_INFO[name]
    files = ", ".join(_IDX_FILES.values())
    lines = [f"{pretty} not found. Looked for {files} (each plain or .gz) in:"]
    if candidates:
        lines += [f"  - {folder}  ({why}{'' if folder.is_dir() else ', does not exist'})" for folder, why in candidates]
    else:
        lines.append("  - nowhere: no data_dir was given and no search path applies")
    explicit = any(why == "data_dir" for _, why in candidates)
    if explicit:
        lines.append(f"  (an explicit data_dir is the only place searched; ${DATA_ENV_VAR} and system copies are "
                     "not used in its place)")
    elif os.environ.get(DATA_ENV_VAR) is None:
        lines.append(f"  (${DATA_ENV_VAR} is not set)")
    if name == "mnist":
        lines.append("  (MNIST has no Debian system path in normsam's search order; only data_dir and "
                     f"${DATA_ENV_VAR} are searched)")
    lines += [f"  note: {p}" for p in partial]
    target = "data_dir" if any(why == "data_dir" for _, why in candidates) else "./data"
    lines.append("To get the data, either:")
    if name == "fashion-mnist":
        lines.append(
            f"  - Debian/Ubuntu, as root: apt-get install dataset-fashion-mnist  (installs to "
            f"{DEBIAN_FASHION_MNIST_DIR}, which is searched automatically), or"
        )
    lines.append(
        f"  - set download=true in the data config (load_data(..., download=True)) to download it with "
        f"torchvision into {target}/{tv_class}/raw, or"
    )
    lines.append(f"  - point data_dir or ${DATA_ENV_VAR} at a folder that holds the four files"
                 + (", or leave data_dir unset to search the default places." if explicit else "."))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# CIFAR, image folders, synthetic data
# --------------------------------------------------------------------------------------------------------


def _load_cifar(
    name: str, data_dir: PathLike | None, download: bool
) -> tuple[ArrayDataset, ArrayDataset, list[str], str]:
    import torchvision.datasets as tvd

    cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    roots: list[Path] = []
    env = os.environ.get(DATA_ENV_VAR)
    if data_dir is not None:  # an explicit data_dir is the only place searched (no silent substitute)
        roots.append(Path(data_dir).expanduser())
    elif env:
        roots.append(Path(env).expanduser())
    existing = [r for r in roots if (r / cls.base_folder).is_dir()]
    if existing:
        root = existing[0]
    elif download:
        root = roots[0] if data_dir is not None else Path("data")
    else:
        searched = "\n".join(f"  - {r / cls.base_folder}" for r in roots) or "  - nowhere: no data_dir given"
        env_note = "" if env or data_dir is not None else f" (${DATA_ENV_VAR} is not set)"
        raise DatasetNotFoundError(
            f"{name} not found. Looked for torchvision's '{cls.base_folder}' folder in:\n{searched}{env_note}\n"
            f"To get it, set download=true in the data config (load_data(..., download=True)) to download it "
            f"with torchvision into {roots[0] if data_dir is not None else './data'}, or point data_dir or "
            f"${DATA_ENV_VAR} at the folder that contains '{cls.base_folder}'."
        )

    parts = []
    for train in (True, False):
        try:
            ds = cls(root=str(root), train=train, download=download)
        except RuntimeError as exc:
            raise DatasetNotFoundError(
                f"{name} in {root / cls.base_folder} is incomplete or fails torchvision's md5 check ({exc}). "
                "Delete that folder and set download=true to download it again."
            ) from exc
        images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
        parts.append(ArrayDataset(images, torch.as_tensor(ds.targets, dtype=torch.long)))
    return parts[0], parts[1], list(ds.classes), str(root / cls.base_folder)


def _load_imagefolder(
    data_dir: PathLike | None, image_size: int
) -> tuple[ArrayDataset, ArrayDataset, list[str], str]:
    import torchvision.datasets as tvd
    from torchvision import transforms as T

    if data_dir is None:
        data_dir = os.environ.get(DATA_ENV_VAR)
    if data_dir is None:
        raise DatasetNotFoundError(
            "imagefolder needs data_dir (or $NORMSAM_DATA): a folder with train/<class>/*.jpg and "
            "val/<class>/*.jpg (or test/<class>/...)."
        )
    root = Path(data_dir).expanduser()
    train_dir = root / "train"
    eval_dir = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    if not train_dir.is_dir() or eval_dir is None:
        raise DatasetNotFoundError(
            f"imagefolder expects {train_dir}/<class>/<image> and {root / 'val'}/<class>/<image> (or "
            f"{root / 'test'}/...); found train/: {train_dir.is_dir()}, val/ or test/: {eval_dir is not None}."
        )
    transform = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.PILToTensor()])
    parts = []
    classes: list[str] = []
    for folder in (train_dir, eval_dir):
        try:
            ds = tvd.ImageFolder(str(folder), transform=transform)
        except FileNotFoundError as exc:
            raise DatasetNotFoundError(
                f"imagefolder: {folder} has no usable class folders or images ({exc}). Each class needs its "
                f"own sub-folder holding files ending in one of {', '.join(_IMAGE_EXTENSIONS)}."
            ) from exc
        if classes and ds.classes != classes:
            raise ValueError(
                f"imagefolder: the class folders of {folder} ({ds.classes}) differ from those of {train_dir} "
                f"({classes}); both splits need the same class sub-folders so that labels agree."
            )
        classes = list(ds.classes)
        images = torch.stack([ds[i][0] for i in range(len(ds))])
        labels = torch.as_tensor(ds.targets, dtype=torch.long)
        parts.append(ArrayDataset(images.contiguous(), labels))
    return parts[0], parts[1], classes, str(root)


def _make_synthetic(
    sizes: tuple[int, int], seed: int, image_size: int, num_classes: int = 10, channels: int = 3
) -> tuple[ArrayDataset, ArrayDataset]:
    """Class prototypes (smooth random patterns) plus per-sample Gaussian noise, deterministic from ``seed``.

    The prototypes are 4×4 random patterns upsampled to ``image_size``: low-frequency, so that random crops
    and flips keep the class recognisable, while the noise keeps the task from being trivial.
    """
    gen = torch.Generator().manual_seed(_derive_seed(seed, 0x5EED))
    coarse = torch.rand(num_classes, channels, 4, 4, generator=gen)
    prototypes = torch.nn.functional.interpolate(coarse, size=(image_size, image_size), mode="bilinear",
                                                 align_corners=False)
    prototypes = 40.0 + 175.0 * prototypes  # leave head-room for the noise
    parts = []
    for n in sizes:
        labels = torch.arange(n) % num_classes
        labels = labels[torch.randperm(n, generator=gen)]
        noise = 40.0 * torch.randn(n, channels, image_size, image_size, generator=gen)
        images = (prototypes[labels] + noise).round().clamp(0, 255).to(torch.uint8)
        parts.append(ArrayDataset(images, labels.long()))
    return parts[0], parts[1]


def _channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1], computed in chunks (float64)."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    count = 0
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].to(torch.float64) / 255.0
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
        count += x.numel() // c
    if count == 0:
        raise ValueError("cannot compute mean/std of an empty training set")
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant images: avoid dividing by zero
    return tuple(round(float(m), 4) for m in mean), tuple(round(float(s), 4) for s in std)


# --------------------------------------------------------------------------------------------------------
# Stratified subsets and splits
# --------------------------------------------------------------------------------------------------------


def _derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on all of ``parts`` (so different streams do not collide)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(_derive_seed(*parts))


def _shuffled_indices_by_class(labels: torch.Tensor, num_classes: int, gen: torch.Generator) -> list[torch.Tensor]:
    out = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c, as_tuple=True)[0]
        out.append(idx[torch.randperm(len(idx), generator=gen)])
    return out


def stratified_subset_indices(labels: torch.Tensor, n: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """Indices (sorted) of ``n`` examples, ``n // num_classes`` per class, chosen at random from ``seed``.

    The remainder ``n % num_classes`` goes one each to the lowest class indices. If a class has fewer
    examples than its share, its shortfall is handed to the other classes in class order.
    """
    total = len(labels)
    if n > total:
        raise ValueError(f"subset={n} is larger than the training set ({total} examples); use subset <= {total}.")
    if n < num_classes:
        raise ValueError(
            f"subset={n} is smaller than the number of classes ({num_classes}); a stratified subset needs at "
            f"least one example per class, so use subset >= {num_classes}."
        )
    by_class = _shuffled_indices_by_class(labels, num_classes, _generator(seed, 1))
    available = [len(idx) for idx in by_class]
    quota = [n // num_classes + (1 if c < n % num_classes else 0) for c in range(num_classes)]
    quota = [min(q, a) for q, a in zip(quota, available)]
    short = n - sum(quota)
    while short > 0:  # terminates: n <= total guarantees spare capacity
        for c in range(num_classes):
            if short and quota[c] < available[c]:
                quota[c] += 1
                short -= 1
    chosen = torch.cat([idx[:q] for idx, q in zip(by_class, quota)])
    return chosen.sort().values


def flip_labels(
    labels: torch.Tensor, fraction: float, num_classes: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric label noise: ``round(fraction · n)`` labels, chosen at random from ``seed``, each replaced by a
    uniformly drawn *other* class. Returns ``(noisy_labels, flipped_indices)`` (indices sorted)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"label_noise must be in [0, 1), got {fraction}; e.g. label_noise=0.4 flips 40%.")
    if num_classes < 2:
        raise ValueError("label_noise needs at least 2 classes: a label can only be flipped to another class.")
    gen = _generator(seed, 3)
    k = int(round(fraction * len(labels)))
    flipped = torch.randperm(len(labels), generator=gen)[:k].sort().values
    # An offset in 1..K-1 added modulo K is a uniform draw over the K-1 other classes.
    offsets = torch.randint(1, num_classes, (k,), generator=gen)
    noisy = labels.clone()
    noisy[flipped] = (labels[flipped] + offsets) % num_classes
    return noisy, flipped


def stratified_split_indices(
    labels: torch.Tensor, fraction: float, num_classes: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split into ``(train_indices, val_indices)`` (both sorted), taking ``round(fraction * n_c)`` of every
    class ``c`` for validation (at most ``n_c - 1``, so every class keeps a training example)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_split must be in [0, 1), got {fraction}; e.g. val_split=0.1 holds out 10%.")
    by_class = _shuffled_indices_by_class(labels, num_classes, _generator(seed, 2))
    val_parts, train_parts = [], []
    for idx in by_class:
        k = min(int(round(fraction * len(idx))), max(len(idx) - 1, 0))
        val_parts.append(idx[:k])
        train_parts.append(idx[k:])
    val = torch.cat(val_parts).sort().values
    train = torch.cat(train_parts).sort().values
    if fraction > 0 and len(val) == 0:
        raise ValueError(
            f"val_split={fraction} of {len(labels)} training examples rounds to an empty validation set; "
            "use a larger val_split or more data."
        )
    return train, val


# --------------------------------------------------------------------------------------------------------
# load_data
# --------------------------------------------------------------------------------------------------------


def _canonical_name(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def load_data(
    name: str = "fashion-mnist",
    *,
    data_dir: PathLike | None = None,
    download: bool = False,
    subset: int | None = None,
    val_split: float = 0.0,
    label_noise: float = 0.0,
    seed: int = 0,
    synthetic_size: tuple[int, int] = (2048, 512),
    image_size: int | None = None,
) -> DataSplits:
    """Load data set ``name`` (one of :data:`DATASETS`) into memory and split it.

    Args:
        name: the data set; see the module docstring for where each one is looked for.
        data_dir: the first folder searched (and, with ``download``, where torchvision downloads to).
        download: download with torchvision when the data is not found (not for imagefolder/synthetic).
        subset: keep a stratified random subset of this many training examples (before ``val_split``).
        val_split: fraction of the (subsetted) training set held out, stratified, as ``val``.
        label_noise: fraction of the *training* labels (after ``subset`` and ``val_split``) replaced by a
            uniformly drawn other class, chosen from ``seed``; ``val`` and ``test`` keep their true labels
            (under symmetric noise a noisy validation set ranks models the same in expectation, only with
            more variance). The flipped positions are in ``DataSplits.noisy_indices``.
        seed: seeds the subset, the validation split, the label noise and the synthetic data.
        synthetic_size: ``(n_train, n_test)`` for ``"synthetic"``.
        image_size: side length for ``"imagefolder"`` (default 64) and ``"synthetic"`` (default 32); the
            other data sets have a fixed size and only accept ``None`` or that size.

    Raises:
        ValueError: unknown name or bad argument.
        DatasetNotFoundError: the data is not on disk (the message says where we looked and how to get it).
        CorruptDataError: a file exists but is damaged.
    """
    key = _canonical_name(name)
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; valid names are: {', '.join(DATASETS)}.")
    if subset is not None and (isinstance(subset, bool) or not isinstance(subset, int)):
        raise ValueError(f"subset must be an int number of training examples or None, got {subset!r}.")
    if not 0.0 <= val_split < 1.0:
        raise ValueError(f"val_split must be in [0, 1), got {val_split}; e.g. val_split=0.1 holds out 10%.")
    if not 0.0 <= label_noise < 1.0:
        raise ValueError(f"label_noise must be in [0, 1), got {label_noise}; e.g. label_noise=0.4 flips 40%.")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size}.")

    fixed_size = {"fashion-mnist": 28, "mnist": 28, "cifar10": 32, "cifar100": 32}
    if key in fixed_size and image_size not in (None, fixed_size[key]):
        raise ValueError(
            f"{key} images are {fixed_size[key]}×{fixed_size[key]}; image_size={image_size} is not supported "
            f"for it (resizing only applies to imagefolder and synthetic). Leave image_size unset."
        )

    if key in _IDX_INFO:
        train, test, source = _load_idx_dataset(key, data_dir, download)
        classes = list(_IDX_INFO[key][3])
    elif key in ("cifar10", "cifar100"):
        train, test, classes, source = _load_cifar(key, data_dir, download)
    elif key == "imagefolder":
        train, test, classes, source = _load_imagefolder(data_dir, image_size or 64)
    else:  # synthetic
        if (
            len(synthetic_size) != 2
            or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in synthetic_size)
        ):
            raise ValueError(
                f"synthetic_size must be (n_train, n_test) with positive ints, got {synthetic_size!r}."
            )
        train, test = _make_synthetic((synthetic_size[0], synthetic_size[1]), seed, image_size or 32)
        classes = [f"class{i}" for i in range(10)]
        source = "synthetic"

    num_classes = len(classes)
    if subset is not None:
        train = train.take(stratified_subset_indices(train.labels, subset, num_classes, seed))
    val = None
    if val_split > 0:
        train_idx, val_idx = stratified_split_indices(train.labels, val_split, num_classes, seed)
        train, val = train.take(train_idx), train.take(val_idx)
    noisy_indices = clean_labels = None
    if label_noise > 0:
        clean_labels = train.labels
        noisy, noisy_indices = flip_labels(train.labels, label_noise, num_classes, seed)
        train = ArrayDataset(train.images, noisy)

    if key in _STATS:
        mean, std = _STATS[key]
    else:
        mean, std = _channel_stats(train.images)

    return DataSplits(
        train=train,
        val=val,
        test=test,
        num_classes=num_classes,
        in_channels=int(train.images.shape[1]),
        image_size=int(train.images.shape[-1]),
        mean=tuple(mean),
        std=tuple(std),
        name=key,
        classes=classes,
        source=source,
        noisy_indices=noisy_indices,
        clean_labels=clean_labels,
    )


# --------------------------------------------------------------------------------------------------------
# Batch augmentation
# --------------------------------------------------------------------------------------------------------


class Normalize:
    """``(x / 255 - mean) / std`` for a uint8 (or float in [0, 255]) batch ``N×C×H×W``; the evaluation path.

    Accepts (and ignores) a generator so that it can stand in for :class:`BatchAugment`.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        if len(mean) != len(std) or len(mean) == 0:
            raise ValueError(f"mean and std need one value per channel, got mean={mean}, std={std}.")
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be positive, got {std}.")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != len(self.mean):
            raise ValueError(
                f"expected a batch N×{len(self.mean)}×H×W (one mean/std per channel), got {_describe(images)}."
            )
        # (x/255 - mean)/std == x * (1 / (255 std)) - mean/std: one conversion and two in-place passes.
        scale = torch.tensor([1.0 / (255.0 * s) for s in self.std], dtype=torch.float32, device=images.device)
        shift = torch.tensor([m / s for m, s in zip(self.mean, self.std)], dtype=torch.float32,
                             device=images.device)
        out = images.to(torch.float32)
        if out.data_ptr() == images.data_ptr():  # already float32: do not modify the caller's tensor
            out = out.clone()
        return out.mul_(scale.view(1, -1, 1, 1)).sub_(shift.view(1, -1, 1, 1))

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


@dataclass(frozen=True, eq=False)
class AugmentParams:
    """The random draws of one :class:`BatchAugment` call (CPU tensors, one entry per sample).

    ``offset_y``/``offset_x`` index the top-left corner of the crop in the zero-padded image (so 0 means
    "shifted down/right by the full padding"); ``flipped`` says which samples were mirrored.
    """

    offset_y: torch.Tensor
    offset_x: torch.Tensor
    flipped: torch.Tensor
    autoaugment_seeds: torch.Tensor | None = None  # one seed per sample when AutoAugment is on

    def __getitem__(self, rows: slice) -> AugmentParams:
        """The draws of a slice of the batch (a DDP rank's share of a global batch)."""
        seeds = None if self.autoaugment_seeds is None else self.autoaugment_seeds[rows]
        return AugmentParams(self.offset_y[rows], self.offset_x[rows], self.flipped[rows], seeds)


class BatchAugment:
    """Random crop (zero padding) + horizontal flip (+ optional AutoAugment) + normalization, per batch.

    ``aug(images_uint8, generator)`` returns a float32 normalized batch of the same shape. Crop and flip
    are vectorized over the batch; AutoAugment (CIFAR-10 policy) runs per image on uint8, after crop and
    flip, inside a forked global RNG seeded from ``generator`` so that it too is reproducible. With
    ``crop_padding=0, flip=False, autoaugment=False`` it only normalizes.

    Horizontal flips are fine for clothes and natural images but wrong for digits (see the module docstring).
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        crop_padding: int = 4,
        flip: bool = True,
        autoaugment: bool = False,
    ):
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0 (0 disables the random crop), got {crop_padding}.")
        self.normalize = Normalize(mean, std)
        self.crop_padding = int(crop_padding)
        self.flip = bool(flip)
        self.autoaugment = bool(autoaugment)
        self._autoaugment_op: Callable[[torch.Tensor], torch.Tensor] | None = None
        if self.autoaugment:
            from torchvision.transforms import AutoAugment, AutoAugmentPolicy

            self._autoaugment_op = AutoAugment(AutoAugmentPolicy.CIFAR10)

    @property
    def is_random(self) -> bool:
        return self.crop_padding > 0 or self.flip or self.autoaugment

    def __repr__(self) -> str:
        return (f"BatchAugment(mean={self.normalize.mean}, std={self.normalize.std}, "
                f"crop_padding={self.crop_padding}, flip={self.flip}, autoaugment={self.autoaugment})")

    def draw_params(self, n: int, generator: torch.Generator) -> AugmentParams:
        """Draw the per-sample crop offsets and flip decisions for a batch of ``n``."""
        span = 2 * self.crop_padding + 1  # offsets 0..2p in the padded image
        offset_y = torch.randint(0, span, (n,), generator=generator)
        offset_x = torch.randint(0, span, (n,), generator=generator)
        flipped = (torch.rand(n, generator=generator) < 0.5) if self.flip else torch.zeros(n, dtype=torch.bool)
        seeds = torch.randint(0, 2**62, (n,), generator=generator) if self.autoaugment else None
        return AugmentParams(offset_y, offset_x, flipped, seeds)

    def __call__(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        params: AugmentParams | None = None,
        return_params: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, AugmentParams]:
        """Augment and normalize; the random draws come from ``generator`` or, already drawn, ``params``."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"BatchAugment expects a uint8 batch N×C×H×W, got {_describe(images)}.")
        if params is None:
            if generator is None:
                if self.is_random:
                    raise ValueError("BatchAugment with random crop/flip/AutoAugment needs a torch.Generator; "
                                     "pass one (the loader does) so that augmentation is reproducible.")
                generator = torch.Generator()
            params = self.draw_params(len(images), generator)
        x = images
        if self.crop_padding > 0 or self.flip:
            x = self._crop_flip(x, params)
        if self._autoaugment_op is not None:
            x = self._apply_autoaugment(x, params)
        out = self.normalize(x)
        return (out, params) if return_params else out

    def _crop_flip(self, x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Crop and flip in one gather: output pixel (i, j) of sample k is padded pixel
        ``(offset_y[k] + i, offset_x[k] + j)``, or ``(offset_y[k] + i, offset_x[k] + w - 1 - j)`` if flipped."""
        n, c, h, w = x.shape
        p = self.crop_padding
        padded = torch.nn.functional.pad(x, (p, p, p, p)) if p > 0 else x  # zero padding
        device = x.device
        j = torch.arange(w, device=device).view(1, w)
        flipped = params.flipped.to(device).view(n, 1)
        rows = params.offset_y.to(device).view(n, 1) + torch.arange(h, device=device).view(1, h)  # n×h
        cols = params.offset_x.to(device).view(n, 1) + torch.where(flipped, w - 1 - j, j)  # n×w
        batch = torch.arange(n, device=device).view(n, 1, 1, 1)
        chan = torch.arange(c, device=device).view(1, c, 1, 1)
        return padded[batch, chan, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]

    def _apply_autoaugment(self, x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """AutoAugment per image, each under its own seed (so that a DDP rank's share of a global batch is
        augmented exactly as in a single process), inside a forked global RNG."""
        assert self._autoaugment_op is not None and params.autoaugment_seeds is not None
        out = []
        with torch.random.fork_rng(devices=[]):
            for img, seed in zip(x, params.autoaugment_seeds.tolist()):
                torch.manual_seed(seed)
                out.append(self._autoaugment_op(img))
        return torch.stack(out)


def make_augment(name: str, splits: DataSplits) -> BatchAugment:
    """The augmentation preset ``name`` (one of :data:`AUGMENTS`) with ``splits``' mean and std."""
    key = name.strip().lower().replace("_", "-")
    mean, std = splits.mean, splits.std
    if key == "none":
        return BatchAugment(mean, std, crop_padding=0, flip=False)
    if key == "crop":
        return BatchAugment(mean, std, crop_padding=4, flip=False)
    if key in ("crop-flip", "autoaugment"):
        if splits.name == "mnist":
            warnings.warn(
                f"augment={key!r} mirrors images horizontally, which is wrong for MNIST digits; "
                "use augment='crop' instead.",
                stacklevel=2,
            )
        return BatchAugment(mean, std, crop_padding=4, flip=True, autoaugment=(key == "autoaugment"))
    raise ValueError(f"unknown augment preset {name!r}; valid presets are: {', '.join(AUGMENTS)}.")


# --------------------------------------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------------------------------------

AugmentFn = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class BatchLoader:
    """Iterate over an :class:`ArrayDataset` in batches of ``(x float32, y int64)`` on ``device``.

    * ``shuffle``: a fresh permutation per epoch, a pure function of ``(seed, epoch)``; call
      :meth:`set_epoch` before each epoch (as with ``DistributedSampler``).
    * ``augment``: a :class:`BatchAugment`/:class:`Normalize` (or any ``fn(uint8_batch, generator)``) applied
      to each batch on ``device``; its generator is seeded from ``(seed, epoch, rank)``. ``None`` only
      scales to [0, 1].
    * ``world_size > 1``: every rank takes a disjoint, equally long slice of the (shared) epoch
      permutation; the permutation is padded by wrapping around so that it divides evenly (with
      ``drop_last`` the tail is dropped instead), so all ranks run the same number of batches.
    """

    def __init__(
        self,
        dataset: ArrayDataset,
        batch_size: int,
        *,
        shuffle: bool,
        augment: AugmentFn | None,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
    ):
        if not isinstance(dataset, ArrayDataset):
            raise TypeError(f"BatchLoader needs an ArrayDataset, got {type(dataset).__name__}.")
        if len(dataset) == 0:
            raise ValueError("BatchLoader got an empty data set.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}.")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size) = [0, {world_size}), got {rank}.")
        if drop_last and len(dataset) < world_size:
            raise ValueError(f"drop_last with {len(dataset)} examples and world_size={world_size} leaves "
                             "nothing for some ranks; use drop_last=False.")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = int(seed)
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration produces."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}.")
        self.epoch = int(epoch)

    @property
    def num_samples(self) -> int:
        """Examples this rank sees per epoch."""
        n = len(self.dataset)
        if self.drop_last:
            return n // self.world_size
        return -(-n // self.world_size)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def indices(self, epoch: int | None = None) -> torch.Tensor:
        """The example indices this rank visits in ``epoch`` (default: the current one), in order."""
        epoch = self.epoch if epoch is None else epoch
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=_generator(self.seed, 3, epoch))
        else:
            order = torch.arange(n)
        per_rank = self.num_samples
        total = per_rank * self.world_size
        if total > n:  # wrap around (repeatedly, if the data set is smaller than world_size)
            order = order.repeat(-(-total // n))
        order = order[:total]
        if self.world_size == 1:
            return order
        # Split every global batch (batch_size × world_size examples) among the ranks, so that the ranks'
        # batches at step t together are exactly the single-process batch of the same global size.
        step = self.batch_size * self.world_size
        full = (total // step) * step
        head = order[:full].view(-1, self.world_size, self.batch_size)[:, self.rank].reshape(-1)
        tail = order[full:].view(self.world_size, -1)[self.rank]  # len(tail) is a multiple of world_size
        return torch.cat([head, tail])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self.indices()
        # One generator for all ranks: each step draws the augmentation of the whole global batch and every
        # rank applies its share, so DDP sees exactly the batches of one process with the global batch size.
        gen = _generator(self.seed, 4, self.epoch)
        draws_global = isinstance(self.augment, BatchAugment) and self.augment.is_random
        images, labels = self.dataset.images, self.dataset.labels
        non_blocking = self.device.type == "cuda"
        for b in range(len(self)):
            batch = idx[b * self.batch_size:(b + 1) * self.batch_size]
            x = images.index_select(0, batch)
            y = labels.index_select(0, batch)
            if non_blocking:
                x, y = x.pin_memory(), y.pin_memory()
            x = x.to(self.device, non_blocking=non_blocking)
            y = y.to(self.device, non_blocking=non_blocking)
            if self.augment is None:
                xf = x.to(torch.float32) / 255.0
            elif draws_global:
                n = len(batch)
                params = self.augment.draw_params(n * self.world_size, gen)[self.rank * n:(self.rank + 1) * n]
                xf = self.augment(x, params=params)
            else:
                xf = self.augment(x, gen)
            yield xf, y
