"""Issue 16, class 1: one writer per run folder (runner, resume, sweeps, sharpness), a dead holder never blocks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from normsam import cli
from normsam.analysis.run_sharpness import measure_run_sharpness
from normsam.analysis.sweep import run_sweep
from normsam.train import checkpoint as ckpt
from normsam.train import data as D
from normsam.train.loop import Trainer
from normsam.train.run_lock import LOCK_FILE, RunLock, RunLockedError, holder_info
from tests.test_runner import TINY, _cfg, _metrics, interrupt_in_second_epoch

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(autouse=True)
def no_system_data(monkeypatch):
    monkeypatch.setattr(D.readers, "SYSTEM_SEARCH_DIRS", {"fashion-mnist": (), "mnist": ()})
    monkeypatch.delenv(D.DATA_ENV_VAR, raising=False)


def _holder(folder: Path) -> subprocess.Popen:
    """Another process that holds ``folder``'s lock until killed (as a training process would)."""
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {SRC!r})
        from normsam.train.run_lock import RunLock
        lock = RunLock({str(folder)!r}).acquire()
        print("locked", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_two_trainers_on_one_folder_the_second_fails_at_once_naming_the_holder(tmp_path):
    first = Trainer(_cfg(tmp_path, seed=0))
    with pytest.raises(RunLockedError, match=rf"run is in use by pid {os.getpid()} on .* since 20"):
        Trainer(_cfg(tmp_path, seed=1))
    first.run()
    assert _metrics(tmp_path / "run")[0]["epoch"] == 1
    assert (tmp_path / "run" / "config.yaml").read_text().count("seed: 0") == 1


def test_a_second_train_process_exits_2_and_a_killed_holder_never_blocks(tmp_path, capsys):
    run = tmp_path / "run"
    holder = _holder(run)
    try:
        args = ["train", *[f"{k}={v}" for k, v in TINY.items()], f"out={run}", "seed=1"]
        started = time.perf_counter()
        assert cli.main(args) == 2
        assert time.perf_counter() - started < 20  # at once, not after training
        err = capsys.readouterr().err.strip()
        assert f"is in use by pid {holder.pid}" in err and "\n" not in err
        assert not (run / ckpt.CONFIG).exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9: the OS drops the flock
        holder.wait()
    assert holder_info(run)["pid"] == holder.pid  # the stale record is still there ...
    assert cli.main(args) == 0  # ... and does not block
    assert not (run / LOCK_FILE).exists()  # the new holder deleted it when it let the folder go


def test_resume_while_the_run_trains_is_refused(tmp_path, monkeypatch, capsys):
    cfg = _cfg(tmp_path)
    interrupt_in_second_epoch(cfg, monkeypatch)
    with RunLock(cfg.out):  # "still training"
        assert cli.main(["train", "--resume", cfg.out]) == 2
        assert "is in use by pid" in capsys.readouterr().err
        assert len(_metrics(cfg.out)) == 1
    assert cli.main(["train", "--resume", cfg.out]) == 0  # the lock went with its holder
    assert len(_metrics(cfg.out)) == 2


def test_sharpness_respects_the_lock_before_measuring(tmp_path, monkeypatch):
    Trainer(_cfg(tmp_path, epochs=1)).run()
    import normsam.train.run_sharpness as rs

    monkeypatch.setattr(rs, "measure_sharpness", lambda *a, **k: pytest.fail("measured a folder in use"))
    with RunLock(tmp_path / "run"), pytest.raises(RunLockedError, match="in use"):
        measure_run_sharpness(tmp_path / "run", steps=1, n=8, m=8)


def test_sweeps_respect_run_and_sweep_locks(tmp_path):
    spec = {"out": str(tmp_path / "sweep"), "base": {**TINY, "epochs": 1}, "seeds": [0, 1]}
    with RunLock(tmp_path / "sweep" / "seed=1"):
        sweep = run_sweep(spec)
    status = {r.name: (r.status, r.error) for r in sweep.runs}
    assert status["seed=0"][0] == "done"
    assert status["seed=1"][0] == "failed" and "in use by pid" in status["seed=1"][1]
    with RunLock(tmp_path / "sweep", what="sweep"), pytest.raises(RunLockedError, match="sweep"):
        assert (tmp_path / "sweep" / LOCK_FILE).is_file()
        run_sweep(spec)
    assert not list((tmp_path / "sweep").rglob(LOCK_FILE))  # every writer deleted its lock file on release
