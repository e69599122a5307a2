"""The two yardsticks normsam's step time is read against.

The *peer*, ``pytorch_optimizer.SAM`` (SAM-all through its own two-step API; an optional dependency,
``pip install 'normsam[bench]'``), says whether normsam's SAM-all costs what an established SAM costs. The
*floor*, the shortest SAM a user would write by hand, says what normsam's bookkeeping costs on top of the bare
algorithm. Neither uses normsam's optimizer code, so a slowdown there shows in the ratio instead of hiding in
both sides of it. A yardstick that cannot do what the context asks (fp16, another perturbation model, the peer
not installed) raises :class:`VariantUnavailable` with the reason, which the table shows instead of figures.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from normsam.bench.context import StepContext, StepFn, VariantUnavailable, loss
from normsam.optim.scopes import select

__all__ = ["peer_variant", "handwritten_variant"]


def peer_variant(model: nn.Module, ctx: StepContext) -> StepFn:
    """``pytorch_optimizer.SAM`` over every parameter, as its documentation uses it: ``backward`` and
    ``first_step``, second ``backward`` and ``second_step``; the same base SGD and ρ as normsam's SAM-all."""
    try:
        from pytorch_optimizer import SAM as PeerSAM
    except ImportError:
        raise VariantUnavailable(
            "not installed: pip install 'normsam[bench]' (or pytorch_optimizer) to add this yardstick"
        ) from None
    if ctx.amp == "fp16":
        raise VariantUnavailable("no GradScaler path in pytorch_optimizer.SAM: use amp=off or bf16")
    if ctx.perturbation not in ("sam", "asam"):
        raise VariantUnavailable(f"pytorch_optimizer.SAM has no perturbation={ctx.perturbation!r}")
    opt = PeerSAM(
        model.parameters(), torch.optim.SGD, rho=ctx.rho_all, adaptive=ctx.perturbation == "asam",
        **ctx.base_kwargs(),
    )

    def step(x, y):
        loss(model, x, y, ctx).backward()
        opt.first_step(zero_grad=True)
        loss(model, x, y, ctx).backward()
        opt.second_step(zero_grad=True)

    return step


def handwritten_variant(scope: str) -> Callable[[nn.Module, StepContext], StepFn]:
    """The floor: the shortest correct ℓ2 SAM a user would write by hand, with none of normsam's bookkeeping
    (no running-statistics policy, no finiteness check, no masks): ``autograd.grad`` over the scope,
    ε = ρ g/‖g‖, add, second forward-backward, restore from a copy, base step. It uses ``torch._foreach_*``
    and a copy buffer allocated once, so it is the fastest loop of this per-tensor shape: a floor, not a straw
    man. (normsam's SAM-ON goes one step further: flat ε and backup buffers, see ``SAM._get_plan``.)"""

    def build(model: nn.Module, ctx: StepContext) -> StepFn:
        if ctx.amp == "fp16":
            raise VariantUnavailable("no GradScaler path in the hand-written yardstick: use amp=off or bf16")
        if ctx.perturbation != "sam":
            raise VariantUnavailable(f"the hand-written yardstick is ℓ2 SAM only, not {ctx.perturbation!r}")
        params = [i.param for i in select(model, scope)[0]]
        saved = [p.detach().clone() for p in params]
        rho = ctx.rho(scope)
        opt = ctx.sgd(model.parameters())

        def step(x, y):
            grads = torch.autograd.grad(loss(model, x, y, ctx), params)
            with torch.no_grad():
                # ‖g‖ written out as a user would, in the gradients' own dtype, deliberately not
                # normsam.optim._foreach.global_norm: that one groups by (device, dtype) and sums in float64
                # (work the bare algorithm does not need), and a floor sharing normsam's code could not show
                # a slowdown in it
                norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
                eps = torch._foreach_mul(grads, rho / (norm + 1e-12))
                torch._foreach_copy_(saved, params)
                torch._foreach_add_(params, eps)
            loss(model, x, y, ctx).backward()
            with torch.no_grad():
                torch._foreach_copy_(params, saved)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    return build
