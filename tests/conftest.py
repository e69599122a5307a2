"""Shared fixtures: small deterministic models and batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

# Tiny models gain nothing from threads, and OpenMP spinning makes them slow on a busy 2-core machine.
torch.set_num_threads(1)


class SmallCNN(nn.Module):
    """Conv+BN, conv (no bias)+GroupNorm, linear head: weights, biases, BN γ/β and GN γ/β."""

    def __init__(self, channels: int = 4, classes: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(2, channels)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.gn(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


def make_cnn(seed: int = 0, dtype: torch.dtype = torch.float64) -> SmallCNN:
    torch.manual_seed(seed)
    model = SmallCNN().to(dtype)
    with torch.no_grad():  # non-trivial γ/β so that |w| differs between elements
        for m in (model.bn1, model.gn):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    return model


def make_batch(seed: int = 1, n: int = 8, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


@pytest.fixture
def cnn() -> SmallCNN:
    return make_cnn()


@pytest.fixture
def batch():
    return make_batch()
