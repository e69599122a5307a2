"""Print the README's headline tables from a report's CSVs (so the numbers are copied, never retyped).

    python docs/results/headline.py docs/results/study-noise/report
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _num(text: str, fmt: str) -> str:
    return format(float(text), fmt) if text not in ("", None) else "n/a"


def main(report: str) -> None:
    folder = Path(report)
    arms, paired = _rows(folder / "arms.csv"), _rows(folder / "paired.csv")
    vs_sgd = {r["arm"]: r for r in paired if r["reference_role"] == "sgd" and r["metric"] == "final_test_acc"}
    print("| arm | seeds | test acc. (%) mean ± std | 95% CI | − SGD, paired: mean [95% CI] | sharpness |")
    print("|---|---:|---:|---:|---:|---:|")
    for a in arms:
        d = vs_sgd.get(a["arm"])
        diff = (f"{float(d['diff_mean']):+.2f} [{_num(d['diff_ci_low'], '+.2f')}, {_num(d['diff_ci_high'], '+.2f')}]"
                if d else "–")
        print(f"| {a['arm']} | {a['final_test_acc_n']} | {float(a['final_test_acc_mean']):.2f} ± "
              f"{_num(a['final_test_acc_std'], '.2f')} | [{_num(a['final_test_acc_ci_low'], '.2f')}, "
              f"{_num(a['final_test_acc_ci_high'], '.2f')}] | {diff} | {_num(a['sharpness_mean'], '.3f')} |")
    print()
    print("| claim | verdict | deciding comparison: mean [95% CI] (n) |")
    print("|---|---|---|")
    by_claim: dict[str, list[dict[str, str]]] = {}
    for c in _rows(folder / "claims.csv"):
        by_claim.setdefault(c["claim"], []).append(c)
    for claim, parts in by_claim.items():
        tests = "; ".join(
            f"{p['test']}: {_num(p['diff_mean'], '+.3g')} [{_num(p['diff_ci_low'], '+.3g')}, "
            f"{_num(p['diff_ci_high'], '+.3g')}] (n={p['diff_n'] or 0}) → {p['verdict']}" for p in parts)
        print(f"| {claim}: {parts[0]['statement']} | **{parts[0]['claim_verdict']}** | {tests} |")


if __name__ == "__main__":
    main(sys.argv[1])
