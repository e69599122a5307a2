"""``normsam compare``: SGD vs SAM-all vs SAM-ON, the main job of ``make demo``.

Three runs of the ``quick`` preset (ResNet-20 on a stratified Fashion-MNIST subset) that differ only in what
is perturbed: nothing (plain SGD), every parameter (SAM-all) or the normalization layers' γ and β
(SAM-ON), all with ASAM's elementwise-ℓ2 perturbation. Following SPEC §1 (and the paper's figure), SAM-ON
gets a larger ρ than SAM-all. Finished runs are reused and unfinished ones resumed, so the job can be
interrupted and started again. Writes ``compare.md`` (the table), ``compare.json`` and ``compare.png``.

The cost column ("step time / SGD") is measured after training, with :mod:`normsam.bench`'s interleaved
rounds on the runs' model and batch: the three runs train one after another, so the ratio of their own step
times would measure how busy the machine was in each, not what SAM costs. It shows the median of the
per-round ratios and their range (min–max). A ratio is marked ⚠ (with a note under the table and a warning in
the output) when it cannot be trusted (:func:`spread_is_trustworthy`): fewer than :data:`MIN_ROUNDS` rounds,
or rounds that disagree by more than :data:`SPREAD_LIMIT` of the median (max − min > 20% of the median: on a
quiet machine the rounds agree within a few percent; a busy one can show SAM-ON at 1.08× SGD, which two
passes cannot cost).

Reusing runs
------------
A folder that already holds an arm is reused only when that run has the settings asked for now
(:func:`normsam.train.identity.folder_conflict`, as ``normsam sweep`` does): ``--epochs 2`` on a folder of
1-epoch runs is refused, naming the settings that differ, before anything is trained or written, instead of
rewriting ``compare.md`` with the old runs' numbers. A refused compare leaves no folder behind.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from normsam.files import check_writable
from normsam.train import checkpoint as ckpt
from normsam.train.config import TrainConfig, load_config
from normsam.train.identity import check_sam_window, folder_conflict
from normsam.train.loop import run_or_resume
from normsam.train.run_folder import RunFolder, build_run_model, load_run_data, resolve_device
from normsam.train.run_lock import RunLock

__all__ = ["METHODS", "MIN_ROUNDS", "SPREAD_LIMIT", "StepCost", "compare", "measure_step_cost",
           "spread_is_trustworthy"]

#: The preset every arm starts from.
PRESET = "quick"

#: A measured step-time ratio is trusted only from at least this many rounds ...
MIN_ROUNDS = 3
#: ... whose per-round ratios lie within this share of their median (max − min <= 0.2 × median).
SPREAD_LIMIT = 0.2


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

    Raises ValueError before anything is trained or written when an override is one the arms set themselves,
    an arm's config is invalid, or ``out`` holds an arm trained with other settings (see the module docstring).
    """
    fixed = sorted({key for m in methods for key in m.overrides} | {"out"})
    ignored = sorted(set(overrides or {}) & set(fixed))
    if ignored:  # each arm sets these itself: an override would be silently replaced
        raise ValueError(
            f"compare sets {', '.join(fixed)} itself for its arms ({', '.join(m.label for m in methods)}), so "
            f"{', '.join(f'{k}={(overrides or {})[k]}' for k in ignored)} would be ignored: drop it (--out sets the "
            "folder); train other arms with `normsam train` or `normsam sweep`."
        )
    out = Path(out)
    configs = _arm_configs(out, overrides or {}, methods)
    conflicts = [c for m, cfg in zip(methods, configs)
                 if (c := folder_conflict(out / m.folder, cfg, asked_by="this compare")) is not None]
    if conflicts:  # before anything is trained or written: the old runs would be reported as the new ones
        raise ValueError(
            f"{'; '.join(conflicts)}: compare would report those runs under the settings asked for now. Choose "
            f"another --out, or delete {out} to train the arms anew."
        )
    created = _first_missing(out)
    try:
        check_writable(out, what="compare folder", hint="choose another --out")
        with RunLock(out, what="compare"):  # one compare per folder (each run has its own lock too)
            return _compare_locked(out, overrides or {}, methods, bench_rounds)
    except BaseException:
        if created is not None:  # a compare refused on the way (no data, say) leaves no folder behind
            _remove_empty_folders(created)
        raise


def _arm_configs(out: Path, overrides: dict[str, Any], methods: tuple[Method, ...]) -> list[TrainConfig]:
    """Every arm's config, checked (unknown keys, bad values, a SAM window after the last epoch) before any
    folder is made."""
    configs = []
    for method in methods:
        try:
            cfg = load_config(PRESET, {**overrides, **method.overrides, "out": str(out / method.folder)})
            check_sam_window(cfg)
        except ValueError as err:
            raise ValueError(f"compare arm {method.label}: {err}") from None
        configs.append(cfg)
    return configs


def _first_missing(folder: Path) -> Path | None:
    """The outermost of ``folder`` and its parents that does not exist yet (what making it would create)."""
    if folder.exists():
        return None
    while not folder.parent.exists() and folder.parent != folder:
        folder = folder.parent
    return folder


def _remove_empty_folders(folder: Path) -> None:
    """Remove ``folder`` and the folders under it, as far as they are empty (a file in them keeps them)."""
    if not folder.is_dir():
        return
    for parent, _, _ in sorted(os.walk(folder), key=lambda entry: -len(Path(entry[0]).parts)):
        try:
            os.rmdir(parent)
        except OSError:
            pass


def _compare_locked(out: Path, overrides: dict[str, Any], methods: tuple[Method, ...],
                    bench_rounds: int) -> dict[str, Any]:
    from normsam.analysis.plots import method_label, plot_curves

    print(f"Compare folder: {out}", flush=True)
    rows = []
    for method in methods:
        print(f"== {method.label} ==", flush=True)
        summary = run_or_resume(out / method.folder, {**overrides, **method.overrides}, preset=PRESET)
        folder = RunFolder(out / method.folder)
        cfg = folder.config()
        rows.append({"method": method_label(cfg.method), "folder": method.folder, **method.overrides,
                     "summary": summary, "test_acc_curve": [r.get("test_acc") for r in folder.metrics()]})
    if bench_rounds > 0:
        costs = measure_step_cost(RunFolder(out / methods[0].folder).config(), methods, rounds=bench_rounds)
        for row, method in zip(rows, methods):
            cost = costs.get(method.overrides.get("scope", "norm"))
            row["step_ratio"] = cost.median if cost is not None else None
            if cost is not None:
                row["step_ratio_rounds"] = cost.rounds
                row["step_ratio_range"] = [cost.low, cost.high]
                row["step_ratio_trusted"] = cost.trusted
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
    untrusted = [r for r in rows if r.get("step_ratio_trusted") is False]
    if untrusted:
        why = "; ".join(f"{r['method']}: {_spread_text(r['step_ratio_rounds'])}" for r in untrusted)
        print(f"warning: step-time ratios that cannot be trusted ({why}); {_UNTRUSTED}", flush=True)
    print(f"\nWrote {out / 'compare.md'}, {out / 'compare.png'} and the run folders under {out}/")
    return {"rows": rows, "table": table}


@dataclass(frozen=True)
class StepCost:
    """One arm's step time relative to SGD: the per-round ratios of the interleaved rounds, their median and
    range, and whether they agree well enough to be trusted (:func:`spread_is_trustworthy`)."""

    rounds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.rounds)

    @property
    def low(self) -> float:
        return min(self.rounds)

    @property
    def high(self) -> float:
        return max(self.rounds)

    @property
    def trusted(self) -> bool:
        return spread_is_trustworthy(self.rounds)


def spread_is_trustworthy(ratios: list[float]) -> bool:
    """The rule behind ⚠: at least :data:`MIN_ROUNDS` rounds, and max − min at most :data:`SPREAD_LIMIT` × median."""
    if len(ratios) < MIN_ROUNDS:
        return False
    return max(ratios) - min(ratios) <= SPREAD_LIMIT * statistics.median(ratios)


def _spread_text(ratios: list[float]) -> str:
    """What the rule saw: the rounds, and their spread as a share of the median."""
    spread = (max(ratios) - min(ratios)) / statistics.median(ratios)
    return f"{len(ratios)} round{'s' if len(ratios) != 1 else ''}, {min(ratios):.2f}–{max(ratios):.2f}, spread {spread:.0%}"


_UNTRUSTED = (f"fewer than {MIN_ROUNDS} rounds, or rounds that disagree by more than {SPREAD_LIMIT:.0%} of their "
              "median (the machine was busy while it measured); measure again on a quiet machine, or with more "
              "--bench-rounds (normsam bench measures more carefully).")


def measure_step_cost(cfg, methods: tuple[Method, ...] = METHODS, *, rounds: int = 5) -> dict[str, StepCost]:
    """Step time relative to SGD per scope (``"none"``, ``"all"``, ``"norm"``), measured by
    :func:`normsam.bench.run_benchmark` in interleaved rounds on the model and a training batch of ``cfg``:
    every round's ratio, with their median and range."""
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
    return {scope: StepCost(list(result[name].ratios)) for scope, name in names.items()}


def compare_table(rows: list[dict[str, Any]]) -> str:
    """The comparison as a Markdown table; the cost column only when it was measured: the median of the
    per-round ratios, their range, and ⚠ (explained under the table) when they cannot be trusted."""
    measured = any(r.get("step_ratio") is not None for r in rows)
    head = "| method | ρ | test acc. (%) | best test acc. (%) | train loss | s / epoch |"
    rule = "|---|---:|---:|---:|---:|---:|"
    if measured:
        head += " step time / SGD (measured side by side; median, min–max of the rounds) |"
        rule += "---:|"
    lines = [head, rule]
    for r in rows:
        s = r["summary"]
        rho = f"{r['rho']:g}" if "rho" in r else "–"
        line = (f"| {r['method']} | {rho} | {s['final_test_acc']:.2f} | {s['best_test_acc']:.2f} | "
                f"{s['final_train_loss']:.4f} | {s['mean_epoch_time']:.1f} |")
        if measured:
            line += f" {_ratio_cell(r)} |"
        lines.append(line)
    if any(r.get("step_ratio_trusted") is False for r in rows):
        lines += ["", f"⚠ cannot be trusted: {_UNTRUSTED}"]
    return "\n".join(lines)


def _ratio_cell(row: dict[str, Any]) -> str:
    if row.get("step_ratio") is None:
        return "–"
    cell = f"{row['step_ratio']:.2f}×"
    low, high = row.get("step_ratio_range") or (None, None)
    if low is not None and not low == high == 1.0:  # the SGD baseline is 1 in every round
        cell += f" ({low:.2f}–{high:.2f})"
    if row.get("step_ratio_trusted") is False:
        cell += " ⚠"
    return cell
