"""CUDA correctness checks for a borrowed GPU (run by benchmarks/gpu.sh; needs no data set).

1. no host sync in SAM's own calls: ``first_step``, ``second_step`` and ``restore`` run under
   ``torch.cuda.set_sync_debug_mode("error")`` (after a first step under "warn", whose one-time setup syncs
   are counted and printed) for every scope (norm, all, no-norm, a predicate, glob
   patterns, the random element mask) and every perturbation (sam, asam, layerwise, linf, fisher), with the
   cheap and the classic ascent, with fp16 and a GradScaler, and with ``ascent_interval`` where SAM has it
   (``scaler.step`` is outside the guard: a GradScaler reads ``found_inf`` on the host by design);
2. the cheap ascent gives the classic two-pass trajectory on CUDA (ResNet-20, 5 steps);
3. bf16 autocast and fp16 + GradScaler train with SAM-ON (finite, decreasing loss);
4. a torch.compile'd model trains with SAM-ON and then SAM-all without recompiling;
5. the runner trains one synthetic epoch on CUDA with amp=bf16.

Prints one PASS/FAIL line per check; exits non-zero on a failure. Without CUDA it prints one SKIP line and
exits 0. ``--smoke`` (or NORMSAM_GPU_SMOKE=1) runs every check on the CPU with tiny settings, to test the
script itself: the sync guard is a CUDA feature and is off there, and torch.compile uses the aot_eager backend.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import tempfile
import traceback
import warnings

import torch
import torch.nn.functional as F

import normsam
from normsam.train.config import load_config
from normsam.train.loop import Trainer
from normsam.train.models import build_model

DEVICE = torch.device("cuda")
SMOKE = False  # set by main(): CPU, tiny model and batch


def _model(seed=0):
    torch.manual_seed(seed)
    return build_model("resnet8" if SMOKE else "resnet20", num_classes=10).to(DEVICE)


def _batch(seed, n=128):
    n, side = (4, 8) if SMOKE else (n, 32)
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return (torch.randn(n, 3, side, side, device=DEVICE, generator=g),
            torch.randint(0, 10, (n,), device=DEVICE, generator=g))


@contextlib.contextmanager
def no_host_sync(mode: str = "error"):
    """Make any synchronizing CUDA call (``.item()``, ``bool(t)``, a blocking copy) an error, or a warning."""
    if DEVICE.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


# (label, SAM options); scopes with ℓ2 SAM, then every perturbation on SAM-ON.
SYNC_CASES: list[tuple[str, dict]] = [
    ("scope=norm", dict(scope="norm")),
    ("scope=all", dict(scope="all", rho=0.05)),
    ("scope=no-norm", dict(scope="no-norm", rho=0.05)),
    ("scope=predicate (β only)", dict(scope=lambda info: info.is_norm and info.is_bias)),
    ("scope=patterns", dict(scope=["stage3.*", "norm1.*"])),
    ("scope=random mask", dict(scope="random", sparsity=0.5, rho=0.05)),
    *[(f"perturbation={p}", dict(scope="norm", perturbation=p)) for p in ("asam", "layerwise", "linf", "fisher")],
]


def _sync_free_steps(options: dict, *, cheap: bool, fp16: bool, steps: int = 4) -> int:
    """Train ``steps`` steps with SAM's calls guarded: the first step only warns (lazy one-time setup may
    sync), the others raise. Returns how many synchronizing calls the first step made."""
    model = _model()
    options = {"rho": 0.5, **options}
    sam = normsam.SAM(model, torch.optim.SGD, lr=0.05, momentum=0.9, **options)
    scaler = torch.amp.GradScaler(DEVICE.type) if fp16 else None
    amp = torch.autocast(DEVICE.type, dtype=torch.float16) if fp16 else contextlib.nullcontext()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(steps):
            guard = functools.partial(no_host_sync, "warn" if step == 0 else "error")
            x, y = _batch(step, n=32)
            if sam.needs_ascent:
                with amp:
                    loss = F.cross_entropy(model(x), y)
                scaled = loss if scaler is None else scaler.scale(loss)
                if not cheap:
                    scaled.backward()
                with guard():
                    sam.first_step(scaled if cheap else None, zero_grad=True, grad_scaler=scaler)
            else:  # ascent_interval: the stored ε, no first pass
                with guard():
                    sam.first_step(zero_grad=True, grad_scaler=scaler)
            with amp:
                loss2 = F.cross_entropy(model(x), y)
            if scaler is None:
                loss2.backward()
                with guard():
                    sam.second_step(zero_grad=True)
            else:
                scaler.scale(loss2).backward()
                with guard():
                    sam.restore()
                scaler.step(sam.base_optimizer)
                scaler.update()
                sam.zero_grad()
    return sum("synchroniz" in str(w.message) for w in caught)


def check_no_host_sync():
    runs = [(f"{label}, {'cheap' if cheap else 'classic'}", opts, cheap, False)
            for label, opts in SYNC_CASES for cheap in (True, False)]
    runs += [(f"{label}, {'cheap' if cheap else 'classic'}, fp16+GradScaler", opts, cheap, True)
             for label, opts in SYNC_CASES[:2] for cheap in (True, False)]
    runs += [(f"scope={s}, ascent_interval=2, cheap", dict(scope=s, ascent_interval=2), True, False)
             for s in ("norm", "all")]
    runs += [(f"scope={s}, ascent=momentum{', fp16+GradScaler' if fp16 else ''}", dict(scope=s, ascent="momentum"),
              True, fp16) for s in ("norm", "all") for fp16 in (False, True)]
    failures, first_step_syncs = [], {}
    for label, opts, cheap, fp16 in runs:
        try:
            first_step_syncs[label] = _sync_free_steps(opts, cheap=cheap, fp16=fp16)
        except Exception as err:  # one line per failing case, then fail the check
            failures.append(f"{label}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    if failures:
        raise AssertionError(f"{len(failures)} of {len(runs)} cases synchronize:\n  " + "\n  ".join(failures))
    if DEVICE.type != "cuda":
        return f"{len(runs)} cases, 4 steps each, without the guard (CPU smoke)"
    setup = {label: n for label, n in first_step_syncs.items() if n}
    note = (f"; the first step synced in {len(setup)} cases (one-time setup): "
            + ", ".join(f"{label} ×{n}" for label, n in setup.items())) if setup else "; none in the first step"
    return f"{len(runs)} cases, steps 2-4 under sync_debug_mode='error'{note}"


def check_cheap_equals_classic():
    torch.backends.cudnn.deterministic = True
    try:
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
    finally:
        torch.backends.cudnn.deterministic = False
    diff = max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))
    assert diff < 1e-5, f"max parameter difference {diff:.3g}"
    return f"max |Δw| = {diff:.2g}"


def check_amp(mode):
    model = _model()
    sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, perturbation="asam", lr=0.05, momentum=0.9)
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(DEVICE.type) if mode == "fp16" else None
    x, y = _batch(0)
    losses = []
    for _ in range(20):
        with torch.autocast(DEVICE.type, dtype=dtype):
            loss = F.cross_entropy(model(x), y)
        sam.first_step(scaler.scale(loss) if scaler else loss, zero_grad=True, grad_scaler=scaler)
        with torch.autocast(DEVICE.type, dtype=dtype):
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
    assert all(v == v for v in losses) and losses[-1] < losses[0], losses
    return f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, skipped ascents {sam.counters['nonfinite_ascent_steps']}"


def check_compile():
    """One compiled model, trained by SAM-ON and then by SAM-all: the graph must not be compiled again."""
    torch._dynamo.reset()
    model = _model()
    compiled = torch.compile(model, backend="aot_eager" if SMOKE else "inductor")
    x, y = _batch(0)
    out = []
    for scope in ("norm", "all"):
        sam = normsam.SAM(model, torch.optim.SGD, scope=scope, rho=0.5 if scope == "norm" else 0.05, lr=0.05,
                          momentum=0.9)

        def step():
            sam.first_step(F.cross_entropy(compiled(x), y), zero_grad=True)
            loss = F.cross_entropy(compiled(x), y)
            loss.backward()
            sam.second_step(zero_grad=True)
            return loss.item()

        first = step() if scope == "norm" else None  # the first call compiles
        with torch._dynamo.config.patch(error_on_recompile=True):
            losses = [step() for _ in range(5)]
        first = losses[0] if first is None else first
        assert losses[-1] < first, (scope, first, losses)
        out.append(f"{scope}: {first:.3f} -> {losses[-1]:.3f}")
    return ", ".join(out)


def check_runner():
    tiny = dict(model="resnet8", image_size=8, subset=64, batch_size=16, norm_stats=False) if SMOKE else {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, dict(data="synthetic", epochs=1, amp="bf16", device=DEVICE.type, progress=False,
                                     scope="norm", perturbation="asam", rho=2.0, out=f"{tmp}/run", **tiny))
        summary = Trainer(cfg).run()
    return f"test acc {summary['final_test_acc']:.1f}% in {summary['total_time']:.1f}s"


def main(argv: list[str] | None = None) -> int:
    global DEVICE, SMOKE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", default=os.environ.get("NORMSAM_GPU_SMOKE") == "1",
                        help="every check on the CPU with tiny settings (tests this script; no sync guard)")
    args = parser.parse_args(argv)
    SMOKE = args.smoke
    if SMOKE:
        DEVICE = torch.device("cpu")
        print(f"SMOKE: CPU, tiny settings, torch {torch.__version__}")
    elif not torch.cuda.is_available():
        print("SKIP gpu_checks: no CUDA here (run with --smoke to exercise the script on the CPU)")
        return 0
    else:
        DEVICE = torch.device("cuda")
        print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    failed = 0
    checks = [("no host sync in SAM steps", check_no_host_sync),
              ("cheap ascent = classic (fp32)", check_cheap_equals_classic),
              ("bf16 autocast", lambda: check_amp("bf16")),
              ("fp16 + GradScaler", lambda: check_amp("fp16")),
              ("torch.compile, no recompiles", check_compile),
              (f"runner on {DEVICE.type}, amp=bf16", check_runner)]
    for name, check in checks:
        try:
            print(f"PASS {name}: {check()}", flush=True)
        except Exception:  # report every check, then fail
            failed += 1
            print(f"FAIL {name}:\n{traceback.format_exc()}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
