"""The training loop: one readable recipe for SGD, SAM-all and SAM-ON runs.

``Trainer(cfg).run()`` sets up data, model and optimizer (:mod:`normsam.train.setup`), then per epoch trains,
evaluates, records metrics and writes a checkpoint atomically (:mod:`normsam.train.run_store`). Everything
random is a function of ``(seed, epoch)`` (data order, augmentation, dropout), so ``normsam train --resume
RUN_DIR`` continues an interrupted run with exactly the metrics an uninterrupted one would have had.

One SAM step over ``accumulation`` micro-batches (SPEC §1–2)::

    ascent:   for each micro-batch: backward of loss/k, for the perturbed tensors only (cheap ascent)
              sam.first_step()            # ε from the accumulated ascent gradient, w_S ← w_S + ε
    descent:  for each micro-batch: backward of loss(w + ε)/k, all parameters
              sam.restore()               # w_S back from its saved copy, running stats as before
              clip, base optimizer step   # at the restored w

The run folder is locked for the life of the run (:mod:`normsam.train.run_lock`); a non-finite training loss
or weights stop the run with ``status: diverged`` and its last good checkpoint (:mod:`normsam.train.divergence`);
``--resume`` refuses a config.yaml edited since the run started (:mod:`normsam.train.identity`).

With DDP the ascent runs under ``no_sync()`` (each worker its own perturbation, as in the original SAM)
unless ``sync_ascent=true``; with fp16 the GradScaler's scale is divided out of the ascent gradient and the
weights are restored before ``scaler.step`` whether or not it skips the step.

SAM's variants (``variant``, ``centralize``, ``ascent_steps``, :meth:`TrainConfig.sam_options`) take the same
route: a descent rule (GSAM, WSAM, LookSAM) rewrites the gradient inside the base optimizer's step (after the
clipping, through ``scaler.step`` too); LookSAM's steps between its full ones take no ascent pass (one pass at
w, like a reused ε); a multi-step ascent runs the ascent pass again at each point it reaches. Under DDP a
descent rule needs ``sync_ascent=true`` (:meth:`TrainConfig.check_world_size`).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normsam.files import read_json
from normsam.optim.amp import upcast_bf16_matmuls
from normsam.train import checkpoint as ckpt
from normsam.train.config import TrainConfig, autocast, load_config
from normsam.train.data import BatchLoader, make_augment
from normsam.train.divergence import EpochWatch, RunDiverged, diverged_summary, is_diverged
from normsam.train.identity import RESUME_SAFE, check_sam_window, config_fingerprint
from normsam.train.next_step import next_step
from normsam.train.records import EpochLog, finished_summary
from normsam.train.run_folder import RunFolder, build_run_model, load_run_data, resolve_device
from normsam.train.run_store import RunExistsError, TrainState, open_run_store
from normsam.train.setup import (
    Distributed,
    build_loaders,
    build_optimizer,
    build_scheduler,
    derive_seed,
    run_device,
    seed_everything,
    warmup_cosine,
    wrap_model,
)

__all__ = [
    "Trainer",
    "train",
    "resume",
    "run_or_resume",
    "RunExistsError",
    "load_run_data",
    "build_run_model",
    "resolve_device",
    "seed_everything",
    "derive_seed",
    "warmup_cosine",
]


class Trainer:
    """Set up once, then :meth:`run`. ``resume=True`` continues from the run folder's checkpoint."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path | None = None, *, resume: bool = False):
        self.cfg = cfg
        self.run_dir = Path(run_dir or cfg.out or f"runs/{cfg.data}-{cfg.model}-{cfg.method}-s{cfg.seed}")
        self.dist = Distributed()
        check_sam_window(cfg)
        cfg.check_world_size(self.dist.world_size)
        self.store = open_run_store(self.run_dir, cfg, is_main=self.dist.is_main, world_size=self.dist.world_size)
        self.store.check(resume)
        self.store.check_writable()  # before the data loads: a read-only or full place fails now
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = run_device(cfg, self.dist)
        if cfg.parallel == "fsdp" and not self.dist.started_by_torchrun:
            raise ValueError(
                "parallel=fsdp shards the model over processes: start the run with torchrun, e.g. "
                "`torchrun --standalone --nproc_per_node=2 -m normsam train ... parallel=fsdp`."
            )
        self.dist.init(self.device, always=cfg.parallel == "fsdp")
        seed_everything(cfg.seed)

        self.data = load_run_data(cfg)
        self.model = build_run_model(cfg, self.data).to(self.device)
        self.forward_model, self.ddp = wrap_model(cfg, self.model, self.dist, self.device)
        self.train_loader, self.eval_loaders = build_loaders(cfg, self.data, self.dist, self.device)
        self.steps_per_epoch = len(self.train_loader)
        self.sam, self.optimizer = build_optimizer(cfg, self.model, self.steps_per_epoch)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.amp == "fp16" else None
        self.state = TrainState(self.model, self.optimizer, self.sam, self.scheduler, self.scaler)
        self.evaluates = self.dist.is_main or cfg.parallel == "fsdp"  # FSDP2's forward is collective
        self.store.lock(resume)
        try:
            if resume:
                self.store.load_checkpoint(self.state, self.device)
            self.log = EpochLog(cfg, self.run_dir, is_main=self.dist.is_main)
        except BaseException:
            self.store.release()
            raise

    # --- one step ----------------------------------------------------------------------------------

    def _loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with autocast(self.cfg.amp, self.device.type):
            logits = self.forward_model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
        return loss, logits

    def _accumulate(self, x: Tensor, y: Tensor, *, ascent: bool) -> tuple[float, Tensor]:
        """Backward of the batch's mean loss over the micro-batches (each's loss · its share of the batch,
        scaled by the GradScaler under fp16); returns (loss, logits).

        Ascent (first pass): only the perturbed tensors' gradients with the cheap ascent, never synced by DDP
        (``sync_ascent`` averages them inside SAM instead). With ``descent_over=all`` the descent rule needs the
        ascent gradient of every tensor: the ascent pass computes them all, and under DDP (where the rule needs
        ``sync_ascent``) DDP averages them, as ``sync_ascent`` does the perturbed ones. Descent: every gradient,
        DDP syncs on the last micro-batch.
        """
        every = ascent and self.cfg.descent_over == "all"
        cheap = ascent and self.cfg.cheap_ascent and not every
        xs, ys = x.chunk(self.cfg.accumulation), y.chunk(self.cfg.accumulation)
        total, logits_all = 0.0, []
        for i, (xi, yi) in enumerate(zip(xs, ys)):
            no_sync = self.ddp is not None and ((ascent and not every) or i < len(xs) - 1)
            with self.ddp.no_sync() if no_sync else contextlib.nullcontext():
                loss, logits = self._loss(xi, yi)
                # after the forward: under FSDP2 the inputs are the unsharded parameters of this pass
                inputs = self.sam.ascent_inputs() if cheap else None
                scaled = loss * (xi.shape[0] / x.shape[0])
                if self.scaler is not None:
                    scaled = self.scaler.scale(scaled)
                scaled.backward(inputs=inputs)
            total += loss.item() * xi.shape[0]
            logits_all.append(logits.detach())
        return total / x.shape[0], torch.cat(logits_all)

    def _base_step(self) -> None:
        """Clip (the unscaled gradient under fp16), step the base optimizer, zero the gradients."""
        if self.scaler is not None and self.cfg.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.clip_grad_norm:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train_step(self, x: Tensor, y: Tensor, use_sam: bool) -> dict[str, float]:
        """One optimizer step on the batch ``(x, y)``; returns loss, accuracy and the loss at w + ε."""
        if not use_sam:
            loss, logits = self._accumulate(x, y, ascent=False)
            self._base_step()
            return {"loss": loss, "correct": float((logits.argmax(1) == y).sum()), "loss_perturbed": math.nan}
        assert self.sam is not None
        # Fast modes: with ascent_interval the steps between fresh ascents reuse the last ε (no first pass);
        # with ascent_fraction the ascent sees the first ⌈f·B⌉ examples. Without a whole-batch pass at w,
        # loss and accuracy are those of the pass at w + ε.
        # LookSAM's steps between its full ones take no ascent pass either: one pass at w, its descent rule
        # rewrites the gradient in the base optimizer's step. A multi-step ascent (ascent_steps > 1) runs the
        # ascent pass again on the same examples at each point it reaches (ascent_loss).
        fresh = self.sam.needs_ascent
        m = math.ceil(round(self.cfg.ascent_fraction * x.shape[0], 9)) if fresh else 0
        ascent_loss = None
        if fresh:
            loss, logits = self._accumulate(x[:m], y[:m], ascent=True)
            if self.cfg.ascent_steps > 1:
                def ascent_loss() -> None:  # the ascent gradient at the current (perturbed) weights, in .grad
                    self.sam.zero_grad()
                    self._accumulate(x[:m], y[:m], ascent=True)
        with self.sam.restore_on_error():  # an error in the second pass (out of memory, Ctrl-C) leaves w, not w + ε
            self.sam.first_step(zero_grad=True, grad_scaler=self.scaler, ascent_loss=ascent_loss)
            loss_perturbed, logits_perturbed = self._accumulate(x, y, ascent=False)
            self.sam.restore()
        self._base_step()
        if m < x.shape[0]:
            loss, logits = loss_perturbed, logits_perturbed
        return {"loss": loss, "correct": float((logits.argmax(1) == y).sum()), "loss_perturbed": loss_perturbed}

    # --- epochs ------------------------------------------------------------------------------------

    def sam_active(self, epoch: int) -> bool:
        cfg = self.cfg
        return self.sam is not None and cfg.sam_start <= epoch < (cfg.sam_end if cfg.sam_end is not None else cfg.epochs)

    def _refresh_fisher_mask(self, epoch: int) -> None:
        """SSAM-F: recompute the mask from ``fisher_samples`` training examples, one per batch."""
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, 5, epoch))
        idx = torch.randperm(len(self.data.train), generator=gen)[: self.cfg.fisher_samples]
        images = make_augment("none", self.data)(self.data.train.images[idx]).to(self.device)
        labels = self.data.train.labels[idx].to(self.device)
        self.sam.refresh_masks(((images[i : i + 1], labels[i : i + 1]) for i in range(len(idx))))

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        cfg = self.cfg
        torch.manual_seed(derive_seed(cfg.seed, 1, epoch))  # dropout & co: a function of (seed, epoch)
        use_sam = self.sam_active(epoch)
        if use_sam and cfg.scope == "ssam-f" and (epoch - cfg.sam_start) % cfg.mask_refresh_epochs == 0:
            self._refresh_fisher_mask(epoch)
        self.model.train()
        self.train_loader.set_epoch(epoch)
        nonfinite_before = self.sam.counters["nonfinite_ascent_steps"] if use_sam else 0
        sums = {"loss": 0.0, "correct": 0.0, "loss_perturbed": 0.0, "n": 0}
        bar = self._progress(self.train_loader, f"epoch {epoch + 1}/{cfg.epochs}")
        start = time.perf_counter()
        watch = EpochWatch(epoch + 1, amp=cfg.amp, distributed=self.dist.enabled)
        for step, (x, y) in enumerate(bar, 1):
            out = self.train_step(x, y, use_sam)
            watch.see(out["loss"], step)  # a host float already: no extra sync
            self.scheduler.step()
            n = y.shape[0]
            sums["n"] += n
            for key in ("loss", "correct", "loss_perturbed"):
                sums[key] += out[key] * (n if key != "correct" else 1)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{sums['loss'] / sums['n']:.4f}", acc=f"{100 * sums['correct'] / sums['n']:.2f}%")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        watch.end(self.model, self.dist.all_reduce_sum, self.device)  # before they can become the checkpoint
        skipped = self.sam.counters["nonfinite_ascent_steps"] - nonfinite_before if use_sam else 0
        if skipped:  # SAM counts non-finite ascents on the device; the host looks once per epoch
            warnings.warn(
                f"SAM: in epoch {epoch + 1}, {skipped} of {len(self.train_loader)} ascent gradients were not "
                "finite; those steps used no perturbation ("
                + ("fp16 overflow? " if cfg.amp == "fp16" else "lr or rho too large? ")
                + "see counters['nonfinite_ascent_steps']).",
                RuntimeWarning,
                stacklevel=2,
            )
        n, loss, correct, loss_p = self.dist.all_reduce_sum(
            [sums["n"], sums["loss"], sums["correct"], sums["loss_perturbed"]], self.device
        )
        return {
            "train_loss": loss / n,
            "train_acc": 100.0 * correct / n,
            "train_loss_perturbed": loss_p / n if use_sam else None,
            "sam": use_sam,
            "epoch_time": seconds,
            "step_time": seconds / len(self.train_loader),
            "images_per_s": n / seconds,
        }

    @torch.no_grad()
    def evaluate(self, loader: BatchLoader) -> tuple[float, float]:
        """(mean cross-entropy without label smoothing, accuracy in %) on a whole split."""
        self.model.eval()
        total_loss, correct, n = 0.0, 0, 0
        for x, y in loader:
            with autocast(self.cfg.amp, self.device.type):
                logits = self.model(x)
            total_loss += F.cross_entropy(logits.float(), y, reduction="sum").item()
            correct += int((logits.argmax(1) == y).sum())
            n += y.shape[0]
        return total_loss / n, 100.0 * correct / n

    def _progress(self, loader: BatchLoader, desc: str):
        if not (self.cfg.progress and self.dist.is_main):
            return loader
        from tqdm.auto import tqdm

        return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None)  # no bar without a TTY

    # --- the run -----------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train the remaining epochs; returns the summary. Ctrl-C leaves the last checkpoint to resume.

        Raises :class:`~normsam.train.divergence.RunDiverged` when the loss or the weights became non-finite,
        after writing a summary with ``status: diverged`` (the last good epoch's checkpoint stays)."""
        try:
            with upcast_bf16_matmuls(self.cfg.bf16_kernels):  # forward and backward, training and evaluation
                return self._run()
        finally:
            self.store.release()

    def _run(self) -> dict[str, Any]:
        cfg, state, store, build = self.cfg, self.state, self.store, lambda: build_run_model(self.cfg, self.data)
        store.write_run_files(self.data, self.device)
        if self.dist.is_main:
            print(f"Run folder: {self.run_dir}", flush=True)
        if state.epoch == 0:
            store.record_norm_stats(0, self.model, build)
        try:
            for epoch in range(state.epoch, cfg.epochs):
                started = time.perf_counter()
                row = {"epoch": epoch + 1, **self.train_epoch(epoch)}
                if self.evaluates and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
                    for split, loader in self.eval_loaders.items():
                        row[f"{split}_loss"], row[f"{split}_acc"] = self.evaluate(loader)
                row["lr"] = self.optimizer.param_groups[0]["lr"]
                # the ρ of the epoch's last SAM step (a ρ schedule changes it); 0 in an epoch without SAM
                row["rho"] = next(g["rho"] for g in self.sam.param_groups if g["perturb"]) if row["sam"] else 0.0
                state.elapsed += time.perf_counter() - started
                row["elapsed"] = state.elapsed
                state.history.append(row)
                state.epoch = epoch + 1
                store.record_norm_stats(epoch + 1, self.model, build)  # collective under parallel=fsdp
                store.save_checkpoint(state)  # collective under parallel=fsdp
                store.write_metrics(state.history)
                if self.dist.is_main:
                    self.log(row)
                self.dist.barrier()
        except KeyboardInterrupt:
            if self.dist.is_main:
                print(f"\nInterrupted after {len(state.history)} finished epoch(s); {next_step(self.run_dir)}.")
            raise
        except RunDiverged as err:
            err.run_dir = self.run_dir
            store.write_summary(diverged_summary(
                err, run_dir=self.run_dir, method=cfg.method, history=state.history,
                sam_steps=self.sam.counters["sam_steps"] if self.sam is not None else 0,
                config_fingerprint=config_fingerprint(cfg)))
            raise
        summary = finished_summary(cfg, self.run_dir, state.history, elapsed=state.elapsed,
                                   counters=self.sam.counters if self.sam is not None else None)
        if cfg.sharpness_at_end:
            full_model = store.full_model(self.model, build)  # collective under parallel=fsdp
            if self.dist.is_main:
                from normsam.train.run_sharpness import measure_run_sharpness

                summary["sharpness"] = measure_run_sharpness(
                    self.run_dir, rho=cfg.sharpness_rho, steps=cfg.sharpness_steps, model=full_model,
                    data=self.data, convention=cfg.sharpness_convention, progress=cfg.progress,
                )["sharpness"]
        store.write_summary(summary)
        if self.dist.is_main:
            print(f"Finished: {self.run_dir}", flush=True)
        self.log.close()
        return summary


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run a fresh training run from a config; returns the summary."""
    return Trainer(cfg).run()


def resume(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Continue the run in ``run_dir`` from its last checkpoint, with its saved config.

    Only settings that do not change the result may be overridden (``progress``, ``threads``,
    ``tensorboard``); ``epochs`` may be raised to extend a finished or interrupted run's schedule only if it
    equals the saved value (the cosine schedule depends on it).
    """
    run_dir = Path(run_dir)
    cfg = RunFolder(run_dir).config()
    safe = RESUME_SAFE - {"out"}  # the folder is run_dir itself
    for key, value in (overrides or {}).items():
        if key not in safe:
            raise ValueError(
                f"--resume takes the run's saved config; only {', '.join(sorted(safe))} may be overridden, not {key!r}."
            )
        setattr(cfg, key, value)
    if (run_dir / ckpt.SUMMARY).exists():
        summary = read_json(run_dir / ckpt.SUMMARY)
        if is_diverged(summary):
            raise RunExistsError(
                f"{run_dir} diverged ({summary['diverged']['what']} became non-finite in epoch "
                f"{summary['diverged']['epoch']}); resuming would diverge again: train it anew with a lower lr or "
                "rho in another out=."
            )
        raise RunExistsError(f"{run_dir} has already finished (summary.json exists); nothing to resume.")
    return Trainer(cfg, run_dir, resume=True).run()


def run_or_resume(run_dir: Path, cfg_overrides: dict[str, Any], preset: str | None = None) -> dict[str, Any]:
    """Train into ``run_dir`` (config: ``preset`` or YAML file, then ``cfg_overrides``); skip it when
    finished, resume it when interrupted. Returns its summary."""
    run_dir = Path(run_dir)
    if (run_dir / ckpt.SUMMARY).exists():
        return read_json(run_dir / ckpt.SUMMARY)
    progress = cfg_overrides.get("progress")
    if RunFolder(run_dir).has_checkpoint():
        return resume(run_dir, {"progress": progress} if progress is not None else None)
    cfg = load_config(preset, {**cfg_overrides, "out": str(run_dir)})
    return Trainer(cfg).run()
