"""Scale features: fp16 GradScaler, bf16, gradient accumulation, clipping, DDP (2 gloo processes)."""

from __future__ import annotations

import json

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normsam
from normsam.train import checkpoint as ckpt
from normsam.train.config import load_config
from normsam.train.loop import Trainer
from tests.conftest import make_batch, make_cnn

TINY = dict(data="synthetic", image_size=8, subset=64, batch_size=32, eval_batch_size=256, epochs=2, threads=1,
            progress=False)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


# --- fp16 GradScaler ---------------------------------------------------------------------------------------


def _scaled_sam(dtype=torch.float32):
    model = make_cnn(dtype=dtype)
    sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9, scope="all", perturbation="fisher")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    return model, sam, scaler


def test_inf_in_the_ascent_gradient_skips_the_perturbation_and_counts_it():
    model, sam, scaler = _scaled_sam()
    x, y = make_batch(dtype=torch.float32)
    before = _params(model)
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    model.conv1.weight.grad[0, 0, 0, 0] = float("inf")  # an fp16 overflow in the first pass
    sam.first_step(zero_grad=True, grad_scaler=scaler)  # no warning: no host sync (the runner warns per epoch)
    assert sam.counters["nonfinite_ascent_steps"] == 1
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))  # no perturbation
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    model.head.bias.grad[0] = float("inf")  # ...and in the second: the scaler must skip the step
    sam.restore()
    scaler.step(sam.base_optimizer)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert scaler.get_scale() == 2.0**11


def test_weights_are_restored_when_the_scaler_skips_the_step():
    model, sam, scaler = _scaled_sam()
    x, y = make_batch(dtype=torch.float32)
    before = _params(model)
    sam.first_step(scaler.scale(F.cross_entropy(model(x), y)), grad_scaler=scaler)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), before))  # perturbed
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    model.head.weight.grad[0, 0] = float("nan")
    sam.restore()
    scaler.step(sam.base_optimizer)  # skipped
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert sam.counters["nonfinite_ascent_steps"] == 0


@pytest.mark.parametrize("pert", ["fisher", "asam", "sam"])
def test_the_scale_is_divided_out_of_the_ascent_gradient(pert):
    """Fisher-SAM depends on the gradient's magnitude: a scaled gradient must give the same ε."""
    results = []
    for scale in (None, 2.0**10):
        model = make_cnn()
        sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1, scope="all", perturbation=pert)
        x, y = make_batch()
        loss = F.cross_entropy(model(x), y)
        sam.first_step(loss * scale if scale else loss, grad_scaler=scale)
        results.append(_params(model))
        sam.restore()
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_runner_trains_with_autocast_on_the_cpu(tmp_path, amp):
    cfg = load_config(None, {**TINY, "amp": amp, "scope": "norm", "out": str(tmp_path / "run")})
    summary = Trainer(cfg).run()
    rows = ckpt.read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in rows)
    assert summary["epochs"] == 2


# --- accumulation --------------------------------------------------------------------------------------------


class GroupNormNet(nn.Module):
    """No BatchNorm: per-sample normalization, so micro-batching does not change the function."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.gn = nn.GroupNorm(2, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.gn(self.conv(x))).mean(dim=(2, 3)))


@pytest.mark.parametrize("scope", ["norm", "all"])
def test_accumulated_micro_batches_equal_one_large_batch(scope):
    torch.manual_seed(0)
    big = GroupNormNet().double()
    small = copy.deepcopy(big)
    kw = dict(rho=0.5, lr=0.1, momentum=0.9, scope=scope, perturbation="asam")
    sam_big, sam_small = normsam.SAM(big, torch.optim.SGD, **kw), normsam.SAM(small, torch.optim.SGD, **kw)
    for step in range(3):
        x, y = make_batch(seed=step, n=12)
        sam_big.first_step(F.cross_entropy(big(x), y), zero_grad=True)
        F.cross_entropy(big(x), y).backward()
        sam_big.second_step(zero_grad=True)

        chunks = list(zip(x.chunk(4), y.chunk(4)))
        for xi, yi in chunks:  # ascent: only the perturbed tensors' gradients, accumulated
            (F.cross_entropy(small(xi), yi) / 4).backward(inputs=sam_small.ascent_inputs())
        sam_small.first_step(zero_grad=True)
        for xi, yi in chunks:
            (F.cross_entropy(small(xi), yi) / 4).backward()
        sam_small.second_step(zero_grad=True)
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_runner_accumulation_matches_one_batch(tmp_path):
    base = {**TINY, "model": "resnet20", "norm": "group", "scope": "norm", "perturbation": "asam", "rho": 1.0,
            "augment": "none"}
    one = Trainer(load_config(None, {**base, "out": str(tmp_path / "a")})).run()
    four = Trainer(load_config(None, {**base, "accumulation": 4, "out": str(tmp_path / "b")})).run()
    a, b = (ckpt.read_jsonl(tmp_path / d / "metrics.jsonl") for d in "ab")
    for ra, rb in zip(a, b):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-4)
        assert rb["test_loss"] == pytest.approx(ra["test_loss"], rel=1e-4)
    assert four["epochs"] == one["epochs"]


# --- clipping ----------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("scope", ["none", "norm"])
def test_clipping_bounds_the_gradient_the_base_optimizer_sees(tmp_path, scope):
    cfg = load_config(None, {**TINY, "epochs": 1, "scope": scope, "clip_grad_norm": 0.05, "out": str(tmp_path / "r")})
    trainer = Trainer(cfg)
    norms = []
    original = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        return original(*args, **kwargs)

    trainer.optimizer.step = recording_step
    trainer.train_epoch(0)
    assert norms and max(norms) <= 0.05 * (1 + 1e-5)


# --- DDP -------------------------------------------------------------------------------------------------


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "normsam", "train", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


DDP_ARGS = [f"{k}={v}" for k, v in {**TINY, "model": "resnet20", "norm": "group", "scope": "norm",
                                     "perturbation": "asam", "rho": 2.0}.items()]


def test_ddp_synced_ascent_equals_one_process_on_the_global_batch(tmp_path):
    done = _torchrun([*DDP_ARGS, "sync_ascent=true", f"out={tmp_path / 'ddp'}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    single = load_config(None, {**TINY, "model": "resnet20", "norm": "group", "scope": "norm",
                                "perturbation": "asam", "rho": 2.0, "out": str(tmp_path / "one")})
    Trainer(single).run()
    ddp, one = (ckpt.read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("ddp", "one"))
    assert len(ddp) == len(one) == 2
    for a, b in zip(ddp, one):
        for key in ("train_loss", "train_loss_perturbed", "test_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    assert done.stdout.count("epoch   1/2") == 1  # logging on rank 0 only
    assert (tmp_path / "ddp" / "checkpoint.pt").is_file() and (tmp_path / "ddp" / "summary.json").is_file()
    assert _digests(tmp_path / "ddp") == DDP_RECORD["synced"]


#: The DDP runs' final weights as recorded before the core was rebuilt (issue 23; SHA-256 per tensor).
DDP_RECORD = json.loads((Path(__file__).parent / "data" / "ddp_regression.json").read_text())


def _digests(run_dir: Path) -> dict[str, str]:
    from tests.core_regression import digest

    return {k: digest(v) for k, v in torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"].items()}


def test_ddp_unsynced_ascent_runs(tmp_path):
    done = _torchrun([*DDP_ARGS, "epochs=1", f"out={tmp_path / 'ddp'}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = ckpt.read_jsonl(tmp_path / "ddp" / "metrics.jsonl")
    assert len(rows) == 1 and rows[0]["sam"]
    assert _digests(tmp_path / "ddp") == DDP_RECORD["unsynced"]


@pytest.mark.slow
def test_ddp_resume_equals_an_uninterrupted_ddp_run(tmp_path):
    import signal
    import time

    straight = _torchrun([*DDP_ARGS, "epochs=3", f"out={tmp_path / 'a'}"], tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    proc = subprocess.Popen(
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "normsam", "train", *DDP_ARGS, "epochs=3",
         f"out={tmp_path / 'b'}"], cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not (tmp_path / "b" / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    if (tmp_path / "b" / "summary.json").exists():
        pytest.skip("the run finished before the interrupt arrived")
    resumed = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "normsam", "train", "--resume", str(tmp_path / "b")],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (ckpt.read_jsonl(tmp_path / d / "metrics.jsonl") for d in "ab")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("epoch_time", "step_time", "images_per_s", "elapsed")} for r in rows]  # noqa: E731
    assert strip(a) == strip(b)
