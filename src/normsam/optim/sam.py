r"""``normsam.SAM``: sharpness-aware minimization around any base optimizer, with SAM-ON's cheap ascent.

One SAM step (SPEC §1):

.. math::

    g_S &= \nabla_S L(w)                          && \text{ascent pass, perturbed set } S \text{ only}\\
    \varepsilon &= \mathrm{perturbation}(g_S, w_S; \rho)    && \text{see normsam.optim.perturbations}\\
    g' &= \nabla L(w + \varepsilon)               && \text{second pass, all parameters}\\
    w_S &\leftarrow \text{saved copy};\quad w \leftarrow \mathrm{base\_step}(w, g')

``SAM`` keeps the step protocol, persistence and diagnostics, and composes one piece per job:

- :class:`~normsam.optim.options.SAMOptions`: every option, validated once;
- :class:`~normsam.optim.groups.ScopeSplit`: which tensors are perturbed (the constructor, ``add_param_group``);
- :mod:`~normsam.optim.storage`: the perturbed tensors, their saved copy and layout (per tensor, SAM-ON's flat
  vectors, FSDP2's local shards in :mod:`~normsam.optim.sharded`);
- :mod:`~normsam.optim.ascent`: where the ascent direction comes from (this step's gradient, the momentum) and
  :class:`~normsam.optim.ascent.StoredEpsilon` for ``ascent_interval``;
- :mod:`~normsam.optim.epsilon` and :mod:`~normsam.optim.perturbations`: the direction → ε math;
- :class:`~normsam.optim.masks.ElementMasks`, :mod:`~normsam.optim.rho_schedules`,
  :mod:`~normsam.optim.running_stats` and :class:`~normsam.optim.counters.StepCounters`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normsam.optim.counters import StepCounters
from normsam.optim.ascent_step import build_ascent_step
from normsam.optim.groups import ScopeSplit
from normsam.optim.guards import (FRAMEWORK_CLOSURE, check_loadable, is_framework_closure, no_pass_wanted,
                                  returned_loss, warn_if_eval_mode)
from normsam.optim.masks import ElementMasks, check_fisher_refresh, fisher_scores
from normsam.optim.options import (SAMOptions, build_base_optimizer, check_rho, option_names, options_and_base_kwargs,
                                   set_group_rho, signature_with_options)
from normsam.optim.perturbations import get_perturbation
from normsam.optim.describe import sam_description, sam_repr
from normsam.optim.rho_schedules import apply_rho_schedule
from normsam.optim.running_stats import RunningStatsSwap, running_stat_modules
from normsam.optim.sharded import check_sharded_options, refuse_late_sharding, sharding_for
from normsam.optim.storage import PerturbedTensors, layout_key, perturbed_tensors

__all__ = ["SAM"]


class SAM(torch.optim.Optimizer):
    r"""Sharpness-aware minimization wrapping a base optimizer; SAM-ON when the scope is ``"norm"``.

    Args:
        params: an ``nn.Module`` (then ``scope`` picks what is perturbed and names are kept), an iterable of
            tensors, or of param-group dicts (timm's or the HF Trainer's weight-decay groups,
            :func:`normsam.param_groups` …; a group may carry ``perturb: bool`` and its own ``rho``). With
            ``model=`` given, tensors and groups without ``perturb`` are split by ``scope`` (matched to the
            model's parameters by identity): SAM-ON by default. Without a model every tensor is perturbed
            (SAM on all, as in other SAM libraries; ``repr`` says so) and the bias rule sees no names.
        base_optimizer: the base optimizer class (``torch.optim.SGD``, ``AdamW``, timm's ``Lion`` …),
            built on the same ``param_groups``.
        options: a :class:`normsam.SAMOptions`; SAM's options given as keywords (``rho=0.5``,
            ``perturbation="asam"``, ``scope="all"`` …, see :class:`~normsam.SAMOptions` for each) replace its
            fields. Options are fixed for SAM's life (assigning one raises); a group's ``rho`` may change.
        model: the model, when ``params`` are tensors or groups: for ``scope``, ``bn_policy`` and ``ssam-f``.
        grad_scaler: fp16's ``torch.amp.GradScaler``, passed once: :meth:`first_step` divides its scale out of
            the ascent gradient, and :meth:`second_step` runs ``scaler.step`` and ``scaler.update``. (Scale the
            losses with ``scaler.scale(loss)``; to clip, ``scaler.unscale_(sam.base_optimizer)`` first.)
        **kwargs: SAM's options, and the base optimizer's (``lr``, ``momentum``, ``weight_decay`` …).

    Use either ``step(closure)``, the classic two passes (``loss.backward(); first_step(zero_grad=True);
    loss2.backward(); second_step(zero_grad=True)``), or the cheap ascent ``first_step(loss)`` that computes
    the gradients of the perturbed tensors only.

    Example:
        ```python
        import torch, normsam
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
        sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1)  # SAM-ON: the LayerNorm's γ and β
        x, y, loss = torch.randn(16, 4), torch.randint(0, 2, (16,)), torch.nn.functional.cross_entropy
        sam.first_step(loss(model(x), y), zero_grad=True)  # the cheap ascent: w_S ← w_S + ε
        loss(model(x), y).backward()                       # the gradient at w + ε
        sam.second_step(zero_grad=True)                    # restore w_S, then the SGD step
        ```
    """

    def __init__(self, params: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]],
                 base_optimizer: Callable[..., torch.optim.Optimizer], options: SAMOptions | None = None, *,
                 model: nn.Module | None = None, grad_scaler: Any = None, **kwargs: Any):
        options, base_kwargs = options_and_base_kwargs(options, kwargs)
        if isinstance(params, nn.Module):
            if model is not None and model is not params:
                raise ValueError("params is a module and model= is another module: pass only one of them.")
            model = params
        split = ScopeSplit(model, options.scope, options.include, options.exclude)
        groups = split.initial_groups(params)
        bn_policy = options.resolved_bn_policy(model is not None)
        for group in groups:
            group.setdefault("perturb", True)
            set_group_rho(group, options)
        # FSDP2: ε and the backup on local shards, global norms; other sharding schemes are refused here
        sharding = sharding_for(model, [p for group in groups for p in group["params"]])
        if sharding is not None:
            check_sharded_options(split.mask_scope, options.sync_ascent)
        self.base_optimizer = base = build_base_optimizer(base_optimizer, groups, base_kwargs, options.foreach)
        # the base's defaults too: schedulers such as OneCycleLR(cycle_momentum=True) look for betas/momentum there
        super().__init__(base.param_groups, {**base.defaults, "rho": options.rho, "perturb": True})
        self.param_groups = base.param_groups  # shared: schedulers work on either object
        if not any(g["perturb"] and g["params"] for g in self.param_groups):
            raise ValueError("No parameter group has perturb=True: SAM would perturb nothing.")
        self.perturbation_model = get_perturbation(options.perturbation, layerwise_scaling=options.layerwise_scaling)
        self.mask_scope = split.mask_scope  # random, ssam-f, ssam-d: element masks (None: whole tensors)
        self.options, self.model, self.grad_scaler = options, model, grad_scaler  # (options: read-only from here)
        self._split, self._sharding = split, sharding
        self._masks = None if split.mask_scope is None else ElementMasks(
            split.mask_scope, options.sparsity, interval=options.mask_interval, total_steps=options.mask_total_steps,
            drop_rate=options.resolved_drop_rate, seed=options.mask_seed)
        self._ascent = build_ascent_step(options, base, self._masks)  # source, transforms, ε, descent rule
        self.ascent_source, self._descent = self._ascent.source, self._ascent.descent
        # a descent rule acts on .grad right before the base optimizer's step, whoever calls it (second_step, a
        # GradScaler, a framework), and (WSAM decoupled) right after it
        self._pending = self._fresh_step = False
        if self._descent.name != "sam":
            base.register_step_pre_hook(self._before_base_step)
            base.register_step_post_hook(self._after_base_step)
        self._running_stats = RunningStatsSwap(running_stat_modules(model)) if bn_policy == "freeze" else None
        self.counters = StepCounters()
        self._storage: PerturbedTensors | None = None
        self._perturbed = self._eval_mode_checked = False
        if self._masks is not None:
            self._masks.draw(self.storage.params)
        self._apply_rho_schedule()  # repr and describe() show the ρ of the first step

    # --- options: read-only -------------------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        if name != "options" and name in option_names() and "options" in self.__dict__:
            return getattr(self.options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _READ_ONLY and "options" in self.__dict__:
            raise ValueError(
                f"SAM's {name} is fixed when SAM is built (the step's layout depends on it): build a new SAM, e.g. "
                f"SAM(model, {type(self.base_optimizer).__name__}, sam.options.replace({name}=...), ...). The radius "
                "is each param group's 'rho' (set it there, or pass a rho_schedule)."
            )
        super().__setattr__(name, value)

    @property
    def scope(self) -> Any:
        """The scope label: as given (``"norm"`` by default with a model), ``"all"`` or ``"groups"``."""
        return self._split.scope

    @property
    def eta(self) -> float:
        """The η of the scaling T in effect (the option, or the perturbation model's default)."""
        return self.options.resolved_eta

    @property
    def bn_policy(self) -> str:
        """The running-statistics policy in effect: ``"freeze"`` or ``"update"``."""
        return self.options.resolved_bn_policy(self.model is not None)

    # --- what is perturbed -----------------------------------------------------------------------------

    @property
    def storage(self) -> PerturbedTensors:
        """The perturbed tensors, their saved copy and layout (:mod:`normsam.optim.storage`); built once and
        rebuilt when the groups, their ``perturb``, a ``requires_grad``, a device or a dtype change."""
        storage = self._storage
        if storage is None or storage.key != layout_key(self.param_groups) or not storage.is_current():
            if self._sharding is None:  # plain tensors that are DTensors now: sharded after SAM was built
                refuse_late_sharding([p for g in self.param_groups for p in g["params"] if p.requires_grad])
            storage = self._storage = perturbed_tensors(self.param_groups, self.options, self.perturbation_model,
                                                        masked=self._masks is not None, sharding=self._sharding)
        return storage

    def ascent_inputs(self) -> list[Tensor]:
        """What ``loss.backward(inputs=...)`` needs for a cheap ascent by hand (micro-batch accumulation, then
        ``first_step()``): the perturbed tensors, or under FSDP2 the unsharded parameters autograd sees in the
        current pass (call it after the forward), whose gradients FSDP2 reduces into the perturbed tensors'
        ``.grad``."""
        return self.storage.ascent_inputs()

    def perturbed_parameters(self) -> list[Tensor]:
        """Deprecated: the tensors SAM perturbs; use :meth:`ascent_inputs` (the same outside FSDP2)."""
        warnings.warn("SAM.perturbed_parameters() is deprecated and will be removed in the next release: use "
                      "sam.ascent_inputs() (the same tensors, and under FSDP2 the ones autograd sees).",
                      DeprecationWarning, stacklevel=2)
        return list(self.storage.params)

    def masks(self) -> list[Tensor] | None:
        """The element masks of a mask scope, aligned with the perturbed tensors (None otherwise)."""
        return None if self._masks is None else self._masks.of(self.storage.params)

    # --- the two passes ----------------------------------------------------------------------------------

    @property
    def needs_ascent(self) -> bool:
        """Whether the next :meth:`first_step` needs an ascent pass at w: always, but on the steps that reuse ε
        (``ascent_interval > 1``) and with ``ascent="momentum"``. On those, call ``first_step()`` without a
        loss and skip the first forward-backward pass."""
        return self._ascent.needs_pass(self.counters["sam_steps"])

    @torch.no_grad()
    def first_step(self, loss: Tensor | None = None, zero_grad: bool = False, *, grad_scaler: Any = None,
                   ascent_loss: Callable[[], Tensor | None] | None = None) -> None:
        """Perturb the scope: ``w_S ← w_S + ε``, with no host sync (but SSAM-D's mask updates): a non-finite
        ascent gradient gives ε = 0, decided on the device and counted in ``counters["nonfinite_ascent_steps"]``.

        Args:
            loss: ``None`` to use the ``.grad`` the caller computed (classic API), or the first pass's loss (a
                sub-batch's may do): then only the perturbed tensors' gradients are computed, no ``.grad``
                written (the cheap ascent). Refused when :attr:`needs_ascent` is False (it would be ignored).
            zero_grad: zero every gradient afterwards, ready for the second backward pass.
            grad_scaler: a ``GradScaler`` (or a number) whose scale the ascent gradient carries, for frameworks
                that own the scaler's step (otherwise give it to SAM once).
            ascent_loss: ``ascent_steps > 1``: evaluates the ascent loss at the current (perturbed) weights, for
                the later ascent steps (or runs its backward and returns ``None``: then ``.grad`` is read).
        """
        if not self._eval_mode_checked:  # once: the check costs a module walk
            self._eval_mode_checked = warn_if_eval_mode(self.model)
        if self._perturbed:
            raise ValueError("first_step() called twice: call second_step() (or restore()) to undo the "
                             "perturbation before the next first_step().")
        fresh = self._ascent.is_fresh(self.counters["sam_steps"])  # (the momentum: fresh, without a pass)
        if loss is not None and not self.needs_ascent:
            raise no_pass_wanted("ascent='momentum' perturbs along the momentum" if fresh else
                                 f"this step reuses the last ε (ascent_interval={self.options.ascent_interval})")
        if fresh and self.options.ascent_steps > 1 and ascent_loss is None:
            raise ValueError(f"ascent_steps={self.options.ascent_steps} takes the ascent direction again at each "
                             "point: pass first_step(loss, ascent_loss=...) with a callable that evaluates the ascent "
                             "loss at the current weights (or use step(closure)).")
        storage = self.storage
        if self._masks is not None:
            self._masks.check_ready(storage.params)
        storage.begin()
        self._apply_rho_schedule()
        scaler = grad_scaler if grad_scaler is not None else self.grad_scaler
        with self.restore_on_error():  # (an error in a multi-step ascent's later passes leaves w, not w + ε)
            self._fresh_step = self._ascent.perturb(storage, loss, scaler, self.counters, ascent_loss,
                                                    on_perturbed=self._perturbed_now)
        self._pending = True
        if zero_grad:
            self.zero_grad()

    def _perturbed_now(self) -> None:
        """The weights were just perturbed: the second pass's running statistics are to be discarded from here."""
        if self._running_stats is not None:
            self._running_stats.save()
        self._perturbed = True

    def _before_base_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._pending:
            self._descent.before_base_step(self._storage, self._ascent.descent_set(self._storage), self._fresh_step)

    def _after_base_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._pending:
            self._descent.after_base_step(self._storage, self._ascent.descent_set(self._storage))
            self._pending = False

    def _apply_rho_schedule(self) -> None:
        """Each group's ρ for the next SAM step (the schedule's, from ``counters["sam_steps"]``), checked."""
        self._rho_step = self.counters["sam_steps"]
        apply_rho_schedule(self.options.rho_schedule, self._rho_step, self.param_groups, check_rho)

    @torch.no_grad()
    def restore(self) -> None:
        """Undo the perturbation exactly (from the saved copies) and the second pass's running statistics."""
        if not self._perturbed:
            raise ValueError("second_step()/restore() called without first_step(): call first_step() first to "
                             "perturb the weights (or use step(closure)).")
        self._storage.restore()
        if self._running_stats is not None:
            self._running_stats.restore()
        self._perturbed = False

    @property
    def is_perturbed(self) -> bool:
        """Whether the weights are at w + ε now (between :meth:`first_step` and :meth:`second_step`)."""
        return self._perturbed

    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the perturbed tensors exactly, then step the base optimizer with the current gradients
        (through the ``grad_scaler`` given to SAM, if any)."""
        self.restore()
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.base_optimizer)
            self.grad_scaler.update()
        else:
            self.base_optimizer.step()
        self._opt_called = True  # tells an LR scheduler built on this object that the optimizer stepped
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        """One SAM step with a closure that zeroes nothing, computes the loss, calls ``backward()`` and returns
        the loss. Returns the loss of the closure's first call: at w (the ascent pass), or, on a step without an
        ascent pass (:attr:`needs_ascent` is False), at w + ε, its only call.

        After the cheap ascent ``first_step(loss)`` (the integrations' route), the weights are perturbed and
        ``step(closure)`` runs the closure once, as the second pass, then ``second_step()``; the closure may be
        ``None`` when the second pass's gradients are already there."""
        with self.restore_on_error():
            if self._perturbed:  # frameworks that call optimizer.step() themselves reach the base update here
                loss = None
                if closure is not None:
                    with torch.enable_grad():
                        loss = closure()
                self.second_step()
                return loss
            if closure is None:
                raise ValueError("SAM.step() needs a closure that computes the loss and calls loss.backward(); or "
                                 "call first_step() and second_step() yourself.")
            framework = is_framework_closure(closure)
            closure = torch.enable_grad()(closure)
            if not self.needs_ascent:  # a reused ε or the momentum ascent: one pass, at w + ε
                if framework:
                    raise ValueError(FRAMEWORK_CLOSURE)
                self.first_step()
                loss = returned_loss(closure())
            else:
                loss = closure()
                if framework:  # with normsam's mixin this is a batch its training_step skipped (returned None)
                    if loss is None:
                        return None
                    raise ValueError(FRAMEWORK_CLOSURE)
                returned_loss(loss)  # (ascent_steps > 1: each later ascent pass is a backward of the closure too)
                self.first_step(zero_grad=True, ascent_loss=lambda: (self.zero_grad(), closure(), None)[2])
                closure()
            self.second_step()
            return loss

    @contextlib.contextmanager
    def restore_on_error(self) -> Iterator[None]:
        """An exception (or Ctrl-C) inside the block never leaves the weights at w + ε: restore, then re-raise.
        ``step`` runs in it; a loop that calls ``first_step`` and ``second_step`` itself can wrap the two passes:
        ``with sam.restore_on_error(): sam.first_step(loss); loss2.backward(); sam.second_step()``."""
        try:
            yield
        except BaseException:
            if self._perturbed:
                self.restore()
            raise

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients of every parameter (SAM and its base optimizer share the groups)."""
        if set_to_none and type(self.base_optimizer).zero_grad is torch.optim.Optimizer.zero_grad:
            # what Optimizer.zero_grad does with set_to_none, minus its profiler range and dynamo guard:
            # a SAM step zeroes twice, and on a fast GPU that host time shows
            for group in self.param_groups:
                for p in group["params"]:
                    p.grad = None
            return
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its tensors are perturbed by the SAM's scope, as the constructor would place them (a new
        head is not perturbed under ``scope="norm"``), unless the group says ``perturb``."""
        if any(param_group is g for g in self.base_optimizer.param_groups):
            super().add_param_group(param_group)  # during __init__: the groups are already the base's
            return
        for group in self._split.place(param_group):  # as the constructor would have placed it
            group.setdefault("perturb", self.defaults["perturb"])
            set_group_rho(group, self.options)
            self.base_optimizer.add_param_group(group)
        self._storage = None
        self._apply_rho_schedule()

    # --- masks from data -------------------------------------------------------------------------------

    def refresh_masks(self, batches: Iterable[tuple[Tensor, Tensor]], *,
                      loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None) -> None:
        """SSAM-F: set the mask to the top-k elements of the empirical Fisher ``Σ g²`` over ``batches`` (each
        batch's mean-loss gradient squared; batches of size 1 give the per-sample Fisher), running statistics
        left as they were. Unlike a SAM step, this waits for the device (the top-k runs on the host)."""
        if self._perturbed:
            raise ValueError("refresh_masks() during a SAM step: call it before first_step() or after second_step().")
        check_fisher_refresh(self.mask_scope, self.scope, self.model)
        targets = self.storage.params
        self._masks.set_topk(targets, fisher_scores(self.model, targets, batches, loss_fn or F.cross_entropy))
        self.counters["mask_updates"] += 1

    # --- state -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus SAM's part under ``"sam"``: counters, masks and their generator,
        the stored ε (``ascent_interval > 1``) and the base optimizer's class. Reads the device-side counter."""
        if self._perturbed:
            raise ValueError("state_dict() while the weights are perturbed: save after second_step().")
        state = self.base_optimizer.state_dict()
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        masks = self._masks.state_dict(index) if self._masks is not None else {"masks": {}, "mask_generator": None}
        state["sam"] = {**masks, "counters": dict(self.counters), "epsilon": self._ascent.stored.state_dict(index),
                        "base": type(self.base_optimizer).__name__, "ascent": self._ascent.state_dict(index)}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; the shared ``param_groups`` are re-linked to the base optimizer's."""
        if self._perturbed:  # the storage (and with it the saved copy of w) would be dropped with w + ε in place
            raise ValueError("load_state_dict() while the weights are perturbed (between first_step() and "
                             "second_step()): call second_step() or restore() first.")
        state_dict = dict(state_dict)
        sam_state = state_dict.pop("sam", None)
        check_loadable(state_dict, sam_state, self.base_optimizer)
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups  # load_state_dict made new group dicts
        self._storage = None
        self._ascent.stored.clear()
        if sam_state is not None:
            counters = dict(sam_state["counters"])
            counters.setdefault("ascent_steps", counters["sam_steps"])  # checkpoints from before ascent_interval
            self.counters.update(counters)
            params = [p for g in self.param_groups for p in g["params"]]
            if self._masks is not None and sam_state.get("mask_generator") is not None:
                self._masks.load_state_dict(sam_state, params)
            self._ascent.stored.load_state_dict(sam_state.get("epsilon"), params, self.storage.params)
            self._ascent.load_state_dict(sam_state.get("ascent"), params)
        self._apply_rho_schedule()  # at the restored step: a schedule goes on where it stopped

    def __repr__(self) -> str:
        return sam_repr(self.param_groups, base=type(self.base_optimizer).__name__, scope=self.scope, eta=self.eta,
                        perturbation=self.perturbation_model.name, model=self.model, options=self.options,
                        variant=repr(self._ascent))

    def describe(self) -> str:
        """What this SAM perturbs: scope, counts, the ρ in effect and the names of the perturbed tensors."""
        return sam_description(self.param_groups, scope=self.scope, model=self.model,
                               rho_schedule=self.rho_schedule, rho_step=self._rho_step)


SAM.__init__.__signature__ = signature_with_options(SAM.__init__)  # type: ignore[attr-defined]


#: Names that cannot be assigned on a built SAM: its options and what is derived from them.
_READ_ONLY = frozenset(option_names()) | {"scope", "mask_scope", "eta", "bn_policy", "perturbation_model"}

