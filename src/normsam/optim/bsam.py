r"""``normsam.BSAM``: Bayesian SAM (Möllenhoff & Khan, "SAM as an Optimal Relaxation of Bayes", ICLR 2023).

bSAM is its own Adam-like optimizer, not a wrapper: it learns the mean ``w`` of a Gaussian posterior and a
per-element precision ``s`` (variance ``σ² = 1/(N·s)``, N the number of training examples). One step, as the
authors' code (``team-approx-bayes/bayesian-sam``, ``build_bsam_optimizer``) computes it:

.. math::

    \theta &= w + \sigma \odot \xi,\ \ \xi \sim \mathcal N(0, I)     && \text{a sample of the posterior}\\
    g &= \nabla L(\theta)                                           && \text{pass 1}\\
    g_p &= \nabla L(w + \rho\, g / s)                               && \text{pass 2: SAM's ascent, preconditioned}\\
    m &\leftarrow \beta_1 m + (1 - \beta_1)(g_p + \delta w)\\
    w &\leftarrow w - \alpha\, m / s\\
    s &\leftarrow \beta_2 s + (1 - \beta_2)(\sqrt{s}\,|g| + \gamma + \delta)

(δ: the weight decay, the prior's precision over N; γ: the damping; s starts at ``s_init``.) Both the sample and
the ascent start from ``w``, which is restored exactly after each pass; the update uses ``s`` before its own
update, as the authors' code does.

Where pytorch_optimizer's ``BSAM`` differs from the paper's code (kept in a test, tests/test_variants.py): it
leaves the noise and ε in the weights (the update is taken at ``w + noise + ε``), squares the precision's
update term, and scales the momentum's gradient by the weight decay.

With normsam's ``scope``, the noise and the ascent act on the scope's tensors only (BSAM-ON: the norm layers),
while every tensor gets the Adam-like update and its precision from its gradient at the sample. Mixed precision:
bf16 autocast inside the closure works as for any optimizer; fp16's ``GradScaler`` does not (the closure's two
backward passes would carry its scale into g and g_p): use bf16. DDP averages both passes' gradients as usual
(every rank draws the same noise from the same seed); FSDP2 is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from normsam.optim.groups import ScopeSplit
from normsam.optim.options import check_rho
from normsam.optim.scopes import ScopeSpec
from normsam.optim.sharded import sharding_for

__all__ = ["BSAM"]


class BSAM(torch.optim.Optimizer):
    """Bayesian SAM (see the module docstring). ``step(closure)`` calls the closure twice (it must zero nothing,
    compute the loss, call ``backward()`` and return the loss) and returns the first loss, at the sample.

    Args:
        params: a model (``scope`` picks where the noise and the ascent act: the norm layers by default), tensors
            or param groups.
        num_data: N, the number of training examples (the posterior's variance is 1/(N·s)).
        lr: α, the step size.
        betas: (β1, β2) of the momentum and the precision.
        weight_decay: δ, the prior's precision over N.
        rho: ρ of the ascent.
        damping: γ, added to the precision's update.
        s_init: the precision's initial value.
        scope: as :class:`normsam.SAM`'s: where the noise and the ascent act (the norm layers by default with a
            model).
        model: as :class:`normsam.SAM`'s, when ``params`` are tensors or groups.
        seed: of the noise (its generator is in ``state_dict``).
    """

    def __init__(self, params: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]], *, num_data: int,
                 lr: float = 0.5, betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 1e-4,
                 rho: float = 0.01, damping: float = 0.1, s_init: float = 1.0, scope: ScopeSpec | None = None,
                 model: nn.Module | None = None, seed: int = 0):
        if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 1:
            raise ValueError(f"Invalid num_data: {num_data!r}; it is N, the number of training examples (an int >= 1).")
        for name, value, low, high in (("lr", lr, 0, float("inf")), ("weight_decay", weight_decay, 0, float("inf")),
                                       ("damping", damping, 0, float("inf")), ("beta1", betas[0], 0, 1),
                                       ("beta2", betas[1], 0, 1)):
            if not (isinstance(value, (int, float)) and low <= value < high):
                raise ValueError(f"Invalid {name}: {value!r}; it must lie in [{low}, {high}).")
        if not (isinstance(s_init, (int, float)) and s_init > 0):
            raise ValueError(f"Invalid s_init: {s_init!r}; the initial precision must be > 0.")
        model = params if isinstance(params, nn.Module) else model
        groups = ScopeSplit(model, scope, None, None).initial_groups(params)
        if sharding_for(model, [p for g in groups for p in g["params"]]) is not None:
            raise ValueError("BSAM does not support FSDP2-sharded models yet (its noise and precision are per "
                             "element of whole tensors): use DDP, or normsam.SAM's variants, which support FSDP2.")
        for group in groups:
            group.setdefault("perturb", True)
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, rho=check_rho(rho), damping=damping)
        super().__init__(groups, defaults)
        self.num_data, self.s_init = num_data, float(s_init)
        self.generator = torch.Generator().manual_seed(seed)

    def _trainable(self) -> list[tuple[Tensor, dict[str, Any]]]:
        return [(p, g) for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _state(self, p: Tensor) -> dict[str, Tensor]:
        state = self.state[p]
        if not state:
            state["s"] = torch.full_like(p, self.s_init, memory_format=torch.preserve_format)
            state["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor]) -> Tensor:  # type: ignore[override]
        if closure is None:
            raise ValueError("BSAM.step() needs a closure that computes the loss, calls loss.backward() and returns "
                             "the loss (it is called twice: at the posterior sample and at the perturbed point).")
        closure = torch.enable_grad()(closure)
        items = self._trainable()
        perturbed = [(p, g) for p, g in items if g["perturb"]]
        saved = [p.detach().clone() for p, _ in perturbed]
        try:
            for p, _ in perturbed:  # θ = w + σ ⊙ ξ, σ = (N s)^(-1/2)
                noise = torch.randn(p.shape, generator=self.generator, dtype=p.dtype).to(p.device)
                p.add_(noise / (self.num_data * self._state(p)["s"]).sqrt())
            loss = closure()
            if loss is None:
                raise ValueError("BSAM.step(closure): the closure returned None; it must return the loss.")
            sample_grads = [None if p.grad is None else p.grad.detach().clone() for p, _ in items]
            for (p, group), w in zip(perturbed, saved):  # the ascent from w: w + ρ g / s
                p.copy_(w)
                if p.grad is not None:
                    p.add_(p.grad * group["rho"] / self._state(p)["s"])
            for p, _ in items:
                p.grad = None
            closure()
        finally:
            for (p, _), w in zip(perturbed, saved):
                p.copy_(w)
        self._update(items, sample_grads)
        return loss

    def _update(self, items: list[tuple[Tensor, dict[str, Any]]], sample_grads: list[Tensor | None]) -> None:
        """m ← β1 m + (1−β1)(g_p + δw); w ← w − α m/s; s ← β2 s + (1−β2)(√s|g| + γ + δ), per tensor."""
        for (p, group), g in zip(items, sample_grads):
            if p.grad is None or g is None:
                continue
            state = self._state(p)
            beta1, beta2 = group["betas"]
            decay = group["weight_decay"]
            state["momentum"].mul_(beta1).add_(p.grad + decay * p, alpha=1 - beta1)
            p.sub_(group["lr"] * state["momentum"] / state["s"])  # with s before its update, as the authors' code
            target = state["s"].sqrt() * g.abs() + group["damping"] + decay
            state["s"].mul_(beta2).add_(target, alpha=1 - beta2)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["bsam"] = {"generator": self.generator.get_state(), "num_data": self.num_data}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("bsam", None)
        super().load_state_dict(state_dict)
        if extra is not None:
            self.generator.set_state(extra["generator"])

    def __repr__(self) -> str:
        perturbed = sum(p.numel() for p, g in self._trainable() if g["perturb"])
        total = sum(p.numel() for p, _ in self._trainable())
        d = self.defaults
        return (f"BSAM(num_data={self.num_data}, lr={d['lr']:g}, rho={d['rho']:g}, betas={d['betas']}, "
                f"weight_decay={d['weight_decay']:g}, damping={d['damping']:g}, perturbed={perturbed:,}/{total:,})")
