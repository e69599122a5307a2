"""scope="norm" on real model zoos, transformers-style RMSNorms, and name traps."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

import normsam
from normsam.optim.scopes import select


def _selected_names(model, scope="norm", **kw):
    selected, _ = select(model, scope, **kw)
    return {i.name for i in selected}


class LlamaStyleRMSNorm(nn.Module):
    """A plain nn.Module with a 1-D weight, as HuggingFace writes RMSNorm."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x


class GemmaStyleRMSNorm(nn.Module):
    """Weight initialized at zero and applied as 1 + weight."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x * (1.0 + self.weight)


class NormalizedLinear(nn.Module):
    """A trap: 'Norm' in the class name, but it owns a 2-D weight."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))
        self.bias = nn.Parameter(torch.zeros(4))

    def forward(self, x):
        return x @ (self.weight / self.weight.norm(dim=1, keepdim=True)).T + self.bias


class TinyDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.input_layernorm = LlamaStyleRMSNorm(8)
        self.bn_proj = nn.Linear(8, 8)  # name trap: not a norm layer
        self.post_norm = GemmaStyleRMSNorm(8)
        self.normalized = NormalizedLinear()  # trap: "Norm" in the name, 2-D weight
        self.torch_rms = nn.RMSNorm(8)
        self.head = nn.Linear(8, 10, bias=False)

    def forward(self, tokens):
        h = self.input_layernorm(self.embed(tokens))
        h = self.post_norm(self.bn_proj(self.normalized(h[..., :4]).repeat(1, 1, 2)))
        return self.head(self.torch_rms(h))


def test_torchvision_resnet18_includes_downsample_batchnorm():
    model = torchvision.models.resnet18(weights=None)
    names = _selected_names(model)
    bns = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) for p in ("weight", "bias")}
    assert names == bns
    assert "layer2.0.downsample.1.weight" in names and "layer2.0.downsample.1.bias" in names
    assert not any(n.startswith("fc.") or ".conv" in n for n in names)


def test_torchvision_vit_b_16_selects_its_layernorms():
    model = torchvision.models.vit_b_16(weights=None)
    names = _selected_names(model)
    assert "encoder.ln.weight" in names and "encoder.layers.encoder_layer_0.ln_1.bias" in names
    assert len(names) == 2 * (2 * 12 + 1)  # ln_1, ln_2 per block + final ln, each γ and β
    assert normsam.describe_scope(model, "norm").share < 0.001


def test_timm_vit_convnext_and_batchnormact():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    assert _selected_names(vit) == {
        n for n, _ in vit.named_parameters() if ".norm" in f".{n}" and n.rsplit(".", 1)[-1] in ("weight", "bias")
    }
    convnext = timm.create_model("convnext_atto", pretrained=False)
    classes = {type(i.module).__name__ for i in select(convnext, "norm")[0]}
    assert classes == {"LayerNorm2d"}  # the head's NormMlpClassifierHead is not a norm itself, its .norm is
    assert "head.norm.weight" in _selected_names(convnext)
    effnet = timm.create_model("mobilenetv3_small_050", pretrained=False)
    classes = {type(i.module).__name__ for i in select(effnet, "norm")[0]}
    assert classes == {"BatchNormAct2d"}
    assert len(select(effnet, "norm")[0]) == 2 * sum(type(m).__name__ == "BatchNormAct2d" for m in effnet.modules())


def test_transformers_style_rmsnorms_and_name_traps():
    model = TinyDecoder()
    names = _selected_names(model)
    assert names == {"input_layernorm.weight", "post_norm.weight", "torch_rms.weight"}
    assert not normsam.is_norm_layer(NormalizedLinear())
    assert normsam.is_norm_layer(GemmaStyleRMSNorm(4)) and normsam.is_norm_layer(LlamaStyleRMSNorm(4))
    no_affine = nn.Sequential(nn.LayerNorm(4, elementwise_affine=False), nn.Linear(4, 4))
    assert normsam.is_norm_layer(no_affine[0]) and _selected_names(no_affine, "no-norm") == {"1.weight", "1.bias"}


def test_unnamed_batchnorm_in_sequential_and_bn_named_linear():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model.add_module("bn_head", nn.Linear(4, 2))
    assert _selected_names(model) == {"1.weight", "1.bias"}


def test_instance_norm_affine_and_groupnorm_subclass():
    class MyGroupNorm(nn.GroupNorm):
        pass

    model = nn.Sequential(nn.InstanceNorm2d(3, affine=True), MyGroupNorm(1, 3), nn.InstanceNorm2d(3))
    assert _selected_names(model) == {"0.weight", "0.bias", "1.weight", "1.bias"}


def test_no_norm_include_exclude_predicate_and_patterns():
    model = torchvision.models.resnet18(weights=None)
    norm, no_norm = _selected_names(model), _selected_names(model, "no-norm")
    assert norm.isdisjoint(no_norm) and norm | no_norm == {n for n, _ in model.named_parameters()}
    layer1 = _selected_names(model, lambda info: info.is_norm and info.name.startswith("layer1."))
    assert layer1 == {n for n in norm if n.startswith("layer1.")}
    gammas = _selected_names(model, ["*bn*.weight"])
    assert gammas == {n for n in norm if n.endswith(".weight") and "bn" in n}
    assert _selected_names(model, "norm", exclude=["*.bias"]) == {n for n in norm if n.endswith("weight")}
    assert "fc.bias" in _selected_names(model, "norm", include=["fc.bias"])


def test_param_groups_and_describe_scope_table():
    model = torchvision.models.resnet18(weights=None)
    groups = normsam.param_groups(model, "norm", rho=0.5)
    assert [g["perturb"] for g in groups] == [True, False]
    assert groups[0]["rho"] == 0.5 and "rho" not in groups[1]
    assert groups[0]["param_names"][0] == "bn1.weight"
    report = normsam.describe_scope(model, "norm")
    total = sum(p.numel() for p in model.parameters())
    assert report.total_numel == total
    assert report.selected_numel == sum(p.numel() for p in groups[0]["params"])
    row = next(r for r in report.rows if r.module == "layer2.0.downsample.1" and r.parameter == "weight")
    assert (row.cls, row.numel) == ("BatchNorm2d", 128)
    assert row.share == pytest.approx(128 / total)
    text = str(report)
    assert "layer2.0.downsample.1" in text and "BatchNorm2d" in text
    assert f"{report.selected_numel:,} of {total:,} parameters" in text


def test_scope_errors():
    mlp = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="scope='norm' selects no parameters"):
        normsam.param_groups(mlp, "norm")
    with pytest.raises(ValueError, match="selects no parameters"):
        normsam.param_groups(mlp, ["nothing.*"])
    with pytest.raises(ValueError, match="Unknown scope 'layers'.*glob patterns"):
        normsam.describe_scope(mlp, "layers")
    with pytest.raises(ValueError, match="non-empty list of glob strings"):
        normsam.param_groups(mlp, [])
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        normsam.param_groups(frozen, "all")


def test_frozen_norm_layers_are_called_frozen_not_missing():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model[1].requires_grad_(False)
    frozen = r"their affine parameters are frozen \(requires_grad=False: 1\.weight, 1\.bias\).*requires_grad_\(True\)"
    with pytest.raises(ValueError, match=frozen) as info:
        normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1)
    assert "has no normalization layer" not in str(info.value)
    many = nn.Sequential(*[nn.LayerNorm(2) for _ in range(3)], nn.Linear(2, 2))
    for layer in many[:3]:
        layer.requires_grad_(False)
    with pytest.raises(ValueError, match=r"0\.weight, 0\.bias, 1\.weight, 1\.bias and 2 more"):
        normsam.param_groups(many, "norm")


@pytest.mark.parametrize("max_rows", [0, 1])
def test_describe_scope_table_with_few_rows(max_rows):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    lines = normsam.describe_scope(model, "norm").table(max_rows=max_rows).splitlines()
    assert lines[0].split() == ["module", "class", "parameter", "numel", "share"]
    assert len(lines) == 2 + max_rows + 2  # header, rule, rows, "... more rows", totals
    assert lines[-2] == f"... {2 - max_rows} more rows"
    assert lines[-1].startswith("'norm': 8 of 120 parameters")
