"""Nothing silently wrong, round 3: stale results, ties that walk ρ away, figures that mislead, advice that
does not work in the folder's state, and lock files left behind."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from normsam import cli
from normsam.analysis import study as study_module
from normsam.analysis.compare import compare, compare_table, spread_is_trustworthy
from normsam.analysis.study import choose_rho, edge_extensions, run_study
from normsam.errors import fault_message
from normsam.train import checkpoint as ckpt
from normsam.train import data as D
from normsam.train.config import load_config, save_config
from normsam.train.loop import Trainer
from normsam.train.run_lock import LOCK_FILE, RunLock
from normsam.train.run_store import RunExistsError
from tests.test_study import TINY as STUDY_TINY
from tests.test_study import _fake_run

SRC = str(Path(__file__).resolve().parents[1] / "src")

#: compare's arms, as small as they go (the quick preset's ResNet-20 on 8×8 synthetic images).
ARMS = dict(data="synthetic", image_size=8, subset=64, batch_size=32, eval_batch_size=256, epochs=1, threads=1,
            progress=False, device="cpu", model="resnet8", norm_stats=False)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    monkeypatch.setattr(D.readers, "SYSTEM_SEARCH_DIRS", {"fashion-mnist": (), "mnist": ()})
    monkeypatch.delenv(D.DATA_ENV_VAR, raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _one_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"normsam {command}: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# --- 1. stale results: compare reuses runs only when they have the settings asked for --------------------


def test_compare_refuses_runs_trained_with_other_settings(tmp_path, capsys):
    out = tmp_path / "cmp"
    compare(out, overrides=ARMS, bench_rounds=0)
    table = (out / "compare.md").read_text()
    written = {name: (out / name).stat().st_mtime_ns for name in ("compare.md", "compare.json", "compare.png")}
    # the case: more epochs and another subset on the same folder
    with pytest.raises(ValueError) as refused:
        compare(out, overrides={**ARMS, "epochs": 2, "subset": 80}, bench_rounds=0)
    message = str(refused.value)
    for arm in ("sgd", "sam-all", "sam-on"):
        assert f"{out / arm} holds a run with other settings" in message
    assert "epochs: 1 in the folder, 2 in this compare" in message and "subset: 64 in the folder, 80" in message
    assert "another --out" in message and f"delete {out}" in message
    assert (out / "compare.md").read_text() == table  # nothing rewritten with the old runs' numbers
    assert {name: (out / name).stat().st_mtime_ns for name in written} == written
    # the command line: one line, exit status 2; another seed is another run too
    args = ["compare", "--out", str(out), "--bench-rounds", "0", *[f"{k}={v}" for k, v in ARMS.items()]]
    assert cli.main([*args, "--seed", "3"]) == 2
    assert "seed: 0 in the folder, 3 in this compare" in _one_line(capsys, "compare")
    # settings that do not change what is trained (threads, progress, device) reuse the runs
    again = compare(out, overrides={**ARMS, "threads": 2, "progress": False}, bench_rounds=0)
    assert again["table"] + "\n" == table


def test_compare_refuses_a_finished_arm_whose_config_was_edited_to_match(tmp_path):
    out = tmp_path / "cmp"
    compare(out, overrides=ARMS, bench_rounds=0)
    for arm in ("sgd", "sam-all", "sam-on"):  # edited after they finished
        config = out / arm / ckpt.CONFIG
        config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "epochs": 2}))
    with pytest.raises(ValueError) as refused:
        compare(out, overrides={**ARMS, "epochs": 2}, bench_rounds=0)
    assert str(refused.value).count("holds a run trained with other settings than its config.yaml says now") == 3


@pytest.mark.parametrize("overrides, message", [
    ({"epoch": 2}, "Unknown config key 'epoch'"),  # a typo
    ({"sam_start": 5}, "sam_start=5 with epochs=1"),  # no SAM step would run
    ({"data": "fashion-mnist", "image_size": None}, "Fashion-MNIST"),  # no data: found when the first arm loads it
])
def test_a_refused_compare_leaves_no_folder_behind(tmp_path, capsys, overrides, message):
    out = tmp_path / "new" / "cmp"
    args = ["compare", "--out", str(out), "--bench-rounds", "0",
            *[f"{k}={v}" for k, v in {**ARMS, **overrides}.items() if v is not None]]
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not out.parent.exists()


def test_sweep_and_compare_share_the_folder_check(tmp_path):
    """One mechanism: the sweep's refusal of a folder with other settings is the same function's."""
    from normsam.analysis.sweep import load_sweep, run_sweep

    sweep = load_sweep({"base": {**ARMS}, "seeds": [0], "out": str(tmp_path / "s")})
    folder = sweep.runs[0].folder
    folder.mkdir(parents=True)
    save_config(load_config(None, {**ARMS, "lr": 0.5, "out": str(folder)}), folder / ckpt.CONFIG)
    [run] = run_sweep(sweep).runs
    assert run.status == "failed" and "lr: 0.5 in the folder, 0.1 in the sweep" in run.error
    assert "choose another out:" in run.error


def test_a_study_chooses_rho_from_its_own_pilot_runs_only(tmp_path, monkeypatch):
    """A pilot folder left by an earlier version of the study file (another seed, another recipe) under pilot/
    does not join the choice."""
    _fake_sweeps(monkeypatch, lambda cfg: {0.05: 40.0, 0.1: 50.0, 0.2: 45.0}[cfg.rho])
    out = tmp_path / "study"
    stale = out / "pilot" / "scope=all,rho=0.2" / "seed=99"
    stale.mkdir(parents=True)
    save_config(load_config(None, {**STUDY_TINY, "epochs": 3, "scope": "all", "rho": 0.2, "seed": 99,
                                   "out": str(stale)}), stale / ckpt.CONFIG)
    (stale / ckpt.SUMMARY).write_text(json.dumps({"status": "finished", "final_val_acc": 99.0}))
    spec = {"base": dict(STUDY_TINY), "out": str(out),
            "pilot": {"seeds": [100], "grid": [{"scope": ["all"], "rho": [0.05, 0.1, 0.2]}], "max_extensions": 0},
            "phases": [{"name": "main", "seeds": [0], "grid": [{"scope": ["all"], "rho": ["@rho:all"]}]}]}
    run_study(spec, report=False)
    record = json.loads((out / "choice.json").read_text())
    assert record["values"]["@rho:all"] == 0.1 and record["choice"]["all"]["candidates"]["0.2"] == [45.0]


# --- 2. a tie in the pilot does not walk ρ down the grid ---------------------------------------------------


def test_a_tie_is_recorded_and_never_extends_the_grid(tmp_path):
    for rho in (0.1, 0.2, 0.5):  # nothing trains: every ρ at chance
        _fake_run(tmp_path / f"all-{rho}", "all", rho, val=10.0, test=10.0)
    _fake_run(tmp_path / "on-a", "norm", 0.5, val=60.0, test=0.0)  # a tie at the upper edge
    _fake_run(tmp_path / "on-b", "norm", 1.0, val=70.0, test=0.0)
    _fake_run(tmp_path / "on-c", "norm", 2.0, val=70.0, test=0.0)
    choice = choose_rho(tmp_path)
    assert choice["all"]["rho"] == 0.1 and choice["all"]["tied"] == [0.1, 0.2, 0.5]
    assert choice["norm"]["rho"] == 1.0 and choice["norm"]["tied"] == [1.0, 2.0]
    grid = [{"scope": ["all"], "rho": [0.1, 0.2, 0.5]}, {"scope": ["norm"], "rho": [0.5, 1.0, 2.0]}]
    assert edge_extensions(choice, grid, grid, 3) == []
    # no tie: the edge still extends
    untied = {"all": {"rho": 0.1, "candidates": {"0.1": [12.0], "0.2": [10.0], "0.5": [10.0]}}}
    assert edge_extensions(untied, grid, grid, 3) == [{"scope": ["all"], "rho": [0.05]}]
    assert "tied" not in choose_rho(tmp_path / "on-b")["norm"]


def _fake_sweeps(monkeypatch, val):
    """Every sweep 'trains' its runs at once: a config and a summary with val(run) as validation accuracy."""
    from normsam.analysis import sweep as sweep_module

    def fake_run_sweep(sweep, **kwargs):
        for run in sweep.runs:
            if not (run.folder / ckpt.SUMMARY).exists():
                run.folder.mkdir(parents=True, exist_ok=True)
                save_config(run.config, run.folder / ckpt.CONFIG)
                (run.folder / ckpt.SUMMARY).write_text(json.dumps(
                    {"status": "finished", "final_val_acc": val(run.config), "final_test_acc": 0.0}))
            run.status = "done"
        return sweep

    monkeypatch.setattr(sweep_module, "run_sweep", fake_run_sweep)
    monkeypatch.setattr(study_module, "rho_curves_section", lambda *a, **k: "")


def test_a_study_whose_pilot_ties_says_so_and_keeps_its_grid(tmp_path, monkeypatch, capsys):
    _fake_sweeps(monkeypatch, lambda cfg: 10.0)  # nothing trains
    spec = {"base": dict(STUDY_TINY), "out": str(tmp_path / "study"),
            "pilot": {"seeds": [100], "grid": [{"scope": ["all"], "rho": [0.05, 0.1, 0.2]},
                                               {"scope": ["norm"], "rho": [0.2, 0.5, 1.0]}]},
            "phases": [{"name": "main", "seeds": [0], "grid": [{"scope": ["all"], "rho": ["@rho:all"]}]}]}
    run_study(spec, report=False)
    out = tmp_path / "study"
    record = json.loads((out / "choice.json").read_text())
    assert record["extended"] == [] and record["values"]["@rho:all"] == 0.05  # not 0.00078 after 3 extensions
    assert record["tied"] == {"all": [0.05, 0.1, 0.2], "norm": [0.2, 0.5, 1.0]}
    pilot = yaml.safe_load((out / "sweeps" / "pilot.yaml").read_text())
    assert pilot["grid"] == spec["pilot"]["grid"]
    printed = capsys.readouterr().out
    assert "adding" not in printed
    assert "study: warning: all: ρ 0.05, 0.1, 0.2 tie on the mean final_val_acc (10.00)" in printed
    assert "the grid is not extended" in printed
    markdown = (out / "choice.md").read_text()
    assert "**Tie (all):** ρ 0.05, 0.1, 0.2 have the same mean" in markdown and "| all | 0.1 | 10.00 | 1 | (tie) |" in markdown


def test_a_study_pilot_without_ties_still_extends_at_the_edge(tmp_path, monkeypatch, capsys):
    _fake_sweeps(monkeypatch, lambda cfg: 50.0 - 10 * cfg.rho)  # the smallest ρ is best, strictly
    spec = {"base": dict(STUDY_TINY), "out": str(tmp_path / "study"),
            "pilot": {"seeds": [100], "grid": [{"scope": ["all"], "rho": [0.1, 0.2]}], "max_extensions": 1},
            "phases": [{"name": "main", "seeds": [0], "grid": [{"scope": ["all"], "rho": ["@rho:all"]}]}]}
    run_study(spec, report=False)
    record = json.loads((tmp_path / "study" / "choice.json").read_text())
    assert record["values"]["@rho:all"] == 0.05 and record["tied"] == {}
    assert "warning: all: ρ" not in capsys.readouterr().out


# --- 3. a step-time ratio shows its spread, and says when it cannot be trusted ----------------------------


def _rows(sam_on_rounds):
    summary = {"final_test_acc": 70.0, "best_test_acc": 71.0, "final_train_loss": 1.0, "mean_epoch_time": 5.0}
    rows = []
    for method, rounds in (("SGD", [1.0] * len(sam_on_rounds)), ("SAM-all (asam, ρ=0.1)", [2.0, 2.05, 1.98, 2.1, 2.0]),
                           ("SAM-ON (asam, ρ=0.5)", sam_on_rounds)):
        ordered = sorted(rounds)
        rows.append({"method": method, "summary": summary, "step_ratio": ordered[len(ordered) // 2],
                     "step_ratio_rounds": rounds, "step_ratio_range": [min(rounds), max(rounds)],
                     "step_ratio_trusted": spread_is_trustworthy(rounds)})
    return rows


def test_the_cost_column_shows_the_spread_and_flags_a_busy_machine():
    busy = compare_table(_rows([1.08, 2.3, 0.9, 1.9, 1.0]))  # the 1.08×: rounds all over the place
    assert "| SAM-ON (asam, ρ=0.5) |" in busy
    assert "1.08× (0.90–2.30) ⚠ |" in busy and "2.00× (1.98–2.10) |" in busy and "| 1.00× |" in busy
    assert "⚠ cannot be trusted" in busy and "20% of their median" in busy
    quiet = compare_table(_rows([1.8, 1.85, 1.78, 1.9, 1.82]))
    assert "1.82× (1.78–1.90) |" in quiet and "⚠" not in quiet
    assert not spread_is_trustworthy([1.8, 1.8])  # too few rounds to tell
    assert spread_is_trustworthy([1.0, 1.0, 1.0])


def test_compare_measures_every_round_and_warns_in_its_output(tmp_path, monkeypatch, capsys):
    import normsam.bench as bench
    from normsam.bench.report import BenchResult, VariantResult

    per_round = {"SGD": [1.0] * 5, "SAM-all": [2.0, 2.1, 1.9, 2.0, 2.05],
                 "SAM-ON (cheap ascent)": [1.08, 2.3, 0.9, 1.9, 1.0]}

    def busy_machine(make_model, x, y, *, variants, rounds, **kwargs):
        return BenchResult([VariantResult(v.name, step_times=[0.1 * r for r in per_round[v.name]],
                                          ratios=per_round[v.name]) for v in variants], settings={})

    monkeypatch.setattr(bench, "run_benchmark", busy_machine)
    result = compare(tmp_path / "cmp", overrides=ARMS, bench_rounds=5)
    rows = {r["folder"]: r for r in result["rows"]}
    assert rows["sam-on"]["step_ratio"] == 1.08 and rows["sam-on"]["step_ratio_range"] == [0.9, 2.3]
    assert rows["sam-on"]["step_ratio_rounds"] == per_round["SAM-ON (cheap ascent)"]
    assert rows["sam-on"]["step_ratio_trusted"] is False and rows["sam-all"]["step_ratio_trusted"] is True
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["step_ratio_range"] for r in saved][2] == [0.9, 2.3]
    assert "1.08× (0.90–2.30) ⚠" in (tmp_path / "cmp" / "compare.md").read_text()
    assert ("warning: step-time ratios that cannot be trusted (SAM-ON (asam, ρ=0.5): 5 rounds, 0.90–2.30, "
            "spread 130%)") in capsys.readouterr().out


# --- 4. no lock file left behind; advice that works in the folder's state ---------------------------------


def test_a_finished_run_leaves_no_lock_file(tmp_path):
    cfg = load_config(None, {**ARMS, "out": str(tmp_path / "run")})
    Trainer(cfg).run()
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    compare(tmp_path / "cmp", overrides=ARMS, bench_rounds=0)
    assert not list((tmp_path / "cmp").rglob(LOCK_FILE))
    with RunLock(tmp_path / "x", what="sweep"):
        assert (tmp_path / "x" / LOCK_FILE).is_file()
    assert not (tmp_path / "x" / LOCK_FILE).exists()


def test_a_lock_file_deleted_by_its_releasing_holder_is_never_locked_twice(tmp_path, monkeypatch):
    """The race that deleting the file on release opens: B opens the file, A releases (deletes it), B locks the
    deleted file. B must notice and lock the file at the path, so that C cannot hold the folder at once."""
    import normsam.train.run_lock as run_lock

    folder = tmp_path / "run"
    first = RunLock(folder).acquire()
    real_open = open
    released = []

    def open_then_holder_releases(path, *args, **kwargs):
        handle = real_open(path, *args, **kwargs)
        if not released and Path(path).name == LOCK_FILE:
            released.append(True)
            first.release()  # between B's open and B's flock
        return handle

    monkeypatch.setattr(run_lock, "open", open_then_holder_releases, raising=False)
    second = RunLock(folder).acquire()
    monkeypatch.undo()
    assert released and os.stat(folder / LOCK_FILE).st_ino == os.fstat(second._file.fileno()).st_ino
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {SRC!r})
        from normsam.train.run_lock import RunLock, RunLockedError
        try:
            RunLock({str(folder)!r}).acquire()
        except RunLockedError:
            print("refused")
    """)
    third = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert third.stdout.strip() == "refused"
    second.release()


def test_a_finished_run_is_not_told_to_resume(tmp_path):
    cfg = load_config(None, {**ARMS, "out": str(tmp_path / "run")})
    Trainer(cfg).run()
    with pytest.raises(RunExistsError) as refused:
        Trainer(cfg)
    assert "holds a finished run" in str(refused.value) and "--resume" not in str(refused.value)
    with RunLock(tmp_path / "run", what="sharpness"), pytest.raises(ValueError) as in_use:
        Trainer(cfg)
    assert "--resume" not in str(in_use.value)


def test_a_full_disk_before_the_first_checkpoint_does_not_advise_resume(tmp_path, monkeypatch, capsys):
    real = ckpt._write_temporary

    def full_at_first_checkpoint(path, data):
        if path.name == ckpt.CHECKPOINT:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(ckpt, "_write_temporary", full_at_first_checkpoint)
    run = tmp_path / "run"
    args = ["train", *[f"{k}={v}" for k, v in ARMS.items()], f"out={run}"]
    assert cli.main(args) == 2
    err = _one_line(capsys, "train")
    assert "No space left on device" in err and "--resume" not in err
    assert f"start it again with `normsam train --config {run / ckpt.CONFIG} out={run}`" in err
    monkeypatch.setattr(ckpt, "_write_temporary", real)
    assert cli.main(["train", "--config", str(run / ckpt.CONFIG), f"out={run}"]) == 0  # the advice works
    # with a checkpoint, --resume is the advice (and works: test_faults.py); a finished run is told neither
    message, _ = fault_message(OSError(errno.ENOSPC, "No space left on device", str(run / ckpt.SUMMARY)))
    assert "holds a finished run" in message and "--resume" not in message
