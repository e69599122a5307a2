"""Memory a variant costs: what it keeps between steps, and the peak it allocates during a step.

On CUDA the allocator's counters (``memory_allocated``, ``max_memory_allocated``) answer directly. The CPU has no
such counters, so there the allocation and free events of ``torch.profiler`` are replayed in time order.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch
from torch import Tensor

from normsam.bench.context import StepFn

__all__ = ["sync", "held_memory", "peak_step_bytes"]


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so a reading (memory or time) covers what was launched before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def held_memory(device: torch.device, enabled: bool = True):
    """Bytes allocated and not freed inside the block, in the yielded dict under ``"bytes"``."""
    out: dict[str, int] = {}
    if not enabled:
        yield out
        return
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        yield out
        sync(device)
        out["bytes"] = torch.cuda.memory_allocated(device) - before
        return
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield out
    out["bytes"] = sum(e.nbytes() for e in _memory_events(prof))


def peak_step_bytes(step: StepFn, x: Tensor, y: Tensor, device: torch.device, steps: int = 1) -> int:
    """Peak memory allocated during ``steps`` steps above the level at their start."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            step(x, y)
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(steps):  # the same steps already ran in the warm-up: nothing worth reading is hidden
            step(x, y)
    level = peak = 0
    for e in _memory_events(prof):
        level += e.nbytes()
        peak = max(peak, level)
    return peak


def _memory_events(prof) -> list:
    """The allocation (positive bytes) and free (negative) events of a CPU profile, in time order."""
    events = (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    return sorted(events, key=lambda e: e.start_ns())


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ start/stop chatter) for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
