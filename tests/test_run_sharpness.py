"""normsam.analysis.run_sharpness: sharpness of a run folder, sharpness.json bookkeeping, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from normsam.analysis.run_sharpness import SHARPNESS_FILE, latest_measurement, measure_run_sharpness, read_measurements
from normsam.cli import main
from normsam.train.config import load_config
from normsam.train.loop import Trainer

TINY = dict(data="synthetic", image_size=8, subset=64, batch_size=32, eval_batch_size=256, epochs=2, threads=1,
            progress=False, device="cpu")
FAST = dict(steps=3, m=32, n=64)  # two batches of 32, three APGD steps


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run that measured its sharpness at the end (as `sharpness_at_end=true` does)."""
    before = torch.get_num_threads()
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    trainer = Trainer(load_config(None, {**TINY, "out": str(run_dir), "sharpness_at_end": True, "sharpness_steps": 2}))
    summary = trainer.run()
    yield run_dir, trainer, summary
    torch.set_num_threads(before)


def test_runner_records_sharpness_at_end(trained):
    run_dir, _, summary = trained
    [measurement] = read_measurements(run_dir)
    assert summary["sharpness"] == measurement["sharpness"]
    assert json.loads((run_dir / "summary.json").read_text())["sharpness"] == measurement["sharpness"]
    assert measurement["steps"] == 2 and measurement["rho"] == 0.003
    assert measurement["examples"] == 64  # n=1024 asked, the subset has 64
    assert measurement["epoch"] == 2


def test_writes_settings_replaces_same_and_appends_other(trained):
    run_dir = trained[0]
    first = measure_run_sharpness(run_dir, rho=0.01, **FAST)
    before = len(read_measurements(run_dir))
    saved = latest_measurement(run_dir)
    for key, value in dict(rho=0.01, steps=3, m=32, n=64, kind="worst", norm="linf", adaptive=True, scope="all",
                           logit_normalize=False, seed=0, epoch=2).items():
        assert saved[key] == value, key
    for key in ("sharpness", "error_sharpness", "max_rel_perturbation", "clean_loss", "worst_loss"):
        assert saved[key] == first[key]
    assert first["sharpness"] > 0
    assert first["max_rel_perturbation"] <= 1 + 1e-5

    again = measure_run_sharpness(run_dir, rho=0.01, **FAST)  # same settings: replaces
    assert len(read_measurements(run_dir)) == before
    assert again["sharpness"] == pytest.approx(first["sharpness"], rel=1e-5)  # deterministic

    measure_run_sharpness(run_dir, rho=0.01, scope="norm", **FAST)  # other settings: appended
    measurements = read_measurements(run_dir)
    assert len(measurements) == before + 1
    assert latest_measurement(run_dir)["scope"] == "norm"
    assert sum(m["rho"] == 0.01 and m["scope"] == "all" for m in measurements) == 1


def test_rebuilt_model_matches_in_memory_model(trained):
    run_dir, trainer, _ = trained
    from_memory = measure_run_sharpness(run_dir, rho=0.005, seed=1, model=trainer.model, data=trainer.data, **FAST)
    rebuilt = measure_run_sharpness(run_dir, rho=0.005, seed=1, device="cpu", **FAST)
    assert rebuilt["clean_loss"] == pytest.approx(from_memory["clean_loss"], rel=1e-6)
    assert rebuilt["sharpness"] == pytest.approx(from_memory["sharpness"], rel=1e-4, abs=1e-6)
    assert rebuilt["epoch"] == from_memory["epoch"] == 2


def test_rho_zero_gives_zero(trained):
    result = measure_run_sharpness(trained[0], rho=0.0, **FAST)
    assert result["sharpness"] == 0.0
    assert result["clean_loss"] == result["worst_loss"]


def test_average_case(trained):
    result = measure_run_sharpness(trained[0], rho=0.01, kind="average", **FAST)
    assert result["kind"] == "average"
    assert result["sharpness"] == pytest.approx(result["worst_loss"] - result["clean_loss"])


def test_cli(trained, capsys):
    run_dir = trained[0]
    code = main(["sharpness", str(run_dir), "--rho", "0.002", "--steps", "2", "--m", "64", "--n", "64",
                 "--norm", "l2", "--logit-normalize", "--seed", "3"])
    assert code == 0
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1 and SHARPNESS_FILE in out and "sharpness" in out
    latest = latest_measurement(run_dir)
    assert (latest["rho"], latest["norm"], latest["logit_normalize"], latest["seed"], latest["m"]) == (
        0.002, "l2", True, 3, 64)


def test_errors(tmp_path, trained, capsys):
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        measure_run_sharpness(tmp_path / "missing")
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        measure_run_sharpness(trained[0], n=0)
    with pytest.raises(ValueError, match="rho must be"):
        measure_run_sharpness(trained[0], rho=-1.0, **FAST)
    assert main(["sharpness", str(tmp_path / "missing")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    (tmp_path / SHARPNESS_FILE).write_text("not json")
    with pytest.raises(ValueError, match="delete it and measure again"):
        read_measurements(tmp_path)
