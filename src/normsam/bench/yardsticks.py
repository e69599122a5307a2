"""The two yardsticks normsam's step time is read against.

The *peer*, ``pytorch_optimizer.SAM`` (SAM-all through its own two-step API; an optional dependency,
``pip install 'normsam[bench]'``), says whether normsam's SAM-all costs what an established SAM costs; for each of
SAM's variants, pytorch_optimizer's class of the same name (:func:`peer_variant_of`) says the same of normsam's
variant at scope="all". The peers run at pytorch_optimizer's defaults but the hyperparameters normsam's rows share
(``foreach=None``: its ``torch._foreach`` path on CUDA, its per-tensor loop on a CPU, as a user gets them). The
*floor*, the shortest SAM a user would write by hand, says what normsam's bookkeeping costs on top of the bare
algorithm. Neither uses normsam's optimizer code, so a slowdown there shows in the ratio instead of hiding in
both sides of it. A yardstick that cannot do what the context asks (fp16, another perturbation model, the peer
not installed) raises :class:`VariantUnavailable` with the reason, which the table shows instead of figures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from normsam.bench.context import StepContext, StepFn, VariantUnavailable, loss
from normsam.bench.settings import VariantSettings
from normsam.optim.scopes import select

__all__ = ["peer_variant", "peer_variant_of", "handwritten_variant"]


def _peer_module(what: str = "this yardstick") -> Any:
    try:
        import pytorch_optimizer
    except ImportError:
        raise VariantUnavailable(
            f"not installed: pip install 'normsam[bench]' (or pytorch_optimizer) to add {what}"
        ) from None
    return pytorch_optimizer


def _check_peer_context(ctx: StepContext, cls: str) -> None:
    if ctx.amp == "fp16":
        raise VariantUnavailable(f"no GradScaler path in pytorch_optimizer.{cls}: use amp=off or bf16")
    if ctx.perturbation not in ("sam", "asam"):
        raise VariantUnavailable(f"pytorch_optimizer.{cls} has no perturbation={ctx.perturbation!r}")


def peer_variant(model: nn.Module, ctx: StepContext) -> StepFn:
    """``pytorch_optimizer.SAM`` over every parameter, as its documentation uses it: ``backward`` and
    ``first_step``, second ``backward`` and ``second_step``; the same base SGD and ρ as normsam's SAM-all."""
    po = _peer_module()
    _check_peer_context(ctx, "SAM")
    opt = po.SAM(
        model.parameters(), torch.optim.SGD, rho=ctx.rho_all, adaptive=ctx.perturbation == "asam",
        **ctx.base_kwargs(),
    )

    def step(x, y):
        loss(model, x, y, ctx).backward()
        opt.first_step(zero_grad=True)
        loss(model, x, y, ctx).backward()
        opt.second_step(zero_grad=True)

    return step


class _ConstantRho:
    """What pytorch_optimizer.GSAM reads its ρ from (a ``ProportionScheduler`` in training): a constant ρ, as
    normsam's rows use."""

    def __init__(self, rho: float):
        self.rho = rho

    def step(self) -> float:
        return self.rho


def peer_variant_of(key: str, settings: VariantSettings) -> Callable[[nn.Module, StepContext], StepFn]:
    """pytorch_optimizer's class of the variant ``key`` (``"gsam"``, ``"wsam"``, ``"looksam"``,
    ``"friendly-sam"``; ``"gcsam"`` is its ``SAM(use_gc=True)``) over every parameter with ``settings``' and
    the context's hyperparameters (ρ of SAM-all, the base SGD; ``adaptive`` for perturbation="asam"), driven
    through its documented protocol:

    - GSAM: a base optimizer instance, the model and a ρ scheduler; ``step(closure)`` with the closure
      ``set_closure`` would build (zero the gradients, forward under the context's autocast, backward), which
      runs both passes;
    - WSAM: ``step(closure)``, which runs both passes;
    - SAM (use_gc), FriendlySAM: the gradient at w computed first, then ``step(closure)`` for the pass at w + ε;
    - LookSAM: likewise on its full steps; on the k − 1 steps between, ``first_step`` discards a gradient
      computed before ``step`` (it zeroes them and its closure's pass at w is the one it uses), so that pass is
      left out: the same steps as the documented loop, one pass fewer: the fastest correct use of the class.
    """
    cls = {"gsam": "GSAM", "wsam": "WSAM", "looksam": "LookSAM", "friendly-sam": "FriendlySAM", "gcsam": "SAM"}[key]

    def build(model: nn.Module, ctx: StepContext) -> StepFn:
        po = _peer_module(f"pytorch_optimizer.{cls}")
        _check_peer_context(ctx, cls)
        adaptive, base, rho = ctx.perturbation == "asam", ctx.base_kwargs(), ctx.rho_all
        params = list(model.parameters())

        def forward_backward(x, y):
            batch_loss = loss(model, x, y, ctx)
            batch_loss.backward()
            return batch_loss

        if key == "gsam":
            sgd = torch.optim.SGD(params, **base)
            opt = po.GSAM(params, sgd, model, _ConstantRho(rho), alpha=settings.gsam_alpha, adaptive=adaptive)

            def gsam_closure(x, y):  # what set_closure(F.cross_entropy, x, y) builds, under the context's autocast
                sgd.zero_grad()
                with torch.enable_grad():
                    batch_loss = loss(model, x, y, ctx)
                batch_loss.backward()
                return None, batch_loss.detach()

            def step(x, y):
                opt.step(lambda: gsam_closure(x, y))
                sgd.zero_grad(set_to_none=True)

            return step

        if key == "wsam":
            opt = po.WSAM(model, params, torch.optim.SGD, rho=rho, gamma=settings.wsam_gamma,
                          decouple=settings.wsam_decouple, adaptive=adaptive, **base)

            def step(x, y):
                opt.step(lambda: forward_backward(x, y))
                opt.zero_grad(set_to_none=True)

            return step

        if key == "looksam":
            opt = po.LookSAM(params, torch.optim.SGD, rho=rho, k=settings.looksam_k, alpha=settings.looksam_alpha,
                             adaptive=adaptive, **base)
        elif key == "friendly-sam":
            opt = po.FriendlySAM(params, torch.optim.SGD, rho=rho, sigma=settings.friendly_sigma,
                                 lmbda=settings.friendly_lmbda, adaptive=adaptive, **base)
        else:
            opt = po.SAM(params, torch.optim.SGD, rho=rho, use_gc=True, adaptive=adaptive, **base)

        def step(x, y):
            if key != "looksam" or opt.get_step() % opt.k == 0:  # LookSAM: a pass at w only on its full steps
                forward_backward(x, y)
            opt.step(lambda: forward_backward(x, y))
            opt.zero_grad(set_to_none=True)

        return step

    return build


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
