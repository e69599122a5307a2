r"""``normsam.SAM``: sharpness-aware minimization around any base optimizer, with SAM-ON's cheap ascent.

One SAM step (SPEC §1):

.. math::

    g_S &= \nabla_S L(w)                          && \text{ascent pass, perturbed set } S \text{ only}\\
    \varepsilon &= \mathrm{perturbation}(g_S, w_S; \rho)    && \text{see normsam.optim.perturbations}\\
    g' &= \nabla L(w + \varepsilon)               && \text{second pass, all parameters}\\
    w_S &\leftarrow \text{saved copy};\quad w \leftarrow \mathrm{base\_step}(w, g')

Only the perturbed tensors are copied, so SAM-ON's extra memory is the size of the norm parameters. Where
the ascent direction comes from (this step's gradient, or the base optimizer's momentum: Momentum-SAM, no
ascent pass) is :mod:`normsam.optim.ascent`.
"""

from __future__ import annotations

import contextlib
import math
import operator
import warnings
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normsam.optim import masks as masklib
from normsam.optim.ascent import make_ascent
from normsam.optim.perturbations import (
    SCALED_TENSORS,
    _epsilon_flat,
    _grouped,
    _perturbation_foreach,
    _total_norm,
    get_perturbation,
    perturbation,
)
from normsam.optim.new_groups import place_new_group
from normsam.optim.options import SAMOptions
from normsam.optim.rho_schedules import RhoSchedule, as_rho_schedule, scheduled_rho
from normsam.optim.running_stats import BN_POLICIES, RunningStatsFreezer, RunningStatsSwap, running_stat_modules
from normsam.optim.scopes import MASK_SCOPES, PARAMETER_SCOPES, ScopeSpec, param_groups, select
from normsam.optim.sharded import ShardedTensors, check_sharded_options, refuse_late_sharding, sharding_for

__all__ = ["SAM"]

_REQUIRES_GRAD = operator.attrgetter("requires_grad")

NORM_OVER = ("perturbed", "all")


def _check_rho(rho: Any, where: str = "rho") -> float:
    if isinstance(rho, (str, bytes, bool)):  # float('0.7') would pass, and the flat path then fails on a str
        raise ValueError(f"Invalid {where}: {rho!r} ({type(rho).__name__}); rho must be a number >= 0, e.g. 0.5.")
    try:
        value = float(rho)
    except (TypeError, ValueError):
        raise ValueError(f"Invalid {where}: {rho!r}; rho must be a number >= 0.") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"Invalid {where}: {rho!r}; rho must be a finite number >= 0 "
            "(SAM-all typically 0.05-0.2, SAM-ON larger, e.g. 0.5-1 for perturbation='sam')."
        )
    return value


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
            built on the same ``param_groups`` with ``**base_kwargs``.
        rho: the perturbation radius ρ (a group default). SAM-ON needs a larger ρ than SAM-all.
        perturbation: ``"sam"``, ``"asam"``, ``"layerwise"``, ``"linf"`` or ``"fisher"``.
        eta: η of the scaling; ``None`` takes the model's default (0.01, fisher 1.0).
        normalize_bias: apply the weight-dependent scaling T to bias tensors too (otherwise T = 1 there).
        norm_over: ``"perturbed"`` (‖·‖ over the perturbed set) or ``"all"`` (SSAM's convention: the norm of
            the full gradient; the cheap ascent then computes every gradient).
        scope: with a module, ``"norm"`` (default, SAM-ON), ``"all"``, ``"no-norm"``, a predicate over
            :class:`normsam.ParamInfo`, glob patterns, or an element-mask scope ``"random"``, ``"ssam-f"``,
            ``"ssam-d"``. Tensors or groups with ``model=`` take the same scopes; without a model only
            ``"all"`` or a mask scope (masks over the perturbed tensors).
        include, exclude: patterns or predicates that add to / remove from the scope (need the model).
        sparsity: share of candidate elements *not* perturbed by a mask scope, in (0, 1).
        mask_interval: ``ssam-d``: SAM steps between mask updates.
        mask_total_steps: ``ssam-d``: length (in SAM steps) of the cosine drop-rate schedule.
        drop_rate: ``ssam-d``: the drop rate at step 0 of the cosine schedule.
        mask_seed: seed of the random masks and of SSAM-D's regrowth.
        bn_policy: running statistics in the second pass: ``"freeze"`` (default when the model is known) or
            ``"update"``. Needs the model: pass it as ``params`` or ``model=``.
        model: the model, when ``params`` are tensors or groups: for ``scope``, ``bn_policy`` and ``ssam-f``.
        foreach: use the ``torch._foreach_*`` path (default) or the per-tensor reference loop.
        sync_ascent: under DDP, average the ascent gradient over workers (only the perturbed tensors are
            communicated). Default: each worker uses its own, as in the original SAM. Under FSDP2 the ascent
            gradient is always the global batch's (FSDP2 reduces it; see :mod:`normsam.optim.sharded`), and
            ``sync_ascent=False`` is refused.
        ascent: where the ascent direction comes from: ``"gradient"`` (this step's gradient, a pass at w) or
            ``"momentum"`` (Momentum-SAM: minus the base optimizer's momentum, no pass at w, ≈ the cost of the
            base optimizer; the first step is a plain step; needs ``bn_policy="update"``, its default then). See
            :mod:`normsam.optim.ascent`.
        rho_schedule: ``None`` (a constant ρ), :class:`normsam.RhoWarmup` ``(steps)`` (ρ rises linearly over the
            first SAM steps), a callable ``step -> factor`` of each group's ρ, or any
            :class:`normsam.RhoSchedule`. Each group's base ρ is kept in ``group["initial_rho"]``; ``group["rho"]``
            holds the ρ in effect, set before every SAM step from ``counters["sam_steps"]`` (so ``state_dict``
            round trips keep the schedule's position). See :mod:`normsam.optim.rho_schedules`.
        **base_kwargs: options of the base optimizer (``lr``, ``momentum``, ``weight_decay`` …).

    Use either ``step(closure)``, the classic two passes (``loss.backward(); first_step(zero_grad=True);
    loss2.backward(); second_step(zero_grad=True)``), or the cheap ascent ``first_step(loss)`` that computes
    the gradients of the perturbed tensors only.
    """

    def __init__(
        self,
        params: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: Callable[..., torch.optim.Optimizer],
        options: SAMOptions | None = None,
        *,
        model: nn.Module | None = None,
        **kwargs: Any,
    ):
        sam_kwargs, base_kwargs = SAMOptions.split(kwargs)
        if options is None:
            options = SAMOptions(**sam_kwargs)
        elif not isinstance(options, SAMOptions):
            raise ValueError(f"options must be a normsam.SAMOptions, got {type(options).__name__}; or pass SAM's "
                             "options as keywords, SAM(model, SGD, rho=0.5, lr=0.1).")
        elif sam_kwargs:
            options = options.replace(**sam_kwargs)
        self.options = options
        rho, perturbation, eta = options.rho, options.perturbation, options.eta
        normalize_bias, norm_over, scope = options.normalize_bias, options.norm_over, options.scope
        include, exclude, sparsity = options.include, options.exclude, options.sparsity
        mask_interval, mask_total_steps = options.mask_interval, options.mask_total_steps
        drop_rate, mask_seed, bn_policy = options.resolved_drop_rate, options.mask_seed, options.bn_policy
        foreach, sync_ascent, ascent_interval = options.foreach, options.sync_ascent, options.ascent_interval
        ascent, layerwise_scaling, scaled_tensors = options.ascent, options.layerwise_scaling, options.scaled_tensors
        self.rho_schedule = options.rho_schedule
        self.perturbation_model = get_perturbation(perturbation, layerwise_scaling=layerwise_scaling)
        self.eta = options.resolved_eta
        if isinstance(base_optimizer, torch.optim.Optimizer) or not callable(base_optimizer):
            raise ValueError(
                "base_optimizer must be an optimizer class such as torch.optim.SGD, not an instance; "
                "pass its options as keyword arguments, e.g. SAM(model, torch.optim.SGD, lr=0.1, momentum=0.9)."
            )

        if isinstance(params, nn.Module):
            if model is not None and model is not params:
                raise ValueError("params is a module and model= is another module: pass only one of them.")
            model = params
            scope = "norm" if scope is None else scope
            groups = param_groups(
                model, "all" if scope in MASK_SCOPES else scope, include=include, exclude=exclude
            )
        else:
            groups, scope = self._groups_from_params(params, scope, include, exclude, model)
        self.model = model
        self.scope = scope
        self._include, self._exclude = include, exclude  # add_param_group places new tensors by the same rule
        self.mask_scope = scope if isinstance(scope, str) and scope in MASK_SCOPES else None
        self._check_mask_options(sparsity, mask_interval, mask_total_steps, drop_rate)
        self.sparsity = sparsity
        self.mask_interval = mask_interval
        self.mask_total_steps = mask_total_steps
        self.drop_rate = drop_rate

        if bn_policy is None:  # the momentum ascent's only pass is at w + ε: its statistics are the step's
            bn_policy = "freeze" if model is not None and ascent != "momentum" else "update"
        elif bn_policy == "freeze" and model is None:
            raise ValueError(
                "bn_policy='freeze' needs the model to find its running statistics: pass the model as params "
                "or as model=, or use bn_policy='update'."
            )
        self.bn_policy = bn_policy
        self._running_stats = (
            RunningStatsSwap(running_stat_modules(model)) if bn_policy == "freeze" else None
        )

        self.normalize_bias = normalize_bias
        self.norm_over = norm_over
        self.foreach = foreach
        self.sync_ascent = sync_ascent
        self.ascent_interval = ascent_interval
        self.layerwise_scaling = layerwise_scaling
        self.scaled_tensors = scaled_tensors

        for group in groups:
            group.setdefault("rho", rho)
            group.setdefault("perturb", True)
            _check_rho(group["rho"], "rho of a param group")
            if self.rho_schedule is not None:  # the base ρ the schedule scales, as LR schedulers keep initial_lr
                group.setdefault("initial_rho", group["rho"])
        # FSDP2: ε and the backup on local shards, global norms; other sharding schemes are refused here
        self._sharding = sharding_for(model, [p for group in groups for p in group["params"]])
        if self._sharding is not None:
            check_sharded_options(self.mask_scope, sync_ascent)
        self.base_optimizer = base_optimizer(groups, **base_kwargs)
        self.ascent = ascent
        self.ascent_source = make_ascent(
            ascent, self.base_optimizer, foreach=foreach, perturbation=self.perturbation_model.name, scope=scope,
            ascent_interval=ascent_interval, sync_ascent=sync_ascent, bn_policy=bn_policy,
        )
        # the base's defaults too: schedulers such as OneCycleLR(cycle_momentum=True) look for betas/momentum there
        super().__init__(self.base_optimizer.param_groups, {**self.base_optimizer.defaults, "rho": rho, "perturb": True})
        self.param_groups = self.base_optimizer.param_groups  # shared: schedulers work on either object
        if not any(g["perturb"] and g["params"] for g in self.param_groups):
            raise ValueError("No parameter group has perturb=True: SAM would perturb nothing.")

        self.counters = _Counters()
        self._plan: _Plan | None = None
        self._perturbed = False
        self._live_groups: list[list[int]] = []  # the plan's groups that this step perturbed
        self._eps: list[Tensor | None] | None = None  # the last fresh ε, kept for ascent_interval > 1
        self._eps_params: list[Tensor] | None = None
        self._mask_generator = torch.Generator().manual_seed(mask_seed)
        if self.mask_scope in ("random", "ssam-d"):
            self._set_masks(masklib.random_masks(self._targets(), self._keep(), self._mask_generator))
        self._apply_rho_schedule()  # repr and describe() show the ρ of the first step

    def _apply_rho_schedule(self) -> None:
        """Set each group's ρ to the schedule's value for the next SAM step (``counters["sam_steps"]``)."""
        if self.rho_schedule is None:
            return
        step = self._rho_step = self.counters["sam_steps"]
        for group in self.param_groups:
            group.setdefault("initial_rho", group["rho"])
            group["rho"] = scheduled_rho(self.rho_schedule, step, group)

    # --- construction helpers -----------------------------------------------------------------------------

    @staticmethod
    def _groups_from_params(params, scope, include, exclude, model) -> tuple[list[dict[str, Any]], ScopeSpec]:
        """Param groups from tensors or group dicts, and the scope label ``repr`` shows.

        With ``model``, each group without an explicit ``perturb`` is split by ``scope`` (default ``"norm"``),
        its tensors matched to the model's parameters by identity, so that any grouping (timm's or the
        Trainer's weight-decay groups) keeps SAM-ON. Without a model, every tensor is perturbed.
        """
        items = list(params)
        if not items:
            raise ValueError("SAM got an empty parameter list: pass model.parameters(), the model or groups.")
        if all(isinstance(item, dict) for item in items):
            groups = [dict(group) for group in items]
        elif any(isinstance(item, dict) for item in items):
            raise ValueError("SAM got a mix of tensors and param-group dicts; pass one kind.")
        else:
            groups = [{"params": items}]
        for group in groups:
            group["params"] = [group["params"]] if isinstance(group["params"], Tensor) else list(group["params"])
        explicit = all("perturb" in group for group in groups)

        if model is None:
            if scope not in (None, "all", *MASK_SCOPES) or include is not None or exclude is not None:
                raise ValueError(
                    f"scope={scope!r} (or include/exclude) needs the model to find its layers: pass the model "
                    "itself, SAM(model, ...), or the model as model= next to the tensors or groups."
                )
            return groups, scope if scope is not None else ("groups" if explicit else "all")
        if scope is None and explicit and include is None and exclude is None:
            return groups, "groups"  # e.g. normsam.param_groups(model, ...): already split by a scope

        scope = "norm" if scope is None else scope
        selected, _ = select(model, "all" if scope in MASK_SCOPES else scope, include=include, exclude=exclude)
        in_scope = {id(info.param) for info in selected}
        names = {id(p): name for name, p in model.named_parameters()}
        out = []
        for group in groups:
            foreign = sum(id(p) not in names for p in group["params"])
            if foreign:
                raise ValueError(
                    f"{foreign} tensor(s) passed to SAM are not parameters of model= ({type(model).__name__}): "
                    "pass the module these parameters belong to, or leave model= out for SAM on every tensor."
                )
            if "perturb" in group or not group["params"]:
                group.setdefault("param_names", [names[id(p)] for p in group["params"]])
                out.append(group)
                continue
            for perturb in (True, False):
                part = [p for p in group["params"] if (id(p) in in_scope) == perturb]
                if part:
                    out.append({**group, "params": part, "param_names": [names[id(p)] for p in part], "perturb": perturb})
        return out, scope

    def _check_mask_options(self, sparsity, mask_interval, mask_total_steps, drop_rate) -> None:
        if self.mask_scope is None:
            if sparsity is not None:
                raise ValueError(
                    f"sparsity is only used by the element-mask scopes {', '.join(MASK_SCOPES)}; "
                    f"scope={self.scope!r} perturbs whole tensors. Drop sparsity= or pick a mask scope."
                )
            return
        if sparsity is None or not (isinstance(sparsity, (int, float)) and 0.0 < sparsity < 1.0):
            raise ValueError(
                f"scope={self.mask_scope!r} needs sparsity in (0, 1), the share of elements NOT perturbed "
                f"(the paper uses 0.9995 and 0.5); got {sparsity!r}."
            )
        if self.mask_scope == "ssam-d":
            if not (isinstance(mask_interval, int) and mask_interval > 0):
                raise ValueError(
                    f"scope='ssam-d' needs mask_interval, the number of SAM steps between mask updates (> 0); "
                    f"got {mask_interval!r}."
                )
            if not (isinstance(mask_total_steps, int) and mask_total_steps > 0):
                raise ValueError(
                    "scope='ssam-d' needs mask_total_steps, the length in SAM steps of the cosine drop-rate "
                    f"schedule (e.g. epochs * steps_per_epoch); got {mask_total_steps!r}."
                )
            if not (0.0 <= drop_rate <= 1.0):
                raise ValueError(f"Invalid drop_rate: {drop_rate!r}; it must lie in [0, 1].")

    # --- what is perturbed -------------------------------------------------------------------------------

    def _entries(self, perturbed: bool) -> list[tuple[Tensor, dict[str, Any], str | None]]:
        """(param, group, name) of the trainable tensors with ``group["perturb"] == perturbed``."""
        out = []
        for group in self.param_groups:
            if bool(group["perturb"]) != perturbed:
                continue
            names = group.get("param_names") or [None] * len(group["params"])
            out += [(p, group, n) for p, n in zip(group["params"], names) if p.requires_grad]
        return out

    def _plan_key(self) -> tuple:
        # map/attrgetter walk the tensors in C: this runs every step, over every parameter
        return tuple(
            (id(g), id(g["params"]), bool(g["perturb"]), tuple(map(_REQUIRES_GRAD, g["params"])))
            for g in self.param_groups
        )

    def _get_plan(self) -> _Plan:
        """The step's bookkeeping, rebuilt only when the groups, their ``perturb`` or a ``requires_grad``
        changed (or the model moved to another device or dtype); ``add_param_group`` and
        ``load_state_dict`` drop it."""
        key = self._plan_key()
        plan = self._plan
        if plan is not None and plan.key == key:
            first, saved = plan.params[0], plan.backup[0]
            if first.device == saved.device and first.dtype == saved.dtype and (
                plan.sharding is None or plan.sharding.is_current(plan.params, plan.data)
            ):
                return plan
        entries = self._entries(True)
        others = self._entries(False) if self.norm_over == "all" else []
        params, others_params = [p for p, _, _ in entries], [p for p, _, _ in others]
        sharding = self._sharding
        if sharding is None:
            refuse_late_sharding(params + others_params)
        # what ε and the backup act on: the tensors themselves, or their local shards under FSDP2
        data = params if sharding is None else sharding.local(params)
        others_data = others_params if sharding is None else sharding.local(others_params)
        scaled, others_scaled = self._scaled(entries), self._scaled(others)
        groups = list(_grouped(params).values())
        plain_norms = (
            self.foreach
            and self.mask_scope is None
            and self.perturbation_model.geometry == "l2"
            and not any(scaled)
            and not any(others_scaled)
        )
        # SAM-ON: vectors only (norm layers' γ and β) of one (device, dtype), an elementwise T, no element
        # mask, the norm over the perturbed set
        flat = None
        if (
            self.foreach
            and sharding is None
            and self.mask_scope is None
            and self.perturbation_model.elementwise
            and not others
            and len(groups) == 1
            and all(p.dim() == 1 for p in params)
        ):
            flat = _FlatBuffers.for_params(params, None if self.perturbation_model.scale is None else scaled)
        self._plan = _Plan(
            key=key,
            params=params,
            groups_of=[g for _, g, _ in entries],
            scaled=scaled,
            others=others_params,
            others_scaled=others_scaled,
            groups=groups,
            others_groups=list(_grouped(others_params).values()),
            backup=(flat.backup_views if flat is not None
                    else [torch.empty_like(p, memory_format=torch.preserve_format) for p in data]),
            plain_norms=plain_norms,
            flat=flat,
            data=data,
            others_data=others_data,
            sharding=sharding,
            perturbation_model=self.perturbation_model if sharding is None else sharding.perturbation_model(
                self.perturbation_model, params + others_params, data + others_data
            ),
        )
        return self._plan

    def _targets(self) -> list[Tensor]:
        return list(self._get_plan().params)

    def perturbed_parameters(self) -> list[Tensor]:
        """The tensors SAM perturbs (the candidates, for a mask scope). ``loss.backward(inputs=...)`` with
        them is the cheap ascent for callers that accumulate gradients over micro-batches (under FSDP2 use
        :meth:`ascent_inputs`)."""
        return self._targets()

    def ascent_inputs(self) -> list[Tensor]:
        """What to pass to ``loss.backward(inputs=...)`` for a cheap ascent by hand (micro-batch accumulation,
        then ``first_step()``): the perturbed tensors, or under FSDP2 the unsharded parameters autograd sees
        in the current pass (call it after the forward), whose gradients FSDP2 reduces into the perturbed
        tensors' ``.grad``."""
        plan = self._get_plan()
        return list(plan.params) if plan.sharding is None else plan.sharding.ascent_inputs(plan.params)

    def _scaled(self, entries) -> list[bool]:
        model, nb, rule = self.perturbation_model, self.normalize_bias, self.scaled_tensors
        return [model.applies_to(name, normalize_bias=nb, scaled_tensors=rule) for _, _, name in entries]

    def _keep(self) -> int:
        return masklib.keep_count(sum(p.numel() for p in self._targets()), self.sparsity)

    def _set_masks(self, new_masks: list[Tensor]) -> None:
        for p, m in zip(self._targets(), new_masks):
            self.state[p]["mask"] = m

    def masks(self) -> list[Tensor] | None:
        """The element masks of a mask scope, aligned with the perturbed tensors (None otherwise)."""
        if self.mask_scope is None:
            return None
        return [self.state[p].get("mask") for p in self._targets()]

    # --- the two passes ----------------------------------------------------------------------------------

    @property
    def needs_ascent(self) -> bool:
        """Whether the next :meth:`first_step` needs an ascent pass at w (always, unless ``ascent_interval > 1``
        or ``ascent="momentum"``, which never does).

        On the other steps ``first_step()`` applies the stored ε (or the momentum's) and ignores any loss or
        gradient, so a training loop can skip the first forward-backward pass: ``if sam.needs_ascent: ...
        first_step(loss)`` ``else: first_step()``."""
        return self.ascent_source.needs_pass and (
            self.ascent_interval == 1
            or self._eps is None
            or self.counters["sam_steps"] % self.ascent_interval == 0
        )

    @torch.no_grad()
    def first_step(self, loss: Tensor | None = None, zero_grad: bool = False, *, grad_scaler: Any = None) -> None:
        """Perturb the scope: ``w_S ← w_S + ε``.

        No host synchronization (except SSAM-D's mask updates): a non-finite ascent gradient is detected on
        the device, and that step's ε is zeroed there (no perturbation) and counted in
        ``counters["nonfinite_ascent_steps"]``, which syncs only when read.

        Args:
            loss: ``None`` to use the ``.grad`` the caller computed (classic API), or the loss tensor of the
                first forward pass: then only the gradients of the perturbed tensors are computed (the cheap
                ascent) and no ``.grad`` is written. It may be the loss of a sub-batch (``ascent_fraction``).
                Ignored, like ``.grad``, on a step that reuses ε and with ``ascent="momentum"`` (see
                :attr:`needs_ascent`).
            zero_grad: zero every gradient afterwards, ready for the second backward pass.
            grad_scaler: a ``torch.amp.GradScaler`` (or a number) whose scale the ascent gradient carries;
                it is divided out before use, on the device.
        """
        self._warn_if_eval_mode()
        if self._perturbed:
            raise ValueError(
                "first_step() called twice: call second_step() (or restore()) to undo the perturbation "
                "before the next first_step()."
            )
        plan = self._get_plan()
        if self.mask_scope == "ssam-f" and any("mask" not in self.state[p] for p in plan.params):
            raise ValueError(
                "scope='ssam-f' has no Fisher mask yet: call sam.refresh_masks(batches) with a few batches of "
                "training data before the first step (and again on your refresh schedule)."
            )
        if plan.flat is not None:  # the backup in one kernel, before ε: the flat path reads w from it
            torch.cat(plan.params, out=plan.flat.backup)
        self._apply_rho_schedule()
        if self.needs_ascent or not self.ascent_source.needs_pass:  # a fresh ε (from the momentum: no pass)
            eps = self._fresh_epsilon(plan, loss, grad_scaler)
            self._eps, self._eps_params = (eps, plan.params) if self.ascent_interval > 1 else (None, None)
        else:
            self.counters["sam_steps"] += 1
            eps = self._stored_epsilon(plan)
        if self._running_stats is not None:
            self._running_stats.save()
        live = [i for i, e in enumerate(eps) if e is not None]
        self._live_groups = plan.groups if len(live) == len(eps) else [
            [i for i in idx if eps[i] is not None] for idx in plan.groups
        ]
        if self._live_groups is plan.groups and len(plan.groups) == 1:  # the usual case: the plan's own lists
            if plan.flat is None:  # (the flat path's backup is already filled)
                _copy_group(plan.backup, plan.data, self.foreach)
            _add_group(plan.data, eps, self.foreach)
        else:
            for idx in self._live_groups:  # each already one (device, dtype): no regrouping on the hot path
                if idx:
                    params = [plan.data[i] for i in idx]
                    if plan.flat is None:
                        _copy_group([plan.backup[i] for i in idx], params, self.foreach)
                    _add_group(params, [eps[i] for i in idx], self.foreach)
        self._perturbed = True
        if zero_grad:
            self.zero_grad()

    def _fresh_epsilon(self, plan: _Plan, loss, grad_scaler) -> list[Tensor | None]:
        """ε from this step's ascent direction, aligned with ``plan.params`` (None where there is none)."""
        grads, extra_grads = self.ascent_source.directions(self, plan, loss, grad_scaler)
        self.counters["sam_steps"] += 1
        self.counters["ascent_steps"] += 1

        live = [i for i, g in enumerate(grads) if g is not None]
        extra_live = [j for j, g in enumerate(extra_grads) if g is not None]
        if plan.flat is not None and len(live) == len(plan.params) and not extra_live:
            rhos = {group["rho"] for group in plan.groups_of}  # read every step: ρ may be scheduled
            if len(rhos) == 1:
                return self._flat_epsilon(plan, grads, rhos.pop())
        raw = [grads[i] for i in live] + [extra_grads[j] for j in extra_live]
        norm_of = None if plan.sharding is None else plan.sharding.norm_of(  # FSDP2: the global norm
            [plan.params[i] for i in live] + [plan.others[j] for j in extra_live]
        )
        finite = None if plan.plain_norms else self._finite_flag(raw, norm_of)
        extra = [(plan.others_data[j], plan.others_scaled[j], extra_grads[j]) for j in extra_live]
        extra_groups = plan.others_groups if len(extra_live) == len(plan.others) else None
        if self.mask_scope is not None:
            masked = self._apply_masks(plan, grads, finite)
            if self.norm_over == "all":  # the full gradient's norm includes the masked-out elements
                extra += [(plan.params[i], plan.scaled[i], grads[i] - masked[i]) for i in live]
                extra_groups = None
            grads = masked
        if not live:
            finite = self._finite_flag(raw, norm_of) if finite is None else finite
            if finite is not None:
                self.counters.count_nonfinite(finite)
            return [None] * len(plan.params)
        same = len(live) == len(plan.params)  # the usual case: no copies of the plan's lists
        g_live = grads if same else [grads[i] for i in live]
        w_live = plan.data if same else [plan.data[i] for i in live]
        scaled = plan.scaled if same else [plan.scaled[i] for i in live]
        rhos = [plan.groups_of[i]["rho"] for i in live]  # read every step: ρ may be scheduled
        extra_g, extra_w, extra_s = [g for _, _, g in extra], [w for w, _, _ in extra], [s for _, s, _ in extra]
        if self.foreach:
            live_eps, norm = _perturbation_foreach(
                g_live, w_live, plan.perturbation_model, rhos, self.eta, scaled, extra_g, extra_w, extra_s,
                groups=plan.groups if same else None, extra_groups=extra_groups, norm_of=norm_of,
            )
            zero_these, zero_groups = live_eps, plan.groups if same else list(_grouped(live_eps).values())
        else:
            live_eps = perturbation(
                g_live, w_live, model=plan.perturbation_model, rhos=rhos, eta=self.eta, scaled=scaled,
                extra_grads=extra_g, extra_weights=extra_w, extra_scaled=extra_s, foreach=False, norm_of=norm_of,
            )
            zero_these, zero_groups = live_eps, list(_grouped(live_eps).values())
        if finite is None:  # plain_norms: ‖T⊙g‖ with T = 1 and no mask is the gradient's own norm
            finite = torch.isfinite(norm)
        _zero_unless(zero_these, finite, zero_groups, self.foreach)
        self.counters.count_nonfinite(finite)
        if same:
            return live_eps
        eps: list[Tensor | None] = [None] * len(plan.params)
        for i, e in zip(live, live_eps):
            eps[i] = e
        return eps

    def _gradient_directions(self, plan: _Plan, loss, grad_scaler) -> tuple[list[Tensor | None], list[Tensor | None]]:
        """The direction of ``ascent="gradient"``: this step's ascent gradients, unscaled, averaged over
        workers with ``sync_ascent``."""
        grads, extra_grads = self._ascent_gradients(loss, plan)
        if plan.params and all(g is None for g in grads):  # ε would be 0 and the step counted as a SAM step
            raise ValueError(
                f"first_step(): none of the {len(plan.params)} perturbed tensors has an ascent gradient: "
                + ("the loss does not depend on them." if loss is not None else
                   "call loss.backward() before first_step() (a step(closure) closure must call backward()), "
                   "or pass the loss: first_step(loss).")
            )
        if grad_scaler is not None:
            grads, extra_grads = _unscale(grads, grad_scaler), _unscale(extra_grads, grad_scaler)
        if self.sync_ascent and plan.sharding is None:  # (under FSDP2 the ascent gradient is already global)
            grads = self._all_reduce_mean(grads, plan.params)
        return grads, extra_grads

    def _flat_epsilon(self, plan: _Plan, grads: list[Tensor], rho: float) -> list[Tensor]:
        """The flat path (SAM-ON with an elementwise T and one ρ): ε computed in ``plan.flat.epsilon`` from
        the weights ``first_step`` copied into ``plan.flat.backup``; returns its per-tensor views."""
        flat = plan.flat
        norm = _epsilon_flat(
            grads, flat.backup, self.perturbation_model, rho, self.eta, flat.scaled, out=flat.epsilon
        )
        finite = torch.isfinite(norm)
        _zero_unless([flat.epsilon], finite, [[0]], self.foreach)
        self.counters.count_nonfinite(finite)
        return flat.epsilon_views

    def _stored_epsilon(self, plan: _Plan) -> list[Tensor | None]:
        """The last fresh ε, realigned if the plan was rebuilt since (a changed ``requires_grad``)."""
        if self._eps_params is plan.params:
            return self._eps
        by_id = {id(p): e for p, e in zip(self._eps_params, self._eps)}
        return [by_id.get(id(p)) for p in plan.params]

    _eval_mode_checked = False  # set on the instance after the first check: the check costs a module walk

    def _warn_if_eval_mode(self) -> None:
        """Warn once when the model trains in eval() mode: BatchNorm then never updates its running statistics
        and dropout is off. Reads Python flags only, so it never waits for the device."""
        if self._eval_mode_checked or self.model is None or self.model.training:
            return
        self._eval_mode_checked = True
        dropout = nn.modules.dropout._DropoutNd
        if running_stat_modules(self.model) or any(isinstance(m, dropout) for m in self.model.modules()):
            warnings.warn(
                f"SAM.first_step: the model ({type(self.model).__name__}) is in eval() mode, so its BatchNorm "
                "running statistics never move and dropout is off while it trains. Call model.train() before "
                "training steps (model.eval() is for evaluation). Warned once.",
                UserWarning,
                stacklevel=4,  # past first_step and its no_grad wrapper: the caller's line
            )

    def _ascent_gradients(self, loss, plan: _Plan) -> tuple[list[Tensor | None], list[Tensor | None]]:
        if loss is None and plan.sharding is not None:
            return plan.sharding.gradients(plan.params), plan.sharding.gradients(plan.others)
        if loss is None:
            return [p.grad for p in plan.params], [p.grad for p in plan.others]
        if not isinstance(loss, Tensor) or not loss.requires_grad:
            raise ValueError(
                "first_step(loss) needs the loss tensor of the first forward pass, computed with gradients "
                "enabled; call first_step() without a loss to use the .grad from your own backward()."
            )
        if plan.sharding is not None:
            return plan.sharding.ascent_gradients(loss, plan.params, plan.others)
        inputs = plan.params + plan.others
        with torch.enable_grad():
            grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        return list(grads[: len(plan.params)]), list(grads[len(plan.params) :])

    @staticmethod
    def _finite_flag(grads: list[Tensor], norm_of=None) -> Tensor | None:
        """A 0-d bool tensor on the device, no host sync: are all gradients finite? (A norm that overflows
        counts as not finite.) ``None`` without gradients. ``norm_of``: the global norm under FSDP2, so that
        every rank skips the same steps."""
        if norm_of is not None:
            return torch.isfinite(norm_of(grads))
        if not grads:
            return None
        parts = [[grads[i] for i in idx] for idx in _grouped(grads).values()]
        return torch.isfinite(_total_norm(parts, grads[0].device))  # finite iff every per-tensor norm is

    @staticmethod
    def _all_reduce_mean(grads: list[Tensor | None], params: list[Tensor]) -> list[Tensor | None]:
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

    def _apply_masks(self, plan: _Plan, grads: list[Tensor | None], finite: Tensor | None) -> list[Tensor | None]:
        """The masked gradients. SSAM-D updates its mask every ``mask_interval`` fresh ascents, from a finite
        gradient only; that update runs on the host, so those steps sync (the others do not)."""
        if self.mask_scope == "ssam-d" and self.counters["ascent_steps"] % self.mask_interval == 0:
            if finite is None or bool(finite):
                self._update_ssam_d(plan, grads)
        return [
            g.masked_fill(~self.state[p]["mask"], 0) if g is not None else None for p, g in zip(plan.params, grads)
        ]

    def _update_ssam_d(self, plan: _Plan, grads) -> None:
        rate = masklib.cosine_drop_rate(self.drop_rate, self.counters["sam_steps"], self.mask_total_steps)
        count = round(rate * self._keep())
        dense = [g if g is not None else torch.zeros_like(p) for p, g in zip(plan.params, grads)]
        current = [self.state[p]["mask"] for p in plan.params]
        self._set_masks(masklib.drop_and_regrow(current, dense, count, self._mask_generator))
        self.counters["mask_updates"] += 1

    @torch.no_grad()
    def restore(self) -> None:
        """Undo the perturbation exactly (from the saved copies) and the second pass's running statistics."""
        if not self._perturbed:
            raise ValueError(
                "second_step()/restore() called without first_step(): call first_step() first to perturb "
                "the weights (or use step(closure))."
            )
        plan = self._plan
        for idx in self._live_groups:
            if idx:
                _copy_group([plan.data[i] for i in idx], [plan.backup[i] for i in idx], self.foreach)
        if self._running_stats is not None:
            self._running_stats.restore()
        self._perturbed = False

    @property
    def is_perturbed(self) -> bool:
        return self._perturbed

    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the perturbed tensors exactly, then step the base optimizer with the current gradients."""
        self.restore()
        self.base_optimizer.step()
        self._opt_called = True  # tells an LR scheduler built on this object that the optimizer stepped
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        """One SAM step with a closure that zeroes nothing, computes the loss, calls ``backward()`` and
        returns the loss; it is called twice. Returns the loss of the first call. On a step that reuses ε
        (``ascent_interval > 1``) it is called once, at ``w + ε``, and that loss is returned.

        After the cheap ascent ``first_step(loss)`` (the integrations' route), the weights are perturbed and
        ``step(closure)`` runs the closure once, as the second pass, then ``second_step()``; the closure may be
        ``None`` when the second pass's gradients are already there."""
        with self.restore_on_error():
            return self._step(closure)

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

    def _step(self, closure: Callable[[], Tensor] | None) -> Tensor:
        if self.is_perturbed:
            return self._step_after_ascent(closure)
        if closure is None:
            raise ValueError(
                "SAM.step() needs a closure that computes the loss and calls loss.backward(); or call "
                "first_step() and second_step() yourself."
            )
        closure = torch.enable_grad()(closure)
        if not self.needs_ascent:  # ascent_interval's reused ε or the momentum ascent: one pass at w + ε
            self.first_step()
            loss = closure()
            self.second_step()
            return loss
        loss = closure()
        if loss is None:  # the closure skipped the batch (Lightning: training_step returned None): no step at all
            return None
        self.first_step(zero_grad=True)
        closure()
        self.second_step()
        return loss

    def _step_after_ascent(self, closure: Callable[[], Tensor] | None) -> Tensor | None:
        """The rest of a step that ``first_step(loss)`` began: an optional second-pass closure, then the update.

        Frameworks that call ``optimizer.step()`` themselves (HF Trainer, Lightning) reach the base update this
        way, so their step counting, LR-scheduler bookkeeping and precision plugins see an ordinary step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.second_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        if set_to_none and type(self.base_optimizer).zero_grad is torch.optim.Optimizer.zero_grad:
            # what Optimizer.zero_grad does with set_to_none, minus its profiler range and dynamo guard:
            # a SAM step zeroes twice, and on a fast GPU that host time shows
            for group in self.param_groups:
                for p in group["params"]:
                    p.grad = None
            return
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if any(param_group is g for g in self.base_optimizer.param_groups):
            super().add_param_group(param_group)  # during __init__: the groups are already the base's
            return
        for group in place_new_group(self, param_group):  # as the constructor would have placed it
            group.setdefault("rho", self.defaults["rho"])
            group.setdefault("perturb", self.defaults["perturb"])
            _check_rho(group["rho"], "rho of a param group")
            self.base_optimizer.add_param_group(group)
        self._plan = None
        self._apply_rho_schedule()

    # --- masks from data -------------------------------------------------------------------------------

    def refresh_masks(
        self,
        batches: Iterable[tuple[Tensor, Tensor]],
        *,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        """SSAM-F: set the mask to the top-k elements of the empirical Fisher ``Σ g²`` over ``batches``.

        Each batch contributes the square of its mean-loss gradient; feed batches of size 1 for the
        per-sample empirical Fisher. Running statistics are left as they were. Unlike a SAM step, this
        waits for the device (the top-k runs on the host).
        """
        if self.mask_scope != "ssam-f":
            raise ValueError(
                f"refresh_masks() is for scope='ssam-f'; scope={self.scope!r} "
                + ("updates its mask itself every mask_interval steps." if self.mask_scope == "ssam-d" else "has no data-driven mask.")
            )
        if self.model is None:
            raise ValueError("refresh_masks() needs the model: pass it to SAM as params or model=.")
        if self._perturbed:
            raise ValueError("refresh_masks() during a SAM step: call it before first_step() or after second_step().")
        loss_fn = loss_fn or F.cross_entropy
        targets = self._targets()
        fisher = [torch.zeros_like(p, dtype=torch.float32) for p in targets]
        seen = 0
        snapshot = RunningStatsFreezer(running_stat_modules(self.model))
        snapshot.save()
        try:
            for inputs, labels in batches:
                with torch.enable_grad():
                    loss = loss_fn(self.model(inputs), labels)
                    grads = torch.autograd.grad(loss, targets, allow_unused=True)
                for acc, g in zip(fisher, grads):
                    if g is not None:
                        acc.add_(g.float().square())
                seen += 1
        finally:
            snapshot.restore()
        if seen == 0:
            raise ValueError("refresh_masks() got no batches: pass an iterable of (inputs, labels).")
        self._set_masks(masklib.topk_masks(fisher, self._keep()))
        self.counters["mask_updates"] += 1

    # --- state -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus SAM's masks, counters, mask generator and (with
        ``ascent_interval > 1``) the stored ε under ``"sam"``. Reads the device-side counter: syncs."""
        if self._perturbed:
            raise ValueError("state_dict() while the weights are perturbed: save after second_step().")
        state = self.base_optimizer.state_dict()
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        state["sam"] = {
            "masks": {index[id(p)]: s["mask"].clone() for p, s in self.state.items() if "mask" in s},
            "counters": dict(self.counters),
            "mask_generator": self._mask_generator.get_state(),
            "epsilon": None if self._eps is None else {
                index[id(p)]: e.clone() for p, e in zip(self._eps_params, self._eps) if e is not None
            },
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; the shared ``param_groups`` are re-linked to the base optimizer's."""
        if self._perturbed:  # the plan (and with it the saved copy of w) would be dropped with w + ε in place
            raise ValueError(
                "load_state_dict() while the weights are perturbed (between first_step() and second_step()): "
                "call second_step() or restore() first."
            )
        state_dict = dict(state_dict)
        sam_state = state_dict.pop("sam", None)
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups  # load_state_dict made new group dicts
        self._plan, self._eps, self._eps_params = None, None, None
        if sam_state is None:
            self._apply_rho_schedule()
            return
        params = [p for g in self.param_groups for p in g["params"]]
        self.state.clear()
        for i, mask in sam_state["masks"].items():
            self.state[params[int(i)]]["mask"] = mask.to(device=params[int(i)].device, dtype=torch.bool)
        counters = dict(sam_state["counters"])
        counters.setdefault("ascent_steps", counters["sam_steps"])  # checkpoints from before ascent_interval
        self.counters.update(counters)
        if sam_state.get("epsilon") is not None:
            saved = {int(i): e for i, e in sam_state["epsilon"].items()}
            self._eps_params = self._targets()
            position = {id(p): i for i, p in enumerate(params)}
            self._eps = [
                saved[position[id(p)]].to(device=p.device, dtype=p.dtype) if position[id(p)] in saved else None
                for p in self._eps_params
            ]
        self._mask_generator.set_state(sam_state["mask_generator"])
        self._apply_rho_schedule()  # at the restored step: the schedule goes on where it stopped

    def __repr__(self) -> str:
        perturbed = sum(p.numel() for p in self._targets())
        total = sum(p.numel() for g in self.param_groups for p in g["params"])
        return (
            f"SAM(base={type(self.base_optimizer).__name__}, perturbation={self.perturbation_model.name!r}, "
            f"scope={self.scope!r}, rho={self._rho_in_effect()}, eta={self.eta}, perturbed={perturbed:,}/{total:,}"
            + (f", rho_schedule={self.rho_schedule!r}" if self.rho_schedule is not None else "")
            + (f", ascent={self.ascent!r})" if self.ascent != "gradient" else ")")
            + self._no_model_note()
        )

    def _rho_in_effect(self) -> str:
        """The perturbed groups' ρ as the next step uses it (one value, or one per group where they differ)."""
        rhos = [g["rho"] for g in self.param_groups if g["perturb"]]
        distinct = list(dict.fromkeys(rhos))
        return f"{distinct[0]:g}" if len(distinct) == 1 else "[" + ", ".join(f"{r:g}" for r in rhos) + "]"

    def _no_model_note(self) -> str:
        if self.model is not None or self.scope != "all":
            return ""
        return " [no model given: SAM on every tensor passed, not SAM-ON; pass model= to perturb by scope]"

    def describe(self) -> str:
        """What this SAM perturbs: scope, counts and the names of the perturbed tensors (when known)."""
        entries = self._entries(True)
        perturbed = sum(p.numel() for p, _, _ in entries)
        total = sum(p.numel() for g in self.param_groups for p in g["params"] if p.requires_grad)
        named = [name for _, _, name in entries if name is not None]
        lines = [
            f"scope={self.scope!r}: {perturbed:,} of {total:,} trainable parameters perturbed "
            f"({100 * perturbed / max(total, 1):.4f}%) in {len(entries)} tensors{self._no_model_note()}",
            f"rho={self._rho_in_effect()}" + (
                f" (set by {self.rho_schedule!r} for SAM step {self._rho_step}, counted from 0)"
                if self.rho_schedule is not None else ""),
        ]
        if named:
            shown = named[:12]
            lines += [f"  {name}" for name in shown]
            if len(named) > len(shown):
                lines.append(f"  ... {len(named) - len(shown)} more")
        return "\n".join(lines)


def _add_group(params: list[Tensor], eps: list[Tensor], foreach: bool) -> None:
    """``params += eps`` for tensors of one (device, dtype) group."""
    if foreach:
        torch._foreach_add_(params, eps)
    else:
        for p, e in zip(params, eps):
            p.add_(e)


def _copy_group(dst: list[Tensor], src: list[Tensor], foreach: bool) -> None:
    """``dst ← src`` for tensors of one (device, dtype) group."""
    if foreach:
        torch._foreach_copy_(dst, src)
    else:
        for d, t in zip(dst, src):
            d.copy_(t)


@dataclass
class _Plan:
    """What a SAM step needs that changes only with the param groups: built once, reused every step."""

    key: tuple
    params: list[Tensor]  # the perturbed tensors (the candidates, for a mask scope)
    groups_of: list[dict[str, Any]]  # each one's param group, for its current ρ (schedulable)
    scaled: list[bool]  # whether T applies
    others: list[Tensor]  # norm_over="all": the other trainable tensors, in the norm only
    others_scaled: list[bool]
    groups: list[list[int]]  # indices of params per (device, dtype), for the foreach kernels
    others_groups: list[list[int]]
    backup: list[Tensor]  # the persistent copy of params, refilled each step (views of flat.backup if flat)
    plain_norms: bool  # T = 1 everywhere, no mask, foreach: ε's norms are the gradients' own
    flat: _FlatBuffers | None  # SAM-ON with an elementwise T: ε and the backup as flat buffers
    data: list[Tensor]  # what ε and the backup act on: params themselves, or their local shards (FSDP2)
    others_data: list[Tensor]
    sharding: ShardedTensors | None  # FSDP2: local shards, global norms and ascent gradient
    perturbation_model: Any  # the SAM's model; under FSDP2 with whole-tensor norms (layerwise)


@dataclass
class _FlatBuffers:
    """Flat ε and backup buffers for perturbed tensors that are all vectors of one device and dtype, with
    per-tensor views made once: ε, the backup copy and the finiteness rule then take one kernel each
    instead of one per tensor."""

    epsilon: Tensor
    epsilon_views: list[Tensor]
    backup: Tensor  # also the weights w that T reads
    backup_views: list[Tensor]
    scaled: Tensor | None  # per element: whether T applies (None: everywhere)

    @classmethod
    def for_params(cls, params: list[Tensor], scaled: list[bool] | None) -> _FlatBuffers:
        """``scaled``: per tensor, whether T applies; None when the model has no T (``sam``)."""
        sizes = [p.numel() for p in params]
        epsilon, backup = (params[0].new_empty(sum(sizes)) for _ in range(2))
        mask = None if scaled is None or all(scaled) else torch.cat(
            [torch.full((n,), s, dtype=torch.bool, device=params[0].device) for n, s in zip(sizes, scaled)]
        )
        return cls(epsilon, list(epsilon.split(sizes)), backup, list(backup.split(sizes)), mask)


class _Counters(MutableMapping):
    """``SAM.counters``, a dict of step counts. ``nonfinite_ascent_steps`` is counted on the device, so that a
    step never waits for it; reading it waits (syncs) once."""

    _DEVICE_KEY = "nonfinite_ascent_steps"

    def __init__(self) -> None:
        self._host: dict[str, int] = {"sam_steps": 0, "ascent_steps": 0, "mask_updates": 0}
        self._base = 0  # nonfinite steps already read back to the host
        self._device: Tensor | None = None

    def count_nonfinite(self, finite: Tensor) -> None:
        if self._device is not None and self._device.device != finite.device:
            self._base += int(self._device)  # the flag moved device (model.to): fold the old count in once
            self._device = None
        if self._device is None:
            self._device = torch.zeros((), dtype=torch.int64, device=finite.device)
        self._device.add_(finite.logical_not())

    def __getitem__(self, key: str) -> int:
        if key == self._DEVICE_KEY:
            return self._base + (int(self._device) if self._device is not None else 0)
        return self._host[key]

    def __setitem__(self, key: str, value: int) -> None:
        if key == self._DEVICE_KEY:
            self._base, self._device = int(value), None
        else:
            self._host[key] = int(value)

    def __delitem__(self, key: str) -> None:
        raise TypeError("SAM.counters keeps all its keys; set a count to 0 instead.")

    def __iter__(self) -> Iterator[str]:
        yield from ("sam_steps", "ascent_steps", self._DEVICE_KEY, "mask_updates")
        yield from (k for k in self._host if k not in ("sam_steps", "ascent_steps", "mask_updates"))

    def __len__(self) -> int:
        return len(self._host) + 1

    def __repr__(self) -> str:
        return repr(dict(self))


def _unscale(grads: list[Tensor | None], grad_scaler: Any) -> list[Tensor | None]:
    """``g / scale`` as new tensors. A ``GradScaler``'s scale is read as its device tensor: ``get_scale()``
    would copy it to the host and wait for the device."""
    if isinstance(grad_scaler, (int, float, Tensor)):
        scale = grad_scaler
    elif not grad_scaler.is_enabled():
        return grads
    else:
        scale = grad_scaler._get_scale_async() if hasattr(grad_scaler, "_get_scale_async") else None
        if scale is None:  # nothing scaled yet (get_scale() then returns the initial scale, no sync)
            scale = float(grad_scaler.get_scale())
    out = list(grads)
    live = [i for i, g in enumerate(grads) if g is not None]
    for idx in _grouped([grads[i] for i in live]).values():
        pick = [live[j] for j in idx]
        first = grads[pick[0]]
        s = scale.to(device=first.device, dtype=first.dtype) if isinstance(scale, Tensor) else float(scale)
        for i, g in zip(pick, torch._foreach_div([grads[i] for i in pick], s)):
            out[i] = g
    return out


_SAME_WIDTH_INT = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
                   torch.bfloat16: torch.int16}


def _zero_unless(tensors: list[Tensor], flag: Tensor, groups: list[list[int]], foreach: bool) -> None:
    """Set ``tensors`` (fresh, contiguous) to +0 where the 0-d device bool ``flag`` is False; no host sync.

    Multiplying by the flag would not do: ε is non-finite exactly when the flag is False, and 0·inf = NaN.
    So the bits are multiplied, read as integers of the same width: ×1 keeps every bit, ×0 gives +0.0."""
    for idx in groups:
        first = tensors[idx[0]]
        int_dtype = _SAME_WIDTH_INT.get(first.dtype)
        if int_dtype is None:  # no same-width integer type: a plain where, one kernel per tensor
            for i in idx:
                tensors[i].copy_(torch.where(flag.to(first.device), tensors[i], torch.zeros_like(tensors[i])))
            continue
        bits = [tensors[i].view(int_dtype) for i in idx]
        keep = flag.to(device=first.device, dtype=int_dtype)
        if foreach:
            torch._foreach_mul_(bits, keep)
        else:
            for b in bits:
                b.mul_(keep)
