"""Finding run folders and reading them: :class:`RunRecord`, :func:`load_run`, :func:`find_runs`.

Part of ``normsam report`` (see :mod:`normsam.analysis.report`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normsam.analysis.run_sharpness import latest_measurement
from normsam.train import checkpoint as ckpt
from normsam.train.config import TrainConfig, config_from_file
from normsam.files import read_json
from normsam.train.divergence import is_diverged
from normsam.train.identity import check_finished_config


@dataclass
class RunRecord:
    """What a run folder holds: config, metrics, summary (None until finished), latest sharpness."""

    folder: Path
    config: TrainConfig
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] | None
    sharpness: dict[str, Any] | None
    #: a measurement of an earlier checkpoint than the finished run's last (not paired with its accuracy)
    stale_sharpness: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def diverged(self) -> bool:
        return is_diverged(self.summary)

    @property
    def status(self) -> str:
        stale = ""
        if self.stale_sharpness is not None:
            stale = (f"; sharpness stale (measured at epoch {self.stale_sharpness.get('epoch')} of "
                     f"{self.summary.get('epochs')}: measure again)")
        if self.diverged:
            return f"diverged (epoch {self.summary['diverged']['epoch']})" + stale
        if self.finished:
            return "finished" + stale
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
    summary = read_json(summary_path) if summary_path.is_file() else None
    check_finished_config(folder, summary, config)  # numbers labelled with settings they were not trained with
    sharpness, stale = latest_measurement(folder), None
    if sharpness is not None and sharpness.get("sharpness") is None:
        sharpness = None  # not finite (a diverged model): no value to report
    if sharpness is not None and summary is not None and sharpness.get("epoch") != summary.get("epochs"):
        sharpness, stale = None, sharpness  # measured on an earlier checkpoint: never paired with the final accuracy
    return RunRecord(
        folder=folder,
        config=config,
        metrics=ckpt.read_jsonl(folder / ckpt.METRICS_JSONL),
        summary=summary,
        sharpness=sharpness,
        stale_sharpness=stale,
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
