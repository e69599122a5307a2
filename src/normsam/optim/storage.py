"""Where a SAM step keeps the tensors it perturbs: backup, add ε, restore, and the layout ε is computed in.

A :class:`PerturbedTensors` is built from the param groups (the tensors with ``perturb=True`` that require a
gradient, plus, for ``norm_over="all"``, the others whose gradients enter the norm only) and reused every step
until the groups, a ``requires_grad``, a device or a dtype change (:func:`layout_key`). Three layouts, chosen
once by :func:`perturbed_tensors`:

- :class:`PerturbedTensors`: one tensor per parameter; ε and the saved copy per tensor, moved with one
  ``torch._foreach_*`` kernel per (device, dtype), or with a plain loop (``foreach=False``, the reference);
- :class:`FlatPerturbedTensors`: SAM-ON's norm-layer γ and β, all vectors of one device and dtype, with an
  elementwise T: gradient, weights and ε as one flat vector each, so every step of the ε math is one kernel
  whatever the number of layers (a CPU runs a foreach kernel tensor by tensor);
- FSDP2's local shards (:class:`normsam.optim.sharded.ShardedPerturbedTensors`): what changes under FSDP2.

Only the perturbed tensors are copied: SAM-ON's extra memory is the size of the norm parameters.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from normsam.optim._foreach import add_, copy_, dot_terms, grouped, squared_norms
from normsam.optim.perturbations import NormFn, PerturbationModel, Scaled

__all__ = ["PerturbedTensors", "FlatPerturbedTensors", "Packed", "layout_key", "perturbed_tensors", "entries_of",
           "flat_layout_fits", "check_loss"]

_REQUIRES_GRAD = operator.attrgetter("requires_grad")

#: (parameter, its param group, its name or None)
Entry = tuple[Tensor, dict[str, Any], "str | None"]


def entries_of(param_groups: Sequence[dict[str, Any]], perturbed: bool) -> list[Entry]:
    """(param, group, name) of the trainable tensors with ``group["perturb"] == perturbed``."""
    out = []
    for group in param_groups:
        if bool(group["perturb"]) != perturbed:
            continue
        names = group.get("param_names") or [None] * len(group["params"])
        out += [(p, group, n) for p, n in zip(group["params"], names) if p.requires_grad]
    return out


def layout_key(param_groups: Sequence[dict[str, Any]]) -> tuple:
    """What a layout depends on in the groups: their identity, ``perturb`` and every ``requires_grad``.
    (map/attrgetter walk the tensors in C: this runs every step, over every parameter.)"""
    return tuple(
        (id(g), id(g["params"]), bool(g["perturb"]), tuple(map(_REQUIRES_GRAD, g["params"])))
        for g in param_groups
    )


@dataclass
class Packed:
    """The step's ascent gradient in a storage's own layout, for the vectorized ε math, and the way back."""

    grads: list[Tensor]
    weights: list[Tensor]
    scaled: list[Scaled]
    rhos: list[float]
    norm_of: NormFn
    unpack: Callable[[list[Tensor]], list[Tensor]]  # ε in this layout → ε per perturbed tensor


class PerturbedTensors:
    """The perturbed tensors, one per parameter, and their saved copy.

    ``params`` are the parameters (their identity keys masks and the stored ε); ``data`` what ε and the backup
    act on: the tensors themselves here, local shards under FSDP2. ``others`` are the trainable tensors outside
    the perturbed set whose gradients enter ε's norm (``norm_over="all"``)."""

    sharded = False

    def __init__(self, entries: Sequence[Entry], others: Sequence[Entry], *, scaled: list[bool],
                 others_scaled: list[bool], foreach: bool, perturbation_model: PerturbationModel, key: tuple = ()):
        self.key = key
        self.params = [p for p, _, _ in entries]
        self.groups_of = [g for _, g, _ in entries]  # for each tensor's ρ, read every step (schedulable)
        self.others = [p for p, _, _ in others]
        self._group_of = {p: g for p, g, _ in [*entries, *others]}  # each tensor's param group (lr, ρ)
        self.scaled, self.others_scaled = scaled, others_scaled
        self.any_scaled = any(scaled) or any(others_scaled)
        self.foreach = foreach
        self.data, self.others_data = self.local(self.params), self.local(self.others)
        self.groups = list(grouped(self.params).values())  # indices per (device, dtype), for the foreach kernels
        self.others_groups = list(grouped(self.others).values())
        self.perturbation_model = perturbation_model
        self.backup = self._make_backup()
        self._live_groups: list[list[int]] = []  # the groups that this step perturbed

    # --- what the tensors are ------------------------------------------------------------------------

    def local(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """What ε acts on for each tensor: the tensor itself (a local shard under FSDP2)."""
        return list(tensors)

    def is_current(self) -> bool:
        """False when the tensors moved (``model.to(...)``): the backup must be made again."""
        first, saved = self.params[0], self.backup[0]
        return first.device == saved.device and first.dtype == saved.dtype

    def _make_backup(self) -> list[Tensor]:
        return [torch.empty_like(d, memory_format=torch.preserve_format) for d in self.data]

    # --- the ascent gradient -------------------------------------------------------------------------

    def gradients(self, loss: Tensor | None) -> tuple[list[Tensor | None], list[Tensor | None]]:
        """The ascent gradients of ``params`` and ``others``: their ``.grad`` (``loss=None``), or, for the cheap
        ascent, ``torch.autograd.grad`` of ``loss`` with respect to them only (no ``.grad`` is written)."""
        if loss is None:
            return [p.grad for p in self.params], [p.grad for p in self.others]
        check_loss(loss)
        with torch.enable_grad():
            grads = torch.autograd.grad(loss, self.params + self.others, allow_unused=True)
        return list(grads[: len(self.params)]), list(grads[len(self.params) :])

    def ascent_inputs(self) -> list[Tensor]:
        """What ``loss.backward(inputs=...)`` needs for the ascent gradient: the perturbed tensors, and the others
        whose gradient at w enters ε's norm (``norm_over="all"``) or a descent rule (``descent_over="all"``)."""
        return self.params + self.others

    def norm_of(self, tensors: Sequence[Tensor]) -> NormFn | None:
        """The norm ε's math uses over (local tensors aligned with) ``tensors``; None: its own local norm."""
        return None

    def packed(self, grads: list[Tensor | None], extra: list[Tensor | None]) -> Packed | None:
        """The ascent gradient in a layout of this storage's own, or None for the per-tensor lists."""
        return None

    # --- what descent rules read (normsam.optim.descent) -----------------------------------------------

    def current_grads(self, params: Sequence[Tensor]) -> list[Tensor | None]:
        """The ``.grad`` of ``params`` as it is now (after the second pass), local tensors."""
        return [p.grad for p in params]

    def dot(self, xs: Sequence[Tensor], ys: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
        """Σ x·y over the pairs (local tensors aligned with ``params``), a 0-d float64 tensor."""
        return self.dot_each(xs, ys, params).sum()

    def dot_each(self, xs: Sequence[Tensor], ys: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
        """x·y of each pair (local tensors aligned with ``params``), a float64 vector on the first one's device."""
        terms = dot_terms(xs, ys)
        if not terms:
            return torch.zeros(0, dtype=torch.float64)
        device = terms[0].device
        return torch.stack([t if t.device == device else t.to(device) for t in terms])

    def squared_norm_each(self, xs: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
        """‖x‖² of each tensor (local tensors aligned with ``params``), a float64 vector."""
        return squared_norms(xs)

    def learning_rates(self, params: Sequence[Tensor]) -> list[float]:
        return [float(self._group_of[p]["lr"]) for p in params]

    # --- perturb and restore -------------------------------------------------------------------------

    def begin(self) -> None:
        """Called before ε is computed (the flat layout takes its backup here: its ε reads w from it)."""

    def perturb(self, eps: list[Tensor | None]) -> None:
        """Save the tensors that get an ε (``None``: not perturbed this step), then add it."""
        live = sum(e is not None for e in eps)
        self._live_groups = self.groups if live == len(eps) else [
            [i for i in idx if eps[i] is not None] for idx in self.groups
        ]
        if self._live_groups is self.groups and len(self.groups) == 1:  # the usual case: the lists themselves
            self._save(self.groups[0], whole=True)
            add_(self.data, eps, self.foreach)
            return
        for idx in self._live_groups:  # each already one (device, dtype): no regrouping on the hot path
            if idx:
                self._save(idx)
                add_([self.data[i] for i in idx], [eps[i] for i in idx], self.foreach)

    def add(self, eps: list[Tensor | None]) -> None:
        """Add a further ε to the tensors this step already perturbed (a multi-step ascent's later steps)."""
        for idx in self._live_groups:
            live = [i for i in idx if eps[i] is not None]
            if live:
                add_([self.data[i] for i in live], [eps[i] for i in live], self.foreach)

    def _save(self, idx: list[int], whole: bool = False) -> None:
        if whole:
            copy_(self.backup, self.data, self.foreach)
        else:
            copy_([self.backup[i] for i in idx], [self.data[i] for i in idx], self.foreach)

    def restore(self) -> None:
        """Write the saved copy back (exactly: never by subtracting ε)."""
        for idx in self._live_groups:
            if idx:
                copy_([self.data[i] for i in idx], [self.backup[i] for i in idx], self.foreach)


class FlatPerturbedTensors(PerturbedTensors):
    """SAM-ON's layout: vectors of one device and dtype, an elementwise T. The backup is one flat buffer (its
    per-tensor views made once) filled by one ``torch.cat``; the gradient is gathered into another, and ε is
    computed on the flat vectors when every tensor has a gradient and all share one ρ (otherwise per tensor)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        sizes = self.sizes = [p.numel() for p in self.params]
        first = self.params[0]
        self.flat_grad = first.new_empty(sum(sizes))
        model = self.perturbation_model
        # T per element: nowhere (sam), everywhere, or where the bias rule lets it (a mask)
        self.flat_scaled: Scaled = (
            False if model.scale is None else True if all(self.scaled) else torch.cat(
                [torch.full((n,), s, dtype=torch.bool, device=first.device) for n, s in zip(sizes, self.scaled)])
        )

    def _make_backup(self) -> list[Tensor]:
        self.flat_backup = self.params[0].new_empty(sum(p.numel() for p in self.params))
        return list(self.flat_backup.split([p.numel() for p in self.params]))

    def begin(self) -> None:
        torch.cat(self.params, out=self.flat_backup)

    def _save(self, idx: list[int], whole: bool = False) -> None:
        """(:meth:`begin` saved every tensor already.)"""

    def packed(self, grads: list[Tensor | None], extra: list[Tensor | None]) -> Packed | None:
        rhos = {group["rho"] for group in self.groups_of}  # read every step: ρ may be scheduled
        if extra or len(rhos) != 1 or any(g is None for g in grads):
            return None
        torch.cat(grads, out=self.flat_grad)
        sizes = self.sizes
        return Packed(
            grads=[self.flat_grad], weights=[self.flat_backup], scaled=[self.flat_scaled], rhos=[rhos.pop()],
            norm_of=lambda tensors: torch.linalg.vector_norm(tensors[0], dtype=torch.float64),
            unpack=lambda eps: list(eps[0].split(sizes)),
        )


def flat_layout_fits(params: Sequence[Tensor], model: PerturbationModel, *, foreach: bool, masked: bool,
                     has_others: bool) -> bool:
    """Whether SAM-ON's flat layout computes exactly what the per-tensor one does: vectors only (norm layers' γ
    and β) of one (device, dtype), an elementwise T, no element mask, the norm over the perturbed set."""
    return (foreach and not masked and model.elementwise and not has_others and len(grouped(params)) == 1
            and all(p.dim() == 1 for p in params))


def perturbed_tensors(param_groups: Sequence[dict[str, Any]], options: Any, perturbation_model: PerturbationModel,
                      *, masked: bool, sharding: Any = None) -> PerturbedTensors:
    """The storage of the perturbed tensors of ``param_groups``: FSDP2's local shards when ``sharding`` is given
    (:meth:`normsam.optim.sharded.ShardedTensors.perturbed_tensors`), SAM-ON's flat layout where it is exact
    (:func:`flat_layout_fits`), otherwise one tensor per parameter.

    ``options``: the SAM's :class:`~normsam.optim.options.SAMOptions` (``foreach``, ``norm_over`` and the bias
    rule: ``normalize_bias``, ``scaled_tensors``); ``masked``: an element-mask scope."""
    foreach = options.resolved_foreach
    entries = entries_of(param_groups, True)
    # the others' gradients enter ε's norm (norm_over="all") or a descent rule (descent_over="all")
    wants_others = options.norm_over == "all" or getattr(options, "descent_over", "perturbed") == "all"
    others = entries_of(param_groups, False) if wants_others else []
    if not entries:
        raise ValueError(
            "SAM has no trainable tensor to perturb: every tensor of the perturbed groups has requires_grad=False "
            "(frozen after SAM was built?). Unfreeze them, or build SAM with a scope that selects trainable ones."
        )
    def applies_to(name: str | None) -> bool:  # whether T applies to the tensor of that name: the bias rule
        return perturbation_model.applies_to(name, normalize_bias=options.normalize_bias,
                                             scaled_tensors=options.scaled_tensors)

    kwargs = dict(scaled=[applies_to(n) for _, _, n in entries], others_scaled=[applies_to(n) for _, _, n in others],
                  foreach=foreach, perturbation_model=perturbation_model, key=layout_key(param_groups))
    if sharding is not None:
        return sharding.perturbed_tensors(entries, others, **kwargs)
    params = [p for p, _, _ in entries]
    if flat_layout_fits(params, perturbation_model, foreach=foreach, masked=masked, has_others=bool(others)):
        return FlatPerturbedTensors(entries, others, **kwargs)
    return PerturbedTensors(entries, others, **kwargs)


def check_loss(loss: Any) -> None:
    if not isinstance(loss, Tensor) or not loss.requires_grad:
        raise ValueError(
            "first_step(loss) needs the loss tensor of the first forward pass, computed with gradients "
            "enabled; call first_step() without a loss to use the .grad from your own backward()."
        )
