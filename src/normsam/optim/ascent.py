r"""Where a SAM step's ascent direction comes from: :class:`GradientAscent` or :class:`MomentumAscent`.

:class:`normsam.SAM` turns a direction :math:`d` over the perturbed set into :math:`\varepsilon` with its
perturbation model (``ε = ρ·T²⊙d / ‖T⊙d‖``, or ``ρ·T⊙sign(d)`` for ℓ∞). This module supplies :math:`d`:

``ascent="gradient"`` (SPEC §1, the default)
    :math:`d = \nabla_S L(w)`, this step's gradient of the perturbed set: one forward-backward pass at
    :math:`w` before the pass at :math:`w + \varepsilon` (cheap for SAM-ON, see SPEC §2).

``ascent="momentum"`` (Momentum-SAM, Becker, Altrock, Risse 2024, arXiv 2401.12033)
    :math:`d = -v`, minus the base optimizer's momentum over the perturbed set, read from its state. No pass
    at :math:`w`: a step is one forward-backward at :math:`w + \varepsilon`, then :math:`w_S` is restored from
    the saved copy and the base optimizer steps, as in every SAM step.

    .. math::

        \varepsilon_t = -\rho\,\frac{v_t}{\lVert v_t \rVert_2}\ (\text{perturbation="sam"}),\qquad
        g_t = \nabla L(w_t + \varepsilon_t),\qquad w_{t+1} = \mathrm{base\_step}(w_t, g_t)

    The sign follows the paper and its code (MarlonBecker/MSAM): the weights move *against* the momentum, i.e.
    along the next update (a Nesterov-like look-ahead with a large step), not along it. For SGD the momentum is
    ``momentum_buffer`` (which includes SGD's coupled weight decay); for Adam/AdamW it is ``exp_avg`` (the first
    moment, not the bias-corrected Adam update, as in the paper's AdamW-MSAM), for timm's Lion ``exp_avg``.
    The other perturbation models treat :math:`d` as they treat a gradient (asam: ``ε = ρ·T²⊙d/‖T⊙d‖`` with
    ``T = |w| + η``; a normsam extension, the paper has the plain ℓ2 form only). The paper uses a much larger
    ρ than SAM's (ρ = 3 for SGD on CIFAR-100 with every weight perturbed): tune it, do not reuse SAM's.

    Differences from the paper's code, and why:

    - *The first step is a plain base-optimizer step*: before the base optimizer's first step there is no
      momentum (the paper's code starts from a zero buffer, which gives the same ε = 0).
    - *Where the weights rest between steps*: the paper's optimizer keeps the weights at :math:`w + \varepsilon`
      between steps (perturbing for the next step inside ``step()``, so a model evaluated mid-training is the
      perturbed one and a final "move back" call is needed); normsam restores :math:`w` at every step, from a
      saved copy (never by subtracting ε), so checkpoints, evaluation and ``state_dict`` see :math:`w`. The
      gradients are taken at the same points.
    - *The norm*: over the perturbed set (SAM-ON: the norm layers' momentum), or with ``norm_over="all"``
      over every parameter's momentum (the paper perturbs every weight, where the two agree).
    - *Running statistics*: the only forward pass is at :math:`w + \varepsilon`, so BatchNorm's statistics
      must be updated there (``bn_policy="update"``, as the paper's code does); ``"freeze"`` is refused.

    Under DDP the momentum is already the same on every worker (it is built from synchronized gradients), so
    ε needs no communication (``sync_ascent`` is refused as meaningless). The momentum is part of the base
    optimizer's ``state_dict``, so resuming needs nothing more. Refused, with a message: ``ascent_interval > 1``
    (there is no pass to save), ``perturbation="fisher"`` (its T is the squared minibatch gradient, the
    empirical Fisher, which this ascent never computes) and ``scope="ssam-d"`` (its mask update drops
    elements by the ascent gradient's magnitude).

The base optimizers whose momentum is known are in :data:`MOMENTUM_STATES`; add yours with
:func:`register_momentum_state`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["ASCENTS", "GradientAscent", "MomentumAscent", "MomentumState", "MOMENTUM_STATES",
           "register_momentum_state", "make_ascent", "check_momentum_options"]

ASCENTS = ("gradient", "momentum")


class GradientAscent:
    """The ascent direction is this step's gradient of the perturbed set (SAM's own rule).

    The mechanics (``first_step(loss)``'s cheap autograd, ``.grad`` of the classic API, the GradScaler's
    scale, ``sync_ascent``) live with :class:`normsam.SAM`, which owns the plan they need. (``directions``
    takes the SAM and its step plan, ``normsam.optim.sam._Plan``; untyped here, since that module imports
    this one.)"""

    name = "gradient"
    needs_pass = True  #: a forward-backward pass at w gives the direction

    def directions(self, sam: Any, plan: Any, loss: Tensor | None, grad_scaler: Any):
        return sam._gradient_directions(plan, loss, grad_scaler)


@dataclass(frozen=True)
class MomentumState:
    """Where an optimizer class keeps its momentum: the ``state[p]`` key, and whether a param group has one."""

    key: str
    has_momentum: Callable[[dict[str, Any]], bool]
    fix: str  # how to turn the momentum on, for the error message


def _betas_first(group: dict[str, Any]) -> bool:
    return float(group.get("betas", (0.0,))[0]) > 0


def _betas_second(group: dict[str, Any]) -> bool:
    return float(group.get("betas", (0.0, 0.0))[1]) > 0


#: base optimizer class → where its momentum lives; subclasses inherit their base's entry. Classes named by
#: ``"module.QualName"`` are matched by name, so that timm is not imported to build the table.
MOMENTUM_STATES: dict[type | str, MomentumState] = {
    torch.optim.SGD: MomentumState("momentum_buffer", lambda g: float(g.get("momentum", 0)) > 0,
                                   "pass momentum=0.9 (SGD with momentum=0 keeps no momentum)"),
    **{cls: MomentumState("exp_avg", _betas_first, "pass betas=(0.9, 0.999) with betas[0] > 0")
       for cls in (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adamax)},
    # Lion's exp_avg is the EMA with β2 (β1 only interpolates the update's sign)
    "timm.optim.lion.Lion": MomentumState("exp_avg", _betas_second, "pass betas=(0.9, 0.99) with betas[1] > 0"),
}


def register_momentum_state(optimizer_class: type, key: str, *,
                            has_momentum: Callable[[dict[str, Any]], bool] | None = None) -> None:
    """Tell ``ascent="momentum"`` where ``optimizer_class`` keeps its momentum: ``optimizer.state[p][key]``, a
    tensor shaped like ``p`` (an EMA of the gradients, or their sum with decay). ``has_momentum(group)`` says
    whether a param group has one (default: always)."""
    if not isinstance(optimizer_class, type) or not isinstance(key, str) or not key:
        raise ValueError("register_momentum_state(OptimizerClass, 'state_key'): a class and a non-empty key.")
    MOMENTUM_STATES[optimizer_class] = MomentumState(
        key, has_momentum or (lambda group: True), f"check that {optimizer_class.__name__} has a momentum"
    )


def _lookup(optimizer: torch.optim.Optimizer) -> MomentumState | None:
    for cls in type(optimizer).__mro__:
        spec = MOMENTUM_STATES.get(cls) or MOMENTUM_STATES.get(f"{cls.__module__}.{cls.__qualname__}")
        if spec is not None:
            return spec
    return None


class MomentumAscent:
    """The ascent direction is minus the base optimizer's momentum (Momentum-SAM; see the module docstring)."""

    name = "momentum"
    needs_pass = False  #: no pass at w: the direction is already in the optimizer's state

    def __init__(self, base_optimizer: torch.optim.Optimizer, *, foreach: bool = True):
        spec = _lookup(base_optimizer)
        name = type(base_optimizer).__name__
        if spec is None:
            raise ValueError(
                f"ascent='momentum' perturbs along the base optimizer's momentum, and normsam does not know where "
                f"{name} keeps one. Use SGD with momentum > 0, Adam/AdamW or timm's Lion; or, if {name} has a "
                "momentum, register it: normsam.register_momentum_state(YourOptimizer, 'state_key'); "
                "or use ascent='gradient'."
            )
        for group in base_optimizer.param_groups:
            if group.get("maximize"):
                raise ValueError(
                    f"ascent='momentum' with {name}(maximize=True): its momentum then accumulates −g, and the "
                    "perturbation's sign would flip. Minimize the negated objective instead (maximize=False)."
                )
            if not spec.has_momentum(group):
                raise ValueError(
                    f"ascent='momentum' needs a base optimizer with momentum, and {name} has none in a param group "
                    f"({', '.join(f'{k}={group[k]!r}' for k in ('momentum', 'betas') if k in group)}): {spec.fix}, "
                    "or use ascent='gradient'."
                )
        self.optimizer = base_optimizer  # its .state is read each step: load_state_dict replaces the dict
        self.key = spec.key
        self.foreach = foreach

    def _momenta(self, params: list[Tensor]) -> list[Tensor | None]:
        key, state = self.key, self.optimizer.state
        # state is a defaultdict: .get on it does not create entries for parameters without a step yet
        return [s.get(key) if (s := state.get(p)) is not None else None for p in params]

    def _negated(self, momenta: list[Tensor | None]) -> list[Tensor | None]:
        live = [i for i, m in enumerate(momenta) if m is not None]
        if not live:
            return momenta
        tensors = [momenta[i] for i in live]
        negated = torch._foreach_neg(tensors) if self.foreach else [torch.neg(m) for m in tensors]
        out: list[Tensor | None] = [None] * len(momenta)
        for i, d in zip(live, negated):
            out[i] = d
        return out

    def directions(self, sam: Any, plan: Any, loss: Tensor | None, grad_scaler: Any):
        """−momentum of the perturbed tensors (and of the others, for ``norm_over="all"``); None where the
        base optimizer has not stepped yet. The loss, ``.grad`` and the scaler are not used: the momentum is
        built from unscaled gradients."""
        momenta, others = self._momenta(plan.params), self._momenta(plan.others)
        if plan.sharding is not None:  # FSDP2: the momentum of a sharded parameter is a DTensor like it; ε and
            local = plan.sharding.local  # the backup act on local shards, so take the momentum's local shard
            momenta, others = ([None if m is None else local([m])[0] for m in ms] for ms in (momenta, others))
        return self._negated(momenta), self._negated(others)


def make_ascent(ascent: str, base_optimizer: torch.optim.Optimizer, *, foreach: bool = True, perturbation: str,
                scope: Any, ascent_interval: int, sync_ascent: bool, bn_policy: str | None):
    """The ascent source SAM composes, after checking that ``ascent`` fits the other options."""
    if ascent not in ASCENTS:
        raise ValueError(
            f"Invalid ascent: {ascent!r}; use 'gradient' (this step's gradient, SAM) or 'momentum' (the base "
            "optimizer's momentum, Momentum-SAM: no ascent pass)."
        )
    if ascent == "gradient":
        return GradientAscent()
    check_momentum_options(perturbation=perturbation, scope=scope, ascent_interval=ascent_interval,
                           sync_ascent=sync_ascent, bn_policy=bn_policy)
    return MomentumAscent(base_optimizer, foreach=foreach)


def check_momentum_options(*, perturbation: str, scope: Any, ascent_interval: int, sync_ascent: bool,
                           bn_policy: str | None) -> None:
    """Refuse the options that do not fit ``ascent="momentum"`` (ValueError naming the fix); shared by
    :class:`normsam.SAM` and the runner's config check."""
    conflicts = [  # (whether it applies, why it is refused and the fix)
        (ascent_interval != 1, f"ascent_interval={ascent_interval} reuses a stored ε to skip ascent passes, and "
                              "ascent='momentum' has none to skip: drop ascent_interval"),
        (sync_ascent, "sync_ascent=True averages the ascent gradient over workers, and the momentum is already the "
                     "same on every worker: drop sync_ascent"),
        (perturbation == "fisher", "perturbation='fisher' scales by the squared minibatch gradient (the empirical "
                                  "Fisher), which ascent='momentum' never computes: use 'sam', 'asam', "
                                  "'layerwise' or 'linf'"),
        (scope == "ssam-d", "scope='ssam-d' updates its mask from the ascent gradient's magnitudes, which "
                           "ascent='momentum' never computes: use scope='random' or 'ssam-f' for a sparse mask"),
        (bn_policy == "freeze", "bn_policy='freeze' undoes what the pass at w + ε does to the running statistics, "
                                "and that is the momentum ascent's only pass, so BatchNorm's statistics would never "
                                "move: use bn_policy='update' (the default with ascent='momentum', as in Momentum-SAM)"),
    ]
    for conflict, message in conflicts:
        if conflict:
            raise ValueError(message + ".")
