"""Checks the framework integrations share."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["check_sam_trains"]


def check_sam_trains(sam: Any, model: nn.Module, where: str) -> None:
    """Raise ValueError unless every tensor ``sam`` updates is a parameter of ``model``, the model being trained.

    A SAM built on another model (``SAMTrainer(model=a, optimizers=(SAM(b, ...), None))``) would step every
    batch and never change the trained model's weights."""
    owned = {id(p) for p in model.parameters()}
    tensors = [p for group in sam.param_groups for p in group["params"]]
    foreign = sum(id(p) not in owned for p in tensors)
    if foreign:
        raise ValueError(
            f"{where}: {foreign} of the {len(tensors)} tensors the SAM optimizer updates are not parameters of the "
            f"model being trained ({type(model).__name__}), so training would never change its weights: build "
            "the SAM on that very model, e.g. SAM(model, torch.optim.AdamW, lr=..., rho=...)."
        )
