"""normsam.sharpness.measure_sharpness: exact values on losses linear in the weights, the APGD schedule and
its two conventions, the perturbation sets, restoration of the model, scopes, logit normalization and argument
errors."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from normsam.sharpness import SharpnessResult, apgd_checkpoints, apgd_halves_step, measure_sharpness
from normsam.sharpness.measure import _Eval, _Geometry, _worst_case
from tests.conftest import make_batch, make_cnn


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run faster and more reproducibly on one thread (the CI machine is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sum_loss(outputs, labels):
    return outputs.sum()


def linear_setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(5, 3, bias=False).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    grad = x.sum(dim=0).expand(3, 5)  # ∂/∂W of Σ W x over the batch, the same for every row
    return model, [(x, y)], grad


def loss_at(model, delta, batch, loss_fn=nn.functional.cross_entropy):
    """Loss of an eval-mode copy of ``model`` at w + δ (δ by parameter name; missing names: 0)."""
    ref = copy.deepcopy(model).eval()
    params = {n: p.detach() + delta.get(n, 0) for n, p in ref.named_parameters()}
    with torch.no_grad():
        return float(loss_fn(functional_call(ref, params, (batch[0],)), batch[1]))


def snapshot(model):
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grad": {n: p.grad for n, p in model.named_parameters()},
    }


def assert_unchanged(model, before):
    after = snapshot(model)
    for key in ("params", "buffers"):
        assert before[key].keys() == after[key].keys()
        for name, value in before[key].items():
            assert torch.equal(value, after[key][name]), f"{key} {name} changed"
            assert value.dtype == after[key][name].dtype
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert all(g is None for g in after["grad"].values()), "measure_sharpness left .grad on the model"


# ---------------------------------------------------------------------------------------------- schedule


def test_checkpoints_for_20_steps_by_hand():
    # p = 0, .22, .41, .57, .70, .80, .87, .93, .99 (then 1.05 > 1); ⌈20 p⌉ = 0, 5, 9, 12, 14, 16, 18, 19, 20.
    # 0 and 20 (the end of the run) are dropped.
    assert apgd_checkpoints(20) == [5, 9, 12, 14, 16, 18, 19]
    # ⌈5 p⌉ = 0, 2, 3, 3, 4, 4, 5, 5, 5: distinct values strictly inside the run.
    assert apgd_checkpoints(5) == [2, 3, 4]
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(1) == []


@settings(max_examples=50, deadline=None)
@given(st.integers(min_value=1, max_value=2000))
def test_checkpoints_are_increasing_and_inside_the_run(steps):
    points = apgd_checkpoints(steps)
    assert points == sorted(set(points))
    assert all(0 < p < steps for p in points)
    if steps >= 5:
        assert points[0] == math.ceil(0.22 * steps - 1e-9)


def test_reference_checkpoints_by_hand():
    # The reference code checks at 0-based loop index ⌈20 p⌉ in float arithmetic (0.7 · 20 → 14.000000000000002
    # → 15), i.e. after update index + 1, and stops its list at the first value >= 20.
    assert apgd_checkpoints(20, convention="reference") == [6, 10, 13, 16, 17, 19, 20]
    # ⌈10 p⌉ = 3, 5, 6, 8, 8: the list stops at the repeated 8.
    assert apgd_checkpoints(10, convention="reference") == [4, 6, 7, 9]
    assert apgd_checkpoints(1, convention="reference") == []
    with pytest.raises(ValueError, match=r"Unknown convention 'paper'; valid conventions are 'apgd', 'reference'"):
        apgd_checkpoints(20, convention="paper")


@pytest.mark.parametrize(
    ("progress", "span", "reduced_last", "best", "best_at_check", "halve"),
    [
        (3, 4, True, 2.0, 2.0, False),  # halved last time, enough progress: no new best is no reason to halve
        (3, 4, False, 2.0, 2.0, True),  # same step size as last time and no new best
        (3, 4, False, 2.5, 2.0, False),  # a new best
        (2, 4, True, 2.5, 2.0, True),  # fewer than 75% of the updates made progress
        (3, 5, False, 2.5, 2.0, True),  # 3 < 0.75 · 5
    ],
)
def test_checkpoint_rule(progress, span, reduced_last, best, best_at_check, halve):
    decision = apgd_halves_step(
        progress=progress, span=span, reduced_last=reduced_last, best_loss=best, best_at_last_check=best_at_check
    )
    assert decision is halve


class ScriptedObjective:
    """Stands in for the model: the k-th evaluation returns ``losses[k]`` (the first, at δ = None, is the
    clean loss) and the gradient ``grads[k]`` of a single weight w = 1; records every δ it is asked about."""

    def __init__(self, losses, grads=None):
        self.origin = [torch.ones(1, dtype=torch.float64)]
        self.losses = losses
        self.grads = grads or [1.0] * len(losses)
        self.deltas = []

    def __call__(self, inputs, labels, delta, *, grad):
        k = len(self.deltas)
        self.deltas.append(None if delta is None else float(delta[0]))
        g = [torch.full((1,), self.grads[k], dtype=torch.float64)] if grad else None
        return _Eval(self.losses[k], 0.0, g)


def run_scripted(objective, *, steps, checkpoints, eta0, convention="apgd"):
    geometry = _Geometry(objective.origin, 1.0, "linf", adaptive=False)
    return _worst_case(
        objective, geometry, None, None, steps=steps, eta0=eta0, rand_init=False,
        generator=torch.Generator(), checkpoints=checkpoints, convention=convention,
    )


def test_a_halving_with_enough_progress_after_it_is_not_repeated_for_lack_of_a_new_best():
    # Updates 1–5 make one increase (stalled: halve at 5 and restart from the best, 2.0). Updates 6–9 rise
    # 3 times in 4 (enough) without passing 2.0. The step size changed at the last checkpoint, so APGD's
    # second condition ("neither η nor the best loss changed") does not hold: no second halving at 9.
    losses = [1.0, 1.0, 2.0, 1.5, 1.4, 1.3, 1.2, 1.1, 1.2, 1.3, 1.4, 1.0]
    out = run_scripted(ScriptedObjective(losses), steps=10, checkpoints=[5, 9], eta0=0.4)
    assert out["restarts"] == 1
    assert out["final_step_size"] == pytest.approx(0.2)
    assert out["perturbed_loss"] == 2.0


@pytest.mark.parametrize(("convention", "restarts"), [("apgd", 0), ("reference", 1)])
def test_reference_counts_progress_on_the_best_loss(convention, restarts):
    # After the best (2.0) the loss rises at every update but stays below it: progress for APGD (4 increases
    # in 5 updates), none for the reference code (1 new best in its span of 4).
    losses = [0.0, 0.0, 2.0, 1.0, 1.5, 1.8, 1.9, 1.0]
    out = run_scripted(ScriptedObjective(losses), steps=6, checkpoints=[5], eta0=0.4, convention=convention)
    assert out["restarts"] == restarts


@pytest.mark.parametrize(
    ("convention", "iterates", "best"),
    [
        # z = δ + η sign(g), clipped to |δ| ≤ 1. APGD: δ₁ = z₁, then δ + ¾(z − δ) + ¼(δ − δ_prev); the restart
        # at 3 goes back to δ₁ = 0.5 with η = 0.25 and no momentum: 0.5 + ¾ · 0.25 = 0.6875.
        ("apgd", [0.5, 1.0, 0.75, 0.6875], 0.5),
        # Reference: ¾ z + ¼ δ_prev throughout, so δ₁ = 0.375. The restart at 3 only takes the best point's
        # gradient (+1); δ₃ = 0.2109375 and δ₂ = 0.65625 carry on: ¾ (0.2109375 + 0.25) + ¼ · 0.65625.
        ("reference", [0.375, 0.65625, 0.2109375, 0.509765625], 0.375),
    ],
)
def test_momentum_first_iterate_and_restart_of_each_convention(convention, iterates, best):
    objective = ScriptedObjective(losses=[0.0, 0.0, 1.0, 0.5, 0.4, 0.3], grads=[0, 1, 1, -1, -1, 1])
    out = run_scripted(objective, steps=4, checkpoints=[3], eta0=0.5, convention=convention)
    assert out["restarts"] == 1
    assert objective.deltas[:2] == [None, 0.0]  # the clean pass, then the start δ = 0
    assert objective.deltas[2:] == iterates
    assert out["perturbed_loss"] == 1.0 and float(out["delta"][0]) == best


# ------------------------------------------------------------------------------------------ exact values


@pytest.mark.parametrize(
    ("norm", "adaptive", "expected"),
    [
        ("linf", True, lambda w, g, rho: rho * (w.abs() * g.abs()).sum()),
        ("linf", False, lambda w, g, rho: rho * g.abs().sum()),
        ("l2", True, lambda w, g, rho: rho * (w.abs() * g).norm()),
        ("l2", False, lambda w, g, rho: rho * g.norm()),
    ],
)
def test_linear_loss_gives_the_exact_maximum(norm, adaptive, expected):
    model, batches, grad = linear_setup()
    rho = 0.1
    result = measure_sharpness(
        model, batches, rho=rho, norm=norm, adaptive=adaptive, loss_fn=sum_loss, steps=10
    )
    exact = float(expected(model.weight.detach(), grad, rho))
    assert exact > 0.1
    assert result.sharpness == pytest.approx(exact, abs=1e-6)
    assert result.worst_loss - result.clean_loss == pytest.approx(exact, abs=1e-6)
    assert result.max_rel_perturbation == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize(("norm", "adaptive"), [("linf", True), ("linf", False), ("l2", True), ("l2", False)])
def test_one_reference_step_is_taken_at_three_quarters_of_rho(norm, adaptive):
    # On a linear loss the first step reaches the boundary (step 2ρ, clipped to ρ); the reference code's
    # momentum then keeps ¾ of it, so its 1-step sharpness is exactly ¾ of the maximum APGD finds.
    model, batches, _ = linear_setup()
    kwargs = dict(rho=0.1, norm=norm, adaptive=adaptive, loss_fn=sum_loss, steps=1)
    apgd = measure_sharpness(model, batches, **kwargs)
    reference = measure_sharpness(model, batches, convention="reference", **kwargs)
    assert apgd.max_rel_perturbation == pytest.approx(1.0, abs=1e-9)
    assert reference.max_rel_perturbation == pytest.approx(0.75, abs=1e-9)
    assert reference.sharpness == pytest.approx(0.75 * apgd.sharpness, rel=1e-9)
    assert reference.convention == "reference" and reference.to_dict()["convention"] == "reference"
    assert apgd.convention == "apgd"


def test_conventions_differ_at_one_step_and_agree_at_twenty():
    model, batch = make_cnn(), make_batch(n=16)
    one = [measure_sharpness(model, [batch], rho=0.05, steps=1, convention=c) for c in ("apgd", "reference")]
    assert one[0].sharpness > 1.2 * one[1].sharpness > 0
    twenty = [measure_sharpness(model, [batch], rho=0.05, steps=20, convention=c) for c in ("apgd", "reference")]
    assert twenty[1].sharpness == pytest.approx(twenty[0].sharpness, rel=0.01)
    assert twenty[1].sharpness > one[1].sharpness


def test_average_case_of_a_quadratic_loss_matches_its_expectation():
    # L(W) = ½ ‖W x − y‖² for one input x with y = W x: E[L(W + δ)] − L(W) = ½ E‖δ x‖² = ½ ρ² Σ_jk w_jk² x_k²
    # for δ ~ N(0, ρ² w²).
    torch.manual_seed(0)
    model = nn.Linear(6, 2, bias=False).double()
    x = torch.randn(1, 6, dtype=torch.float64)
    y = model(x).detach()
    rho = 0.3
    result = measure_sharpness(
        model,
        [(x, y)],
        rho=rho,
        kind="average",
        steps=4000,
        loss_fn=lambda out, target: 0.5 * (out - target).pow(2).sum(),
    )
    assert result.clean_loss == 0.0
    assert math.isnan(result.error_sharpness)  # float targets: no error rate
    exact = float(0.5 * rho**2 * (model.weight.detach() ** 2 * x**2).sum())
    assert result.sharpness == pytest.approx(exact, rel=0.1)


def test_rho_zero_gives_zero():
    model, batch = make_cnn(), make_batch()
    result = measure_sharpness(model, [batch], rho=0.0, return_perturbations=True)
    assert result.sharpness == 0.0
    assert result.error_sharpness == 0.0
    assert result.max_rel_perturbation == 0.0
    assert result.worst_loss == result.clean_loss
    assert result.clean_loss == pytest.approx(loss_at(model, {}, batch), abs=1e-12)
    assert all(torch.count_nonzero(d) == 0 for d in result.perturbations[0].values())


def test_adaptive_sharpness_is_invariant_to_relu_rescaling():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    scaled = copy.deepcopy(net)
    with torch.no_grad():  # multiply layer 1 by 4 and divide layer 2 by 4: the same function
        scaled[0].weight.mul_(4)
        scaled[0].bias.mul_(4)
        scaled[2].weight.div_(4)
    batch = (torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,)))
    a = measure_sharpness(net, [batch], rho=0.05)
    b = measure_sharpness(scaled, [batch], rho=0.05)
    assert a.sharpness > 0
    assert b.sharpness == pytest.approx(a.sharpness, rel=1e-9, abs=1e-12)


# ------------------------------------------------------------------------------------- perturbation sets


@pytest.mark.parametrize(("norm", "adaptive"), [("linf", True), ("linf", False), ("l2", True), ("l2", False)])
@pytest.mark.parametrize("rand_init", [False, True])
def test_every_perturbation_stays_in_its_set(norm, adaptive, rand_init):
    model, batch = make_cnn(), make_batch()
    rho = 0.05
    result = measure_sharpness(
        model,
        [batch, make_batch(seed=2)],
        rho=rho,
        norm=norm,
        adaptive=adaptive,
        steps=8,
        rand_init=rand_init,
        return_perturbations=True,
    )
    assert result.max_rel_perturbation <= 1 + 1e-12
    params = dict(model.named_parameters())
    assert len(result.perturbations) == 2
    for delta in result.perturbations:
        assert delta.keys() == params.keys()
        scale = {n: params[n].detach().abs() if adaptive else torch.ones_like(params[n]) for n in delta}
        if norm == "linf":
            for name, d in delta.items():
                assert torch.all(d.abs() <= rho * scale[name] * (1 + 1e-12)), name
        else:
            rel = torch.cat([torch.where(scale[n] > 0, d / scale[n], 0).flatten() for n, d in delta.items()])
            assert float(rel.norm()) <= rho * (1 + 1e-12)
    for row, delta in zip(result.per_batch, result.perturbations):  # the reported loss is the loss at δ
        b = batch if row["batch"] == 0 else make_batch(seed=2)
        assert loss_at(model, delta, b) == pytest.approx(row["perturbed_loss"], abs=1e-10)


def test_apgd_beats_random_points_of_the_box():
    model, batch = make_cnn(), make_batch()
    rho = 0.05
    result = measure_sharpness(model, [batch], rho=rho, steps=20)
    g = torch.Generator().manual_seed(123)
    params = dict(model.named_parameters())
    clean = loss_at(model, {}, batch)
    best_random = -math.inf
    for _ in range(100):
        delta = {
            n: (2 * torch.rand(p.shape, generator=g, dtype=p.dtype) - 1) * rho * p.detach().abs()
            for n, p in params.items()
        }
        best_random = max(best_random, loss_at(model, delta, batch) - clean)
    assert result.sharpness >= best_random
    assert result.sharpness > 0


def test_worst_case_is_at_least_the_average_case():
    model, batch = make_cnn(), make_batch()
    worst = measure_sharpness(model, [batch], rho=0.05, steps=10)
    average = measure_sharpness(model, [batch], rho=0.05, kind="average", steps=30)
    assert worst.sharpness >= average.sharpness
    assert worst.clean_loss == pytest.approx(average.clean_loss, abs=1e-12)


def test_rand_init_is_reproducible_from_the_seed():
    model, batch = make_cnn(), make_batch()
    a = measure_sharpness(model, [batch], rho=0.05, steps=4, rand_init=True, seed=7)
    b = measure_sharpness(model, [batch], rho=0.05, steps=4, rand_init=True, seed=7)
    c = measure_sharpness(model, [batch], rho=0.05, steps=4, rand_init=True, seed=8)
    assert a.to_dict() == b.to_dict()
    assert a.sharpness != c.sharpness


# ------------------------------------------------------------------------------------------ restoration


def test_model_is_restored_exactly():
    model, batch = make_cnn(), make_batch()
    model.train()
    model.gn.eval()  # a mixed state: every module's own flag must come back
    model.head.bias.requires_grad_(False)
    before = snapshot(model)
    result = measure_sharpness(
        model, [batch, make_batch(seed=3)], rho=0.1, steps=6, scope="all", return_perturbations=True
    )
    assert result.sharpness > 0
    assert_unchanged(model, before)
    assert model.bn1.num_batches_tracked.item() == 0
    assert "head.bias" not in result.perturbations[0]  # frozen parameters are outside every scope


def test_model_is_restored_when_loss_fn_raises_midway():
    model, batch = make_cnn(), make_batch()
    model.train()
    before = snapshot(model)
    calls = {"n": 0}

    def flaky_loss(outputs, labels):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("boom")
        return nn.functional.cross_entropy(outputs, labels)

    with pytest.raises(RuntimeError, match="boom"):
        measure_sharpness(model, [batch], rho=0.1, steps=10, loss_fn=flaky_loss)
    assert calls["n"] == 5
    assert_unchanged(model, before)


def test_scope_norm_perturbs_only_norm_parameters():
    model, batch = make_cnn(), make_batch()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []  # (module name, {parameter name: value at the forward pass})

    def recorder(name):
        def hook(module, args):
            seen.append((name, {f"{name}.{k}": p.detach().clone() for k, p in module.named_parameters()}))

        return hook

    hooks = [m.register_forward_pre_hook(recorder(n)) for n, m in model.named_children()]
    try:
        result = measure_sharpness(model, [batch], rho=0.1, steps=5, scope="norm", return_perturbations=True)
    finally:
        for h in hooks:
            h.remove()
    norm_params = {"bn1.weight", "bn1.bias", "gn.weight", "gn.bias"}
    assert set(result.perturbations[0]) == norm_params
    assert result.scope == "norm"
    assert result.sharpness > 0
    assert len(seen) == 5 * 7  # 5 layers × (clean pass, start, 5 steps)
    changed = set()
    for _, values in seen:
        for name, value in values.items():
            if not torch.equal(value, original[name]):
                changed.add(name)
    assert changed == norm_params  # the other layers always ran with their own weights


def test_scope_no_norm_and_patterns():
    model, batch = make_cnn(), make_batch()
    no_norm = measure_sharpness(model, [batch], rho=0.05, steps=3, scope="no-norm", return_perturbations=True)
    assert not any(n.startswith(("bn1", "gn")) for n in no_norm.perturbations[0])
    head = measure_sharpness(model, [batch], rho=0.05, steps=3, scope=["head.*"], return_perturbations=True)
    assert set(head.perturbations[0]) == {"head.weight", "head.bias"}
    assert head.scope == ["head.*"]


# ----------------------------------------------------------------------------------- options and output


def test_logit_normalization_changes_the_value_and_stays_finite():
    model, batch = make_cnn(), make_batch()
    plain = measure_sharpness(model, [batch], rho=0.05, steps=5)
    normalized = measure_sharpness(model, [batch], rho=0.05, steps=5, logit_normalize=True)
    assert math.isfinite(normalized.sharpness) and math.isfinite(normalized.clean_loss)
    assert normalized.sharpness >= 0
    assert normalized.sharpness != pytest.approx(plain.sharpness, rel=1e-3)
    assert normalized.logit_normalize and not plain.logit_normalize
    # centred unit-norm logits z of 3 classes have |z_i| ≤ √(2/3), and log 3 ≤ logsumexp(z) ≤ log 3 + max z,
    # so the cross-entropy logsumexp(z) − z_y lies in [log 3 − √(2/3), log 3 + 2√(2/3)]
    bound = math.sqrt(2 / 3) + 1e-9
    for loss in (normalized.clean_loss, normalized.worst_loss):
        assert math.log(3) - bound <= loss <= math.log(3) + 2 * bound


def test_result_fields_and_json():
    model = make_cnn()
    batches = [make_batch(seed=s) for s in (1, 2, 3)]
    result = measure_sharpness(model, batches, rho=0.05, steps=3, norm="l2", adaptive=False)
    assert isinstance(result, SharpnessResult)
    assert len(result.per_batch) == 3
    assert result.sharpness == pytest.approx(sum(r["sharpness"] for r in result.per_batch) / 3)
    assert result.clean_loss == pytest.approx(sum(r["clean_loss"] for r in result.per_batch) / 3)
    assert -1 <= result.error_sharpness <= 1
    assert result.perturbations is None
    d = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert d["rho"] == 0.05 and d["norm"] == "l2" and d["adaptive"] is False and d["kind"] == "worst"
    assert d["steps"] == 3 and d["scope"] == "all" and d["per_batch"][0]["size"] == 8


def test_error_sharpness_is_nan_when_outputs_are_not_class_scores():
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)
    result = measure_sharpness(model, [(x, y)], rho=0.1, steps=3, loss_fn=nn.functional.mse_loss)
    assert result.sharpness > 0
    assert math.isnan(result.error_sharpness)
    d = result.to_dict()
    assert d["error_sharpness"] is None and d["per_batch"][0]["clean_error"] is None
    json.dumps(d, allow_nan=False)


def test_progress_bar(capsys):
    model, batch = make_cnn(), make_batch()
    measure_sharpness(model, [batch], rho=0.05, steps=1, progress=True)
    assert "sharpness" in capsys.readouterr().err


def test_generator_batches_device_argument_and_no_grad_context():
    model = make_cnn()
    with torch.no_grad():  # the ascent enables gradients itself
        result = measure_sharpness(
            model, (make_batch(seed=s) for s in (1, 2)), rho=0.05, steps=2, device="cpu"
        )
    assert len(result.per_batch) == 2
    assert result.sharpness > 0


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rho": -0.1}, r"rho must be a finite number >= 0"),
        ({"rho": float("nan")}, r"rho must be a finite number >= 0"),
        ({"rho": float("inf")}, r"rho must be a finite number >= 0"),
        ({"rho": "big"}, r"rho must be a finite number"),
        ({"rho": 0.1, "steps": 0}, r"steps must be an integer >= 1"),
        ({"rho": 0.1, "steps": 2.5}, r"steps must be an integer >= 1"),
        ({"rho": 0.1, "kind": "best"}, r"Unknown kind 'best'; valid kinds are 'worst', 'average'"),
        ({"rho": 0.1, "norm": "l1"}, r"Unknown norm 'l1'; valid norms are 'linf', 'l2'"),
        ({"rho": 0.1, "step_size_multiplier": 0}, r"step_size_multiplier must be a finite number > 0"),
        ({"rho": 0.1, "convention": "paper"}, r"Unknown convention 'paper'; valid conventions are 'apgd', "),
        ({"rho": 0.1, "kind": "average", "return_perturbations": True}, r"needs kind='worst'"),
        ({"rho": 0.1, "scope": "norms"}, r"Unknown scope 'norms'"),
    ],
)
def test_invalid_arguments(kwargs, match):
    model, batch = make_cnn(), make_batch()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        measure_sharpness(model, [batch], **kwargs)
    assert_unchanged(model, before)


def test_invalid_batches():
    model, batch = make_cnn(), make_batch()
    with pytest.raises(ValueError, match=r"batches is empty: pass a non-empty iterable"):
        measure_sharpness(model, [], rho=0.1)
    with pytest.raises(ValueError, match=r"wrap it in a list: batches=\[\(inputs, labels\)\]"):
        measure_sharpness(model, batch, rho=0.1)
    with pytest.raises(ValueError, match=r"Batch 0 is a Tensor, not an \(inputs, labels\) pair"):
        measure_sharpness(model, [batch[0]], rho=0.1)
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar tensor"):
        measure_sharpness(model, [batch], rho=0.1, loss_fn=lambda o, y: o)


# ------------------------------------------------------------------------------- convention, end to end


def test_convention_reaches_the_cli_the_runner_and_the_record(tmp_path):
    from normsam.analysis.run_sharpness import SHARPNESS_FILE, read_measurements
    from normsam.cli import build_parser
    from normsam.train.config import load_config

    args = build_parser().parse_args(["sharpness", "RUN", "--convention", "reference"])
    assert args.convention == "reference"
    assert build_parser().parse_args(["sharpness", "RUN"]).convention == "apgd"
    assert load_config(None, {"sharpness_convention": "reference"}).sharpness_convention == "reference"
    with pytest.raises(ValueError, match=r"Invalid sharpness_convention: 'paper'; valid values are apgd, reference"):
        load_config(None, {"sharpness_convention": "paper"})
    # A record written before the option existed was measured with the APGD convention.
    (tmp_path / SHARPNESS_FILE).write_text(json.dumps({"measurements": [{"rho": 0.003, "sharpness": 0.1}]}))
    assert read_measurements(tmp_path)[0]["convention"] == "apgd"
