"""The study's plan check knows the regime gate: `--phase gate` is a phase, a bad gate fails before training."""

from __future__ import annotations

import pytest

from normsam.analysis.study import check_plan, load_study


def _spec(tmp_path, **gate):
    return load_study({
        "out": str(tmp_path / "study"),
        "base": {"data": "synthetic", "model": "resnet20", "epochs": 1, "val_split": 0.2, "label_noise": 0.4},
        "gate": {"seeds": [0], **gate},
        "pilot": {"seeds": [100], "grid": [{"scope": ["norm"], "rho": [0.5]}]},
        "phases": [{"name": "main", "seeds": [0], "grid": [{"scope": ["norm"], "rho": ["@rho:norm"]}]}],
    })


def test_gate_is_a_phase_name_and_typos_near_it_are_refused(tmp_path):
    spec = _spec(tmp_path)
    check_plan(spec, ["gate"])
    with pytest.raises(ValueError, match="Did you mean 'gate'"):
        check_plan(spec, ["gaet"])


def test_a_bad_setting_of_the_gates_clean_twin_fails_the_plan_check(tmp_path):
    """`clean:` holds config keys of the clean runs: only building the gate's sweep can check them."""
    check_plan(_spec(tmp_path, clean={"label_noise": 0.0}))
    with pytest.raises(ValueError, match="lrr"):
        check_plan(_spec(tmp_path, clean={"label_noise": 0.0, "lrr": 0.1}))


def test_the_shipped_study_files_pass_their_plan_check():
    """Every phase of the committed studies (e.g. the momentum arm's `@rho:norm/momentum`) checks out before
    anything trains, as `normsam study` will do."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs" / "study"
    studies = [p for p in sorted(root.glob("*.yaml")) if "\nphases:" in p.read_text()]
    assert studies
    for path in studies:
        check_plan(load_study(path))


def test_a_sam_window_after_the_last_epoch_fails_the_plan_check_not_the_phase(tmp_path):
    """A late-phase arm whose window starts after the schedule ends would train plain SGD labelled SAM: the
    sweep refuses it when it is loaded, so a study refuses it before its gate and pilot train."""
    spec = _spec(tmp_path)
    spec["phases"].append({"name": "late", "seeds": [0],
                           "grid": [{"scope": ["norm"], "rho": ["@rho:norm"], "sam_start": [30]}]})
    with pytest.raises(ValueError, match="Phase late: Sweep run .*sam_start=30 with epochs=1"):
        check_plan(spec)
