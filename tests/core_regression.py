"""The composed core's regression record (issue 23): a few SAM steps on every path, pinned bit for bit.

Each case builds a small model, takes a few steps through the public API only, and returns the model's
parameters (and buffers). ``python -m tests.core_regression`` records them into
``tests/data/core_regression.pt``; ``tests/test_core_regression.py`` replays every case and compares. The
record was made with the code before the core was rebuilt (commit 4e76776), so a refactoring that changes a
single bit of any path fails here. Where a change the issue asked for reorders arithmetic, the case is listed
in ``TOLERANCES`` with its bound and the reason.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import normsam
from tests.conftest import make_batch, make_cnn

RECORD = Path(__file__).resolve().parent / "data" / "core_regression.pt"
STEPS = 3

#: case → (max abs difference allowed, why). Every other case must be bit-identical.
TOLERANCES: dict[str, tuple[float, str]] = {}


def _state(model: torch.nn.Module) -> torch.Tensor:
    """Every parameter and buffer, flattened into one float64 vector (exact for float32 and the int counters)."""
    return torch.cat([v.detach().reshape(-1).to(torch.float64) for v in model.state_dict().values()])


def _loss(model, seed: int, dtype=torch.float64):
    x, y = make_batch(seed=seed, dtype=dtype)
    return F.cross_entropy(model(x), y)


def run_sam(*, route: str = "cheap", steps: int = STEPS, base: str = "sgd", dtype=torch.float64,
            refresh: bool = False, **options) -> torch.Tensor:
    """``steps`` SAM steps of the small CNN. ``route``: ``cheap`` (``first_step(loss)``), ``classic``
    (``.grad`` then ``first_step()``) or ``closure`` (``step(closure)``)."""
    model = make_cnn(dtype=dtype)
    base_cls, base_kwargs = {
        "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
        "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
    }[base]
    sam = normsam.SAM(model, base_cls, **base_kwargs, **options)
    for step in range(steps):
        if refresh:  # ssam-f: a Fisher mask from a few single-example batches
            x, y = make_batch(seed=50 + step, dtype=dtype)
            sam.refresh_masks([(x[i : i + 1], y[i : i + 1]) for i in range(4)])
        if route == "closure":
            def closure(step=step):
                loss = _loss(model, step, dtype)
                loss.backward()
                return loss

            sam.step(closure)
            sam.zero_grad()
            continue
        if not sam.needs_ascent:
            sam.first_step()
        elif route == "cheap":
            sam.first_step(_loss(model, step, dtype))
        else:
            _loss(model, step, dtype).backward()
            sam.first_step(zero_grad=True)
        _loss(model, step, dtype).backward()
        sam.second_step(zero_grad=True)
    return _state(model)


def run_groups(foreach: bool) -> torch.Tensor:
    """Two perturbed groups with their own ρ (the foreach path's per-ρ split), asam."""
    model = make_cnn()
    groups = normsam.param_groups(model, "norm", weight_decay=1e-3)
    for i, g in enumerate(groups):
        g["rho"] = 0.5 * (i + 1)
    sam = normsam.SAM(groups, torch.optim.SGD, rho=0.5, model=model, lr=0.1, momentum=0.9, perturbation="asam",
                      foreach=foreach)
    for step in range(STEPS):
        sam.first_step(_loss(model, step))
        _loss(model, step).backward()
        sam.second_step(zero_grad=True)
    return _state(model)


def run_amp(mode: str, perturbation: str, scope: str) -> torch.Tensor:
    """float32 model under CPU autocast (bf16), or with a GradScaler (fp16's route, scale 2**10)."""
    model = make_cnn(dtype=torch.float32)
    sam = normsam.SAM(model, torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.5, perturbation=perturbation, scope=scope)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if mode == "scaler" else None
    for step in range(STEPS):
        x, y = make_batch(seed=step, dtype=torch.float32)
        if mode == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            sam.first_step(loss)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            sam.second_step(zero_grad=True)
        else:
            scaler.scale(F.cross_entropy(model(x), y)).backward()
            sam.first_step(zero_grad=True, grad_scaler=scaler)
            scaler.scale(F.cross_entropy(model(x), y)).backward()
            sam.restore()
            scaler.step(sam.base_optimizer)
            scaler.update()
            sam.zero_grad()
    return _state(model)


def cases() -> dict[str, Callable[[], torch.Tensor]]:
    out: dict[str, Callable[[], torch.Tensor]] = {}
    scopes = {"norm": {}, "all": {}, "no-norm": {}, "one-tensor": {"scope": ["gn.weight"]},
              "random": {"scope": "random", "sparsity": 0.7}, "ssam-d": {"scope": "ssam-d", "sparsity": 0.7,
                                                                         "mask_interval": 1, "mask_total_steps": 4}}
    rhos = {"sam": 0.5, "asam": 2.0, "layerwise": 0.2, "linf": 0.05, "fisher": 0.5}
    for perturbation, rho in rhos.items():
        for scope, extra in scopes.items():
            for foreach in (True, False):
                options = dict(perturbation=perturbation, rho=rho, foreach=foreach,
                               **({"scope": scope} if not extra else extra))
                out[f"{perturbation}-{scope}-{'foreach' if foreach else 'loop'}"] = (
                    lambda o=options: run_sam(**o))
    for perturbation in ("sam", "asam", "layerwise"):
        for foreach in (True, False):
            out[f"norm-over-all-{perturbation}-{'foreach' if foreach else 'loop'}"] = (
                lambda p=perturbation, f=foreach: run_sam(perturbation=p, rho=rhos[p], norm_over="all", foreach=f))
    for route in ("classic", "closure"):
        for scope in ("norm", "all"):
            out[f"route-{route}-{scope}"] = lambda r=route, s=scope: run_sam(route=r, scope=s, perturbation="asam",
                                                                              rho=1.0)
    out["normalize-bias"] = lambda: run_sam(perturbation="asam", rho=2.0, normalize_bias=True)
    out["layerwise-official"] = lambda: run_sam(perturbation="layerwise", rho=0.2, layerwise_scaling="official",
                                                eta=0.1)
    out["name-contains-weight"] = lambda: run_sam(perturbation="asam", rho=1.0, scope="all",
                                                  scaled_tensors="name-contains-weight")
    out["eta"] = lambda: run_sam(perturbation="asam", rho=2.0, eta=0.3)
    out["bn-update"] = lambda: run_sam(perturbation="sam", rho=0.5, bn_policy="update")
    out["adamw-norm"] = lambda: run_sam(perturbation="asam", rho=2.0, base="adamw")
    out["adamw-all-loop"] = lambda: run_sam(perturbation="sam", rho=0.1, scope="all", base="adamw", foreach=False)
    for route in ("cheap", "classic", "closure"):
        out[f"ascent-interval-{route}"] = lambda r=route: run_sam(route=r, perturbation="asam", rho=2.0,
                                                                   ascent_interval=2, steps=5)
    for perturbation in ("sam", "asam", "layerwise"):
        for scope in ("norm", "all"):
            out[f"momentum-{perturbation}-{scope}"] = lambda p=perturbation, s=scope: run_sam(
                ascent="momentum", perturbation=p, rho=rhos[p], scope=s, steps=4)
    out["momentum-adamw"] = lambda: run_sam(ascent="momentum", perturbation="sam", rho=0.5, base="adamw", steps=4)
    out["momentum-loop"] = lambda: run_sam(ascent="momentum", perturbation="asam", rho=2.0, foreach=False, steps=4)
    out["momentum-random"] = lambda: run_sam(ascent="momentum", perturbation="sam", rho=0.5, scope="random",
                                             sparsity=0.5, steps=4)
    for foreach in (True, False):
        out[f"ssam-f-{'foreach' if foreach else 'loop'}"] = lambda f=foreach: run_sam(
            scope="ssam-f", sparsity=0.7, perturbation="asam", rho=2.0, refresh=True, foreach=f)
    out["groups-foreach"] = lambda: run_groups(True)
    out["groups-loop"] = lambda: run_groups(False)
    for mode in ("bf16", "scaler"):
        for perturbation, scope in (("sam", "norm"), ("asam", "norm"), ("layerwise", "all"), ("sam", "all")):
            out[f"amp-{mode}-{perturbation}-{scope}"] = lambda m=mode, p=perturbation, s=scope: run_amp(m, p, s)
    out["float32-asam-norm"] = lambda: run_sam(perturbation="asam", rho=2.0, dtype=torch.float32)
    out["float32-linf-all"] = lambda: run_sam(perturbation="linf", rho=0.05, scope="all", dtype=torch.float32)
    return out


def runner_cases() -> dict[str, dict]:
    """Tiny runner runs (synthetic data, 2 epochs): the final model is pinned too."""
    tiny = dict(data="synthetic", image_size=8, subset=64, batch_size=32, eval_batch_size=256, epochs=2, threads=1,
                progress=False, norm_stats=False)
    return {
        "runner-sgd": {**tiny, "scope": "none"},
        "runner-norm-asam": {**tiny, "scope": "norm", "perturbation": "asam", "rho": 2.0},
        "runner-all-sam": {**tiny, "scope": "all", "perturbation": "sam", "rho": 0.1},
        "runner-interval": {**tiny, "scope": "norm", "perturbation": "asam", "rho": 2.0, "ascent_interval": 2},
        "runner-momentum": {**tiny, "scope": "norm", "ascent": "momentum", "bn_policy": "update", "rho": 0.5},
        "runner-ssam-f": {**tiny, "scope": "ssam-f", "sparsity": 0.9, "rho": 0.5, "fisher_samples": 8},
        "runner-accumulation-fraction": {**tiny, "scope": "norm", "rho": 0.5, "accumulation": 2,
                                         "ascent_fraction": 0.5},
        "runner-bf16": {**tiny, "scope": "norm", "perturbation": "asam", "rho": 2.0, "amp": "bf16"},
        "runner-warmup": {**tiny, "scope": "norm", "perturbation": "asam", "rho": 2.0, "rho_warmup_epochs": 1},
    }


def digest(tensor: torch.Tensor) -> str:
    """The SHA-256 of a tensor's bytes: the runner's models are too large to keep, and bits are what count."""
    import hashlib

    return hashlib.sha256(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def run_runner(overrides: dict, out: Path) -> dict[str, str]:
    from normsam.train.config import load_config
    from normsam.train.loop import Trainer

    Trainer(load_config(None, {**overrides, "out": str(out)})).run()
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    return {k: digest(v) for k, v in state["model"].items()}


def record(path: Path = RECORD) -> None:
    import tempfile

    torch.set_num_threads(1)
    values = {name: make() for name, make in cases().items()}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in runner_cases().items():
            values[name] = run_runner(overrides, Path(tmp) / name)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(copy.deepcopy(values), path)
    print(f"recorded {len(values)} cases into {path}")


if __name__ == "__main__":  # from the repository root: python -m tests.core_regression [PATH]
    record(Path(sys.argv[1]) if len(sys.argv) > 1 else RECORD)
