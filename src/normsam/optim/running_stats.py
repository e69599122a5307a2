"""Running statistics (BatchNorm and friends) during SAM's second pass.

The second forward pass runs at ``w + ε``. With ``bn_policy="freeze"`` the running statistics it would
record are discarded: they are saved when the weights are perturbed and written back when they are restored.
This covers every module that has ``running_mean``/``running_var`` buffers (``_BatchNorm`` subclasses,
SyncBatchNorm, timm's BatchNormAct2d, InstanceNorm with ``track_running_stats``, custom modules), including
``num_batches_tracked``, and never touches ``requires_grad`` (which would break DDP's reducer).

:class:`RunningStatsFreezer` is what :class:`normsam.SAM` uses: a preallocated copy filled and read back
with one ``torch._foreach_copy_`` per (device, dtype), no allocation and no host sync per step.
:class:`RunningStatsSnapshot` (a fresh clone per buffer and step) is the plain reference it is tested against.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator

import torch
from torch import nn

from normsam.optim.perturbations import _grouped

__all__ = [
    "BN_POLICIES",
    "running_stat_modules",
    "RunningStatsFreezer",
    "RunningStatsSnapshot",
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
            self._groups = list(_grouped(buffers).values())

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


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """Context manager: forward passes inside it leave every running statistic of ``model`` as it was."""
    freezer = RunningStatsFreezer(running_stat_modules(model))
    freezer.save()
    try:
        yield
    finally:
        freezer.restore()
