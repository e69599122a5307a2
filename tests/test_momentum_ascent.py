"""``ascent="momentum"`` (Momentum-SAM): ε from the base optimizer's momentum, no ascent pass.

Checked against the paper's own algorithm (its fused SGD form), against a plain per-tensor loop for every
perturbation model and base optimizer it supports, for resume, fp16/bf16, accumulation, DDP (2 gloo
processes), the HF and Lightning integrations, and the errors that name the fix.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import normsam
from normsam.optim.ascent import MOMENTUM_STATES, register_momentum_state
from normsam.train import checkpoint as ckpt
from normsam.train.config import load_config
from normsam.train.loop import Trainer
from tests.conftest import make_batch, make_cnn
from tests.test_scale import GroupNormNet

TINY = dict(data="synthetic", image_size=8, subset=64, batch_size=32, eval_batch_size=256, epochs=2, threads=1,
            progress=False, device="cpu")
MOMENTUM_RUN = dict(scope="norm", ascent="momentum", bn_policy="update", rho=0.5)


def _loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _sam_steps(model, sam, steps, seed0=0):
    for step in range(steps):
        batch = make_batch(seed=seed0 + step)
        assert not sam.needs_ascent  # never a pass at w
        sam.first_step(zero_grad=True)
        _loss(model, batch).backward()
        sam.second_step(zero_grad=True)


# --- the rule -------------------------------------------------------------------------------------------


def test_sgd_sam_all_is_the_papers_algorithm():
    """SAM-all, ℓ2: the trajectory of the paper's fused MSAM loop (weights kept at w̃ = w − ρ v/‖v‖ between
    steps; Becker et al. 2024, Fig. 1), written out here; normsam restores w instead, at the same points."""
    rho, lr, mu, steps = 0.3, 0.05, 0.9, 6
    model = GroupNormNet().double()
    paper = copy.deepcopy(model)
    sam = normsam.SAM(model, torch.optim.SGD, scope="all", rho=rho, lr=lr, momentum=mu, ascent="momentum")
    params = list(paper.parameters())
    velocity = [torch.zeros_like(p) for p in params]
    norm_v = 0.0
    for step in range(steps):
        batch = make_batch(seed=step)
        grads = torch.autograd.grad(_loss(paper, batch), params)  # at w̃_t
        with torch.no_grad():
            for p, v in zip(params, velocity):
                if norm_v > 0:
                    p.add_(v, alpha=rho / norm_v)  # w_t = w̃_t + ρ v_t/‖v_t‖
            for p, v, g in zip(params, velocity, grads):
                v.mul_(mu).add_(g)
                p.sub_(v, alpha=lr)
            norm_v = float(torch.sqrt(sum((v * v).sum() for v in velocity)))
            for p, v in zip(params, velocity):
                p.sub_(v, alpha=rho / norm_v)  # w̃_{t+1}
        sam.first_step(zero_grad=True)
        _loss(model, batch).backward()
        sam.second_step(zero_grad=True)
    with torch.no_grad():  # the paper's "move back" at the end of training
        for p, v in zip(params, velocity):
            p.add_(v, alpha=rho / norm_v)
    for a, b in zip(model.parameters(), paper.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _reference_epsilon(pert, d, w, scaled, rho, eta):
    """ε of a direction d by the perturbation model's definition (SPEC §1), one tensor at a time."""
    if pert == "sam":
        scales = [torch.ones_like(x) for x in w]
    elif pert == "layerwise":
        scales = [torch.linalg.vector_norm(x) + eta if s else torch.ones_like(x) for x, s in zip(w, scaled)]
    else:  # asam, linf
        scales = [x.abs() + eta if s else torch.ones_like(x) for x, s in zip(w, scaled)]
    if pert == "linf":
        return [rho * t * torch.sign(x) for t, x in zip(scales, d)]
    norm = torch.sqrt(sum(((t * x) ** 2).sum() for t, x in zip(scales, d)))
    return [rho * t * t * x / norm for t, x in zip(scales, d)]


CASES = [  # (base optimizer, its options, where its momentum is, perturbation, foreach)
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=5e-4), "momentum_buffer", "sam", True),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True), "momentum_buffer", "asam", True),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9), "momentum_buffer", "layerwise", True),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9), "momentum_buffer", "linf", False),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9), "momentum_buffer", "asam", False),
    (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1), "exp_avg", "sam", True),
]


@pytest.mark.parametrize("base, options, key, pert, foreach", CASES)
def test_sam_on_equals_a_plain_loop(base, options, key, pert, foreach):
    """SAM-ON (BN and GN γ/β) on a CNN with BatchNorm: ε = ε_model(−momentum), restored exactly, base step."""
    rho, eta = 0.4, 0.01
    model, ref = make_cnn(), make_cnn()
    sam = normsam.SAM(model, base, rho=rho, perturbation=pert, **({} if pert == "sam" else {"eta": eta}), ascent="momentum", foreach=foreach,
                      **options)
    opt = base(ref.parameters(), **options)
    names = ["bn1.weight", "bn1.bias", "gn.weight", "gn.bias"]
    perturbed = [dict(ref.named_parameters())[n] for n in names]
    scaled = [not n.endswith("bias") for n in names]
    for step in range(5):
        batch = make_batch(seed=step)
        momenta = [opt.state[p].get(key) if p in opt.state else None for p in perturbed]
        saved = [p.detach().clone() for p in perturbed]
        if all(m is not None for m in momenta):
            with torch.no_grad():
                for p, e in zip(perturbed, _reference_epsilon(pert, [-m for m in momenta], saved, scaled, rho, eta)):
                    p.add_(e)
        else:
            assert step == 0  # the first step: no momentum yet, a plain step
        _loss(ref, batch).backward()
        with torch.no_grad():
            for p, s in zip(perturbed, saved):
                p.copy_(s)
        opt.step()
        opt.zero_grad()

        sam.first_step(zero_grad=True)
        _loss(model, batch).backward()
        sam.second_step(zero_grad=True)
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
    torch.testing.assert_close(model.bn1.running_mean, ref.bn1.running_mean)  # bn_policy="update": stats at w + ε


def test_lion_perturbs_against_its_exp_avg():
    Lion = pytest.importorskip("timm.optim").Lion
    model = make_cnn()
    sam = normsam.SAM(model, Lion, rho=0.5, lr=1e-3, betas=(0.9, 0.99), ascent="momentum")
    _sam_steps(model, sam, 2)
    w = model.gn.weight.detach().clone()
    m = torch.cat([sam.base_optimizer.state[p]["exp_avg"].reshape(-1) for p in sam.ascent_inputs()])
    sam.first_step()
    expected = -0.5 * sam.base_optimizer.state[model.gn.weight]["exp_avg"] / m.norm()
    torch.testing.assert_close(model.gn.weight.detach() - w, expected, rtol=1e-6, atol=1e-12)
    sam.restore()
    assert torch.equal(model.gn.weight.detach(), w)


def _known_optimizers():
    for entry in MOMENTUM_STATES:
        if isinstance(entry, str):  # "module.QualName", matched by name (timm's Lion)
            module, _, name = entry.rpartition(".")
            try:
                entry = getattr(__import__(module, fromlist=[name]), name)
            except ImportError:
                continue
        yield pytest.param(entry, id=entry.__name__)


@pytest.mark.parametrize("optimizer", list(_known_optimizers()))
def test_every_registered_optimizer_is_perturbed_against_its_momentum(optimizer):
    """The registry drives this test: each entry's state key must exist after a step, and ε = −ρ·v/‖v‖."""
    model = make_cnn()
    options = {"momentum": 0.9} if issubclass(optimizer, torch.optim.SGD) else {}  # SGD's default is 0
    sam = normsam.SAM(model, optimizer, rho=0.5, lr=1e-3, ascent="momentum", **options)
    _sam_steps(model, sam, 2)
    key = sam.ascent_source.key
    momenta = [sam.base_optimizer.state[p][key] for p in sam.ascent_inputs()]
    norm = torch.sqrt(sum(m.square().sum() for m in momenta))
    before = [p.detach().clone() for p in sam.ascent_inputs()]
    sam.first_step()
    for p, w, m in zip(sam.ascent_inputs(), before, momenta):
        torch.testing.assert_close(p.detach() - w, -0.5 * m / norm, rtol=1e-6, atol=1e-12)
    sam.restore()


def test_the_first_step_is_a_plain_step_and_every_step_is_one_pass():
    model, plain = make_cnn(), make_cnn()
    sam = normsam.SAM(model, torch.optim.SGD, rho=2.0, lr=0.1, momentum=0.9, ascent="momentum")
    sgd = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    calls = []

    def closure():
        calls.append(1)
        loss = _loss(model, make_batch())
        loss.backward()
        return loss

    before = _params(model)
    sam.first_step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))  # no momentum: ε = 0
    sam.restore()
    sam.step(closure)
    _loss(plain, make_batch()).backward()
    sgd.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))
    sam.zero_grad()
    sam.step(closure)  # now perturbed along −v: a different step from SGD's
    assert len(calls) == 2 and not sam.needs_ascent
    assert sam.counters["sam_steps"] == 3 and "ascent='momentum'" in repr(sam)


def test_norm_over_all_divides_by_the_whole_momentum():
    model = make_cnn()
    sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9, ascent="momentum", norm_over="all")
    _sam_steps(model, sam, 2)
    state = sam.base_optimizer.state
    total = torch.sqrt(sum(state[p]["momentum_buffer"].square().sum() for p in model.parameters()))
    w, conv = model.bn1.weight.detach().clone(), model.conv1.weight.detach().clone()
    sam.first_step()
    torch.testing.assert_close(model.bn1.weight.detach() - w, -0.5 * state[model.bn1.weight]["momentum_buffer"] / total)
    assert torch.equal(model.conv1.weight, conv)  # in the norm only: the scope is SAM-ON
    sam.restore()


def test_a_random_mask_perturbs_only_its_elements():
    model = make_cnn()
    sam = normsam.SAM(model, torch.optim.SGD, scope="random", sparsity=0.5, rho=0.5, lr=0.1, momentum=0.9,
                      ascent="momentum")
    _sam_steps(model, sam, 2)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    sam.first_step()
    moved = {id(p): p.detach() != before[id(p)] for p in model.parameters()}
    masks = {id(p): m for p, m in zip(sam.ascent_inputs(), sam.masks())}
    assert all(not moved[i].any() for i in moved if i not in masks)
    assert all(not (moved[i] & ~masks[i]).any() for i in masks)  # nothing outside the mask moves
    assert sum(int(moved[i].sum()) for i in masks) > 0.9 * sum(int(m.sum()) for m in masks.values())
    sam.restore()


@pytest.mark.parametrize("scope", ["norm", "all"])
@pytest.mark.parametrize("pert", ["sam", "asam", "layerwise", "linf"])
def test_a_momentum_step_makes_no_host_sync(scope, pert):
    from tests.test_sam_sync import CountSyncs

    model = make_cnn()
    sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, perturbation=pert, lr=0.1, momentum=0.9, scope=scope,
                      ascent="momentum")
    _sam_steps(model, sam, 1)  # SGD's momentum buffers and the plan exist from here on
    with CountSyncs() as mode:
        _sam_steps(model, sam, 2, seed0=1)
    assert mode.seen == []


# --- state, precision, accumulation ------------------------------------------------------------------


def test_resume_from_a_state_dict_is_the_uninterrupted_run(tmp_path):
    kw = dict(rho=0.5, lr=0.05, momentum=0.9, perturbation="asam", ascent="momentum")
    straight = make_cnn()
    sam = normsam.SAM(straight, torch.optim.SGD, **kw)
    _sam_steps(straight, sam, 6)

    first = make_cnn()
    sam_a = normsam.SAM(first, torch.optim.SGD, **kw)
    _sam_steps(first, sam_a, 3)
    torch.save({"model": first.state_dict(), "sam": sam_a.state_dict()}, tmp_path / "ck.pt")
    saved = torch.load(tmp_path / "ck.pt", weights_only=True)
    resumed = make_cnn(seed=5)
    resumed.load_state_dict(saved["model"])
    sam_b = normsam.SAM(resumed, torch.optim.SGD, **kw)
    sam_b.load_state_dict(saved["sam"])
    _sam_steps(resumed, sam_b, 3, seed0=3)
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))
    assert sam_b.counters["sam_steps"] == 6


def test_fp16_scaler_skipping_a_step_restores_w_and_keeps_the_momentum():
    model = make_cnn(dtype=torch.float32)
    sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9, scope="all", ascent="momentum")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    x, y = make_batch(dtype=torch.float32)
    for skip in (False, False, True):
        before = _params(model)
        momenta = [b.clone() for b in (sam.base_optimizer.state[p].get("momentum_buffer") for p in model.parameters())
                   if b is not None]
        sam.first_step(zero_grad=True, grad_scaler=scaler)  # the scaler is not needed: the momentum is unscaled
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        if skip:
            model.head.weight.grad[0, 0] = float("inf")
        sam.restore()
        scaler.step(sam.base_optimizer)
        scaler.update()
        sam.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    after = [sam.base_optimizer.state[p]["momentum_buffer"] for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(after, momenta))
    assert scaler.get_scale() == 2.0**11


def test_accumulated_micro_batches_equal_one_large_batch():
    torch.manual_seed(0)
    big = GroupNormNet().double()
    small = copy.deepcopy(big)
    kw = dict(rho=0.5, lr=0.1, momentum=0.9, scope="norm", perturbation="asam", ascent="momentum")
    sam_big, sam_small = normsam.SAM(big, torch.optim.SGD, **kw), normsam.SAM(small, torch.optim.SGD, **kw)
    for step in range(4):
        x, y = make_batch(seed=step, n=12)
        sam_big.first_step()
        F.cross_entropy(big(x), y).backward()
        sam_big.second_step(zero_grad=True)
        sam_small.first_step()
        for xi, yi in zip(x.chunk(3), y.chunk(3)):
            (F.cross_entropy(small(xi), yi) / 3).backward()
        sam_small.second_step(zero_grad=True)
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


# --- the runner -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("amp, epochs", [("off", 2), ("bf16", 1), ("fp16", 1)])  # (autocast is slow on a CPU)
def test_runner_trains_with_the_momentum_ascent(tmp_path, amp, epochs):
    run = {**TINY, "epochs": epochs, "eval_batch_size": 64}
    cfg = load_config(None, {**run, **MOMENTUM_RUN, "amp": amp, "out": str(tmp_path / "run")})
    assert cfg.method == "norm-sam-rho0.5-momentum"
    trainer = Trainer(cfg)
    calls = []
    trainer.model.register_forward_hook(lambda *_: calls.append(1))
    summary = trainer.run()
    rows = ckpt.read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert summary["epochs"] == epochs and all(r["sam"] and math.isfinite(r["train_loss"]) for r in rows)
    steps = epochs * len(trainer.train_loader)
    assert trainer.sam.ascent == "momentum" and trainer.sam.counters["sam_steps"] == steps
    evaluations = len(calls) - steps  # the rest are the evaluation passes, the same as for SGD
    sgd = Trainer(load_config(None, {**run, "scope": "none", "out": str(tmp_path / "sgd")}))
    sgd_calls = []
    sgd.model.register_forward_hook(lambda *_: sgd_calls.append(1))
    sgd.run()
    assert len(sgd_calls) - steps == evaluations  # one forward per training step, as SGD


def test_runner_accumulation_matches_one_batch(tmp_path):
    base = {**TINY, **MOMENTUM_RUN, "model": "resnet20", "norm": "group", "perturbation": "asam", "rho": 1.0,
            "augment": "none"}
    Trainer(load_config(None, {**base, "out": str(tmp_path / "a")})).run()
    Trainer(load_config(None, {**base, "accumulation": 4, "out": str(tmp_path / "b")})).run()
    a, b = (ckpt.read_jsonl(tmp_path / d / "metrics.jsonl") for d in "ab")
    for ra, rb in zip(a, b):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-4)
        assert rb["test_loss"] == pytest.approx(ra["test_loss"], rel=1e-4)


def test_ddp_equals_one_process_on_the_global_batch(tmp_path):
    """The momentum is built from synchronized gradients, so 2 workers perturb alike, with no ascent to sync."""
    settings = {**TINY, **MOMENTUM_RUN, "model": "resnet8", "norm": "group", "perturbation": "asam", "rho": 2.0}
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [f"{k}={v}" for k, v in settings.items()] + [f"out={tmp_path / 'ddp'}"]
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "normsam", "train", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    Trainer(load_config(None, {**settings, "out": str(tmp_path / "one")})).run()
    ddp, one = (ckpt.read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("ddp", "one"))
    assert len(ddp) == len(one) == 2
    for a, b in zip(ddp, one):
        for key in ("train_loss", "test_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key


# --- errors ---------------------------------------------------------------------------------------------


class NoMomentum(torch.optim.Optimizer):
    def __init__(self, params, lr=0.1):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    state = self.state[p]
                    state["trace"] = state.get("trace", torch.zeros_like(p)).mul_(0.5).add_(p.grad)
                    p.sub_(state["trace"], alpha=group["lr"])


def test_a_base_optimizer_without_momentum_is_refused_with_the_fix():
    model = make_cnn()
    with pytest.raises(ValueError, match=r"SGD has none .*momentum=0.*pass momentum=0.9"):
        normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1, ascent="momentum")
    with pytest.raises(ValueError, match=r"AdamW has none .*betas\[0\] > 0"):
        normsam.SAM(model, torch.optim.AdamW, rho=0.5, lr=0.1, betas=(0.0, 0.99), ascent="momentum")
    with pytest.raises(ValueError, match=r"maximize=True.*Minimize the negated objective"):
        normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9, maximize=True, ascent="momentum")
    with pytest.raises(ValueError, match=r"does not know where NoMomentum keeps one.*register_momentum_state"):
        normsam.SAM(model, NoMomentum, rho=0.5, lr=0.1, ascent="momentum")
    register_momentum_state(NoMomentum, "trace")  # the fix the message names
    try:
        sam = normsam.SAM(model, NoMomentum, lr=0.1, rho=0.5, ascent="momentum")
        _sam_steps(model, sam, 2)
        before = model.bn1.weight.detach().clone()
        sam.first_step()
        assert not torch.equal(model.bn1.weight, before)
        sam.restore()
    finally:
        del MOMENTUM_STATES[NoMomentum]


@pytest.mark.parametrize("options, message", [
    (dict(ascent="nesterov"), r"Invalid ascent: 'nesterov'; use 'gradient' .* or 'momentum'"),
    (dict(ascent_interval=2), r"ascent_interval=2 .* drop ascent_interval"),
    (dict(sync_ascent=True), r"momentum is already the same on every worker: drop sync_ascent"),
    (dict(perturbation="fisher"), r"perturbation='fisher' .* use 'sam', 'asam'"),
    (dict(scope="ssam-d", sparsity=0.5, mask_interval=2, mask_total_steps=10), r"scope='ssam-d' .* use scope='random'"),
    (dict(bn_policy="freeze"), r"BatchNorm's statistics would never move: use bn_policy='update'"),
])
def test_options_that_do_not_fit_are_refused(options, message):
    kw = {"lr": 0.1, "momentum": 0.9, "ascent": "momentum", **options}
    with pytest.raises(ValueError, match=message):
        normsam.SAM(make_cnn(), torch.optim.SGD, **kw)


@pytest.mark.parametrize("overrides, message", [
    (dict(ascent="fast"), r"Invalid ascent: 'fast'; valid values are gradient, momentum"),
    (dict(scope="none"), r"scope=none trains without SAM"),
    (dict(ascent_interval=4), r"ascent_interval=4 reuses a stored ε .* drop ascent_interval"),
    (dict(ascent_fraction=0.5), r"ascent_fraction has nothing to save: drop it"),
    (dict(bn_policy="freeze"), r"use bn_policy='update'"),
    (dict(momentum=0.0), r"momentum=0 keeps none: set momentum=0.9"),
    (dict(sync_ascent=True), r"drop sync_ascent"),
    (dict(perturbation="fisher"), r"perturbation='fisher' .* never computes"),
    (dict(scope="ssam-d", sparsity=0.5, mask_interval=10), r"scope='ssam-d' updates its mask"),
])
def test_the_runner_refuses_settings_that_do_not_fit(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, {**MOMENTUM_RUN, **overrides})


# --- integrations -----------------------------------------------------------------------------------------


def test_hf_trainer_runs_one_pass_per_micro_batch(tmp_path):
    pytest.importorskip("accelerate")
    pytest.importorskip("transformers")
    from tests.test_integration_transformers import TokenData, arguments, flat, llama

    from normsam.integrations.transformers import SAMTrainer

    sam_options = dict(rho=0.5, ascent="momentum")
    models, forwards = {}, {}
    for name, extra in (("accumulated", {}), ("one", dict(per_device_train_batch_size=4, gradient_accumulation_steps=1))):
        model = llama()
        forwards[name] = []
        model.register_forward_hook(lambda *_, calls=forwards[name]: calls.append(1))
        trainer = SAMTrainer(model=model, args=arguments(tmp_path / name, save_strategy="no", **extra),
                             train_dataset=TokenData(), sam=sam_options)
        trainer.train()
        models[name] = model
        assert trainer.sam.counters["sam_steps"] == 4 and not trainer.sam.is_perturbed
        assert trainer.sam.ascent == "momentum"
    assert len(forwards["accumulated"]) == 4 * 2 and len(forwards["one"]) == 4  # one pass per micro-batch
    torch.testing.assert_close(flat(models["accumulated"]), flat(models["one"]), rtol=0, atol=2e-6)


def test_lightning_runs_one_pass_per_step_and_matches_a_plain_loop(tmp_path):
    pytest.importorskip("lightning")
    from tests import test_integration_lightning as lt

    from normsam.integrations.lightning import SAMModule

    def make(model):
        sam = normsam.SAM(model, torch.optim.AdamW, lr=1e-2, rho=0.5, ascent="momentum")
        return sam, torch.optim.lr_scheduler.LambdaLR(sam, lambda step: 1.0 / (1 + step))

    class Net(lt.Net):
        def configure_optimizers(self):
            sam, scheduler = make(self.net)
            return {"optimizer": sam, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    assert issubclass(Net, SAMModule)
    module = Net()
    lt.trainer(tmp_path).fit(module, lt.data())
    assert module.passes == ["single"] * lt.STEPS
    sam = module.optimizers().optimizer
    assert module.trainer.global_step == lt.STEPS and sam.counters["sam_steps"] == lt.STEPS

    ref = lt.net()
    sam_ref, scheduler = make(ref)
    batches = list(lt.data())
    for step in range(lt.STEPS):
        x, y = batches[step % len(batches)]
        sam_ref.first_step()
        F.mse_loss(ref(x), y).backward()
        sam_ref.second_step(zero_grad=True)
        scheduler.step()
    torch.testing.assert_close(lt.flat(module.net), lt.flat(ref), rtol=0, atol=1e-6)


def test_lightning_steps_that_reuse_epsilon_are_single_pass_too(tmp_path):
    """The one-pass route also serves ascent_interval's reuse steps (no wasted ascent pass there)."""
    pytest.importorskip("lightning")
    from tests import test_integration_lightning as lt

    class Net(lt.Net):
        def configure_optimizers(self):
            return normsam.SAM(self.net, torch.optim.AdamW, lr=1e-2, rho=0.5, ascent_interval=2)

    module = Net()
    lt.trainer(tmp_path).fit(module, lt.data())
    assert module.passes == ["ascent", "second", "single"] * (lt.STEPS // 2)
    sam = module.optimizers().optimizer
    assert sam.counters["sam_steps"] == lt.STEPS and sam.counters["ascent_steps"] == lt.STEPS // 2


def test_lightning_accumulation_runs_every_micro_batch_at_w_plus_epsilon(tmp_path):
    pytest.importorskip("lightning")
    from tests import test_integration_lightning as lt

    def make(model):
        return normsam.SAM(model, torch.optim.SGD, lr=0.05, momentum=0.9, rho=0.5, ascent="momentum")

    class Net(lt.Net):
        def configure_optimizers(self):
            return make(self.net)

    module = Net()
    lt.trainer(tmp_path, max_steps=4, accumulate_grad_batches=2).fit(module, lt.data())
    assert module.passes == [None, "single"] * 4  # the first micro-batch outside optimizer_step, the last inside
    sam = module.optimizers().optimizer
    assert sam.counters["sam_steps"] == 4 and not sam.is_perturbed

    ref = lt.net()
    sam_ref = make(ref)
    batches = list(lt.data())
    for step in range(4):
        sam_ref.first_step()
        for x, y in batches[2 * (step % 2): 2 * (step % 2) + 2]:
            (F.mse_loss(ref(x), y) / 2).backward()
        sam_ref.second_step(zero_grad=True)
    torch.testing.assert_close(lt.flat(module.net), lt.flat(ref), rtol=0, atol=1e-6)

    class Overrides(Net):
        def on_train_batch_start(self, batch, batch_idx):  # forgets super(): refused, not silently wrong
            return None

    with pytest.raises(ValueError, match=r"call super\(\)\.on_train_batch_start"):
        lt.trainer(tmp_path / "b", max_steps=1, accumulate_grad_batches=2).fit(Overrides(), lt.data())


def test_hf_trainer_steps_that_reuse_epsilon_are_single_pass_too(tmp_path):
    pytest.importorskip("accelerate")
    pytest.importorskip("transformers")
    from tests.test_integration_transformers import TokenData, arguments, llama

    from normsam.integrations.transformers import SAMTrainer

    model = llama()
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    trainer = SAMTrainer(model=model, args=arguments(tmp_path, save_strategy="no"), train_dataset=TokenData(),
                         sam=dict(rho=0.5, ascent_interval=2))
    trainer.train()
    assert trainer.sam.counters["sam_steps"] == 4 and trainer.sam.counters["ascent_steps"] == 2
    assert len(forwards) == 2 * (2 + 2) + 2 * 2  # fresh steps: 2 micro-batches twice; reuse steps: once
