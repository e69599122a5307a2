"""The regime gate of ``normsam study``: does the label noise hurt SGD enough for SAM to have something to undo?

A study with label noise first trains **SGD alone** with its recipe, on the noisy labels and on the clean
ones (same seeds, hence the same images, the same split and the same initialization), and measures:

* the **noise cost**: clean − noisy final test accuracy, paired by seed (mean and 95% t-interval);
* **memorization**: the noisy runs' final accuracy on the flipped training examples against the flipped
  labels (:mod:`normsam.train.memorization`), and against their true labels;
* **peak vs final**: the noisy runs' best test accuracy over the evaluations minus the final one (early
  stopping would have hidden this much of the damage).

The gate passes when the mean noise cost is at least ``margin`` test-accuracy points (default 5). The decision
uses SGD's runs only, never a SAM arm's, so the design cannot be tuned to the answer. ``normsam study`` runs
the gate before anything else and stops with :class:`RegimeGateNotMet` (and the figures) when it fails::

    gate:
      seeds: [200, 201]       # seeds no reported run uses
      margin: 5               # points of test accuracy the noise must cost SGD
      clean: {label_noise: 0} # what turns the recipe into its clean twin (the default)
      eval_every: 5           # optional: evaluate the gate's runs more often than the recipe (finer curves)

Written into the study folder: ``gate.json`` and ``gate.md`` (the figures per seed and the verdict) and
``gate_curves.png`` (SGD's train and test accuracy and the flipped examples' accuracy per epoch).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from normsam.analysis import stats
from normsam.train import checkpoint as ckpt

__all__ = ["GATE_KEYS", "DEFAULT_GATE_MARGIN", "RegimeGateNotMet", "GateResult", "check_gate_spec", "gate_sweep_grid",
           "evaluate_gate", "gate_markdown", "gate_figure", "write_gate", "gate_failure_message", "gate_summary_lines"]

GATE_KEYS = ("seeds", "margin", "clean", "eval_every")
DEFAULT_GATE_MARGIN = 5.0


class RegimeGateNotMet(ValueError):
    """The noise costs SGD less than the gate's margin: the study would measure nothing SAM can undo."""


def check_gate_spec(gate: Any, noisy_label_noise: float) -> dict[str, Any]:
    """The gate settings with defaults; ValueError naming the fix."""
    if not isinstance(gate, Mapping):
        raise ValueError("gate: must be a mapping, e.g. gate: {seeds: [200, 201], margin: 5}.")
    unknown = [k for k in gate if k not in GATE_KEYS]
    if unknown:
        raise ValueError(f"Unknown key {unknown[0]!r} in gate:; valid keys are {', '.join(GATE_KEYS)}.")
    seeds = gate.get("seeds", [200, 201])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"gate: seeds must be a non-empty list of ints (seeds no reported run uses), got {seeds!r}.")
    margin = gate.get("margin", DEFAULT_GATE_MARGIN)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin < 0:
        raise ValueError(f"gate: margin must be a number >= 0 (test-accuracy points), got {margin!r}.")
    clean = dict(gate.get("clean") or {"label_noise": 0.0})
    if clean.get("label_noise", noisy_label_noise) == noisy_label_noise:
        raise ValueError("gate: clean must change label_noise (e.g. clean: {label_noise: 0}); the clean twin "
                         "of the recipe is what the noise cost is measured against.")
    if not noisy_label_noise > 0:
        raise ValueError("gate: the study's recipe has label_noise = 0, so there is no noise for the gate to "
                         "measure; set label_noise in the recipe (e.g. 0.4) or drop gate:.")
    out = {"seeds": list(seeds), "margin": float(margin), "clean": clean}
    if "eval_every" in gate:
        every = gate["eval_every"]
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"gate: eval_every must be an int >= 1 (epochs between evaluations), got {every!r}.")
        out["eval_every"] = every
    return out


def gate_sweep_grid(gate: Mapping[str, Any], noisy_label_noise: float) -> list[dict[str, list]]:
    """The gate's sweep grid: SGD on the noisy recipe and on its clean twin."""
    clean = {key: [value] for key, value in gate["clean"].items()}
    every = {"eval_every": [gate["eval_every"]]} if "eval_every" in gate else {}
    return [{"scope": ["none"], "label_noise": [noisy_label_noise], **every}, {"scope": ["none"], **clean, **every}]


@dataclass
class GateResult:
    margin: float
    seeds: list[int]
    noise_cost: stats.Interval  # clean − noisy final test accuracy, paired by seed
    memorized: stats.Interval  # noisy runs: final accuracy on the flipped examples vs their flipped labels
    flipped_true: stats.Interval  # ... vs their true labels
    peak_minus_final: stats.Interval  # noisy runs: best − final test accuracy
    clean_peak_minus_final: stats.Interval
    noisy_test: stats.Interval
    clean_test: stats.Interval
    noisy_train: stats.Interval  # final train accuracy on the noisy labels
    per_seed: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.noise_cost.mean is not None and self.noise_cost.mean >= self.margin

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["passed"] = self.passed
        return out


def _runs(gate_dir: Path) -> list[tuple[Any, dict[str, Any], list[dict[str, Any]]]]:
    from normsam.train.config import config_from_file

    runs = []
    for summary_path in sorted(gate_dir.rglob(ckpt.SUMMARY)):
        folder = summary_path.parent
        runs.append((config_from_file(folder / ckpt.CONFIG), json.loads(summary_path.read_text()),
                     ckpt.read_jsonl(folder / ckpt.METRICS_JSONL)))
    return runs


def evaluate_gate(gate_dir: str | Path, margin: float, noisy_label_noise: float) -> GateResult:
    """The gate's figures from its finished runs (noisy: ``label_noise == noisy_label_noise``, else clean)."""
    gate_dir = Path(gate_dir)
    noisy: dict[int, dict[str, Any]] = {}
    clean: dict[int, dict[str, Any]] = {}
    for cfg, summary, rows in _runs(gate_dir):
        if cfg.scope != "none":
            raise ValueError(f"{gate_dir} holds a SAM run ({cfg.method}); the gate is decided by SGD's runs only.")
        final_train = rows[-1].get("train_acc") if rows else None
        (noisy if cfg.label_noise == noisy_label_noise else clean)[cfg.seed] = {**summary, "final_train_acc": final_train}
    seeds = sorted(noisy.keys() & clean.keys())
    if not seeds:
        raise ValueError(f"No seed with both a clean and a noisy finished SGD run under {gate_dir}: run the gate.")
    missing = [s for s in seeds if noisy[s].get("final_flipped_acc") is None]
    if missing:
        raise ValueError(f"The gate's noisy runs of seeds {missing} have no final_flipped_acc: train them with "
                         "memorization: true (the default).")

    def value(summary: Mapping[str, Any], key: str) -> float:
        return float(summary[key])

    per_seed = [{
        "seed": s,
        "clean_test_acc": value(clean[s], "final_test_acc"),
        "noisy_test_acc": value(noisy[s], "final_test_acc"),
        "noise_cost": value(clean[s], "final_test_acc") - value(noisy[s], "final_test_acc"),
        "flipped_acc": value(noisy[s], "final_flipped_acc"),
        "flipped_clean_acc": value(noisy[s], "final_flipped_clean_acc"),
        "noisy_peak_test_acc": value(noisy[s], "best_test_acc"),
        "noisy_peak_epoch": noisy[s].get("best_epoch"),
        "clean_peak_test_acc": value(clean[s], "best_test_acc"),
        "noisy_final_train_acc": noisy[s].get("final_train_acc"),
    } for s in seeds]

    def interval(key: str) -> stats.Interval:
        return stats.describe(row[key] for row in per_seed)

    return GateResult(
        margin=float(margin), seeds=seeds, noise_cost=interval("noise_cost"), memorized=interval("flipped_acc"),
        flipped_true=interval("flipped_clean_acc"),
        peak_minus_final=stats.describe(r["noisy_peak_test_acc"] - r["noisy_test_acc"] for r in per_seed),
        clean_peak_minus_final=stats.describe(r["clean_peak_test_acc"] - r["clean_test_acc"] for r in per_seed),
        noisy_test=interval("noisy_test_acc"), clean_test=interval("clean_test_acc"),
        noisy_train=interval("noisy_final_train_acc") if all(r["noisy_final_train_acc"] is not None for r in per_seed)
        else stats.describe([]),
        per_seed=per_seed,
    )


def gate_markdown(result: GateResult, noisy_label_noise: float, *, figure: str | None = None, level: int = 2) -> str:
    """The gate's section of the study report (a heading of ``level``): the figures, the per-seed table and
    the verdict."""
    verdict = "**passed**" if result.passed else "**not met**"
    lines = [
        "#" * level + " Regime gate (SGD only)", "",
        f"SGD with the study's recipe on noisy labels (label_noise={noisy_label_noise:g}) and on clean labels, "
        f"seeds {', '.join(map(str, result.seeds))} (the same images, split and initialization in both). The gate "
        f"asks the noise to cost SGD at least {result.margin:g} test-accuracy points (mean over seeds); it is "
        f"decided by SGD's runs alone, before any SAM run. Verdict: {verdict}.", "",
        "| figure | mean [95% CI] over seeds |", "|---|---:|",
        f"| noise cost: clean − noisy final test acc. (points) | {result.noise_cost.text(2, signed=True)} |",
        f"| final test acc., noisy labels (%) | {result.noisy_test.text(2)} |",
        f"| final test acc., clean labels (%) | {result.clean_test.text(2)} |",
        f"| memorization: acc. on the flipped training examples vs their flipped labels (%) | "
        f"{result.memorized.text(2)} |",
        f"| acc. on the flipped training examples vs their true labels (%) | {result.flipped_true.text(2)} |",
        f"| noisy: peak − final test acc. (points) | {result.peak_minus_final.text(2, signed=True)} |",
        f"| clean: peak − final test acc. (points) | {result.clean_peak_minus_final.text(2, signed=True)} |",
        "", "| seed | clean test | noisy test | cost | flipped (noisy label) | flipped (true label) | noisy peak (epoch) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result.per_seed:
        lines.append(f"| {r['seed']} | {r['clean_test_acc']:.2f} | {r['noisy_test_acc']:.2f} | {r['noise_cost']:+.2f} | "
                     f"{r['flipped_acc']:.2f} | {r['flipped_clean_acc']:.2f} | {r['noisy_peak_test_acc']:.2f} "
                     f"({r['noisy_peak_epoch']}) |")
    lines.append("")
    lines.append("Peaks are over the evaluated epochs only (eval_every of the recipe).")
    if figure:
        lines += ["", f"![SGD's training curves, clean and noisy labels]({figure})", "",
                  "SGD per epoch, mean ± std over the gate's seeds: train accuracy (on the labels it trains on), "
                  "test accuracy, and accuracy on the flipped training examples against their flipped labels "
                  "(noisy runs only)."]
    return "\n".join(lines) + "\n"


def gate_figure(gate_dir: str | Path, path: str | Path, noisy_label_noise: float) -> Path | None:
    """SGD's train/test accuracy and the flipped examples' accuracy per epoch, clean vs noisy."""
    from normsam.analysis import plots

    curves: dict[str, dict[str, list[dict[int, float]]]] = {}
    panels = {"train accuracy (%)": "train_acc", "test accuracy (%)": "test_acc",
              "flipped training examples, flipped label (%)": "flipped_acc"}
    for cfg, _, rows in _runs(Path(gate_dir)):
        arm = f"SGD, {'noisy' if cfg.label_noise == noisy_label_noise else 'clean'} labels"
        for title, key in panels.items():
            values = {row["epoch"]: row[key] for row in rows if row.get(key) is not None}
            if values:
                curves.setdefault(title, {}).setdefault(arm, []).append(values)
    if not curves:
        return None
    series: dict[str, dict[str, plots.Series]] = {}
    for title, arms in curves.items():
        for arm, per_run in arms.items():
            epochs = sorted(set.intersection(*(set(v) for v in per_run)))
            spread = [stats.describe(v[e] for v in per_run) for e in epochs]
            series.setdefault(title, {})[arm] = (epochs, [s.mean for s in spread], [s.std for s in spread])
    colors = plots.method_colors(["SGD, clean labels", "SGD, noisy labels"])  # alike in every panel
    return plots.plot_series_panels(series, path, xlabel="epoch", ylabel={t: t for t in series}, style="band",
                                    log_x=False, integer_x=True, colors=colors)


def write_gate(out: str | Path, result: GateResult, noisy_label_noise: float) -> list[Path]:
    """gate.json, gate_curves.png and gate.md in the study folder ``out``; returns their paths."""
    out = Path(out)
    written = [out / "gate.json"]
    ckpt.write_json(written[0], {**result.to_dict(), "label_noise": noisy_label_noise})
    figure = gate_figure(out / "gate", out / "gate_curves.png", noisy_label_noise)
    if figure is not None:
        written.append(figure)
    ckpt.atomic_write_text(out / "gate.md", gate_markdown(result, noisy_label_noise,
                                                           figure=figure.name if figure else None, level=1))
    written.append(out / "gate.md")
    return written


def gate_failure_message(result: GateResult, noisy_label_noise: float, out: str | Path) -> str:
    return (
        f"Regime gate not met: label_noise={noisy_label_noise:g} costs SGD "
        f"{result.noise_cost.mean:.2f} test-accuracy points (95% CI {result.noise_cost.ci_text(2)}) over seeds "
        f"{result.seeds}, less than the gate's margin of {result.margin:g}. SGD memorizes "
        f"{result.memorized.mean:.1f}% of the flipped labels; its noisy test accuracy peaks "
        f"{result.peak_minus_final.mean:.2f} points above its final value. The reported runs were not started. "
        "Change the design from SGD's figures alone (more epochs, fewer images, more noise, no label smoothing "
        f"or augmentation), then run the study again; see {Path(out) / 'gate.md'}."
    )


def gate_summary_lines(result: GateResult) -> Sequence[str]:
    """What ``normsam study`` prints after the gate."""
    return [
        f"gate: noise cost {result.noise_cost.text(2, signed=True)} points (margin {result.margin:g}) -> "
        + ("passed" if result.passed else "NOT MET"),
        f"gate: memorized {result.memorized.text(1)}% of the flipped labels; noisy peak − final "
        f"{result.peak_minus_final.text(2, signed=True)} points",
    ]
