"""The measured figures and how they are read: per-variant step times and memory, the ratios between
variants, targets with PASS/FAIL, and the Markdown tables and JSON that ``normsam bench`` and
``benchmarks/step_time.py`` print and write.

A ratio is the median over rounds of the per-round ratio, not the ratio of the medians: rounds are
interleaved, so each round's ratio compares variants measured under the same spell of the machine.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from normsam.bench.names import FLOOR, PEER, SAM_ALL, SAM_ON, SGD, is_interval_name

__all__ = ["VariantResult", "Target", "KEY_RATIOS", "BenchResult", "format_bytes"]


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
            mem = "n/a" if v.extra_bytes is None else format_bytes(v.extra_bytes)
            lines.append(f"| {v.name} | {v.median_ms:.1f} | {v.median_ratio:.3f} | {mem} |")
        return "\n".join(lines) + "\n\n" + self.ratio_table(targets)

    def ratio_table(self, targets: Sequence[Target] = ()) -> str:
        limits = {(t.numerator, t.denominator): t.limit for t in targets}
        pairs = [p for p in KEY_RATIOS if p[0] in self and p[1] in self]
        pairs += [(v.name, SGD) for v in self.variants if is_interval_name(v.name)]
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


def format_bytes(n: int) -> str:
    """A signed byte count as the tables show it (``+8.0 KiB``, ``-512 B``): extra memory can be below SGD's."""
    sign = "-" if n < 0 else "+"
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    raise AssertionError
