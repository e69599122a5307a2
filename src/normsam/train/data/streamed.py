"""Streamed data: images decoded one by one in ``DataLoader`` workers, from webdataset shards or an image folder.

The in-memory path (:mod:`normsam.train.data.memory`) holds a whole data set as one uint8 tensor; ImageNet's
1.28 M images do not fit, and its standard augmentation (a fresh ``RandomResizedCrop`` per sample and epoch)
needs the full-size image each time. Here every sample is read and decoded in a loader worker, transformed
with torchvision's transforms v2, and batched as uint8; the main process moves the batch to the device and
normalizes it there.

Two sources
-----------
* ``data=webdataset``: tar shards in the webdataset layout (``KEY.jpg`` + ``KEY.cls`` per sample, as written
  by ``normsam make-shards`` and used by timm and OpenCLIP). ``data_dir`` is either a folder written by
  ``normsam make-shards`` (its ``manifest.json`` names the train and val shards and their sample counts) or a
  train shard pattern such as ``shards/train-{0000..0146}.tar`` together with ``val_data_dir`` (the val
  pattern); without a manifest the shards are scanned once (tar headers and the tiny ``.cls`` members) to count
  their samples. Shards are local (or mounted) files. Read with :func:`webdataset.tarfile_samples`.
* ``data=imagefolder loader=stream``: ``data_dir/train/<class>/*`` and ``data_dir/val/<class>/*`` (or
  ``test/``), listed with torchvision's ``ImageFolder`` and read file by file. ``subset``, ``val_split``,
  ``label_noise`` and ``eval_subset`` work as on the in-memory path (the same functions on the labels, so the
  same examples for the same seed); shards refuse them, as their labels are known only by reading them.

Epochs, ranks and workers: every example once per epoch
--------------------------------------------------------
Everything is a pure function of ``(seed, epoch)``, so resuming at an epoch boundary is exact.

* Shards: the epoch's shard order is a permutation drawn from ``(seed, epoch)``; the concatenated stream of
  ``N`` samples is cut into ``world_size`` equal, contiguous ranges of ``N // world_size`` samples (the
  ``N mod world_size < world_size`` samples at the end of the epoch's stream are left out of that epoch, so
  that every rank runs the same number of steps and no example is seen twice). A rank's range is cut into
  batches and each loader worker reads a contiguous run of whole batches (only the rank's last batch may be
  short), shuffles it through a buffer of ``shuffle_buffer`` samples seeded from ``(seed, epoch, rank,
  worker)`` and batches it. A worker reads only the shards its range covers (at most one partly). The batch
  order depends on the number of workers (``loader_workers``), which is part of the config; the set of examples
  of an epoch does not.
* Image folders allow random access: the epoch's permutation of all examples is drawn from ``(seed,
  epoch)`` (the same draw as the in-memory loader), its last ``N mod world_size`` examples are left out, and
  every global batch of ``batch_size × world_size`` is split among the ranks, so the ranks' batches at a step
  are exactly the single-process batch of the global size, whatever the number of workers.
* Augmentation: each sample's transform runs under its own seed, derived from ``(seed, epoch, sample)``
  (the sample's shard and key, or its index), inside a forked RNG: the same sample gets the same crop in a
  given epoch whichever worker decodes it.
* Mid-epoch: the runner checkpoints at epoch boundaries only. A run stopped inside an epoch resumes at the
  start of that epoch and replays it with the same order and augmentation, so the result equals an
  uninterrupted run; only the partial epoch's compute is lost.

Transforms (``augment``)
------------------------
``rrc-flip`` (the default): ``RandomResizedCrop(image_size)`` + horizontal flip; ``rrc-flip-randaugment``
and ``rrc-flip-autoaugment`` add torchvision's ``RandAugment()`` (2 ops, magnitude 9) or ``AutoAugment``
with the ImageNet policy; ``none``: the evaluation transform. Evaluation resizes the shorter side to
``round(image_size / 0.875)`` (256 for 224) and centre-crops ``image_size``. Normalization uses the ImageNet
mean and std (:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`); images are converted to RGB.

Bad input
---------
Errors, never a silent skip: a skipped sample would leave one DDP rank a batch short (a hang) and would
make a resumed run differ from an uninterrupted one. A shard pattern that matches no file, a shard that is
not a tar file or is truncated (fewer samples than its manifest count), a sample without an image or a
``.cls`` label, a label outside ``0..num_classes-1`` and an image that does not decode each raise
:class:`~normsam.train.data.CorruptDataError` naming the shard and the sample's key (or the file), with the
fix. The error is the same whether the sample is read in the main process (``loader_workers=0``) or in a loader
worker: a worker carries such an error to the main process as a value, which raises it as it is (torch would
re-raise it with the worker's whole traceback as its message); errors that are bugs keep torch's traceback.
``normsam make-shards`` decodes every image while writing, so shards it wrote do not hold undecodable
images (``--skip-corrupt`` leaves bad files out and lists them in the manifest).
"""

from __future__ import annotations

import json
import os
import random
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from normsam.train.data.augment import Normalize
from normsam.train.data.containers import CorruptDataError, DatasetNotFoundError
from normsam.train.data.splits import data_generator, derive_data_seed

__all__ = [
    "STREAMED_DATASETS",
    "STREAM_AUGMENTS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EVAL_CROP_FRACTION",
    "MANIFEST",
    "DEFAULT_WORKERS",
    "Shard",
    "StreamedSplit",
    "StreamedData",
    "expand_shards",
    "scan_shard",
    "is_streamed",
    "check_streamed_config",
    "load_streamed_data",
    "sample_transform",
    "ShardStream",
    "FolderSamples",
    "StreamedLoader",
    "make_streamed_loaders",
    "sharpness_examples",
]

#: Data sets read per sample (``data=imagefolder`` only with ``loader=stream``).
STREAMED_DATASETS = ("webdataset", "imagefolder")
#: Names accepted by ``augment`` on the streamed path.
STREAM_AUGMENTS = ("rrc-flip", "rrc-flip-randaugment", "rrc-flip-autoaugment", "none")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Evaluation: resize the shorter side to image_size / EVAL_CROP_FRACTION, then centre-crop image_size.
EVAL_CROP_FRACTION = 0.875
#: The file ``normsam make-shards`` writes beside the shards.
MANIFEST = "manifest.json"
DEFAULT_WORKERS = 2
DEFAULT_IMAGE_SIZE = 224
#: Members of a sample that hold its image, in order of preference.
SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")


# --------------------------------------------------------------------------------------------------------
# What a streamed data set is
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """One tar shard and the number of samples it holds."""

    url: str
    count: int


@dataclass
class StreamedSplit:
    """One split: shards (webdataset) or files with labels (image folder)."""

    shards: list[Shard] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    labels: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # int64, one per file

    def __len__(self) -> int:
        return sum(s.count for s in self.shards) if self.shards else len(self.files)

    def take(self, indices: torch.Tensor) -> StreamedSplit:
        """The files at ``indices`` (an image folder's split only)."""
        return StreamedSplit(files=[self.files[i] for i in indices.tolist()], labels=self.labels[indices])


@dataclass
class StreamedData:
    """What the model and the loaders need to know about a streamed data set (the streamed counterpart of
    :class:`~normsam.train.data.DataSplits`; ``val`` and label noise only for image folders)."""

    name: str
    source: str
    num_classes: int
    classes: list[str]
    image_size: int
    train: StreamedSplit
    test: StreamedSplit
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    in_channels: int = 3
    val: StreamedSplit | None = None
    noisy_indices: torch.Tensor | None = None
    clean_labels: torch.Tensor | None = None
    streamed: bool = True


def is_streamed(cfg: Any) -> bool:
    """Whether a run config reads its data per sample (``data=webdataset``, or ``loader=stream``)."""
    return cfg.data == "webdataset" or cfg.loader == "stream"


def check_streamed_config(cfg: Any) -> None:
    """Refuse options that the chosen loader would otherwise ignore, and those the streamed path lacks."""
    from normsam.train.data.load import DATASETS

    if str(cfg.data).strip().lower().replace("_", "-") not in (*DATASETS, "webdataset"):
        raise ValueError(f"unknown data set {cfg.data!r}; valid names are: {', '.join(DATASETS)}, webdataset.")
    if cfg.loader not in (None, "memory", "stream"):
        raise ValueError(f"Invalid loader: {cfg.loader!r}; valid values are memory (the data set in one tensor) "
                         "and stream (decoded per sample in loader workers).")
    if cfg.data == "webdataset" and cfg.loader == "memory":
        raise ValueError("data=webdataset is always streamed; drop loader=memory.")
    if not is_streamed(cfg):
        for key, default in (("loader_workers", None), ("val_data_dir", None), ("shuffle_buffer", 1000)):
            if getattr(cfg, key) != default:
                raise ValueError(f"{key}={getattr(cfg, key)!r} only applies to streamed data (data=webdataset, or "
                                 "data=imagefolder loader=stream); drop it or set loader=stream.")
        return
    if cfg.data not in STREAMED_DATASETS:
        raise ValueError(f"loader=stream reads image files; data={cfg.data} is held in memory. Use "
                         f"data={' or data='.join(STREAMED_DATASETS)}, or drop loader=stream.")
    if cfg.data != "webdataset":
        for key, default in (("val_data_dir", None), ("shuffle_buffer", 1000)):
            if getattr(cfg, key) != default:
                raise ValueError(f"{key} only applies to data=webdataset (an image folder is shuffled exactly); "
                                 f"drop {key}.")
    unsupported = {
        "scope=ssam-f": cfg.scope == "ssam-f",
        "download": cfg.download,
    }
    bad = [key for key, on in unsupported.items() if on]
    if bad:
        raise ValueError(f"{', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not supported with streamed data "
                         "(ssam-f needs the training images in memory); drop them, or for a small image folder "
                         "use loader=memory.")
    if cfg.data == "webdataset":
        needs_labels = [key for key, on in (("subset", cfg.subset is not None), ("val_split", cfg.val_split != 0.0),
                                            ("label_noise", cfg.label_noise != 0.0),
                                            ("eval_subset", cfg.eval_subset is not None)) if on]
        if needs_labels:
            raise ValueError(f"{', '.join(needs_labels)} {'needs' if len(needs_labels) == 1 else 'need'} every "
                             "label before training, which shards do not give without reading them all; make "
                             "shards of the subset you want, or use data=imagefolder loader=stream.")
    if cfg.loader_workers is not None and cfg.loader_workers < 0:
        raise ValueError(f"loader_workers must be >= 0 (0: decode in the main process), got {cfg.loader_workers}.")
    if cfg.shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer must be >= 1 samples (1: no shuffling within shards), got {cfg.shuffle_buffer}.")
    if cfg.augment is not None and cfg.augment not in STREAM_AUGMENTS:
        raise ValueError(f"augment={cfg.augment!r} is a preset of the in-memory path; streamed data takes "
                         f"{', '.join(STREAM_AUGMENTS)}.")


# --------------------------------------------------------------------------------------------------------
# Shards: patterns, manifests, counting
# --------------------------------------------------------------------------------------------------------


def expand_shards(pattern: str) -> list[str]:
    """The files of a shard pattern (brace ranges ``{0000..0146}``, lists ``{a,b}``, ``::`` between patterns,
    and ``*`` globs), all of which must exist."""
    import glob

    from webdataset.shardlists import expand_urls

    names: list[str] = []
    for url in expand_urls(str(pattern)):
        url = os.path.expanduser(url)
        names.extend(sorted(glob.glob(url)) if any(c in url for c in "*?[") else [url])
    if not names:
        raise DatasetNotFoundError(f"shard pattern {pattern!r} matches no file; give a pattern such as "
                                   "shards/train-{0000..0146}.tar or a folder written by `normsam make-shards`.")
    missing = [n for n in names if not os.path.isfile(n)]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DatasetNotFoundError(f"shard pattern {pattern!r}: {len(missing)} of {len(names)} shards do not exist "
                                   f"({shown}); check the pattern's range against the files on disk.")
    return names


def _key_and_extension(name: str) -> tuple[str, str]:
    from webdataset.tariterators import base_plus_ext

    key, ext = base_plus_ext(name)
    return (key or ""), (ext or "").lower()


def scan_shard(path: str) -> tuple[int, set[int]]:
    """(number of samples with an image, set of labels) of one shard, read from its tar headers and its
    ``.cls`` members."""
    count, labels, last_key = 0, set(), None
    try:
        with tarfile.open(path, mode="r:*") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                key, ext = _key_and_extension(member.name)
                if ext in SHARD_IMAGE_EXTENSIONS:
                    count += 1
                elif ext == "cls":
                    raw = tar.extractfile(member).read()  # type: ignore[union-attr]
                    labels.add(_parse_label(raw, f"shard {path}, sample {key!r}"))
                last_key = key
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        after = f" after sample {last_key!r}" if last_key else ""
        raise CorruptDataError(f"shard {path} is not a readable tar file{after} ({exc}); re-make it with "
                               "`normsam make-shards` or remove it from the pattern.") from exc
    return count, labels


def _parse_label(raw: bytes, where: str) -> int:
    try:
        return int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptDataError(f"{where}: the .cls member {raw[:20]!r} is not an integer class index; write "
                               "each sample's class as its decimal index (normsam make-shards does).") from exc


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CorruptDataError(f"{path} cannot be read as JSON ({exc}); re-run `normsam make-shards`.") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != "normsam-shards/1":
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CorruptDataError(f"{path} is not a normsam shard manifest (format {found!r}); re-run `normsam "
                               "make-shards`.")
    problem = _manifest_problem(manifest)
    if problem:
        raise CorruptDataError(f"{path} is damaged: {problem}; re-run `normsam make-shards`.")
    return manifest


def _manifest_problem(manifest: dict[str, Any]) -> str | None:
    """What is missing or malformed in a manifest that claims the normsam-shards/1 format, or None."""
    classes, splits = manifest.get("classes"), manifest.get("splits")
    if not isinstance(classes, list) or not classes:
        return f"'classes' should be the list of class names, got {classes!r}"
    if not isinstance(splits, dict) or "train" not in splits:
        return f"'splits' should map 'train' and 'val' (or 'test') to their shards, got {splits!r}"[:200]
    for name, entry in splits.items():
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(shards, list) or not all(
                isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("count"), int)
                and not isinstance(s.get("count"), bool) and s["count"] >= 0 for s in shards):
            return f"split {name!r} should list its shards as {{'name': file, 'count': samples}}"
    return None


def _manifest_split(folder: Path, manifest: dict[str, Any], split: str) -> StreamedSplit:
    entry = manifest["splits"].get(split)
    if entry is None:
        raise DatasetNotFoundError(f"{folder / MANIFEST} has no {split!r} split; make-shards writes one per "
                                   f"sub-folder of the image folder ({', '.join(manifest['splits'])} here).")
    shards = [Shard(str(folder / s["name"]), int(s["count"])) for s in entry["shards"]]
    missing = [s.url for s in shards if not os.path.isfile(s.url)]
    if missing:
        raise DatasetNotFoundError(f"{folder / MANIFEST} lists {len(missing)} shards that do not exist (e.g. "
                                   f"{missing[0]}); copy the whole folder written by make-shards.")
    return StreamedSplit(shards=shards)


def _scanned_split(pattern: str) -> tuple[StreamedSplit, set[int]]:
    from tqdm.auto import tqdm

    shards, labels = [], set()
    names = expand_shards(pattern)
    for name in tqdm(names, desc=f"counting samples in {len(names)} shards", leave=False, disable=None):
        count, found = scan_shard(name)
        shards.append(Shard(name, count))
        labels |= found
    return StreamedSplit(shards=shards), labels


def _load_webdataset(cfg: Any) -> tuple[StreamedSplit, StreamedSplit, list[str], str]:
    if cfg.data_dir is None:
        raise DatasetNotFoundError("data=webdataset needs data_dir: a folder written by `normsam make-shards`, or a "
                                   "train shard pattern (e.g. shards/train-{0000..0146}.tar) with val_data_dir.")
    folder = Path(str(cfg.data_dir)).expanduser()
    if folder.is_dir():
        if not (folder / MANIFEST).is_file():
            raise DatasetNotFoundError(f"{folder} has no {MANIFEST}; point data_dir at a folder written by "
                                       "`normsam make-shards`, or at a train shard pattern with val_data_dir.")
        if cfg.val_data_dir is not None:
            raise ValueError(f"val_data_dir is taken from {folder / MANIFEST}; drop val_data_dir.")
        manifest = _read_manifest(folder)
        val_split = "val" if "val" in manifest["splits"] else "test"
        return (_manifest_split(folder, manifest, "train"), _manifest_split(folder, manifest, val_split),
                list(manifest["classes"]), str(folder))
    if not folder.exists() and not any(c in str(cfg.data_dir) for c in "{*?[") and "::" not in str(cfg.data_dir):
        raise DatasetNotFoundError(f"data_dir {folder} does not exist; point it at a folder written by `normsam "
                                   "make-shards`, or at a train shard pattern (e.g. shards/train-{0000..0146}.tar) "
                                   "with val_data_dir.")
    if cfg.val_data_dir is None:
        raise ValueError(f"data_dir={cfg.data_dir!r} is a shard pattern; give the validation shards too, as "
                         "val_data_dir=PATTERN (or use a folder written by `normsam make-shards`).")
    train, train_labels = _scanned_split(str(cfg.data_dir))
    val, val_labels = _scanned_split(str(cfg.val_data_dir))
    labels = train_labels | val_labels
    if not labels or min(labels) < 0:
        raise CorruptDataError(f"the shards of {cfg.data_dir!r} hold no usable .cls labels; every sample needs one.")
    classes = [str(i) for i in range(max(labels) + 1)]
    return train, val, classes, str(cfg.data_dir)


def _load_folder(cfg: Any) -> tuple[StreamedSplit, StreamedSplit, list[str], str]:
    import torchvision.datasets as tvd

    from normsam.train.data.readers import DATA_ENV_VAR

    data_dir = cfg.data_dir or os.environ.get(DATA_ENV_VAR)
    if data_dir is None:
        raise DatasetNotFoundError("imagefolder needs data_dir (or $NORMSAM_DATA): a folder with train/<class>/* "
                                   "and val/<class>/* (or test/<class>/*).")
    root = Path(data_dir).expanduser()
    eval_dir = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    if not (root / "train").is_dir() or eval_dir is None:
        raise DatasetNotFoundError(f"imagefolder expects {root / 'train'}/<class>/<image> and {root / 'val'}/<class>/"
                                   f"<image> (or test/); found train/: {(root / 'train').is_dir()}, val/ or test/: "
                                   f"{eval_dir is not None}.")
    splits, classes = [], None
    for folder in (root / "train", eval_dir):
        try:
            listing = tvd.ImageFolder(str(folder), loader=lambda p: p)  # list only; decoding happens per sample
        except FileNotFoundError as exc:
            raise DatasetNotFoundError(f"imagefolder: {folder} has no usable class folders or images ({exc}).") from exc
        if classes is not None and listing.classes != classes:
            raise ValueError(f"imagefolder: the class folders of {folder} ({listing.classes}) differ from those of "
                             f"{root / 'train'} ({classes}); both splits need the same class sub-folders.")
        classes = list(listing.classes)
        splits.append(StreamedSplit(files=[p for p, _ in listing.samples],
                                    labels=torch.tensor([c for _, c in listing.samples], dtype=torch.long)))
    assert classes is not None
    return splits[0], splits[1], classes, str(root)


def load_streamed_data(cfg: Any) -> StreamedData:
    """The streamed data of a run config (``data=webdataset``, or ``data=imagefolder loader=stream``)."""
    check_streamed_config(cfg)
    if cfg.data == "webdataset":
        train, test, classes, source = _load_webdataset(cfg)
    else:
        train, test, classes, source = _load_folder(cfg)
    for split, name in ((train, "train"), (test, "validation")):
        if len(split) == 0:
            raise DatasetNotFoundError(f"{source}: the {name} split holds no samples.")
    data = StreamedData(name=cfg.data, source=source, num_classes=len(classes), classes=classes,
                        image_size=cfg.image_size or DEFAULT_IMAGE_SIZE, train=train, test=test)
    if cfg.data != "webdataset":
        _subsets_and_noise(data, cfg)
    return data


def _subsets_and_noise(data: StreamedData, cfg: Any) -> None:
    """subset, val_split, label_noise and eval_subset of an image folder, as :func:`~normsam.train.data.load_data`
    takes them (the same functions, so the same examples for the same seed)."""
    from normsam.train.data.splits import flip_labels, stratified_split_indices, stratified_subset_indices

    k = data.num_classes
    if cfg.subset is not None:
        data.train = data.train.take(stratified_subset_indices(data.train.labels, cfg.subset, k, cfg.seed))
    if cfg.val_split > 0:
        train_idx, val_idx = stratified_split_indices(data.train.labels, cfg.val_split, k, cfg.seed)
        data.train, data.val = data.train.take(train_idx), data.train.take(val_idx)
    if cfg.label_noise > 0:
        data.clean_labels = data.train.labels
        noisy, data.noisy_indices = flip_labels(data.train.labels, cfg.label_noise, k, cfg.seed)
        data.train = StreamedSplit(files=data.train.files, labels=noisy)
    if cfg.eval_subset is not None and cfg.eval_subset < len(data.test):
        # a fixed subset (seed 0, whatever the run's seed), as the in-memory path: runs are scored on the same images
        data.test = data.test.take(stratified_subset_indices(data.test.labels, cfg.eval_subset, k, seed=0))


# --------------------------------------------------------------------------------------------------------
# Per-sample decoding and transforms
# --------------------------------------------------------------------------------------------------------


def sample_transform(augment: str, image_size: int, *, train: bool):
    """The transforms v2 pipeline from a PIL image to a uint8 ``3×S×S`` tensor."""
    from torchvision.transforms import v2

    if augment not in STREAM_AUGMENTS:
        raise ValueError(f"unknown streamed augment {augment!r}; valid: {', '.join(STREAM_AUGMENTS)}.")
    if not train or augment == "none":
        ops = [v2.Resize(round(image_size / EVAL_CROP_FRACTION), antialias=True), v2.CenterCrop(image_size)]
    else:
        ops = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
        if augment == "rrc-flip-randaugment":
            ops.append(v2.RandAugment())
        elif augment == "rrc-flip-autoaugment":
            ops.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET))
    return v2.Compose([*ops, v2.PILToTensor()])


def _decode_image(data: bytes | Path, where: str):
    """The image (a file's bytes, or its path) as RGB; a file that cannot be read or does not decode raises
    :class:`CorruptDataError` that names ``where``."""
    from normsam.train.data.readers import UndecodableImageError, decode_image, read_image_file

    try:
        return decode_image(data) if isinstance(data, bytes) else read_image_file(data)
    except UndecodableImageError as exc:
        raise CorruptDataError(f"{where}: the image does not decode ({exc}); replace or remove it (normsam "
                               "make-shards checks every image).") from exc


def _transformed(transform, image, seed: int) -> torch.Tensor:
    """The transform under its own seed, without touching the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image)


def _stack(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([x for x, _ in samples]), torch.tensor([y for _, y in samples], dtype=torch.long)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class ShardStream(IterableDataset):
    """Batches ``(uint8 B×3×S×S, int64 B)`` of one rank's share of the epoch's shard stream (see the module
    docstring); each loader worker yields a contiguous run of the rank's batches."""

    def __init__(self, shards: list[Shard], *, batch_size: int, transform, num_classes: int, seed: int,
                 shuffle: bool, shuffle_buffer: int = 1000, rank: int = 0, world_size: int = 1):
        self.shards, self.batch_size, self.transform = list(shards), batch_size, transform
        self.num_classes, self.seed, self.shuffle, self.shuffle_buffer = num_classes, seed, shuffle, shuffle_buffer
        self.rank, self.world_size, self.epoch = rank, world_size, 0
        self.total = sum(s.count for s in self.shards)
        self.per_rank = self.total // world_size
        if self.per_rank == 0:
            raise ValueError(f"{self.total} samples cannot be shared by {world_size} processes.")

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return -(-self.per_rank // self.batch_size)

    def shard_order(self) -> list[Shard]:
        if not self.shuffle:
            return self.shards
        perm = torch.randperm(len(self.shards), generator=data_generator(self.seed, 6, self.epoch)).tolist()
        return [self.shards[i] for i in perm]

    def segments(self, worker: int, num_workers: int) -> list[tuple[Shard, int, int]]:
        """``(shard, first, stop)`` sample ranges (positions within each shard) that ``worker`` reads."""
        batches = len(self)
        first_batch, stop_batch = worker * batches // num_workers, (worker + 1) * batches // num_workers
        start = self.rank * self.per_rank + first_batch * self.batch_size
        stop = self.rank * self.per_rank + min(stop_batch * self.batch_size, self.per_rank)
        out, offset = [], 0
        for shard in self.shard_order():
            lo, hi = max(start, offset), min(stop, offset + shard.count)
            if lo < hi:
                out.append((shard, lo - offset, hi - offset))
            offset += shard.count
        return out

    def _read(self, segments: list[tuple[Shard, int, int]]) -> Iterator[tuple[str, dict[str, Any]]]:
        from webdataset import tarfile_samples

        for shard, first, stop in segments:
            seen, last_key = 0, None
            try:
                for sample in tarfile_samples([{"url": shard.url}]):
                    if seen >= stop:
                        break
                    last_key = sample["__key__"]
                    seen += 1
                    if seen > first:
                        yield shard.url, sample
            except CorruptDataError:
                raise
            except Exception as exc:  # tarfile.ReadError, OSError, ValueError (duplicate members), ...
                after = f" after sample {last_key!r}" if last_key else " at its start"
                detail = str(exc.args[0]).split(" @ ")[0] if exc.args else str(exc)  # webdataset appends the stream
                raise CorruptDataError(f"shard {shard.url} is damaged{after} ({type(exc).__name__}: {detail}); re-make "
                                       "it with `normsam make-shards`.") from exc
            if seen < stop:
                raise CorruptDataError(f"shard {shard.url} ends after {seen} samples (last key {last_key!r}) but should "
                                       f"hold {shard.count}: it is truncated; re-make or re-copy it.")

    def _decode(self, url: str, sample: dict[str, Any]) -> tuple[torch.Tensor, int]:
        key = sample["__key__"]
        where = f"shard {url}, sample {key!r}"
        ext = next((e for e in SHARD_IMAGE_EXTENSIONS if e in sample), None)
        if ext is None or "cls" not in sample:
            members = sorted(k for k in sample if not k.startswith("__"))
            raise CorruptDataError(f"{where} has members {members}; each sample needs an image "
                                   f"({', '.join(SHARD_IMAGE_EXTENSIONS)}) and a .cls class index.")
        label = _parse_label(sample["cls"], where)
        if not 0 <= label < self.num_classes:
            raise CorruptDataError(f"{where}: class index {label} is outside 0..{self.num_classes - 1}.")
        image = _decode_image(sample[ext], where)
        name = f"{os.path.basename(url)}/{key}".encode()
        return _transformed(self.transform, image, derive_data_seed(self.seed, 7, self.epoch, zlib.crc32(name))), label

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        import webdataset as wds

        worker, num_workers = _worker()
        samples: Iterator = self._read(self.segments(worker, num_workers))
        if self.shuffle and self.shuffle_buffer > 1:
            rng = random.Random(derive_data_seed(self.seed, 8, self.epoch, self.rank, worker))
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        batch = []
        for url, sample in samples:
            batch.append(self._decode(url, sample))
            if len(batch) == self.batch_size:
                yield _stack(batch)
                batch = []
        if batch:
            yield _stack(batch)


class FolderSamples(Dataset):
    """Image files read and transformed one by one: ``dataset[i] = (uint8 3×S×S, label)``."""

    def __init__(self, files: list[str], labels: torch.Tensor, *, transform, seed: int):
        self.files, self.labels, self.transform, self.seed, self.epoch = files, labels, transform, seed, 0

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.files[index]
        image = _decode_image(Path(path), path)
        label = int(self.labels[index])
        return _transformed(self.transform, image, derive_data_seed(self.seed, 7, self.epoch, index)), label


def folder_batches(n: int, batch_size: int, *, seed: int, epoch: int, shuffle: bool, rank: int = 0,
                   world_size: int = 1) -> list[list[int]]:
    """This rank's batches of example indices: the epoch's permutation without its last ``n mod world_size``
    entries, each global batch of ``batch_size × world_size`` split among the ranks."""
    order = torch.randperm(n, generator=data_generator(seed, 3, epoch)) if shuffle else torch.arange(n)
    per_rank = n // world_size
    if per_rank == 0:
        raise ValueError(f"{n} examples cannot be shared by {world_size} processes.")
    order = order[: per_rank * world_size]
    step = batch_size * world_size
    full = (len(order) // step) * step
    head = order[:full].view(-1, world_size, batch_size)[:, rank].reshape(-1)
    tail = order[full:].view(world_size, -1)[rank]
    mine = torch.cat([head, tail]).tolist()
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def _collate(samples: list) -> Any:
    fault = next((s for s in samples if isinstance(s, _WorkerFault)), None)
    return fault if fault is not None else _stack(samples)


class _WorkerFault:
    """An ordinary fault (bad data: an error that ``normsam``'s command line prints as one line) met in a loader
    worker, carried to the main process as a value and raised there as itself.

    torch re-raises a worker's exception as a new exception of the same type whose message is the worker's whole
    traceback ("Caught CorruptDataError in DataLoader worker process 0. Original Traceback ..."), so the one line
    would become forty. Bugs are not carried: they keep torch's traceback."""

    def __init__(self, error: BaseException):
        self.error = error

    @staticmethod
    def of(exc: BaseException) -> _WorkerFault | None:
        """The fault to carry for ``exc`` raised in a worker, or None (raise it as it is)."""
        import pickle

        from normsam.errors import fault_message

        if get_worker_info() is None or not isinstance(exc, Exception) or fault_message(exc) is None:
            return None
        try:
            error = pickle.loads(pickle.dumps(exc))  # the message, type and fields, without the worker's traceback
        except Exception:  # noqa: BLE001 - an exception that does not pickle: torch's wrapper it is
            return None
        return _WorkerFault(error)


class _CarryFaults(Dataset):
    """A loader's dataset as its workers see it: an ordinary fault becomes a :class:`_WorkerFault` value."""

    def __init__(self, dataset: FolderSamples):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except Exception as exc:
            fault = _WorkerFault.of(exc)
            if fault is None:
                raise
            return fault


class _CarryStreamFaults(IterableDataset):
    """:class:`_CarryFaults` for a :class:`ShardStream`: the fault is the worker's last item."""

    def __init__(self, dataset: ShardStream):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[Any]:
        try:
            yield from self.dataset
        except Exception as exc:
            fault = _WorkerFault.of(exc)
            if fault is None:
                raise
            yield fault


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # a worker decodes one image at a time; more threads only oversubscribe the cores


class StreamedLoader:
    """Iterate ``(float32 x, int64 y)`` batches on ``device``: decoding in ``workers`` loader processes, the
    uint8 batch moved to the device and normalized there. Call :meth:`set_epoch` before each epoch."""

    def __init__(self, dataset: ShardStream | FolderSamples, *, normalize: Normalize, workers: int,
                 device: torch.device, batches=None):
        self.dataset, self.normalize, self.workers, self.device = dataset, normalize, workers, torch.device(device)
        self.batches = batches  # FolderSamples: fn(epoch) -> list of index batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}.")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.batches is not None:
            return len(self.batches(self.epoch))
        return len(self.dataset)

    def _loader(self) -> DataLoader:
        self.dataset.epoch = self.epoch  # the workers get a copy of the dataset with this epoch
        pin = self.device.type == "cuda"
        common = dict(num_workers=self.workers, pin_memory=pin, worker_init_fn=_one_thread if self.workers else None,
                      persistent_workers=False)
        if self.batches is not None:
            return DataLoader(_CarryFaults(self.dataset), batch_sampler=self.batches(self.epoch), collate_fn=_collate,
                              **common)
        return DataLoader(_CarryStreamFaults(self.dataset), batch_size=None, **common)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        non_blocking = self.device.type == "cuda"
        for batch in self._loader():
            if isinstance(batch, _WorkerFault):  # bad data met in a worker: the error it raised, as in the main process
                raise batch.error
            x, y = batch
            x = x.to(self.device, non_blocking=non_blocking)
            yield self.normalize(x), y.to(self.device, non_blocking=non_blocking)


def sharpness_examples(data: StreamedData, *, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``min(n, len(train))`` training examples without augmentation (the evaluation transform), normalized:
    for an image folder the first n of a permutation seeded by ``seed``, for shards the first n of the
    training stream in the shard order seeded by ``seed`` (no shuffle buffer). The same examples for every run
    of the same data; decoded here, in this process."""
    transform = sample_transform("none", data.image_size, train=False)
    count = min(n, len(data.train))
    if data.train.shards:
        stream = ShardStream(data.train.shards, batch_size=count, transform=transform, num_classes=data.num_classes,
                             seed=seed, shuffle=True, shuffle_buffer=1)
        images, labels = next(iter(stream))
    else:
        order = torch.randperm(len(data.train), generator=data_generator(seed, 10))[:count].tolist()
        samples = FolderSamples(data.train.files, data.train.labels, transform=transform, seed=seed)
        images, labels = _stack([samples[i] for i in order])
    return Normalize(data.mean, data.std)(images), labels


def make_streamed_loaders(cfg: Any, data: StreamedData, *, rank: int, world_size: int, batch_size: int,
                          device: torch.device) -> tuple[StreamedLoader, dict[str, StreamedLoader]]:
    """The training loader (this rank's share) and the evaluation loaders of a run: ``test`` (the held-out
    split, all of it, in order) and, with ``val_split``, ``val``."""
    workers = DEFAULT_WORKERS if cfg.loader_workers is None else cfg.loader_workers
    augment = cfg.augment or "rrc-flip"
    normalize = Normalize(data.mean, data.std)
    train_tf = sample_transform(augment, data.image_size, train=True)
    eval_tf = sample_transform(augment, data.image_size, train=False)

    def loader(split: StreamedSplit, transform, train: bool, size: int) -> StreamedLoader:
        ranks = (rank, world_size) if train else (0, 1)
        if split.shards:
            stream = ShardStream(split.shards, batch_size=size, transform=transform, num_classes=data.num_classes,
                                 seed=cfg.seed, shuffle=train, shuffle_buffer=cfg.shuffle_buffer, rank=ranks[0],
                                 world_size=ranks[1])
            return StreamedLoader(stream, normalize=normalize, workers=workers, device=device)
        samples = FolderSamples(split.files, split.labels, transform=transform, seed=cfg.seed)

        def batches(epoch: int) -> list[list[int]]:
            return folder_batches(len(samples), size, seed=cfg.seed, epoch=epoch, shuffle=train, rank=ranks[0],
                                  world_size=ranks[1])

        return StreamedLoader(samples, normalize=normalize, workers=workers, device=device, batches=batches)

    evals = {"test": loader(data.test, eval_tf, False, cfg.eval_batch_size)}
    if data.val is not None:
        evals["val"] = loader(data.val, eval_tf, False, cfg.eval_batch_size)
    return loader(data.train, train_tf, True, batch_size), evals
