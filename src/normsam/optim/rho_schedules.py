r"""ρ schedules: the radius each param group uses, set before every SAM step, as an LR scheduler sets ``lr``.

A schedule maps the SAM step about to run to the ρ of a param group, from the group's base radius
(``group["initial_rho"]``, kept by :class:`normsam.SAM` the way LR schedulers keep ``initial_lr``):

.. math::

    \rho_t = \text{schedule}(t, \rho_{\text{base}}, \text{group}),\qquad t = 0, 1, 2, \ldots

where ``t`` counts the SAM steps already taken (``sam.counters["sam_steps"]``, so the first SAM step has
``t = 0``, as the first LR step of ``LambdaLR`` has factor(0)). SAM writes the result into ``group["rho"]``
before it builds ε, so ``repr``, ``describe()`` and a training log see the ρ in effect. Since ``t`` is part of
SAM's own ``state_dict`` (its counters), a resumed run continues the schedule exactly where it stopped, and
a schedule holds no state of its own. Steps outside a late-phase SAM window (plain base-optimizer steps) are
not SAM steps: a warm-up starts with the window.

- :class:`RhoWarmup`: ``ρ_t = ρ·min(1, (t + 1)/T)``: linear from ρ/T at the first SAM step to ρ at step T
  (SPEC §1b; ``t + 1`` as in the runner's LR warm-up, so no step is spent at ρ = 0).
- :class:`RhoLambda`: ``ρ_t = ρ·f(t)`` for any callable ``f`` of the step (a plain callable given to
  ``SAM(rho_schedule=...)`` is taken as this).
- :class:`RhoFollowsLR`: GSAM's schedule, ρ proportional to the learning rate between two points:
  ``ρ_t = ρ_min + (ρ − ρ_min)·(lr_t − lr_min)/(lr_max − lr_min)``, ``lr_t`` the group's lr at that step.

Why a warm-up: at the ρ a pilot picks for SAM-ON, some seeds never start to fit (the regime study's
SAM-ON at ρ = 2.4: one bf16 seed sat at 11–13% training accuracy for 17 epochs); a small ρ while the
network leaves its initialization is meant to keep runs on the trainable side of that cliff.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = ["RhoSchedule", "RhoWarmup", "RhoLambda", "RhoFollowsLR", "as_rho_schedule", "scheduled_rho", "apply_rho_schedule",
           "rho_in_effect"]


@runtime_checkable
class RhoSchedule(Protocol):
    """Anything with ``rho(step, base_rho, group) -> float``: the ρ of ``group`` at SAM step ``step``
    (0-based), from its base ρ. ``group`` is the param group (read only), for schedules that follow its
    learning rate."""

    def rho(self, step: int, base_rho: float, group: Mapping[str, Any]) -> float: ...


class RhoWarmup:
    """Linear warm-up of ρ over the first ``steps`` SAM steps: ``ρ_t = ρ·min(1, (t + 1)/steps)``.

    Args:
        steps: the length of the warm-up in SAM steps (an int >= 1); the runner's ``rho_warmup_epochs=e``
            gives ``round(e · steps_per_epoch)``.

    Example:
        ```python
        import normsam

        warmup = normsam.RhoWarmup(4)
        assert [warmup.rho(t, 2.0, {}) for t in range(5)] == [0.5, 1.0, 1.5, 2.0, 2.0]
        ```
    """

    def __init__(self, steps: int):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(
                f"Invalid RhoWarmup steps: {steps!r}; it must be an int >= 1, the number of SAM steps over which "
                "rho rises linearly to its value (for no warm-up, pass no rho_schedule)."
            )
        self.steps = steps

    def rho(self, step: int, base_rho: float, group: Mapping[str, Any]) -> float:
        return base_rho * min(1.0, (step + 1) / self.steps)

    def __repr__(self) -> str:
        return f"RhoWarmup(steps={self.steps})"


class RhoLambda:
    """``ρ_t = ρ·factor(t)`` for a callable ``factor`` of the 0-based SAM step (as ``torch.optim.lr_scheduler.
    LambdaLR`` for the learning rate)."""

    def __init__(self, factor: Callable[[int], float]):
        if not callable(factor):
            raise ValueError(f"RhoLambda needs a callable of the step, got {type(factor).__name__}.")
        self.factor = factor

    def rho(self, step: int, base_rho: float, group: Mapping[str, Any]) -> float:
        factor = self.factor(step)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            raise ValueError(
                f"{self!r} gave the factor {factor!r} at SAM step {step}; it must return a number, the factor of "
                "rho at that step (e.g. min(1.0, (t + 1) / 500))."
            )
        return base_rho * factor

    def __repr__(self) -> str:
        return f"RhoLambda({getattr(self.factor, '__name__', type(self.factor).__name__)})"


class RhoFollowsLR:
    """GSAM's ρ schedule (Zhuang et al. 2022): ρ moves with each group's learning rate, from the group's ρ at
    ``lr_max`` to ``rho_min`` at ``lr_min``: ``ρ_t = ρ_min + (ρ − ρ_min)·(lr_t − lr_min)/(lr_max − lr_min)``.

    ``lr_max=None``: the group's initial lr (``group["initial_lr"]``, which LR schedulers set; otherwise its lr
    when the schedule first reads it). The lr is read when the step begins, after the LR scheduler's last step."""

    def __init__(self, rho_min: float = 0.0, lr_min: float = 0.0, lr_max: float | None = None):
        for name, value in (("rho_min", rho_min), ("lr_min", lr_min), ("lr_max", lr_max)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < 0):
                raise ValueError(f"Invalid RhoFollowsLR {name}: {value!r}; it must be a finite number >= 0.")
        self.rho_min, self.lr_min, self.lr_max = float(rho_min), float(lr_min), lr_max

    def rho(self, step: int, base_rho: float, group: Mapping[str, Any]) -> float:
        lr_max = self.lr_max if self.lr_max is not None else group.setdefault("initial_lr", group["lr"])
        if lr_max <= self.lr_min:
            return base_rho
        share = (float(group["lr"]) - self.lr_min) / (lr_max - self.lr_min)
        return self.rho_min + (base_rho - self.rho_min) * share

    def __repr__(self) -> str:
        return f"RhoFollowsLR(rho_min={self.rho_min:g}, lr_min={self.lr_min:g})"


def as_rho_schedule(schedule: RhoSchedule | Callable[[int], float] | None) -> RhoSchedule | None:
    """``None``, a :class:`RhoSchedule`, or a plain callable of the step (a factor of ρ, :class:`RhoLambda`)."""
    if schedule is None or isinstance(schedule, RhoSchedule):
        return schedule
    if callable(schedule):
        return RhoLambda(schedule)
    raise ValueError(
        f"Invalid rho_schedule: {schedule!r}; pass normsam.RhoWarmup(steps), a callable step -> factor of rho "
        "(e.g. lambda t: min(1.0, (t + 1) / 500)), or an object with rho(step, base_rho, group)."
    )


def scheduled_rho(schedule: RhoSchedule, step: int, group: Mapping[str, Any]) -> float:
    """The schedule's ρ for ``group`` at ``step``, checked: a schedule that returns a negative, non-finite or
    non-numeric ρ would turn the ascent into a descent or poison the weights, so it is refused."""
    value = schedule.rho(step, float(group["initial_rho"]), group)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(
            f"The rho schedule {schedule!r} gave rho={value!r} at SAM step {step}; it must give a finite number "
            ">= 0 (a callable schedule returns a factor of rho, e.g. min(1.0, (t + 1) / 500))."
        )
    return float(value)


def apply_rho_schedule(schedule: RhoSchedule | None, step: int, groups: Sequence[dict[str, Any]],
                       check: Callable[[Any, str], float]) -> None:
    """Set each group's ρ for SAM step ``step``: the schedule's, from its base ρ (``group["initial_rho"]``,
    kept the first time as LR schedulers keep ``initial_lr``); without a schedule, ``check`` the ρ as set (a
    group's ρ changed by hand since the last step is validated before it is used)."""
    for group in groups:
        if schedule is None:
            check(group["rho"], "rho of a param group")
            continue
        group.setdefault("initial_rho", group["rho"])
        group["rho"] = scheduled_rho(schedule, step, group)


def rho_in_effect(groups: Sequence[dict[str, Any]]) -> str:
    """The perturbed groups' ρ as the next step uses it: one value, or one per group where they differ."""
    rhos = [g["rho"] for g in groups if g["perturb"]]
    distinct = list(dict.fromkeys(rhos))
    return f"{distinct[0]:g}" if len(distinct) == 1 else "[" + ", ".join(f"{r:g}" for r in rhos) + "]"
