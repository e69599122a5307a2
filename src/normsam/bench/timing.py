""":func:`run_benchmark`: build every variant, measure its memory, then time all of them in interleaved rounds.

Rounds are interleaved rather than run variant after variant, so that a slow spell of the machine hits every
variant alike and the per-round ratios stay fair on a noisy or shared machine. Every other round runs the
variants in reverse order (A B C D, D C B A, …), so that no variant always runs right after the same neighbour
or always first: a bias from the position in the round (caches, the allocator, the previous variant's memory)
cancels over pairs of rounds instead of favouring one side of a comparison.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from normsam.bench.context import StepContext, StepFn, Variant, VariantUnavailable
from normsam.bench.memory import held_memory, peak_step_bytes, sync
from normsam.bench.passes import PASS_CLOCK
from normsam.bench.report import BenchResult, VariantResult
from normsam.bench.variants import default_variants
from normsam.optim.scopes import select

__all__ = ["run_benchmark", "round_order"]


def _time_steps(step: StepFn, x: Tensor, y: Tensor, n: int, device: torch.device) -> tuple[float, float | None]:
    """Seconds per step over ``n`` steps (CUDA events on a GPU, the wall clock elsewhere), and on the CPU the
    seconds per step spent in the forward and backward passes (:mod:`normsam.bench.passes`; None on a GPU, where
    host clocks do not time the kernels)."""
    if device.type == "cuda":  # the host returns long before the GPU is done: time on the GPU's own clock
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            step(x, y)
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000 / n, None
    with PASS_CLOCK.running() as passes:
        begin = time.perf_counter()
        for _ in range(n):
            step(x, y)
        total = time.perf_counter() - begin
    return total / n, passes.seconds / n


def run_benchmark(
    make_model: Callable[[], nn.Module],
    x: Tensor,
    y: Tensor,
    *,
    variants: Sequence[Variant] | None = None,
    context: StepContext | None = None,
    rounds: int = 10,
    steps_per_round: int = 3,
    warmup: int = 2,
    measure_memory: bool = True,
    compile: bool = False,
    progress: bool = True,
) -> BenchResult:
    """Time every variant over interleaved rounds; the first variant is the baseline of the ratios.

    A variant whose ``build`` raises :class:`VariantUnavailable` is kept in the result with the reason."""
    if rounds < 1 or steps_per_round < 1:
        raise ValueError(f"rounds and steps_per_round must be >= 1, got {rounds} and {steps_per_round}.")
    variants = list(variants or default_variants())
    context = context or StepContext(device_type=x.device.type)
    device = x.device
    template = make_model().to(device)
    results = [VariantResult(v.name, cycle=v.cycle, notes=list(v.notes)) for v in variants]
    steps: list[StepFn] = []
    for variant, res in zip(variants, results):
        # build and warm up (and compile) outside the timed rounds, noting the memory the variant keeps
        with held_memory(device, measure_memory) as held:
            model = copy.deepcopy(template)
            try:
                step = context.with_kernels(variant.build(torch.compile(model) if compile else model, context))
            except VariantUnavailable as reason:
                res.unavailable = str(reason)
                # free the unused copy inside this block: freed later, it would be subtracted from the memory
                # the next variant keeps (a whole model too little after a missing peer)
                del model
                continue
            for _ in range(warmup):
                step(x, y)
        steps.append(step)
        res.held_bytes = held.get("bytes")
    sync(device)
    if results[0].unavailable:
        raise ValueError(
            f"The first variant, {results[0].name}, is the baseline of the ratios and must run here; "
            f"it cannot: {results[0].unavailable}. Put a variant that runs first."
        )
    measured = [res for res in results if not res.unavailable]
    cycles = [v.cycle for v, res in zip(variants, results) if not res.unavailable]
    if measure_memory:
        for step, res, cycle in zip(steps, measured, cycles):
            res.peak_bytes = peak_step_bytes(step, x, y, device, cycle)
        base = measured[0]
        for res in measured:
            res.extra_bytes = res.held_bytes + res.peak_bytes - base.held_bytes - base.peak_bytes

    iterator = range(rounds)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="bench rounds", leave=False)
    for r in iterator:
        # each variant times whole cycles (steps_per_round rounded up to a multiple of its cycle), in the order
        # of round_order(r)
        times: list[tuple[float, float | None]] = [(0.0, None)] * len(steps)
        for i in round_order(r, len(steps)):
            times[i] = _time_steps(steps[i], x, y, -(-steps_per_round // cycles[i]) * cycles[i], device)
        for res, (t, in_passes) in zip(measured, times):
            res.step_times.append(t)
            res.ratios.append(t / times[0][0])
            if in_passes is not None:
                res.pass_times.append(in_passes)

    settings = {
        "device": _device_name(device),
        "threads": torch.get_num_threads(),
        "batch_size": int(x.shape[0]),
        "input_shape": list(x.shape[1:]),
        "rounds": rounds,
        "steps_per_round": steps_per_round,
        "amp": context.amp,
        "bf16_kernels": context.bf16_kernels,
        "compile": compile,
        "perturbation": context.perturbation,
        "torch": torch.__version__,
        "pytorch_optimizer": _version("pytorch_optimizer"),
        "parameters": sum(p.numel() for p in template.parameters()),
        "norm_parameters": sum(i.param.numel() for i in _norm_infos(template)),
    }
    return BenchResult(results, settings)


def round_order(round_index: int, n: int) -> list[int]:
    """The order in which round ``round_index`` (from 0) runs ``n`` variants: forward, then reversed, alternately."""
    order = list(range(n))
    return order if round_index % 2 == 0 else order[::-1]


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _norm_infos(model: nn.Module):
    try:
        return select(model, "norm")[0]
    except ValueError:  # a model without norm layers: 0 norm parameters, not an error in a benchmark
        return []


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores)"
