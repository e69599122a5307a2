"""The part of a step spent in the model's forward and backward passes, and so the part outside them.

A SAM step is passes plus the optimizer's own work (the norms, ε, the restore, the base step, zeroing). In a
compute-bound step the passes are 99% of the time and run the same code for every variant, so the whole
step's ratio of two optimizers is 1.00 within the machine's noise (a few percent on a shared CPU) and cannot
tell them apart. The time *outside the passes* is what the optimizers do differently; measured round by round
beside the step, it is the figure that does tell them apart.

:class:`PassClock` adds up the passes' time: :func:`normsam.bench.context.loss` (the loss every variant, peers
included, computes) times its forward and arms the clock on the loss's graph, which times the backward from
the moment the engine reaches the loss (a pre-hook on its ``grad_fn``) to the end of that backward (a callback
the autograd engine runs when the graph task finishes). A backward through ``loss.backward()``,
``torch.autograd.backward`` or ``torch.autograd.grad`` (normsam's cheap ascent) is timed alike.

Host clocks time host work only: on CUDA the kernels run after the host returns, so the split is made on the CPU
only (:func:`run_benchmark <normsam.bench.timing.run_benchmark>` leaves it out elsewhere).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["PassClock", "PASS_CLOCK"]


class PassClock:
    """Seconds spent in forward and backward passes while :meth:`running`; a no-op otherwise."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.active = False

    @contextlib.contextmanager
    def running(self) -> Iterator[PassClock]:
        """Start from 0 and count the passes of the block (not nested: one clock times one variant at a time)."""
        if self.active:
            raise RuntimeError("The pass clock is already running; time one variant at a time.")
        self.seconds, self.active = 0.0, True
        try:
            yield self
        finally:
            self.active = False

    def add_forward(self, seconds: float) -> None:
        if self.active:
            self.seconds += seconds

    def arm_backward(self, loss: Tensor) -> None:
        """Time the backward passes that will run through ``loss``'s graph (from its ``grad_fn`` to the end)."""
        if not self.active or loss.grad_fn is None:
            return

        def started(_grad_outputs):
            begin = time.perf_counter()

            def finished():
                if self.active:
                    self.seconds += time.perf_counter() - begin

            # the engine runs queued callbacks once the whole graph task is done (as DDP's reducer uses it)
            torch.autograd.Variable._execution_engine.queue_callback(finished)

        loss.grad_fn.register_prehook(started)


#: The clock :func:`normsam.bench.context.loss` reports to (one process times one variant at a time).
PASS_CLOCK = PassClock()
