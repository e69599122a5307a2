"""Setting a run up: torchrun's environment, the device, seeds, loaders, the wrapped model, the optimizers.

Everything :class:`normsam.train.loop.Trainer` builds before its first step, as plain functions of the config
(:class:`~normsam.train.config.TrainConfig`), so the loop itself holds only the recipe.
"""

from __future__ import annotations

import atexit
import math
import os
import random
from typing import Any

import numpy as np
import torch
from torch import nn

from normsam.optim.amp import check_bf16_kernels
from normsam.optim.sam import SAM
from normsam.train.config import TrainConfig
from normsam.train.data import BatchLoader, make_augment, stratified_subset_indices
from normsam.train.data.streamed import make_streamed_loaders
from normsam.train.memorization import flipped_eval_sets
from normsam.train.run_folder import resolve_device

__all__ = [
    "Distributed",
    "close_process_group",
    "derive_seed",
    "seed_everything",
    "warmup_cosine",
    "run_device",
    "build_loaders",
    "wrap_model",
    "base_optimizer",
    "build_optimizer",
    "build_scheduler",
]


class Distributed:
    """torchrun's environment: rank, world size, and the process group (one process without torchrun)."""

    def __init__(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world_size > 1
        self.started_by_torchrun = "RANK" in os.environ

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device, *, always: bool = False) -> None:
        import torch.distributed as dist

        if (self.enabled or always) and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if backend == "gloo":  # gloo's worker threads joined before the interpreter finalizes
                import torch.distributed.nn  # noqa: F401  (before the group exists: see close_process_group)

                atexit.register(_close_at_exit)
            dist.init_process_group(backend=backend)

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


def close_process_group() -> None:
    """Destroy the default process group and free it now, while the interpreter is whole: its destructor joins
    gloo's worker threads.

    A gloo worker drops a finished collective's tensors after the caller has moved on; if the caller has dropped
    them already, that needs the GIL, and a thread that asks for the GIL once the interpreter is finalizing is
    ended by a forced unwind that C++ answers with "terminate called without an active exception" (SIGABRT,
    after all the work was done). ``destroy_process_group`` alone does not join them while anything still holds
    the group: the finished run's sharded model (garbage by now), FSDP2's device meshes, which DTensor's sharding
    caches keep alive (torch 2.14: ``DeviceMesh._pg_registry``; they let go of it here, unusable anyway once it
    is destroyed), and the defaults ``group=group.WORLD`` of ``torch.distributed.nn``'s functions when that
    module is first imported after the group exists (DCP imports it): :meth:`Distributed.init` imports it
    before."""
    import gc

    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()  # what is left of the run (a sharded model) holds the group too
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:
        return
    for obj in gc.get_objects():
        if isinstance(obj, DeviceMesh) and isinstance(getattr(obj, "_pg_registry", None), dict):
            obj._pg_registry.clear()
    gc.collect()


def _close_at_exit() -> None:
    """:func:`close_process_group` when the process exits normally. Not after an uncaught exception: a worker
    may then be inside a collective that another rank never joins, and the join would wait for gloo's
    timeout."""
    import sys

    if getattr(sys, "last_value", None) is None:
        close_process_group()


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. ``(seed, 1, epoch)``), stable across processes and platforms.

    The runner's streams: ``(seed, 1, epoch)`` dropout & co, ``(seed, 5, epoch)`` the examples of SSAM-F's
    Fisher mask. The data's subsets, splits, label noise, order and augmentation come from
    :func:`normsam.train.data.splits.derive_data_seed`, another algorithm (a ``numpy`` ``SeedSequence``; this one
    is a SplitMix-style mix) that gives other values for the same parts: every trained run depends on the exact
    values of both, so neither can be written as the other.
    """
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value & 0x7FFFFFFFFFFFFFFF


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and Python's ``random``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warm-up to 1 over ``warmup_steps``, then cosine to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def run_device(cfg: TrainConfig, dist: Distributed) -> torch.device:
    """The config's device (``auto`` resolved); under torchrun on CUDA, this process's GPU."""
    device = resolve_device(cfg.device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    check_bf16_kernels(cfg.bf16_kernels, amp=cfg.amp, device_type=device.type)  # device=auto resolved
    return device


def build_loaders(cfg: TrainConfig, data: Any, dist: Distributed,
                  device: torch.device) -> tuple[BatchLoader, dict[str, BatchLoader]]:
    """The training loader (this rank's share of each global batch) and the evaluation loaders by split name:
    ``test`` (a fixed stratified subset with ``eval_subset``), ``val``, and with label noise the flipped ones."""
    per_rank = cfg.batch_size // dist.world_size
    if per_rank * dist.world_size != cfg.batch_size:
        raise ValueError(
            f"batch_size={cfg.batch_size} (the global batch) is not divisible by the {dist.world_size} "
            "processes; choose a multiple."
        )
    if getattr(data, "streamed", False):  # decoded per sample in loader workers (train/data/streamed.py)
        return make_streamed_loaders(cfg, data, rank=dist.rank, world_size=dist.world_size,
                                     batch_size=per_rank, device=device)
    augment_name = cfg.augment or ("crop" if data.name == "mnist" else "crop-flip")
    train = BatchLoader(data.train, per_rank, shuffle=True, augment=make_augment(augment_name, data), seed=cfg.seed,
                        rank=dist.rank, world_size=dist.world_size, device=device)
    plain = make_augment("none", data)

    def evaluation(split: Any) -> BatchLoader:
        return BatchLoader(split, cfg.eval_batch_size, shuffle=False, augment=plain, device=device)

    test = data.test
    if cfg.eval_subset is not None and cfg.eval_subset < len(test):
        # a fixed subset (seed 0, whatever the run's seed), so runs of a sweep are scored on the same images
        test = test.take(stratified_subset_indices(test.labels, cfg.eval_subset, data.num_classes, seed=0))
    evals = {"test": evaluation(test)}
    if data.val is not None:
        evals["val"] = evaluation(data.val)
    if cfg.memorization:  # label noise: the flipped training examples (normsam.train.memorization)
        evals.update({name: evaluation(split) for name, split in flipped_eval_sets(data).items()})
    return train, evals


def wrap_model(cfg: TrainConfig, model: nn.Module, dist: Distributed,
               device: torch.device) -> tuple[nn.Module, nn.Module | None]:
    """``(forward_model, ddp)``: DDP first, then torch.compile (PyTorch's recommended order); SAM keeps the
    plain module. With parallel=fsdp the model is sharded in place (:mod:`normsam.train.fsdp`) and is its own
    forward model. ``ddp`` is the DDP wrapper (for ``no_sync``), or ``None``."""
    if cfg.parallel == "fsdp":
        from normsam.train import fsdp

        return fsdp.shard_model(model, device), None
    wrapped, ddp = model, None
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        wrapped = ddp = DistributedDataParallel(wrapped, device_ids=ids)
    if cfg.compile:
        wrapped = torch.compile(wrapped)
    return wrapped, ddp


def base_optimizer(cfg: TrainConfig) -> tuple[type, dict[str, Any]]:
    """The base optimizer's class and keywords (``momentum`` is beta1 for adamw and lion)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD, dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW, dict(lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)
    from timm.optim import Lion

    return Lion, dict(lr=cfg.lr, betas=(cfg.momentum, 0.99), weight_decay=cfg.weight_decay)


def build_optimizer(cfg: TrainConfig, model: nn.Module,
                    steps_per_epoch: int) -> tuple[SAM | None, torch.optim.Optimizer]:
    """``(sam, optimizer)``: SAM over the base optimizer with the config's
    :meth:`~normsam.train.config.TrainConfig.sam_options`, and the base optimizer it steps (which the LR
    schedule drives); ``(None, base optimizer)`` for ``scope=none``."""
    base_cls, base_kwargs = base_optimizer(cfg)
    options = cfg.sam_options(steps_per_epoch)
    if options is None:
        return None, base_cls(model.parameters(), **base_kwargs)
    sam = SAM(model, base_cls, options, **base_kwargs)
    return sam, sam.base_optimizer


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per step: linear LR warm-up over ``warmup_epochs``, then cosine to 0 at the last step."""
    warmup, total = round(cfg.warmup_epochs * steps_per_epoch), steps_per_epoch * cfg.epochs
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, warmup_steps=warmup, total_steps=total)
    )
