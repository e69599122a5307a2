"""File readers: IDX (MNIST, Fashion-MNIST), CIFAR, image folders, synthetic data, channel statistics.

Where each data set is searched is described in :mod:`normsam.train.data`. :data:`SYSTEM_SEARCH_DIRS` lives
here (tests monkeypatch ``normsam.train.data.readers.SYSTEM_SEARCH_DIRS``).
"""

from __future__ import annotations

import gzip
import io
import math
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from normsam.train.data.containers import (
    ArrayDataset,
    CorruptDataError,
    DatasetNotFoundError,
    PathLike,
    describe_value,
)
from normsam.train.data.splits import derive_data_seed

__all__ = [
    "DATA_ENV_VAR", "DEBIAN_FASHION_MNIST_DIR", "SYSTEM_SEARCH_DIRS", "PUBLISHED_STATS", "IDX_DATASETS", "read_idx",
    "load_idx_dataset", "load_cifar", "load_imagefolder", "make_synthetic", "channel_stats", "decode_image",
    "read_image_file", "UndecodableImageError",
]

#: Environment variable naming a data root, searched after ``data_dir``.
DATA_ENV_VAR = "NORMSAM_DATA"

#: Where Debian's ``dataset-fashion-mnist`` package installs the (gzipped) IDX files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

#: System-wide roots searched last, per IDX data set. Module-level so that tests can monkeypatch it.
SYSTEM_SEARCH_DIRS: dict[str, tuple[Path, ...]] = {
    "fashion-mnist": (DEBIAN_FASHION_MNIST_DIR,),
    "mnist": (),
}

#: Published per-channel (mean, std) of the training images (pixel values scaled to [0, 1]), per data set;
#: the others' are computed from their training split (:func:`channel_stats`).
PUBLISHED_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
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

#: The data sets read from IDX files (:func:`load_idx_dataset`).
IDX_DATASETS: tuple[str, ...] = tuple(_IDX_INFO)

# IDX type codes -> big-endian numpy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# --------------------------------------------------------------------------------------------------------
# Image files: every reader of images (in-memory folders, streamed folders and shards, make-shards) decodes here
# --------------------------------------------------------------------------------------------------------


class UndecodableImageError(CorruptDataError):
    """An image file does not decode (or cannot be read); the message is the reason only, and each reader says
    which file and what to do."""


def decode_image(data: bytes):
    """``data`` (an image file's bytes) fully decoded and converted to an RGB ``PIL.Image``.

    Raises :class:`UndecodableImageError` with the reason (PIL raises many types: UnidentifiedImageError,
    OSError for a truncated file, SyntaxError, DecompressionBombError, ...)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
            rgb.load()
            return rgb
    except Exception as exc:  # noqa: BLE001 - any failure to decode is the file's
        detail = re.sub(r"\s*<_io\.\w+ [^>]*>", "", str(exc)).strip()  # PIL names the in-memory buffer
        raise UndecodableImageError(f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__) from exc


def read_image_file(path: PathLike):
    """The image file at ``path`` as an RGB ``PIL.Image``; raises :class:`UndecodableImageError` (the reason) when
    it cannot be read or does not decode."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UndecodableImageError(f"cannot be read: {type(exc).__name__}: {exc.strerror or exc}") from exc
    return decode_image(data)


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
                f"{files[f'{part}_images']} should hold uint8 images N×H×W, got {describe_value(images)}."
            )
        if labels.dim() != 1 or len(labels) != len(images):
            raise CorruptDataError(
                f"{files[f'{part}_labels']} should hold {len(images)} labels (one per image in "
                f"{files[f'{part}_images']}), got {describe_value(labels)}."
            )
        labels = labels.long()
        if len(labels) and (labels.min() < 0 or labels.max() > 9):
            raise CorruptDataError(
                f"{files[f'{part}_labels']} holds labels outside 0..9 (min {int(labels.min())}, max "
                f"{int(labels.max())}); this is not {pretty}."
            )
        splits.append(ArrayDataset(images.unsqueeze(1).contiguous(), labels))
    return splits[0], splits[1]


def load_idx_dataset(
    name: str, data_dir: PathLike | None, download: bool
) -> tuple[ArrayDataset, ArrayDataset, list[str], str]:
    """``(train, test, class names, source folder)`` of the IDX data set ``name`` (one of :data:`IDX_DATASETS`),
    from the first folder searched that has all four files (see :mod:`normsam.train.data`); with ``download``
    and none found, torchvision downloads them.

    Raises:
        DatasetNotFoundError: the files are not found (the message lists every place searched), or the download
            failed.
        CorruptDataError: a file is damaged.
    """
    pretty, _, tv_class, class_names = _IDX_INFO[name]
    candidates = _idx_candidates(name, data_dir)
    partial: list[str] = []
    for folder, _ in candidates:
        found = {stem: _find_idx_file(folder, stem) for stem in _IDX_FILES.values()}
        if all(found.values()):
            train, test = _read_idx_split(folder, pretty)
            return train, test, list(class_names), str(folder)
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
            return train, test, list(class_names), str(folder)
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


def load_cifar(
    name: str, data_dir: PathLike | None, download: bool
) -> tuple[ArrayDataset, ArrayDataset, list[str], str]:
    """``(train, test, class names, source folder)`` of ``"cifar10"`` or ``"cifar100"`` in torchvision's pickled
    format, from ``data_dir`` (the only place searched when given), else ``$NORMSAM_DATA``; with ``download``
    and nothing found, torchvision downloads it (into ``data_dir`` or ``./data``).

    Raises:
        DatasetNotFoundError: not found, incomplete, or failing torchvision's md5 check.
    """
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


def load_imagefolder(
    data_dir: PathLike | None, image_size: int
) -> tuple[ArrayDataset, ArrayDataset, list[str], str]:
    """``(train, test, class names, source folder)`` of ``data_dir/train/<class>/*`` and ``data_dir/val/<class>/*``
    (or ``test/``), every image resized (shorter side, then centre crop) to ``image_size`` and held in memory.

    Raises:
        DatasetNotFoundError: no ``data_dir`` (nor ``$NORMSAM_DATA``), or not the expected folders.
        ValueError: the two splits have different class folders.
        CorruptDataError: images that cannot be read or do not decode (all of a split's are named at once).
    """
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
            ds = tvd.ImageFolder(str(folder), loader=lambda p: p)  # list only; decoded below
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
        images, bad = [], []
        for path, _ in ds.samples:
            try:
                images.append(transform(read_image_file(path)))
            except UndecodableImageError as exc:
                bad.append(f"{path} ({exc})")
        if bad:
            shown = "; ".join(bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise CorruptDataError(
                f"imagefolder: {len(bad)} of {len(ds.samples)} images in {folder} do not decode: {shown}. Remove or "
                f"replace them; or, to leave such files out, write shards with `normsam make-shards {root} OUT "
                "--skip-corrupt` (it lists them in OUT/manifest.json) and train with data=webdataset data_dir=OUT."
            )
        labels = torch.as_tensor(ds.targets, dtype=torch.long)
        parts.append(ArrayDataset(torch.stack(images).contiguous(), labels))
    return parts[0], parts[1], classes, str(root)


def make_synthetic(
    sizes: tuple[int, int], seed: int, image_size: int, num_classes: int = 10, channels: int = 3
) -> tuple[ArrayDataset, ArrayDataset]:
    """``(train, test)`` of ``sizes`` examples: class prototypes (smooth random patterns) plus per-sample Gaussian
    noise, deterministic from ``seed``.

    The prototypes are 4×4 random patterns upsampled to ``image_size``: low-frequency, so that random crops
    and flips keep the class recognisable, while the noise keeps the task from being trivial.
    """
    gen = torch.Generator().manual_seed(derive_data_seed(seed, 0x5EED))
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


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
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
