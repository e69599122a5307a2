"""Step time and extra memory of SGD, SAM-all and SAM-ON on CIFAR ResNet-20 (BatchNorm), CPU.

Usage: python benchmarks/step_time.py [--rounds 20] [--steps-per-round 3] [--threads 2] [--batch-size 128]

Prints a markdown table and checks the targets of the core issue:
- SAM-ON with the cheap ascent within 4% of the hand-written SAM-ON, and <= 0.95x normsam's SAM-all;
- SAM-all <= 2.10x SGD;
- SAM-ON's extra peak memory about the size of the norm parameters.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from normsam.bench import StepContext, run_benchmark
from normsam.train.models import build_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--json", help="also write the raw figures to this file")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch_size,))
    result = run_benchmark(
        lambda: build_model("resnet20", num_classes=10),
        x,
        y,
        context=StepContext(rho_all=0.05, rho_on=0.5, perturbation="sam"),
        rounds=args.rounds,
        steps_per_round=args.steps_per_round,
    )
    s = result.settings
    print(f"CIFAR ResNet-20 (BatchNorm), batch {s['batch_size']}, {s['threads']} threads, {s['device']}, "
          f"torch {s['torch']}, {s['rounds']} rounds x {s['steps_per_round']} steps")
    print(result.table())

    cheap, hand = result["SAM-ON (cheap ascent)"], result["hand-written SAM-ON (cheap ascent)"]
    sam_all = result["SAM-all"]
    vs_hand = _median_ratio(cheap.step_times, hand.step_times)
    vs_all = _median_ratio(cheap.step_times, sam_all.step_times)
    norm_bytes = s["norm_parameters"] * 4
    checks = [
        (f"SAM-ON cheap / hand-written SAM-ON = {vs_hand:.3f} (<= 1.04)", vs_hand <= 1.04),
        (f"SAM-ON cheap / normsam SAM-all = {vs_all:.3f} (<= 0.95)", vs_all <= 0.95),
        (f"SAM-all / SGD = {sam_all.median_ratio:.3f} (<= 2.10)", sam_all.median_ratio <= 2.10),
        (f"SAM-ON extra peak memory {cheap.extra_bytes:,} B vs norm parameters {norm_bytes:,} B "
         f"(SAM-all: {sam_all.extra_bytes:,} B; all parameters {s['parameters'] * 4:,} B)", None),
    ]
    print()
    for text, ok in checks:
        print(("PASS " if ok else "FAIL " if ok is not None else "     ") + text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_dict(), f, indent=2)
    return 0 if all(ok is not False for _, ok in checks) else 1


def _median_ratio(a: list[float], b: list[float]) -> float:
    ratios = sorted(x / y for x, y in zip(a, b))
    n = len(ratios)
    return ratios[n // 2] if n % 2 else 0.5 * (ratios[n // 2 - 1] + ratios[n // 2])


if __name__ == "__main__":
    sys.exit(main())
