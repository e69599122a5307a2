"""Precision as a factor of a study: what bf16 autocast costs each arm, and whether SAM changes that cost.

When the runs of a report differ in ``amp`` (fp32 = ``off`` beside ``bf16`` or ``fp16``), every arm that ran
in both precisions gets, paired by seed, the shift of its final test accuracy ``a(amp) − a(fp32)``, and the
shift minus SGD's own shift on the same seeds, ``[a(amp) − a(fp32)] − [SGD(amp) − SGD(fp32)]``: does SAM (or
SAM-ON) change what the lower precision costs? Each with its 95% t-interval (:mod:`normsam.analysis.stats`).
Written by ``normsam report`` as ``precision.csv`` and a *Precision* section of report.md.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from normsam.analysis import stats
from normsam.analysis._format import markdown_table, md
from normsam.analysis.claims import ACCURACY
from normsam.analysis.grouping import Group

__all__ = ["precision_rows", "precision_markdown"]


def _pairs(groups: Sequence[Group]) -> list[tuple[Group, Group, str]]:
    """(fp32 arm, the same arm at another precision, that precision) for every arm run in both."""
    by_rest: dict[str, dict[str, Group]] = {}
    for g in groups:
        amp = g.settings.get("amp", "off")
        if g.settings.get("bf16_kernels", "native") != "native":  # the same bf16 arithmetic on other kernels
            amp += f" (bf16_kernels={g.settings['bf16_kernels']})"
        rest = {k: v for k, v in g.columns.items() if k not in ("amp", "bf16_kernels")}
        by_rest.setdefault(json.dumps(rest, sort_keys=True, default=str), {})[amp] = g
    return [(arms["off"], other, amp) for arms in by_rest.values() if "off" in arms
            for amp, other in arms.items() if amp != "off"]


def _shift(low: Group, full: Group) -> dict[int, float]:
    a, b = low.per_seed(ACCURACY), full.per_seed(ACCURACY)
    return {s: a[s] - b[s] for s in a.keys() & b.keys()}


def precision_rows(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """One row per arm and lower precision for ``precision.csv`` (empty when no arm ran in two precisions)."""
    pairs = _pairs(groups)
    sgd = {amp: _shift(low, full) for full, low, amp in pairs if full.columns.get("scope") == "none"}
    rows = []
    for full, low, amp in pairs:
        shift = _shift(low, full)
        row: dict[str, Any] = {"arm": full.label, "precision": amp, "reference": "fp32 (amp=off)"}
        interval = stats.describe(shift[s] for s in sorted(shift))
        row.update({"shift_n": interval.n, "shift_mean": interval.mean, "shift_ci_low": interval.lo,
                    "shift_ci_high": interval.hi})
        relative = None
        if full.columns.get("scope") != "none" and amp in sgd:
            common = sorted(shift.keys() & sgd[amp].keys())
            relative = stats.describe(shift[s] - sgd[amp][s] for s in common)
        row.update({"vs_sgd_n": relative.n if relative else None, "vs_sgd_mean": relative.mean if relative else None,
                    "vs_sgd_ci_low": relative.lo if relative else None,
                    "vs_sgd_ci_high": relative.hi if relative else None})
        rows.append(row)
    return rows


def precision_markdown(groups: Sequence[Group]) -> str:
    """The *Precision* section of report.md, or "" when no arm ran in two precisions."""
    rows = precision_rows(groups)
    if not rows:
        return ""

    def text(row: dict[str, Any], prefix: str) -> str:
        if row[f"{prefix}_n"] in (None, 0):
            return "–"
        interval = stats.Interval(row[f"{prefix}_n"], row[f"{prefix}_mean"], None, row[f"{prefix}_ci_low"],
                                  row[f"{prefix}_ci_high"])
        return f"{interval.text(2, signed=True)} (n={interval.n})"

    cells = [[md(r["arm"]), r["precision"], text(r, "shift"), text(r, "vs_sgd")] for r in rows]
    return "\n".join([
        "## Precision", "",
        "What the lower precision costs each arm that ran in both, paired by seed: the shift of the final test "
        "accuracy against fp32, and that shift minus SGD's on the same seeds (does SAM change what the precision "
        "costs?); mean [95% CI] in points. Table: [precision.csv](precision.csv).", "",
        markdown_table(["arm (fp32 label)", "precision", "shift vs fp32", "shift minus SGD's shift"], cells,
                       numeric_from=2), "",
    ])
