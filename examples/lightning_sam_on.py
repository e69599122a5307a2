"""SAM-ON in a LightningModule with the cheap ascent (the SAMModule mixin), bf16 autocast, a step-based
scheduler and checkpoints.

Runs on the CPU in well under a minute: ``python examples/lightning_sam_on.py`` (needs
``pip install "normsam[lightning]"``).
"""

from __future__ import annotations

import tempfile

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

import normsam
from normsam.integrations.lightning import SAMModule

STEPS = 200


class Regressor(SAMModule, L.LightningModule):  # the mixin goes first
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)  # logged in the ascent pass only: the loss at w
        return loss

    def configure_optimizers(self):
        sam = normsam.SAM(self, torch.optim.AdamW, lr=3e-3, rho=0.5, weight_decay=0.01)  # SAM-ON
        scheduler = torch.optim.lr_scheduler.OneCycleLR(sam, max_lr=3e-3, total_steps=STEPS)
        return {"optimizer": sam, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(1024, 16)
    y = torch.sin(x[:, :1]) + 0.5 * x[:, 1:2] ** 2 + 0.05 * torch.randn(1024, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True)
    module = Regressor()
    with tempfile.TemporaryDirectory() as out:
        trainer = L.Trainer(
            max_steps=STEPS, accelerator="cpu", precision="bf16-mixed", logger=False, default_root_dir=out,
            enable_progress_bar=False, enable_model_summary=False,
            callbacks=[ModelCheckpoint(dirpath=out, every_n_train_steps=100, save_top_k=-1)],
        )
        trainer.fit(module, loader)
        sam = module.optimizers().optimizer
        print(sam)
        print(f"global_step={trainer.global_step}, sam_steps={sam.counters['sam_steps']}, "
              f"train_loss={trainer.callback_metrics['train_loss'].item():.4f}")


if __name__ == "__main__":
    main()
