"""Step time and extra memory of SGD, the peer (pytorch_optimizer.SAM), SAM-all, SAM-ON, the floor (and SAM's variants).

Usage:
    python benchmarks/step_time.py                        # --mode cpu: ResNet-20, batch 128, 2 threads
    python benchmarks/step_time.py --mode host-overhead   # ResNet-56, then ResNet-20, on 2 images of 8×8, 1 thread
    python benchmarks/step_time.py --mode gpu             # four models, bf16, batch 128, CUDA (gpu.sh)
    add --smoke to any mode for a run of seconds on tiny inputs (it checks the script, not the speed)
    add --variants to any mode for SAM's variants too: GSAM, WSAM, LookSAM, FriendlySAM, GCSAM, each at
    scope=all, as pytorch_optimizer's class of the same name and at scope=norm, and SAM-ON with ascent_steps=2
    (--variants gsam looksam: only those; about 2.5x the wall time of the run with all of them)

Modes and their targets (printed as PASS/FAIL; the exit status is 1 when one fails):
- cpu: SAM-ON / hand-written SAM-ON <= 1.03; SAM-all / SGD <= 2.05; SAM-ON with ascent_interval=4 / SGD <= 1.30;
  SAM-ON with ascent=momentum / SGD <= 1.05.
- host-overhead: the step is so small that Python and kernel-launch overhead dominate, as on a fast GPU;
  SAM-ON / hand-written SAM-ON <= 1.03 and SAM-all / pytorch_optimizer.SAM <= 1.02. The ResNet-20 case has the
  cpu mode's weights: its time outside the passes is the optimizer work of that mode's steps, measured without
  the passes' noise.
- the tables end with (all) / peer for SAM and each variant run beside its peer: the whole step and, on the CPU,
  its forward and backward passes and the time outside them (the optimizers' own work), each the geometric mean
  of the per-round ratios with its 95% interval.
- gpu: WRN-28-10 (32×32), ResNet-56 (32×32), ViT-S/32 and ResNet-50 (224×224), one table, no targets.
- with --variants, in every mode: <variant> (all) / pytorch_optimizer.<variant> <= 1.00 and
  <variant> (norm) / <variant> (all) < 1 (GCSAM's peer is pytorch_optimizer.SAM(use_gc=True)). LookSAM's rows
  time whole cycles of k steps (1 full SAM step, k - 1 single-pass steps; --looksam-k, default 5).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch

from normsam.bench import (
    FLOOR, FLOOR_ALL, MOMENTUM, PEER, SAM_ALL, SAM_ON, SGD, BenchResult, StepContext, Target, add_variant_arguments,
    chosen_variants, default_variants, format_bytes, interval_name, run_benchmark,
)
from normsam.files import json_dumps
from normsam.train.models import build_model


@dataclass(frozen=True)
class Case:
    label: str
    model: str
    image_size: int
    batch_size: int
    num_classes: int = 10
    rounds: int = 20
    steps_per_round: int = 3
    warmup: int = 2


# Steps per round are multiples of 4 where cheap: the ascent_interval=4 variant times whole cycles of 4 steps
# (run_benchmark rounds its steps up to a multiple of k). The GPU cases are sized so that gpu.sh, checks
# included, ends within 4 minutes on an H100.
MODES: dict[str, list[Case]] = {
    "cpu": [Case("CIFAR ResNet-20 (BatchNorm)", "resnet20", 32, 128)],
    "host-overhead": [Case("CIFAR ResNet-56 (BatchNorm), host overhead", "resnet56", 8, 2,
                           rounds=30, steps_per_round=8, warmup=4),
                      # the cpu mode's model: its optimizer work, read beside that mode's compute-bound steps
                      Case("CIFAR ResNet-20 (BatchNorm), host overhead", "resnet20", 8, 2,
                           rounds=30, steps_per_round=8, warmup=4)],
    "gpu": [
        Case("WRN-28-10, 32×32", "wrn28-10", 32, 128, rounds=6, steps_per_round=4, warmup=3),
        Case("ResNet-56, 32×32", "resnet56", 32, 128, rounds=6, steps_per_round=8, warmup=3),
        Case("ViT-S/32, 224×224", "timm:vit_small_patch32_224", 224, 128, 1000, rounds=6, steps_per_round=8,
             warmup=3),
        Case("ResNet-50, 224×224", "timm:resnet50", 224, 128, 1000, rounds=5, steps_per_round=4, warmup=3),
    ],
}
# --smoke: the same code paths on inputs a CPU runs in seconds (timm's test models stand in for the big ones).
SMOKE: dict[str, list[Case]] = {
    "cpu": [Case("CIFAR ResNet-20 (smoke)", "resnet20", 8, 4)],
    "host-overhead": [Case("CIFAR ResNet-56, host overhead (smoke)", "resnet56", 8, 2),
                      Case("CIFAR ResNet-20, host overhead (smoke)", "resnet20", 8, 2)],
    "gpu": [
        Case("WRN-10-1, 8×8 (smoke)", "wrn10-1", 8, 2),
        Case("ResNet-8, 8×8 (smoke)", "resnet8", 8, 2),
        Case("timm test_vit, 160×160 (smoke)", "timm:test_vit", 160, 2),
        Case("timm test_resnet, 64×64 (smoke)", "timm:test_resnet", 64, 2),
    ],
}
THREADS = {"cpu": 2, "host-overhead": 1}


def targets(mode: str, k: int) -> list[Target]:
    if mode == "cpu":
        return [Target(SAM_ON, FLOOR, 1.03), Target(SAM_ALL, SGD, 2.05), Target(interval_name(k), SGD, 1.30),
                Target(MOMENTUM, SGD, 1.05)]
    if mode == "host-overhead":
        return [Target(SAM_ON, FLOOR, 1.03), Target(SAM_ALL, PEER, 1.02)]
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=tuple(MODES), default="cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny inputs, 1 round of 1 step: checks the script")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default: the mode's)")
    parser.add_argument("--steps-per-round", type=int, help="steps per variant and round (default: the mode's)")
    parser.add_argument("--threads", type=int, help="torch threads on the CPU (default: cpu 2, host-overhead 1)")
    parser.add_argument("--batch-size", type=int, help="override the batch size of every case")
    parser.add_argument("--ascent-interval", type=int, default=4, help="k of the SAM-ON ascent_interval variant")
    parser.add_argument("--ascent-fraction", type=float,
                        help="also SAM-ON with the ascent on the first ⌈f·B⌉ examples (the runner's ascent_fraction)")
    parser.add_argument("--extra", action="store_true",
                        help="also SAM-ON with the classic first pass and the hand-written SAM-all")
    add_variant_arguments(parser)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--json", help="also write the raw figures to this file")
    parser.add_argument("--tables", metavar="JSON", nargs="+",
                        help="measure nothing: print the tables of a run saved with --json again; of several runs "
                             "of the same variants, pooled round by round (each case by its label)")
    args = parser.parse_args(argv)
    if args.tables:
        return print_saved_tables(args.tables)

    device = torch.device("cpu")
    if args.mode == "gpu":
        if torch.cuda.is_available():
            device = torch.device("cuda")
            torch.backends.cudnn.benchmark = True  # as a training run would; every variant alike
        elif not args.smoke:
            print("--mode gpu needs CUDA; on a machine without one run --mode gpu --smoke (checks the script).",
                  file=sys.stderr)
            return 2
    threads = args.threads or THREADS.get(args.mode)
    if threads and device.type == "cpu":
        torch.set_num_threads(threads)
    if device.type == "cpu" and not args.smoke:  # (not in --smoke: tests run it in-process; the flag is global)
        # Repeated steps on the same tiny batch drive values into the subnormal range, where x86 float math
        # slows down by up to 10x and the step time then measures subnormals, not the optimizer (seen in
        # host-overhead mode: SAM-all's step grew from 40 to 130 ms over the rounds); GPUs do not slow down so.
        torch.set_flush_denormal(True)
    context = StepContext(rho_all=0.05, rho_on=0.5, perturbation="sam", amp="bf16" if args.mode == "gpu" else "off",
                          device_type=device.type)
    if args.ascent_fraction is not None and not 0 < args.ascent_fraction <= 1:
        parser.error(f"--ascent-fraction must lie in (0, 1], got {args.ascent_fraction}")
    try:
        chosen, settings = chosen_variants(args)
    except ValueError as err:
        parser.error(f"--looksam-k: {err}")
    variants = default_variants(classic=args.extra, handwritten_all=args.extra, ascent_interval=args.ascent_interval,
                                ascent_fraction=args.ascent_fraction, variants=chosen, settings=settings)

    results: dict[str, BenchResult] = {}
    for case in (SMOKE if args.smoke else MODES)[args.mode]:
        if args.smoke:
            case = replace(case, rounds=1, steps_per_round=1, warmup=1)
        case = replace(case, rounds=args.rounds or case.rounds, steps_per_round=args.steps_per_round or case.steps_per_round,
                       batch_size=args.batch_size or case.batch_size)
        begin = time.perf_counter()
        torch.manual_seed(0)
        x = torch.randn(case.batch_size, 3, case.image_size, case.image_size, device=device)
        y = torch.randint(0, case.num_classes, (case.batch_size,), device=device)
        result = run_benchmark(
            lambda: build_model(case.model, num_classes=case.num_classes, image_size=case.image_size),
            x, y, variants=variants, context=context, rounds=case.rounds, steps_per_round=case.steps_per_round,
            warmup=case.warmup, measure_memory=not args.no_memory, progress=False,
        )
        results[case.label] = result
        s = result.settings
        result.settings["wall_s"] = time.perf_counter() - begin
        if chosen:
            result.settings["variant_settings"] = asdict(settings)
        print(f"\n{case.label}: batch {s['batch_size']} × {'×'.join(map(str, s['input_shape']))}, {s['device']}, "
              f"{s['threads']} threads, amp={s['amp']}, torch {s['torch']}, "
              f"pytorch_optimizer {s['pytorch_optimizer'] or '(not installed)'}, "
              f"{s['rounds']} rounds × {s['steps_per_round']} steps; {s['norm_parameters']:,} of "
              f"{s['parameters']:,} parameters in norm layers; measured in {s['wall_s']:.0f} s", flush=True)
        if args.mode != "gpu":
            print(result.table(targets(args.mode, args.ascent_interval)))
            _memory_note(result)

    if args.mode == "gpu":
        print()
        print(gpu_table(results, args.ascent_interval))
        for label, r in results.items():
            for title, table in (("SAM's variants", r.variants_table()),
                                 ("beside pytorch_optimizer, round by round", r.peer_table())):
                if table:
                    print(f"\n{label}, {title}:\n{table}")
    if args.json:
        with open(args.json, "w") as f:
            f.write(json_dumps({label: r.to_dict(targets(args.mode, args.ascent_interval))
                                for label, r in results.items()}, indent=2))
    verdicts = [r.check(t) for r in results.values()
                for t in [*targets(args.mode, args.ascent_interval), *r.variant_targets()]]
    return 1 if False in verdicts and not args.smoke else 0


def print_saved_tables(paths: list[str]) -> int:
    """The tables of every case of one or more ``--json`` files, as a run prints them; several runs of a case
    (the same label) are pooled round by round (:meth:`BenchResult.pooled`)."""
    cases: dict[str, list[tuple[BenchResult, list[Target]]]] = {}
    for path in paths:
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError) as err:
            print(f"--tables {path}: cannot read it ({err}); pass a file written by --json.", file=sys.stderr)
            return 2
        for label, data in saved.items():
            cases.setdefault(label, []).append(BenchResult.from_dict(data))
    for label, runs in cases.items():
        try:
            result = BenchResult.pooled([r for r, _ in runs])
        except ValueError as err:
            print(f"--tables: {label}: {err}", file=sys.stderr)
            return 2
        # the targets the run printed in its ratio table (SAM's variants' are in their own table)
        shown = [t for t in runs[0][1] if t not in result.variant_targets()]
        s = result.settings
        print(f"\n{label}: {s['device']}, {s['threads']} threads, {s['rounds']} rounds × {s['steps_per_round']} "
              f"steps ({len(runs)} run{'s' if len(runs) > 1 else ''} pooled: {', '.join(paths)})")
        print(result.table(shown))
    return 0


def _memory_note(result: BenchResult) -> None:
    on, all_ = result[SAM_ON], result[SAM_ALL]
    if on.extra_bytes is None or all_.extra_bytes is None:
        return
    s = result.settings
    print(f"\nSAM-ON extra peak memory {on.extra_bytes:,} B vs norm parameters {s['norm_parameters'] * 4:,} B "
          f"(SAM-all: {all_.extra_bytes:,} B; all parameters {s['parameters'] * 4:,} B)")


def gpu_table(results: dict[str, BenchResult], k: int) -> str:
    """One row per model: SGD's step time, every other variant as ×SGD with its extra memory, key ratios."""
    columns = [PEER, SAM_ALL, SAM_ON, interval_name(k), MOMENTUM, FLOOR, FLOOR_ALL]
    columns = [c for c in columns if any(c in r for r in results.values())]
    short = {PEER: "peer", FLOOR: "floor (hand-written SAM-ON)", FLOOR_ALL: "hand-written SAM-all",
             interval_name(k): f"SAM-ON, k={k}", MOMENTUM: "SAM-ON, momentum ascent"}
    lines = [
        "| model | SGD (ms) | " + " | ".join(f"{short.get(c, c)} ×SGD, extra memory" for c in columns)
        + " | SAM-ON / floor | SAM-all / peer |",
        "|---|---:|" + "---:|" * len(columns) + "---:|---:|",
    ]
    for label, r in results.items():
        cells = [label, f"{r[SGD].median_ms:.1f}"]
        for c in columns:
            v = r[c] if c in r else None
            if v is None or v.unavailable:
                cells.append("n/a")
            else:
                mem = "" if v.extra_bytes is None else ", " + format_bytes(v.extra_bytes)
                cells.append(f"{v.median_ratio:.2f}×{mem}")
        for num, den in ((SAM_ON, FLOOR), (SAM_ALL, PEER)):
            value = r.ratio(num, den)
            cells.append("n/a" if value is None else f"{value:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    missing = {v.name: v.unavailable for r in results.values() for v in r.variants if v.unavailable}
    lines += [f"\n{name}: {why}" for name, why in missing.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
