"""The measured figures and how they are read: per-variant step times and memory, the ratios between
variants, targets with PASS/FAIL, and the Markdown tables and JSON that ``normsam bench`` and
``benchmarks/step_time.py`` print and write.

A ratio is the median over rounds of the per-round ratio, not the ratio of the medians: rounds are
interleaved, so each round's ratio compares variants measured under the same spell of the machine.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from normsam.analysis.stats import Interval, describe
from normsam.bench.names import (
    FLOOR, PEER, SAM_ALL, SAM_ON, SGD, VARIANT_FAMILIES, is_interval_name, is_multi_step_name, peer_name,
    variant_name,
)

__all__ = ["VariantResult", "Target", "KEY_RATIOS", "VARIANT_TARGETS", "STEP_PARTS", "BenchResult", "format_bytes"]

#: The parts of a step a ratio can compare (:meth:`BenchResult.ratio_interval`), each with the
#: :class:`VariantResult` attribute holding its seconds per round: all of it, its forward and backward passes,
#: the rest (the optimizer's own work); the last two on the CPU only.
_PART_TIMES = {"step": "step_times", "passes": "pass_times", "outside": "outside_times"}
STEP_PARTS = tuple(_PART_TIMES)


@dataclass
class VariantResult:
    name: str
    step_times: list[float] = field(default_factory=list)  # seconds, one per round
    pass_times: list[float] = field(default_factory=list)  # of which in the passes (CPU only; empty on a GPU)
    ratios: list[float] = field(default_factory=list)  # to SGD, one per round
    held_bytes: int | None = None  # kept between steps: the model copy, optimizer state, saved copies, ε
    peak_bytes: int | None = None  # allocated during one step, above the step's start
    extra_bytes: int | None = None  # held_bytes + peak_bytes minus SGD's
    unavailable: str | None = None  # why this variant did not run here
    cycle: int = 1  # steps of the variant's schedule each round times a whole number of (step_times: per step)
    notes: list[str] = field(default_factory=list)  # how the row is timed or driven, where it matters

    @property
    def median_ms(self) -> float:
        return 1000 * statistics.median(self.step_times)

    @property
    def median_ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def outside_times(self) -> list[float]:
        """Seconds per step outside the forward and backward passes, one per round (empty when not split)."""
        return [t - p for t, p in zip(self.step_times, self.pass_times)]


@dataclass(frozen=True)
class Target:
    """``numerator / denominator <= limit`` (``< limit`` when ``strict``), both variant names; the ratio is the
    median per-round ratio."""

    numerator: str
    denominator: str
    limit: float
    strict: bool = False

    def met(self, value: float) -> bool:
        return value < self.limit if self.strict else value <= self.limit

    @property
    def shown(self) -> str:
        return f"{'<' if self.strict else '<='} {self.limit:.2f}"


#: The ratios every table shows (when both variants ran): normsam against its yardsticks and against SGD.
KEY_RATIOS: tuple[tuple[str, str], ...] = (
    (SAM_ON, FLOOR),
    (SAM_ALL, PEER),
    (SAM_ALL, SGD),
    (SAM_ON, SGD),
)

#: The targets of SAM's variants, in every table where their rows ran: normsam's variant over every parameter
#: costs no more than pytorch_optimizer's class of the same name, and less over the norm layers (the cheap
#: ascent) than over every parameter.
VARIANT_TARGETS: tuple[Target, ...] = tuple(
    target
    for family in VARIANT_FAMILIES.values()
    for target in (Target(variant_name(family, "all"), peer_name(family), 1.00),
                   Target(variant_name(family, "norm"), variant_name(family, "all"), 1.00, strict=True))
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
        pair = self._pair(numerator, denominator)
        if pair is None:
            return None
        a, b = pair
        return statistics.median(x / y for x, y in zip(a.step_times, b.step_times))

    def ratio_interval(self, numerator: str, denominator: str, *, part: str = "step") -> Interval | None:
        """The geometric mean over rounds of the per-round ratio with its 95% t-interval (the interval of the
        mean per-round log ratio, exponentiated) of one :data:`STEP_PARTS` part of the two variants' steps: the
        whole ``"step"``, its ``"passes"`` or the time ``"outside"`` them; None when a variant is missing or (for
        a part) its steps were not split."""
        if part not in STEP_PARTS:
            raise ValueError(f"Unknown part {part!r}; use one of {', '.join(STEP_PARTS)}.")
        pair = self._pair(numerator, denominator)
        if pair is None:
            return None
        a, b = (getattr(v, _PART_TIMES[part]) for v in pair)
        if not a or not b or min(a + b) <= 0:
            return None
        logs = describe(math.log(x / y) for x, y in zip(a, b))
        return Interval(logs.n, math.exp(logs.mean), None, *(None if e is None else math.exp(e)
                                                                   for e in (logs.lo, logs.hi)))

    def _pair(self, numerator: str, denominator: str) -> tuple[VariantResult, VariantResult] | None:
        if numerator not in self or denominator not in self:
            return None
        a, b = self[numerator], self[denominator]
        return None if a.unavailable or b.unavailable else (a, b)

    def check(self, target: Target) -> bool | None:
        """True/False for a met/missed target; None when a variant of it did not run."""
        value = self.ratio(target.numerator, target.denominator)
        return None if value is None else target.met(value)

    def variant_targets(self) -> list[Target]:
        """The :data:`VARIANT_TARGETS` of the variants in this benchmark (normsam's row in it)."""
        return [t for t in VARIANT_TARGETS if t.numerator in self]

    def verdict(self, target: Target) -> str:
        """``PASS``, ``FAIL`` or ``n/a`` (a variant of it did not run)."""
        met = self.check(target)
        return "n/a" if met is None else "PASS" if met else "FAIL"

    def table(self, targets: Sequence[Target] = ()) -> str:
        """The variants' table (with how cycled rows are timed), one table of the key ratios and the targets
        (with PASS/FAIL), and, when SAM's variants ran, their table against pytorch_optimizer's classes."""
        lines = [
            "| variant | median step (ms) | ratio to SGD (median per round) | extra peak memory |",
            "|---|---:|---:|---:|",
        ]
        for v in self.variants:
            if v.unavailable:
                lines.append(f"| {v.name} | {v.unavailable} | | |")
                continue
            mem = "n/a" if v.extra_bytes is None else format_bytes(v.extra_bytes)
            lines.append(f"| {v.name} | {v.median_ms:.1f} | {v.median_ratio:.3f} | {mem} |")
        text = "\n".join(lines) + self._notes() + "\n\n" + self.ratio_table(targets)
        extra = [t for t in (self.variants_table(), self.peer_table()) if t]
        return "\n\n".join([text, *extra])

    def _notes(self) -> str:
        """One line per distinct note, naming its rows (e.g. how LookSAM's rows are timed)."""
        notes: dict[str, list[str]] = {}
        for v in self.variants:
            for note in v.notes if not v.unavailable else ():
                notes.setdefault(note, []).append(v.name)
        return "".join(f"\n\n{', '.join(names)}: {note}." for note, names in notes.items())

    def ratio_table(self, targets: Sequence[Target] = ()) -> str:
        given = {(t.numerator, t.denominator): t for t in targets}
        pairs = [p for p in KEY_RATIOS if p[0] in self and p[1] in self]
        pairs += [(v.name, SGD) for v in self.variants if is_interval_name(v.name)]
        pairs += [(v.name, SAM_ON) for v in self.variants if is_multi_step_name(v.name) and SAM_ON in self]
        pairs += [p for p in given if p not in pairs]
        lines = ["| ratio | value | target | verdict |", "|---|---:|---:|---|"]
        for num, den in pairs:
            target = given.get((num, den))
            lines.append(f"| {num} / {den} | {self._shown_ratio(num, den)} | {'' if target is None else target.shown} "
                         f"| {'' if target is None else self.verdict(target)} |")
        return "\n".join(lines)

    def _shown_ratio(self, num: str, den: str) -> str:
        value = self.ratio(num, den)
        if value is not None:
            return f"{value:.3f}"
        missing = next((n for n in (num, den) if n not in self or self[n].unavailable), None)
        return f"n/a ({missing} did not run)"

    def variants_table(self) -> str:
        """SAM's variants, one row each: the median step (and ratio to SGD) of normsam over every parameter,
        of pytorch_optimizer's class of the same name and of normsam over the norm layers, with the targets
        ``(all) / peer <= 1.00`` and ``(norm) / (all) < 1`` (empty when no variant ran)."""
        families = [f for f in VARIANT_FAMILIES.values() if variant_name(f, "all") in self]
        if not families:
            return ""
        lines = [
            "| SAM variant | normsam, scope=all: ms (×SGD) | pytorch_optimizer: ms (×SGD) "
            "| normsam, scope=norm: ms (×SGD) | (all) / peer | target | verdict | (norm) / (all) | target | verdict |",
            "|---|---:|---:|---:|---:|---:|---|---:|---:|---|",
        ]
        for family in families:
            names = (variant_name(family, "all"), peer_name(family), variant_name(family, "norm"))
            cells = [family] + [self._step_cell(n) for n in names]
            for target in (t for t in VARIANT_TARGETS if t.numerator in names and t.denominator in names):
                cells += [self._shown_ratio(target.numerator, target.denominator), target.shown, self.verdict(target)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def peer_pairs(self) -> list[tuple[str, str, str]]:
        """(label, normsam's row over every parameter, its peer's row) for SAM itself and each of its variants,
        where both rows are in this benchmark."""
        pairs = [("SAM", SAM_ALL, PEER)] + [(family, variant_name(family, "all"), peer_name(family))
                                            for family in VARIANT_FAMILIES.values()]
        return [p for p in pairs if p[1] in self and p[2] in self]

    def peer_intervals(self) -> list[tuple[str, str, str, dict[str, Interval | None]]]:
        """For SAM and each of its variants run beside its peer: the label, the two rows' names, and (all) / peer
        over each of :data:`STEP_PARTS` (None for the parts of steps that were not split), as
        :meth:`ratio_interval` gives them."""
        found = []
        for label, mine, peer in self.peer_pairs():
            parts = {part: self.ratio_interval(mine, peer, part=part) for part in STEP_PARTS}
            if parts["step"] is not None:
                found.append((label, mine, peer, parts))
        return found

    def peer_table(self) -> str:
        """SAM and its variants at scope="all" against their peers round by round: the ratio of the whole steps, of
        the forward and backward passes, and of the time outside them (the optimizer's own work; CPU runs only),
        each the geometric mean of the per-round ratios with its 95% t-interval. In a compute-bound step the passes
        are nearly all the time and the same code on both sides: the whole step's ratio follows the passes' ratio,
        which strays from 1.00 by the machine's noise, while the time outside the passes compares what the two
        optimizers do differently (empty when no row ran beside its peer)."""
        rows = []
        for label, mine, peer, parts in self.peer_intervals():
            if parts["outside"] is None:
                rows.append(f"| {label} | {parts['step'].text(3)} | not split (GPU) | | | |")
                continue
            ms = [1000 * statistics.median(self[n].outside_times) for n in (mine, peer)]
            rows.append(f"| {label} | {parts['step'].text(3)} | {parts['passes'].text(3)} | {ms[0]:.2f} | {ms[1]:.2f} "
                        f"| {parts['outside'].text(3)} |")
        if not rows:
            return ""
        return "\n".join([
            "| SAM or variant | (all) / peer: whole step [95% CI] | passes [95% CI] | outside the passes, normsam: "
            "ms a step | peer: ms a step | (all) / peer: outside the passes [95% CI] |",
            "|---|---:|---:|---:|---:|---:|", *rows])

    def _step_cell(self, name: str) -> str:
        if name not in self:
            return "not run"
        v = self[name]
        return "n/a" if v.unavailable else f"{v.median_ms:.1f} ({v.median_ratio:.2f}×)"

    @classmethod
    def from_dict(cls, data: dict) -> tuple[BenchResult, list[Target]]:
        """A result and its targets back from :meth:`to_dict`'s JSON, to print a saved run's tables again (the
        per-round ratios recomputed against the first variant, as :func:`~normsam.bench.timing.run_benchmark`
        takes them)."""
        rows = data["variants"]
        baseline = rows[0]["step_times_s"]
        variants = [
            VariantResult(
                row["name"], step_times=list(row["step_times_s"]), pass_times=list(row.get("pass_times_s", [])),
                ratios=[t / b for t, b in zip(row["step_times_s"], baseline)], extra_bytes=row["extra_peak_bytes"],
                unavailable=row["unavailable"], cycle=row.get("cycle", 1), notes=list(row.get("notes", [])),
            )
            for row in rows
        ]
        targets = []
        for t in data.get("targets", []):
            numerator, _, denominator = t["ratio"].partition(" / ")
            targets.append(Target(numerator, denominator, t["limit"], strict=t["strict"]))
        return cls(variants, dict(data["settings"])), targets

    @classmethod
    def pooled(cls, results: Sequence[BenchResult]) -> BenchResult:
        """Several runs of the same variants as one, their rounds in sequence (each round stays a comparison made
        under one spell of the machine); ``settings`` are the first run's, with the rounds added up."""
        if not results:
            raise ValueError("Nothing to pool: give at least one result.")
        names = [v.name for v in results[0].variants]
        for other in results[1:]:
            if [v.name for v in other.variants] != names:
                raise ValueError("Only runs of the same variants pool: run them with the same options "
                                 f"({', '.join(names)} against {', '.join(v.name for v in other.variants)}).")
            # rounds pair variants by position: a row that ran in some runs only would pair the wrong rounds
            ran = [v.name for v, w in zip(results[0].variants, other.variants)
                   if bool(v.unavailable) != bool(w.unavailable)]
            if ran:
                raise ValueError(f"Only runs of the same variants pool: {', '.join(ran)} ran in some of them only "
                                 "(install the same packages, e.g. pytorch_optimizer, for every run).")
        variants = []
        for rows in zip(*(r.variants for r in results)):
            pooled = VariantResult(rows[0].name, extra_bytes=rows[0].extra_bytes, cycle=rows[0].cycle,
                                   notes=list(rows[0].notes), unavailable=rows[0].unavailable)
            for v in rows:
                pooled.step_times += v.step_times
                pooled.ratios += v.ratios
                pooled.pass_times += v.pass_times
            variants.append(pooled)
        settings = {**results[0].settings, "rounds": sum(r.settings.get("rounds", 0) for r in results)}
        return cls(variants, settings)

    def to_dict(self, targets: Sequence[Target] = ()) -> dict:
        """The figures as JSON: settings, every variant (``cycle``: the steps each round times a whole number of;
        ``notes``: how it is timed or driven), the key ratios and the variants' ratios, and the targets (``targets`` and
        those of SAM's variants that ran) with their verdicts."""
        pairs = [p for p in KEY_RATIOS if p[0] in self and p[1] in self]
        pairs += [(v.name, SAM_ON) for v in self.variants if is_multi_step_name(v.name) and SAM_ON in self]
        all_targets = list(dict.fromkeys([*targets, *self.variant_targets()]))
        pairs += [(t.numerator, t.denominator) for t in all_targets if (t.numerator, t.denominator) not in pairs]
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
                    "pass_times_s": v.pass_times,
                    "cycle": v.cycle,
                    "notes": v.notes,
                }
                for v in self.variants
            ],
            "ratios": {f"{n} / {d}": self.ratio(n, d) for n, d in pairs},
            # SAM and each variant beside its peer: [geometric mean, lo, hi] of (all) / peer over the whole step,
            # the passes and outside them (None where the steps were not split)
            "peer_intervals": {
                f"{mine} / {peer}": {part: None if i is None else [i.mean, i.lo, i.hi] for part, i in parts.items()}
                for _, mine, peer, parts in self.peer_intervals()
            },
            "targets": [
                {"ratio": f"{t.numerator} / {t.denominator}", "value": self.ratio(t.numerator, t.denominator),
                 "limit": t.limit, "strict": t.strict, "met": self.check(t), "verdict": self.verdict(t)}
                for t in all_targets
            ],
        }


def format_bytes(n: int) -> str:
    """A signed byte count as the tables show it (``+8.0 KiB``, ``-512 B``): extra memory can be below SGD's."""
    sign = "-" if n < 0 else "+"
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    raise AssertionError
