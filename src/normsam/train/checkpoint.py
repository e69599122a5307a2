"""Run folders and checkpoints: atomic writes, ``weights_only`` loads, metrics files.

A run folder explains itself::

    config.yaml        the resolved config
    environment.json   versions, device, threads, command line
    metrics.jsonl      one JSON object per epoch (also metrics.csv)
    norm_stats.jsonl   per-epoch quantiles/histograms of the norm layers' γ and β
    checkpoint.pt      written atomically after every epoch (model, optimizer, schedule, history)
    checkpoint.prev.pt the epoch before's checkpoint, kept so that a damaged checkpoint.pt costs one epoch
    summary.json       written when the run has finished ("status": "finished") or diverged ("diverged")
    normsam.lock       while a process writes the folder: its lock (pid, host, start time; see run_lock)

JSON files are standard JSON (:func:`normsam.files.json_dumps`: a non-finite number is written as null).
"""

from __future__ import annotations

import csv
import io
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from normsam import files
from normsam.files import json_dumps

__all__ = [
    "CHECKPOINT",
    "PREVIOUS_CHECKPOINT",
    "CorruptCheckpointError",
    "atomic_write_bytes",
    "atomic_write_text",
    "save_checkpoint",
    "load_checkpoint",
    "write_json",
    "write_metrics",
    "read_jsonl",
    "environment",
]

CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
CONFIG = "config.yaml"
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
NORM_STATS = "norm_stats.jsonl"
SUMMARY = "summary.json"
ENVIRONMENT = "environment.json"
LABEL_NOISE = "label_noise.json"


class CorruptCheckpointError(ValueError):
    """A checkpoint file exists but cannot be read (empty, truncated or damaged)."""


def _write_temporary(path: Path, data: bytes) -> Path:
    """``data`` in a fsynced temporary file next to ``path``, with the usual permissions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def atomic_write_bytes(path: Path, data: bytes, *, keep_previous: Path | None = None) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one, never half.

    With ``keep_previous``, the old file is moved there just before the new one takes its place: a crash
    between the two renames leaves the old file under ``keep_previous`` and the new one in a temporary file.
    """
    path = Path(path)
    try:
        tmp = _write_temporary(path, data)
    except OSError as err:  # name the file the user knows, not the temporary one (a full disk: ENOSPC)
        if err.errno is None:
            raise
        raise OSError(err.errno, err.strerror or os.strerror(err.errno), str(path)) from err
    try:
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json_dumps(obj, indent=2, sort_keys=False) + "\n")


def save_checkpoint(path: Path, state: dict[str, Any], *, keep_previous: bool = True) -> None:
    """Save ``state`` atomically; the checkpoint it replaces becomes ``checkpoint.prev.pt`` (same folder)."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    previous = path.parent / PREVIOUS_CHECKPOINT if keep_previous else None
    atomic_write_bytes(path, buffer.getvalue(), keep_previous=previous)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code runs).

    Raises FileNotFoundError when there is no file and :class:`CorruptCheckpointError` (a ``ValueError``)
    with a one-line message when it cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}: the run has not finished an epoch yet.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (OSError, EOFError, RuntimeError, KeyError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        reason = str(err).split(". ")[0].strip() or type(err).__name__
        raise CorruptCheckpointError(
            f"{path} cannot be read ({type(err).__name__}: {reason}; {path.stat().st_size} bytes): it is empty, "
            "truncated or damaged. Delete it to resume from the previous epoch's checkpoint if there is one, "
            "or train the run again."
        ) from None
    if not isinstance(state, dict) or "model" not in state:
        raise CorruptCheckpointError(f"{path} is not a normsam checkpoint (no 'model' entry); train the run again.")
    return state


def write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite ``metrics.jsonl`` and ``metrics.csv`` from the full history (keeps them equal to the
    checkpoint's history, also after a resume)."""
    run_dir = Path(run_dir)
    atomic_write_text(run_dir / METRICS_JSONL, "".join(json_dumps(row) + "\n" for row in history))
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(run_dir / METRICS_CSV, out.getvalue())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a run folder's JSON-lines file (``metrics.jsonl``, ``norm_stats.jsonl``); ``[]`` when the file
    does not exist (yet). A damaged line is a one-line error naming it (:func:`normsam.files.read_jsonl`)."""
    path = Path(path)
    if not path.is_file():
        return []
    return files.read_jsonl(path)


def environment(device: torch.device, *, world_size: int = 1) -> dict[str, Any]:
    """Versions, device, threads and processes (``world_size``, 1 without torchrun), for ``environment.json``."""
    import numpy
    import timm
    import torchvision

    import normsam

    env = {
        "normsam": normsam.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "world_size": world_size,
        "cuda_available": torch.cuda.is_available(),
        "command": sys.argv,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        if commit.returncode == 0:
            env["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return env
