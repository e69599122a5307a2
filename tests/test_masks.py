"""Element-mask scopes: exact sparsity, refresh behaviour, masked elements stay put."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import normsam
from normsam.optim import masks as masklib
from tests.conftest import make_batch, make_cnn


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


def _step(sam, model, batch):
    x, y = batch
    sam.first_step(F.cross_entropy(model(x), y), zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    sam.second_step(zero_grad=True)


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99])
def test_random_mask_has_exact_sparsity_and_stays_fixed(sparsity):
    model = make_cnn()
    sam = normsam.SAM(model, torch.optim.SGD, scope="random", sparsity=sparsity, rho=0.5, lr=0.1)
    keep = round((1 - sparsity) * _n_params(model))
    masks = [m.clone() for m in sam.masks()]
    assert sum(int(m.sum()) for m in masks) == keep
    for i in range(3):
        _step(sam, model, make_batch(i))
    assert all(torch.equal(a, b) for a, b in zip(masks, sam.masks()))


def test_masked_elements_are_not_perturbed():
    model = make_cnn()
    sam = normsam.SAM(model, torch.optim.SGD, scope="random", sparsity=0.9, rho=1.0, lr=0.1, perturbation="linf")
    before = [p.detach().clone() for p in model.parameters()]
    x, y = make_batch()
    sam.first_step(F.cross_entropy(model(x), y))
    moved = [(p.detach() != b) for p, b in zip(model.parameters(), before)]
    for m, mv in zip(sam.masks(), moved):
        assert not (mv & ~m).any()
    assert sum(int(mv.sum()) for mv in moved) > 0
    sam.restore()


def test_mask_seed_makes_masks_reproducible():
    a = normsam.SAM(make_cnn(), torch.optim.SGD, rho=0.5, scope="random", sparsity=0.5, lr=0.1, mask_seed=7)
    b = normsam.SAM(make_cnn(), torch.optim.SGD, rho=0.5, scope="random", sparsity=0.5, lr=0.1, mask_seed=7)
    c = normsam.SAM(make_cnn(), torch.optim.SGD, rho=0.5, scope="random", sparsity=0.5, lr=0.1, mask_seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a.masks(), b.masks()))
    assert not all(torch.equal(x, y) for x, y in zip(a.masks(), c.masks()))


def test_ssam_f_mask_is_the_top_k_of_the_empirical_fisher():
    model = make_cnn()
    sam = normsam.SAM(model, torch.optim.SGD, scope="ssam-f", sparsity=0.8, rho=0.5, lr=0.1)
    with pytest.raises(ValueError, match="no Fisher mask yet"):
        x, y = make_batch()
        sam.first_step(F.cross_entropy(model(x), y))
    assert not sam.is_perturbed
    batches = [make_batch(20 + i, n=1) for i in range(6)]
    stats_before = [b.clone() for b in model.buffers()]
    sam.refresh_masks(batches)
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), stats_before))

    fisher = [torch.zeros_like(p) for p in model.parameters()]
    for x, y in batches:
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
        for f, g in zip(fisher, grads):
            f += g**2
    flat = torch.cat([f.reshape(-1) for f in fisher])
    keep = round(0.2 * flat.numel())
    threshold = torch.topk(flat, keep).values.min()
    chosen = torch.cat([m.reshape(-1) for m in sam.masks()])
    assert int(chosen.sum()) == keep
    assert (flat[chosen] >= threshold - 1e-12).all()
    assert (flat[~chosen] <= threshold + 1e-12).all()
    _step(sam, model, make_batch())


def test_refresh_masks_is_only_for_ssam_f():
    sam = normsam.SAM(make_cnn(), torch.optim.SGD, rho=0.5, scope="random", sparsity=0.5, lr=0.1)
    with pytest.raises(ValueError, match="refresh_masks\\(\\) is for scope='ssam-f'"):
        sam.refresh_masks([make_batch()])
    sam = normsam.SAM(make_cnn(), torch.optim.SGD, rho=0.5, scope="ssam-f", sparsity=0.5, lr=0.1)
    with pytest.raises(ValueError, match="got no batches"):
        sam.refresh_masks([])


def test_ssam_d_updates_every_interval_and_keeps_the_count():
    model = make_cnn()
    sam = normsam.SAM(
        model, torch.optim.SGD, scope="ssam-d", sparsity=0.7, mask_interval=2, mask_total_steps=8, rho=0.5, lr=0.1
    )
    keep = round(0.3 * _n_params(model))
    history = [torch.cat([m.reshape(-1) for m in sam.masks()])]
    for i in range(8):
        _step(sam, model, make_batch(i))
        history.append(torch.cat([m.reshape(-1) for m in sam.masks()]))
    assert all(int(h.sum()) == keep for h in history)
    changed = [not torch.equal(a, b) for a, b in zip(history, history[1:])]
    assert changed == [False, True, False, True, False, True, False, False]  # the cosine rate is 0 at step 8
    assert sam.counters["mask_updates"] == 4


def test_drop_and_regrow_drops_the_smallest_gradients():
    masks = [torch.tensor([True, True, True, False, False, False])]
    grads = [torch.tensor([0.1, 5.0, 3.0, 9.0, 9.0, 9.0])]
    new = masklib.drop_and_regrow(masks, grads, 1, torch.Generator().manual_seed(0))[0]
    assert not new[0] and new[1] and new[2] and int(new.sum()) == 3


def test_cosine_drop_rate():
    assert masklib.cosine_drop_rate(0.5, 0, 10) == pytest.approx(0.5)
    assert masklib.cosine_drop_rate(0.5, 5, 10) == pytest.approx(0.25)
    assert masklib.cosine_drop_rate(0.5, 10, 10) == pytest.approx(0.0)
    assert masklib.cosine_drop_rate(0.5, 20, 10) == pytest.approx(0.0)
    assert masklib.cosine_drop_rate(0.5, 2, 10) == pytest.approx(0.25 * (1 + math.cos(math.pi * 0.2)))
