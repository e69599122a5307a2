"""``normsam report RUN_DIR... --out DIR``: tables and plots from run folders.

The arguments are run folders or folders that contain them (searched recursively for ``config.yaml`` next
to ``metrics.jsonl`` or ``environment.json``). Finished runs (with ``summary.json``) are grouped by method
(optimizer, scope, perturbation, ρ, plus every other setting that differs between the runs, such as the
data or the model; seeds and purely technical settings like ``threads`` do not split groups, and the SAM
settings of runs without SAM are ignored) and summarized as mean ± sample standard deviation over the seeds.
Such a group is an *arm*, named by :func:`arm_label` in every table and figure (``SGD``, ``SAM-ON (ρ=0.5)``,
``random mask (ρ=0.5, sparsity 0.9995)``, ``SAM-ON (ρ=0.5, late from epoch 6)``). Unfinished runs are listed
but not counted.

Statistics and claims (:mod:`normsam.analysis.stats`): per arm the mean, standard deviation and 95% t-interval
over seeds; differences paired by seed against the SGD and SAM-all arms; and the paper's claims C1–C5, each
*supported*, *contradicted*, *inconclusive* or *not tested*. Arms are compared only with arms of the same
context (the settings other than SAM's that differ between runs: data, model, base optimizer, …). Each role
of the claims (sgd, sam-all, sam-on, no-norm, random, ssam-f) is played by one arm per context: the one named
in a ``claims.yaml`` in a folder given to the report (see :func:`load_claims_selection`; it also sets the
margin δ), else the arm of the role's scope with SAM over the whole training, the highest sparsity for the
mask scopes, and the best mean validation accuracy (the best mean test accuracy, said so in the report,
when the runs have no validation split).

Written into ``--out``:

* ``report.md``: the table, the figures, the statistics, the claims, the list of runs and the commands that
  reproduce them;
* ``table.csv``: one row per method group; ``runs.csv``: one row per run;
* ``accuracy_vs_rho.png``: final test accuracy vs ρ, one panel per perturbation model, one line per scope
  (SAM-all, SAM-ON, no-norm, …) with error bars over seeds, and the mean of the runs without SAM as a
  dashed line (the paper's teaser); with a single ρ the lines are single points;
* ``sharpness_vs_accuracy.png``: one point per run with a sharpness measurement (the latest in its
  ``sharpness.json``), coloured by method;
* ``norm_params.png``: the pooled γ and β of the normalization layers over the epochs (median, 25–75% and
  5–95% bands; quantiles averaged over seeds), a line per method;
* ``training_curves.png``: train loss and test accuracy per epoch, mean ± std over seeds, a line per method;
* ``arms.csv`` (per arm: mean, std, 95% CI of test and validation accuracy and sharpness; the roles it plays),
  ``paired.csv`` (arm − SGD and arm − SAM-all, paired by seed), ``claims.csv`` (each part of each claim: the
  arms, the paired difference with its interval, the rule and the verdict);
* ``arm_accuracy.png`` (final test accuracy per arm with its 95% CI), ``arm_sharpness_vs_accuracy.png``
  (mean sharpness vs mean accuracy per arm, both with 95% CIs), ``arm_test_curves.png`` (test accuracy per
  epoch, mean and 95% CI band per arm).

A figure without data (no SAM runs, no sharpness, no norm layers) is left out.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shlex
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from normsam.analysis import plots, stats
from normsam.analysis.run_sharpness import SETTINGS as SHARPNESS_SETTINGS
from normsam.analysis.run_sharpness import latest_measurement
from normsam.analysis.sweep import SWEEP_FILE
from normsam.optim.scopes import MASK_SCOPES
from normsam.train import checkpoint as ckpt
from normsam.train.config import TrainConfig, config_from_file, config_keys
from normsam.files import read_json
from normsam.train.config_help import SAM_KEYS
from normsam.train.divergence import is_diverged
from normsam.train.identity import check_finished_config

__all__ = [
    "RunRecord", "Group", "load_run", "find_runs", "grouping_keys", "group_runs", "arm_label", "mean_std", "run_value",
    "CLAIMS_FILE", "DEFAULT_MARGIN", "make_report",
]

#: The columns that define a method; further columns appear when other settings differ between runs.
METHOD_KEYS = ("optimizer", "scope", "perturbation", "rho")

#: Settings that never split groups: the seed (we average over it) and settings that do not change results.
_NOT_GROUPED = frozenset({
    "seed", "out", "progress", "threads", "device", "tensorboard", "data_dir", "download", "eval_batch_size",
    "compile", "norm_stats", "sharpness_at_end", "sharpness_rho", "sharpness_steps",
    "sharpness_convention",
})

#: Settings that mean nothing for a run without SAM (scope none); ignored for those runs.
_SAM_KEYS = SAM_KEYS

#: The names of the scopes in every table and figure (see :func:`arm_label`), shared with the plots.
SCOPE_NAMES = plots.SCOPE_NAMES
_OPTIMIZER_NAMES = plots.OPTIMIZER_NAMES
_SCOPE_ORDER = ("none", "all", "norm", "no-norm", "random", "ssam-f", "ssam-d")

_QUANTILES = ("0.05", "0.25", "0.5", "0.75", "0.95")


# --------------------------------------------------------------------------------------------------------
# collecting runs


@dataclass
class RunRecord:
    """What a run folder holds: config, metrics, summary (None until finished), latest sharpness."""

    folder: Path
    config: TrainConfig
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] | None
    sharpness: dict[str, Any] | None
    #: a measurement of an earlier checkpoint than the finished run's last (not paired with its accuracy)
    stale_sharpness: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def diverged(self) -> bool:
        return is_diverged(self.summary)

    @property
    def status(self) -> str:
        stale = ""
        if self.stale_sharpness is not None:
            stale = (f"; sharpness stale (measured at epoch {self.stale_sharpness.get('epoch')} of "
                     f"{self.summary.get('epochs')}: measure again)")
        if self.diverged:
            return f"diverged (epoch {self.summary['diverged']['epoch']})" + stale
        if self.finished:
            return "finished" + stale
        return f"unfinished ({len(self.metrics)}/{self.config.epochs} epochs)"


def _is_run_folder(folder: Path) -> bool:
    return (folder / ckpt.CONFIG).is_file() and (
        (folder / ckpt.METRICS_JSONL).is_file() or (folder / ckpt.ENVIRONMENT).is_file()
    )


def _run_folders(path: Path) -> list[Path]:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass run folders or folders that contain them.")
    if _is_run_folder(path):
        return [path]
    return sorted(p.parent for p in path.rglob(ckpt.CONFIG) if _is_run_folder(p.parent))


def load_run(folder: str | Path) -> RunRecord:
    """Read one run folder."""
    folder = Path(folder)
    try:
        config = config_from_file(folder / ckpt.CONFIG)
    except ValueError as err:
        raise ValueError(f"{folder}/{ckpt.CONFIG} cannot be read ({err}); remove the folder from the report.") from None
    summary_path = folder / ckpt.SUMMARY
    summary = read_json(summary_path) if summary_path.is_file() else None
    check_finished_config(folder, summary, config)  # numbers labelled with settings they were not trained with
    sharpness, stale = latest_measurement(folder), None
    if sharpness is not None and sharpness.get("sharpness") is None:
        sharpness = None  # not finite (a diverged model): no value to report
    if sharpness is not None and summary is not None and sharpness.get("epoch") != summary.get("epochs"):
        sharpness, stale = None, sharpness  # measured on an earlier checkpoint: never paired with the final accuracy
    return RunRecord(
        folder=folder,
        config=config,
        metrics=ckpt.read_jsonl(folder / ckpt.METRICS_JSONL),
        summary=summary,
        sharpness=sharpness,
        stale_sharpness=stale,
    )


def find_runs(paths: Iterable[str | Path]) -> list[RunRecord]:
    """The runs in ``paths`` (run folders, or folders searched recursively), each once, in path order."""
    folders: dict[Path, None] = {}
    for path in paths:
        for folder in _run_folders(Path(path)):
            folders.setdefault(folder.resolve(), None)
    if not folders:
        raise FileNotFoundError(
            f"No run folders (config.yaml with metrics.jsonl) in {', '.join(map(str, paths))}; train some with "
            "`normsam train` or `normsam sweep`."
        )
    return [load_run(_display_path(folder)) for folder in folders]


def _display_path(folder: Path) -> Path:
    """``folder`` relative to the working directory when it lies below it (shorter in tables)."""
    try:
        return folder.relative_to(Path.cwd().resolve())
    except ValueError:
        return folder


# --------------------------------------------------------------------------------------------------------
# grouping and statistics


def _settings(cfg: TrainConfig) -> dict[str, Any]:
    """The settings that define a group; runs without SAM have no SAM settings."""
    ignored = _NOT_GROUPED | (_SAM_KEYS if cfg.scope == "none" else frozenset())
    return {k: v for k, v in cfg.to_dict().items() if k not in ignored}


def _text(value: Any) -> str:
    """A value as it appears in tables and labels ('' for None)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation, count) of the values that are not None; None where undefined."""
    described = stats.describe(values)
    return described.mean, described.std, described.n


def run_value(run: RunRecord, key: str) -> float | None:
    """A summary key of a finished run, or ``"sharpness"``: its latest measurement in sharpness.json, else the
    ``sharpness`` that ``sharpness_at_end`` put in summary.json (the same number unless measured again since)."""
    summary = run.summary or {}
    if key == "sharpness":
        return run.sharpness["sharpness"] if run.sharpness else summary.get("sharpness")
    return summary.get(key)


@dataclass
class Group:
    """The finished runs of one method, an *arm* (they differ only in the seed and in technical settings)."""

    label: str
    columns: dict[str, Any]
    runs: list[RunRecord] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)  # of its first run; equal in all but technical keys

    def stat(self, key: str) -> tuple[float | None, float | None, int]:
        """mean, std and count over the runs of a summary key, or of ``"sharpness"``."""
        return mean_std(run_value(r, key) for r in self.runs)

    def interval(self, key: str) -> stats.Interval:
        """mean, std and 95% t-interval over the runs (see :func:`stats.describe`)."""
        return stats.describe(run_value(r, key) for r in self.runs)

    def per_seed(self, key: str) -> dict[int, float]:
        """seed → value, for pairing by seed; runs of the same seed (from two folders) are averaged."""
        values: dict[int, list[float]] = {}
        for r in self.runs:
            value = run_value(r, key)
            if value is not None:
                values.setdefault(r.config.seed, []).append(value)
        return {seed: statistics.fmean(v) for seed, v in sorted(values.items())}

    @property
    def seeds(self) -> list[int]:
        return sorted(r.config.seed for r in self.runs)

    @property
    def point(self) -> str | None:
        """The sweep's grid-point folder of the runs (``scope=norm,rho=0.5`` for ``…/scope=norm,rho=0.5/seed=0``),
        or None when the runs do not share one."""
        names = {Path(r.folder).parent.name for r in self.runs if Path(r.folder).name.startswith("seed=")}
        return names.pop() if len(names) == 1 and len({Path(r.folder).parent for r in self.runs}) == 1 else None


def grouping_keys(runs: Sequence[RunRecord]) -> list[str]:
    """The columns of the table: settings that differ between the (finished) runs, then :data:`METHOD_KEYS`."""
    settings = [_settings(r.config) for r in ([r for r in runs if r.finished] or runs)]
    varying = [
        key for key in config_keys()
        if key not in METHOD_KEYS and len({json.dumps(s[key]) for s in settings if key in s}) > 1
    ]
    return varying + list(METHOD_KEYS)


def _order(columns: dict[str, Any]) -> tuple:
    scope = columns.get("scope")
    rank = _SCOPE_ORDER.index(scope) if scope in _SCOPE_ORDER else len(_SCOPE_ORDER)
    others = [_text(v) for k, v in columns.items() if k not in METHOD_KEYS]
    rho = columns.get("rho")
    return (*others, _text(columns.get("optimizer")), rank, _text(scope), _text(columns.get("perturbation")),
            -1.0 if rho is None else rho)


def arm_label(settings: Mapping[str, Any], keys: Sequence[str] = (), *, rho: bool = True) -> str:
    """The name of an arm in every table and figure of the report: ``SGD``, ``SAM-ON (ρ=0.5)``,
    ``SAM-all (asam, ρ=1)``, ``random mask (ρ=0.5, sparsity 0.9995)``, ``SAM-ON (ρ=0.5, late from epoch 6)``.

    The scope's name (:data:`SCOPE_NAMES`; the base optimizer's name for runs without SAM), preceded by the base
    optimizer when it is not SGD; then, in parentheses (the style of :func:`plots.method_label`, so that a figure
    names a method alike whichever label it gets): the perturbation model when it is not ``sam``, ρ (unless
    ``rho=False``), what sets the arm apart (the sparsity of a mask scope, a SAM window that starts late or ends
    early, in epochs counted from 1 as in metrics.jsonl and the training log, an ascent every k steps), and
    ``key=value`` for the other ``keys`` (the settings that differ between the runs) that are set.
    """
    scope = settings.get("scope")
    optimizer = settings.get("optimizer") or "sgd"
    optimizer_name = _OPTIMIZER_NAMES.get(optimizer, optimizer)
    details: list[str] = []
    shown = set(METHOD_KEYS)
    if scope == "none":
        name = optimizer_name
    else:
        name = SCOPE_NAMES.get(scope, scope) if isinstance(scope, str) else f"[{_text(scope)}]"
        if optimizer != "sgd":
            name = f"{optimizer_name} {name}"
        if settings.get("perturbation") not in (None, "sam"):
            details.append(settings["perturbation"])
        if rho and settings.get("rho") is not None:
            details.append(f"ρ={_text(settings['rho'])}")
        shown |= {"sparsity", "sam_start", "sam_end", "ascent_interval"}
        if scope in MASK_SCOPES and settings.get("sparsity") is not None:
            details.append(f"sparsity {_text(settings['sparsity'])}")
        start, end = settings.get("sam_start") or 0, settings.get("sam_end")
        if start and end is None:
            details.append(f"late from epoch {start + 1}")
        elif end is not None:
            details.append(f"early until epoch {end}" if not start else f"SAM in epochs {start + 1}–{end}")
        every = settings.get("ascent_interval")
        if every is not None and every > 1:
            details.append(f"ascent every {every}")
    details += [f"{k}={_text(settings[k])}" for k in keys if k not in shown and settings.get(k) is not None]
    return name + (f" ({', '.join(details)})" if details else "")


def group_runs(runs: Sequence[RunRecord], keys: Sequence[str]) -> list[Group]:
    """The finished runs grouped by the values of ``keys``, in a stable order (SGD first, then by scope, ρ).

    Each group is labelled by :func:`arm_label`; two groups that it would name alike get their columns added.
    """
    groups: dict[str, Group] = {}
    for run in runs:
        if not run.finished:
            continue
        settings = _settings(run.config)
        columns = {key: settings.get(key) for key in keys}
        ident = json.dumps(columns, sort_keys=True)
        if ident not in groups:
            groups[ident] = Group(arm_label(settings, keys), columns, settings=settings)
        groups[ident].runs.append(run)
    labels = [g.label for g in groups.values()]
    for g in groups.values():
        if labels.count(g.label) > 1:
            g.label += " [" + ", ".join(f"{k}={_text(v)}" for k, v in g.columns.items() if v is not None) + "]"
    return sorted(groups.values(), key=lambda g: _order(g.columns))


# --------------------------------------------------------------------------------------------------------
# tables


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


# --------------------------------------------------------------------------------------------------------
# figures


def _accuracy_vs_rho(groups: Sequence[Group], keys: Sequence[str], path: Path) -> Path | None:
    """A panel per (perturbation, other settings); a line per scope (and optimizer, when several); the runs
    without SAM with the same other settings as dashed lines."""
    several_optimizers = len({g.columns["optimizer"] for g in groups}) > 1

    def context(g: Group) -> str:
        return ", ".join(f"{k}={_text(g.columns[k])}" for k in keys if k not in METHOD_KEYS)

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


def _sharpness_description(measurements: Sequence[dict[str, Any]]) -> str:
    """The settings of the measurements in words, or a warning that they differ."""
    settings = {json.dumps({k: m.get(k) for k in SHARPNESS_SETTINGS}, sort_keys=True) for m in measurements}
    if len(settings) > 1:
        return "sharpness (the settings differ between runs: see runs.csv and each sharpness.json)"
    m = measurements[0]
    return (f"{m['kind']}-case {'adaptive ' if m['adaptive'] else ''}{m['norm']} sharpness, ρ={m['rho']:g}, "
            f"{m['steps']} steps, m={m['m']}, n={m.get('examples', m['n'])}, scope {m['scope']}"
            + (", logit-normalized" if m["logit_normalize"] else ""))


def _sharpness_vs_accuracy(groups: Sequence[Group], path: Path, colors: dict[str, str]) -> Path | None:
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
        title=_sharpness_description(measured), colors=colors,
    )


def _mean_over_runs(per_run: Sequence[dict[int, float]]) -> tuple[list[int], list[float]]:
    """Epochs present in every run, and the mean value over the runs at each."""
    common = sorted(set.intersection(*(set(v) for v in per_run))) if per_run else []
    return common, [statistics.fmean(v[e] for v in per_run) for e in common]


def _norm_params(groups: Sequence[Group], path: Path, colors: dict[str, str]) -> Path | None:
    """Pooled γ/β quantiles per epoch (from norm_stats.jsonl), averaged over the seeds of each group."""
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


def _training_curves(groups: Sequence[Group], path: Path, colors: dict[str, str]) -> Path | None:
    """Train loss and test accuracy per epoch, mean ± std over the seeds of each group."""
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


# --------------------------------------------------------------------------------------------------------
# statistics over seeds and the paper's claims

#: A file in a folder given to the report that chooses the arms of the claims and the margin δ (see make_report).
CLAIMS_FILE = "claims.yaml"

#: δ, in test-accuracy points, of the claims "at least as good", "no better" and "about as good".
DEFAULT_MARGIN = 0.2

#: The scope of the arms that can play each role of the claims.
ROLE_SCOPES = {"sgd": "none", "sam-all": "all", "sam-on": "norm", "no-norm": "no-norm", "random": "random",
               "ssam-f": "ssam-f"}

#: Settings that make runs incomparable in the claims (data, model, optimizer, …): everything but the SAM ones.
_ARM_KEYS = frozenset({"scope", "perturbation", "rho"}) | _SAM_KEYS

_ACC = "final_test_acc"
_STAT_METRICS = (("final_test_acc", "test acc. (%)", 2), ("final_val_acc", "val. acc. (%)", 2),
                 ("sharpness", "sharpness", 4))


@dataclass
class ClaimsSelection:
    """The arms named for the roles (role → point names or arm labels, one per context) and the margin δ."""

    arms: dict[str, list[str]] = field(default_factory=dict)
    margin: float = DEFAULT_MARGIN
    source: str | None = None


def load_claims_selection(source: str | Path | Mapping[str, Any] | None) -> ClaimsSelection:
    """Read a claims selection: a YAML file or its content as a mapping::

        arms:                          # role -> the arm that plays it (default: chosen as make_report says)
          sam-on: scope=norm,rho=0.5   # a sweep point (the folder above seed=…) or an arm label from arms.csv
          sam-all: [scope=all,rho=0.1, scope=all,rho=0.1,data=cifar10]   # a list: one per context
        margin: 0.2                    # δ in test-accuracy points

    Roles: sgd, sam-all, sam-on, no-norm, random, ssam-f.
    """
    if source is None:
        return ClaimsSelection()
    described = None
    if not isinstance(source, Mapping):
        described = str(source)
        try:
            source = yaml.safe_load(Path(source).read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{described} is not valid YAML: {err}") from None
    where = described or "the claims selection"
    if not isinstance(source, Mapping):
        raise ValueError(f"{where} must be a mapping with the keys arms and margin, got {type(source).__name__}.")
    unknown = [key for key in source if key not in ("arms", "margin")]
    if unknown:
        raise ValueError(f"Unknown key {unknown[0]!r} in {where}; valid keys are arms and margin.")
    arms = source.get("arms") or {}
    if not isinstance(arms, Mapping):
        raise ValueError(f"arms in {where} must map roles to arms, e.g. arms: {{sam-on: scope=norm,rho=0.5}}.")
    selection = ClaimsSelection(margin=source.get("margin", DEFAULT_MARGIN), source=described)
    for role, names in arms.items():
        if role not in ROLE_SCOPES:
            raise ValueError(f"Unknown role {role!r} in {where}; valid roles are {', '.join(ROLE_SCOPES)}.")
        selection.arms[role] = [str(n) for n in (names if isinstance(names, list) else [names])]
    margin = selection.margin
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin < 0:
        raise ValueError(f"margin in {where} must be a number >= 0 (test-accuracy points), got {margin!r}.")
    selection.margin = float(margin)
    return selection


def _find_claims_file(paths: Sequence[str | Path]) -> Path | None:
    for path in paths:
        if (Path(path) / CLAIMS_FILE).is_file():
            return Path(path) / CLAIMS_FILE
    return None


@dataclass
class RoleChoice:
    """The arm that plays a role in one context (None: none does), and how it was chosen (or why none)."""

    role: str
    group: Group | None
    how: str


@dataclass
class Context:
    """Arms that can be compared (same data, model, base optimizer, …), the arm of each role, the claims."""

    title: str
    groups: list[Group]
    roles: dict[str, RoleChoice] = field(default_factory=dict)
    claims: list[tuple[stats.Claim, str, list[stats.PartResult]]] = field(default_factory=list)

    def roles_of(self, group: Group) -> list[str]:
        return [role for role, choice in self.roles.items() if choice.group is group]

    def heading(self) -> str:
        return self.title or "all runs"


def _contexts(groups: Sequence[Group], keys: Sequence[str]) -> list[Context]:
    """The groups split by the settings other than the SAM ones; titled by those that differ."""
    context_keys = [k for k in keys if k not in _ARM_KEYS]
    split: dict[str, list[Group]] = {}
    for g in groups:
        split.setdefault(json.dumps([g.columns.get(k) for k in context_keys]), []).append(g)
    def value(members: list[Group], key: str) -> str:
        return _text(members[0].columns.get(key))

    varying = [k for k in context_keys if len({value(members, k) for members in split.values()}) > 1]
    return [Context(", ".join(f"{k}={value(members, k)}" for k in varying), members) for members in split.values()]


def _plain(g: Group) -> bool:
    """An arm without a late/early SAM window or an ascent every k steps (those are variants of a role)."""
    s = g.settings
    return not s.get("sam_start") and s.get("sam_end") is None and (s.get("ascent_interval") or 1) <= 1


def _choose(role: str, groups: Sequence[Group], named: Sequence[str], source: str) -> RoleChoice:
    """The arm of ``role`` among ``groups`` (one context): the one named, else the documented automatic pick."""
    scope = ROLE_SCOPES[role]
    chosen = [g for g in groups if g.point in named or g.label in named]
    if len(chosen) > 1:
        raise ValueError(f"{source} names several {role} arms of one context ({', '.join(g.label for g in chosen)}); "
                         "name one per context.")
    if chosen:
        return RoleChoice(role, chosen[0], f"named in {source}")
    of_scope = [g for g in groups if g.columns.get("scope") == scope]
    candidates = [g for g in of_scope if _plain(g)]
    if not candidates:
        if of_scope:
            return RoleChoice(role, None, f"only variants ({', '.join(g.label for g in of_scope)}); name one under "
                                          f"arms: in {CLAIMS_FILE}")
        return RoleChoice(role, None, f"no arm with scope {scope}")
    notes = []
    if scope in MASK_SCOPES:  # the claims are about a mask as sparse as SAM-ON's, so the sparsest one
        top = max(g.settings.get("sparsity") or 0.0 for g in candidates)
        if any((g.settings.get("sparsity") or 0.0) != top for g in candidates):
            notes.append(f"highest sparsity ({top:g}), the closest to SAM-ON's")
        candidates = [g for g in candidates if (g.settings.get("sparsity") or 0.0) == top]
    if len(candidates) == 1:
        notes.append("the only candidate")
        return RoleChoice(role, candidates[0], "; ".join(notes))
    val = [g.stat("final_val_acc")[0] for g in candidates]
    if all(v is not None for v in val):
        best = max(range(len(candidates)), key=lambda i: val[i])  # the first of equals
        notes.append(f"best mean validation accuracy ({val[best]:.2f}) of {len(candidates)} arms")
    else:
        test = [g.stat(_ACC)[0] for g in candidates]
        best = max(range(len(candidates)), key=lambda i: test[i])
        notes.append(f"best mean TEST accuracy of {len(candidates)} arms, because some have no validation accuracy "
                     f"(val_split=0): an optimistic choice; name the arm under arms: in {CLAIMS_FILE}")
    return RoleChoice(role, candidates[best], "; ".join(notes))


def _claim_arm(g: Group | None, sharpness_missing: str | None) -> stats.Arm | None:
    if g is None:
        return None
    missing = {"sharpness": sharpness_missing} if sharpness_missing else {}
    if not sharpness_missing and not g.per_seed("sharpness"):
        missing["sharpness"] = f"no sharpness for {g.label} (`normsam sharpness RUN_DIR` or sharpness_at_end=true)"
    return stats.Arm(g.label, {_ACC: g.per_seed(_ACC), "sharpness": g.per_seed("sharpness")}, missing)


def _sharpness_mismatch(a: Group | None, b: Group | None) -> str | None:
    """Why the sharpness of two arms cannot be compared (measured with other settings), or None."""
    measured = [r.sharpness for g in (a, b) if g for r in g.runs if r.sharpness]
    settings = {json.dumps({k: m.get(k) for k in SHARPNESS_SETTINGS}, sort_keys=True) for m in measured}
    if len(settings) > 1:
        return (f"the sharpness of {a.label} and {b.label} was measured with different settings (see runs.csv); "
                "measure both alike")
    return None


def analyse(groups: Sequence[Group], keys: Sequence[str], selection: ClaimsSelection) -> list[Context]:
    """The contexts with the arm of each role and the verdicts of the claims.

    Raises:
        ValueError: the selection names an arm that is not among the groups, or one of another scope.
    """
    source = selection.source or "the claims selection"
    for role, names in selection.arms.items():
        for name in names:
            matches = [g for g in groups if name in (g.point, g.label)]
            if not matches:
                known = sorted({g.point for g in groups if g.point} | {g.label for g in groups})
                raise ValueError(f"{source}: no arm {name!r} for {role}; use a sweep point or an arm label: "
                                 f"{', '.join(known)}.")
            for g in matches:
                if g.columns.get("scope") != ROLE_SCOPES[role]:
                    raise ValueError(f"{source}: {name!r} ({g.label}) cannot be {role}, whose scope is "
                                     f"{ROLE_SCOPES[role]}; name an arm with that scope.")
    contexts = _contexts(groups, keys)
    for ctx in contexts:
        ctx.roles = {role: _choose(role, ctx.groups, selection.arms.get(role, []), source) for role in ROLE_SCOPES}
        chosen = {role: choice.group for role, choice in ctx.roles.items()}
        mismatch = _sharpness_mismatch(chosen["sam-on"], chosen["sam-all"])
        arms = {role: _claim_arm(g, mismatch) for role, g in chosen.items()}
        ctx.claims = stats.evaluate_claims(arms, selection.margin)
    return contexts


def _interval_row(prefix: str, interval: stats.Interval) -> dict[str, Any]:
    return {f"{prefix}_n": interval.n, f"{prefix}_mean": interval.mean, f"{prefix}_std": interval.std,
            f"{prefix}_ci_low": interval.lo, f"{prefix}_ci_high": interval.hi}


def arm_rows(contexts: Sequence[Context], keys: Sequence[str]) -> list[dict[str, Any]]:
    """One row per arm for ``arms.csv``: its settings, the roles it plays, mean/std/95% CI of each metric."""
    rows = []
    for ctx in contexts:
        for g in ctx.groups:
            roles = ctx.roles_of(g)
            row = {"context": ctx.title, "arm": g.label, "point": g.point, **{k: _text(g.columns[k]) for k in keys},
                   "roles": " ".join(roles), "chosen_by": " | ".join(ctx.roles[r].how for r in roles),
                   "seeds": " ".join(map(str, g.seeds))}
            for key, _, _ in _STAT_METRICS:
                row.update(_interval_row(key, g.interval(key)))
            rows.append(row)
    return rows


def _paired_with(ctx: Context) -> list[tuple[Group, str, Group, str, stats.Paired]]:
    """(arm, reference role, reference arm, metric, paired differences) against the SGD and SAM-all arms."""
    out = []
    for ref_role in ("sgd", "sam-all"):
        ref = ctx.roles[ref_role].group
        if ref is None:
            continue
        for g in ctx.groups:
            if g is ref:
                continue
            for metric in (_ACC, "sharpness"):
                pairs = stats.paired(g.per_seed(metric), ref.per_seed(metric))
                if pairs.seeds:
                    out.append((g, ref_role, ref, metric, pairs))
    return out


def paired_rows(contexts: Sequence[Context]) -> list[dict[str, Any]]:
    """One row per (arm, reference, metric) for ``paired.csv``: arm − reference over the seeds both have."""
    rows = []
    for ctx in contexts:
        for g, ref_role, ref, metric, pairs in _paired_with(ctx):
            rows.append({"context": ctx.title, "arm": g.label, "reference_role": ref_role, "reference": ref.label,
                         "metric": metric, "seeds": " ".join(map(str, pairs.seeds)),
                         **_interval_row("diff", pairs.interval)})
    return rows


def claim_rows(contexts: Sequence[Context]) -> list[dict[str, Any]]:
    """One row per part of each claim for ``claims.csv``."""
    rows = []
    for ctx in contexts:
        for claim, outcome, parts in ctx.claims:
            for p in parts:
                interval = p.paired.interval if p.paired else stats.describe([])
                rows.append({
                    "context": ctx.title, "claim": claim.name, "statement": claim.statement, "claim_verdict": outcome,
                    "test": p.test, "arm_a": p.arm_a, "arm_b": p.arm_b, "metric": p.part.metric,
                    "relation": p.part.relation, "margin": p.margin,
                    "seeds": " ".join(map(str, p.paired.seeds)) if p.paired else "",
                    **_interval_row("diff", interval), "verdict": p.verdict, "note": p.note,
                })
    return rows


def _statistics_markdown(contexts: Sequence[Context], margin: float,
                         figures: Sequence[tuple[str, Path, str]], selection_source: str | None) -> str:
    lines = ["## Statistics", "",
             "Per arm (a method with its settings, over its seeds): mean, sample standard deviation and the 95% "
             "t-interval of the mean (mean ± t₀.₉₇₅,ₙ₋₁ · s/√n); n/a with one seed. Paired differences are taken "
             "seed by seed over the seeds both arms have; the interval is the t-interval of those differences. "
             "Tables: [arms.csv](arms.csv), [paired.csv](paired.csv).", ""]
    for ctx in contexts:
        if len(contexts) > 1:
            lines += [f"### {_md(ctx.heading())}", ""]
        rows = []
        for g in ctx.groups:
            acc = g.interval(_ACC)
            rows.append([_md(g.label), ", ".join(stats.ROLE_NAMES[r] for r in ctx.roles_of(g)), str(acc.n),
                         _pm(acc.mean, acc.std, 2), acc.ci_text(2),
                         g.interval("final_val_acc").text(2), g.interval("sharpness").text(4)])
        lines += [_markdown_table(["arm", "role", "n", "test acc. mean ± std (%)", "test acc. 95% CI",
                                   "val. acc. mean [95% CI]", "sharpness mean [95% CI]"], rows, numeric_from=2), ""]
        refs = [(role, ctx.roles[role].group) for role in ("sgd", "sam-all") if ctx.roles[role].group]
        if refs:
            diffs = {(id(g), role): pairs for g, role, _, metric, pairs in _paired_with(ctx) if metric == _ACC}
            header = ["arm"] + [f"− {_md(ref.label)}: mean [95% CI]" for _, ref in refs]
            rows = []
            for g in ctx.groups:
                cells = [_md(g.label)]
                for role, ref in refs:
                    pairs = diffs.get((id(g), role))
                    cells.append(f"{pairs.interval.text(2, signed=True)} (n={pairs.interval.n})" if pairs
                                 else "–" if g is ref else "no common seed")
                rows.append(cells)
            lines += ["Paired differences in test accuracy (points), arm − reference:", "",
                      _markdown_table(header, rows, numeric_from=1), ""]
    for title, path, caption in figures:
        lines += [f"### {title}", "", f"![{title}]({path.name})", "", caption, ""]

    lines += ["## Claims", "",
              f"Each claim compares the arms that play its roles, by paired differences a − b over common seeds and "
              f"their 95% t-interval [lo, hi]; δ = {margin:g} test-accuracy points"
              + (f" (from {_md(selection_source)})" if selection_source else
                 f" (default; set `margin:` in a {CLAIMS_FILE})") + ". Table: [claims.csv](claims.csv).", ""]
    for ctx in contexts:
        if len(contexts) > 1:
            lines += [f"### {_md(ctx.heading())}", ""]
        rows = [[stats.ROLE_NAMES[role], _md(c.group.label) if c.group else "–", _md(c.how)]
                for role, c in ctx.roles.items()]
        lines += ["Arms of the roles:", "", _markdown_table(["role", "arm", "chosen by"], rows, numeric_from=3), ""]
        rows = []
        for claim, outcome, parts in ctx.claims:
            for i, p in enumerate(parts):
                interval = p.paired.interval if p.paired else None
                rule = stats.RULES[p.part.relation][1].replace("δ", f"{p.margin:g}")
                rows.append([
                    f"**{claim.name}**" if i == 0 else "", _md(claim.statement) if i == 0 else "",
                    f"**{outcome}**" if i == 0 else "", _md(p.test),
                    _md(f"{p.arm_a or '–'} − {p.arm_b or '–'}"),
                    interval.text(4 if p.part.metric == "sharpness" else 2, signed=True) if interval else "",
                    str(interval.n) if interval else "", _md(rule), p.verdict, _md(p.note),
                ])
        header = ["claim", "statement", "verdict", "test", "a − b", "mean [95% CI]", "n", "rule", "part verdict",
                  "note"]
        lines += [_markdown_table(header, rows, numeric_from=len(header)), ""]
    lines += ["Rules (lo, hi: the 95% interval of a − b): "
              + "; ".join(f"“{sign}” ({what}): {rule}" for sign, (what, rule) in stats.RULES.items())
              + ". δ applies to accuracy only; sharpness is compared strictly. A claim is contradicted if a part is, "
              "not tested if a part is (an arm missing), supported if every part is, else inconclusive (an interval "
              "across the bounds, or n/a with one common seed).",
              "",
              "Arms of the roles, unless named under `arms:` in a " + CLAIMS_FILE + " in a folder given to the report: "
              "SGD = the runs without SAM, SAM-all/SAM-ON/no-norm/random mask/SSAM-F = the arms of that scope with SAM "
              "over the whole training and an ascent every step; among several, random mask and SSAM-F keep the "
              "highest sparsity, then the arm with the best mean validation accuracy is taken (the best mean test "
              "accuracy, marked as such, when there is no validation split).", ""]
    return "\n".join(lines)


def _arm_accuracy(contexts: Sequence[Context], path: Path, colors: dict[str, str]) -> Path | None:
    panels: dict[str, dict[str, plots.Estimate]] = {}
    references: dict[str, dict[str, float]] = {}
    for ctx in contexts:
        title = f"final test accuracy per arm{f' — {ctx.title}' if ctx.title else ''}"
        for g in ctx.groups:
            acc = g.interval(_ACC)
            if acc.mean is not None:
                panels.setdefault(title, {})[g.label] = (acc.mean, acc.lo, acc.hi)
        sgd = ctx.roles["sgd"].group
        if sgd is not None and sgd.stat(_ACC)[0] is not None:
            references[title] = {f"{sgd.label} mean": sgd.stat(_ACC)[0]}
    if not panels:
        return None
    return plots.plot_estimates(panels, path, xlabel="final test accuracy (%)", references=references, colors=colors)


def _arm_sharpness_vs_accuracy(groups: Sequence[Group], path: Path, colors: dict[str, str]) -> Path | None:
    points = {}
    for g in groups:
        sharp, acc = g.interval("sharpness"), g.interval(_ACC)
        if sharp.mean is not None and acc.mean is not None:
            points[g.label] = ((sharp.mean, sharp.lo, sharp.hi), (acc.mean, acc.lo, acc.hi))
    if not points:
        return None
    measured = [r.sharpness for g in groups for r in g.runs if r.sharpness]
    title = _sharpness_description(measured) if measured else "sharpness (summary.json)"
    return plots.plot_estimate_scatter(points, path, xlabel="sharpness (worst loss − clean loss)",
                                       ylabel="final test accuracy (%)", title=title, colors=colors)


def _arm_test_curves(contexts: Sequence[Context], path: Path, colors: dict[str, str]) -> Path | None:
    panels: dict[str, dict[str, tuple[list, list, list, list]]] = {}
    for ctx in contexts:
        title = f"test accuracy, mean and 95% CI{f' — {ctx.title}' if ctx.title else ''}"
        for g in ctx.groups:
            epochs, per_run = _per_epoch(g, "test_acc")
            if not epochs:
                continue
            cis = [stats.describe(v[e] for v in per_run) for e in epochs]
            panels.setdefault(title, {})[g.label] = (epochs, [c.mean for c in cis], [c.lo for c in cis],
                                                     [c.hi for c in cis])
    if not panels:
        return None
    return plots.plot_interval_bands(panels, path, ylabel="test accuracy (%)", colors=colors)


# --------------------------------------------------------------------------------------------------------
# report.md


def _unfinished_hint(unfinished: Sequence[RunRecord]) -> list[str]:
    """How to finish the unfinished runs: resume those with a checkpoint, start the others again."""
    from normsam.train.run_folder import RunFolder

    resumable = [r for r in unfinished if RunFolder(r.folder).has_checkpoint()]
    lines = ["Unfinished runs are not in the tables and figures; finish them by running their sweep again, or"]
    if resumable:
        lines.append("- with a checkpoint: `normsam train --resume RUN_DIR`")
    if len(resumable) < len(unfinished):
        lines.append("- without a checkpoint (no epoch finished): start again with "
                     "`normsam train --config RUN_DIR/config.yaml out=RUN_DIR`")
    return [*lines, ""]


def _sharpness_command(m: dict[str, Any]) -> str:
    parts = ["normsam sharpness RUN_DIR", f"--rho {m['rho']:g}", f"--steps {m['steps']}", f"--m {m['m']}",
             f"--n {m['n']}", f"--kind {m['kind']}", f"--norm {m['norm']}", f"--scope {m['scope']}",
             f"--seed {m['seed']}"]
    if not m["adaptive"]:
        parts.append("--no-adaptive")
    if m["logit_normalize"]:
        parts.append("--logit-normalize")
    if m.get("convention", "apgd") != "apgd":
        parts.append(f"--convention {m['convention']}")
    return " ".join(parts)


def _sweep_sources(runs: Sequence[RunRecord]) -> list[str]:
    """The sweep files that made the runs (from a sweep.json in a parent folder), each once."""
    sources: dict[str, None] = {}
    for run in runs:
        for parent in Path(run.folder).resolve().parents:
            if (parent / SWEEP_FILE).is_file():
                try:
                    source = json.loads((parent / SWEEP_FILE).read_text()).get("source")
                except json.JSONDecodeError:
                    source = None
                if source:
                    sources.setdefault(source, None)
                break
    return list(sources)


def _link(target: Path, out: Path) -> str:
    return f"[{_md(str(target))}](<{os.path.relpath(Path(target).resolve(), out.resolve())}>)"


def _markdown(
    runs: Sequence[RunRecord],
    groups: Sequence[Group],
    keys: Sequence[str],
    figures: Sequence[tuple[str, Path, str]],
    out: Path,
    args: Sequence[str],
    analysis: str = "",
) -> str:
    finished = [r for r in runs if r.finished]
    lines = ["# normsam report", ""]
    diverged = [r for r in runs if r.diverged]
    lines.append(f"{len(runs)} runs ({len(finished) - len(diverged)} finished, {len(diverged)} diverged, "
                 f"{len(runs) - len(finished)} unfinished) in {', '.join(f'`{a}`' for a in args)}.")
    if diverged:
        counted = any(r in g.runs for g in groups for r in diverged)
        lines.append("Diverged runs (their loss became non-finite) are " + (
            "counted in the tables with their last good epoch's figures (--include-diverged)." if counted else
            "listed below but left out of the tables, means and figures (`normsam report --include-diverged` "
            "counts them with their last good epoch's figures)."))
    lines += ["", "## Results", ""]
    if groups:
        measured = [r.sharpness for r in finished if r.sharpness]
        lines.append(
            "Mean ± sample standard deviation over the seeds of the finished runs (no ± with one seed). "
            "Final = after the last epoch; best = the best epoch. "
            + (f"Sharpness: the latest measurement of each run ({_sharpness_description(measured)}); blank where "
               "none was made." if measured else "No run has a sharpness measurement (`normsam sharpness RUN_DIR`).")
        )
        lines += ["", _group_table(groups, keys), ""]
    else:
        lines += ["No finished runs yet.", ""]
    lines += ["Tables: [table.csv](table.csv) (per method), [runs.csv](runs.csv) (per run).", ""]
    for title, path, caption in figures:
        lines += [f"### {title}", "", f"![{title}]({path.name})", "", caption, ""]
    if analysis:
        lines += [analysis]

    lines += ["## Runs", ""]
    rows = []
    for r in runs:
        s = r.summary or {}
        acc = s.get("final_test_acc")
        rows.append([_link(r.folder, out), _md(r.config.method), str(r.config.seed), r.status,
                     "" if acc is None else f"{acc:.2f}",
                     f"{r.sharpness['sharpness']:.4f}" if r.sharpness else ""])
    lines += [_markdown_table(["run", "method", "seed", "status", "final test acc. (%)", "sharpness"], rows, 4), ""]
    if len(finished) < len(runs):
        lines += _unfinished_hint([r for r in runs if not r.finished])

    lines += ["## Reproduce", "", "```sh"]
    for source in _sweep_sources(runs):
        lines.append(f"normsam sweep {shlex.quote(source)}        # trains what is missing, skips finished runs")
    lines.append("normsam train --config RUN_DIR/config.yaml out=NEW_RUN_DIR   # one run, from its resolved config")
    for settings in {json.dumps({k: r.sharpness[k] for k in SHARPNESS_SETTINGS}, sort_keys=True): r.sharpness
                     for r in finished if r.sharpness}.values():
        lines.append(_sharpness_command(settings))
    lines.append(f"normsam report {shlex.join(map(str, args))} --out {shlex.quote(str(out))}")
    lines += ["```", ""]
    return "\n".join(lines)


def make_report(
    paths: Sequence[str | Path],
    out: str | Path = "report",
    *,
    claims: str | Path | Mapping[str, Any] | None = None,
    include_diverged: bool = False,
) -> list[Path]:
    """Write report.md, the CSV tables and the figures for the runs in ``paths``; returns the paths.

    Besides the per-method table, report.md has a *Statistics* section (per arm: mean, std and 95% t-interval
    over seeds; paired differences against the SGD and SAM-all arms) and a *Claims* section (C1–C5 of
    :data:`stats.CLAIMS`, each supported, contradicted, inconclusive or not tested, with the numbers that decide
    it); they are also written as arms.csv, paired.csv and claims.csv, with three figures (arm_accuracy.png,
    arm_sharpness_vs_accuracy.png, arm_test_curves.png; error bars and bands = 95% CI).

    Args:
        claims: which arm plays each role of the claims, and the margin δ: a YAML file or a mapping (see
            :func:`load_claims_selection`). Default: ``claims.yaml`` in the first folder of ``paths`` that has
            one; without it, each role takes the arm of its scope with the best mean validation accuracy.
        include_diverged: count diverged runs (``status: diverged`` in summary.json) in the tables, means and
            figures, with their last good epoch's figures; by default they are only listed.

    Raises:
        FileNotFoundError: a path does not exist, or no run folder was found.
        ValueError: a run folder's config cannot be read, or the claims selection is invalid or names an arm
            that is not in the runs.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    runs = find_runs(paths)
    keys = grouping_keys(runs)
    groups = group_runs([r for r in runs if include_diverged or not r.diverged], keys)
    selection = load_claims_selection(_find_claims_file(paths) if claims is None else claims)
    contexts = analyse(groups, keys, selection)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    written = [out / "table.csv", out / "runs.csv"]
    ckpt.atomic_write_text(written[0], _csv(group_rows(groups)))
    ckpt.atomic_write_text(written[1], _csv(run_rows(runs, keys)))

    colors = plots.method_colors([g.label for g in groups])
    candidates = [
        ("Test accuracy vs ρ", _accuracy_vs_rho(groups, keys, out / "accuracy_vs_rho.png"),
         "Final test accuracy (mean ± std over seeds) against the perturbation radius ρ, per perturbation model: "
         "SAM-all perturbs every weight, SAM-ON only the normalization layers' γ and β, no-norm every weight but "
         "those. Dashed: the mean of the runs without SAM."),
        ("Sharpness vs test accuracy", _sharpness_vs_accuracy(groups, out / "sharpness_vs_accuracy.png", colors),
         "One point per run: its latest sharpness measurement against its final test accuracy."),
        ("γ and β of the normalization layers", _norm_params(groups, out / "norm_params.png", colors),
         "Pooled over all norm layers, per epoch (0 = initialization): median (line), 25–75% (dark band) and "
         "5–95% (light band), each quantile averaged over the seeds."),
        ("Training curves", _training_curves(groups, out / "training_curves.png", colors),
         "Train loss and test accuracy per epoch, mean ± std over the seeds."),
    ]
    figures = [(title, path, caption) for title, path, caption in candidates if path is not None]
    written += [path for _, path, _ in figures]

    tables = {"arms.csv": arm_rows(contexts, keys), "paired.csv": paired_rows(contexts),
              "claims.csv": claim_rows(contexts)}
    for name, rows in tables.items():
        ckpt.atomic_write_text(out / name, _csv(rows))
        written.append(out / name)
    candidates = [
        ("Test accuracy per arm", _arm_accuracy(contexts, out / "arm_accuracy.png", colors),
         "Final test accuracy per arm: mean (dot) and 95% t-interval over the seeds (bar; a cross: one seed, no "
         "interval). Dashed: the mean of the SGD arm."),
        ("Sharpness vs test accuracy per arm",
         _arm_sharpness_vs_accuracy(groups, out / "arm_sharpness_vs_accuracy.png", colors),
         "Per arm with a sharpness measurement: mean sharpness (over the runs measured) against mean final test "
         "accuracy (over all its runs), each with its 95% t-interval over seeds."),
        ("Test accuracy curves per arm", _arm_test_curves(contexts, out / "arm_test_curves.png", colors),
         "Test accuracy per epoch: mean over the seeds (line) and 95% t-interval (band; none with one seed)."),
    ]
    stat_figures = [(title, path, caption) for title, path, caption in candidates if path is not None]
    written += [path for _, path, _ in stat_figures]
    analysis = _statistics_markdown(contexts, selection.margin, stat_figures, selection.source) if groups else ""
    report = out / "report.md"
    ckpt.atomic_write_text(report, _markdown(runs, groups, keys, figures, out, [str(p) for p in paths], analysis))
    return [report, *written]
