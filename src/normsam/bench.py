"""Step time and extra peak memory of SGD, SAM-all and SAM-ON, measured side by side.

Every variant trains its own copy of the same model on the same batch. Rounds are interleaved
(A B C D, A B C D, …) so that a slow spell of the machine hits every variant alike; the figures are the
median step time over rounds and the median over rounds of the per-round ratio to SGD.

Extra peak memory is the peak of memory allocated during one step above what SGD's step allocates: on CUDA
from ``torch.cuda.max_memory_allocated``, on the CPU from the allocation events of ``torch.profiler``.
Used by ``normsam bench`` and ``benchmarks/step_time.py``.
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normsam.optim.sam import SAM
from normsam.optim.scopes import select
from normsam.train.config import autocast

__all__ = ["Variant", "BenchResult", "default_variants", "run_benchmark"]
StepFn = Callable[[Tensor, Tensor], None]


@dataclass(frozen=True)
class Variant:
    """A named way to train: ``build(model)`` returns ``step(x, y)`` that runs one full training step."""

    name: str
    build: Callable[[nn.Module, "StepContext"], StepFn]


@dataclass(frozen=True)
class StepContext:
    """What every variant shares: optimizer settings, the loss, the AMP mode."""

    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    rho_all: float = 0.05
    rho_on: float = 0.5
    perturbation: str = "sam"
    amp: str = "off"
    device_type: str = "cpu"

    def autocast(self):
        return autocast(self.amp, self.device_type)

    def scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device_type) if self.amp == "fp16" else None

    def sgd(self, params) -> torch.optim.SGD:
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def sam(self, model: nn.Module, scope: str) -> SAM:
        rho = self.rho_all if scope == "all" else self.rho_on
        return SAM(
            model, torch.optim.SGD, scope=scope, rho=rho, perturbation=self.perturbation,
            lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
        )


def _loss(model: nn.Module, x: Tensor, y: Tensor, ctx: StepContext) -> Tensor:
    with ctx.autocast():
        return F.cross_entropy(model(x), y)


def _sgd_variant(model: nn.Module, ctx: StepContext) -> StepFn:
    opt, scaler = ctx.sgd(model.parameters()), ctx.scaler()

    def step(x, y):
        loss = _loss(model, x, y, ctx)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)

    return step


def _normsam_variant(scope: str, cheap: bool) -> Callable[[nn.Module, StepContext], StepFn]:
    def build(model: nn.Module, ctx: StepContext) -> StepFn:
        sam, scaler = ctx.sam(model, scope), ctx.scaler()

        def step(x, y):
            loss = _loss(model, x, y, ctx)
            scaled = loss if scaler is None else scaler.scale(loss)
            if cheap:
                sam.first_step(scaled, zero_grad=True, grad_scaler=scaler)
            else:
                scaled.backward()
                sam.first_step(zero_grad=True, grad_scaler=scaler)
            loss2 = _loss(model, x, y, ctx)
            if scaler is None:
                loss2.backward()
                sam.second_step(zero_grad=True)
            else:
                scaler.scale(loss2).backward()
                sam.restore()
                scaler.step(sam.base_optimizer)
                scaler.update()
                sam.zero_grad()

        return step

    return build


def _handwritten_variant(scope: str) -> Callable[[nn.Module, StepContext], StepFn]:
    """The smallest correct SAM a user would write by hand (ℓ2, restore by subtraction), as a yardstick."""

    def build(model: nn.Module, ctx: StepContext) -> StepFn:
        if ctx.amp == "fp16":
            raise ValueError("the hand-written yardstick has no GradScaler path; use amp=off or bf16")
        params = [i.param for i in select(model, scope)[0]]
        rho = ctx.rho_all if scope == "all" else ctx.rho_on
        opt = ctx.sgd(model.parameters())

        def step(x, y):
            grads = torch.autograd.grad(_loss(model, x, y, ctx), params)
            with torch.no_grad():
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
                eps = [g * (rho / (norm + 1e-12)) for g in grads]
                for p, e in zip(params, eps):
                    p.add_(e)
            _loss(model, x, y, ctx).backward()
            with torch.no_grad():
                for p, e in zip(params, eps):
                    p.sub_(e)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    return build


def default_variants(handwritten: bool = True) -> list[Variant]:
    variants = [
        Variant("SGD", _sgd_variant),
        Variant("SAM-all", _normsam_variant("all", cheap=True)),
        Variant("SAM-ON (classic first pass)", _normsam_variant("norm", cheap=False)),
        Variant("SAM-ON (cheap ascent)", _normsam_variant("norm", cheap=True)),
    ]
    if handwritten:
        variants += [
            Variant("hand-written SAM-ON (cheap ascent)", _handwritten_variant("norm")),
            Variant("hand-written SAM-all", _handwritten_variant("all")),
        ]
    return variants


@dataclass
class VariantResult:
    name: str
    step_times: list[float] = field(default_factory=list)  # seconds, one per round
    ratios: list[float] = field(default_factory=list)  # to SGD, one per round
    peak_bytes: int | None = None  # allocated during one step, above the step's start
    extra_bytes: int | None = None  # peak_bytes minus SGD's

    @property
    def median_ms(self) -> float:
        return 1000 * statistics.median(self.step_times)

    @property
    def median_ratio(self) -> float:
        return statistics.median(self.ratios)


@dataclass
class BenchResult:
    variants: list[VariantResult]
    settings: dict

    def __getitem__(self, name: str) -> VariantResult:
        return next(v for v in self.variants if v.name == name)

    def table(self) -> str:
        lines = [
            "| variant | median step (ms) | ratio to SGD (median per round) | extra peak memory |",
            "|---|---:|---:|---:|",
        ]
        for v in self.variants:
            mem = "n/a" if v.extra_bytes is None else _fmt_bytes(v.extra_bytes)
            lines.append(f"| {v.name} | {v.median_ms:.1f} | {v.median_ratio:.3f} | {mem} |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "settings": self.settings,
            "variants": [
                {
                    "name": v.name,
                    "median_step_ms": v.median_ms,
                    "median_ratio_to_sgd": v.median_ratio,
                    "extra_peak_bytes": v.extra_bytes,
                    "step_times_s": v.step_times,
                }
                for v in self.variants
            ],
        }


def _fmt_bytes(n: int) -> str:
    sign = "-" if n < 0 else "+"
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(step: StepFn, x: Tensor, y: Tensor, n: int, device: torch.device) -> float:
    """Seconds per step over ``n`` steps (CUDA events on a GPU, the wall clock elsewhere)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            step(x, y)
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000 / n
    begin = time.perf_counter()
    for _ in range(n):
        step(x, y)
    return (time.perf_counter() - begin) / n


def _peak_step_bytes(step: StepFn, x: Tensor, y: Tensor, device: torch.device) -> int:
    """Peak memory allocated during one step above the level at its start."""
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(x, y)
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(x, y)  # the same step already ran in the warm-up, so nothing worth reading is hidden
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    level = peak = 0
    for e in events:
        level += e.nbytes()
        peak = max(peak, level)
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ start/stop chatter) for the duration."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


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
    """Time every variant over interleaved rounds; the first variant is the baseline of the ratios."""
    if rounds < 1 or steps_per_round < 1:
        raise ValueError(f"rounds and steps_per_round must be >= 1, got {rounds} and {steps_per_round}.")
    variants = list(variants or default_variants())
    context = context or StepContext(device_type=x.device.type)
    device = x.device
    template = make_model().to(device)
    models = [copy.deepcopy(template) for _ in variants]
    if compile:
        models = [torch.compile(m) for m in models]
    steps = [v.build(m, context) for v, m in zip(variants, models)]
    results = [VariantResult(v.name) for v in variants]

    for step in steps:  # warm-up (and compilation) outside the timed rounds
        for _ in range(warmup):
            step(x, y)
        _sync(device)
    if measure_memory:
        for step, res in zip(steps, results):
            res.peak_bytes = _peak_step_bytes(step, x, y, device)
        for res in results:
            res.extra_bytes = res.peak_bytes - results[0].peak_bytes

    iterator = range(rounds)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="bench rounds", leave=False)
    for _ in iterator:
        times = [_time_steps(step, x, y, steps_per_round, device) for step in steps]
        for res, t in zip(results, times):
            res.step_times.append(t)
            res.ratios.append(t / times[0])

    settings = {
        "device": _device_name(device),
        "threads": torch.get_num_threads(),
        "batch_size": int(x.shape[0]),
        "input_shape": list(x.shape[1:]),
        "rounds": rounds,
        "steps_per_round": steps_per_round,
        "amp": context.amp,
        "compile": compile,
        "perturbation": context.perturbation,
        "torch": torch.__version__,
        "parameters": sum(p.numel() for p in template.parameters()),
        "norm_parameters": sum(i.param.numel() for i in _norm_infos(template)),
    }
    return BenchResult(results, settings)


def _norm_infos(model: nn.Module):
    try:
        return select(model, "norm")[0]
    except ValueError:
        return []


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores)"
