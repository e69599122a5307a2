"""CUDA correctness checks for a borrowed GPU (run by benchmarks/gpu.sh; needs no data set).

1. the cheap ascent gives the classic two-pass trajectory on CUDA (ResNet-20, 5 steps);
2. bf16 autocast and fp16 + GradScaler train with SAM-ON (finite, decreasing loss);
3. a torch.compile'd model trains with SAM-ON and SAM-all without recompiling;
4. the runner trains one synthetic epoch on CUDA with amp=bf16.
Prints one PASS/FAIL line per check; exits non-zero on a failure.
"""

from __future__ import annotations

import sys
import tempfile
import traceback

import torch
import torch.nn.functional as F

import normsam
from normsam.train.config import load_config
from normsam.train.loop import Trainer
from normsam.train.models import build_model

DEVICE = torch.device("cuda")


def _model(seed=0):
    torch.manual_seed(seed)
    return build_model("resnet20", num_classes=10).to(DEVICE)


def _batch(seed, n=128):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(n, 3, 32, 32, device=DEVICE, generator=g), torch.randint(0, 10, (n,), device=DEVICE, generator=g)


def check_cheap_equals_classic():
    torch.backends.cudnn.deterministic = True
    a, b = _model(), _model()
    sa = normsam.SAM(a, torch.optim.SGD, rho=0.5, perturbation="asam", lr=0.05, momentum=0.9)
    sb = normsam.SAM(b, torch.optim.SGD, rho=0.5, perturbation="asam", lr=0.05, momentum=0.9)
    for step in range(5):
        x, y = _batch(step)
        F.cross_entropy(a(x), y).backward()
        sa.first_step(zero_grad=True)
        F.cross_entropy(a(x), y).backward()
        sa.second_step(zero_grad=True)
        sb.first_step(F.cross_entropy(b(x), y), zero_grad=True)
        F.cross_entropy(b(x), y).backward()
        sb.second_step(zero_grad=True)
    diff = max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))
    assert diff < 1e-5, f"max parameter difference {diff:.3g}"
    return f"max |Δw| = {diff:.2g}"


def check_amp(mode):
    model = _model()
    sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, perturbation="asam", lr=0.05, momentum=0.9)
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if mode == "fp16" else None
    x, y = _batch(0)
    losses = []
    for _ in range(20):
        with torch.autocast("cuda", dtype=dtype):
            loss = F.cross_entropy(model(x), y)
        sam.first_step(scaler.scale(loss) if scaler else loss, zero_grad=True, grad_scaler=scaler)
        with torch.autocast("cuda", dtype=dtype):
            loss2 = F.cross_entropy(model(x), y)
        if scaler:
            scaler.scale(loss2).backward()
            sam.restore()
            scaler.step(sam.base_optimizer)
            scaler.update()
            sam.zero_grad()
        else:
            loss2.backward()
            sam.second_step(zero_grad=True)
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses)) and losses[-1] < losses[0], losses
    return f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, skipped ascents {sam.counters['nonfinite_ascent_steps']}"


def check_compile():
    out = []
    for scope in ("norm", "all"):
        torch._dynamo.reset()
        model = _model()
        compiled = torch.compile(model)
        sam = normsam.SAM(model, torch.optim.SGD, scope=scope, rho=0.5, lr=0.05, momentum=0.9)
        x, y = _batch(0)

        def step():
            sam.first_step(F.cross_entropy(compiled(x), y), zero_grad=True)
            loss = F.cross_entropy(compiled(x), y)
            loss.backward()
            sam.second_step(zero_grad=True)
            return loss.item()

        first = step()
        with torch._dynamo.config.patch(error_on_recompile=True):
            last = [step() for _ in range(5)][-1]
        assert last < first
        out.append(f"{scope}: {first:.3f} -> {last:.3f}")
    return ", ".join(out)


def check_runner():
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, dict(data="synthetic", epochs=1, amp="bf16", device="cuda", progress=False,
                                     scope="norm", perturbation="asam", rho=2.0, out=f"{tmp}/run"))
        summary = Trainer(cfg).run()
    return f"test acc {summary['final_test_acc']:.1f}% in {summary['total_time']:.1f}s"


def main() -> int:
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    failed = 0
    checks = [("cheap ascent = classic (fp32)", check_cheap_equals_classic),
              ("bf16 autocast", lambda: check_amp("bf16")),
              ("fp16 + GradScaler", lambda: check_amp("fp16")),
              ("torch.compile, no recompiles", check_compile),
              ("runner on CUDA, amp=bf16", check_runner)]
    for name, check in checks:
        try:
            print(f"PASS {name}: {check()}", flush=True)
        except Exception:  # report every check, then fail
            failed += 1
            print(f"FAIL {name}:\n{traceback.format_exc()}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
