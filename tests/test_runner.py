"""The training runner: end-to-end runs, resume equivalence, configs, the SAM window, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from normsam import cli
from normsam.train import checkpoint as ckpt
from normsam.train import data as D
from normsam.train.config import load_config, parse_overrides
from normsam.train.loop import RunExistsError, Trainer, resume, warmup_cosine
from tests.test_data import write_fashion_mnist

TINY = dict(
    data="synthetic",
    image_size=8,
    subset=64,
    batch_size=32,
    eval_batch_size=256,
    epochs=2,
    threads=1,
    progress=False,
)
TIMING_KEYS = {"epoch_time", "step_time", "images_per_s", "elapsed"}


def _cfg(tmp_path: Path, **overrides):
    return load_config(None, {**TINY, "out": str(tmp_path / "run"), **overrides})


def _metrics(run_dir: Path) -> list[dict]:
    return ckpt.read_jsonl(Path(run_dir) / ckpt.METRICS_JSONL)


def _without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def interrupt_in_second_epoch(cfg, monkeypatch) -> None:
    """Train ``cfg`` and stop it with Ctrl-C during its second epoch (one epoch is checkpointed)."""
    original = Trainer.train_epoch

    def interrupted(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg).run()
    assert len(_metrics(cfg.out)) == 1
    monkeypatch.setattr(Trainer, "train_epoch", original)


def interrupt_after_one_epoch_and_resume(cfg, monkeypatch) -> dict:
    """Train ``cfg``, stop it with Ctrl-C during its second epoch, then ``resume`` it; returns the summary."""
    interrupt_in_second_epoch(cfg, monkeypatch)
    return resume(cfg.out)


@pytest.fixture(autouse=True)
def no_system_data(monkeypatch):
    monkeypatch.setattr(D.readers, "SYSTEM_SEARCH_DIRS", {"fashion-mnist": (), "mnist": ()})
    monkeypatch.delenv(D.DATA_ENV_VAR, raising=False)


def test_end_to_end_synthetic_run_leaves_a_self_describing_folder(tmp_path):
    summary = Trainer(_cfg(tmp_path, scope="norm", perturbation="asam", rho=2.0)).run()
    run = tmp_path / "run"
    for name in ("config.yaml", "environment.json", "metrics.jsonl", "metrics.csv", "norm_stats.jsonl",
                 "checkpoint.pt", "summary.json"):
        assert (run / name).is_file(), name
    rows = _metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "train_loss_perturbed", "lr", "rho",
                "epoch_time", "images_per_s"):
        assert key in rows[0], key
    assert rows[-1]["lr"] == pytest.approx(0.0)  # the cosine schedule ends at 0
    assert summary["final_test_acc"] == rows[-1]["test_acc"]
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and "sam" in state["optimizer"]
    assert load_config(str(run / "config.yaml")) == _cfg(tmp_path, scope="norm", perturbation="asam", rho=2.0)
    env = json.loads((run / "environment.json").read_text())
    assert env["torch"] == torch.__version__ and env["threads"] == 1
    stats = ckpt.read_jsonl(run / "norm_stats.jsonl")
    assert [s["epoch"] for s in stats] == [0, 1, 2]
    assert stats[0]["pooled"]["gamma"]["quantiles"]["0.5"] == pytest.approx(1.0)  # γ starts at 1
    csv_header = (run / "metrics.csv").read_text().splitlines()[0]
    assert csv_header.startswith("epoch,train_loss,train_acc")


def test_end_to_end_on_fashion_mnist_format_files(tmp_path):
    root = tmp_path / "fmnist"
    write_fashion_mnist(root, n_train=120, n_test=40)
    cfg = load_config("quick", {"data_dir": str(root), "subset": None, "epochs": 1, "batch_size": 40,
                                "threads": 1, "progress": False, "out": str(tmp_path / "run")})
    summary = Trainer(cfg).run()
    assert cfg.data == "fashion-mnist" and summary["epochs"] == 1
    assert 0.0 <= summary["final_test_acc"] <= 100.0


def test_missing_data_error_names_both_remedies(tmp_path):
    cfg = _cfg(tmp_path, data="fashion-mnist", image_size=None, data_dir=str(tmp_path / "empty"))
    with pytest.raises(D.DatasetNotFoundError, match=r"(?s)apt-get install.*dataset-fashion-mnist.*download=true"):
        Trainer(cfg)
    assert cli.main(["train", "data_dir=" + str(tmp_path / "empty"), "epochs=1", "out=" + str(tmp_path / "r")]) == 2


@pytest.mark.parametrize("scope", ["none", "norm", "ssam-d"])
def test_resume_gives_the_same_metrics_as_an_uninterrupted_run(tmp_path, monkeypatch, scope):
    extra = dict(scope=scope, perturbation="asam", rho=2.0, epochs=3, momentum=0.9)
    if scope == "ssam-d":
        extra.update(sparsity=0.9, mask_interval=1)
    straight = Trainer(_cfg(tmp_path / "a", **extra)).run()
    resumed = interrupt_after_one_epoch_and_resume(_cfg(tmp_path / "b", **extra), monkeypatch)
    assert _without_timing(_metrics(tmp_path / "a" / "run")) == _without_timing(_metrics(tmp_path / "b" / "run"))
    assert resumed["final_test_acc"] == straight["final_test_acc"]
    a = torch.load(tmp_path / "a" / "run" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "run" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_existing_and_finished_runs_are_protected(tmp_path):
    cfg = _cfg(tmp_path, epochs=1)
    Trainer(cfg).run()
    with pytest.raises(RunExistsError, match="already holds a run, so a new one cannot start there: .* holds a "
                                             "finished run .*: there is nothing to resume"):
        Trainer(cfg)
    with pytest.raises(RunExistsError, match="already finished"):
        resume(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        resume(tmp_path / "nothing")
    (tmp_path / "run" / "summary.json").unlink()
    with pytest.raises(ValueError, match="only device, progress, tensorboard, threads may be overridden, not 'rho'"):
        resume(tmp_path / "run", {"rho": 1.0})


def test_sam_window_runs_plain_steps_outside(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, epochs=3, sam_start=1, sam_end=2, scope="all")
    trainer = Trainer(cfg)
    forwards = []
    trainer.forward_model.register_forward_hook(lambda *args: forwards.append(trainer.sam_active(len(rows))))
    rows: list = []
    first_steps = []
    original = trainer.sam.first_step
    monkeypatch.setattr(trainer.sam, "first_step", lambda *a, **k: (first_steps.append(1), original(*a, **k)))
    for epoch in range(3):
        before = len(forwards)
        rows.append(trainer.train_epoch(epoch))
        per_step = (len(forwards) - before) / trainer.steps_per_epoch
        assert per_step == (2 if epoch == 1 else 1)  # no second pass outside the window
    assert [r["sam"] for r in rows] == [False, True, False]
    assert rows[0]["train_loss_perturbed"] is None and rows[1]["train_loss_perturbed"] is not None
    assert len(first_steps) == trainer.steps_per_epoch


def test_warmup_cosine_schedule():
    values = [warmup_cosine(s, warmup_steps=4, total_steps=20) for s in range(21)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == pytest.approx(1.0) and values[12] == pytest.approx(0.5) and values[20] == pytest.approx(0.0)


# --- configs ------------------------------------------------------------------------------------------


def test_sam_options_come_from_the_config_in_one_place():
    """TrainConfig.sam_options: the epoch-counted keys in SAM steps, the mask keys only for their scopes."""
    from normsam.train.run_store import PlainRunStore, ShardedRunStore, open_run_store
    from normsam.train.setup import build_optimizer

    assert load_config(None, {"scope": "none"}).sam_options(10) is None
    ssam_d = load_config(None, {"scope": "ssam-d", "sparsity": 0.5, "mask_interval": 4, "epochs": 7, "sam_start": 1,
                                "sam_end": 3, "rho_warmup_epochs": 0.3, "seed": 5}).sam_options(391)
    assert (ssam_d.mask_total_steps, ssam_d.mask_interval, ssam_d.sparsity, ssam_d.mask_seed) == (782, 4, 0.5, 5)
    assert ssam_d.rho_schedule.steps == 117  # round(0.3 · 391)
    assert load_config(None, {"rho_warmup_epochs": 0.001}).sam_options(3).rho_schedule.steps == 1  # at least 1
    norm = load_config(None, {"scope": "norm", "rho": 0.7, "perturbation": "asam"}).sam_options(3)
    assert (norm.scope, norm.rho, norm.perturbation, norm.sparsity, norm.mask_total_steps, norm.rho_schedule,
            norm.sync_ascent) == ("norm", 0.7, "asam", None, None, None, False)
    momentum = load_config(None, {"ascent": "momentum", "bn_policy": "update", "parallel": "fsdp"}).sam_options(3)
    assert momentum.sync_ascent is None and load_config(None, {"parallel": "fsdp"}).sam_options(3).sync_ascent
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    sam, optimizer = build_optimizer(load_config(None, {"optimizer": "adamw", "rho": 0.2}), model, 3)
    assert optimizer is sam.base_optimizer and isinstance(optimizer, torch.optim.AdamW) and sam.options.rho == 0.2
    assert type(open_run_store("r", load_config(None, {}))) is PlainRunStore
    assert type(open_run_store("r", load_config(None, {"parallel": "fsdp"}))) is ShardedRunStore


def test_the_runner_seeds_are_pinned():
    """Dropout & co (stream 1) and SSAM-F's Fisher examples (stream 5) per epoch: every trained run depends on
    these exact values (the data's streams have their own derivation, normsam.train.data.splits)."""
    from normsam.train.loop import derive_seed

    assert [derive_seed(0, 1, e) for e in range(3)] == [7497590139201302571, 2933113385032431960,
                                                        7403171608453988909]
    assert derive_seed(0, 5, 0) == 27207190353783769 and derive_seed(-1, 2**64 + 1) == derive_seed(2**64 - 1, 1)


def test_config_layers_and_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"rho": 2, "epochs": 3, "scope": ["layer1.*"]}))
    cfg = load_config(str(path), ["rho=0.25", "subset=null", "download=true", "data_dir=123"])
    assert (cfg.rho, cfg.epochs, cfg.subset, cfg.download, cfg.data_dir) == (0.25, 3, None, True, "123")
    assert cfg.scope == ["layer1.*"] and isinstance(load_config(str(path)).rho, float)
    assert parse_overrides(["--lr=0.5", "weight-decay=0"]) == {"lr": 0.5, "weight_decay": 0}
    quick = load_config("quick")
    assert (quick.data, quick.model, quick.perturbation, quick.scope) == ("fashion-mnist", "resnet20", "asam", "norm")
    paper = load_config("paper-cifar100-wrn")
    assert (paper.model, paper.epochs, paper.lr, paper.weight_decay, paper.label_smoothing) == (
        "wrn28-10", 200, 0.1, 5e-4, 0.1)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["rhoo=1"], r"Unknown config key 'rhoo' in the overrides\. Did you mean 'rho'\? Valid keys: data, data_dir"),
        (["epochs=2.5"], r"Wrong type for epochs: 2\.5 \(float\); expected int"),
        (["download=maybe"], r"Wrong type for download: 'maybe' \(str\); expected bool"),
        (["optimizer=adam"], r"Invalid optimizer: 'adam'; valid values are sgd, adamw, lion"),
        (["scope=nrom"], r"Invalid scope: 'nrom'; valid values are none, all, norm, no-norm"),
        (["rho=-1"], r"rho must be >= 0"),
        (["sam_start=3", "sam_end=2"], r"SAM window .* is empty"),
        (["scope=random"], r"needs sparsity="),
        (["batch_size=100", "accumulation=3"], r"not divisible by accumulation=3"),
        (["rho"], r"is not key=value"),
        (["optimizer=adamw", "momentum=1.5"], r"momentum must lie in \[0, 1\), got 1\.5: it is SGD's momentum and "
                                              r"beta1 of adamw and lion"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.1\nmomentun: 0.9\n")
    with pytest.raises(ValueError, match=r"Unknown config key 'momentun' in .*bad\.yaml\. Did you mean 'momentum'"):
        load_config(str(bad))
    with pytest.raises(ValueError, match="neither a preset"):
        load_config(str(tmp_path / "missing.yaml"))


# --- CLI ----------------------------------------------------------------------------------------------


def test_cli_train_and_resume_flags(tmp_path, capsys):
    args = [f"{k}={v}" for k, v in TINY.items()] + ["epochs=1", f"out={tmp_path / 'run'}"]
    assert cli.main(["train", *args]) == 0
    assert "epoch   1/1 (SAM)" in capsys.readouterr().out
    assert cli.main(["train", "rhoo=1"]) == 2
    assert "Did you mean 'rho'" in capsys.readouterr().err
    assert cli.main(["train", "--resume", str(tmp_path / "run"), "--config", "quick"]) == 2


def test_cli_inspect_prints_the_scope_table(capsys):
    assert cli.main(["inspect", "resnet20", "--all"]) == 0
    out = capsys.readouterr().out
    assert "272,474 trainable parameters" in out
    assert "stage2.0.shortcut" in out or "shortcut" in out
    assert "'norm': 1,568 of 272,474 parameters" in out
    assert cli.main(["inspect", "resnet20", "--norm", "none"]) == 2


def test_compare_writes_table_and_plot(tmp_path, monkeypatch):
    from PIL import Image

    from normsam.analysis import plots
    from normsam.analysis.compare import compare

    titles = []
    real_save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: titles.append(fig.axes[0].get_title()) or real_save(fig, path))
    result = compare(tmp_path / "cmp", overrides={**TINY, "epochs": 1}, bench_rounds=0)
    table = (tmp_path / "cmp" / "compare.md").read_text()
    for label in ("SGD", "SAM-all (asam, ρ=0.1)", "SAM-ON (asam, ρ=0.5)"):
        assert f"| {label} |" in table
    assert "step time" not in table  # not measured: no column (the runs' own times measure load, not cost)
    with Image.open(tmp_path / "cmp" / "compare.png") as img:
        assert img.size[0] > 300
    assert titles == ["Fashion-MNIST, ResNet-20 (1 epoch)"]
    again = compare(tmp_path / "cmp", overrides={**TINY, "epochs": 1}, bench_rounds=0)  # finished runs are reused
    assert again["table"] == result["table"]


def test_tensorboard_without_the_package_names_the_extra(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"pip install 'normsam\[tensorboard\]'"):
            Trainer(_cfg(tmp_path, tensorboard=True))
    else:
        Trainer(_cfg(tmp_path, tensorboard=True, epochs=1)).run()
        assert any((tmp_path / "run" / "tensorboard").iterdir())


def test_atomic_writes_leave_no_partial_file_and_usual_permissions(tmp_path, monkeypatch):
    import os

    target = tmp_path / "metrics.jsonl"
    ckpt.atomic_write_text(target, "old\n")
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_current_umask())

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_write_text(target, "new\n")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # the temporary file is gone


def _current_umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
