"""Checks the framework integrations share."""

from __future__ import annotations

from typing import Any

from torch import nn

from normsam.optim.descent import DESCENTS

__all__ = ["check_sam_trains", "check_sam_options"]


#: The variants whose update combines the ascent gradient with the second pass's (a descent rule).
DESCENT_VARIANTS = tuple(d for d in DESCENTS if d != "sam")


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def check_sam_options(options: Any, where: str, world_size: int | None = None) -> None:
    """Raise ValueError for SAM options a framework integration cannot run.

    - ``ascent_steps > 1``: the integrations own the ascent pass (one run of the framework's training step gives
      the loss at w, whose gradient is the cheap ascent's), and a multi-step ascent needs the ascent loss again
      at each point it reaches (``first_step(loss, ascent_loss=...)``), which no framework hook provides.
    - a descent rule (``variant`` gsam, wsam, looksam) on more than one process (``world_size``: the default
      process group's) without ``sync_ascent``: the update combines the ascent gradient with the second pass's,
      so each process's own ascent gradient would make the replicas' weights drift apart (``sync_ascent``
      averages every ascent gradient the rule reads, ``descent_over="all"``'s included)."""
    steps = getattr(options, "ascent_steps", 1)
    variant = getattr(options, "variant", "sam")
    world_size = _world_size() if world_size is None else world_size
    if variant in DESCENT_VARIANTS and world_size > 1 and not getattr(options, "sync_ascent", None):
        raise ValueError(
            f"{where}: variant={variant!r} on {world_size} processes needs sync_ascent=True: its update combines the "
            "ascent gradient with the second pass's, and without it each process would use its own ascent "
            "gradient, so the replicas' weights would drift apart. Pass sync_ascent=True to the SAM."
        )
    if steps > 1:
        raise ValueError(
            f"{where} does not support ascent_steps={steps}: a multi-step ascent evaluates the loss again at each of "
            f"its {steps} points, and {where} runs the framework's training step once for the ascent (the cheap "
            "ascent at w). Use ascent_steps=1, or a loop of your own that calls sam.first_step(loss, "
            "ascent_loss=...) or sam.step(closure)."
        )


def check_sam_trains(sam: Any, model: nn.Module, where: str) -> None:
    """Raise ValueError unless every tensor ``sam`` updates is a parameter of ``model``, the model being trained,
    and its options are ones the integration can run (:func:`check_sam_options`).

    A SAM built on another model (``SAMTrainer(model=a, optimizers=(SAM(b, ...), None))``) would step every
    batch and never change the trained model's weights."""
    check_sam_options(sam.options, where)
    owned = {id(p) for p in model.parameters()}
    tensors = [p for group in sam.param_groups for p in group["params"]]
    foreign = sum(id(p) not in owned for p in tensors)
    if foreign:
        raise ValueError(
            f"{where}: {foreign} of the {len(tensors)} tensors the SAM optimizer updates are not parameters of the "
            f"model being trained ({type(model).__name__}), so training would never change its weights: build "
            "the SAM on that very model, e.g. SAM(model, torch.optim.AdamW, lr=..., rho=...)."
        )
