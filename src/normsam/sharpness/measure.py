"""Sharpness of a trained model: adaptive worst-case and average-case m-sharpness.

Worst-case sharpness of one batch ``B`` of ``m`` examples is

    max_{δ ∈ C}  L_B(w + δ) − L_B(w),

where ``C`` is a box (``norm="linf"``) or a ball (``norm="l2"``) around the weights of the chosen scope. With
``adaptive=True`` the set is scaled elementwise by ``|w|`` (``|δ_i| ≤ ρ|w_i|``, or ``‖δ/|w|‖₂ ≤ ρ``), which
makes the measure invariant to the rescalings that leave a ReLU/normalized network's function unchanged. The
maximum is approximated by an APGD-style ascent (sign/normalized-gradient steps in the geometry of ``C``,
momentum 0.75, a step size that starts at ``2ρ`` and is halved at checkpoints when progress stalls, restarts
from the best point seen). Average-case sharpness replaces the maximum with the mean over Gaussian
perturbations ``δ ~ N(0, ρ² diag(w²))`` (or ``N(0, ρ² I)``).

The reported value is the mean over the batches the caller passes (``m`` is the caller's batch size). The
model is evaluated in eval mode; its weights, buffers, train/eval flags and ``requires_grad`` flags are
restored afterwards, also when an exception interrupts the measurement.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from normsam.optim.scopes import ScopeSpec, select

__all__ = [
    "CONVENTIONS",
    "KINDS",
    "NORMS",
    "SharpnessResult",
    "apgd_checkpoints",
    "apgd_halves_step",
    "measure_sharpness",
]

KINDS = ("worst", "average")
NORMS = ("linf", "l2")

#: How the worst-case ascent is run. ``"apgd"`` follows the APGD description (Croce & Hein 2020, SPEC §3):
#: the first iterate is the full step ``z₁``, later ones ``δ + α(z − δ) + (1 − α)(δ − δ_prev)``; checkpoint j
#: is after update ``⌈p_j·steps⌉`` (exact arithmetic); progress counts the updates that increased the loss;
#: a restart continues from the best δ without momentum. ``"reference"`` follows the reference code of the
#: sharpness paper: every iterate is ``α z + (1 − α) δ_prev`` (so the first one is ``0.75 z₁`` from δ = 0),
#: the check runs after update ``⌈p_j·steps⌉ + 1`` (float arithmetic; the first span is one update short),
#: progress counts the updates that raised the best loss, the best loss starts at the clean loss, and a
#: restart only takes its next gradient at the best point while δ and momentum carry on.
CONVENTIONS = ("apgd", "reference")

_MOMENTUM = 0.75  # weight of the new step in APGD's momentum update
_PROGRESS_SHARE = 0.75  # a checkpoint halves the step when fewer updates than this share made progress


def apgd_checkpoints(steps: int, *, convention: str = "apgd") -> list[int]:
    """The updates after which the APGD step-size rule is checked, for a run of ``steps`` updates.

    The fractions of the run are ``p₀ = 0``, ``p₁ = 0.22`` and ``p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03,
    0.06)``. With ``convention="apgd"`` checkpoint ``j`` is after update ``⌈p_j · steps⌉``; returned are the
    distinct checkpoints strictly between 0 and ``steps`` (one at the very end could not change anything), in
    increasing order, computed in exact rational arithmetic so that e.g. ``0.70 · 20`` is 14 and not 15.

    With ``convention="reference"`` the list is the reference code's: float arithmetic (``0.70 · 20`` gives
    15), the list stops at the first repeated or final value, and its 0-based loop index ``⌈p_j · steps⌉``
    means the check runs after update ``⌈p_j · steps⌉ + 1``, up to and including the last update.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}.")
    if convention not in CONVENTIONS:
        raise ValueError(
            f"Unknown convention {convention!r}; valid conventions are {', '.join(map(repr, CONVENTIONS))}."
        )
    if convention == "reference":
        return _reference_checkpoints(steps)
    prev, cur = Fraction(0), Fraction(22, 100)
    points: list[int] = []
    while cur <= 1:
        it = math.ceil(cur * steps)
        if 0 < it < steps and (not points or it > points[-1]):
            points.append(it)
        prev, cur = cur, cur + max(cur - prev - Fraction(3, 100), Fraction(6, 100))
    return points


def _reference_checkpoints(steps: int) -> list[int]:
    fractions, indices = [0.0, 0.22], [0, math.ceil(0.22 * steps)]
    while indices[-1] < steps and indices[-1] != indices[-2]:
        fractions.append(fractions[-1] + max(fractions[-1] - fractions[-2] - 0.03, 0.06))
        indices.append(math.ceil(fractions[-1] * steps))
    # A 0-based loop index i is checked after update i + 1; indices >= steps are never reached.
    return sorted({i + 1 for i in indices[1:] if i < steps})


def apgd_halves_step(
    *, progress: int, span: int, reduced_last: bool, best_loss: float, best_at_last_check: float
) -> bool:
    """The APGD rule at a checkpoint: True when the step size is halved (and the ascent restarts).

    Halve when fewer than 75% of the ``span`` updates since the last checkpoint made ``progress``, or when the
    step size was not halved at the last checkpoint (``reduced_last`` False; at the first checkpoint it is
    False, the step size being unchanged since the start) and the best loss has not risen above its value
    there (``best_at_last_check``, the loss at the start for the first checkpoint).
    """
    stalled = progress < _PROGRESS_SHARE * span
    no_gain = not reduced_last and best_loss <= best_at_last_check
    return stalled or no_gain


@dataclass
class SharpnessResult:
    """What :func:`measure_sharpness` measured; every loss is a mean over batches (each batch counts once).

    ``worst_loss`` is the loss at the perturbation found (``kind="worst"``) or the mean loss over the sampled
    perturbations (``kind="average"``). ``max_rel_perturbation`` is the largest share of the budget used by
    any evaluated perturbation: ``max |δ_i| / (ρ|w_i|)`` (adaptive ℓ∞), ``max |δ_i| / ρ`` (ℓ∞),
    ``‖δ/|w|‖₂ / ρ`` (adaptive ℓ2) or ``‖δ‖₂ / ρ`` (ℓ2); at most 1 (up to float error) for ``kind="worst"``,
    unbounded for the Gaussian perturbations of ``kind="average"``. ``error_sharpness`` is NaN when the error
    rate cannot be computed (see :func:`measure_sharpness`). ``perturbations`` holds the best δ of each batch
    (name → CPU tensor) when ``return_perturbations=True``; it is not part of :meth:`to_dict`.
    """

    sharpness: float
    error_sharpness: float
    max_rel_perturbation: float
    clean_loss: float
    worst_loss: float
    per_batch: list[dict[str, Any]]
    rho: float
    kind: str
    norm: str
    adaptive: bool
    steps: int
    scope: Any
    logit_normalize: bool
    convention: str = "apgd"
    perturbations: list[dict[str, torch.Tensor]] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """A dict of the numbers and settings that is valid JSON: NaN (no error rate) becomes ``None``."""
        return {
            "sharpness": _json_float(self.sharpness),
            "error_sharpness": _json_float(self.error_sharpness),
            "max_rel_perturbation": _json_float(self.max_rel_perturbation),
            "clean_loss": _json_float(self.clean_loss),
            "worst_loss": _json_float(self.worst_loss),
            "per_batch": [{k: _json_float(v) for k, v in row.items()} for row in self.per_batch],
            "rho": self.rho,
            "kind": self.kind,
            "norm": self.norm,
            "adaptive": self.adaptive,
            "steps": self.steps,
            "scope": self.scope,
            "logit_normalize": self.logit_normalize,
            "convention": self.convention,
        }


def _json_float(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


# --------------------------------------------------------------------------------------------------------
# validation


def _check_settings(
    rho: Any, kind: Any, norm: Any, steps: Any, step_size_multiplier: Any, convention: Any
) -> float:
    if convention not in CONVENTIONS:
        raise ValueError(
            f"Unknown convention {convention!r}; valid conventions are {', '.join(map(repr, CONVENTIONS))} "
            "(convention='reference' reproduces the sharpness paper's code, e.g. for 1-step measurements)."
        )
    if kind not in KINDS:
        raise ValueError(f"Unknown kind {kind!r}; valid kinds are {', '.join(map(repr, KINDS))}.")
    if norm not in NORMS:
        raise ValueError(f"Unknown norm {norm!r}; valid norms are {', '.join(map(repr, NORMS))}.")
    try:
        rho_f = float(rho)
    except (TypeError, ValueError):
        raise ValueError(f"rho must be a finite number >= 0 (e.g. rho=0.002), got {rho!r}.") from None
    if isinstance(rho, bool) or not math.isfinite(rho_f) or rho_f < 0:
        raise ValueError(f"rho must be a finite number >= 0 (e.g. rho=0.002), got {rho!r}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1 (e.g. steps=20), got {steps!r}.")
    try:
        mult = float(step_size_multiplier)
    except (TypeError, ValueError):
        mult = float("nan")
    if not math.isfinite(mult) or mult <= 0:
        raise ValueError(
            f"step_size_multiplier must be a finite number > 0 (default 1.0), got {step_size_multiplier!r}."
        )
    return rho_f


def _scope_label(scope: Any) -> Any:
    if isinstance(scope, str):
        return scope
    if callable(scope):
        return getattr(scope, "__name__", repr(scope))
    return [str(p) for p in scope]


def _split_batch(item: Any, index: int) -> tuple[Any, Any]:
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], item[1]
    raise ValueError(
        f"Batch {index} is a {type(item).__name__}, not an (inputs, labels) pair: pass an iterable of "
        "(inputs, labels) tuples, e.g. a DataLoader or [(x, y)]."
    )


def _to_device(obj: Any, device: torch.device | None) -> Any:
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------------------------------------
# the model's state


class _ModelState:
    """Saved copies of everything the measurement may change; :meth:`restore` writes them back."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.params = [(p, p.detach().clone()) for p in model.parameters()]
        self.requires_grad = [(p, p.requires_grad) for p, _ in self.params]
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self.training = [(m, m.training) for m in model.modules()]

    def restore(self) -> None:
        with torch.no_grad():
            for p, copy in self.params:
                p.copy_(copy)
            for b, copy in self.buffers:
                b.copy_(copy)
        for p, flag in self.requires_grad:
            p.requires_grad_(flag)
        for m, flag in self.training:
            m.training = flag


# --------------------------------------------------------------------------------------------------------
# the evaluator: loss and error rate at w + δ


@dataclass
class _Eval:
    loss: float
    error: float
    grads: list[torch.Tensor] | None


class _Objective:
    def __init__(
        self,
        model: nn.Module,
        params: list[torch.Tensor],
        origin: list[torch.Tensor],
        loss_fn: Callable[[Any, Any], torch.Tensor],
        logit_normalize: bool,
    ):
        self.model = model
        self.params = params
        self.origin = origin
        self.loss_fn = loss_fn
        self.logit_normalize = logit_normalize

    @torch.no_grad()
    def _place(self, delta: list[torch.Tensor] | None) -> None:
        for p, w, d in zip(self.params, self.origin, delta or [None] * len(self.params)):
            p.copy_(w if d is None else w + d)

    def __call__(self, inputs: Any, labels: Any, delta: list[torch.Tensor] | None, *, grad: bool) -> _Eval:
        self._place(delta)
        with torch.set_grad_enabled(grad):
            outputs = self.model(inputs)
            if self.logit_normalize:
                outputs = _normalize_logits(outputs)
            loss = self.loss_fn(outputs, labels)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError(
                    "loss_fn must return a scalar tensor (reduce it, e.g. with .mean()), got "
                    f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}."
                )
            grads = None
            if grad:
                raw = torch.autograd.grad(loss.reshape(()), self.params, allow_unused=True)
                grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(self.params, raw)]
        return _Eval(float(loss.detach()), _error_rate(outputs, labels), grads)


def _normalize_logits(logits: torch.Tensor) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        raise ValueError("logit_normalize=True needs a model that returns a logits tensor.")
    centred = logits - logits.mean(dim=-1, keepdim=True)
    norm = centred.norm(dim=-1, keepdim=True)
    return centred / norm.clamp_min(torch.finfo(centred.dtype).tiny)


def _error_rate(outputs: Any, labels: Any) -> float:
    """0-1 loss of ``outputs`` (N, C) against integer class ids ``labels`` (N,); NaN otherwise."""
    if not (isinstance(outputs, torch.Tensor) and isinstance(labels, torch.Tensor)):
        return float("nan")
    if outputs.ndim != 2 or labels.ndim != 1 or labels.shape[0] != outputs.shape[0] or outputs.shape[0] == 0:
        return float("nan")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        return float("nan")
    with torch.no_grad():
        return float((outputs.detach().argmax(dim=1) != labels).double().mean())


# --------------------------------------------------------------------------------------------------------
# the geometry of the perturbation set


class _Geometry:
    """Projection, ascent direction, random start and budget share for the box/ball ``C`` of size ρ.

    ``scale`` is ``|w|`` (adaptive) or 1 per element; ``C`` is ``|δ_i| ≤ ρ s_i`` (ℓ∞) or ``‖δ/s‖₂ ≤ ρ`` (ℓ2),
    with δ_i = 0 wherever s_i = 0.
    """

    def __init__(self, origin: list[torch.Tensor], rho: float, norm: str, adaptive: bool):
        self.rho = rho
        self.norm = norm
        self.adaptive = adaptive
        self.scale = [w.abs() for w in origin] if adaptive else [torch.ones_like(w) for w in origin]
        self.bound = [self.rho * s for s in self.scale]

    def _rel(self, delta: list[torch.Tensor]) -> list[torch.Tensor]:
        if not self.adaptive:
            return delta
        return [torch.where(s > 0, d / torch.where(s > 0, s, 1), 0) for d, s in zip(delta, self.scale)]

    @staticmethod
    def _total_norm(tensors: list[torch.Tensor]) -> float:
        if not tensors:
            return 0.0
        dev = tensors[0].device
        return math.sqrt(float(torch.stack([t.double().pow(2).sum().to(dev) for t in tensors]).sum()))

    def project(self, delta: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.norm == "linf":
            return [torch.minimum(torch.maximum(d, -b), b) for d, b in zip(delta, self.bound)]
        if self.adaptive:
            delta = [torch.where(s > 0, d, 0) for d, s in zip(delta, self.scale)]
        size = self._total_norm(self._rel(delta))
        if size > self.rho:
            factor = self.rho / size
            delta = [d * factor for d in delta]
        return delta

    def step(self, grads: list[torch.Tensor], eta: float) -> list[torch.Tensor]:
        """An ascent step of length η in the geometry of ``C`` (δ-space)."""
        if self.norm == "linf":
            return [eta * s * g.sign() for s, g in zip(self.scale, grads)]
        scaled = [s * g for s, g in zip(self.scale, grads)]  # gradient w.r.t. u = δ / s
        size = self._total_norm(scaled)
        if size == 0:
            return [torch.zeros_like(g) for g in grads]
        return [(eta / size) * s * v for s, v in zip(self.scale, scaled)]

    def random_start(self, generator: torch.Generator) -> list[torch.Tensor]:
        if self.norm == "linf":
            return [(2 * _rand(b, generator) - 1) * b for b in self.bound]
        direction = [_randn(s, generator) for s in self.scale]
        if self.adaptive:
            direction = [torch.where(s > 0, d, 0) for d, s in zip(direction, self.scale)]
        size = self._total_norm(direction)
        if size == 0:
            return [torch.zeros_like(s) for s in self.scale]
        dim = sum(int((s > 0).sum()) for s in self.scale)
        radius = self.rho * float(torch.rand((), generator=generator, dtype=torch.float64)) ** (1 / max(dim, 1))
        return [(radius / size) * s * d for s, d in zip(self.scale, direction)]

    def budget_share(self, delta: list[torch.Tensor]) -> float:
        """Share of the budget ρ that δ uses (≤ 1 inside ``C``)."""
        if self.rho == 0:
            return 0.0
        rel = self._rel(delta)
        if self.norm == "linf":
            peaks = [r.abs().max().double().to(rel[0].device) for r in rel if r.numel()]
            return float(torch.stack(peaks).max()) / self.rho if peaks else 0.0
        return self._total_norm(rel) / self.rho


def _rand(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(like.shape, generator=generator, dtype=torch.float64).to(like)


def _randn(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(like.shape, generator=generator, dtype=torch.float64).to(like)


# --------------------------------------------------------------------------------------------------------
# the two estimators, per batch


def _worst_case(
    objective: _Objective,
    geometry: _Geometry,
    inputs: Any,
    labels: Any,
    *,
    steps: int,
    eta0: float,
    rand_init: bool,
    generator: torch.Generator,
    checkpoints: Sequence[int],
    convention: str = "apgd",
) -> dict[str, Any]:
    """APGD ascent on one batch; returns losses, errors, the best δ and bookkeeping."""
    reference = convention == "reference"
    clean = objective(inputs, labels, None, grad=False)
    if rand_init:
        delta = geometry.project(geometry.random_start(generator))
    else:
        delta = [torch.zeros_like(w) for w in objective.origin]
    cur = objective(inputs, labels, delta, grad=True)
    max_share = geometry.budget_share(delta)

    # best_grads is where a restart takes its next gradient; best_delta is what is reported.
    best_delta, best_grads, best_loss, best_error = delta, cur.grads, cur.loss, cur.error
    if reference:
        # The reference code's best loss starts at the clean loss (at w itself), also after a random start.
        best_delta = [torch.zeros_like(w) for w in objective.origin]
        best_loss, best_error = clean.loss, clean.error
    grads, loss = cur.grads, cur.loss
    prev_delta = delta
    eta = eta0
    checks = set(checkpoints)
    # The reference code measures the first span from its 0-based index 0, i.e. from after update 1.
    last_check = 1 if reference else 0
    progress, reduced_last, best_at_check = 0, False, best_loss
    restarts = 0

    for it in range(1, steps + 1):
        z = geometry.project([d + s for d, s in zip(delta, geometry.step(grads, eta))])
        if reference:
            new = geometry.project([_MOMENTUM * zz + (1 - _MOMENTUM) * dp for zz, dp in zip(z, prev_delta)])
        elif it == 1:
            new = z
        else:
            new = geometry.project(
                [
                    d + _MOMENTUM * (zz - d) + (1 - _MOMENTUM) * (d - dp)
                    for d, zz, dp in zip(delta, z, prev_delta)
                ]
            )
        need_grad = it < steps
        ev = objective(inputs, labels, new, grad=need_grad)
        max_share = max(max_share, geometry.budget_share(new))
        improved = ev.loss > best_loss
        if improved if reference else ev.loss > loss:
            progress += 1
        prev_delta, delta, loss, grads = delta, new, ev.loss, ev.grads
        if improved:
            best_delta, best_grads, best_loss, best_error = new, ev.grads, ev.loss, ev.error

        if it in checks:
            halve = apgd_halves_step(
                progress=progress,
                span=it - last_check,
                reduced_last=reduced_last,
                best_loss=best_loss,
                best_at_last_check=best_at_check,
            )
            reduced_last, best_at_check, last_check, progress = halve, best_loss, it, 0
            if halve:
                eta /= 2
                restarts += 1
                if reference:
                    grads = best_grads  # δ and momentum carry on; only the next gradient is the best point's
                else:
                    # Restart from the best point, without momentum carried over from the abandoned path.
                    delta, prev_delta, loss, grads = best_delta, best_delta, best_loss, best_grads

    return {
        "clean_loss": clean.loss,
        "clean_error": clean.error,
        "perturbed_loss": best_loss,
        "perturbed_error": best_error,
        "max_rel_perturbation": max_share,
        "final_step_size": eta,
        "restarts": restarts,
        "delta": best_delta,
    }


def _average_case(
    objective: _Objective,
    geometry: _Geometry,
    inputs: Any,
    labels: Any,
    *,
    steps: int,
    generator: torch.Generator,
) -> dict[str, Any]:
    """Mean loss and error over ``steps`` Gaussian perturbations δ ~ N(0, ρ² diag(s²))."""
    clean = objective(inputs, labels, None, grad=False)
    losses, errors, max_share = [], [], 0.0
    for _ in range(steps):
        delta = [geometry.rho * s * _randn(s, generator) for s in geometry.scale]
        ev = objective(inputs, labels, delta, grad=False)
        losses.append(ev.loss)
        errors.append(ev.error)
        max_share = max(max_share, geometry.budget_share(delta))
    return {
        "clean_loss": clean.loss,
        "clean_error": clean.error,
        "perturbed_loss": sum(losses) / len(losses),
        "perturbed_error": sum(errors) / len(errors),
        "max_rel_perturbation": max_share,
    }


# --------------------------------------------------------------------------------------------------------
# the public entry point


def measure_sharpness(
    model: nn.Module,
    batches: Iterable[tuple[Any, Any]],
    *,
    rho: float,
    kind: str = "worst",
    norm: str = "linf",
    adaptive: bool = True,
    steps: int = 20,
    scope: ScopeSpec = "all",
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    logit_normalize: bool = False,
    rand_init: bool = False,
    seed: int = 0,
    step_size_multiplier: float = 1.0,
    convention: str = "apgd",
    device: torch.device | str | None = None,
    progress: bool = False,
    return_perturbations: bool = False,
) -> SharpnessResult:
    """Adaptive worst-case (APGD) or average-case m-sharpness of ``model``, averaged over ``batches``.

    Args:
        model: evaluated in eval mode at ``w + δ``; restored exactly afterwards (weights from saved copies,
            buffers, train/eval flag of every submodule, ``requires_grad``), also after an exception. No
            ``.grad`` is written.
        batches: iterable of ``(inputs, labels)``; each batch is one m-sharpness batch (m = its size), and
            every batch counts once in the means.
        rho: radius, finite and ≥ 0; ``rho=0`` returns sharpness 0 after clean forward passes only.
        kind: ``"worst"`` (APGD ascent of ``steps`` updates) or ``"average"`` (``steps`` Gaussian samples).
        norm: ``"linf"`` (box) or ``"l2"`` (ball) for ``kind="worst"``; recorded but unused for
            ``kind="average"``.
        adaptive: scale the set (or the Gaussian's standard deviation) elementwise by ``|w|``.
        scope: which parameters are perturbed (see :func:`normsam.optim.scopes.select`); default all.
        loss_fn: ``loss_fn(outputs, labels) -> scalar``; default mean cross-entropy. The error rate (and so
            ``error_sharpness``) is computed only when outputs are 2-D (N, classes) and labels are 1-D
            integer class ids; otherwise it is NaN.
        logit_normalize: centre the outputs over the last dimension and divide by their ℓ2 norm before
            ``loss_fn``.
        rand_init: start the ascent at a uniformly random point of the set instead of δ = 0.
        seed: seeds the random start and the Gaussian samples (a CPU generator, so results do not depend
            on the device).
        step_size_multiplier: the initial step size is ``2ρ · step_size_multiplier``.
        convention: ``"apgd"`` (the APGD algorithm as described) or ``"reference"`` (the reference code of
            the sharpness paper, whose first iterate is 0.75× the first step: use it to compare with the
            paper's 1-step numbers); see :data:`CONVENTIONS`. At 20 steps the two agree closely. Recorded
            but unused for ``kind="average"``.
        device: where inputs and labels are moved; default the device of the model's first parameter. The
            model itself is never moved.
        progress: show a tqdm progress bar over batches.
        return_perturbations: keep the best δ of every batch (``kind="worst"`` only) in
            ``result.perturbations``.

    Example:
        ```python
        import torch
        import normsam

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
        before = [p.clone() for p in model.parameters()]
        result = normsam.measure_sharpness(model, [(x[:32], y[:32]), (x[32:], y[32:])], rho=0.01, steps=10)
        assert result.sharpness >= 0 and result.max_rel_perturbation <= 1 + 1e-6   # m = 32, two batches
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the model is left as it was
        ```
    """
    rho_f = _check_settings(rho, kind, norm, steps, step_size_multiplier, convention)
    if return_perturbations and kind != "worst":
        raise ValueError("return_perturbations=True needs kind='worst' (average-case δ are random samples).")
    if (
        isinstance(batches, (tuple, list))
        and len(batches) == 2
        and all(isinstance(b, torch.Tensor) for b in batches)
    ):
        raise ValueError(
            "batches looks like a single (inputs, labels) pair; wrap it in a list: batches=[(inputs, labels)]."
        )
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    selected, _ = select(model, scope)
    names = [info.name for info in selected]
    params = [info.param for info in selected]
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else None
    device = torch.device(device) if device is not None else None

    checkpoints = apgd_checkpoints(steps, convention=convention)
    generator = torch.Generator().manual_seed(int(seed))
    iterator: Iterable[Any] = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc=f"{kind}-case sharpness", unit="batch")

    rows: list[dict[str, Any]] = []
    perturbations: list[dict[str, torch.Tensor]] | None = [] if return_perturbations else None
    state = _ModelState(model)
    try:
        model.eval()
        chosen = {id(p) for p in params}
        for p, _ in state.params:
            p.requires_grad_(id(p) in chosen)
        saved = {id(p): copy for p, copy in state.params}
        origin = [saved[id(p)] for p in params]  # read-only from here on
        objective = _Objective(model, params, origin, loss_fn, logit_normalize)
        geometry = _Geometry(origin, rho_f, norm, adaptive)

        for index, item in enumerate(iterator):
            inputs, labels = _split_batch(item, index)
            inputs, labels = _to_device(inputs, device), _to_device(labels, device)
            if rho_f == 0:
                clean = objective(inputs, labels, None, grad=False)
                out = {
                    "clean_loss": clean.loss,
                    "clean_error": clean.error,
                    "perturbed_loss": clean.loss,
                    "perturbed_error": clean.error,
                    "max_rel_perturbation": 0.0,
                    "delta": [torch.zeros_like(w) for w in origin],
                }
            elif kind == "worst":
                out = _worst_case(
                    objective,
                    geometry,
                    inputs,
                    labels,
                    steps=steps,
                    eta0=2 * rho_f * float(step_size_multiplier),
                    rand_init=rand_init,
                    generator=generator,
                    checkpoints=checkpoints,
                    convention=convention,
                )
            else:
                out = _average_case(objective, geometry, inputs, labels, steps=steps, generator=generator)
            delta = out.pop("delta", None)
            if perturbations is not None and delta is not None:
                perturbations.append({n: d.detach().cpu().clone() for n, d in zip(names, delta)})
            size = int(labels.shape[0]) if isinstance(labels, torch.Tensor) and labels.ndim > 0 else None
            sharp = 0.0 if rho_f == 0 else out["perturbed_loss"] - out["clean_loss"]
            err_sharp = out["perturbed_error"] - out["clean_error"]
            if rho_f == 0 and not math.isnan(err_sharp):
                err_sharp = 0.0
            rows.append(
                {
                    "batch": index,
                    "size": size,
                    "sharpness": sharp,
                    "error_sharpness": err_sharp,
                    **out,
                }
            )
    finally:
        state.restore()

    if not rows:
        raise ValueError(
            "batches is empty: pass a non-empty iterable of (inputs, labels), e.g. [(x, y)] or a DataLoader "
            "(a generator can be iterated only once)."
        )

    def mean(key: str) -> float:
        return sum(row[key] for row in rows) / len(rows)

    return SharpnessResult(
        sharpness=mean("sharpness"),
        error_sharpness=mean("error_sharpness"),
        max_rel_perturbation=max(row["max_rel_perturbation"] for row in rows),
        clean_loss=mean("clean_loss"),
        worst_loss=mean("perturbed_loss"),
        per_batch=rows,
        rho=rho_f,
        kind=kind,
        norm=norm,
        adaptive=bool(adaptive),
        steps=steps,
        scope=_scope_label(scope),
        logit_normalize=bool(logit_normalize),
        convention=convention,
        perturbations=perturbations,
    )
