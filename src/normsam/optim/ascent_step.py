"""Where each SAM step's ε comes from, and how it reaches the weights: the ascent half of a step, composed.

On a step with a fresh ascent, :class:`AscentStep`:

1. takes the ascent direction from its source (:mod:`normsam.optim.ascent`: this step's gradient, or the base
   optimizer's momentum), and hands ``g`` to the descent rule when it needs it later
   (:mod:`normsam.optim.descent`);
2. passes the direction through its transforms (:mod:`normsam.optim.transforms`: GCSAM's centralization,
   Friendly-SAM's momentum);
3. makes ε from it (:func:`normsam.optim.epsilon.fresh_epsilon`) and adds it to the perturbed tensors;
   with ``ascent_steps = k > 1`` it does so k times, ρ/k each, the direction taken again at each point
   (``ascent_loss()`` evaluates the loss there): ``w_j = w_{j−1} + ε(d(w_{j−1}); ρ/k)``.

Steps without a fresh ascent (``ascent_interval > 1``) apply the stored ε, or none at all for LookSAM, whose
steps between its full ones are plain steps at w with a corrected descent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from normsam.optim.ascent import StoredEpsilon, make_ascent
from normsam.optim.descent import Descent, make_descent
from normsam.optim.epsilon import fresh_epsilon
from normsam.optim.storage import PerturbedTensors
from normsam.optim.transforms import make_transforms

__all__ = ["AscentStep", "build_ascent_step"]


class AscentStep:
    """The ascent half of a SAM step (see the module docstring). ``counters``: the SAM's step counters."""

    def __init__(self, source: Any, *, stored: StoredEpsilon, descent: Descent, transforms: Sequence[Any] = (),
                 masks: Any = None, eta: float, foreach: bool, norm_over: str, descent_over: str = "perturbed",
                 steps: int = 1):
        self.source, self.stored, self.descent, self.transforms = source, stored, descent, list(transforms)
        self.masks, self.eta, self.foreach, self.norm_over = masks, eta, foreach, norm_over
        self.descent_over, self.steps = descent_over, steps

    def is_fresh(self, sam_steps: int) -> bool:
        """Whether the SAM step numbered ``sam_steps`` (from 0) makes a fresh ε (the momentum: always; LookSAM:
        every k-th step, as it stores no ε to reuse)."""
        if not self.source.needs_pass:
            return True
        if not self.descent.perturbs_between:
            return sam_steps % self.stored.interval == 0
        return self.stored.is_fresh(sam_steps)

    def needs_pass(self, sam_steps: int) -> bool:
        """Whether that step needs an ascent pass at w (a forward-backward before ``first_step``)."""
        return self.source.needs_pass and self.is_fresh(sam_steps)

    def descent_set(self, storage: PerturbedTensors) -> list[Tensor]:
        """The tensors the descent rule acts on: the perturbed ones, or every trainable one."""
        return storage.params + storage.others if self.descent_over == "all" else list(storage.params)

    def perturb(self, storage: PerturbedTensors, loss: Tensor | None, grad_scaler: Any, counters: Any,
                ascent_loss: Callable[[], Tensor | None] | None = None,
                on_perturbed: Callable[[], None] = lambda: None) -> bool:
        """Perturb ``storage``'s tensors for this step (backing them up first) and call ``on_perturbed`` as soon
        as they are; returns whether the step made a fresh ε."""
        if not self.is_fresh(counters["sam_steps"]):
            counters["sam_steps"] += 1
            eps = self.stored.epsilon_for(storage.params) if self.descent.perturbs_between else None
            storage.perturb(eps if eps is not None else [None] * len(storage.params))
            on_perturbed()
            return False
        for j in range(self.steps):
            if j:  # the loss at w_j (first_step runs under no_grad; this pass needs its graph)
                with torch.enable_grad():
                    loss = ascent_loss()
            grads, extra = self.source.direction(storage, loss, grad_scaler)
            if j == 0:  # counted once the direction is there (a missing gradient raises above: no step)
                counters["sam_steps"] += 1
                counters["ascent_steps"] += 1
            if j == 0 and self.descent.keeps_gradient:
                self.descent.remember(self.descent_set(storage), grads + (extra if self.descent_over == "all" else []))
            for transform in self.transforms:
                grads = transform.apply(storage.params, grads)
            eps, finite, mask_updated = fresh_epsilon(
                storage, grads, extra if self.norm_over == "all" else [None] * len(extra), eta=self.eta,
                foreach=self.foreach, norm_over=self.norm_over, masks=self.masks,
                steps=(counters["sam_steps"], counters["ascent_steps"]), rho_factor=1.0 / self.steps,
                packed=j == 0)
            counters["mask_updates"] += mask_updated
            if finite is not None:
                counters.count_nonfinite(finite)
            if j == 0:
                storage.perturb(eps)
                on_perturbed()
            else:
                storage.add(eps)
        if self.descent.perturbs_between and self.steps == 1:
            self.stored.keep(eps, storage.params)
        return True

    def state_dict(self, index: dict[int, int]) -> dict[str, Any]:
        """The state of the transforms and the descent rule, by parameter position."""
        return {"transforms": [t.state_dict(index) for t in self.transforms], "descent": self.descent.state_dict(index)}

    def load_state_dict(self, state: dict[str, Any] | None, all_params: Sequence[Tensor]) -> None:
        state = state or {}
        for transform, saved in zip(self.transforms, state.get("transforms") or [None] * len(self.transforms)):
            transform.load_state_dict(saved, all_params)
        self.descent.load_state_dict(state.get("descent"), all_params)

    def __repr__(self) -> str:
        parts = [repr(t) for t in self.transforms] + ([repr(self.descent)] if self.descent.name != "sam" else [])
        parts += [f"k={self.stored.interval}"] if not self.descent.perturbs_between else []
        return ", ".join(parts + ([f"ascent_steps={self.steps}"] if self.steps > 1 else []))


def build_ascent_step(options: Any, base_optimizer: Any, masks: Any = None) -> AscentStep:
    """The ascent half of a SAM with these :class:`~normsam.optim.options.SAMOptions`: its direction source,
    transforms, stored ε and descent rule."""
    foreach = options.resolved_foreach
    return AscentStep(
        make_ascent(options.ascent, base_optimizer, foreach=foreach, sync_ascent=options.sync_ascent),
        stored=StoredEpsilon(options.ascent_interval),
        descent=make_descent(options.variant, alpha=options.alpha, gamma=options.gamma, decouple=options.decouple,
                             reuse_norms=options.reuse_norms),
        transforms=make_transforms(centralize=options.centralize, variant=options.variant, sigma=options.sigma,
                                   lmbda=options.lmbda, foreach=foreach),
        masks=masks, eta=options.resolved_eta, foreach=foreach, norm_over=options.norm_over,
        descent_over=options.descent_over, steps=options.ascent_steps,
    )
