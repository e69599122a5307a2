"""The runner under ``parallel=fsdp``: the model sharded with FSDP2, sharded checkpoints.

``normsam train ... parallel=fsdp`` under ``torchrun`` shards the model with
``torch.distributed.fsdp.fully_shard``: every *block* first (each parameterized element of an
``nn.Sequential``/``nn.ModuleList`` holding at least two of them: CIFAR ResNet blocks, ViT blocks, an MLP's
layers), then the root. :class:`normsam.SAM` handles the sharded parameters (:mod:`normsam.optim.sharded`).

Checkpoints are written with ``torch.distributed.checkpoint`` (each rank writes its own shards) into the run
folder::

    checkpoint.dcp/         the newest: DCP shards of model and optimizer, plus normsam.pt (epoch, history,
                            schedule, SAM's counters, world size: everything that is not a shard)
    checkpoint.prev.dcp/    the one before, kept so that a damaged newest costs one epoch

Buffers are not sharded: each rank's BatchNorm running statistics follow its own batches, and rank 0's are the
run's (those it evaluates with and records, as under DDP); every save first gives them to the other ranks, so
the checkpoint holds them and a resume continues exactly.

Atomic like ``checkpoint.pt``: every rank writes into ``.checkpoint.dcp.tmp/``, and only after all of them
have finished does rank 0 add ``normsam.pt`` and rename the folder into place; a crash (``kill -9``) at any
moment leaves the last complete checkpoint. A resume needs the same number of processes: the data order and
augmentation are functions of ``(seed, epoch, rank)``, so another world size would train a different run
(refused with a message). ``normsam sharpness`` and reports read the checkpoint in one process, without
torchrun (:func:`read_checkpoint`).
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["CHECKPOINT_DIR", "PREVIOUS_DIR", "shard_model", "blocks", "save", "load", "read_checkpoint",
           "is_complete", "full_copy"]

CHECKPOINT_DIR = "checkpoint.dcp"
PREVIOUS_DIR = "checkpoint.prev.dcp"
_TEMPORARY_DIR = ".checkpoint.dcp.tmp"
_META = "normsam.pt"


def blocks(model: nn.Module) -> list[nn.Module]:
    """The modules ``fully_shard`` wraps before the root: the parameterized elements of every
    ``nn.Sequential``/``nn.ModuleList`` (the root included) that holds at least two, outermost first."""
    chosen: list[nn.Module] = []
    inside: set[int] = set()  # modules within a chosen block: not wrapped again
    for module in model.modules():
        if id(module) in inside or not isinstance(module, (nn.Sequential, nn.ModuleList)):
            continue
        members = [m for m in module.children() if any(True for _ in m.parameters())]
        if len(members) < 2:
            continue
        for member in members:
            chosen.append(member)
            inside.update(id(m) for m in member.modules())
    return chosen


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``fully_shard`` each of :func:`blocks`, then the root, on a 1-D mesh over all processes."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_copy(model: nn.Module, build: Callable[[], nn.Module]) -> nn.Module | None:
    """Collective: an unsharded model from ``build()`` (same architecture) loaded with the sharded model's
    full weights, on rank 0, on the CPU (``None`` on the others); for the per-epoch norm statistics and the
    sharpness measurement, which read whole tensors."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    fresh = build()
    fresh.load_state_dict(state)
    return fresh


def is_complete(path: Path) -> bool:
    """A checkpoint folder that every rank finished writing (DCP's metadata) and rank 0 sealed."""
    return (path / ".metadata").is_file() and (path / _META).is_file()


def _share_rank0_buffers(model: nn.Module) -> None:
    """Collective: every rank's persistent buffers (BatchNorm's running statistics and ``num_batches_tracked``)
    become rank 0's, in place.

    ``fully_shard`` shards the parameters only: each rank's running statistics follow its own batches, and rank
    0's are the run's (its evaluation is the one recorded; DDP broadcasts rank 0's buffers at every forward).
    DCP writes one copy of a tensor that every rank holds unsharded, from whichever rank balances the writes
    (rank 1's running statistics, in a 2-process ResNet), and a resume loads that copy on every rank: rank 0
    went on with rank 1's statistics, and the resumed run's test loss was not the uninterrupted run's. Shared
    before every save, the checkpoint holds rank 0's, and every rank resumes with exactly the state it had.
    Training mode does not read running statistics: the trained weights and the recorded metrics stay the
    same."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if (buffer is not None and name not in module._non_persistent_buffers_set
                        and not isinstance(buffer, DTensor)):
                    dist.broadcast(buffer, src=0)


def _tensor_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}


def _as_global(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A local shard of something shaped like ``param`` as a DTensor like ``param`` (plain stays plain)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return local
    return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())


def _epsilon_template(sam: Any, indices: list[int]) -> dict[str, torch.Tensor]:
    params = [p for group in sam.param_groups for p in group["params"]]
    return {str(i): torch.empty_like(params[i]) for i in indices}


def _tensor_parts(sam_state: dict[str, Any]) -> dict[str, dict[Any, torch.Tensor]]:
    """SAM's per-tensor state by a path: the stored ε (``ascent_interval``), the ascent's transforms (Friendly-SAM's
    gradient average) and its descent rule (LookSAM's orthogonal gradient); each ``{param index: local shard}``."""
    parts = {"epsilon": sam_state.get("epsilon")}
    ascent = sam_state.get("ascent") or {}
    parts.update({f"transforms.{k}": t for k, t in enumerate(ascent.get("transforms") or [])})
    parts.update({f"descent.{name}": t for name, t in (ascent.get("descent") or {}).items()})
    return {path: part for path, part in parts.items() if isinstance(part, dict) and part}


def _put_part(sam_state: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """``sam_state`` with the part at ``path`` (see :func:`_tensor_parts`) replaced by ``value``."""
    state = {**sam_state}
    if path == "epsilon":
        state["epsilon"] = value
        return state
    ascent = {**(state.get("ascent") or {})}
    kind, _, key = path.partition(".")
    if kind == "transforms":
        transforms = list(ascent.get("transforms") or [])
        transforms[int(key)] = value
        ascent["transforms"] = transforms
    else:
        ascent["descent"] = {**(ascent.get("descent") or {}), key: value}
    state["ascent"] = ascent
    return state


def save(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any],
         sam: Any = None) -> None:
    """Collective: write the checkpoint of ``model`` and ``optimizer`` (the base optimizer) and ``meta``
    (rank 0's) atomically, keeping the previous one. SAM's stored ε (``ascent_interval > 1``, one local shard
    per rank) goes into the shards as DTensors, not into rank 0's ``meta``."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from normsam.train import checkpoint as ckpt

    run_dir = Path(run_dir)
    tmp = run_dir / _TEMPORARY_DIR
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
        tmp.mkdir(parents=True)
    dist.barrier()
    _share_rank0_buffers(model)  # the running statistics the run recorded, not the ones DCP would pick
    state = _tensor_state(model, optimizer)
    parts = _tensor_parts(meta.get("sam") or {})
    if parts:  # each rank's local shards of SAM's per-tensor state go into the shards, as DTensors
        params = [p for group in sam.param_groups for p in group["params"]]
        state["sam_tensors"] = {f"{path}/{i}": _as_global(t, params[int(i)])
                                for path, part in parts.items() for i, t in part.items()}
        sam_state = meta["sam"]
        for path in parts:
            sam_state = _put_part(sam_state, path, None)
        meta = {**meta, "sam": sam_state, "sam_tensor_index": {path: sorted(map(int, part)) for path, part in parts.items()}}
    dcp.save(state, checkpoint_id=str(tmp))
    dist.barrier()  # every rank's shards are on disk
    if dist.get_rank() == 0:
        buffer = io.BytesIO()
        torch.save({**meta, "world_size": dist.get_world_size()}, buffer)
        ckpt.atomic_write_bytes(tmp / _META, buffer.getvalue())
        _fsync_dir(tmp)
        newest, previous = run_dir / CHECKPOINT_DIR, run_dir / PREVIOUS_DIR
        if newest.exists():
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(newest, previous)
        os.replace(tmp, newest)
        _fsync_dir(run_dir)
    dist.barrier()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def newest_complete(run_dir: Path) -> Path | None:
    """The newest sealed checkpoint folder of a run (falling back to the previous one), or ``None``."""
    for name in (CHECKPOINT_DIR, PREVIOUS_DIR):
        if is_complete(Path(run_dir) / name):
            return Path(run_dir) / name
    return None


def has_checkpoint(run_dir: Path) -> bool:
    return any((Path(run_dir) / name).is_dir() for name in (CHECKPOINT_DIR, PREVIOUS_DIR))


def _read_meta(path: Path) -> dict[str, Any]:
    return torch.load(path / _META, map_location="cpu", weights_only=True)


def load(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, sam: Any = None) -> dict[str, Any]:
    """Collective: load the newest complete checkpoint into the sharded ``model`` and ``optimizer``; returns
    its ``meta``, whose ``sam`` part holds this rank's shards of SAM's stored ε. Refuses another number of
    processes than the one that wrote it."""
    import warnings

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = newest_complete(run_dir)
    if path is None:
        raise FileNotFoundError(
            f"{run_dir} has no complete sharded checkpoint ({CHECKPOINT_DIR}/ or {PREVIOUS_DIR}/ with .metadata "
            f"and {_META}); train the run again."
        )
    meta = _read_meta(path)
    if meta["world_size"] != dist.get_world_size():
        raise ValueError(
            f"{run_dir} was trained by {meta['world_size']} processes and this resume has {dist.get_world_size()}: "
            "each rank's data order and augmentation depend on the world size, so the resumed run would not be "
            f"the same run. Resume with torchrun --nproc_per_node={meta['world_size']}."
        )
    if path.name == PREVIOUS_DIR and dist.get_rank() == 0:
        warnings.warn(f"{run_dir / CHECKPOINT_DIR} is missing or incomplete; using {PREVIOUS_DIR} (epoch "
                      f"{meta.get('epoch', '?')}) instead, so the last epoch is trained again.", RuntimeWarning,
                      stacklevel=2)
    from torch.distributed.tensor import DTensor

    state = _tensor_state(model, optimizer)
    indices = meta.get("epsilon_indices")  # checkpoints written before the other per-tensor state was kept
    if indices:
        state["sam_epsilon"] = _epsilon_template(sam, indices)
    index = meta.get("sam_tensor_index") or {}
    if index:
        params = [p for group in sam.param_groups for p in group["params"]]
        state["sam_tensors"] = {f"{path}/{i}": torch.empty_like(params[i]) for path, ids in index.items() for i in ids}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    if indices:
        meta["sam"]["epsilon"] = {int(i): e.to_local() if isinstance(e, DTensor) else e
                                  for i, e in state["sam_epsilon"].items()}
    for part, ids in index.items():
        local = {i: state["sam_tensors"][f"{part}/{i}"] for i in ids}
        meta["sam"] = _put_part(meta["sam"], part, {i: t.to_local() if isinstance(t, DTensor) else t
                                                    for i, t in local.items()})
    return meta


def read_checkpoint(run_dir: Path) -> dict[str, Any]:
    """One process, no torchrun: the newest complete checkpoint as a ``checkpoint.pt``-style dict, its
    ``model`` entry the full (unsharded) state dict; for ``normsam sharpness`` and reports."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = newest_complete(run_dir)
    if path is None:
        from normsam.train.checkpoint import CorruptCheckpointError

        raise CorruptCheckpointError(
            f"{run_dir} has no complete sharded checkpoint ({CHECKPOINT_DIR}/ or {PREVIOUS_DIR}/); train it again."
        )
    buffer = io.BytesIO()
    dcp_to_torch_save(path, buffer)
    buffer.seek(0)
    tensors = torch.load(buffer, map_location="cpu", weights_only=True)
    return {**_read_meta(path), "model": tensors["model"]}
