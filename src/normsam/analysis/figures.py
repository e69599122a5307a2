"""Figures for the documentation: what a scope perturbs on a model, and what a SAM step costs.

- :func:`plot_scope` draws a network as one bar per layer, in the order of ``model.named_modules()`` (for most
  networks the forward order), the bar's height its parameter count (log scale), the layers whose parameters the
  scope perturbs highlighted.
  ``normsam inspect MODEL --plot FILE.png`` calls it.
- :func:`plot_step_costs` draws the step time of each variant relative to SGD from the JSON that
  ``benchmarks/step_time.py --json`` or ``normsam bench --json`` writes: the median of the per-round ratios,
  with the range of the rounds.

Both write a PNG and return its path.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no screen needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from torch import nn  # noqa: E402

from normsam.optim.scopes import ScopeSpec, select  # noqa: E402

__all__ = ["plot_scope", "plot_step_costs", "step_cost_rows"]

_PERTURBED = "#d95f02"
_PLAIN = "#b8b8b8"


def plot_scope(model: nn.Module, path: str | Path, scope: ScopeSpec = "norm", *, title: str | None = None) -> Path:
    """One bar per layer that owns trainable parameters (height: its parameter count, log scale), the layers
    the scope perturbs in colour; the title gives the perturbed share. Raises ``ValueError`` when the scope
    selects nothing, as :func:`normsam.describe_scope` does."""
    selected, rest = select(model, scope)
    chosen = {id(info.param) for info in selected}
    layers: dict[str, list[int]] = {}  # module path -> [perturbed numel, other numel], in module order
    kinds: dict[str, str] = {}
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    for info in sorted(selected + rest, key=lambda i: order[i.module_name]):
        counts = layers.setdefault(info.module_name or "(root)", [0, 0])
        counts[0 if id(info.param) in chosen else 1] += info.param.numel()
        kinds[info.module_name or "(root)"] = type(info.module).__name__
    names = list(layers)
    totals = [sum(layers[n]) for n in names]
    perturbed = [layers[n][0] for n in names]
    n_perturbed, n_total = sum(perturbed), sum(totals)

    width = min(max(6.4, 0.16 * len(names) + 2), 16)
    fig, ax = plt.subplots(figsize=(width, 3.6), constrained_layout=True)
    x = range(len(names))
    ax.bar(x, totals, width=0.8, color=_PLAIN, linewidth=0)
    ax.bar(x, perturbed, width=0.8, color=_PERTURBED, linewidth=0)
    ax.set_yscale("log")
    ax.set_ylim(top=max(totals) * 40)  # room for the legend above the bars
    ax.set_xlim(-0.7, len(names) - 0.3)
    ax.set_ylabel("parameters in the layer")
    ax.set_xlabel(f"layers in the order of model.named_modules() ({len(names)} own parameters)")
    if len(names) <= 48:
        ax.set_xticks(list(x), [_short(n, kinds[n]) for n in names], rotation=90, fontsize=6)
    else:
        ax.set_xticks([])
    ax.grid(axis="y", alpha=0.3)
    label = scope if isinstance(scope, str) else "custom"
    ax.legend(handles=[Patch(color=_PERTURBED, label=f"perturbed by scope={label!r}: {n_perturbed:,} parameters"),
                       Patch(color=_PLAIN, label=f"not perturbed: {n_total - n_perturbed:,}")],
              loc="upper left", fontsize=8, framealpha=0.9)
    ax.set_title(title or f"{type(model).__name__}: scope={label!r} perturbs {n_perturbed:,} of {n_total:,} "
                 f"parameters ({100 * n_perturbed / n_total:.2f}%)", fontsize=10)
    return _save(fig, path)


def _short(name: str, kind: str) -> str:
    return f"{name or '(root)'} ({kind})"


def step_cost_rows(bench: Mapping[str, Any]) -> list[tuple[str, float, float, float]]:
    """``(variant, median ratio to SGD, lowest, highest per-round ratio)`` of a benchmark's first model, for
    every variant that ran (SGD included). ``bench`` is the JSON of ``normsam bench --json`` or
    ``benchmarks/step_time.py --json``: ``{"variants": [...]}`` or ``{model: {"variants": [...]}}``."""
    entry = bench if "variants" in bench else next(v for v in bench.values() if isinstance(v, Mapping) and "variants" in v)
    variants = [v for v in entry["variants"] if not v.get("unavailable") and v.get("median_ratio_to_sgd")]
    sgd = next((v for v in variants if v["name"] == "SGD"), None)
    rows = []
    for v in variants:
        ratio = float(v["median_ratio_to_sgd"])
        low = high = ratio
        if sgd and v.get("step_times_s") and len(v["step_times_s"]) == len(sgd.get("step_times_s", [])):
            per_round = [a / b for a, b in zip(v["step_times_s"], sgd["step_times_s"])]
            low, high = min(per_round), max(per_round)
        rows.append((v["name"], ratio, low, high))
    return rows


def plot_step_costs(bench: str | Path | Mapping[str, Any], path: str | Path, *, title: str | None = None) -> Path:
    """A horizontal bar per variant: its step time / SGD's (the median of the per-round ratios), with a
    whisker over the rounds' range; ``bench`` is the JSON file (or its content) of a step-time benchmark."""
    data = json.loads(Path(bench).read_text()) if isinstance(bench, (str, Path)) else bench
    rows = step_cost_rows(data)
    entry = data if "variants" in data else next(v for v in data.values() if isinstance(v, Mapping) and "variants" in v)
    settings = entry.get("settings", {})
    fig, ax = plt.subplots(figsize=(7.2, 0.42 * len(rows) + 1.4), constrained_layout=True)
    y = list(range(len(rows)))[::-1]
    colors = [_PERTURBED if "SAM-ON" in name else "#7570b3" if "SAM" in name else _PLAIN for name, *_ in rows]
    ax.barh(y, [r[1] for r in rows], color=colors, height=0.6)
    ax.errorbar([r[1] for r in rows], y, xerr=[[r[1] - r[2] for r in rows], [r[3] - r[1] for r in rows]],
                fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
    for yi, (_, ratio, _, high) in zip(y, rows):
        ax.text(high + 0.03, yi, f"{ratio:.2f}×", va="center", fontsize=8)
    ax.set_yticks(y, [r[0] for r in rows], fontsize=8)
    ax.axvline(1.0, color="black", linewidth=0.6)
    ax.set_xlim(0, max(r[3] for r in rows) * 1.15)
    ax.set_xlabel("step time / SGD's step: median of the per-round ratios (whiskers: their range)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    if title is None and settings:
        title = (f"{settings.get('device', '')}, {settings.get('threads', '?')} threads, batch "
                 f"{settings.get('batch_size', '?')}, {settings.get('rounds', '?')} rounds, torch {settings.get('torch', '?')}")
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
