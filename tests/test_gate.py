"""The regime gate of ``normsam study`` (SGD alone, clean vs noisy labels), memorization metrics, and the
pilot's ρ-grid extension at an edge; tiny synthetic settings."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from normsam.analysis import stats
from normsam.analysis.gate import RegimeGateNotMet, check_gate_spec, evaluate_gate
from normsam.analysis.study import edge_extensions, load_study, run_study
from normsam.train import checkpoint as ckpt
from normsam.train.config import load_config, save_config
from normsam.train.loop import Trainer

TINY = dict(data="synthetic", image_size=8, subset=80, val_split=0.25, batch_size=32, eval_batch_size=256,
            epochs=2, threads=1, progress=False, device="cpu", model="resnet8", norm_stats=False, label_noise=0.4,
            label_smoothing=0.0)


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# --- memorization: the flipped training examples -------------------------------------------------------


def test_the_runner_scores_the_flipped_training_examples_without_changing_the_training(tmp_path):
    trainer = Trainer(load_config(None, {**TINY, "scope": "none", "out": str(tmp_path / "a")}))
    summary = trainer.run()
    rows = ckpt.read_jsonl(tmp_path / "a" / ckpt.METRICS_JSONL)
    data = trainer.data
    flipped = data.noisy_indices
    assert len(flipped) == round(0.4 * len(data.train))
    # by hand: the final model on the flipped images, against the flipped and the true labels
    trainer.model.eval()
    with torch.no_grad():
        from normsam.train.data import make_augment

        logits = trainer.model(make_augment("none", data)(data.train.images[flipped]))
    predicted = logits.argmax(1)
    by_hand = 100.0 * float((predicted == data.train.labels[flipped]).float().mean())
    by_hand_clean = 100.0 * float((predicted == data.clean_labels[flipped]).float().mean())
    assert rows[-1]["flipped_acc"] == pytest.approx(by_hand) == summary["final_flipped_acc"]
    assert rows[-1]["flipped_clean_acc"] == pytest.approx(by_hand_clean) == summary["final_flipped_clean_acc"]
    assert (data.train.labels[flipped] != data.clean_labels[flipped]).all()

    Trainer(load_config(None, {**TINY, "scope": "none", "memorization": False, "out": str(tmp_path / "b")})).run()
    other = ckpt.read_jsonl(tmp_path / "b" / ckpt.METRICS_JSONL)
    assert [r["train_loss"] for r in other] == [r["train_loss"] for r in rows]  # scoring them changes nothing
    assert "flipped_acc" not in other[-1]


# --- the gate's figures --------------------------------------------------------------------------------


def _fake_sgd(folder, seed, noise, final, best, flipped, flipped_clean, train_acc=90.0):
    folder.mkdir(parents=True)
    save_config(load_config(None, {**TINY, "scope": "none", "seed": seed, "label_noise": noise}), folder / ckpt.CONFIG)
    (folder / ckpt.SUMMARY).write_text(json.dumps({
        "final_test_acc": final, "best_test_acc": best, "best_epoch": 3, "final_flipped_acc": flipped if noise else None,
        "final_flipped_clean_acc": flipped_clean if noise else None}))
    (folder / ckpt.METRICS_JSONL).write_text(json.dumps({"epoch": 1, "train_acc": train_acc, "test_acc": final}) + "\n")


def test_gate_figures_by_hand(tmp_path):
    gate = tmp_path / "gate"
    _fake_sgd(gate / "n0", 0, 0.4, final=70.0, best=76.0, flipped=80.0, flipped_clean=10.0, train_acc=85.0)
    _fake_sgd(gate / "n1", 1, 0.4, final=72.0, best=75.0, flipped=60.0, flipped_clean=20.0, train_acc=75.0)
    _fake_sgd(gate / "c0", 0, 0.0, final=80.0, best=80.5, flipped=0, flipped_clean=0)
    _fake_sgd(gate / "c1", 1, 0.0, final=79.0, best=79.0, flipped=0, flipped_clean=0)
    _fake_sgd(gate / "c2", 2, 0.0, final=99.0, best=99.0, flipped=0, flipped_clean=0)  # no noisy twin: unpaired
    result = evaluate_gate(gate, margin=5.0, noisy_label_noise=0.4)
    assert result.seeds == [0, 1]
    assert result.noise_cost == stats.describe([10.0, 7.0]) and result.passed  # mean 8.5 ≥ 5
    assert result.memorized.mean == 70.0 and result.flipped_true.mean == 15.0
    assert result.peak_minus_final == stats.describe([6.0, 3.0])
    assert result.noisy_train.mean == 80.0
    assert not evaluate_gate(gate, margin=9.0, noisy_label_noise=0.4).passed
    with pytest.raises(ValueError, match="No seed with both a clean and a noisy"):
        evaluate_gate(gate / "n0", margin=5.0, noisy_label_noise=0.4)


def test_gate_spec_errors_name_the_fix():
    assert check_gate_spec({}, 0.4) == {"seeds": [200, 201], "margin": 5.0, "clean": {"label_noise": 0.0}}
    with pytest.raises(ValueError, match="Unknown key 'seed' in gate:"):
        check_gate_spec({"seed": [1]}, 0.4)
    assert check_gate_spec({"eval_every": 5}, 0.4)["eval_every"] == 5
    with pytest.raises(ValueError, match="eval_every must be an int >= 1"):
        check_gate_spec({"eval_every": 0}, 0.4)
    with pytest.raises(ValueError, match="margin must be a number >= 0"):
        check_gate_spec({"margin": -1}, 0.4)
    with pytest.raises(ValueError, match="recipe has label_noise = 0"):
        check_gate_spec({"clean": {"label_noise": 0.2}}, 0.0)
    with pytest.raises(ValueError, match="clean must change label_noise"):
        check_gate_spec({"clean": {"label_noise": 0.4}}, 0.4)
    with pytest.raises(ValueError, match=r"pilot's seeds \[1\] are also reported runs' seeds"):
        load_study({"out": "x", "pilot": {"grid": {"rho": [1]}, "seeds": [1, 9]}, "phases": [{"grid": {}, "seeds": [0, 1]}]})
    with pytest.raises(ValueError, match="Unknown key 'extend' in pilot:"):
        load_study({"out": "x", "pilot": {"grid": {"rho": [1]}, "extend": 2}, "phases": [{"grid": {}}]})


# --- the study: gate first, then the pilot with its edge extension ------------------------------------


def _study(tmp_path, margin, max_extensions=1):
    study = {
        "base": dict(TINY),
        "out": str(tmp_path / "study"),
        "workers": 1,
        "gate": {"seeds": [11], "margin": margin},
        "pilot": {"seeds": [7], "grid": [{"scope": ["norm"], "rho": [0.05, 0.5]}], "max_extensions": max_extensions},
        "phases": [{"name": "main", "seeds": [0], "grid": [{"scope": ["none"]}, {"scope": ["norm"], "rho": ["@rho:norm"]}]}],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path, tmp_path / "study"


def test_a_gate_not_met_stops_the_study_before_the_pilot(tmp_path, capsys):
    path, out = _study(tmp_path, margin=101)
    with pytest.raises(RegimeGateNotMet, match=r"Regime gate not met: label_noise=0.4 costs SGD .* less than the "
                                                r"gate's margin of 101\. .*The reported runs were not started"):
        run_study(path)
    assert not (out / "pilot").exists() and not (out / "main").exists()
    gate = json.loads((out / "gate.json").read_text())
    assert gate["passed"] is False and gate["seeds"] == [11] and "noise_cost" in gate
    assert (out / "gate.md").read_text().startswith("# Regime gate (SGD only)")
    assert "gate: noise cost" in capsys.readouterr().out
    record = json.loads((out / "study.json").read_text())
    assert set(record["phases"]) == {"gate"} and record["phases"]["gate"]["wall_clock_s"] > 0
    assert sorted(p.name for p in (out / "gate").iterdir() if p.is_dir()) == [
        "scope=none,label_noise=0.0", "scope=none,label_noise=0.4"]
    # through the CLI (the gate's runs are finished now, so this only decides again): the figures, then the stop
    from normsam.cli import main

    assert main(["study", str(path)]) == 2
    captured = capsys.readouterr()
    assert "gate: noise cost" in captured.out and "gate: memorized" in captured.out
    assert "normsam study: error: Regime gate not met" in captured.err and not (out / "pilot").exists()


def _smallest_rho_best(monkeypatch):
    """These tiny pilot runs train nothing, so every ρ ties at 10% (and a tie is never extended,
    tests/test_stale_results.py); make the smallest ρ the strict best, as a pilot that trains would."""
    from normsam.analysis import study as study_module

    real = study_module.choose_rho

    def choose_rho(*args, **kwargs):
        choice = real(*args, **kwargs)
        for entry in choice.values():
            smallest = min(entry["candidates"], key=float)
            entry["candidates"][smallest] = [v + 1.0 for v in entry["candidates"][smallest]]
            entry["rho"] = float(smallest)
            entry.pop("tied", None)
        return choice

    monkeypatch.setattr(study_module, "choose_rho", choose_rho)


def test_a_gate_met_runs_the_pilot_extends_an_edge_and_reports_the_gate(tmp_path, monkeypatch):
    path, out = _study(tmp_path, margin=0)
    _smallest_rho_best(monkeypatch)
    run_study(path)
    choice = json.loads((out / "choice.json").read_text())
    candidates = choice["choice"]["norm"]["candidates"]
    assert len(candidates) == 3 and len(choice["extended"]) == 1  # one step out from the chosen edge
    added = choice["extended"][0]["rho"][0]
    assert added in (0.005, 5.0)
    report = (out / "report" / "report.md").read_text()
    assert report.index("## Regime gate (SGD only)") < report.index("## Where each arm's ρ comes from") < (
        report.index("## Results"))
    assert f"| main | scope=norm | {choice['values']['@rho:norm']} | tuned for this arm |" in report
    assert (out / "report" / "gate_curves.png").is_file()
    record = json.loads((out / "study.json").read_text())
    assert set(record["phases"]) == {"gate", "pilot", "main"}
    # A later sitting finds every pilot run finished, so the choice needs no extension; the record still keeps
    # the value the first sitting added, and the pilot's sweep file still lists its runs.
    run_study(path, report=False)
    assert json.loads((out / "choice.json").read_text())["extended"] == choice["extended"]
    pilot_sweep = yaml.safe_load((out / "sweeps" / "pilot.yaml").read_text())
    assert choice["extended"][0] in pilot_sweep["grid"]
    assert json.loads((out / "study.json").read_text())["phases"]["pilot"]["counts"]["skipped"] == 3


def test_edge_extensions_step_outwards_at_the_grids_ratio():
    grid = [{"scope": ["all", "norm"], "rho": [0.1, 0.2, 0.4]}, {"scope": ["norm"], "ascent": ["momentum"],
                                                                "bn_policy": ["update"], "rho": [1.0, 3.0]}]
    def choice(rho, values):  # the chosen ρ strictly best (a tie is never extended: tests/test_stale_results.py)
        return {"rho": rho, "candidates": {str(v): [60.0 if v == rho else 50.0] for v in values}}
    more = edge_extensions({"all": choice(0.4, [0.1, 0.2, 0.4]), "norm": choice(0.2, [0.1, 0.2, 0.4]),
                            "norm/momentum": choice(1.0, [1.0, 3.0])}, grid, grid, 3)
    assert more == [{"scope": ["all"], "rho": [0.8]},
                    {"scope": ["norm"], "ascent": ["momentum"], "bn_policy": ["update"], "rho": [0.3333]}]
    grown = grid + more  # at the limit (1 added), no more
    assert edge_extensions({"all": choice(0.8, [0.1, 0.2, 0.4, 0.8])}, grown, grid, 1) == []


def test_the_regime_study_files_are_valid_sweeps():
    """configs/study/regime.yaml: every phase, with its placeholders filled, is a valid sweep of the recipe."""
    from pathlib import Path

    from normsam.analysis.study import _placeholders, resolve_grid
    from normsam.analysis.sweep import load_sweep

    root = Path(__file__).resolve().parents[1]
    spec = load_study(root / "configs/study/regime.yaml")
    recipe = load_config(str(root / spec["preset"]), {})
    assert (recipe.epochs, recipe.batch_size, recipe.label_noise, recipe.label_smoothing) == (60, 128, 0.4, 0.0)
    assert round(recipe.subset * (1 - recipe.val_split)) == 1000
    check_gate_spec(spec["gate"], recipe.label_noise)
    used = {"gate": set(spec["gate"]["seeds"]), "pilot": set(spec["pilot"]["seeds"])}
    reported = set().union(*(set(p["seeds"]) for p in spec["phases"]))
    assert not (used["gate"] | used["pilot"]) & reported and len(spec["pilot"]["seeds"]) >= 2
    names = set().union(*(_placeholders(p["grid"]) for p in spec["phases"]))
    assert names == {"@rho:all", "@rho:norm", "@rho:norm/momentum", "@sparsity:norm"}
    values = {name: 0.5 for name in names}
    for phase in [{"name": "pilot", **spec["pilot"]}, *spec["phases"]]:
        sweep = {"preset": str(root / spec["preset"]), "out": "unused", "seeds": phase["seeds"],
                 "grid": resolve_grid(phase["grid"], values)}
        load_sweep(sweep)  # raises on an unknown key or a setting the runner refuses


@pytest.mark.parametrize("kernels", ["native", "upcast"])
def test_the_report_shows_what_bf16_costs_each_arm_and_whether_sam_changes_it(tmp_path, kernels):
    from normsam.analysis.report import make_report

    def fake(point, seed, scope, amp, acc):
        folder = tmp_path / "runs" / point / f"seed={seed}"
        folder.mkdir(parents=True)
        cfg = load_config(None, {**TINY, "scope": scope, "amp": amp, "seed": seed, "rho": 0.5,
                                 **({"bf16_kernels": kernels} if amp == "bf16" else {})})
        save_config(cfg, folder / ckpt.CONFIG)
        (folder / ckpt.METRICS_JSONL).write_text(json.dumps({"epoch": 1, "train_loss": 1.0, "test_acc": acc}) + "\n")
        (folder / ckpt.SUMMARY).write_text(json.dumps({"final_test_acc": acc, "best_test_acc": acc}))

    # SGD loses 3 and 5 points in bf16; SAM-ON loses 1 and 2: SAM-ON's shift minus SGD's is +2, +3
    for seed, (sgd, sgd_bf16, on, on_bf16) in enumerate([(80, 77, 84, 83), (81, 76, 85, 83)]):
        fake("sgd", seed, "none", "off", sgd)
        fake("sgd-bf16", seed, "none", "bf16", sgd_bf16)
        fake("on", seed, "norm", "off", on)
        fake("on-bf16", seed, "norm", "bf16", on_bf16)
    make_report([tmp_path / "runs"], out=tmp_path / "report")
    import csv

    rows = {(r["arm"], r["precision"]): r for r in csv.DictReader(open(tmp_path / "report" / "precision.csv"))}
    sgd = next(r for (arm, _), r in rows.items() if arm.startswith("SGD"))
    on = next(r for (arm, _), r in rows.items() if arm.startswith("SAM-ON"))
    assert float(sgd["shift_mean"]) == -4.0 and sgd["vs_sgd_mean"] == ""
    assert float(on["shift_mean"]) == -1.5 and float(on["vs_sgd_mean"]) == 2.5 and on["vs_sgd_n"] == "2"
    # bf16 on the upcast kernels is paired with fp32 like native bf16, and labelled as such
    assert {p for _, p in rows} == {"bf16" if kernels == "native" else "bf16 (bf16_kernels=upcast)"}
    assert "## Precision" in (tmp_path / "report" / "report.md").read_text()


def test_the_regime_study_says_which_arms_run_at_the_rho_of_sam_on():
    from pathlib import Path

    from normsam.analysis.study import rho_provenance_markdown

    spec = load_study(Path(__file__).resolve().parents[1] / "configs/study/regime.yaml")
    values = {"@rho:all": 0.2, "@rho:norm": 0.3, "@rho:norm/momentum": 1.0, "@sparsity:norm": 0.99}
    rows = {line.split(" | ")[1]: line for line in rho_provenance_markdown(spec, values).splitlines()
            if line.startswith("| main") or line.startswith("| extra") or line.startswith("| bf16")}
    assert rows["scope=all, sharpness_at_end=True"].endswith("| 0.2 | tuned for this arm |")
    assert rows["scope=random, sparsity=@sparsity:norm"].endswith("| 0.3 | ρ of SAM-ON, not tuned for this arm |")
    assert rows["scope=norm, sam_start=30"].endswith("ρ of SAM-ON, not tuned for this arm |")
    assert rows["scope=norm, ascent_interval=4"].endswith("ρ of SAM-ON, not tuned for this arm |")
    assert rows["scope=no-norm"].endswith("| 0.2 | ρ of SAM-all, not tuned for this arm |")
    assert rows["scope=norm, ascent=momentum, bn_policy=update"].endswith("| 1.0 | tuned for this arm |")
    assert rows["scope=norm, amp=bf16, bf16_kernels=upcast"].endswith("| 0.3 | tuned for this arm (in the pilot's precision) |")
