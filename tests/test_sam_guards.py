"""Issue 16, class 4: SAM's state is never left wrong (perturbed weights, lost plans, silent no-op steps)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normsam
from tests.conftest import make_batch, make_cnn


def _loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _assert_unchanged(model, before):
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_load_state_dict_while_perturbed_is_refused_and_the_step_still_completes():
    model = make_cnn()
    sam = normsam.SAM(model, torch.optim.SGD, lr=0.1, rho=0.5)
    saved = sam.state_dict()
    sam.first_step(_loss(model, make_batch()))
    with pytest.raises(ValueError, match=r"load_state_dict\(\) while the weights are perturbed.*second_step\(\)"):
        sam.load_state_dict(saved)
    _loss(model, make_batch()).backward()
    sam.second_step()
    assert not sam.is_perturbed


@pytest.mark.parametrize("failing_call", [1, 2])
def test_an_exception_in_the_closure_restores_the_weights(failing_call):
    model = make_cnn()
    before = _weights(model)
    sam = normsam.SAM(model, torch.optim.SGD, lr=0.1, rho=0.5)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == failing_call:
            raise RuntimeError("out of memory in the second pass")
        loss = _loss(model, make_batch())
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="out of memory"):
        sam.step(closure)
    assert not sam.is_perturbed
    _assert_unchanged(model, before)  # neither w + ε nor a half step


def test_an_exception_in_the_second_pass_after_the_cheap_ascent_restores_the_weights():
    model = make_cnn()
    before = _weights(model)
    sam = normsam.SAM(model, torch.optim.SGD, lr=0.1, rho=0.5)
    sam.first_step(_loss(model, make_batch()))

    def closure():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sam.step(closure)
    assert not sam.is_perturbed
    _assert_unchanged(model, before)


def test_add_param_group_follows_the_scope():
    model = make_cnn()
    sam = normsam.SAM(model, torch.optim.SGD, lr=0.1, rho=0.5)  # scope="norm"
    model.head2 = nn.Linear(3, 3).double()
    model.norm2 = nn.LayerNorm(3).double()
    sam.add_param_group({"params": [*model.head2.parameters(), *model.norm2.parameters()], "lr": 0.01})
    perturbed = {id(p) for p in sam.ascent_inputs()}
    assert not any(id(p) in perturbed for p in model.head2.parameters())  # a new head is not perturbed
    assert all(id(p) in perturbed for p in model.norm2.parameters())  # a new norm layer is
    assert all(g["lr"] == 0.01 for g in sam.param_groups[-2:])
    assert "norm2.weight" in sam.param_groups[-2]["param_names"]

    stranger = nn.Linear(3, 3).double()
    with pytest.raises(ValueError, match=r"not parameters of the model .* add the new layer to the model first"):
        sam.add_param_group({"params": stranger.parameters()})
    masked = normsam.SAM(make_cnn(), torch.optim.SGD, rho=0.5, lr=0.1, scope="random", sparsity=0.5)
    with pytest.raises(ValueError, match="element masks were drawn"):
        masked.add_param_group({"params": [nn.Parameter(torch.ones(2, dtype=torch.float64))], "perturb": True})


@pytest.mark.parametrize("way", ["first_step", "closure"])
def test_a_step_without_an_ascent_gradient_is_an_error_not_a_counted_sam_step(way):
    model = make_cnn()
    before = _weights(model)
    sam = normsam.SAM(model, torch.optim.SGD, lr=0.1, rho=0.5)
    with pytest.raises(ValueError, match=r"none of the 4 perturbed tensors has an ascent gradient.*backward\(\)"):
        if way == "first_step":
            sam.first_step()
        else:
            sam.step(lambda: _loss(model, make_batch()))  # forgets backward()
    assert sam.counters["sam_steps"] == 0 and not sam.is_perturbed
    _assert_unchanged(model, before)


@pytest.mark.parametrize("rho", ["0.7", b"0.7", True])
def test_a_rho_that_is_not_a_number_is_refused(rho):
    model = make_cnn()
    with pytest.raises(ValueError, match="rho must be a number"):
        normsam.SAM([{"params": [model.bn1.weight], "rho": rho}], torch.optim.SGD, rho=0.5, lr=0.1)
    with pytest.raises(ValueError, match="rho must be a number"):
        normsam.SAM(model, torch.optim.SGD, lr=0.1, rho=rho)
    sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1)
    with pytest.raises(ValueError, match="rho must be a number"):
        sam.add_param_group({"params": [nn.Parameter(torch.ones(2))], "rho": rho, "perturb": True,
                             "param_names": ["extra"]})


def test_a_closure_that_returns_no_loss_is_refused_not_taken_as_a_skip():
    """torch.optim.SGD trains with a closure that forgets ``return loss``; SAM would silently never step (issue
    26). (Lightning's own skip, a training_step returning None, reaches SAM through normsam's mixin.)"""
    model = make_cnn()
    before = _weights(model)
    sam = normsam.SAM(model, torch.optim.SGD, lr=0.1, rho=0.5)

    def forgets_to_return():
        _loss(model, make_batch()).backward()

    with pytest.raises(ValueError, match=r"the closure returned None\. It must compute the loss, call "
                                         r"loss\.backward\(\) and return the loss"):
        sam.step(forgets_to_return)
    assert sam.counters["sam_steps"] == 0 and not sam.is_perturbed
    _assert_unchanged(model, before)


def test_a_loop_of_its_own_can_guard_its_two_passes():
    model = make_cnn()
    before = _weights(model)
    sam = normsam.SAM(model, torch.optim.SGD, lr=0.1, rho=0.5)
    with pytest.raises(RuntimeError, match="second pass"), sam.restore_on_error():
        sam.first_step(_loss(model, make_batch()))
        raise RuntimeError("second pass")
    assert not sam.is_perturbed
    _assert_unchanged(model, before)


def test_the_runner_leaves_no_perturbed_weights_after_an_error_in_the_second_pass(tmp_path, monkeypatch):
    from normsam.train import data as D
    from normsam.train.loop import Trainer
    from tests.test_runner import _cfg

    monkeypatch.setattr(D.readers, "SYSTEM_SEARCH_DIRS", {"fashion-mnist": (), "mnist": ()})
    trainer = Trainer(_cfg(tmp_path, epochs=1))
    before = _weights(trainer.model)
    original = trainer._accumulate

    def failing(x, y, *, ascent):
        if not ascent:
            raise RuntimeError("out of memory")
        return original(x, y, ascent=ascent)

    monkeypatch.setattr(trainer, "_accumulate", failing)
    x, y = next(iter(trainer.train_loader))
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.train_step(x, y, use_sam=True)
    assert not trainer.sam.is_perturbed
    _assert_unchanged(trainer.model, before)
