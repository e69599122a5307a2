"""``load_data``: read a data set into memory, then take the subset, the validation split and the label noise."""

from __future__ import annotations

from typing import NamedTuple

from normsam.train.data.containers import ArrayDataset, CorruptDataError, DataSplits, PathLike
from normsam.train.data.readers import (
    IDX_DATASETS,
    PUBLISHED_STATS,
    channel_stats,
    load_cifar,
    load_idx_dataset,
    load_imagefolder,
    make_synthetic,
)
from normsam.train.data.splits import flip_labels, stratified_split_indices, stratified_subset_indices

#: Names accepted by :func:`load_data`.
DATASETS: tuple[str, ...] = ("fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder", "synthetic")


class DataShape(NamedTuple):
    """What a model needs to know about a data set: its classes and its images' channels and side length."""

    num_classes: int
    in_channels: int
    image_size: int


#: The shape of the data sets whose shape is fixed by their definition, known before (and without) their files:
#: what ``normsam train --dry-run`` plans with when the data is not on disk yet, and what :func:`load_data`
#: checks the files against (so a plan made without the files is the plan made with them).
KNOWN_SHAPES: dict[str, DataShape] = {
    "fashion-mnist": DataShape(num_classes=10, in_channels=1, image_size=28),
    "mnist": DataShape(num_classes=10, in_channels=1, image_size=28),
    "cifar10": DataShape(num_classes=10, in_channels=3, image_size=32),
    "cifar100": DataShape(num_classes=100, in_channels=3, image_size=32),
}

#: The side length of ``imagefolder`` images held in memory when ``image_size`` is not given.
IMAGEFOLDER_IMAGE_SIZE = 64

# --------------------------------------------------------------------------------------------------------
# load_data
# --------------------------------------------------------------------------------------------------------


def canonical_name(name: str) -> str:
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
    key = canonical_name(name)
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

    known = KNOWN_SHAPES.get(key)
    if known is not None and image_size not in (None, known.image_size):
        raise ValueError(
            f"{key} images are {known.image_size}×{known.image_size}; image_size={image_size} is not supported "
            f"for it (resizing only applies to imagefolder and synthetic). Leave image_size unset."
        )

    if key in IDX_DATASETS:
        train, test, classes, source = load_idx_dataset(key, data_dir, download)
    elif key in ("cifar10", "cifar100"):
        train, test, classes, source = load_cifar(key, data_dir, download)
    elif key == "imagefolder":
        train, test, classes, source = load_imagefolder(data_dir, image_size or IMAGEFOLDER_IMAGE_SIZE)
    else:  # synthetic
        if (
            len(synthetic_size) != 2
            or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in synthetic_size)
        ):
            raise ValueError(
                f"synthetic_size must be (n_train, n_test) with positive ints, got {synthetic_size!r}."
            )
        train, test = make_synthetic((synthetic_size[0], synthetic_size[1]), seed, image_size or 32)
        classes = [f"class{i}" for i in range(10)]
        source = "synthetic"

    num_classes = len(classes)
    if known is not None:
        found = DataShape(num_classes, int(train.images.shape[1]), int(train.images.shape[-1]))
        square = train.images.shape[-2] == train.images.shape[-1] and test.images.shape[1:] == train.images.shape[1:]
        if found != known or not square:
            raise CorruptDataError(
                f"{source} does not hold {key}: {num_classes} classes of {tuple(train.images.shape[1:])} images "
                f"(test: {tuple(test.images.shape[1:])}), where {key} has {known.num_classes} classes of "
                f"{(known.in_channels, known.image_size, known.image_size)} images; replace the files with the real "
                f"data set (or use data=imagefolder for other images)."
            )
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

    if key in PUBLISHED_STATS:
        mean, std = PUBLISHED_STATS[key]
    else:
        mean, std = channel_stats(train.images)

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
