r"""Transforms of the ascent direction, applied before ε is made from it.

``centralize`` (GCSAM; pytorch_optimizer's ``use_gc``)
    every direction tensor of dimension > 1 loses its mean over all dims but the first (each output unit's
    fan-in): :math:`d \leftarrow d - \operatorname{mean}_{1..}(d)`. Vectors (biases, norm layers' γ and β) are
    left as they are, so for SAM-ON it changes nothing.
``friendly`` (Friendly-SAM, Li et al., CVPR 2024), with σ and λ
    .. math:: d_t = g_t - \sigma\, m_{t-1}, \qquad m_t = \lambda\, m_{t-1} + (1 - \lambda)\, g_t

    the ascent direction is the gradient minus (σ times) its exponential average; on the first step
    ``d = g`` and ``m = g``, as the official code. The average is kept per perturbed tensor and is part of
    ``SAM.state_dict()``.

Each transform works on the perturbed tensors' local directions (FSDP2: a ``Shard(0)`` shard holds whole rows,
so the centralization's per-row mean is local) and has a plain loop (the reference) and a ``torch._foreach_*``
path, tested against each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from normsam.optim._foreach import grouped

__all__ = ["Centralize", "FriendlyMomentum", "make_transforms"]


class Centralize:
    """GCSAM: centralize every direction tensor of dimension > 1."""

    name = "centralize"

    def apply(self, params: Sequence[Tensor], grads: list[Tensor | None]) -> list[Tensor | None]:
        return [g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True) if g is not None and g.dim() > 1 else g
                for g in grads]

    def state_dict(self, index: dict[int, int]) -> None:
        return None

    def load_state_dict(self, state: Any, all_params: Sequence[Tensor]) -> None:
        pass

    def __repr__(self) -> str:
        return "centralize"


class FriendlyMomentum:
    """Friendly-SAM: ``d = g − σ·m``, ``m ← λ·m + (1 − λ)·g`` (``m = g`` and ``d = g`` the first time)."""

    name = "friendly"

    def __init__(self, sigma: float = 1.0, lmbda: float = 0.9, *, foreach: bool = True):
        self.sigma, self.lmbda, self.foreach = sigma, lmbda, foreach
        self.momentum: dict[Tensor, Tensor] = {}

    def apply(self, params: Sequence[Tensor], grads: list[Tensor | None]) -> list[Tensor | None]:
        out = list(grads)
        ready = [i for i, (p, g) in enumerate(zip(params, grads)) if g is not None and p in self.momentum]
        for i, (p, g) in enumerate(zip(params, grads)):
            if g is not None and p not in self.momentum:  # the first step: d = g, m = g
                self.momentum[p] = g.detach().clone()
        if not self.foreach:
            for i in ready:
                m = self.momentum[params[i]]
                out[i] = grads[i] - self.sigma * m
                m.lerp_(grads[i], 1.0 - self.lmbda)
            return out
        for idx in grouped([grads[i] for i in ready]).values():
            pick = [ready[j] for j in idx]
            gs, ms = [grads[i] for i in pick], [self.momentum[params[i]] for i in pick]
            for i, d in zip(pick, torch._foreach_sub(gs, ms, alpha=self.sigma)):
                out[i] = d
            torch._foreach_lerp_(ms, gs, 1.0 - self.lmbda)
        return out

    def state_dict(self, index: dict[int, int]) -> dict[int, Tensor]:
        return {index[id(p)]: m.clone() for p, m in self.momentum.items()}

    def load_state_dict(self, state: dict[Any, Tensor] | None, all_params: Sequence[Tensor]) -> None:
        self.momentum = {all_params[int(i)]: m.to(all_params[int(i)].device) for i, m in (state or {}).items()}

    def __repr__(self) -> str:
        return f"friendly(sigma={self.sigma:g}, lmbda={self.lmbda:g})"


def make_transforms(*, centralize: bool, variant: str, sigma: float | None, lmbda: float | None,
                    foreach: bool) -> list[Centralize | FriendlyMomentum]:
    """The direction transforms of a set of options, in the order they apply."""
    out: list[Centralize | FriendlyMomentum] = []
    if centralize:
        out.append(Centralize())
    if variant == "friendly-sam":
        out.append(FriendlyMomentum(1.0 if sigma is None else sigma, 0.9 if lmbda is None else lmbda,
                                    foreach=foreach))
    return out
