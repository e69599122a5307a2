"""Statistics over seeds for ``normsam report``: t-intervals, paired differences and claim verdicts.

Everything here works on plain numbers (values per seed), so it can be checked by hand:

* :func:`describe`: mean, sample standard deviation and a two-sided 95% Student-t interval of the mean;
* :func:`paired`: the differences ``a[s] − b[s]`` over the seeds both have, described the same way;
* :func:`verdict`: whether an interval supports, contradicts or leaves open a comparison (:data:`RULES`);
* :func:`seeds_to_decide`: for a verdict left open, how many seeds the observed paired standard deviation
  would need to decide it at the observed mean difference;
* :func:`evaluate_claims`: the paper's claims (:data:`CLAIMS`) from the values of the arms that play each role.

The t quantile is ``scipy.stats.t``'s.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from scipy import stats as scipy_stats

__all__ = [
    "CONFIDENCE", "RULES", "SUPPORTED", "CONTRADICTED", "INCONCLUSIVE", "NOT_TESTED",
    "Interval", "Paired", "t_quantile", "describe", "paired", "verdict", "seeds_to_decide", "combine",
    "ROLE_NAMES", "CLAIMS", "Claim", "Part", "Arm", "PartResult", "evaluate_claims",
]

#: The level of every interval in the report.
CONFIDENCE = 0.95

SUPPORTED, CONTRADICTED, INCONCLUSIVE, NOT_TESTED = "supported", "contradicted", "inconclusive", "not tested"

#: How an interval [lo, hi] of a difference d = a − b decides a comparison; δ is the margin (same units as d).
#: Strict claims (">", "<") are decided against 0, the others against the margin, so that "as good as" does not
#: turn into "better than" and a tiny, well-measured difference does not contradict "about as good".
RULES = {
    ">": ("a better than b", "supported if lo > 0; contradicted if hi < 0"),
    "<": ("a worse than b", "supported if hi < 0; contradicted if lo > 0"),
    ">=": ("a at least as good as b", "supported if lo > −δ; contradicted if hi < −δ"),
    "<=": ("a no better than b", "supported if hi < δ; contradicted if lo > δ"),
    "~": ("a about as good as b", "supported if −δ < lo and hi < δ; contradicted if lo > δ or hi < −δ"),
}


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (the half-width factor of a 95% CI)."""
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"Degrees of freedom must be an integer >= 1, got {df!r}; a 95% interval needs n >= 2.")
    return float(scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, df))


@dataclass(frozen=True)
class Interval:
    """Mean, sample standard deviation and 95% t-interval of ``n`` values; None where undefined (n < 2)."""

    n: int
    mean: float | None
    std: float | None
    lo: float | None
    hi: float | None

    @property
    def half_width(self) -> float | None:
        return None if self.lo is None else (self.hi - self.lo) / 2

    def text(self, decimals: int = 2, *, signed: bool = False) -> str:
        """``"84.12 [83.50, 84.74]"``; ``"84.12 [n/a]"`` with one value; ``""`` with none."""
        if self.mean is None:
            return ""
        return f"{self.mean:{'+' if signed else ''}.{decimals}f} {self.ci_text(decimals, signed=signed)}"

    def ci_text(self, decimals: int = 2, *, signed: bool = False) -> str:
        """``"[83.50, 84.74]"``; ``"[n/a]"`` with one value; ``""`` with none."""
        if self.mean is None:
            return ""
        if self.lo is None:
            return "[n/a]"
        fmt = f"{'+' if signed else ''}.{decimals}f"
        return f"[{self.lo:{fmt}}, {self.hi:{fmt}}]"


def describe(values: Iterable[float | None]) -> Interval:
    """The :class:`Interval` of the values that are not None: mean ± t(0.975, n−1)·s/√n."""
    vals = [float(v) for v in values if v is not None]
    n = len(vals)
    if n == 0:
        return Interval(0, None, None, None, None)
    mean = statistics.fmean(vals)
    if n == 1:
        return Interval(1, mean, None, None, None)
    std = statistics.stdev(vals)
    half = t_quantile(n - 1) * std / math.sqrt(n)
    return Interval(n, mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class Paired:
    """The differences a − b over the seeds both have, and their interval."""

    seeds: tuple[int, ...]
    differences: tuple[float, ...]
    interval: Interval


def paired(a: Mapping[int, float | None], b: Mapping[int, float | None]) -> Paired:
    """Pair by seed: ``a[s] − b[s]`` for every seed where both values are known, in seed order."""
    seeds = tuple(sorted(s for s in a.keys() & b.keys() if a[s] is not None and b[s] is not None))
    diffs = tuple(float(a[s]) - float(b[s]) for s in seeds)
    return Paired(seeds, diffs, describe(diffs))


def verdict(interval: Interval, relation: str, margin: float = 0.0) -> str:
    """Decide ``a <relation> b`` from the interval of a − b (see :data:`RULES`); inconclusive without one."""
    if relation not in RULES:
        raise ValueError(f"Unknown relation {relation!r}; use one of {', '.join(RULES)}.")
    if margin < 0:
        raise ValueError(f"The margin must be >= 0, got {margin}.")
    if interval.lo is None:
        return INCONCLUSIVE
    lo, hi, d = interval.lo, interval.hi, margin
    supported, contradicted = {
        ">": (lo > 0, hi < 0),
        "<": (hi < 0, lo > 0),
        ">=": (lo > -d, hi < -d),
        "<=": (hi < d, lo > d),
        "~": (-d < lo and hi < d, lo > d or hi < -d),
    }[relation]
    return SUPPORTED if supported else CONTRADICTED if contradicted else INCONCLUSIVE


#: :func:`seeds_to_decide` searches up to this many seeds; beyond it, more seeds are not the answer.
MAX_SEEDS = 10_000


def _decision_gap(mean: float, relation: str, margin: float) -> float:
    """How far the mean lies from the bound the interval must clear to decide (see :data:`RULES`): the
    verdict is decided exactly when the half-width is below this gap (0: never, at this mean)."""
    d = margin
    return {
        ">": abs(mean), "<": abs(mean),
        ">=": abs(mean + d),  # supported if mean − h > −δ, contradicted if mean + h < −δ
        "<=": abs(mean - d),  # supported if mean + h < δ, contradicted if mean − h > δ
        "~": abs(abs(mean) - d),  # supported if |mean| + h < δ, contradicted if |mean| − h > δ
    }[relation]


def seeds_to_decide(interval: Interval, relation: str, margin: float = 0.0) -> int | None:
    """For an open verdict: the fewest paired seeds n whose 95% interval, with the observed mean difference
    and standard deviation, would decide ``relation`` (``t(0.975, n−1)·s/√n`` below the gap between the mean
    and the deciding bound). ``None`` when it cannot be said: fewer than 2 seeds (no standard deviation), a
    mean exactly on the bound, or more than :data:`MAX_SEEDS` seeds needed. Which way it would be decided
    is the side the mean is on; the real seeds may of course fall otherwise."""
    if relation not in RULES:
        raise ValueError(f"Unknown relation {relation!r}; use one of {', '.join(RULES)}.")
    if interval.std is None or interval.mean is None:
        return None
    gap = _decision_gap(interval.mean, relation, margin)
    if gap <= 0:
        return None
    if interval.std == 0:
        return 2
    z = scipy_stats.norm.ppf(0.5 + CONFIDENCE / 2)  # t > z, so n ≥ (z·s/gap)²: start there
    n = max(2, math.ceil((z * interval.std / gap) ** 2))
    while n <= MAX_SEEDS:
        if t_quantile(n - 1) * interval.std / math.sqrt(n) < gap:
            return n
        n += 1
    return None


def combine(verdicts: Iterable[str]) -> str:
    """A claim made of parts: contradicted if any part is, else not tested if any part is, else supported if
    all are, else inconclusive."""
    verdicts = list(verdicts)
    for outcome in (CONTRADICTED, NOT_TESTED):
        if outcome in verdicts:
            return outcome
    return SUPPORTED if verdicts and all(v == SUPPORTED for v in verdicts) else INCONCLUSIVE


# --------------------------------------------------------------------------------------------------------
# the paper's claims


@dataclass(frozen=True)
class Part:
    """One comparison of a claim: ``a − b`` of ``metric`` over paired seeds, decided by ``relation``."""

    a: str  # a role (see ROLE_NAMES)
    b: str
    metric: str  # "final_test_acc" or "sharpness"
    relation: str  # a key of RULES


@dataclass(frozen=True)
class Claim:
    name: str
    statement: str
    parts: tuple[Part, ...]


#: The roles an arm can play in the claims, with their names in the tables.
ROLE_NAMES = {
    "sgd": "SGD", "sam-all": "SAM-all", "sam-on": "SAM-ON", "no-norm": "no-norm", "random": "random mask",
    "ssam-f": "SSAM-F",
}

_ACC, _SHARP = "final_test_acc", "sharpness"

#: The claims of the paper that ``normsam report`` tests (SPEC §4).
CLAIMS = (
    Claim("C1", "SAM-ON ≥ SAM-all > SGD in test accuracy (each at its own tuned ρ)",
          (Part("sam-on", "sam-all", _ACC, ">="), Part("sam-all", "sgd", _ACC, ">"))),
    Claim("C2", "SAM-ON's models are sharper (adaptive worst-case ℓ∞) than SAM-all's, yet generalize as well",
          (Part("sam-on", "sam-all", _SHARP, ">"), Part("sam-on", "sam-all", _ACC, ">="))),
    Claim("C3", "perturbing everything except the norm layers (no-norm) does no better than SAM-all",
          (Part("no-norm", "sam-all", _ACC, "<="),)),
    Claim("C4", "a random mask at SAM-ON's sparsity is about as good as SGD",
          (Part("random", "sgd", _ACC, "~"),)),
    Claim("C5", "SSAM-F at SAM-ON's sparsity does worse than SAM-ON",
          (Part("sam-on", "ssam-f", _ACC, ">"),)),
)

_METRIC_NAMES = {_ACC: "test acc.", _SHARP: "sharpness"}
_RELATION_SIGNS = {">": ">", "<": "<", ">=": "≥", "<=": "≤", "~": "≈"}


@dataclass(frozen=True)
class Arm:
    """What the claims need of the arm that plays a role: its label and its values per seed.

    ``missing`` maps a metric to the reason it cannot be used (e.g. sharpness measured with other settings).
    """

    label: str
    values: Mapping[str, Mapping[int, float | None]]
    missing: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PartResult:
    claim: str
    part: Part
    test: str  # "test acc.: SAM-ON ≥ SAM-all"
    arm_a: str | None
    arm_b: str | None
    margin: float  # δ applied (0 for strict relations and for sharpness)
    paired: Paired | None
    verdict: str
    note: str
    seeds_needed: int | None = None  # inconclusive: the seeds that would decide it (see seeds_to_decide)


def evaluate_claims(arms: Mapping[str, Arm | None], margin: float) -> list[tuple[Claim, str, list[PartResult]]]:
    """Every claim of :data:`CLAIMS` with its verdict and its parts; ``arms``: role → its arm (None: absent).

    ``margin`` (δ) is in test-accuracy points; sharpness comparisons are strict, so they use no margin.
    """
    results = []
    for claim in CLAIMS:
        parts = [_evaluate_part(claim, part, arms, margin) for part in claim.parts]
        results.append((claim, combine(p.verdict for p in parts), parts))
    return results


def _evaluate_part(claim: Claim, part: Part, arms: Mapping[str, Arm | None], margin: float) -> PartResult:
    test = (f"{_METRIC_NAMES.get(part.metric, part.metric)}: {ROLE_NAMES[part.a]} "
            f"{_RELATION_SIGNS[part.relation]} {ROLE_NAMES[part.b]}")
    delta = margin if part.metric == _ACC and part.relation in (">=", "<=", "~") else 0.0
    a, b = arms.get(part.a), arms.get(part.b)
    labels = (a.label if a else None, b.label if b else None)

    def untested(note: str) -> PartResult:
        return PartResult(claim.name, part, test, *labels, delta, None, NOT_TESTED, note)

    for role, arm in ((part.a, a), (part.b, b)):
        if arm is None:
            return untested(f"no {ROLE_NAMES[role]} arm")
        reason = arm.missing.get(part.metric)
        if reason:
            return untested(reason)
    pairs = paired(a.values.get(part.metric, {}), b.values.get(part.metric, {}))
    if not pairs.seeds:
        name = _METRIC_NAMES.get(part.metric, part.metric)
        return untested(f"no seed with {name} in both {a.label} and {b.label}")
    outcome = verdict(pairs.interval, part.relation, delta)
    note = "one common seed: no interval" if pairs.interval.lo is None else ""
    needed = seeds_to_decide(pairs.interval, part.relation, delta) if outcome == INCONCLUSIVE else None
    return PartResult(claim.name, part, test, *labels, delta, pairs, outcome, note, needed)
