"""The containers of the in-memory data path (:class:`ArrayDataset`, :class:`DataSplits`) and the data errors."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Union

import torch

__all__ = ["PathLike", "DatasetNotFoundError", "CorruptDataError", "ArrayDataset", "DataSplits", "describe_value"]

PathLike = Union[str, os.PathLike]


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
                f"{describe_value(self.images)}; convert with (x * 255).round().clamp(0, 255).to(torch.uint8)."
            )
        if not isinstance(self.labels, torch.Tensor) or self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(
                f"ArrayDataset.labels must be an int64 tensor of shape N, got {describe_value(self.labels)}; "
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


def describe_value(x: object) -> str:
    """What ``x`` is, for an error message: ``"<dtype> tensor of shape (…)"`` for a tensor, else its type's name."""
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
