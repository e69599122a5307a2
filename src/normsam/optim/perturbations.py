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

The official SAM-ON code differs in two conventions; both are options (SPEC §1), normsam's are the defaults:

- ``layerwise_scaling="official"``: T = ‖p‖₂·(1 + η) instead of ``"additive"`` ‖p‖₂ + η (equal at η = 0);
- ``scaled_tensors="name-contains-weight"``: the weight-dependent T applies only to tensors whose *name
  contains* ``weight`` (so ``pos_embed``, ``cls_token`` or a layer-scale ``gamma`` get T = 1), instead of
  ``"not-bias"``: every tensor except those whose name ends in ``bias``.

This module is the functional core of :class:`normsam.SAM`. The math of each model is its scaling T, one
line each below; :func:`epsilon_reference` applies the formulas above tensor by tensor (the documented
reference) and :func:`epsilon_vectorized` computes the same with ``torch._foreach_*`` kernels grouped by
device and dtype (:func:`perturbation` picks one). The vectorized path also serves SAM-ON's flat layout
(:mod:`normsam.optim.storage`: all norm-layer vectors in one buffer), where "T applies" is an elementwise mask
rather than a per-tensor flag.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from normsam.optim._foreach import grouped, norm_device, total_norm

__all__ = [
    "PerturbationModel",
    "PERTURBATIONS",
    "LAYERWISE_SCALINGS",
    "SCALED_TENSORS",
    "Scaled",
    "NormFn",
    "get_perturbation",
    "perturbation",
    "epsilon_reference",
    "epsilon_vectorized",
    "coefficient",
]

LAYERWISE_SCALINGS = ("additive", "official")
SCALED_TENSORS = ("not-bias", "name-contains-weight")


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


def _layerwise_official_scale(w: Tensor, g: Tensor, eta: float) -> Tensor:
    return torch.linalg.vector_norm(w) * (1.0 + eta)


def _layerwise_official_scale_foreach(ws: list[Tensor], gs: list[Tensor], eta: float) -> list[Tensor]:
    scale = list(torch._foreach_norm(ws))
    torch._foreach_mul_(scale, 1.0 + eta)
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
NormFn = Callable[[Sequence[Tensor]], Tensor]  # tensors → their ℓ2 norm, a 0-d float64 tensor
ScaleForeachFn = Callable[[list[Tensor], list[Tensor], float], list[Tensor]]
#: Whether T applies to a tensor: a flag per tensor, or (a flat layout of several tensors) an elementwise mask.
Scaled = bool | Tensor


@dataclass(frozen=True)
class PerturbationModel:
    """A perturbation model: its scaling T, its geometry and its default η."""

    name: str
    geometry: str  # "l2" or "linf"
    default_eta: float
    weight_dependent: bool  # T depends on w: biases get T = 1 unless normalize_bias
    scale: ScaleFn | None  # None: T = 1
    scale_foreach: ScaleForeachFn | None
    elementwise: bool = True  # T_i depends on element i only (not layerwise's norm of the whole tensor)

    def scales(self, is_bias: bool, normalize_bias: bool) -> bool:
        """Whether T applies to a tensor (otherwise T = 1), by normsam's bias rule."""
        if self.scale is None:
            return False
        return not (self.weight_dependent and is_bias and not normalize_bias)

    def applies_to(self, name: str | None, *, normalize_bias: bool, scaled_tensors: str = "not-bias") -> bool:
        """Whether T applies to the tensor called ``name`` (``None``: a bare tensor, treated as a weight).

        ``scaled_tensors="not-bias"``: every tensor but those whose name ends in ``bias``;
        ``"name-contains-weight"`` (the official SAM-ON code): only names that contain ``weight``. With
        ``normalize_bias`` a bias is scaled under either rule.
        """
        if self.scale is None:
            return False
        if not self.weight_dependent or name is None:
            return True
        is_bias = name.endswith("bias")
        if is_bias and normalize_bias:
            return True
        if scaled_tensors == "name-contains-weight":
            return "weight" in name
        return not is_bias


PERTURBATIONS: dict[str, PerturbationModel] = {
    m.name: m
    for m in (
        PerturbationModel("sam", "l2", 0.0, False, None, None),
        PerturbationModel("asam", "l2", 0.01, True, _asam_scale, _asam_scale_foreach),
        PerturbationModel("layerwise", "l2", 0.01, True, _layerwise_scale, _layerwise_scale_foreach, False),
        PerturbationModel("linf", "linf", 0.01, True, _asam_scale, _asam_scale_foreach),
        PerturbationModel("fisher", "l2", 1.0, False, _fisher_scale, _fisher_scale_foreach),
    )
}


def get_perturbation(name: str, *, layerwise_scaling: str = "additive") -> PerturbationModel:
    """The model called ``name``; ``layerwise_scaling="official"`` gives layerwise's T = ‖p‖₂·(1 + η)."""
    try:
        model = PERTURBATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown perturbation {name!r}; valid ones are {', '.join(map(repr, PERTURBATIONS))}."
        ) from None
    if layerwise_scaling not in LAYERWISE_SCALINGS:
        raise ValueError(
            f"Invalid layerwise_scaling: {layerwise_scaling!r}; use 'additive' (T = ||p|| + eta, the default) "
            "or 'official' (T = ||p|| * (1 + eta), the official SAM-ON code)."
        )
    if layerwise_scaling == "official":
        if name != "layerwise":
            raise ValueError(
                f"layerwise_scaling='official' only changes perturbation='layerwise', not {name!r}: "
                "drop the option or use perturbation='layerwise'."
            )
        model = replace(model, scale=_layerwise_official_scale, scale_foreach=_layerwise_official_scale_foreach)
    return model


# --- ε from (g, w): the reference, tensor by tensor, and the vectorized path. --------------------------------


def perturbation(
    grads: Sequence[Tensor],
    weights: Sequence[Tensor],
    *,
    model: PerturbationModel,
    rhos: Sequence[float],
    eta: float,
    scaled: Sequence[Scaled],
    extra_grads: Sequence[Tensor] = (),
    extra_weights: Sequence[Tensor] = (),
    extra_scaled: Sequence[Scaled] = (),
    foreach: bool = True,
    norm_of: NormFn | None = None,
) -> list[Tensor]:
    """ε for each perturbed tensor.

    Args:
        grads: ascent gradients of the perturbed tensors, already masked for element scopes.
        weights: the perturbed tensors (read only).
        model: the perturbation model.
        rhos: ρ per tensor (a group may carry its own ρ).
        eta: η of the scaling.
        scaled: per tensor, whether T applies (see :meth:`PerturbationModel.applies_to`), or a bool tensor
            shaped like it: T where True, 1 elsewhere.
        extra_grads, extra_weights, extra_scaled: gradients outside the perturbed set that enter the
            ℓ2 norm only (``norm_over="all"``); empty for ``norm_over="perturbed"``.
        foreach: use the ``torch._foreach_*`` path instead of the reference.
        norm_of: the ℓ2 norm of ``T⊙g`` over ``grads + extra_grads`` (in that order), a 0-d float64 tensor;
            ``None``: the local norm. Under FSDP2 it is the global norm over every rank's shards
            (:mod:`normsam.optim.sharded`).
    """
    if not (len(grads) == len(weights) == len(rhos) == len(scaled)):
        raise ValueError("perturbation(): grads, weights, rhos and scaled must have the same length.")
    if not (len(extra_grads) == len(extra_weights) == len(extra_scaled)):
        raise ValueError("perturbation(): extra_grads, extra_weights and extra_scaled must have the same length.")
    if not foreach:
        return epsilon_reference(grads, weights, model=model, rhos=rhos, eta=eta, scaled=scaled,
                                 extra_grads=extra_grads, extra_weights=extra_weights, extra_scaled=extra_scaled,
                                 norm_of=norm_of)
    return epsilon_vectorized(grads, weights, model=model, rhos=rhos, eta=eta, scaled=scaled,
                              extra_grads=extra_grads, extra_weights=extra_weights, extra_scaled=extra_scaled,
                              norm_of=norm_of)[0]


def coefficient(rho: float, norm: Tensor, like: Tensor) -> Tensor:
    """ρ / ‖u‖ as a 0-d tensor on ``like``'s device, a few small kernels and no host sync.

    0 where ρ / ‖u‖ is not finite: a zero norm means u = 0 (then ε = 0, not 0·inf = NaN); an inf or NaN norm
    comes from a gradient that overflowed or is not finite, a step :class:`normsam.SAM` skips anyway.
    In ``like``'s dtype, but float32 for half types: ρ / ‖u‖ easily exceeds float16's 65504 (small gradients),
    and a 0-d float32 factor still gives half results, computed in float32."""
    dtype = like.dtype if like.dtype.itemsize >= 4 else torch.float32
    return torch.nan_to_num(rho / norm, nan=0.0, posinf=0.0).to(device=like.device, dtype=dtype)


def epsilon_reference(grads, weights, *, model, rhos, eta, scaled, extra_grads=(), extra_weights=(),
                      extra_scaled=(), norm_of=None) -> list[Tensor]:
    """The formulas of the module docstring, tensor by tensor: ℓ∞ ε = ρ·T⊙sign(g); ℓ2 u = T⊙g, ε = ρ·T⊙u/‖u‖
    with ‖u‖ summed in float64 over the perturbed (and extra) tensors."""

    def times_scale(x: Tensor, w: Tensor, g: Tensor, apply: Scaled) -> Tensor:
        if isinstance(apply, Tensor):
            return x * torch.where(apply, model.scale(w, g, eta), 1.0)
        return x * model.scale(w, g, eta) if apply else x

    if model.geometry == "linf":
        return [rho * times_scale(torch.sign(g), w, g, s) for g, w, rho, s in zip(grads, weights, rhos, scaled)]
    u = [times_scale(g, w, g, s) for g, w, s in zip(grads, weights, scaled)]
    u_extra = [times_scale(g, w, g, s) for g, w, s in zip(extra_grads, extra_weights, extra_scaled)]
    if norm_of is not None:
        norm = norm_of(u + u_extra)
    else:
        device = norm_device(grads)
        squares = [torch.zeros((), dtype=torch.float64, device=device)]
        squares += [torch.sum(x.double() * x.double()).to(device) for x in u + u_extra]
        norm = torch.sqrt(torch.stack(squares).sum())
    eps = []
    for x, g, w, rho, s in zip(u, grads, weights, rhos, scaled):
        coef = coefficient(rho, norm, g)
        # in the coefficient's precision, then rounded once: for half tensors `coef * x` would round the
        # float32 coefficient to half first (overflow); the foreach ops compute in float32 by themselves
        eps.append((times_scale(x, w, g, s).to(coef.dtype) * coef).to(g.dtype))
    return eps


def _scales_foreach(ws, gs, scaled, model, eta, groups) -> list[Tensor | None]:
    """T for every tensor where it applies, ``None`` (T = 1) elsewhere; one foreach call per group. A tensor
    whose ``scaled`` is a mask gets T where the mask holds and 1 elsewhere."""
    scales: list[Tensor | None] = [None] * len(ws)
    for idx in groups:
        pick = [i for i in idx if isinstance(scaled[i], Tensor) or scaled[i]]
        if pick:
            for i, t in zip(pick, model.scale_foreach([ws[i] for i in pick], [gs[i] for i in pick], eta)):
                scales[i] = torch.where(scaled[i], t, 1.0) if isinstance(scaled[i], Tensor) else t
    return scales


def _times_scales(xs: list[Tensor], scales: list[Tensor | None], groups) -> list[Tensor]:
    """T ⊙ x as new tensors where T applies; x itself (not a copy) where T = 1."""
    out = list(xs)
    for idx in groups:
        pick = [i for i in idx if scales[i] is not None]
        if pick:
            for i, y in zip(pick, torch._foreach_mul([xs[i] for i in pick], [scales[i] for i in pick])):
                out[i] = y
    return out


def _by_rho(idx: list[int], rhos: Sequence[float]) -> dict[float, list[int]]:
    by: dict[float, list[int]] = defaultdict(list)
    for i in idx:
        by[float(rhos[i])].append(i)
    return by


def epsilon_vectorized(
    grads, weights, *, model, rhos, eta, scaled, extra_grads=(), extra_weights=(), extra_scaled=(), groups=None,
    extra_groups=None, norm_of=None,
) -> tuple[list[Tensor], Tensor | None]:
    """:func:`epsilon_reference` with ``torch._foreach_*`` kernels: ε as new tensors (never the caller's
    gradients), and for ℓ2 models the norm ‖T⊙g‖ over the perturbed (and extra) tensors, a 0-d float64 tensor
    the caller may reuse. ``groups``: indices per (device, dtype), when known already.

    Passes over the gradients (SAM-all with ``sam``: one norm pass and one multiply): the coefficient
    ρ / ‖T⊙g‖ is a 0-d device tensor per (group, ρ), so ε = coefficient · T²⊙g is one foreach multiply for
    T = 1 tensors and two for scaled ones.
    """
    grads, weights, extra = list(grads), list(weights), list(extra_grads)
    groups = list(grouped(grads).values()) if groups is None else groups
    extra_groups = list(grouped(extra).values()) if extra_groups is None else extra_groups
    scales = _scales_foreach(weights, grads, scaled, model, eta, groups)
    eps: list[Tensor] = [None] * len(grads)  # type: ignore[list-item]
    if model.geometry == "linf":
        for idx in groups:
            signs = list(torch._foreach_sign([grads[i] for i in idx]))
            pick = [j for j, i in enumerate(idx) if scales[i] is not None]
            if pick:
                torch._foreach_mul_([signs[j] for j in pick], [scales[idx[j]] for j in pick])
            torch._foreach_mul_(signs, [float(rhos[i]) for i in idx])
            for i, e in zip(idx, signs):
                eps[i] = e
        return eps, None
    # ℓ2: u = T⊙g, ε = ρ·T⊙u / ‖u‖ (the norm also over the extra gradients for norm_over="all")
    u = _times_scales(grads, scales, groups)
    extra_scales = _scales_foreach(list(extra_weights), extra, list(extra_scaled), model, eta, extra_groups)
    u_extra = _times_scales(extra, extra_scales, extra_groups)
    norm = norm_of(u + u_extra) if norm_of is not None else total_norm(
        [[u[i] for i in idx] for idx in groups] + [[u_extra[i] for i in idx] for idx in extra_groups],
        norm_device(grads),
    )
    for idx in groups:
        for rho, sub in _by_rho(idx, rhos).items():
            coef = coefficient(rho, norm, grads[idx[0]])
            plain = [i for i in sub if scales[i] is None]
            if plain:
                for i, e in zip(plain, torch._foreach_mul([u[i] for i in plain], coef)):
                    eps[i] = e
            pick = [i for i in sub if scales[i] is not None]
            if pick:
                out = list(torch._foreach_mul([u[i] for i in pick], [scales[i] for i in pick]))
                torch._foreach_mul_(out, coef)
                for i, e in zip(pick, out):
                    eps[i] = e
    return eps, norm
