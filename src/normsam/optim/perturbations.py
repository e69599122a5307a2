r"""Perturbation models: how the ascent gradient :math:`g` becomes the weight perturbation :math:`\varepsilon`.

Every model is a per-element scaling :math:`T` (SPEC §1):

.. math::

    \text{ℓ2 models:}\quad \varepsilon = \rho\,\frac{T^2 \odot g}{\lVert T \odot g \rVert_2}, \qquad
    \text{ℓ∞ model:}\quad \varepsilon = \rho\, T \odot \operatorname{sign}(g)

with the norm taken over the perturbed set only (``norm_over="perturbed"``) or over every parameter that has
a gradient (``norm_over="all"``, the SSAM convention). A zero norm gives :math:`\varepsilon = 0`.

=============  ======================================  ==================
name           T (element i of tensor p)               default η
=============  ======================================  ==================
``sam``        1                                       --
``asam``       \|w_i\| + η                             0.01
``layerwise``  ‖p‖₂ + η (one scalar per tensor)        0.01
``linf``       \|w_i\| + η                             0.01
``fisher``     (1 + η·g_i²)^(-1/2)                     1.0
=============  ======================================  ==================

Weight-dependent scalings (asam, layerwise, linf) apply to bias tensors only with ``normalize_bias=True``;
otherwise a bias gets T = 1, as in ASAM. Fisher's T depends only on g and applies to every tensor.

This module is the functional core of :class:`normsam.SAM`: :func:`perturbation` dispatches to a plain
per-tensor loop (the reference) or a ``torch._foreach_*`` version grouped by device and dtype.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PerturbationModel", "PERTURBATIONS", "get_perturbation", "perturbation"]


# --- The scalings T, one short function each (a per-tensor reference and its foreach twin). ------------


def _asam_scale(w: Tensor, g: Tensor, eta: float) -> Tensor:
    return w.abs() + eta


def _asam_scale_foreach(ws: list[Tensor], gs: list[Tensor], eta: float) -> list[Tensor]:
    scale = torch._foreach_abs(ws)
    torch._foreach_add_(scale, eta)
    return scale


def _layerwise_scale(w: Tensor, g: Tensor, eta: float) -> Tensor:
    return torch.linalg.vector_norm(w) + eta  # a 0-d tensor: one scale per tensor


def _layerwise_scale_foreach(ws: list[Tensor], gs: list[Tensor], eta: float) -> list[Tensor]:
    scale = list(torch._foreach_norm(ws))
    torch._foreach_add_(scale, eta)
    return scale


def _fisher_scale(w: Tensor, g: Tensor, eta: float) -> Tensor:
    return torch.rsqrt(1 + eta * g * g)


def _fisher_scale_foreach(ws: list[Tensor], gs: list[Tensor], eta: float) -> list[Tensor]:
    scale = torch._foreach_mul(gs, gs)
    torch._foreach_mul_(scale, eta)
    torch._foreach_add_(scale, 1.0)
    torch._foreach_rsqrt_(scale)
    return scale


ScaleFn = Callable[[Tensor, Tensor, float], Tensor]
ScaleForeachFn = Callable[[list[Tensor], list[Tensor], float], list[Tensor]]


@dataclass(frozen=True)
class PerturbationModel:
    """A perturbation model: its scaling T, its geometry and its default η."""

    name: str
    geometry: str  # "l2" or "linf"
    default_eta: float
    weight_dependent: bool  # T depends on w: biases get T = 1 unless normalize_bias
    scale: ScaleFn | None  # None: T = 1
    scale_foreach: ScaleForeachFn | None

    def scales(self, is_bias: bool, normalize_bias: bool) -> bool:
        """Whether T applies to a tensor (otherwise T = 1)."""
        if self.scale is None:
            return False
        return not (self.weight_dependent and is_bias and not normalize_bias)


PERTURBATIONS: dict[str, PerturbationModel] = {
    m.name: m
    for m in (
        PerturbationModel("sam", "l2", 0.0, False, None, None),
        PerturbationModel("asam", "l2", 0.01, True, _asam_scale, _asam_scale_foreach),
        PerturbationModel("layerwise", "l2", 0.01, True, _layerwise_scale, _layerwise_scale_foreach),
        PerturbationModel("linf", "linf", 0.01, True, _asam_scale, _asam_scale_foreach),
        PerturbationModel("fisher", "l2", 1.0, False, _fisher_scale, _fisher_scale_foreach),
    )
}


def get_perturbation(name: str) -> PerturbationModel:
    try:
        return PERTURBATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown perturbation {name!r}; valid ones are {', '.join(map(repr, PERTURBATIONS))}."
        ) from None


# --- ε from (g, w): the reference loop and the foreach path. --------------------------------------------


def perturbation(
    grads: Sequence[Tensor],
    weights: Sequence[Tensor],
    *,
    model: PerturbationModel,
    rhos: Sequence[float],
    eta: float,
    scaled: Sequence[bool],
    extra_grads: Sequence[Tensor] = (),
    extra_weights: Sequence[Tensor] = (),
    extra_scaled: Sequence[bool] = (),
    foreach: bool = True,
) -> list[Tensor]:
    """ε for each perturbed tensor.

    Args:
        grads: ascent gradients of the perturbed tensors, already masked for element scopes.
        weights: the perturbed tensors (read only).
        model: the perturbation model.
        rhos: ρ per tensor (a group may carry its own ρ).
        eta: η of the scaling.
        scaled: per tensor, whether T applies (see :meth:`PerturbationModel.scales`).
        extra_grads, extra_weights, extra_scaled: gradients outside the perturbed set that enter the
            ℓ2 norm only (``norm_over="all"``); empty for ``norm_over="perturbed"``.
        foreach: use the ``torch._foreach_*`` path instead of the plain loop.
    """
    if not (len(grads) == len(weights) == len(rhos) == len(scaled)):
        raise ValueError("perturbation(): grads, weights, rhos and scaled must have the same length.")
    if not (len(extra_grads) == len(extra_weights) == len(extra_scaled)):
        raise ValueError("perturbation(): extra_grads, extra_weights and extra_scaled must have the same length.")
    impl = _perturbation_foreach if foreach else _perturbation_loop
    return impl(grads, weights, model, rhos, eta, scaled, extra_grads, extra_weights, extra_scaled)


def _safe_inverse(norm: Tensor) -> Tensor:
    """1 / norm, or 0 when the norm is 0 (then every scaled gradient is 0 and so is ε). No host sync."""
    return torch.where(norm > 0, norm.reciprocal(), torch.zeros_like(norm))


def _perturbation_loop(grads, weights, model, rhos, eta, scaled, extra_grads, extra_weights, extra_scaled):
    def times_scale(x: Tensor, w: Tensor, g: Tensor, apply: bool) -> Tensor:
        return x * model.scale(w, g, eta) if apply else x

    if model.geometry == "linf":
        return [
            rho * times_scale(torch.sign(g), w, g, s) for g, w, rho, s in zip(grads, weights, rhos, scaled)
        ]
    # ℓ2: u = T⊙g, ε = ρ·T⊙u / ‖u‖
    u = [times_scale(g, w, g, s) for g, w, s in zip(grads, weights, scaled)]
    u_extra = [times_scale(g, w, g, s) for g, w, s in zip(extra_grads, extra_weights, extra_scaled)]
    device = _norm_device(grads)
    squares = [torch.zeros((), dtype=torch.float64, device=device)]
    squares += [torch.sum(x.double() * x.double()).to(device) for x in u + u_extra]
    inv = _safe_inverse(torch.sqrt(torch.stack(squares).sum()))
    return [
        (rho * inv.to(g.dtype).to(g.device)) * times_scale(x, w, g, s)
        for x, g, w, rho, s in zip(u, grads, weights, rhos, scaled)
    ]


def _norm_device(tensors: Sequence[Tensor]) -> torch.device:
    return tensors[0].device if tensors else torch.device("cpu")


def _grouped(tensors: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), as foreach kernels need."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[(t.device, t.dtype)].append(i)
    return groups


def _scales_foreach(ws, gs, scaled, model, eta) -> list[Tensor | None]:
    """T for every tensor where it applies, ``None`` (T = 1) elsewhere; foreach per (device, dtype)."""
    scales: list[Tensor | None] = [None] * len(ws)
    idx = [i for i, s in enumerate(scaled) if s]
    for _, sub in _grouped([ws[i] for i in idx]).items():
        pick = [idx[j] for j in sub]
        for i, t in zip(pick, model.scale_foreach([ws[i] for i in pick], [gs[i] for i in pick], eta)):
            scales[i] = t
    return scales


def _times_scales(xs: list[Tensor], scales: list[Tensor | None]) -> list[Tensor]:
    """T ⊙ x as new tensors where T applies; x itself (not a copy) where T = 1."""
    out = list(xs)
    idx = [i for i, t in enumerate(scales) if t is not None]
    for _, sub in _grouped([xs[i] for i in idx]).items():
        pick = [idx[j] for j in sub]
        for i, y in zip(pick, torch._foreach_mul([xs[i] for i in pick], [scales[i] for i in pick])):
            out[i] = y
    return out


def _perturbation_foreach(grads, weights, model, rhos, eta, scaled, extra_grads, extra_weights, extra_scaled):
    grads, weights = list(grads), list(weights)
    scales = _scales_foreach(weights, grads, scaled, model, eta)
    if model.geometry == "linf":
        return _times_rho(_times_scales(list(torch._foreach_sign(grads)), scales), rhos)
    # ℓ2: u = T⊙g, ε = ρ·T⊙u / ‖u‖ (the norm also over the extra gradients for norm_over="all")
    u = _times_scales(grads, scales)
    extra = list(extra_grads)
    u_extra = _times_scales(extra, _scales_foreach(list(extra_weights), extra, extra_scaled, model, eta))
    device = _norm_device(grads)
    squares = [torch.zeros((), dtype=torch.float64, device=device)]
    for tensors in (u, u_extra):
        for _, sub in _grouped(tensors).items():
            norms = torch._foreach_norm([tensors[i] for i in sub])
            squares.append(torch.stack(norms).double().square().sum().to(device))
    inv = _safe_inverse(torch.sqrt(torch.stack(squares).sum()))
    eps = _times_scales(u, scales)
    eps = [e.clone() if e is g else e for e, g in zip(eps, grads)]  # never scale the caller's gradient
    for (dev, dtype), sub in _grouped(eps).items():
        torch._foreach_mul_([eps[i] for i in sub], inv.to(device=dev, dtype=dtype))
    return _times_rho(eps, rhos)


def _times_rho(eps: list[Tensor], rhos: Sequence[float]) -> list[Tensor]:
    for _, sub in _grouped(eps).items():
        torch._foreach_mul_([eps[i] for i in sub], [float(rhos[i]) for i in sub])
    return eps
