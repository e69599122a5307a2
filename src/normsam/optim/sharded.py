r"""What changes under FSDP2: SAM on ``fully_shard``-ed models, whose parameters are ``DTensor`` shards.

A SAM step on an FSDP2 model is the one-process step on the global batch, computed shard by shard:

- **the ascent gradient is the global batch's**: FSDP2 reduce-scatters every gradient (its mean over ranks),
  so each rank holds its shard of the global-batch gradient (what ``sync_ascent=True`` means under DDP).
  Parameters left plain (``ignored_params``, modules outside ``fully_shard``) are replicas whose gradients
  FSDP2 does not reduce: SAM averages their ascent gradient over the ranks itself (one all-reduce), so that
  every replica gets the same ε;
- **ε and the saved copy are local shards**: every rank perturbs and backs up only the part of each tensor
  it owns (SAM-ON's extra memory per rank is its share of the norm parameters), and restores it exactly;
- **norms are global**: ‖T⊙g‖ sums the squares of every rank's shards (one all-reduce of a 0-d float64
  tensor) plus, once, the replicas'; layerwise's T = ‖p‖₂ + η is the norm of the *whole* tensor (one
  all-reduce of the stacked per-tensor squares); elementwise scalings need no communication;
- ``ascent_interval=k`` keeps the last ε as local shards too; ``SAM.state_dict()`` then holds this rank's
  shards of it (save it per rank; the runner stores it in its sharded checkpoint as DTensors);
- **the cheap ascent** ``first_step(loss)`` runs ``loss.backward(inputs=...)`` on the perturbed tensors'
  *unsharded* parameters (the ones autograd sees during the pass), so autograd computes no other weight
  gradient and FSDP2 reduce-scatters only the perturbed tensors' gradients; their sharded ``.grad`` is
  taken and the caller's ``.grad`` put back, so the cheap ascent still leaves ``.grad`` as it found it.

Nothing here reads a device value on the host: the collectives run on device tensors.

Supported: parameters sharded by ``fully_shard`` on a 1-D device mesh (placement ``Shard(0)``) or HSDP's
2-D mesh (``(Replicate(), Shard(0))``: norms sum over the shard dimension only, replicas are counted once),
mixed with plain tensors. Refused with a ``ValueError`` at ``SAM(...)``: FSDP1 (``FullyShardedDataParallel``),
DeepSpeed ZeRO, other meshes and placements (FSDP + tensor parallelism), and ``DTensor`` parameters that
``fully_shard`` does not manage (tensor parallelism).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from normsam.optim._foreach import grouped
from normsam.optim.perturbations import PerturbationModel
from normsam.optim.storage import PerturbedTensors, check_loss

__all__ = ["ShardedTensors", "ShardedPerturbedTensors", "check_sharded_options", "refuse_late_sharding",
           "sharding_for"]

SUPPORTED = (
    "normsam.SAM supports FSDP2 (torch.distributed.fsdp.fully_shard on a 1-D device mesh or HSDP's 2-D one, "
    "parameters as DTensor shards, optionally mixed with plain tensors), DDP and single-process models"
)


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def _is_fsdp1(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return False
    return isinstance(module, FullyShardedDataParallel)


def _is_deepspeed(obj: Any) -> bool:
    """A DeepSpeed engine, or a ZeRO-3 partitioned parameter (they carry ``ds_id``), without importing it."""
    if isinstance(obj, Tensor):
        return hasattr(obj, "ds_id")
    return any(cls.__name__ == "DeepSpeedEngine" for cls in type(obj).__mro__)


def _refuse_other_sharding(model: nn.Module | None, params: Sequence[Tensor]) -> None:
    modules = list(model.modules()) if model is not None else []
    if any(_is_fsdp1(m) for m in modules) or any(getattr(p, "_fsdp_flattened", False) for p in params):
        raise ValueError(
            "SAM does not support FSDP1 (FullyShardedDataParallel): its flat parameters hide the tensors SAM "
            "perturbs and it reduces gradients in its own buckets. Shard the model with FSDP2 instead, "
            f"torch.distributed.fsdp.fully_shard(module) per block and then on the root. {SUPPORTED}."
        )
    if any(_is_deepspeed(m) for m in modules) or any(_is_deepspeed(p) for p in params):
        raise ValueError(
            "SAM does not support DeepSpeed ZeRO: DeepSpeed partitions parameters and gradients itself and SAM "
            "would perturb empty placeholders. Use FSDP2 (torch.distributed.fsdp.fully_shard) or DDP. "
            f"{SUPPORTED}."
        )


def _fsdp2_params(model: nn.Module) -> dict[int, Any]:
    """id(sharded parameter) → its FSDP2 ``FSDPParam`` (which knows the unsharded parameter autograd sees)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return {}
    found: dict[int, Any] = {}
    try:  # FSDP2's bookkeeping is private; what normsam reads of it is pinned by tests/test_fsdp.py
        for module in model.modules():
            if isinstance(module, FSDPModule):
                for group in module._get_fsdp_state()._fsdp_param_groups:
                    for fsdp_param in group.fsdp_params:
                        found[id(fsdp_param.sharded_param)] = fsdp_param
    except AttributeError as error:
        raise ValueError(
            f"normsam cannot read FSDP2's parameter bookkeeping in torch {torch.__version__} ({error}); its FSDP2 "
            "support is tested with torch 2.14. Please report this with your torch version."
        ) from None
    return found


def sharding_for(model: nn.Module | None, params: Sequence[Tensor]) -> ShardedTensors | None:
    """The FSDP2 view of ``params`` (all trainable tensors SAM holds), or ``None`` when none is a DTensor.

    Raises ``ValueError`` for every sharded setup SAM cannot run exactly (see the module docstring)."""
    _refuse_other_sharding(model, params)
    dtensor = _dtensor_type()
    shards = [p for p in params if dtensor is not None and isinstance(p, dtensor)]
    if not shards:
        return None
    if model is None:
        raise ValueError(
            "SAM got DTensor parameters but no model: pass the model, SAM(model, ...) or model=model, so that "
            f"SAM can check they are FSDP2 shards and find the tensors autograd sees. {SUPPORTED}."
        )
    managed = _fsdp2_params(model)
    names = {id(p): n for n, p in model.named_parameters()}
    foreign = [names.get(id(p), "?") for p in shards if id(p) not in managed]
    if foreign:
        raise ValueError(
            f"SAM got DTensor parameters that fully_shard does not manage ({', '.join(foreign[:3])}"
            f"{' ...' if len(foreign) > 3 else ''}): tensor parallelism (parallelize_module, distribute_tensor) "
            f"is not supported. {SUPPORTED}."
        )
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate, Shard

    meshes = {id(p.device_mesh): p.device_mesh for p in shards}
    mesh = next(iter(meshes.values()))
    layout = (Shard(0),) if mesh.ndim == 1 else (Replicate(), Shard(0))  # FSDP2, HSDP
    odd = sorted({str(p.placements) for p in shards if p.placements != layout})
    if odd or len(meshes) != 1 or mesh.ndim > 2 or mesh.size() != dist.get_world_size():
        shapes = [tuple(m.shape) for m in meshes.values()]
        got = f"placements {', '.join(odd)}" if odd else f"{len(meshes)} mesh(es) of shapes {shapes}"
        raise ValueError(
            "SAM supports FSDP2 on one device mesh over all processes: 1-D (placements (Shard(0),)) or HSDP's 2-D "
            f"(Replicate(), Shard(0)); got {got} (FSDP + tensor parallelism?). Shard with "
            "fully_shard(module, mesh=init_device_mesh(device, (world_size,)))."
        )
    # norms sum the squares over the ranks that hold different shards (HSDP: one replica's shard group);
    # replicas of plain tensors average over every process
    return ShardedTensors(managed, mesh.get_group(mesh.ndim - 1), replica_group=None)


def refuse_late_sharding(params: Sequence[Tensor]) -> None:
    """SAM was built on plain tensors that are DTensors now (the model was sharded after ``SAM(...)``, or a
    framework swapped the optimizer's parameters): the plan would treat shards as whole tensors."""
    dtensor = _dtensor_type()
    if dtensor is not None and any(isinstance(p, dtensor) for p in params):
        raise ValueError(
            "SAM's parameters became DTensors after SAM was built (the model was sharded after SAM(...)): build "
            "SAM after fully_shard, on the sharded model: fully_shard(...); sam = SAM(model, ...)."
        )


def check_sharded_options(mask_scope: str | None, sync_ascent: bool | None) -> None:
    """Refuse the SAM options that FSDP2 cannot honour (rather than run them differently than asked)."""
    if sync_ascent is False:
        raise ValueError(
            "sync_ascent=False (each worker's own ascent gradient) cannot be honoured under FSDP2: it "
            "reduce-scatters every gradient, so the ascent gradient is the global batch's. Leave sync_ascent "
            "unset (or True) with FSDP2."
        )
    if mask_scope is not None:
        raise ValueError(
            f"scope={mask_scope!r} (an element mask) is not supported on FSDP2 shards yet: use a tensor scope "
            "('norm', 'all', 'no-norm', patterns or a predicate)."
        )


class ShardedTensors:
    """A model's FSDP2 sharding as SAM sees it: local shards, the global norms and ascent gradient.

    The storage (:class:`ShardedPerturbedTensors`) keeps the parameters themselves (their identity keys the
    stored ε) and asks this object for their *data*: :meth:`local` gives the local shard of a DTensor (the
    tensor FSDP2 all-gathers from, so writing it perturbs and restores the parameter) and a plain tensor
    itself."""

    def __init__(self, fsdp_params: dict[int, Any], group: Any, replica_group: Any = None):
        self._fsdp_params = fsdp_params
        self.group = group  # the ranks whose shards make up a whole tensor
        self.replica_group = replica_group  # every process (None: the default group), for plain tensors
        self._dtensor = _dtensor_type()

    def is_shard(self, p: Tensor) -> bool:
        return isinstance(p, self._dtensor)

    def perturbed_tensors(self, entries: Sequence[Any], others: Sequence[Any], **kwargs: Any) -> ShardedPerturbedTensors:
        """The storage of SAM's perturbed tensors on this sharding (see :func:`normsam.optim.storage.perturbed_tensors`)."""
        return ShardedPerturbedTensors(self, entries, others, **kwargs)

    def local(self, tensors: Iterable[Tensor]) -> list[Tensor]:
        return [t._local_tensor if isinstance(t, self._dtensor) else t for t in tensors]

    def is_current(self, params: Sequence[Tensor], data: Sequence[Tensor]) -> bool:
        """Whether ``data`` still holds the parameters' local shards (``model.to(...)`` or a
        ``load_state_dict(assign=True)`` replaces them)."""
        return all(map(operator.is_, self.local(params), data))

    # --- the ascent gradient ---------------------------------------------------------------------------

    def gradients(self, params: Sequence[Tensor]) -> list[Tensor | None]:
        """The local ascent gradients from ``.grad``: a shard's (FSDP2 already averaged it over the ranks),
        and a replica's averaged over the ranks here.

        No gradient on any shard is refused: ``loss.backward(inputs=<the sharded parameters>)`` gives exactly
        that, silently (autograd never sees the shards), and the step would be plain SGD's."""
        grads = [p.grad for p in params]
        shards = [g for p, g in zip(params, grads) if self.is_shard(p)]
        if shards and all(g is None for g in shards):
            raise ValueError(
                "first_step(): none of the perturbed FSDP2 shards has a gradient. Under FSDP2 autograd sees the "
                "unsharded parameters, not the shards: call loss.backward() (or loss.backward(inputs="
                "sam.ascent_inputs()) after the forward), or pass the loss, sam.first_step(loss)."
            )
        return self._localize(params, grads)

    def ascent_gradients(
        self, loss: Tensor, params: Sequence[Tensor], others: Sequence[Tensor]
    ) -> tuple[list[Tensor | None], list[Tensor | None]]:
        """The cheap ascent: gradients of ``params`` and ``others`` only, through FSDP2's own reduce-scatter."""
        tensors = list(params) + list(others)
        inputs = self.ascent_inputs(tensors)
        saved = [p.grad for p in tensors]  # the caller's gradients (micro-batch accumulation) are put back
        for p in tensors:
            p.grad = None
        try:
            if inputs:
                with torch.enable_grad():
                    loss.backward(inputs=inputs)
            grads = [p.grad for p in tensors]
        finally:
            for p, g in zip(tensors, saved):
                p.grad = g
        local = self._localize(tensors, grads)
        return local[: len(params)], local[len(params) :]

    def ascent_inputs(self, params: Sequence[Tensor]) -> list[Tensor]:
        """What ``loss.backward(inputs=...)`` needs for the gradients of ``params``: a shard's unsharded
        parameter (the tensor autograd saw in this pass; FSDP2 then reduce-scatters its gradient into the
        shard's ``.grad``), a plain tensor itself. Call it after the forward pass."""
        inputs = []
        for p in params:
            if self.is_shard(p):
                fsdp_param = self._fsdp_params[id(p)]
                if hasattr(fsdp_param, "_unsharded_param"):  # absent: never all-gathered, not in any pass yet
                    inputs.append(fsdp_param.unsharded_param)
            else:
                inputs.append(p)
        return inputs

    def _localize(self, params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> list[Tensor | None]:
        out = [g._local_tensor if g is not None and self.is_shard(p) else g for p, g in zip(params, grads)]
        replicas = [i for i, (p, g) in enumerate(zip(params, grads)) if g is not None and not self.is_shard(p)]
        if replicas:
            import torch.distributed as dist

            for idx in grouped([grads[i] for i in replicas]).values():
                pick = [replicas[j] for j in idx]
                flat = torch.cat([grads[i].reshape(-1) for i in pick])
                dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.replica_group)
                flat /= dist.get_world_size(self.replica_group)
                for i, part in zip(pick, flat.split([grads[i].numel() for i in pick])):
                    out[i] = part.view_as(grads[i])
        return out

    # --- global norms ----------------------------------------------------------------------------------

    def norm_of(self, params: Sequence[Tensor]) -> Callable[[Sequence[Tensor]], Tensor]:
        """A function: local tensors aligned with ``params`` (their gradients, T⊙g …) → the global ℓ2 norm, a
        0-d float64 tensor. Shards' squares are summed over the ranks (one all-reduce), replicas' counted once."""
        flags = [self.is_shard(p) for p in params]

        def squares(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
            total = torch.zeros((), dtype=torch.float64, device=device)
            for idx in grouped(tensors).values():  # one foreach norm per (device, dtype), squared in float64
                norms = torch.stack(torch._foreach_norm([tensors[i] for i in idx])).to(device, torch.float64)
                total = total + norms.square().sum()
            return total

        def norm(tensors: Sequence[Tensor]) -> Tensor:
            import torch.distributed as dist

            device = tensors[0].device if tensors else torch.device("cpu")
            shards = squares([t for t, s in zip(tensors, flags) if s], device)
            dist.all_reduce(shards, op=dist.ReduceOp.SUM, group=self.group)  # every rank's shards
            return (shards + squares([t for t, s in zip(tensors, flags) if not s], device)).sqrt()

        return norm

    def tensor_norms(self, tensors: Sequence[Tensor], shard_ids: frozenset[int]) -> list[Tensor]:
        """Each tensor's global ℓ2 norm (of the whole tensor, not of the shard: those whose id is in
        ``shard_ids``), as 0-d float64 tensors: one all-reduce in all."""
        if not tensors:
            return []
        import torch.distributed as dist

        device = tensors[0].device
        squares = torch.stack(
            [torch.linalg.vector_norm(t, dtype=torch.float64).to(device) for t in tensors]
        ).square()
        shard = torch.tensor([id(t) in shard_ids for t in tensors], device=device)
        shared = torch.where(shard, squares, 0.0)
        dist.all_reduce(shared, op=dist.ReduceOp.SUM, group=self.group)
        return list(torch.where(shard, shared, squares).sqrt().unbind())

    def perturbation_model(
        self, model: PerturbationModel, params: Sequence[Tensor], data: Sequence[Tensor]
    ) -> PerturbationModel:
        """``model`` with a tensor-level T (layerwise) computed from the whole tensor's norm.

        Such a T depends on the weights only through ‖p‖₂, and the one-element tensor [‖p‖₂] has that norm: so
        the model's own scale functions are called on it, for the additive and the official convention alike.
        ``params`` and their ``data`` (local shards or the tensors themselves) are the weights the model will
        see; the shards among them are recognized by identity."""
        if model.elementwise or model.scale is None:
            return model
        shard_ids = frozenset(id(d) for p, d in zip(params, data) if self.is_shard(p))
        scale, scale_foreach = model.scale, model.scale_foreach

        def whole(ws: Sequence[Tensor]) -> list[Tensor]:
            return [n.to(w.dtype).reshape(1) for n, w in zip(self.tensor_norms(ws, shard_ids), ws)]

        return replace(
            model,
            scale=lambda w, g, eta: scale(whole([w])[0], g, eta),
            scale_foreach=lambda ws, gs, eta: scale_foreach(whole(ws), gs, eta),
        )



class ShardedPerturbedTensors(PerturbedTensors):
    """The perturbed tensors of an FSDP2 model: ε and the backup on each rank's local shards, the ascent
    gradient through FSDP2's own reduce-scatter (the global batch's), norms summed over the ranks, and
    layerwise's T from the whole tensor's norm (the module docstring)."""

    sharded = True

    def __init__(self, sharding: ShardedTensors, *args: Any, **kwargs: Any):
        self.sharding = sharding
        super().__init__(*args, **kwargs)
        self.perturbation_model = sharding.perturbation_model(
            self.perturbation_model, self.params + self.others, self.data + self.others_data
        )

    def local(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        return self.sharding.local(tensors)

    def is_current(self) -> bool:
        return super().is_current() and self.sharding.is_current(self.params, self.data)

    def gradients(self, loss: Tensor | None) -> tuple[list[Tensor | None], list[Tensor | None]]:
        if loss is None:
            return self.sharding.gradients(self.params), self.sharding.gradients(self.others)
        check_loss(loss)
        return self.sharding.ascent_gradients(loss, self.params, self.others)

    def ascent_inputs(self) -> list[Tensor]:
        """The unsharded parameters autograd sees in the current pass (call it after the forward)."""
        return self.sharding.ascent_inputs(self.params + self.others)

    def norm_of(self, tensors: Sequence[Tensor]) -> Callable[[Sequence[Tensor]], Tensor]:
        return self.sharding.norm_of(tensors)

    def current_grads(self, params: Sequence[Tensor]) -> list[Tensor | None]:
        return [None if p.grad is None else self.local([p.grad])[0] for p in params]

    def dot_each(self, xs: Sequence[Tensor], ys: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
        """x·y of each pair, a shard's summed over every rank (one all-reduce for all of them)."""
        return self._summed_shards(super().dot_each(xs, ys, params), params)

    def squared_norm_each(self, xs: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
        """‖x‖² of each tensor, a shard's summed over every rank (one all-reduce for all of them)."""
        return self._summed_shards(super().squared_norm_each(xs, params), params)

    def _summed_shards(self, values: Tensor, params: Sequence[Tensor]) -> Tensor:
        import torch.distributed as dist

        shards = [i for i, p in enumerate(params) if self.sharding.is_shard(p)]  # the same on every rank
        if shards:
            summed = values[shards]
            dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=self.sharding.group)
            values[shards] = summed
        return values
