"""Every perturbation model × scope × bias rule × norm convention against SPEC §1 written out plainly.

The reference below works on whole flattened vectors, independently of normsam's per-tensor code.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import normsam
from normsam.optim.perturbations import PERTURBATIONS, get_perturbation, perturbation
from tests.conftest import make_batch, make_cnn

ETA_DEFAULT = {"sam": 0.0, "asam": 0.01, "layerwise": 0.01, "linf": 0.01, "fisher": 1.0}


def reference_epsilon(named_params, grads, elem_masks, *, perturbation, rho, eta, normalize_bias, norm_over):
    """ε per parameter name from SPEC §1. ``elem_masks[name]`` is 1 where the element is perturbed."""

    def scale(name, w, g):
        if perturbation == "sam":
            return torch.ones_like(w)
        if perturbation == "fisher":
            return (1 + eta * g**2) ** -0.5
        if name.endswith("bias") and not normalize_bias:
            return torch.ones_like(w)
        if perturbation in ("asam", "linf"):
            return w.abs() + eta
        return torch.full_like(w, float(w.norm()) + eta)  # layerwise

    names = list(named_params)
    T = {n: scale(n, named_params[n].detach(), grads[n]) for n in names}
    g_s = {n: grads[n] * elem_masks[n] for n in names}
    if perturbation == "linf":
        return {n: rho * T[n] * torch.sign(g_s[n]) for n in names}
    flat = lambda d: torch.cat([d[n].reshape(-1) for n in names])  # noqa: E731
    if norm_over == "perturbed":
        denom = torch.linalg.vector_norm(flat({n: T[n] * g_s[n] for n in names}))
    else:
        denom = torch.linalg.vector_norm(flat({n: T[n] * grads[n] for n in names}))
    if denom == 0:
        return {n: torch.zeros_like(grads[n]) for n in names}
    return {n: rho * T[n] ** 2 * g_s[n] / denom for n in names}


def _grads(model, batch):
    x, y = batch
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


SCOPE_MEMBERSHIP = {
    "all": lambda name, model: True,
    "norm": lambda name, model: name.startswith(("bn1.", "gn.")),
    "no-norm": lambda name, model: not name.startswith(("bn1.", "gn.")),
}


@pytest.mark.parametrize(
    "pert,scope,normalize_bias,norm_over,foreach",
    [
        (p, s, nb, no, fe)
        for p, s, nb, no, fe in itertools.product(
            PERTURBATIONS, ["all", "norm", "no-norm", "random"], [False, True], ["perturbed", "all"], [True, False]
        )
        # the ℓ∞ model has no norm, so norm_over changes nothing there: test it once
        if not (p == "linf" and no == "all")
    ],
)
def test_first_step_matches_spec(pert, scope, normalize_bias, norm_over, foreach):
    model, batch = make_cnn(), make_batch()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = _grads(model, batch)
    rho = 0.3
    kwargs = {"sparsity": 0.7} if scope == "random" else {}
    sam = normsam.SAM(
        model,
        torch.optim.SGD,
        lr=0.1,
        rho=rho,
        perturbation=pert,
        scope=scope,
        normalize_bias=normalize_bias,
        norm_over=norm_over,
        foreach=foreach,
        **kwargs,
    )
    if scope == "random":
        masks = dict(zip([n for n, _ in model.named_parameters()], sam.masks()))
        elem = {n: m.to(torch.float64) for n, m in masks.items()}
        assert sum(int(m.sum()) for m in masks.values()) == round(0.3 * sum(p.numel() for p in model.parameters()))
    else:
        member = SCOPE_MEMBERSHIP[scope]
        elem = {n: torch.full_like(p, float(member(n, model))) for n, p in model.named_parameters()}
    expected = reference_epsilon(
        before,
        grads,
        elem,
        perturbation=pert,
        rho=rho,
        eta=ETA_DEFAULT[pert],
        normalize_bias=normalize_bias,
        norm_over=norm_over,
    )
    sam.first_step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach() - before[name], expected[name], atol=1e-12, rtol=0, msg=name)
    assert max(float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters()) > 1e-4
    sam.second_step()  # grads still there: the base step runs and the weights were restored first
    assert sam.counters["sam_steps"] == 1


@pytest.mark.parametrize("pert", list(PERTURBATIONS))
def test_ε_is_not_trivially_zero_in_the_reference_test(pert):
    """Guard against a vacuous comparison: each model moves the norm parameters by a visible amount."""
    model, batch = make_cnn(), make_batch()
    before = model.bn1.weight.detach().clone()
    _grads(model, batch)
    normsam.SAM(model, torch.optim.SGD, lr=0.1, rho=0.5, perturbation=pert).first_step()
    assert (model.bn1.weight.detach() - before).abs().max() > 1e-4


@pytest.mark.parametrize("pert", list(PERTURBATIONS))
def test_per_group_rho_scales_each_group(pert):
    model, batch = make_cnn(), make_batch()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = _grads(model, batch)
    groups = normsam.param_groups(model, "norm", rho=0.2)
    groups[1]["perturb"] = True
    groups[1]["rho"] = 0.05
    sam = normsam.SAM(groups, torch.optim.SGD, rho=0.5, lr=0.1, perturbation=pert, foreach=True)
    sam.first_step()
    ones = {n: torch.ones_like(p) for n, p in before.items()}
    unit = reference_epsilon(
        before, grads, ones, perturbation=pert, rho=1.0, eta=ETA_DEFAULT[pert], normalize_bias=False, norm_over="perturbed"
    )
    for name, p in model.named_parameters():
        rho = 0.2 if name.startswith(("bn1.", "gn.")) else 0.05
        torch.testing.assert_close(p.detach() - before[name], rho * unit[name], atol=1e-12, rtol=0)


@pytest.mark.parametrize("pert", list(PERTURBATIONS))
@pytest.mark.parametrize("normalize_bias", [False, True])
def test_foreach_equals_loop(pert, normalize_bias):
    g = torch.Generator().manual_seed(3)
    shapes = [(4, 3, 3, 3), (4,), (4,), (7, 5), (5,), ()]
    grads = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    weights = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    is_bias = [False, False, True, False, True, False]
    model = get_perturbation(pert)
    kw = dict(
        model=model,
        rhos=[0.1, 0.2, 0.2],
        eta=0.05,
        scaled=[model.scales(b, normalize_bias) for b in is_bias[:3]],
        extra_grads=grads[3:],
        extra_weights=weights[3:],
        extra_scaled=[model.scales(b, normalize_bias) for b in is_bias[3:]],
    )
    fast = perturbation(grads[:3], weights[:3], foreach=True, **kw)
    slow = perturbation(grads[:3], weights[:3], foreach=False, **kw)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    grads_before = [x.clone() for x in grads]
    for foreach in (True, False):  # T = 1 tensors must not alias (and scale) the caller's gradient
        perturbation(grads[:3], weights[:3], foreach=foreach, **{**kw, "rhos": [2.0] * 3, "scaled": [False] * 3})
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_before)), "the gradient must not be modified"


@pytest.mark.parametrize("pert", list(PERTURBATIONS))
@pytest.mark.parametrize("foreach", [True, False])
def test_zero_gradient_gives_zero_epsilon(pert, foreach):
    model, batch = make_cnn(), make_batch()
    _grads(model, batch)
    for p in model.parameters():
        p.grad.zero_()
    before = [p.detach().clone() for p in model.parameters()]
    sam = normsam.SAM(model, torch.optim.SGD, lr=0.1, rho=1.0, perturbation=pert, scope="all", foreach=foreach)
    sam.first_step()
    for p, b in zip(model.parameters(), before):
        assert torch.isfinite(p).all()
        assert torch.equal(p.detach(), b)


@settings(max_examples=40, deadline=None)
@given(
    pert=st.sampled_from(list(PERTURBATIONS)),
    rho=st.floats(0.001, 10.0),
    eta=st.floats(0.0, 2.0),
    seed=st.integers(0, 10_000),
)
def test_epsilon_lies_on_the_boundary_of_its_ball(pert, rho, eta, seed):
    """ℓ2 models: ‖ε / T‖₂ = ρ (ε = ρ·T²g/‖Tg‖); ℓ∞: |ε| ≤ ρ·T with equality where g ≠ 0."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (4,), (2, 2, 2)]
    grads = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    weights = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    model = get_perturbation(pert)
    scaled = [model.scales(False, False)] * 3
    eps = perturbation(grads, weights, model=model, rhos=[rho] * 3, eta=eta, scaled=scaled)
    T = [model.scale(w, gr, eta) * torch.ones_like(w) if s else torch.ones_like(w) for w, gr, s in zip(weights, grads, scaled)]
    if model.geometry == "l2":
        norm = torch.linalg.vector_norm(torch.cat([(e / t).reshape(-1) for e, t in zip(eps, T)]))
        assert norm == pytest.approx(rho, rel=1e-9)
    else:
        for e, t in zip(eps, T):
            torch.testing.assert_close(e.abs(), rho * t, atol=1e-12, rtol=1e-12)


# --- the official SAM-ON conventions, as options -------------------------------------------------------------


class _TokenNet(torch.nn.Module):
    """Tensors whose names the two rules treat differently: pos_embed and a layer-scale gamma."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)  # the head's initialization
        g = torch.Generator().manual_seed(5)
        self.pos_embed = torch.nn.Parameter(torch.randn(4, generator=g, dtype=torch.float64))
        self.norm = torch.nn.LayerNorm(4, dtype=torch.float64)
        self.gamma = torch.nn.Parameter(torch.rand(4, generator=g, dtype=torch.float64) + 0.5)
        self.head = torch.nn.Linear(4, 2, dtype=torch.float64)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5, generator=g)
            self.norm.bias.uniform_(-0.5, 0.5, generator=g)

    def forward(self, x):
        return self.head(self.norm(x + self.pos_embed) * self.gamma)


def _token_eps(**kw):
    model = _TokenNet()
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 0, 1, 1, 0])).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    normsam.SAM(model, torch.optim.SGD, lr=0.1, rho=0.3, scope="all", eta=0.1, **kw).first_step()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}, before, grads


def _l2_eps(T, grads, rho=0.3):
    denom = torch.linalg.vector_norm(torch.cat([(T[n] * grads[n]).reshape(-1) for n in grads]))
    return {n: rho * T[n] ** 2 * grads[n] / denom for n in grads}


@pytest.mark.parametrize("foreach", [True, False])
def test_official_layerwise_scaling_is_norm_times_one_plus_eta(foreach):
    eps, w, g = _token_eps(perturbation="layerwise", layerwise_scaling="official", foreach=foreach)
    T = {n: torch.ones_like(p) if n.endswith("bias") else torch.full_like(p, float(p.norm()) * 1.1) for n, p in w.items()}
    for name, expected in _l2_eps(T, g).items():
        torch.testing.assert_close(eps[name], expected, atol=1e-12, rtol=0, msg=name)
    default, _, _ = _token_eps(perturbation="layerwise", foreach=foreach)  # ‖p‖ + η: another ε
    T = {n: torch.ones_like(p) if n.endswith("bias") else torch.full_like(p, float(p.norm()) + 0.1) for n, p in w.items()}
    for name, expected in _l2_eps(T, g).items():
        torch.testing.assert_close(default[name], expected, atol=1e-12, rtol=0, msg=name)
    assert not torch.allclose(default["norm.weight"], eps["norm.weight"])


@pytest.mark.parametrize("pert", ["asam", "linf"])
def test_scaled_tensors_name_contains_weight_gives_T_one_elsewhere(pert):
    eps, w, g = _token_eps(perturbation=pert, scaled_tensors="name-contains-weight")
    default, _, _ = _token_eps(perturbation=pert)
    official_T = {n: (w[n].abs() + 0.1) if "weight" in n else torch.ones_like(w[n]) for n in w}
    default_T = {n: torch.ones_like(w[n]) if n.endswith("bias") else w[n].abs() + 0.1 for n in w}
    for got, T in ((eps, official_T), (default, default_T)):
        expected = {n: 0.3 * T[n] * torch.sign(g[n]) for n in g} if pert == "linf" else _l2_eps(T, g)
        for name in g:
            torch.testing.assert_close(got[name], expected[name], atol=1e-12, rtol=0, msg=name)
    assert not torch.allclose(eps["pos_embed"], default["pos_embed"])  # the two rules differ there


def test_official_options_errors_name_the_fix():
    model = make_cnn()
    with pytest.raises(ValueError, match=r"layerwise_scaling='official' only changes perturbation='layerwise'"):
        normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1, perturbation="asam", layerwise_scaling="official")
    with pytest.raises(ValueError, match=r"Invalid layerwise_scaling: 'times'; use 'additive'"):
        normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1, perturbation="layerwise", layerwise_scaling="times")
    with pytest.raises(ValueError, match=r"Invalid scaled_tensors: 'weights'; use 'not-bias'"):
        normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1, scaled_tensors="weights")


@pytest.mark.parametrize("pert", list(PERTURBATIONS))
@pytest.mark.parametrize("scope", ["norm", "all"])
@pytest.mark.parametrize("foreach", [True, False])
def test_half_precision_weights_with_small_gradients_get_a_finite_epsilon(pert, scope, foreach):
    """ρ/‖g‖ overflows float16 (65504) for small gradients; ε itself is small and must come out finite and
    equal to the float64 computation (a regression: the coefficient was rounded to float16 first)."""
    model = make_cnn()
    half = make_cnn().half()
    grads = {}
    for (name, p), h in zip(model.named_parameters(), half.parameters()):
        g = torch.linspace(-1, 1, p.numel(), dtype=torch.float64).reshape(p.shape) * 1e-6
        h.grad = g.half()
        p.grad = h.grad.double()  # the same (half-representable) gradient, in float64
        grads[name] = p.grad
    expected = {}
    for m in (model, half):
        before = [p.detach().clone() for p in m.parameters()]
        sam = normsam.SAM(m, torch.optim.SGD, rho=0.5, lr=0.1, perturbation=pert, scope=scope, foreach=foreach)
        sam.first_step()
        expected[m] = [p.detach().double() - b.double() for p, b in zip(m.parameters(), before)]
        sam.restore()
    assert sam.counters["nonfinite_ascent_steps"] == 0
    assert any(e.abs().max() > 1e-3 for e in expected[half])
    for exact, got in zip(expected[model], expected[half]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, exact, atol=5e-3, rtol=5e-2)
