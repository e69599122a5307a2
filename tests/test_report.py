"""normsam.analysis.report: tables (checked against the runs' summaries by hand), figures, report.md, CLI."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import shutil
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from normsam.analysis import plots, stats
from normsam.analysis.claims import analyse, claim_rows, load_claims_selection, paired_rows, statistics_markdown
from normsam.analysis.grouping import arm_label, group_runs, grouping_keys
from normsam.analysis.report import make_report
from normsam.analysis.runs import find_runs
from normsam.analysis.run_sharpness import measure_run_sharpness
from normsam.analysis.sweep import run_sweep
from normsam.cli import main
from normsam.train.config import load_config, save_config

TINY = dict(data="synthetic", image_size=8, subset=64, batch_size=32, eval_batch_size=256, epochs=2, threads=1,
            progress=False, device="cpu")
FIGURES = ("accuracy_vs_rho.png", "sharpness_vs_accuracy.png", "norm_params.png", "training_curves.png")
STAT_FILES = ("arms.csv", "paired.csv", "claims.csv", "arm_accuracy.png", "arm_sharpness_vs_accuracy.png",
              "arm_test_curves.png")


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
    assert [p.name for p in paths] == ["report.md", "table.csv", "runs.csv", *FIGURES, *STAT_FILES]
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
    assert list(rows) == ["SGD", "SAM-all (ρ=0.05)", "SAM-all (ρ=0.5)", "SAM-ON (ρ=0.05)", "SAM-ON (ρ=0.5)"]
    for method, prefix in [("SGD", "scope=none"), ("SAM-all (ρ=0.5)", "scope=all,rho=0.5"),
                           ("SAM-ON (ρ=0.05)", "scope=norm,rho=0.05")]:
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
    assert (rows["SGD"]["scope"], rows["SGD"]["rho"], rows["SAM-ON (ρ=0.5)"]["rho"]) == ("none", "", "0.5")

    # sharpness: latest measurement; mean ± std where measured, blank elsewhere
    sharp = {s: json.loads((root / "sweep" / f"scope=norm,rho=0.5/seed={s}" / "sharpness.json").read_text())
             ["measurements"][-1]["sharpness"] for s in (0, 1)}
    assert float(rows["SAM-ON (ρ=0.5)"]["sharpness_mean"]) == pytest.approx(statistics.mean(sharp.values()))
    assert float(rows["SAM-ON (ρ=0.5)"]["sharpness_std"]) == pytest.approx(statistics.stdev(sharp.values()))
    assert rows["SGD"]["sharpness_runs"] == "1" and rows["SGD"]["sharpness_std"] == ""
    assert rows["SAM-all (ρ=0.5)"]["sharpness_mean"] == ""

    # report.md: the same numbers, the figures by relative links, the runs, the commands
    text = (out / "report.md").read_text()
    finals = [sums[f"scope=norm,rho=0.5/seed={s}"]["final_test_acc"] for s in (0, 1)]
    cell = f"{statistics.mean(finals):.2f} ± {statistics.stdev(finals):.2f}"
    assert re.search(rf"\| SAM-ON \(ρ=0\.5\) \| sgd \| norm \| sam \| 0\.5 \| {re.escape(cell)} \|", text)
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
    assert "| SGD | sgd | none | – | – |" in (tmp_path / "sgd" / "report.md").read_text()


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


# --- the figures' rough edges (one epoch, one ρ, labels, lines under bands) -------------------------------


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the plot functions save, kept for inspection."""
    from normsam.analysis import plots

    saved = []
    real = plots._save

    def keep(fig, path):
        saved.append(fig)
        return real(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return saved


def _legend(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_one_epoch_curves_are_visible(figures, tmp_path):
    from normsam.analysis import plots

    plots.plot_curves({"sgd": [71.0], "norm-asam-rho1": [None, 72.0]}, tmp_path / "c.png", ylabel="acc")
    plots.plot_series_panels({"curves": {"sgd": ([1], [71.0], [0.3])}}, tmp_path / "b.png", xlabel="epoch",
                             ylabel="acc", style="band", integer_x=True)
    (curves,), (band,) = figures[0].axes, figures[1].axes
    for line in curves.get_lines() + band.get_lines():
        assert len(line.get_xdata()) == 1 and line.get_marker() == "o" and line.get_markersize() >= 6
    assert list(curves.get_lines()[1].get_xdata()) == [2]  # epoch 1 was not evaluated: skipped, not drawn at 1
    assert _legend(curves) == ["SGD", "SAM-ON (asam, ρ=1)"]


def test_single_rho_panel_ticks_at_that_rho(figures, tmp_path):
    from normsam.analysis import plots

    plots.plot_series_panels({"asam": {"SAM-ON": ([1.0], [72.0], [0.5]), "SAM-all": ([1.0], [71.0], [None])}},
                             tmp_path / "r.png", xlabel="ρ", ylabel="acc", baselines={"asam": {"sgd (no SAM)": 73.0}})
    (ax,) = figures[0].axes
    assert list(ax.get_xticks()) == [1.0] and [t.get_text() for t in ax.get_xticklabels()] == ["1"]
    assert "SGD (no SAM)" in _legend(ax)


def test_labels_agree_between_figures_and_medians_stay_visible(figures, tmp_path):
    from normsam.analysis import plots

    q = {"x": [0, 1, 2], **{k: [1.0, 0.9, 0.8] for k in ("0.05", "0.25", "0.5", "0.75", "0.95")}}
    labels = ["sgd", "all-asam-rho0.5", "norm-asam-rho1"]
    plots.plot_quantile_bands({"γ": {label: q for label in labels}}, tmp_path / "q.png")
    plots.plot_scatter({label: [(0.1, 70.0)] for label in labels}, tmp_path / "s.png", xlabel="x", ylabel="y")
    (bands,), (scatter,) = figures[0].axes, figures[1].axes
    names = ["SGD", "SAM-all (asam, ρ=0.5)", "SAM-ON (asam, ρ=1)"]
    assert _legend(bands) == names and _legend(scatter) == names
    lines = bands.get_lines()
    assert len({line.get_linestyle() for line in lines}) == 3  # equal medians stay distinguishable
    assert min(line.get_zorder() for line in lines) > max(c.get_zorder() for c in bands.collections)


# --- statistics and claims, on a sweep folder written by hand with chosen accuracies ---------------------

T2 = 4.302652729749464  # t(0.975, df=2): three seeds

#: point → (settings, final test acc., final val. acc., sharpness in summary.json) for seeds 0, 1, 2.
FAKE_ARMS = {
    "scope=none": ({"scope": "none"}, [80.0, 81.0, 82.0], [81.0, 82.0, 83.0], None),
    "scope=all,rho=0.1": ({"scope": "all", "rho": 0.1}, [82.0, 83.0, 85.0], [83.0, 84.0, 86.0], [0.20, 0.21, 0.25]),
    # better test accuracy, worse validation accuracy: must not be picked as SAM-all
    "scope=all,rho=0.5": ({"scope": "all", "rho": 0.5}, [83.0, 84.0, 85.0], [80.0, 80.0, 80.0], None),
    "scope=norm,rho=0.5": ({"scope": "norm", "rho": 0.5}, [82.4, 83.6, 85.5], [84.0, 85.0, 86.0], [0.10, 0.12, 0.11]),
    "scope=norm,rho=1.0": ({"scope": "norm", "rho": 1.0}, [84.0, 85.0, 86.0], [81.0, 81.0, 81.0], None),
    # a variant (SAM from the third epoch): never SAM-ON unless named, however good
    "scope=norm,rho=0.5,sam_start=2": ({"scope": "norm", "rho": 0.5, "sam_start": 2}, [90.0] * 3, [99.0] * 3, None),
    "scope=no-norm,rho=0.5": ({"scope": "no-norm", "rho": 0.5}, [83.0, 82.0, 85.5], [80.0] * 3, None),
    "scope=random,rho=0.5,sparsity=0.9995": ({"scope": "random", "rho": 0.5, "sparsity": 0.9995},
                                             [80.05, 80.95, 82.0], [80.0] * 3, None),
    # denser mask, better validation accuracy: not the one at SAM-ON's sparsity
    "scope=random,rho=0.5,sparsity=0.5": ({"scope": "random", "rho": 0.5, "sparsity": 0.5}, [83.0, 84.0, 85.0],
                                          [90.0] * 3, None),
}


def write_fake_run(folder, seed, test, val=None, sharpness=None, **settings):
    """A finished run folder without training: config.yaml, three epochs of metrics, summary.json."""
    folder.mkdir(parents=True)
    save_config(load_config(None, {**TINY, **settings, "seed": seed, "out": str(folder)}), folder / "config.yaml")
    rows = [{"epoch": e, "train_loss": 1.0 / e, "test_acc": test - (3 - e)} for e in (1, 2, 3)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"final_test_acc": test, "best_test_acc": test, "final_val_acc": val, "mean_epoch_time": 1.0}
    if sharpness is not None:
        summary["sharpness"] = sharpness
    (folder / "summary.json").write_text(json.dumps(summary))


def write_fake_sweep(root, arms=FAKE_ARMS, seeds=(0, 1, 2), **extra):
    for point, (settings, tests, vals, sharps) in arms.items():
        for i, seed in enumerate(seeds):
            write_fake_run(root / point / f"seed={seed}", seed, tests[i], vals[i] if vals else None,
                           sharps[i] if sharps else None, **settings, **extra)
    return root


@pytest.fixture(scope="module")
def fake_report(tmp_path_factory):
    sweep = write_fake_sweep(tmp_path_factory.mktemp("fake") / "sweep")
    (sweep / "claims.yaml").write_text("margin: 0.2\n")  # found next to the runs; arms chosen automatically
    out = sweep.parent / "report"
    paths = make_report([sweep], out=out)
    runs = find_runs([sweep])
    keys = grouping_keys(runs)
    return sweep, out, paths, (group_runs(runs, keys), keys)


def test_statistics_per_arm_and_paired_by_hand(fake_report):
    sweep, out, paths, _ = fake_report
    assert [p.name for p in paths][-6:] == list(STAT_FILES)
    for name in ("arm_accuracy.png", "arm_sharpness_vs_accuracy.png", "arm_test_curves.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and min(image.size) >= 400
            darkest, brightest = image.convert("L").getextrema()
            assert brightest - darkest > 100

    arms = {row["arm"]: row for row in read_csv(out / "arms.csv")}
    assert list(arms) == ["SGD", "SAM-all (ρ=0.1)", "SAM-all (ρ=0.5)", "SAM-ON (ρ=0.5)", "SAM-ON (ρ=1)",
                          "no-norm (ρ=0.5)", "SAM-ON (ρ=0.5, late from epoch 3)", "random mask (ρ=0.5, sparsity 0.5)",
                          "random mask (ρ=0.5, sparsity 0.9995)"]
    sgd = arms["SGD"]  # 80, 81, 82: mean 81, s = 1, half-width t(0.975, 2) / √3
    assert (sgd["final_test_acc_n"], float(sgd["final_test_acc_mean"]), float(sgd["final_test_acc_std"])) == (
        "3", 81.0, 1.0)
    assert float(sgd["final_test_acc_ci_low"]) == pytest.approx(81 - T2 / math.sqrt(3), rel=1e-7)
    assert float(sgd["final_test_acc_ci_high"]) == pytest.approx(81 + T2 / math.sqrt(3), rel=1e-7)
    assert float(sgd["final_val_acc_mean"]) == 82.0 and sgd["sharpness_n"] == "0" and sgd["sharpness_mean"] == ""
    on = arms["SAM-ON (ρ=0.5)"]  # sharpness 0.10, 0.12, 0.11: mean 0.11, s = 0.01
    assert float(on["sharpness_mean"]) == pytest.approx(0.11)
    assert float(on["sharpness_ci_high"]) == pytest.approx(0.11 + T2 * 0.01 / math.sqrt(3), rel=1e-6)
    assert (on["point"], on["roles"], on["seeds"]) == ("scope=norm,rho=0.5", "sam-on", "0 1 2")
    assert on["chosen_by"] == "best mean validation accuracy (85.00) of 2 arms"

    paired = {(r["arm"], r["reference_role"], r["metric"]): r for r in read_csv(out / "paired.csv")}
    row = paired[("SAM-ON (ρ=0.5)", "sgd", "final_test_acc")]  # differences 2.4, 2.6, 3.5
    mean = (2.4 + 2.6 + 3.5) / 3
    std = math.sqrt(((2.4 - mean) ** 2 + (2.6 - mean) ** 2 + (3.5 - mean) ** 2) / 2)
    assert (row["reference"], row["seeds"], row["diff_n"]) == ("SGD", "0 1 2", "3")
    assert float(row["diff_mean"]) == pytest.approx(mean) and float(row["diff_std"]) == pytest.approx(std)
    assert float(row["diff_ci_low"]) == pytest.approx(mean - T2 * std / math.sqrt(3), rel=1e-6)
    row = paired[("SAM-ON (ρ=0.5)", "sam-all", "sharpness")]  # against SAM-all ρ=0.1: −0.10, −0.09, −0.14
    assert (row["reference"], float(row["diff_mean"])) == ("SAM-all (ρ=0.1)", pytest.approx(-0.11))
    assert ("SGD", "sgd", "final_test_acc") not in paired


def test_claims_verdicts(fake_report):
    sweep, out, _, _ = fake_report
    rows = read_csv(out / "claims.csv")
    assert {r["claim"]: r["claim_verdict"] for r in rows} == {
        "C1": "supported", "C2": "contradicted", "C3": "inconclusive", "C4": "supported", "C5": "not tested"}
    parts = {(r["claim"], r["test"]): r for r in rows}
    c1 = parts[("C1", "test acc.: SAM-ON ≥ SAM-all")]  # 0.4, 0.6, 0.5: [0.252, 0.748] lies above −δ
    assert (c1["arm_a"], c1["arm_b"], c1["relation"], c1["margin"]) == (
        "SAM-ON (ρ=0.5)", "SAM-all (ρ=0.1)", ">=", "0.2")
    assert float(c1["diff_ci_low"]) == pytest.approx(0.5 - T2 * 0.1 / math.sqrt(3), rel=1e-6)
    assert parts[("C1", "test acc.: SAM-all > SGD")]["verdict"] == "supported"  # 2, 2, 3
    sharp = parts[("C2", "sharpness: SAM-ON > SAM-all")]  # SAM-ON is flatter here: the whole interval is below 0
    assert sharp["verdict"] == "contradicted" and float(sharp["diff_ci_high"]) < 0
    assert parts[("C2", "test acc.: SAM-ON ≥ SAM-all")]["verdict"] == "supported"
    c3 = parts[("C3", "test acc.: no-norm ≤ SAM-all")]
    assert c3["verdict"] == "inconclusive"  # 1, −1, 0.5: wide
    # its mean 0.17 lies 0.03 from δ = 0.2 with a paired std of 1.04: thousands of seeds, i.e. undecidable here
    needed = stats.seeds_to_decide(stats.describe([1.0, -1.0, 0.5]), "<=", 0.2)
    assert int(c3["seeds_needed"]) == needed and needed > 1000
    assert c1["seeds_needed"] == ""  # decided parts need none
    c4 = parts[("C4", "test acc.: random mask ≈ SGD")]  # 0.05, −0.05, 0: [−0.124, 0.124] within ±0.2
    assert c4["arm_a"] == "random mask (ρ=0.5, sparsity 0.9995)" and c4["verdict"] == "supported"
    c5 = parts[("C5", "test acc.: SAM-ON > SSAM-F")]
    assert (c5["verdict"], c5["note"], c5["arm_b"]) == ("not tested", "no SSAM-F arm", "")

    text = (out / "report.md").read_text()
    assert text.index("## Results") < text.index("## Statistics") < text.index("## Claims") < text.index("## Runs")
    assert "| SAM-ON (ρ=0.5) | SAM-ON | 3 | 83.83 ± 1.56 | [79.95, 87.72] |" in text
    assert "| **C2** |" in text and "| **contradicted** |" in text and "| not tested |  | no SSAM-F arm |" in text
    assert "| SAM-all | SAM-all (ρ=0.1) | best mean validation accuracy (84.33) of 2 arms |" in text
    assert f"δ = 0.2 test-accuracy points (from {sweep / 'claims.yaml'})" in text
    for name in STAT_FILES:
        assert f"]({name})" in text


def test_claims_with_named_arms_and_margin(fake_report):
    _, _, _, (groups, keys) = fake_report
    selection = load_claims_selection({"arms": {"sam-all": "scope=all,rho=0.5", "sam-on": ["SAM-ON (ρ=1)"]},
                                       "margin": 0.0})
    (ctx,) = analyse(groups, keys, selection)
    assert ctx.roles["sam-all"].group.label == "SAM-all (ρ=0.5)"
    assert ctx.roles["sam-on"].how == "named in the claims selection"
    rows = {(r["claim"], r["test"]): r for r in claim_rows([ctx])}
    c4 = rows[("C4", "test acc.: random mask ≈ SGD")]  # within ±0.124, not within ±0: inconclusive
    assert (c4["margin"], c4["verdict"]) == (0.0, "inconclusive")
    c2 = rows[("C2", "sharpness: SAM-ON > SAM-all")]
    assert (c2["verdict"], c2["note"]) == ("not tested", "no sharpness for SAM-ON (ρ=1) (`normsam sharpness RUN_DIR` "
                                                         "or sharpness_at_end=true)")
    # a variant plays a role only when named
    (ctx,) = analyse(groups, keys, load_claims_selection({"arms": {"sam-on": "scope=norm,rho=0.5,sam_start=2"}}))
    assert ctx.roles["sam-on"].group.label == "SAM-ON (ρ=0.5, late from epoch 3)"


def test_claims_again_with_other_arms_under_also(fake_report):
    """also: evaluates the claims a role is in again with the named arm, beside the main rows."""
    _, _, _, (groups, keys) = fake_report
    selection = load_claims_selection({"also": {"ρ one": {"sam-on": "scope=norm,rho=1.0"}}})
    (ctx,) = analyse(groups, keys, selection)
    assert ctx.roles["sam-on"].group.label == "SAM-ON (ρ=0.5)"  # the main evaluation is unchanged
    assert ctx.also["ρ one"]["sam-on"].group.label == "SAM-ON (ρ=1)"
    rows = claim_rows([ctx])
    verdicts = {r["claim"]: r["claim_verdict"] for r in rows}
    # C3 and C4 have no SAM-ON part, so they are not repeated; no arm is SSAM-F, so C5 (not tested) is not either
    assert list(verdicts) == ["C1", "C2", "C3", "C4", "C5", "C1 (ρ one)", "C2 (ρ one)"]
    parts = {(r["claim"], r["test"]): r for r in rows}
    c1 = parts[("C1 (ρ one)", "test acc.: SAM-ON ≥ SAM-all")]  # 84−82, 85−83, 86−85
    assert (c1["arm_a"], c1["arm_b"], float(c1["diff_mean"])) == ("SAM-ON (ρ=1)", "SAM-all (ρ=0.1)",
                                                                   pytest.approx(5 / 3))
    assert parts[("C1 (ρ one)", "test acc.: SAM-all > SGD")]["verdict"] == "supported"  # the main SAM-all
    assert parts[("C2 (ρ one)", "sharpness: SAM-ON > SAM-all")]["note"].startswith("no sharpness for SAM-ON (ρ=1)")
    assert parts[("C2", "sharpness: SAM-ON > SAM-all")]["verdict"] == "contradicted"  # the main row as before

    paired = {(r["arm"], r["reference_role"], r["metric"]): r for r in paired_rows([ctx])}
    row = paired[("SAM-ON (ρ=1)", "sam-on", "final_test_acc")]  # against SAM-ON ρ=0.5: 1.6, 1.4, 0.5
    assert float(row["diff_mean"]) == pytest.approx(3.5 / 3)
    text = statistics_markdown([ctx], selection.margin, [], None)
    assert "| SAM-ON (ρ one) | SAM-ON (ρ=1) | named under also: ρ one in the claims selection |" in text
    assert "− SAM-ON (ρ=0.5): mean [95% CI]" in text and "| **C1 (ρ one)** |" in text


@pytest.mark.parametrize(
    "selection, message",
    [
        ({"also": {"x": {"sam-one": "scope=norm,rho=0.5"}}}, "Unknown role 'sam-one' in also: x in the claims"),
        ({"also": {"x": {"sam-on": "scope=norm,rho=7"}}}, "no arm 'scope=norm,rho=7' for sam-on"),
        ({"also": {"x": {"sam-on": "scope=all,rho=0.1"}}}, "cannot be sam-on, whose scope is norm"),
        ({"also": {"x": {}}}, "also: x in the claims selection names no arm"),
        ({"also": ["scope=norm,rho=1.0"]}, "also in the claims selection must map labels to roles and arms"),
        ({"also": {"x": "scope=norm,rho=1.0"}}, "also: x in the claims selection must map roles to arms"),
        ({"also": {"x": {"sam-on": ["scope=norm,rho=0.5", "scope=norm,rho=1.0"]}}},
         "names several sam-on arms of one context under also: x"),
    ],
)
def test_claims_also_errors(fake_report, selection, message):
    _, _, _, (groups, keys) = fake_report
    with pytest.raises(ValueError, match=message):
        analyse(groups, keys, load_claims_selection(selection))


@pytest.mark.parametrize(
    "selection, message",
    [
        ({"arms": {"sam-one": "scope=norm,rho=0.5"}}, "Unknown role 'sam-one'.*valid roles are sgd, sam-all"),
        ({"arms": {"sam-on": "scope=norm,rho=7"}}, "no arm 'scope=norm,rho=7' for sam-on; use a sweep point"),
        ({"arms": {"sam-on": "scope=all,rho=0.1"}}, "cannot be sam-on, whose scope is norm"),
        ({"arms": {"sam-on": ["scope=norm,rho=0.5", "scope=norm,rho=1.0"]}}, "names several sam-on arms"),
        ({"margin": -1}, "margin in the claims selection must be a number >= 0"),
        ({"arm": {}}, "Unknown key 'arm'.*valid keys are arms, margin and also"),
    ],
)
def test_claims_selection_errors(fake_report, selection, message):
    _, _, _, (groups, keys) = fake_report
    with pytest.raises(ValueError, match=message):
        analyse(groups, keys, load_claims_selection(selection))


def test_one_seed_is_inconclusive_and_no_validation_is_said(fake_report, tmp_path):
    sweep, _, _, _ = fake_report
    runs = find_runs([sweep / "scope=none" / "seed=0", sweep / "scope=all,rho=0.1" / "seed=0"])
    keys = grouping_keys(runs)
    (ctx,) = analyse(group_runs(runs, keys), keys, load_claims_selection(None))
    c1 = {r["test"]: r for r in claim_rows([ctx]) if r["claim"] == "C1"}
    assert c1["test acc.: SAM-all > SGD"]["verdict"] == "inconclusive"
    assert c1["test acc.: SAM-all > SGD"]["note"] == "one common seed: no interval"
    assert c1["test acc.: SAM-ON ≥ SAM-all"]["verdict"] == "not tested"

    no_val = {point: (settings, tests, None, None) for point, (settings, tests, _, _) in FAKE_ARMS.items()
              if point.startswith("scope=all")}
    runs = find_runs([write_fake_sweep(tmp_path / "no-val", no_val)])
    keys = grouping_keys(runs)
    (ctx,) = analyse(group_runs(runs, keys), keys, load_claims_selection(None))
    assert ctx.roles["sam-all"].group.label == "SAM-all (ρ=0.5)"
    assert ctx.roles["sam-all"].how.startswith("best mean TEST accuracy of 2 arms, because some have no validation")


def test_claims_per_context(tmp_path):
    arms = {point: FAKE_ARMS[point] for point in ("scope=none", "scope=all,rho=0.1")}
    write_fake_sweep(tmp_path / "lr=0.1", arms, lr=0.1)
    write_fake_sweep(tmp_path / "lr=0.05", arms, seeds=(3, 4, 5), lr=0.05)
    runs = find_runs([tmp_path])
    keys = grouping_keys(runs)
    contexts = analyse(group_runs(runs, keys), keys, load_claims_selection(None))
    assert sorted(ctx.title for ctx in contexts) == ["lr=0.05", "lr=0.1"]
    for ctx in contexts:  # each context compares its own arms (seeds 3–5 pair with nothing at lr=0.1)
        assert ctx.roles["sgd"].group.label == f"SGD (lr={ctx.title[3:]})"
        c1 = {r["test"]: r for r in claim_rows([ctx])}["test acc.: SAM-all > SGD"]
        assert (c1["verdict"], c1["diff_n"]) == ("supported", 3)


def test_arm_labels():
    assert arm_label({"scope": "none", "optimizer": "sgd"}) == "SGD"
    # a ρ warm-up sets an arm apart from its constant-ρ twin at the same ρ, and "0" (none) is not shown
    keys = ["rho_warmup_epochs", "amp"]
    assert arm_label({"scope": "all", "perturbation": "asam", "rho": 0.4, "rho_warmup_epochs": 6.0,
                      "amp": "bf16"}, keys) == "SAM-all (asam, ρ=0.4, ρ warm-up 6 ep., amp=bf16)"
    assert arm_label({"scope": "all", "perturbation": "asam", "rho": 0.4, "rho_warmup_epochs": 0.0}, keys) == (
        "SAM-all (asam, ρ=0.4)")
    assert plots.method_label("all-asam-rho0.4-rhowarmup0.5 (amp=bf16)") == (
        "SAM-all (asam, ρ=0.4, ρ warm-up 0.5 ep., amp=bf16)")
    assert arm_label({"scope": "none", "optimizer": "adamw", "rho": 0.5}) == "AdamW"
    assert arm_label({"scope": "norm", "optimizer": "lion", "perturbation": "asam", "rho": 2.0}) == (
        "Lion SAM-ON (asam, ρ=2)")
    assert arm_label({"scope": "ssam-f", "rho": 0.5, "sparsity": 0.5}) == "SSAM-F (ρ=0.5, sparsity 0.5)"
    assert arm_label({"scope": "norm", "rho": 0.5, "sam_start": 0, "sam_end": 4}) == (
        "SAM-ON (ρ=0.5, early until epoch 4)")
    assert arm_label({"scope": "norm", "rho": 0.5, "sam_start": 2, "sam_end": 4, "ascent_interval": 5},
                     ["sam_start", "model"]) == "SAM-ON (ρ=0.5, SAM in epochs 3–4, ascent every 5)"
    assert arm_label({"scope": "all", "rho": 0.5, "ascent_interval": 1, "model": "resnet8"}, ["model"]) == (
        "SAM-all (ρ=0.5, model=resnet8)")
    # the figures' own naming of raw method labels agrees with it
    assert arm_label({"scope": "norm", "perturbation": "asam", "rho": 1.0}) == plots.method_label("norm-asam-rho1")
    assert arm_label({"scope": ["*.bn*"], "rho": 0.5}, rho=False) == "[*.bn*]"


def test_statistics_figures_with_and_without_intervals(figures, tmp_path):
    one_seed, three_seeds = (84.0, None, None), (83.0, 82.0, 84.5)
    plots.plot_estimates({"acc": {"SGD": three_seeds, "SAM-ON (ρ=0.5)": one_seed}}, tmp_path / "e.png",
                         xlabel="acc", references={"acc": {"SGD mean": 83.0}})
    plots.plot_estimate_scatter({"SAM-ON (ρ=0.5)": ((0.1, 0.05, 0.15), one_seed)}, tmp_path / "s.png",
                                xlabel="sharpness", ylabel="acc")
    plots.plot_interval_bands({"acc": {"SGD": ([1, 2], [80.0, 81.0], [79.0, None], [81.0, None])}},
                              tmp_path / "b.png", ylabel="acc")
    estimates, scatter, bands = (fig.axes[0] for fig in figures)
    assert [t.get_text() for t in estimates.get_yticklabels()] == ["SGD", "SAM-ON (ρ=0.5)"]  # first on top
    assert estimates.get_ylim() == (1.5, -0.5)
    assert set(_legend(estimates)) == {"SGD mean", "mean, 95% CI over seeds", "one seed (no interval)"}
    assert _legend(scatter) == ["SAM-ON (ρ=0.5)"]
    (band,) = bands.collections  # the band covers the epoch with an interval only
    assert band.get_paths()[0].vertices[:, 0].min() == 1.0 and band.get_paths()[0].vertices[:, 0].max() == 1.0
    assert all((tmp_path / name).is_file() for name in ("e.png", "s.png", "b.png"))


def test_the_guides_claims_example_loads():
    """docs/guide/reports.md's claims.yaml example is a valid selection with the meaning the guide gives it."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "guide" / "reports.md").read_text()
    section = page[page.index("## Which arm plays each role"):]
    block = section[section.index("```yaml\n") + len("```yaml\n"):section.index("```\n", section.index("```yaml"))]
    selection = load_claims_selection(yaml.safe_load(block))
    assert selection.arms == {"sam-on": ["scope=norm,rho=2.4,sharpness_at_end=true"],
                              "sam-all": ["scope=all,rho=0.4,sharpness_at_end=true"]}
    assert selection.also["with the ρ warm-up"]["sam-on"] == [
        "scope=norm,rho_warmup_epochs=6,rho=0.6,sharpness_at_end=true"]
    assert selection.margin == 0.2
