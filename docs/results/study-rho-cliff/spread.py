"""The ρ-cliff study's per-seed table and spread tests (what `normsam report` does not compute).

    python docs/results/study-rho-cliff/spread.py --plot docs/results/study-rho-cliff/seeds.png

For each precision it prints, per arm and seed: the final test accuracy, the share of flipped training labels
fitted, and the first epoch whose training accuracy passed 20% (twice chance: the run left its start; the
regime study's bf16 SAM-ON seed 0 took 18 epochs). Then, for SAM-ON and SAM-all, whether the warm-up arm's
seed-to-seed spread differs from its constant-ρ twin's: the F test of the two variances (two-sided) and the
Brown–Forsythe test (scipy's ``levene(center="median")``, robust to a run that lands far from the others).
``--plot`` draws each seed's final test accuracy per arm and precision, and SAM-ON's training accuracy over the
epochs per seed, with and without the warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from scipy import stats

HERE = Path(__file__).resolve().parent
REGIME = HERE.parent / "study-regime" / "runs"
LEFT_START = 20.0  # % training accuracy: twice chance on 10 classes


def arms(regime_phase: str, warmup_phase: str, settings: str) -> list[tuple[str, Path]]:
    """(arm, its sweep point folder) of one precision: the regime study's SGD, SAM-all and SAM-ON runs in
    ``regime_phase``, this study's warm-up arms in ``warmup_phase``; ``settings`` end each point's name."""
    regime, warm = REGIME / regime_phase, HERE / "runs" / warmup_phase
    return [
        ("SGD", regime / f"scope=none,{settings}"),
        ("SAM-all ρ=0.4", regime / f"scope=all,rho=0.4,{settings}"),
        ("SAM-all ρ=0.4 + warm-up", warm / f"scope=all,rho_warmup_epochs=6,rho=0.4,{settings}"),
        ("SAM-ON ρ=2.4", regime / f"scope=norm,rho=2.4,{settings}"),
        ("SAM-ON ρ=0.6 + warm-up", warm / f"scope=norm,rho_warmup_epochs=6,rho=0.6,{settings}"),
    ]


#: precision → [(arm, its sweep point folder)]
ARMS = {
    "fp32": arms("main", "main-warmup", "sharpness_at_end=true"),
    "bf16": arms("bf16", "bf16-warmup", "amp=bf16,bf16_kernels=upcast"),
}


def seeds(point: Path) -> dict[int, dict[str, Any]]:
    """seed → final test accuracy, flipped labels fitted (%), first epoch past LEFT_START training accuracy, and
    the training accuracy of every epoch (``curve``: (epoch, accuracy) pairs)."""
    out = {}
    for run in sorted(point.glob("seed=*")):
        summary = json.loads((run / "summary.json").read_text())
        epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        curve = [(e["epoch"], e.get("train_acc", 0)) for e in epochs]
        left = next((epoch for epoch, acc in curve if acc > LEFT_START), None)
        out[int(run.name.split("=")[1])] = {"test": summary["final_test_acc"],
                                            "flipped": summary["final_flipped_acc"], "left": left, "curve": curve}
    return out


def spread_tests(a: list[float], b: list[float]) -> str:
    """F test of var(a) = var(b), two-sided, and the Brown–Forsythe test: the variance ratio and both p values."""
    var_a, var_b = statistics.variance(a), statistics.variance(b)
    ratio = var_a / var_b
    cdf = stats.f.cdf(ratio, len(a) - 1, len(b) - 1)
    p_f = 2 * min(cdf, 1 - cdf)
    p_bf = stats.levene(a, b, center="median").pvalue
    def p(value: float) -> str:
        return "p < 0.001" if value < 0.001 else f"p = {value:.3f}"

    return (f"std {var_a ** 0.5:.2f} vs {var_b ** 0.5:.2f}, variance ratio {ratio:.1f}: F test {p(p_f)}, "
            f"Brown–Forsythe {p(p_bf)}")


def plot(path: Path, found: dict[str, list[tuple[str, dict[int, dict[str, Any]]]]]) -> None:
    """The per-seed figure from ``found`` (precision → [(arm, seeds(...))], the arms whose runs exist)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5), dpi=110)
    names = [name for name, _ in ARMS["fp32"]]
    for offset, (precision, marker) in zip((-0.15, 0.15), (("fp32", "o"), ("bf16", "s"))):
        for i, (name, runs) in enumerate(found.get(precision, [])):
            values = [r["test"] for r in runs.values()]
            left.scatter([names.index(name) + offset] * len(values), values, marker=marker, alpha=0.7,
                         color="C0" if precision == "fp32" else "C3", label=precision if i == 0 else None)
    left.set_xticks(range(len(names)), names, rotation=20, ha="right")
    left.set_ylabel("final test accuracy (%)")
    left.set_title("each seed's final test accuracy")
    left.grid(axis="y", alpha=0.3)
    left.legend()
    for name, color in (("SAM-ON ρ=2.4", "C1"), ("SAM-ON ρ=0.6 + warm-up", "C2")):
        for i, run in enumerate(dict(found.get("fp32", [])).get(name, {}).values()):
            epochs, accuracies = zip(*run["curve"])
            right.plot(epochs, accuracies, color=color, alpha=0.7, label=name if i == 0 else None)
    right.axhline(LEFT_START, color="grey", linestyle=":", linewidth=1)
    right.set_xlabel("epoch")
    right.set_ylabel("training accuracy (%), noisy labels")
    right.set_title("SAM-ON's training accuracy per seed, fp32")
    right.grid(alpha=0.3)
    right.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", type=Path, help="also draw the per-seed figure to this PNG")
    args = parser.parse_args()
    found_by_precision = {precision: [(name, seeds(point)) for name, point in points if point.is_dir()]
                          for precision, points in ARMS.items()}
    for precision, found in found_by_precision.items():
        if not found:
            continue
        all_seeds = sorted({s for _, runs in found for s in runs})
        print(f"\n{precision}: final test accuracy (%) / flipped labels fitted (%) / first epoch past "
              f"{LEFT_START:g}% training accuracy, per seed\n")
        print("| arm | " + " | ".join(f"seed {s}" for s in all_seeds) + " | std |")
        print("|---|" + "---:|" * (len(all_seeds) + 1))
        for name, runs in found:
            cells = [f"{r['test']:.1f} / {r['flipped']:.0f} / {r['left']}" if (r := runs.get(s)) else "–"
                     for s in all_seeds]
            tests = [r["test"] for r in runs.values()]
            std = f"{statistics.stdev(tests):.2f}" if len(tests) > 1 else "n/a"
            print(f"| {name} | " + " | ".join(cells) + f" | {std} |")
        by_name = dict(found)
        print()
        for constant, warm in (("SAM-ON ρ=2.4", "SAM-ON ρ=0.6 + warm-up"),
                               ("SAM-all ρ=0.4", "SAM-all ρ=0.4 + warm-up")):
            if constant in by_name and warm in by_name and len(by_name[warm]) > 1:
                a = [r["test"] for r in by_name[constant].values()]
                b = [r["test"] for r in by_name[warm].values()]
                print(f"- spread, {constant} against {warm}: {spread_tests(a, b)}")
    if args.plot:
        plot(args.plot, found_by_precision)


if __name__ == "__main__":
    main()
