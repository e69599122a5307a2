"""Grouping finished runs into arms: the settings that define a method, :func:`arm_label`, :func:`group_runs`.

Part of ``normsam report`` (see :mod:`normsam.analysis.report`).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normsam.analysis import plots, stats
from normsam.analysis._format import value_text
from normsam.analysis.runs import RunRecord
from normsam.optim.scopes import MASK_SCOPES
from normsam.train.config import TrainConfig, config_keys
from normsam.train.config_help import SAM_KEYS

__all__ = [
    "METHOD_KEYS", "SCOPE_NAMES", "Group", "arm_settings", "mean_std", "run_value", "grouping_keys", "without_context",
    "arm_label", "group_runs",
]


#: The columns that define a method; further columns appear when other settings differ between runs.
METHOD_KEYS = ("optimizer", "scope", "perturbation", "rho")

#: Settings that never split groups: the seed (we average over it) and settings that do not change results.
_NOT_GROUPED = frozenset({
    "seed", "out", "progress", "threads", "device", "tensorboard", "data_dir", "download", "eval_batch_size",
    "compile", "norm_stats", "memorization", "sharpness_at_end", "sharpness_rho", "sharpness_steps",
    "sharpness_convention",
})

#: The names of the scopes in every table and figure (see :func:`arm_label`), shared with the plots.
SCOPE_NAMES = plots.SCOPE_NAMES
_OPTIMIZER_NAMES = plots.OPTIMIZER_NAMES
_SCOPE_ORDER = ("none", "all", "norm", "no-norm", "random", "ssam-f", "ssam-d")


def arm_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The settings of a run that define its arm (its group): the config without the seed and the purely
    technical settings; runs without SAM (scope none) have no SAM settings."""
    ignored = _NOT_GROUPED | (SAM_KEYS if cfg.scope == "none" else frozenset())
    return {k: v for k, v in cfg.to_dict().items() if k not in ignored}


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
    settings = [arm_settings(r.config) for r in ([r for r in runs if r.finished] or runs)]
    varying = [
        key for key in config_keys()
        if key not in METHOD_KEYS and len({json.dumps(s[key]) for s in settings if key in s}) > 1
    ]
    return varying + list(METHOD_KEYS)


def _order(columns: dict[str, Any]) -> tuple:
    scope = columns.get("scope")
    rank = _SCOPE_ORDER.index(scope) if scope in _SCOPE_ORDER else len(_SCOPE_ORDER)
    others = [value_text(v) for k, v in columns.items() if k not in METHOD_KEYS]
    rho = columns.get("rho")
    return (*others, value_text(columns.get("optimizer")), rank, value_text(scope),
            value_text(columns.get("perturbation")), -1.0 if rho is None else rho)


def without_context(label: str, context: str) -> str:
    """An arm's label without the ``key=value`` settings that ``context`` (a comparison context's title, e.g.
    ``amp=bf16, bf16_kernels=upcast``) already names: for a figure panel or a table column headed by it."""
    for part in context.split(", ") if context else []:
        label = label.replace(f", {part}", "").replace(f" ({part})", "").replace(f"({part}, ", "(")
    return label


def arm_label(settings: Mapping[str, Any], keys: Sequence[str] = (), *, rho: bool = True) -> str:
    """The name of an arm in every table and figure of the report: ``SGD``, ``SAM-ON (ρ=0.5)``,
    ``SAM-all (asam, ρ=1)``, ``random mask (ρ=0.5, sparsity 0.9995)``, ``SAM-ON (ρ=0.5, late from epoch 6)``,
    ``SAM-ON (asam, ρ=0.6, ρ warm-up 6 ep.)``.

    The scope's name (:data:`SCOPE_NAMES`; the base optimizer's name for runs without SAM), preceded by the base
    optimizer when it is not SGD; then, in parentheses (the style of :func:`plots.method_label`, so that a figure
    names a method alike whichever label it gets): the perturbation model when it is not ``sam``, ρ (unless
    ``rho=False``), what sets the arm apart (the sparsity of a mask scope, a SAM window that starts late or ends
    early, in epochs counted from 1 as in metrics.jsonl and the training log, an ascent every k steps, a ρ
    warm-up), and ``key=value`` for the other ``keys`` (the settings that differ between the runs) that are set.
    """
    scope = settings.get("scope")
    optimizer = settings.get("optimizer") or "sgd"
    optimizer_name = _OPTIMIZER_NAMES.get(optimizer, optimizer)
    details: list[str] = []
    shown = set(METHOD_KEYS)
    if scope == "none":
        name = optimizer_name
    else:
        name = SCOPE_NAMES.get(scope, scope) if isinstance(scope, str) else f"[{value_text(scope)}]"
        if optimizer != "sgd":
            name = f"{optimizer_name} {name}"
        if settings.get("perturbation") not in (None, "sam"):
            details.append(settings["perturbation"])
        if rho and settings.get("rho") is not None:
            details.append(f"ρ={value_text(settings['rho'])}")
        shown |= {"sparsity", "sam_start", "sam_end", "ascent_interval", "ascent", "rho_warmup_epochs"}
        if settings.get("rho_warmup_epochs"):
            details.append(f"ρ warm-up {value_text(settings['rho_warmup_epochs'])} ep.")
        if scope in MASK_SCOPES and settings.get("sparsity") is not None:
            details.append(f"sparsity {value_text(settings['sparsity'])}")
        start, end = settings.get("sam_start") or 0, settings.get("sam_end")
        if start and end is None:
            details.append(f"late from epoch {start + 1}")
        elif end is not None:
            details.append(f"early until epoch {end}" if not start else f"SAM in epochs {start + 1}–{end}")
        every = settings.get("ascent_interval")
        if every is not None and every > 1:
            details.append(f"ascent every {every}")
        if settings.get("ascent") == "momentum":
            details.append("momentum ascent")
    details += [f"{k}={value_text(settings[k])}" for k in keys if k not in shown and settings.get(k) is not None]
    return name + (f" ({', '.join(details)})" if details else "")


def group_runs(runs: Sequence[RunRecord], keys: Sequence[str]) -> list[Group]:
    """The finished runs grouped by the values of ``keys``, in a stable order (SGD first, then by scope, ρ).

    Each group is labelled by :func:`arm_label`; two groups that it would name alike get their columns added.
    """
    groups: dict[str, Group] = {}
    for run in runs:
        if not run.finished:
            continue
        settings = arm_settings(run.config)
        columns = {key: settings.get(key) for key in keys}
        ident = json.dumps(columns, sort_keys=True)
        if ident not in groups:
            groups[ident] = Group(arm_label(settings, keys), columns, settings=settings)
        groups[ident].runs.append(run)
    labels = [g.label for g in groups.values()]
    for g in groups.values():
        if labels.count(g.label) > 1:
            g.label += " [" + ", ".join(f"{k}={value_text(v)}" for k, v in g.columns.items() if v is not None) + "]"
    return sorted(groups.values(), key=lambda g: _order(g.columns))
