"""Issue 16, class 7: scientific notation for floats everywhere, train --help lists the config keys,
--version, and a report that lands beside its runs without overwriting an earlier one."""

from __future__ import annotations

import os

import pytest
import yaml

from normsam import __version__, cli
from normsam.analysis.commands import report_folder
from normsam.analysis.sweep import load_sweep
from normsam.train import data as D
from normsam.train.config import config_keys, load_config
from normsam.train.config_help import DESCRIPTIONS
from normsam.train.loop import Trainer
from tests.test_runner import TINY


@pytest.fixture(autouse=True)
def no_system_data(monkeypatch):
    monkeypatch.setattr(D.readers, "SYSTEM_SEARCH_DIRS", {"fashion-mnist": (), "mnist": ()})
    monkeypatch.delenv(D.DATA_ENV_VAR, raising=False)


def test_scientific_notation_on_the_command_line_in_yaml_and_in_sweeps(tmp_path):
    cfg = load_config(None, ["lr=5e-4", "weight_decay=1e-4", "rho=1e-1", "eta=1E-2", "clip_grad_norm=1.5e+1"])
    assert (cfg.lr, cfg.weight_decay, cfg.rho, cfg.eta, cfg.clip_grad_norm) == (5e-4, 1e-4, 0.1, 0.01, 15.0)
    path = tmp_path / "c.yaml"
    path.write_text("lr: 5e-4\nweight_decay: 1e-4\nrho: 1e-1\n")
    cfg = load_config(str(path))
    assert isinstance(cfg.lr, float) and cfg.lr == 5e-4 and cfg.weight_decay == 1e-4
    spec = yaml.safe_load("out: x\nbase: {weight_decay: 5e-4}\ngrid: {lr: [1e-3, 5e-4]}\n")
    sweep = load_sweep({**spec, "out": str(tmp_path / "s")})
    assert [r.config.lr for r in sweep.runs] == [1e-3, 5e-4] and sweep.runs[0].config.weight_decay == 5e-4
    for bad in ("lr=5e", "epochs=1e2", "lr=fast"):
        with pytest.raises(ValueError, match="Wrong type"):
            load_config(None, [bad])
    with pytest.raises(ValueError, match="must be >= 0 and finite"):
        load_config(None, ["rho=.inf"])


def test_train_help_lists_every_config_key_with_its_meaning(capsys):
    assert set(DESCRIPTIONS) == set(config_keys()), "describe every config key in normsam.train.config_help"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "config keys" in out
    for key in config_keys():
        assert f"  {key}=" in out, key
    assert "rho=0.5" in out and "SAM-ON needs a larger rho" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"normsam {__version__}"


def test_report_defaults_beside_the_runs_and_never_overwrites_silently(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    Trainer(load_config(None, {**TINY, "epochs": 1, "out": str(runs / "a")})).run()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli.main(["report", str(runs)]) == 0
    assert (runs / "report" / "report.md").is_file() and os.listdir(elsewhere) == []
    capsys.readouterr()
    assert cli.main(["report", str(runs)]) == 2
    assert "already holds a report (report.md); pass --overwrite" in capsys.readouterr().err
    assert report_folder([str(runs)], None, overwrite=True) == runs / "report"
    (tmp_path / "more").mkdir()
    assert report_folder([str(runs / "a"), str(tmp_path / "more")], None) == tmp_path / "report"  # common parent
    assert report_folder([str(runs)], str(tmp_path / "mine")) == tmp_path / "mine"
