"""What a run says about itself: the per-epoch log line (and TensorBoard scalars), the finished run's summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from normsam.train.config import TrainConfig
from normsam.train.identity import config_fingerprint

__all__ = ["EpochLog", "finished_summary"]


class EpochLog:
    """Prints one line per epoch (rank 0) and, with ``tensorboard=true``, writes its numbers as scalars."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, *, is_main: bool = True):
        self.epochs = cfg.epochs
        self.tb = None
        if cfg.tensorboard and is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ValueError(
                    "tensorboard=true needs the tensorboard package: pip install 'normsam[tensorboard]'."
                ) from err
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def __call__(self, row: dict[str, Any]) -> None:
        test = f" test {row['test_loss']:.4f} / {row['test_acc']:.2f}%" if "test_acc" in row else ""
        val = f" val {row['val_acc']:.2f}%" if "val_acc" in row else ""
        sam = " (SAM)" if row["sam"] else ""
        print(
            f"epoch {row['epoch']:>3}/{self.epochs}{sam}: train {row['train_loss']:.4f} / {row['train_acc']:.2f}%"
            f"{test}{val}  lr {row['lr']:.4g}  {row['epoch_time']:.1f}s  {row['images_per_s']:.0f} img/s",
            flush=True,
        )
        if self.tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and value is not None and key != "epoch":
                    self.tb.add_scalar(key, value, row["epoch"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def finished_summary(cfg: TrainConfig, run_dir: Path, history: list[dict[str, Any]], *, elapsed: float,
                     counters: Any = None) -> dict[str, Any]:
    """``summary.json`` of a finished run; ``counters``: SAM's (``None`` without SAM)."""
    last = history[-1]
    best = max(history, key=lambda r: r.get("test_acc", -1))
    return {
        "run_dir": str(run_dir),
        "method": cfg.method,
        "status": "finished",
        "epochs": len(history),
        "final_test_acc": last.get("test_acc"),
        "best_test_acc": best.get("test_acc"),
        "best_epoch": best["epoch"],
        "final_train_loss": last["train_loss"],
        "final_val_acc": last.get("val_acc"),
        "final_flipped_acc": last.get("flipped_acc"),  # label noise: memorized share of the flipped labels
        "final_flipped_clean_acc": last.get("flipped_clean_acc"),
        "mean_epoch_time": sum(r["epoch_time"] for r in history) / len(history),
        "mean_step_time": sum(r["step_time"] for r in history) / len(history),
        "total_time": elapsed,
        "nonfinite_ascent_steps": counters["nonfinite_ascent_steps"] if counters is not None else 0,
        "sam_steps": counters["sam_steps"] if counters is not None else 0,  # what was trained, not asked for
        "config_fingerprint": config_fingerprint(cfg),
    }
