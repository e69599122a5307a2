"""``normsam compare``: SGD vs SAM-all vs SAM-ON, the main job of ``make demo``.

Three runs of the ``quick`` preset (ResNet-20 on a stratified Fashion-MNIST subset) that differ only in what
is perturbed: nothing (plain SGD), every parameter (SAM-all) or the normalization layers' γ and β
(SAM-ON), all with ASAM's elementwise-ℓ2 perturbation. Following SPEC §1 (and the paper's figure), SAM-ON
gets a larger ρ than SAM-all. Finished runs are reused and unfinished ones resumed, so the job can be
interrupted and started again. Writes ``compare.md`` (the table), ``compare.json`` and ``compare.png``.

The cost column ("step time / SGD") is measured after training, with :mod:`normsam.bench`'s interleaved
rounds on the runs' model and batch: the three runs train one after another, so the ratio of their own step
times would measure how busy the machine was in each, not what SAM costs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from normsam.files import check_writable
from normsam.train import checkpoint as ckpt
from normsam.train.loop import run_or_resume
from normsam.train.run_folder import RunFolder, build_run_model, load_run_data, resolve_device

__all__ = ["METHODS", "compare", "measure_step_cost"]


@dataclass(frozen=True)
class Method:
    label: str
    folder: str
    overrides: dict[str, Any]


#: The three arms, with the ρ that the CPU study (docs/results/study-noise/) chose on validation data for
#: ResNet-20 on Fashion-MNIST with ASAM: 0.1 for SAM-all, 0.5 for SAM-ON (from 0.05/0.1/0.2/0.5 and
#: 0.2/0.5/1.0). SAM-ON gets the larger ρ (SPEC §1); both are far below the paper's WRN-28-10 values because
#: ResNet-20 has only 1,568 norm parameters, so the same ρ moves each of them more.
METHODS = (
    Method("SGD", "sgd", {"scope": "none"}),
    Method("SAM-all (asam)", "sam-all", {"scope": "all", "perturbation": "asam", "rho": 0.1}),
    Method("SAM-ON (asam)", "sam-on", {"scope": "norm", "perturbation": "asam", "rho": 0.5}),
)

#: normsam.bench's variant that trains like each scope of the runner (cheap ascent, the runner's default).
_BENCH_VARIANTS = {"none": "SGD", "all": "SAM-all", "norm": "SAM-ON (cheap ascent)"}


def compare(
    out: str | Path = "runs/compare",
    *,
    overrides: dict[str, Any] | None = None,
    methods: tuple[Method, ...] = METHODS,
    bench_rounds: int = 5,
) -> dict[str, Any]:
    """Run the arms (the ``quick`` preset plus ``overrides``), then write the table and the plot.

    ``bench_rounds``: interleaved rounds of the step-time measurement behind the cost column (0: no column).
    """
    from normsam.analysis.plots import method_label, plot_curves

    fixed = sorted({key for m in methods for key in m.overrides} | {"out"})
    ignored = sorted(set(overrides or {}) & set(fixed))
    if ignored:  # each arm sets these itself: an override would be silently replaced
        raise ValueError(
            f"compare sets {', '.join(fixed)} itself for its arms ({', '.join(m.label for m in methods)}), so "
            f"{', '.join(f'{k}={(overrides or {})[k]}' for k in ignored)} would be ignored: drop it (--out sets the "
            "folder); train other arms with `normsam train` or `normsam sweep`."
        )
    out = check_writable(Path(out), what="compare folder", hint="choose another --out")
    print(f"Compare folder: {out}", flush=True)
    rows = []
    for method in methods:
        print(f"== {method.label} ==", flush=True)
        summary = run_or_resume(out / method.folder, {**(overrides or {}), **method.overrides}, preset="quick")
        folder = RunFolder(out / method.folder)
        cfg = folder.config()
        rows.append({"method": method_label(cfg.method), "folder": method.folder, **method.overrides,
                     "summary": summary, "test_acc_curve": [r.get("test_acc") for r in folder.metrics()]})
    if bench_rounds > 0:
        ratios = measure_step_cost(RunFolder(out / methods[0].folder).config(), methods, rounds=bench_rounds)
        for row, method in zip(rows, methods):
            row["step_ratio"] = ratios.get(method.overrides.get("scope", "norm"))
    table = compare_table(rows)
    (out / "compare.md").write_text(table + "\n")
    ckpt.write_json(out / "compare.json", rows)
    epochs = rows[0]["summary"]["epochs"]
    plot_curves(
        {r["method"]: r["test_acc_curve"] for r in rows},
        out / "compare.png",
        ylabel="test accuracy (%)",
        title=f"Fashion-MNIST, ResNet-20 ({epochs} epoch{'s' if epochs != 1 else ''})",
    )
    print(table)
    print(f"\nWrote {out / 'compare.md'}, {out / 'compare.png'} and the run folders under {out}/")
    return {"rows": rows, "table": table}


def measure_step_cost(cfg, methods: tuple[Method, ...] = METHODS, *, rounds: int = 5) -> dict[str, float]:
    """Step time relative to SGD per scope (``"none"``, ``"all"``, ``"norm"``), measured by
    :func:`normsam.bench.run_benchmark` in interleaved rounds on the model and a training batch of ``cfg``."""
    from normsam.bench import StepContext, default_variants, run_benchmark
    from normsam.train.data import make_augment

    wanted = {m.overrides.get("scope", "norm"): m for m in methods}
    device = resolve_device(cfg.device)
    data = load_run_data(cfg)
    n = min(cfg.batch_size, len(data.train))
    x = make_augment("none", data)(data.train.images[:n]).to(device)
    y = data.train.labels[:n].to(device)

    def rho(scope: str, default: float) -> float:
        return float(wanted[scope].overrides.get("rho", default)) if scope in wanted else default

    perturbations = {m.overrides.get("perturbation") for m in methods} - {None}
    context = StepContext(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, rho_all=rho("all", 0.05),
                          rho_on=rho("norm", 0.5), perturbation=perturbations.pop() if len(perturbations) == 1
                          else cfg.perturbation, device_type=device.type)
    names = {scope: _BENCH_VARIANTS[scope] for scope in wanted if scope in _BENCH_VARIANTS}
    variants = [v for v in default_variants(handwritten=False) if v.name in names.values()]
    torch.manual_seed(cfg.seed)
    print(f"Measuring step times ({rounds} interleaved rounds) ...", flush=True)
    result = run_benchmark(lambda: build_run_model(cfg, data), x, y, variants=variants, context=context,
                           rounds=rounds, steps_per_round=2, warmup=1, measure_memory=False, progress=False)
    return {scope: result[name].median_ratio for scope, name in names.items()}


def compare_table(rows: list[dict[str, Any]]) -> str:
    """The comparison as a Markdown table; the cost column only when it was measured."""
    measured = any(r.get("step_ratio") is not None for r in rows)
    head = "| method | ρ | test acc. (%) | best test acc. (%) | train loss | s / epoch |"
    rule = "|---|---:|---:|---:|---:|---:|"
    if measured:
        head += " step time / SGD (measured side by side) |"
        rule += "---:|"
    lines = [head, rule]
    for r in rows:
        s = r["summary"]
        rho = f"{r['rho']:g}" if "rho" in r else "–"
        line = (f"| {r['method']} | {rho} | {s['final_test_acc']:.2f} | {s['best_test_acc']:.2f} | "
                f"{s['final_train_loss']:.4f} | {s['mean_epoch_time']:.1f} |")
        if measured:
            line += f" {r['step_ratio']:.2f}× |" if r.get("step_ratio") is not None else " – |"
        lines.append(line)
    return "\n".join(lines)
