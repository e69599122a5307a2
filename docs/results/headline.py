"""Print the README's headline tables from a report's CSVs (so the numbers are copied, never retyped).

    python docs/results/headline.py docs/results/study-noise/report
    python docs/results/headline.py docs/results/study-regime/report --bench docs/results/study-regime/step_time.json

The arms table gives, per arm (and per precision when the report has several): the seeds, the final test
accuracy's mean ± std and 95% interval, the paired difference to SGD *of the same precision*, the sharpness,
the share of the flipped training labels the arm fitted (with label noise), and two step costs: the
interleaved benchmark's median ratio to SGD (``benchmarks/step_time.py --json``, for the arms it benchmarks;
"–" for the others) and the study's own training seconds per epoch (the runs' ``mean_epoch_time``, measured
with two runs side by side) as a ratio to SGD's in the same precision. Then the precision table, when there
is one, and the claims table.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
from pathlib import Path

from normsam.analysis.grouping import without_context
from normsam.bench import MOMENTUM, SAM_ALL, SAM_ON, SGD, interval_name


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _num(text: str | None, fmt: str) -> str:
    return format(float(text), fmt) if text not in ("", None) else "n/a"


def _point(point: str) -> dict[str, str]:
    """A sweep point's folder name ("scope=norm,rho=2.4,ascent_interval=4") as its settings."""
    return dict(part.split("=", 1) for part in point.split(",") if "=" in part)


def bench_variant(point: str) -> str | None:
    """The benchmark variant whose step an arm's step is (None: the benchmark has no such variant)."""
    settings = _point(point)
    scope = settings.pop("scope", None)
    # settings that do not change the step's passes (a ρ warm-up only scales ε)
    for key in ("rho", "sharpness_at_end", "amp", "bf16_kernels", "bn_policy", "rho_warmup_epochs"):
        settings.pop(key, None)
    if scope == "none" and not settings:
        return SGD
    if scope == "all" and not settings:
        return SAM_ALL
    if scope == "norm":
        if not settings:
            return SAM_ON
        if settings == {"ascent": "momentum"}:
            return MOMENTUM
        if set(settings) == {"ascent_interval"}:
            return interval_name(int(settings["ascent_interval"]))
    return None


def precision_name(context: str) -> str:
    """A report context ("amp=bf16, bf16_kernels=upcast") in words ("bf16 (upcast kernels)"); others as they are."""
    settings = _point(context.replace(", ", ","))
    amp = settings.pop("amp", None)
    kernels = settings.pop("bf16_kernels", "native")
    if amp is None or settings:
        return context or "–"
    name = "fp32" if amp == "off" else amp
    return name + (f" ({kernels} kernels)" if amp == "bf16" and kernels != "native" else "")


def _bench_ratios(path: str | None) -> dict[str, float]:
    if path is None:
        return {}
    cases = json.loads(Path(path).read_text())
    if len(cases) != 1:
        raise ValueError(f"{path} holds {len(cases)} benchmark cases; pass the JSON of one case (--mode cpu).")
    (case,) = cases.values()
    return {v["name"]: v["median_ratio_to_sgd"] for v in case["variants"] if not v["unavailable"]}


def _epoch_seconds(runs: list[dict[str, str]]) -> dict[str, float]:
    """Mean seconds per epoch of each sweep point (a run folder's parent is its point)."""
    by_point: dict[str, list[float]] = {}
    for run in runs:
        if run.get("status") == "finished" and run.get("mean_epoch_time"):
            by_point.setdefault(Path(run["folder"]).parent.name, []).append(float(run["mean_epoch_time"]))
    return {point: statistics.fmean(times) for point, times in by_point.items()}


def headline(report: str, bench: str | None = None) -> str:
    folder = Path(report)
    arms, paired = _rows(folder / "arms.csv"), _rows(folder / "paired.csv")
    if not arms:
        raise ValueError(f"{folder} has no arms.csv; give the folder that `normsam report` wrote.")
    ratios, seconds = _bench_ratios(bench), _epoch_seconds(_rows(folder / "runs.csv"))
    contexts = len({a["context"] for a in arms}) > 1
    vs_sgd = {(r["context"], r["arm"]): r for r in paired
              if r["reference_role"] == "sgd" and r["metric"] == "final_test_acc"}
    sgd_seconds = {a["context"]: seconds.get(a["point"]) for a in arms if "sgd" in a["roles"].split()}
    memorized = any(a.get("final_flipped_acc_mean") for a in arms)  # runs with label noise
    head = ["arm", *(["precision"] if contexts else []), "seeds", "test acc. (%) mean ± std", "95% CI",
            "− SGD, paired: mean [95% CI]", "sharpness", *(["memorized flipped labels (%)"] if memorized else [])]
    if bench:
        head.append("step cost: benchmark, × SGD")
    head.append("training s / epoch in the study (× SGD)")
    lines = ["| " + " | ".join(head) + " |", "|---|" + ("---|" if contexts else "") + "---:|" * (len(head) - 1 - contexts)]
    for a in arms:
        d = vs_sgd.get((a["context"], a["arm"]))
        diff = (f"{float(d['diff_mean']):+.2f} [{_num(d['diff_ci_low'], '+.2f')}, {_num(d['diff_ci_high'], '+.2f')}]"
                if d and d["diff_mean"] else "–")
        arm = without_context(a["arm"], a["context"]) if contexts else a["arm"]
        cells = [arm, *([precision_name(a["context"])] if contexts else []), a["final_test_acc_n"],
                 f"{float(a['final_test_acc_mean']):.2f} ± {_num(a['final_test_acc_std'], '.2f')}",
                 f"[{_num(a['final_test_acc_ci_low'], '.2f')}, {_num(a['final_test_acc_ci_high'], '.2f')}]",
                 diff, _num(a["sharpness_mean"], ".3f"),
                 *([_num(a["final_flipped_acc_mean"], ".1f")] if memorized else [])]
        if bench:
            variant = bench_variant(a.get("point", ""))
            cells.append(f"{ratios[variant]:.2f}" if variant in ratios else "–")
        own, base = seconds.get(a["point"]), sgd_seconds.get(a["context"])
        cells.append(f"{own:.1f} ({own / base:.2f})" if own and base else f"{own:.1f}" if own else "–")
        lines.append("| " + " | ".join(cells) + " |")

    precision = _rows(folder / "precision.csv")
    if precision:
        context_of = {a["arm"]: a["context"] for a in arms}
        lines += ["", "| arm | precision | test acc. shift vs fp32: mean [95% CI] (n) | "
                      "shift minus SGD's shift: mean [95% CI] (n) |", "|---|---|---:|---:|"]
        for p in precision:
            def interval(prefix: str) -> str:
                if not p[f"{prefix}_n"] or p[f"{prefix}_n"] == "0":
                    return "–"
                return (f"{float(p[f'{prefix}_mean']):+.2f} [{_num(p[f'{prefix}_ci_low'], '+.2f')}, "
                        f"{_num(p[f'{prefix}_ci_high'], '+.2f')}] ({p[f'{prefix}_n']})")
            arm = without_context(p["arm"], context_of.get(p["arm"], ""))  # the fp32 arm, less its precision
            name = re.sub(r"\(bf16_kernels=(\w+)\)", r"(\1 kernels)", p["precision"])  # as the arms table says it
            lines.append(f"| {arm} | {name} | {interval('shift')} | {interval('vs_sgd')} |")

    lines += ["", "| claim | " + ("precision | " if contexts else "") + "verdict | deciding comparison: "
              "mean [95% CI] (n) → verdict; seeds to decide |", "|---|" + ("---|" if contexts else "") + "---|---|"]
    by_claim: dict[tuple[str, str], list[dict[str, str]]] = {}
    for c in _rows(folder / "claims.csv"):
        by_claim.setdefault((c["context"], c["claim"]), []).append(c)
    untested = []
    for (context, claim), parts in by_claim.items():
        if parts[0]["claim_verdict"] == "not tested":  # no arm plays one of its roles here: said below the table
            untested.append(claim + (f" in {precision_name(context)}" if contexts and context else ""))
            continue
        tests = "; ".join(
            f"{p['test']}: {_num(p['diff_mean'], '+.3g')} [{_num(p['diff_ci_low'], '+.3g')}, "
            f"{_num(p['diff_ci_high'], '+.3g')}] (n={p['diff_n'] or 0}) → {p['verdict']}"
            + (f", {p['seeds_needed']} seeds to decide" if p.get("seeds_needed") else "") for p in parts)
        where = [precision_name(context)] if contexts else []
        lines.append(f"| {claim}: {parts[0]['statement']} | " + "".join(w + " | " for w in where)
                     + f"**{parts[0]['claim_verdict']}** | {tests} |")
    if untested:
        lines += ["", "Not tested (no arm plays one of the claim's roles): " + ", ".join(untested) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", help="the folder `normsam report` wrote (arms.csv, paired.csv, claims.csv)")
    parser.add_argument("--bench", help="benchmarks/step_time.py --json output: adds the benchmark's step cost")
    args = parser.parse_args(argv)
    print(headline(args.report, args.bench))


if __name__ == "__main__":
    main()
