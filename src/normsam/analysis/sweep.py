"""``normsam sweep SWEEP.yaml``: a grid of training runs over several seeds, restartable.

A sweep file is YAML with these top-level keys::

    base:              # config keys for every run, as for `normsam train` (not seed, not out)
      data: fashion-mnist
      epochs: 5
    grid:              # key -> list of values; the runs are the product of all lists
      scope: [none, all, norm]
      rho: [0.5, 1.0]
    seeds: [0, 1, 2]   # default [0]
    out: runs/my-sweep # the parent folder of the run folders (relative to the working directory)
    preset: quick      # optional: a preset name or YAML config file the base is layered on; default none
    workers: 1         # optional: runs in parallel (processes); default 1 = in this process
    executor: local    # optional: local (default) | slurm | submitit-local (see normsam.analysis.executors)
    slurm: {...}       # optional: SLURM options for executor: slurm (partition, gpus_per_node, time, ...)

``grid`` may also be a list of such mappings; the runs are then the union of their products. That avoids
training the same SGD baseline once per ρ::

    grid:
      - {scope: [none]}
      - {scope: [all, norm], rho: [0.5, 1.0]}

Folder names
------------
Each run lives in ``out/<point>/seed=<seed>``, where ``<point>`` is ``key=value`` for every grid key of the
point, in the order of the grid, joined by commas: ``out/scope=norm,rho=0.5/seed=0``. Without a grid the
runs are ``out/seed=<seed>``. Values are written as ``null``, ``true``/``false``, integers as digits, floats
as Python's shortest round-trip text (``0.5``, ``1e-05``) and strings as they are. A value that is not such a
scalar made only of the characters ``A-Z a-z 0-9 . _ + -`` (a list of glob patterns, a string with ``/`` or
spaces), or is longer than 40 characters, is written with those characters replaced by ``_`` (list items
joined by ``+``) and a 6-character hash of the exact value appended (``scope=_.bn_+head._-1a2b3c``), so that
names stay readable, safe on every file system and distinct.

Restarting
----------
Every run goes through :func:`normsam.train.loop.run_or_resume`: a finished run (``summary.json``) is skipped,
an interrupted one resumes from its checkpoint. A sweep can therefore be stopped (Ctrl-C) and started again
with the same command. A run folder that holds a run with other settings than the sweep asks for (because
the sweep file was edited) is reported as failed instead of being silently reused. A failing run does not
stop the others; the sweep prints a summary (done / skipped / failed) at the end, and ``out/sweep.json``
lists every run with its folder, overrides, status and error.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import re
import sys
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from normsam.files import read_json, read_yaml
from normsam.train import checkpoint as ckpt
from normsam.train.config import TrainConfig, config_keys, load_config, unknown_key_error
from normsam.train.divergence import RunDiverged, is_diverged
from normsam.train.identity import check_sam_window, folder_conflict
from normsam.train.run_lock import RunLock

__all__ = ["SWEEP_KEYS", "SWEEP_FILE", "Sweep", "SweepRun", "load_sweep", "run_sweep", "point_name"]

#: The top-level keys of a sweep file.
SWEEP_KEYS = ("base", "grid", "seeds", "out", "preset", "workers", "executor", "slurm")

#: The sweep's record of its runs, written into ``out``.
SWEEP_FILE = "sweep.json"

#: Config keys the sweep sets itself for every run.
_RESERVED = {
    "seed": "list the seeds under the top-level `seeds:`",
    "out": "set the parent folder with the top-level `out:`",
}

_STOPPED = "Sweep stopped; run the same `normsam sweep` command again to resume it."

_SAFE_TEXT = re.compile(r"[A-Za-z0-9._+-]+")
_MAX_VALUE_CHARS = 40


# --------------------------------------------------------------------------------------------------------
# the plan: runs and their folders


@dataclass
class SweepRun:
    """One run of a sweep: its folder, the config overrides it is trained with, and what became of it.

    ``status`` is ``pending`` (not run yet), ``done`` (trained or resumed to the end now), ``skipped``
    (finished before), ``failed`` (``error`` says why), ``diverged`` (its loss became non-finite, now or
    before; ``error`` says where) or ``interrupted``.
    """

    name: str
    folder: Path
    overrides: dict[str, Any]
    config: TrainConfig = field(repr=False)
    status: str = "pending"
    resumed: bool = False
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        row = {"name": self.name, "folder": str(self.folder), "overrides": self.overrides, "status": self.status}
        if self.resumed:
            row["resumed"] = True
        if self.error is not None:
            row["error"] = self.error
        return row


@dataclass
class Sweep:
    """A validated, expanded sweep: the parent folder, the runs in order, and how to run them."""

    out: Path
    runs: list[SweepRun]
    preset: str | None = None
    workers: int = 1
    source: str | None = None
    executor: str = "local"
    slurm: dict[str, Any] | None = None

    def counts(self) -> dict[str, int]:
        counts = {status: 0 for status in ("done", "skipped", "failed", "diverged", "interrupted", "pending")}
        for run in self.runs:
            counts[run.status] = counts.get(run.status, 0) + 1
        return counts

    @property
    def failed(self) -> list[SweepRun]:
        return [run for run in self.runs if run.status == "failed"]

    def write(self) -> Path:
        """Write ``out/sweep.json`` (atomically) and return its path."""
        path = self.out / SWEEP_FILE
        ckpt.write_json(
            path,
            {
                "source": self.source,
                "out": str(self.out),
                "preset": self.preset,
                "runs": [run.to_dict() for run in self.runs],
            },
        )
        return path

    def summary(self) -> str:
        """A few lines: how many runs were done, skipped and failed, and each failure."""
        counts = self.counts()
        resumed = sum(run.resumed and run.status == "done" for run in self.runs)
        parts = [f"{counts['done']} done" + (f" ({resumed} resumed)" if resumed else ""),
                 f"{counts['skipped']} skipped (finished before)", f"{counts['failed']} failed"]
        parts += [f"{counts[s]} {s}" for s in ("diverged", "interrupted", "pending") if counts[s]]
        lines = [f"sweep {self.out}: {len(self.runs)} runs: " + ", ".join(parts)]
        lines += [f"  {run.status} {run.name}: {run.error}" for run in self.runs if run.status in ("failed", "diverged")]
        return "\n".join(lines)


def _value_text(value: Any) -> str:
    """The plain text of a grid value (before making it safe)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "+".join(_value_text(v) for v in value)
    return str(value)


def _safe_value(value: Any) -> str:
    """A readable, file-system-safe and distinct text for a grid value (see the module docstring)."""
    text = _value_text(value)
    exact = not isinstance(value, (list, tuple, dict)) and _SAFE_TEXT.fullmatch(text) and len(text) <= _MAX_VALUE_CHARS
    if exact:
        return text
    readable = re.sub(r"[^A-Za-z0-9._+-]", "_", text)[:_MAX_VALUE_CHARS]
    digest = hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()[:6]
    return f"{readable}-{digest}"


def point_name(point: Mapping[str, Any]) -> str:
    """The folder name of a grid point: ``key=value`` pairs joined by commas (empty for no grid keys)."""
    return ",".join(f"{key}={_safe_value(value)}" for key, value in point.items())


def _check_config_keys(keys: Any, where: str) -> None:
    valid = set(config_keys())
    for key in keys:
        if key in _RESERVED:
            raise ValueError(f"{where} sets {key!r}, which the sweep sets for every run: {_RESERVED[key]}.")
        if key not in valid:
            raise unknown_key_error(key, where)


def _grids(raw: Any, base: Mapping[str, Any]) -> list[dict[str, list[Any]]]:
    """The grid(s) of a sweep file, checked: a mapping or a list of mappings of non-empty lists."""
    if raw is None:
        return [{}]
    grids = raw if isinstance(raw, list) else [raw]
    if not grids or not all(isinstance(g, Mapping) for g in grids):
        raise ValueError(
            "grid must be a mapping of config keys to lists of values (e.g. grid: {rho: [0.5, 1.0]}) or a "
            "list of such mappings."
        )
    for grid in grids:
        _check_config_keys(grid, "the sweep's grid")
        for key, values in grid.items():
            if not isinstance(values, list):
                raise ValueError(f"grid.{key} must be a list of values, e.g. {key}: [{values!r}].")
            if not values:
                raise ValueError(f"grid.{key} is an empty list; give it at least one value or remove it.")
            repeated = [v for i, v in enumerate(values) if v in values[:i]]
            if repeated:
                raise ValueError(f"grid.{key} lists {repeated[0]!r} more than once; list each value once.")
            if key in base:
                raise ValueError(f"{key!r} is in both base and grid; keep it in one of them.")
    return [dict(grid) for grid in grids]


def _seeds(raw: Any) -> list[int]:
    seeds = [0] if raw is None else raw
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise ValueError(f"seeds must be a non-empty list of integers, e.g. seeds: [0, 1, 2]; got {raw!r}.")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds lists a seed more than once: {seeds}; list each seed once.")
    return seeds


def _workers(raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise ValueError(f"workers must be an integer >= 1 (the runs trained in parallel), got {raw!r}.")
    return raw


def _read_sweep_file(source: str | Path) -> dict[str, Any]:
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"No sweep file {path}; see configs/sweep-tiny.yaml for an example.")
    return read_yaml(path)


def load_sweep(source: str | Path | Mapping[str, Any]) -> Sweep:
    """Read (a YAML file) or take (a mapping) a sweep, validate it and expand it into its runs.

    Every run's config is built and validated here, so that a typo fails before any training starts.

    Raises:
        FileNotFoundError: the sweep file does not exist.
        ValueError: unknown keys, empty grid lists, a grid key ``seed``/``out``, bad values, or two runs that
            would share a folder; the message says what to change.
    """
    described = None if isinstance(source, Mapping) else str(source)
    spec = source if isinstance(source, Mapping) else _read_sweep_file(source)
    if not isinstance(spec, Mapping):
        raise ValueError(f"A sweep must be a mapping with the keys {', '.join(SWEEP_KEYS)}; got {type(spec).__name__}.")
    unknown = [key for key in spec if key not in SWEEP_KEYS]
    if unknown:
        raise ValueError(
            f"Unknown sweep key {unknown[0]!r}; valid top-level keys are {', '.join(SWEEP_KEYS)} "
            "(config keys go under base: or grid:)."
        )
    if not spec.get("out"):
        raise ValueError("The sweep has no out: add the parent folder of its runs, e.g. out: runs/my-sweep.")
    base = spec.get("base") or {}
    if not isinstance(base, Mapping):
        raise ValueError(f"base must be a mapping of config keys (as for `normsam train`), got {base!r}.")
    _check_config_keys(base, "the sweep's base")
    grids = _grids(spec.get("grid"), base)
    seeds = _seeds(spec.get("seeds"))
    preset = spec.get("preset")
    if preset is not None and not isinstance(preset, str):
        raise ValueError(f"preset must be a preset name or a YAML config file, got {preset!r}.")
    out = Path(str(spec["out"]))

    runs: list[SweepRun] = []
    seen: set[str] = set()
    for grid in grids:
        for values in itertools.product(*grid.values()):
            point = dict(zip(grid, values))
            prefix = point_name(point)
            for seed in seeds:
                name = f"{prefix}/seed={seed}" if prefix else f"seed={seed}"
                if name in seen:
                    raise ValueError(f"Two runs of the sweep would share the folder {name}; make the grids distinct.")
                seen.add(name)
                folder = out / name
                overrides = {**base, **point, "seed": seed}
                try:
                    config = load_config(preset, {**overrides, "out": str(folder)})
                    check_sam_window(config)  # the runner refuses it too, but only when that run starts
                except ValueError as err:
                    raise ValueError(f"Sweep run {name}: {err}") from None
                runs.append(SweepRun(name, folder, overrides, config))
    from normsam.analysis.executors import check_executor, slurm_parameters

    executor = check_executor(spec.get("executor", "local"))
    slurm_parameters(spec.get("slurm"))  # unknown SLURM options fail here, before anything is submitted
    return Sweep(out, runs, preset=preset, workers=_workers(spec.get("workers", 1)), source=described,
                 executor=executor, slurm=spec.get("slurm"))


# --------------------------------------------------------------------------------------------------------
# running


def _conflict(run: SweepRun) -> str | None:
    """Why the run's folder cannot be reused for this run (it holds other settings), or None."""
    conflict = folder_conflict(run.folder, run.config, asked_by="the sweep")
    if conflict is None:
        return None
    return f"{conflict}; delete the folder to train it anew, or choose another out:."


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".strip()


def _train(folder: Path, overrides: dict[str, Any], preset: str | None) -> None:
    from normsam.train.loop import run_or_resume

    run_or_resume(folder, overrides, preset=preset)


class _LinePrefixer(io.TextIOBase):
    """A text stream that writes ``prefix`` at the start of every line (the output of parallel runs)."""

    def __init__(self, stream: TextIO, prefix: str):
        self.stream = stream
        self.prefix = prefix
        self.at_line_start = True

    def write(self, text: str) -> int:
        pieces = []
        for line in text.splitlines(keepends=True):
            if self.at_line_start:
                pieces.append(self.prefix)
            pieces.append(line)
            self.at_line_start = line.endswith("\n")
        self.stream.write("".join(pieces))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)  # a run whose config sets `threads` sets its own


def _run_in_worker(name: str, folder: str, overrides: dict[str, Any], preset: str | None) -> tuple[str, str | None]:
    """Train one run in a worker process; returns (status, error) and never raises for a failed run."""
    with contextlib.redirect_stdout(_LinePrefixer(sys.stdout, f"[{name}] ")):
        try:
            _train(Path(folder), overrides, preset)
        except KeyboardInterrupt:
            return "interrupted", None
        except RunDiverged as err:
            return "diverged", str(err)
        except Exception as err:  # noqa: BLE001 - one failing run must not stop the sweep
            return "failed", _describe(err)
    return "done", None


def _run_here(sweep: Sweep, todo: list[SweepRun]) -> None:
    for i, run in enumerate(todo, 1):
        print(f"== [{i}/{len(todo)}] {run.name} ==", flush=True)
        try:
            _train(run.folder, run.overrides, sweep.preset)
            run.status = "done"
        except KeyboardInterrupt:
            run.status = "interrupted"
            sweep.write()
            print(_STOPPED, flush=True)
            raise
        except RunDiverged as err:
            run.status, run.error = "diverged", str(err)
            print(f"{run.name} diverged: {run.error}", flush=True)
        except Exception as err:  # noqa: BLE001 - one failing run must not stop the sweep
            run.status, run.error = "failed", _describe(err)
            print(f"{run.name} failed: {run.error}", flush=True)
        sweep.write()


def _run_parallel(sweep: Sweep, todo: list[SweepRun], workers: int) -> None:
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(threads,)) as pool:
        futures = {
            pool.submit(_run_in_worker, run.name, str(run.folder), run.overrides, sweep.preset): run for run in todo
        }
        try:
            for future in as_completed(futures):
                run = futures[future]
                try:
                    run.status, run.error = future.result()
                except Exception as err:  # noqa: BLE001 - e.g. a worker killed by the OS
                    run.status, run.error = "failed", _describe(err)
                print(f"{run.name}: {run.status}" + (f" ({run.error})" if run.error else ""), flush=True)
                sweep.write()
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            for run in todo:
                if run.status == "pending":
                    run.status = "interrupted"
            sweep.write()
            print(_STOPPED, flush=True)
            raise


def run_sweep(source: str | Path | Mapping[str, Any] | Sweep, *, workers: int | None = None,
              executor: str | None = None, wait: bool = False) -> Sweep:
    """Train every run of a sweep that has not finished yet; returns the sweep with each run's status.

    Args:
        source: a sweep file, a mapping with its content, or a :class:`Sweep` from :func:`load_sweep`.
        workers: runs trained in parallel, each in its own (spawned) process with
            ``os.cpu_count() // workers`` threads unless its config sets ``threads``; default: the sweep's
            ``workers`` (1 = one after the other, in this process).

    Ctrl-C stops the sweep (``KeyboardInterrupt``), leaving every unfinished run's last checkpoint; running
    the sweep again resumes them. Failed runs are listed in the summary and in ``out/sweep.json``.

    ``executor`` (default: the sweep's ``executor:``): ``slurm`` or ``submitit-local`` submit the runs as jobs
    instead (:mod:`normsam.analysis.executors`) and return at once, or with ``wait`` when every job has ended.
    """
    sweep = source if isinstance(source, Sweep) else load_sweep(source)
    from normsam.analysis.executors import check_executor, submit_sweep

    executor = check_executor(sweep.executor if executor is None else executor)
    if executor != "local":
        return submit_sweep(sweep, executor, conflict=_conflict, wait=wait)
    if sweep.slurm:
        print("note: the sweep's slurm: options are not used with executor: local.", flush=True)
    workers = _workers(sweep.workers if workers is None else workers)
    with RunLock(sweep.out, what="sweep"):  # one sweep process per folder (each run has its own lock too)
        return _run_sweep_locked(sweep, workers)


def _run_sweep_locked(sweep: Sweep, workers: int) -> Sweep:
    for run in sweep.runs:
        run.status, run.error, run.resumed = "pending", None, False
        conflict = _conflict(run)
        if conflict:
            run.status, run.error = "failed", conflict
        elif (run.folder / ckpt.SUMMARY).exists():
            summary = read_json(run.folder / ckpt.SUMMARY)
            run.status = "diverged" if is_diverged(summary) else "skipped"
            run.error = summary["diverged"]["message"] if is_diverged(summary) else None
        else:
            run.resumed = (run.folder / ckpt.CHECKPOINT).exists()
    sweep.write()
    todo = [run for run in sweep.runs if run.status == "pending"]
    if workers == 1 or len(todo) <= 1:
        _run_here(sweep, todo)
    else:
        _run_parallel(sweep, todo, min(workers, len(todo)))
    print(sweep.summary(), flush=True)
    print(f"Wrote {sweep.out / SWEEP_FILE}; tables and plots: normsam report {sweep.out}", flush=True)
    return sweep
