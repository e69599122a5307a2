"""Distributions of the normalization layers' affine parameters γ (weight) and β (bias).

The paper tracks how SAM-ON reshapes γ and β over training. :func:`norm_parameter_stats` summarizes them per
norm layer and pooled over the network: quantiles, mean, std and a histogram. The runner appends one record
per epoch to ``norm_stats.jsonl``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from normsam.optim.scopes import select

__all__ = ["QUANTILES", "norm_parameter_stats", "summarize"]

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
BINS = 30


def summarize(values: torch.Tensor, bins: int = BINS) -> dict[str, Any]:
    """Quantiles, mean, std and a histogram of a 1-D tensor, over its finite values; ``nonfinite`` counts the
    others (NaN, ±inf: a diverged model), and without any finite value the statistics are None."""
    v = values.detach().float().reshape(-1).cpu()
    finite = torch.isfinite(v)
    nonfinite = int(v.numel() - finite.sum())
    if nonfinite:
        v = v[finite]
        if v.numel() == 0:
            return {"n": nonfinite, "nonfinite": nonfinite, "mean": None, "std": None,
                    "quantiles": {f"{p:g}": None for p in QUANTILES}, "hist": None}
    q = torch.quantile(v, torch.tensor(QUANTILES))
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        hi = lo + 1e-6
    counts = torch.histc(v, bins=bins, min=lo, max=hi)
    return {
        "n": v.numel() + nonfinite,
        **({"nonfinite": nonfinite} if nonfinite else {}),
        "mean": float(v.mean()),
        "std": float(v.std()) if v.numel() > 1 else 0.0,
        "quantiles": {f"{p:g}": float(x) for p, x in zip(QUANTILES, q)},
        "hist": {"min": lo, "max": hi, "counts": [int(c) for c in counts]},
    }


def _kind(local_name: str) -> str:
    return {"weight": "gamma", "bias": "beta"}.get(local_name, local_name)


def norm_parameter_stats(model: nn.Module) -> dict[str, Any]:
    """Per-layer and pooled statistics of every norm layer's parameters (empty if there are none)."""
    try:
        infos = select(model, "norm")[0]
    except ValueError:
        return {"layers": [], "pooled": {}}
    layers = [
        {"module": i.module_name, "class": type(i.module).__name__, "kind": _kind(i.local_name), **summarize(i.param)}
        for i in infos
    ]
    pooled = {}
    for kind in ("gamma", "beta"):
        tensors = [i.param.detach().reshape(-1) for i in infos if _kind(i.local_name) == kind]
        if tensors:
            pooled[kind] = summarize(torch.cat(tensors))
    return {"layers": layers, "pooled": pooled}
