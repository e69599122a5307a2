"""Text formatting shared by the report's modules: values as table cells, markdown escaping and tables, mean ± std.

A private module of the package: its names are public *within* :mod:`normsam.analysis` (the report's
:mod:`~normsam.analysis.grouping`, :mod:`~normsam.analysis.tables`, :mod:`~normsam.analysis.claims`,
:mod:`~normsam.analysis.precision` and :mod:`~normsam.analysis.report_figures` use them), and nothing here is
user API.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["value_text", "md", "pm", "markdown_table"]


def value_text(value: Any) -> str:
    """A value as it appears in tables and labels ('' for None)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def md(text: str) -> str:
    """Text for a markdown table cell: characters that markdown would interpret are escaped."""
    return "".join("\\" + c if c in "\\`*_|[]<>" else c for c in text)


def pm(mean: float | None, std: float | None, decimals: int) -> str:
    """``mean ± std`` with ``decimals`` decimals; the mean alone when ``std`` is None, '' when ``mean`` is."""
    if mean is None:
        return ""
    return f"{mean:.{decimals}f}" + (f" ± {std:.{decimals}f}" if std is not None else "")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]], numeric_from: int) -> str:
    """A markdown table; columns from ``numeric_from`` on are right-aligned. Cells are used as they are."""
    align = ["---" if i < numeric_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)
