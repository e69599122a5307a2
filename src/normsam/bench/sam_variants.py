"""SAM's variants in the benchmark: GSAM, WSAM, LookSAM, Friendly-SAM and GCSAM, each three times (normsam at
``scope="all"``, pytorch_optimizer's class of the same name at the same hyperparameters, normsam at
``scope="norm"`` with the cheap ascent), and the multi-step ascent on SAM-ON.

normsam's rows are built from :class:`~normsam.optim.options.SAMOptions` through
:meth:`StepContext.sam <normsam.bench.context.StepContext.sam>` (``variant=``, ``alpha=``, …, as
``normsam.GSAM`` & co. set them) and stepped the way a user trains with them: the cheap ascent
``first_step(loss)`` when :attr:`~normsam.SAM.needs_ascent`, ``first_step()`` otherwise (LookSAM's steps
between its full ones), then the second pass. The peers are in :mod:`normsam.bench.yardsticks`.

LookSAM alternates: one full SAM step (two passes) every k-th step, one pass at w on the k − 1 steps between.
Its three rows have ``cycle = k``: every round times whole cycles of k steps (``steps_per_round`` rounded up to a
multiple of k) for normsam and the peer alike, so both count the two kinds of step in the same proportion, and the
step time shown is the mean step over a cycle.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from normsam.bench.context import StepContext, StepFn, Variant, VariantUnavailable, descend, loss
from normsam.bench.names import MULTI_STEP, VARIANT_FAMILIES, multi_step_name, peer_name, variant_name
from normsam.bench.settings import VariantSettings
from normsam.bench.yardsticks import peer_variant_of

__all__ = ["sam_variants", "SAM_VARIANT_KEYS", "add_variant_arguments", "chosen_variants"]

#: The keys ``--variants`` takes: the five variants and the multi-step ascent.
SAM_VARIANT_KEYS: tuple[str, ...] = (*VARIANT_FAMILIES, MULTI_STEP)


def _sam_variant(scope: str, changes: dict[str, Any], ascent_steps: int = 1) -> Callable[[nn.Module, StepContext], StepFn]:
    """normsam's SAM over ``scope`` with the options ``changes``: the cheap ascent on the steps that take one
    (with ``ascent_steps > 1``, the later ascent points' losses through ``ascent_loss``), no first pass on the
    others, then the second pass and the base step."""

    def build(model: nn.Module, ctx: StepContext) -> StepFn:
        try:
            sam = ctx.sam(model, ctx.sam_options(scope).replace(**changes))
        except ValueError as err:  # a combination SAM refuses (with the context's perturbation, …): one row
            raise VariantUnavailable(f"normsam.SAM refuses it here: {err}") from None
        scaler = ctx.scaler()

        def scaled_loss(x, y):
            batch_loss = loss(model, x, y, ctx)
            return batch_loss if scaler is None else scaler.scale(batch_loss)

        def step(x, y):
            if sam.needs_ascent:
                again = (lambda: scaled_loss(x, y)) if ascent_steps > 1 else None
                sam.first_step(scaled_loss(x, y), zero_grad=True, grad_scaler=scaler, ascent_loss=again)
            else:  # LookSAM between its full steps: one pass, at w
                sam.first_step(zero_grad=True, grad_scaler=scaler)
            descend(sam, loss(model, x, y, ctx), scaler)

        return step

    return build


def _looksam_note(k: int) -> str:
    return (f"each round times whole cycles of k={k} steps (1 full SAM step + {k - 1} single-pass steps) of every "
            "LookSAM row, so normsam and the peer count both kinds of step in the same proportion; the figure is "
            "the mean step of a cycle")


def sam_variants(keys: Sequence[str] = SAM_VARIANT_KEYS, settings: VariantSettings | None = None,
                 *, peer: bool = True) -> list[Variant]:
    """The rows of the variants ``keys`` (of :data:`SAM_VARIANT_KEYS`), in their order: for each variant
    normsam at scope="all", the peer (unless ``peer=False``), normsam at scope="norm"; for ``"multi-step"``
    SAM-ON with ``ascent_steps`` (k + 1 passes a step)."""
    settings = settings or VariantSettings()
    unknown = [k for k in keys if k not in SAM_VARIANT_KEYS]
    if unknown:
        raise ValueError(f"Unknown variant {unknown[0]!r}; the benchmark has {', '.join(SAM_VARIANT_KEYS)}.")
    rows: list[Variant] = []
    for key in dict.fromkeys(keys):  # (a key given twice: its rows once)
        if key == MULTI_STEP:
            k = settings.ascent_steps
            rows.append(Variant(multi_step_name(k), _sam_variant("norm", dict(ascent_steps=k), ascent_steps=k)))
            continue
        family, cycle = VARIANT_FAMILIES[key], settings.cycle(key)
        notes = (_looksam_note(cycle),) if key == "looksam" else ()
        changes = settings.options(key)
        rows.append(Variant(variant_name(family, "all"), _sam_variant("all", changes), cycle=cycle, notes=notes))
        if peer:
            peer_notes = notes + ((f"driven without the pass at w that its documented loop takes before step() on "
                                   f"the {cycle - 1} steps of a cycle whose first_step() discards it (the same "
                                   "steps, one pass fewer)"),) if key == "looksam" else notes
            rows.append(Variant(peer_name(family), peer_variant_of(key, settings), cycle=cycle, notes=peer_notes))
        rows.append(Variant(variant_name(family, "norm"), _sam_variant("norm", changes), cycle=cycle, notes=notes))
    return rows


def add_variant_arguments(parser: argparse.ArgumentParser) -> None:
    """``--variants`` and ``--looksam-k``, as ``benchmarks/step_time.py`` and ``normsam bench`` take them."""
    parser.add_argument("--variants", nargs="*", choices=SAM_VARIANT_KEYS, metavar="VARIANT",
                        help="also SAM's variants, each at scope=all, as pytorch_optimizer's class of the same name "
                             "and at scope=norm (cheap ascent), with their targets: gsam, wsam, looksam, "
                             "friendly-sam, gcsam (pytorch_optimizer.SAM(use_gc=True)), and multi-step (SAM-ON with "
                             "ascent_steps=2); without a name: all of them")
    parser.add_argument("--looksam-k", type=int, default=5,
                        help="LookSAM's k with --variants (both sides; its rows time whole cycles of k steps; "
                             "default 5)")


def chosen_variants(args: argparse.Namespace) -> tuple[tuple[str, ...], VariantSettings]:
    """The variants the arguments of :func:`add_variant_arguments` name (``--variants`` alone: all of them; not
    given: none) and their settings; a bad ``--looksam-k`` raises ``ValueError``."""
    keys = () if args.variants is None else tuple(args.variants) or SAM_VARIANT_KEYS
    return keys, VariantSettings(looksam_k=args.looksam_k)
