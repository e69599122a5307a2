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

``ascent_interval=k`` (a fast mode) is :class:`StoredEpsilon`: a fresh ε on every k-th SAM step, the steps
between reuse it (no ascent pass on those). Each source returns the direction over a storage's tensors
(:mod:`normsam.optim.storage`), never touching the ``SAM`` object.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from normsam.optim._foreach import unscale

__all__ = ["ASCENTS", "GradientAscent", "MomentumAscent", "StoredEpsilon", "MomentumState", "MOMENTUM_STATES",
           "register_momentum_state", "make_ascent", "check_momentum_options"]

Direction = tuple[list[Tensor | None], list[Tensor | None]]  # over storage.params, storage.others

ASCENTS = ("gradient", "momentum")


class GradientAscent:
    """The ascent direction is this step's gradient of the perturbed set (SAM's own rule): the ``.grad`` of the
    classic API, or the cheap ascent's autograd over the perturbed tensors only (``first_step(loss)``); the
    GradScaler's scale divided out; averaged over DDP workers with ``sync_ascent`` (under FSDP2 it is the
    global batch's already)."""

    name = "gradient"
    needs_pass = True  #: a forward-backward pass at w gives the direction

    def __init__(self, *, sync_ascent: bool | None = None):
        self.sync_ascent = sync_ascent

    def direction(self, storage: Any, loss: Tensor | None, grad_scaler: Any = None) -> Direction:
        grads, extra = storage.gradients(loss)
        if storage.params and all(g is None for g in grads):  # ε would be 0 and the step counted as a SAM step
            raise ValueError(
                f"first_step(): none of the {len(storage.params)} perturbed tensors has an ascent gradient: "
                + ("the loss does not depend on them." if loss is not None else
                   "call loss.backward() before first_step() (a step(closure) closure must call backward()), "
                   "or pass the loss: first_step(loss).")
            )
        if grad_scaler is not None:
            grads, extra = unscale(grads, grad_scaler), unscale(extra, grad_scaler)
        if self.sync_ascent and not storage.sharded:  # one all-reduce for both (the others: norm or descent)
            both = _all_reduce_mean(grads + extra, storage.params + storage.others)
            grads, extra = both[: len(grads)], both[len(grads):]
        return grads, extra


def _all_reduce_mean(grads: list[Tensor | None], params: list[Tensor]) -> list[Tensor | None]:
    """The mean over DDP workers of the perturbed tensors' gradients: one all-reduce of their concatenation."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return grads
    dense = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
    if not dense:
        return grads
    flat = torch.cat([g.reshape(-1) for g in dense])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    return [f.view_as(p) for f, p in zip(torch.split(flat, [p.numel() for p in params]), params)]


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

    def direction(self, storage: Any, loss: Tensor | None = None, grad_scaler: Any = None) -> Direction:
        """−momentum of the perturbed tensors (and of the others, for ``norm_over="all"``); None where the
        base optimizer has not stepped yet. No loss is taken (SAM refuses one): the momentum is built from
        unscaled gradients. Under FSDP2 the momentum of a sharded parameter is a DTensor like it: ε and the
        backup act on local shards, so its local shard is taken."""
        momenta, others = self._momenta(storage.params), self._momenta(storage.others)
        if storage.sharded:
            momenta, others = ([None if m is None else storage.local([m])[0] for m in ms] for ms in (momenta, others))
        return self._negated(momenta), self._negated(others)


class StoredEpsilon:
    """``ascent_interval=k``: a fresh ε on every k-th SAM step, stored and reused on the steps between.

    The stored ε is aligned with the storage's tensors it was made for and realigned by identity when the
    storage is rebuilt (a changed ``requires_grad``). It is part of ``SAM.state_dict()``, so a resumed run
    reuses the same ε."""

    def __init__(self, interval: int = 1):
        self.interval = interval
        self.eps: list[Tensor | None] | None = None
        self.params: list[Tensor] | None = None

    def is_fresh(self, sam_steps: int) -> bool:
        """Whether the SAM step numbered ``sam_steps`` (from 0) takes a fresh ε."""
        return self.interval == 1 or self.eps is None or sam_steps % self.interval == 0

    def keep(self, eps: list[Tensor | None], params: list[Tensor]) -> None:
        if self.interval > 1:
            self.eps, self.params = eps, params

    def epsilon_for(self, params: list[Tensor]) -> list[Tensor | None]:
        if self.params is params:
            return self.eps
        by_id = {id(p): e for p, e in zip(self.params, self.eps)}
        return [by_id.get(id(p)) for p in params]

    def clear(self) -> None:
        self.eps, self.params = None, None

    def state_dict(self, index: dict[int, int]) -> dict[int, Tensor] | None:
        if self.eps is None:
            return None
        return {index[id(p)]: e.clone() for p, e in zip(self.params, self.eps) if e is not None}

    def load_state_dict(self, saved: dict[Any, Tensor] | None, all_params: list[Tensor], params: list[Tensor]) -> None:
        """``saved`` by position among ``all_params``; realigned with ``params`` (the storage's tensors)."""
        if saved is None:
            self.clear()
            return
        saved = {int(i): e for i, e in saved.items()}
        position = {id(p): i for i, p in enumerate(all_params)}
        self.params = params
        self.eps = [saved[position[id(p)]].to(device=p.device, dtype=p.dtype) if position[id(p)] in saved else None
                    for p in params]


def make_ascent(ascent: str, base_optimizer: torch.optim.Optimizer, *, foreach: bool = True,
                sync_ascent: bool | None = None) -> GradientAscent | MomentumAscent:
    """The ascent source of ``ascent`` (the options were checked by :class:`normsam.SAMOptions`)."""
    if ascent == "gradient":
        return GradientAscent(sync_ascent=sync_ascent)
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
