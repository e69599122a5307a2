"""A SAM step never waits for the device: no op that copies a device value to the host runs inside it.

The check runs on the CPU with a ``TorchDispatchMode`` that counts the ATen ops behind every host sync
(``.item()``, ``float(t)``, ``bool(t)``, ``if t:``, ``torch.equal``, data-dependent shapes). On a GPU the
same ops are what blocks the host until the device catches up.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import normsam
from tests.conftest import make_batch, make_cnn

SYNC_OPS = {
    torch.ops.aten._local_scalar_dense,
    torch.ops.aten.nonzero,
    torch.ops.aten.masked_select,
    torch.ops.aten.is_nonzero,
    torch.ops.aten.equal,
}


def _bool_indexing(func, args) -> bool:
    """``t[mask]`` and ``t[mask] = v``: the result's size depends on the mask, so the host reads it."""
    if func.overloadpacket not in (torch.ops.aten.index, torch.ops.aten.index_put, torch.ops.aten.index_put_):
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))


class CountSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in SYNC_OPS or _bool_indexing(func, args):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def _loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


SCOPES = {
    "norm": dict(scope="norm"),
    "all": dict(scope="all"),
    "no-norm": dict(scope="no-norm"),
    "predicate": dict(scope=lambda info: info.name.startswith("bn1.")),
    "patterns": dict(scope=["gn.*", "head.bias"]),
    "random": dict(scope="random", sparsity=0.7),
}


def test_the_counter_sees_every_kind_of_sync():
    """Guard against a vacuous test: each host read is caught."""
    t = torch.tensor([1.0, 2.0])
    for read in (lambda: t.sum().item(), lambda: float(t[0]), lambda: bool(t[0] > 0), lambda: torch.equal(t, t),
                 lambda: t[t > 1], lambda: t.nonzero(), lambda: t.masked_select(t > 1)):
        with CountSyncs() as mode:
            read()
        assert mode.seen, read


@pytest.mark.parametrize("scope", list(SCOPES))
@pytest.mark.parametrize("pert", list(normsam.PERTURBATIONS))
@pytest.mark.parametrize("ascent", ["cheap", "classic"])
def test_a_sam_step_makes_no_host_sync(scope, pert, ascent):
    model = make_cnn()
    sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, perturbation=pert, lr=0.1, momentum=0.9, **SCOPES[scope])
    batch = make_batch()
    for step in range(2):  # the second step runs with the built plan and SGD's momentum buffers
        loss = _loss(model, batch)
        if ascent == "classic":
            loss.backward()
        with CountSyncs() as mode:
            sam.first_step(loss if ascent == "cheap" else None, zero_grad=True)
        _loss(model, batch).backward()
        with mode:
            sam.second_step(zero_grad=True)
        assert mode.seen == [], (step, mode.seen)
    assert sam.counters["sam_steps"] == 2


@pytest.mark.parametrize("foreach", [True, False])
def test_step_with_a_closure_and_restore_make_no_host_sync(foreach):
    model = make_cnn()
    sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, perturbation="asam", scope="all", lr=0.1, foreach=foreach)
    batch = make_batch()

    def closure():
        loss = _loss(model, batch)
        loss.backward()
        return loss

    with CountSyncs() as mode:
        for _ in range(2):
            sam.step(closure)
            sam.zero_grad()
        sam.first_step(_loss(model, batch))
        sam.restore()
    assert mode.seen == []


@pytest.mark.parametrize("norm_over", ["perturbed", "all"])
def test_grad_scaler_and_a_nonfinite_gradient_make_no_host_sync(norm_over):
    model = make_cnn(dtype=torch.float32)
    sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, perturbation="fisher", norm_over=norm_over, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    batch = make_batch(dtype=torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(_loss(model, batch)).backward()
    model.bn1.weight.grad[0] = float("nan")
    with CountSyncs() as mode:
        sam.first_step(zero_grad=True, grad_scaler=scaler)
    assert mode.seen == []
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))  # no perturbation this step
    sam.restore()
    assert sam.counters["nonfinite_ascent_steps"] == 1  # reading the count is where the host waits
    with CountSyncs() as mode:
        sam.first_step(scaler.scale(_loss(model, batch)), grad_scaler=scaler)
        sam.restore()
    assert mode.seen == []
    assert sam.counters["nonfinite_ascent_steps"] == 1


def test_ascent_interval_reuse_steps_make_no_host_sync():
    model = make_cnn()
    sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1, ascent_interval=3)
    batch = make_batch()
    with CountSyncs() as mode:
        for _ in range(4):
            sam.first_step(_loss(model, batch) if sam.needs_ascent else None)
            _loss(model, batch).backward()
            sam.second_step(zero_grad=True)
    assert mode.seen == []
