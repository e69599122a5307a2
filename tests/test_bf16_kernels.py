"""``bf16_kernels="upcast"``: bf16 autocast whose matrix products run on the fp32 kernels (normsam.optim.amp).

The claim under test: inside the context, every bf16 convolution and matrix product, forward and backward,
equals the fp32 kernel applied to its bf16 operands with the result rounded to bf16 (bit for bit), nothing
else changes, and a run trained with it is bf16 autocast's run up to bf16 rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from normsam.files import read_yaml
from normsam.optim.amp import upcast_bf16_matmuls
from normsam.train import checkpoint as ckpt
from normsam.train.config import load_config
from normsam.train.identity import config_fingerprint
from normsam.train.loop import Trainer
from tests.test_scale import TINY, _torchrun

BF16 = torch.bfloat16


def _operands(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 9, 9, generator=g)
    w = torch.randn(5, 3, 3, 3, generator=g, requires_grad=True)
    b = torch.randn(5, generator=g, requires_grad=True)
    return x.requires_grad_(), w, b


def _reference_conv(x, w, b):
    """The rule written out: fp32 convolution of the bf16-rounded operands, rounded back to bf16 (autograd of
    the casts rounds each gradient the same way autocast's casts do)."""
    return F.conv2d(x.to(BF16).float(), w.to(BF16).float(), b.to(BF16).float(), padding=1).to(BF16)


def test_a_convolution_and_its_gradients_equal_the_fp32_kernel_on_bf16_operands_bit_for_bit():
    x, w, b = _operands()
    with upcast_bf16_matmuls(), torch.autocast("cpu", dtype=BF16):
        out = F.conv2d(x, w, b, padding=1)
    assert out.dtype == BF16  # autocast's result type is kept
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(BF16)
    with upcast_bf16_matmuls():
        got = torch.autograd.grad(out, (x, w, b), grad_out)
    ref_out = _reference_conv(x, w, b)
    want = torch.autograd.grad(ref_out, (x, w, b), grad_out)
    assert torch.equal(out, ref_out)
    for g, r in zip(got, want):
        assert g.dtype == r.dtype == torch.float32 and torch.equal(g, r)
    # and the rounding is real: the bf16 result is not the fp32 convolution of the unrounded operands
    assert not torch.equal(out.float(), F.conv2d(x, w, b, padding=1))


def test_a_linear_layer_equals_the_fp32_kernel_on_bf16_operands_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    x, w, b = (torch.randn(*s, generator=g, requires_grad=True) for s in ((6, 7), (4, 7), (4,)))
    with upcast_bf16_matmuls(), torch.autocast("cpu", dtype=BF16):
        out = F.linear(x, w, b)
    with upcast_bf16_matmuls():
        got = torch.autograd.grad(out.float().square().sum(), (x, w, b))
    ref = F.linear(x.to(BF16).float(), w.to(BF16).float(), b.to(BF16).float()).to(BF16)
    want = torch.autograd.grad(ref.float().square().sum(), (x, w, b))
    assert out.dtype == BF16 and torch.equal(out, ref)
    for a, r in zip(got, want):
        assert torch.equal(a, r)


def test_outside_bf16_the_context_changes_nothing():
    x, w, b = _operands(2)
    plain = F.conv2d(x, w, b, padding=1)
    with upcast_bf16_matmuls():
        same = F.conv2d(x, w, b, padding=1)
        double = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    assert torch.equal(plain, same) and double.dtype == torch.float64
    with upcast_bf16_matmuls("native"), torch.autocast("cpu", dtype=BF16):  # native: autocast as it is
        native = F.conv2d(x, w, b, padding=1)
    assert native.dtype == BF16


def test_a_model_under_upcast_kernels_matches_native_bf16_kernels_to_bf16_rounding():
    from normsam.train.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=1)
    x, y = torch.randn(16, 1, 12, 12), torch.randint(0, 10, (16,))

    def loss_and_grads(kernels, amp=True):
        model.zero_grad()
        with upcast_bf16_matmuls(kernels):
            with torch.autocast("cpu", dtype=BF16, enabled=amp):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])

    (l_nat, g_nat), (l_up, g_up), (l_32, g_32) = (loss_and_grads("native"), loss_and_grads("upcast"),
                                                  loss_and_grads("native", amp=False))
    assert l_up == pytest.approx(l_nat, rel=2e-2) and l_up == pytest.approx(l_32, rel=2e-2)
    # both bf16 gradients sit at bf16's distance from fp32's (a few %), not at a wrong result's
    for g in (g_nat, g_up):
        assert 1e-4 < ((g - g_32).norm() / g_32.norm()).item() < 0.3
    assert ((g_up - g_nat).norm() / g_nat.norm()).item() < 0.3


@pytest.mark.parametrize(("overrides", "match"), [
    ({"bf16_kernels": "upcast"}, "set amp=bf16 or drop bf16_kernels"),
    ({"bf16_kernels": "upcast", "amp": "fp16"}, "set amp=bf16 or drop bf16_kernels"),
    ({"bf16_kernels": "fast", "amp": "bf16"}, "valid values are native, upcast"),
    ({"bf16_kernels": "upcast", "amp": "bf16", "device": "cuda"}, "drop bf16_kernels"),
    ({"bf16_kernels": "upcast", "amp": "bf16", "compile": True}, "compile=true"),
    ({"bf16_kernels": "upcast", "amp": "bf16", "parallel": "fsdp"}, "parallel=fsdp"),
])
def test_bf16_kernels_is_refused_where_it_would_do_nothing_or_is_untested(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, {**TINY, **overrides})


def test_the_upcast_context_refuses_an_unknown_value():
    with pytest.raises(ValueError, match="valid values are native, upcast"):
        upcast_bf16_matmuls("fp32")


def test_the_key_at_its_default_keeps_the_fingerprint_of_runs_trained_before_it_existed():
    cfg = load_config(None, dict(TINY))
    assert config_fingerprint(cfg) == "dc87098c5aeb"  # the fingerprint this config had before the key existed
    upcast = load_config(None, {**TINY, "amp": "bf16", "bf16_kernels": "upcast"})
    native = load_config(None, {**TINY, "amp": "bf16"})
    assert config_fingerprint(upcast) != config_fingerprint(native)


def test_the_runner_trains_under_upcast_kernels_and_lands_near_native_bf16(tmp_path):
    runs = {}
    for kernels in ("native", "upcast"):
        cfg = load_config(None, {**TINY, "model": "resnet20", "amp": "bf16", "bf16_kernels": kernels,
                                 "scope": "norm", "rho": 0.5, "out": str(tmp_path / kernels)})
        Trainer(cfg).run()
        runs[kernels] = ckpt.read_jsonl(tmp_path / kernels / "metrics.jsonl")
        assert read_yaml(tmp_path / kernels / "config.yaml")["bf16_kernels"] == kernels
    for a, b in zip(runs["native"], runs["upcast"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=5e-2)
        assert a["train_loss"] != b["train_loss"]  # the kernels really changed (bf16 rounding differs)


@pytest.mark.slow  # 15 s of two gloo processes; the one-process upcast tests above stay in make test
def test_ddp_trains_under_upcast_kernels_like_one_process(tmp_path):
    args = {**TINY, "model": "resnet20", "norm": "group", "scope": "norm", "perturbation": "asam", "rho": 2.0,
            "amp": "bf16", "bf16_kernels": "upcast", "sync_ascent": True, "epochs": 1}
    done = _torchrun([*(f"{k}={v}" for k, v in args.items()), f"out={tmp_path / 'ddp'}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    Trainer(load_config(None, {**args, "out": str(tmp_path / "one")})).run()
    ddp, one = (ckpt.read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("ddp", "one"))
    for key in ("train_loss", "test_loss"):  # the global batch's step, up to bf16 rounding of each rank's half
        assert ddp[0][key] == pytest.approx(one[0][key], rel=2e-2), key
