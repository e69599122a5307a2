"""Stratified subsets, label noise and validation splits, and the seed derivation they share."""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "derive_data_seed", "data_generator", "stratified_subset_indices", "flip_labels", "stratified_split_indices",
]

# --------------------------------------------------------------------------------------------------------
# Stratified subsets and splits
# --------------------------------------------------------------------------------------------------------


def derive_data_seed(*parts: int) -> int:
    """A 63-bit seed that depends on all of ``parts`` (so different streams do not collide).

    The data layer's seed derivation: ``parts`` are a run's seed, a number naming the stream (the subset, the
    validation split, an epoch's shuffle, its augmentation, …) and whatever else the stream depends on (epoch,
    rank, example). Each part is taken modulo 2⁶⁴ into a :class:`numpy.random.SeedSequence`; two of its 32-bit
    words make the seed. The subsets, splits, batches and shards of every run depend on these exact values.
    """
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def data_generator(*parts: int) -> torch.Generator:
    """A new CPU ``torch.Generator`` seeded with :func:`derive_data_seed` of ``parts``."""
    return torch.Generator().manual_seed(derive_data_seed(*parts))


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
    by_class = _shuffled_indices_by_class(labels, num_classes, data_generator(seed, 1))
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
    gen = data_generator(seed, 3)
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
    by_class = _shuffled_indices_by_class(labels, num_classes, data_generator(seed, 2))
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
