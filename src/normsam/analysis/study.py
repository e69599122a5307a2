"""``normsam study STUDY.yaml``: a pilot that chooses ρ on the validation split, then the reported runs.

A study is a few sweeps (:mod:`normsam.analysis.sweep`) run one after another in one parent folder::

    preset: configs/study/noise-base.yaml   # the training recipe every run starts from
    out: runs/study-noise
    workers: 2                             # runs in parallel (one process each)
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

After the pilot, ``@rho:SCOPE`` stands for the pilot's ρ with the best mean final *validation* accuracy among
the pilot's runs with that scope (the test set plays no part in the choice), and ``@sparsity:SCOPE`` for the
share of the model's trainable elements that ``SCOPE`` does *not* select (SAM-ON's sparsity for ``norm``), so a
mask scope can be compared at SAM-ON's sparsity. The choice, with every pilot run's validation accuracy, is
written to ``out/choice.json`` and ``out/choice.md``; each phase's generated sweep file to
``out/sweeps/<phase>.yaml``; the wall-clock of each phase to ``out/study.json``. Like sweeps, a study can be
stopped and started again: finished runs are skipped, interrupted ones resumed, and the choice is recomputed
from the same pilot runs (so it is the same).
"""

from __future__ import annotations

import difflib
import json
import math
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

STUDY_KEYS = ("preset", "base", "out", "workers", "pilot", "phases")
_PHASE_KEYS = ("name", "seeds", "grid")
_PLACEHOLDER_KINDS = ("rho", "sparsity")


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
        if name in names or name == "pilot":
            raise ValueError(f"Phase name {name!r} is used twice (or is 'pilot'); give each phase its own name.")
        names.add(name)
    return spec


def _sweep_spec(spec: Mapping[str, Any], name: str, seeds: Any, grid: Any) -> dict[str, Any]:
    out = {"out": str(Path(spec["out"]) / name), "seeds": seeds, "grid": grid, "workers": spec.get("workers", 1)}
    for key in ("preset", "base"):
        if spec.get(key) is not None:
            out[key] = spec[key]
    return out


def choose_rho(pilot_dir: str | Path, metric: str = "final_val_acc") -> dict[str, dict[str, Any]]:
    """Per scope, the ρ whose pilot runs have the best mean ``metric`` (ties: the smaller ρ).

    Returns ``{scope: {"rho": ρ, "candidates": {ρ: [values over seeds]}}}`` for every scope with a ρ.
    """
    from normsam.train.config import config_from_file

    table: dict[str, dict[float, list[float]]] = {}
    for summary_path in sorted(Path(pilot_dir).rglob(ckpt.SUMMARY)):
        run = summary_path.parent
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
        table.setdefault(cfg.scope, {}).setdefault(float(cfg.rho), []).append(float(value))
    if not table:
        raise ValueError(f"No finished pilot run with a ρ under {pilot_dir}: run the pilot first.")
    choice = {}
    for scope, by_rho in table.items():
        best = max(sorted(by_rho), key=lambda r: sum(by_rho[r]) / len(by_rho[r]))  # sorted: ties → smaller ρ
        choice[scope] = {"rho": best, "candidates": {str(r): v for r, v in sorted(by_rho.items())}}
    return choice


def norm_sparsity(spec: Mapping[str, Any], scope: str = "norm") -> float:
    """The share of the study model's trainable elements that ``scope`` does not select (rounded to 1e-6)."""
    from torch import nn

    from normsam.optim.scopes import param_groups
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


def _choice_markdown(choice: Mapping[str, Any], metric: str) -> str:
    lines = [f"# ρ chosen by the pilot (best mean {metric}; the test set played no part)", "",
             "| scope | ρ | mean " + metric + " | seeds | chosen |", "|---|---:|---:|---:|:---:|"]
    for scope, entry in choice.items():
        for rho, vals in entry["candidates"].items():
            mark = "✔" if math.isclose(float(rho), entry["rho"]) else ""
            lines.append(f"| {scope} | {float(rho):g} | {sum(vals) / len(vals):.2f} | {len(vals)} | {mark} |")
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

    names = ["pilot", *_phase_names(spec)]
    for wanted in phases or []:
        if wanted not in names:
            close = difflib.get_close_matches(wanted, names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"--phase {wanted!r} is not a phase of this study ({', '.join(names)}).{hint}")

    pilot_spec = spec["pilot"]
    pilot = load_sweep(_sweep_spec(spec, "pilot", pilot_spec.get("seeds", [0]), pilot_spec["grid"]))
    no_val = [run.name for run in pilot.runs if not run.config.val_split > 0]
    if no_val:
        raise ValueError(
            f"The study's pilot run {no_val[0]} has val_split=0, but ρ is chosen on validation accuracy (never on "
            "the test set): set val_split in the study's base (e.g. base: {val_split: 0.1})."
        )
    rhos: dict[str, float] = {}
    for run in pilot.runs:
        if isinstance(run.config.scope, str) and run.config.scope != "none":
            rhos.setdefault(run.config.scope, run.config.rho)

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
) -> dict[str, Any]:
    """Run the pilot, choose ρ, then each phase (or only those named in ``phases``); returns the record
    written to ``out/study.json``.

    ``overrides`` (config keys) are laid over the study's ``base`` for every run, and ``out`` replaces its
    folder: the same study on another device (``device=cuda``) or as a quick smoke test (``epochs=1``).
    """
    from normsam.analysis.sweep import load_sweep, run_sweep

    spec = load_study(source)
    if overrides:
        spec["base"] = {**(spec.get("base") or {}), **overrides}
    if out is not None:
        spec["out"] = str(out)
    out = Path(spec["out"])
    check_plan(spec, phases)  # the whole plan, before the pilot trains for hours
    with RunLock(out, what="study"):
        return _run_phases(spec, out, workers=workers, phases=phases, report=report)


def _run_phases(spec: dict[str, Any], out: Path, *, workers: int | None, phases: list[str] | None,
                report: bool) -> dict[str, Any]:
    from normsam.analysis.sweep import load_sweep, run_sweep

    (out / "sweeps").mkdir(parents=True, exist_ok=True)
    record_path = out / "study.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {"phases": {}}

    def timed(name: str, sweep_spec: dict[str, Any]) -> None:
        sweep_file = out / "sweeps" / f"{name}.yaml"
        ckpt.atomic_write_text(sweep_file, yaml.safe_dump(sweep_spec, sort_keys=False))
        started = time.time()
        print(f"study {out}: phase {name} ({sweep_file})", flush=True)
        sweep = run_sweep(load_sweep(sweep_file), workers=workers)
        entry = record["phases"].setdefault(name, {"wall_clock_s": 0.0})
        entry["wall_clock_s"] = round(entry["wall_clock_s"] + time.time() - started, 1)
        entry["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        entry["counts"] = sweep.counts()
        entry["sweep"] = str(sweep_file)
        ckpt.write_json(record_path, record)
        if sweep.failed:
            raise RuntimeError(f"Phase {name}: {len(sweep.failed)} run(s) failed; see {sweep.out / 'sweep.json'}.")

    pilot = spec["pilot"]
    if phases is None or "pilot" in phases:
        timed("pilot", _sweep_spec(spec, "pilot", pilot.get("seeds", [0]), pilot["grid"]))
    metric = "final_val_acc"
    choice = choose_rho(out / "pilot", metric)
    values: dict[str, Any] = {f"@rho:{scope}": entry["rho"] for scope, entry in choice.items()}
    needed = set().union(*(_placeholders(p["grid"]) for p in spec["phases"]))
    for name in sorted(needed):
        kind, _, scope = name[1:].partition(":")
        if kind == "sparsity":
            values[name] = norm_sparsity(spec, scope)
        elif kind not in _PLACEHOLDER_KINDS:
            raise ValueError(f"Unknown placeholder {name!r}; use @rho:SCOPE or @sparsity:SCOPE.")
    ckpt.write_json(out / "choice.json", {"metric": metric, "choice": choice, "values": values})
    ckpt.atomic_write_text(out / "choice.md", _choice_markdown(choice, metric))
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
    return record
