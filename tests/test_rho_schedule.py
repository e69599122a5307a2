"""ρ schedules (issue 24): the warm-up's values step by step, callables, resume, DDP and the runner key."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import normsam
from normsam.optim.rho_schedules import RhoLambda, RhoWarmup, as_rho_schedule
from normsam.train import checkpoint as ckpt
from normsam.train.config import load_config
from normsam.train.identity import config_fingerprint
from normsam.train.loop import Trainer
from tests.conftest import make_batch, make_cnn
from tests.test_runner import TINY, _cfg, _metrics, _without_timing, interrupt_after_one_epoch_and_resume
from tests.test_scale import DDP_ARGS, _torchrun


def _sam(model, **options):
    return normsam.SAM(model, torch.optim.SGD, lr=0.1, momentum=0.9, rho=1.0, **options)


def _perturbation_norms(sam, model, steps: int, first: int = 0) -> list[float]:
    """‖ε‖ of each of ``steps`` SAM steps (perturbation='sam': ‖ε‖ = ρ in effect), measured on the weights;
    the batches of steps ``first``, ``first + 1``, …"""
    norms = []
    for step in range(first, first + steps):
        x, y = make_batch(seed=step)
        before = [p.detach().clone() for p in sam.ascent_inputs()]
        sam.first_step(F.cross_entropy(model(x), y))
        shift = [p.detach() - b for p, b in zip(sam.ascent_inputs(), before)]
        norms.append(float(torch.linalg.vector_norm(torch.cat([s.reshape(-1) for s in shift]))))
        F.cross_entropy(model(x), y).backward()
        sam.second_step(zero_grad=True)
    return norms


def test_the_warmup_rises_linearly_then_holds_and_each_step_uses_it():
    model = make_cnn()
    sam = _sam(model, rho_schedule=RhoWarmup(4))
    assert "rho=0.25" in repr(sam) and "RhoWarmup(steps=4)" in repr(sam)  # the first step's ρ, before it runs
    norms = _perturbation_norms(sam, model, 6)
    assert norms == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0], rel=1e-9)
    assert all(g["rho"] == 1.0 and g["initial_rho"] == 1.0 for g in sam.param_groups)


def test_a_callable_is_a_factor_of_each_groups_own_rho():
    model = make_cnn()
    groups = normsam.param_groups(model, "norm", rho=2.0)
    for g in groups:
        if g["perturb"]:
            g["rho"] = 4.0 if "gn.weight" in g["param_names"] else 2.0
    sam = normsam.SAM(groups, torch.optim.SGD, rho=0.5, model=model, lr=0.1, rho_schedule=lambda t: 0.5 ** t)
    assert isinstance(sam.rho_schedule, RhoLambda)
    x, y = make_batch()
    for t in range(3):
        sam.first_step(F.cross_entropy(model(x), y))
        assert sorted({g["rho"] for g in sam.param_groups if g["perturb"]}) == pytest.approx(
            sorted({b * 0.5 ** t for b in (g["initial_rho"] for g in sam.param_groups if g["perturb"])}))
        F.cross_entropy(model(x), y).backward()
        sam.second_step(zero_grad=True)


def test_without_a_schedule_the_groups_rho_is_used_as_set():
    model = make_cnn()
    sam = _sam(model)
    assert all("initial_rho" not in g for g in sam.param_groups)
    for g in sam.param_groups:
        g["rho"] = 0.3
    assert _perturbation_norms(sam, model, 1) == pytest.approx([0.3], rel=1e-9)
    assert "rho=0.3" in repr(sam)


@pytest.mark.parametrize(("schedule", "message"), [
    (RhoLambda(lambda t: -1.0), r"gave rho=-1\.0 at SAM step 0; it must give a finite number >= 0"),
    (RhoLambda(lambda t: math.nan), r"gave rho=nan"),
    (RhoLambda(lambda t: "x"), r"RhoLambda\(<lambda>\) gave the factor 'x' at SAM step 0; it must return a number"),
])
def test_a_schedule_that_gives_a_bad_rho_is_refused_naming_the_step(schedule, message):
    with pytest.raises(ValueError, match=message):
        _sam(make_cnn(), rho_schedule=schedule)


@pytest.mark.parametrize(("value", "message"), [
    (0, r"Invalid RhoWarmup steps: 0; it must be an int >= 1"),
    (2.5, r"Invalid RhoWarmup steps: 2\.5"),
    (True, r"Invalid RhoWarmup steps: True"),
])
def test_bad_warmup_lengths_are_refused(value, message):
    with pytest.raises(ValueError, match=message):
        RhoWarmup(value)


def test_a_schedule_that_is_not_one_is_refused():
    with pytest.raises(ValueError, match=r"Invalid rho_schedule: 3; pass normsam.RhoWarmup\(steps\)"):
        as_rho_schedule(3)


def test_resume_mid_warmup_continues_the_schedule_exactly():
    straight_model = make_cnn()
    straight = _sam(straight_model, rho_schedule=RhoWarmup(6))
    expected = _perturbation_norms(straight, straight_model, 5)

    model = make_cnn()
    first = _sam(model, rho_schedule=RhoWarmup(6))
    got = _perturbation_norms(first, model, 2)
    state = first.state_dict()
    resumed = _sam(model, rho_schedule=RhoWarmup(6))
    assert resumed.param_groups[0]["rho"] == pytest.approx(1 / 6)  # before loading: step 0
    resumed.load_state_dict(state)
    assert "rho=0.5" in repr(resumed)  # (2 + 1) / 6: the third step's ρ
    got += _perturbation_norms(resumed, model, 3, first=2)
    assert got == pytest.approx(expected, rel=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), straight_model.parameters()))


def test_describe_shows_the_rho_in_effect_and_the_step_it_was_set_for():
    model = make_cnn()
    sam = _sam(model, rho_schedule=RhoWarmup(4))
    _perturbation_norms(sam, model, 2)
    assert "rho=0.5 (set by RhoWarmup(steps=4) for SAM step 1, counted from 0)" in sam.describe()


# --- the runner -------------------------------------------------------------------------------------------


def test_runner_records_the_rho_of_each_epoch_and_warms_up_from_a_late_sam_start(tmp_path):
    # 64 images, batch 32: 2 steps per epoch; rho_warmup_epochs=2 is 4 SAM steps, from epoch 1 (sam_start=1)
    cfg = _cfg(tmp_path, scope="norm", rho=2.0, epochs=4, sam_start=1, rho_warmup_epochs=2)
    summary = Trainer(cfg).run()
    rows = _metrics(cfg.out)
    assert [r["sam"] for r in rows] == [False, True, True, True]
    assert [r["rho"] for r in rows] == pytest.approx([0.0, 1.0, 2.0, 2.0])  # (t + 1)/4 · 2 at t = 1, 3, 5
    assert summary["sam_steps"] == 6
    assert cfg.method == "norm-sam-rho2-rhowarmup2"


def test_runner_resume_mid_warmup_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    extra = dict(scope="norm", perturbation="asam", rho=2.0, epochs=3, rho_warmup_epochs=2.5)
    Trainer(_cfg(tmp_path / "a", **extra)).run()
    interrupt_after_one_epoch_and_resume(_cfg(tmp_path / "b", **extra), monkeypatch)
    a, b = (_without_timing(_metrics(tmp_path / d / "run")) for d in ("a", "b"))
    assert a == b and [r["rho"] for r in a] == pytest.approx([0.8, 1.6, 2.0])  # 5 warm-up steps of 2 per epoch


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(rho_warmup_epochs=-1), r"rho_warmup_epochs must be >= 0 and finite, got -1"),
    (dict(scope="none", rho_warmup_epochs=2), r"rho_warmup_epochs=2 warms up SAM's rho, and scope=none trains "
                                              r"without SAM: drop rho_warmup_epochs"),
])
def test_runner_refuses_a_warmup_that_cannot_apply(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, {**TINY, **overrides})


def test_runs_from_before_the_key_keep_their_fingerprint():
    cfg = load_config(None, TINY)
    assert config_fingerprint(cfg) == config_fingerprint(load_config(None, {**TINY, "rho_warmup_epochs": 0}))
    assert config_fingerprint(cfg) != config_fingerprint(load_config(None, {**TINY, "rho_warmup_epochs": 1}))


def test_ddp_warms_up_in_step_on_every_worker_and_equals_one_process(tmp_path):
    warm = ["rho_warmup_epochs=1.5", "sync_ascent=true"]
    done = _torchrun([*DDP_ARGS, *warm, f"out={tmp_path / 'ddp'}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    single = load_config(None, {**TINY, "model": "resnet20", "norm": "group", "scope": "norm", "perturbation": "asam",
                                "rho": 2.0, "rho_warmup_epochs": 1.5, "out": str(tmp_path / "one")})
    Trainer(single).run()
    ddp, one = (ckpt.read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("ddp", "one"))
    assert [r["rho"] for r in ddp] == [r["rho"] for r in one] == pytest.approx([4 / 3, 2.0])  # 3 steps of warm-up
    for a, b in zip(ddp, one):
        for key in ("train_loss", "train_loss_perturbed", "test_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
