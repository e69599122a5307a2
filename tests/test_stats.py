"""normsam.analysis.stats: t-intervals (checked by hand and against the t distribution), pairing, verdicts."""

from __future__ import annotations

import math

import pytest

from normsam.analysis import stats
from normsam.analysis.stats import (
    CONTRADICTED, INCONCLUSIVE, MAX_SEEDS, NOT_TESTED, SUPPORTED, Arm, Interval, combine, describe, evaluate_claims,
    paired, seeds_to_decide, t_quantile, verdict,
)

T2 = 4.302652729749464  # t(0.975, df=2), the half-width factor for three seeds


def _t_mass(x: float, df: int, steps: int = 4000) -> tuple[float, float]:
    """P(0 < T < x) for Student's t by Simpson's rule on its density (independent of the module), and the
    density at x."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(t: float) -> float:
        return math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))

    h = x / steps
    inner = sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
    return (density(0.0) + inner + density(x)) * h / 3, density(x)


@pytest.mark.parametrize("df", [*range(1, 31), 31, 40, 100, 1000])
def test_t_quantiles_from_scipy_match_the_density(df):
    q = t_quantile(df)
    mass, density = _t_mass(q, df)
    assert abs((0.475 - mass) / density) < 2e-6  # the quantile error, to first order


def test_describe_by_hand():
    ci = describe([80.0, 81.0, 82.0, None])  # None: a run without the value
    assert (ci.n, ci.mean, ci.std) == (3, 81.0, 1.0)
    assert ci.lo == pytest.approx(81.0 - T2 / math.sqrt(3), rel=1e-9)
    assert ci.hi == pytest.approx(81.0 + T2 / math.sqrt(3), rel=1e-9)
    assert ci.half_width == pytest.approx(2.4841377, rel=1e-7)
    assert ci.text(2) == "81.00 [78.52, 83.48]"
    two = describe([1.0, 4.0])  # std = 3/√2, half-width = 12.7062047 · (3/√2)/√2 = 19.059307
    assert two.std == pytest.approx(3 / math.sqrt(2))
    assert (two.lo, two.hi) == pytest.approx((2.5 - 19.0593071, 2.5 + 19.0593071))
    one = describe([5.0])
    assert (one.n, one.mean, one.std, one.lo, one.hi) == (1, 5.0, None, None, None)
    assert one.text(2) == "5.00 [n/a]" and one.ci_text() == "[n/a]" and one.half_width is None
    assert describe([]) == Interval(0, None, None, None, None) and describe([]).text() == ""
    assert describe([0.5, 0.5, 0.5]).text(2, signed=True) == "+0.50 [+0.50, +0.50]"


def _interval(n, mean, std):
    half = t_quantile(n - 1) * std / math.sqrt(n)
    return Interval(n, mean, std, mean - half, mean + half)


def test_seeds_to_decide_by_hand():
    # mean 1, s = 1, "a > b": t(0.975, 5)/√6 = 2.5706/2.4495 = 1.049 > 1, t(0.975, 6)/√7 = 2.4469/2.6458 = 0.925 < 1
    open_ = _interval(3, 1.0, 1.0)
    assert verdict(open_, ">") == INCONCLUSIVE and seeds_to_decide(open_, ">") == 7
    assert verdict(_interval(7, 1.0, 1.0), ">") == SUPPORTED and verdict(_interval(6, 1.0, 1.0), ">") == INCONCLUSIVE
    # the same spread below zero would be decided the other way, as soon
    assert seeds_to_decide(_interval(3, -1.0, 1.0), ">") == 7
    # ">=" with δ = 0.5 at mean −0.2: the bound is −δ, the gap 0.3
    n = seeds_to_decide(_interval(4, -0.2, 1.0), ">=", 0.5)
    assert verdict(_interval(n, -0.2, 1.0), ">=", 0.5) == SUPPORTED
    assert verdict(_interval(n - 1, -0.2, 1.0), ">=", 0.5) == INCONCLUSIVE
    # "~" with δ = 0.2: at mean 0.5 it would be contradicted (gap 0.3), at mean 0.1 supported (gap 0.1)
    for mean, outcome in ((0.5, CONTRADICTED), (0.1, SUPPORTED)):
        n = seeds_to_decide(_interval(3, mean, 0.4), "~", 0.2)
        assert verdict(_interval(n, mean, 0.4), "~", 0.2) == outcome
        assert verdict(_interval(n - 1, mean, 0.4), "~", 0.2) == INCONCLUSIVE


def test_seeds_to_decide_where_it_cannot_be_said():
    assert seeds_to_decide(describe([1.0]), ">") is None  # one seed: no standard deviation
    assert seeds_to_decide(_interval(5, 0.0, 1.0), ">") is None  # the mean on the bound
    assert seeds_to_decide(_interval(5, 0.01, 1.0), ">") is None  # ≈ 38,000 seeds: more than MAX_SEEDS
    assert MAX_SEEDS == 10_000
    assert seeds_to_decide(Interval(2, 0.5, 0.0, 0.5, 0.5), ">") == 2
    with pytest.raises(ValueError, match="Unknown relation"):
        seeds_to_decide(_interval(3, 1.0, 1.0), "!=")


def test_inconclusive_claim_parts_say_how_many_seeds_would_decide():
    arms = {"sam-on": Arm("ON", {"final_test_acc": {0: 81.0, 1: 80.0, 2: 82.5}}),
            "sam-all": Arm("all", {"final_test_acc": {0: 80.0, 1: 80.5, 2: 80.0}})}
    results = {claim.name: parts for claim, _, parts in evaluate_claims(arms, margin=0.2)}
    part = results["C1"][0]  # SAM-ON ≥ SAM-all: differences 1, −0.5, 2.5
    assert part.verdict == INCONCLUSIVE
    assert part.seeds_needed == seeds_to_decide(part.paired.interval, ">=", 0.2) and part.seeds_needed > 3
    assert results["C1"][1].seeds_needed is None  # not tested (no SGD arm): nothing to count


def test_t_quantile_errors():
    for df in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="Degrees of freedom must be an integer >= 1"):
            t_quantile(df)


def test_paired_by_seed():
    a = {0: 1.0, 1: 2.0, 2: 4.0, 3: 9.0, 4: None}
    b = {2: 1.0, 0: 0.0, 1: 1.0, 4: 7.0, 5: 3.0}
    result = paired(a, b)
    assert result.seeds == (0, 1, 2) and result.differences == (1.0, 1.0, 3.0)
    assert result.interval.mean == pytest.approx(5 / 3)
    assert result.interval.std == pytest.approx(math.sqrt(((1 - 5 / 3) ** 2 * 2 + (3 - 5 / 3) ** 2) / 2))
    assert paired({0: 1.0}, {1: 1.0}).seeds == ()
    assert paired({0: 1.0}, {1: 1.0}).interval.n == 0


def ci(lo, hi):
    return Interval(3, (lo + hi) / 2, 1.0, lo, hi)


@pytest.mark.parametrize(
    "relation, lo, hi, expected",
    [
        (">", 0.1, 0.5, SUPPORTED), (">", -0.5, -0.1, CONTRADICTED), (">", -0.1, 0.5, INCONCLUSIVE),
        (">", 0.0, 0.5, INCONCLUSIVE),
        ("<", -0.5, -0.1, SUPPORTED), ("<", 0.1, 0.5, CONTRADICTED), ("<", -0.1, 0.1, INCONCLUSIVE),
        (">=", -0.1, 0.5, SUPPORTED), (">=", -0.5, -0.3, CONTRADICTED), (">=", -0.3, 0.1, INCONCLUSIVE),
        ("<=", -1.0, 0.1, SUPPORTED), ("<=", 0.3, 0.5, CONTRADICTED), ("<=", 0.1, 0.3, INCONCLUSIVE),
        ("~", -0.1, 0.1, SUPPORTED), ("~", 0.3, 0.4, CONTRADICTED), ("~", -0.4, -0.3, CONTRADICTED),
        ("~", -0.1, 0.3, INCONCLUSIVE), ("~", -0.3, 0.3, INCONCLUSIVE),
    ],
)
def test_verdict_rules(relation, lo, hi, expected):
    assert verdict(ci(lo, hi), relation, margin=0.2) == expected


def test_verdict_without_interval_and_errors():
    assert verdict(describe([3.0]), ">") == INCONCLUSIVE  # one seed: no interval
    with pytest.raises(ValueError, match="Unknown relation '=>'"):
        verdict(ci(0, 1), "=>")
    with pytest.raises(ValueError, match="margin must be >= 0"):
        verdict(ci(0, 1), "~", margin=-0.1)


def test_combine():
    assert combine([SUPPORTED, SUPPORTED]) == SUPPORTED
    assert combine([SUPPORTED, INCONCLUSIVE]) == INCONCLUSIVE
    assert combine([NOT_TESTED, SUPPORTED]) == NOT_TESTED
    assert combine([NOT_TESTED, CONTRADICTED]) == CONTRADICTED
    assert combine([]) == INCONCLUSIVE


def arm(label, acc, sharpness=None):
    return Arm(label, {"final_test_acc": acc, "sharpness": sharpness or {}})


def test_claims_from_arms():
    arms = {
        "sgd": arm("SGD", {0: 80.0, 1: 81.0, 2: 82.0}),
        "sam-all": arm("SAM-all", {0: 82.0, 1: 83.0, 2: 85.0}, {0: 0.20, 1: 0.21, 2: 0.25}),
        "sam-on": arm("SAM-ON", {0: 82.4, 1: 83.6, 2: 85.5}, {0: 0.30, 1: 0.33, 2: 0.31}),
        "no-norm": arm("no-norm", {0: 70.0}),  # one seed only
        "random": arm("random", {5: 80.0}),  # no seed in common with SGD
        "ssam-f": None,
    }
    results = {claim.name: (outcome, parts) for claim, outcome, parts in evaluate_claims(arms, margin=0.2)}
    assert {name: outcome for name, (outcome, _) in results.items()} == {
        "C1": SUPPORTED, "C2": SUPPORTED, "C3": INCONCLUSIVE, "C4": NOT_TESTED, "C5": NOT_TESTED}
    on_vs_all, all_vs_sgd = results["C1"][1]
    assert on_vs_all.paired.differences == pytest.approx((0.4, 0.6, 0.5))  # SAM-ON − SAM-all, seed by seed
    assert on_vs_all.margin == 0.2 and all_vs_sgd.margin == 0.0
    assert on_vs_all.paired.interval.lo == pytest.approx(0.5 - T2 * 0.1 / math.sqrt(3), rel=1e-6)
    assert all_vs_sgd.test == "test acc.: SAM-all > SGD" and all_vs_sgd.arm_a == "SAM-all"
    sharper = results["C2"][1][0]
    assert sharper.part.metric == "sharpness" and sharper.margin == 0.0
    assert sharper.paired.interval.mean == pytest.approx((0.10 + 0.12 + 0.06) / 3)
    assert results["C3"][1][0].note == "one common seed: no interval"
    assert results["C4"][1][0].note == "no seed with test acc. in both random and SGD"
    assert results["C5"][1][0].note == "no SSAM-F arm" and results["C5"][1][0].arm_a == "SAM-ON"

    arms["sam-on"] = Arm("SAM-ON", arms["sam-on"].values, {"sharpness": "measured differently"})
    c2 = next(p for c, _, parts in evaluate_claims(arms, 0.2) if c.name == "C2" for p in parts)
    assert (c2.verdict, c2.note) == (NOT_TESTED, "measured differently")


def test_claim_definitions_name_known_roles_and_relations():
    for claim in stats.CLAIMS:
        for part in claim.parts:
            assert {part.a, part.b} <= set(stats.ROLE_NAMES) and part.relation in stats.RULES
