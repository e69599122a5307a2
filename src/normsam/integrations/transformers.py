r"""SAM in the HuggingFace ``transformers.Trainer``: :class:`SAMTrainer`.

.. code-block:: python

    from normsam.integrations.transformers import SAMTrainer

    trainer = SAMTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                         sam=dict(scope="norm", rho=0.5, perturbation="sam"))
    trainer.train()

The optimizer is the one ``TrainingArguments`` asks for (``optim``, ``learning_rate``, ``weight_decay`` with the
Trainer's own no-decay rule, Adam betas …) wrapped in :class:`normsam.SAM`; ``sam=`` holds SAM's options
(``scope`` defaults to ``"norm"``: SAM-ON). Or build the SAM yourself and pass ``optimizers=(sam, None)``.
The Trainer's scheduler, gradient accumulation, ``bf16``, logging, ``save_steps`` checkpoints and
``resume_from_checkpoint`` work as usual; the training logs carry SAM's counters (``sam_steps`` …).

One optimizer step with ``gradient_accumulation_steps = k`` (micro-batches :math:`B_1 \dots B_k`):

1. the cheap ascent on every micro-batch: the loss at :math:`w` is back-propagated into the perturbed tensors
   only, so their ``.grad`` sums to the whole step's ascent gradient :math:`g_S = \nabla_S L_{B_1 \cup \dots
   \cup B_k}(w)` (the logged loss is this one, at :math:`w`);
2. after the last micro-batch, :math:`w_S \leftarrow w_S + \varepsilon(g_S)` once, and every micro-batch is
   run again at :math:`w + \varepsilon` with a full backward pass;
3. the Trainer clips the gradients and calls ``optimizer.step()``, which restores :math:`w_S` and steps the
   base optimizer.

With ``sam=dict(ascent="momentum")`` (Momentum-SAM: ε from the optimizer's momentum, see
:mod:`normsam.optim.ascent`), or on a step that reuses ε (``ascent_interval``), there is no ascent pass: the
first micro-batch of the step perturbs :math:`w_S`, every micro-batch runs once at :math:`w + \varepsilon`
(one forward-backward each, the logged loss is this one) and ``optimizer.step()`` restores and steps.

SAM's variants run as SAM does: ``sam=dict(variant="gsam", alpha=0.4, rho=0.05)`` (or a ready
``normsam.GSAM(model, torch.optim.AdamW, ...)`` in ``optimizers=``); a descent rule (GSAM, WSAM, LookSAM) rewrites
the gradients inside the base optimizer's step, which ``optimizer.step()`` reaches, after the Trainer's clipping
of the second pass's gradient. LookSAM's steps between its full ones take no ascent pass, as a reused ε.
``ascent_steps > 1`` is refused (a multi-step ascent evaluates the loss again at each point, and the Trainer
runs ``training_step`` once for the ascent), and so is a descent rule on several processes without
``sync_ascent=True`` (each process's own ascent gradient would make the replicas drift apart).

So the perturbation is the one a single large batch would give; the micro-batches' inputs are kept on the
device until the step ends (token ids: small). Under DDP the ascent is each worker's own (SAM's default; pass
``sync_ascent=True`` in ``sam=`` to average it) and the second pass reduces the gradients once per step.
DeepSpeed, accelerate's FSDP (``TrainingArguments(fsdp=...)``, refused when the Trainer is built; for FSDP2
use :class:`normsam.SAM` on a ``fully_shard``-ed model in your own loop, see ``examples/fsdp_sam_on.py``) and
optimizer factories (``optim="muon"`` …) are not supported.
"""

from __future__ import annotations

import contextlib
from typing import Any

try:
    from transformers import Trainer, TrainerCallback
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "normsam.integrations.transformers needs transformers and accelerate: "
        'pip install "normsam[transformers]"'
    ) from error

import torch
from torch import nn

import difflib

from normsam.integrations._checks import check_sam_options, check_sam_trains
from normsam.optim.options import SAMOptions, option_names, rho_required, unknown_option_error
from normsam.optim.sam import SAM

__all__ = ["SAMTrainer"]

_NOT_SAM_OPTIONS = ("params", "base_optimizer", "model")


def _sam_options(sam: dict[str, Any]) -> tuple[SAMOptions | None, dict[str, Any]]:
    """``sam=dict(...)`` → its SAM options, checked now (not when ``train()`` starts), and the rest, which the
    base optimizer gets; a key that reads like a mistyped SAM option is refused with the closest one."""
    if not sam:
        return None, {}
    options, rest = SAMOptions.split(sam)
    for key in rest:
        if difflib.get_close_matches(key, option_names(), n=1, cutoff=0.8):
            raise unknown_option_error(key)
    checked = SAMOptions(**options)
    check_sam_options(checked, "SAMTrainer")
    return checked, rest


def _unwrap_sam(optimizer: Any) -> SAM | None:
    """The ``SAM`` inside accelerate's (or another framework's) optimizer wrapper, or None."""
    while optimizer is not None and not isinstance(optimizer, SAM):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


class _UndoSkippedStep(TrainerCallback):
    """An fp16 ``GradScaler`` skips ``optimizer.step()`` on overflow; the weights must not stay perturbed."""

    def __init__(self, trainer: SAMTrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        sam = _unwrap_sam(self.trainer.optimizer)
        if sam is not None and sam.is_perturbed:
            sam.restore()


def _refuse_fsdp(training_args: Any) -> None:
    """accelerate's FSDP (1 or 2) is refused when the Trainer is built: SAMTrainer has not been tested under
    it (accelerate runs FSDP on accelerators only), and a SAM that silently trains as the plain optimizer is
    worse than none."""
    fsdp = getattr(training_args, "fsdp", None)
    if fsdp or (getattr(training_args, "fsdp_config", None) or {}).get("fsdp_version"):
        raise ValueError(
            f"SAMTrainer does not support accelerate's FSDP (TrainingArguments fsdp={fsdp!r}) yet. For SAM and SAM-ON "
            "on a sharded model, shard it with torch.distributed.fsdp.fully_shard and train with normsam.SAM in "
            "your own loop (examples/fsdp_sam_on.py, run with torchrun), or use SAMTrainer with DDP."
        )


class SAMTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with :class:`normsam.SAM` and the cheap ascent.

    Args:
        *args, **kwargs: as for ``Trainer``. ``optimizers=(sam, scheduler_or_None)`` may pass a ready
            :class:`normsam.SAM` (built on the model's parameters, e.g. ``SAM(model, torch.optim.AdamW, ...)``).
        sam: options of :class:`normsam.SAM` (``rho``, ``perturbation``, ``scope`` …) used to wrap the
            optimizer the ``TrainingArguments`` describe; ``scope`` defaults to ``"norm"`` (SAM-ON). Options of
            the base optimizer given here (e.g. ``betas``) override the ``TrainingArguments``' ones.
    """

    def __init__(self, *args: Any, sam: dict[str, Any] | None = None, **kwargs: Any):
        wrong = [key for key in _NOT_SAM_OPTIONS if key in (sam or {})]
        if wrong:
            raise ValueError(
                f"sam= holds SAM's options (rho, perturbation, scope …), not {', '.join(wrong)}: the Trainer "
                "passes the model and builds the base optimizer from TrainingArguments (optim=...)."
            )
        self.sam_options, self.sam_base_kwargs = _sam_options(dict(sam or {}))
        if self.sam_options is not None and self.sam_options.rho is None:
            raise rho_required(self.sam_options.perturbation)  # now, not when train() builds the optimizer
        self._sam_pending: list[tuple[dict[str, Any], Any]] = []
        _refuse_fsdp(kwargs["args"] if "args" in kwargs else (args[1] if len(args) > 1 else None))
        super().__init__(*args, **kwargs)
        if self.optimizer is None and self.sam_options is None:
            raise ValueError("SAMTrainer needs SAM's options, at least its radius: sam=dict(rho=0.5) (SAM-ON by default), "
                             "or a ready SAM in optimizers=(SAM(model, torch.optim.AdamW, rho=..., lr=...), None).")
        if self.optimizer is not None:
            if _unwrap_sam(self.optimizer) is None:
                raise ValueError(
                    f"SAMTrainer got optimizers=({type(self.optimizer).__name__}, ...), not a normsam.SAM: pass "
                    "SAM(model, torch.optim.AdamW, lr=..., rho=...), or leave optimizers out and give sam=dict(...)."
                )
            if self.sam_options is not None:
                raise ValueError("Pass either a ready SAM in optimizers=(sam, ...) or sam=dict(...), not both.")
            if self.model is not None:  # up front; training_step checks again (model_init builds it later)
                check_sam_trains(_unwrap_sam(self.optimizer), self.model, "SAMTrainer")
        if self.is_deepspeed_enabled:
            raise ValueError("SAMTrainer does not support DeepSpeed: its engine owns backward and the step.")
        self.add_callback(_UndoSkippedStep(self))

    @property
    def sam(self) -> SAM:
        """The :class:`normsam.SAM` being trained with (created by ``train()`` unless passed in)."""
        sam = _unwrap_sam(self.optimizer)
        if sam is None:
            raise ValueError("SAMTrainer.sam is created by train() (or create_optimizer()); call that first.")
        return sam

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        from transformers.trainer_optimizer import is_optimizer_factory

        opt_model = self.model if model is None else model
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if is_optimizer_factory(optimizer_cls) or {"params", "model", "optimizer_dict"} & set(optimizer_kwargs):
            raise ValueError(
                f"SAMTrainer cannot wrap optim={self.args.optim!r}, which builds its own parameter groups; "
                "use a plain optimizer such as optim='adamw_torch' or 'sgd'."
            )
        # The Trainer's weight-decay rule, then SAM's scope splits each group by identity (SAM-ON by default).
        decay = set(self.get_decay_parameter_names(opt_model))
        named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        self.optimizer = SAM([g for g in groups if g["params"]], optimizer_cls, self.sam_options, model=opt_model,
                             **{**optimizer_kwargs, **self.sam_base_kwargs})
        return self.optimizer

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """The cheap ascent on this micro-batch; after the step's last one, perturb and run the second pass."""
        model.train()
        sam = self.sam
        if not getattr(self, "_sam_checked", False):  # once: the optimizer must train this model
            check_sam_trains(sam, self.accelerator.unwrap_model(model), "SAMTrainer")
            self._sam_checked = True
        inputs = self._prepare_inputs(inputs)
        if sam.is_perturbed or (not sam.needs_ascent and not self._sam_pending):
            return self._single_pass(model, sam, inputs, num_items_in_batch)
        loss = self._micro_batch_loss(model, inputs, num_items_in_batch)
        # norm_over="all" needs the full gradient's norm, descent_over="all" every tensor's ascent gradient: then
        # every gradient is computed
        every = sam.options.norm_over == "all" or sam.options.descent_over == "all"
        ascent_inputs = None if every else sam.ascent_inputs()
        with self.accelerator.no_sync(model):
            self.accelerator.backward(loss, inputs=ascent_inputs)
        self._sam_pending.append((inputs, num_items_in_batch))
        if self.accelerator.sync_gradients:
            self._second_pass(model, sam)
        return loss.detach()

    def _single_pass(self, model: nn.Module, sam: SAM, inputs: dict[str, Any], num_items_in_batch: Any) -> torch.Tensor:
        """A step without an ascent pass (the momentum ascent, a reused ε): perturb on the step's first
        micro-batch, then each micro-batch is one forward-backward at w + ε (the Trainer's accumulation and
        DDP sync as for a plain optimizer); ``optimizer.step()`` restores w and steps."""
        if not sam.is_perturbed:
            sam.first_step()
        loss = self._micro_batch_loss(model, inputs, num_items_in_batch)
        self.accelerator.backward(loss)
        return loss.detach()

    def _second_pass(self, model: nn.Module, sam: SAM) -> None:
        sam.first_step(zero_grad=True, grad_scaler=self.accelerator.scaler)
        pending, self._sam_pending = self._sam_pending, []
        for i, (inputs, num_items_in_batch) in enumerate(pending):
            last = i == len(pending) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                self.accelerator.backward(self._micro_batch_loss(model, inputs, num_items_in_batch))

    def _micro_batch_loss(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any) -> torch.Tensor:
        """The loss ``Trainer.training_step`` back-propagates: reduced over GPUs, scaled for accumulation."""
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        if self.args.n_gpu > 1:
            loss = loss.mean()
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (
                getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None
            ) or getattr(self, "compute_loss_func", None) is not None
        if not scaled:
            loss = loss / self.current_gradient_accumulation_steps
        return loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        sam = _unwrap_sam(self.optimizer)
        if sam is not None and "loss" in logs:
            logs = {**logs, **{f"sam_{k}" if not k.startswith("sam_") else k: v for k, v in sam.counters.items()}}
        super().log(logs, *args, **kwargs)
