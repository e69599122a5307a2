"""``normsam train --config ... --dry-run``: what a run would do, without training.

The plan lists the data (sizes, classes, input size), the model and what SAM perturbs, the processes and the
batch per rank, the steps (per epoch, in all, of warm-up), the base optimizer and SAM's ρ, and the expected
memory per rank. Memory: weights, gradients and optimizer state are exact byte counts of the model's
parameters (SGD with momentum keeps one buffer, AdamW two, Lion one); SAM's extra is a backup and an ε per
perturbed element (its saved copy and buffers); activations are the tensors autograd saves for the backward
pass, counted on the ``meta`` device for one sample (no memory allocated, no compute) and scaled to the
micro-batch per rank; under bf16/fp16 autocast they are halved (an estimate: autocast keeps some ops in
float32). Not counted: the CUDA context, allocator fragmentation, cuDNN workspaces. The estimate has not been
compared with a GPU's measured peak yet (no GPU in the session that wrote it).

Without the data on disk the plan says where it looked and how to get the data, and plans the model for a known
data set's fixed shape (:data:`~normsam.train.data.KNOWN_SHAPES`), so that its figures are those of the plan
with the data; for an image folder or shards it plans the run's image size and 1,000 classes, and says so.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from normsam.train.config import TrainConfig
from normsam.train.data.containers import DatasetNotFoundError

__all__ = ["RunPlan", "plan_run"]

_STATE_BUFFERS = {"sgd": 1, "adamw": 2, "lion": 1}


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _saved_activation_bytes(model: torch.nn.Module, in_channels: int, image_size: int) -> int:
    """Bytes autograd saves for the backward of one sample (forward on the meta device)."""
    seen: dict[int, torch.Tensor] = {}  # a tensor saved by two ops (a ReLU's output, the next conv's input) counts once

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):  # weights are counted once, as weights
            seen.setdefault(id(t), t)
        return t

    x = torch.empty(1, in_channels, image_size, image_size, device="meta")
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(t.numel() * t.element_size() for t in seen.values())


def _shape_without_data(cfg: TrainConfig) -> tuple[int, int, int, str]:
    """(classes, channels, side length, where they come from) of the data of ``cfg`` when its files are missing:
    the fixed shape of a known data set (:data:`~normsam.train.data.KNOWN_SHAPES`), else the image size the run
    would use and ImageNet's 1,000 classes, said to be assumed."""
    from normsam.train.data.load import IMAGEFOLDER_IMAGE_SIZE, KNOWN_SHAPES, canonical_name
    from normsam.train.data.streamed import DEFAULT_IMAGE_SIZE, is_streamed

    name = canonical_name(cfg.data)
    known = KNOWN_SHAPES.get(name)
    if known is not None:
        return (*known, f"{name}'s fixed shape")
    size = cfg.image_size or (DEFAULT_IMAGE_SIZE if is_streamed(cfg) else IMAGEFOLDER_IMAGE_SIZE)
    return 1000, 3, size, f"the classes of {name} are known only from its files, 1,000 (ImageNet's) assumed"


class RunPlan(dict):
    """The plan's figures (a dict) with a printable :meth:`text`."""

    def text(self) -> str:
        return "\n".join(self["lines"])


def plan_run(cfg: TrainConfig, *, world_size: int | None = None) -> RunPlan:
    """The plan of ``cfg`` on ``world_size`` processes (default: ``$WORLD_SIZE``, else 1)."""
    from normsam.optim.scopes import select
    from normsam.train.data.memory import BatchLoader
    from normsam.train.data.streamed import StreamedData, make_streamed_loaders
    from normsam.train.run_folder import build_run_model, load_run_data

    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if world < 1:
        raise ValueError(f"--world-size must be >= 1, got {world}.")
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} (the global batch) is not divisible by {world} processes.")
    per_rank = cfg.batch_size // world
    lines = [f"Plan: {cfg.method} on {cfg.data} with {cfg.model} (nothing is trained)"]
    out: dict[str, Any] = {"world_size": world, "batch_per_rank": per_rank, "rho": cfg.rho, "method": cfg.method}

    data = None
    try:
        data = load_run_data(cfg)
    except (DatasetNotFoundError, FileNotFoundError) as exc:
        num_classes, in_channels, image_size, why = _shape_without_data(cfg)
        first, *rest = str(exc).splitlines() or [type(exc).__name__]
        lines.append(f"  data        NOT FOUND: {first}")
        lines += [f"              {line}" for line in rest]  # where it was looked for, and how to get it
        lines.append(f"              (steps need the data; the model is planned for {num_classes:,} classes of "
                     f"{in_channels}×{image_size}×{image_size} images: {why})")
        out.update(num_classes=num_classes, in_channels=in_channels, image_size=image_size, data_found=False)
    if data is not None:
        streamed = isinstance(data, StreamedData)
        n_train, n_test = len(data.train), len(data.test)
        kind = "streamed per sample" if streamed else "in memory"
        lines.append(f"  data        {data.name} from {data.source} ({kind}): {n_train:,} train / {n_test:,} "
                     f"evaluation images, {data.num_classes} classes, {data.image_size}px")
        if streamed:
            loader = make_streamed_loaders(cfg, data, rank=0, world_size=world, batch_size=per_rank,
                                           device=torch.device("cpu"))[0]
        else:
            loader = BatchLoader(data.train, per_rank, shuffle=True, augment=None, world_size=world)
        steps = len(loader)
        out.update(train_examples=n_train, steps_per_epoch=steps, total_steps=steps * cfg.epochs)
        num_classes, in_channels, image_size = data.num_classes, data.in_channels, data.image_size
        out.update(num_classes=num_classes, in_channels=in_channels, image_size=image_size, data_found=True)

    class _Shape:  # what build_run_model reads from the data
        pass

    shape = _Shape()
    shape.num_classes, shape.in_channels, shape.image_size = num_classes, in_channels, image_size  # type: ignore[attr-defined]
    with torch.device("meta"):
        model = build_run_model(cfg, shape)  # type: ignore[arg-type]
    params = [p for p in model.parameters() if p.requires_grad]
    numel = sum(p.numel() for p in params)
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    perturbed = 0
    if cfg.scope != "none":
        selected, _ = select(model, cfg.scope if cfg.scope not in ("random", "ssam-f", "ssam-d") else "all")
        perturbed = sum(info.param.numel() for info in selected)
        if cfg.scope in ("random", "ssam-f", "ssam-d") and cfg.sparsity is not None:
            perturbed = math.ceil(perturbed * (1 - cfg.sparsity))
    share = f"{100 * perturbed / numel:.3g}%" if numel else "0%"
    lines.append(f"  model       {cfg.model}: {numel:,} trainable parameters; SAM perturbs {perturbed:,} ({share}, "
                 f"scope={cfg.scope})")
    micro = per_rank // cfg.accumulation
    lines.append(f"  processes   {world}: batch {cfg.batch_size} = {per_rank} per rank × {world}"
                 + (f", {cfg.accumulation} micro-batches of {micro}" if cfg.accumulation > 1 else ""))
    if "steps_per_epoch" in out:
        warm = round(cfg.warmup_epochs * out["steps_per_epoch"])
        lines.append(f"  steps       {out['steps_per_epoch']:,} per epoch × {cfg.epochs} epochs = {out['total_steps']:,} "
                     f"(warm-up {warm:,}, then cosine to 0)")
    lines.append(f"  optimizer   {cfg.optimizer} lr {cfg.lr:g}, momentum/beta1 {cfg.momentum:g}, weight decay "
                 f"{cfg.weight_decay:g}, label smoothing {cfg.label_smoothing:g}")
    if cfg.scope == "none":
        lines.append("  SAM         off (scope=none): one pass per step")
    else:
        window = f"epochs {cfg.sam_start}..{(cfg.sam_end or cfg.epochs) - 1}"
        lines.append(f"  SAM         {cfg.perturbation} ρ={cfg.rho:g} on scope={cfg.scope}, {window}, bn_policy="
                     f"{cfg.bn_policy}, cheap ascent {'on' if cfg.cheap_ascent else 'off'}")

    state = _STATE_BUFFERS[cfg.optimizer] * weight_bytes
    sam_extra = 2 * perturbed * 4 if cfg.scope != "none" else 0
    per_sample = _saved_activation_bytes(model, in_channels, image_size)
    activations = per_sample * micro * (0.5 if cfg.amp in ("bf16", "fp16") else 1.0)
    total = 2 * weight_bytes + state + sam_extra + activations
    out.update(memory_bytes=int(total), activation_bytes_per_sample=per_sample)
    lines.append(f"  memory/rank ≈ {_bytes(total)}: weights {_bytes(weight_bytes)} + gradients {_bytes(weight_bytes)} + "
                 f"{cfg.optimizer} state {_bytes(state)} + SAM backup/ε {_bytes(sam_extra)} + activations "
                 f"{_bytes(activations)} ({_bytes(per_sample)}/sample × {micro}, amp={cfg.amp})")
    out["lines"] = lines
    return RunPlan(out)
