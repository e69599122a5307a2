"""The FSDP2 cases of tests/test_fsdp.py, run inside 2 gloo processes (one launch for all of them).

Each rank runs every case and rank 0 writes one JSON record per case: the largest difference between the
FSDP2 model after a few SAM steps (each rank on half the batch) and the same model trained in one process on
the whole batch, plus whatever else the case checks. The one-process reference runs inside each rank (the
models are tiny), so nothing needs to cross processes but the result file.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import normsam

STEPS = 3
GLOBAL_BATCH = 8


class NormMLP(nn.Module):
    """Linear → norm → ReLU → Linear → norm → head. Widths 16, 15 and 3 classes: some shards are uneven
    (15 and 3 rows over 2 ranks). LayerNorm and RMSNorm normalize per example, so half batches give the
    same per-example outputs as the whole batch."""

    def __init__(self, norm: str = "layer", bn: bool = False):
        super().__init__()
        make = {"layer": nn.LayerNorm, "rms": nn.RMSNorm}[norm]
        self.fc1 = nn.Linear(6, 16)
        self.norm1 = make(16)
        self.fc2 = nn.Linear(16, 15)
        self.norm2 = make(15)
        self.head = nn.Linear(15, 3)
        self.bn = nn.BatchNorm1d(3) if bn else None
        with torch.no_grad():  # non-trivial γ (and β) so that |w| differs between elements
            for m in (self.norm1, self.norm2):
                m.weight.uniform_(0.5, 1.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        x = torch.relu(self.norm1(self.fc1(x)))
        x = self.head(torch.relu(self.norm2(self.fc2(x))))
        return self.bn(x) if self.bn is not None else x


def make_model(norm: str = "layer", seed: int = 0, bn: bool = False) -> NormMLP:
    torch.manual_seed(seed)
    return NormMLP(norm, bn)


MESHES: dict = {}  # HSDP cases: 2-D (replicate, shard) meshes by name


def shard(model: nn.Module, mesh, *, leave_norms_plain: bool = False, mp_policy=None) -> nn.Module:
    """fully_shard per layer, then the root. ``leave_norms_plain``: the norm layers' parameters stay plain
    tensors (``ignored_params``), as when a user keeps them out of sharding."""
    from torch.distributed.fsdp import fully_shard

    norms = [model.norm1, model.norm2]
    policy = {} if mp_policy is None else {"mp_policy": mp_policy}
    for layer in (model.fc1, model.fc2, model.head) + (() if leave_norms_plain else tuple(norms)):
        fully_shard(layer, mesh=mesh, **policy)
    ignored = {p for m in norms for p in m.parameters()} if leave_norms_plain else None
    fully_shard(model, mesh=mesh, ignored_params=ignored, **policy)
    return model


def batches(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)


def my_half(x: torch.Tensor) -> torch.Tensor:
    rank, world = dist.get_rank(), dist.get_world_size()
    return x.chunk(world)[rank]


def average_plain_grads(model: nn.Module) -> None:
    """What a user does for parameters FSDP2 leaves plain: average their gradients over the ranks."""
    from torch.distributed.tensor import DTensor

    for p in model.parameters():
        if p.grad is not None and not isinstance(p.grad, DTensor):
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


def sam_step(model, sam, x, y, ascent: str, plain_grads: bool = False) -> None:
    if ascent == "momentum":  # no pass at w: ε from the base optimizer's momentum (none yet: a plain step)
        sam.first_step()
        F.cross_entropy(model(x), y).backward()
        if plain_grads:
            average_plain_grads(model)
        sam.second_step(zero_grad=True)
        return
    if ascent == "cheap" and not sam.needs_ascent:  # a step that reuses ε: no pass at w (a loss is refused)
        sam.first_step()
        F.cross_entropy(model(x), y).backward()
        if plain_grads:
            average_plain_grads(model)
        sam.second_step(zero_grad=True)
        return
    loss = F.cross_entropy(model(x), y)
    if ascent == "cheap":  # (ascent_loss: a multi-step ascent's later passes, at the point reached)
        sam.first_step(loss, zero_grad=True, ascent_loss=lambda: F.cross_entropy(model(x), y))
    else:
        loss.backward()
        sam.first_step(zero_grad=True, ascent_loss=lambda: (sam.zero_grad(), F.cross_entropy(model(x), y).backward(),
                                                            None)[2])
    F.cross_entropy(model(x), y).backward()
    if plain_grads:
        average_plain_grads(model)
    sam.second_step(zero_grad=True)


def full(p: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return p.full_tensor() if isinstance(p, DTensor) else p


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((full(p).detach() - q.detach()).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def equivalence(mesh, *, norm="layer", perturbation="sam", ascent="cheap", scope="norm", leave_norms_plain=False,
                base="sgd", **options) -> dict:
    """FSDP2 SAM (each rank half the batch) vs one-process SAM on the whole batch, SGD with momentum (or
    AdamW): the base optimizer's state is built over several steps."""
    base_kwargs = dict(lr=0.1, momentum=0.9, weight_decay=1e-3) if base == "sgd" else dict(lr=0.01, weight_decay=0.1)
    base_cls = torch.optim.SGD if base == "sgd" else torch.optim.AdamW
    kwargs = dict(rho=0.5 if scope == "norm" else 0.1, perturbation=perturbation, scope=scope, **base_kwargs,
                  **options)
    if ascent == "momentum":
        kwargs["ascent"] = "momentum"
    reference = make_model(norm)
    plain_sgd = copy.deepcopy(reference)
    model = shard(copy.deepcopy(reference), mesh, leave_norms_plain=leave_norms_plain)
    ref_sam = normsam.SAM(reference, base_cls, **kwargs)
    sam = normsam.SAM(model, base_cls, **kwargs)
    sgd = base_cls(plain_sgd.parameters(), **base_kwargs)
    for step in range(STEPS):
        x, y = batches(step)
        if step == 1 and options.get("ascent_interval", 1) > 1:  # a per-rank state_dict round trip of the
            state = copy.deepcopy(sam.state_dict())           # stored local ε, into a new SAM
            sam = normsam.SAM(model, base_cls, **kwargs)
            sam.load_state_dict(state)
        sam_step(reference, ref_sam, x, y, ascent)
        sam_step(model, sam, my_half(x), my_half(y), ascent, plain_grads=leave_norms_plain)
        sgd.zero_grad()
        F.cross_entropy(plain_sgd(x), y).backward()
        sgd.step()
    return {"diff": max_diff(model, reference), "sam_vs_sgd": max_diff(plain_sgd, reference),
            "base_state": sum(bool(s) for s in sam.base_optimizer.state.values()),
            # the FSDP2 model's weights, pinned bit for bit by tests/data/fsdp_regression.json (issue 23)
            "params": [x for p in model.parameters() for x in full(p).detach().reshape(-1).tolist()]}


def accumulation(mesh) -> dict:
    """The cheap ascent by hand over 2 micro-batches (``backward(inputs=sam.ascent_inputs())``, as the runner
    and SAMTrainer do), then ``first_step()``: equals the one-process step, which passes the tensors."""
    reference = make_model("rms")
    model = shard(copy.deepcopy(reference), mesh)
    kwargs = dict(rho=0.5, perturbation="layerwise", lr=0.1, momentum=0.9)
    ref_sam, sam = normsam.SAM(reference, torch.optim.SGD, **kwargs), normsam.SAM(model, torch.optim.SGD, **kwargs)
    for step in range(STEPS):
        x, y = batches(step)
        for net, opt, xs, ys in ((reference, ref_sam, x, y), (model, sam, my_half(x), my_half(y))):
            for xi, yi in zip(xs.chunk(2), ys.chunk(2)):
                loss = F.cross_entropy(net(xi), yi) / 2
                inputs = opt.ascent_inputs()  # after the forward
                loss.backward(inputs=inputs)
            opt.first_step(zero_grad=True)
            for xi, yi in zip(xs.chunk(2), ys.chunk(2)):
                (F.cross_entropy(net(xi), yi) / 2).backward()
            opt.second_step(zero_grad=True)
    return {"diff": max_diff(model, reference), "perturbed_are_plain": all(
        type(t) is nn.Parameter for t in ref_sam.ascent_inputs())}


def mixed_precision(mesh) -> dict:
    """FSDP2's MixedPrecisionPolicy (bf16 compute, fp32 shards and reduction): the cheap ascent, whose inputs
    are the bf16 unsharded parameters, gives the classic ascent's step; both move away from plain AdamW."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    models = {name: shard(make_model("rms"), mesh, mp_policy=policy) for name in ("cheap", "classic", "adamw")}
    sams = {name: normsam.SAM(models[name], torch.optim.AdamW, rho=0.5, lr=1e-2) for name in ("cheap", "classic")}
    adamw = torch.optim.AdamW(models["adamw"].parameters(), lr=1e-2)
    for step in range(STEPS):
        x, y = batches(step)
        x, y = my_half(x), my_half(y)
        for name in ("cheap", "classic"):
            sam_step(models[name], sams[name], x, y, name)
        F.cross_entropy(models["adamw"](x).float(), y).backward()
        adamw.step()
        adamw.zero_grad()
    gap = lambda a, b: max((full(p) - full(q)).abs().max().item()  # noqa: E731
                           for p, q in zip(models[a].parameters(), models[b].parameters()))
    return {"cheap_vs_classic": gap("cheap", "classic"), "sam_vs_adamw": gap("cheap", "adamw"),
            "shard_dtype": str(next(models["cheap"].parameters()).dtype)}


def issue_report(mesh) -> dict:
    """The issue's setup: 6 examples, rho=0.5, SAM-ON with SGD lr=0.1, one cheap step; the weights must move
    away from plain SGD's (they used to equal them to 3e-8) and the classic API must not crash."""
    out = {}
    for ascent in ("cheap", "classic"):
        reference, sgd_model = make_model(), make_model()
        model = shard(make_model(), mesh)
        sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1)
        sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.1)
        ref_sam = normsam.SAM(reference, torch.optim.SGD, rho=0.5, lr=0.1)
        x, y = batches(0)
        x, y = x[:6], y[:6]
        sam_step(model, sam, my_half(x), my_half(y), ascent)
        sam_step(reference, ref_sam, x, y, ascent)
        F.cross_entropy(sgd_model(x), y).backward()
        sgd.step()
        out[ascent] = {"vs_sgd": max_diff(model, sgd_model), "vs_reference": max_diff(model, reference)}
    return out


def cheap_ascent_reduces_only_perturbed(mesh) -> dict:
    """Record what FSDP2 reduce-scatters during the cheap ascent: only the norm layers' gradients."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    model = shard(make_model(), mesh)
    sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1)
    x, y = batches(0)
    reduced: list[int] = []
    original = _fsdp_param_group.foreach_reduce

    def recording(fsdp_params, unsharded_grads, *args, **kwargs):
        reduced.extend(g.numel() for g in unsharded_grads)
        return original(fsdp_params, unsharded_grads, *args, **kwargs)

    _fsdp_param_group.foreach_reduce = recording
    try:
        loss = F.cross_entropy(model(my_half(x)), my_half(y))
        sam.first_step(loss)
        first = list(reduced)
        grads_after_first = [n for n, p in model.named_parameters() if p.grad is not None]
        reduced.clear()
        F.cross_entropy(model(my_half(x)), my_half(y)).backward()
        second = list(reduced)
        sam.second_step(zero_grad=True)
    finally:
        _fsdp_param_group.foreach_reduce = original
    perturbed = sum(p.numel() for p in sam.storage.params)
    return {"first_pass_numel": sum(first), "second_pass_numel": sum(second), "perturbed_numel": perturbed,
            "all_numel": sum(p.numel() for p in model.parameters()), "grads_after_first": grads_after_first}


def memory_and_storage(mesh) -> dict:
    """ε's backup holds local shards only; the plan's data are the parameters' local tensors."""
    model = shard(make_model(), mesh)
    sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1)
    x, y = batches(0)
    originals = [full(p).clone() for p in sam.storage.params]
    sam.first_step(F.cross_entropy(model(my_half(x)), my_half(y)))
    storage = sam.storage
    backup_numel = sum(b.numel() for b in storage.backup)
    local_numel = sum(p.to_local().numel() for p in storage.params)
    same_storage = all(d is p._local_tensor for d, p in zip(storage.data, storage.params))
    perturbed_now = [full(p).clone() for p in storage.params]
    sam.restore()
    restored = [full(p) for p in storage.params]
    return {"backup_numel": backup_numel, "local_numel": local_numel, "global_numel": 62,
            "same_storage": same_storage, "moved": max((a - b).abs().max().item() for a, b in zip(perturbed_now, restored)),
            "restore_exact": all(torch.equal(a, b) for a, b in zip(restored, originals))}


def no_host_sync(mesh) -> dict:
    """A FSDP2 SAM step (after the first, which builds the plan) runs no op that reads a device value."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.test_sam_sync import CountSyncs

    out = {}
    for perturbation in ("sam", "layerwise", "linf"):
        model = shard(make_model(), mesh)
        sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, perturbation=perturbation, lr=0.1)
        seen = []
        for step in range(2):
            x, y = batches(step)
            loss = F.cross_entropy(model(my_half(x)), my_half(y))
            with CountSyncs() as mode:
                sam.first_step(loss, zero_grad=True)
            seen += mode.seen
            F.cross_entropy(model(my_half(x)), my_half(y)).backward()
            with CountSyncs() as mode:
                sam.second_step(zero_grad=True)
            seen += mode.seen
        out[perturbation] = seen
    return out


def nonfinite_guard(mesh) -> dict:
    """An inf in one rank's ascent gradient: no rank perturbs, both count the step."""
    model = shard(make_model(), mesh)
    sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1)
    x, y = batches(0)
    x = my_half(x).clone()
    if dist.get_rank() == 1:
        x[0, 0] = float("inf")
    F.cross_entropy(model(x), my_half(y)).backward()
    before = [full(p).clone() for p in sam.storage.params]
    sam.first_step(zero_grad=True)
    after = [full(p).clone() for p in sam.storage.params]
    sam.restore()
    return {"moved": max((a - b).abs().max().item() for a, b in zip(after, before)),
            "nonfinite": sam.counters["nonfinite_ascent_steps"]}


def running_stats_frozen(mesh) -> dict:
    """bn_policy='freeze' under FSDP2: the second pass leaves the BatchNorm's running statistics alone."""
    model = shard(make_model(bn=True), mesh)
    sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1)
    x, y = batches(0)
    F.cross_entropy(model(my_half(x)), my_half(y)).backward()
    after_first = (model.bn.running_mean.clone(), model.bn.num_batches_tracked.clone())
    sam.first_step(zero_grad=True)
    F.cross_entropy(model(my_half(x)), my_half(y)).backward()
    sam.second_step(zero_grad=True)
    return {"frozen": bool(torch.equal(model.bn.running_mean, after_first[0])
                           and torch.equal(model.bn.num_batches_tracked, after_first[1])),
            "moved_in_first": bool((after_first[0] != 0).any())}


def refusals(mesh) -> dict:
    """Setups SAM refuses on FSDP2 models, each with its message."""
    from torch.distributed.tensor import Replicate, distribute_tensor

    out = {}

    def attempt(name: str, build: Callable[[], object]) -> None:
        try:
            build()
            out[name] = None
        except ValueError as error:
            out[name] = str(error)

    attempt("sync_ascent_false", lambda: normsam.SAM(shard(make_model(), mesh), torch.optim.SGD, rho=0.5, sync_ascent=False))
    attempt("mask_scope", lambda: normsam.SAM(shard(make_model(), mesh), torch.optim.SGD, rho=0.5, scope="random",
                                              sparsity=0.5))
    attempt("no_model", lambda: normsam.SAM(shard(make_model(), mesh).parameters(), torch.optim.SGD, rho=0.5))

    def tensor_parallel():
        model = make_model()
        model.fc1.weight = nn.Parameter(distribute_tensor(model.fc1.weight.detach(), mesh, [Replicate()]))
        return normsam.SAM(model, torch.optim.SGD, rho=0.5, scope="all")

    attempt("tensor_parallel", tensor_parallel)

    def sharded_after_sam():
        model = make_model()
        sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1)
        shard(model, mesh)
        for group in sam.param_groups:  # what accelerate does: the optimizer's tensors swapped for the shards
            group["params"] = [dict(model.named_parameters())[n] for n in group["param_names"]]
        x, y = batches(0)
        sam.first_step(F.cross_entropy(model(my_half(x)), my_half(y)))

    attempt("sharded_after_sam", sharded_after_sam)

    def shards_as_backward_inputs():  # autograd never reaches the shards: no gradient, silently
        model = shard(make_model(), mesh)
        sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1)
        x, y = batches(0)
        F.cross_entropy(model(my_half(x)), my_half(y)).backward(inputs=sam.storage.params)
        sam.first_step()

    attempt("shards_as_backward_inputs", shards_as_backward_inputs)
    return out


CASES: dict[str, Callable] = {}



def register_cases() -> None:
    for norm in ("layer", "rms"):
        for perturbation in normsam.PERTURBATIONS:
            for ascent in ("cheap", "classic"):
                for scope in ("norm", "all"):
                    CASES[f"eq-{norm}-{perturbation}-{ascent}-{scope}"] = (
                        lambda mesh, n=norm, p=perturbation, a=ascent, s=scope: equivalence(
                            mesh, norm=n, perturbation=p, ascent=a, scope=s)
                    )
    for perturbation in ("sam", "layerwise", "fisher"):
        CASES[f"eq-loop-{perturbation}"] = lambda mesh, p=perturbation: equivalence(mesh, perturbation=p,
                                                                                   foreach=False)
    CASES["eq-norm-over-all"] = lambda mesh: equivalence(mesh, perturbation="layerwise", norm_over="all")
    CASES["eq-no-norm"] = lambda mesh: equivalence(mesh, perturbation="asam", scope="no-norm")
    CASES["eq-patterns"] = lambda mesh: equivalence(mesh, perturbation="layerwise", scope=["norm2.*", "head.*"])
    CASES["eq-adamw"] = lambda mesh: equivalence(mesh, perturbation="asam", scope="all", ascent="classic", base="adamw")
    for ascent in ("cheap", "classic"):
        for perturbation in ("sam", "layerwise"):
            CASES[f"mixed-{perturbation}-{ascent}"] = lambda mesh, p=perturbation, a=ascent: equivalence(
                mesh, perturbation=p, ascent=a, scope="all", leave_norms_plain=True)
    for shape in ("hsdp-2x1", "hsdp-1x2"):  # 2 replicas of a 1-rank shard group; 1 replica of 2 shards
        for perturbation in ("sam", "layerwise"):
            CASES[f"{shape}-{perturbation}"] = lambda mesh, p=perturbation, m=shape: equivalence(
                MESHES[m], perturbation=p, scope="all")
        CASES[f"{shape}-mixed"] = lambda mesh, m=shape: equivalence(
            MESHES[m], perturbation="layerwise", scope="all", leave_norms_plain=True)
    for ascent in ("cheap", "classic"):  # steps 0 and 2 fresh, step 1 reuses the stored local ε
        CASES[f"eq-ascent-interval-{ascent}"] = lambda mesh, a=ascent: equivalence(
            mesh, perturbation="layerwise", ascent=a, ascent_interval=2)
    for perturbation in ("sam", "layerwise"):  # Momentum-SAM: the momentum's local shards, global norms
        for scope in ("norm", "all"):
            CASES[f"eq-momentum-{perturbation}-{scope}"] = lambda mesh, p=perturbation, s=scope: equivalence(
                mesh, perturbation=p, ascent="momentum", scope=s)
    CASES["eq-momentum-adamw"] = lambda mesh: equivalence(mesh, perturbation="asam", ascent="momentum", base="adamw")
    CASES["mixed-momentum"] = lambda mesh: equivalence(mesh, perturbation="sam", ascent="momentum", scope="all",
                                                       leave_norms_plain=True)
    variants = {  # SAM's variants (issue 25): their descent rules' global dot products, their states' local shards
        "gsam": dict(variant="gsam", alpha=0.4), "wsam": dict(variant="wsam", gamma=0.8),
        "wsam-coupled": dict(variant="wsam", gamma=0.6, decouple=False),
        "looksam": dict(variant="looksam", ascent_interval=2, alpha=0.7),
        "friendly": dict(variant="friendly-sam", sigma=1.0, lmbda=0.9), "gc": dict(centralize=True),
        "multistep": dict(ascent_steps=2),
    }
    for name, options in variants.items():
        for ascent in ("cheap", "classic"):
            for scope in ("norm", "all"):
                CASES[f"var-{name}-{ascent}-{scope}"] = lambda mesh, o=options, a=ascent, s=scope: equivalence(
                    mesh, perturbation="sam", ascent=a, scope=s, **o)
    CASES["var-gsam-over-all"] = lambda mesh: equivalence(mesh, scope="norm", variant="gsam", descent_over="all")
    CASES["var-gsam-mixed"] = lambda mesh: equivalence(mesh, scope="all", variant="gsam", leave_norms_plain=True)
    CASES["accumulation"] = accumulation
    CASES["mixed_precision"] = mixed_precision
    CASES["issue_report"] = issue_report
    CASES["reduce_scatter"] = cheap_ascent_reduces_only_perturbed
    CASES["storage"] = memory_and_storage
    CASES["no_host_sync"] = no_host_sync
    CASES["nonfinite"] = nonfinite_guard
    CASES["running_stats"] = running_stats_frozen
    CASES["refusals"] = refusals


def main(out_path: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    for name, shape in (("hsdp-2x1", (world, 1)), ("hsdp-1x2", (1, world))):
        MESHES[name] = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
    register_cases()
    results = {}
    for name, case in CASES.items():
        try:
            results[name] = {"ok": True, **case(mesh)}
        except Exception:  # one broken case must not hide the others' results
            results[name] = {"ok": False, "error": traceback.format_exc()}
        dist.barrier()
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
