"""Plots (matplotlib, headless): curves per epoch and other figures of the reports."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen needed
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

__all__ = ["plot_curves", "method_label", "method_colors", "plot_series_panels", "plot_scatter", "plot_quantile_bands",
           "plot_estimates", "plot_estimate_scatter", "plot_interval_bands"]


def plot_curves(
    curves: Mapping[str, Sequence[float | None]],
    path: str | Path,
    *,
    ylabel: str,
    title: str = "",
    xlabel: str = "epoch",
) -> Path:
    """One line per label, x = 1, 2, … (None: not measured that epoch, skipped); saved as PNG."""
    fig, (ax,) = _panels(1, width=6.4)
    for label, values in curves.items():
        points = [(x, v) for x, v in enumerate(values, start=1) if v is not None]
        ax.plot([x for x, _ in points], [v for _, v in points], marker="o", markersize=3 if len(points) > 1 else 7,
                label=method_label(label))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # epochs are whole numbers
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


#: The names of base optimizers and scopes in every table and figure (the report's arm labels use them too).
OPTIMIZER_NAMES = {"sgd": "SGD", "adamw": "AdamW", "lion": "Lion"}
SCOPE_NAMES = {"all": "SAM-all", "norm": "SAM-ON", "no-norm": "no-norm", "random": "random mask",
               "ssam-f": "SSAM-F", "ssam-d": "SSAM-D"}
_METHOD = re.compile(r"^(?P<scope>no-norm|norm|all|random|ssam-f|ssam-d|patterns|\[.*?\])-(?P<perturbation>[a-z0-9_]+)"
                     r"-rho(?P<rho>[0-9.eE+-]+?)(?:-rhowarmup(?P<warmup>[0-9.]+))?(?P<rest>( \(.*\))?)$")


def method_label(label: str) -> str:
    """The name a figure shows for a method label (``TrainConfig.method``, optionally followed by
    `` (settings)``), so that every figure names a method alike: ``norm-asam-rho1`` → ``SAM-ON (asam, ρ=1)``,
    ``all-sam-rho0.4-rhowarmup6`` → ``SAM-all (sam, ρ=0.4, ρ warm-up 6 ep.)``, ``sgd`` → ``SGD``. Other labels
    are returned unchanged."""
    match = _METHOD.match(label)
    if match:
        scope = SCOPE_NAMES.get(match["scope"], match["scope"])
        details = [match["perturbation"], f"ρ={match['rho']}"]
        if match["warmup"]:
            details.append(f"ρ warm-up {match['warmup']} ep.")
        if match["rest"]:
            details.append(match["rest"].strip()[1:-1])
        return f"{scope} ({', '.join(details)})"
    head, _, rest = label.partition(" ")
    return f"{OPTIMIZER_NAMES[head]} {rest}".rstrip() if head in OPTIMIZER_NAMES else label


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
    fig.savefig(path, bbox_inches="tight")  # keeps legends placed outside the axes
    plt.close(fig)
    return path


def _finish_xy(fig, ax, path: str | Path, xlabel: str, ylabel: str, title: str | None, *, legend: bool) -> Path:
    """Labels, title, grid and legend of a one-panel x-y figure, then save it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize="small")
    return _save(fig, path)


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
                ax.errorbar(x, mean, yerr=spread, marker="o", markersize=5, capsize=3, label=method_label(label),
                            color=color)
            else:  # a line of one point is invisible without a marker
                (line,) = ax.plot(x, mean, label=method_label(label), color=color, marker="o" if len(x) == 1 else None)
                if spread is not None:
                    lo = [m - s for m, s in zip(mean, spread)]
                    hi = [m + s for m, s in zip(mean, spread)]
                    ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        for label, value in ((baselines or {}).get(title) or {}).items():
            ax.axhline(value, linestyle="--", color=(colors or {}).get(label, "0.3"), label=method_label(label))
        ticks = sorted({float(x) for s in lines.values() for x in s[0]})
        if log_x:  # ticks at the values used (a ρ grid), not at powers of ten
            ax.set_xscale("log")
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        elif integer_x:
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        elif 0 < len(ticks) <= 6:  # a few values (one ρ, a short grid): ticks at them, not at 0.96 … 1.04
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
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
        ax.scatter([p[0] for p in xy], [p[1] for p in xy], label=method_label(label), color=(colors or {}).get(label),
                   s=36)
    return _finish_xy(fig, ax, path, xlabel, ylabel, title, legend=bool(points))


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
    styles = ("-", "--", "-.", ":")
    for ax, (title, series) in zip(axes, panels.items()):
        # Medians often coincide (γ and β move little): each gets its own dash pattern and is drawn above
        # every band, so that no method's line hides under another's band or line.
        for i, (label, q) in enumerate(series.items()):
            (line,) = ax.plot(q["x"], q["0.5"], label=method_label(label), color=(colors or {}).get(label),
                              linestyle=styles[i % len(styles)], linewidth=1.8, zorder=3 + 0.01 * i,
                              marker="o" if len(q["x"]) == 1 else None)
            ax.fill_between(q["x"], q["0.05"], q["0.95"], color=line.get_color(), alpha=0.10, linewidth=0, zorder=1)
            ax.fill_between(q["x"], q["0.25"], q["0.75"], color=line.get_color(), alpha=0.22, linewidth=0, zorder=1)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize="small")
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------------
# Statistics figures of `normsam report`: means with 95% confidence intervals over seeds.

#: A mean and its interval ``(mean, low, high)``; low/high are None where the interval is undefined (one seed).
Estimate = tuple[float, float | None, float | None]


def _error(estimate: Estimate) -> list[list[float]] | None:
    """matplotlib's asymmetric error-bar lengths ``[[below], [above]]``, None without an interval (no caps)."""
    mean, lo, hi = estimate
    return None if lo is None or hi is None else [[mean - lo], [hi - mean]]


def plot_estimates(
    panels: Mapping[str, Mapping[str, Estimate]],
    path: str | Path,
    *,
    xlabel: str,
    references: Mapping[str, Mapping[str, float]] | None = None,
    colors: Mapping[str, str] | None = None,
) -> Path:
    """One row per label (top to bottom in the given order): its mean as a dot, its interval as an error bar.

    Args:
        panels: title → label → :data:`Estimate` (a panel per title, e.g. per data set).
        references: title → name → value, drawn as vertical dashed lines (e.g. SGD's mean).
        colors: label → colour (see :func:`method_colors`).
    """
    rows = max((len(p) for p in panels.values()), default=1)
    fig, axes = _panels(max(1, len(panels)), width=7.5, height=1.4 + 0.38 * rows)
    for ax, (title, estimates) in zip(axes, panels.items()):
        labels = list(estimates)
        for y, label in enumerate(labels):
            mean, lo, hi = estimates[label]
            ax.errorbar([mean], [y], xerr=_error(estimates[label]), fmt="o" if lo is not None else "x",
                        markersize=6, capsize=4, color=(colors or {}).get(label, "C0"))
        for i, (name, value) in enumerate(((references or {}).get(title) or {}).items()):
            ax.axvline(value, linestyle="--", color=f"{0.3 + 0.2 * i:.1f}", label=name)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_ylim(len(labels) - 0.5, -0.5)  # the first label on top
        # proxies for the legend: what a dot with a bar and a cross mean
        ax.errorbar([], [], xerr=[[], []], fmt="o", capsize=4, color="0.2", label="mean, 95% CI over seeds")
        if any(lo is None for _, lo, _ in estimates.values()):
            ax.plot([], [], "x", color="0.2", label="one seed (no interval)")
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="x")
        # below the axes: inside, it covers the top arm's bar whatever corner it picks
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=3, frameon=False)
    return _save(fig, path)


def plot_estimate_scatter(
    points: Mapping[str, tuple[Estimate, Estimate]],
    path: str | Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    colors: Mapping[str, str] | None = None,
) -> Path:
    """One point per label at (mean x, mean y) with error bars in both directions (e.g. sharpness vs
    accuracy per arm, each with its 95% CI over seeds)."""
    fig, (ax,) = _panels(1, width=7.5, height=5.0)
    for label, (x, y) in points.items():
        ax.errorbar([x[0]], [y[0]], xerr=_error(x), yerr=_error(y), fmt="o", markersize=6, capsize=4,
                    label=label, color=(colors or {}).get(label))
    return _finish_xy(fig, ax, path, xlabel, ylabel, title, legend=bool(points))


def plot_interval_bands(
    panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float | None],
                                             Sequence[float | None]]]],
    path: str | Path,
    *,
    xlabel: str = "epoch",
    ylabel: str,
    colors: Mapping[str, str] | None = None,
) -> Path:
    """Curves with their interval as a band: title → label → ``(x, mean, low, high)``; low/high may hold None
    (no band there, e.g. one seed)."""
    fig, axes = _panels(max(1, len(panels)), width=8.4, height=4.4)
    for ax, (title, series) in zip(axes, panels.items()):
        for label, (x, mean, lo, hi) in series.items():
            (line,) = ax.plot(x, mean, label=label, color=(colors or {}).get(label))
            known = [i for i in range(len(x)) if lo[i] is not None and hi[i] is not None]
            if known:
                ax.fill_between([x[i] for i in known], [lo[i] for i in known], [hi[i] for i in known],
                                color=line.get_color(), alpha=0.18, linewidth=0)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if series:  # outside, on the right: many overlapping bands leave no free corner
            ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)
