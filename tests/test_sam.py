"""normsam.SAM: trajectories, the cheap ascent, running statistics, errors, state."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normsam
from normsam.optim.storage import FlatPerturbedTensors
from tests.conftest import make_batch, make_cnn


def _loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _batches(n, seed=10, dtype=torch.float64):
    return [make_batch(seed + i, dtype=dtype) for i in range(n)]


def _classic_step(sam, model, batch):
    _loss(model, batch).backward()
    sam.first_step(zero_grad=True)
    _loss(model, batch).backward()
    sam.second_step(zero_grad=True)


def _cheap_step(sam, model, batch):
    sam.first_step(_loss(model, batch), zero_grad=True)
    _loss(model, batch).backward()
    sam.second_step(zero_grad=True)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


# --- trajectories -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pert", list(normsam.PERTURBATIONS))
def test_rho_zero_gives_exactly_the_base_optimizer_trajectory(pert):
    model_sam, model_sgd = make_cnn(), make_cnn()
    sam = normsam.SAM(model_sam, torch.optim.SGD, rho=0.0, perturbation=pert, lr=0.1, momentum=0.9, weight_decay=5e-4)
    sgd = torch.optim.SGD(model_sgd.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for batch in _batches(4):
        _classic_step(sam, model_sam, batch)
        _loss(model_sgd, batch).backward()
        sgd.step()
        sgd.zero_grad()
    for a, b in zip(model_sam.parameters(), model_sgd.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(model_sam.buffers(), model_sgd.buffers()):
        assert torch.equal(a, b)  # BN freeze: the second pass leaves no trace in the statistics


@pytest.mark.parametrize("scope", ["norm", "all", "no-norm"])
@pytest.mark.parametrize("pert", ["sam", "asam", "fisher"])
def test_cheap_ascent_equals_classic_api(scope, pert):
    model_a, model_b = make_cnn(), make_cnn()
    kw = dict(rho=0.5, perturbation=pert, scope=scope, lr=0.05, momentum=0.9)
    sam_a = normsam.SAM(model_a, torch.optim.SGD, **kw)
    sam_b = normsam.SAM(model_b, torch.optim.SGD, **kw)
    for batch in _batches(4):
        _classic_step(sam_a, model_a, batch)
        _cheap_step(sam_b, model_b, batch)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert not torch.equal(model_a.bn1.weight, make_cnn().bn1.weight)  # it did train


def test_cheap_ascent_leaves_no_gradient_and_skips_weight_gradients():
    model = make_cnn()
    sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1)
    computed = []
    for name, p in model.named_parameters():
        p.register_hook(lambda grad, name=name: computed.append(name))
    sam.first_step(_loss(model, make_batch()))
    assert all(p.grad is None for p in model.parameters())
    assert sorted(computed) == ["bn1.bias", "bn1.weight", "gn.bias", "gn.weight"]
    _loss(model, make_batch()).backward()
    sam.second_step()


def test_step_with_closure_equals_two_phase_api():
    model_a, model_b = make_cnn(), make_cnn()
    sam_a = normsam.SAM(model_a, torch.optim.SGD, rho=0.3, lr=0.1, perturbation="asam")
    sam_b = normsam.SAM(model_b, torch.optim.SGD, rho=0.3, lr=0.1, perturbation="asam")
    for batch in _batches(3):

        def closure(batch=batch):
            loss = _loss(model_a, batch)
            loss.backward()
            return loss

        returned = sam_a.step(closure)
        expected = _loss(model_b, batch).detach()
        _classic_step(sam_b, model_b, batch)
        torch.testing.assert_close(returned.detach(), expected)
        sam_a.zero_grad()
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_weights_are_restored_bitwise_before_the_base_step():
    model = make_cnn()
    sam = normsam.SAM(model, torch.optim.SGD, rho=2.0, lr=0.0, scope="all", perturbation="asam")
    before = _params(model)
    _classic_step(sam, model, make_batch())  # lr = 0: the base step leaves w where it was
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


def test_only_perturbed_tensors_are_backed_up():
    model = make_cnn()
    sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1)
    sam.first_step(_loss(model, make_batch()))
    storage = sam.storage
    assert {id(p) for p in storage.params} == {id(model.bn1.weight), id(model.bn1.bias), id(model.gn.weight),
                                               id(model.gn.bias)}
    assert [b.shape for b in storage.backup] == [p.shape for p in storage.params]
    sam.restore()


def test_adamw_and_lion_bases_train():
    from timm.optim import Lion

    for base, kw in [(torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05)), (Lion, dict(lr=1e-3, weight_decay=0.1))]:
        model = make_cnn(dtype=torch.float32)
        sam = normsam.SAM(model, base, rho=0.5, **kw)
        batch = make_batch(dtype=torch.float32)
        first = _loss(model, batch).item()
        for _ in range(15):
            _cheap_step(sam, model, batch)
        assert _loss(model, batch).item() < first


def test_lr_scheduler_on_the_wrapper_drives_the_base_optimizer():
    model = make_cnn()
    sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(sam, T_max=4)
        for batch in _batches(2):
            _cheap_step(sam, model, batch)
            sched.step()
    assert sam.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert sam.param_groups is sam.base_optimizer.param_groups


# --- running statistics ----------------------------------------------------------------------------------


def test_bn_freeze_leaves_running_stats_of_the_second_pass_untouched():
    model = make_cnn()
    reference = copy.deepcopy(model)
    sam = normsam.SAM(model, torch.optim.SGD, rho=1.0, lr=0.0)  # default policy with a model: freeze
    assert sam.bn_policy == "freeze"
    batch = make_batch()
    _loss(reference, batch)  # one forward: what the statistics should be
    _classic_step(sam, model, batch)
    assert model.bn1.num_batches_tracked.item() == 1
    assert torch.equal(model.bn1.running_mean, reference.bn1.running_mean)
    assert torch.equal(model.bn1.running_var, reference.bn1.running_var)


def test_bn_update_policy_records_the_second_pass():
    model = make_cnn()
    sam = normsam.SAM(model, torch.optim.SGD, rho=1.0, lr=0.0, bn_policy="update")
    _classic_step(sam, model, make_batch())
    assert model.bn1.num_batches_tracked.item() == 2


def test_bn_freeze_covers_subclasses_and_custom_modules():
    from timm.layers import BatchNormAct2d

    class MyNorm(nn.Module):  # running statistics without being a _NormBase
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3))
            self.register_buffer("running_mean", torch.zeros(3))

        def forward(self, x):
            if self.training:
                self.running_mean.mul_(0.9).add_(0.1 * x.mean(dim=(0, 2, 3)).detach())
            return x * self.weight[:, None, None]

    model = nn.Sequential(nn.Conv2d(3, 3, 1), BatchNormAct2d(3), MyNorm(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 4, 4))
    sam = normsam.SAM(model, torch.optim.SGD, rho=1.0, lr=0.0)
    x, y = torch.randn(4, 3, 4, 4), torch.tensor([0, 1, 0, 1])
    F.cross_entropy(model(x), y).backward()
    after_first = [b.clone() for b in model.buffers()]
    sam.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    sam.second_step()
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), after_first))
    assert all(p.requires_grad for p in model.parameters())


# --- the flat path (SAM-ON with an elementwise T) ---------------------------------------------------------


@pytest.mark.parametrize("ascent", ["cheap", "classic"])
@pytest.mark.parametrize("pert,normalize_bias", [("sam", False), ("asam", False), ("asam", True), ("linf", False),
                                                 ("fisher", False)])
def test_flat_path_matches_the_reference_loop(ascent, pert, normalize_bias):
    """SAM-ON's ε and backup go through one flat buffer each; the perturbed weights, the restore and three
    steps' trajectory equal the per-tensor reference loop's (foreach=False)."""
    fast_model, slow_model = make_cnn(), make_cnn()
    options = dict(rho=0.7, lr=0.1, momentum=0.9, perturbation=pert, normalize_bias=normalize_bias)
    fast = normsam.SAM(fast_model, torch.optim.SGD, **options)
    slow = normsam.SAM(slow_model, torch.optim.SGD, **options, foreach=False)
    assert isinstance(fast.storage, FlatPerturbedTensors) and not isinstance(slow.storage, FlatPerturbedTensors)
    step = _cheap_step if ascent == "cheap" else _classic_step
    for batch in _batches(3):
        before = _params(fast_model)
        if ascent == "cheap":
            fast.first_step(_loss(fast_model, batch))
            slow.first_step(_loss(slow_model, batch))
        else:
            for sam, model in ((fast, fast_model), (slow, slow_model)):
                _loss(model, batch).backward()
                sam.first_step(zero_grad=True)
        for a, b in zip(fast_model.parameters(), slow_model.parameters()):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
        names = [name for name, _ in fast_model.named_parameters()]
        assert not torch.equal(fast_model.bn1.weight, before[names.index("bn1.weight")])  # perturbed
        assert torch.equal(fast_model.conv1.weight, before[names.index("conv1.weight")])  # not in SAM-ON's scope
        fast.restore(), slow.restore()
        assert all(torch.equal(a, b) for a, b in zip(fast_model.parameters(), before))  # restored bit for bit
        step(fast, fast_model, batch), step(slow, slow_model, batch)
    for a, b in zip(fast_model.parameters(), slow_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_flat_path_only_where_it_is_exact():
    """Only vectors of one dtype, an elementwise T, no element mask and the norm over the perturbed set; two ρ
    fall back to the per-tensor lists for that step (the flat layout packs nothing)."""
    model = make_cnn()
    assert isinstance(normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1).storage, FlatPerturbedTensors)
    for options in (dict(perturbation="layerwise"), dict(scope="all"), dict(norm_over="all"), dict(foreach=False),
                    dict(scope="random", sparsity=0.5)):
        storage = normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1, **options).storage
        assert not isinstance(storage, FlatPerturbedTensors), options

    def two_rhos():  # SAM-ON's tensors in two groups with their own ρ
        groups = normsam.param_groups(model, "norm")
        norm = next(g for g in groups if g["perturb"])
        return [dict(norm, params=norm["params"][:2], rho=0.2), dict(norm, params=norm["params"][2:], rho=0.9),
                *(g for g in groups if not g["perturb"])]

    sam = normsam.SAM(two_rhos(), torch.optim.SGD, rho=0.5, lr=0.1, model=model)
    reference = normsam.SAM(two_rhos(), torch.optim.SGD, rho=0.5, lr=0.1, model=model, foreach=False)
    storage = sam.storage
    assert isinstance(storage, FlatPerturbedTensors)  # the layout allows it; the step sees two ρ
    grads = list(torch.autograd.grad(_loss(model, make_batch()), storage.params))
    assert storage.packed(grads, []) is None
    before = _params(model)
    shifts = []
    for s in (sam, reference):
        s.first_step(_loss(model, make_batch()))
        shifts.append([p.detach() - b for p, b in zip(model.parameters(), before)])
        s.restore()
    for a, b in zip(*shifts):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert any(float(x.abs().max()) > 1e-3 for x in shifts[0])


@pytest.mark.parametrize("pert", ["sam", "asam", "linf", "fisher"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_flat_path_nonfinite_gradient_gives_no_perturbation_and_keeps_the_buffers_clean(bad, pert):
    model = make_cnn()
    sam = normsam.SAM(model, torch.optim.SGD, rho=1.0, lr=0.1, ascent_interval=2, perturbation=pert)
    assert isinstance(sam.storage, FlatPerturbedTensors)
    _loss(model, make_batch()).backward()
    model.gn.bias.grad[1] = bad
    before = _params(model)
    sam.first_step(zero_grad=True)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert sam.counters["nonfinite_ascent_steps"] == 1
    sam.restore()
    sam.first_step()  # ascent_interval=2 reuses the stored ε: zero, so still no perturbation
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    sam.restore()
    sam.first_step(_loss(model, make_batch()))  # a fresh, finite ascent perturbs again
    assert not torch.equal(model.bn1.weight, before[[n for n, _ in model.named_parameters()].index("bn1.weight")])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sam.counters["nonfinite_ascent_steps"] == 1


# --- non-finite ascent -------------------------------------------------------------------------------------


def test_nonfinite_ascent_gradient_skips_the_perturbation_and_counts_it():
    model = make_cnn()
    sam = normsam.SAM(model, torch.optim.SGD, rho=1.0, lr=0.1)
    _loss(model, make_batch()).backward()
    model.bn1.weight.grad[0] = float("inf")
    before = _params(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the host is not asked: no warning (the runner warns per epoch)
        sam.first_step(zero_grad=True)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert sam.counters["nonfinite_ascent_steps"] == 1
    _loss(model, make_batch()).backward()
    sam.second_step()  # the base step still runs with the (finite) second-pass gradient
    assert not torch.equal(model.head.weight, before[-2])
    assert sam.state_dict()["sam"]["counters"]["nonfinite_ascent_steps"] == 1


# --- errors ----------------------------------------------------------------------------------------------


def test_errors_name_the_fix():
    model = make_cnn()
    sgd = torch.optim.SGD
    cases = [
        (dict(rho=-0.1), "Invalid rho: -0.1"),
        (dict(rho=float("nan")), "Invalid rho: nan"),
        (dict(perturbation="adam"), "Unknown perturbation 'adam'; valid ones are 'sam', 'asam'"),
        (dict(scope="nrom"), "Unknown scope 'nrom'; valid scopes are 'all', 'norm', 'no-norm', 'random'"),
        (dict(eta=-1.0), "Invalid eta: -1.0"),
        (dict(scope="random", sparsity=1.0), r"needs sparsity in \(0, 1\)"),
        (dict(scope="random", sparsity=0.0), r"needs sparsity in \(0, 1\)"),
        (dict(scope="random"), r"needs sparsity in \(0, 1\)"),
        (dict(sparsity=0.5), "sparsity is only used by the element-mask scopes"),
        (dict(scope="ssam-d", sparsity=0.5), "needs mask_interval"),
        (dict(scope="ssam-d", sparsity=0.5, mask_interval=2), "needs mask_total_steps"),
        (dict(norm_over="some"), "Invalid norm_over"),
        (dict(bn_policy="off"), "Invalid bn_policy"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            normsam.SAM(model, sgd, lr=0.1, **kwargs)
    with pytest.raises(ValueError, match="not an instance"):
        normsam.SAM(model, sgd(model.parameters(), lr=0.1), rho=0.5)
    with pytest.raises(ValueError, match="needs the model to find its layers"):
        normsam.SAM(model.parameters(), sgd, rho=0.5, scope="norm", lr=0.1)
    with pytest.raises(ValueError, match="bn_policy='freeze' needs the model"):
        normsam.SAM(model.parameters(), sgd, rho=0.5, bn_policy="freeze", lr=0.1)
    with pytest.raises(ValueError, match="empty parameter list"):
        normsam.SAM([], sgd, rho=0.5, lr=0.1)
    with pytest.raises(ValueError, match=r"keeps no element"):
        normsam.SAM(model, sgd, rho=0.5, scope="random", sparsity=0.999999, lr=0.1)


def test_norm_scope_on_a_model_without_norm_layers_says_what_to_do():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"scope='norm' selects no parameters.*no normalization layer.*scope='all'"):
        normsam.SAM(mlp, torch.optim.SGD, rho=0.5, lr=0.1)


def test_step_order_errors():
    model = make_cnn()
    sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1)
    with pytest.raises(ValueError, match=r"second_step\(\)/restore\(\) called without first_step\(\)"):
        sam.second_step()
    sam.first_step(_loss(model, make_batch()))
    with pytest.raises(ValueError, match=r"first_step\(\) called twice"):
        sam.first_step(_loss(model, make_batch()))
    with pytest.raises(ValueError, match="while the weights are perturbed"):
        sam.state_dict()
    sam.restore()
    with pytest.raises(ValueError, match="needs a closure"):
        sam.step()
    with pytest.raises(ValueError, match="needs the loss tensor"):
        sam.first_step(torch.tensor(1.0))


# --- state -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scope_kw", [dict(scope="norm"), dict(scope="random", sparsity=0.9), dict(scope="ssam-d", sparsity=0.8, mask_interval=2, mask_total_steps=10)])
def test_state_dict_round_trip_resumes_exactly(scope_kw):
    kw = dict(rho=0.5, lr=0.05, momentum=0.9, perturbation="asam", **scope_kw)
    model_a = make_cnn()
    sam_a = normsam.SAM(model_a, torch.optim.SGD, **kw)
    batches = _batches(6)
    for batch in batches[:3]:
        _cheap_step(sam_a, model_a, batch)
    state = copy.deepcopy(sam_a.state_dict())
    model_b = copy.deepcopy(model_a)
    sam_b = normsam.SAM(model_b, torch.optim.SGD, **{**kw, "mask_seed": 123})  # a different initial mask
    sam_b.load_state_dict(state)
    assert sam_b.param_groups is sam_b.base_optimizer.param_groups
    assert sam_b.counters == sam_a.counters
    if sam_a.masks() is not None:
        assert all(torch.equal(a, b) for a, b in zip(sam_a.masks(), sam_b.masks()))
    for batch in batches[3:]:
        _cheap_step(sam_a, model_a, batch)
        _cheap_step(sam_b, model_b, batch)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)
    sam_b.param_groups[0]["lr"] = 0.123  # re-linked: the base optimizer sees it
    assert sam_b.base_optimizer.param_groups[0]["lr"] == 0.123


def test_add_param_group_reaches_the_base_optimizer():
    model = make_cnn()
    extra = nn.Parameter(torch.ones(3, dtype=torch.float64))
    sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1)
    sam.add_param_group({"params": [extra], "param_names": ["extra"], "perturb": False})
    assert sam.base_optimizer.param_groups[-1]["params"][0] is extra
    assert sam.param_groups[-1]["rho"] == 0.5 and sam.param_groups[-1]["lr"] == 0.1


def test_bare_tensors_count_as_weights_for_the_bias_rule():
    """Without names, a 1-D tensor is scaled by |w| + η like any weight (SPEC §1)."""
    bias = nn.Parameter(torch.tensor([2.0, -1.0], dtype=torch.float64))
    bias.grad = torch.tensor([1.0, 1.0], dtype=torch.float64)
    sam = normsam.SAM([bias], torch.optim.SGD, rho=1.0, lr=0.1, perturbation="asam", eta=0.0)
    sam.first_step()
    T = torch.tensor([2.0, 1.0], dtype=torch.float64)
    expected = T**2 / torch.linalg.vector_norm(T)
    torch.testing.assert_close(bias.detach() - torch.tensor([2.0, -1.0], dtype=torch.float64), expected)


# --- per-step bookkeeping, built once ------------------------------------------------------------------------


def test_the_plan_and_backup_are_built_once_and_reused():
    model = make_cnn()
    sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1, scope="all")
    _cheap_step(sam, model, make_batch(1))
    storage, backup = sam.storage, list(sam.storage.backup)
    _cheap_step(sam, model, make_batch(2))
    assert sam.storage is storage and all(a is b for a, b in zip(sam.storage.backup, backup))


def test_the_plan_is_rebuilt_when_requires_grad_or_the_groups_change():
    model = make_cnn()
    sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1)
    _cheap_step(sam, model, make_batch(1))
    first = sam.storage
    model.bn1.weight.requires_grad_(False)
    frozen = model.bn1.weight.detach().clone()
    sam.first_step(_loss(model, make_batch(2)))
    assert sam.storage is not first and all(p is not model.bn1.weight for p in sam.ascent_inputs())
    assert torch.equal(model.bn1.weight, frozen)  # no longer perturbed
    sam.restore()
    extra = nn.Parameter(torch.ones(2, dtype=torch.float64))
    extra.grad = torch.ones(2, dtype=torch.float64)
    before = sam.storage
    sam.add_param_group({"params": [extra], "param_names": ["extra.weight"], "perturb": True})  # not the model's: say it
    assert sam.storage is not before
    assert any(p is extra for p in sam.ascent_inputs())


class _CountingSGD(torch.optim.SGD):
    zero_grad_calls = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        type(self).zero_grad_calls += 1
        super().zero_grad(set_to_none)


def test_zero_grad_clears_or_zeroes_and_respects_a_base_optimizer_override():
    model = make_cnn()
    sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1)
    _loss(model, make_batch()).backward()
    sam.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    _loss(model, make_batch()).backward()
    grads = [p.grad for p in model.parameters()]
    sam.zero_grad(set_to_none=False)
    assert all(p.grad is g and not g.any() for p, g in zip(model.parameters(), grads))
    counting = normsam.SAM(model, _CountingSGD, rho=0.5, lr=0.1)
    counting.zero_grad()
    assert _CountingSGD.zero_grad_calls == 1  # a base optimizer's own zero_grad is called, not bypassed


def test_a_changed_rho_reaches_the_next_step_without_a_rebuild():
    model = make_cnn()
    sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1)
    batch, before = make_batch(), _params(model)
    epsilons = []
    for rho in (0.5, 0.25):
        for group in sam.param_groups:  # what a ρ schedule does
            group["rho"] = rho
        sam.first_step(_loss(model, batch))
        epsilons.append([p.detach() - b for p, b in zip(model.parameters(), before)])
        sam.restore()
    storage = sam.storage
    assert sam.storage is storage
    for big, small in zip(*epsilons):
        torch.testing.assert_close(small, big / 2, atol=1e-12, rtol=0)
    assert max(float(e.abs().max()) for e in epsilons[1]) > 1e-3
