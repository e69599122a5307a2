"""Issue 16, class 2: a diverging run stops with its epoch and step, keeps its last good checkpoint, says
``diverged`` in summary.json, in sweeps and reports; every JSON file is standard JSON."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from normsam import cli
from normsam.analysis.norm_stats import norm_parameter_stats
from normsam.analysis.report import make_report
from normsam.analysis.sweep import run_sweep
from normsam.files import json_dumps
from normsam.train import checkpoint as ckpt
from normsam.train import data as D
from normsam.train.divergence import RunDiverged
from normsam.train.loop import Trainer, resume
from tests.conftest import make_cnn
from tests.test_runner import TINY, _cfg


@pytest.fixture(autouse=True)
def no_system_data(monkeypatch):
    monkeypatch.setattr(D.readers, "SYSTEM_SEARCH_DIRS", {"fashion-mnist": (), "mnist": ()})
    monkeypatch.delenv(D.DATA_ENV_VAR, raising=False)


def _strict_json(text: str):
    """Standard JSON only: NaN / Infinity are refused."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))


def _all_json_is_standard(folder: Path) -> None:
    for path in folder.rglob("*.json"):
        _strict_json(path.read_text())
    for path in folder.rglob("*.jsonl"):
        for line in path.read_text().splitlines():
            _strict_json(line)


@pytest.mark.parametrize("norm_stats", [True, False])
def test_a_huge_lr_stops_with_the_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path, norm_stats):
    cfg = _cfg(tmp_path, lr=1e6, norm_stats=norm_stats)
    with pytest.raises(RunDiverged, match=r"loss became non-finite at epoch 2 \(step \d+\): lower lr or rho") as err:
        Trainer(cfg).run()
    run = Path(cfg.out)
    assert err.value.epoch == 2 and str(run) in str(err.value)
    summary = _strict_json((run / ckpt.SUMMARY).read_text())
    assert summary["status"] == "diverged" and summary["diverged"]["epoch"] == 2 and summary["epochs"] == 1
    assert ckpt.load_checkpoint(run / ckpt.CHECKPOINT)["epoch"] == 1  # the last good one
    weights = ckpt.load_checkpoint(run / ckpt.CHECKPOINT)["model"]
    assert all(bool(torch.isfinite(t).all()) for t in weights.values() if t.is_floating_point())
    _all_json_is_standard(run)
    with pytest.raises(ValueError, match="diverged .*resuming would diverge again"):
        resume(run)
    if norm_stats:
        return
    # the last good epoch's model still overflows on data: sharpness says so instead of recording null
    from normsam.analysis.run_sharpness import SHARPNESS_FILE, measure_run_sharpness

    with pytest.raises(ValueError, match="is not finite on the 16 examples, so its sharpness is undefined"):
        measure_run_sharpness(run, steps=1, n=16, m=16)
    assert not (run / SHARPNESS_FILE).exists()
    (run / SHARPNESS_FILE).write_text(json.dumps({"measurements": [{"sharpness": None, "epoch": 1}]}))
    from normsam.analysis.runs import load_run

    assert load_run(run).sharpness is None  # a null measurement (written before) is no value, not a crash


def test_the_cli_prints_one_line_and_exits_3(tmp_path, capsys):
    args = ["train", *[f"{k}={v}" for k, v in TINY.items()], f"out={tmp_path / 'run'}", "lr=1000000.0"]
    assert cli.main(args) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("normsam train: error: the training loss became non-finite at epoch") and "\n" not in err


def test_fp32_runs_do_not_blame_fp16(tmp_path, monkeypatch):
    """A non-finite ascent gradient in an fp32 run: the warning must not say "fp16 overflow?"."""
    original = Trainer.train_step

    def with_a_nonfinite_ascent(self, x, y, use_sam):
        out = original(self, x, y, use_sam)
        self.sam.counters["nonfinite_ascent_steps"] += 1
        return out

    monkeypatch.setattr(Trainer, "train_step", with_a_nonfinite_ascent)
    with pytest.warns(RuntimeWarning, match="ascent gradients were not finite") as record:
        Trainer(_cfg(tmp_path, epochs=1)).run()
    messages = [str(w.message) for w in record if "ascent gradients" in str(w.message)]
    assert messages and not any("fp16" in m for m in messages) and "lr or rho too large" in messages[0]


def test_sweeps_count_diverged_runs_and_reports_leave_them_out_of_the_means(tmp_path):
    sweep = run_sweep({"out": str(tmp_path / "sweep"), "base": {**TINY, "epochs": 2},
                       "grid": {"lr": [0.1, 1000000.0]}, "seeds": [0]})
    status = {r.name: r.status for r in sweep.runs}
    assert status == {"lr=0.1/seed=0": "done", "lr=1000000.0/seed=0": "diverged"}
    assert sweep.counts()["diverged"] == 1 and not sweep.failed
    assert "1 diverged" in sweep.summary()
    again = run_sweep({"out": str(tmp_path / "sweep"), "base": {**TINY, "epochs": 2},
                       "grid": {"lr": [0.1, 1000000.0]}, "seeds": [0]})
    assert {r.name: r.status for r in again.runs} == {"lr=0.1/seed=0": "skipped", "lr=1000000.0/seed=0": "diverged"}
    _all_json_is_standard(tmp_path / "sweep")

    out = tmp_path / "report"
    make_report([tmp_path / "sweep"], out=out)
    table = list(csv.DictReader((out / "table.csv").open()))
    assert len(table) == 1  # the diverged arm is not averaged in
    text = (out / "report.md").read_text()
    assert "1 diverged" in text and "diverged (epoch 2)" in text and "--include-diverged" in text
    make_report([tmp_path / "sweep"], out=tmp_path / "with", include_diverged=True)
    assert len(list(csv.DictReader((tmp_path / "with" / "table.csv").open()))) == 2


def test_norm_statistics_of_a_model_with_nan_weights_do_not_crash():
    model = make_cnn()
    with torch.no_grad():
        model.bn1.weight[0] = math.nan
        model.gn.weight.fill_(math.inf)
    stats = norm_parameter_stats(model)
    bn1 = next(layer for layer in stats["layers"] if layer["module"] == "bn1" and layer["kind"] == "gamma")
    assert bn1["nonfinite"] == 1 and bn1["n"] == 4 and math.isfinite(bn1["mean"])
    gn = next(layer for layer in stats["layers"] if layer["module"] == "gn" and layer["kind"] == "gamma")
    assert gn["mean"] is None and gn["hist"] is None
    _strict_json(json_dumps(stats))


def test_the_json_writer_encodes_non_finite_values_as_null():
    text = json_dumps({"a": math.nan, "b": [math.inf, -math.inf, 1.5], "c": torch.tensor(math.nan)})
    assert _strict_json(text) == {"a": None, "b": [None, None, 1.5], "c": None}


def test_non_finite_running_statistics_count_as_diverged():
    from normsam.train.divergence import check_weights

    model = make_cnn()
    check_weights(model, epoch=3)
    model.bn1.running_var[1] = math.inf
    with pytest.raises(RunDiverged, match="weights or running statistics became non-finite at the end of epoch 3"):
        check_weights(model, epoch=3)


def test_a_study_never_chooses_the_rho_of_a_diverged_pilot_run(tmp_path):
    from normsam.analysis.study import choose_rho
    from tests.test_study import _fake_run

    _fake_run(tmp_path / "a", "norm", 0.2, val=70.0, test=60.0)
    _fake_run(tmp_path / "b", "norm", 5.0, val=None, test=None)
    (tmp_path / "b" / ckpt.SUMMARY).write_text(json.dumps({"status": "diverged", "final_val_acc": None}))
    choice = choose_rho(tmp_path)
    assert choice["norm"]["rho"] == 0.2 and list(choice["norm"]["candidates"]) == ["0.2"]


@pytest.mark.slow
def test_ddp_ranks_stop_together_when_the_loss_diverges(tmp_path):
    """Under DDP no rank stops alone (the others would hang in the next all-reduce): one verdict per epoch."""
    from tests.test_scale import DDP_ARGS, _torchrun

    done = _torchrun([*DDP_ARGS, "lr=1000000.0", f"out={tmp_path / 'ddp'}"], tmp_path)
    assert done.returncode != 0 and "became non-finite at epoch" in done.stderr
    summary = _strict_json((tmp_path / "ddp" / ckpt.SUMMARY).read_text())
    assert summary["status"] == "diverged"
    _all_json_is_standard(tmp_path / "ddp")
