"""Batch augmentation of the in-memory path: random crop + flip (+ AutoAugment) + normalization per batch."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from normsam.train.data.containers import DataSplits, describe_value

#: Names accepted by :func:`make_augment`.
AUGMENTS: tuple[str, ...] = ("none", "crop", "crop-flip", "autoaugment")

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
                f"expected a batch N×{len(self.mean)}×H×W (one mean/std per channel), got {describe_value(images)}."
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
            raise ValueError(f"BatchAugment expects a uint8 batch N×C×H×W, got {describe_value(images)}.")
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
