"""SAM-ON with the cheap ascent in Lightning: the SAMModule mixin (automatic optimization) and the manual route."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

L = pytest.importorskip("lightning")
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

import normsam  # noqa: E402
from normsam.integrations.lightning import SAMModule  # noqa: E402

STEPS = 6
SCHEDULER_WARNING = r".*lr_scheduler.step\(\).*before.*optimizer.step\(\)"


def data() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=g)
    y = x[:, :1] * 2 - x[:, 1:2] + 0.1 * torch.randn(32, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 1))


def make_sam(model: nn.Module) -> tuple[normsam.SAM, torch.optim.lr_scheduler.LRScheduler]:
    sam = normsam.SAM(model, torch.optim.AdamW, lr=1e-2, rho=0.5)
    return sam, torch.optim.lr_scheduler.LambdaLR(sam, lambda step: 1.0 / (1 + step))


class Net(SAMModule, L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = net()
        self.passes: list[str | None] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.passes.append(self.sam_pass)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        sam, scheduler = make_sam(self.net)
        return {"optimizer": sam, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def trainer(tmp_path, max_steps=STEPS, **options) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, **options,
    )


def reference(steps: int) -> nn.Module:
    """The same training as a plain loop with the cheap ascent."""
    model = net()
    sam, scheduler = make_sam(model)
    batches = list(data())
    for step in range(steps):
        x, y = batches[step % len(batches)]
        sam.first_step(F.mse_loss(model(x), y))
        F.mse_loss(model(x), y).backward()
        sam.second_step(zero_grad=True)
        scheduler.step()
    return model


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_automatic_optimization_counts_steps_schedules_and_matches_a_plain_loop(tmp_path):
    module = Net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path).fit(module, data())
    assert not [w for w in caught if "optimizer.step()" in str(w.message)], [str(w.message) for w in caught]
    sam = module.optimizers().optimizer
    assert module.trainer.global_step == STEPS and sam.counters["sam_steps"] == STEPS
    assert module.passes == ["ascent", "second"] * STEPS
    assert sam.param_groups[0]["lr"] == pytest.approx(1e-2 / (1 + STEPS))  # the step-based scheduler ran
    torch.testing.assert_close(flat(module.net), flat(reference(STEPS)), rtol=0, atol=1e-6)


def test_bf16_checkpoints_and_resume_give_the_uninterrupted_run(tmp_path):
    full = Net()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    trainer(tmp_path, max_steps=8, precision="bf16-mixed", callbacks=[checkpoints]).fit(full, data())
    saved = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert saved == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt"]

    resumed = Net()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=SCHEDULER_WARNING)
        trainer(tmp_path, max_steps=8, precision="bf16-mixed", callbacks=[checkpoints]).fit(
            resumed, data(), ckpt_path=tmp_path / "ckpt" / saved[0]
        )
    sam = resumed.optimizers().optimizer
    assert resumed.trainer.global_step == 8 and sam.counters["sam_steps"] == 8
    assert sam.param_groups is sam.base_optimizer.param_groups
    torch.testing.assert_close(flat(resumed.net), flat(full.net), rtol=0, atol=1e-6)


class ManualNet(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.net = net()

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        opt.optimizer.first_step(F.mse_loss(self.net(x), y))  # the cheap ascent
        opt.step(closure=lambda: self.manual_backward(F.mse_loss(self.net(x), y)))
        opt.zero_grad()
        self.lr_schedulers().step()

    def configure_optimizers(self):
        sam, scheduler = make_sam(self.net)
        return {"optimizer": sam, "lr_scheduler": scheduler}


def test_manual_optimization_route_counts_steps_without_warning(tmp_path):
    module = ManualNet()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=SCHEDULER_WARNING)
        trainer(tmp_path).fit(module, data())
    assert module.trainer.global_step == STEPS
    torch.testing.assert_close(flat(module.net), flat(reference(STEPS)), rtol=0, atol=1e-6)


def test_step_after_the_cheap_ascent_is_the_second_pass():
    x, y = next(iter(data()))
    a, b = net(), net()
    sam_a, _ = make_sam(a)
    sam_b, _ = make_sam(b)
    sam_a.first_step(F.mse_loss(a(x), y))
    F.mse_loss(a(x), y).backward()
    sam_a.second_step()
    sam_b.first_step(F.mse_loss(b(x), y))
    loss = sam_b.step(lambda: F.mse_loss(b(x), y).backward() or torch.tensor(1.0))
    assert loss.item() == 1.0 and not sam_b.is_perturbed
    torch.testing.assert_close(flat(a), flat(b), rtol=0, atol=0)


def test_gradient_accumulation_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"does not support accumulate_grad_batches=2.*ascent_inputs"):
        trainer(tmp_path, accumulate_grad_batches=2).fit(Net(), data())


@pytest.mark.parametrize("bases", ["missing", "after"])
def test_sam_without_the_mixin_or_with_it_in_the_wrong_place_is_refused(tmp_path, bases):
    """Lightning calls optimizer.step(closure) once per batch: without the mixin first in the bases SAM would
    silently take two full passes and log the loss at w + ε (issue 26)."""

    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return normsam.SAM(self.net, torch.optim.AdamW, lr=1e-2, rho=0.5)

    cls = Plain if bases == "missing" else type("Late", (Plain, SAMModule), {})
    module = cls()
    with pytest.raises(ValueError, match=r"got Lightning's training closure.*class Model\(SAMModule, LightningModule\)"):
        trainer(tmp_path, max_steps=1).fit(module, data())
    assert all(torch.equal(a, b) for a, b in zip(module.net.parameters(), net().parameters()))


class VariantNet(Net):
    """``configure_optimizers`` returns one of SAM's variants, built on the module itself."""

    def __init__(self, build):
        super().__init__()
        self.build = build

    def configure_optimizers(self):
        sam = self.build(self)
        return {"optimizer": sam, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(
            sam, lambda step: 1.0 / (1 + step)), "interval": "step"}}


VARIANTS = {
    "gsam": lambda m: normsam.GSAM(m, torch.optim.AdamW, rho=0.5, lr=1e-2, alpha=0.4, rho_min=0.1),
    "looksam": lambda m: normsam.LookSAM(m, torch.optim.AdamW, rho=0.5, lr=1e-2, k=2),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_a_sam_variant_in_configure_optimizers_matches_a_plain_loop(tmp_path, name):
    build = VARIANTS[name]
    module = VariantNet(build)
    trainer(tmp_path).fit(module, data())
    sam = module.optimizers().optimizer
    assert sam.options.variant == name and module.trainer.global_step == STEPS == sam.counters["sam_steps"]
    assert module.passes == (["ascent", "second"] * STEPS if name == "gsam" else ["ascent", "second", "single"] * 3)

    model = net()  # the same training in a plain loop, the variant built on the bare network
    sam = build(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(sam, lambda step: 1.0 / (1 + step))
    batches = list(data())
    for step in range(STEPS):
        x, y = batches[step % len(batches)]
        sam.first_step(F.mse_loss(model(x), y)) if sam.needs_ascent else sam.first_step()
        F.mse_loss(model(x), y).backward()
        sam.second_step(zero_grad=True)
        scheduler.step()
    torch.testing.assert_close(flat(module.net), flat(model), rtol=0, atol=1e-6)


def test_a_multi_step_ascent_is_refused_when_the_optimizer_is_first_checked(tmp_path):
    module = VariantNet(lambda m: normsam.SAM(m, torch.optim.AdamW, rho=0.5, lr=1e-2, ascent_steps=2))
    with pytest.raises(ValueError, match=r"SAMModule does not support ascent_steps=2: a multi-step ascent evaluates "
                                         r"the loss again at each of its 2 points"):
        trainer(tmp_path, max_steps=1).fit(module, data())
    assert all(torch.equal(a, b) for a, b in zip(module.net.parameters(), net().parameters()))
