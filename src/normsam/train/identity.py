"""What a run says it was must be what it was trained with.

A run folder's ``config.yaml`` is for people to read; the checkpoint carries its own copy of the config the
weights were trained with. On ``--resume`` the two are compared (:func:`check_resumed_config`): a
``config.yaml`` edited since the run started (ρ 0.5 → 2.0) would otherwise make the rest of the run train
with one setting and the summary and report name another. Only the settings that do not change the result
(:data:`RESUME_SAFE`) may differ.

A finished run's ``summary.json`` carries :func:`config_fingerprint` of the config it was trained with, so a
report can tell (:func:`check_finished_config`) when ``config.yaml`` was edited afterwards and refuse to
label the run's numbers with settings it was not trained with.

A folder that already holds a run is reused only for the same run: :func:`folder_conflict` compares the
``config.yaml`` a folder holds with the config a command asks for (the settings outside :data:`RESUME_SAFE`),
so a sweep or ``normsam compare`` asked for 2 epochs never skips or resumes the 1-epoch run in its folder
and reports its numbers under the new settings. Every command that reuses run folders calls it before it
trains or writes anything, and refuses with the differing settings and its own fix.

A run labelled with SAM must take SAM steps: :func:`check_sam_window` refuses a SAM window that starts after
the last epoch (``sam_start=5`` with ``epochs=1`` would train plain SGD under the name ``norm-sam-rho0.5``),
and the summary records ``sam_steps``, the SAM steps actually taken. The check is the runner's, not the
config's, so that run folders written before it stay readable.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

__all__ = ["RESUME_SAFE", "check_resumed_config", "check_sam_window", "config_fingerprint", "check_finished_config",
           "folder_conflict"]

#: Settings that may change between the start of a run and a resume: they do not change what is trained.
RESUME_SAFE = frozenset({"progress", "threads", "tensorboard", "device", "out"})


def check_resumed_config(run_dir: str | Path, trained: dict[str, Any] | None, cfg: Any) -> None:
    """Raise ValueError when ``cfg`` (read from ``config.yaml``, plus resume overrides) differs from the config
    the checkpoint was trained with (``trained``) in a setting outside :data:`RESUME_SAFE`. A checkpoint
    without its config (written before it carried one) is not checked."""
    if not trained:
        return
    wanted = cfg.to_dict()
    diffs = [
        f"{key}: {trained.get(key)!r} in the checkpoint, {wanted[key]!r} in config.yaml"
        for key in wanted
        if key not in RESUME_SAFE and key in trained and trained[key] != wanted[key]
    ]
    if diffs:
        raise ValueError(
            f"{Path(run_dir) / 'config.yaml'} was edited since the run started ({'; '.join(diffs)}): the run "
            "would go on with one setting and be labelled with another. Restore the file to resume, or train "
            "the new settings in a new run (`normsam train --config FILE out=NEW_DIR`)."
        )


def check_sam_window(cfg: Any) -> None:
    """Raise ValueError when a SAM run's window starts at or after its last epoch: no SAM step would run."""
    if cfg.scope != "none" and cfg.sam_start >= cfg.epochs:
        raise ValueError(
            f"sam_start={cfg.sam_start} with epochs={cfg.epochs}: the SAM window starts after the last epoch, so no "
            "SAM step would run and the run would be plain SGD labelled as SAM; lower sam_start (0-based) or "
            "train with scope=none."
        )


#: Keys added after fingerprints existed, with the default that reproduces the earlier behaviour: left out of
#: the fingerprint at that default, so that runs trained before the key existed keep their fingerprint.
ADDED_LATER = {"bf16_kernels": "native", "rho_warmup_epochs": 0.0, "variant": "sam", "alpha": None, "gamma": None,
               "decouple": None, "reuse_norms": None, "sigma": None, "lmbda": None, "centralize": False,
               "ascent_steps": 1, "descent_over": "perturbed", "rho_min": None}


def config_fingerprint(cfg: Any) -> str:
    """A short hash of the settings that define what is trained (all but :data:`RESUME_SAFE`, and the
    :data:`ADDED_LATER` keys at their earlier behaviour)."""
    settings = {k: v for k, v in sorted(cfg.to_dict().items())
                if k not in RESUME_SAFE and ADDED_LATER.get(k, object()) != v}
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def check_finished_config(run_dir: str | Path, summary: dict[str, Any] | None, cfg: Any) -> None:
    """Raise ValueError when a finished run's ``config.yaml`` no longer matches the fingerprint its summary
    recorded at the end of training (summaries written before fingerprints existed are not checked)."""
    recorded = (summary or {}).get("config_fingerprint")
    if recorded is not None and recorded != config_fingerprint(cfg):
        raise ValueError(
            f"{Path(run_dir) / 'config.yaml'} was edited after the run finished (its settings no longer match the "
            "ones it was trained with, recorded in summary.json): restore the file, or leave the run out."
        )


def folder_conflict(folder: str | Path, cfg: Any, *, asked_by: str) -> str | None:
    """Why ``folder`` cannot be reused for a run of ``cfg``, or None (no run there yet, or one with the same
    settings but for :data:`RESUME_SAFE`). ``asked_by`` names what asks for ``cfg`` in the message ("the
    sweep", "compare"); the caller appends its own fix.

    The message names every differing setting (``epochs: 1 in the folder, 2 in compare``).
    """
    from normsam.train.config import config_from_file

    path = Path(folder) / "config.yaml"
    if not path.is_file():
        return None
    try:
        saved = config_from_file(path).to_dict()
    except ValueError as err:
        return f"{folder} holds a config that cannot be read ({err})"
    wanted = cfg.to_dict()
    diffs = [f"{key}: {saved.get(key)!r} in the folder, {wanted[key]!r} in {asked_by}"
             for key in wanted if key not in RESUME_SAFE and saved.get(key) != wanted[key]]
    if diffs:
        return f"{folder} holds a run with other settings ({'; '.join(diffs)})"
    summary = Path(folder) / "summary.json"
    if summary.is_file():  # finished: what it was trained with is recorded, whatever config.yaml says now
        try:
            recorded = json.loads(summary.read_text()).get("config_fingerprint")
        except (ValueError, AttributeError):
            recorded = None
        if recorded is not None and recorded != config_fingerprint(cfg):
            return (f"{folder} holds a run trained with other settings than its config.yaml says now (the file "
                    "was edited after the run finished; summary.json records the settings it was trained with)")
    return None
