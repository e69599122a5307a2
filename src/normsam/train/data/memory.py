"""The in-memory loader: batches of an :class:`ArrayDataset`, shuffled and augmented per ``(seed, epoch)``."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from normsam.train.data.augment import BatchAugment
from normsam.train.data.containers import ArrayDataset
from normsam.train.data.splits import data_generator

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
            order = torch.randperm(n, generator=data_generator(self.seed, 3, epoch))
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
        gen = data_generator(self.seed, 4, self.epoch)
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
