"""The report's figures from grouped runs (per method) and from the claims' contexts (per arm, 95% CIs).

Part of ``normsam report`` (see :mod:`normsam.analysis.report`); the drawing itself is in
:mod:`normsam.analysis.plots`.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from normsam.analysis import plots, stats
from normsam.analysis._format import value_text
from normsam.analysis.claims import ACCURACY, Context
from normsam.analysis.grouping import METHOD_KEYS, Group, arm_label, mean_std, without_context
from normsam.analysis.run_sharpness import SETTINGS as SHARPNESS_SETTINGS
from normsam.train import checkpoint as ckpt

__all__ = [
    "sharpness_description", "accuracy_vs_rho_figure", "sharpness_vs_accuracy_figure", "norm_params_figure",
    "training_curves_figure", "arm_accuracy_figure", "arm_sharpness_vs_accuracy_figure", "arm_test_curves_figure",
]


_QUANTILES = ("0.05", "0.25", "0.5", "0.75", "0.95")


def accuracy_vs_rho_figure(groups: Sequence[Group], keys: Sequence[str], path: Path) -> Path | None:
    """``accuracy_vs_rho.png``: final test accuracy (mean ± std over seeds) against ρ, written to ``path``
    (returned; None, and nothing written, without SAM runs). A panel per (perturbation, other settings); a line
    per scope (and optimizer, when several); the runs without SAM with the same other settings as dashed lines."""
    several_optimizers = len({g.columns["optimizer"] for g in groups}) > 1

    def context(g: Group) -> str:
        return ", ".join(f"{k}={value_text(g.columns[k])}" for k in keys if k not in METHOD_KEYS)

    panels: dict[str, dict[str, list[tuple[float, float, float | None]]]] = {}
    contexts: dict[str, str] = {}  # panel title → its other settings
    for g in groups:
        mean, std, _ = g.stat("final_test_acc")
        scope = g.columns["scope"]
        if scope == "none" or mean is None:
            continue
        title = ", ".join(filter(None, [f"perturbation {g.columns['perturbation']}", context(g)]))
        contexts[title] = context(g)
        line = arm_label({"scope": scope, "optimizer": g.columns["optimizer"] if several_optimizers else None},
                         rho=False)
        panels.setdefault(title, {}).setdefault(line, []).append((g.columns["rho"], mean, std))
    if not panels:
        return None
    baselines: dict[str, dict[str, float]] = {}
    for g in groups:
        mean = g.stat("final_test_acc")[0]
        if g.columns["scope"] == "none" and mean is not None:
            for title, ctx in contexts.items():
                if ctx == context(g):
                    baselines.setdefault(title, {})[f"{arm_label(g.columns)} (no SAM)"] = mean
    series = {
        title: {label: tuple(map(list, zip(*sorted(pts, key=lambda p: p[0])))) for label, pts in lines.items()}
        for title, lines in panels.items()
    }
    colors = plots.method_colors(sorted({label for lines in series.values() for label in lines}))
    colors.update({label: "0.25" for b in baselines.values() for label in b})
    return plots.plot_series_panels(
        series, path, xlabel="ρ", ylabel="final test accuracy (%)", baselines=baselines, colors=colors
    )


def sharpness_description(measurements: Sequence[dict[str, Any]]) -> str:
    """The settings of the measurements in words, or a warning that they differ."""
    settings = {json.dumps({k: m.get(k) for k in SHARPNESS_SETTINGS}, sort_keys=True) for m in measurements}
    if len(settings) > 1:
        return "sharpness (the settings differ between runs: see runs.csv and each sharpness.json)"
    m = measurements[0]
    return (f"{m['kind']}-case {'adaptive ' if m['adaptive'] else ''}{m['norm']} sharpness, ρ={m['rho']:g}, "
            f"{m['steps']} steps, m={m['m']}, n={m.get('examples', m['n'])}, scope {m['scope']}"
            + (", logit-normalized" if m["logit_normalize"] else ""))


def sharpness_vs_accuracy_figure(groups: Sequence[Group], path: Path, colors: dict[str, str]) -> Path | None:
    """``sharpness_vs_accuracy.png``: one point per run with a sharpness measurement (its latest) against its final
    test accuracy, coloured by method (``colors``: label → colour); None, and nothing written, without one."""
    points = {
        g.label: [(r.sharpness["sharpness"], r.summary["final_test_acc"]) for r in g.runs if r.sharpness and r.summary]
        for g in groups
    }
    points = {label: xy for label, xy in points.items() if xy}
    if not points:
        return None
    measured = [r.sharpness for g in groups for r in g.runs if r.sharpness]
    return plots.plot_scatter(
        points, path, xlabel="sharpness (worst loss − clean loss)", ylabel="final test accuracy (%)",
        title=sharpness_description(measured), colors=colors,
    )


def _mean_over_runs(per_run: Sequence[dict[int, float]]) -> tuple[list[int], list[float]]:
    """Epochs present in every run, and the mean value over the runs at each."""
    common = sorted(set.intersection(*(set(v) for v in per_run))) if per_run else []
    return common, [statistics.fmean(v[e] for v in per_run) for e in common]


def norm_params_figure(groups: Sequence[Group], path: Path, colors: dict[str, str]) -> Path | None:
    """``norm_params.png``: pooled γ/β quantiles per epoch (from norm_stats.jsonl), averaged over the seeds of each
    group; None, and nothing written, when no run has norm statistics."""
    titles = {"gamma": "γ of the norm layers (pooled)", "beta": "β of the norm layers (pooled)"}
    panels: dict[str, dict[str, dict[str, list[float]]]] = {title: {} for title in titles.values()}
    for g in groups:
        records = [ckpt.read_jsonl(r.folder / ckpt.NORM_STATS) for r in g.runs]
        for kind, title in titles.items():
            quantiles: dict[str, list[float]] = {}
            for q in _QUANTILES:
                per_run = [{rec["epoch"]: rec["pooled"][kind]["quantiles"][q]
                            for rec in recs if kind in rec.get("pooled", {})} for recs in records]
                per_run = [v for v in per_run if v]
                if not per_run:
                    break
                quantiles["x"], quantiles[q] = _mean_over_runs(per_run)
            if quantiles.get("x"):
                panels[title][g.label] = quantiles
    panels = {title: series for title, series in panels.items() if series}
    if not panels:
        return None
    return plots.plot_quantile_bands(panels, path, colors=colors)


def _per_epoch(g: Group, key: str) -> tuple[list[int], list[dict[int, float]]]:
    """The epochs at which every run of the group (that logged ``key`` at all) logged it, and each such run's
    values by epoch (from metrics.jsonl)."""
    per_run = [{row["epoch"]: row[key] for row in r.metrics if row.get(key) is not None} for r in g.runs]
    per_run = [v for v in per_run if v]
    return (sorted(set.intersection(*(set(v) for v in per_run))) if per_run else []), per_run


def training_curves_figure(groups: Sequence[Group], path: Path, colors: dict[str, str]) -> Path | None:
    """``training_curves.png``: train loss and test accuracy per epoch, mean ± std over the seeds of each group;
    None, and nothing written, without per-epoch metrics."""
    curves = {"train loss": "train_loss", "test accuracy (%)": "test_acc"}
    panels: dict[str, dict[str, plots.Series]] = {title: {} for title in curves}
    for g in groups:
        for title, key in curves.items():
            epochs, per_run = _per_epoch(g, key)
            if not epochs:
                continue
            spread = [mean_std(v[e] for v in per_run) for e in epochs]
            panels[title][g.label] = (epochs, [s[0] for s in spread], [s[1] for s in spread])
    panels = {title: series for title, series in panels.items() if series}
    if not panels:
        return None
    return plots.plot_series_panels(
        panels, path, xlabel="epoch", ylabel={t: t for t in panels}, style="band", log_x=False, integer_x=True,
        colors=colors
    )


def _in_panel(ctx: Context, g: Group, colors: dict[str, str], panel_colors: dict[str, str]) -> str:
    """The arm's label in its context's panel, without the settings the panel's title names (long labels
    would squeeze the axes), with the arm's colour carried over to that label."""
    label = without_context(g.label, ctx.title)
    if g.label in colors:
        panel_colors.setdefault(label, colors[g.label])
    return label


def arm_accuracy_figure(contexts: Sequence[Context], path: Path, colors: dict[str, str]) -> Path | None:
    """``arm_accuracy.png``: final test accuracy per arm with its 95% t-interval, a panel per context, the SGD
    arm's mean as a reference line; None, and nothing written, without an accuracy."""
    panels: dict[str, dict[str, plots.Estimate]] = {}
    references: dict[str, dict[str, float]] = {}
    panel_colors: dict[str, str] = {}
    for ctx in contexts:
        title = f"final test accuracy per arm{f' — {ctx.title}' if ctx.title else ''}"
        for g in ctx.groups:
            acc = g.interval(ACCURACY)
            if acc.mean is not None:
                panels.setdefault(title, {})[_in_panel(ctx, g, colors, panel_colors)] = (acc.mean, acc.lo, acc.hi)
        sgd = ctx.roles["sgd"].group
        if sgd is not None and sgd.stat(ACCURACY)[0] is not None:
            references[title] = {f"{without_context(sgd.label, ctx.title)} mean": sgd.stat(ACCURACY)[0]}
    if not panels:
        return None
    return plots.plot_estimates(panels, path, xlabel="final test accuracy (%)", references=references,
                                colors=panel_colors)


def arm_sharpness_vs_accuracy_figure(groups: Sequence[Group], path: Path, colors: dict[str, str]) -> Path | None:
    """``arm_sharpness_vs_accuracy.png``: per arm with a sharpness, mean sharpness against mean final test
    accuracy, each with its 95% t-interval; None, and nothing written, without such an arm."""
    points = {}
    for g in groups:
        sharp, acc = g.interval("sharpness"), g.interval(ACCURACY)
        if sharp.mean is not None and acc.mean is not None:
            points[g.label] = ((sharp.mean, sharp.lo, sharp.hi), (acc.mean, acc.lo, acc.hi))
    if not points:
        return None
    measured = [r.sharpness for g in groups for r in g.runs if r.sharpness]
    title = sharpness_description(measured) if measured else "sharpness (summary.json)"
    return plots.plot_estimate_scatter(points, path, xlabel="sharpness (worst loss − clean loss)",
                                       ylabel="final test accuracy (%)", title=title, colors=colors)


def arm_test_curves_figure(contexts: Sequence[Context], path: Path, colors: dict[str, str]) -> Path | None:
    """``arm_test_curves.png``: test accuracy per epoch per arm, mean over the seeds and 95% t-interval band, a
    panel per context; None, and nothing written, without per-epoch test accuracy."""
    panels: dict[str, dict[str, tuple[list, list, list, list]]] = {}
    panel_colors: dict[str, str] = {}
    for ctx in contexts:
        title = f"test accuracy, mean and 95% CI{f' — {ctx.title}' if ctx.title else ''}"
        for g in ctx.groups:
            epochs, per_run = _per_epoch(g, "test_acc")
            if not epochs:
                continue
            cis = [stats.describe(v[e] for v in per_run) for e in epochs]
            panels.setdefault(title, {})[_in_panel(ctx, g, colors, panel_colors)] = (
                epochs, [c.mean for c in cis], [c.lo for c in cis], [c.hi for c in cis])
    if not panels:
        return None
    return plots.plot_interval_bands(panels, path, ylabel="test accuracy (%)", colors=panel_colors)
