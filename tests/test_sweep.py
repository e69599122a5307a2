"""normsam.analysis.sweep: expansion and folder names, validation, restart after an interruption, failures."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch
import yaml

from normsam.analysis.sweep import SWEEP_FILE, load_sweep, point_name, run_sweep
from normsam.cli import main
from normsam.train import checkpoint as ckpt
from normsam.train.config import load_config, save_config
from normsam.train.loop import Trainer

TINY = dict(data="synthetic", image_size=8, subset=64, batch_size=32, eval_batch_size=256, epochs=2, threads=1,
            progress=False, device="cpu")


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def spec(out, **extra):
    return {"base": dict(TINY), "grid": {"scope": ["none", "norm"]}, "seeds": [0, 1], "out": str(out), **extra}


# --- names -------------------------------------------------------------------------------------------------


def test_point_names_are_readable_safe_and_distinct():
    assert point_name({"scope": "norm", "rho": 0.5}) == "scope=norm,rho=0.5"
    assert point_name({"rho": 1e-05, "subset": None, "compile": True, "epochs": 3}) == (
        "rho=1e-05,subset=null,compile=true,epochs=3")
    assert point_name({}) == ""
    a = point_name({"scope": ["*.bn*", "fc.*"]})
    b = point_name({"scope": ["*.bn*", "fc.?"]})
    assert a.startswith("scope=_.bn_+fc._-") and a != b
    for name in (a, b, point_name({"data_dir": "/some where/../x"}), point_name({"augment": "x" * 80})):
        assert re.fullmatch(r"[A-Za-z0-9._+,=-]+", name) and "/" not in name and len(name) < 80


def test_expansion_and_folders(tmp_path):
    sweep = load_sweep({
        "base": dict(TINY),
        "grid": [{"scope": ["none"]}, {"scope": ["all", "norm"], "rho": [0.5, 1.0]}],
        "seeds": [0, 3],
        "out": str(tmp_path),
    })
    names = [run.name for run in sweep.runs]
    assert names[:2] == ["scope=none/seed=0", "scope=none/seed=3"]
    assert "scope=norm,rho=1.0/seed=3" in names and len(names) == 2 + 2 * 2 * 2
    run = sweep.runs[-1]
    assert run.folder == tmp_path / run.name
    assert run.overrides == {**TINY, "scope": "norm", "rho": 1.0, "seed": 3}
    assert run.config.out == str(run.folder)
    assert [r.name for r in load_sweep({"base": TINY, "out": str(tmp_path)}).runs] == ["seed=0"]


# --- validation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        ({"grids": {}}, "Unknown sweep key 'grids'.*valid top-level keys are base, grid"),
        ({"base": {**TINY, "rhoo": 1}},
         "Unknown config key 'rhoo' in the sweep's base. Did you mean 'rho'.*Valid keys"),
        ({"grid": {"scoop": ["none"]}}, "Unknown config key 'scoop' in the sweep's grid.*Valid keys"),
        ({"grid": {"rho": []}}, r"grid.rho is an empty list"),
        ({"grid": {"rho": 0.5}}, r"grid.rho must be a list of values"),
        ({"grid": {"rho": [0.5, 0.5]}}, "lists 0.5 more than once"),
        ({"grid": {"seed": [0, 1]}}, "sets 'seed'.*top-level `seeds:`"),
        ({"grid": {"out": ["a", "b"]}}, "sets 'out'.*top-level `out:`"),
        ({"base": {**TINY, "seed": 1}}, "sets 'seed'"),
        ({"grid": {"epochs": [1, 2]}}, "'epochs' is in both base and grid"),
        ({"seeds": [0, 0]}, "seeds lists a seed more than once"),
        ({"seeds": "0"}, "seeds must be a non-empty list of integers"),
        ({"out": None}, "has no out"),
        ({"workers": 0}, "workers must be an integer >= 1"),
        ({"grid": {"rho": ["big"]}}, r"Sweep run rho=big/seed=0: Wrong type for rho"),
        ({"grid": {"scope": ["everything"]}}, "Invalid scope: 'everything'"),
        ({"preset": "no-such-preset"}, "neither a preset"),
    ],
)
def test_validation_errors(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        load_sweep({**spec(tmp_path), **change})


def test_missing_sweep_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="No sweep file"):
        load_sweep(tmp_path / "nope.yaml")
    assert main(["sweep", str(tmp_path / "nope.yaml")]) == 2


# --- running -----------------------------------------------------------------------------------------------


def test_interrupted_sweep_restarts_and_trains_each_run_once(tmp_path, monkeypatch):
    """Ctrl-C during the second epoch of the third run; the restart resumes it and skips the finished ones."""
    inits: list[str] = []
    original_init, original_epoch = Trainer.__init__, Trainer.train_epoch

    def counting_init(self, cfg, *args, **kwargs):
        inits.append(cfg.out)
        original_init(self, cfg, *args, **kwargs)

    def interrupting_epoch(self, epoch):
        if len(inits) == 3 and epoch == 1:
            raise KeyboardInterrupt
        return original_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "__init__", counting_init)
    monkeypatch.setattr(Trainer, "train_epoch", interrupting_epoch)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec(tmp_path / "out"), sort_keys=False))

    with pytest.raises(KeyboardInterrupt):
        run_sweep(path)
    record = json.loads((tmp_path / "out" / SWEEP_FILE).read_text())
    assert [r["status"] for r in record["runs"]] == ["done", "done", "interrupted", "pending"]
    assert record["source"] == str(path)
    folders = [tmp_path / "out" / r["name"] for r in record["runs"]]
    assert [f.relative_to(tmp_path / "out").as_posix() for f in folders] == [
        "scope=none/seed=0", "scope=none/seed=1", "scope=norm/seed=0", "scope=norm/seed=1"]
    assert len(ckpt.read_jsonl(folders[2] / ckpt.METRICS_JSONL)) == 1  # one epoch done, then stopped
    finished_mtimes = [(f / ckpt.SUMMARY).stat().st_mtime_ns for f in folders[:2]]
    time.sleep(0.01)

    inits.clear()
    sweep = run_sweep(path)
    assert inits == [str(folders[2]), str(folders[3])]  # the finished runs were not built again
    assert [r.status for r in sweep.runs] == ["skipped", "skipped", "done", "done"]
    assert [r.resumed for r in sweep.runs] == [False, False, True, False]
    assert [(f / ckpt.SUMMARY).stat().st_mtime_ns for f in folders[:2]] == finished_mtimes
    for folder in folders:
        assert (folder / ckpt.SUMMARY).is_file()
        assert [r["epoch"] for r in ckpt.read_jsonl(folder / ckpt.METRICS_JSONL)] == [1, 2]
        assert [r["epoch"] for r in ckpt.read_jsonl(folder / ckpt.NORM_STATS)] == [0, 1, 2]
    assert [r["status"] for r in json.loads((tmp_path / "out" / SWEEP_FILE).read_text())["runs"]] == [
        "skipped", "skipped", "done", "done"]


def test_failed_run_does_not_stop_the_others(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": {**TINY, "epochs": 1}, "grid": {"model": ["no-such-model", "resnet8"]},
                                    "out": str(tmp_path / "out")}))
    assert main(["sweep", str(path)]) == 1
    out = capsys.readouterr().out
    assert "1 done" in out and "1 failed" in out and "failed model=no-such-model/seed=0: ValueError" in out
    runs = json.loads((tmp_path / "out" / SWEEP_FILE).read_text())["runs"]
    assert [r["status"] for r in runs] == ["failed", "done"]
    assert "no-such-model" in runs[0]["error"]
    assert (tmp_path / "out" / "model=resnet8" / "seed=0" / ckpt.SUMMARY).is_file()


def test_folder_with_other_settings_is_not_reused(tmp_path):
    sweep = load_sweep({**spec(tmp_path), "seeds": [0]})
    other = load_config(None, {**TINY, "epochs": 3, "out": str(sweep.runs[0].folder)})
    sweep.runs[0].folder.mkdir(parents=True)
    save_config(other, sweep.runs[0].folder / ckpt.CONFIG)
    result = run_sweep(sweep)
    assert [r.status for r in result.runs] == ["failed", "done"]
    assert "epochs: 3 in the folder, 2 in the sweep" in result.runs[0].error


def test_dry_run_lists_runs(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec(tmp_path / "out"), sort_keys=False))
    assert main(["sweep", str(path), "--dry-run"]) == 0
    assert capsys.readouterr().out.strip().endswith("4 runs")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_two_workers(tmp_path):
    """Two spawned processes (each imports torch: slow on a 2-core machine); same results as in-process."""
    sweep = run_sweep({**spec(tmp_path / "par"), "seeds": [0]}, workers=2)
    assert [r.status for r in sweep.runs] == ["done", "done"]
    serial = run_sweep({**spec(tmp_path / "serial"), "seeds": [0]})
    for a, b in zip(sweep.runs, serial.runs):
        rows_a = ckpt.read_jsonl(a.folder / ckpt.METRICS_JSONL)
        rows_b = ckpt.read_jsonl(b.folder / ckpt.METRICS_JSONL)
        assert [r["test_loss"] for r in rows_a] == [r["test_loss"] for r in rows_b]
