"""Element masks for the sparse-perturbation scopes (SPEC §1), the paper's "it is not just sparsity" control.

A mask keeps exactly ``k = round((1 - sparsity) · N)`` of the ``N`` candidate elements, chosen over all
candidate tensors together (a global choice, as in SSAM):

- ``random``: a fixed uniformly random mask.
- ``ssam-f`` (Mi et al. 2022): the top-k elements of the empirical Fisher ``Σ g²``, estimated on the samples
  the caller feeds to :meth:`normsam.SAM.refresh_masks`, refreshed on the caller's schedule.
- ``ssam-d``: a random initial mask; every few steps the ``n`` active elements with the smallest ``|g|`` are
  dropped and ``n`` random inactive ones are grown, ``n = k · drop_rate_t`` on a cosine schedule.

Masks are boolean tensors shaped like their parameters. The functions here work on flat views and split back;
:class:`ElementMasks` is the piece :class:`normsam.SAM` composes: the masks of its perturbed tensors, SSAM-D's
schedule, the random generator, and their part of the ``state_dict``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from normsam.optim.running_stats import RunningStatsFreezer, running_stat_modules

__all__ = ["keep_count", "random_masks", "topk_masks", "drop_and_regrow", "cosine_drop_rate", "fisher_scores",
           "check_fisher_refresh", "ElementMasks"]


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


def check_fisher_refresh(mask_scope: str | None, scope: Any, model: nn.Module | None) -> None:
    """``refresh_masks()`` is SSAM-F's, and needs the model."""
    if mask_scope != "ssam-f":
        raise ValueError(f"refresh_masks() is for scope='ssam-f'; scope={scope!r} " + (
            "updates its mask itself every mask_interval steps." if mask_scope == "ssam-d" else "has no data-driven mask."))
    if model is None:
        raise ValueError("refresh_masks() needs the model: pass it to SAM as params or model=.")


def fisher_scores(model: nn.Module, targets: Sequence[Tensor], batches: Iterable[tuple[Tensor, Tensor]],
                  loss_fn: Callable[[Tensor, Tensor], Tensor]) -> list[Tensor]:
    """The empirical Fisher ``Σ g²`` of ``targets`` over ``batches`` (each the square of its mean-loss gradient;
    batches of size 1 give the per-sample Fisher), with ``model``'s running statistics left as they were."""
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in targets]
    seen = 0
    snapshot = RunningStatsFreezer(running_stat_modules(model))
    snapshot.save()
    try:
        for inputs, labels in batches:
            with torch.enable_grad():
                grads = torch.autograd.grad(loss_fn(model(inputs), labels), targets, allow_unused=True)
            for acc, g in zip(fisher, grads):
                if g is not None:
                    acc.add_(g.float().square())
            seen += 1
    finally:
        snapshot.restore()
    if seen == 0:
        raise ValueError("refresh_masks() got no batches: pass an iterable of (inputs, labels).")
    return fisher


class ElementMasks:
    """The element masks of a mask scope over a SAM's perturbed (candidate) tensors.

    ``random`` and ``ssam-d`` draw a random mask when the candidates are first known (:meth:`draw`);
    ``ssam-f`` gets its mask from :meth:`set_topk` (``SAM.refresh_masks``); ``ssam-d`` updates its own every
    ``interval`` fresh ascents in :meth:`apply`. Masks are keyed by the parameter itself."""

    def __init__(self, scope: str, sparsity: float, *, interval: int | None = None, total_steps: int | None = None,
                 drop_rate: float = 0.5, seed: int = 0):
        self.scope, self.sparsity = scope, sparsity
        self.interval, self.total_steps, self.drop_rate = interval, total_steps, drop_rate
        self.generator = torch.Generator().manual_seed(seed)
        self.masks: dict[Tensor, Tensor] = {}

    def keep(self, targets: Sequence[Tensor]) -> int:
        return keep_count(sum(p.numel() for p in targets), self.sparsity)

    def draw(self, targets: Sequence[Tensor]) -> None:
        """A random initial mask (``random``, ``ssam-d``)."""
        if self.scope in ("random", "ssam-d"):
            self._set(targets, random_masks(targets, self.keep(targets), self.generator))

    def set_topk(self, targets: Sequence[Tensor], scores: Sequence[Tensor]) -> None:
        """SSAM-F: the mask keeps the top-k ``scores`` (the empirical Fisher) over all targets together."""
        self._set(targets, topk_masks(scores, self.keep(targets)))

    def _set(self, targets: Sequence[Tensor], masks: Sequence[Tensor]) -> None:
        for p, m in zip(targets, masks):
            self.masks[p] = m

    def of(self, params: Sequence[Tensor]) -> list[Tensor | None]:
        return [self.masks.get(p) for p in params]

    def check_ready(self, params: Sequence[Tensor]) -> None:
        if self.scope == "ssam-f" and any(p not in self.masks for p in params):
            raise ValueError(
                "scope='ssam-f' has no Fisher mask yet: call sam.refresh_masks(batches) with a few batches of "
                "training data before the first step (and again on your refresh schedule)."
            )

    def apply(self, params: Sequence[Tensor], grads: Sequence[Tensor | None], finite: Tensor | None, *,
              sam_steps: int, ascent_steps: int) -> tuple[list[Tensor | None], bool]:
        """The masked gradients, and whether SSAM-D updated its mask first. SSAM-D updates every ``interval``
        fresh ascents, from a finite gradient only; that update runs on the host, so those steps sync."""
        updated = False
        if self.scope == "ssam-d" and ascent_steps % self.interval == 0 and (finite is None or bool(finite)):
            rate = cosine_drop_rate(self.drop_rate, sam_steps, self.total_steps)
            dense = [g if g is not None else torch.zeros_like(p) for p, g in zip(params, grads)]
            current = [self.masks[p] for p in params]
            self._set(params, drop_and_regrow(current, dense, round(rate * self.keep(params)), self.generator))
            updated = True
        masked = [g.masked_fill(~self.masks[p], 0) if g is not None else None for p, g in zip(params, grads)]
        return masked, updated

    def state_dict(self, index: dict[int, int]) -> dict[str, Any]:
        """The masks by the position of their parameter (``index``: id → position), and the generator."""
        return {"masks": {index[id(p)]: m.clone() for p, m in self.masks.items()},
                "mask_generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any], params: Sequence[Tensor]) -> None:
        self.masks = {params[int(i)]: m.to(device=params[int(i)].device, dtype=torch.bool)
                      for i, m in state["masks"].items()}
        self.generator.set_state(state["mask_generator"])
