"""A run folder as a thing to read: its config, data, model and checkpoint, in one place.

The training loop writes run folders (:mod:`normsam.train.run_store`) and reads them back to resume; the
analysis (``normsam sharpness``, reports) reads them. Both go through this module, which depends only on
the config, data, model and checkpoint layers, so neither needs the other.

Checkpoints: ``checkpoint.pt`` is the newest, ``checkpoint.prev.pt`` the one before (``parallel=fsdp`` runs:
the sharded ``checkpoint.dcp/`` and ``checkpoint.prev.dcp/``, see :mod:`normsam.train.fsdp`). When the newest cannot
be read (a crash or a full disk while it was written, a truncated copy), :meth:`RunFolder.load_checkpoint`
says so and falls back to the previous one, so at most one epoch is lost.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normsam.train import checkpoint as ckpt
from normsam.train.config import TrainConfig, config_from_file
from normsam.train.data import DataSplits, load_data
from normsam.train.data.streamed import StreamedData, check_streamed_config, is_streamed, load_streamed_data
from normsam.train.models import build_model

__all__ = ["RunFolder", "load_run_data", "build_run_model", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else the CPU; ``cuda`` without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but CUDA is not available here; use device=cpu or device=auto.")
    return torch.device(name)


def load_run_data(cfg: TrainConfig) -> DataSplits | StreamedData:
    """The data of a run: the same subset and split for the same config (and seed); streamed data sets
    (:mod:`normsam.train.data.streamed`) are described, not loaded."""
    check_streamed_config(cfg)
    if is_streamed(cfg):
        return load_streamed_data(cfg)
    return load_data(
        cfg.data,
        data_dir=cfg.data_dir,
        download=cfg.download,
        subset=cfg.subset,
        val_split=cfg.val_split,
        label_noise=cfg.label_noise,
        seed=cfg.seed,
        image_size=cfg.image_size,
    )


def build_run_model(cfg: TrainConfig, data: DataSplits) -> nn.Module:
    """A fresh model of a run, its input channels and classes following the data."""
    return build_model(
        cfg.model,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        image_size=data.image_size,
        norm=cfg.norm,
    )


class RunFolder:
    """The files of one run (see :mod:`normsam.train.checkpoint` for the list)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    # --- what is there ------------------------------------------------------------------------------

    def has_config(self) -> bool:
        return self.file(ckpt.CONFIG).is_file()

    def has_checkpoint(self) -> bool:
        """A checkpoint (the newest or the previous one) exists: the run can be resumed."""
        from normsam.train import fsdp

        return (self.file(ckpt.CHECKPOINT).is_file() or self.file(ckpt.PREVIOUS_CHECKPOINT).is_file()
                or fsdp.has_checkpoint(self.path))

    def is_finished(self) -> bool:
        return self.file(ckpt.SUMMARY).is_file()

    # --- reading ------------------------------------------------------------------------------------

    def config(self) -> TrainConfig:
        if not self.has_config():
            raise FileNotFoundError(
                f"{self.path} is not a run folder: it has no {ckpt.CONFIG}; pass a folder written by `normsam train`."
            )
        return config_from_file(self.file(ckpt.CONFIG))

    def data(self, cfg: TrainConfig | None = None) -> DataSplits:
        return load_run_data(cfg or self.config())

    def metrics(self) -> list[dict[str, Any]]:
        return ckpt.read_jsonl(self.file(ckpt.METRICS_JSONL))

    def load_checkpoint(self, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """The newest readable checkpoint: ``checkpoint.pt``, or ``checkpoint.prev.pt`` (with a warning) when
        the newest is missing or damaged. Raises a one-line error naming both files when neither is readable."""
        newest, previous = self.file(ckpt.CHECKPOINT), self.file(ckpt.PREVIOUS_CHECKPOINT)
        from normsam.train import fsdp

        if not newest.is_file() and not previous.is_file() and fsdp.has_checkpoint(self.path):
            return fsdp.read_checkpoint(self.path)  # a parallel=fsdp run: sharded, read in this one process
        if not newest.is_file() and not previous.is_file():
            raise FileNotFoundError(
                f"{self.path} has no {ckpt.CHECKPOINT}: the run has not finished an epoch yet; start it again with "
                f"`normsam train --config {self.file(ckpt.CONFIG)} out={self.path}`."
            )
        problem = f"{newest} is missing"
        if newest.is_file():
            try:
                return ckpt.load_checkpoint(newest, map_location=map_location)
            except ckpt.CorruptCheckpointError as err:
                if not previous.is_file():
                    raise
                problem = str(err).split(": it is")[0]
        try:
            state = ckpt.load_checkpoint(previous, map_location=map_location)
        except ckpt.CorruptCheckpointError as err:
            raise ckpt.CorruptCheckpointError(
                f"Neither checkpoint of {self.path} can be read ({problem}; {err}). Train the run again "
                f"(delete the folder, or choose another out=)."
            ) from None
        warnings.warn(
            f"{problem}; using {previous.name} (epoch {state.get('epoch', '?')}) instead, so the last epoch is "
            "trained again.",
            RuntimeWarning,
            stacklevel=2,
        )
        return state

    def model(
        self,
        device: str | torch.device = "cpu",
        *,
        cfg: TrainConfig | None = None,
        data: DataSplits | None = None,
    ) -> tuple[nn.Module, int]:
        """The run's model with its checkpoint's weights on ``device``, and the epochs that checkpoint holds."""
        cfg = cfg or self.config()
        state = self.load_checkpoint(map_location=device)
        model = build_run_model(cfg, data if data is not None else load_run_data(cfg))
        model.load_state_dict(state["model"])
        return model.to(device), int(state["epoch"])
