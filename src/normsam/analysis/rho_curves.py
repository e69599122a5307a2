"""Validation accuracy against ρ, one curve per pilot arm, with the collapse marked: where SAM stops training.

A pilot (:mod:`normsam.analysis.study`) records every arm's validation accuracy per ρ and seed in
``choice.json``. This module draws them (mean over seeds, each seed a dot; ρ on a log axis) and finds each arm's
**collapse**: the smallest ρ above the arm's best whose mean validation accuracy has fallen at least half-way
from the best to chance (``chance + (best − chance) / 2``), i.e. where a larger radius no longer just costs
accuracy but stops the network from fitting. An arm whose grid never gets there has no collapse in range, and
the table says so: the grid did not reach past it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["CHANCE", "curves", "collapse_rho", "rho_curves_markdown", "rho_curves_figure"]

#: Chance accuracy (%) of the known data sets' classes; others count from 0.
CHANCE = {"fashion-mnist": 10.0, "mnist": 10.0, "cifar10": 10.0, "cifar100": 1.0}


def curves(choice: Mapping[str, Any]) -> dict[str, list[tuple[float, list[float]]]]:
    """``{arm: [(ρ, [value per seed]), ...]}`` sorted by ρ, from a ``choice.json``'s ``choice``."""
    return {key: sorted((float(rho), [float(v) for v in values]) for rho, values in entry["candidates"].items())
            for key, entry in choice.items()}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def collapse_rho(curve: list[tuple[float, list[float]]], chance: float = 0.0) -> float | None:
    """The smallest ρ above the best whose mean is at or below half-way from the best to ``chance``."""
    means = [(rho, _mean(values)) for rho, values in curve]
    best_rho, best = max(means, key=lambda item: item[1])
    threshold = chance + (best - chance) / 2
    return next((rho for rho, mean in means if rho > best_rho and mean <= threshold), None)


def rho_curves_markdown(choice: Mapping[str, Any], chance: float = 0.0, names: Mapping[str, str] | None = None) -> str:
    """A table per arm: the chosen ρ, its mean, the grid's range and the collapse (or that the grid stops short)."""
    names = names or {}
    lines = ["| arm | ρ grid | chosen ρ (mean val. acc.) | collapse: first ρ at ≤ half-way to chance (mean) |",
             "|---|---|---:|---:|"]
    for key, curve in curves(choice).items():
        means = {rho: _mean(values) for rho, values in curve}
        chosen = float(choice[key]["rho"])
        collapse = collapse_rho(curve, chance)
        where = f"{collapse:g} ({means[collapse]:.1f})" if collapse is not None else "none in the grid"
        grid = f"{curve[0][0]:g} – {curve[-1][0]:g} ({len(curve)} values)"
        lines.append(f"| {names.get(key, key)} | {grid} | {chosen:g} ({means[chosen]:.1f}) | {where} |")
    return "\n".join(lines) + "\n"


def rho_curves_figure(choice: Mapping[str, Any], path: str | Path, *, chance: float = 0.0,
                      names: Mapping[str, str] | None = None, title: str = "") -> Path:
    """Mean validation accuracy against ρ per arm (each seed a dot), the chosen ρ circled, the collapse marked
    with a cross and a dotted line; written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = names or {}
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for key, curve in curves(choice).items():
        rhos = [rho for rho, _ in curve]
        line = ax.plot(rhos, [_mean(v) for _, v in curve], marker="o", label=names.get(key, key))[0]
        color = line.get_color()
        for rho, values in curve:
            ax.scatter([rho] * len(values), values, color=color, s=12, alpha=0.5)
        chosen = float(choice[key]["rho"])
        ax.scatter([chosen], [_mean(dict(curve)[chosen])], s=160, facecolors="none", edgecolors=color, linewidths=2)
        collapse = collapse_rho(curve, chance)
        if collapse is not None:
            ax.axvline(collapse, color=color, linestyle=":", linewidth=1)
            ax.scatter([collapse], [_mean(dict(curve)[collapse])], marker="x", s=90, color=color, linewidths=2)
    if chance:
        ax.axhline(chance, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("ρ (log scale)")
    ax.set_ylabel("final validation accuracy (%)")
    ax.set_title(title or "Validation accuracy against ρ (circle: chosen; cross and dotted line: collapse)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
