"""SAM's variants under the names users know, with pytorch_optimizer's hyperparameter names.

Each function returns a :class:`normsam.SAM` composed of the pieces the variant changes (a descent rule, a
direction transform, a schedule), so ``repr`` and ``describe()`` say what it is, and every variant takes
normsam's ``scope`` (SAM-ON by default when given the model: GSAM-ON, LookSAM-ON, …), perturbation models, AMP,
DDP, FSDP2, ``state_dict`` and the runner's keys like SAM itself.

``adaptive=True`` is ``perturbation="asam"`` with η = 0 and ``normalize_bias=True`` (pytorch_optimizer's ``adaptive``:
T = |w| on every tensor, biases included); ``use_gc=True`` is ``centralize=True`` (GCSAM). Every other keyword goes to :class:`normsam.SAM` (its options, then the base
optimizer's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from normsam.optim.rho_schedules import RhoFollowsLR
from normsam.optim.sam import SAM

__all__ = ["GSAM", "WSAM", "LookSAM", "FriendlySAM", "GCSAM"]

Params = nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]]
Base = Callable[..., torch.optim.Optimizer]


def _aliases(kwargs: dict[str, Any], adaptive: bool, use_gc: bool) -> dict[str, Any]:
    if adaptive:
        if kwargs.get("perturbation", "asam") != "asam":
            raise ValueError(f"adaptive=True is perturbation='asam' (T = |w|); it conflicts with "
                             f"perturbation={kwargs['perturbation']!r}: pass one of them.")
        kwargs = {"eta": 0.0, "normalize_bias": True, **kwargs, "perturbation": "asam"}
    if use_gc:
        kwargs = {**kwargs, "centralize": True}
    return kwargs


def GSAM(params: Params, base_optimizer: Base, *, alpha: float = 0.4, rho_min: float | None = None,
         lr_min: float = 0.0, adaptive: bool = False, use_gc: bool = False, **kwargs: Any) -> SAM:
    """GSAM (Zhuang et al., ICLR 2022): descend along ``g_p − α g_⊥`` (:mod:`normsam.optim.descent`).

    ``rho_min``: ρ follows the learning rate from ``rho`` (at the group's initial lr) down to ``rho_min`` (at
    ``lr_min``), GSAM's schedule (:class:`normsam.RhoFollowsLR`); ``None``: a constant ρ.

    Example:
        ```python
        import torch
        import torch.nn.functional as F
        import normsam

        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
        gsam = normsam.GSAM(model, torch.optim.SGD, rho=0.5, alpha=0.4, lr=0.1)   # GSAM-ON: the norm layers
        x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))

        def closure():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        gsam.step(closure)
        assert gsam.options.variant == "gsam" and gsam.counters["sam_steps"] == 1
        ```
    """
    kwargs = _aliases(kwargs, adaptive, use_gc)
    if rho_min is not None:
        if kwargs.get("rho_schedule") is not None:
            raise ValueError("GSAM(rho_min=...) is a rho_schedule (rho following the lr): pass one of them.")
        kwargs["rho_schedule"] = RhoFollowsLR(rho_min=rho_min, lr_min=lr_min)
    return SAM(params, base_optimizer, variant="gsam", alpha=alpha, **kwargs)


def WSAM(params: Params, base_optimizer: Base, *, gamma: float = 0.9, decouple: bool = True,
         adaptive: bool = False, use_gc: bool = False, **kwargs: Any) -> SAM:
    """WSAM (Yue et al., KDD 2023): ``g + α (g_p − g)``, α = γ/(1 − γ); decoupled by default."""
    return SAM(params, base_optimizer, variant="wsam", gamma=gamma, decouple=decouple,
               **_aliases(kwargs, adaptive, use_gc))


def LookSAM(params: Params, base_optimizer: Base, *, k: int = 10, alpha: float = 0.7, reuse_norms: str = "global",
            adaptive: bool = False, use_gc: bool = False, **kwargs: Any) -> SAM:
    """LookSAM (Liu et al., CVPR 2022): a full SAM step every ``k`` steps; between them one pass at w and the
    stored orthogonal gradient added with weight ``α ‖g‖/‖g_v‖``. ``reuse_norms="tensor"``: norms per tensor, as
    pytorch_optimizer (the paper's Algorithm 1 takes them over all weights)."""
    if "ascent_interval" in kwargs:
        raise ValueError("LookSAM's k is its ascent interval: pass k=..., not ascent_interval.")
    return SAM(params, base_optimizer, variant="looksam", ascent_interval=k, alpha=alpha, reuse_norms=reuse_norms,
               **_aliases(kwargs, adaptive, use_gc))


def FriendlySAM(params: Params, base_optimizer: Base, *, sigma: float = 1.0, lmbda: float = 0.9,
                adaptive: bool = False, use_gc: bool = False, **kwargs: Any) -> SAM:
    """Friendly-SAM (Li et al., CVPR 2024): the ascent direction is ``g − σ·m``, ``m`` the gradient's average."""
    return SAM(params, base_optimizer, variant="friendly-sam", sigma=sigma, lmbda=lmbda,
               **_aliases(kwargs, adaptive, use_gc))


def GCSAM(params: Params, base_optimizer: Base, *, adaptive: bool = False, **kwargs: Any) -> SAM:
    """GCSAM: SAM whose ascent gradient is centralized (pytorch_optimizer's ``SAM(use_gc=True)``)."""
    return SAM(params, base_optimizer, **_aliases(kwargs, adaptive, use_gc=True))
