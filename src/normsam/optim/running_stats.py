"""Running statistics (BatchNorm and friends) during SAM's second pass.

The second forward pass runs at ``w + ε``. With ``bn_policy="freeze"`` the running statistics it would
record are discarded: they are saved when the weights are perturbed and written back when they are restored.
This covers every module that has ``running_mean``/``running_var`` buffers (``_BatchNorm`` subclasses,
SyncBatchNorm, timm's BatchNormAct2d, InstanceNorm with ``track_running_stats``, custom modules), including
``num_batches_tracked``, and never touches ``requires_grad`` (which would break DDP's reducer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["BN_POLICIES", "running_stat_modules", "RunningStatsSnapshot", "frozen_running_stats"]

BN_POLICIES = ("freeze", "update")


def running_stat_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that keep running statistics (a tensor ``running_mean`` or ``running_var``)."""
    return [
        m
        for m in model.modules()
        if isinstance(getattr(m, "running_mean", None), torch.Tensor)
        or isinstance(getattr(m, "running_var", None), torch.Tensor)
    ]


class RunningStatsSnapshot:
    """Save and restore every buffer of the given modules.

    Buffers are looked up at :meth:`save` time, not at construction, because ``model.to(device)`` replaces
    buffer tensors.
    """

    def __init__(self, modules: list[nn.Module]):
        self.modules = modules
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def _buffers(self) -> list[torch.Tensor]:
        return [b for m in self.modules for b in m._buffers.values() if b is not None]

    def save(self) -> None:
        self._saved = [(b, b.detach().clone()) for b in self._buffers()]

    @torch.no_grad()
    def restore(self) -> None:
        if self._saved is None:
            raise ValueError("RunningStatsSnapshot.restore() without save(): call save() first.")
        for buffer, copy in self._saved:
            buffer.copy_(copy)
        self._saved = None


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """Context manager: forward passes inside it leave every running statistic of ``model`` as it was."""
    snapshot = RunningStatsSnapshot(running_stat_modules(model))
    snapshot.save()
    try:
        yield
    finally:
        snapshot.restore()
