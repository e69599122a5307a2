"""bn_policy="freeze": the buffer swap and the preallocated foreach copy leave the same bits as the reference
snapshot."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from torch import nn

import normsam
from normsam.optim.running_stats import (
    RunningStatsFreezer,
    RunningStatsSnapshot,
    RunningStatsSwap,
    running_stat_modules,
)


class StatsZoo(nn.Module):
    """Every kind of running-statistics module: BatchNorm (EMA and cumulative), timm's BatchNormAct2d,
    InstanceNorm with tracked statistics, SyncBatchNorm (outside DDP) and one in eval mode."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.bn_cumulative = nn.BatchNorm2d(4, momentum=None)
        self.bn_act = BatchNormAct2d(4)
        self.instance = nn.InstanceNorm2d(4, affine=True, track_running_stats=True)
        self.sync = nn.SyncBatchNorm(4)
        self.sync_eval = nn.SyncBatchNorm(4)
        self.custom = CustomRunningMean(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = self.bn_act(self.bn_cumulative(self.bn(self.conv(x))))
        x = self.custom(self.sync_eval(self.sync(self.instance(x))))
        return self.head(x.mean(dim=(2, 3)))


class CustomRunningMean(nn.Module):
    """Not a ``_NormBase``: a layer of its own that keeps a running mean (the swap's copy fallback)."""

    def __init__(self, channels):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(channels))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.running_mean.mul_(0.9).add_(0.1 * x.mean(dim=(0, 2, 3)))
        return x - self.running_mean.view(1, -1, 1, 1)


def _zoo(seed=0):
    torch.manual_seed(seed)
    model = StatsZoo()
    model.train()
    model.sync_eval.eval()
    with torch.no_grad():
        model.sync_eval.running_mean.uniform_(-1, 1)
    return model


def _batch(seed, n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 5, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _train(model, freezer_cls, steps, overflow_at=()):
    """SAM-ON steps; at the steps in ``overflow_at`` the second pass sees an input that overflows."""
    # bn_policy="update" leaves the statistics to the freezer under test, used as SAM's freeze policy uses its own:
    # saved once the weights are perturbed, restored with them, before the base step
    sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9, bn_policy="update")
    freezer = freezer_cls(running_stat_modules(model))
    for step in range(steps):
        x, y = _batch(step)
        sam.first_step(F.cross_entropy(model(x), y))
        freezer.save()
        x2 = x.clone()
        if step in overflow_at:
            x2[0, 0, 0, 0] = float("inf")
        F.cross_entropy(model(x2), y).backward()
        for p in model.parameters():  # the base step must not turn an overflow into NaN weights
            if p.grad is not None:
                p.grad.nan_to_num_(0.0, 0.0, 0.0)
        sam.restore()
        freezer.restore()
        sam.base_optimizer.step()
        sam.zero_grad()
    return model


@pytest.mark.parametrize("freezer_cls", [RunningStatsSwap, RunningStatsFreezer])
@pytest.mark.parametrize("overflow_at", [(), (1, 2)])
def test_freeze_is_bit_identical_to_the_reference_snapshot(freezer_cls, overflow_at):
    fast = _train(_zoo(), freezer_cls, 4, overflow_at)
    reference = _train(_zoo(), RunningStatsSnapshot, 4, overflow_at)
    for (name, a), b in zip(fast.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
        if a.is_floating_point():
            assert torch.isfinite(a).all(), name  # an overflow at w + ε never reaches the statistics
    assert fast.bn.num_batches_tracked.item() == 4
    assert fast.bn_cumulative.num_batches_tracked.item() == 4


@pytest.mark.parametrize("freezer_cls", [RunningStatsSwap, RunningStatsFreezer])
def test_freeze_leaves_the_statistics_of_one_forward_pass(freezer_cls):
    """Against no SAM at all: the second pass leaves no trace, even when it overflows."""
    model, plain = _zoo(), _zoo()
    freezer = freezer_cls(running_stat_modules(model))
    x, _ = _batch(0)
    model(x)
    plain(x)
    freezer.save()
    model(torch.full_like(x, float("inf")))
    freezer.restore()
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_copy_is_allocated_once_and_follows_model_to():
    model = _zoo()
    freezer = RunningStatsFreezer(running_stat_modules(model))
    freezer.save()
    copies = list(freezer._copies)
    freezer.restore()
    freezer.save()
    assert all(a is b for a, b in zip(freezer._copies, copies))  # no new tensors per step
    freezer.restore()
    model.double()  # replaces the buffers: the copy follows
    before = copy.deepcopy(model.state_dict())
    freezer.save()
    model(_batch(0)[0].double())
    freezer.restore()
    assert freezer._copies[0].dtype == torch.float64
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.values()))


@pytest.mark.parametrize("freezer_cls", [RunningStatsSwap, RunningStatsFreezer])
def test_restore_without_save_says_what_to_do(freezer_cls):
    freezer = freezer_cls(running_stat_modules(_zoo()))
    with pytest.raises(ValueError, match=r"restore\(\) without save\(\): call save\(\) first"):
        freezer.restore()


def test_sam_freezes_by_swapping_without_copying_norm_statistics():
    """SAM's default freeze touches no BatchNorm buffer data: no copy kernel for them in save or restore, and
    the model holds its very own tensors again afterwards (the custom layer alone is copied)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CopyCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.copied = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.copy_, torch.ops.aten._foreach_copy_, torch.ops.aten.clone):
                self.copied.append(args[0])
            return func(*args, **(kwargs or {}))

    model = _zoo()
    assert normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1).bn_policy == "freeze"  # what SAM then uses:
    swap = RunningStatsSwap(running_stat_modules(model))
    real = {name: b for name, b in model.named_buffers()}
    swap.save()  # the first save makes the scratch tensors
    swap.restore()
    with CopyCounter() as counter:
        swap.save()
        assert model.bn.running_mean is not real["bn.running_mean"]  # the pass writes the scratch
        assert model.sync_eval.running_mean is real["sync_eval.running_mean"]  # eval mode: read, left alone
        swap.restore()
    assert len(counter.copied) == 2  # the fallback's save and restore of the custom layer: one foreach each
    assert all(b is real[name] for name, b in model.named_buffers())


def test_frozen_running_stats_context_manager():
    model = _zoo()
    before = copy.deepcopy(model.state_dict())
    with normsam.frozen_running_stats(model):
        model(_batch(3)[0])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.values()))


def test_swap_follows_model_to_and_load_state_dict():
    model = _zoo()
    swap = RunningStatsSwap(running_stat_modules(model))
    swap.save()
    swap.restore()
    model.double()  # new buffer tensors: the swap must put these back, not the float ones
    before = copy.deepcopy(model.state_dict())
    swap.save()
    model(_batch(0)[0].double())
    swap.restore()
    assert model.bn.running_mean.dtype == torch.float64
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.values()))
