"""The report's tables: CSV rows per arm and per run, and markdown tables.

Part of ``normsam report`` (see :mod:`normsam.analysis.report`).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from typing import Any

from normsam.analysis.grouping import Group, _settings, _text
from normsam.analysis.runs import RunRecord


_STATS = (  # (summary key, column title, decimals)
    ("final_test_acc", "final test acc. (%)", 2),
    ("best_test_acc", "best test acc. (%)", 2),
    ("sharpness", "sharpness", 4),
    ("mean_epoch_time", "s / epoch", 2),
)


def _pm(mean: float | None, std: float | None, decimals: int) -> str:
    if mean is None:
        return ""
    return f"{mean:.{decimals}f}" + (f" ± {std:.{decimals}f}" if std is not None else "")


def _csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return out.getvalue()


def group_rows(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """One row per group for ``table.csv``: the columns, then mean/std/count of every statistic."""
    rows = []
    for g in groups:
        row: dict[str, Any] = {"method": g.label, **{k: _text(v) for k, v in g.columns.items()}}
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
        settings = _settings(r.config)
        s = r.summary or {}
        rows.append({
            "folder": str(r.folder),
            "method": r.config.method,
            **{k: _text(settings.get(k)) for k in keys},
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


def _md(text: str) -> str:
    """Text for a markdown table cell: characters that markdown would interpret are escaped."""
    return "".join("\\" + c if c in "\\`*_|[]<>" else c for c in text)


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]], numeric_from: int) -> str:
    """A markdown table; columns from ``numeric_from`` on are right-aligned. Cells are used as they are."""
    align = ["---" if i < numeric_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def _group_table(groups: Sequence[Group], keys: Sequence[str]) -> str:
    header = ["method", *[("ρ" if k == "rho" else k) for k in keys], *[title for _, title, _ in _STATS], "seeds"]
    rows = []
    for g in groups:
        cells = [_md(g.label), *[_md(_text(g.columns[k])) or "–" for k in keys]]
        for key, _, decimals in _STATS:
            mean, std, count = g.stat(key)
            cell = _pm(mean, std, decimals)
            if key == "sharpness" and cell and count != len(g.runs):
                cell += f" ({count} run{'s' if count > 1 else ''})"
            cells.append(cell)
        cells.append(str(len(g.runs)))
        rows.append(cells)
    return _markdown_table(header, rows, numeric_from=1 + len(keys))
