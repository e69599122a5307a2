"""Sharpness of a run folder's model: ``normsam sharpness RUN_DIR`` and the runner's ``sharpness_at_end``.

:func:`measure_run_sharpness` rebuilds the model of a run folder from its ``config.yaml`` and
``checkpoint.pt`` (or takes the runner's in-memory model), draws ``n`` training examples without augmentation
(a permutation of the training set seeded by ``seed``, so the same examples for every run of the same data),
splits them into batches of ``m`` and calls :func:`normsam.sharpness.measure_sharpness` (SPEC §3).

Every measurement is recorded in the run folder's ``sharpness.json``::

    {"measurements": [{"rho": 0.003, "steps": 20, "m": 128, "n": 1024, "kind": "worst", "norm": "linf",
                       "adaptive": true, "scope": "all", "logit_normalize": false, "seed": 0,
                       "convention": "apgd", "sharpness": ..., "error_sharpness": ..., "max_rel_perturbation": ...,
                       "clean_loss": ..., "worst_loss": ..., "epoch": 10, "examples": 1024, ...}, ...]}

The file is rewritten atomically. A new measurement with the same settings (:data:`SETTINGS`) replaces the
older one; the list is in the order the measurements were made, so the last entry is the latest.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normsam.sharpness import measure_sharpness
from normsam.train import checkpoint as ckpt
from normsam.train.data import DataSplits, make_augment
from normsam.train.run_folder import RunFolder, resolve_device
from normsam.train.run_lock import RunLock

__all__ = ["SHARPNESS_FILE", "SETTINGS", "measure_run_sharpness", "read_measurements", "latest_measurement"]

SHARPNESS_FILE = "sharpness.json"

#: The keys that identify a measurement: a new one with equal values replaces the old one.
SETTINGS = ("rho", "steps", "m", "n", "kind", "norm", "adaptive", "scope", "logit_normalize", "seed", "convention")


def _batches(data: DataSplits, *, n: int, m: int, seed: int, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """``min(n, len(train))`` training examples (a permutation seeded by ``seed``), normalized, in batches of m."""
    if getattr(data, "streamed", False):  # decoded per sample, without augmentation (train/data/streamed.py)
        from normsam.train.data.streamed import sharpness_examples

        images, labels = sharpness_examples(data, n=n, seed=seed)
        return [(images[i : i + m].to(device), labels[i : i + m].to(device)) for i in range(0, len(labels), m)]
    generator = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(len(data.train), generator=generator)[:n]
    images = make_augment("none", data)(data.train.images[idx])
    labels = data.train.labels[idx]
    return [
        (images[i : i + m].to(device), labels[i : i + m].to(device)) for i in range(0, len(idx), m)
    ]


def read_measurements(run_dir: str | Path) -> list[dict[str, Any]]:
    """The measurements in ``run_dir/sharpness.json`` (oldest first); empty when there is none."""
    path = Path(run_dir) / SHARPNESS_FILE
    if not path.is_file():
        return []
    try:
        measurements = json.loads(path.read_text())["measurements"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(
            f"{path} is not a sharpness file ({err}); delete it and measure again with `normsam sharpness`."
        ) from None
    # Measurements written before the convention option were made with the APGD convention.
    return [{"convention": "apgd", **m} for m in measurements]


def latest_measurement(run_dir: str | Path) -> dict[str, Any] | None:
    """The most recent measurement of ``run_dir``, or None."""
    measurements = read_measurements(run_dir)
    return measurements[-1] if measurements else None


def _record(run_dir: Path, measurement: dict[str, Any]) -> None:
    """Append ``measurement`` to sharpness.json, dropping an older one with the same settings."""
    key = {k: measurement[k] for k in SETTINGS}
    kept = [old for old in read_measurements(run_dir) if {k: old.get(k) for k in SETTINGS} != key]
    ckpt.write_json(run_dir / SHARPNESS_FILE, {"measurements": [*kept, measurement]})


def measure_run_sharpness(
    run_dir: str | Path,
    *,
    rho: float = 0.003,
    steps: int = 20,
    m: int = 128,
    n: int = 1024,
    kind: str = "worst",
    norm: str = "linf",
    adaptive: bool = True,
    scope: str = "all",
    logit_normalize: bool = False,
    convention: str = "apgd",
    seed: int = 0,
    model: nn.Module | None = None,
    data: DataSplits | None = None,
    progress: bool = False,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Measure the sharpness of a run's model, record it in ``sharpness.json`` and return the measurement.

    Args:
        run_dir: a run folder (``config.yaml``; ``checkpoint.pt`` unless ``model`` is given).
        rho, steps, kind, norm, adaptive, scope, logit_normalize, convention: as in
            :func:`normsam.sharpness.measure_sharpness` (defaults: adaptive worst-case ℓ∞, ρ = 0.003,
            20 APGD steps, all parameters).
        m: examples per batch (the m of m-sharpness).
        n: training examples in all; fewer when the training set is smaller (``examples`` says how many).
        seed: chooses the examples (a seeded permutation of the training set) and seeds the measurement.
        model: the model to measure (the runner passes its own); default: rebuilt from the run's config and
            loaded from its checkpoint.
        data: the run's data; default: loaded with the run's data settings.
        progress: a progress bar over the batches.
        device: where a rebuilt model runs (``"cpu"``, ``"cuda"``, default auto); a given ``model`` stays
            where it is.

    Returns:
        The settings (:data:`SETTINGS`), ``sharpness`` (mean worst- or average-case loss increase),
        ``error_sharpness``, ``max_rel_perturbation``, ``clean_loss``, ``worst_loss``, ``per_batch``, the
        checkpoint's ``epoch``, ``examples``, ``method`` and ``seconds``.
    """
    run_dir = Path(run_dir)
    folder = RunFolder(run_dir)
    cfg = folder.config()
    for name, value in (("m", m), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1 (e.g. m=128, n=1024), got {value!r}.")
    # a rebuilt model: this measurement writes the folder, so it takes the folder's lock (a run still training
    # is refused at once) and checks that it can write before it measures; a caller that passes its model
    # (the runner's sharpness_at_end) holds the lock already
    lock = RunLock(run_dir, what="sharpness").acquire() if model is None else None
    try:
        return _measure(folder, cfg, rho=rho, steps=steps, m=m, n=n, kind=kind, norm=norm, adaptive=adaptive,
                        scope=scope, logit_normalize=logit_normalize, convention=convention, seed=seed,
                        model=model, data=data, progress=progress, device=device)
    finally:
        if lock is not None:
            lock.release()


def _measure(folder: RunFolder, cfg, *, rho, steps, m, n, kind, norm, adaptive, scope, logit_normalize, convention,
             seed, model, data, progress, device) -> dict[str, Any]:
    run_dir = folder.path
    given_model = model is not None
    if data is None:
        data = folder.data(cfg)
    if model is None:
        target = resolve_device(str(device or "auto"))
        model, epoch = folder.model(target, cfg=cfg, data=data)
    else:
        first = next(model.parameters(), None)
        target = first.device if first is not None else torch.device("cpu")
        epoch = len(folder.metrics())  # epochs finished (one row each)
    batches = _batches(data, n=n, m=m, seed=seed, device=target)

    started = time.perf_counter()
    result = measure_sharpness(
        model,
        batches,
        rho=rho,
        kind=kind,
        norm=norm,
        adaptive=adaptive,
        steps=steps,
        scope=scope,
        logit_normalize=logit_normalize,
        convention=convention,
        seed=seed,
        device=target,
        progress=progress,
    )
    measured = result.to_dict()
    measurement = {
        **{key: measured[key] for key in ("rho", "steps", "kind", "norm", "adaptive", "scope", "logit_normalize",
                                          "convention")},
        "m": m,
        "n": n,
        "seed": seed,
        **{key: measured[key] for key in ("sharpness", "error_sharpness", "max_rel_perturbation", "clean_loss",
                                           "worst_loss")},
        "epoch": epoch,  # the epochs the measured weights were trained for
        "run_epochs": cfg.epochs,  # of the run's schedule: a smaller epoch is an unfinished (or stale) run's
        "examples": sum(len(y) for _, y in batches),
        "method": cfg.method,
        "seconds": time.perf_counter() - started,
        "per_batch": measured["per_batch"],
    }
    if measurement["sharpness"] is None and not given_model:  # a non-finite loss: nothing to measure
        raise ValueError(
            f"The loss of {run_dir}'s model (checkpoint of epoch {epoch}) is not finite on the {measurement['examples']} "
            "examples, so its sharpness is undefined (a diverged run? see its summary.json); nothing was recorded."
        )
    _record(run_dir, measurement)
    return measurement
