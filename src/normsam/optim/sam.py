r"""``normsam.SAM``: sharpness-aware minimization around any base optimizer, with SAM-ON's cheap ascent.

One SAM step (SPEC §1):

.. math::

    g_S &= \nabla_S L(w)                          && \text{ascent pass, perturbed set } S \text{ only}\\
    \varepsilon &= \mathrm{perturbation}(g_S, w_S; \rho)    && \text{see normsam.optim.perturbations}\\
    g' &= \nabla L(w + \varepsilon)               && \text{second pass, all parameters}\\
    w_S &\leftarrow \text{saved copy};\quad w \leftarrow \mathrm{base\_step}(w, g')

Only the perturbed tensors are copied, so SAM-ON's extra memory is the size of the norm parameters.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normsam.optim import masks as masklib
from normsam.optim.perturbations import _grouped, get_perturbation, perturbation
from normsam.optim.running_stats import BN_POLICIES, RunningStatsSnapshot, running_stat_modules
from normsam.optim.scopes import MASK_SCOPES, PARAMETER_SCOPES, ScopeSpec, param_groups

__all__ = ["SAM"]

NORM_OVER = ("perturbed", "all")


def _check_rho(rho: Any, where: str = "rho") -> float:
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
            tensors (all perturbed, treated as weights by the bias rule), or of param-group dicts as built by
            :func:`normsam.param_groups` (a group may carry ``perturb: bool`` and its own ``rho``).
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
            ``"ssam-d"``; with tensors or groups only ``"all"`` or a mask scope (masks over perturbed tensors).
        include, exclude: patterns or predicates that add to / remove from a module's scope.
        sparsity: share of candidate elements *not* perturbed by a mask scope, in (0, 1).
        mask_interval: ``ssam-d``: SAM steps between mask updates.
        mask_total_steps: ``ssam-d``: length (in SAM steps) of the cosine drop-rate schedule.
        drop_rate: ``ssam-d``: the drop rate at step 0 of the cosine schedule.
        mask_seed: seed of the random masks and of SSAM-D's regrowth.
        bn_policy: running statistics in the second pass: ``"freeze"`` (default when the model is known) or
            ``"update"``. Needs the model: pass it as ``params`` or ``model=``.
        model: the model, when ``params`` are tensors or groups (for ``bn_policy`` and ``ssam-f``).
        foreach: use the ``torch._foreach_*`` path (default) or the per-tensor reference loop.
        sync_ascent: under ``torch.distributed``, average the ascent gradient over workers (only the perturbed
            tensors are communicated). Default: each worker uses its own, as in the original SAM.
        **base_kwargs: options of the base optimizer (``lr``, ``momentum``, ``weight_decay`` …).

    Use either ``step(closure)``, the classic two passes (``loss.backward(); first_step(zero_grad=True);
    loss2.backward(); second_step(zero_grad=True)``), or the cheap ascent ``first_step(loss)`` that computes
    the gradients of the perturbed tensors only.
    """

    def __init__(
        self,
        params: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: Callable[..., torch.optim.Optimizer],
        *,
        rho: float = 0.05,
        perturbation: str = "sam",
        eta: float | None = None,
        normalize_bias: bool = False,
        norm_over: str = "perturbed",
        scope: ScopeSpec | None = None,
        include: ScopeSpec | None = None,
        exclude: ScopeSpec | None = None,
        sparsity: float | None = None,
        mask_interval: int | None = None,
        mask_total_steps: int | None = None,
        drop_rate: float = 0.5,
        mask_seed: int = 0,
        bn_policy: str | None = None,
        model: nn.Module | None = None,
        foreach: bool = True,
        sync_ascent: bool = False,
        **base_kwargs: Any,
    ):
        rho = _check_rho(rho)
        self.perturbation_model = get_perturbation(perturbation)
        self.eta = self.perturbation_model.default_eta if eta is None else eta
        if not (isinstance(self.eta, (int, float)) and math.isfinite(self.eta) and self.eta >= 0):
            raise ValueError(f"Invalid eta: {eta!r}; eta must be a finite number >= 0.")
        if norm_over not in NORM_OVER:
            raise ValueError(f"Invalid norm_over: {norm_over!r}; use one of {', '.join(map(repr, NORM_OVER))}.")
        if bn_policy is not None and bn_policy not in BN_POLICIES:
            raise ValueError(
                f"Invalid bn_policy: {bn_policy!r}; use one of {', '.join(map(repr, BN_POLICIES))}."
            )
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
            groups = self._groups_from_params(params, scope, include, exclude)
        self.model = model
        self.scope = scope if scope is not None else "groups"
        self.mask_scope = scope if isinstance(scope, str) and scope in MASK_SCOPES else None
        self._check_mask_options(sparsity, mask_interval, mask_total_steps, drop_rate)
        self.sparsity = sparsity
        self.mask_interval = mask_interval
        self.mask_total_steps = mask_total_steps
        self.drop_rate = drop_rate

        if bn_policy is None:
            bn_policy = "freeze" if model is not None else "update"
        elif bn_policy == "freeze" and model is None:
            raise ValueError(
                "bn_policy='freeze' needs the model to find its running statistics: pass the model as params "
                "or as model=, or use bn_policy='update'."
            )
        self.bn_policy = bn_policy
        self._running_stats = (
            RunningStatsSnapshot(running_stat_modules(model)) if bn_policy == "freeze" else None
        )

        self.normalize_bias = normalize_bias
        self.norm_over = norm_over
        self.foreach = foreach
        self.sync_ascent = sync_ascent

        for group in groups:
            group.setdefault("rho", rho)
            group.setdefault("perturb", True)
            _check_rho(group["rho"], "rho of a param group")
        self.base_optimizer = base_optimizer(groups, **base_kwargs)
        super().__init__(self.base_optimizer.param_groups, {"rho": rho, "perturb": True})
        self.param_groups = self.base_optimizer.param_groups  # shared: schedulers work on either object
        if not any(g["perturb"] and g["params"] for g in self.param_groups):
            raise ValueError("No parameter group has perturb=True: SAM would perturb nothing.")

        self.counters = {"sam_steps": 0, "nonfinite_ascent_steps": 0, "mask_updates": 0}
        self._backup: list[tuple[Tensor, Tensor]] | None = None
        self._mask_generator = torch.Generator().manual_seed(mask_seed)
        if self.mask_scope in ("random", "ssam-d"):
            self._set_masks(masklib.random_masks(self._targets(), self._keep(), self._mask_generator))

    # --- construction helpers -----------------------------------------------------------------------------

    @staticmethod
    def _groups_from_params(params, scope, include, exclude) -> list[dict[str, Any]]:
        items = list(params)
        if not items:
            raise ValueError("SAM got an empty parameter list: pass model.parameters(), the model or groups.")
        if scope not in (None, "all", *MASK_SCOPES) or include is not None or exclude is not None:
            raise ValueError(
                f"scope={scope!r} (or include/exclude) needs the model to find its layers: pass the model itself, "
                "SAM(model, ...), or groups from normsam.param_groups(model, scope) with scope=None."
            )
        if all(isinstance(item, dict) for item in items):
            return [dict(group) for group in items]
        if any(isinstance(item, dict) for item in items):
            raise ValueError("SAM got a mix of tensors and param-group dicts; pass one kind.")
        return [{"params": items}]

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

    def _targets(self) -> list[Tensor]:
        return [p for p, _, _ in self._entries(True)]

    def perturbed_parameters(self) -> list[Tensor]:
        """The tensors SAM perturbs (the candidates, for a mask scope). ``loss.backward(inputs=...)`` with
        them is the cheap ascent for callers that accumulate gradients over micro-batches."""
        return self._targets()

    def _scaled(self, entries) -> list[bool]:
        model, nb = self.perturbation_model, self.normalize_bias
        return [model.scales(name is not None and name.endswith("bias"), nb) for _, _, name in entries]

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

    @torch.no_grad()
    def first_step(self, loss: Tensor | None = None, zero_grad: bool = False, *, grad_scaler: Any = None) -> None:
        """Perturb the scope: ``w_S ← w_S + ε``.

        Args:
            loss: ``None`` to use the ``.grad`` the caller computed (classic API), or the loss tensor of the
                first forward pass: then only the gradients of the perturbed tensors are computed (the cheap
                ascent) and no ``.grad`` is written.
            zero_grad: zero every gradient afterwards, ready for the second backward pass.
            grad_scaler: a ``torch.amp.GradScaler`` (or a number) whose scale the ascent gradient carries;
                it is divided out before use.
        """
        if self._backup is not None:
            raise ValueError(
                "first_step() called twice: call second_step() (or restore()) to undo the perturbation "
                "before the next first_step()."
            )
        entries = self._entries(True)
        if self.mask_scope == "ssam-f" and any("mask" not in self.state[p] for p, _, _ in entries):
            raise ValueError(
                "scope='ssam-f' has no Fisher mask yet: call sam.refresh_masks(batches) with a few batches of "
                "training data before the first step (and again on your refresh schedule)."
            )
        others = self._entries(False) if self.norm_over == "all" else []
        grads, extra_grads = self._ascent_gradients(loss, entries, others)
        if grad_scaler is not None:
            scale = grad_scaler.get_scale() if hasattr(grad_scaler, "get_scale") else float(grad_scaler)
            grads = [g / scale if g is not None else None for g in grads]
            extra_grads = [g / scale if g is not None else None for g in extra_grads]
        if self.sync_ascent:
            grads = self._all_reduce_mean(grads, [p for p, _, _ in entries])

        self.counters["sam_steps"] += 1
        extra = [(e, g) for e, g in zip(others, extra_grads) if g is not None]
        finite = self._all_finite([g for g in grads if g is not None] + [g for _, g in extra])
        if finite and self.mask_scope is not None:
            masked = self._apply_masks(entries, grads)
            if self.norm_over == "all":  # the full gradient's norm includes the masked-out elements
                extra += [(e, g - m) for e, g, m in zip(entries, grads, masked) if g is not None]
            grads = masked
        self._backup = []
        if self._running_stats is not None:
            self._running_stats.save()
        keep = [i for i, g in enumerate(grads) if g is not None]
        entries, grads = [entries[i] for i in keep], [grads[i] for i in keep]
        if not finite:
            self.counters["nonfinite_ascent_steps"] += 1
            warnings.warn(
                "SAM: the ascent gradient is not finite; this step uses no perturbation "
                f"(counters['nonfinite_ascent_steps'] = {self.counters['nonfinite_ascent_steps']}).",
                RuntimeWarning,
                stacklevel=2,
            )
        elif entries:
            params = [p for p, _, _ in entries]
            eps = perturbation(
                grads,
                params,
                model=self.perturbation_model,
                rhos=[group["rho"] for _, group, _ in entries],
                eta=self.eta,
                scaled=self._scaled(entries),
                extra_grads=[g for _, g in extra],
                extra_weights=[e[0] for e, _ in extra],
                extra_scaled=self._scaled([e for e, _ in extra]),
                foreach=self.foreach,
            )
            self._backup = [(p, p.detach().clone()) for p in params]
            _add_(params, eps, self.foreach)
        if zero_grad:
            self.zero_grad()

    def _ascent_gradients(self, loss, entries, others) -> tuple[list[Tensor | None], list[Tensor | None]]:
        if loss is None:
            return [p.grad for p, _, _ in entries], [p.grad for p, _, _ in others]
        if not isinstance(loss, Tensor) or not loss.requires_grad:
            raise ValueError(
                "first_step(loss) needs the loss tensor of the first forward pass, computed with gradients "
                "enabled; call first_step() without a loss to use the .grad from your own backward()."
            )
        inputs = [p for p, _, _ in entries + others]
        with torch.enable_grad():
            grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        return list(grads[: len(entries)]), list(grads[len(entries) :])

    @staticmethod
    def _all_finite(grads: list[Tensor]) -> bool:
        """One host sync: are all gradients finite? (A norm that overflows counts as not finite.)"""
        if not grads:
            return True
        device = grads[0].device
        norms = [
            torch.stack(torch._foreach_norm([grads[i] for i in idx])).float().to(device) for idx in _grouped(grads).values()
        ]
        return bool(torch.isfinite(torch.cat(norms)).all())

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

    def _apply_masks(self, entries, grads: list[Tensor | None]) -> list[Tensor | None]:
        if self.mask_scope == "ssam-d" and self.counters["sam_steps"] % self.mask_interval == 0:
            self._update_ssam_d(entries, grads)
        return [
            g.masked_fill(~self.state[p]["mask"], 0) if g is not None else None for (p, _, _), g in zip(entries, grads)
        ]

    def _update_ssam_d(self, entries, grads) -> None:
        rate = masklib.cosine_drop_rate(self.drop_rate, self.counters["sam_steps"], self.mask_total_steps)
        count = round(rate * self._keep())
        dense = [g if g is not None else torch.zeros_like(p) for (p, _, _), g in zip(entries, grads)]
        current = [self.state[p]["mask"] for p, _, _ in entries]
        self._set_masks(masklib.drop_and_regrow(current, dense, count, self._mask_generator))
        self.counters["mask_updates"] += 1

    @torch.no_grad()
    def restore(self) -> None:
        """Undo the perturbation exactly (from the saved copies) and the second pass's running statistics."""
        if self._backup is None:
            raise ValueError(
                "second_step()/restore() called without first_step(): call first_step() first to perturb "
                "the weights (or use step(closure))."
            )
        if self._backup:
            _copy_([p for p, _ in self._backup], [saved for _, saved in self._backup], self.foreach)
        if self._running_stats is not None:
            self._running_stats.restore()
        self._backup = None

    @property
    def is_perturbed(self) -> bool:
        return self._backup is not None

    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the perturbed tensors exactly, then step the base optimizer with the current gradients."""
        self.restore()
        self.base_optimizer.step()
        self._opt_called = True  # tells an LR scheduler built on this object that the optimizer stepped
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        """One SAM step with a closure that zeroes nothing, computes the loss, calls ``backward()`` and
        returns the loss; it is called twice. Returns the loss of the first call."""
        if closure is None:
            raise ValueError(
                "SAM.step() needs a closure that computes the loss and calls loss.backward(); or call "
                "first_step() and second_step() yourself."
            )
        closure = torch.enable_grad()(closure)
        loss = closure()
        self.first_step(zero_grad=True)
        closure()
        self.second_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if any(param_group is g for g in self.base_optimizer.param_groups):
            super().add_param_group(param_group)  # during __init__: the groups are already the base's
            return
        param_group.setdefault("rho", self.defaults["rho"])
        param_group.setdefault("perturb", self.defaults["perturb"])
        _check_rho(param_group["rho"], "rho of a param group")
        self.base_optimizer.add_param_group(param_group)

    # --- masks from data -------------------------------------------------------------------------------

    def refresh_masks(
        self,
        batches: Iterable[tuple[Tensor, Tensor]],
        *,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        """SSAM-F: set the mask to the top-k elements of the empirical Fisher ``Σ g²`` over ``batches``.

        Each batch contributes the square of its mean-loss gradient; feed batches of size 1 for the
        per-sample empirical Fisher. Running statistics are left as they were.
        """
        if self.mask_scope != "ssam-f":
            raise ValueError(
                f"refresh_masks() is for scope='ssam-f'; scope={self.scope!r} "
                + ("updates its mask itself every mask_interval steps." if self.mask_scope == "ssam-d" else "has no data-driven mask.")
            )
        if self.model is None:
            raise ValueError("refresh_masks() needs the model: pass it to SAM as params or model=.")
        if self._backup is not None:
            raise ValueError("refresh_masks() during a SAM step: call it before first_step() or after second_step().")
        loss_fn = loss_fn or F.cross_entropy
        targets = self._targets()
        fisher = [torch.zeros_like(p, dtype=torch.float32) for p in targets]
        seen = 0
        snapshot = RunningStatsSnapshot(running_stat_modules(self.model))
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
        """The base optimizer's state dict plus SAM's masks, counters and mask generator under ``"sam"``."""
        if self._backup is not None:
            raise ValueError("state_dict() while the weights are perturbed: save after second_step().")
        state = self.base_optimizer.state_dict()
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        state["sam"] = {
            "masks": {index[id(p)]: s["mask"].clone() for p, s in self.state.items() if "mask" in s},
            "counters": dict(self.counters),
            "mask_generator": self._mask_generator.get_state(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; the shared ``param_groups`` are re-linked to the base optimizer's."""
        state_dict = dict(state_dict)
        sam_state = state_dict.pop("sam", None)
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups  # load_state_dict made new group dicts
        if sam_state is None:
            return
        params = [p for g in self.param_groups for p in g["params"]]
        self.state.clear()
        for i, mask in sam_state["masks"].items():
            self.state[params[int(i)]]["mask"] = mask.to(device=params[int(i)].device, dtype=torch.bool)
        self.counters.update(sam_state["counters"])
        self._mask_generator.set_state(sam_state["mask_generator"])

    def __repr__(self) -> str:
        perturbed = sum(p.numel() for p in self._targets())
        total = sum(p.numel() for g in self.param_groups for p in g["params"])
        return (
            f"SAM(base={type(self.base_optimizer).__name__}, perturbation={self.perturbation_model.name!r}, "
            f"scope={self.scope!r}, rho={self.defaults['rho']}, eta={self.eta}, perturbed={perturbed:,}/{total:,})"
        )


def _add_(params: list[Tensor], eps: list[Tensor], foreach: bool) -> None:
    if not foreach:
        for p, e in zip(params, eps):
            p.add_(e)
        return
    for idx in _grouped(params).values():
        torch._foreach_add_([params[i] for i in idx], [eps[i] for i in idx])


def _copy_(params: list[Tensor], saved: list[Tensor], foreach: bool) -> None:
    if not foreach:
        for p, s in zip(params, saved):
            p.copy_(s)
        return
    for idx in _grouped(params).values():
        torch._foreach_copy_([params[i] for i in idx], [saved[i] for i in idx])
