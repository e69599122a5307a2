"""A run that diverges stops, says so, and keeps its last good checkpoint.

The runner reads each step's training loss as a Python float anyway (for the epoch's running mean), so
:func:`check_loss` looks at a number that is already on the host: no extra device synchronization per step.
Once per epoch, before the checkpoint is written, :func:`check_weights` reduces "are all weights finite?" to
one device flag and reads it (one synchronization per epoch): a step whose loss was still finite can leave
NaN weights behind (the update itself overflowed), and such weights must never become the checkpoint.

When either check fails, :class:`RunDiverged` is raised with the epoch and step. The runner then writes
``summary.json`` with ``"status": "diverged"`` (:func:`diverged_summary`), keeps the checkpoint of the last
good epoch (it is not overwritten) and stops; the ``normsam`` command line prints the message and exits with
status 3. Sweeps count such a run as ``diverged`` (not failed), reports mark it and leave it out of the means
unless asked (``normsam report --include-diverged``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["RunDiverged", "EpochWatch", "check_loss", "check_weights", "diverged_summary", "is_diverged"]


class RunDiverged(RuntimeError):
    """The training loss (or the weights) became non-finite. ``epoch`` counts from 1, ``step`` from 1 within the
    epoch (None when the weights were found non-finite at the epoch's end)."""

    def __init__(self, epoch: int, step: int | None, *, what: str = "loss", run_dir: Any = None, hint: str = ""):
        super().__init__(epoch, step)
        self.epoch, self.step, self.what, self.hint = epoch, step, what, hint
        self.run_dir = run_dir  # set by the runner, which knows the folder

    def __str__(self) -> str:
        where = f"epoch {self.epoch} (step {self.step})" if self.step is not None else f"the end of epoch {self.epoch}"
        kept = ""
        if self.run_dir is not None:
            kept = (f"; {self.run_dir} keeps the checkpoint of epoch {self.epoch - 1}, the last good one"
                    if self.epoch > 1 else f"; {self.run_dir} has no checkpoint (no epoch finished)")
            kept += ", and its summary.json says status: diverged"
        return f"{self.what} became non-finite at {where}: lower lr or rho{self.hint} and train again with another out={kept}."


def _hint(amp: str | None) -> str:
    if amp == "fp16":
        return " (or use amp=bf16: fp16 overflows easily),"
    return " (or set clip_grad_norm),"


def check_loss(loss: float, *, epoch: int, step: int, amp: str | None = None) -> None:
    """Raise :class:`RunDiverged` when a step's training loss (a host float) is NaN or infinite."""
    if not math.isfinite(loss):
        raise RunDiverged(epoch, step, what="the training loss", hint=_hint(amp))


@torch.no_grad()
def check_weights(model: nn.Module, *, epoch: int, amp: str | None = None) -> None:
    """Raise :class:`RunDiverged` when a floating-point parameter or buffer (BatchNorm's running statistics)
    holds a NaN or infinity (one sync)."""
    # FSDP2's DTensor parameters: each process checks its own shard; under torch.distributed the runner
    # combines the processes' verdicts (EpochWatch.end)
    params = [t.to_local() if hasattr(t, "to_local") else t for t in (*model.parameters(), *model.buffers())]
    params = [t for t in params if t.is_floating_point() and t.numel()]
    if not params:
        return
    flags = torch.stack([torch.isfinite(p).all().to(params[0].device) for p in params])
    if not bool(flags.all()):
        raise RunDiverged(epoch, None, what="the weights or running statistics", hint=_hint(amp))


class EpochWatch:
    """The divergence checks of one epoch. Alone, a non-finite loss stops the run at once (:func:`check_loss`).
    Under DDP a rank must not stop alone (the others would wait for it in the next all-reduce), so the first
    bad step is only noted, and :meth:`end` decides for all ranks together with one all-reduce per epoch."""

    def __init__(self, epoch: int, *, amp: str | None = None, distributed: bool = False):
        self.epoch, self.amp, self.distributed = epoch, amp, distributed
        self.bad_step: int | None = None

    def see(self, loss: float, step: int) -> None:
        if self.distributed:
            if self.bad_step is None and not math.isfinite(loss):
                self.bad_step = step
            return
        check_loss(loss, epoch=self.epoch, step=step, amp=self.amp)

    def end(self, model: nn.Module, all_reduce_sum=None, device=None) -> None:
        """At the epoch's end, before the checkpoint: the weights' check, and under DDP every rank's verdict."""
        if not self.distributed:
            check_weights(model, epoch=self.epoch, amp=self.amp)
            return
        try:
            check_weights(model, epoch=self.epoch, amp=self.amp)
            weights_bad = 0.0
        except RunDiverged:
            weights_bad = 1.0
        loss_bad, weights_bad = all_reduce_sum([float(self.bad_step is not None), weights_bad], device)
        if loss_bad:
            raise RunDiverged(self.epoch, self.bad_step, what="the training loss (on some process)", hint=_hint(self.amp))
        if weights_bad:
            raise RunDiverged(self.epoch, None, what="the weights or running statistics", hint=_hint(self.amp))


def diverged_summary(err: RunDiverged, *, run_dir: Any, method: str, history: list[dict[str, Any]],
                     sam_steps: int | None = None, config_fingerprint: str | None = None) -> dict[str, Any]:
    """``summary.json`` of a diverged run: the status, where it diverged, and the last good epoch's figures
    (which a report uses only with ``--include-diverged``)."""
    last = history[-1] if history else {}
    return {
        "run_dir": str(run_dir),
        "method": method,
        "status": "diverged",
        "diverged": {"epoch": err.epoch, "step": err.step, "what": err.what, "message": str(err)},
        "epochs": len(history),
        "final_test_acc": last.get("test_acc"),
        "best_test_acc": max((r["test_acc"] for r in history if r.get("test_acc") is not None), default=None),
        "final_train_loss": last.get("train_loss"),
        "final_val_acc": last.get("val_acc"),
        "sam_steps": sam_steps,
        "config_fingerprint": config_fingerprint,
    }


def is_diverged(summary: dict[str, Any] | None) -> bool:
    return bool(summary) and summary.get("status") == "diverged"
