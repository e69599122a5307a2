r"""Descent rules: the gradient the base optimizer steps with, from the gradients at w and at w + ε.

With ``g = ∇L(w)`` (the ascent pass) and ``g_p = ∇L(w + ε)`` (the second pass), over the *descent set* (the
perturbed tensors; every trainable tensor with ``descent_over="all"``):

``sam`` (SAM)
    the base optimizer steps with ``g_p``.
``gsam`` (GSAM, Zhuang et al., ICLR 2022)
    .. math:: g_\perp = g - \frac{g \cdot g_p}{\lVert g_p \rVert^2}\, g_p, \qquad d = g_p - \alpha\, g_\perp

    (the component of ``g`` orthogonal to ``g_p`` is removed with weight α: descend on the perturbed loss while
    decreasing the surrogate gap). ρ usually follows the learning rate: :class:`normsam.RhoFollowsLR`.
``wsam`` (WSAM, Yue et al., KDD 2023), with ``α = γ / (1 − γ)``
    .. math:: d = g + \alpha\,(g_p - g)

    or, decoupled (the paper's default), the base optimizer steps with ``g`` and then
    ``w ← w − lr · α · (g_p − g)``, as decoupled weight decay.
``looksam`` (LookSAM, Liu et al., CVPR 2022), with ``ascent_interval = k``
    every k-th step is a full SAM step that also stores ``g_v = g_p − (g·g_p / ‖g‖²) g`` (``g_p``'s part
    orthogonal to ``g``); the steps between take no ascent, one pass at ``w``, and descend along
    ``g + α (‖g‖ / ‖g_v‖) g_v``. Norms and cosines over the whole descent set, as the paper's Algorithm 1
    (``reuse_norms="tensor"``: per tensor, as pytorch_optimizer and the paper's layer-wise LookSAM).

A rule sees the tensors through the storage (local shards and global sums under FSDP2, see
:mod:`normsam.optim.storage`) and keeps its state by parameter, in ``SAM.state_dict()``. Dot products and norms
are summed in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from normsam.optim._foreach import grouped

__all__ = ["DESCENTS", "Descent", "GSAMDescent", "WSAMDescent", "LookSAMDescent", "make_descent"]

DESCENTS = ("sam", "gsam", "wsam", "looksam")


class Descent:
    """SAM's own rule: the base optimizer steps with ``g_p`` as it is. Also the interface of the others."""

    name = "sam"
    keeps_gradient = False  #: whether ``g`` (the ascent pass's gradient) is needed after the second pass
    perturbs_between = True  #: steps without a fresh ascent apply the stored ε (False: no perturbation)

    def remember(self, params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
        """Keep ``g`` at w, on a step with a fresh ascent (``params``: the descent set, ``grads`` local)."""

    def before_base_step(self, storage: Any, params: Sequence[Tensor], fresh: bool) -> None:
        """Rewrite the descent set's ``.grad`` (w restored; the base optimizer steps next)."""

    def after_base_step(self, storage: Any, params: Sequence[Tensor]) -> None:
        """Anything the rule does after the base optimizer's step."""

    def state_dict(self, index: dict[int, int]) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any] | None, all_params: Sequence[Tensor]) -> None:
        pass

    def __repr__(self) -> str:
        return self.name


def _saved(by_param: dict[Tensor, Tensor], params: Sequence[Tensor]) -> list[Tensor | None]:
    return [by_param.get(p) for p in params]


def _state_of(by_param: dict[Tensor, Tensor], index: dict[int, int]) -> dict[int, Tensor]:
    return {index[id(p)]: t.clone() for p, t in by_param.items()}


def _load(state: dict[Any, Tensor] | None, all_params: Sequence[Tensor]) -> dict[Tensor, Tensor]:
    return {all_params[int(i)]: t.to(all_params[int(i)].device) for i, t in (state or {}).items()}


def _finite(values: Tensor) -> Tensor:
    """0 where a ratio of norms is undefined (a zero gradient)."""
    return torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)


def _by_group(values: Tensor, like: Sequence[Tensor]) -> list[tuple[list[int], list[Tensor]]]:
    """For each (device, dtype) of ``like``: its indices and their ``values`` as 0-d tensors of that device and
    dtype (one cast per group), the per-tensor scalars a foreach kernel takes."""
    out = []
    for (device, dtype), idx in grouped(list(like)).items():
        picked = values if len(idx) == len(like) else values[idx]
        out.append((idx, list(picked.to(device=device, dtype=dtype).unbind())))
    return out


class _RememberingDescent(Descent):
    """A rule that keeps ``g`` at w between the two passes (one copy of the descent set's gradients)."""

    keeps_gradient = True

    def __init__(self) -> None:
        self.gradient: dict[Tensor, Tensor] = {}

    def remember(self, params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
        self.gradient = {p: g.detach().clone() for p, g in zip(params, grads) if g is not None}

    def _pairs(self, storage: Any, params: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """(params, g, current .grad) over the tensors that have both, the gradients local."""
        grads = storage.current_grads(params)
        pick = [i for i, (p, g) in enumerate(zip(params, grads)) if g is not None and p in self.gradient]
        return [params[i] for i in pick], [self.gradient[params[i]] for i in pick], [grads[i] for i in pick]


class GSAMDescent(_RememberingDescent):
    """GSAM: ``d = g_p − α g_⊥``, ``g_⊥ = g − (g·g_p / ‖g_p‖²) g_p``."""

    name = "gsam"

    def __init__(self, alpha: float):
        super().__init__()
        self.alpha = alpha

    def before_base_step(self, storage: Any, params: Sequence[Tensor], fresh: bool) -> None:
        params, g, g_p = self._pairs(storage, params)
        if not params:
            return
        inner = storage.dot(g, g_p, params)
        coef = _finite(inner / storage.dot(g_p, g_p, params))
        # d = g_p − α (g − coef·g_p) = (1 + α·coef)·g_p − α·g, in place on .grad
        for idx in grouped(g_p).values():
            grads, saved = [g_p[i] for i in idx], [g[i] for i in idx]
            torch._foreach_mul_(grads, (1 + self.alpha * coef).to(device=grads[0].device, dtype=grads[0].dtype))
            torch._foreach_add_(grads, saved, alpha=-self.alpha)
        self.gradient = {}

    def __repr__(self) -> str:
        return f"gsam(alpha={self.alpha:g})"


class WSAMDescent(_RememberingDescent):
    """WSAM: ``d = g + α (g_p − g)``; decoupled: step with ``g``, then ``w ← w − lr·α·(g_p − g)``."""

    name = "wsam"

    def __init__(self, gamma: float, decouple: bool = True):
        super().__init__()
        self.gamma, self.decouple = gamma, decouple
        self.alpha = gamma / (1.0 - gamma)
        self.sharpness: dict[Tensor, Tensor] = {}

    def before_base_step(self, storage: Any, params: Sequence[Tensor], fresh: bool) -> None:
        params, g, g_p = self._pairs(storage, params)
        self.sharpness = {}
        for idx in grouped(g_p).values():
            grads, saved = [g_p[i] for i in idx], [g[i] for i in idx]
            if self.decouple:  # keep g_p − g for after the base step, which steps with g
                self.sharpness.update(zip([params[i] for i in idx], torch._foreach_sub(grads, saved)))
                torch._foreach_copy_(grads, saved)
            else:
                torch._foreach_lerp_(grads, saved, 1.0 - self.alpha)  # g_p + (1 − α)(g − g_p) = g + α (g_p − g)
        self.gradient = {}

    @torch.no_grad()
    def after_base_step(self, storage: Any, params: Sequence[Tensor]) -> None:
        if not self.decouple:
            return
        by_step: dict[tuple[Any, ...], tuple[list[Tensor], list[Tensor]]] = {}
        for w, p, lr in zip(storage.local(params), params, storage.learning_rates(params)):
            if p in self.sharpness:
                weights, sharpness = by_step.setdefault((w.device, w.dtype, lr), ([], []))
                weights.append(w)
                sharpness.append(self.sharpness[p])
        for (_, _, lr), (weights, sharpness) in by_step.items():
            torch._foreach_add_(weights, sharpness, alpha=-lr * self.alpha)
        self.sharpness = {}

    def __repr__(self) -> str:
        return f"wsam(gamma={self.gamma:g}, decouple={self.decouple})"


class LookSAMDescent(_RememberingDescent):
    """LookSAM: full steps store ``g_v``; the steps between descend along ``g + α (‖g‖/‖g_v‖) g_v``."""

    name = "looksam"
    perturbs_between = False

    def __init__(self, alpha: float, reuse_norms: str = "global"):
        super().__init__()
        self.alpha, self.reuse_norms = alpha, reuse_norms
        self.orthogonal: dict[Tensor, Tensor] = {}  # g_v, kept until the next full step

    def _sums(self, storage: Any, xs: list[Tensor], ys: list[Tensor], params: list[Tensor]) -> Tensor:
        """x·y per tensor (``reuse_norms="tensor"``) or over all of them: a float64 value per tensor either way."""
        each = storage.squared_norm_each(xs, params) if xs is ys else storage.dot_each(xs, ys, params)
        return each if self.reuse_norms == "tensor" else each.sum().expand(len(xs))

    def before_base_step(self, storage: Any, params: Sequence[Tensor], fresh: bool) -> None:
        if fresh:
            params, g, g_p = self._pairs(storage, params)
            self.orthogonal = {}
            if params:  # g_v = g_p − (g·g_p/‖g‖²) g
                coefs = _finite(self._sums(storage, g, g_p, params) / self._sums(storage, g, g, params))
                for idx, c in _by_group(coefs, g_p):
                    grads, saved = [g_p[i] for i in idx], [g[i] for i in idx]
                    orthogonal = torch._foreach_sub(grads, torch._foreach_mul(saved, c))
                    self.orthogonal.update(zip([params[i] for i in idx], orthogonal))
            self.gradient = {}
            return
        grads = storage.current_grads(params)
        pick = [i for i, (p, g) in enumerate(zip(params, grads)) if g is not None and p in self.orthogonal]
        if not pick:
            return
        params, g, g_v = [params[i] for i in pick], [grads[i] for i in pick], [self.orthogonal[params[i]] for i in pick]
        norms_g, norms_v = self._sums(storage, g, g, params), self._sums(storage, g_v, g_v, params)
        guard = 1e-8 if self.reuse_norms == "tensor" else 0.0  # pytorch_optimizer's ‖g_v‖ + 1e-8, per tensor
        scales = self.alpha * _finite(norms_g.sqrt() / (norms_v.sqrt() + guard))
        for idx, s in _by_group(scales, g):  # g += α (‖g‖/‖g_v‖) g_v
            torch._foreach_add_([g[i] for i in idx], torch._foreach_mul([g_v[i] for i in idx], s))

    def state_dict(self, index: dict[int, int]) -> dict[str, Any] | None:
        return {"orthogonal": _state_of(self.orthogonal, index)}

    def load_state_dict(self, state: dict[str, Any] | None, all_params: Sequence[Tensor]) -> None:
        self.orthogonal = _load((state or {}).get("orthogonal"), all_params)

    def __repr__(self) -> str:
        return f"looksam(alpha={self.alpha:g}, reuse_norms={self.reuse_norms!r})"


def make_descent(variant: str, *, alpha: float | None = None, gamma: float | None = None,
                 decouple: bool | None = None, reuse_norms: str | None = None) -> Descent:
    """The descent rule of a variant (its options were checked by :class:`normsam.SAMOptions`)."""
    if variant == "gsam":
        return GSAMDescent(0.4 if alpha is None else alpha)
    if variant == "wsam":
        return WSAMDescent(0.9 if gamma is None else gamma, True if decouple is None else decouple)
    if variant == "looksam":
        return LookSAMDescent(0.7 if alpha is None else alpha, reuse_norms or "global")
    return Descent()
