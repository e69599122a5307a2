"""normsam's own timed variants (SGD as the baseline, SAM-all, SAM-ON and its fast modes) and
:func:`default_variants`, the list every benchmark runs (with SAM's variants, :mod:`normsam.bench.sam_variants`,
when asked for).

Each variant is written the way a user would train with it, through SAM's public API; the fp16 path goes
through a GradScaler as the training loop does, so the benchmark times what training runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch import nn

from normsam.bench.context import StepContext, StepFn, Variant, VariantUnavailable, descend, loss
from normsam.bench.names import (
    FLOOR, FLOOR_ALL, MOMENTUM, PEER, SAM_ALL, SAM_ON, SAM_ON_CLASSIC, SGD, fraction_name, interval_name,
)
from normsam.bench.sam_variants import sam_variants
from normsam.bench.settings import VariantSettings
from normsam.bench.yardsticks import handwritten_variant, peer_variant

__all__ = ["default_variants"]


def _sgd_variant(model: nn.Module, ctx: StepContext) -> StepFn:
    opt, scaler = ctx.sgd(model.parameters()), ctx.scaler()

    def step(x, y):
        batch_loss = loss(model, x, y, ctx)
        if scaler is None:
            batch_loss.backward()
            opt.step()
        else:
            scaler.scale(batch_loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)

    return step


def _normsam_variant(scope: str, cheap: bool) -> Callable[[nn.Module, StepContext], StepFn]:
    """SAM over ``scope``; ``cheap``: the first pass's gradient taken for the scope only (``first_step(loss)``),
    otherwise a full ``backward`` first (the classic two-pass SAM)."""

    def build(model: nn.Module, ctx: StepContext) -> StepFn:
        sam, scaler = ctx.sam(model, ctx.sam_options(scope)), ctx.scaler()

        def step(x, y):
            batch_loss = loss(model, x, y, ctx)
            scaled = batch_loss if scaler is None else scaler.scale(batch_loss)
            if cheap:
                sam.first_step(scaled, zero_grad=True, grad_scaler=scaler)
            else:
                scaled.backward()
                sam.first_step(zero_grad=True, grad_scaler=scaler)
            descend(sam, loss(model, x, y, ctx), scaler)

        return step

    return build


def _interval_variant(k: int) -> Callable[[nn.Module, StepContext], StepFn]:
    """SAM-ON with a fresh ascent every k-th step; the other steps reuse the last ε (one forward-backward)."""

    def build(model: nn.Module, ctx: StepContext) -> StepFn:
        sam, scaler = ctx.sam(model, ctx.sam_options("norm").replace(ascent_interval=k)), ctx.scaler()

        def step(x, y):
            if sam.needs_ascent:
                batch_loss = loss(model, x, y, ctx)
                sam.first_step(batch_loss if scaler is None else scaler.scale(batch_loss), zero_grad=True,
                               grad_scaler=scaler)
            else:  # the last ε is applied again: no first forward-backward
                sam.first_step(zero_grad=True, grad_scaler=scaler)
            descend(sam, loss(model, x, y, ctx), scaler)

        return step

    return build


def _momentum_variant(model: nn.Module, ctx: StepContext) -> StepFn:
    """SAM-ON with ε from the base SGD's momentum (``ascent="momentum"``): one forward-backward at w + ε, the
    restore and the base step; the running statistics are updated in that pass (``bn_policy="update"``)."""
    if ctx.perturbation == "fisher":  # a row saying why, rather than SAM's ValueError ending the whole benchmark
        raise VariantUnavailable("perturbation='fisher' needs the ascent gradient, which ascent='momentum' never computes")
    sam, scaler = ctx.sam(model, ctx.sam_options("norm").replace(ascent="momentum")), ctx.scaler()

    def step(x, y):
        sam.first_step(zero_grad=True)  # no pass at w: ε = -ρ·v/‖v‖ from the momentum buffers
        descend(sam, loss(model, x, y, ctx), scaler)

    return step


def _fraction_variant(f: float) -> Callable[[nn.Module, StepContext], StepFn]:
    """SAM-ON whose ascent gradient comes from the first ⌈f·B⌉ examples of the batch (the runner's
    ``ascent_fraction``): the first forward-backward runs on a sub-batch."""

    def build(model: nn.Module, ctx: StepContext) -> StepFn:
        sam, scaler = ctx.sam(model, ctx.sam_options("norm")), ctx.scaler()

        def step(x, y):
            n = max(1, math.ceil(f * x.shape[0]))
            batch_loss = loss(model, x[:n], y[:n], ctx)
            sam.first_step(batch_loss if scaler is None else scaler.scale(batch_loss), zero_grad=True,
                           grad_scaler=scaler)
            descend(sam, loss(model, x, y, ctx), scaler)

        return step

    return build


def default_variants(
    handwritten: bool = True,
    *,
    peer: bool = True,
    classic: bool = True,
    ascent_interval: int | None = 4,
    handwritten_all: bool = False,
    ascent_fraction: float | None = None,
    momentum: bool = True,
    variants: Sequence[str] = (),
    settings: VariantSettings | None = None,
) -> list[Variant]:
    """SGD first (the baseline of the ratios), then the peer, SAM-all, SAM-ON, the fast modes
    (``ascent_interval``, ``ascent_fraction``, the momentum ascent) and the floor; then SAM's ``variants``
    (keys of :data:`~normsam.bench.sam_variants.SAM_VARIANT_KEYS`: each at scope="all", pytorch_optimizer's
    class of the same name (with ``peer``), at scope="norm"; the multi-step ascent) with ``settings``.

    A variant that cannot run with the context (the peer not installed, a yardstick under fp16 or another
    perturbation model, the momentum ascent with fisher) is still listed: its row says why."""
    rows = [Variant(SGD, _sgd_variant)]
    if peer:
        rows.append(Variant(PEER, peer_variant))
    rows.append(Variant(SAM_ALL, _normsam_variant("all", cheap=True)))
    if classic:
        rows.append(Variant(SAM_ON_CLASSIC, _normsam_variant("norm", cheap=False)))
    rows.append(Variant(SAM_ON, _normsam_variant("norm", cheap=True)))
    if ascent_interval is not None:
        rows.append(
            Variant(interval_name(ascent_interval), _interval_variant(ascent_interval), cycle=ascent_interval)
        )
    if ascent_fraction is not None:
        rows.append(Variant(fraction_name(ascent_fraction), _fraction_variant(ascent_fraction)))
    if momentum:
        rows.append(Variant(MOMENTUM, _momentum_variant))
    if handwritten:
        rows.append(Variant(FLOOR, handwritten_variant("norm")))
    if handwritten_all:
        rows.append(Variant(FLOOR_ALL, handwritten_variant("all")))
    rows += sam_variants(variants, settings, peer=peer)
    return rows
