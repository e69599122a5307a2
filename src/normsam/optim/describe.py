"""What a SAM says about itself: the text of ``repr(sam)`` and ``sam.describe()``, from its public state."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from normsam.optim.rho_schedules import rho_in_effect
from normsam.optim.storage import entries_of

__all__ = ["sam_repr", "sam_description"]

_NO_MODEL = " [no model given: SAM on every tensor passed, not SAM-ON; pass model= to perturb by scope]"


def _no_model_note(model: Any, scope: Any) -> str:
    return _NO_MODEL if model is None and scope == "all" else ""


def sam_repr(groups: Sequence[dict[str, Any]], *, base: str, perturbation: str, scope: Any, eta: float, model: Any,
             options: Any, variant: str) -> str:
    """``SAM(base=..., perturbation=..., scope=..., rho=<in effect>, eta=..., perturbed=n/total, ...)``."""
    entries = entries_of(groups, True)
    total = sum(p.numel() for g in groups for p in g["params"])
    return (
        f"SAM(base={base}, perturbation={perturbation!r}, scope={scope!r}, rho={rho_in_effect(groups)}, eta={eta}, "
        f"perturbed={sum(p.numel() for p, _, _ in entries):,}/{total:,}"
        + (f", rho_schedule={options.rho_schedule!r}" if options.rho_schedule is not None else "")
        + (f", {variant}" if variant else "")
        + (f", ascent={options.ascent!r})" if options.ascent != "gradient" else ")")
        + _no_model_note(model, scope)
    )


def sam_description(groups: Sequence[dict[str, Any]], *, scope: Any, model: Any, rho_schedule: Any,
                    rho_step: int) -> str:
    """Scope, counts, the ρ in effect (and the step the schedule set it for) and the perturbed tensors' names."""
    entries = entries_of(groups, True)
    perturbed = sum(p.numel() for p, _, _ in entries)
    total = sum(p.numel() for g in groups for p in g["params"] if p.requires_grad)
    named = [name for _, _, name in entries if name is not None]
    lines = [f"scope={scope!r}: {perturbed:,} of {total:,} trainable parameters perturbed "
             f"({100 * perturbed / max(total, 1):.4f}%) in {len(entries)} tensors{_no_model_note(model, scope)}",
             f"rho={rho_in_effect(groups)}" + (f" (set by {rho_schedule!r} for SAM step {rho_step}, counted from 0)"
                                               if rho_schedule is not None else "")]
    lines += [f"  {name}" for name in named[:12]]
    if len(named) > 12:
        lines.append(f"  ... {len(named) - 12} more")
    return "\n".join(lines)
