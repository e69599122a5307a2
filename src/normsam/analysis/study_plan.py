"""A study's whole plan is checked before anything trains.

A study runs its pilot (hours) before it resolves the phases' ``@rho:SCOPE`` placeholders, so a mistake in a
phase would otherwise show only after the pilot has trained. :func:`check_plan` finds, up front:

* ``--phase`` names that are not ``pilot`` or a phase of the file (a typo would run nothing and exit 0);
* a pilot without a validation split (ρ is chosen on validation accuracy, never on the test set);
* a placeholder ``@rho:SCOPE`` for a scope the pilot trains no ρ for, ``@sparsity:SCOPE`` for a scope that is
  not a parameter scope, or an unknown placeholder kind;
* any config error in any run of any phase (unknown keys, wrong types, an option that would be ignored),
  by building every phase's sweep with each placeholder replaced by a value of its kind.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["check_plan"]


def _phase_names(spec: Mapping[str, Any]) -> list[str]:
    return [str(p.get("name", f"phase{i + 1}")) for i, p in enumerate(spec["phases"])]


def check_plan(spec: Mapping[str, Any], phases: Sequence[str] | None = None) -> None:
    """Raise ValueError (naming the phase and the fix) for the first problem of a loaded study ``spec``."""
    from normsam.analysis.study import _placeholders, _sweep_spec, resolve_grid
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
