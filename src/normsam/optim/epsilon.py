"""A step's fresh ε from its ascent direction: element masks, the finiteness guard, then the perturbation math.

:func:`fresh_epsilon` is the one place where an ascent direction ``d`` (this step's gradient, or minus the
momentum: :mod:`normsam.optim.ascent`) becomes ε for the tensors of a storage (:mod:`normsam.optim.storage`):

1. an element-mask scope zeroes the masked-out elements of ``d`` (SSAM-D may update its mask first);
2. ε = perturbation(d, w; ρ) with :func:`normsam.optim.perturbations.epsilon_vectorized` (``foreach=True``)
   or :func:`~normsam.optim.perturbations.epsilon_reference`, in the storage's layout (SAM-ON's flat vectors,
   FSDP2's shards with global norms, or one tensor per parameter);
3. a direction that is not finite anywhere gives ε = 0 everywhere, decided on the device without a host sync
   (the caller counts the step in ``counters["nonfinite_ascent_steps"]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from normsam.optim._foreach import grouped, total_norm, zero_unless
from normsam.optim.perturbations import NormFn, PerturbationModel, epsilon_vectorized, perturbation
from normsam.optim.storage import PerturbedTensors

__all__ = ["fresh_epsilon", "finite_flag"]


def finite_flag(grads: Sequence[Tensor], norm_of: NormFn | None = None) -> Tensor | None:
    """A 0-d bool tensor on the device, no host sync: are all ``grads`` finite? (A norm that overflows counts
    as not finite.) ``None`` without gradients. ``norm_of``: the global norm under FSDP2, so that every rank
    skips the same steps."""
    if norm_of is not None:
        return torch.isfinite(norm_of(grads))
    if not grads:
        return None
    parts = [[grads[i] for i in idx] for idx in grouped(grads).values()]
    return torch.isfinite(total_norm(parts, grads[0].device))  # finite iff every per-tensor norm is


def fresh_epsilon(
    storage: PerturbedTensors,
    grads: list[Tensor | None],
    extra_grads: list[Tensor | None],
    *,
    eta: float,
    foreach: bool,
    norm_over: str,
    masks: Any = None,
    steps: tuple[int, int] = (0, 0),
    rho_factor: float = 1.0,
    packed: bool = True,
) -> tuple[list[Tensor | None], Tensor | None, bool]:
    """ε aligned with ``storage.params`` (None where a tensor has no direction), the step's finiteness flag
    (None when nothing had a direction) and whether the element mask was updated. Call it after
    ``storage.begin()`` (SAM-ON's flat layout reads w from the backup it takes there).

    ``grads`` / ``extra_grads``: the direction on ``storage.params`` / ``storage.others`` (local tensors);
    ``masks``: the :class:`normsam.optim.masks.ElementMasks` of a mask scope; ``steps``: (SAM steps, fresh
    ascents) counted so far, this one included, for SSAM-D's schedule; ``rho_factor``: the share of each
    group's ρ this ε takes (a multi-step ascent's sub-steps: 1/k); ``packed=False``: the per-tensor lists even
    for the flat layout (its packed weights are the backup, so not after the weights have moved)."""
    model: PerturbationModel = storage.perturbation_model
    live = [i for i, g in enumerate(grads) if g is not None]
    extra_live = [j for j, g in enumerate(extra_grads) if g is not None]
    packed = storage.packed(grads, extra_grads) if masks is None and packed else None
    if packed is not None:  # SAM-ON's flat vectors: every step of the math is one kernel
        rhos = packed.rhos if rho_factor == 1.0 else [r * rho_factor for r in packed.rhos]
        eps, norm = epsilon_vectorized(packed.grads, packed.weights, model=model, rhos=rhos, eta=eta,
                                       scaled=packed.scaled, groups=[[0]], norm_of=packed.norm_of)
        finite = torch.isfinite(norm if norm is not None else packed.norm_of(packed.grads))
        zero_unless(eps, finite, [[0]], foreach)
        return packed.unpack(eps), finite, False

    raw = [grads[i] for i in live] + [extra_grads[j] for j in extra_live]
    norm_of = storage.norm_of([storage.params[i] for i in live] + [storage.others[j] for j in extra_live])
    # T = 1, no mask, foreach: the finiteness flag is read off ε's own norm below, one norm pass fewer
    plain_norms = foreach and masks is None and model.geometry == "l2" and not storage.any_scaled
    finite = None if plain_norms else finite_flag(raw, norm_of)
    extra = [(storage.others_data[j], storage.others_scaled[j], extra_grads[j]) for j in extra_live]
    extra_groups = storage.others_groups if len(extra_live) == len(storage.others) else None
    updated = False
    if masks is not None:
        masked, updated = masks.apply(storage.params, grads, finite, sam_steps=steps[0], ascent_steps=steps[1])
        if norm_over == "all":  # the full gradient's norm includes the masked-out elements
            extra += [(storage.params[i], storage.scaled[i], grads[i] - masked[i]) for i in live]
            extra_groups = None
        grads = masked
    if not live:
        return [None] * len(storage.params), finite_flag(raw, norm_of) if finite is None else finite, updated

    same = len(live) == len(storage.params)  # the usual case: no copies of the storage's lists
    g_live = grads if same else [grads[i] for i in live]
    w_live = storage.data if same else [storage.data[i] for i in live]
    scaled = storage.scaled if same else [storage.scaled[i] for i in live]
    rhos = [storage.groups_of[i]["rho"] * rho_factor if rho_factor != 1.0 else storage.groups_of[i]["rho"]
            for i in live]  # read every step: ρ may be scheduled
    extra_g, extra_w, extra_s = [g for _, _, g in extra], [w for w, _, _ in extra], [s for _, s, _ in extra]
    if foreach:
        live_eps, norm = epsilon_vectorized(
            g_live, w_live, model=model, rhos=rhos, eta=eta, scaled=scaled, extra_grads=extra_g,
            extra_weights=extra_w, extra_scaled=extra_s, groups=storage.groups if same else None,
            extra_groups=extra_groups, norm_of=norm_of,
        )
        zero_groups = storage.groups if same else list(grouped(live_eps).values())
    else:
        live_eps = perturbation(g_live, w_live, model=model, rhos=rhos, eta=eta, scaled=scaled, extra_grads=extra_g,
                                extra_weights=extra_w, extra_scaled=extra_s, foreach=False, norm_of=norm_of)
        zero_groups = list(grouped(live_eps).values())
    if finite is None:  # plain_norms: ‖T⊙g‖ with T = 1 and no mask is the gradient's own norm
        finite = torch.isfinite(norm)
    zero_unless(live_eps, finite, zero_groups, foreach)
    if same:
        return live_eps, finite, updated
    eps: list[Tensor | None] = [None] * len(storage.params)
    for i, e in zip(live, live_eps):
        eps[i] = e
    return eps, finite, updated
