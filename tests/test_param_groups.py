"""Parameter groups keep the scope: tensors or groups passed with model= are perturbed by scope (SAM-ON by
default), matched by identity; without a model every tensor is perturbed and repr says so; and
normsam.param_groups(weight_decay=...) follows the no-decay-on-norm-and-bias convention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from torch import nn

import normsam
from tests.conftest import make_cnn

NORM_NAMES = {"bn1.weight", "bn1.bias", "gn.weight", "gn.bias"}


def perturbed_names(sam: normsam.SAM) -> set[str]:
    return {n for g in sam.param_groups if g["perturb"] for n in g["param_names"]}


def test_timm_weight_decay_groups_with_the_model_give_sam_on():
    model = make_cnn()
    groups = param_groups_weight_decay(model, weight_decay=0.05)
    sam = normsam.SAM(groups, torch.optim.AdamW, model=model, lr=1e-3, rho=0.5)
    assert sam.scope == "norm"
    assert perturbed_names(sam) == NORM_NAMES
    norm_params = [model.bn1.weight, model.bn1.bias, model.gn.weight, model.gn.bias]
    assert {id(p) for p in sam.ascent_inputs()} == {id(p) for p in norm_params}
    # timm's per-group options survive the split: every parameter keeps the weight decay timm gave it
    decay_of = {id(p): g["weight_decay"] for g in sam.param_groups for p in g["params"]}
    wanted = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay_of == wanted
    assert "perturbed=16/" in repr(sam) and "no model given" not in repr(sam)


def test_model_parameters_with_model_equals_sam_on_the_module(batch):
    """Same trajectory as SAM(model): the tensors route is SAM-ON too, not SAM on all."""
    x, y = batch
    a, b = make_cnn(), make_cnn()
    sam_a = normsam.SAM(a, torch.optim.SGD, rho=0.5, lr=0.1)
    sam_b = normsam.SAM(b.parameters(), torch.optim.SGD, model=b, rho=0.5, lr=0.1)
    assert perturbed_names(sam_b) == NORM_NAMES
    for model, sam in ((a, sam_a), (b, sam_b)):
        def closure(model=model):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        for _ in range(2):
            sam.step(closure)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_scope_and_include_apply_to_groups_given_with_a_model():
    model = make_cnn()
    sam = normsam.SAM(model.parameters(), torch.optim.SGD, rho=0.5, model=model, scope="norm", exclude=["gn.*"], lr=0.1)
    assert perturbed_names(sam) == {"bn1.weight", "bn1.bias"}
    sam = normsam.SAM(model.parameters(), torch.optim.SGD, rho=0.5, model=model, scope="all", lr=0.1)
    assert len(sam.ascent_inputs()) == len(list(model.parameters()))


def test_groups_with_an_explicit_perturb_keep_it():
    model = make_cnn()
    sam = normsam.SAM(normsam.param_groups(model, "all"), torch.optim.SGD, rho=0.5, model=model, lr=0.1)
    assert sam.scope == "groups"
    assert len(sam.ascent_inputs()) == len(list(model.parameters()))


def test_without_a_model_tensors_mean_sam_on_all_and_repr_says_so():
    model = make_cnn()
    sam = normsam.SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    assert sam.scope == "all"
    assert len(sam.ascent_inputs()) == len(list(model.parameters()))
    assert "no model given: SAM on every tensor passed, not SAM-ON" in repr(sam)
    assert "no model given" in sam.describe()
    assert "no model given" not in repr(normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1))


def test_tensors_that_are_not_the_models_are_an_error():
    model, other = make_cnn(), nn.Linear(3, 3)
    with pytest.raises(ValueError, match=r"2 tensor\(s\) passed to SAM are not parameters of model= \(SmallCNN\)"):
        normsam.SAM([*model.parameters(), *other.parameters()], torch.optim.SGD, rho=0.5, model=model, lr=0.1)


def test_describe_lists_the_perturbed_tensors():
    model = make_cnn()
    text = normsam.SAM(param_groups_weight_decay(model), torch.optim.SGD, rho=0.5, model=model, lr=0.1).describe()
    assert text.startswith("scope='norm': 16 of ")
    assert all(name in text for name in NORM_NAMES)


def test_param_groups_weight_decay_skips_norm_and_bias():
    model = make_cnn()
    groups = normsam.param_groups(model, weight_decay=0.05, rho=0.5)
    decay = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    assert decay == {
        "conv1.weight": 0.05, "conv2.weight": 0.05, "head.weight": 0.05,
        "conv1.bias": 0.0, "head.bias": 0.0, **{n: 0.0 for n in NORM_NAMES},
    }
    assert all(g["rho"] == 0.5 for g in groups if g["perturb"])
    assert all("rho" not in g for g in groups if not g["perturb"])
    # SAM-all: the perturbed set is itself split into decay and no-decay groups
    groups = normsam.param_groups(model, "all", weight_decay=0.05)
    assert [(g["perturb"], g["weight_decay"]) for g in groups] == [(True, 0.05), (True, 0.0)]
    # without weight_decay nothing is set, so the optimizer's own default applies to every group
    assert all("weight_decay" not in g for g in normsam.param_groups(model))


def test_sam_on_param_groups_with_weight_decay_train(batch):
    x, y = batch
    model = make_cnn()
    sam = normsam.SAM(normsam.param_groups(model, weight_decay=0.05), torch.optim.AdamW, model=model, lr=1e-2, rho=0.5)
    before = F.cross_entropy(model(x), y).item()
    for _ in range(5):
        loss = F.cross_entropy(model(x), y)
        sam.first_step(loss)
        F.cross_entropy(model(x), y).backward()
        sam.second_step(zero_grad=True)
    assert F.cross_entropy(model(x), y).item() < before
