"""What to do next with a run folder, told from what the folder holds.

Messages that end a command (a full disk, a folder that already holds a run, a folder in use, Ctrl-C) tell
the user how to go on, and the step that works depends on the folder's state, not on the error that
happened: ``normsam train --resume`` needs a checkpoint (one finished epoch), a finished run has nothing to
resume, a diverged one would diverge again. Every such message takes its advice from :func:`next_step`, which
reads the folder when the message is written, so none can advise a command that fails in that state.

States (:func:`run_state`): ``empty`` (no config.yaml: nothing of the run is saved), ``started`` (config.yaml
but no checkpoint: no epoch finished), ``interrupted`` (a checkpoint, no summary), ``finished`` and ``diverged``
(summary.json).
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["run_state", "next_step", "find_run_folder"]

_CONFIG, _SUMMARY = "config.yaml", "summary.json"
_CHECKPOINTS = ("checkpoint.pt", "checkpoint.prev.pt", "checkpoint.dcp", "checkpoint.prev.dcp")


def run_state(run_dir: str | Path) -> str:
    """``empty``, ``started``, ``interrupted``, ``finished`` or ``diverged`` (see the module docstring)."""
    run_dir = Path(run_dir)
    if (run_dir / _SUMMARY).is_file():
        try:
            diverged = json.loads((run_dir / _SUMMARY).read_text()).get("status") == "diverged"
        except (ValueError, AttributeError):
            diverged = False
        return "diverged" if diverged else "finished"
    if any((run_dir / name).exists() for name in _CHECKPOINTS):
        return "interrupted"
    return "started" if (run_dir / _CONFIG).is_file() else "empty"


def next_step(run_dir: str | Path) -> str:
    """One clause of advice that works for the run folder in its present state."""
    run_dir = Path(run_dir)
    state = run_state(run_dir)
    if state == "finished":
        return (f"{run_dir} holds a finished run (summary.json): there is nothing to resume; its results are "
                "there, or train anew in another out=")
    if state == "diverged":
        return (f"{run_dir} holds a diverged run: resuming would diverge again; train it anew with a lower lr or "
                "rho in another out=")
    if state == "interrupted":
        return (f"{run_dir} holds an interrupted run: `normsam train --resume {run_dir}` continues it from its "
                "last checkpoint")
    if state == "started":
        return (f"no epoch of {run_dir} finished, so there is no checkpoint to resume: start it again with "
                f"`normsam train --config {run_dir / _CONFIG} out={run_dir}`")
    return f"nothing of the run in {run_dir} is saved yet: start it again with the same command"


def find_run_folder(path: str | Path | None, *, levels: int = 3) -> Path | None:
    """The run folder that holds ``path`` (a file a run was writing, or the folder itself): the nearest of
    ``path`` and its parents (up to ``levels``) with a config.yaml or a checkpoint; None if there is none."""
    if path is None:
        return None
    candidate = Path(path)
    for _ in range(levels + 1):
        if candidate.is_dir() and run_state(candidate) != "empty":
            return candidate
        if candidate.parent == candidate:
            break
        candidate = candidate.parent
    return None
