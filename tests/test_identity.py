"""Issue 16, class 3: what a run says it was is what it was (SAM steps taken, the checkpoint's own config,
sharpness of the epoch it measured)."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from normsam.analysis.report import make_report
from normsam.analysis.report_figures import sharpness_description
from normsam.analysis.runs import load_run
from normsam.analysis.run_sharpness import measure_run_sharpness
from normsam.train import checkpoint as ckpt
from normsam.train import data as D
from normsam.train.loop import Trainer, resume
from tests.test_runner import _cfg, interrupt_in_second_epoch


@pytest.fixture(autouse=True)
def no_system_data(monkeypatch):
    monkeypatch.setattr(D.readers, "SYSTEM_SEARCH_DIRS", {"fashion-mnist": (), "mnist": ()})
    monkeypatch.delenv(D.DATA_ENV_VAR, raising=False)


def _interrupted(tmp_path, monkeypatch, **overrides):
    cfg = _cfg(tmp_path, **overrides)
    interrupt_in_second_epoch(cfg, monkeypatch)
    return cfg


def test_a_sam_window_after_the_last_epoch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="sam_start=5 with epochs=1: .*no SAM step would run"):
        Trainer(_cfg(tmp_path, epochs=1, sam_start=5))


def test_the_summary_records_the_sam_steps_taken(tmp_path):
    summary = Trainer(_cfg(tmp_path, epochs=2, sam_start=1)).run()
    assert summary["sam_steps"] == 2  # one epoch of 2 steps with SAM, the first without
    assert summary["status"] == "finished"


def test_an_edited_config_is_refused_at_resume(tmp_path, monkeypatch):
    cfg = _interrupted(tmp_path, monkeypatch, rho=0.5)
    path = tmp_path / "run" / ckpt.CONFIG
    edited = yaml.safe_load(path.read_text())
    edited["rho"] = 2.0
    path.write_text(yaml.safe_dump(edited, sort_keys=False))
    with pytest.raises(ValueError, match=r"config.yaml was edited since the run started \(rho: 0.5 in the "
                                         r"checkpoint, 2.0 in config.yaml\)"):
        resume(cfg.out)
    edited["rho"] = 0.5
    path.write_text(yaml.safe_dump(edited, sort_keys=False))
    assert resume(cfg.out)["epochs"] == 2  # restored: resumes


def test_sharpness_of_an_earlier_checkpoint_is_flagged_stale_and_not_paired(tmp_path, monkeypatch):
    cfg = _interrupted(tmp_path, monkeypatch)
    measured = measure_run_sharpness(cfg.out, steps=1, m=16, n=1024)
    assert measured["epoch"] == 1 and measured["run_epochs"] == 2 and measured["examples"] == 64
    resume(cfg.out)
    make_report([cfg.out], out=tmp_path / "report")
    runs = list(csv.DictReader((tmp_path / "report" / "runs.csv").open()))
    assert runs[0]["sharpness"] == ""  # the epoch-1 measurement is not paired with the final accuracy
    text = (tmp_path / "report" / "report.md").read_text()
    assert "sharpness stale (measured at epoch 1 of 2" in text

    fresh = measure_run_sharpness(cfg.out, steps=1, m=16, n=1024)
    assert fresh["epoch"] == 2
    assert json.loads((tmp_path / "run" / "sharpness.json").read_text())["measurements"][-1]["epoch"] == 2
    assert load_run(cfg.out).sharpness["sharpness"] == fresh["sharpness"]  # current again: paired
    assert "n=64," in sharpness_description([fresh])  # the report's header: the examples actually used


def test_a_config_edited_after_the_run_finished_is_refused_by_the_report(tmp_path):
    cfg = _cfg(tmp_path, epochs=1)
    Trainer(cfg).run()
    path = tmp_path / "run" / ckpt.CONFIG
    original = path.read_text()
    path.write_text(original.replace("rho: 0.5", "rho: 2.0"))
    with pytest.raises(ValueError, match="config.yaml was edited after the run finished"):
        load_run(cfg.out)
    path.write_text(original.replace("progress: false", "progress: true"))  # a setting that changes nothing
    assert load_run(cfg.out).config.rho == 0.5
