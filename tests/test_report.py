"""normsam.analysis.report: tables (checked against the runs' summaries by hand), figures, report.md, CLI."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import shutil
import statistics

import pytest
import torch
import yaml
from PIL import Image

from normsam.analysis.report import find_runs, group_runs, grouping_keys, make_report
from normsam.analysis.run_sharpness import measure_run_sharpness
from normsam.analysis.sweep import run_sweep
from normsam.cli import main

TINY = dict(data="synthetic", image_size=8, subset=64, batch_size=32, eval_batch_size=256, epochs=2, threads=1,
            progress=False, device="cpu")
FIGURES = ("accuracy_vs_rho.png", "sharpness_vs_accuracy.png", "norm_params.png", "training_curves.png")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny sweep (SGD + SAM-all/SAM-ON at two ρ, two seeds), sharpness on three runs, one unfinished run."""
    before = torch.get_num_threads()
    root = tmp_path_factory.mktemp("report")
    sweep_file = root / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "base": TINY,
        "grid": [{"scope": ["none"]}, {"scope": ["all", "norm"], "rho": [0.05, 0.5]}],
        "seeds": [0, 1],
        "out": str(root / "sweep"),
    }, sort_keys=False))
    run_sweep(sweep_file)
    out = root / "sweep"
    for name in ("scope=none/seed=0", "scope=norm,rho=0.5/seed=0", "scope=norm,rho=0.5/seed=1"):
        measure_run_sharpness(out / name, rho=0.01, steps=2, m=32, n=32)
    unfinished = out / "extra" / "unfinished"
    shutil.copytree(out / "scope=none/seed=0", unfinished)
    (unfinished / "summary.json").unlink()
    (unfinished / "sharpness.json").unlink()
    yield root, sweep_file
    torch.set_num_threads(before)


def summaries(folder):
    return {p.parent.relative_to(folder).as_posix(): json.loads(p.read_text()) for p in folder.rglob("summary.json")}


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_files_tables_and_figures(runs):
    root, sweep_file = runs
    out = root / "report"
    paths = make_report([root / "sweep"], out=out)
    assert [p.name for p in paths] == ["report.md", "table.csv", "runs.csv", *FIGURES]
    for name in FIGURES:
        with Image.open(out / name) as image:
            assert image.format == "PNG"
            width, height = image.size
            assert 500 <= width <= 2000 and 400 <= height <= 1000, (name, image.size)
            darkest, brightest = image.convert("L").getextrema()
            assert brightest - darkest > 100  # something is drawn

    # table.csv against a hand computation from the summaries (sample std over the two seeds)
    sums = summaries(root / "sweep")
    rows = {row["method"]: row for row in read_csv(out / "table.csv")}
    assert list(rows) == ["sgd", "all-sam-rho0.05", "all-sam-rho0.5", "norm-sam-rho0.05", "norm-sam-rho0.5"]
    for method, prefix in [("sgd", "scope=none"), ("all-sam-rho0.5", "scope=all,rho=0.5"),
                           ("norm-sam-rho0.05", "scope=norm,rho=0.05")]:
        finals = [sums[f"{prefix}/seed={s}"]["final_test_acc"] for s in (0, 1)]
        bests = [sums[f"{prefix}/seed={s}"]["best_test_acc"] for s in (0, 1)]
        times = [sums[f"{prefix}/seed={s}"]["mean_epoch_time"] for s in (0, 1)]
        row = rows[method]
        assert float(row["final_test_acc_mean"]) == pytest.approx((finals[0] + finals[1]) / 2)
        assert float(row["final_test_acc_std"]) == pytest.approx(abs(finals[0] - finals[1]) / 2**0.5)
        assert float(row["best_test_acc_mean"]) == pytest.approx(statistics.mean(bests))
        assert float(row["best_test_acc_std"]) == pytest.approx(statistics.stdev(bests))
        assert float(row["mean_epoch_time_mean"]) == pytest.approx(statistics.mean(times))
        assert row["seeds"] == "2" and row["seed_list"] == "0 1"
    assert (rows["sgd"]["scope"], rows["sgd"]["rho"], rows["norm-sam-rho0.5"]["rho"]) == ("none", "", "0.5")

    # sharpness: latest measurement; mean ± std where measured, blank elsewhere
    sharp = {s: json.loads((root / "sweep" / f"scope=norm,rho=0.5/seed={s}" / "sharpness.json").read_text())
             ["measurements"][-1]["sharpness"] for s in (0, 1)}
    assert float(rows["norm-sam-rho0.5"]["sharpness_mean"]) == pytest.approx(statistics.mean(sharp.values()))
    assert float(rows["norm-sam-rho0.5"]["sharpness_std"]) == pytest.approx(statistics.stdev(sharp.values()))
    assert rows["sgd"]["sharpness_runs"] == "1" and rows["sgd"]["sharpness_std"] == ""
    assert rows["all-sam-rho0.5"]["sharpness_mean"] == ""

    # report.md: the same numbers, the figures by relative links, the runs, the commands
    text = (out / "report.md").read_text()
    finals = [sums[f"scope=norm,rho=0.5/seed={s}"]["final_test_acc"] for s in (0, 1)]
    cell = f"{statistics.mean(finals):.2f} ± {statistics.stdev(finals):.2f}"
    assert re.search(rf"\| norm-sam-rho0\.5 \| sgd \| norm \| sam \| 0\.5 \| {re.escape(cell)} \|", text)
    for name in FIGURES:
        assert f"]({name})" in text
    assert "unfinished (2/2 epochs)" in text
    assert text.count("| finished |") == 10
    assert f"normsam sweep {sweep_file}" in text
    assert "normsam sharpness RUN_DIR --rho 0.01 --steps 2 --m 32 --n 32" in text
    assert f"normsam report {root / 'sweep'} --out {out}" in text
    for link in re.findall(r"\]\(<([^>]+)>\)", text):  # run folders, relative to the report
        assert (out / link / "config.yaml").is_file()

    run_rows = read_csv(out / "runs.csv")
    assert len(run_rows) == 11
    assert [r["status"] for r in run_rows].count("unfinished") == 1


def test_one_rho_and_sgd_only(runs, tmp_path):
    root, _ = runs
    sweep = root / "sweep"
    one_rho = make_report([sweep / "scope=none", sweep / "scope=norm,rho=0.5"], out=tmp_path / "one")
    assert (tmp_path / "one" / "accuracy_vs_rho.png") in one_rho  # single points with error bars
    sgd_only = make_report([sweep / "scope=none/seed=1"], out=tmp_path / "sgd")
    names = {p.name for p in sgd_only}
    assert "accuracy_vs_rho.png" not in names and "sharpness_vs_accuracy.png" not in names
    assert {"norm_params.png", "training_curves.png"} <= names
    assert "| sgd | sgd | none | – | – |" in (tmp_path / "sgd" / "report.md").read_text()


def test_settings_that_differ_become_columns(runs):
    records = [r for r in find_runs([runs[0] / "sweep"]) if r.finished]
    changed = [dataclasses.replace(r, config=dataclasses.replace(r.config, model="resnet8")) for r in records[:4]]
    keys = grouping_keys(records + changed)
    assert keys == ["model", "optimizer", "scope", "perturbation", "rho"]
    labels = [g.label for g in group_runs(records + changed, keys)]
    assert len(labels) == len(set(labels)) and any("model=resnet8" in label for label in labels)
    # the SAM settings of SGD runs do not split groups or add columns
    assert grouping_keys(records) == ["optimizer", "scope", "perturbation", "rho"]


def test_cli_and_errors(runs, tmp_path, capsys):
    root, _ = runs
    assert main(["report", str(root / "sweep" / "scope=none"), "--out", str(tmp_path / "cli")]) == 0
    assert "report.md" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No run folders"):
        make_report([tmp_path / "empty"], out=tmp_path / "r")
