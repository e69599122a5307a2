"""bn_policy="freeze": the preallocated foreach copy leaves the same bits as the reference snapshot."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from torch import nn

import normsam
from normsam.optim.running_stats import RunningStatsFreezer, RunningStatsSnapshot, running_stat_modules


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
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = self.bn_act(self.bn_cumulative(self.bn(self.conv(x))))
        x = self.sync_eval(self.sync(self.instance(x)))
        return self.head(x.mean(dim=(2, 3)))


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
    sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    sam._running_stats = freezer_cls(running_stat_modules(model))
    for step in range(steps):
        x, y = _batch(step)
        sam.first_step(F.cross_entropy(model(x), y))
        x2 = x.clone()
        if step in overflow_at:
            x2[0, 0, 0, 0] = float("inf")
        F.cross_entropy(model(x2), y).backward()
        for p in model.parameters():  # the base step must not turn an overflow into NaN weights
            if p.grad is not None:
                p.grad.nan_to_num_(0.0, 0.0, 0.0)
        sam.second_step(zero_grad=True)
    return model


@pytest.mark.parametrize("overflow_at", [(), (1, 2)])
def test_freeze_is_bit_identical_to_the_reference_snapshot(overflow_at):
    fast = _train(_zoo(), RunningStatsFreezer, 4, overflow_at)
    reference = _train(_zoo(), RunningStatsSnapshot, 4, overflow_at)
    for (name, a), b in zip(fast.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
        if a.is_floating_point():
            assert torch.isfinite(a).all(), name  # an overflow at w + ε never reaches the statistics
    assert fast.bn.num_batches_tracked.item() == 4
    assert fast.bn_cumulative.num_batches_tracked.item() == 4


def test_freeze_leaves_the_statistics_of_one_forward_pass():
    """Against no SAM at all: the second pass leaves no trace, even when it overflows."""
    model, plain = _zoo(), _zoo()
    freezer = RunningStatsFreezer(running_stat_modules(model))
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


def test_restore_without_save_says_what_to_do():
    freezer = RunningStatsFreezer(running_stat_modules(_zoo()))
    with pytest.raises(ValueError, match=r"restore\(\) without save\(\): call save\(\) first"):
        freezer.restore()


def test_frozen_running_stats_context_manager():
    model = _zoo()
    before = copy.deepcopy(model.state_dict())
    with normsam.frozen_running_stats(model):
        model(_batch(3)[0])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.values()))
