"""normsam.analysis.study: ρ chosen on validation data only, placeholders, phases, restart."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from normsam.analysis.study import choose_rho, load_study, norm_sparsity, resolve_grid, run_study
from normsam.optim.groups import param_groups
from normsam.train import checkpoint as ckpt
from normsam.train.config import load_config, save_config
from normsam.train.run_folder import build_run_model, load_run_data

TINY = dict(data="synthetic", image_size=8, subset=80, val_split=0.25, batch_size=32, eval_batch_size=256,
            epochs=1, threads=1, progress=False, device="cpu", model="resnet8", norm_stats=False)


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _fake_run(folder, scope, rho, val, test):
    folder.mkdir(parents=True)
    save_config(load_config(None, {**TINY, "scope": scope, "rho": rho}), folder / ckpt.CONFIG)
    (folder / ckpt.SUMMARY).write_text(json.dumps({"final_val_acc": val, "final_test_acc": test}))


def test_choice_uses_validation_accuracy_never_test(tmp_path):
    # ρ=0.5 has the best test accuracy but the worse validation accuracy: the choice must ignore the test set.
    _fake_run(tmp_path / "a/s0", "norm", 0.2, val=70.0, test=60.0)
    _fake_run(tmp_path / "a/s1", "norm", 0.2, val=72.0, test=61.0)
    _fake_run(tmp_path / "b/s0", "norm", 0.5, val=69.0, test=90.0)
    _fake_run(tmp_path / "b/s1", "norm", 0.5, val=72.0, test=90.0)
    _fake_run(tmp_path / "c/s0", "all", 0.1, val=50.0, test=50.0)
    _fake_run(tmp_path / "d/s0", "all", 0.3, val=50.0, test=50.0)  # a tie goes to the smaller ρ
    _fake_run(tmp_path / "e/s0", "none", 0.0, val=99.0, test=99.0)  # SGD has no ρ to choose
    choice = choose_rho(tmp_path)
    assert set(choice) == {"norm", "all"}
    assert choice["norm"]["rho"] == 0.2 and choice["norm"]["candidates"]["0.5"] == [69.0, 72.0]
    assert choice["all"]["rho"] == 0.1


def test_choice_refuses_a_pilot_without_validation_split(tmp_path):
    folder = tmp_path / "r"
    folder.mkdir()
    save_config(load_config(None, {**TINY, "scope": "norm"}), folder / ckpt.CONFIG)
    (folder / ckpt.SUMMARY).write_text(json.dumps({"final_val_acc": None, "final_test_acc": 50.0}))
    with pytest.raises(ValueError, match="val_split > 0"):
        choose_rho(tmp_path)
    with pytest.raises(ValueError, match="run the pilot first"):
        choose_rho(tmp_path / "nothing")


def test_placeholders_and_sparsity():
    grid = [{"scope": ["norm"], "rho": ["@rho:norm"], "sparsity": ["@sparsity:norm"]}]
    assert resolve_grid(grid, {"@rho:norm": 0.3, "@sparsity:norm": 0.99}) == [
        {"scope": ["norm"], "rho": [0.3], "sparsity": [0.99]}]
    with pytest.raises(ValueError, match="Unknown placeholder '@rho:all'"):
        resolve_grid([{"rho": ["@rho:all"]}], {"@rho:norm": 0.3})
    spec = {"base": dict(TINY)}
    cfg = load_config(None, dict(TINY))
    model = build_run_model(cfg, load_run_data(cfg))
    norm = sum(p.numel() for g in param_groups(model, "norm") if g["perturb"] for p in g["params"])
    total = sum(p.numel() for p in model.parameters())
    assert norm_sparsity(spec) == round(1 - norm / total, 6)


def test_study_file_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="needs a pilot"):
        load_study({"out": str(tmp_path), "phases": [{"grid": {}}]})
    with pytest.raises(ValueError, match="Unknown study key 'phase'"):
        load_study({"out": "x", "phase": []})
    with pytest.raises(ValueError, match="used twice"):
        load_study({"out": "x", "pilot": {"grid": {"rho": [1]}}, "phases": [{"name": "a", "grid": {}},
                                                                             {"name": "a", "grid": {}}]})


def test_study_end_to_end_and_restart(tmp_path, capsys):
    study = {
        "base": dict(TINY),
        "out": str(tmp_path / "study"),
        "workers": 1,
        "pilot": {"seeds": [7], "grid": [{"scope": ["norm"], "rho": [0.05, 0.5]}], "max_extensions": 0},
        "phases": [{"name": "main", "seeds": [0, 1],
                    "grid": [{"scope": ["none"]}, {"scope": ["norm"], "rho": ["@rho:norm"]}]},
                   {"name": "extra", "seeds": [0],
                    "grid": [{"scope": ["random"], "rho": ["@rho:norm"], "sparsity": ["@sparsity:norm"]}]}],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    run_study(path, report=False)
    out = tmp_path / "study"
    chosen = json.loads((out / "choice.json").read_text())
    rho = chosen["values"]["@rho:norm"]
    assert rho in (0.05, 0.5)
    assert (out / f"main/scope=norm,rho={rho:g}/seed=1" / ckpt.SUMMARY).exists()
    assert (out / "main/scope=none/seed=0" / ckpt.SUMMARY).exists()
    extra = yaml.safe_load((out / "sweeps/extra.yaml").read_text())
    assert extra["grid"][0]["sparsity"] == [chosen["values"]["@sparsity:norm"]]
    record = json.loads((out / "study.json").read_text())
    assert set(record["phases"]) == {"pilot", "main", "extra"}
    assert record["phases"]["main"]["counts"]["done"] == 4
    assert "| norm | 0.05 |" in (out / "choice.md").read_text()
    # Starting it again trains nothing: every run is skipped, and the choice is the same.
    run_study(path, report=False)
    record = json.loads((out / "study.json").read_text())
    assert record["phases"]["main"]["counts"]["skipped"] == 4
    assert json.loads((out / "choice.json").read_text())["values"]["@rho:norm"] == rho


# --- wall-clock per phase: kept for a sitting cut short --------------------------------------------------


def test_the_phase_clock_saves_while_the_phase_runs_and_adds_to_earlier_sittings(tmp_path):
    import time

    from normsam.analysis.study import PhaseClock

    path = tmp_path / "study.json"
    record = {"phases": {"main": {"wall_clock_s": 100.0}}}
    entry = record["phases"]["main"]
    with PhaseClock(path, record, entry, every=0.05) as clock:
        clock.note(interrupted="earlier")
        clock.note(interrupted=None, counts={"done": 1})  # changed under the lock the ticking thread saves with
        deadline = time.time() + 5
        while not path.exists() and time.time() < deadline:  # the ticking thread writes it, not the exit
            time.sleep(0.01)
        ticked = json.loads(path.read_text())["phases"]["main"]["wall_clock_s"]
        assert ticked >= 100.0
        time.sleep(0.2)
    final = json.loads(path.read_text())["phases"]["main"]["wall_clock_s"]
    assert 100.2 <= final < 105 and final == entry["wall_clock_s"]
    assert json.loads(path.read_text())["phases"]["main"] == {"wall_clock_s": final, "counts": {"done": 1}}


def test_an_interrupted_phase_keeps_its_time_and_a_finished_one_clears_the_mark(tmp_path, monkeypatch):
    import time

    from normsam.analysis import sweep as sweep_module

    study = {"base": dict(TINY), "out": str(tmp_path / "study"), "workers": 1,
             "pilot": {"seeds": [7], "grid": [{"scope": ["norm"], "rho": [0.05, 0.5]}], "max_extensions": 0},
             "phases": [{"name": "main", "seeds": [0], "grid": [{"scope": ["none"]}]}]}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    real_run_sweep = sweep_module.run_sweep

    def stopped_by_ctrl_c(sweep, **kwargs):
        if sweep.out.name == "main":
            time.sleep(0.3)
            raise KeyboardInterrupt
        return real_run_sweep(sweep, **kwargs)

    monkeypatch.setattr(sweep_module, "run_sweep", stopped_by_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        run_study(path, report=False)
    out = tmp_path / "study"
    main = json.loads((out / "study.json").read_text())["phases"]["main"]
    assert main["wall_clock_s"] >= 0.3 and "interrupted" in main and "finished" not in main
    first_sitting = main["wall_clock_s"]

    monkeypatch.setattr(sweep_module, "run_sweep", real_run_sweep)
    run_study(path, report=False)
    main = json.loads((out / "study.json").read_text())["phases"]["main"]
    assert main["wall_clock_s"] > first_sitting and "interrupted" not in main
    assert main["counts"]["done"] == 1 and "finished" in main


# --- ρ warm-up arms and an earlier pilot's record (issue 24) ------------------------------------------------


def test_choice_keys_name_the_warmup_and_parse_back():
    from normsam.analysis.study import choice_key, parse_choice_key

    assert choice_key("norm") == "norm" and choice_key("norm", "momentum") == "norm/momentum"
    assert choice_key("norm", "gradient", 6.0) == "norm+warmup6"
    assert choice_key("norm", "momentum", 0.5) == "norm/momentum+warmup0.5"
    for key in ("all", "norm/momentum", "norm+warmup6", "norm/momentum+warmup0.5"):
        assert choice_key(*parse_choice_key(key)) == key


def test_a_warmup_arm_is_chosen_apart_from_its_constant_rho_twin(tmp_path):
    def run(folder, rho, warmup, val):
        folder.mkdir(parents=True)
        save_config(load_config(None, {**TINY, "scope": "norm", "rho": rho, "rho_warmup_epochs": warmup}),
                    folder / ckpt.CONFIG)
        (folder / ckpt.SUMMARY).write_text(json.dumps({"final_val_acc": val, "final_test_acc": 0.0}))

    run(tmp_path / "a", 1.0, 0, 60.0)
    run(tmp_path / "b", 2.0, 0, 20.0)  # the constant-ρ arm collapses at 2.0 ...
    run(tmp_path / "c", 1.0, 6, 55.0)
    run(tmp_path / "d", 2.0, 6, 65.0)  # ... the warmed-up one does not
    choice = choose_rho(tmp_path)
    assert choice["norm"]["rho"] == 1.0 and choice["norm+warmup6"]["rho"] == 2.0


def test_an_earlier_record_adds_its_candidates_and_is_no_extension(tmp_path):
    from normsam.analysis.study import earlier_candidates, edge_extensions

    record = tmp_path / "choice.json"
    record.write_text(json.dumps({"choice": {"all": {"rho": 0.4, "candidates": {"0.2": [50.0, 52.0],
                                                                                "0.4": [60.0, 61.0]}}}}))
    _fake_run(tmp_path / "pilot/a", "all", 0.8, val=58.0, test=0.0)
    _fake_run(tmp_path / "pilot/b", "all", 1.6, val=20.0, test=0.0)
    earlier = earlier_candidates([record])
    choice = choose_rho(tmp_path / "pilot", earlier=earlier)
    assert choice["all"]["rho"] == 0.4 and choice["all"]["earlier"] == [0.2, 0.4]
    assert set(choice["all"]["candidates"]) == {"0.2", "0.4", "0.8", "1.6"}
    grid = [{"scope": ["all"], "rho": [0.8, 1.6]}]
    assert edge_extensions(choice, grid, grid, 1) == []  # 0.4 is interior once the record is counted
    # a run at a ρ the record holds would count its seeds twice
    _fake_run(tmp_path / "pilot/c", "all", 0.4, val=99.0, test=0.0)
    with pytest.raises(ValueError, match=r"trains all at ρ=0.4, which the earlier record already holds"):
        choose_rho(tmp_path / "pilot", earlier=earlier)


def test_a_warmup_arm_at_an_edge_extends_its_own_grid():
    from normsam.analysis.study import edge_extensions

    grid = [{"scope": ["norm"], "rho": [1.0, 2.0]}, {"scope": ["norm"], "rho_warmup_epochs": [6], "rho": [1.0, 2.0]}]
    choice = {"norm": {"rho": 1.0, "candidates": {"1.0": [60.0], "2.0": [20.0]}},
              "norm+warmup6": {"rho": 2.0, "candidates": {"1.0": [55.0], "2.0": [65.0]}}}
    assert edge_extensions(choice, grid, grid, 3) == [
        {"scope": ["norm"], "rho": [0.5]},
        {"scope": ["norm"], "rho_warmup_epochs": [6], "rho": [4.0]},
    ]
    # written as the grid writes it: the run folder is "rho_warmup_epochs=6,…", as the grid's own runs (not 6.0)
    warmup = edge_extensions(choice, grid, grid, 3)[1]["rho_warmup_epochs"][0]
    assert type(warmup) is int
    half = [{"scope": ["all"], "rho_warmup_epochs": [0.5], "rho": [1.0, 2.0]}]
    more = edge_extensions({"all+warmup0.5": {"rho": 2.0, "candidates": {"1.0": [1.0], "2.0": [2.0]}}}, half, half, 3)
    assert more == [{"scope": ["all"], "rho_warmup_epochs": [0.5], "rho": [4.0]}]


def test_the_study_file_checks_its_earlier_record(tmp_path):
    spec = {"out": str(tmp_path / "s"), "base": dict(TINY),
            "pilot": {"seeds": [100], "earlier": str(tmp_path / "missing.json"), "grid": {"scope": ["all"], "rho": [1]}},
            "phases": [{"name": "main", "seeds": [0], "grid": {"scope": ["all"], "rho": ["@rho:all"]}}]}
    with pytest.raises(FileNotFoundError, match=r"earlier: .*missing.json does not exist; name the choice.json"):
        load_study(spec)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match=r"is not a pilot's choice.json"):
        load_study({**spec, "pilot": {**spec["pilot"], "earlier": str(tmp_path / "bad.json")}})
    from normsam.analysis.study import check_plan

    (tmp_path / "rec.json").write_text(json.dumps({"choice": {"all": {"rho": 1, "candidates": {"1": [50.0]}}}}))
    with pytest.raises(ValueError, match=r"trains all at ρ=1, which its earlier: record already holds"):
        check_plan(load_study({**spec, "pilot": {**spec["pilot"], "earlier": str(tmp_path / "rec.json")}}))
    # the record alone may supply a phase's @rho: placeholder
    ok = {**spec, "pilot": {"seeds": [100], "earlier": str(tmp_path / "rec.json"),
                            "grid": {"scope": ["all"], "rho_warmup_epochs": [2], "rho": [1]}},
          "phases": [{"name": "main", "seeds": [0], "grid": [{"scope": ["all"], "rho": ["@rho:all"]},
                                                             {"scope": ["all"], "rho_warmup_epochs": [2],
                                                              "rho": ["@rho:all+warmup2"]}]}]}
    check_plan(load_study(ok))


def test_the_rho_curves_mark_the_collapse_half_way_to_chance(tmp_path):
    from normsam.analysis.rho_curves import collapse_rho, rho_curves_figure, rho_curves_markdown

    choice = {
        "norm": {"rho": 2.4, "candidates": {"1.2": [59.0, 59.0], "2.4": [66.0, 66.6], "4.8": [10.0, 28.8]}},
        "all": {"rho": 0.4, "candidates": {"0.2": [54.0], "0.4": [59.6], "0.8": [58.2], "3.2": [36.1]}},
    }
    assert collapse_rho(sorted((float(r), v) for r, v in choice["norm"]["candidates"].items()), chance=10) == 4.8
    # 36.1 is above half-way from 59.6 to 10 (34.8): a loss of accuracy, not a collapse
    assert collapse_rho(sorted((float(r), v) for r, v in choice["all"]["candidates"].items()), chance=10) is None
    table = rho_curves_markdown(choice, chance=10, names={"norm": "SAM-ON"})
    assert "| SAM-ON | 1.2 – 4.8 (3 values) | 2.4 (66.3) | 4.8 (19.4) |" in table
    assert "| all | 0.2 – 3.2 (4 values) | 0.4 (59.6) | none in the grid |" in table
    figure = rho_curves_figure(choice, tmp_path / "rho.png", chance=10)
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
