"""The composed core's pieces, each tested directly (issue 23): options, the scope split, the storage, the ε
builder, the ascent sources, the stored ε, and the guards of the step protocol (an API with no surprises)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import normsam
from normsam.optim.ascent import GradientAscent, MomentumAscent, StoredEpsilon
from normsam.optim.epsilon import fresh_epsilon
from normsam.optim.groups import ScopeSplit, split_by_scope
from normsam.optim.options import SAMOptions
from normsam.optim.perturbations import get_perturbation, perturbation
from normsam.optim.storage import FlatPerturbedTensors, PerturbedTensors, layout_key, perturbed_tensors
from tests.conftest import make_batch, make_cnn


def _loss(model, seed=1):
    x, y = make_batch(seed=seed)
    return F.cross_entropy(model(x), y)


def _storage(model, scope="norm", **options):
    opts = SAMOptions(scope=scope, **options)
    groups = normsam.param_groups(model, scope)
    for g in groups:
        g.setdefault("rho", 0.5)
    return groups, perturbed_tensors(groups, opts, get_perturbation(opts.perturbation), masked=False)


# --- options ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "message"), [
    (dict(rho=-1), r"Invalid rho: -1; rho must be a finite number >= 0"),
    (dict(eta=True), r"Invalid eta: True; eta must be a finite number >= 0"),
    (dict(perturbation="asam", eta="0.1"), r"Invalid eta: '0\.1'"),
    (dict(eta=0.1), r"eta=0\.1 is the offset of a perturbation model's scaling T, and perturbation='sam' has none"),
    (dict(drop_rate=0.3), r"drop_rate=0\.3: drop_rate is only used by scope='ssam-d'"),
    (dict(scope="random", sparsity=0.5, mask_interval=3), r"mask_interval=3: mask_interval is only used by "
                                                          r"scope='ssam-d', and scope='random' would ignore it"),
    (dict(scope="ssam-d", sparsity=0.5, mask_interval=1, mask_total_steps=10, drop_rate="x"),
     r"Invalid drop_rate: 'x'; it must be a number in \[0, 1\]"),
    (dict(foreach="yes"), r"Invalid foreach: 'yes'; it must be True, False or None"),
    (dict(ascent="momentum", ascent_interval=2), r"ascent_interval=2 reuses a stored ε"),
])
def test_options_refuse_bad_and_ignored_values_naming_the_fix(options, message):
    with pytest.raises(ValueError, match=message):
        SAMOptions(**options)


def test_options_are_one_frozen_value_that_sam_takes_or_builds_from_keywords():
    model = make_cnn()
    options = SAMOptions(rho=0.7, perturbation="asam")
    sam = normsam.SAM(model, torch.optim.SGD, options, lr=0.1, scope="all")  # a keyword replaces a field
    assert sam.options == options.replace(scope="all") and sam.options.rho == 0.7 and sam.scope == "all"
    assert sam.norm_over == "perturbed" and sam.eta == 0.01  # read through; eta resolved from the model
    with pytest.raises(Exception, match="cannot assign|frozen"):
        options.rho = 0.1  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"Unknown option 'rhoo': SAM has no such option\. Did you mean 'rho'\?"):
        options.replace(rhoo=0.1)


def test_assigning_an_option_on_a_built_sam_raises_with_the_way_to_change_it():
    sam = normsam.SAM(make_cnn(), torch.optim.SGD, lr=0.1, rho=0.5)
    for name, value in (("norm_over", "all"), ("foreach", False), ("rho", 0.1), ("eta", 0.2), ("scope", "all")):
        with pytest.raises(ValueError, match=rf"SAM's {name} is fixed when SAM is built .*sam\.options\.replace\("
                                             rf"{name}=\.\.\.\).*each param group's 'rho'"):
            setattr(sam, name, value)
    assert sam.norm_over == "perturbed"


def test_a_typo_in_a_sam_option_is_not_blamed_on_the_base_optimizer():
    with pytest.raises(ValueError, match=r"Unknown option 'ascnet_interval': neither SAM nor SGD takes it\. Did you "
                                         r"mean 'ascent_interval'\?"):
        normsam.SAM(make_cnn(), torch.optim.SGD, rho=0.5, lr=0.1, ascnet_interval=2)


@pytest.mark.parametrize("foreach", [True, False])
def test_a_foreach_given_to_sam_reaches_the_base_optimizer(foreach):
    sam = normsam.SAM(make_cnn(), torch.optim.SGD, rho=0.5, lr=0.1, foreach=foreach)
    assert all(g["foreach"] is foreach for g in sam.base_optimizer.param_groups)
    assert normsam.SAM(make_cnn(), torch.optim.SGD, rho=0.5, lr=0.1).base_optimizer.defaults["foreach"] is None  # its own


def test_the_signature_shows_every_option_from_the_one_list():
    import dataclasses
    import inspect

    params = inspect.signature(normsam.SAM).parameters
    for field in dataclasses.fields(SAMOptions):
        assert params[field.name].kind is inspect.Parameter.KEYWORD_ONLY
        assert params[field.name].default == field.default


# --- the scope split ---------------------------------------------------------------------------------------


def test_one_split_places_groups_as_param_groups_and_add_param_group_do():
    model = make_cnn()
    names = {id(p): n for n, p in model.named_parameters()}
    in_scope = {id(model.bn1.weight), id(model.gn.bias)}
    parts = split_by_scope({"params": list(model.parameters()), "weight_decay": 0.1}, in_scope, names, rho=2.0)
    assert [g["perturb"] for g in parts] == [True, False] and parts[0]["rho"] == 2.0 and "rho" not in parts[1]
    assert parts[0]["param_names"] == ["bn1.weight", "gn.bias"] and all(g["weight_decay"] == 0.1 for g in parts)
    split = ScopeSplit(model, "norm", None, None)
    from_module = split.initial_groups(model)
    placed = ScopeSplit(model, "norm", None, None).place({"params": list(model.parameters())})
    for a, b in zip(from_module, placed):
        assert a["perturb"] == b["perturb"] and a["param_names"] == b["param_names"]


# --- the storage ------------------------------------------------------------------------------------------


def test_sam_on_vectors_take_the_flat_layout_and_others_one_tensor_each():
    model = make_cnn()
    assert isinstance(_storage(model)[1], FlatPerturbedTensors)
    for scope, options in (("all", {}), ("norm", {"perturbation": "layerwise"}), ("norm", {"foreach": False}),
                           ("norm", {"norm_over": "all"})):
        storage = _storage(model, scope, **options)[1]
        assert type(storage) is PerturbedTensors, (scope, options)


@pytest.mark.parametrize("scope", ["norm", "all"])
def test_perturb_then_restore_is_exact_and_touches_only_live_tensors(scope):
    model = make_cnn()
    _, storage = _storage(model, scope)
    before = [p.detach().clone() for p in storage.params]
    eps = [torch.full_like(p, 0.25) for p in storage.params]
    eps[1] = None  # no ε for this one this step
    with torch.no_grad():
        storage.begin()
        storage.perturb(eps)
    for p, b, e in zip(storage.params, before, eps):
        assert torch.equal(p, b if e is None else b + e)
    with torch.no_grad():
        storage.restore()
    assert all(torch.equal(p, b) for p, b in zip(storage.params, before))


def test_the_layout_key_changes_with_requires_grad_and_the_groups():
    model = make_cnn()
    groups, storage = _storage(model)
    assert storage.key == layout_key(groups)
    model.gn.weight.requires_grad_(False)
    assert storage.key != layout_key(groups)


def test_the_flat_layout_packs_only_one_rho_and_a_complete_gradient():
    model = make_cnn()
    groups, storage = _storage(model)
    grads = list(torch.autograd.grad(_loss(model), storage.params))
    packed = storage.packed(grads, [])
    assert packed is not None and packed.grads[0].numel() == sum(p.numel() for p in storage.params)
    assert storage.packed([None, *grads[1:]], []) is None
    groups[0]["rho"] = 0.9  # two ρ: SAM-ON's groups here are one perturbed group, so make a second
    split = [dict(groups[0], params=groups[0]["params"][:2]), dict(groups[0], params=groups[0]["params"][2:], rho=0.1)]
    two = perturbed_tensors(split + groups[1:], SAMOptions(), get_perturbation("sam"), masked=False)
    assert two.packed(list(torch.autograd.grad(_loss(model), two.params)), []) is None


# --- the ε builder ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pert", ["sam", "asam", "layerwise", "linf", "fisher"])
@pytest.mark.parametrize("scope", ["norm", "all"])
def test_fresh_epsilon_on_any_layout_equals_the_reference_formula(pert, scope):
    model = make_cnn()
    opts = SAMOptions(scope=scope, perturbation=pert)
    groups = normsam.param_groups(model, scope, rho=0.5)
    storage = perturbed_tensors(groups, opts, get_perturbation(pert), masked=False)
    grads = list(torch.autograd.grad(_loss(model), storage.params))
    with torch.no_grad():
        storage.begin()  # (the flat layout's ε reads w from the backup it takes here)
        eps, finite, _ = fresh_epsilon(storage, grads, [], eta=opts.resolved_eta, foreach=True, norm_over="perturbed")
    expected = perturbation(grads, storage.params, model=get_perturbation(pert), rhos=[0.5] * len(grads),
                            eta=opts.resolved_eta, scaled=storage.scaled, foreach=False)
    assert bool(finite)
    for a, b in zip(eps, expected):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_a_nonfinite_direction_gives_zero_epsilon_and_a_false_flag():
    model = make_cnn()
    _, storage = _storage(model, "all", perturbation="asam")
    grads = list(torch.autograd.grad(_loss(model), storage.params))
    grads[0] = grads[0].clone()
    grads[0].view(-1)[0] = float("nan")
    eps, finite, _ = fresh_epsilon(storage, grads, [], eta=0.01, foreach=True, norm_over="perturbed")
    assert not bool(finite) and all(not e.any() for e in eps)


# --- the ascent sources and the stored ε -----------------------------------------------------------------


def test_gradient_ascent_names_the_missing_gradient():
    model = make_cnn()
    _, storage = _storage(model)
    with pytest.raises(ValueError, match=r"none of the 4 perturbed tensors has an ascent gradient: call "
                                         r"loss\.backward\(\) before first_step\(\)"):
        GradientAscent().direction(storage, None)


def test_momentum_ascent_is_minus_the_base_optimizers_momentum():
    model = make_cnn()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _, storage = _storage(model)
    source = MomentumAscent(sgd)
    assert source.direction(storage) == ([None] * 4, [])  # no momentum before the first step
    _loss(model).backward()
    sgd.step()
    direction, _ = source.direction(storage)
    for d, p in zip(direction, storage.params):
        assert torch.equal(d, -sgd.state[p]["momentum_buffer"])


def test_the_stored_epsilon_reuses_realigns_and_round_trips():
    a, b, c = (torch.ones(2) * i for i in range(3))
    stored = StoredEpsilon(3)
    assert stored.is_fresh(0)
    stored.keep([a + 1, None, c + 1], [a, b, c])
    assert not stored.is_fresh(1) and not stored.is_fresh(2) and stored.is_fresh(3)
    assert stored.epsilon_for([c, a]) == [stored.eps[2], stored.eps[0]]  # realigned by identity
    state = stored.state_dict({id(a): 0, id(b): 1, id(c): 2})
    assert set(state) == {0, 2}
    other = StoredEpsilon(3)
    other.load_state_dict(state, [a, b, c], [a, b, c])
    assert torch.equal(other.eps[0], a + 1) and other.eps[1] is None
    assert StoredEpsilon(1).is_fresh(5)
    one = StoredEpsilon(1)
    one.keep([a], [a])
    assert one.eps is None  # nothing kept without ascent_interval


# --- an API with no surprises -----------------------------------------------------------------------------


def test_step_returns_the_first_pass_loss_on_every_kind_of_step():
    model = make_cnn()
    sam = normsam.SAM(model, torch.optim.SGD, lr=0.1, rho=0.5, ascent_interval=2)

    def closure():
        loss = _loss(model)
        loss.backward()
        return loss

    for _ in range(3):  # fresh, reuse, fresh
        expected = _loss(model).detach() if sam.needs_ascent else None
        loss = sam.step(closure)
        sam.zero_grad()
        assert isinstance(loss, torch.Tensor)
        if expected is not None:
            torch.testing.assert_close(loss.detach(), expected)


def test_a_loss_given_to_the_momentum_ascent_is_refused():
    model = make_cnn()
    sam = normsam.SAM(model, torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.5, ascent="momentum")
    with pytest.raises(ValueError, match=r"first_step\(loss\): ascent='momentum' perturbs along the momentum, so "
                                         r"this step takes no ascent pass and the loss would be ignored"):
        sam.first_step(_loss(model))
    assert not sam.is_perturbed and sam.counters["sam_steps"] == 0


def test_the_grad_scaler_is_passed_once_and_equals_the_manual_route():
    models = [make_cnn(dtype=torch.float32) for _ in range(2)]
    once = normsam.SAM(models[0], torch.optim.SGD, lr=0.1, rho=0.5,
                       grad_scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))
    manual = normsam.SAM(models[1], torch.optim.SGD, lr=0.1, rho=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for step in range(2):
        x, y = make_batch(seed=step, dtype=torch.float32)
        once.grad_scaler.scale(F.cross_entropy(models[0](x), y)).backward()
        once.first_step(zero_grad=True)
        once.grad_scaler.scale(F.cross_entropy(models[0](x), y)).backward()
        once.second_step(zero_grad=True)
        scaler.scale(F.cross_entropy(models[1](x), y)).backward()
        manual.first_step(zero_grad=True, grad_scaler=scaler)
        scaler.scale(F.cross_entropy(models[1](x), y)).backward()
        manual.restore()
        scaler.step(manual.base_optimizer)
        scaler.update()
        manual.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(*(m.parameters() for m in models)))


def test_perturbed_parameters_still_works_for_one_release_with_a_warning():
    sam = normsam.SAM(make_cnn(), torch.optim.SGD, rho=0.5, lr=0.1)
    with pytest.warns(DeprecationWarning, match=r"use sam\.ascent_inputs\(\)"):
        assert sam.perturbed_parameters() == sam.ascent_inputs()


def test_lightnings_closure_without_the_mixin_is_refused():
    class Precision:  # stands for Lightning's precision plugin, whose bound method Lightning wraps in a partial
        def wrap(self, closure):
            return closure()

    Precision.__module__ = "lightning.pytorch.plugins.precision.precision"
    model = make_cnn()
    sam = normsam.SAM(model, torch.optim.SGD, lr=0.1, rho=0.5)

    def training_closure():
        loss = _loss(model)
        loss.backward()
        return loss

    with pytest.raises(ValueError, match=r"Lightning's training closure.*class Model\(SAMModule, LightningModule\)"):
        sam.step(functools.partial(Precision().wrap, training_closure))
    assert not sam.is_perturbed and sam.counters["sam_steps"] == 0
    assert sam.step(functools.partial(Precision().wrap, lambda: None)) is None  # the mixin's skipped batch


def test_a_rho_set_out_of_range_on_a_group_is_refused_at_the_next_step():
    model = make_cnn()
    sam = normsam.SAM(model, torch.optim.SGD, lr=0.1, rho=0.5)
    sam.param_groups[0]["rho"] = -1.0
    with pytest.raises(ValueError, match=r"Invalid rho of a param group: -1\.0"):
        sam.first_step(_loss(model))
    assert not sam.is_perturbed


def test_repr_shows_the_rho_of_the_groups_after_a_load():
    model = make_cnn()
    source = normsam.SAM(model, torch.optim.SGD, lr=0.1, rho=0.5)
    for g in source.param_groups:
        g["rho"] = 0.25
    sam = normsam.SAM(model, torch.optim.SGD, lr=0.1, rho=0.5)
    sam.load_state_dict(source.state_dict())
    assert "rho=0.25" in repr(sam) and "rho=0.25" in sam.describe()


@pytest.mark.parametrize(("make_state", "message"), [
    (lambda model: torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).state_dict(),
     r"this is a plain optimizer's state dict \(no SAM part, groups without 'perturb'\)"),
    (lambda model: normsam.SAM(model, torch.optim.AdamW, rho=0.5, lr=0.1).state_dict(),
     r"the state dict is SAM over AdamW, this SAM wraps SGD"),
])
def test_state_dicts_that_do_not_fit_are_refused(make_state, message):
    model = make_cnn()
    sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=message):
        sam.load_state_dict(make_state(model))


def test_norm_layers_frozen_after_sam_was_built_get_a_clear_error_and_repr_still_works():
    model = make_cnn()
    sam = normsam.SAM(model, torch.optim.SGD, lr=0.1, rho=0.5)
    for m in (model.bn1, model.gn):
        m.requires_grad_(False)
    assert "perturbed=0/" in repr(sam)
    with pytest.raises(ValueError, match=r"SAM has no trainable tensor to perturb: every tensor of the perturbed "
                                         r"groups has requires_grad=False \(frozen after SAM was built\?\)"):
        sam.first_step(_loss(model))
    assert sam.counters["sam_steps"] == 0


def test_rho_is_required_with_the_typical_ranges_of_the_perturbation_model():
    """SAM-ON's default scope needs 5-10x SAM-all's radius: no single default fits both (issue 26)."""
    with pytest.raises(ValueError, match=r"rho is required: .*perturbation='asam' the paper's range is 5-10 for SAM-ON "
                                         r"\(scope='norm', the default with a model\) and 2\.5-5 for SAM-all"):
        normsam.SAM(make_cnn(), torch.optim.SGD, lr=0.1, perturbation="asam")
    model = make_cnn()
    sam = normsam.SAM(normsam.param_groups(model, "norm", rho=0.7), torch.optim.SGD, model=model, lr=0.1)
    assert [g["rho"] for g in sam.param_groups] == [0.7, 0.0]  # a group's own ρ is enough; others are unused
    with pytest.raises(ValueError, match="rho is required"):
        sam.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "perturb": True,
                             "param_names": ["extra.weight"]})


def test_ascent_inputs_name_every_tensor_whose_ascent_gradient_is_read():
    """norm_over='all' (the norm) and descent_over='all' (a descent rule) read the other tensors' ascent gradients
    too: a cheap ascent by hand (backward(inputs=sam.ascent_inputs())) must compute them (issue 26: the runner's
    norm_over='all' silently took the norm over the norm layers only)."""
    model = make_cnn()
    norm = {id(p) for p in (model.bn1.weight, model.bn1.bias, model.gn.weight, model.gn.bias)}
    assert {id(p) for p in normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1).ascent_inputs()} == norm
    for options in (dict(norm_over="all"), dict(variant="gsam", descent_over="all")):
        inputs = normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1, **options).ascent_inputs()
        assert {id(p) for p in inputs} == {id(p) for p in model.parameters()}, options


# --- the dot products descent rules read --------------------------------------------------------------------


def _reference_dot(xs, ys):
    """The plain statement: Σ x·y with every product and the sum in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for x, y in zip(xs, ys):
        total = total + torch.sum(x.double() * y.double())
    return total


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_storage_dots_equal_the_float64_reference(dtype):
    torch.manual_seed(0)
    model = make_cnn().to(dtype)
    _, storage = _storage(model, scope="all")
    params = storage.params
    xs = [torch.randn_like(p) for p in params]
    ys = [torch.randn_like(p) for p in params]
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-6}[dtype]
    total, each, squares = storage.dot(xs, ys, params), storage.dot_each(xs, ys, params), storage.squared_norm_each(xs, params)
    assert total.dtype == each.dtype == squares.dtype == torch.float64
    assert each.shape == squares.shape == (len(params),) and len(params) > 4
    torch.testing.assert_close(total, _reference_dot(xs, ys), rtol=tol, atol=tol)
    for e, sq, x, y in zip(each, squares, xs, ys):
        torch.testing.assert_close(e, _reference_dot([x], [y]), rtol=tol, atol=tol)
        # the norm in the tensor's own dtype (as every norm of the ε math), squared in float64
        sq_tol = 1e-2 if dtype == torch.bfloat16 else tol
        torch.testing.assert_close(sq, _reference_dot([x], [x]), rtol=sq_tol, atol=sq_tol)
    assert storage.dot([], [], []).item() == 0.0
    assert storage.dot_each([], [], []).shape == storage.squared_norm_each([], []).shape == (0,)
