"""Param groups split by scope: one rule for :func:`param_groups`, ``SAM(...)`` and ``SAM.add_param_group``.

A group is split into its tensors in the scope (``perturb=True``) and the rest (``perturb=False``), each part
keeping the group's other options and carrying ``param_names`` (the bias rule reads names). Tensors are matched
to the model's parameters by identity, so any grouping a framework made (timm's or the HF Trainer's
weight-decay groups) keeps SAM-ON. A group that already says ``perturb`` is left as it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from normsam.optim.scopes import MASK_SCOPES, ScopeSpec, select

__all__ = ["param_groups", "split_by_scope", "ScopeSplit"]


def split_by_scope(group: dict[str, Any], in_scope: set[int], names: dict[int, str],
                   **perturbed_options: Any) -> list[dict[str, Any]]:
    """``group`` → its part in the scope (``perturb=True``, plus ``perturbed_options``) and the rest
    (``perturb=False``); empty parts are left out."""
    out = []
    for perturb in (True, False):
        part = [p for p in group["params"] if (id(p) in in_scope) == perturb]
        if part:
            extra = perturbed_options if perturb else {}
            out.append({**group, "params": part, "param_names": [names[id(p)] for p in part], "perturb": perturb,
                        **extra})
    return out


def param_groups(
    model: nn.Module,
    scope: ScopeSpec = "norm",
    *,
    include: ScopeSpec | None = None,
    exclude: ScopeSpec | None = None,
    weight_decay: float | None = None,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Param-group dicts for :class:`normsam.SAM` (or any torch optimizer), split by scope.

    Returns the perturbed parameters (``perturb=True``) and, if any remain, the others (``perturb=False``);
    every group carries ``param_names`` so the bias rule can see names. ``group_options`` (e.g. ``rho=0.5``)
    are set on the perturbed groups only.

    ``weight_decay`` follows the usual convention: it goes on the weights, and normalization-layer
    parameters and biases get ``weight_decay=0.0``. Each of the two groups is then split in two (decay and
    no decay), and empty groups are left out. Without ``weight_decay`` the groups carry none, so the
    optimizer's own default applies to all of them.

    Example:
        ```python
        import torch
        import normsam

        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
        groups = normsam.param_groups(model, "norm", weight_decay=0.05, rho=0.5)
        # perturbed (the LayerNorm, no decay); not perturbed: the weights (decay), the biases (none)
        assert [(g["perturb"], g["weight_decay"], len(g["params"])) for g in groups] == [
            (True, 0.0, 2), (False, 0.05, 2), (False, 0.0, 2)]
        sam = normsam.SAM(groups, torch.optim.AdamW, model=model, lr=1e-3)
        ```
    """
    selected, rest = select(model, scope, include=include, exclude=exclude)
    infos = selected + rest
    names = {id(i.param): i.name for i in infos}
    in_scope = {id(i.param) for i in selected}
    if weight_decay is None:
        return split_by_scope({"params": [i.param for i in infos]}, in_scope, names, **group_options)
    no_decay = {id(i.param) for i in infos if i.is_norm or i.is_bias}
    groups = []
    for part in split_by_scope({"params": [i.param for i in infos]}, in_scope, names, **group_options):
        for decays in (True, False):
            params = [p for p in part["params"] if (id(p) not in no_decay) == decays]
            if params:
                groups.append({**part, "params": params, "param_names": [names[id(p)] for p in params],
                               "weight_decay": weight_decay if decays else 0.0})
    return groups


class ScopeSplit:
    """How a SAM places tensors: its model (or none), scope and ``include``/``exclude``.

    ``scope`` is the label ``repr`` shows: the scope given (``"norm"`` by default with a model), ``"all"``
    without a model, or ``"groups"`` for groups that all say ``perturb`` themselves."""

    def __init__(self, model: nn.Module | None, scope: ScopeSpec | None, include: ScopeSpec | None,
                 exclude: ScopeSpec | None):
        self.model, self.include, self.exclude = model, include, exclude
        self.scope = scope

    @property
    def mask_scope(self) -> str | None:
        return self.scope if isinstance(self.scope, str) and self.scope in MASK_SCOPES else None

    def _selection(self) -> tuple[set[int], dict[int, str]]:
        """ids of the model's tensors in the scope (a mask scope: every tensor is a candidate), and names."""
        assert self.model is not None
        scope = "all" if self.mask_scope else self.scope
        selected, _ = select(self.model, scope, include=self.include, exclude=self.exclude)
        return {id(i.param) for i in selected}, {id(p): n for n, p in self.model.named_parameters()}

    def initial_groups(self, params: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """The param groups SAM is built on, from a module, tensors or group dicts (sets the scope label)."""
        if isinstance(params, nn.Module):
            self.scope = "norm" if self.scope is None else self.scope
            return param_groups(self.model, "all" if self.mask_scope else self.scope, include=self.include,
                                exclude=self.exclude)
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
        if self.model is None:
            if self.scope not in (None, "all", *MASK_SCOPES) or self.include is not None or self.exclude is not None:
                raise ValueError(
                    f"scope={self.scope!r} (or include/exclude) needs the model to find its layers: pass the model "
                    "itself, SAM(model, ...), or the model as model= next to the tensors or groups."
                )
            self.scope = self.scope if self.scope is not None else ("groups" if explicit else "all")
            return groups
        if self.scope is None and explicit and self.include is None and self.exclude is None:
            self.scope = "groups"  # e.g. normsam.param_groups(model, ...): already split by a scope
            return groups
        self.scope = "norm" if self.scope is None else self.scope
        return [part for group in groups for part in self.split(group, what="passed to SAM")]

    def split(self, group: dict[str, Any], *, what: str) -> list[dict[str, Any]]:
        """One group of the model's tensors, split by the scope (left whole, with names, if it says ``perturb``)."""
        in_scope, names = self._selection()
        foreign = sum(id(p) not in names for p in group["params"])
        if foreign:
            raise ValueError(
                f"{foreign} tensor(s) {what} are not parameters of model= ({type(self.model).__name__}): pass "
                "the module these parameters belong to, or leave model= out for SAM on every tensor."
            )
        if "perturb" in group or not group["params"]:
            group.setdefault("param_names", [names[id(p)] for p in group["params"]])
            return [group]
        return split_by_scope(group, in_scope, names)

    def place(self, param_group: dict[str, Any]) -> list[dict[str, Any]]:
        """``add_param_group``: a new group placed as the constructor would have placed it. Under a mask scope new
        tensors are refused (the masks were drawn over the tensors SAM was built on)."""
        params = param_group["params"]
        group = {**param_group, "params": [params] if isinstance(params, Tensor) else list(params)}
        if self.mask_scope is not None:
            raise ValueError(
                f"add_param_group() with scope={self.mask_scope!r}: the element masks were drawn over the tensors "
                "SAM was built on. Build a new SAM over all the parameters instead."
            )
        if self.model is None:
            return [group]
        names = {id(p) for _, p in self.model.named_parameters()}
        foreign = sum(id(p) not in names for p in group["params"])
        if "perturb" in group:  # the caller decided; names are needed for the bias rule
            if foreign and "param_names" not in group:
                raise ValueError(
                    f"add_param_group(): {foreign} tensor(s) are not parameters of the model, so their names are "
                    "unknown: give the group param_names=[...] (the bias rule reads them)."
                )
            return [group] if foreign else self.split(group, what="in the new group")
        if foreign:
            raise ValueError(
                f"add_param_group(): {foreign} tensor(s) are not parameters of the model SAM was built on "
                f"({type(self.model).__name__}), so scope={self.scope!r} cannot place them: add the new layer to "
                "the model first (e.g. model.head2 = layer), or give the group perturb=True or perturb=False."
            )
        if self.scope == "groups":
            raise ValueError(
                "add_param_group(): this SAM was built on groups that say perturb=True/False themselves; give the "
                "new group perturb=True or perturb=False."
            )
        return self.split(group, what="in the new group")
