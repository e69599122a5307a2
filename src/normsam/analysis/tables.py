"""The report's tables: CSV rows per arm and per run, and markdown tables.

Part of ``normsam report`` (see :mod:`normsam.analysis.report`).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

from normsam.analysis._format import markdown_table, md, pm, value_text
from normsam.analysis.grouping import Group, arm_settings
from normsam.analysis.runs import RunRecord

__all__ = ["csv_text", "group_rows", "run_rows", "group_table"]


_STATS = (  # (summary key, column title, decimals)
    ("final_test_acc", "final test acc. (%)", 2),
    ("best_test_acc", "best test acc. (%)", 2),
    ("sharpness", "sharpness", 4),
    ("mean_epoch_time", "s / epoch", 2),
)


def csv_text(rows: list[dict[str, Any]]) -> str:
    """The rows (dicts with the same keys, in column order) as CSV text with a header line; None is written
    as an empty cell. No rows: an empty header line."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return out.getvalue()


def group_rows(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """One row per group for ``table.csv``: the columns, then mean/std/count of every statistic."""
    rows = []
    for g in groups:
        row: dict[str, Any] = {"method": g.label, **{k: value_text(v) for k, v in g.columns.items()}}
        for key, _, _ in _STATS:
            mean, std, count = g.stat(key)
            row.update({f"{key}_mean": mean, f"{key}_std": std})
            if key == "sharpness":
                row["sharpness_runs"] = count
        row["seeds"] = len(g.runs)
        row["seed_list"] = " ".join(map(str, g.seeds))
        rows.append(row)
    return rows


def run_rows(runs: Sequence[RunRecord], keys: Sequence[str]) -> list[dict[str, Any]]:
    """One row per run for ``runs.csv``."""
    rows = []
    for r in runs:
        settings = arm_settings(r.config)
        s = r.summary or {}
        rows.append({
            "folder": str(r.folder),
            "method": r.config.method,
            **{k: value_text(settings.get(k)) for k in keys},
            "seed": r.config.seed,
            "status": "finished" if r.finished else "unfinished",
            "epochs_done": len(r.metrics),
            "epochs": r.config.epochs,
            "final_test_acc": s.get("final_test_acc"),
            "best_test_acc": s.get("best_test_acc"),
            "sharpness": r.sharpness["sharpness"] if r.sharpness else None,
            "mean_epoch_time": s.get("mean_epoch_time"),
        })
    return rows


def group_table(groups: Sequence[Group], keys: Sequence[str]) -> str:
    """The per-method table of report.md (markdown): the ``keys`` columns, then mean ± std of every statistic
    (with the count of runs measured where not every run has a sharpness) and the number of seeds."""
    header = ["method", *[("ρ" if k == "rho" else k) for k in keys], *[title for _, title, _ in _STATS], "seeds"]
    rows = []
    for g in groups:
        cells = [md(g.label), *[md(value_text(g.columns[k])) or "–" for k in keys]]
        for key, _, decimals in _STATS:
            mean, std, count = g.stat(key)
            cell = pm(mean, std, decimals)
            if key == "sharpness" and cell and count != len(g.runs):
                cell += f" ({count} run{'s' if count > 1 else ''})"
            cells.append(cell)
        cells.append(str(len(g.runs)))
        rows.append(cells)
    return markdown_table(header, rows, numeric_from=1 + len(keys))
