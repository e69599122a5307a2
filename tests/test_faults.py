"""Issue 16, classes 5 and 6: every option takes effect or is refused up front, and ordinary faults (malformed
YAML, an out= that is a file, bad threads, a full disk, a read-only folder) are one line, checked before the
long work."""

from __future__ import annotations

import errno
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

import normsam
from normsam import cli
from normsam.analysis import study as study_module
from normsam.train import checkpoint as ckpt
from normsam.train import data as D
from normsam.analysis.compare import compare
from normsam.train.config import load_config
from normsam.train.loop import Trainer
from tests.conftest import make_cnn
from tests.test_runner import TINY, _cfg, _metrics, _without_timing
from tests.test_study import TINY as STUDY_TINY


@pytest.fixture(autouse=True)
def no_system_data(monkeypatch):
    monkeypatch.setattr(D.readers, "SYSTEM_SEARCH_DIRS", {"fashion-mnist": (), "mnist": ()})
    monkeypatch.delenv(D.DATA_ENV_VAR, raising=False)


def _train_args(out, *extra):
    return ["train", *[f"{k}={v}" for k, v in TINY.items()], f"out={out}", *extra]


def _one_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"normsam {command}: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# --- class 5: options silently ignored, checks that come too late -----------------------------------------


@pytest.mark.parametrize("key", ["include", "exclude"])
def test_patterns_that_match_nothing_are_refused(key):
    with pytest.raises(ValueError, match=r"pattern 'layer9\.\*' selects no parameters.*names look like"):
        normsam.SAM(make_cnn(), torch.optim.SGD, lr=0.1, **{key: ["layer9.*"]})
    with pytest.raises(ValueError, match=r"pattern 'bn1.wieght' selects no parameters.*'bn1.weight'"):
        normsam.SAM(make_cnn(), torch.optim.SGD, rho=0.5, lr=0.1, scope=["head.*", "bn1.wieght"])


@pytest.mark.parametrize("overrides, message", [
    ({"scope": "norm", "sparsity": 0.9}, "sparsity=0.9 is only used by the element-mask scopes"),
    ({"scope": "all", "mask_interval": 10}, "mask_interval=10 is only used by scope=ssam-d"),
    ({"threads": 0}, "threads must be >= 1"),
    ({"threads": -1}, "threads must be >= 1"),
])
def test_runner_options_that_would_be_ignored_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, {**TINY, **overrides})


def test_sam_settings_with_scope_none_on_the_command_line_are_refused(tmp_path, capsys):
    assert cli.main(_train_args(tmp_path / "run", "scope=none", "rho=2", "perturbation=asam")) == 2
    assert "scope=none trains with the plain base optimizer, so perturbation=asam, rho=2 would be ignored" in (
        _one_line(capsys, "train"))
    assert not (tmp_path / "run").exists()


def test_compare_refuses_overrides_that_its_arms_replace(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"compare sets .*scope.* itself .* scope=all would be ignored"):
        compare(tmp_path / "c", overrides={"scope": "all"})
    assert not (tmp_path / "c").exists()
    assert cli.main(["compare", "--out", str(tmp_path / "c"), "rho=2.0"]) == 2
    assert "rho=2.0 would be ignored" in _one_line(capsys, "compare")


def _study(tmp_path, **changes):
    spec = {
        "out": str(tmp_path / "study"),
        "base": dict(STUDY_TINY),
        "pilot": {"seeds": [100], "grid": [{"scope": ["norm"], "rho": [0.2, 0.5]}]},
        "phases": [{"name": "main", "seeds": [0], "grid": [{"scope": ["none"]},
                                                          {"scope": ["norm"], "rho": ["@rho:norm"]}]}],
    }
    spec.update(changes)
    return spec


@pytest.fixture
def no_training(monkeypatch):
    import normsam.analysis.sweep as sweep_module

    monkeypatch.setattr(sweep_module, "_train", lambda *a, **k: pytest.fail("trained before the plan was checked"))


def test_a_study_checks_its_whole_plan_before_training(tmp_path, no_training):
    base = {k: v for k, v in STUDY_TINY.items() if k != "val_split"}
    with pytest.raises(ValueError, match="val_split=0.*set val_split in the study's base"):
        study_module.run_study(_study(tmp_path, base=base))
    phases = [{"name": "main", "grid": [{"scope": ["all"], "rho": ["@rho:all"]}]}]
    with pytest.raises(ValueError, match=r"Phase main uses @rho:all, but the pilot trains no run with scope=all"):
        study_module.run_study(_study(tmp_path, phases=phases))
    phases = [{"name": "main", "grid": [{"scope": ["norm"], "rho": ["@rho:norm"], "lr": ["fast"]}]}]
    with pytest.raises(ValueError, match="Phase main: .*Wrong type for lr"):
        study_module.run_study(_study(tmp_path, phases=phases))
    phases = [{"name": "main", "grid": [{"scope": ["random"], "sparsity": ["@sparsity:head"]}]}]
    with pytest.raises(ValueError, match="@sparsity: takes one of all, norm, no-norm"):
        study_module.run_study(_study(tmp_path, phases=phases))
    assert not (tmp_path / "study" / "pilot").exists()


def test_a_mistyped_phase_is_an_error(tmp_path, capsys, no_training):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(_study(tmp_path)))
    assert cli.main(["study", str(path), "--phase", "mian"]) == 2
    assert "--phase 'mian' is not a phase of this study (pilot, main). Did you mean 'main'?" in _one_line(
        capsys, "study")


def test_the_hf_trainer_refuses_a_sam_of_another_model(tmp_path):
    pytest.importorskip("transformers")
    from normsam.integrations.transformers import SAMTrainer
    from tests.test_integration_transformers import TokenData, arguments, llama

    trained, other = llama(), llama()
    sam = normsam.SAM(other, torch.optim.AdamW, lr=1e-2, rho=0.5)
    with pytest.raises(ValueError, match=r"SAMTrainer: .* are not parameters of the model being trained"):
        SAMTrainer(model=trained, args=arguments(tmp_path, max_steps=1), train_dataset=TokenData(),
                   optimizers=(sam, None))


def test_lightning_refuses_a_sam_of_another_model(tmp_path):
    pytest.importorskip("lightning")
    from tests.test_integration_lightning import Net, data, net, trainer

    class Stranger(Net):
        def configure_optimizers(self):
            return normsam.SAM(net(), torch.optim.AdamW, lr=1e-2, rho=0.5)

    with pytest.raises(ValueError, match=r"SAMModule: .* are not parameters of the model being trained"):
        trainer(tmp_path, max_steps=1).fit(Stranger(), data())


# --- class 6: ordinary faults as one line -----------------------------------------------------------------


def test_malformed_yaml_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.1\nrho: [0.5\nepochs: 2\n")
    assert cli.main(["train", "--config", str(bad)]) == 2
    err = _one_line(capsys, "train")
    assert f"{bad} is not valid YAML (line" in err
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("base: {epochs: 1\n")
    assert cli.main(["sweep", str(sweep)]) == 2
    assert f"{sweep} is not valid YAML" in _one_line(capsys, "sweep")
    study = tmp_path / "study.yaml"
    study.write_text("pilot: [\n")
    assert cli.main(["study", str(study)]) == 2
    assert f"{study} is not valid YAML" in _one_line(capsys, "study")


def test_out_an_existing_file_and_negative_threads(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    assert cli.main(_train_args(target)) == 2
    assert f"{target} is an existing file, not a folder" in _one_line(capsys, "train")
    assert target.read_text() == "mine"
    assert cli.main(_train_args(tmp_path / "run", "threads=-1")) == 2
    assert "threads must be >= 1" in _one_line(capsys, "train")
    assert cli.main(["bench", "--threads", "0", "--rounds", "1"]) == 2
    assert "--threads must be >= 1" in _one_line(capsys, "bench")
    assert cli.main(["bench", "--json", str(target / "bench.json"), "--rounds", "1"]) == 2  # before measuring
    assert f"{target} is an existing file" in _one_line(capsys, "bench")
    assert cli.main(["compare", "--out", str(target)]) == 2
    assert f"compare folder {target} is an existing file" in _one_line(capsys, "compare")


def test_a_full_disk_is_one_line_and_the_resume_is_exact(tmp_path, monkeypatch, capsys):
    reference = Trainer(_cfg(tmp_path / "ref")).run()
    assert reference["status"] == "finished"
    real = ckpt._write_temporary
    writes = []

    def full_disk(path, data):
        if path.name == ckpt.CHECKPOINT:
            writes.append(path)
            if len(writes) == 2:  # the second epoch's checkpoint
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(ckpt, "_write_temporary", full_disk)
    run = tmp_path / "full" / "run"
    assert cli.main(_train_args(run)) == 2
    err = _one_line(capsys, "train")
    assert f"No space left on device ({run / ckpt.CHECKPOINT}): free disk space" in err
    assert "normsam train --resume" in err
    assert not list(run.glob(".*.tmp"))  # no temporary file left behind

    def full_at_config(path, data):
        if path.name == ckpt.CONFIG:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(ckpt, "_write_temporary", full_at_config)  # a resume rewrites config.yaml first
    assert cli.main(["train", "--resume", str(run)]) == 2
    assert "No space left on device" in _one_line(capsys, "train")
    monkeypatch.setattr(ckpt, "_write_temporary", real)
    assert cli.main(["train", "--resume", str(run)]) == 0
    assert _without_timing(_metrics(run)) == _without_timing(_metrics(tmp_path / "ref" / "run"))


@pytest.fixture
def read_only(monkeypatch):
    """Make folders read-only for this process. The tests run as root here, which ignores permission bits, so a
    read-only folder is simulated where every write starts: creating a file in it fails with EACCES/EROFS."""
    folders: list[Path] = []
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and any(Path(dir).resolve() == f.resolve() for f in folders):
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    return folders


def test_a_read_only_folder_is_refused_before_the_long_work(tmp_path, monkeypatch, capsys, read_only):
    finished = tmp_path / "done"
    Trainer(load_config(None, {**TINY, "epochs": 1, "out": str(finished)})).run()
    stopped = _cfg(tmp_path)  # tmp_path/run, interrupted after one epoch
    original = Trainer.train_epoch
    monkeypatch.setattr(Trainer, "train_epoch", lambda self, e: (_ for _ in ()).throw(KeyboardInterrupt)
                        if e == 1 else original(self, e))
    with pytest.raises(KeyboardInterrupt):
        Trainer(stopped).run()
    monkeypatch.setattr(Trainer, "train_epoch", lambda *a: pytest.fail("trained into a read-only folder"))
    import normsam.train.run_sharpness as rs

    monkeypatch.setattr(rs, "measure_sharpness", lambda *a, **k: pytest.fail("measured for a read-only folder"))
    read_only += [tmp_path / "ro", Path(stopped.out), finished, tmp_path / "reports"]
    (tmp_path / "ro").mkdir()

    assert cli.main(_train_args(tmp_path / "ro")) == 2
    assert f"cannot write to run folder {tmp_path / 'ro'} (Permission denied)" in _one_line(capsys, "train")
    read_only.append(tmp_path / "parent")
    (tmp_path / "parent").mkdir()
    import normsam.train.loop as loop

    real_load = loop.load_run_data
    monkeypatch.setattr(loop, "load_run_data", lambda cfg: pytest.fail("loaded the data first"))
    assert cli.main(_train_args(tmp_path / "parent" / "new")) == 2  # checked before the data loads
    assert "cannot write to run folder" in _one_line(capsys, "train")
    assert not (tmp_path / "parent" / "new").exists()
    monkeypatch.setattr(loop, "load_run_data", real_load)
    assert cli.main(["train", "--resume", stopped.out]) == 2
    assert "cannot write to run folder" in _one_line(capsys, "train")
    assert cli.main(["sharpness", str(finished), "--steps", "1", "--n", "8", "--device", "cpu"]) == 2
    assert f"cannot write to sharpness folder {finished}" in _one_line(capsys, "sharpness")
    assert cli.main(["report", str(finished), "--out", str(tmp_path / "reports")]) == 2
    assert "cannot write to report folder" in _one_line(capsys, "report")


def test_a_damaged_json_file_is_named(tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(load_config(None, {**TINY, "epochs": 1, "out": str(run)})).run()
    with (run / ckpt.METRICS_JSONL).open("a") as f:
        f.write("{\n")
    assert cli.main(["report", str(run), "--out", str(tmp_path / "r")]) == 2
    assert f"{run / ckpt.METRICS_JSONL} is not valid JSON (line 2" in _one_line(capsys, "report")
    (run / ckpt.SUMMARY).write_text("{")
    assert cli.main(["train", "--resume", str(run)]) == 2
    assert f"{run / ckpt.SUMMARY} is not valid JSON" in _one_line(capsys, "train")
