"""Step-time ratios of two versions of normsam, measured interleaved: before and after a change to the core.

Each version is a checkout (``git worktree add ../before COMMIT``); this script runs each one's own
``benchmarks/step_time.py`` in turn, ``--repeats`` times (before, after, before, after, …), with the same
arguments, and prints the ratios that decide whether a refactoring cost speed: SAM-ON / the hand-written SAM-ON
and SAM-all / ``pytorch_optimizer.SAM``, both measured inside each run (so a busy machine moves both sides of a
ratio alike), as the median over the repeats and every repeat's value.

    python benchmarks/before_after.py ../before . --repeats 3 -- --mode host-overhead
    python benchmarks/before_after.py ../before . --repeats 3 --json out.json -- --mode cpu --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

#: (label, numerator variant, denominator variant) as step_time.py names them.
RATIOS = (
    ("SAM-ON / hand-written SAM-ON", "SAM-ON (cheap ascent)", "hand-written SAM-ON"),
    ("SAM-all / pytorch_optimizer.SAM", "SAM-all", "pytorch_optimizer.SAM"),
    ("SAM-ON / SGD", "SAM-ON (cheap ascent)", "SGD"),
)


def run_once(tree: Path, args: list[str]) -> dict:
    """One run of ``tree``'s step_time.py on ``tree``'s own package; its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        env = {**os.environ, "PYTHONPATH": str(tree / "src")}  # this tree's package, not the installed one
        done = subprocess.run([sys.executable, str(tree / "benchmarks" / "step_time.py"), *args, "--json", str(out)],
                              env=env, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # step_time.py exits 1 when one of its own targets fails; the figures are still written and are what
        # this comparison is for. Only a run that wrote no figures is an error.
        if not out.exists():
            raise SystemExit(f"{tree}/benchmarks/step_time.py {' '.join(args)} failed (exit {done.returncode}) "
                             f"and wrote no figures:\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


def ratios(result: dict) -> dict[str, dict[str, float]]:
    """``{case: {ratio label: median step time ratio}}``."""
    out = {}
    for case, record in result.items():
        medians = {v["name"]: v["median_step_ms"] for v in record["variants"] if v.get("median_step_ms")}
        out[case] = {label: medians[a] / medians[b] for label, a, b in RATIOS if a in medians and b in medians}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, help="checkout of the version before the change")
    parser.add_argument("after", type=Path, help="checkout of the version after it")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each version, interleaved")
    parser.add_argument("--json", type=Path, help="also write every run's ratios here")
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    bench_args = argv[cut + 1:]  # after --: step_time.py's own arguments
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for repeat in range(args.repeats):
        for name in ("before", "after"):
            runs[name].append(ratios(run_once(getattr(args, name).resolve(), bench_args)))
            print(f"repeat {repeat + 1}/{args.repeats}: {name} done", file=sys.stderr, flush=True)
    for case in runs["after"][0]:
        print(f"\n{case} (step_time.py {' '.join(bench_args)}; {args.repeats} interleaved runs each)")
        print(f"| ratio | before: median (runs) | after: median (runs) |\n|---|---:|---:|")
        for label, _, _ in RATIOS:
            values = {n: [r[case][label] for r in runs[n] if label in r.get(case, {})] for n in runs}
            if all(values.values()):
                cells = [f"{statistics.median(v):.3f} ({', '.join(f'{x:.3f}' for x in v)})" for v in values.values()]
                print(f"| {label} | {cells[0]} | {cells[1]} |")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
