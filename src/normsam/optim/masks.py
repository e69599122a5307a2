"""Element masks for the sparse-perturbation scopes (SPEC §1), the paper's "it is not just sparsity" control.

A mask keeps exactly ``k = round((1 - sparsity) · N)`` of the ``N`` candidate elements, chosen over all
candidate tensors together (a global choice, as in SSAM):

- ``random``: a fixed uniformly random mask.
- ``ssam-f`` (Mi et al. 2022): the top-k elements of the empirical Fisher ``Σ g²``, estimated on the samples
  the caller feeds to :meth:`normsam.SAM.refresh_masks`, refreshed on the caller's schedule.
- ``ssam-d``: a random initial mask; every few steps the ``n`` active elements with the smallest ``|g|`` are
  dropped and ``n`` random inactive ones are grown, ``n = k · drop_rate_t`` on a cosine schedule.

Masks are boolean tensors shaped like their parameters. The functions here work on flat views and split back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["keep_count", "random_masks", "topk_masks", "drop_and_regrow", "cosine_drop_rate"]


def keep_count(total: int, sparsity: float) -> int:
    """How many of ``total`` elements a mask at ``sparsity`` keeps (at least 1, or a ValueError)."""
    keep = round((1.0 - sparsity) * total)
    if keep < 1:
        raise ValueError(
            f"sparsity={sparsity} keeps no element of the {total:,} candidates; "
            f"use a sparsity below {1 - 0.5 / total:.8f}."
        )
    return keep


def _split(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    pieces = torch.split(flat, [t.numel() for t in like])
    return [p.view_as(t).to(t.device) for p, t in zip(pieces, like)]


def random_masks(params: Sequence[Tensor], keep: int, generator: torch.Generator) -> list[Tensor]:
    """A uniformly random mask over ``params`` with exactly ``keep`` True elements."""
    total = sum(p.numel() for p in params)
    flat = torch.zeros(total, dtype=torch.bool)
    flat[torch.randperm(total, generator=generator)[:keep]] = True
    return _split(flat, params)


def topk_masks(scores: Sequence[Tensor], keep: int) -> list[Tensor]:
    """True at the ``keep`` largest scores over all tensors together."""
    flat_scores = torch.cat([s.detach().reshape(-1).float().cpu() for s in scores])
    flat = torch.zeros(flat_scores.numel(), dtype=torch.bool)
    flat[torch.topk(flat_scores, keep, sorted=False).indices] = True
    return _split(flat, scores)


def drop_and_regrow(
    masks: Sequence[Tensor], grads: Sequence[Tensor], count: int, generator: torch.Generator
) -> list[Tensor]:
    """SSAM-D's update: drop the ``count`` active elements with the smallest ``|g|``, grow ``count`` random
    elements that were inactive before the drop. The number of active elements is unchanged."""
    active = torch.cat([m.reshape(-1).cpu() for m in masks])
    if count <= 0:
        return [m.clone() for m in masks]
    inactive_idx = (~active).nonzero().squeeze(1)
    count = min(count, int(active.sum()), inactive_idx.numel())
    magnitude = torch.cat([g.detach().reshape(-1).abs().float().cpu() for g in grads])
    magnitude[~active] = math.inf
    new = active.clone()
    new[torch.topk(magnitude, count, largest=False, sorted=False).indices] = False
    new[inactive_idx[torch.randperm(inactive_idx.numel(), generator=generator)[:count]]] = True
    return _split(new, masks)


def cosine_drop_rate(base_rate: float, step: int, total_steps: int) -> float:
    """``base_rate · (1 + cos(π · step / total_steps)) / 2``, clamped at 0 after ``total_steps``."""
    progress = min(step / total_steps, 1.0)
    return base_rate * 0.5 * (1.0 + math.cos(math.pi * progress))
