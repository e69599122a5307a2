"""The refusals and warnings that keep a SAM step from going silently wrong.

Each one names the fix: a closure that returns no loss, Lightning's closure without normsam's mixin, a loss given
to a step that takes no ascent pass, a state dict that does not fit, a model that trains in ``eval()`` mode.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from normsam.optim.running_stats import running_stat_modules

__all__ = ["returned_loss", "is_framework_closure", "FRAMEWORK_CLOSURE", "no_pass_wanted", "check_loadable",
           "warn_if_eval_mode"]


def returned_loss(loss: Any) -> Tensor:
    """The loss a ``SAM.step`` closure returned, or a ValueError: ``torch.optim.SGD`` trains with a closure that
    forgets ``return loss``, SAM would never step."""
    if loss is None:
        raise ValueError("SAM.step(closure): the closure returned None. It must compute the loss, call "
                         "loss.backward() and return the loss (SAM calls it twice and returns the first loss).")
    return loss


def is_framework_closure(closure: Callable[..., Any]) -> bool:
    """Whether ``closure`` is Lightning's training closure (a partial of its precision plugin's method)."""
    owner = getattr(getattr(closure, "func", closure), "__self__", None)
    modules = {getattr(closure, "__module__", None) or "", type(owner).__module__ if owner is not None else ""}
    return any(m.split(".")[0] in ("lightning", "pytorch_lightning") for m in modules)


#: Lightning's automatic optimization calls optimizer.step(closure) once per batch; without normsam's mixin SAM
#: would silently take two full passes and Lightning would log the loss at w + ε.
FRAMEWORK_CLOSURE = (
    "SAM.step() got Lightning's training closure: Lightning calls optimizer.step() once per batch and cannot run "
    "SAM's ascent pass without normsam's mixin. Put normsam.integrations.lightning.SAMModule first among your "
    "LightningModule's bases: class Model(SAMModule, LightningModule)."
)


def no_pass_wanted(why: str) -> ValueError:
    """``first_step(loss)`` on a step that takes no ascent pass: the loss would be ignored."""
    return ValueError(f"first_step(loss): {why}, so this step takes no ascent pass and the loss would be ignored. "
                      "Check sam.needs_ascent before the first forward-backward pass and call first_step() without "
                      "a loss when it is False (the pass at w is then not needed).")


def check_loadable(state: dict[str, Any], sam_state: dict[str, Any] | None, base: torch.optim.Optimizer) -> None:
    """Refuse a state dict that would load silently wrong: a plain optimizer's, or another base optimizer's."""
    if sam_state is None and any("perturb" not in g for g in state.get("param_groups", [])):
        raise ValueError(
            "load_state_dict(): this is a plain optimizer's state dict (no SAM part, groups without 'perturb'), and "
            "SAM splits its groups by scope, so its groups and states do not line up. To switch a run from the base "
            "optimizer to SAM, load it into sam.base_optimizer only if it was built on the same groups, or start "
            "SAM's optimizer state afresh."
        )
    saved = (sam_state or {}).get("base")
    if saved is not None and saved != type(base).__name__:
        raise ValueError(
            f"load_state_dict(): the state dict is SAM over {saved}, this SAM wraps {type(base).__name__}: their "
            f"optimizer states differ (momentum, moments). Build SAM with {saved}, or start the optimizer afresh."
        )


def warn_if_eval_mode(model: nn.Module | None) -> bool:
    """Warn when ``model`` trains in eval() mode: BatchNorm then never updates its running statistics and dropout
    is off. Returns whether the model was checked (SAM checks once: it costs a module walk). Reads Python flags
    only, so it never waits for the device."""
    if model is None or model.training:
        return False
    if running_stat_modules(model) or any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()):
        warnings.warn(
            f"SAM.first_step: the model ({type(model).__name__}) is in eval() mode, so its BatchNorm running "
            "statistics never move and dropout is off while it trains. Call model.train() before training steps "
            "(model.eval() is for evaluation). Warned once.",
            UserWarning, stacklevel=5,  # past this, first_step and its no_grad wrapper: the caller's line
        )
    return True
