r"""SAM in PyTorch Lightning with the cheap ascent: the :class:`SAMModule` mixin.

.. code-block:: python

    import lightning as L
    import normsam
    from normsam.integrations.lightning import SAMModule

    class Net(SAMModule, L.LightningModule):          # the mixin goes first
        def training_step(self, batch, batch_idx):
            loss = ...
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            sam = normsam.SAM(self, torch.optim.AdamW, lr=1e-3, rho=0.5)   # the module itself: SAM-ON
            sched = torch.optim.lr_scheduler.OneCycleLR(sam, max_lr=1e-3, total_steps=...)
            return {"optimizer": sam, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

Automatic optimization runs as for a plain optimizer: Lightning calls ``optimizer_step`` once per step, so
``global_step``, step-based schedulers, ``ModelCheckpoint``, resuming and ``precision="bf16-mixed"`` behave
as usual. Per step, the mixin

1. runs Lightning's closure once with ``backward`` replaced by the cheap ascent ``sam.first_step(loss)``
   (gradients of the perturbed tensors only, no ``.grad`` written; under DDP without gradient sync);
2. calls ``optimizer.step(closure)``: SAM sees the perturbed weights and runs the closure once more as the
   second pass (full backward at :math:`w + \varepsilon`, Lightning's gradient clipping and
   ``on_before_optimizer_step``), then restores :math:`w_S` and steps the base optimizer.

With ``ascent="momentum"`` (Momentum-SAM: ε from the optimizer's momentum, :mod:`normsam.optim.ascent`) or on a
step that reuses ε (``ascent_interval``) there is no ascent pass: the mixin perturbs, and ``optimizer.step``
runs the closure once at :math:`w + \varepsilon` (:attr:`SAMModule.sam_pass` is ``"single"``, its logs are
kept), then restores and steps.

SAM's variants run as SAM does, e.g. ``normsam.GSAM(self, torch.optim.AdamW, rho=0.05, lr=1e-3)`` (or
``normsam.SAM(..., variant="gsam")``) in ``configure_optimizers``: a descent rule (GSAM, WSAM, LookSAM) rewrites
the gradients inside the base optimizer's step, after Lightning's clipping of the second pass's gradient;
LookSAM's steps between its full ones are single passes, as a reused ε. ``ascent_steps > 1`` is refused when
the optimizer is first checked (a multi-step ascent evaluates the loss again at each point, and the mixin runs
``training_step`` once for the ascent; manual optimization can pass ``first_step(loss, ascent_loss=...)``),
and so is a descent rule on several processes without ``sync_ascent=True``.

With ``accumulate_grad_batches > 1``, only ``ascent="momentum"`` is supported: the mixin perturbs in
``on_train_batch_start`` before a step's first micro-batch (an override of that hook must call ``super()``),
so each micro-batch is one pass at :math:`w + \varepsilon`.

``training_step`` thus runs twice per step (once without an ascent pass); :attr:`SAMModule.sam_pass` says which pass it is in
(``"ascent"`` or ``"second"``), and ``self.log`` calls of the second pass are dropped, so the logged values are
those at :math:`w`, one per step, as without SAM. ``accumulate_grad_batches > 1`` is refused for the gradient
ascent (it would see the last micro-batch only).

Manual optimization needs no mixin: ``opt = self.optimizers(); opt.optimizer.first_step(loss)`` (the cheap
ascent), then ``opt.step(closure=...)`` with a closure that computes the second loss and calls
``self.manual_backward``; Lightning counts the step and runs its precision and clipping hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

try:
    import lightning.pytorch  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError('normsam.integrations.lightning needs lightning: pip install "normsam[lightning]"') from error

from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import Tensor

from normsam.optim.sam import SAM
from normsam.integrations._checks import check_sam_trains

__all__ = ["SAMModule"]


def _unwrap_sam(optimizer: Any) -> SAM | None:
    """The ``SAM`` inside a ``LightningOptimizer``, or None.

    A ``LightningOptimizer`` subclasses its optimizer's class and holds a shallow copy of its ``__dict__``, so
    it passes ``isinstance(..., SAM)``; SAM's state lives in the wrapped object only."""
    if isinstance(optimizer, LightningOptimizer):
        optimizer = optimizer.optimizer
    return optimizer if isinstance(optimizer, SAM) else None


class SAMModule:
    """``LightningModule`` mixin: SAM (SAM-ON with ``SAM(self, ...)``) with the cheap ascent under automatic
    optimization. Put it before ``LightningModule`` in the bases. Optimizers that are not a
    :class:`normsam.SAM` step as usual."""

    _sam_pass: str | None = None
    _sam_active: SAM | None = None

    @property
    def sam_pass(self) -> str | None:
        """``"ascent"`` in the first run of ``training_step`` of a SAM step, ``"second"`` in the second,
        ``"single"`` in the only run of a step without an ascent pass (``ascent="momentum"``, a reused ε),
        ``None`` outside a SAM step (validation, a plain optimizer)."""
        return self._sam_pass

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Callable[[], Any] | None = None
    ) -> None:
        sam = _unwrap_sam(optimizer)
        if sam is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)  # type: ignore[misc]
        if optimizer_closure is None:
            raise ValueError("SAMModule.optimizer_step needs Lightning's closure: call it with optimizer_closure=.")
        if getattr(self, "_sam_checked", None) != id(sam):  # once per optimizer: it must train this module
            check_sam_trains(sam, self, "SAMModule")
            self._sam_checked = id(sam)
        if self.trainer.accumulate_grad_batches != 1 and sam.options.ascent == "momentum":
            if not sam.is_perturbed:
                raise ValueError(
                    "SAMModule with accumulate_grad_batches > 1 and ascent='momentum' perturbs in "
                    "on_train_batch_start, before the step's first micro-batch, and the weights are not perturbed "
                    "here: if your module overrides on_train_batch_start, call super().on_train_batch_start(...)."
                )
        elif self.trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"SAMModule does not support accumulate_grad_batches={self.trainer.accumulate_grad_batches}: the "
                "ascent would see the last micro-batch only. Use a larger batch, or manual optimization with "
                "loss.backward(inputs=sam.ascent_inputs()) per micro-batch, then first_step()."
            )
        strategy = self.trainer.strategy
        no_sync = getattr(strategy, "block_backward_sync", None) or contextlib.nullcontext
        self._sam_active = sam
        try:
            if sam.is_perturbed or not sam.needs_ascent:  # the momentum ascent or a reused ε: one pass, at w + ε
                self._sam_pass = "single"
                if not sam.is_perturbed:  # (with accumulation, on_train_batch_start has perturbed already)
                    sam.first_step()
                optimizer.step(closure=optimizer_closure)
                return
            self._sam_pass = "ascent"
            with no_sync():  # the ascent is each worker's own, as in the original SAM
                optimizer_closure()
            self._sam_pass = "second"
            optimizer.step(closure=optimizer_closure)
        finally:
            self._sam_pass = None
            self._sam_active = None
            if sam.is_perturbed:  # training_step returned None, or a GradScaler skipped the step
                sam.restore()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        """With ``accumulate_grad_batches > 1`` and ``ascent="momentum"``: perturb once, before the step's first
        micro-batch, so that every micro-batch runs at w + ε (one pass each); the step restores w."""
        result = super().on_train_batch_start(batch, batch_idx)  # type: ignore[misc]
        if self.trainer.accumulate_grad_batches != 1:
            for optimizer in self.trainer.optimizers:
                sam = _unwrap_sam(optimizer)
                if sam is not None and sam.options.ascent == "momentum" and not sam.is_perturbed:
                    sam.first_step()
        return result

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        if self._sam_pass == "ascent" and self._sam_active is not None:
            scaler = getattr(self.trainer.precision_plugin, "scaler", None)
            self._sam_active.first_step(loss, grad_scaler=scaler)
            return
        super().backward(loss, *args, **kwargs)  # type: ignore[misc]

    def log(self, *args: Any, **kwargs: Any) -> None:
        if self._sam_pass == "second":
            return
        super().log(*args, **kwargs)  # type: ignore[misc]
