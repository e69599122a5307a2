"""What a timed variant is, and the settings every variant shares.

A :class:`Variant` is a name and a ``build(model, context)`` that returns ``step(x, y)``, one training step. The
:class:`StepContext` is the part all variants must share for their step times to be comparable: the base SGD's
settings, ρ, the perturbation model and the AMP mode. It builds normsam's ``SAM`` from a
:class:`~normsam.optim.options.SAMOptions` value, so a variant states only the options it changes
(``context.sam_options("norm").replace(ascent_interval=4)``) and SAM's validation applies unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normsam.bench.passes import PASS_CLOCK
from normsam.optim.amp import autocast, check_bf16_kernels, upcast_bf16_matmuls
from normsam.optim.options import SAMOptions
from normsam.optim.sam import SAM

__all__ = ["StepFn", "Variant", "VariantUnavailable", "StepContext", "loss", "descend"]

StepFn = Callable[[Tensor, Tensor], None]


class VariantUnavailable(Exception):
    """Raised by a variant's ``build`` when it cannot run here; the message says why (shown in the table)."""


@dataclass(frozen=True)
class Variant:
    """A named way to train: ``build(model, context)`` returns ``step(x, y)`` that runs one training step."""

    name: str
    build: Callable[[nn.Module, "StepContext"], StepFn]
    #: steps in one period of the variant's schedule (k for ``ascent_interval=k`` and LookSAM): a round times a
    #: whole number of periods and the memory is measured over one period, so every round sees one fresh
    #: ascent per k steps whatever ``steps_per_round`` is
    cycle: int = 1
    #: how the row is timed or driven, where a reader needs to know (shown under the table and in the JSON)
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class StepContext:
    """What every variant shares: optimizer settings, the loss, the AMP mode."""

    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    rho_all: float = 0.05
    rho_on: float = 0.5
    perturbation: str = "sam"
    amp: str = "off"
    device_type: str = "cpu"
    bf16_kernels: str = "native"  # "upcast": bf16 matrix products on the fp32 kernels (normsam.optim.amp)

    def __post_init__(self):
        check_bf16_kernels(self.bf16_kernels, amp=self.amp, device_type=self.device_type)

    def autocast(self):
        return autocast(self.amp, self.device_type)

    def with_kernels(self, step: StepFn) -> StepFn:
        """``step`` run inside the ``bf16_kernels`` context (forward and backward); unchanged for native."""
        if self.bf16_kernels == "native":
            return step

        def upcast_step(x, y):
            with upcast_bf16_matmuls(self.bf16_kernels):
                return step(x, y)

        return upcast_step

    def scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device_type) if self.amp == "fp16" else None

    def base_kwargs(self) -> dict:
        return dict(lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def sgd(self, params) -> torch.optim.SGD:
        return torch.optim.SGD(params, **self.base_kwargs())

    def rho(self, scope: str) -> float:
        return self.rho_all if scope == "all" else self.rho_on

    def sam_options(self, scope: str) -> SAMOptions:
        """SAM's options for a variant over ``scope``: this context's ρ for the scope and its perturbation model,
        SAM's defaults for everything else (a variant changes what it times with ``.replace(...)``)."""
        return SAMOptions(scope=scope, rho=self.rho(scope), perturbation=self.perturbation)

    def sam(self, model: nn.Module, options: SAMOptions) -> SAM:
        """normsam's SAM over ``model`` with ``options``, on the same base SGD as every other variant."""
        return SAM(model, torch.optim.SGD, options, **self.base_kwargs())


def loss(model: nn.Module, x: Tensor, y: Tensor, ctx: StepContext) -> Tensor:
    """The forward pass and loss every variant times, under the context's autocast; while the
    :data:`~normsam.bench.passes.PASS_CLOCK` runs, its forward and its backward are added to the passes' time."""
    begin = time.perf_counter()
    with ctx.autocast():
        batch_loss = F.cross_entropy(model(x), y)
    PASS_CLOCK.add_forward(time.perf_counter() - begin)
    PASS_CLOCK.arm_backward(batch_loss)
    return batch_loss


def descend(sam: SAM, batch_loss: Tensor, scaler: torch.amp.GradScaler | None) -> None:
    """The second half of a normsam SAM step: the backward pass of ``batch_loss`` (the loss at w + ε), restore,
    the base step (through the GradScaler when there is one, as the training loop does), zero the gradients."""
    if scaler is None:
        batch_loss.backward()
        sam.second_step(zero_grad=True)
    else:
        scaler.scale(batch_loss).backward()
        sam.restore()
        scaler.step(sam.base_optimizer)
        scaler.update()
        sam.zero_grad()
