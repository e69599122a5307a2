"""Sweeps on a cluster: ``executor: slurm`` in a sweep or study file (or ``normsam sweep --executor slurm``).

Each run of the sweep becomes a job submitted with `submitit <https://github.com/facebookincubator/submitit>`_
(``submitit.AutoExecutor``); with ``array: true`` the runs are submitted together as one SLURM job array.
A sweep file says how::

    executor: slurm          # local (the default: this machine) | slurm | submitit-local
    slurm:                   # SLURM options (see SLURM_OPTIONS); unknown ones are refused
      partition: gpu
      account: my-lab
      nodes: 1
      gpus_per_node: 4       # a run trains on nodes × gpus_per_node GPUs: one task per GPU
      time: "24:00:00"       # per job (required): minutes, HH:MM:SS or D-HH:MM:SS
      mem: 64G
      cpus_per_task: 8       # loader workers decode images on these
      setup: ["module load cuda"]

``submitit-local`` runs the same jobs through submitit's local executor (real subprocesses on this machine,
the same job function, checkpointing and requeueing): for testing a sweep file before a cluster has it.

The job (:class:`TrainJob`)
---------------------------
* It calls :func:`normsam.train.loop.run_or_resume` on the run's folder: a finished run is skipped, an
  interrupted one resumes from its last epoch checkpoint, a new one starts. Resubmitting a sweep therefore
  skips finished runs and resumes interrupted ones, as a local sweep does.
* Multi-GPU: the job has one task per GPU (``tasks_per_node = gpus_per_node``) on ``nodes`` nodes. Each task
  sets the variables torchrun would set (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` = the
  first node, ``MASTER_PORT`` from the job id) from ``submitit.JobEnvironment`` and joins the process group
  with ``env://``, exactly as under ``torchrun``.
* Time-outs and pre-emption: :class:`TrainJob` is a ``submitit.helpers.Checkpointable``. When SLURM signals
  a time-out or a pre-emption, submitit calls :meth:`TrainJob.checkpoint`, which resubmits the same job;
  the requeued job resumes from the run folder's last epoch checkpoint (the epoch in progress is replayed
  with the same order and augmentation, so the result equals an uninterrupted run's). At most
  ``max_requeues`` time-outs per job (default 3).
* Logs: submitit's folder of a job is the run folder's ``jobs/``: ``jobs/<job id>_0_log.out`` and ``.err``
  (with ``array: true``, the array's logs are in ``out/jobs/`` and each run folder's ``job.json`` points at
  its log). ``job.json`` in the run folder records the executor, job id and log paths.

Status
------
``normsam sweep FILE --status`` prints every run's state: ``done`` (``summary.json``), ``running`` or
``pending`` (the job as SLURM's ``sacct`` reports it, or a live local job), ``failed`` (the job ended with an
error: its last line is shown), ``interrupted`` (a checkpoint but no live job: resubmit to resume) or
``not submitted``, with the job id and the log path.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from normsam.train import checkpoint as ckpt

__all__ = ["EXECUTORS", "SLURM_OPTIONS", "JOB_FILE", "check_executor", "slurm_parameters", "TrainJob",
           "submit_sweep", "sweep_status", "status_table", "wait_for_runs"]

EXECUTORS = ("local", "slurm", "submitit-local")
#: The job record in a run folder.
JOB_FILE = "job.json"
#: submitit-local jobs without slurm.time: a week (submitit's own default would stop them after 2 minutes).
LOCAL_TIMEOUT_MIN = 7 * 24 * 60

#: Sweep-file SLURM options -> (submitit AutoExecutor parameter, what it takes).
SLURM_OPTIONS: dict[str, tuple[str, str]] = {
    "partition": ("slurm_partition", "a partition name"),
    "account": ("slurm_account", "an account name"),
    "qos": ("slurm_qos", "a QOS name"),
    "constraint": ("slurm_constraint", "a feature constraint, e.g. a100"),
    "nodes": ("nodes", "nodes per run (int)"),
    "gpus_per_node": ("gpus_per_node", "GPUs per node (int); also the tasks per node"),
    "tasks_per_node": ("tasks_per_node", "processes per node (int; default: gpus_per_node, or 1)"),
    "cpus_per_task": ("cpus_per_task", "CPU cores per process (int)"),
    "time": ("timeout_min", "the time limit: minutes, HH:MM:SS or D-HH:MM:SS"),
    "mem": ("mem_gb", "memory per node: GB as a number, or 64G / 512M"),
    "array_parallelism": ("slurm_array_parallelism", "with array: runs at the same time (int)"),
    "setup": ("slurm_setup", "shell lines run before the job, e.g. [module load cuda]"),
    "additional": ("slurm_additional_parameters", "a mapping of further sbatch options, e.g. {exclusive: true}"),
    "array": ("", "true: submit the runs as one job array (default false: one job per run)"),
    "max_requeues": ("", "time-outs after which a job is not requeued again (default 3)"),
}


def check_executor(name: Any) -> str:
    if name not in EXECUTORS:
        raise ValueError(f"Invalid executor: {name!r}; valid executors are {', '.join(EXECUTORS)} (local: this "
                         "machine, the default).")
    return str(name)


def _minutes(value: Any) -> int:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return int(round(value))
    match = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d\d)(?::(\d\d))?", str(value).strip())
    if not match:
        raise ValueError(f"slurm.time must be minutes or HH:MM:SS or D-HH:MM:SS, got {value!r}.")
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    return max(1, days * 1440 + hours * 60 + minutes + (1 if seconds else 0))


def _gigabytes(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([MGT])B?", str(value).strip(), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"slurm.mem must be GB as a number, or like 64G or 512M, got {value!r}.")
    return float(match.group(1)) * {"M": 1 / 1024, "G": 1, "T": 1024}[match.group(2).upper()]


def slurm_parameters(options: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(submitit parameters, normsam's own: array, max_requeues) from a sweep file's ``slurm:`` mapping."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ValueError(f"slurm: must be a mapping of SLURM options (e.g. slurm: {{partition: gpu}}), got {options!r}.")
    params: dict[str, Any] = {}
    own = {"array": False, "max_requeues": 3}
    for key, value in options.items():
        if key not in SLURM_OPTIONS:
            close = difflib.get_close_matches(str(key), SLURM_OPTIONS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"Unknown SLURM option {key!r} in slurm:.{hint} Known options: "
                             f"{', '.join(SLURM_OPTIONS)} (further sbatch options go under slurm.additional).")
        target, what = SLURM_OPTIONS[key]
        if key in ("array",):
            if not isinstance(value, bool):
                raise ValueError(f"slurm.array must be true or false, got {value!r}.")
            own["array"] = value
        elif key == "max_requeues":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"slurm.max_requeues must be an int >= 0, got {value!r}.")
            own["max_requeues"] = value
        elif key == "time":
            params[target] = _minutes(value)
        elif key == "mem":
            params[target] = _gigabytes(value)
        elif key in ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "array_parallelism"):
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "gpus_per_node" else 1):
                raise ValueError(f"slurm.{key} must be {what}, got {value!r}.")
            params[target] = value
        elif key == "setup":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"slurm.setup must be a list of shell lines, got {value!r}.")
            params[target] = value
        elif key == "additional":
            if not isinstance(value, dict):
                raise ValueError(f"slurm.additional must be a mapping of sbatch options, got {value!r}.")
            params[target] = value
        else:
            if not isinstance(value, str):
                raise ValueError(f"slurm.{key} must be {what}, got {value!r}.")
            params[target] = value
    if "tasks_per_node" not in params:
        params["tasks_per_node"] = max(1, params.get("gpus_per_node", 1))
    return params, own


# --------------------------------------------------------------------------------------------------------
# the job


def _torchrun_environment() -> None:
    """Set the variables torchrun would set, from submitit's view of the job's tasks (multi-task jobs only)."""
    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks <= 1:
        return
    digits = re.sub(r"\D", "", str(env.job_id)) or "0"
    os.environ.update(
        RANK=str(env.global_rank),
        LOCAL_RANK=str(env.local_rank),
        WORLD_SIZE=str(env.num_tasks),
        LOCAL_WORLD_SIZE=str(env.num_tasks // max(1, env.num_nodes)),
        MASTER_ADDR=env.hostnames[0],
        MASTER_PORT=str(20000 + int(digits[-6:]) % 20000),
    )


def _checkpointable():
    import submitit

    return submitit.helpers.Checkpointable


class TrainJob(_checkpointable()):  # type: ignore[misc]
    """One sweep run as a submitit job: ``run_or_resume`` on its folder. Requeued on time-out/pre-emption."""

    def __init__(self, folder: str, overrides: dict[str, Any], preset: str | None):
        # absolute: a job may start in another directory than the one it was submitted from
        self.folder, self.overrides, self.preset = str(Path(folder).resolve()), dict(overrides), preset

    def __call__(self) -> dict[str, Any]:
        from normsam.train.loop import run_or_resume

        _torchrun_environment()
        return run_or_resume(Path(self.folder), self.overrides, preset=self.preset)

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Called by submitit on a time-out or pre-emption signal: requeue this job unchanged. The training
        state is already on disk (one checkpoint per epoch), so the requeued job resumes from it."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


# --------------------------------------------------------------------------------------------------------
# submitting


def _executor(kind: str, folder: Path, params: dict[str, Any], max_requeues: int):
    import submitit

    if kind == "slurm":
        if shutil.which("sbatch") is None:
            raise ValueError("executor: slurm needs SLURM, but sbatch is not on this machine's PATH; submit from a "
                             "SLURM login node, or run the sweep here with executor: local.")
        if "timeout_min" not in params:  # submitit would ask for 5 minutes
            raise ValueError('executor: slurm needs the jobs\' time limit: add slurm: {time: "24:00:00"} (minutes, '
                             "HH:MM:SS or D-HH:MM:SS); a longer run is requeued and resumes.")
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=max_requeues)
    else:
        params = {"timeout_min": LOCAL_TIMEOUT_MIN, **params}  # submitit's local default is 2 minutes
        executor = submitit.AutoExecutor(folder=folder, cluster="local", local_max_num_timeout=max_requeues)
    executor.update_parameters(name="normsam", **params)
    return executor


def _job_record(run_folder: Path, kind: str, job) -> dict[str, Any]:
    record = {"executor": kind, "job_id": str(job.job_id), "submitted": time.time(),
              "jobs_folder": str(job.paths.folder), "log_out": str(job.paths.stdout), "log_err": str(job.paths.stderr)}
    run_folder.mkdir(parents=True, exist_ok=True)
    ckpt.write_json(run_folder / JOB_FILE, record)
    return record


def _read_record(run_folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_folder / JOB_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def submit_sweep(sweep, kind: str, *, conflict=lambda run: None, wait: bool = False, poll_s: float | None = None):
    """Submit every run of ``sweep`` (a :class:`normsam.analysis.sweep.Sweep`) that is neither finished nor
    already queued or running; returns the sweep with each run's status (``submitted``, ``queued``,
    ``skipped``, ``failed``, or with ``wait`` the final one). ``conflict(run)`` says why a run's folder holds
    another run (the sweep's own check), or None."""
    params, own = slurm_parameters(sweep.slurm)
    if sweep.workers != 1:
        print(f"note: workers: {sweep.workers} is for executor: local; with {kind} every job runs as soon as the "
              "scheduler starts it (slurm.array_parallelism limits a job array).", flush=True)
    if poll_s is None:  # how often --wait looks: sacct is a query to the cluster's database, a local job is not
        poll_s = 30.0 if kind == "slurm" else 0.5
    sweep.out.mkdir(parents=True, exist_ok=True)
    todo = []
    for run in sweep.runs:
        run.status, run.error, run.resumed = "pending", None, False
        why = conflict(run)
        state = _run_state(run.folder)
        if why:
            run.status, run.error = "failed", why
        elif state["status"] == "done":
            run.status = "skipped"
        elif state["status"] in ("running", "pending"):
            run.status = "queued"  # already submitted and alive: not twice
        else:
            run.resumed = (run.folder / ckpt.CHECKPOINT).exists()
            todo.append(run)

    def submitted(run, job) -> None:  # recorded at once: a later failed submission must not lead to doubles
        record = _job_record(run.folder, kind, job)
        if own["array"]:  # the array's logs are in out/jobs/<id>/: a link from the run folder
            link = run.folder / "jobs"
            if link.is_symlink():
                link.unlink()
            if not link.exists():
                link.symlink_to(Path(record["jobs_folder"]).resolve(), target_is_directory=True)
        run.status = "submitted"
        print(f"{run.name}: job {record['job_id']}" + (" (resumes)" if run.resumed else "")
              + f", log {record['log_out']}", flush=True)

    try:
        if todo and own["array"]:
            executor = _executor(kind, sweep.out / "jobs" / "%j", params, own["max_requeues"])
            with executor.batch():
                jobs = [executor.submit(TrainJob(str(r.folder), r.overrides, sweep.preset)) for r in todo]
            for run, job in zip(todo, jobs):
                submitted(run, job)
        else:
            for run in todo:
                executor = _executor(kind, run.folder / "jobs", params, own["max_requeues"])
                submitted(run, executor.submit(TrainJob(str(run.folder), run.overrides, sweep.preset)))
    finally:
        sweep.write()
    waiting = [run for run in sweep.runs if run.status in ("submitted", "queued")]
    if wait and waiting:
        wait_for_runs([run.folder for run in waiting], poll_s=poll_s)
        for run in waiting:
            state = _run_state(run.folder)
            run.status = "done" if state["status"] == "done" else "failed"
            if run.status == "failed":
                run.error = state.get("error") or f"job {state.get('job_id')} ended without finishing the run"
        sweep.write()
    counts: dict[str, int] = {}
    for run in sweep.runs:
        counts[run.status] = counts.get(run.status, 0) + 1
    print(f"sweep {sweep.out}: {len(sweep.runs)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items())
          + f"; follow them with: normsam sweep {sweep.source or 'SWEEP.yaml'} --status", flush=True)
    return sweep


def wait_for_runs(folders: list[Path], *, poll_s: float = 5.0) -> None:
    """Block until no run in ``folders`` has a pending or running job (a requeued job counts as running)."""
    while any(_run_state(folder)["status"] in ("pending", "running") for folder in folders):
        time.sleep(poll_s)


# --------------------------------------------------------------------------------------------------------
# status


def _last_error_line(job) -> str | None:
    """The last line of the traceback submitit pickled for a failed job, or None if it did not fail."""
    path = job.paths.result_pickle
    if not path.exists():
        return None
    try:
        outcome, payload = _load_result(path)
    except Exception:  # noqa: BLE001 - an unreadable result is reported as such
        return f"the job's result file {path} cannot be read"
    if outcome != "error":
        return None
    lines = [line for line in str(payload).splitlines() if line.strip()]
    # the exception's first line: the first unindented line after the last traceback's frames
    start = max((i for i, line in enumerate(lines) if line.startswith("Traceback")), default=-1) + 1
    return next((line for line in lines[start:] if not line.startswith(" ")), lines[-1] if lines else "error")


def _load_result(path: Path):
    import pickle

    with open(path, "rb") as f:
        return pickle.load(f)


def _alive(pid: str) -> bool:
    """Whether the local job's controller (its id is the pid) still runs: a live process, not a zombie, and
    still submitit's (a pid can be reused by another process after the job ended)."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError, PermissionError):
        return False
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            if f.read().split(")")[-1].split()[0] == "Z":
                return False
        with open(f"/proc/{int(pid)}/cmdline", "rb") as f:
            return b"submitit" in f.read()
    except OSError:
        return True  # no /proc (not Linux): trust the signal test


def _run_state(folder: Path) -> dict[str, Any]:
    """A run's state from its folder and its job record (see the module docstring)."""
    folder = Path(folder)
    record = _read_record(folder)
    row: dict[str, Any] = {"job_id": None, "log": None}
    if record:
        row.update(job_id=record["job_id"], log=record["log_out"])
    if (folder / ckpt.SUMMARY).exists():
        return {**row, "status": "done"}
    if record is None:
        return {**row, "status": "interrupted" if (folder / ckpt.CHECKPOINT).exists() else "not submitted"}
    import submitit

    jobs_folder = Path(record["jobs_folder"])
    if record["executor"] == "slurm":
        job = submitit.SlurmJob(jobs_folder, record["job_id"])
        state = job.state.upper()
        if state in ("PENDING", "REQUEUED", "CONFIGURING"):
            return {**row, "status": "pending"}
        if state in ("RUNNING", "COMPLETING", "SUSPENDED"):
            return {**row, "status": "running"}
    else:
        job = submitit.local.local.LocalJob(jobs_folder, record["job_id"])
        if _alive(record["job_id"]):
            return {**row, "status": "running"}
    error = _last_error_line(job)
    if error is not None:
        return {**row, "status": "failed", "error": error}
    if (folder / ckpt.CHECKPOINT).exists():
        return {**row, "status": "interrupted"}
    return {**row, "status": "failed", "error": f"job {record['job_id']} ended before the first epoch finished"}


def sweep_status(sweep, record: Path | None = None) -> list[dict[str, Any]]:
    """Every run's state: name, status, job id, log path (and error). Runs trained here (executor: local)
    have no job; a failure of theirs is read from the sweep's record (``out/sweep.json``) if given."""
    try:
        recorded = {r["name"]: r for r in json.loads(Path(record).read_text())["runs"]} if record else {}
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        recorded = {}
    rows = []
    for run in sweep.runs:
        row = {"name": run.name, **_run_state(run.folder)}
        local = recorded.get(run.name, {})
        if row["job_id"] is None and row["status"] != "done" and local.get("status") == "failed":
            row.update(status="failed", error=local.get("error"))
        rows.append(row)
    return rows


def status_table(rows: list[dict[str, Any]]) -> str:
    width = max([len(r["name"]) for r in rows] + [3])
    lines = [f"{'run':<{width}}  {'status':<13}  {'job':<12}  log"]
    for r in rows:
        lines.append(f"{r['name']:<{width}}  {r['status']:<13}  {str(r['job_id'] or '-'):<12}  {r['log'] or '-'}")
        if r.get("error"):
            lines.append(f"{'':<{width}}    {r['error']}")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)
