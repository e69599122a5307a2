"""The rough edges of issue 10: no silent substitution, no tracebacks, nothing lost; the small fixes; the
import structure (no module imports one that imports it back)."""

from __future__ import annotations

import ast
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import normsam
from normsam import cli
from normsam.train import checkpoint as ckpt
from normsam.train import data as D
from normsam.train.config import SWEEP_EXAMPLES, load_config, sweep_file
from normsam.train.loop import Trainer, resume
from normsam.train.run_folder import RunFolder
from tests.conftest import make_batch, make_cnn
from tests.test_data import write_fashion_mnist

TINY = dict(data="synthetic", image_size=8, subset=64, batch_size=32, eval_batch_size=256, epochs=2, threads=1,
            progress=False, device="cpu", scope="norm", rho=0.5)
REPO = Path(__file__).resolve().parents[1]


def _cfg(run_dir: Path, **overrides):
    return load_config(None, {**TINY, "out": str(run_dir), **overrides})


@pytest.fixture(autouse=True)
def no_env_data(monkeypatch):
    monkeypatch.delenv(D.DATA_ENV_VAR, raising=False)


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """A finished two-epoch run (checkpoint.pt holds epoch 2, checkpoint.prev.pt epoch 1)."""
    before = torch.get_num_threads()
    run_dir = tmp_path_factory.mktemp("runs") / "two"
    Trainer(_cfg(run_dir)).run()
    yield run_dir
    torch.set_num_threads(before)


def _copy_unfinished(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of the run as if it had stopped after its last checkpoint, before writing summary.json."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / ckpt.SUMMARY).unlink()
    return copy


# --- no silent substitution ------------------------------------------------------------------------------


def test_explicit_data_dir_without_the_data_is_an_error_even_with_a_system_copy(tmp_path, monkeypatch, capsys):
    system = tmp_path / "system-copy"
    write_fashion_mnist(system)
    monkeypatch.setattr(D.readers, "SYSTEM_SEARCH_DIRS", {"fashion-mnist": (system,), "mnist": ()})
    out = tmp_path / "run"
    assert cli.main(["train", "--config", "quick", "data_dir=/nonexistent/path", "subset=null", "epochs=1",
                     f"out={out}", "progress=false"]) == 2
    err = capsys.readouterr().err
    assert "/nonexistent/path  (data_dir, does not exist)" in err and str(system) not in err
    assert not out.exists()  # no config.yaml recording a path the data did not come from


# --- checkpoints: no tracebacks, nothing lost -------------------------------------------------------------


def test_every_epoch_keeps_the_previous_checkpoint(two_epochs):
    newest = torch.load(two_epochs / ckpt.CHECKPOINT, weights_only=True)
    previous = torch.load(two_epochs / ckpt.PREVIOUS_CHECKPOINT, weights_only=True)
    assert (newest["epoch"], previous["epoch"]) == (2, 1)
    assert [p.name for p in two_epochs.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_resume_falls_back_to_the_previous_checkpoint(two_epochs, tmp_path, damage):
    run = _copy_unfinished(two_epochs, tmp_path)
    data = (run / ckpt.CHECKPOINT).read_bytes()
    (run / ckpt.CHECKPOINT).write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    with pytest.warns(RuntimeWarning, match=r"checkpoint\.pt cannot be read.*using checkpoint\.prev\.pt \(epoch 1\)"):
        summary = resume(run)
    assert summary["epochs"] == 2  # epoch 2 trained again from epoch 1's checkpoint
    straight = ckpt.read_jsonl(two_epochs / ckpt.METRICS_JSONL)
    again = ckpt.read_jsonl(run / ckpt.METRICS_JSONL)
    timing = {"epoch_time", "step_time", "images_per_s", "elapsed"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in again] == [
        {k: v for k, v in r.items() if k not in timing} for r in straight]


def test_unreadable_checkpoints_give_a_one_line_error(two_epochs, tmp_path, capsys):
    run = _copy_unfinished(two_epochs, tmp_path)
    (run / ckpt.CHECKPOINT).write_bytes(b"")
    (run / ckpt.PREVIOUS_CHECKPOINT).unlink()
    assert cli.main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("normsam train: error: ") and "\n" not in err
    assert f"{run / ckpt.CHECKPOINT} cannot be read" in err and "empty, truncated or damaged" in err
    assert "Traceback" not in err

    (run / ckpt.CHECKPOINT).write_bytes(b"PK\x03\x04 not really a zip archive")
    shutil.copy(run / ckpt.CHECKPOINT, run / ckpt.PREVIOUS_CHECKPOINT)
    assert cli.main(["sharpness", str(run), "--steps", "1", "--n", "8", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("normsam sharpness: error: Neither checkpoint of") and "\n" not in err
    assert "train the run again" in err.lower()


# --- training a model left in eval() mode ----------------------------------------------------------------


def test_sam_warns_once_when_the_model_trains_in_eval_mode():
    model = make_cnn().eval()
    sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1)
    x, y = make_batch()
    with pytest.warns(UserWarning, match=r"eval\(\) mode.*running statistics never move.*model\.train\(\)"):
        sam.first_step(F.cross_entropy(model(x), y), zero_grad=True)
    sam.second_step(zero_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sam.first_step(F.cross_entropy(model(x), y), zero_grad=True)  # once only
        sam.second_step(zero_grad=True)
        trained = make_cnn().train()
        sam_train = normsam.SAM(trained, torch.optim.SGD, rho=0.5, lr=0.1)
        sam_train.first_step(F.cross_entropy(trained(x), y), zero_grad=True)  # train mode: silent


# --- compare: a measured cost column ---------------------------------------------------------------------


def test_compare_cost_column_is_measured_side_by_side(tmp_path, monkeypatch, capsys):
    import normsam.bench as bench
    from normsam.analysis.compare import compare

    calls = []
    real = bench.run_benchmark

    def spy(*args, **kwargs):
        calls.append(kwargs)
        calls[-1]["result"] = real(*args, **kwargs)
        return calls[-1]["result"]

    monkeypatch.setattr(bench, "run_benchmark", spy)
    overrides = {**TINY, "epochs": 1, "batch_size": 16}
    del overrides["scope"], overrides["rho"]
    result = compare(tmp_path / "cmp", overrides=overrides, bench_rounds=2)
    [call] = calls
    assert call["rounds"] == 2 and [v.name for v in call["variants"]] == ["SGD", "SAM-all", "SAM-ON (cheap ascent)"]
    measured = call["result"]
    assert [r["step_ratio"] for r in result["rows"]] == [measured["SGD"].median_ratio,
                                                           measured["SAM-all"].median_ratio,
                                                           measured["SAM-ON (cheap ascent)"].median_ratio]
    assert "step time / SGD (measured side by side; median, min–max of the rounds)" in result["table"]
    assert [r["method"] for r in result["rows"]] == ["SGD", "SAM-all (asam, ρ=0.1)", "SAM-ON (asam, ρ=0.5)"]
    out = capsys.readouterr().out
    assert f"Run folder: {tmp_path / 'cmp' / 'sgd'}" in out and f"Finished: {tmp_path / 'cmp' / 'sam-on'}" in out

    without = compare(tmp_path / "cmp", overrides=overrides, bench_rounds=0)  # finished runs reused
    assert "step time" not in without["table"] and len(calls) == 1


def test_compare_help_states_the_presets_subset(capsys):
    with pytest.raises(SystemExit):
        cli.main(["compare", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"the quick preset's {load_config('quick').subset}" in help_text


# --- small things -----------------------------------------------------------------------------------------


def test_environment_records_the_world_size(two_epochs):
    env = json.loads((two_epochs / ckpt.ENVIRONMENT).read_text())
    assert env["world_size"] == 1


def test_report_hint_fits_the_run(two_epochs, tmp_path, monkeypatch):
    from normsam.analysis.report import make_report

    no_checkpoint = tmp_path / "runs" / "fresh"

    def stop(self, epoch):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train_epoch", stop)
    with pytest.raises(KeyboardInterrupt):
        Trainer(_cfg(no_checkpoint)).run()
    make_report([no_checkpoint], out=tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "normsam train --config RUN_DIR/config.yaml out=RUN_DIR" in text and "--resume" not in text

    _copy_unfinished(two_epochs, tmp_path / "runs")
    make_report([tmp_path / "runs"], out=tmp_path / "report2")
    text = (tmp_path / "report2" / "report.md").read_text()
    assert "`normsam train --resume RUN_DIR`" in text and "out=RUN_DIR" in text


@pytest.mark.parametrize("name", SWEEP_EXAMPLES)
def test_example_sweeps_ship_with_the_package_and_match_configs(name, tmp_path, monkeypatch, capsys):
    packaged = sweep_file(name)
    assert Path(normsam.__file__).parent in packaged.parents
    assert packaged.read_bytes() == (REPO / "configs" / f"{name}.yaml").read_bytes()
    monkeypatch.chdir(tmp_path)  # no configs/ here, as after `pip install`
    assert sweep_file(f"configs/{name}.yaml") == packaged
    assert cli.main(["sweep", name, "--dry-run"]) == 0
    assert capsys.readouterr().out.strip().endswith("runs")
    assert "*.yaml" in (REPO / "pyproject.toml").read_text().split("presets/sweeps/")[1][:8]


def test_unknown_sweep_name_lists_the_examples(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["sweep", "sweep-tinyy", "--dry-run"]) == 2
    assert "sweep-tiny, sweep-fmnist-small, sweep-fmnist" in capsys.readouterr().err


# --- architecture -----------------------------------------------------------------------------------------


def _import_graph() -> dict[str, set[str]]:
    """Module → the normsam modules it imports anywhere (function bodies included); the package facade
    ``normsam`` itself is left out (it re-exports, and ``import normsam`` for the version is harmless)."""
    root = REPO / "src"
    modules = {}
    for path in (root / "normsam").rglob("*.py"):
        name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d in modules and d not in (name, "normsam")}
    return graph


def test_no_import_cycles_and_the_run_folder_below_loop_and_analysis():
    graph = _import_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                loop = path[path.index(dep):] if dep in path else []
                cycles.append(" -> ".join([*loop, module, dep]))
            elif dep not in state:
                visit(dep, path + [module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert cycles == []
    assert "normsam.train.loop" not in graph["normsam.train.run_sharpness"]
    assert {"normsam.train.run_folder"} <= graph["normsam.train.run_sharpness"] & graph["normsam.train.loop"]
    assert not {m for m in graph["normsam.train.run_folder"] if m.startswith("normsam.analysis")}
    from normsam.train import loop, run_folder

    assert loop.load_run_data is run_folder.load_run_data and loop.build_run_model is run_folder.build_run_model


def test_no_import_climbs_against_the_layers():
    """optim < sharpness < train < analysis < cli: a module imports only from its own floor or below (the
    benchmark sits beside the optimizer and needs nothing of the runner)."""
    graph = _import_graph()
    floors = {"optim": 0, "sharpness": 1, "train": 2, "analysis": 3, "integrations": 3, "cli": 4}

    def floor(module: str) -> int | None:
        parts = module.split(".")
        return floors.get(parts[1]) if len(parts) > 1 else None

    climbs = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                    if floor(m) is not None and floor(d) is not None and floor(d) > floor(m))
    assert climbs == []
    assert not {d for d in graph["normsam.bench"] if d.startswith(("normsam.train", "normsam.analysis"))}


def test_run_folder_reads_a_run(two_epochs):
    folder = RunFolder(two_epochs)
    cfg = folder.config()
    model, epoch = folder.model("cpu", cfg=cfg)
    state = torch.load(two_epochs / ckpt.CHECKPOINT, weights_only=True)["model"]
    assert epoch == 2 and all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert [r["epoch"] for r in folder.metrics()] == [1, 2] and folder.is_finished() and folder.has_checkpoint()
    with pytest.raises(FileNotFoundError, match="is not a run folder"):
        RunFolder(two_epochs / "nothing").config()


@pytest.fixture(scope="module")
def sparse_eval(tmp_path_factory):
    """Three epochs, scored after epochs 2 and 3 only, on 20 test images."""
    before = torch.get_num_threads()
    run = tmp_path_factory.mktemp("sparse") / "runs" / "sparse"
    summary = Trainer(_cfg(run, epochs=3, eval_every=2, eval_subset=20)).run()
    yield run, summary
    torch.set_num_threads(before)


def test_epochs_without_evaluation_do_not_break_the_summary(sparse_eval):
    run, summary = sparse_eval
    rows = RunFolder(run).metrics()
    assert ["test_acc" in r for r in rows] == [False, True, True]
    assert summary["final_test_acc"] == rows[-1]["test_acc"]
    assert summary["best_test_acc"] == max(r["test_acc"] for r in rows[1:])
    assert (run / ckpt.METRICS_CSV).read_text().splitlines()[1].count(",,") >= 1  # empty test cells in epoch 1


@pytest.mark.slow
def test_epochs_without_evaluation_do_not_break_the_report(sparse_eval, tmp_path):
    from normsam.analysis.report import make_report

    run, _ = sparse_eval
    make_report([run.parent], out=tmp_path / "report")
    assert (tmp_path / "report" / "training_curves.png").is_file()
