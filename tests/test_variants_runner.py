"""SAM's variants through the training runner (issue "Every SAM variant the field uses, on every scope"): each
variant trains on tiny synthetic data, differs from plain SAM, resumes exactly; a multi-step ascent; the config
errors; the method labels; the fingerprints of existing runs; sweeps with the variants as arms; DDP with 2 gloo
processes equal to one process on the global batch, and refused without ``sync_ascent`` where the processes'
weights would drift apart."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from normsam import cli
from normsam.train import checkpoint as ckpt
from normsam.train.config import load_config
from normsam.train.config_help import check_overrides_take_effect
from normsam.train.identity import config_fingerprint
from normsam.train.loop import Trainer
from tests.test_runner import TINY, _cfg, _metrics, _without_timing, interrupt_after_one_epoch_and_resume
from tests.test_scale import DDP_ARGS, _torchrun

#: name → (the variant's keys, the scope its plain-SAM twin shares). 2 steps per epoch, 4 in all: LookSAM's k=3
#: takes full steps 0 and 3, so the resume (at step 2) needs its stored orthogonal gradient. GCSAM centralizes
#: tensors of dim > 1, which SAM-ON does not perturb: it runs on SAM-all.
CASES = {
    "gsam": dict(variant="gsam", alpha=0.3, rho_min=0.1),
    "wsam": dict(variant="wsam"),
    "wsam-coupled": dict(variant="wsam", gamma=0.6, decouple=False),
    "looksam": dict(variant="looksam", ascent_interval=3),
    "looksam-tensor": dict(variant="looksam", ascent_interval=3, reuse_norms="tensor", alpha=0.5),
    "friendly-sam": dict(variant="friendly-sam", sigma=0.5),
    "gcsam": dict(centralize=True, scope="all", rho=0.1),
    "multi-step": dict(ascent_steps=2),
    "gsam-descent-all": dict(variant="gsam", descent_over="all"),
}
SAM_KEYS_OF = ("scope", "rho")  # what a case's plain-SAM twin takes from it


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(run_dir) / "checkpoint.pt", weights_only=True)["model"]


def _counters(run_dir: Path) -> dict[str, int]:
    return torch.load(Path(run_dir) / "checkpoint.pt", weights_only=True)["optimizer"]["sam"]["counters"]


@pytest.fixture(scope="module")
def plain_sam(tmp_path_factory):
    """Plain SAM's metrics per (scope, rho), trained once for the module."""
    runs: dict[tuple, list[dict]] = {}

    def metrics(**keys) -> list[dict]:
        key = tuple(sorted(keys.items()))
        if key not in runs:
            out = tmp_path_factory.mktemp("sam")
            Trainer(load_config(None, {**TINY, **keys, "out": str(out / "run")})).run()
            runs[key] = _without_timing(_metrics(out / "run"))
        return runs[key]

    return metrics


@pytest.mark.parametrize("name", list(CASES))
def test_each_variant_trains_differs_from_sam_and_resumes_exactly(tmp_path, monkeypatch, plain_sam, name):
    keys = CASES[name]
    straight = Trainer(_cfg(tmp_path / "a", **keys)).run()
    rows = _without_timing(_metrics(tmp_path / "a" / "run"))
    assert straight["sam_steps"] == 4 and straight["method"] == _cfg(tmp_path, **keys).method
    assert all(torch.isfinite(torch.tensor([r["train_loss"], r["test_loss"]])).all() for r in rows)
    twin = plain_sam(**{k: keys[k] for k in SAM_KEYS_OF if k in keys})
    assert [r["test_loss"] for r in rows] != [r["test_loss"] for r in twin], "trained as plain SAM"

    resumed = interrupt_after_one_epoch_and_resume(_cfg(tmp_path / "b", **keys), monkeypatch)
    assert _without_timing(_metrics(tmp_path / "b" / "run")) == rows
    assert resumed["final_test_acc"] == straight["final_test_acc"]
    a, b = _weights(tmp_path / "a" / "run"), _weights(tmp_path / "b" / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)
    if name.startswith("looksam"):  # full steps 0 and 3 only; the others one pass at w
        for run in ("a", "b"):
            assert _counters(tmp_path / run / "run")["ascent_steps"] == 2
    if name == "gsam":  # ρ follows the cosine lr from 0.5 down to rho_min = 0.1 at lr 0
        assert rows[0]["rho"] < 0.5 and rows[1]["rho"] < rows[0]["rho"] and rows[1]["rho"] >= 0.1


@pytest.mark.parametrize("name", ["gsam", "wsam-coupled", "looksam", "multi-step"])
def test_fp16_grad_scaler_and_clipping_take_the_runners_route(tmp_path, name):
    """The descent rule rewrites the unscaled, clipped second-pass gradient inside ``scaler.step``; an ascent
    gradient left scaled (x 2^16) would blow the update up."""
    summary = Trainer(_cfg(tmp_path, **CASES[name], amp="fp16", clip_grad_norm=1.0, epochs=1)).run()
    rows = _metrics(tmp_path / "run")
    assert summary["sam_steps"] == 2 and summary["nonfinite_ascent_steps"] == 0
    assert all(0 < r["train_loss"] < 5 and 0 < r["test_loss"] < 10 for r in rows), rows


def test_a_multi_step_ascent_runs_the_ascent_pass_again_on_the_same_examples(tmp_path, monkeypatch):
    calls: list[tuple[bool, int]] = []
    original = Trainer._accumulate

    def counting(self, x, y, *, ascent):
        calls.append((ascent, x.shape[0]))
        return original(self, x, y, ascent=ascent)

    monkeypatch.setattr(Trainer, "_accumulate", counting)
    summary = Trainer(_cfg(tmp_path, ascent_steps=3, ascent_fraction=0.5, epochs=1)).run()
    assert summary["sam_steps"] == 2 and summary["method"] == "norm-sam-rho0.5-frac0.5-ascentsteps3"
    # per step: 3 ascent passes on the first 16 of 32 examples, then the second pass on all 32
    assert calls == [(True, 16)] * 3 + [(False, 32)] + [(True, 16)] * 3 + [(False, 32)]


def test_descent_over_all_computes_every_ascent_gradient(tmp_path, monkeypatch):
    """The cheap ascent computes the perturbed tensors' gradients only; the descent rule over every tensor
    needs them all."""
    seen: list[int] = []
    from normsam.optim.descent import GSAMDescent

    original = GSAMDescent.remember

    def remember(self, params, grads):
        seen.append(sum(g is not None for g in grads))
        return original(self, params, grads)

    monkeypatch.setattr(GSAMDescent, "remember", remember)
    trainer = Trainer(_cfg(tmp_path, variant="gsam", descent_over="all", epochs=1))
    trainer.run()
    trainable = sum(p.requires_grad for p in trainer.model.parameters())
    assert seen == [trainable, trainable]


# --- the config ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(variant="wsam", alpha=0.3), r"alpha=0\.3 is an option of variant='gsam' or 'looksam', and "
                                      r"variant='wsam' would ignore it"),
    (dict(variant="gsam", gamma=0.5), r"gamma=0\.5 is an option of variant='wsam'"),
    (dict(decouple=False), r"decouple=False is an option of variant='wsam', and variant='sam' would ignore it"),
    (dict(variant="gsam", reuse_norms="tensor"), r"reuse_norms='tensor' is an option of variant='looksam'"),
    (dict(variant="looksam", ascent_interval=2, sigma=0.5), r"sigma=0\.5 is an option of variant='friendly-sam'"),
    (dict(variant="friendly-sam", lmbda=1.5), r"Invalid lmbda: 1\.5"),
    (dict(variant="looksam"), r"variant='looksam' takes a full SAM step every k-th step, k = ascent_interval"),
    (dict(variant="gsam", ascent_interval=2), r"variant='gsam' combines the gradients .* drop ascent_interval"),
    (dict(descent_over="all"), r"descent_over='all' chooses what a descent rule acts on, and variant='sam' has none"),
    (dict(variant="friendly-sam", ascent_steps=2), r"ascent_steps > 1 would update Friendly-SAM's gradient average"),
    (dict(variant="gsam", ascent="momentum", bn_policy="update"), r"ascent='momentum' takes no pass at w"),
    (dict(variant="gsamm"), r"Invalid variant: 'gsamm'; valid values are sam, gsam, wsam, looksam, friendly-sam"),
    (dict(ascent_steps=0), r"ascent_steps must be >= 1, got 0"),
    (dict(rho_min=0.1, rho_warmup_epochs=1), r"rho_min=0\.1 .* and rho_warmup_epochs=1 .* are two rho schedules, and "
                                             r"a run has one: drop one of them"),
    (dict(rho_min=0.8), r"rho_min=0\.8 is above rho=0\.5"),
    (dict(rho_min=-0.1), r"rho_min must be >= 0 and finite"),
    (dict(scope="none", rho_min=0.1), r"rho_min=0\.1 makes SAM's rho follow the learning rate, and scope=none"),
])
def test_config_errors_surface_when_the_config_is_loaded(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _cfg(tmp_path, **overrides)
    assert not (tmp_path / "run").exists()


def test_variant_keys_with_scope_none_on_the_command_line_are_refused():
    with pytest.raises(ValueError, match=r"scope=none trains with the plain base optimizer, so alpha=0\.3, "
                                         r"variant=gsam would be ignored"):
        check_overrides_take_effect({"scope": "none", "variant": "gsam", "alpha": 0.3})


@pytest.mark.parametrize(("overrides", "label"), [
    ({}, "norm-sam-rho0.5"),
    (dict(variant="gsam"), "norm-sam-rho0.5-gsam"),
    (dict(variant="gsam", alpha=0.4), "norm-sam-rho0.5-gsam"),  # alpha at GSAM's default: the same method
    (dict(variant="gsam", alpha=0.2, rho_min=0.05), "norm-sam-rho0.5-gsam-alpha0.2-rhomin0.05"),
    (dict(variant="gsam", descent_over="all"), "norm-sam-rho0.5-gsam-descentall"),
    (dict(variant="wsam", gamma=0.8, decouple=False), "norm-sam-rho0.5-wsam-gamma0.8-coupled"),
    (dict(variant="wsam", decouple=True), "norm-sam-rho0.5-wsam"),
    (dict(variant="looksam", ascent_interval=5), "norm-sam-rho0.5-looksam-k5"),
    (dict(variant="looksam", ascent_interval=5, alpha=0.5, reuse_norms="tensor"),
     "norm-sam-rho0.5-looksam-k5-alpha0.5-tensornorms"),
    (dict(variant="friendly-sam", sigma=0.5, lmbda=0.8), "norm-sam-rho0.5-friendly-sam-sigma0.5-lmbda0.8"),
    (dict(centralize=True, scope="all", perturbation="asam"), "all-asam-rho0.5-gc"),
    (dict(ascent_steps=2), "norm-sam-rho0.5-ascentsteps2"),
    (dict(ascent_interval=4), "norm-sam-rho0.5-ascent4"),  # (as before: SAM's fast mode)
    (dict(scope="none", variant="gsam"), "sgd"),
])
def test_the_method_label_names_the_variant_and_its_non_default_options(tmp_path, overrides, label):
    assert _cfg(tmp_path, **overrides).method == label


def test_existing_configs_keep_their_fingerprint(tmp_path):
    """Recorded before the variant keys existed (the same configs at the previous commit)."""
    assert config_fingerprint(load_config(None, dict(TINY))) == "dc87098c5aeb"
    assert config_fingerprint(load_config(None, {})) == "cfd902229cfa"
    assert config_fingerprint(load_config("quick", {})) == "a80690473f51"
    at_defaults = dict(variant="sam", alpha=None, gamma=None, decouple=None, reuse_norms=None, sigma=None, lmbda=None,
                       centralize=False, ascent_steps=1, descent_over="perturbed", rho_min=None)
    assert config_fingerprint(load_config(None, {**TINY, **at_defaults})) == "dc87098c5aeb"
    assert config_fingerprint(load_config(None, {**TINY, "variant": "gsam"})) != "dc87098c5aeb"


def test_a_sweep_takes_the_variants_as_arms(tmp_path):
    spec = {
        "base": {**TINY, "epochs": 1},
        "grid": [{"variant": ["sam", "gsam", "wsam"]}, {"variant": ["looksam"], "ascent_interval": [2]},
                 {"ascent_steps": [2], "centralize": [True]}],
        "seeds": [0],
        "out": str(tmp_path / "sweep"),
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert cli.main(["sweep", str(path)]) == 0
    methods = {}
    for summary in (tmp_path / "sweep").glob("*/seed=0/summary.json"):
        record = yaml.safe_load(summary.read_text())
        methods[summary.parent.parent.name] = (record["method"], record["sam_steps"])
    assert methods == {
        "variant=sam": ("norm-sam-rho0.5", 2), "variant=gsam": ("norm-sam-rho0.5-gsam", 2),
        "variant=wsam": ("norm-sam-rho0.5-wsam", 2),
        "variant=looksam,ascent_interval=2": ("norm-sam-rho0.5-looksam-k2", 2),
        "ascent_steps=2,centralize=true": ("norm-sam-rho0.5-gc-ascentsteps2", 2),
    }
    bad = {**spec, "grid": [{"variant": ["wsam"], "alpha": [0.3]}], "out": str(tmp_path / "bad")}
    path.write_text(yaml.safe_dump(bad, sort_keys=False))
    assert cli.main(["sweep", str(path)]) == 2  # refused when the sweep is planned, before any training
    assert not list((tmp_path / "bad").glob("*/seed=0/checkpoint.pt"))


# --- DDP ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["gsam", "wsam", "looksam"])
def test_a_descent_rule_under_ddp_without_sync_ascent_is_refused_before_anything_loads(tmp_path, monkeypatch,
                                                                                        variant):
    keys = dict(variant=variant, ascent_interval=2) if variant == "looksam" else dict(variant=variant)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=rf"variant={variant} under DDP needs sync_ascent=true: .* their weights "
                                         "would drift apart"):
        Trainer(_cfg(tmp_path, **keys))
    assert not (tmp_path / "run").exists()
    _cfg(tmp_path, **keys, sync_ascent=True).check_world_size(2)  # the fix
    _cfg(tmp_path, variant="friendly-sam").check_world_size(2)  # its ε is each worker's own, as SAM's
    _cfg(tmp_path, **keys).check_world_size(1)


DRIFT = """
import os
import torch, torch.distributed as dist, torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
import normsam

dist.init_process_group("gloo")
rank = dist.get_rank()
for variant, extra in [("gsam", {}), ("wsam", {}), ("looksam", {"ascent_interval": 2}), ("friendly-sam", {}),
                       ("sam", {})]:
    for sync in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.ReLU(), nn.Linear(12, 3))
        ddp = DistributedDataParallel(model)
        sam = normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1, variant=variant, sync_ascent=sync, **extra)
        for step in range(4):
            g = torch.Generator().manual_seed(100 * step + rank)
            x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
            if sam.needs_ascent:
                with ddp.no_sync():
                    F.cross_entropy(ddp(x), y).backward(inputs=sam.ascent_inputs())
            sam.first_step(zero_grad=True)
            F.cross_entropy(ddp(x), y).backward()
            sam.second_step(zero_grad=True)
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        both = [torch.zeros_like(flat) for _ in range(2)]
        dist.all_gather(both, flat)
        if rank == 0:
            print(f"{variant} {sync} {float((both[0] - both[1]).abs().max())}", flush=True)
dist.barrier()
os._exit(0)  # (not the interpreter's finalization, where gloo's worker threads may abort: see close_process_group)
"""


def test_without_sync_ascent_a_descent_rule_makes_the_ddp_replicas_drift_apart(tmp_path):
    """Why the runner refuses it: DDP keeps the second pass's gradients in step, and a descent rule adds each
    process's own ascent gradient to them; SAM and Friendly-SAM only perturb with it, and stay in step."""
    script = tmp_path / "drift.py"
    script.write_text(DRIFT)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(script)], cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    gaps = {(v, s == "True"): float(d) for v, s, d in (line.split() for line in done.stdout.split("\n") if line)}
    for variant in ("gsam", "wsam", "looksam"):
        assert gaps[variant, False] > 1e-4 and gaps[variant, True] == 0.0, variant
    for variant in ("friendly-sam", "sam"):
        assert gaps[variant, False] == 0.0 == gaps[variant, True], variant


DDP_CASES = {
    "gsam": ["variant=gsam", "alpha=0.3", "rho_min=0.5"],
    "gsam-descent-all": ["variant=gsam", "descent_over=all"],
    "looksam": ["variant=looksam", "ascent_interval=2"],
}


@pytest.mark.parametrize("name", list(DDP_CASES))
def test_ddp_synced_variant_equals_one_process_on_the_global_batch(tmp_path, name):
    keys = DDP_CASES[name]
    done = _torchrun([*DDP_ARGS, *keys, "sync_ascent=true", f"out={tmp_path / 'ddp'}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    single = dict(arg.split("=", 1) for arg in [*DDP_ARGS, *keys])
    Trainer(load_config(None, [f"{k}={v}" for k, v in {**single, "out": str(tmp_path / "one")}.items()])).run()
    ddp, one = (ckpt.read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("ddp", "one"))
    assert len(ddp) == len(one) == 2
    for a, b in zip(ddp, one):
        for key in ("train_loss", "train_loss_perturbed", "test_loss", "rho"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    a, b = _weights(tmp_path / "ddp"), _weights(tmp_path / "one")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
