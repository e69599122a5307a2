"""Fast SAM-ON modes beyond the paper: ``ascent_interval`` (reuse ε) and ``ascent_fraction`` (sub-batch ascent)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import normsam
from normsam.train.config import load_config
from normsam.train.loop import Trainer
from tests.conftest import make_batch, make_cnn
from tests.test_runner import _cfg, _metrics, _without_timing, interrupt_after_one_epoch_and_resume


def _loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _norm_params(model):
    return [model.bn1.weight, model.bn1.bias, model.gn.weight, model.gn.bias]


def _step(sam, model, batch):
    """One runner-style step; returns the ε that was applied."""
    before = [p.detach().clone() for p in _norm_params(model)]
    sam.first_step(_loss(model, batch) if sam.needs_ascent else None, zero_grad=True)
    eps = [p.detach() - b for p, b in zip(_norm_params(model), before)]
    _loss(model, batch).backward()
    sam.second_step(zero_grad=True)
    return eps


def test_ascent_interval_reuses_the_last_epsilon_between_fresh_ascents():
    model = make_cnn()
    sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1, ascent_interval=3)
    fresh, applied = [], []
    for i in range(7):
        fresh.append(sam.needs_ascent)
        applied.append(_step(sam, model, make_batch(10 + i)))
    assert fresh == [True, False, False, True, False, False, True]
    assert sam.counters["sam_steps"] == 7 and sam.counters["ascent_steps"] == 3
    for i in (1, 2, 4, 5):  # the same ε at other weights (floating-point: w + ε - w ≈ ε)
        for a, b in zip(applied[i], applied[i - 1]):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert not torch.allclose(applied[3][0], applied[2][0])  # a fresh ascent changes ε


def test_ascent_interval_one_is_the_default_and_always_ascends():
    model = make_cnn()
    sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1)
    assert sam.ascent_interval == 1
    for i in range(3):
        assert sam.needs_ascent
        _step(sam, model, make_batch(i))
    assert sam.state_dict()["sam"]["epsilon"] is None  # nothing kept between steps


def test_a_reuse_step_refuses_a_loss_and_the_closure_runs_once():
    model = make_cnn()
    sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1, ascent_interval=3)
    batch = make_batch()
    calls = []

    def closure():
        calls.append(1)
        loss = _loss(model, batch)
        loss.backward()
        return loss

    sam.step(closure)
    sam.zero_grad()
    assert len(calls) == 2
    sam.step(closure)  # a reuse step: one pass, at w + ε
    sam.zero_grad()
    assert len(calls) == 3
    with pytest.raises(ValueError, match=r"this step reuses the last ε \(ascent_interval=3\), so this step takes "
                                         r"no ascent pass and the loss would be ignored\. Check sam\.needs_ascent"):
        sam.first_step(torch.tensor(1.0))  # a reuse step: a loss would be ignored, so it is refused
    assert not sam.is_perturbed
    sam.first_step()
    sam.restore()
    with pytest.raises(ValueError, match="needs the loss tensor"):  # fresh again: the loss is looked at
        sam.first_step(torch.tensor(1.0))


def test_ascent_interval_resumes_exactly_from_a_state_dict_in_mid_cycle():
    kw = dict(rho=0.5, lr=0.05, momentum=0.9, perturbation="asam", ascent_interval=3)
    model_a = make_cnn()
    sam_a = normsam.SAM(model_a, torch.optim.SGD, **kw)
    batches = [make_batch(20 + i) for i in range(8)]
    for batch in batches[:4]:  # the 4th step was fresh: the next two reuse its ε
        _step(sam_a, model_a, batch)
    state = copy.deepcopy(sam_a.state_dict())
    assert state["sam"]["epsilon"] and not sam_a.needs_ascent
    model_b = copy.deepcopy(model_a)
    sam_b = normsam.SAM(model_b, torch.optim.SGD, **kw)
    sam_b.load_state_dict(state)
    assert not sam_b.needs_ascent
    for batch in batches[4:]:
        _step(sam_a, model_a, batch)
        _step(sam_b, model_b, batch)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


def test_ascent_fraction_through_the_api_is_the_sub_batch_loss():
    model_a, model_b = make_cnn(), make_cnn()
    sam_a = normsam.SAM(model_a, torch.optim.SGD, rho=0.5, lr=0.1)
    sam_b = normsam.SAM(model_b, torch.optim.SGD, rho=0.5, lr=0.1)
    x, y = make_batch(n=8)
    sam_a.first_step(F.cross_entropy(model_a(x[:3]), y[:3]))
    F.cross_entropy(model_b(x[:3]), y[:3]).backward()
    sam_b.first_step()
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_errors_name_the_fix():
    model = make_cnn()
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=r"Invalid ascent_interval: .*it must be an int >= 1"):
            normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1, ascent_interval=bad)
    with pytest.raises(ValueError, match=r"ascent_interval must be >= 1, got 0"):
        load_config(None, {"ascent_interval": 0})
    for bad in (0, 1.5, -0.5):
        with pytest.raises(ValueError, match=r"ascent_fraction must lie in \(0, 1\]"):
            load_config(None, {"ascent_fraction": bad})


def test_method_labels_keep_fast_modes_apart_and_defaults_stable():
    assert load_config(None, {"scope": "norm", "perturbation": "asam", "rho": 2}).method == "norm-asam-rho2"
    cfg = load_config(None, {"ascent_interval": 4, "ascent_fraction": 0.25})
    assert cfg.method == "norm-sam-rho0.5-ascent4-frac0.25"


# --- the runner ----------------------------------------------------------------------------------------


def test_runner_skips_the_first_pass_on_reuse_steps_and_ascends_on_a_sub_batch(tmp_path):
    trainer = Trainer(_cfg(tmp_path, scope="norm", ascent_interval=2, ascent_fraction=0.25, epochs=1))
    sizes = []
    trainer.forward_model.register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))
    x, y = next(iter(trainer.train_loader))
    for _ in range(3):
        trainer.train_step(x, y, use_sam=True)
    assert sizes == [8, 32, 32, 8, 32]  # fresh: ⌈0.25·32⌉ then 32; reuse: 32 only


def test_runner_resume_is_exact_with_both_fast_modes(tmp_path, monkeypatch):
    extra = dict(scope="norm", perturbation="asam", rho=2.0, epochs=3, ascent_interval=3, ascent_fraction=0.5)
    Trainer(_cfg(tmp_path / "a", **extra)).run()  # 2 steps per epoch: reuse cycles cross the epochs
    interrupt_after_one_epoch_and_resume(_cfg(tmp_path / "b", **extra), monkeypatch)
    assert _without_timing(_metrics(tmp_path / "a" / "run")) == _without_timing(_metrics(tmp_path / "b" / "run"))
    a = torch.load(tmp_path / "a" / "run" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "run" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["optimizer"]["sam"]["counters"]["ascent_steps"] == 2  # steps 0 and 3 of 6
