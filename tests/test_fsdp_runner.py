"""``normsam train ... parallel=fsdp`` under torchrun (2 gloo processes): sharded checkpoints, resume, analysis."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from normsam.train import checkpoint as ckpt
from normsam.train import fsdp
from normsam.train.run_folder import RunFolder

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))
pytestmark = pytest.mark.skipif(TORCHRUN is None, reason="needs torchrun")

ARGS = [f"{k}={v}" for k, v in dict(
    data="synthetic", image_size=8, subset=64, batch_size=32, eval_batch_size=256, threads=1, progress=False,
    model="resnet20", norm="group", scope="norm", perturbation="asam", rho=2.0, parallel="fsdp",
).items()]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TIMING = ("epoch_time", "step_time", "images_per_s", "elapsed")


def _train(args: list[str], cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["timeout", "280", TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "-m", "normsam", "train", *args],
        cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300,
    )


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _with(args: list[str], **changes) -> list[str]:
    return [a for a in args if a.split("=")[0] not in changes] + [f"{k}={v}" for k, v in changes.items()]


def _test_loss_of_checkpoint(run: Path) -> float:
    """The test loss of the run's checkpoint, evaluated in this process as the runner evaluates."""
    import torch.nn.functional as F

    from normsam.train.run_folder import load_run_data
    from normsam.train.setup import Distributed, build_loaders

    folder = RunFolder(run)
    cfg = folder.config()
    data = load_run_data(cfg)
    model, _ = folder.model("cpu", cfg=cfg, data=data)
    model.eval()
    _, evals = build_loaders(cfg, data, Distributed(), torch.device("cpu"))
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in evals["test"]:
            total += F.cross_entropy(model(x).float(), y, reduction="sum").item()
            n += y.shape[0]
    return total / n


def test_fsdp_run_writes_a_sharded_checkpoint_that_analysis_reads(tmp_path):
    """With BatchNorm: the checkpoint holds rank 0's running statistics, those of the recorded evaluation (DCP
    used to write rank 1's, which analysis then read, and a resume continued from)."""
    run = tmp_path / "run"
    done = _train([*_with(ARGS, norm="batch"), "epochs=2", f"out={run}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert fsdp.is_complete(run / fsdp.CHECKPOINT_DIR) and fsdp.is_complete(run / fsdp.PREVIOUS_DIR)
    assert not (run / ckpt.CHECKPOINT).exists()  # no single-file checkpoint: every rank wrote its shards
    assert len(list((run / fsdp.CHECKPOINT_DIR).glob("*.distcp"))) == 2
    rows = ckpt.read_jsonl(run / ckpt.METRICS_JSONL)
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["sam"] for r in rows)
    assert len(ckpt.read_jsonl(run / ckpt.NORM_STATS)) == 3  # epochs 0, 1, 2, from the gathered weights
    assert RunFolder(run).config().sync_ascent is True  # recorded as what FSDP2 does
    # one process, no torchrun: the full model from the shards (what `normsam sharpness` uses)
    model, epoch = RunFolder(run).model("cpu")
    assert epoch == 2
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())
    recorded = ckpt.read_jsonl(run / ckpt.METRICS_JSONL)[-1]["test_loss"]
    assert _test_loss_of_checkpoint(run) == pytest.approx(recorded, rel=1e-6)
    from normsam.analysis.run_sharpness import measure_run_sharpness

    result = measure_run_sharpness(run, rho=0.003, steps=2, n=32, m=16, progress=False)
    assert result["sharpness"] == result["sharpness"]  # a number, not NaN
    from normsam.analysis.report import make_report

    written = make_report([run], out=tmp_path / "report")
    report = (tmp_path / "report" / "report.md").read_text()
    final = f"{ckpt.read_jsonl(run / ckpt.METRICS_JSONL)[-1]['test_acc']:.2f}"
    assert any(p.name == "report.md" for p in written) and "1 runs (1 finished, 0 diverged, 0 unfinished)" in report
    assert final in report  # the run's final test accuracy, read from its files
    # resuming with another number of processes is refused: each rank's data order depends on it
    (run / ckpt.SUMMARY).unlink()
    other = subprocess.run(
        ["timeout", "200", TORCHRUN, "--standalone", "--nproc_per_node=1", "-m", "normsam", "train", "--resume",
         str(run)], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=240,
    )
    assert other.returncode != 0
    assert "trained by 2 processes" in other.stderr and "--nproc_per_node=2" in other.stderr


@pytest.mark.slow  # 15 s under torchrun; FSDP2's momentum ascent step is also checked in tests/test_fsdp.py
def test_fsdp_run_with_the_momentum_ascent(tmp_path):
    """parallel=fsdp sets sync_ascent for the gradient ascent only: the momentum ascent, which refuses
    sync_ascent, trains (it used to stop with "drop sync_ascent", a key the user never set)."""
    run = tmp_path / "run"
    done = _train([*ARGS, "ascent=momentum", "bn_policy=update", "epochs=2", "norm_stats=false", f"out={run}"],
                  tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = ckpt.read_jsonl(run / ckpt.METRICS_JSONL)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert RunFolder(run).config().sync_ascent is False


def test_fsdp_without_torchrun_is_refused(tmp_path):
    from normsam.train.config import load_config, parse_overrides
    from normsam.train.loop import Trainer

    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}
    try:
        with pytest.raises(ValueError, match="start the run with torchrun"):
            Trainer(load_config(None, {**parse_overrides(ARGS), "out": str(tmp_path / "r")}))
    finally:
        os.environ.update(env)


@pytest.mark.parametrize("key, value", [("amp", "fp16"), ("compile", True)])
def test_fsdp_refuses_what_it_cannot_run(key, value):
    from normsam.train.config import load_config

    with pytest.raises(ValueError, match=f"parallel=fsdp does not support {key}"):
        load_config(None, {"parallel": "fsdp", key: value})


def test_incomplete_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    """A crash between DCP's writes and rank 0's seal leaves checkpoint.dcp/ without normsam.pt."""
    for name in (fsdp.CHECKPOINT_DIR, fsdp.PREVIOUS_DIR):
        (tmp_path / name).mkdir()
        (tmp_path / name / ".metadata").write_bytes(b"x")
    torch.save({"epoch": 1, "world_size": 2}, tmp_path / fsdp.PREVIOUS_DIR / "normsam.pt")
    assert fsdp.newest_complete(tmp_path) == tmp_path / fsdp.PREVIOUS_DIR
    (tmp_path / fsdp.PREVIOUS_DIR / "normsam.pt").unlink()
    assert fsdp.newest_complete(tmp_path) is None


def test_blocks_are_the_elements_of_containers():
    from torch import nn

    from normsam.train.models import build_model

    resnet = build_model("resnet20", num_classes=3, in_channels=3, image_size=8, norm="group")
    chosen = fsdp.blocks(resnet)
    assert len(chosen) == 9 and all(type(b).__name__ == "BasicBlock" for b in chosen)
    mlp = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.LayerNorm(3), nn.Linear(3, 2))
    assert fsdp.blocks(mlp) == [mlp[0], mlp[2], mlp[3]]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["ascent_interval=2", "subset=96"], ["norm=batch"],
                                   ["variant=looksam", "ascent_interval=2", "subset=96"], ["variant=friendly-sam"]],
                         ids=["plain", "ascent-interval", "batchnorm", "looksam", "friendly-sam"])
def test_fsdp_run_equals_ddp_synced_run_and_resumes_exactly_after_kill_9(tmp_path, extra):
    """parallel=fsdp trains the same run as DDP with sync_ascent=true; killed (SIGKILL to every process)
    after its first checkpoint and resumed, it ends with the metrics and the weights (buffers included) of an
    uninterrupted run. With ascent_interval=2 and 3 steps per epoch, the first step after the resume reuses
    the stored ε, which the sharded checkpoint holds as DTensors. With BatchNorm, each rank's running
    statistics are its own (buffers are not sharded): the resumed rank 0 used to get rank 1's from the
    checkpoint, and epoch 2's test loss was not the uninterrupted run's. LookSAM's orthogonal gradient and
    Friendly-SAM's gradient average are local shards too, kept in the checkpoint's shards as DTensors."""
    args = _with(ARGS, **dict(a.split("=") for a in extra))
    straight = _train([*args, "epochs=3", f"out={tmp_path / 'a'}"], tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    ddp_args = [a for a in args if not a.startswith("parallel=")] + ["sync_ascent=true"]
    ddp = _train([*ddp_args, "epochs=3", f"out={tmp_path / 'ddp'}"], tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, d = (ckpt.read_jsonl(tmp_path / r / ckpt.METRICS_JSONL) for r in ("a", "ddp"))
    for ra, rd in zip(a, d):
        for key in ("train_loss", "test_loss", "train_loss_perturbed"):
            assert ra[key] == pytest.approx(rd[key], rel=1e-5, abs=1e-6), key

    proc = subprocess.Popen(
        [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "normsam", "train", *args, "epochs=3",
         f"out={tmp_path / 'b'}"], cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 200
    while not fsdp.is_complete(tmp_path / "b" / fsdp.CHECKPOINT_DIR) and time.time() < deadline:
        time.sleep(0.01)
    psutil = pytest.importorskip("psutil")
    everyone = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in everyone:  # kill -9 of the agent and both workers (torchrun starts them in their own sessions)
        p.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    if (tmp_path / "b" / ckpt.SUMMARY).exists():
        pytest.skip("the run finished before the kill arrived")
    resumed = subprocess.run(
        ["timeout", "280", TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "normsam", "train", "--resume",
         str(tmp_path / "b")], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    b = ckpt.read_jsonl(tmp_path / "b" / ckpt.METRICS_JSONL)
    assert _strip(a) == _strip(b)
    final_a, final_b = (fsdp.read_checkpoint(tmp_path / r)["model"] for r in ("a", "b"))
    assert final_a.keys() == final_b.keys()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a), [
        k for k in final_a if not torch.equal(final_a[k], final_b[k])]


_EXIT_SCRIPT = """
import atexit, os, sys

def gloo_threads_at_exit():  # registered first, so it runs after normsam's own exit handler
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            names.append(open(f"/proc/self/task/{tid}/comm").read().strip())
        except OSError:  # a thread that ended meanwhile
            pass
    print("gloo threads at exit:", sum("gloo" in n for n in names), flush=True)

atexit.register(gloo_threads_at_exit)

import torch
from normsam import SAM
from normsam.train import fsdp
from normsam.train.setup import Distributed

def main():
    Distributed().init(torch.device("cpu"), always=True)
    torch.manual_seed(0)
    model = fsdp.shard_model(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2)),
                             torch.device("cpu"))
    sam = SAM(model, torch.optim.SGD, scope="norm", rho=0.1, lr=0.1)
    x = torch.randn(8, 4)
    sam.first_step(model(x).square().mean(), zero_grad=True)
    model(x).square().mean().backward()
    sam.second_step(zero_grad=True)
    fsdp.save(sys.argv[1], model, sam.base_optimizer, {"epoch": 1, "sam": None}, sam=sam)

main()
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_a_finished_fsdp_process_joins_the_gloo_threads_before_the_interpreter_finalizes(tmp_path):
    """A gloo worker frees a finished collective's tensors after the caller has moved on, which may need the
    GIL; asked for once the interpreter finalizes, that ends the thread with "terminate called without an
    active exception" (SIGABRT), after all the work was done (the FSDP benchmark failed 3 runs in 4 so).
    destroy_process_group() alone left the threads running (the sharded model's mesh, DTensor's caches and
    torch.distributed.nn still held the group); at exit the runner's process group is now freed and its
    threads joined, before the interpreter finalizes: deterministic, where the abort was a race."""
    script = tmp_path / "exit.py"
    script.write_text(_EXIT_SCRIPT)
    (tmp_path / "run").mkdir()
    done = subprocess.run(
        ["timeout", "200", TORCHRUN, "--standalone", "--nproc_per_node=2", str(script), str(tmp_path / "run")],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert fsdp.is_complete(tmp_path / "run" / fsdp.CHECKPOINT_DIR)
    assert done.stdout.count("gloo threads at exit: 0") == 2, done.stdout


@pytest.mark.slow  # ~25 s on the shared 2-core machine; the non-slow suite has a budget
def test_the_fsdp_example_runs_as_the_readme_shows(tmp_path):
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        ["timeout", "200", TORCHRUN, "--standalone", "--nproc_per_node=2", str(root / "examples" / "fsdp_sam_on.py"),
         "--tiny"], cwd=root, env=ENV, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "scope='norm'" in done.stdout and "in 5 tensors" in done.stdout  # the 5 RMSNorm weights
    assert "done: 4 SAM-ON steps on 2 processes" in done.stdout


@pytest.mark.slow
def test_the_fsdp_benchmark_runs_in_smoke_mode():
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        ["timeout", "200", TORCHRUN, "--standalone", "--nproc_per_node=2",
         str(root / "benchmarks" / "fsdp_step_time.py"), "--smoke"],
        cwd=root, env={**ENV, "PYTHONPATH": str(root / "src")}, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for variant in ("AdamW (no SAM)", "normsam SAM-ON", "normsam SAM-all", "hand-written SAM-all"):
        assert f"| {variant} |" in done.stdout
