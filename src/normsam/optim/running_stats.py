"""Running statistics (BatchNorm and friends) during SAM's second pass.

The second forward pass runs at ``w + ε``. With ``bn_policy="freeze"`` the running statistics it would
record are discarded: they are saved when the weights are perturbed and written back when they are restored.
This covers every module that has ``running_mean``/``running_var`` buffers (``_BatchNorm`` subclasses,
SyncBatchNorm, timm's BatchNormAct2d, InstanceNorm with ``track_running_stats``, custom modules), including
``num_batches_tracked``, and never touches ``requires_grad`` (which would break DDP's reducer).

:class:`RunningStatsSwap` is what :class:`normsam.SAM` uses: for the second pass, the running buffers of
every BatchNorm-like module in training mode are replaced by scratch tensors (a dict assignment, no copy,
no kernel, no host sync), so the pass updates the scratch and the real statistics are never written; other
modules with running statistics fall back to :class:`RunningStatsFreezer`, a preallocated copy filled and
read back with one ``torch._foreach_copy_`` per (device, dtype). :class:`RunningStatsSnapshot` (a fresh
clone per buffer and step) is the plain reference both are tested against.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator

import torch
from torch import nn

from normsam.optim._foreach import grouped

__all__ = [
    "BN_POLICIES",
    "running_stat_modules",
    "RunningStatsFreezer",
    "RunningStatsSnapshot",
    "RunningStatsSwap",
    "frozen_running_stats",
]

BN_POLICIES = ("freeze", "update")


def running_stat_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that keep running statistics (a tensor ``running_mean`` or ``running_var``)."""
    return [
        m
        for m in model.modules()
        if isinstance(getattr(m, "running_mean", None), torch.Tensor)
        or isinstance(getattr(m, "running_var", None), torch.Tensor)
    ]


def _module_buffers(modules: list[nn.Module]) -> list[torch.Tensor]:
    # Looked up on every use, not once: ``model.to(device)`` replaces buffer tensors.
    return [b for m in modules for b in m._buffers.values() if b is not None]


class RunningStatsSnapshot:
    """Save and restore every buffer of the given modules with a fresh clone each time (the reference)."""

    def __init__(self, modules: list[nn.Module]):
        self.modules = modules
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def _buffers(self) -> list[torch.Tensor]:
        return _module_buffers(self.modules)

    def save(self) -> None:
        self._saved = [(b, b.detach().clone()) for b in self._buffers()]

    @torch.no_grad()
    def restore(self) -> None:
        if self._saved is None:
            raise ValueError("RunningStatsSnapshot.restore() without save(): call save() first.")
        for buffer, copy in self._saved:
            buffer.copy_(copy)
        self._saved = None


class RunningStatsFreezer:
    """:meth:`save` before the second pass, :meth:`restore` after it: the statistics are as before, bit for bit.

    Why a copy and not a trick that skips the update. Two tricks were weighed, and neither is exact on
    every backend without a copy:

    - ``momentum = 0`` for the second pass: the update ``(1 - 0)·r + 0·b`` gives ``r`` back only while the
      batch statistic ``b`` is finite. When ``w + ε`` overflows (fp16), ``0·inf = NaN`` overwrites ``r`` for
      good, so an exact version needs the old values anyway, i.e. this very copy (or a host sync per step
      to decide whether to repair). It also does not cover InstanceNorm, whose update averages repeated
      copies of ``r`` (not exact even at momentum 0), nor custom modules.
    - ``track_running_stats = False`` for the second pass: BatchNorm then passes no running buffers to
      ``F.batch_norm``, which on CUDA may select another kernel (``_batch_norm_with_update`` versus the
      no-update path, cuDNN versus native) than the first pass; the output, hence the SAM gradient, is not
      guaranteed to be the same bits. It also forces a recompile under ``torch.compile``.

    The copy is cheap: the running statistics are a few numbers per channel (ResNet-50: 53 BatchNorms,
    ~0.2 MB), and here they are copied by one fused ``torch._foreach_copy_`` per (device, dtype) into a
    buffer allocated once, where the reference clones each tensor (two kernel launches per buffer and step).
    """

    def __init__(self, modules: list[nn.Module]):
        self.modules = modules
        self._buffers: list[torch.Tensor] = []
        self._copies: list[torch.Tensor] = []
        self._groups: list[list[int]] = []
        self._saved = False

    def _prepare(self) -> None:
        buffers = _module_buffers(self.modules)
        same = len(buffers) == len(self._buffers) and all(map(operator.is_, buffers, self._buffers))
        if not same:  # first use, or model.to(...) replaced the buffers
            self._buffers = buffers
            self._copies = [torch.empty_like(b) for b in buffers]
            self._groups = list(grouped(buffers).values())

    @torch.no_grad()
    def save(self) -> None:
        self._prepare()
        for idx in self._groups:
            torch._foreach_copy_([self._copies[i] for i in idx], [self._buffers[i] for i in idx])
        self._saved = True

    @torch.no_grad()
    def restore(self) -> None:
        if not self._saved:
            raise ValueError("RunningStatsFreezer.restore() without save(): call save() first.")
        for idx in self._groups:
            torch._foreach_copy_([self._buffers[i] for i in idx], [self._copies[i] for i in idx])
        self._saved = False


class RunningStatsSwap:
    """Freeze the running statistics of a pass without copying them: :meth:`save` points each BatchNorm-like
    module's ``running_mean``, ``running_var`` and ``num_batches_tracked`` at scratch tensors, :meth:`restore`
    points them back at the real ones.

    Why this is exact: a ``_NormBase`` module (BatchNorm, SyncBatchNorm, InstanceNorm, timm's BatchNormAct2d,
    …) in training mode normalizes with the *batch's* statistics and only *writes* its running buffers
    (``momentum=None`` reads ``num_batches_tracked`` only to weigh that write). So the pass's output is the
    same bits whatever the buffers hold, and the real buffers, never passed to the kernel, keep their bits
    even when the pass's statistics are inf or NaN (fp16 overflow at w + ε). Modules in eval mode read their
    running statistics and write nothing, so they are left alone; modules that are not ``_NormBase`` (custom
    layers with a ``running_mean``) fall back to a :class:`RunningStatsFreezer` copy. The scratch tensors are
    made once per real buffer (again after ``model.to(...)``) and collect the discarded updates.

    DDP with ``broadcast_buffers=True`` broadcasts rank 0's real buffers at every forward, as without SAM.
    """

    _NAMES = ("running_mean", "running_var", "num_batches_tracked")

    def __init__(self, modules: list[nn.Module]):
        from torch.nn.modules.batchnorm import _NormBase

        self.norms = [m for m in modules if isinstance(m, _NormBase)]
        others = [m for m in modules if not isinstance(m, _NormBase)]
        self._fallback = RunningStatsFreezer(others) if others else None
        # per module: (module, its _buffers dict, {name: real tensor}, {name: scratch tensor}), built once
        self._slots: list[tuple[nn.Module, dict, dict, dict]] = []
        # the same real tensors, flat, for one identity check per step in C (map over dict.get and is_)
        self._check: tuple[list[dict], list[str], list[torch.Tensor]] = ([], [], [])
        self._swapped: list[tuple[dict, dict, dict]] = []
        self._saved = False

    def _build(self) -> None:
        self._slots = []
        for m in self.norms:
            real = {name: m._buffers[name] for name in self._NAMES if m._buffers.get(name) is not None}
            self._slots.append((m, m._buffers, real, {name: t.detach().clone() for name, t in real.items()}))
        self._check = (
            [buffers for _, buffers, real, _ in self._slots for _ in real],
            [name for _, _, real, _ in self._slots for name in real],
            [t for _, _, real, _ in self._slots for t in real.values()],
        )

    def _current(self) -> bool:
        """Whether every module still holds the buffers the scratch tensors were made for."""
        dicts, names, reals = self._check
        return all(map(operator.is_, map(dict.get, dicts, names), reals))

    @torch.no_grad()
    def save(self) -> None:
        if not self._slots or not self._current():  # first use, or model.to(...) or a load replaced a buffer
            self._build()
        # a plain dict update: no Module.__setattr__ on the hot path; modules in eval mode only read theirs
        self._swapped = [(buffers, real, scratch) for module, buffers, real, scratch in self._slots if module.training]
        for buffers, _, scratch in self._swapped:
            buffers.update(scratch)
        if self._fallback is not None:
            self._fallback.save()
        self._saved = True

    @torch.no_grad()
    def restore(self) -> None:
        if not self._saved:
            raise ValueError("RunningStatsSwap.restore() without save(): call save() first.")
        for buffers, real, _ in self._swapped:
            buffers.update(real)
        self._swapped = []
        if self._fallback is not None:
            self._fallback.restore()
        self._saved = False


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """Context manager: forward passes inside it leave every running statistic of ``model`` as it was.

    Example:
        ```python
        import torch
        import normsam

        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
        with normsam.frozen_running_stats(model):
            model(torch.randn(16, 4) + 3.0)
        assert torch.equal(model[1].running_mean, torch.zeros(8)) and model[1].num_batches_tracked == 0
        ```
    """
    freezer = RunningStatsFreezer(running_stat_modules(model))
    freezer.save()
    try:
        yield
    finally:
        freezer.restore()
