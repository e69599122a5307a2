"""Scopes: which parameters SAM perturbs.

SAM-ON's scope is ``"norm"``: every affine parameter (γ, β) of every normalization layer, found **by module
type**, never by parameter name. A layer counts as a normalization layer when

1. it is an instance (subclasses included) of ``torch.nn.modules.batchnorm._NormBase`` (BatchNorm1d/2d/3d,
   SyncBatchNorm, affine InstanceNorm, timm's BatchNormAct2d …), ``nn.LayerNorm`` (timm's LayerNorm2d …),
   ``nn.GroupNorm`` (timm's GroupNormAct …) or ``nn.RMSNorm``; or
2. (the duck-typing rule, for norms written as a plain ``nn.Module`` such as timm's ``RmsNorm`` or
   HuggingFace's ``LlamaRMSNorm``/``GemmaRMSNorm``) its class name contains ``"Norm"``, it owns a 1-D parameter
   called ``weight`` or ``bias``, and every parameter it owns directly is at most 1-D.

The parameters selected from a normalization layer are the ones it owns directly (``recurse=False``).
A ``Linear`` called ``bn_proj`` is therefore not selected, and an unnamed ``BatchNorm2d`` inside an
``nn.Sequential`` is.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = [
    "PARAMETER_SCOPES",
    "MASK_SCOPES",
    "SCOPES",
    "ParamInfo",
    "ScopeRow",
    "ScopeReport",
    "ScopeSpec",
    "is_norm_layer",
    "named_parameter_infos",
    "select",
    "describe_scope",
]

#: Scopes decided per parameter tensor.
PARAMETER_SCOPES = ("all", "norm", "no-norm")
#: Scopes decided per element, by a mask at a given sparsity (candidates: every trainable parameter).
MASK_SCOPES = ("random", "ssam-f", "ssam-d")
SCOPES = PARAMETER_SCOPES + MASK_SCOPES

_NORM_TYPES: tuple[type[nn.Module], ...] = (_NormBase, nn.LayerNorm, nn.GroupNorm)
if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    _NORM_TYPES += (nn.RMSNorm,)


@dataclass(frozen=True)
class ParamInfo:
    """One trainable parameter with the module that owns it; what a scope predicate receives."""

    name: str  # full name, as in ``model.named_parameters()``
    param: torch.Tensor
    module_name: str  # "" for the root module
    module: nn.Module
    is_norm: bool  # owned by a normalization layer (see the module docstring)

    @property
    def local_name(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def is_bias(self) -> bool:
        """The bias rule of ASAM-style perturbations: a parameter whose name ends in ``bias`` (β included)."""
        return self.name.endswith("bias")


Predicate = Callable[[ParamInfo], bool]
ScopeSpec = Union[str, Predicate, Sequence[str]]


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer, by type or by the documented duck-typing rule."""
    if isinstance(module, _NORM_TYPES):
        return True
    if "Norm" not in type(module).__name__:
        return False
    own = dict(module.named_parameters(recurse=False))
    has_affine = any(key in own and own[key].ndim == 1 for key in ("weight", "bias"))
    return has_affine and all(p.ndim <= 1 for p in own.values())


def named_parameter_infos(model: nn.Module) -> list[ParamInfo]:
    """Every trainable parameter of ``model`` in ``named_parameters()`` order, with its owning module.

    Shared (tied) parameters appear once, under their first name, as in ``named_parameters()``.
    """
    seen: set[int] = set()
    infos = []
    for module_name, module in model.named_modules():
        norm = is_norm_layer(module)
        for local, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            name = f"{module_name}.{local}" if module_name else local
            infos.append(ParamInfo(name, param, module_name, module, norm))
    return infos


def _as_predicate(rule: Any, what: str) -> Predicate:
    """A scope rule (scope name, glob patterns or callable) as a predicate over ``ParamInfo``."""
    if callable(rule):
        return rule
    if isinstance(rule, str):
        if rule in ("all", *MASK_SCOPES):
            return lambda info: True
        if rule == "norm":
            return lambda info: info.is_norm
        if rule == "no-norm":
            return lambda info: not info.is_norm
        raise ValueError(
            f"Unknown {what} {rule!r}; valid scopes are {', '.join(map(repr, SCOPES))}, a predicate "
            "taking a normsam.ParamInfo, or a list of glob patterns over parameter names such as "
            "['layer1.*.bn*.weight']."
        )
    if isinstance(rule, Iterable):
        patterns = list(rule)
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise ValueError(
                f"A {what} given as patterns must be a non-empty list of glob strings, got {rule!r}."
            )
        return lambda info: any(fnmatch.fnmatchcase(info.name, pat) for pat in patterns)
    raise ValueError(
        f"Invalid {what} {rule!r}: use a scope name ({', '.join(SCOPES)}), a predicate or a list of patterns."
    )


def _check_patterns_match(rule: Any, what: str, infos: list[ParamInfo]) -> None:
    """Every glob pattern of a rule must match a trainable parameter: a typo would otherwise be ignored."""
    if rule is None or isinstance(rule, str) or callable(rule):
        return
    names = [info.name for info in infos]
    for pattern in rule:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            close = difflib.get_close_matches(pattern, names, n=1, cutoff=0.4)
            like = f"; the closest name is {close[0]!r}" if close else f"; names look like {names[0]!r}"
            raise ValueError(
                f"The {what} pattern {pattern!r} selects no parameters: it matches no trainable parameter "
                f"name{like}. Fix the pattern "
                "(`normsam inspect MODEL --scope all --all` lists every name) or drop it."
            )


def _describe_rule(rule: Any) -> str:
    if isinstance(rule, str):
        return f"scope={rule!r}"
    if callable(rule):
        return f"scope predicate {getattr(rule, '__name__', repr(rule))}"
    return f"scope patterns {list(rule)!r}"


def select(
    model: nn.Module,
    scope: ScopeSpec = "norm",
    *,
    include: ScopeSpec | None = None,
    exclude: ScopeSpec | None = None,
) -> tuple[list[ParamInfo], list[ParamInfo]]:
    """Split the trainable parameters of ``model`` into (selected, rest) by a scope.

    ``include`` adds parameters to the scope and ``exclude`` removes them (patterns or predicates);
    ``exclude`` wins. Raises ``ValueError`` when nothing is selected.
    """
    infos = named_parameter_infos(model)
    if not infos:
        raise ValueError("The model has no trainable parameters (all have requires_grad=False).")
    chosen = _as_predicate(scope, "scope")
    added = _as_predicate(include, "include") if include is not None else (lambda info: False)
    removed = _as_predicate(exclude, "exclude") if exclude is not None else (lambda info: False)
    for rule, what in ((scope, "scope"), (include, "include"), (exclude, "exclude")):
        _check_patterns_match(rule, what, infos)
    selected, rest = [], []
    for info in infos:
        (selected if (chosen(info) or added(info)) and not removed(info) else rest).append(info)
    if not selected:
        frozen = _frozen_norm_parameters(model) if scope == "norm" else []
        if frozen:
            shown = ", ".join(frozen[:4]) + (f" and {len(frozen) - 4} more" if len(frozen) > 4 else "")
            hint = (
                f"{type(model).__name__} has normalization layers, but their affine parameters are frozen "
                f"(requires_grad=False: {shown}), and SAM perturbs trainable parameters only. Unfreeze them "
                "(p.requires_grad_(True)) to train with SAM-ON, or choose another scope."
            )
        elif scope == "norm":
            hint = (
                f"{type(model).__name__} has no normalization layer with affine parameters "
                "(BatchNorm/LayerNorm/GroupNorm/RMSNorm, or a *Norm* module owning a 1-D weight/bias). "
                "Use scope='all' for conventional SAM, or pass a predicate or name patterns."
            )
        else:
            hint = "Check the rule against `normsam inspect` / normsam.describe_scope(model, 'all')."
        raise ValueError(f"{_describe_rule(scope)} selects no parameters. {hint}")
    return selected, rest


def _frozen_norm_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters that normalization layers own directly but that do not require gradients."""
    return [
        f"{module_name}.{local}" if module_name else local
        for module_name, module in model.named_modules()
        if is_norm_layer(module)
        for local, param in module.named_parameters(recurse=False)
        if not param.requires_grad
    ]


@dataclass(frozen=True)
class ScopeRow:
    module: str
    cls: str
    parameter: str
    numel: int
    share: float  # of all trainable parameters


@dataclass(frozen=True)
class ScopeReport:
    """What a scope selects: rows per parameter plus totals; ``str()`` gives a printable table."""

    scope: str
    rows: list[ScopeRow]
    total_numel: int

    @property
    def selected_numel(self) -> int:
        return sum(r.numel for r in self.rows)

    @property
    def share(self) -> float:
        return self.selected_numel / self.total_numel

    def table(self, max_rows: int | None = None) -> str:
        header = ("module", "class", "parameter", "numel", "share")
        body = [
            (r.module or "(root)", r.cls, r.parameter, f"{r.numel:,}", f"{100 * r.share:.4f}%")
            for r in self.rows
        ]
        hidden = 0
        if max_rows is not None and len(body) > max_rows:
            hidden, body = len(body) - max_rows, body[:max_rows]
        widths = [max([len(h), *(len(row[i]) for row in body)]) for i, h in enumerate(header)]
        numeric = (False, False, False, True, True)

        def fmt(cells: Sequence[str]) -> str:
            return "  ".join(
                c.rjust(w) if right else c.ljust(w) for c, w, right in zip(cells, widths, numeric)
            ).rstrip()

        lines = [fmt(header), fmt(["-" * w for w in widths])]
        lines += [fmt(row) for row in body]
        if hidden:
            lines.append(f"... {hidden} more rows")
        modules = len({r.module for r in self.rows})
        lines.append(
            f"{self.scope}: {self.selected_numel:,} of {self.total_numel:,} parameters "
            f"({100 * self.share:.4f}%) in {len(self.rows)} tensors of {modules} modules"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def describe_scope(
    model: nn.Module,
    scope: ScopeSpec = "norm",
    *,
    include: ScopeSpec | None = None,
    exclude: ScopeSpec | None = None,
) -> ScopeReport:
    """A dry run of a scope: module path, class, parameter, numel and share of all parameters.

    For the element-mask scopes (``random``, ``ssam-f``, ``ssam-d``) the rows are the candidate tensors;
    the mask then keeps a ``1 - sparsity`` share of their elements.

    Example:
        ```python
        import torch
        import normsam

        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                                    torch.nn.Linear(8 * 6 * 6, 10))
        report = normsam.describe_scope(model, "norm")
        assert [(row.module, row.parameter) for row in report.rows] == [("1", "weight"), ("1", "bias")]
        assert report.selected_numel == 16 and report.total_numel == 3_130
        print(report.table())
        ```
    """
    selected, rest = select(model, scope, include=include, exclude=exclude)
    total = sum(i.param.numel() for i in selected + rest)
    rows = [
        ScopeRow(i.module_name, type(i.module).__name__, i.local_name, i.param.numel(), i.param.numel() / total)
        for i in selected
    ]
    return ScopeReport(_describe_rule(scope).removeprefix("scope="), rows, total)
