"""docs/results/headline.py: the README's headline tables, copied from a report's CSVs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from normsam.train import checkpoint as ckpt
from normsam.train.config import load_config, save_config

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("headline", ROOT / "docs" / "results" / "headline.py")
headline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(headline)

TINY = dict(data="synthetic", image_size=8, subset=80, val_split=0.25, batch_size=32, epochs=2, device="cpu",
            model="resnet8", progress=False)


def _fake(runs: Path, point: str, seed: int, acc: float, epoch_time: float, **settings) -> None:
    folder = runs / point / f"seed={seed}"
    folder.mkdir(parents=True)
    save_config(load_config(None, {**TINY, "seed": seed, **settings}), folder / ckpt.CONFIG)
    (folder / ckpt.METRICS_JSONL).write_text(json.dumps({"epoch": 1, "train_loss": 1.0, "test_acc": acc}) + "\n")
    (folder / ckpt.SUMMARY).write_text(json.dumps({"final_test_acc": acc, "best_test_acc": acc,
                                                   "mean_epoch_time": epoch_time, "final_flipped_acc": 100 - acc}))


@pytest.fixture
def report(tmp_path):
    from normsam.analysis.report import make_report

    runs = tmp_path / "runs"
    # fp32: SGD 80/81, SAM-ON +4 on each seed; bf16: SGD 77/76, SAM-ON +6/+7 over bf16 SGD
    for seed, (sgd, on, sgd16, on16) in enumerate([(80, 84, 77, 83), (81, 85, 76, 83)]):
        _fake(runs, "scope=none", seed, sgd, 2.0, scope="none")
        _fake(runs, "scope=norm,rho=0.5", seed, on, 3.0, scope="norm", rho=0.5)
        _fake(runs, "scope=random,rho=0.5", seed, sgd, 4.0, scope="random", rho=0.5, sparsity=0.99)
        _fake(runs, "scope=none,amp=bf16", seed, sgd16, 1.0, scope="none", amp="bf16")
        _fake(runs, "scope=norm,rho=0.5,amp=bf16", seed, on16, 2.0, scope="norm", rho=0.5, amp="bf16")
    make_report([runs], out=tmp_path / "report")
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"cpu": {"variants": [
        {"name": "SGD", "unavailable": None, "median_ratio_to_sgd": 1.0},
        {"name": "SAM-ON (cheap ascent)", "unavailable": None, "median_ratio_to_sgd": 1.66},
        {"name": "SAM-all", "unavailable": "not installed", "median_ratio_to_sgd": None}]}}))
    return tmp_path / "report", bench


def _row(table: str, *starts: str) -> list[str]:
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if all(cell.startswith(s) for cell, s in zip(cells, starts)):
            return cells
    raise AssertionError(f"no row starting {starts} in\n{table}")


def test_each_precision_is_paired_with_its_own_sgd_and_costs_come_from_the_benchmark(report):
    folder, bench = report
    table = headline.headline(str(folder), str(bench))
    fp32 = _row(table, "SAM-ON (ρ=0.5)", "fp32")
    bf16 = _row(table, "SAM-ON (ρ=0.5)", "bf16")
    assert fp32[5].startswith("+4.00") and bf16[5].startswith("+6.50")  # − SGD of the same precision
    assert fp32[7] == "15.5" and bf16[7] == "17.0"  # memorization: the mean of 100 − acc here
    assert fp32[8] == "1.66" and bf16[8] == "1.66"  # the benchmark's SAM-ON step
    assert fp32[9] == "3.0 (1.50)" and bf16[9] == "2.0 (2.00)"  # the study's own seconds, × its SGD's
    assert _row(table, "random mask (ρ=0.5, sparsity 0.99)", "fp32")[8] == "–"  # not a benchmarked step
    assert "memorization of the flipped labels (%) mean [95% CI]" in (folder / "report.md").read_text()
    # the precision table: SGD loses 4 points in bf16, SAM-ON 1.5, i.e. 2.5 more than SGD's shift
    precision = table.split("\n\n")[1]
    assert precision.startswith("| arm | precision | test acc. shift vs fp32")
    assert _row(precision, "SGD", "bf16")[2].startswith("-4.00")
    assert _row(precision, "SAM-ON (ρ=0.5)", "bf16")[3].startswith("+2.50")
    # claims: the one with its arms is a row, those without are listed as not tested
    assert _row(table, "C4", "fp32")[2] == "**supported**"
    assert "Not tested (no arm plays one of the claim's roles): C1 in bf16," in table
    assert "| C1" not in table


def test_without_a_benchmark_the_cost_column_is_left_out_and_a_missing_report_is_named(report, tmp_path):
    folder, _ = report
    assert "benchmark" not in headline.headline(str(folder)).splitlines()[0]
    with pytest.raises(ValueError, match="no arms.csv; give the folder that `normsam report` wrote"):
        headline.headline(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("point, variant", [
    ("scope=none,sharpness_at_end=true", "SGD"),
    ("scope=all,rho=0.4,amp=bf16,bf16_kernels=upcast", "SAM-all"),
    ("scope=norm,rho=2.4", "SAM-ON (cheap ascent)"),
    ("scope=norm,rho=2.4,ascent_interval=4", "SAM-ON, ascent_interval=4"),
    ("scope=norm,rho=0.3,ascent=momentum,bn_policy=update", "SAM-ON, ascent=momentum"),
    ("scope=norm,rho_warmup_epochs=6,rho=0.6,amp=bf16,bf16_kernels=upcast", "SAM-ON (cheap ascent)"),
    ("scope=norm,rho=2.4,sam_start=30", None),
    ("scope=ssam-f,rho=2.4,sparsity=0.99", None),
])
def test_arms_map_to_the_benchmark_step_they_take(point, variant):
    assert headline.bench_variant(point) == variant


def test_precision_contexts_are_named_in_words():
    assert headline.precision_name("amp=off, bf16_kernels=native") == "fp32"
    assert headline.precision_name("amp=bf16, bf16_kernels=upcast") == "bf16 (upcast kernels)"
    assert headline.precision_name("amp=bf16") == "bf16"
    assert headline.precision_name("amp=off, model=resnet8") == "amp=off, model=resnet8"  # not only precision
    from normsam.analysis.grouping import without_context

    assert without_context("SAM-all (asam, ρ=0.4, amp=off, bf16_kernels=native)",
                           "amp=off, bf16_kernels=native") == "SAM-all (asam, ρ=0.4)"
    assert without_context("SGD (amp=bf16, bf16_kernels=upcast)", "amp=bf16, bf16_kernels=upcast") == "SGD"
    assert without_context("SAM-ON (ρ=0.5, amp=bf16, model=resnet8)", "amp=bf16") == "SAM-ON (ρ=0.5, model=resnet8)"


def test_the_per_arm_figures_name_arms_without_their_panels_context(report, monkeypatch):
    from normsam.analysis import plots
    from normsam.analysis.report import make_report

    seen = {}
    for name in ("plot_estimates", "plot_interval_bands"):
        real = getattr(plots, name)

        def spy(panels, path, *args, _real=real, _name=name, **kwargs):
            seen[_name] = (panels, kwargs.get("colors"), kwargs.get("references"))
            return _real(panels, path, *args, **kwargs)

        monkeypatch.setattr(plots, name, spy)
    report_dir, _ = report
    make_report([report_dir.parent / "runs"], out=report_dir.parent / "again")
    panels, colors, references = seen["plot_estimates"]
    assert {title: sorted(arms) for title, arms in panels.items()} == {
        "final test accuracy per arm — amp=bf16": ["SAM-ON (ρ=0.5)", "SGD"],
        "final test accuracy per arm — amp=off": ["SAM-ON (ρ=0.5)", "SGD", "random mask (ρ=0.5, sparsity 0.99)"]}
    assert set(colors) >= {"SGD", "SAM-ON (ρ=0.5)", "random mask (ρ=0.5, sparsity 0.99)"}  # colours carried over
    assert references["final test accuracy per arm — amp=bf16"] == {"SGD mean": pytest.approx(76.5)}
    curves, colors, _ = seen["plot_interval_bands"]
    assert all("amp=" not in arm for arms in curves.values() for arm in arms) and set(colors) >= {"SGD"}
