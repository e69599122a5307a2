"""SAM's variants (issue 25): each against a plain reference of its paper's math, foreach = loop, equal to
pytorch_optimizer's class of the same name where it follows its paper, under a GradScaler, resumed mid-run, and
the combinations it refuses."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normsam
from tests.conftest import make_batch, make_cnn

STEPS = 6


def mlp(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.ReLU(), nn.Linear(12, 3)).to(dtype)


def mlp_batch(step: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 6, generator=g, dtype=dtype), torch.randint(0, 3, (16,), generator=g)


def _loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def run(sam, model, batches, route="cheap"):
    """SAM steps through the public protocol: the cheap ascent when it needs one, a single pass otherwise."""
    for batch in batches:
        if sam.needs_ascent:
            if route == "cheap":
                sam.first_step(_loss(model, batch),
                               ascent_loss=lambda b=batch: _loss(model, b))
            else:
                _loss(model, batch).backward()
                sam.first_step(zero_grad=True, ascent_loss=lambda b=batch: (sam.zero_grad(), _loss(model, b).backward(),
                                                                            None)[2])
        else:
            sam.first_step()
        _loss(model, batch).backward()
        sam.second_step(zero_grad=True)
    return model


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# --- plain references of each paper's math (SAM-all, perturbation "sam", SGD without momentum) ------------


def _grads(model, batch):
    model.zero_grad()
    _loss(model, batch).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def _dot(xs, ys):
    return sum(float((x * y).sum()) for x, y in zip(xs, ys))


def reference(variant: str, steps: int, *, rho=0.1, lr=0.1, alpha=0.4, gamma=0.9, decouple=True, k=3,
              sigma=1.0, lmbda=0.9, ascent_steps=1, tensor_norms=False):
    """The variant written out from its paper, tensor list by tensor list."""
    model = mlp()
    params = list(model.parameters())
    m, g_v = None, None
    for t in range(steps):
        batch = mlp_batch(t)
        g = _grads(model, batch)
        full = variant != "looksam" or t % k == 0
        if full:
            d = g
            if variant == "friendly-sam":
                if m is None:
                    m = [x.clone() for x in g]
                else:
                    d = [x - sigma * mi for x, mi in zip(g, m)]
                    m = [lmbda * mi + (1 - lmbda) * x for mi, x in zip(m, g)]
            if variant == "gcsam":
                d = [x - x.mean(dim=tuple(range(1, x.dim())), keepdim=True) if x.dim() > 1 else x for x in d]
            w0 = [p.detach().clone() for p in params]
            for j in range(ascent_steps):
                if j:
                    d = _grads(model, batch)  # the direction again, at the point reached
                norm = _dot(d, d) ** 0.5
                with torch.no_grad():
                    for p, x in zip(params, d):
                        p.add_(rho / ascent_steps * x / norm)
            g_p = _grads(model, batch)
            with torch.no_grad():
                for p, w in zip(params, w0):
                    p.copy_(w)
        else:
            g_p = None
        if variant == "gsam":
            coef = _dot(g, g_p) / _dot(g_p, g_p)
            step = [gp - alpha * (x - coef * gp) for x, gp in zip(g, g_p)]
        elif variant == "wsam":
            a = gamma / (1 - gamma)
            step = g if decouple else [x + a * (gp - x) for x, gp in zip(g, g_p)]
        elif variant == "looksam":
            if full:
                if tensor_norms:
                    g_v = [gp - _dot([x], [gp]) / _dot([x], [x]) * x for x, gp in zip(g, g_p)]
                else:
                    coef = _dot(g, g_p) / _dot(g, g)
                    g_v = [gp - coef * x for x, gp in zip(g, g_p)]
                step = g_p
            elif tensor_norms:  # (with pytorch_optimizer's guard: ‖g‖ / (‖g_v‖ + 1e-8), per tensor)
                step = [x + alpha * _dot([x], [x]) ** 0.5 / (_dot([v], [v]) ** 0.5 + 1e-8) * v for x, v in zip(g, g_v)]
            else:
                scale = (_dot(g, g) / _dot(g_v, g_v)) ** 0.5
                step = [x + alpha * scale * v for x, v in zip(g, g_v)]
        else:
            step = g_p
        with torch.no_grad():
            for p, s in zip(params, step):
                p.sub_(lr * s)
            if variant == "wsam" and decouple:
                for p, x, gp in zip(params, g, g_p):
                    p.sub_(lr * gamma / (1 - gamma) * (gp - x))
    return model


CASES = {
    "gsam": (dict(alpha=0.4), lambda m, **kw: normsam.GSAM(m.parameters(), torch.optim.SGD, **kw)),
    "wsam": (dict(gamma=0.9), lambda m, **kw: normsam.WSAM(m.parameters(), torch.optim.SGD, **kw)),
    "wsam-coupled": (dict(gamma=0.6, decouple=False), lambda m, **kw: normsam.WSAM(m.parameters(), torch.optim.SGD,
                                                                                     **kw)),
    "looksam": (dict(k=3, alpha=0.7), lambda m, **kw: normsam.LookSAM(m.parameters(), torch.optim.SGD, **kw)),
    "looksam-tensor": (dict(k=3, alpha=0.7, reuse_norms="tensor"),
                       lambda m, **kw: normsam.LookSAM(m.parameters(), torch.optim.SGD, **kw)),
    "friendly-sam": (dict(sigma=1.0, lmbda=0.9), lambda m, **kw: normsam.FriendlySAM(m.parameters(), torch.optim.SGD,
                                                                                       **kw)),
    "gcsam": ({}, lambda m, **kw: normsam.GCSAM(m.parameters(), torch.optim.SGD, **kw)),
    "multi-step": (dict(ascent_steps=3), lambda m, **kw: normsam.SAM(m.parameters(), torch.optim.SGD, **kw)),
}


def _reference_for(name):
    options, _ = CASES[name]
    variant = name.split("-")[0] if name.startswith(("wsam", "looksam")) else name
    variant = {"multi-step": "sam"}.get(variant, variant)
    kw = {k: v for k, v in options.items() if k not in ("reuse_norms", "ascent_steps")}
    return reference(variant, STEPS, tensor_norms=options.get("reuse_norms") == "tensor",
                     ascent_steps=options.get("ascent_steps", 1), **kw)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("route", ["cheap", "classic"])
def test_each_variant_equals_its_papers_math(name, foreach, route):
    options, build = CASES[name]
    model = mlp()
    sam = build(model, rho=0.1, lr=0.1, foreach=foreach, **options)
    run(sam, model, [mlp_batch(t) for t in range(STEPS)], route)
    expected = _reference_for(name)
    torch.testing.assert_close(flat(model), flat(expected), atol=1e-10, rtol=0)
    assert not torch.allclose(flat(model), flat(reference("sam", STEPS)), atol=1e-6)  # not plain SAM


@pytest.mark.parametrize("name", ["gsam", "wsam", "looksam", "friendly-sam", "gcsam"])
def test_step_closure_runs_each_variant_as_the_two_pass_api_does(name):
    options, build = CASES[name]
    a, b = mlp(), mlp()
    sam_a, sam_b = build(a, rho=0.1, lr=0.1, **options), build(b, rho=0.1, lr=0.1, **options)
    run(sam_a, a, [mlp_batch(t) for t in range(STEPS)])
    _closure_steps(sam_b, b, STEPS)
    torch.testing.assert_close(flat(a), flat(b), atol=1e-12, rtol=0)


def _closure_steps(opt, model, steps, start=0):
    """``opt.step(closure)`` on the batches ``start, …, start + steps - 1``, the gradients zeroed after each."""
    for t in range(start, start + steps):
        def closure(t=t):
            loss = _loss(model, mlp_batch(t))
            loss.backward()
            return loss
        opt.step(closure)
        opt.zero_grad()


# --- the variants on SAM-ON's scope -------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["gsam", "wsam", "looksam", "friendly-sam"])
def test_on_the_norm_scope_the_descent_rule_acts_on_the_norm_layers(variant):
    """GSAM-ON & co.: the rule on the perturbed set (the cheap ascent computes nothing else); descent_over='all'
    computes every gradient at w and the rule acts on all of them."""
    factory = {"gsam": normsam.GSAM, "wsam": normsam.WSAM, "looksam": normsam.LookSAM,
               "friendly-sam": normsam.FriendlySAM}[variant]
    extra = dict(k=2) if variant == "looksam" else {}
    results = {}
    for over in ("perturbed", "all") if variant != "friendly-sam" else ("perturbed",):
        model = make_cnn()
        kw = dict(descent_over=over) if over == "all" else {}
        sam = factory(model, torch.optim.SGD, rho=0.5, lr=0.1, **extra, **kw)
        assert sam.scope == "norm"
        run(sam, model, [make_batch(seed=t) for t in range(4)])
        results[over] = flat(model)
    plain = make_cnn()
    run(normsam.SAM(plain, torch.optim.SGD, rho=0.5, lr=0.1, **({"ascent_interval": 2} if variant == "looksam" else {})),
        plain, [make_batch(seed=t) for t in range(4)])
    assert not torch.allclose(results["perturbed"], flat(plain), atol=1e-8)
    if "all" in results:
        assert not torch.allclose(results["all"], results["perturbed"], atol=1e-8)


# --- pytorch_optimizer, the peer ---------------------------------------------------------------------------


po = pytest.importorskip("pytorch_optimizer")


class _ConstantRho:
    """What GSAM's peer reads its ρ from (a ProportionScheduler stand-in): a constant."""

    def __init__(self, rho):
        self.rho = rho

    def step(self):
        return self.rho


def _peer_run(name, model, batches, rho, lr, **options):
    """pytorch_optimizer's class of the same name, through its documented protocol."""
    base = dict(lr=lr, momentum=0.9)
    if name == "gsam":
        opt = po.GSAM(model.parameters(), torch.optim.SGD(model.parameters(), **base), model, _ConstantRho(rho),
                      alpha=options.get("alpha", 0.4), adaptive=options.get("adaptive", False))
        for batch in batches:
            opt.set_closure(lambda out, y: F.cross_entropy(out, y), *batch)
            opt.step()
        return model
    cls = {"sam": po.SAM, "wsam": po.WSAM, "looksam": po.LookSAM, "friendly-sam": po.FriendlySAM}[name]
    args = (model, model.parameters()) if name == "wsam" else (model.parameters(),)
    opt = cls(*args, torch.optim.SGD, rho=rho, **options, **base)
    for batch in batches:
        def closure(batch=batch):
            opt.zero_grad()
            loss = _loss(model, batch)
            loss.backward()
            return loss
        if name == "wsam":
            opt.step(closure)
        else:
            closure()
            opt.step(closure)
        opt.zero_grad()
    return model


PEER = {  # name → (the peer's options, normsam's builder with the same hyperparameters)
    "sam": ({}, lambda m, **kw: normsam.SAM(m, torch.optim.SGD, scope="all", **kw)),
    "sam-adaptive": (dict(adaptive=True), lambda m, **kw: normsam.SAM(m, torch.optim.SGD, scope="all",
                                                                        perturbation="asam", eta=0.0,
                                                                        normalize_bias=True, **kw)),
    "gsam": (dict(alpha=0.4), lambda m, **kw: normsam.GSAM(m, torch.optim.SGD, scope="all", alpha=0.4, **kw)),
    "wsam": (dict(gamma=0.9, decouple=True), lambda m, **kw: normsam.WSAM(m, torch.optim.SGD, scope="all", **kw)),
    "wsam-coupled": (dict(gamma=0.5, decouple=False),
                     lambda m, **kw: normsam.WSAM(m, torch.optim.SGD, scope="all", gamma=0.5, decouple=False, **kw)),
    "looksam": (dict(k=3, alpha=0.7), lambda m, **kw: normsam.LookSAM(m, torch.optim.SGD, scope="all", k=3,
                                                                        reuse_norms="tensor", **kw)),
    "friendly-sam": (dict(sigma=1.0, lmbda=0.9), lambda m, **kw: normsam.FriendlySAM(m, torch.optim.SGD, scope="all",
                                                                                       **kw)),
}
#: The peer freezes BatchNorm's statistics in the second pass for GSAM and WSAM only.
_PEER_FREEZES = ("gsam", "wsam", "wsam-coupled")


@pytest.mark.parametrize("name", sorted(PEER))
@pytest.mark.parametrize("net", ["mlp", "cnn-bn"])
def test_each_variant_equals_pytorch_optimizers_class_of_the_same_name(name, net):
    peer_options, build = PEER[name]
    make = (lambda: mlp()) if net == "mlp" else (lambda: make_cnn())
    batches = [mlp_batch(t) if net == "mlp" else make_batch(seed=t, n=8) for t in range(10)]
    ours, theirs = make(), make()
    bn = "freeze" if name in _PEER_FREEZES else "update"
    run(build(ours, rho=0.05, lr=0.05, momentum=0.9, bn_policy=bn), ours, batches)
    _peer_run(name.split("-")[0] if name not in ("wsam-coupled", "friendly-sam") else
              {"wsam-coupled": "wsam", "friendly-sam": "friendly-sam"}[name], theirs, batches, 0.05, 0.05,
              **peer_options)
    torch.testing.assert_close(flat(ours), flat(theirs), atol=1e-6, rtol=0)
    assert not torch.allclose(flat(ours), flat(make()), atol=1e-3)  # it trained


def test_gcsam_follows_the_paper_where_the_peer_normalizes_by_the_uncentralized_norm():
    """GCSAM's ε = ρ·GC(g)/‖GC(g)‖ (a radius-ρ step along the centralized gradient); pytorch_optimizer's
    SAM(use_gc=True) divides GC(g) by ‖g‖, the norm before centralization, so its ‖ε‖ is below ρ."""
    batches = [mlp_batch(t) for t in range(10)]
    paper, peer = mlp(), mlp()
    run(normsam.GCSAM(paper, torch.optim.SGD, scope="all", rho=0.05, lr=0.05, momentum=0.9, bn_policy="update"),
        paper, batches)
    _peer_run("sam", peer, batches, 0.05, 0.05, use_gc=True)
    assert (flat(paper) - flat(peer)).abs().max() > 1e-5
    one = mlp()  # the paper's radius: ‖ε‖ = ρ
    sam = normsam.GCSAM(one, torch.optim.SGD, scope="all", rho=0.05, lr=0.05)
    before = flat(one)
    sam.first_step(_loss(one, batches[0]))
    assert float((flat(one) - before).norm()) == pytest.approx(0.05, rel=1e-9)


def test_looksam_follows_the_paper_where_the_peer_takes_norms_per_tensor():
    """The paper's Algorithm 1 takes g_v's norm and cosine over all weights; pytorch_optimizer per tensor (the
    paper's layer-wise LookSAM). reuse_norms='tensor' reproduces the peer; the default differs from it."""
    batches = [mlp_batch(t) for t in range(10)]
    paper, peer = mlp(), mlp()
    run(normsam.LookSAM(paper, torch.optim.SGD, scope="all", k=3, rho=0.05, lr=0.05, momentum=0.9, bn_policy="update"),
        paper, batches)
    _peer_run("looksam", peer, batches, 0.05, 0.05, k=3, alpha=0.7)
    assert (flat(paper) - flat(peer)).abs().max() > 1e-5


# --- scale, state, errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gsam", "wsam", "looksam", "friendly-sam", "gcsam"])
def test_a_grad_scaler_gives_the_unscaled_run(name):
    """A power-of-two scale divides out exactly: the fp16 route (scaler given once) equals the plain run."""
    options, build = CASES[name]
    plain, scaled = mlp(dtype=torch.float32), mlp(dtype=torch.float32)
    batches = [mlp_batch(t, torch.float32) for t in range(STEPS)]
    run(build(plain, rho=0.1, lr=0.1, **options), plain, batches)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6, growth_interval=1000)
    sam = build(scaled, rho=0.1, lr=0.1, grad_scaler=scaler, **options)
    for batch in batches:
        if sam.needs_ascent:
            scaler.scale(_loss(scaled, batch)).backward()
            sam.first_step(zero_grad=True)
        else:
            sam.first_step()
        scaler.scale(_loss(scaled, batch)).backward()
        sam.second_step(zero_grad=True)
    torch.testing.assert_close(flat(scaled), flat(plain), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["gsam", "wsam", "looksam", "friendly-sam"])
def test_bf16_autocast_trains_each_variant(name):
    options, build = CASES[name]
    model = mlp(dtype=torch.float32)
    sam = build(model, rho=0.1, lr=0.1, **options)
    for t in range(STEPS):
        x, y = mlp_batch(t, torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        sam.first_step(loss) if sam.needs_ascent else sam.first_step()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            F.cross_entropy(model(x), y).backward()
        sam.second_step(zero_grad=True)
    assert torch.isfinite(flat(model)).all() and not torch.equal(flat(model), flat(mlp(dtype=torch.float32)))


@pytest.mark.parametrize("name", ["looksam", "friendly-sam", "wsam", "gsam"])
def test_resume_mid_run_equals_the_uninterrupted_run(name):
    options, build = CASES[name]
    batches = [mlp_batch(t) for t in range(7)]
    straight = mlp()
    run(build(straight, rho=0.1, lr=0.1, momentum=0.9, **options), straight, batches)
    model = mlp()
    first = build(model, rho=0.1, lr=0.1, momentum=0.9, **options)
    run(first, model, batches[:4])  # LookSAM k=3: step 3 was full, the next two reuse its g_v
    state = copy.deepcopy(first.state_dict())
    resumed = build(model, rho=0.1, lr=0.1, momentum=0.9, **options)
    resumed.load_state_dict(state)
    run(resumed, model, batches[4:])
    assert torch.equal(flat(model), flat(straight))


@pytest.mark.parametrize(("options", "message"), [
    (dict(variant="gsam", ascent_interval=2), r"variant='gsam' combines the gradients at w and at w \+ ε"),
    (dict(variant="looksam"), r"set ascent_interval=k > 1"),
    (dict(variant="gsam", ascent="momentum"), r"ascent='momentum' takes no pass at w"),
    (dict(centralize=True, ascent="momentum"), r"ascent='momentum' takes no pass at w, and centralize"),
    (dict(gamma=0.5), r"gamma=0\.5 is an option of variant='wsam', and variant='sam' would ignore it"),
    (dict(variant="wsam", gamma=1.0), r"Invalid gamma: 1\.0; it must be a number in \[0, 1\)"),
    (dict(variant="friendly-sam", ascent_steps=2), r"would update Friendly-SAM's gradient average"),
    (dict(descent_over="all"), r"descent_over='all' chooses what a descent rule acts on"),
    (dict(variant="sharp"), r"Invalid variant: 'sharp'"),
    (dict(ascent_steps=0), r"Invalid ascent_steps: 0"),
])
def test_combinations_a_variant_cannot_honour_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        normsam.SAMOptions(rho=0.1, **options)


def test_a_multi_step_ascent_without_a_way_to_reevaluate_is_refused():
    model = mlp()
    sam = normsam.SAM(model, torch.optim.SGD, rho=0.1, lr=0.1, ascent_steps=2)
    with pytest.raises(ValueError, match=r"ascent_steps=2 takes the ascent direction again at each point: pass "
                                         r"first_step\(loss, ascent_loss=\.\.\.\)"):
        sam.first_step(_loss(model, mlp_batch(0)))


def test_the_factories_take_the_peers_aliases_and_refuse_conflicts():
    model = mlp()
    sam = normsam.GSAM(model, torch.optim.SGD, rho=0.1, lr=0.1, adaptive=True, use_gc=True)
    assert sam.options.perturbation == "asam" and sam.eta == 0.0 and sam.options.centralize
    assert "gsam(alpha=0.4)" in repr(sam) and "centralize" in repr(sam)
    with pytest.raises(ValueError, match=r"adaptive=True is perturbation='asam' \(T = \|w\|\); it conflicts with "
                                         r"perturbation='linf'"):
        normsam.WSAM(model, torch.optim.SGD, rho=0.1, lr=0.1, adaptive=True, perturbation="linf")
    with pytest.raises(ValueError, match=r"LookSAM's k is its ascent interval"):
        normsam.LookSAM(model, torch.optim.SGD, rho=0.1, lr=0.1, ascent_interval=3)


def test_gsams_rho_follows_the_learning_rate():
    model = mlp()
    sam = normsam.GSAM(model, torch.optim.SGD, rho=0.2, rho_min=0.02, lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(sam, lambda t: 1 - t / 4)
    seen = []
    for t in range(4):
        batch = mlp_batch(t)
        sam.first_step(_loss(model, batch))
        seen.append(sam.param_groups[0]["rho"])
        _loss(model, batch).backward()
        sam.second_step(zero_grad=True)
        scheduler.step()
    assert seen == pytest.approx([0.2, 0.155, 0.11, 0.065])  # 0.02 + 0.18 * lr/0.1


# --- BSAM: its own optimizer -------------------------------------------------------------------------------


def bsam_reference(steps: int, *, num_data=100, lr=0.05, betas=(0.9, 0.999), decay=1e-3, rho=0.02, damping=0.1,
                   seed=0):
    """The authors' bSAM step (team-approx-bayes/bayesian-sam, build_bsam_optimizer), on SAM-all, written out."""
    model = mlp()
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    s = [torch.ones_like(p) for p in params]
    m = [torch.zeros_like(p) for p in params]
    for t in range(steps):
        w = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, si in zip(params, s):
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / (num_data * si).sqrt())
        g = _grads(model, mlp_batch(t))
        with torch.no_grad():
            for p, wi, gi, si in zip(params, w, g, s):
                p.copy_(wi + rho * gi / si)
        g_p = _grads(model, mlp_batch(t))
        with torch.no_grad():
            for i, (p, wi) in enumerate(zip(params, w)):
                p.copy_(wi)
                m[i] = betas[0] * m[i] + (1 - betas[0]) * (g_p[i] + decay * p)
                p.sub_(lr * m[i] / s[i])
                s[i] = betas[1] * s[i] + (1 - betas[1]) * (s[i].sqrt() * g[i].abs() + damping + decay)
    return model


def test_bsam_follows_the_authors_algorithm():
    model = mlp()
    opt = normsam.BSAM(model.parameters(), num_data=100, lr=0.05, weight_decay=1e-3, rho=0.02)
    _closure_steps(opt, model, STEPS)
    torch.testing.assert_close(flat(model), flat(bsam_reference(STEPS)), atol=1e-12, rtol=0)


def test_bsam_resumes_exactly_and_refuses_bad_settings():
    straight = mlp()
    _closure_steps(normsam.BSAM(straight.parameters(), num_data=100, lr=0.05, rho=0.02), straight, 4)
    model = mlp()
    first = normsam.BSAM(model.parameters(), num_data=100, lr=0.05, rho=0.02)
    _closure_steps(first, model, 2)
    state = copy.deepcopy(first.state_dict())
    resumed = normsam.BSAM(model.parameters(), num_data=100, lr=0.05, rho=0.02, seed=99)
    resumed.load_state_dict(state)
    _closure_steps(resumed, model, 2, start=2)
    assert torch.equal(flat(model), flat(straight))
    with pytest.raises(ValueError, match=r"Invalid num_data: 0; it is N, the number of training examples"):
        normsam.BSAM(model.parameters(), num_data=0)
    with pytest.raises(ValueError, match=r"needs a closure"):
        normsam.BSAM(model.parameters(), num_data=10).step(None)


def test_bsam_on_perturbs_the_norm_layers_only():
    model = make_cnn()
    opt = normsam.BSAM(model, num_data=50, lr=0.01, rho=0.05)
    assert "perturbed=16/" in repr(opt)
    moved = {}

    def closure():
        moved.setdefault("conv", model.conv1.weight.detach().clone())
        moved.setdefault("bn", model.bn1.weight.detach().clone())
        loss = _loss(model, make_batch())
        loss.backward()
        return loss

    w_conv, w_bn = model.conv1.weight.detach().clone(), model.bn1.weight.detach().clone()
    opt.step(closure)
    assert torch.equal(moved["conv"], w_conv) and not torch.equal(moved["bn"], w_bn)  # noise on the scope only


def test_bsam_differs_from_pytorch_optimizers_which_updates_at_the_perturbed_point():
    """pytorch_optimizer's BSAM leaves noise and ε in the weights and squares the precision's update; with the
    noise made negligible (a huge N) one step shows it."""
    ours, theirs = mlp(), mlp()
    _closure_steps(normsam.BSAM(ours.parameters(), num_data=10**12, lr=0.05, rho=0.05, weight_decay=1e-4), ours, 1)
    peer = po.BSAM(theirs.parameters(), num_data=10**12, lr=0.05, rho=0.05, weight_decay=1e-4, foreach=False)

    def closure():
        peer.zero_grad()
        loss = _loss(theirs, mlp_batch(0))
        loss.backward()
        return loss

    closure()  # the peer creates its state only for tensors that already have a gradient
    peer.step(closure)
    assert (flat(ours) - flat(theirs)).abs().max() > 1e-3


_DDP_SCRIPT = r"""
import sys
import torch, torch.distributed as dist, torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
import normsam
from tests.test_variants import mlp, mlp_batch, flat

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
results = {}
builders = {
    "wsam": lambda m: normsam.WSAM(m.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, sync_ascent=True),
    "friendly-sam": lambda m: normsam.FriendlySAM(m.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, sync_ascent=True),
    "gcsam": lambda m: normsam.GCSAM(m.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, sync_ascent=True),
}
for name, build in builders.items():
    model = mlp()
    ddp = DistributedDataParallel(model)
    sam = build(model)
    for t in range(4):
        x, y = (part.chunk(world)[rank] for part in mlp_batch(t))
        with ddp.no_sync():
            sam.first_step(F.cross_entropy(ddp(x), y))
        F.cross_entropy(ddp(x), y).backward()
        sam.second_step(zero_grad=True)
    results[name] = flat(model)
model = mlp()
ddp = DistributedDataParallel(model)
opt = normsam.BSAM(model.parameters(), num_data=100, lr=0.05, rho=0.02)
for t in range(4):
    x, y = (part.chunk(world)[rank] for part in mlp_batch(t))
    def closure():
        loss = F.cross_entropy(ddp(x), y)
        loss.backward()
        return loss
    opt.step(closure)
    opt.zero_grad()
results["bsam"] = flat(model)
if rank == 0:
    torch.save(results, sys.argv[1])
dist.destroy_process_group()
"""


def test_ddp_with_two_processes_equals_one_process_on_the_global_batch(tmp_path):
    """WSAM, Friendly-SAM, GCSAM (sync_ascent) and BSAM under DDP (2 gloo processes, each half the batch) take the
    one-process steps on the whole batch. (GSAM and LookSAM: tests/test_variants_runner.py, through the runner.)"""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    script = tmp_path / "ddp_variants.py"
    script.write_text(_DDP_SCRIPT)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])}
    done = subprocess.run(["timeout", "240", torchrun, "--standalone", "--nproc_per_node=2", str(script),
                           str(tmp_path / "out.pt")], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    one = {
        "wsam": normsam.WSAM, "friendly-sam": normsam.FriendlySAM, "gcsam": normsam.GCSAM,
    }
    for name, factory in one.items():
        model = mlp()
        run(factory(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1), model, [mlp_batch(t) for t in range(4)])
        torch.testing.assert_close(got[name], flat(model), atol=1e-9, rtol=0, msg=name)
    model = mlp()
    opt = normsam.BSAM(model.parameters(), num_data=100, lr=0.05, rho=0.02)
    _closure_steps(opt, model, 4)
    torch.testing.assert_close(got["bsam"], flat(model), atol=1e-9, rtol=0)
