"""Plots (matplotlib, headless): curves per epoch and other figures of the reports."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen needed
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

__all__ = ["plot_curves", "method_colors", "plot_series_panels", "plot_scatter", "plot_quantile_bands"]


def plot_curves(
    curves: Mapping[str, Sequence[float]],
    path: str | Path,
    *,
    ylabel: str,
    title: str = "",
    xlabel: str = "epoch",
) -> Path:
    """One line per label, x = 1, 2, …; saved as PNG."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for label, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # epochs are whole numbers
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------------
# Figures of `normsam report`. Each takes plain data (labels → numbers), so it can be used on its own.

#: One line of a panel: x values, means and standard deviations (None: no error bars / band).
Series = tuple[Sequence[float], Sequence[float], Sequence[float] | None]


def method_colors(labels: Sequence[str]) -> dict[str, str]:
    """A colour per label, stable for a given list (tab10, then tab20), so every figure colours alike."""
    palette = [matplotlib.colors.to_hex(c) for c in plt.get_cmap("tab10").colors]
    palette += [matplotlib.colors.to_hex(c) for c in plt.get_cmap("tab20").colors[1::2]]
    return {label: palette[i % len(palette)] for i, label in enumerate(labels)}


def _panels(n: int, *, width: float = 5.2, height: float = 4.0):
    """A figure with ``n`` axes in rows of at most three; returns (figure, flat list of the n axes)."""
    ncols = min(n, 3)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), dpi=110, squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _wants_log_x(panels: Mapping[str, Mapping[str, Series]]) -> bool:
    """Log scale when every x is positive and they span at least a factor of 10 (as ρ grids do)."""
    xs = [float(x) for lines in panels.values() for s in lines.values() for x in s[0]]
    return bool(xs) and min(xs) > 0 and max(xs) / min(xs) >= 10


def plot_series_panels(
    panels: Mapping[str, Mapping[str, Series]],
    path: str | Path,
    *,
    xlabel: str,
    ylabel: str | Mapping[str, str],
    style: str = "errorbar",
    baselines: Mapping[str, Mapping[str, float]] | None = None,
    log_x: bool | None = None,
    integer_x: bool = False,
    colors: Mapping[str, str] | None = None,
) -> Path:
    """One panel per key of ``panels`` (its title), one line per label with its spread over seeds.

    Args:
        panels: title → label → ``(x, mean, std)``; ``std`` may be None (or hold None) where unknown.
        style: ``"errorbar"`` (markers with error bars; a single point per line is fine) or ``"band"``
            (a line with a shaded ±std band).
        baselines: title → label → value, drawn as horizontal dashed lines (e.g. SGD's mean accuracy).
        ylabel: one label for every panel, or title → label.
        log_x: logarithmic x axis; default when all x are positive and span a factor of 10 or more.
        integer_x: ticks at integers only (epochs).
        colors: label → colour (see :func:`method_colors`); default matplotlib's cycle.
    """
    if style not in ("errorbar", "band"):
        raise ValueError(f"style must be 'errorbar' or 'band', got {style!r}.")
    log_x = _wants_log_x(panels) if log_x is None else log_x
    fig, axes = _panels(max(1, len(panels)))
    for ax, (title, lines) in zip(axes, panels.items()):
        for label, (x, mean, std) in lines.items():
            color = (colors or {}).get(label)
            spread = [0.0 if s is None else s for s in std] if std is not None else None
            if style == "errorbar":
                ax.errorbar(x, mean, yerr=spread, marker="o", markersize=5, capsize=3, label=label, color=color)
            else:
                (line,) = ax.plot(x, mean, label=label, color=color)
                if spread is not None:
                    lo = [m - s for m, s in zip(mean, spread)]
                    hi = [m + s for m, s in zip(mean, spread)]
                    ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        for label, value in ((baselines or {}).get(title) or {}).items():
            ax.axhline(value, linestyle="--", color=(colors or {}).get(label, "0.3"), label=label)
        if log_x:  # ticks at the values used (a ρ grid), not at powers of ten
            ax.set_xscale("log")
            ticks = sorted({float(x) for s in lines.values() for x in s[0]})
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        elif integer_x:
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel if isinstance(ylabel, str) else ylabel.get(title, ""))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    return _save(fig, path)


def plot_scatter(
    points: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    colors: Mapping[str, str] | None = None,
) -> Path:
    """One point per ``(x, y)``, coloured by label (e.g. sharpness vs test accuracy, a point per run)."""
    fig, (ax,) = _panels(1, width=6.4)
    for label, xy in points.items():
        ax.scatter([p[0] for p in xy], [p[1] for p in xy], label=label, color=(colors or {}).get(label), s=36)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3)
    if points:
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_quantile_bands(
    panels: Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]],
    path: str | Path,
    *,
    xlabel: str = "epoch",
    colors: Mapping[str, str] | None = None,
) -> Path:
    """Distributions over time: per label, the median as a line with 5–95% (light) and 25–75% (darker) bands.

    ``panels``: title → label → ``{"x": [...], "0.05": [...], "0.25": [...], "0.5": [...], "0.75": [...],
    "0.95": [...]}`` (the quantile keys of :data:`normsam.analysis.norm_stats.QUANTILES`).
    """
    fig, axes = _panels(max(1, len(panels)), width=6.0)
    for ax, (title, series) in zip(axes, panels.items()):
        for label, q in series.items():
            (line,) = ax.plot(q["x"], q["0.5"], label=label, color=(colors or {}).get(label))
            ax.fill_between(q["x"], q["0.05"], q["0.95"], color=line.get_color(), alpha=0.12, linewidth=0)
            ax.fill_between(q["x"], q["0.25"], q["0.75"], color=line.get_color(), alpha=0.28, linewidth=0)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize="small")
    return _save(fig, path)
