"""``normsam report RUN_DIR... --out DIR``: tables and plots from run folders.

The arguments are run folders or folders that contain them (searched recursively for ``config.yaml`` next
to ``metrics.jsonl`` or ``environment.json``). Finished runs (with ``summary.json``) are grouped by method
(optimizer, scope, perturbation, ρ, plus every other setting that differs between the runs, such as the
data or the model; seeds and purely technical settings like ``threads`` do not split groups, and the SAM
settings of runs without SAM are ignored) and summarized as mean ± sample standard deviation over the seeds.
Such a group is an *arm*, named by :func:`~normsam.analysis.grouping.arm_label` in every table and figure
(``SGD``, ``SAM-ON (ρ=0.5)``, ``random mask (ρ=0.5, sparsity 0.9995)``, ``SAM-ON (ρ=0.5, late from epoch 6)``).
Unfinished runs are listed but not counted.

Statistics and claims (:mod:`normsam.analysis.stats`): per arm the mean, standard deviation and 95% t-interval
over seeds; differences paired by seed against the SGD, SAM-all and SAM-ON arms; and the paper's claims C1–C5, each
*supported*, *contradicted*, *inconclusive* or *not tested*. Arms are compared only with arms of the same
context (the settings other than SAM's that differ between runs: data, model, base optimizer, …). Each role
of the claims (sgd, sam-all, sam-on, no-norm, random, ssam-f) is played by one arm per context: the one named
in a ``claims.yaml`` in a folder given to the report (see :func:`~normsam.analysis.claims.load_claims_selection`;
it also sets the margin δ), else the arm of the role's scope with SAM over the whole training, the highest
sparsity for the mask scopes, and the best mean validation accuracy (the best mean test accuracy, said so in
the report, when the runs have no validation split).

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
  ``paired.csv`` (arm − SGD, arm − SAM-all and arm − SAM-ON, paired by seed), ``claims.csv`` (each part of
  each claim: the arms, the paired difference with its interval, the rule and the verdict);
* ``arm_accuracy.png`` (final test accuracy per arm with its 95% CI), ``arm_sharpness_vs_accuracy.png``
  (mean sharpness vs mean accuracy per arm, both with 95% CIs), ``arm_test_curves.png`` (test accuracy per
  epoch, mean and 95% CI band per arm).

A figure without data (no SAM runs, no sharpness, no norm layers) is left out.

The jobs live in their own modules: finding runs (:mod:`normsam.analysis.runs`), grouping them into arms
(:mod:`~normsam.analysis.grouping`), tables (:mod:`~normsam.analysis.tables`), statistics and claims
(:mod:`~normsam.analysis.claims`) and figures (:mod:`~normsam.analysis.report_figures`), with the text
formatting they share in ``normsam.analysis._format``; this module writes report.md. Import each name from
the module that defines it.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from normsam.analysis import plots
from normsam.analysis._format import markdown_table, md
from normsam.analysis.claims import (
    analyse, arm_rows, claim_rows, find_claims_file, load_claims_selection, paired_rows, statistics_markdown,
)
from normsam.analysis.grouping import Group, group_runs, grouping_keys
from normsam.analysis.precision import precision_markdown, precision_rows
from normsam.analysis.report_figures import (
    accuracy_vs_rho_figure, arm_accuracy_figure, arm_sharpness_vs_accuracy_figure, arm_test_curves_figure,
    norm_params_figure, sharpness_description, sharpness_vs_accuracy_figure, training_curves_figure,
)
from normsam.analysis.run_sharpness import SETTINGS as SHARPNESS_SETTINGS
from normsam.analysis.runs import RunRecord, find_runs
from normsam.analysis.sweep import SWEEP_FILE
from normsam.analysis.tables import csv_text, group_rows, group_table, run_rows
from normsam.train import checkpoint as ckpt

__all__ = ["make_report"]


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
    return f"[{md(str(target))}](<{os.path.relpath(Path(target).resolve(), out.resolve())}>)"


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
            + (f"Sharpness: the latest measurement of each run ({sharpness_description(measured)}); blank where "
               "none was made." if measured else "No run has a sharpness measurement (`normsam sharpness RUN_DIR`).")
        )
        lines += ["", group_table(groups, keys), ""]
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
        rows.append([_link(r.folder, out), md(r.config.method), str(r.config.seed), r.status,
                     "" if acc is None else f"{acc:.2f}",
                     f"{r.sharpness['sharpness']:.4f}" if r.sharpness else ""])
    lines += [markdown_table(["run", "method", "seed", "status", "final test acc. (%)", "sharpness"], rows, 4), ""]
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
    over seeds; paired differences against the SGD, SAM-all and SAM-ON arms) and a *Claims* section (C1–C5 of
    :data:`stats.CLAIMS`, each supported, contradicted, inconclusive or not tested, with the numbers that decide
    it); they are also written as arms.csv, paired.csv and claims.csv, with three figures (arm_accuracy.png,
    arm_sharpness_vs_accuracy.png, arm_test_curves.png; error bars and bands = 95% CI).

    Args:
        claims: which arm plays each role of the claims, and the margin δ: a YAML file or a mapping (see
            :func:`~normsam.analysis.claims.load_claims_selection`). Default: ``claims.yaml`` in the first
            folder of ``paths`` that has one; without it, each role takes the arm of its scope with the best mean
            validation accuracy.
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
    selection = load_claims_selection(find_claims_file(paths) if claims is None else claims)
    contexts = analyse(groups, keys, selection)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    written = [out / "table.csv", out / "runs.csv"]
    ckpt.atomic_write_text(written[0], csv_text(group_rows(groups)))
    ckpt.atomic_write_text(written[1], csv_text(run_rows(runs, keys)))

    colors = plots.method_colors([g.label for g in groups])
    candidates = [
        ("Test accuracy vs ρ", accuracy_vs_rho_figure(groups, keys, out / "accuracy_vs_rho.png"),
         "Final test accuracy (mean ± std over seeds) against the perturbation radius ρ, per perturbation model: "
         "SAM-all perturbs every weight, SAM-ON only the normalization layers' γ and β, no-norm every weight but "
         "those. Dashed: the mean of the runs without SAM."),
        ("Sharpness vs test accuracy", sharpness_vs_accuracy_figure(groups, out / "sharpness_vs_accuracy.png", colors),
         "One point per run: its latest sharpness measurement against its final test accuracy."),
        ("γ and β of the normalization layers", norm_params_figure(groups, out / "norm_params.png", colors),
         "Pooled over all norm layers, per epoch (0 = initialization): median (line), 25–75% (dark band) and "
         "5–95% (light band), each quantile averaged over the seeds."),
        ("Training curves", training_curves_figure(groups, out / "training_curves.png", colors),
         "Train loss and test accuracy per epoch, mean ± std over the seeds."),
    ]
    figures = [(title, path, caption) for title, path, caption in candidates if path is not None]
    written += [path for _, path, _ in figures]

    tables = {"arms.csv": arm_rows(contexts, keys), "paired.csv": paired_rows(contexts),
              "claims.csv": claim_rows(contexts)}
    for name, rows in tables.items():
        ckpt.atomic_write_text(out / name, csv_text(rows))
        written.append(out / name)
    candidates = [
        ("Test accuracy per arm", arm_accuracy_figure(contexts, out / "arm_accuracy.png", colors),
         "Final test accuracy per arm: mean (dot) and 95% t-interval over the seeds (bar; a cross: one seed, no "
         "interval). Dashed: the mean of the SGD arm."),
        ("Sharpness vs test accuracy per arm",
         arm_sharpness_vs_accuracy_figure(groups, out / "arm_sharpness_vs_accuracy.png", colors),
         "Per arm with a sharpness measurement: mean sharpness (over the runs measured) against mean final test "
         "accuracy (over all its runs), each with its 95% t-interval over seeds."),
        ("Test accuracy curves per arm", arm_test_curves_figure(contexts, out / "arm_test_curves.png", colors),
         "Test accuracy per epoch: mean over the seeds (line) and 95% t-interval (band; none with one seed)."),
    ]
    stat_figures = [(title, path, caption) for title, path, caption in candidates if path is not None]
    written += [path for _, path, _ in stat_figures]
    analysis = statistics_markdown(contexts, selection.margin, stat_figures, selection.source) if groups else ""
    if precision_rows(groups):  # runs in two precisions: what bf16 costs each arm (normsam.analysis.precision)
        ckpt.atomic_write_text(out / "precision.csv", csv_text(precision_rows(groups)))
        written.append(out / "precision.csv")
        analysis += "\n" + precision_markdown(groups)
    report = out / "report.md"
    ckpt.atomic_write_text(report, _markdown(runs, groups, keys, figures, out, [str(p) for p in paths], analysis))
    return [report, *written]
