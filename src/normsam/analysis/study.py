"""``normsam study STUDY.yaml``: a pilot that chooses ρ on the validation split, then the reported runs.

A study is a few sweeps (:mod:`normsam.analysis.sweep`) run one after another in one parent folder::

    preset: configs/study/noise-base.yaml   # the training recipe every run starts from
    out: runs/study-noise
    workers: 2                             # runs in parallel (one process each)
    executor: local                        # or slurm: each phase's runs as jobs (slurm: {...} as in a sweep)
    pilot:                                 # phase 1: a ρ grid at a seed the reported runs do not use
      seeds: [100]
      grid:
        - {scope: [all], rho: [0.1, 0.2, 0.5]}
        - {scope: [norm], rho: [0.2, 0.5, 1.0]}
    phases:                                # then the reported runs, in order of priority
      - name: main
        seeds: [0, 1, 2]
        grid:
          - {scope: [none]}
          - {scope: [all], rho: ["@rho:all"]}
          - {scope: [norm], rho: ["@rho:norm"]}
      - name: extra
        seeds: [0, 1]
        grid:
          - {scope: [random], rho: ["@rho:norm"], sparsity: ["@sparsity:norm"]}

With label noise in the recipe, a ``gate:`` runs first (:mod:`normsam.analysis.gate`): SGD alone on the noisy
and on the clean labels; the study stops with :class:`~normsam.analysis.gate.RegimeGateNotMet` before any other
run when the noise costs SGD less than the gate's margin.

After the pilot, ``@rho:SCOPE`` stands for the pilot's ρ with the best mean final *validation* accuracy among
the pilot's runs with that scope (the test set plays no part in the choice; ``@rho:norm/momentum`` for the runs
with ``ascent: momentum``, whose ρ lives on another scale), and ``@sparsity:SCOPE`` for the
share of the model's trainable elements that ``SCOPE`` does *not* select (SAM-ON's sparsity for ``norm``), so a
mask scope can be compared at SAM-ON's sparsity. The choice, with every pilot run's validation accuracy, is
written to ``out/choice.json`` and ``out/choice.md``; each phase's generated sweep file to
``out/sweeps/<phase>.yaml``; the wall-clock of each phase to ``out/study.json``, saved every minute while the
phase runs, so a sitting cut short still counts. Like sweeps, a study can be stopped and started again:
finished runs are skipped, interrupted ones resumed, and the choice is recomputed from the same pilot runs (so
it is the same).

A chosen ρ at an edge of its grid (the largest, or the smallest above 0) says the best ρ may lie outside it:
the pilot then adds the next value out, at the ratio of the grid's two outermost values, and runs again, up to
``max_extensions`` times per scope (pilot key, default 3); ``choice.json`` lists the values added and any
choice still at an edge.

A tie (the best mean shared by another candidate, within :data:`TIE_TOLERANCE`: every ρ at 10% because
nothing trains, or equal values) goes to the smaller ρ, but says nothing about where the best ρ lies: the
grid is then not extended (a tie at the lower edge would otherwise walk ρ down to ≈ SGD, each new value tying
again), and the tie is recorded in ``choice.json`` (``tied``: per arm, the tied values), marked in
``choice.md`` and printed as a warning.

An arm with a ρ warm-up (``rho_warmup_epochs: [6]`` in its grid entry) is chosen on its own, as
``@rho:norm+warmup6``: its best ρ need not be the constant-ρ arm's. ``earlier:`` (pilot key: one or more
``choice.json`` files of an earlier pilot with the same recipe and pilot seeds) adds that pilot's candidates to
the choice, so a new pilot can extend an old grid (say, to larger ρ) without training its runs again;
``choice.md`` says which values came from the record. A grid entry that would train a (scope, ρ) the record
already holds is refused.
"""

from __future__ import annotations

import difflib
import json
import math
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from normsam.files import read_json, read_yaml
from normsam.train import checkpoint as ckpt
from normsam.train.run_lock import RunLock

__all__ = ["STUDY_KEYS", "load_study", "check_plan", "choose_rho", "norm_sparsity", "resolve_grid", "run_study"]

STUDY_KEYS = ("preset", "base", "out", "workers", "gate", "pilot", "phases", "executor", "slurm")
_PILOT_KEYS = ("seeds", "grid", "max_extensions", "earlier")
_PHASE_KEYS = ("name", "seeds", "grid")
_PLACEHOLDER_KINDS = ("rho", "sparsity")

#: Means (in accuracy points) closer than this to the best are tied with it.
TIE_TOLERANCE = 1e-6


def load_study(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """Read and check a study file; raise ValueError naming the fix."""
    if isinstance(source, Mapping):
        spec = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"Study file {path} does not exist.")
        spec = read_yaml(path) or {}
    if not isinstance(spec, Mapping):
        raise ValueError(f"A study must be a mapping with the keys {', '.join(STUDY_KEYS)}.")
    unknown = [k for k in spec if k not in STUDY_KEYS]
    if unknown:
        raise ValueError(f"Unknown study key {unknown[0]!r}; valid keys are {', '.join(STUDY_KEYS)}.")
    if not spec.get("out"):
        raise ValueError("The study has no out: add its parent folder, e.g. out: runs/my-study.")
    if not isinstance(spec.get("pilot"), Mapping) or not spec["pilot"].get("grid"):
        raise ValueError("The study needs a pilot: with seeds: and a grid: of the ρ values to choose from.")
    bad = [k for k in spec["pilot"] if k not in _PILOT_KEYS]
    if bad:
        raise ValueError(f"Unknown key {bad[0]!r} in pilot:; valid keys are {', '.join(_PILOT_KEYS)}.")
    limit = spec["pilot"].get("max_extensions", 3)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"pilot: max_extensions must be an int >= 0 (0: never extend the grid), got {limit!r}.")
    phases = spec.get("phases") or []
    if not isinstance(phases, list) or not phases:
        raise ValueError("The study needs phases: a list of {name, seeds, grid} with the reported runs.")
    names = set()
    for i, phase in enumerate(phases):
        if not isinstance(phase, Mapping) or "grid" not in phase:
            raise ValueError(f"Phase {i} must be a mapping with name, seeds and grid.")
        bad = [k for k in phase if k not in _PHASE_KEYS]
        if bad:
            raise ValueError(f"Unknown key {bad[0]!r} in phase {i}; valid keys are {', '.join(_PHASE_KEYS)}.")
        name = str(phase.get("name", f"phase{i + 1}"))
        if name in names or name in ("pilot", "gate"):
            raise ValueError(f"Phase name {name!r} is used twice (or is 'pilot' or 'gate'); give each phase its own "
                             "name.")
        names.add(name)
    spec = {**spec, "pilot": {**spec["pilot"], "earlier": _earlier_paths(spec["pilot"].get("earlier"))}}
    pilot_seeds = set(spec["pilot"].get("seeds", [0]))
    reported = set().union(*(set(p.get("seeds", [0])) for p in phases))
    if pilot_seeds & reported:
        raise ValueError(
            f"The pilot's seeds {sorted(pilot_seeds & reported)} are also reported runs' seeds: ρ chosen on them "
            "would favour those runs. Give the pilot seeds no phase uses (e.g. pilot: {seeds: [100, 101]})."
        )
    return spec


def _sweep_spec(spec: Mapping[str, Any], name: str, seeds: Any, grid: Any) -> dict[str, Any]:
    out = {"out": str(Path(spec["out"]) / name), "seeds": seeds, "grid": grid, "workers": spec.get("workers", 1)}
    for key in ("preset", "base", "executor", "slurm"):
        if spec.get(key) is not None:
            out[key] = spec[key]
    return out


def choice_key(scope: str, ascent: str = "gradient", rho_warmup_epochs: float = 0.0) -> str:
    """The name of a pilot arm's ρ choice: its scope, with ``/momentum`` for the momentum ascent and
    ``+warmup6`` for a 6-epoch ρ warm-up (``norm/momentum``, ``norm+warmup6``)."""
    key = scope if ascent == "gradient" else f"{scope}/{ascent}"
    return key + (f"+warmup{float(rho_warmup_epochs):g}" if rho_warmup_epochs else "")


def parse_choice_key(key: str) -> tuple[str, str, float]:
    """``"norm/momentum+warmup6"`` → ``("norm", "momentum", 6.0)``: the inverse of :func:`choice_key`."""
    arm, _, warmup = key.partition("+warmup")
    scope, _, ascent = arm.partition("/")
    return scope, ascent or "gradient", float(warmup) if warmup else 0.0


def _entry_choice_keys(entry: Mapping[str, Any]) -> list[str]:
    """The choice keys of the arms a grid entry trains (its scopes × ascents × warm-ups)."""
    return [choice_key(scope, ascent, warmup)
            for scope in entry.get("scope", [])
            for ascent in entry.get("ascent", ["gradient"])
            for warmup in entry.get("rho_warmup_epochs", [0.0])]


def _earlier_paths(earlier: Any) -> list[str]:
    """The pilot's ``earlier:`` record files, checked: each a ``choice.json`` with a ``choice``."""
    paths = [] if earlier is None else [earlier] if isinstance(earlier, (str, Path)) else list(earlier)
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"pilot: earlier: {path} does not exist; name the choice.json of an earlier pilot (with the same "
                "recipe and pilot seeds), e.g. earlier: docs/results/study-regime/pilot/choice.json."
            )
        record = read_json(Path(path))
        if not isinstance(record, Mapping) or not isinstance(record.get("choice"), Mapping):
            raise ValueError(f"pilot: earlier: {path} is not a pilot's choice.json (it has no 'choice').")
    return [str(p) for p in paths]


def earlier_candidates(paths: Sequence[str | Path]) -> dict[str, dict[float, list[float]]]:
    """``{key: {ρ: [metric per seed]}}`` from earlier pilots' ``choice.json`` records."""
    table: dict[str, dict[float, list[float]]] = {}
    for path in paths:
        for key, entry in read_json(Path(path))["choice"].items():
            for rho, values in entry["candidates"].items():
                table.setdefault(key, {}).setdefault(float(rho), []).extend(float(v) for v in values)
    return table


def choose_rho(pilot_dir: str | Path, metric: str = "final_val_acc", *,
               earlier: Mapping[str, Mapping[float, Sequence[float]]] | None = None,
               runs: Sequence[str | Path] | None = None) -> dict[str, dict[str, Any]]:
    """Per arm (scope, ascent and ρ warm-up, see :func:`choice_key`), the ρ whose pilot runs have the best mean
    ``metric`` (ties: the smaller ρ). ``earlier``: candidates of an earlier pilot (:func:`earlier_candidates`),
    added to this pilot's. ``runs``: the pilot's run folders; other folders under ``pilot_dir`` are left out
    (default: every finished run under it).

    Returns ``{key: {"rho": ρ, "candidates": {ρ: [values over seeds]}}}`` for every arm with a ρ, with
    ``"earlier": [ρ, ...]`` listing the candidates that came from the record and ``"tied": [ρ, ...]`` the
    candidates whose mean equals the best one (:func:`tied_candidates`), when there are several.
    """
    from normsam.train.config import config_from_file

    table: dict[str, dict[float, list[float]]] = {
        key: {rho: list(values) for rho, values in by_rho.items()} for key, by_rho in (earlier or {}).items()
    }
    wanted = None if runs is None else {Path(r).resolve() for r in runs}
    for summary_path in sorted(Path(pilot_dir).rglob(ckpt.SUMMARY)):
        run = summary_path.parent
        if wanted is not None and run.resolve() not in wanted:
            continue
        cfg = config_from_file(run / ckpt.CONFIG)
        if cfg.scope == "none" or not isinstance(cfg.scope, str):
            continue
        summary = read_json(summary_path)
        if summary.get("status") == "diverged":  # a ρ whose run diverged is no candidate
            continue
        value = summary.get(metric)
        if value is None:
            raise ValueError(
                f"Pilot run {run} has no {metric}: the pilot must train with val_split > 0 so that ρ is "
                "chosen on validation data, never on the test set."
            )
        key = choice_key(cfg.scope, cfg.ascent, cfg.rho_warmup_epochs)
        if float(cfg.rho) in (earlier or {}).get(key, {}):
            raise ValueError(
                f"Pilot run {run} trains {key} at ρ={cfg.rho:g}, which the earlier record already holds: drop that ρ "
                "from the pilot's grid (or the record from earlier:)."
            )
        table.setdefault(key, {}).setdefault(float(cfg.rho), []).append(float(value))
    if not table:
        raise ValueError(f"No finished pilot run with a ρ under {pilot_dir}: run the pilot first.")
    choice = {}
    for key, by_rho in table.items():
        best = max(sorted(by_rho), key=lambda r: sum(by_rho[r]) / len(by_rho[r]))  # sorted: ties → smaller ρ
        choice[key] = {"rho": best, "candidates": {str(r): v for r, v in sorted(by_rho.items())}}
        tied = tied_candidates(choice[key])
        if tied:
            choice[key]["tied"] = tied
        if key in (earlier or {}):
            choice[key]["earlier"] = sorted(earlier[key])
    return choice


def tied_candidates(entry: Mapping[str, Any]) -> list[float]:
    """The ρ values (sorted) whose mean is within :data:`TIE_TOLERANCE` of the chosen ρ's, the chosen one
    included, when there are at least two; else ``[]``."""
    means = {float(r): sum(v) / len(v) for r, v in entry["candidates"].items()}
    best = means[float(entry["rho"])]
    tied = sorted(r for r, m in means.items() if abs(m - best) <= TIE_TOLERANCE)
    return tied if len(tied) > 1 else []


def _grid_entries(grid: Any) -> list[dict[str, Any]]:
    return [dict(entry) for entry in (grid if isinstance(grid, list) else [grid])]


def _template(grid: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """The pilot grid entry that holds the arm ``key`` (scope, ascent and warm-up), to copy for a new ρ."""
    for entry in grid:
        if key in _entry_choice_keys(entry):
            return entry
    return None


def _round(value: float) -> float:
    return float(f"{value:.4g}")


def edge_extensions(choice: Mapping[str, Any], grid: Any, original: Any, limit: int) -> list[dict[str, Any]]:
    """Grid entries that extend the pilot where a chosen ρ lies at an edge of its candidates: one more ρ
    outwards, at the ratio of the two outermost values; at most ``limit`` added per arm beyond ``original``.
    A tied choice (:func:`tied_candidates`) is not extended: the pilot cannot tell its values apart."""
    entries, base = _grid_entries(grid), _grid_entries(original)
    out = []
    for key, entry in choice.items():
        rhos = sorted(float(r) for r in entry["candidates"])
        template = _template(base, key)
        if len(rhos) < 2 or template is None:
            continue
        originally = {float(r) for e in base if e is template for r in e.get("rho", [])}
        originally |= {float(r) for r in entry.get("earlier", [])}  # an earlier pilot's values are no extension
        if len(set(rhos) - originally) >= limit or tied_candidates(entry):
            continue
        best = float(entry["rho"])
        if best == rhos[-1]:
            new = _round(best * rhos[-1] / rhos[-2])
        elif best == rhos[0] and best > 0:
            new = _round(best * rhos[0] / rhos[1])
        else:
            continue
        scope, ascent, warmup = parse_choice_key(key)
        extra = {**template, "scope": [scope], "rho": [new]}
        if ascent != "gradient":
            extra["ascent"] = [ascent]
        if warmup:  # as the grid writes it (6, not 6.0: the run folders' names are built from these values)
            extra["rho_warmup_epochs"] = [int(warmup) if float(warmup).is_integer() else warmup]
        if extra not in entries:
            out.append(extra)
    return out


def norm_sparsity(spec: Mapping[str, Any], scope: str = "norm") -> float:
    """The share of the study model's trainable elements that ``scope`` does not select (rounded to 1e-6)."""
    from torch import nn

    from normsam.optim.groups import param_groups
    from normsam.train.config import load_config
    from normsam.train.run_folder import build_run_model, load_run_data

    cfg = load_config(spec.get("preset"), dict(spec.get("base") or {}))
    model: nn.Module = build_run_model(cfg, load_run_data(cfg))
    groups = param_groups(model, scope)
    total = sum(p.numel() for g in groups for p in g["params"] if p.requires_grad)
    chosen = sum(p.numel() for g in groups if g.get("perturb", True) for p in g["params"] if p.requires_grad)
    return round(1.0 - chosen / total, 6)


def resolve_grid(grid: Any, values: Mapping[str, Any]) -> Any:
    """Replace every ``"@kind:scope"`` string in a grid by ``values["@kind:scope"]``."""
    if isinstance(grid, list):
        return [resolve_grid(item, values) for item in grid]
    if isinstance(grid, Mapping):
        return {key: resolve_grid(item, values) for key, item in grid.items()}
    if isinstance(grid, str) and grid.startswith("@"):
        if grid not in values:
            known = ", ".join(sorted(values)) or "none (the pilot chose nothing)"
            raise ValueError(f"Unknown placeholder {grid!r} in the study's phases; known: {known}.")
        return values[grid]
    return grid


def _placeholders(grid: Any) -> set[str]:
    if isinstance(grid, list):
        return set().union(*(_placeholders(item) for item in grid)) if grid else set()
    if isinstance(grid, Mapping):
        return set().union(*(_placeholders(item) for item in grid.values())) if grid else set()
    return {grid} if isinstance(grid, str) and grid.startswith("@") else set()


def _mean_of(entry: Mapping[str, Any], rho: float) -> float:
    values = next(v for r, v in entry["candidates"].items() if math.isclose(float(r), float(rho)))
    return sum(values) / len(values)


def _choice_markdown(choice: Mapping[str, Any], metric: str, earlier: Sequence[str] = ()) -> str:
    lines = [f"# ρ chosen by the pilot (best mean {metric}; the test set played no part)", ""]
    for scope, entry in choice.items():
        if entry.get("tied"):
            lines += [f"**Tie ({scope}):** ρ {', '.join(f'{float(r):g}' for r in entry['tied'])} have the same mean "
                      f"{metric} ({_mean_of(entry, entry['rho']):.2f}), so the pilot cannot tell them apart (did "
                      f"anything train?). The smallest, {float(entry['rho']):g}, is used, and the grid was not "
                      "extended past it.", ""]
    if earlier:
        lines += ["Candidates marked *record* come from an earlier pilot's record, not from runs in this folder: "
                  + ", ".join(earlier) + ".", ""]
    lines += ["| scope | ρ | mean " + metric + " | seeds | chosen |", "|---|---:|---:|---:|:---:|"]
    for scope, entry in choice.items():
        from_record = {float(r) for r in entry.get("earlier", [])}
        for rho, vals in entry["candidates"].items():
            tied = any(math.isclose(float(rho), float(r)) for r in entry.get("tied", []))
            mark = (("✔" if math.isclose(float(rho), entry["rho"]) else "") + (" (tie)" if tied else "")).strip()
            source = " (*record*)" if float(rho) in from_record else ""
            lines.append(f"| {scope} | {float(rho):g}{source} | {sum(vals) / len(vals):.2f} | {len(vals)} | {mark} |")
    return "\n".join(lines) + "\n"


def _phase_names(spec: Mapping[str, Any]) -> list[str]:
    return [str(p.get("name", f"phase{i + 1}")) for i, p in enumerate(spec["phases"])]


def check_plan(spec: Mapping[str, Any], phases: Sequence[str] | None = None) -> None:
    """Check a loaded study ``spec`` before anything trains; raise ValueError naming the phase and the fix.

    A study runs its pilot (hours) before it resolves the phases' ``@rho:SCOPE`` placeholders, so a mistake in a
    phase would otherwise show only after the pilot has trained. This finds, up front:

    * ``--phase`` names that are not ``pilot`` or a phase of the file (a typo would run nothing and exit 0);
    * a pilot without a validation split (ρ is chosen on validation accuracy, never on the test set);
    * a placeholder ``@rho:SCOPE`` for a scope the pilot trains no ρ for, ``@sparsity:SCOPE`` for a scope that is
      not a parameter scope, or an unknown placeholder kind;
    * any config error in any run of any phase (unknown keys, wrong types, an option that would be ignored),
      by building every phase's sweep with each placeholder replaced by a value of its kind.
    """
    from normsam.analysis.sweep import load_sweep
    from normsam.optim.scopes import PARAMETER_SCOPES

    names = [*(["gate"] if spec.get("gate") is not None else []), "pilot", *_phase_names(spec)]
    for wanted in phases or []:
        if wanted not in names:
            close = difflib.get_close_matches(wanted, names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"--phase {wanted!r} is not a phase of this study ({', '.join(names)}).{hint}")

    if spec.get("gate") is not None:  # the gate's settings and its runs' configs, like every phase's
        load_sweep(_gate_sweep(spec)[2])

    pilot_spec = spec["pilot"]
    pilot = load_sweep(_sweep_spec(spec, "pilot", pilot_spec.get("seeds", [0]), pilot_spec["grid"]))
    no_val = [run.name for run in pilot.runs if not run.config.val_split > 0]
    if no_val:
        raise ValueError(
            f"The study's pilot run {no_val[0]} has val_split=0, but ρ is chosen on validation accuracy (never on "
            "the test set): set val_split in the study's base (e.g. base: {val_split: 0.1})."
        )
    record = earlier_candidates(pilot_spec.get("earlier") or [])
    rhos: dict[str, float] = {key: min(by_rho) for key, by_rho in record.items()}
    for run in pilot.runs:
        if isinstance(run.config.scope, str) and run.config.scope != "none":
            key = choice_key(run.config.scope, run.config.ascent, run.config.rho_warmup_epochs)
            if float(run.config.rho) in record.get(key, {}):
                raise ValueError(
                    f"The pilot's grid trains {key} at ρ={run.config.rho:g}, which its earlier: record already "
                    "holds (the same seeds would be counted twice): drop that ρ from the grid."
                )
            rhos.setdefault(key, run.config.rho)

    values: dict[str, Any] = {}
    for name, phase in zip(_phase_names(spec), spec["phases"]):
        for placeholder in sorted(_placeholders(phase["grid"])):
            kind, _, scope = placeholder[1:].partition(":")
            if kind == "rho":
                if scope not in rhos:
                    trained = ", ".join(sorted(rhos)) or "none"
                    raise ValueError(
                        f"Phase {name} uses {placeholder}, but the pilot trains no run with scope={scope} (it "
                        f"trains ρ for: {trained}); add {{scope: [{scope}], rho: [...]}} to the pilot's grid."
                    )
                values[placeholder] = rhos[scope]
            elif kind == "sparsity":
                if scope not in PARAMETER_SCOPES:
                    raise ValueError(
                        f"Phase {name} uses {placeholder}; @sparsity: takes one of {', '.join(PARAMETER_SCOPES)}."
                    )
                values[placeholder] = 0.5  # a stand-in of the right kind: the real value needs the model
            else:
                raise ValueError(f"Phase {name}: unknown placeholder {placeholder!r}; use @rho:SCOPE or @sparsity:SCOPE.")
        try:
            load_sweep(_sweep_spec(spec, name, phase.get("seeds", [0]), resolve_grid(phase["grid"], values)))
        except ValueError as err:
            raise ValueError(f"Phase {name}: {err}") from None


def run_study(
    source: str | Path | Mapping[str, Any],
    *,
    workers: int | None = None,
    phases: list[str] | None = None,
    report: bool = True,
    overrides: Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    executor: str | None = None,
    gate_margin: float | None = None,
) -> dict[str, Any]:
    """Run the gate (if any) and the pilot, choose ρ, then each phase (or only those named in ``phases``);
    returns the record written to ``out/study.json``. The gate and the pilot always run first (their finished
    runs are skipped), since the verdict and the choice need all of them; ``phases=["gate"]`` stops after the
    gate, ``["pilot"]`` after the choice.

    ``overrides`` (config keys) are laid over the study's ``base`` for every run, and ``out`` replaces its
    folder: the same study on another device (``device=cuda``) or as a quick smoke test (``epochs=1``);
    ``gate_margin`` replaces the gate's margin (``0`` for a smoke test whose tiny runs cannot meet it).
    """
    spec = load_study(source)
    if overrides:
        spec["base"] = {**(spec.get("base") or {}), **overrides}
    if out is not None:
        spec["out"] = str(out)
    if executor is not None:  # e.g. --executor slurm: every phase's sweep submits jobs and waits for them
        spec["executor"] = executor
    if gate_margin is not None:
        if spec.get("gate") is None:
            raise ValueError("--gate-margin given, but the study has no gate:; drop the option or add a gate.")
        spec["gate"] = {**spec["gate"], "margin": gate_margin}
    out = Path(spec["out"])
    check_plan(spec, phases)  # the whole plan, before the pilot trains for hours
    with RunLock(out, what="study"):
        return _run_phases(spec, out, workers=workers, phases=phases, report=report)


class PhaseClock:
    """Adds a phase's elapsed time to ``entry["wall_clock_s"]`` and saves ``record`` to ``path``: every
    ``every`` seconds while the phase runs and once when it ends, however it ends. A sitting stopped by Ctrl-C
    or an error keeps all of its time; one killed outright (SIGKILL, the machine going away) loses at most
    ``every`` seconds of it, where a record written only at the end would lose the whole sitting."""

    def __init__(self, path: Path, record: dict[str, Any], entry: dict[str, Any], *, every: float = 60.0):
        self.path, self.record, self.entry, self.every = path, record, entry, every
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def note(self, **fields: Any) -> None:
        """Set (``None``: remove) fields of the entry; under the lock, so that a save never sees it change."""
        with self._lock:
            for key, value in fields.items():
                if value is None:
                    self.entry.pop(key, None)
                else:
                    self.entry[key] = value

    def save(self) -> None:
        with self._lock:  # the ticking thread and the final save must not interleave their writes
            self.entry["wall_clock_s"] = round(self._before + time.time() - self.started, 1)
            ckpt.write_json(self.path, self.record)

    def _tick(self) -> None:
        while not self._stop.wait(self.every):
            self.save()

    def __enter__(self) -> PhaseClock:
        self._before = float(self.entry.get("wall_clock_s", 0.0))
        self.started = time.time()
        self._thread = threading.Thread(target=self._tick, name="normsam-phase-clock", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.save()


def _run_phases(spec: dict[str, Any], out: Path, *, workers: int | None, phases: list[str] | None,
                report: bool) -> dict[str, Any]:
    from normsam.analysis.sweep import load_sweep, run_sweep

    (out / "sweeps").mkdir(parents=True, exist_ok=True)
    record_path = out / "study.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {"phases": {}}

    def timed(name: str, sweep_spec: dict[str, Any]) -> Any:
        sweep_file = out / "sweeps" / f"{name}.yaml"
        ckpt.atomic_write_text(sweep_file, yaml.safe_dump(sweep_spec, sort_keys=False))
        print(f"study {out}: phase {name} ({sweep_file})", flush=True)
        entry = record["phases"].setdefault(name, {"wall_clock_s": 0.0})
        entry["sweep"] = str(sweep_file)
        with PhaseClock(record_path, record, entry) as clock:  # the time counts even for a sitting cut short
            try:
                sweep = run_sweep(load_sweep(sweep_file), workers=workers, wait=True)  # later phases need it
            except BaseException:
                clock.note(interrupted=datetime.now(timezone.utc).isoformat(timespec="seconds"))
                raise
            clock.note(interrupted=None, finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       counts=sweep.counts())
        total = entry["wall_clock_s"]
        print(f"study {out}: phase {name}: {time.time() - clock.started:.0f} s this time, {total // 3600:.0f} h "
              f"{total % 3600 / 60:.0f} min over all sittings ({record_path})", flush=True)
        if sweep.failed:
            raise RuntimeError(f"Phase {name}: {len(sweep.failed)} run(s) failed; see {sweep.out / 'sweep.json'}.")
        return sweep

    if spec.get("gate") is not None:  # first, and decided by SGD alone: is there damage for SAM to undo?
        _run_gate(spec, out, timed)
        if phases is not None and set(phases) <= {"gate"}:
            return record

    pilot = spec["pilot"]
    metric = "final_val_acc"
    from_record = earlier_candidates(pilot.get("earlier") or [])
    grid = _grid_entries(pilot["grid"])
    # A later sitting starts from the grid as the earlier ones extended it, so that the pilot's sweep file and
    # choice.json keep listing every value added (the choice, made from the finished runs, would not need them).
    earlier = read_json(out / "choice.json").get("extended", []) if (out / "choice.json").exists() else []
    extended: list[dict[str, Any]] = [e for e in earlier if e not in grid]
    grid += extended
    while True:  # always: finished pilot runs are skipped, and the choice needs every one of them
        pilot_sweep = timed("pilot", _sweep_spec(spec, "pilot", pilot.get("seeds", [0]), grid))
        # only this pilot's runs: a folder left by an earlier version of the study file (other seeds, another
        # recipe) under pilot/ must not join the choice
        choice = choose_rho(out / "pilot", metric, earlier=from_record, runs=[r.folder for r in pilot_sweep.runs])
        more = edge_extensions(choice, grid, pilot["grid"], pilot.get("max_extensions", 3))
        if not more:
            break
        print("study: ρ at the edge of the pilot grid, adding " + ", ".join(
            f"{_entry_choice_keys(e)[0]} ρ={e['rho'][0]:g}" for e in more), flush=True)
        grid += more
        extended += more
    at_edge = [key for key in choice if edge_extensions({key: choice[key]}, grid, grid, 1)]
    values: dict[str, Any] = {f"@rho:{scope}": entry["rho"] for scope, entry in choice.items()}
    needed = set().union(*(_placeholders(p["grid"]) for p in spec["phases"]))
    for name in sorted(needed):
        kind, _, scope = name[1:].partition(":")
        if kind == "sparsity":
            values[name] = norm_sparsity(spec, scope)
        elif kind not in _PLACEHOLDER_KINDS:
            raise ValueError(f"Unknown placeholder {name!r}; use @rho:SCOPE or @sparsity:SCOPE.")
    tied = {key: entry["tied"] for key, entry in choice.items() if entry.get("tied")}
    ckpt.write_json(out / "choice.json", {"metric": metric, "choice": choice, "values": values,
                                          "extended": extended, "at_edge": at_edge, "tied": tied,
                                          "earlier": list(pilot.get("earlier") or [])})
    for key, rhos in tied.items():
        print(f"study: warning: {key}: ρ {', '.join(f'{r:g}' for r in rhos)} tie on the mean {metric} "
              f"({_mean_of(choice[key], choice[key]['rho']):.2f}): the pilot cannot tell them apart (did anything "
              f"train?); the smallest, {choice[key]['rho']:g}, is used and the grid is not extended; see choice.md.",
              flush=True)
    if at_edge:
        print(f"study: warning: the chosen ρ of {', '.join(at_edge)} is still at an edge of the pilot grid "
              "(max_extensions reached); see choice.md.", flush=True)
    ckpt.atomic_write_text(out / "choice.md", _choice_markdown(choice, metric, pilot.get("earlier") or [])
                           + "\n" + rho_curves_section(spec, choice, "choice_rho.png", out / "choice_rho.png"))
    print("study: chosen " + ", ".join(f"{k}={v}" for k, v in values.items()), flush=True)

    for i, phase in enumerate(spec["phases"]):
        name = str(phase.get("name", f"phase{i + 1}"))
        if phases is not None and name not in phases:
            continue
        timed(name, _sweep_spec(spec, name, phase.get("seeds", [0]), resolve_grid(phase["grid"], values)))

    if report:
        from normsam.analysis.report import make_report

        dirs = [out / str(p.get("name", f"phase{i + 1}")) for i, p in enumerate(spec["phases"])]
        make_report([str(d) for d in dirs if d.exists()], out=str(out / "report"))
        if spec.get("gate") is not None:
            _add_gate_to_report(out, out / "report")
        _insert_before_results(out / "report" / "report.md", rho_provenance_markdown(spec, values))
        _insert_before_results(out / "report" / "report.md", rho_curves_section(
            spec, choice, "pilot_rho.png", out / "report" / "pilot_rho.png"))
    return record


#: Keys that do not make an arm a variant of the one whose ρ the pilot tuned (precision, measurement, the
#: momentum ascent's required running-statistics policy).
_NOT_VARIANT = frozenset({"scope", "rho", "ascent", "rho_warmup_epochs", "bn_policy", "amp", "bf16_kernels",
                          "sharpness_at_end", "seed"})
_ARM_NAMES = {"all": "SAM-all", "norm": "SAM-ON", "no-norm": "no-norm", "random": "random mask", "ssam-f": "SSAM-F",
              "norm/momentum": "SAM-ON with the momentum ascent"}


def _arm_name(key: str) -> str:
    scope, ascent, warmup = parse_choice_key(key)
    base = _ARM_NAMES.get(choice_key(scope, ascent), choice_key(scope, ascent))
    return base + (f" with a {warmup:g}-epoch ρ warm-up" if warmup else "")


def rho_provenance_markdown(spec: Mapping[str, Any], values: Mapping[str, Any]) -> str:
    """A section saying, for every reported arm with a placeholder ρ, whether the pilot tuned that ρ for it or
    it runs at another arm's ρ ("ρ of SAM-ON")."""
    rows = []
    for i, phase in enumerate(spec["phases"]):
        name = str(phase.get("name", f"phase{i + 1}"))
        for entry in _grid_entries(phase["grid"]):
            rhos = [r for r in entry.get("rho", []) if isinstance(r, str) and r.startswith("@rho:")]
            if not rhos:
                continue
            for own in _entry_choice_keys(entry):
                variant = {k: v for k, v in entry.items() if k not in _NOT_VARIANT}
                for placeholder in rhos:
                    source = placeholder.partition(":")[2]
                    tuned = source == own and not variant
                    how = ("tuned for this arm" + (" (in the pilot's precision)" if "amp" in entry else "")
                           if tuned else f"ρ of {_arm_name(source)}, not tuned for this arm")
                    settings = ", ".join(f"{k}={'/'.join(map(str, v))}" for k, v in entry.items() if k != "rho")
                    rows.append(f"| {name} | {settings} | {values.get(placeholder, '?')} | {how} |")
    if not rows:
        return ""
    return "\n".join(["## Where each arm's ρ comes from", "",
                      "The pilot chose ρ on the validation split for the arms it ran (choice.md); the others run at "
                      "the ρ of the arm they vary.", "",
                      "| phase | arm | ρ | source |", "|---|---|---:|---|", *rows, ""]) + "\n"


def rho_curves_section(spec: Mapping[str, Any], choice: Mapping[str, Any], link: str, figure: Path) -> str:
    """The pilot's validation accuracy against ρ, one curve per arm with its collapse (:mod:`normsam.analysis.
    rho_curves`): the figure written to ``figure``, and a markdown section that shows it as ``link``."""
    from normsam.analysis.rho_curves import CHANCE, rho_curves_figure, rho_curves_markdown
    from normsam.train.config import load_config

    chance = CHANCE.get(load_config(spec.get("preset"), dict(spec.get("base") or {})).data, 0.0)
    names = {key: _arm_name(key) for key in choice}
    rho_curves_figure(choice, figure, chance=chance, names=names)
    return "\n".join([
        "## Validation accuracy against ρ (the pilot)", "",
        f"Mean final validation accuracy over the pilot's seeds (dots: each seed); the circle marks the chosen ρ. "
        f"The collapse is the first ρ above the best whose mean is at or below half-way from the best to chance "
        f"({chance:g}%): where a larger radius stops the network from fitting.", "",
        f"![validation accuracy against rho]({link})", "", rho_curves_markdown(choice, chance, names),
    ])


def _insert_before_results(report: Path, section: str) -> None:
    if not section or not report.is_file():
        return
    text = report.read_text()
    marker = "## Results"
    text = text.replace(marker, section + "\n" + marker, 1) if marker in text else text + "\n" + section
    ckpt.atomic_write_text(report, text)


def _noisy_label_noise(spec: Mapping[str, Any]) -> float:
    from normsam.train.config import load_config

    return float(load_config(spec.get("preset"), dict(spec.get("base") or {})).label_noise)


def _gate_sweep(spec: Mapping[str, Any]) -> tuple[float, dict[str, Any], dict[str, Any]]:
    """The gate's label noise, checked settings and sweep spec (SGD on the noisy and the clean labels)."""
    from normsam.analysis import gate as gatelib

    noise = _noisy_label_noise(spec)
    settings = gatelib.check_gate_spec(spec["gate"], noise)
    grid = gatelib.gate_sweep_grid(settings, noise)
    sweep = _sweep_spec(spec, "gate", settings["seeds"], grid)
    varied = {key for entry in grid for key in entry}
    if "base" in sweep:  # the grid sets label_noise (and the clean twin's keys) itself
        sweep["base"] = {k: v for k, v in sweep["base"].items() if k not in varied}
    return noise, settings, sweep


def _run_gate(spec: Mapping[str, Any], out: Path, timed) -> None:
    """The regime gate (normsam.analysis.gate): SGD on noisy and clean labels; stop when the cost is too small."""
    from normsam.analysis import gate as gatelib

    noise, settings, sweep = _gate_sweep(spec)
    timed("gate", sweep)  # always: finished runs are skipped, and the verdict needs every one of them
    result = gatelib.evaluate_gate(out / "gate", settings["margin"], noise)
    gatelib.write_gate(out, result, noise)
    for line in gatelib.gate_summary_lines(result):
        print(line, flush=True)
    if not result.passed:
        raise gatelib.RegimeGateNotMet(gatelib.gate_failure_message(result, noise, out))


def _add_gate_to_report(out: Path, report_dir: Path) -> None:
    """The gate's section and figure in the study report, before its results."""
    import shutil

    gate_md, figure = out / "gate.md", out / "gate_curves.png"
    if not gate_md.is_file():
        return
    if figure.is_file():
        shutil.copyfile(figure, report_dir / figure.name)
    # its "# Regime gate" heading becomes a section of the report, before the others
    _insert_before_results(report_dir / "report.md", "#" + gate_md.read_text())
