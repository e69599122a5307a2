"""The analysis subcommands of the ``normsam`` CLI: ``sharpness``, ``sweep`` and ``report``.

:func:`register` adds them to the CLI's subparsers. Each subcommand is a pair: ``_add_<name>(subparsers)``
defines its arguments and sets ``func`` to ``_<name>(args) -> exit code``. To add a subcommand, write such a
pair and list the ``_add_`` function in :data:`SUBCOMMANDS`. Library modules are imported inside the
commands, so that ``normsam --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["register", "SUBCOMMANDS"]


# --- sharpness -------------------------------------------------------------------------------------------


def _sharpness(args: argparse.Namespace) -> int:
    from normsam.analysis.run_sharpness import SHARPNESS_FILE, measure_run_sharpness

    result = measure_run_sharpness(
        args.run_dir,
        rho=args.rho,
        steps=args.steps,
        m=args.m,
        n=args.n,
        kind=args.kind,
        norm=args.norm,
        adaptive=not args.no_adaptive,
        scope=args.scope,
        logit_normalize=args.logit_normalize,
        convention=args.convention,
        seed=args.seed,
        device=args.device,
        progress=args.progress,
    )
    error = result["error_sharpness"]
    if result["epoch"] < result["run_epochs"]:
        print(f"note: {args.run_dir} is unfinished: measured its checkpoint of epoch {result['epoch']} of "
              f"{result['run_epochs']}; a report flags this measurement as stale once the run has finished.")
    print(
        f"{args.run_dir} ({result['method']}, epoch {result['epoch']}): {result['kind']}-case "
        f"{'adaptive ' if result['adaptive'] else ''}{result['norm']} sharpness {result['sharpness']:.4f}"
        f" (error {'n/a' if error is None else f'{error:.4f}'}; rho {result['rho']:g}, {result['steps']} steps, "
        f"m={result['m']}, {result['examples']} examples, scope {result['scope']}) -> "
        f"{args.run_dir.rstrip('/')}/{SHARPNESS_FILE}"
    )
    return 0


def _add_sharpness(sub) -> None:
    p = sub.add_parser(
        "sharpness",
        help="adaptive worst-case sharpness of a run's checkpoint (writes sharpness.json)",
        description="Measure the sharpness of a run folder's model (SPEC §3) and record it in sharpness.json; "
        "a measurement with the same settings replaces the older one.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by `normsam train`")
    p.add_argument("--rho", type=float, default=0.003, help="radius of the perturbation set (default 0.003)")
    p.add_argument("--steps", type=int, default=20, help="APGD steps or Gaussian samples (default 20)")
    p.add_argument("--m", type=int, default=128, help="examples per batch, the m of m-sharpness (default 128)")
    p.add_argument("--n", type=int, default=1024, help="training examples in all (default 1024)")
    p.add_argument("--kind", choices=("worst", "average"), default="worst")
    p.add_argument("--norm", choices=("linf", "l2"), default="linf")
    p.add_argument("--scope", choices=("all", "norm", "no-norm"), default="all", help="which weights are perturbed")
    p.add_argument("--no-adaptive", action="store_true", help="a fixed set instead of one scaled by |w|")
    p.add_argument("--logit-normalize", action="store_true", help="centre and ℓ2-normalize the logits")
    p.add_argument("--convention", choices=("apgd", "reference"), default="apgd",
                   help="apgd (default) or reference: the sharpness paper's code, whose 1-step value is taken "
                   "at 0.75 rho (use it to compare with the paper's 1-step numbers)")
    p.add_argument("--seed", type=int, default=0, help="chooses the examples and seeds the measurement")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--progress", action="store_true", help="a progress bar over the batches")
    p.set_defaults(func=_sharpness)


# --- sweep -----------------------------------------------------------------------------------------------


def _sweep(args: argparse.Namespace) -> int:
    from normsam.analysis.sweep import load_sweep, run_sweep
    from normsam.train.config import sweep_file

    sweep = load_sweep(sweep_file(args.sweep_file))  # a file, or the name of a packaged example
    if args.status:
        from normsam.analysis.executors import status_table, sweep_status
        from normsam.analysis.sweep import SWEEP_FILE

        print(status_table(sweep_status(sweep, sweep.out / SWEEP_FILE)))
        return 0
    if args.dry_run:
        for run in sweep.runs:
            print(f"{run.folder}  {' '.join(f'{k}={v}' for k, v in run.overrides.items())}")
        print(f"{len(sweep.runs)} runs")
        return 0
    sweep = run_sweep(sweep, workers=args.workers, executor=args.executor, wait=args.wait)
    return 1 if sweep.failed else 0


def _add_sweep(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="a grid of runs over seeds; restartable (finished runs are skipped, interrupted ones resumed)",
        description="Train a grid of runs described by a YAML file (see configs/sweep-tiny.yaml). Exits with "
        "status 1 when a run failed.",
    )
    p.add_argument("sweep_file", metavar="SWEEP.yaml",
                   help="a sweep file, or an example shipped with normsam: sweep-tiny, sweep-fmnist-small, sweep-fmnist")
    p.add_argument("--workers", type=int, help="runs in parallel, one process each (default: the file's, or 1)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their folders, train nothing")
    p.add_argument("--executor", choices=("local", "slurm", "submitit-local"),
                   help="where the runs train (default: the file's executor:, or local): slurm submits jobs")
    p.add_argument("--wait", action="store_true", help="with a job executor: return when every job has ended")
    p.add_argument("--status", action="store_true",
                   help="print every run's state (pending, running, done, failed, ...) with job id and log; train nothing")
    p.set_defaults(func=_sweep)


# --- study -----------------------------------------------------------------------------------------------


def _study(args: argparse.Namespace) -> int:
    from normsam.analysis.study import run_study
    from normsam.train.config import parse_overrides

    run_study(args.study_file, workers=args.workers, phases=args.phase, report=not args.no_report,
              overrides=parse_overrides(args.overrides), out=args.out, executor=args.executor,
              gate_margin=args.gate_margin)
    return 0


def _add_study(sub) -> None:
    p = sub.add_parser(
        "study",
        help="a ρ pilot on the validation split, then the reported sweeps and their report (restartable)",
        description="Run a study file (see configs/study/noise.yaml): the pilot sweep, the choice of ρ per "
        "scope by validation accuracy, each phase's sweep with the chosen ρ, then `normsam report`.",
    )
    p.add_argument("study_file", metavar="STUDY.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config keys laid over the study's base for every run (e.g. device=cuda)")
    p.add_argument("--out", help="parent folder of the study (default: the file's out:)")
    p.add_argument("--executor", choices=("local", "slurm", "submitit-local"),
                   help="where the runs train (default: the file's executor:, or local); a phase waits for its jobs")
    p.add_argument("--workers", type=int, help="runs in parallel, one process each (default: the file's)")
    p.add_argument("--phase", action="append",
                   help="run only this phase (repeatable; 'gate' for the regime gate, 'pilot' for the ρ pilot)")
    p.add_argument("--gate-margin", type=float,
                   help="replace the gate's margin in test-accuracy points (e.g. 0 for a smoke test)")
    p.add_argument("--no-report", action="store_true", help="skip the report at the end")
    p.set_defaults(func=_study)


# --- report ----------------------------------------------------------------------------------------------


def _report(args: argparse.Namespace) -> int:
    from normsam.analysis.report import make_report
    from normsam.files import check_writable

    for path in args.run_dirs:  # before the output folder is made, which could be below a mistyped path
        if not Path(path).exists():
            raise FileNotFoundError(f"{path} does not exist; pass run folders or folders that contain them.")
    out = report_folder(args.run_dirs, args.out, overwrite=args.overwrite)
    check_writable(out, what="report folder", hint="choose another --out")  # before reading every run
    paths = make_report(args.run_dirs, out=out, include_diverged=args.include_diverged)
    for path in paths:
        print(f"wrote {path}")
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="tables and plots (mean ± std over seeds) from run folders",
        description="Collect run folders (searched recursively) and write report.md, CSV tables and PNG plots.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders or folders that contain them")
    p.add_argument("--out", help="output folder (default: report/ beside the runs: inside the one folder given, "
                   "else inside the folders' common parent)")
    p.add_argument("--overwrite", action="store_true", help="replace a report already in the output folder")
    p.add_argument("--include-diverged", action="store_true",
                   help="count diverged runs in the tables and means (with their last good epoch's figures)")
    p.set_defaults(func=_report)


def report_folder(run_dirs: list[str], out: str | None, *, overwrite: bool = False) -> Path:
    """Where ``normsam report`` writes: ``out``, or ``report/`` beside the runs (inside the one folder given,
    else inside the folders' common parent). An earlier report there is replaced only with ``overwrite``."""
    if out is not None:
        folder = Path(out)
    elif len(run_dirs) == 1:
        folder = Path(run_dirs[0]) / "report"
    else:
        folder = Path(os.path.commonpath([os.path.abspath(d) for d in run_dirs])) / "report"
    if (folder / "report.md").exists() and not overwrite:
        raise ValueError(
            f"{folder} already holds a report (report.md); pass --overwrite to replace it, or --out another folder."
        )
    return folder


#: The functions that add one subcommand each, in the order of `normsam --help`.
SUBCOMMANDS: list[Callable] = [_add_sharpness, _add_sweep, _add_study, _add_report]


def register(subparsers) -> None:
    """Add the analysis subcommands to the ``normsam`` CLI's subparsers."""
    for add in SUBCOMMANDS:
        add(subparsers)
