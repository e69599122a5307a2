"""Sweeps as jobs through submitit: options, the local executor's real subprocesses, kill + resubmit, requeue."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from normsam import cli
from normsam.analysis import executors
from normsam.analysis.executors import slurm_parameters, sweep_status
from normsam.analysis.sweep import load_sweep, run_sweep
from normsam.train import checkpoint as ckpt
from normsam.train.loop import run_or_resume

BASE = dict(data="synthetic", image_size=8, subset=256, batch_size=32, eval_batch_size=256, epochs=6, threads=1,
            progress=False, model="resnet8", norm_stats=False, device="cpu", scope="norm", rho=0.5)


def _spec(tmp_path: Path, **extra) -> dict:
    return {"base": BASE, "seeds": [0], "out": str(tmp_path / "sweep"), "executor": "submitit-local",
            "slurm": {"time": 10, "cpus_per_task": 1}, **extra}


def test_slurm_options_map_to_submitit_and_unknown_ones_are_refused():
    params, own = slurm_parameters({"partition": "gpu", "account": "lab", "nodes": 2, "gpus_per_node": 4,
                                    "time": "1-02:30:00", "mem": "64G", "cpus_per_task": 8, "array": True,
                                    "setup": ["module load cuda"], "additional": {"exclusive": True}})
    assert params == {"slurm_partition": "gpu", "slurm_account": "lab", "nodes": 2, "gpus_per_node": 4,
                      "tasks_per_node": 4, "timeout_min": 1590, "mem_gb": 64.0, "cpus_per_task": 8,
                      "slurm_setup": ["module load cuda"], "slurm_additional_parameters": {"exclusive": True}}
    assert own == {"array": True, "max_requeues": 3}
    assert slurm_parameters({"time": 90, "mem": "512M"})[0] == {"timeout_min": 90, "mem_gb": 0.5, "tasks_per_node": 1}
    with pytest.raises(ValueError, match=r"Unknown SLURM option 'partion' in slurm:\. Did you mean 'partition'\?"):
        slurm_parameters({"partion": "gpu"})
    with pytest.raises(ValueError, match="slurm.time must be minutes or HH:MM:SS"):
        slurm_parameters({"time": "soon"})
    with pytest.raises(ValueError, match="slurm.gpus_per_node must be GPUs per node"):
        slurm_parameters({"gpus_per_node": "4"})


def test_sweep_files_check_executor_and_slurm_options_before_submitting(tmp_path):
    with pytest.raises(ValueError, match="Invalid executor: 'pbs'.*local"):
        load_sweep(_spec(tmp_path, executor="pbs"))
    with pytest.raises(ValueError, match="Unknown SLURM option 'gpus'"):
        load_sweep(_spec(tmp_path, slurm={"gpus": 2}))


def test_slurm_without_slurm_is_a_one_line_error_naming_executor_local(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(executors.shutil, "which", lambda name: None)
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps(_spec(tmp_path, executor="slurm")))
    assert cli.main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sbatch is not on this machine's PATH" in err and "executor: local" in err
    assert not list((tmp_path / "sweep").rglob(executors.JOB_FILE))


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _wait_for(predicate, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _epochs_done(folder: Path) -> int:
    return len(ckpt.read_jsonl(folder / "metrics.jsonl")) if (folder / "metrics.jsonl").exists() else 0


def _same_metrics(a: Path, b: Path) -> None:
    rows_a, rows_b = ckpt.read_jsonl(a / "metrics.jsonl"), ckpt.read_jsonl(b / "metrics.jsonl")
    assert len(rows_a) == len(rows_b) == BASE["epochs"]
    for x, y in zip(rows_a, rows_b):
        for key in ("train_loss", "train_loss_perturbed", "test_loss", "test_acc", "lr"):
            assert x[key] == y[key], (x["epoch"], key)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("reference") / "seed=0"
    run_or_resume(folder, {**BASE, "seed": 0})
    return folder


def test_a_killed_job_resubmitted_resumes_and_ends_as_an_uninterrupted_run(tmp_path, uninterrupted):
    sweep = run_sweep(load_sweep(_spec(tmp_path)))  # returns once submitted
    run = sweep.runs[0]
    assert run.status == "submitted"
    record = json.loads((run.folder / executors.JOB_FILE).read_text())
    assert Path(record["log_out"]).parent == run.folder / "jobs"  # the job's log lives in the run folder
    _wait_for(lambda: _epochs_done(run.folder) >= 1, what="the first epoch")
    assert sweep_status(sweep)[0]["status"] == "running"
    controller = int(record["job_id"])
    for pid in _children(controller) + [controller]:  # kill -9 the task and its controller: a dead node
        os.kill(pid, signal.SIGKILL)
    _wait_for(lambda: not executors._alive(str(controller)), what="the kill")
    done_before = _epochs_done(run.folder)
    assert 1 <= done_before < BASE["epochs"] and not (run.folder / "summary.json").exists()
    state = sweep_status(sweep)[0]
    assert state["status"] == "interrupted" and state["job_id"] == record["job_id"]

    again = run_sweep(load_sweep(_spec(tmp_path)), wait=True)  # resubmitted: resumes from the checkpoint
    assert again.runs[0].resumed and again.runs[0].status == "done"
    assert json.loads((run.folder / executors.JOB_FILE).read_text())["job_id"] != record["job_id"]
    _same_metrics(run.folder, uninterrupted)
    skipped = run_sweep(load_sweep(_spec(tmp_path)))  # finished: nothing is submitted again
    assert skipped.runs[0].status == "skipped"


@pytest.mark.slow  # a second job of a few seconds (more on a busy machine); the killed job above is the main case
def test_a_preempted_job_is_requeued_by_submitit_and_resumes(tmp_path, uninterrupted, capsys):
    sweep = run_sweep(load_sweep(_spec(tmp_path)))
    run = sweep.runs[0]
    record = json.loads((run.folder / executors.JOB_FILE).read_text())
    _wait_for(lambda: _epochs_done(run.folder) >= 1, what="the first epoch")
    task = _children(int(record["job_id"]))[0]
    os.kill(task, signal.SIGUSR2)  # what SLURM sends before a time-out or a pre-emption
    executors.wait_for_runs([run.folder], poll_s=0.2)
    assert "Requeued" in Path(record["log_err"]).read_text() + Path(record["log_out"]).read_text()
    _same_metrics(run.folder, uninterrupted)
    capsys.readouterr()
    assert cli.main(["sweep", str(_write(tmp_path)), "--status"]) == 0
    table = capsys.readouterr().out
    assert "seed=0" in table and "done" in table and record["job_id"] in table and record["log_out"] in table


def _write(tmp_path: Path) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps(_spec(tmp_path)))
    return path


@pytest.mark.slow  # a job subprocess (torch import) for the failed state: 5-15 s
def test_a_failing_job_is_reported_failed_with_its_error(tmp_path):
    base = {k: v for k, v in BASE.items() if k != "image_size"}
    spec = _spec(tmp_path, base={**base, "data": "fashion-mnist", "data_dir": str(tmp_path / "nowhere")})
    sweep = run_sweep(load_sweep(spec), wait=True)
    assert sweep.runs[0].status == "failed"
    state = sweep_status(sweep)[0]
    assert state["status"] == "failed" and "Fashion-MNIST not found" in state["error"]


@pytest.mark.slow  # two tasks and a reference run: 10-40 s on the shared 2-core machine
def test_a_two_task_job_trains_like_torchrun_and_equals_one_process(tmp_path):
    """tasks_per_node=2: each task sets RANK/WORLD_SIZE/MASTER_ADDR from submitit's job environment and the
    two join one gloo process group; with the ascent synced it equals one process on the global batch."""
    base = {**BASE, "epochs": 2, "subset": 64, "norm": "group", "sync_ascent": True}
    spec = {**_spec(tmp_path), "base": base, "slurm": {"time": 10, "tasks_per_node": 2}}
    sweep = run_sweep(load_sweep(spec), wait=True)
    assert sweep.runs[0].status == "done"
    folder = sweep.runs[0].folder
    assert json.loads((folder / "environment.json").read_text())["world_size"] == 2
    single = tmp_path / "single"
    run_or_resume(single, {**base, "seed": 0})
    for a, b in zip(ckpt.read_jsonl(folder / "metrics.jsonl"), ckpt.read_jsonl(single / "metrics.jsonl")):
        for key in ("train_loss", "train_loss_perturbed", "test_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key


def test_the_example_imagenet_sweep_loads(tmp_path, monkeypatch, capsys):
    repo = Path(__file__).resolve().parents[1]
    sweep = load_sweep(repo / "configs" / "sweep-imagenet-slurm.yaml")
    assert sweep.executor == "slurm" and len(sweep.runs) == 12
    assert slurm_parameters(sweep.slurm)[0]["tasks_per_node"] == 8
    assert {run.config.model for run in sweep.runs} == {"timm:resnet50"}


def test_studies_hand_their_executor_to_every_sweep_and_wait_for_it():
    from normsam.analysis.study import STUDY_KEYS, _sweep_spec

    assert {"executor", "slurm"} <= set(STUDY_KEYS)
    spec = _sweep_spec({"out": "runs/s", "executor": "slurm", "slurm": {"partition": "gpu"}}, "pilot", [0], {})
    assert spec["executor"] == "slurm" and spec["slurm"] == {"partition": "gpu"}


def test_status_of_a_local_sweep_reads_its_folders(tmp_path, capsys):
    base = {k: v for k, v in BASE.items() if k != "data"}
    spec = {**_spec(tmp_path), "executor": "local", "slurm": None, "base": {**base, "epochs": 1, "subset": 64},
            "grid": {"optimizer": ["sgd", "nadam"]}}
    with pytest.raises(ValueError, match="Invalid optimizer: 'nadam'"):
        load_sweep(spec)
    spec["grid"] = {"data": ["synthetic", "fashion-mnist"]}  # the second fails: Fashion-MNIST is 28×28, not 8×8
    path = tmp_path / "local.yaml"
    path.write_text(json.dumps(spec))
    assert cli.main(["sweep", str(path)]) == 1
    capsys.readouterr()
    assert cli.main(["sweep", str(path), "--status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:3] == ["data=synthetic/seed=0", "done", "-"]
    assert lines[2].split()[:3] == ["data=fashion-mnist/seed=0", "failed", "-"]
    assert "image_size=8 is not supported" in lines[3] and lines[-1] == "1 done, 1 failed"


def test_slurm_submission_writes_the_sbatch_file_and_reads_sacct(tmp_path, monkeypatch, capsys):
    """submitit's real SLURM executor against a stand-in sbatch (records the script, prints a job id) and
    sacct (reports the job PENDING): the options of the sweep file reach the #SBATCH lines."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ncp \"$1\" {tmp_path}/submitted.sh\necho 'Submitted batch job 4242'\n")
    (bin_dir / "sacct").write_text("#!/bin/sh\nprintf 'JobID|State|NodeList\\n4242|PENDING|\\n'\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit checks that it exists
    for tool in ("sbatch", "sacct", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    spec = _spec(tmp_path, executor="slurm", slurm={"partition": "gpu", "account": "lab", "gpus_per_node": 4,
                                                     "time": "2:00:00", "mem": "64G", "cpus_per_task": 6})
    sweep = run_sweep(load_sweep(spec))
    assert sweep.runs[0].status == "submitted"
    script = (tmp_path / "submitted.sh").read_text()
    for line in ("--partition=gpu", "--account=lab", "--gpus-per-node=4", "--ntasks-per-node=4", "--time=120",
                 "--mem=64GB", "--cpus-per-task=6", "--signal=USR2@"):
        assert f"#SBATCH {line}" in script, line
    assert str(sweep.runs[0].folder / "jobs") in script  # the logs go to the run folder
    state = sweep_status(sweep)[0]
    assert (state["status"], state["job_id"]) == ("pending", "4242")
    no_time = _spec(tmp_path / "b", executor="slurm", slurm={"partition": "gpu"})
    with pytest.raises(ValueError, match=r"needs the jobs' time limit: add slurm: \{time:"):
        run_sweep(load_sweep(no_time))
    again = run_sweep(load_sweep(spec))  # queued already: not submitted twice
    assert again.runs[0].status == "queued"
    array = _spec(tmp_path / "c", executor="slurm", slurm={"time": 60, "array": True, "array_parallelism": 2},
                  grid={"perturbation": ["sam", "asam"]})
    sweep = run_sweep(load_sweep(array))  # one sbatch call for both runs
    script = (tmp_path / "submitted.sh").read_text()
    assert "#SBATCH --array=0-1%2" in script
    for i, run in enumerate(sweep.runs):
        record = json.loads((run.folder / executors.JOB_FILE).read_text())
        assert record["job_id"] == f"4242_{i}"
        assert (run.folder / "jobs").is_symlink() and Path(record["log_out"]).parent == (run.folder / "jobs").resolve()
