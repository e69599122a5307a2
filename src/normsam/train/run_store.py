"""What the runner writes to and reads from its run folder: one interface, two ways to hold the weights.

:func:`open_run_store` chooses once, at set-up: :class:`PlainRunStore` (one process or DDP: rank 0 writes
``checkpoint.pt``) or :class:`ShardedRunStore` (``parallel=fsdp``: every rank writes its DCP shards into
``checkpoint.dcp/``, :mod:`normsam.train.fsdp`). Everything else a run folder holds (config, environment,
metrics, norm statistics, summary; the list is in :mod:`normsam.train.checkpoint`) is written by rank 0 the same
way for both. The loop hands over a :class:`TrainState` and never asks which kind of store it has.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normsam.files import check_writable, json_dumps
from normsam.optim.sam import SAM
from normsam.train import checkpoint as ckpt
from normsam.train.config import TrainConfig, save_config
from normsam.train.identity import check_resumed_config
from normsam.train.next_step import next_step, run_state
from normsam.train.norm_stats import norm_parameter_stats
from normsam.train.run_folder import RunFolder
from normsam.train.run_lock import RunLock

__all__ = ["RunExistsError", "TrainState", "RunStore", "PlainRunStore", "ShardedRunStore", "open_run_store"]


class RunExistsError(ValueError):
    """The run folder already holds a run."""


@dataclass
class TrainState:
    """What a checkpoint holds: the objects that train (loaded in place at a resume) and the run's progress."""

    model: nn.Module
    optimizer: torch.optim.Optimizer  # the base optimizer (SAM's, with SAM)
    sam: SAM | None
    scheduler: Any
    scaler: Any
    epoch: int = 0  # epochs completed
    history: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0


class RunStore(ABC):
    """The run folder of one run, as the runner writes it. Rank 0 writes the files and holds the folder's lock;
    the checkpoint methods and :meth:`full_model` are called by every rank (collective for the sharded store)."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, *, is_main: bool = True, world_size: int = 1):
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.is_main = is_main
        self.world_size = world_size
        self._lock: RunLock | None = None

    # --- the folder -------------------------------------------------------------------------------------

    def check(self, resume: bool) -> None:
        """A fresh run needs a folder without a run; a resume needs a checkpoint."""
        folder = RunFolder(self.run_dir)
        if resume and not folder.has_checkpoint():
            raise FileNotFoundError(
                f"Cannot resume {self.run_dir}: it has no {ckpt.CHECKPOINT} (no epoch finished yet); "
                f"start it again with `normsam train --config {self.run_dir / ckpt.CONFIG} out={self.run_dir}`."
            )
        if not resume and (folder.has_checkpoint() or folder.is_finished()):
            state = run_state(self.run_dir)
            raise RunExistsError(
                f"{self.run_dir} already holds a run, so a new one cannot start there: {next_step(self.run_dir)}"
                + (", or choose another out=." if state == "interrupted" else ".")
            )

    def check_writable(self) -> None:
        if self.is_main:  # before the data loads: a read-only or full place fails now, not after setup
            check_writable(self.run_dir, what="run folder", create=False)

    def lock(self, resume: bool) -> None:
        """One writer per run folder: rank 0 holds its lock until :meth:`release` or the process exits, and
        checks the folder again under the lock (another writer may have finished meanwhile)."""
        if not self.is_main:
            return
        self._lock = RunLock(self.run_dir).acquire()
        try:
            self.check(resume)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()

    # --- files (rank 0) ---------------------------------------------------------------------------------

    def write_run_files(self, data: Any, device: torch.device) -> None:
        """config.yaml, environment.json, and with label noise label_noise.json."""
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / ckpt.CONFIG)
        ckpt.write_json(self.run_dir / ckpt.ENVIRONMENT, ckpt.environment(device, world_size=self.world_size))
        if data.noisy_indices is not None:
            flipped = data.noisy_indices
            ckpt.write_json(self.run_dir / ckpt.LABEL_NOISE, {
                "label_noise": self.cfg.label_noise,
                "num_train": len(data.train),
                "num_flipped": int(flipped.numel()),
                "note": "positions in the training split (after subset and val_split); labels as stored there",
                "indices": flipped.tolist(),
                "clean_labels": data.clean_labels[flipped].tolist(),
                "noisy_labels": data.train.labels[flipped].tolist(),
            })

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        if self.is_main:
            ckpt.write_metrics(self.run_dir, history)

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.is_main:
            ckpt.write_json(self.run_dir / ckpt.SUMMARY, summary)

    def record_norm_stats(self, epoch: int, model: nn.Module, build: Callable[[], nn.Module]) -> None:
        """Append ``epoch``'s row to norm_stats.jsonl (dropping rows of epochs being redone after a resume)."""
        if not self.cfg.norm_stats:
            return
        full = self.full_model(model, build)  # collective for the sharded store
        if full is None:
            return
        path = self.run_dir / ckpt.NORM_STATS
        rows = [r for r in ckpt.read_jsonl(path) if r["epoch"] < epoch]
        rows.append({"epoch": epoch, **norm_parameter_stats(full)})
        ckpt.atomic_write_text(path, "".join(json_dumps(r) + "\n" for r in rows))

    # --- what differs -----------------------------------------------------------------------------------

    def _meta(self, state: TrainState, tensors: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint's entries around ``tensors`` (the part each store writes its own way)."""
        return {
            "format": 1,
            "epoch": state.epoch,  # epochs completed
            **tensors,
            "scheduler": state.scheduler.state_dict(),
            "scaler": state.scaler.state_dict() if state.scaler is not None else None,
            "history": state.history,
            "elapsed": state.elapsed,
            "config": self.cfg.to_dict(),
        }

    def _restore_progress(self, state: TrainState, saved: dict[str, Any]) -> None:
        state.scheduler.load_state_dict(saved["scheduler"])
        if state.scaler is not None and saved["scaler"] is not None:
            state.scaler.load_state_dict(saved["scaler"])
        state.history = list(saved["history"])
        state.epoch = int(saved["epoch"])
        state.elapsed = float(saved["elapsed"])

    @abstractmethod
    def save_checkpoint(self, state: TrainState) -> None:
        """Write the checkpoint of ``state`` atomically, the previous one kept."""

    @abstractmethod
    def load_checkpoint(self, state: TrainState, device: torch.device) -> None:
        """Load the newest readable checkpoint into ``state``; a config.yaml edited since is refused."""

    @abstractmethod
    def full_model(self, model: nn.Module, build: Callable[[], nn.Module]) -> nn.Module | None:
        """The model with whole tensors on rank 0 (``None`` on the others), for norm statistics and sharpness;
        ``build()`` makes an empty copy where one is needed."""


class PlainRunStore(RunStore):
    """One process or DDP: every rank holds the whole model; rank 0 writes ``checkpoint.pt``."""

    def save_checkpoint(self, state: TrainState) -> None:
        if self.is_main:
            tensors = {"model": state.model.state_dict(), "optimizer": (state.sam or state.optimizer).state_dict()}
            ckpt.save_checkpoint(self.run_dir / ckpt.CHECKPOINT, self._meta(state, tensors))

    def load_checkpoint(self, state: TrainState, device: torch.device) -> None:
        saved = RunFolder(self.run_dir).load_checkpoint(map_location=device)
        check_resumed_config(self.run_dir, saved.get("config"), self.cfg)
        state.model.load_state_dict(saved["model"])
        (state.sam or state.optimizer).load_state_dict(saved["optimizer"])
        self._restore_progress(state, saved)

    def full_model(self, model: nn.Module, build: Callable[[], nn.Module]) -> nn.Module | None:
        return model if self.is_main else None


class ShardedRunStore(RunStore):
    """``parallel=fsdp``: every rank writes its shards of model and base optimizer (and of SAM's stored ε);
    rank 0 adds the rest, SAM's counters included (:func:`normsam.train.fsdp.save`). Collective."""

    def save_checkpoint(self, state: TrainState) -> None:
        from normsam.train import fsdp

        sam_part = {"sam": state.sam.state_dict()["sam"] if state.sam is not None else None}
        fsdp.save(self.run_dir, state.model, state.optimizer, self._meta(state, sam_part), sam=state.sam)

    def load_checkpoint(self, state: TrainState, device: torch.device) -> None:
        from normsam.train import fsdp

        saved = fsdp.load(self.run_dir, state.model, state.optimizer, sam=state.sam)
        check_resumed_config(self.run_dir, saved.get("config"), self.cfg)
        if state.sam is not None:  # SAM's counters, and its param_groups re-linked to the base's
            state.sam.load_state_dict({**state.optimizer.state_dict(), "sam": saved["sam"]})
        self._restore_progress(state, saved)

    def full_model(self, model: nn.Module, build: Callable[[], nn.Module]) -> nn.Module | None:
        from normsam.train import fsdp

        return fsdp.full_copy(model, build)


def open_run_store(run_dir: Path, cfg: TrainConfig, *, is_main: bool = True, world_size: int = 1) -> RunStore:
    """The store for ``cfg``: sharded under ``parallel=fsdp``, plain otherwise."""
    kind = ShardedRunStore if cfg.parallel == "fsdp" else PlainRunStore
    return kind(run_dir, cfg, is_main=is_main, world_size=world_size)
