"""`normsam bench`, the benchmark library and the GPU scripts on tiny models (behaviour, not speed)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from normsam import cli
from normsam.bench import (
    FLOOR, MOMENTUM, PEER, SAM_ALL, SAM_ON, SAM_ON_CLASSIC, SGD, BenchResult, StepContext, Target, VariantResult,
    default_variants, interval_name, run_benchmark,
)

ROOT = Path(__file__).resolve().parents[1]


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 10))


def _data(n=4):
    torch.manual_seed(1)
    return torch.randn(n, 3, 6, 6), torch.randint(0, 10, (n,))


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_run_benchmark_measures_every_variant_and_memory():
    pytest.importorskip("pytorch_optimizer")
    x, y = _data()
    result = run_benchmark(_tiny, x, y, variants=default_variants(classic=False), rounds=2, steps_per_round=1,
                           warmup=1, progress=False)
    names = [v.name for v in result.variants]
    assert names[:3] == [SGD, PEER, SAM_ALL] and SAM_ON in names and FLOOR in names
    for v in result.variants:
        if v.unavailable is None:
            assert len(v.step_times) == 2 and all(t > 0 for t in v.step_times)
    assert result[SGD].median_ratio == 1.0
    n_params = sum(p.numel() for p in _tiny().parameters())
    # SAM-all and the peer keep a copy of every weight; SAM-ON of the 16 norm parameters (plus their ε)
    assert result[SAM_ALL].extra_bytes >= 4 * n_params
    assert result[PEER].extra_bytes >= 4 * n_params
    assert 0 < result[SAM_ON].extra_bytes <= 4 * 16 * 4
    assert result[SAM_ALL].held_bytes > result[SGD].held_bytes > 4 * n_params  # the model copy, momentum
    table = result.table()
    assert f"| {SAM_ON} |" in table and f"| {PEER} |" in table
    assert f"| {SAM_ON} / {FLOOR} |" in table and f"| {SAM_ALL} / {PEER} |" in table
    assert result.settings["pytorch_optimizer"] is not None


def _train(variant_name: str, steps: int = 3) -> list[torch.Tensor]:
    """Parameters after ``steps`` steps of one variant, in float64 on a fixed batch."""
    model = _tiny().double()
    x, y = _data(8)
    variant = next(v for v in default_variants(handwritten_all=True) if v.name == variant_name)
    step = variant.build(model, StepContext())
    for _ in range(steps):
        step(x.double(), y)
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("ours, yardstick", [(SAM_ON, FLOOR), (SAM_ALL, PEER), (SAM_ALL, "hand-written SAM-all")])
def test_yardsticks_take_the_same_steps_as_normsam(ours, yardstick):
    # a yardstick that did less work (or other work) than normsam would make the ratios meaningless
    if yardstick == PEER:
        pytest.importorskip("pytorch_optimizer")
    a, b = _train(ours), _train(yardstick)
    start = [p.detach().double() for p in _tiny().parameters()]
    assert any(not torch.equal(p, q) for p, q in zip(a, start))
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-10)


def test_the_floor_perturbs_only_the_norm_layers():
    model = _tiny()
    x, y = _data()
    variant = next(v for v in default_variants() if v.name == FLOOR)
    step = variant.build(model, StepContext(lr=0.0, momentum=0.0, weight_decay=0.0))
    seen = {0: [], 1: []}
    hooks = [model[i].register_forward_pre_hook(lambda m, _, i=i: seen[i].append(m.weight.detach().clone()))
             for i in seen]
    before = copy.deepcopy(model.state_dict())
    step(x, y)
    for hook in hooks:
        hook.remove()
    assert not torch.equal(*seen[1])  # the second pass saw γ + ε
    assert torch.equal(*seen[0])  # and the conv's weight as it was
    for key, value in model.state_dict().items():  # lr 0: everything is restored exactly
        if "running" not in key and "num_batches" not in key:
            assert torch.equal(value, before[key]), key


def test_a_missing_peer_is_one_clear_row(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_optimizer", None)  # import fails as if not installed
    x, y = _data()
    variants = default_variants(handwritten=False, classic=False, ascent_interval=None)
    result = run_benchmark(_tiny, x, y, variants=variants, rounds=1, steps_per_round=1, warmup=1,
                           measure_memory=False, progress=False)
    assert "pip install 'normsam[bench]'" in result[PEER].unavailable and not result[PEER].step_times
    table = result.table([Target(SAM_ALL, PEER, 1.02)])
    assert f"| {PEER} | not installed: pip install 'normsam[bench]'" in table
    assert f"| {SAM_ALL} / {PEER} | n/a ({PEER} did not run) | <= 1.02 | n/a |" in table
    assert result.ratio(SAM_ALL, PEER) is None and result.check(Target(SAM_ALL, PEER, 1.02)) is None
    assert json.loads(json.dumps(result.to_dict()))["variants"][1]["unavailable"].startswith("not installed")


def test_a_variant_that_cannot_run_leaves_the_next_ones_memory_alone(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_optimizer", None)
    x, y = _data()
    variants = [v for v in default_variants() if v.name in (SGD, PEER, SAM_ALL)]
    result = run_benchmark(_tiny, x, y, variants=variants, rounds=1, steps_per_round=1, warmup=1, progress=False)
    assert result[PEER].unavailable  # and SAM-all, built next, still counts its copy of every weight
    assert result[SAM_ALL].extra_bytes >= 4 * sum(p.numel() for p in _tiny().parameters())


def test_yardsticks_refuse_what_they_cannot_do():
    x, y = _data()
    result = run_benchmark(_tiny, x, y, context=StepContext(perturbation="linf"),
                           variants=default_variants(classic=False, ascent_interval=None), rounds=1,
                           steps_per_round=1, warmup=1, measure_memory=False, progress=False)
    assert "ℓ2 SAM only" in result[FLOOR].unavailable
    assert result[SAM_ON].unavailable is None and len(result[SAM_ON].step_times) == 1
    with pytest.raises(ValueError, match="baseline of the ratios and must run"):
        run_benchmark(_tiny, x, y, context=StepContext(perturbation="linf"),
                      variants=[v for v in default_variants() if v.name == FLOOR], progress=False)


def test_the_ascent_interval_variant_skips_the_first_pass_on_reuse_steps():
    model = _tiny()
    x, y = _data()
    variant = next(v for v in default_variants(ascent_interval=4) if v.name == interval_name(4))
    step = variant.build(model, StepContext())
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    for _ in range(8):
        step(x, y)
    assert len(calls) == 8 + 2  # a second pass every step, a first pass on steps 0 and 4 only


def test_a_round_times_whole_ascent_cycles():
    # with k = 4 and 3 steps per round, a round of 3 steps would hold 0 or 1 fresh ascents: biased medians
    calls: list[int] = []

    class Counted(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _tiny()

        def forward(self, x):
            calls.append(id(self))
            return self.net(x)

    x, y = _data()
    variants = [v for v in default_variants(ascent_interval=4) if v.name in (SGD, interval_name(4))]
    run_benchmark(Counted, x, y, variants=variants, rounds=2, steps_per_round=3, warmup=1, measure_memory=False,
                  progress=False)
    sgd_model, interval_model = dict.fromkeys(calls)  # first seen first: SGD builds and warms up first
    assert calls.count(sgd_model) == 1 + 2 * 3
    assert calls.count(interval_model) == 2 + 2 * (4 + 1)  # warm-up: one ascent step; rounds: 4 steps, 1 ascent


def test_the_fast_mode_rows_run_and_are_timed():
    # normsam's SAM always has ascent_interval and the momentum ascent: their rows carry figures, never a reason
    x, y = _data()
    k = 2
    variants = [v for v in default_variants(ascent_interval=k) if v.name in (SGD, interval_name(k), MOMENTUM)]
    result = run_benchmark(_tiny, x, y, variants=variants, rounds=1, steps_per_round=1, warmup=1,
                           measure_memory=False, progress=False)
    for name in (interval_name(k), MOMENTUM):
        assert result[name].unavailable is None and len(result[name].step_times) == 1, result[name].unavailable
    assert result.ratio(interval_name(k), SGD) is not None
    assert f"| {interval_name(k)} / {SGD} | n/a" not in result.table()


def test_the_momentum_row_says_why_it_cannot_take_fisher():
    x, y = _data()
    variants = [v for v in default_variants() if v.name in (SGD, MOMENTUM)]
    result = run_benchmark(_tiny, x, y, context=StepContext(perturbation="fisher"), variants=variants, rounds=1,
                           steps_per_round=1, warmup=1, measure_memory=False, progress=False)
    assert "ascent='momentum' never computes" in result[MOMENTUM].unavailable


def test_ratios_are_medians_of_per_round_ratios_and_targets_print_pass_or_fail():
    def res(name, times):
        return VariantResult(name, step_times=times, ratios=[t / s for t, s in zip(times, [1.0, 2.0, 1.0])])

    result = BenchResult([res(SGD, [1.0, 2.0, 1.0]), res(FLOOR, [1.0, 2.0, 1.0]), res(SAM_ON, [1.02, 2.2, 1.01])],
                         settings={})
    # per round 1.02, 1.10, 1.01: the median is 1.02, not the ratio of the medians (1.02 / 1.0)
    assert result.ratio(SAM_ON, FLOOR) == pytest.approx(1.02)
    table = result.table([Target(SAM_ON, FLOOR, 1.03), Target(SAM_ON, SGD, 1.01)])
    assert f"| {SAM_ON} / {FLOOR} | 1.020 | <= 1.03 | PASS |" in table
    assert f"| {SAM_ON} / {SGD} | 1.020 | <= 1.01 | FAIL |" in table
    assert result.check(Target(SAM_ON, SGD, 1.01)) is False
    with pytest.raises(KeyError, match="no variant 'nope'"):
        result["nope"]


def test_bf16_context_and_variant_list():
    assert [v.name for v in default_variants(handwritten=False, peer=False, ascent_interval=None)] == [
        SGD, SAM_ALL, SAM_ON_CLASSIC, SAM_ON, MOMENTUM]
    assert [v.name for v in default_variants(classic=False)] == [SGD, PEER, SAM_ALL, SAM_ON, interval_name(4), MOMENTUM,
                                                                 FLOOR]
    x, y = _data()
    result = run_benchmark(_tiny, x, y, context=StepContext(amp="bf16"),
                           variants=default_variants(False, peer=False, ascent_interval=None),
                           rounds=1, steps_per_round=1, warmup=1, measure_memory=False, progress=False)
    assert result.settings["amp"] == "bf16" and result[SGD].extra_bytes is None


def test_bench_runs_every_variant_on_the_upcast_bf16_kernels(monkeypatch):
    """--bf16-kernels upcast: each variant's steps (forward and backward) run inside the upcast context."""
    import normsam.optim.amp as amp

    entered = []
    real = amp.upcast_bf16_matmuls
    monkeypatch.setattr("normsam.bench.context.upcast_bf16_matmuls", lambda k: entered.append(k) or real(k))
    x, y = _data()
    result = run_benchmark(_tiny, x, y, context=StepContext(amp="bf16", bf16_kernels="upcast"),
                           variants=default_variants(False, peer=False, ascent_interval=None),
                           rounds=1, steps_per_round=1, warmup=1, measure_memory=False, progress=False)
    assert result.settings["bf16_kernels"] == "upcast" and result[SAM_ON].median_ms > 0
    assert len(entered) == 2 * 5 and set(entered) == {"upcast"}  # warm-up + round, 5 variants
    with pytest.raises(ValueError, match="set amp=bf16 or drop bf16_kernels"):
        StepContext(bf16_kernels="upcast")


def test_bench_cli_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = cli.main(["bench", "--model", "resnet8", "--batch-size", "2", "--image-size", "8", "--rounds", "1",
                     "--steps-per-round", "1", "--warmup", "1", "--threads", "1", "--no-memory", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "resnet8, batch 2" in text and f"| {SAM_ALL} / {PEER} |" in text
    data = json.loads(out.read_text())
    assert {v["name"] for v in data["variants"]} >= {SGD, PEER, SAM_ALL, SAM_ON, FLOOR}
    assert cli.main(["bench", "--model", "resnet8", "--batch-size", "2", "--image-size", "8", "--rounds", "1",
                     "--steps-per-round", "1", "--warmup", "1", "--threads", "1", "--no-memory", "--no-handwritten",
                     "--amp", "bf16", "--bf16-kernels", "upcast"]) == 0
    assert "amp=bf16, bf16_kernels=upcast, compile=False" in capsys.readouterr().out
    assert cli.main(["bench", "--bf16-kernels", "upcast"]) == 2  # without --amp bf16: refused, one line
    assert cli.main(["bench", "--device", "cuda"] if not torch.cuda.is_available() else ["bench", "--rounds", "0"]) == 2


def test_gpu_checks_skip_cleanly_without_cuda(monkeypatch, capsys):
    checks = _script("gpu_checks")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert checks.main([]) == 0
    assert capsys.readouterr().out.startswith("SKIP gpu_checks: no CUDA here")


def test_step_time_host_overhead_smoke(capsys):
    step_time = _script("step_time")
    assert step_time.main(["--mode", "host-overhead", "--smoke", "--no-memory"]) == 0
    out = capsys.readouterr().out
    assert "ResNet-56, host overhead (smoke): batch 2 × 3×8×8" in out and "1 threads" in out
    assert f"| {SAM_ON} / {FLOOR} |" in out and "<= 1.03 |" in out and "<= 1.02 |" in out


@pytest.mark.slow
def test_gpu_sh_smoke_mode_runs_end_to_end(tmp_path):
    """gpu.sh with NORMSAM_GPU_SMOKE=1: every check and the four-model table, on the CPU, tiny settings."""
    env = {**os.environ, "NORMSAM_GPU_SMOKE": "1", "OUT": str(tmp_path), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "benchmarks/gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    checks = (tmp_path / "checks.txt").read_text()
    assert checks.count("PASS ") == 6 and "FAIL" not in checks
    table = (tmp_path / "bench.md").read_text()
    for label in ("WRN-10-1", "ResNet-8", "test_vit", "test_resnet"):
        assert f"| {label}" in table or f"| timm {label}" in table
    data = json.loads((tmp_path / "bench-gpu.json").read_text())
    assert len(data) == 4 and all(d["settings"]["amp"] == "bf16" for d in data.values())


def test_ascent_fraction_variant_takes_the_sub_batch_ascent():
    """The benchmark's ascent_fraction row trains like SAM-ON whose ascent sees the first ⌈f·B⌉ examples."""
    import normsam
    from normsam.bench import fraction_name

    model, reference = _tiny().double(), _tiny().double()
    x, y = _data(8)
    x = x.double()
    variant = next(v for v in default_variants(ascent_fraction=0.25) if v.name == fraction_name(0.25))
    step = variant.build(model, StepContext())
    ctx = StepContext()
    sam = normsam.SAM(reference, torch.optim.SGD, rho=ctx.rho_on, **ctx.base_kwargs())
    for _ in range(2):
        step(x, y)
        sam.first_step(nn.functional.cross_entropy(reference(x[:2]), y[:2]), zero_grad=True)
        nn.functional.cross_entropy(reference(x), y).backward()
        sam.second_step(zero_grad=True)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-10)
    full = _train(SAM_ON, steps=2)
    assert any(not torch.allclose(p, q) for p, q in zip(model.parameters(), full))
