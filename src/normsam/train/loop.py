"""The training loop: one readable recipe for SGD, SAM-all and SAM-ON runs.

``Trainer(cfg).run()`` sets up data, model and optimizer, then per epoch trains, evaluates, records metrics
and writes a checkpoint atomically. Everything random is a function of ``(seed, epoch)`` (data order,
augmentation, dropout), so ``normsam train --resume RUN_DIR`` continues an interrupted run with exactly the
metrics an uninterrupted one would have had.

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
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normsam.files import check_writable, json_dumps, read_json
from normsam.optim.amp import check_bf16_kernels, upcast_bf16_matmuls
from normsam.optim.rho_schedules import RhoWarmup
from normsam.optim.sam import SAM
from normsam.optim.scopes import MASK_SCOPES
from normsam.train import checkpoint as ckpt
from normsam.train.config import TrainConfig, autocast, load_config, save_config
from normsam.train.data import BatchLoader, make_augment, stratified_subset_indices
from normsam.train.data.streamed import make_streamed_loaders
from normsam.train.divergence import EpochWatch, RunDiverged, diverged_summary, is_diverged
from normsam.train.identity import RESUME_SAFE, check_resumed_config, check_sam_window, config_fingerprint
from normsam.train.memorization import flipped_eval_sets
from normsam.train.norm_stats import norm_parameter_stats
from normsam.train.run_lock import RunLock
from normsam.train.run_folder import RunFolder, build_run_model, load_run_data, resolve_device

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
]


class RunExistsError(ValueError):
    """The run folder already holds a run."""


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. ``(seed, epoch)``), stable across processes and platforms."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value & 0x7FFFFFFFFFFFFFFF


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and Python's ``random``."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _base_optimizer(cfg: TrainConfig) -> tuple[type, dict[str, Any]]:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD, dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW, dict(lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)
    from timm.optim import Lion

    return Lion, dict(lr=cfg.lr, betas=(cfg.momentum, 0.99), weight_decay=cfg.weight_decay)


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warm-up to 1 over ``warmup_steps``, then cosine to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class _Distributed:
    """torchrun's environment: rank, world size, and the process group."""

    def __init__(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device, *, always: bool = False) -> None:
        import torch.distributed as dist

        if (self.enabled or always) and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def all_reduce_sum(self, values: list[float], device: torch.device) -> list[float]:
        if not self.enabled:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()


class Trainer:
    """Set up once, then :meth:`run`. ``resume=True`` continues from the run folder's checkpoint."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path | None = None, *, resume: bool = False):
        self.cfg = cfg
        self.run_dir = Path(run_dir or cfg.out or f"runs/{cfg.data}-{cfg.model}-{cfg.method}-s{cfg.seed}")
        self.dist = _Distributed()
        check_sam_window(cfg)
        self._lock: RunLock | None = None
        self._check_run_dir(resume)
        if self.dist.is_main:  # before the data loads: a read-only or full place fails now, not after setup
            check_writable(self.run_dir, what="run folder", create=False)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        check_bf16_kernels(cfg.bf16_kernels, amp=cfg.amp, device_type=self.device.type)  # device=auto resolved
        self.fsdp = cfg.parallel == "fsdp"
        if self.fsdp and "RANK" not in os.environ:
            raise ValueError(
                "parallel=fsdp shards the model over processes: start the run with torchrun, e.g. "
                "`torchrun --standalone --nproc_per_node=2 -m normsam train ... parallel=fsdp`."
            )
        self.dist.init(self.device, always=self.fsdp)
        seed_everything(cfg.seed)

        self.data = load_run_data(cfg)
        self.model = build_run_model(cfg, self.data).to(self.device)
        self.forward_model = self._wrap_model(self.model)
        self.train_loader, self.eval_loaders = self._make_loaders()
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = self.steps_per_epoch * cfg.epochs

        base_cls, base_kwargs = _base_optimizer(cfg)
        self.sam: SAM | None = None
        if cfg.scope == "none":
            self.optimizer = base_cls(self.model.parameters(), **base_kwargs)
        else:
            self.sam = self._make_sam(base_cls, base_kwargs)
            self.optimizer = self.sam.base_optimizer
        warmup = round(cfg.warmup_epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, warmup_steps=warmup, total_steps=self.total_steps)
        )
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.amp == "fp16" else None
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0
        self.elapsed = 0.0
        self._lock_run_dir(resume)
        try:
            if resume:
                self._load_checkpoint()
            self.tb = self._tensorboard()
        except BaseException:
            self._release_run_dir()
            raise

    # --- setup --------------------------------------------------------------------------------------

    def _check_run_dir(self, resume: bool) -> None:
        folder = RunFolder(self.run_dir)
        has_run = folder.has_checkpoint() or folder.is_finished()
        if resume and not folder.has_checkpoint():
            raise FileNotFoundError(
                f"Cannot resume {self.run_dir}: it has no {ckpt.CHECKPOINT} (no epoch finished yet); "
                f"start it again with `normsam train --config {self.run_dir / ckpt.CONFIG} out={self.run_dir}`."
            )
        if not resume and has_run:
            raise RunExistsError(
                f"{self.run_dir} already holds a run; resume it with `normsam train --resume {self.run_dir}` "
                "or choose another out=."
            )

    def _lock_run_dir(self, resume: bool) -> None:
        """One writer per run folder: rank 0 (which writes it) holds its lock until run() ends or the process
        exits, and checks the folder again under the lock (another writer may have finished meanwhile)."""
        if not self.dist.is_main:
            return
        self._lock = RunLock(self.run_dir).acquire()
        try:
            self._check_run_dir(resume)
        except BaseException:
            self._release_run_dir()
            raise

    def _release_run_dir(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def _make_loaders(self) -> tuple[BatchLoader, dict[str, BatchLoader]]:
        cfg, data = self.cfg, self.data
        augment_name = cfg.augment or ("crop" if data.name == "mnist" else "crop-flip")
        per_rank = cfg.batch_size // self.dist.world_size
        if per_rank * self.dist.world_size != cfg.batch_size:
            raise ValueError(
                f"batch_size={cfg.batch_size} (the global batch) is not divisible by the {self.dist.world_size} "
                "processes; choose a multiple."
            )
        if getattr(data, "streamed", False):  # decoded per sample in loader workers (train/data/streamed.py)
            return make_streamed_loaders(cfg, data, rank=self.dist.rank, world_size=self.dist.world_size,
                                         batch_size=per_rank, device=self.device)
        train = BatchLoader(
            data.train,
            per_rank,
            shuffle=True,
            augment=make_augment(augment_name, data),
            seed=cfg.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            device=self.device,
        )
        plain = make_augment("none", data)
        test = data.test
        if cfg.eval_subset is not None and cfg.eval_subset < len(test):
            # a fixed subset (seed 0, whatever the run's seed), so runs of a sweep are scored on the same images
            test = test.take(stratified_subset_indices(test.labels, cfg.eval_subset, data.num_classes, seed=0))
        evals = {"test": BatchLoader(test, cfg.eval_batch_size, shuffle=False, augment=plain, device=self.device)}
        if data.val is not None:
            evals["val"] = BatchLoader(data.val, cfg.eval_batch_size, shuffle=False, augment=plain, device=self.device)
        if cfg.memorization:  # label noise: the flipped training examples (normsam.train.memorization)
            for name, split in flipped_eval_sets(data).items():
                evals[name] = BatchLoader(split, cfg.eval_batch_size, shuffle=False, augment=plain, device=self.device)
        return train, evals

    def _wrap_model(self, model: nn.Module) -> nn.Module:
        """DDP first, then torch.compile (PyTorch's recommended order); SAM keeps the plain module. With
        parallel=fsdp the model is sharded in place (normsam.train.fsdp)."""
        wrapped = model
        self.ddp = None
        if self.fsdp:
            from normsam.train import fsdp

            return fsdp.shard_model(model, self.device)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = self.ddp = DistributedDataParallel(wrapped, device_ids=ids)
        if self.cfg.compile:
            wrapped = torch.compile(wrapped)
        return wrapped

    def _make_sam(self, base_cls: type, base_kwargs: dict[str, Any]) -> SAM:
        cfg = self.cfg
        mask_kw: dict[str, Any] = {}
        if cfg.scope in MASK_SCOPES:
            mask_kw = dict(sparsity=cfg.sparsity, mask_seed=cfg.seed)
        if cfg.scope == "ssam-d":
            sam_epochs = (cfg.sam_end or cfg.epochs) - cfg.sam_start
            mask_kw.update(mask_interval=cfg.mask_interval, mask_total_steps=max(1, sam_epochs * self.steps_per_epoch))
        return SAM(
            self.model,
            base_cls,
            scope=cfg.scope,
            rho=cfg.rho,
            perturbation=cfg.perturbation,
            eta=cfg.eta,
            normalize_bias=cfg.normalize_bias,
            norm_over=cfg.norm_over,
            bn_policy=cfg.bn_policy,
            # (True under parallel=fsdp: the config records what FSDP2 does; unset for the momentum ascent,
            # which has no ascent gradient to average, and whose config refuses sync_ascent=true)
            sync_ascent=None if cfg.ascent == "momentum" else cfg.sync_ascent,
            ascent_interval=cfg.ascent_interval,
            ascent=cfg.ascent,
            layerwise_scaling=cfg.layerwise_scaling,
            scaled_tensors=cfg.scaled_tensors,
            # counted in SAM steps, so a late SAM window (sam_start) warms up from its own start
            rho_schedule=(RhoWarmup(max(1, round(cfg.rho_warmup_epochs * self.steps_per_epoch)))
                          if cfg.rho_warmup_epochs else None),
            **mask_kw,
            **base_kwargs,
        )

    def _tensorboard(self):
        if not (self.cfg.tensorboard and self.dist.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ValueError(
                "tensorboard=true needs the tensorboard package: pip install 'normsam[tensorboard]'."
            ) from err
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    # --- one step ----------------------------------------------------------------------------------

    def _autocast(self):
        return autocast(self.cfg.amp, self.device.type)

    def _loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with self._autocast():
            logits = self.forward_model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
        return loss, logits

    def _backward(self, loss: Tensor, share: float, inputs: list[Tensor] | None = None) -> None:
        """Backward of ``loss · share`` (share = micro-batch size / batch size, so the accumulated gradient
        is the whole batch's mean), scaled by the GradScaler under fp16."""
        scaled = loss * share
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        scaled.backward(inputs=inputs)

    def _micro_batches(self, x: Tensor, y: Tensor) -> Iterator[tuple[bool, Tensor, Tensor]]:
        """(is_last, x, y) per micro-batch."""
        k = self.cfg.accumulation
        xs, ys = x.chunk(k), y.chunk(k)
        for i, (xi, yi) in enumerate(zip(xs, ys)):
            yield i == len(xs) - 1, xi, yi

    def _no_sync(self, skip_sync: bool):
        if skip_sync and self.ddp is not None:
            return self.ddp.no_sync()
        return contextlib.nullcontext()

    def _accumulate(self, x: Tensor, y: Tensor, *, ascent: bool) -> tuple[float, Tensor]:
        """Backward of the batch's mean loss over the micro-batches; returns (loss, logits).

        Ascent (first pass): only the perturbed tensors' gradients with the cheap ascent, never synced by DDP
        (``sync_ascent`` averages them inside SAM instead). Descent: every gradient, DDP syncs on the last
        micro-batch.
        """
        cheap = ascent and self.cfg.cheap_ascent
        total, logits_all = 0.0, []
        for last, xi, yi in self._micro_batches(x, y):
            with self._no_sync(ascent or not last):
                loss, logits = self._loss(xi, yi)
                # after the forward: under FSDP2 the inputs are the unsharded parameters of this pass
                self._backward(loss, xi.shape[0] / x.shape[0], self.sam.ascent_inputs() if cheap else None)
            total += loss.item() * xi.shape[0]
            logits_all.append(logits.detach())
        return total / x.shape[0], torch.cat(logits_all)

    def _base_step(self) -> None:
        if self.scaler is not None:
            if self.cfg.clip_grad_norm:
                self.scaler.unscale_(self.optimizer)
            self._clip()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self._clip()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _clip(self) -> None:
        if self.cfg.clip_grad_norm:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad_norm)

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
        fresh = self.sam.needs_ascent
        m = math.ceil(round(self.cfg.ascent_fraction * x.shape[0], 9)) if fresh else 0
        if fresh:
            loss, logits = self._accumulate(x[:m], y[:m], ascent=True)
        with self.sam.restore_on_error():  # an error in the second pass (out of memory, Ctrl-C) leaves w, not w + ε
            self.sam.first_step(zero_grad=True, grad_scaler=self.scaler)
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
        assert self.sam is not None
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, 5, epoch))
        idx = torch.randperm(len(self.data.train), generator=gen)[: self.cfg.fisher_samples]
        norm = make_augment("none", self.data)
        images = norm(self.data.train.images[idx]).to(self.device)
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
        if use_sam:  # SAM counts non-finite ascents on the device; the host looks once per epoch
            skipped = self.sam.counters["nonfinite_ascent_steps"] - nonfinite_before
            if skipped:
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
            with self._autocast():
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

    # --- checkpoints -------------------------------------------------------------------------------

    def _checkpoint_state(self, epoch: int, tensors: bool = True) -> dict[str, Any]:
        """``tensors=False`` (parallel=fsdp): without model and optimizer, which go to DCP shards; SAM's
        own part (counters) instead."""
        if tensors:
            shards = {"model": self.model.state_dict(), "optimizer": (self.sam or self.optimizer).state_dict()}
        else:
            shards = {"sam": self.sam.state_dict()["sam"] if self.sam is not None else None}
        return {
            "format": 1,
            "epoch": epoch,  # epochs completed
            **shards,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "history": self.history,
            "elapsed": self.elapsed,
            "config": self.cfg.to_dict(),
        }

    def _save_checkpoint(self, epoch: int) -> None:
        """Rank 0 writes checkpoint.pt; under parallel=fsdp every rank writes its shards (normsam.train.fsdp)."""
        if not self.fsdp:
            if self.dist.is_main:
                ckpt.save_checkpoint(self.run_dir / ckpt.CHECKPOINT, self._checkpoint_state(epoch))
            return
        from normsam.train import fsdp

        fsdp.save(self.run_dir, self.model, self.optimizer, self._checkpoint_state(epoch, tensors=False), sam=self.sam)

    def _full_model(self) -> nn.Module | None:
        """The model with whole tensors, on rank 0 (under parallel=fsdp a collective gather into a fresh
        copy; otherwise the model itself), for norm statistics and sharpness."""
        if not self.fsdp:
            return self.model if self.dist.is_main else None
        from normsam.train import fsdp

        return fsdp.full_copy(self.model, lambda: build_run_model(self.cfg, self.data))

    def _load_checkpoint(self) -> None:
        if self.fsdp:
            from normsam.train import fsdp

            state = fsdp.load(self.run_dir, self.model, self.optimizer, sam=self.sam)
            check_resumed_config(self.run_dir, state.get("config"), self.cfg)  # a hand-edited config.yaml is refused
            if self.sam is not None:  # SAM's counters, and its param_groups re-linked to the base's
                self.sam.load_state_dict({**self.optimizer.state_dict(), "sam": state["sam"]})
                self.optimizer = self.sam.base_optimizer
        else:
            state = RunFolder(self.run_dir).load_checkpoint(map_location=self.device)
            check_resumed_config(self.run_dir, state.get("config"), self.cfg)  # a hand-edited config.yaml is refused
            self.model.load_state_dict(state["model"])
            (self.sam or self.optimizer).load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.history = list(state["history"])
        self.start_epoch = int(state["epoch"])
        self.elapsed = float(state["elapsed"])

    def _write_run_files(self) -> None:
        if not self.dist.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / ckpt.CONFIG)
        ckpt.write_json(self.run_dir / ckpt.ENVIRONMENT, ckpt.environment(self.device, world_size=self.dist.world_size))
        if self.data.noisy_indices is not None:
            flipped = self.data.noisy_indices
            ckpt.write_json(self.run_dir / ckpt.LABEL_NOISE, {
                "label_noise": self.cfg.label_noise,
                "num_train": len(self.data.train),
                "num_flipped": int(flipped.numel()),
                "note": "positions in the training split (after subset and val_split); labels as stored there",
                "indices": flipped.tolist(),
                "clean_labels": self.data.clean_labels[flipped].tolist(),
                "noisy_labels": self.data.train.labels[flipped].tolist(),
            })

    def _record_norm_stats(self, epoch: int) -> None:
        if not self.cfg.norm_stats:
            return
        model = self._full_model()  # collective under parallel=fsdp
        if model is None:
            return
        path = self.run_dir / ckpt.NORM_STATS
        rows = [r for r in ckpt.read_jsonl(path) if r["epoch"] < epoch]  # drop rows of epochs being redone
        rows.append({"epoch": epoch, **norm_parameter_stats(model)})
        ckpt.atomic_write_text(path, "".join(json_dumps(r) + "\n" for r in rows))

    # --- the run -----------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train the remaining epochs; returns the summary. Ctrl-C leaves the last checkpoint to resume.

        Raises :class:`~normsam.train.divergence.RunDiverged` when the loss or the weights became non-finite,
        after writing a summary with ``status: diverged`` (the last good epoch's checkpoint stays)."""
        try:
            with upcast_bf16_matmuls(self.cfg.bf16_kernels):  # forward and backward, training and evaluation
                return self._run()
        finally:
            self._release_run_dir()

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        self._write_run_files()
        if self.dist.is_main:
            print(f"Run folder: {self.run_dir}", flush=True)
        if self.start_epoch == 0:
            self._record_norm_stats(0)
        try:
            for epoch in range(self.start_epoch, cfg.epochs):
                started = time.perf_counter()
                row = {"epoch": epoch + 1, **self.train_epoch(epoch)}
                scored = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
                for split, loader in self.eval_loaders.items():
                    # FSDP2's forward is collective: every rank evaluates, rank 0 records
                    if (self.dist.is_main or self.fsdp) and scored:
                        row[f"{split}_loss"], row[f"{split}_acc"] = self.evaluate(loader)
                row["lr"] = self.optimizer.param_groups[0]["lr"]
                # the ρ of the epoch's last SAM step (a ρ schedule changes it); 0 in an epoch without SAM
                row["rho"] = next(g["rho"] for g in self.sam.param_groups if g["perturb"]) if row["sam"] else 0.0
                self.elapsed += time.perf_counter() - started
                row["elapsed"] = self.elapsed
                self.history.append(row)
                self._record_norm_stats(epoch + 1)
                self._save_checkpoint(epoch + 1)
                if self.dist.is_main:
                    ckpt.write_metrics(self.run_dir, self.history)
                    self._log(row)
                self.dist.barrier()
        except KeyboardInterrupt:
            if self.dist.is_main:
                done = len(self.history)
                print(f"\nInterrupted after {done} finished epoch(s). Resume with: normsam train --resume {self.run_dir}")
            raise
        except RunDiverged as err:
            err.run_dir = self.run_dir
            if self.dist.is_main:
                sam_steps = self.sam.counters["sam_steps"] if self.sam is not None else 0
                ckpt.write_json(self.run_dir / ckpt.SUMMARY, diverged_summary(
                    err, run_dir=self.run_dir, method=cfg.method, history=self.history, sam_steps=sam_steps,
                    config_fingerprint=config_fingerprint(cfg)))
            raise
        summary = self._summary()
        full_model = self._full_model() if cfg.sharpness_at_end else None  # collective under parallel=fsdp
        if cfg.sharpness_at_end and self.dist.is_main:
            from normsam.train.run_sharpness import measure_run_sharpness

            summary["sharpness"] = measure_run_sharpness(
                self.run_dir, rho=cfg.sharpness_rho, steps=cfg.sharpness_steps, model=full_model, data=self.data,
                convention=cfg.sharpness_convention,
                progress=cfg.progress,
            )["sharpness"]
        if self.dist.is_main:
            ckpt.write_json(self.run_dir / ckpt.SUMMARY, summary)
            print(f"Finished: {self.run_dir}", flush=True)
        if self.tb is not None:
            self.tb.close()
        return summary

    def _log(self, row: dict[str, Any]) -> None:
        test = f" test {row['test_loss']:.4f} / {row['test_acc']:.2f}%" if "test_acc" in row else ""
        val = f" val {row['val_acc']:.2f}%" if "val_acc" in row else ""
        sam = " (SAM)" if row["sam"] else ""
        print(
            f"epoch {row['epoch']:>3}/{self.cfg.epochs}{sam}: train {row['train_loss']:.4f} / {row['train_acc']:.2f}%"
            f"{test}{val}  lr {row['lr']:.4g}  {row['epoch_time']:.1f}s  {row['images_per_s']:.0f} img/s",
            flush=True,
        )
        if self.tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and value is not None and key != "epoch":
                    self.tb.add_scalar(key, value, row["epoch"])

    def _summary(self) -> dict[str, Any]:
        last = self.history[-1]
        best = max(self.history, key=lambda r: r.get("test_acc", -1))
        return {
            "run_dir": str(self.run_dir),
            "method": self.cfg.method,
            "status": "finished",
            "epochs": len(self.history),
            "final_test_acc": last.get("test_acc"),
            "best_test_acc": best.get("test_acc"),
            "best_epoch": best["epoch"],
            "final_train_loss": last["train_loss"],
            "final_val_acc": last.get("val_acc"),
            "final_flipped_acc": last.get("flipped_acc"),  # label noise: memorized share of the flipped labels
            "final_flipped_clean_acc": last.get("flipped_clean_acc"),
            "mean_epoch_time": sum(r["epoch_time"] for r in self.history) / len(self.history),
            "mean_step_time": sum(r["step_time"] for r in self.history) / len(self.history),
            "total_time": self.elapsed,
            "nonfinite_ascent_steps": self.sam.counters["nonfinite_ascent_steps"] if self.sam else 0,
            "sam_steps": self.sam.counters["sam_steps"] if self.sam else 0,  # what was trained, not asked for
            "config_fingerprint": config_fingerprint(self.cfg),
        }


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
