"""``normsam report RUN_DIR... --out DIR``: tables and plots from run folders.

The arguments are run folders or folders that contain them (searched recursively for ``config.yaml`` next
to ``metrics.jsonl`` or ``environment.json``). Finished runs (with ``summary.json``) are grouped by method
(optimizer, scope, perturbation, ρ, plus every other setting that differs between the runs, such as the
data or the model; seeds and purely technical settings like ``threads`` do not split groups, and the SAM
settings of runs without SAM are ignored) and summarized as mean ± sample standard deviation over the seeds.
Unfinished runs are listed but not counted.

Written into ``--out``:

* ``report.md``: the table, the figures, the list of runs and the commands that reproduce them;
* ``table.csv``: one row per method group; ``runs.csv``: one row per run;
* ``accuracy_vs_rho.png``: final test accuracy vs ρ, one panel per perturbation model, one line per scope
  (SAM-all, SAM-ON, no-norm, …) with error bars over seeds, and the mean of the runs without SAM as a
  dashed line (the paper's teaser); with a single ρ the lines are single points;
* ``sharpness_vs_accuracy.png``: one point per run with a sharpness measurement (the latest in its
  ``sharpness.json``), coloured by method;
* ``norm_params.png``: the pooled γ and β of the normalization layers over the epochs (median, 25–75% and
  5–95% bands; quantiles averaged over seeds), a line per method;
* ``training_curves.png``: train loss and test accuracy per epoch, mean ± std over seeds, a line per method.

A figure without data (no SAM runs, no sharpness, no norm layers) is left out.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shlex
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normsam.analysis import plots
from normsam.analysis.run_sharpness import SETTINGS as SHARPNESS_SETTINGS
from normsam.analysis.run_sharpness import latest_measurement
from normsam.analysis.sweep import SWEEP_FILE
from normsam.train import checkpoint as ckpt
from normsam.train.config import TrainConfig, config_from_file, config_keys

__all__ = ["RunRecord", "Group", "load_run", "find_runs", "grouping_keys", "group_runs", "mean_std", "make_report"]

#: The columns that define a method; further columns appear when other settings differ between runs.
METHOD_KEYS = ("optimizer", "scope", "perturbation", "rho")

#: Settings that never split groups: the seed (we average over it) and settings that do not change results.
_NOT_GROUPED = frozenset({
    "seed", "out", "progress", "threads", "device", "tensorboard", "data_dir", "download", "eval_batch_size",
    "compile", "norm_stats", "sharpness_at_end", "sharpness_rho", "sharpness_steps",
})

#: Settings that mean nothing for a run without SAM (scope none); ignored for those runs.
_SAM_KEYS = frozenset({
    "perturbation", "rho", "eta", "normalize_bias", "norm_over", "sparsity", "mask_interval", "fisher_samples",
    "mask_refresh_epochs", "sam_start", "sam_end", "bn_policy", "cheap_ascent", "sync_ascent",
})

#: Legend names of the scopes in the accuracy-vs-ρ figure.
SCOPE_NAMES = {"all": "SAM-all", "norm": "SAM-ON", "no-norm": "no-norm"}
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

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def status(self) -> str:
        if self.finished:
            return "finished"
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
    return RunRecord(
        folder=folder,
        config=config,
        metrics=ckpt.read_jsonl(folder / ckpt.METRICS_JSONL),
        summary=json.loads(summary_path.read_text()) if summary_path.is_file() else None,
        sharpness=latest_measurement(folder),
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
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)


@dataclass
class Group:
    """The finished runs of one method (they differ only in the seed and in technical settings)."""

    label: str
    columns: dict[str, Any]
    runs: list[RunRecord] = field(default_factory=list)

    def stat(self, key: str) -> tuple[float | None, float | None, int]:
        """mean, std and count over the runs of a summary key, or of ``"sharpness"``."""
        if key == "sharpness":
            return mean_std(r.sharpness["sharpness"] if r.sharpness else None for r in self.runs)
        return mean_std(r.summary.get(key) for r in self.runs if r.summary)

    @property
    def seeds(self) -> list[int]:
        return sorted(r.config.seed for r in self.runs)


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


def group_runs(runs: Sequence[RunRecord], keys: Sequence[str]) -> list[Group]:
    """The finished runs grouped by the values of ``keys``, in a stable order (SGD first, then by scope, ρ)."""
    groups: dict[str, Group] = {}
    for run in runs:
        if not run.finished:
            continue
        settings = _settings(run.config)
        columns = {key: settings.get(key) for key in keys}
        ident = json.dumps(columns, sort_keys=True)
        if ident not in groups:
            extras = ", ".join(f"{k}={_text(v)}" for k, v in columns.items() if k not in METHOD_KEYS and v is not None)
            method = run.config.method
            if isinstance(run.config.scope, list):  # "patterns-…" would not tell pattern lists apart
                method = method.replace("patterns", f"[{_text(run.config.scope)}]", 1)
            label = method + (f" ({extras})" if extras else "")
            groups[ident] = Group(label, columns)
        groups[ident].runs.append(run)
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
        line = SCOPE_NAMES.get(scope, scope) if isinstance(scope, str) else f"[{_text(scope)}]"
        if several_optimizers:
            line = f"{g.columns['optimizer']} {line}"
        panels.setdefault(title, {}).setdefault(line, []).append((g.columns["rho"], mean, std))
    if not panels:
        return None
    baselines: dict[str, dict[str, float]] = {}
    for g in groups:
        mean = g.stat("final_test_acc")[0]
        if g.columns["scope"] == "none" and mean is not None:
            for title, ctx in contexts.items():
                if ctx == context(g):
                    baselines.setdefault(title, {})[f"{g.columns['optimizer']} (no SAM)"] = mean
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
            f"{m['steps']} steps, m={m['m']}, n={m['n']}, scope {m['scope']}"
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


def _training_curves(groups: Sequence[Group], path: Path, colors: dict[str, str]) -> Path | None:
    """Train loss and test accuracy per epoch, mean ± std over the seeds of each group."""
    curves = {"train loss": "train_loss", "test accuracy (%)": "test_acc"}
    panels: dict[str, dict[str, plots.Series]] = {title: {} for title in curves}
    for g in groups:
        for title, key in curves.items():
            per_run = [{row["epoch"]: row[key] for row in r.metrics if row.get(key) is not None} for r in g.runs]
            per_run = [v for v in per_run if v]
            if not per_run:
                continue
            epochs = sorted(set.intersection(*(set(v) for v in per_run)))
            stats = [mean_std(v[e] for v in per_run) for e in epochs]
            panels[title][g.label] = (epochs, [s[0] for s in stats], [s[1] for s in stats])
    panels = {title: series for title, series in panels.items() if series}
    if not panels:
        return None
    return plots.plot_series_panels(
        panels, path, xlabel="epoch", ylabel={t: t for t in panels}, style="band", log_x=False, integer_x=True,
        colors=colors
    )


# --------------------------------------------------------------------------------------------------------
# report.md


def _sharpness_command(m: dict[str, Any]) -> str:
    parts = ["normsam sharpness RUN_DIR", f"--rho {m['rho']:g}", f"--steps {m['steps']}", f"--m {m['m']}",
             f"--n {m['n']}", f"--kind {m['kind']}", f"--norm {m['norm']}", f"--scope {m['scope']}",
             f"--seed {m['seed']}"]
    if not m["adaptive"]:
        parts.append("--no-adaptive")
    if m["logit_normalize"]:
        parts.append("--logit-normalize")
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
) -> str:
    finished = [r for r in runs if r.finished]
    lines = ["# normsam report", ""]
    lines.append(f"{len(runs)} runs ({len(finished)} finished, {len(runs) - len(finished)} unfinished) "
                 f"in {', '.join(f'`{a}`' for a in args)}.")
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
        lines += ["Unfinished runs are not in the tables and figures; finish them with "
                  "`normsam train --resume RUN_DIR` (or by running their sweep again).", ""]

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


def make_report(paths: Sequence[str | Path], out: str | Path = "report") -> list[Path]:
    """Write report.md, table.csv, runs.csv and the figures for the runs in ``paths``; returns the paths.

    Raises:
        FileNotFoundError: a path does not exist, or no run folder was found.
        ValueError: a run folder's config cannot be read.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    runs = find_runs(paths)
    keys = grouping_keys(runs)
    groups = group_runs(runs, keys)
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
    report = out / "report.md"
    ckpt.atomic_write_text(report, _markdown(runs, groups, keys, figures, out, [str(p) for p in paths]))
    return [report, *written]
