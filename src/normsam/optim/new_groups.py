"""``SAM.add_param_group``: a new group is placed as the constructor would have placed it.

Without a model every tensor is perturbed (unless the group says ``perturb``). With one, a new group without
``perturb`` is split by the SAM's scope (and its ``include``/``exclude``), so under ``scope="norm"`` a new
classifier head is not perturbed and a new norm layer is; its tensors must then be the model's, since the
scope selects by module type and name. Under a mask scope new tensors are refused (the masks were drawn over
the tensors SAM was built on).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from normsam.optim.scopes import select

__all__ = ["place_new_group"]


def place_new_group(sam: Any, param_group: dict[str, Any]) -> list[dict[str, Any]]:
    """A new group as the constructor would have placed it: without a model every tensor is perturbed
    (unless ``perturb`` says otherwise); with one, tensors must be the model's, and a group without
    ``perturb`` is split by the scope (with its names, for the bias rule)."""
    params = param_group["params"]
    params = [params] if isinstance(params, Tensor) else list(params)
    if sam.mask_scope is not None:
        raise ValueError(
            f"add_param_group() with scope={sam.mask_scope!r}: the element masks were drawn over the tensors "
            "SAM was built on. Build a new SAM over all the parameters instead."
        )
    if sam.model is None:
        return [{**param_group, "params": params}]
    names = {id(p): name for name, p in sam.model.named_parameters()}
    foreign = sum(id(p) not in names for p in params)
    named = any("param_names" in g for g in sam.param_groups)

    def with_names(group: dict[str, Any]) -> dict[str, Any]:
        if not named or "param_names" in group:
            return group
        if foreign:
            raise ValueError(
                f"add_param_group(): {foreign} tensor(s) are not parameters of the model, so their names are "
                "unknown: give the group param_names=[...] (the bias rule reads them)."
            )
        return {**group, "param_names": [names[id(p)] for p in group["params"]]}

    if "perturb" in param_group:  # the caller decided
        return [with_names({**param_group, "params": params})]
    if foreign:
        raise ValueError(
            f"add_param_group(): {foreign} tensor(s) are not parameters of the model SAM was built on "
            f"({type(sam.model).__name__}), so scope={sam.scope!r} cannot place them: add the new layer to "
            "the model first (e.g. model.head2 = layer), or give the group perturb=True or perturb=False."
        )
    if sam.scope == "groups":
        raise ValueError(
            "add_param_group(): this SAM was built on groups that say perturb=True/False themselves; give the "
            "new group perturb=True or perturb=False."
        )
    selected, _ = select(sam.model, sam.scope, include=sam._include, exclude=sam._exclude)
    in_scope = {id(info.param) for info in selected}
    out = []
    for perturb in (True, False):
        part = [p for p in params if (id(p) in in_scope) == perturb]
        if part:
            out.append(with_names({**param_group, "params": part, "perturb": perturb}))
    return out
