"""The ``normsam`` command line: train, compare, inspect, bench, download, and (from normsam.analysis)
sharpness, sweep, report.

Every subcommand is a thin layer over a library function; errors in the input and ordinary faults of the
environment (a full disk, a read-only folder, a run folder in use) end the command with a one-line message
(exit status 2) instead of a traceback, and a diverged run with exit status 3 (see :mod:`normsam.errors`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]


def _train(args: argparse.Namespace) -> int:
    from normsam.train.config import load_config, parse_overrides
    from normsam.train.loop import Trainer, resume

    if args.world_size is not None and not args.dry_run:
        raise ValueError("--world-size only plans (with --dry-run); a real run takes its processes from torchrun.")
    if args.resume and args.dry_run:
        raise ValueError("--dry-run plans a new run from --config; drop --resume.")
    if args.resume:
        if args.config:
            raise ValueError("--resume takes the run's saved config; drop --config.")
        resume(args.resume, parse_overrides(args.overrides))
        return 0
    from normsam.train.config_help import check_overrides_take_effect

    check_overrides_take_effect(parse_overrides(args.overrides))
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from normsam.train.plan import plan_run

        print(plan_run(cfg, world_size=args.world_size).text())
        return 0
    Trainer(cfg).run()
    return 0


def _make_shards(args: argparse.Namespace) -> int:
    from normsam.train.data.make_shards import make_shards

    manifest = make_shards(args.image_folder, args.out, shard_size=args.shard_size, seed=args.seed,
                           skip_corrupt=args.skip_corrupt, workers=args.workers)
    for split, entry in manifest["splits"].items():
        skipped = f", {len(entry['skipped'])} undecodable files skipped" if entry["skipped"] else ""
        print(f"{split}: {entry['count']:,} images of {len(manifest['classes'])} classes in {len(entry['shards'])} "
              f"shards {Path(args.out) / entry['pattern']}{skipped}")
    print(f"Manifest: {Path(args.out) / 'manifest.json'}; train with data=webdataset data_dir={args.out}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from normsam.analysis.compare import compare
    from normsam.train.config import parse_overrides

    overrides = parse_overrides(args.overrides)
    for key in ("data_dir", "epochs", "subset", "seed", "threads"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    if args.bench_rounds < 0:
        raise ValueError(f"--bench-rounds must be >= 0 (0: no step-time column), got {args.bench_rounds}.")
    compare(args.out, overrides=overrides, bench_rounds=args.bench_rounds)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from normsam.optim.scopes import describe_scope
    from normsam.train.models import build_model

    model = build_model(
        args.model, num_classes=args.num_classes, in_channels=args.in_channels, image_size=args.image_size, norm=args.norm
    )
    scope = args.scope if not args.pattern else args.pattern
    if args.plot:  # before the table: a folder that cannot be written fails at once
        from normsam.files import check_writable

        check_writable(Path(args.plot).resolve().parent, what="--plot folder", hint="choose another --plot path")
    report = describe_scope(model, scope)
    print(f"{args.model}: {report.total_numel:,} trainable parameters")
    print(report.table(max_rows=None if args.all else 40))
    if args.plot:
        from normsam.analysis.figures import plot_scope

        print(f"Figure: {plot_scope(model, args.plot, scope)}")
    return 0


def _download(args: argparse.Namespace) -> int:
    from normsam.train.data import load_data

    splits = load_data(args.name, data_dir=args.data_dir, download=True)
    print(f"{args.name}: {len(splits.train):,} training and {len(splits.test):,} test images in {args.data_dir}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import torch

    from normsam.bench import StepContext, chosen_variants, default_variants, run_benchmark
    from normsam.train.models import build_model

    if args.json:  # before minutes of measuring
        from normsam.files import check_writable

        check_writable(Path(args.json).resolve().parent, what="--json folder", hint="choose another --json path")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads} (leave it out for torch's default).")
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available here; use --device cpu.")
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, args.channels, args.image_size, args.image_size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    context = StepContext(rho_all=args.rho_all, rho_on=args.rho_on, perturbation=args.perturbation, amp=args.amp,
                          device_type=device.type, bf16_kernels=args.bf16_kernels)
    handwritten = not args.no_handwritten and args.amp != "fp16"  # the yardstick has no GradScaler path
    chosen, settings = chosen_variants(args)
    result = run_benchmark(
        lambda: build_model(args.model, num_classes=args.num_classes, in_channels=args.channels,
                            image_size=args.image_size),
        x, y, variants=default_variants(handwritten, variants=chosen, settings=settings), context=context,
        rounds=args.rounds, steps_per_round=args.steps_per_round, warmup=args.warmup,
        measure_memory=not args.no_memory, compile=args.compile, progress=True,
    )
    s = result.settings
    if chosen:
        from dataclasses import asdict

        s["variant_settings"] = asdict(settings)
    header = (f"{args.model}, batch {s['batch_size']} × {'×'.join(map(str, s['input_shape']))}, {s['device']}, "
              f"{s['threads']} threads, amp={s['amp']}"
              f"{', bf16_kernels=' + s['bf16_kernels'] if s['bf16_kernels'] != 'native' else ''}, compile={s['compile']}, torch {s['torch']}, "
              f"{s['rounds']} rounds × {s['steps_per_round']} steps; "
              f"{s['norm_parameters']:,} of {s['parameters']:,} parameters in norm layers")
    print(header)
    print(result.table())
    if args.json:
        from normsam.files import json_dumps

        Path(args.json).write_text(json_dumps({"header": header, **result.to_dict()}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normsam",
        description="Sharpness-aware minimization for PyTorch, built around SAM-ON (perturb only the norm layers).",
    )
    from normsam import __version__
    from normsam.train.config_help import config_help

    parser.add_argument("--version", action="version", version=f"normsam {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one run (YAML config + key=value overrides)", epilog=config_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a preset (quick, paper-cifar100-wrn, paper-imagenet-resnet50, paper-imagenet-vit-s32) "
                                     "or a YAML file")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its checkpoint")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (data, steps, rho, batch per rank, expected memory) and exit")
    p.add_argument("--world-size", type=int, help="--dry-run: plan for this many processes (default: $WORLD_SIZE or 1)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. scope=norm rho=0.5 epochs=20")
    p.set_defaults(func=_train)

    p = sub.add_parser("make-shards", help="webdataset shards (+ manifest.json) from an ImageNet-style folder")
    p.add_argument("image_folder", help="a folder with train/<class>/<image> and val/<class>/<image> (or test/)")
    p.add_argument("out", help="an empty or new folder for the shards")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="order of the training images across shards (default 0)")
    p.add_argument("--workers", type=int, default=1, help="processes that decode (check) the images (default 1)")
    p.add_argument("--skip-corrupt", action="store_true",
                   help="leave out images that do not decode (listed in the manifest) instead of stopping")
    p.set_defaults(func=_make_shards)

    p = sub.add_parser("compare", help="SGD vs SAM-all vs SAM-ON on Fashion-MNIST (the demo)")
    p.add_argument("--out", default="runs/compare",
                   help="output folder (default: runs/compare); runs already there are reused only when they were "
                        "trained with the settings asked for, else compare refuses and names the settings that differ")
    p.add_argument("--data-dir", help="where Fashion-MNIST lies (default: $NORMSAM_DATA, then Debian's path)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--subset", type=int, help="training images (stratified); default: the quick preset's 4000")
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--bench-rounds", type=int, default=5,
                   help="interleaved rounds of the step-time measurement after training (default 5; 0: no column)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="further config overrides for every run")
    p.set_defaults(func=_compare)

    p = sub.add_parser("inspect", help="what a scope selects on a model (a dry run)")
    p.add_argument("model", help="e.g. resnet20, wrn28-10, vit-small, timm:convnext_atto, torchvision:resnet18")
    p.add_argument("--scope", default="norm", help="all, norm, no-norm (default: norm)")
    p.add_argument("--pattern", nargs="+", help="glob patterns over parameter names instead of --scope")
    p.add_argument("--norm", help="norm of resnet*/wrn*: batch, group, layer, none")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--all", action="store_true", help="print every row")
    p.add_argument("--plot", metavar="FILE.png",
                   help="also draw the network, one bar per layer, the perturbed layers highlighted")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("download", help="download a data set through torchvision")
    p.add_argument("name", help="fashion-mnist, mnist, cifar10, cifar100")
    p.add_argument("--data-dir", default="data")
    p.set_defaults(func=_download)

    p = sub.add_parser("bench", help="step time and memory of SGD, SAM-all and SAM-ON (--variants: and SAM's "
                                     "variants beside pytorch_optimizer's), interleaved rounds")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--amp", default="off", choices=("off", "bf16", "fp16"))
    p.add_argument("--bf16-kernels", default="native", choices=("native", "upcast"),
                   help="with --amp bf16 on a CPU: upcast runs bf16 convolutions on the fp32 kernels (normsam.optim.amp)")
    p.add_argument("--compile", action="store_true", help="torch.compile every model copy")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps-per-round", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int)
    p.add_argument("--perturbation", default="sam")
    p.add_argument("--rho-all", type=float, default=0.05)
    p.add_argument("--rho-on", type=float, default=0.5)
    p.add_argument("--no-handwritten", action="store_true", help="skip the hand-written yardsticks")
    from normsam.bench.sam_variants import add_variant_arguments  # the same flags as benchmarks/step_time.py

    add_variant_arguments(p)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=_bench)

    _add_analysis_commands(sub)
    return parser


def _add_analysis_commands(sub) -> None:
    """Subcommands of the analysis side (sharpness, sweep, report) and the benchmark."""
    try:
        from normsam.analysis import commands
    except ImportError:  # pragma: no cover - only while a subcommand module is missing
        return
    commands.register(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from normsam.errors import fault_message

    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # noqa: BLE001 - ordinary faults become one line; a bug keeps its traceback
        fault = fault_message(err)
        if fault is None:
            raise
        print(f"normsam {args.command}: error: {fault[0]}", file=sys.stderr)
        return fault[1]


if __name__ == "__main__":
    sys.exit(main())
