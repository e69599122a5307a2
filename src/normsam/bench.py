"""Step time and extra peak memory of SGD, SAM-all and SAM-ON, measured side by side with two yardsticks.

Every variant trains its own copy of the same model on the same batch. Rounds are interleaved
(A B C D, A B C D, …) so that a slow spell of the machine hits every variant alike; the figures are the
median step time over rounds and the median over rounds of the per-round ratio to SGD (or to any other
variant, :meth:`BenchResult.ratio`).

The yardsticks: the *peer*, ``pytorch_optimizer.SAM`` (SAM-all, used through its own two-step API; an
optional dependency, ``pip install 'normsam[bench]'``), and the *floor*, the shortest SAM-ON a user would
write by hand (:func:`_handwritten_variant`). A variant that cannot run here (the peer not installed, an
option this normsam lacks, fp16 for a yardstick without a GradScaler path) is listed with the reason instead
of figures.

Extra peak memory is the variant's peak memory in training above SGD's: what it keeps between steps (its
model copy, optimizer state, saved copies, a stored ε; measured over build and warm-up) plus the peak it
allocates during one step. On CUDA from ``torch.cuda.memory_allocated``/``max_memory_allocated``, on the CPU
from the allocation events of ``torch.profiler``.
Used by ``normsam bench`` and ``benchmarks/step_time.py``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normsam.optim.amp import autocast, check_bf16_kernels, upcast_bf16_matmuls
from normsam.optim.sam import SAM
from normsam.optim.scopes import select

__all__ = [
    "Variant", "VariantUnavailable", "BenchResult", "Target", "default_variants", "run_benchmark",
    "sam_supports_ascent_interval",
    "SGD", "PEER", "SAM_ALL", "SAM_ON", "SAM_ON_CLASSIC", "FLOOR", "FLOOR_ALL", "interval_name", "fraction_name",
    "MOMENTUM", "sam_supports_momentum_ascent",
]
StepFn = Callable[[Tensor, Tensor], None]

# Variant names, shared by the tables, the targets and the tests.
SGD = "SGD"
PEER = "pytorch_optimizer.SAM"
SAM_ALL = "SAM-all"
SAM_ON_CLASSIC = "SAM-ON (classic first pass)"
SAM_ON = "SAM-ON (cheap ascent)"
FLOOR = "hand-written SAM-ON"
FLOOR_ALL = "hand-written SAM-all"
MOMENTUM = "SAM-ON, ascent=momentum"


_INTERVAL_PREFIX = "SAM-ON, ascent_interval="


def interval_name(k: int) -> str:
    return f"{_INTERVAL_PREFIX}{k}"


def fraction_name(f: float) -> str:
    return f"SAM-ON, ascent_fraction={f:g}"


class VariantUnavailable(Exception):
    """Raised by a variant's ``build`` when it cannot run here; the message says why (shown in the table)."""


@dataclass(frozen=True)
class Variant:
    """A named way to train: ``build(model, context)`` returns ``step(x, y)`` that runs one training step."""

    name: str
    build: Callable[[nn.Module, "StepContext"], StepFn]
    #: steps in one period of the variant's schedule (k for ``ascent_interval=k``): a round times a whole
    #: number of periods and the memory is measured over one period, so every round sees one fresh ascent
    #: per k steps whatever ``steps_per_round`` is
    cycle: int = 1


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
    bf16_kernels: str = "native"  # "upcast": bf16 matrix products on the fp32 kernels (normsam.optim.amp)

    def __post_init__(self):
        check_bf16_kernels(self.bf16_kernels, amp=self.amp, device_type=self.device_type)

    def autocast(self):
        return autocast(self.amp, self.device_type)

    def with_kernels(self, step: StepFn) -> StepFn:
        """``step`` run inside the ``bf16_kernels`` context (forward and backward); unchanged for native."""
        if self.bf16_kernels == "native":
            return step

        def upcast_step(x, y):
            with upcast_bf16_matmuls(self.bf16_kernels):
                return step(x, y)

        return upcast_step

    def scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device_type) if self.amp == "fp16" else None

    def base_kwargs(self) -> dict:
        return dict(lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def sgd(self, params) -> torch.optim.SGD:
        return torch.optim.SGD(params, **self.base_kwargs())

    def rho(self, scope: str) -> float:
        return self.rho_all if scope == "all" else self.rho_on

    def sam(self, model: nn.Module, scope: str, **options) -> SAM:
        return SAM(
            model, torch.optim.SGD, scope=scope, rho=self.rho(scope), perturbation=self.perturbation,
            **options, **self.base_kwargs(),
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


def _descent(sam: SAM, loss: Tensor, scaler: torch.amp.GradScaler | None) -> None:
    """Second backward pass, restore, base step (through the GradScaler when there is one)."""
    if scaler is None:
        loss.backward()
        sam.second_step(zero_grad=True)
    else:
        scaler.scale(loss).backward()
        sam.restore()
        scaler.step(sam.base_optimizer)
        scaler.update()
        sam.zero_grad()


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
            _descent(sam, _loss(model, x, y, ctx), scaler)

        return step

    return build


def sam_supports_ascent_interval() -> bool:
    """Whether this normsam's ``SAM`` takes ``ascent_interval`` (reuse ε between fresh ascents)."""
    return "ascent_interval" in inspect.signature(SAM.__init__).parameters


def _interval_variant(k: int) -> Callable[[nn.Module, StepContext], StepFn]:
    """SAM-ON with a fresh ascent every k-th step; the other steps reuse the last ε (one forward-backward)."""

    def build(model: nn.Module, ctx: StepContext) -> StepFn:
        if not sam_supports_ascent_interval():
            raise VariantUnavailable("not available: this normsam's SAM has no ascent_interval option")
        sam, scaler = ctx.sam(model, "norm", ascent_interval=k), ctx.scaler()

        def step(x, y):
            if sam.needs_ascent:
                loss = _loss(model, x, y, ctx)
                sam.first_step(loss if scaler is None else scaler.scale(loss), zero_grad=True, grad_scaler=scaler)
            else:  # the last ε is applied again: no first forward-backward
                sam.first_step(zero_grad=True, grad_scaler=scaler)
            _descent(sam, _loss(model, x, y, ctx), scaler)

        return step

    return build


def sam_supports_momentum_ascent() -> bool:
    """Whether this normsam's ``SAM`` takes ``ascent="momentum"`` (Momentum-SAM, no ascent pass)."""
    return "ascent" in inspect.signature(SAM.__init__).parameters


def _momentum_variant(model: nn.Module, ctx: StepContext) -> StepFn:
    """SAM-ON with ε from the base SGD's momentum (``ascent="momentum"``): one forward-backward at w + ε, the
    restore and the base step; the running statistics are updated in that pass (``bn_policy="update"``)."""
    if not sam_supports_momentum_ascent():
        raise VariantUnavailable("not available: this normsam's SAM has no ascent='momentum' option")
    if ctx.perturbation == "fisher":
        raise VariantUnavailable("perturbation='fisher' needs the ascent gradient, which ascent='momentum' never computes")
    sam, scaler = ctx.sam(model, "norm", ascent="momentum"), ctx.scaler()

    def step(x, y):
        sam.first_step(zero_grad=True)  # no pass at w: ε = -ρ·v/‖v‖ from the momentum buffers
        _descent(sam, _loss(model, x, y, ctx), scaler)

    return step


def _fraction_variant(f: float) -> Callable[[nn.Module, StepContext], StepFn]:
    """SAM-ON whose ascent gradient comes from the first ⌈f·B⌉ examples of the batch (the runner's
    ``ascent_fraction``): the first forward-backward runs on a sub-batch."""

    def build(model: nn.Module, ctx: StepContext) -> StepFn:
        sam, scaler = ctx.sam(model, "norm"), ctx.scaler()

        def step(x, y):
            n = max(1, math.ceil(f * x.shape[0]))
            loss = _loss(model, x[:n], y[:n], ctx)
            sam.first_step(loss if scaler is None else scaler.scale(loss), zero_grad=True, grad_scaler=scaler)
            _descent(sam, _loss(model, x, y, ctx), scaler)

        return step

    return build


def _peer_variant(model: nn.Module, ctx: StepContext) -> StepFn:
    """``pytorch_optimizer.SAM`` over every parameter, as its documentation uses it: ``backward`` and
    ``first_step``, second ``backward`` and ``second_step``; the same base SGD and ρ as normsam's SAM-all."""
    try:
        from pytorch_optimizer import SAM as PeerSAM
    except ImportError:
        raise VariantUnavailable(
            "not installed: pip install 'normsam[bench]' (or pytorch_optimizer) to add this yardstick"
        ) from None
    if ctx.amp == "fp16":
        raise VariantUnavailable("no GradScaler path in pytorch_optimizer.SAM: use amp=off or bf16")
    if ctx.perturbation not in ("sam", "asam"):
        raise VariantUnavailable(f"pytorch_optimizer.SAM has no perturbation={ctx.perturbation!r}")
    opt = PeerSAM(
        model.parameters(), torch.optim.SGD, rho=ctx.rho_all, adaptive=ctx.perturbation == "asam",
        **ctx.base_kwargs(),
    )

    def step(x, y):
        _loss(model, x, y, ctx).backward()
        opt.first_step(zero_grad=True)
        _loss(model, x, y, ctx).backward()
        opt.second_step(zero_grad=True)

    return step


def _handwritten_variant(scope: str) -> Callable[[nn.Module, StepContext], StepFn]:
    """The floor: the shortest correct ℓ2 SAM a user would write by hand, with none of normsam's bookkeeping
    (no running-statistics policy, no finiteness check, no masks): ``autograd.grad`` over the scope,
    ε = ρ g/‖g‖, add, second forward-backward, restore from a copy, base step. It uses ``torch._foreach_*``
    and a copy buffer allocated once, so it is the fastest loop of this per-tensor shape: a floor, not a straw
    man. (normsam's SAM-ON goes one step further: flat ε and backup buffers, see ``SAM._get_plan``.)"""

    def build(model: nn.Module, ctx: StepContext) -> StepFn:
        if ctx.amp == "fp16":
            raise VariantUnavailable("no GradScaler path in the hand-written yardstick: use amp=off or bf16")
        if ctx.perturbation != "sam":
            raise VariantUnavailable(f"the hand-written yardstick is ℓ2 SAM only, not {ctx.perturbation!r}")
        params = [i.param for i in select(model, scope)[0]]
        saved = [p.detach().clone() for p in params]
        rho = ctx.rho(scope)
        opt = ctx.sgd(model.parameters())

        def step(x, y):
            grads = torch.autograd.grad(_loss(model, x, y, ctx), params)
            with torch.no_grad():
                norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
                eps = torch._foreach_mul(grads, rho / (norm + 1e-12))
                torch._foreach_copy_(saved, params)
                torch._foreach_add_(params, eps)
            _loss(model, x, y, ctx).backward()
            with torch.no_grad():
                torch._foreach_copy_(params, saved)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    return build


def default_variants(
    handwritten: bool = True,
    *,
    peer: bool = True,
    classic: bool = True,
    ascent_interval: int | None = 4,
    handwritten_all: bool = False,
    ascent_fraction: float | None = None,
    momentum: bool = True,
) -> list[Variant]:
    """SGD first (the baseline of the ratios), then the peer, SAM-all, SAM-ON, the fast modes
    (``ascent_interval``, ``ascent_fraction``, the momentum ascent) and the floor.

    ``peer``, ``ascent_interval`` and ``momentum`` are listed even where they cannot run (the table says why)."""
    variants = [Variant(SGD, _sgd_variant)]
    if peer:
        variants.append(Variant(PEER, _peer_variant))
    variants.append(Variant(SAM_ALL, _normsam_variant("all", cheap=True)))
    if classic:
        variants.append(Variant(SAM_ON_CLASSIC, _normsam_variant("norm", cheap=False)))
    variants.append(Variant(SAM_ON, _normsam_variant("norm", cheap=True)))
    if ascent_interval is not None:
        variants.append(
            Variant(interval_name(ascent_interval), _interval_variant(ascent_interval), cycle=ascent_interval)
        )
    if ascent_fraction is not None:
        variants.append(Variant(fraction_name(ascent_fraction), _fraction_variant(ascent_fraction)))
    if momentum:
        variants.append(Variant(MOMENTUM, _momentum_variant))
    if handwritten:
        variants.append(Variant(FLOOR, _handwritten_variant("norm")))
    if handwritten_all:
        variants.append(Variant(FLOOR_ALL, _handwritten_variant("all")))
    return variants


@dataclass
class VariantResult:
    name: str
    step_times: list[float] = field(default_factory=list)  # seconds, one per round
    ratios: list[float] = field(default_factory=list)  # to SGD, one per round
    held_bytes: int | None = None  # kept between steps: the model copy, optimizer state, saved copies, ε
    peak_bytes: int | None = None  # allocated during one step, above the step's start
    extra_bytes: int | None = None  # held_bytes + peak_bytes minus SGD's
    unavailable: str | None = None  # why this variant did not run here

    @property
    def median_ms(self) -> float:
        return 1000 * statistics.median(self.step_times)

    @property
    def median_ratio(self) -> float:
        return statistics.median(self.ratios)


@dataclass(frozen=True)
class Target:
    """``numerator / denominator <= limit``, both variant names; the ratio is the median per-round ratio."""

    numerator: str
    denominator: str
    limit: float


#: The ratios every table shows (when both variants ran): normsam against its yardsticks and against SGD.
KEY_RATIOS: tuple[tuple[str, str], ...] = (
    (SAM_ON, FLOOR),
    (SAM_ALL, PEER),
    (SAM_ALL, SGD),
    (SAM_ON, SGD),
)


@dataclass
class BenchResult:
    variants: list[VariantResult]
    settings: dict

    def __getitem__(self, name: str) -> VariantResult:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(f"no variant {name!r} in this benchmark; it has {', '.join(v.name for v in self.variants)}")

    def __contains__(self, name: str) -> bool:
        return any(v.name == name for v in self.variants)

    def ratio(self, numerator: str, denominator: str) -> float | None:
        """Median over rounds of the per-round ratio of two variants' step times (None if either is missing)."""
        if numerator not in self or denominator not in self:
            return None
        a, b = self[numerator], self[denominator]
        if a.unavailable or b.unavailable:
            return None
        return statistics.median(x / y for x, y in zip(a.step_times, b.step_times))

    def check(self, target: Target) -> bool | None:
        """True/False for a met/missed target; None when a variant of it did not run."""
        value = self.ratio(target.numerator, target.denominator)
        return None if value is None else value <= target.limit

    def table(self, targets: Sequence[Target] = ()) -> str:
        """The variants' table, then one table of the key ratios and the targets (with PASS/FAIL)."""
        lines = [
            "| variant | median step (ms) | ratio to SGD (median per round) | extra peak memory |",
            "|---|---:|---:|---:|",
        ]
        for v in self.variants:
            if v.unavailable:
                lines.append(f"| {v.name} | {v.unavailable} | | |")
                continue
            mem = "n/a" if v.extra_bytes is None else _fmt_bytes(v.extra_bytes)
            lines.append(f"| {v.name} | {v.median_ms:.1f} | {v.median_ratio:.3f} | {mem} |")
        return "\n".join(lines) + "\n\n" + self.ratio_table(targets)

    def ratio_table(self, targets: Sequence[Target] = ()) -> str:
        limits = {(t.numerator, t.denominator): t.limit for t in targets}
        pairs = [p for p in KEY_RATIOS if p[0] in self and p[1] in self]
        pairs += [(v.name, SGD) for v in self.variants if v.name.startswith(_INTERVAL_PREFIX)]
        pairs += [p for p in limits if p not in pairs]
        lines = ["| ratio | value | target | verdict |", "|---|---:|---:|---|"]
        for num, den in pairs:
            value = self.ratio(num, den)
            limit = limits.get((num, den))
            missing = next((n for n in (num, den) if n not in self or self[n].unavailable), None)
            shown = f"{value:.3f}" if value is not None else f"n/a ({missing} did not run)"
            verdict = "" if limit is None else "n/a" if value is None else "PASS" if value <= limit else "FAIL"
            lines.append(f"| {num} / {den} | {shown} | {'' if limit is None else f'<= {limit:.2f}'} | {verdict} |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "settings": self.settings,
            "variants": [
                {
                    "name": v.name,
                    "unavailable": v.unavailable,
                    "median_step_ms": None if v.unavailable else v.median_ms,
                    "median_ratio_to_sgd": None if v.unavailable else v.median_ratio,
                    "extra_peak_bytes": v.extra_bytes,
                    "step_times_s": v.step_times,
                }
                for v in self.variants
            ],
            "ratios": {f"{n} / {d}": self.ratio(n, d) for n, d in KEY_RATIOS if n in self and d in self},
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


def _peak_step_bytes(step: StepFn, x: Tensor, y: Tensor, device: torch.device, steps: int = 1) -> int:
    """Peak memory allocated during ``steps`` steps above the level at their start."""
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            step(x, y)
        _sync(device)
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


@contextlib.contextmanager
def _held_memory(device: torch.device, enabled: bool = True):
    """Bytes allocated and not freed inside the block, in the yielded dict under ``"bytes"``."""
    out: dict[str, int] = {}
    if not enabled:
        yield out
        return
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        yield out
        _sync(device)
        out["bytes"] = torch.cuda.memory_allocated(device) - before
        return
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield out
    out["bytes"] = sum(e.nbytes() for e in _memory_events(prof))


def _memory_events(prof) -> list:
    """The allocation (positive bytes) and free (negative) events of a CPU profile, in time order."""
    events = (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    return sorted(events, key=lambda e: e.start_ns())


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
    """Time every variant over interleaved rounds; the first variant is the baseline of the ratios.

    A variant whose ``build`` raises :class:`VariantUnavailable` is kept in the result with the reason."""
    if rounds < 1 or steps_per_round < 1:
        raise ValueError(f"rounds and steps_per_round must be >= 1, got {rounds} and {steps_per_round}.")
    variants = list(variants or default_variants())
    context = context or StepContext(device_type=x.device.type)
    device = x.device
    template = make_model().to(device)
    results = [VariantResult(v.name) for v in variants]
    steps: list[StepFn] = []
    for variant, res in zip(variants, results):
        # build and warm up (and compile) outside the timed rounds, noting the memory the variant keeps
        with _held_memory(device, measure_memory) as held:
            model = copy.deepcopy(template)
            try:
                step = context.with_kernels(variant.build(torch.compile(model) if compile else model, context))
            except VariantUnavailable as reason:
                res.unavailable = str(reason)
                continue
            for _ in range(warmup):
                step(x, y)
        steps.append(step)
        res.held_bytes = held.get("bytes")
    _sync(device)
    if results[0].unavailable:
        raise ValueError(
            f"The first variant, {results[0].name}, is the baseline of the ratios and must run here; "
            f"it cannot: {results[0].unavailable}. Put a variant that runs first."
        )
    measured = [res for res in results if not res.unavailable]
    cycles = [v.cycle for v, res in zip(variants, results) if not res.unavailable]
    if measure_memory:
        for step, res, cycle in zip(steps, measured, cycles):
            res.peak_bytes = _peak_step_bytes(step, x, y, device, cycle)
        base = measured[0]
        for res in measured:
            res.extra_bytes = res.held_bytes + res.peak_bytes - base.held_bytes - base.peak_bytes

    iterator = range(rounds)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="bench rounds", leave=False)
    for _ in iterator:
        times = [_time_steps(step, x, y, -(-steps_per_round // c) * c, device) for step, c in zip(steps, cycles)]
        for res, t in zip(measured, times):
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
        "bf16_kernels": context.bf16_kernels,
        "compile": compile,
        "perturbation": context.perturbation,
        "torch": torch.__version__,
        "pytorch_optimizer": _version("pytorch_optimizer"),
        "parameters": sum(p.numel() for p in template.parameters()),
        "norm_parameters": sum(i.param.numel() for i in _norm_infos(template)),
    }
    return BenchResult(results, settings)


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


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
