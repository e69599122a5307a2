"""``SAMOptions``: every option of :class:`normsam.SAM` in one frozen, validated value.

The one thing the runner (:class:`normsam.train.config.TrainConfig`), ``normsam bench``, the HF ``SAMTrainer`` and
the Lightning mixin build instead of copying SAM's keyword list. ``SAM(model, SGD, lr=0.1, rho=0.5)`` builds
one from its keywords; ``SAM(model, SGD, SAMOptions(rho=0.5), lr=0.1)`` takes a ready one. Every check that
does not need the model happens here, when the value is made, so a typo or a conflict surfaces before a model
is built or a framework starts training. Options are fixed for the life of a ``SAM``: the radius a step uses
is each param group's ``rho`` (set it there, or give a ``rho_schedule``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from normsam.optim.ascent import ASCENTS, check_momentum_options
from normsam.optim.perturbations import LAYERWISE_SCALINGS, SCALED_TENSORS, get_perturbation
from normsam.optim.rho_schedules import RhoSchedule, as_rho_schedule
from normsam.optim.running_stats import BN_POLICIES
from normsam.optim.scopes import MASK_SCOPES, ScopeSpec

__all__ = ["SAMOptions", "NORM_OVER", "VARIANTS", "TYPICAL_RHO", "rho_required", "set_group_rho", "check_rho", "option_names", "unknown_option_error", "options_and_base_kwargs",
           "build_base_optimizer", "signature_with_options"]

NORM_OVER = ("perturbed", "all")

#: SAM itself, and the variants whose descent rule or ascent direction differ (normsam.optim.descent, .transforms).
VARIANTS = ("sam", "gsam", "wsam", "looksam", "friendly-sam")

#: ρ ranges from the paper's figure (WRN-28-10, CIFAR-100), per perturbation model: (SAM-all, SAM-ON). The reason
#: ρ has no default: a value that fits one column is far off in the other.
TYPICAL_RHO = {"sam": ("0.05-0.2", "0.5-1"), "asam": ("2.5-5", "5-10"), "layerwise": ("0.01-0.05", "0.05-0.5"),
               "linf": ("0.005-0.01", "0.05-0.1")}


def rho_required(perturbation: str) -> ValueError:
    """The error for a perturbed group without a ρ: the typical ranges for this perturbation model."""
    typical = TYPICAL_RHO.get(perturbation)
    ranges = (f"; for perturbation={perturbation!r} the paper's range is {typical[1]} for SAM-ON (scope='norm', the "
              f"default with a model) and {typical[0]} for SAM-all (scope='all')" if typical else "")
    return ValueError(
        f"rho is required: SAM has no default radius, because its scale depends on the scope and the perturbation "
        f"model{ranges}. Pass it, e.g. SAM(model, torch.optim.SGD, rho=0.5, lr=0.1), or give each perturbed param "
        "group its own 'rho'."
    )

#: ssam-d's drop rate at step 0 of its cosine schedule when none is given.
DEFAULT_DROP_RATE = 0.5


def check_rho(rho: Any, where: str = "rho") -> float:
    """``rho`` as a float, or a ValueError naming the fix (a finite number >= 0; not a bool or a string)."""
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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SAMOptions:
    """The options of :class:`normsam.SAM`. ``None`` means "the default for this setup".

    Args:
        rho: the perturbation radius ρ, each param group's default (a group may carry its own ``rho``). It has
            no default: its scale depends on the scope and the perturbation model, and SAM-ON needs a larger ρ
            than SAM-all (:data:`TYPICAL_RHO`); a perturbed group without a ``rho`` of its own needs it.
        perturbation: ``"sam"``, ``"asam"``, ``"layerwise"``, ``"linf"`` or ``"fisher"``
            (:mod:`normsam.optim.perturbations`).
        eta: η of the scaling T; ``None``: the model's default (0.01, fisher 1.0). ``"sam"`` has no T.
        normalize_bias: apply the weight-dependent scaling T to bias tensors too (otherwise T = 1 there).
        norm_over: ``"perturbed"`` (‖·‖ over the perturbed set) or ``"all"`` (SSAM's convention: the norm of
            the full gradient; the cheap ascent then computes every gradient).
        scope: with a model, ``"norm"`` (``None``: SAM-ON), ``"all"``, ``"no-norm"``, a predicate over
            :class:`normsam.ParamInfo`, glob patterns, or an element-mask scope ``"random"``, ``"ssam-f"``,
            ``"ssam-d"``. Without a model only ``"all"`` (``None``: every tensor passed) or a mask scope.
        include: patterns or predicates that add to the scope (needs the model).
        exclude: patterns or predicates that remove from the scope (needs the model; it wins over ``include``).
        sparsity: mask scopes: the share of candidate elements *not* perturbed, in (0, 1).
        mask_interval: ``ssam-d``: SAM steps between mask updates.
        mask_total_steps: ``ssam-d``: length (in SAM steps) of the cosine drop-rate schedule.
        drop_rate: ``ssam-d``: the drop rate at step 0 of the cosine schedule (``None``: 0.5).
        mask_seed: seed of the random masks and of SSAM-D's regrowth.
        bn_policy: running statistics in the second pass: ``"freeze"`` (``None`` with a model) or ``"update"``
            (``None`` without a model, and with the momentum ascent). ``"freeze"`` needs the model.
        foreach: ``True``: the ``torch._foreach_*`` path (``None`` means this); ``False``: the per-tensor
            reference loop. Given explicitly, it reaches the base optimizer too (when it takes ``foreach``).
        sync_ascent: under DDP, average the ascent gradient over workers (only the perturbed tensors are
            communicated). Default: each worker uses its own, as in the original SAM. Under FSDP2 the ascent
            gradient is always the global batch's (FSDP2 reduces it), and ``sync_ascent=False`` is refused.
        ascent_interval: a fresh ascent every k-th SAM step; the steps between reuse the last ε (no ascent pass).
        ascent: ``"gradient"`` (this step's gradient, a pass at w) or ``"momentum"`` (Momentum-SAM: minus the
            base optimizer's momentum, no pass at w; the first step is a plain step; ``bn_policy="update"``).
            See :mod:`normsam.optim.ascent`.
        layerwise_scaling: layerwise's T: ``"additive"`` ‖p‖ + η or ``"official"`` ‖p‖·(1 + η).
        scaled_tensors: which tensors the weight-dependent T applies to: ``"not-bias"`` or
            ``"name-contains-weight"`` (the official SAM-ON code).
        rho_schedule: ``None`` (a constant ρ), :class:`normsam.RhoWarmup` ``(steps)``, a callable
            ``step -> factor`` of each group's ρ, or any :class:`normsam.RhoSchedule`
            (:mod:`normsam.optim.rho_schedules`).
        variant: ``"sam"``, or a variant's descent rule or direction: ``"gsam"`` (``alpha``), ``"wsam"``
            (``gamma``, ``decouple``), ``"looksam"`` (``alpha``, ``reuse_norms``; its k is ``ascent_interval``),
            ``"friendly-sam"`` (``sigma``, ``lmbda``). See :mod:`normsam.optim.descent` and
            :mod:`normsam.optim.transforms`; ``normsam.GSAM`` & co. build them under their own names.
        alpha: GSAM's weight of the orthogonal component (``None``: 0.4); LookSAM's weight of the reused one (0.7).
        gamma: WSAM's weight of the sharpness term, in [0, 1) (``None``: 0.9).
        decouple: WSAM's decoupled form (``None``: True, the paper's default).
        reuse_norms: LookSAM's norms and cosines: ``"global"`` (``None``; the paper's Algorithm 1) or ``"tensor"``
            (per tensor, as pytorch_optimizer).
        sigma: Friendly-SAM's σ, the weight of the gradient average taken off the direction (``None``: 1).
        lmbda: Friendly-SAM's λ, the decay of that average (``None``: 0.9).
        centralize: GCSAM: centralize the ascent direction's tensors of dim > 1 before ε, with any variant.
        ascent_steps: a multi-step ascent: k normalized steps of ρ/k each, the direction taken again at each
            point (k + 1 passes; ``first_step(loss, ascent_loss=...)`` evaluates the loss at the later points).
        descent_over: what a descent rule (gsam, wsam, looksam) acts on: ``"perturbed"`` (the perturbed tensors,
            whose ascent gradient SAM-ON's cheap ascent computes anyway) or ``"all"`` (every trainable tensor: the
            ascent pass then computes every gradient; the same as ``"perturbed"`` for scope="all").

    Example:
        ```python
        import torch
        import normsam

        options = normsam.SAMOptions(rho=2.0, perturbation="asam", eta=0.0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
        sam = normsam.SAM(model, torch.optim.SGD, options, lr=0.1)   # the same as the options as keywords
        assert sam.options.replace(rho=1.0).rho == 1.0 and sam.options.rho == 2.0  # a changed copy
        ```
    """

    rho: float | None = None
    perturbation: str = "sam"
    eta: float | None = None
    normalize_bias: bool = False
    norm_over: str = "perturbed"
    scope: ScopeSpec | None = None
    include: ScopeSpec | None = None
    exclude: ScopeSpec | None = None
    sparsity: float | None = None
    mask_interval: int | None = None
    mask_total_steps: int | None = None
    drop_rate: float | None = None
    mask_seed: int = 0
    bn_policy: str | None = None
    foreach: bool | None = None
    sync_ascent: bool | None = None
    ascent_interval: int = 1
    ascent: str = "gradient"
    layerwise_scaling: str = "additive"
    scaled_tensors: str = "not-bias"
    rho_schedule: RhoSchedule | Callable[[int], float] | None = None
    variant: str = "sam"
    alpha: float | None = None
    gamma: float | None = None
    decouple: bool | None = None
    reuse_norms: str | None = None
    sigma: float | None = None
    lmbda: float | None = None
    centralize: bool = False
    ascent_steps: int = 1
    descent_over: str = "perturbed"

    def __post_init__(self) -> None:
        if self.rho is not None:
            object.__setattr__(self, "rho", check_rho(self.rho))
        get_perturbation(self.perturbation, layerwise_scaling=self.layerwise_scaling)  # names the valid ones
        object.__setattr__(self, "rho_schedule", as_rho_schedule(self.rho_schedule))
        self._check_values()
        self._check_mask_options()
        self._check_variant()
        if self.ascent == "momentum":
            check_momentum_options(perturbation=self.perturbation, scope=self.scope,
                                   ascent_interval=self.ascent_interval, sync_ascent=self.sync_ascent,
                                   bn_policy=self.bn_policy)

    def _check_values(self) -> None:
        if self.eta is not None:
            if not (_is_number(self.eta) and math.isfinite(self.eta) and self.eta >= 0):
                raise ValueError(f"Invalid eta: {self.eta!r}; eta must be a finite number >= 0.")
            if self.perturbation == "sam":
                raise ValueError(
                    f"eta={self.eta!r} is the offset of a perturbation model's scaling T, and perturbation='sam' "
                    "has none (T = 1): drop eta, or use perturbation='asam', 'layerwise', 'linf' or 'fisher'."
                )
        if self.scaled_tensors not in SCALED_TENSORS:
            raise ValueError(
                f"Invalid scaled_tensors: {self.scaled_tensors!r}; use 'not-bias' (T = 1 for names ending in 'bias', "
                "the default) or 'name-contains-weight' (T only for names containing 'weight', the official code)."
            )
        if self.layerwise_scaling not in LAYERWISE_SCALINGS:  # (get_perturbation names it too)
            raise ValueError(f"Invalid layerwise_scaling: {self.layerwise_scaling!r}.")
        if not _is_int(self.ascent_interval) or self.ascent_interval < 1:
            raise ValueError(
                f"Invalid ascent_interval: {self.ascent_interval!r}; it must be an int >= 1 (1: a fresh ascent every "
                "step; k: every k-th step, the steps between reuse the last perturbation)."
            )
        if self.norm_over not in NORM_OVER:
            raise ValueError(f"Invalid norm_over: {self.norm_over!r}; use one of {', '.join(map(repr, NORM_OVER))}.")
        if self.bn_policy is not None and self.bn_policy not in BN_POLICIES:
            raise ValueError(f"Invalid bn_policy: {self.bn_policy!r}; use one of {', '.join(map(repr, BN_POLICIES))}.")
        if self.ascent not in ASCENTS:
            raise ValueError(
                f"Invalid ascent: {self.ascent!r}; use 'gradient' (this step's gradient, SAM) or 'momentum' (the base "
                "optimizer's momentum, Momentum-SAM: no ascent pass)."
            )
        if not isinstance(self.normalize_bias, bool):
            raise ValueError(f"Invalid normalize_bias: {self.normalize_bias!r}; it must be True or False.")
        if self.foreach is not None and not isinstance(self.foreach, bool):
            raise ValueError(f"Invalid foreach: {self.foreach!r}; it must be True, False or None.")
        if self.sync_ascent is not None and not isinstance(self.sync_ascent, bool):
            raise ValueError(f"Invalid sync_ascent: {self.sync_ascent!r}; it must be True, False or None.")
        if not _is_int(self.mask_seed):
            raise ValueError(f"Invalid mask_seed: {self.mask_seed!r}; it must be an int.")

    @property
    def mask_scope(self) -> str | None:
        """The element-mask scope (``random``, ``ssam-f``, ``ssam-d``), or None for a tensor scope."""
        return self.scope if isinstance(self.scope, str) and self.scope in MASK_SCOPES else None

    def _check_mask_options(self) -> None:
        mask = self.mask_scope
        only = {  # option → the scopes that read it
            "sparsity": MASK_SCOPES, "mask_interval": ("ssam-d",), "mask_total_steps": ("ssam-d",),
            "drop_rate": ("ssam-d",),
        }
        scope = "the default scope ('norm' with a model)" if self.scope is None else f"scope={self.scope!r}"
        for name, scopes in only.items():
            if getattr(self, name) is not None and mask not in scopes:
                users = (f"the element-mask scopes {', '.join(scopes)}" if len(scopes) > 1
                         else f"scope={scopes[0]!r}")
                raise ValueError(
                    f"{name}={getattr(self, name)!r}: {name} is only used by {users}, and {scope} would ignore "
                    f"it. Drop {name}= or pick " + ("a mask scope." if len(scopes) > 1 else f"scope={scopes[0]!r}.")
                )
        if mask is None:
            return
        if not (_is_number(self.sparsity) and 0.0 < self.sparsity < 1.0):
            raise ValueError(
                f"scope={mask!r} needs sparsity in (0, 1), the share of elements NOT perturbed "
                f"(the paper uses 0.9995 and 0.5); got {self.sparsity!r}."
            )
        if mask == "ssam-d":
            if not (_is_int(self.mask_interval) and self.mask_interval > 0):
                raise ValueError(
                    f"scope='ssam-d' needs mask_interval, the number of SAM steps between mask updates (> 0); "
                    f"got {self.mask_interval!r}."
                )
            if not (_is_int(self.mask_total_steps) and self.mask_total_steps > 0):
                raise ValueError(
                    "scope='ssam-d' needs mask_total_steps, the length in SAM steps of the cosine drop-rate "
                    f"schedule (e.g. epochs * steps_per_epoch); got {self.mask_total_steps!r}."
                )
            if self.drop_rate is not None and not (_is_number(self.drop_rate) and 0.0 <= self.drop_rate <= 1.0):
                raise ValueError(f"Invalid drop_rate: {self.drop_rate!r}; it must be a number in [0, 1].")

    def _check_variant(self) -> None:
        """A variant's options only with it, in range, and only the combinations its definition allows."""
        if self.variant not in VARIANTS:
            raise ValueError(f"Invalid variant: {self.variant!r}; use one of {', '.join(map(repr, VARIANTS))}.")
        users = {"alpha": ("gsam", "looksam"), "gamma": ("wsam",), "decouple": ("wsam",), "reuse_norms": ("looksam",),
                 "sigma": ("friendly-sam",), "lmbda": ("friendly-sam",)}
        for name, variants in users.items():
            if getattr(self, name) is not None and self.variant not in variants:
                raise ValueError(f"{name}={getattr(self, name)!r} is an option of variant="
                                 f"{' or '.join(map(repr, variants))}, and variant={self.variant!r} would ignore it.")
        ranges = [("alpha", 0.0, math.inf, True), ("gamma", 0.0, 1.0, False), ("sigma", 0.0, math.inf, True),
                  ("lmbda", 0.0, 1.0, True)]
        for name, low, high, closed in ranges:
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and low <= value and (value <= high if closed else value < high)
                                          and math.isfinite(value)):
                raise ValueError(f"Invalid {name}: {value!r}; it must be a number in [{low:g}, {high:g}"
                                 f"{']' if closed else ')'}.")
        if self.decouple is not None and not isinstance(self.decouple, bool):
            raise ValueError(f"Invalid decouple: {self.decouple!r}; it must be True or False.")
        if self.reuse_norms is not None and self.reuse_norms not in ("global", "tensor"):
            raise ValueError(f"Invalid reuse_norms: {self.reuse_norms!r}; use 'global' (the paper) or 'tensor'.")
        if not isinstance(self.centralize, bool):
            raise ValueError(f"Invalid centralize: {self.centralize!r}; it must be True or False.")
        if not _is_int(self.ascent_steps) or self.ascent_steps < 1:
            raise ValueError(f"Invalid ascent_steps: {self.ascent_steps!r}; it must be an int >= 1.")
        if self.descent_over not in ("perturbed", "all"):
            raise ValueError(f"Invalid descent_over: {self.descent_over!r}; use 'perturbed' or 'all'.")
        conflicts = [
            (self.descent_over == "all" and self.variant not in ("gsam", "wsam", "looksam"),
             f"descent_over='all' chooses what a descent rule acts on, and variant={self.variant!r} has none: drop "
             "it, or use variant='gsam', 'wsam' or 'looksam'"),
            (self.variant == "looksam" and self.ascent_interval == 1,
             "variant='looksam' takes a full SAM step every k-th step, k = ascent_interval, and reuses its "
             "orthogonal gradient between: set ascent_interval=k > 1 (e.g. 5; normsam.LookSAM(k=...) does)"),
            (self.variant in ("gsam", "wsam") and self.ascent_interval != 1,
             f"variant={self.variant!r} combines the gradients at w and at w + ε of every step, and "
             f"ascent_interval={self.ascent_interval} skips the pass at w: drop ascent_interval"),
            (self.ascent == "momentum" and (self.variant != "sam" or self.centralize),
             f"ascent='momentum' takes no pass at w, and {'centralize' if self.centralize else repr(self.variant)} "
             "works on the gradient at w: use ascent='gradient'"),
            (self.ascent_steps > 1 and self.ascent == "momentum",
             "ascent_steps > 1 takes the ascent direction again at each point, and the momentum does not change "
             "between them: use ascent='gradient'"),
            (self.ascent_steps > 1 and self.ascent_interval > 1,
             "ascent_steps > 1 with ascent_interval > 1 (or LookSAM) is not supported: use one of them"),
            (self.ascent_steps > 1 and self.variant == "friendly-sam",
             "ascent_steps > 1 would update Friendly-SAM's gradient average at every sub-step: use one of them"),
            (self.ascent_steps > 1 and self.scope == "ssam-d",
             "ascent_steps > 1 with scope='ssam-d' is not supported (its mask updates count ascents): use "
             "scope='random' or 'ssam-f', or one ascent step"),
        ]
        for conflict, message in conflicts:
            if conflict:
                raise ValueError(message + ".")

    # --- what the defaults resolve to -------------------------------------------------------------------

    @property
    def resolved_eta(self) -> float:
        """η in effect: the given one, or the perturbation model's default."""
        return get_perturbation(self.perturbation).default_eta if self.eta is None else self.eta

    @property
    def resolved_foreach(self) -> bool:
        return True if self.foreach is None else self.foreach

    @property
    def resolved_drop_rate(self) -> float:
        return DEFAULT_DROP_RATE if self.drop_rate is None else self.drop_rate

    def resolved_bn_policy(self, has_model: bool) -> str:
        """``bn_policy`` in effect: the momentum ascent's only pass is at w + ε, so its statistics are the step's."""
        if self.bn_policy == "freeze" and not has_model:
            raise ValueError(
                "bn_policy='freeze' needs the model to find its running statistics: pass the model as params "
                "or as model=, or use bn_policy='update'."
            )
        if self.bn_policy is not None:
            return self.bn_policy
        return "freeze" if has_model and self.ascent != "momentum" else "update"

    def replace(self, **changes: Any) -> SAMOptions:
        """A copy with ``changes`` (checked like the original)."""
        unknown = [name for name in changes if name not in option_names()]
        if unknown:
            raise unknown_option_error(unknown[0])
        return dataclasses.replace(self, **changes)

    @classmethod
    def split(cls, kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``kwargs`` → (SAM's options, the rest: the base optimizer's)."""
        names = option_names()
        return ({k: v for k, v in kwargs.items() if k in names}, {k: v for k, v in kwargs.items() if k not in names})


def option_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(SAMOptions))


def unknown_option_error(name: str, base: str | None = None) -> ValueError:
    """The error for a keyword that neither SAM nor the base optimizer takes, with the closest SAM option."""
    close = difflib.get_close_matches(name, option_names(), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    who = f"neither SAM nor {base} takes it" if base else "SAM has no such option"
    return ValueError(f"Unknown option {name!r}: {who}.{hint} SAM's options: {', '.join(option_names())}.")


def options_and_base_kwargs(options: SAMOptions | None, kwargs: dict[str, Any]) -> tuple[SAMOptions, dict[str, Any]]:
    """``SAM(params, base, options, **kwargs)``'s options (``options`` with the keywords that name SAM options
    laid over it) and the base optimizer's keywords (the rest)."""
    sam_kwargs, base_kwargs = SAMOptions.split(kwargs)
    if options is None:
        return SAMOptions(**sam_kwargs), base_kwargs
    if not isinstance(options, SAMOptions):
        raise ValueError(f"options must be a normsam.SAMOptions, got {type(options).__name__}; or pass SAM's "
                         "options as keywords, SAM(model, SGD, rho=0.5, lr=0.1).")
    return (options.replace(**sam_kwargs) if sam_kwargs else options), base_kwargs


def build_base_optimizer(cls: Callable[..., torch.optim.Optimizer], groups: list[dict[str, Any]],
                         kwargs: dict[str, Any], foreach: bool | None) -> torch.optim.Optimizer:
    """The base optimizer on SAM's groups. A ``foreach`` given to SAM reaches it too (when it takes one); a
    keyword that neither takes is named, with the closest SAM option (a typo is not the base's fault)."""
    if isinstance(cls, torch.optim.Optimizer) or not callable(cls):
        raise ValueError(
            "base_optimizer must be an optimizer class such as torch.optim.SGD, not an instance; "
            "pass its options as keyword arguments, e.g. SAM(model, torch.optim.SGD, lr=0.1, momentum=0.9)."
        )
    if foreach is not None and "foreach" not in kwargs:
        with contextlib.suppress(TypeError, ValueError):
            if "foreach" in inspect.signature(cls).parameters:
                kwargs = {**kwargs, "foreach": foreach}
    try:
        return cls(groups, **kwargs)
    except TypeError as error:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(error))
        if unknown is None:
            raise
        raise unknown_option_error(unknown.group(1), getattr(cls, "__name__", str(cls))) from None


def signature_with_options(init: Callable[..., Any]) -> inspect.Signature:
    """``init``'s signature as introspection, IDEs and ``help()`` show it: its ``**kwargs`` replaced by SAM's
    options as keyword-only parameters (from :class:`SAMOptions`, the one list of them), then the base
    optimizer's ``**base_kwargs``."""
    signature = inspect.signature(init)
    fixed = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    options = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
               for f in dataclasses.fields(SAMOptions)]
    rest = inspect.Parameter("base_kwargs", inspect.Parameter.VAR_KEYWORD, annotation="Any")
    return signature.replace(parameters=[*fixed, *options, rest])


def set_group_rho(group: dict[str, Any], options: SAMOptions) -> None:
    """A param group's ρ: its own, or the options' (required for a perturbed group; 0, unused, for the others)."""
    if "rho" not in group:
        if options.rho is None and group["perturb"]:
            raise rho_required(options.perturbation)
        group["rho"] = options.rho if options.rho is not None else 0.0
    check_rho(group["rho"], "rho of a param group")
