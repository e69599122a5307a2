"""`normsam bench`, the benchmark library and the GPU scripts on tiny models (behaviour, not speed)."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
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


def test_rounds_alternate_their_order_so_no_variant_always_runs_first_or_after_the_same_one():
    """Rounds run the variants forward, then reversed, …; each variant's time is still its own."""
    from normsam.bench.context import Variant
    from normsam.bench.timing import round_order

    assert [round_order(r, 3) for r in range(3)] == [[0, 1, 2], [2, 1, 0], [0, 1, 2]]
    calls: list[str] = []

    def variant(name: str, seconds: float) -> Variant:
        def build(model, ctx):
            def step(x, y):
                calls.append(name)
                time.sleep(seconds)
            return step
        return Variant(name, build)

    x, y = _data()
    result = run_benchmark(_tiny, x, y, variants=[variant("a", 0.0), variant("b", 0.02), variant("c", 0.0)],
                           rounds=2, steps_per_round=1, warmup=0, measure_memory=False, progress=False)
    assert calls == ["a", "b", "c", "c", "b", "a"]
    assert all(t >= 0.02 for t in result["b"].step_times) and all(t < 0.02 for t in result["c"].step_times)


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
    variants = [v for v in default_variants(ascent_interval=4) if v.name in (SGD, interval_name(4))]
    sgd, interval = _counted_forwards(variants, steps_per_round=3)  # first seen first: SGD builds and warms up first
    assert sgd == 1 + 2 * 3
    assert interval == 2 + 2 * (4 + 1)  # warm-up: one ascent step; rounds: 4 steps, 1 ascent


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
    assert "ResNet-20, host overhead (smoke): batch 2 × 3×8×8" in out  # the cpu mode's weights
    assert f"| {SAM_ON} / {FLOOR} |" in out and "<= 1.03 |" in out and "<= 1.02 |" in out


@pytest.mark.slow
def test_gpu_sh_smoke_mode_runs_end_to_end(tmp_path):
    """gpu.sh with NORMSAM_GPU_SMOKE=1: every check, the four-model table and the variants, on the CPU, tiny."""
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
    variants = json.loads((tmp_path / "bench-variants.json").read_text())
    names = {v["name"] for v in variants["variants"]}
    assert {"GSAM (all)", "GSAM (norm)", "LookSAM (all)", "SAM-ON, ascent_steps=2"} <= names


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


# --- SAM's variants beside pytorch_optimizer's classes (--variants) ------------------------------------------

from normsam.bench import (  # noqa: E402
    MULTI_STEP, SAM_VARIANT_KEYS, VARIANT_FAMILIES, VARIANT_TARGETS, VariantSettings, multi_step_name, peer_name,
    sam_variants, variant_name,
)

FAMILY_ROWS = [(variant_name(f, "all"), peer_name(f), variant_name(f, "norm")) for f in VARIANT_FAMILIES.values()]


def test_every_sam_variant_row_is_timed_and_has_its_ratios():
    pytest.importorskip("pytorch_optimizer")
    x, y = _data()
    variants = default_variants(classic=False, ascent_interval=None, momentum=False, variants=SAM_VARIANT_KEYS,
                                settings=VariantSettings(looksam_k=2))
    result = run_benchmark(_tiny, x, y, variants=variants, rounds=2, steps_per_round=1, warmup=1,
                           measure_memory=False, progress=False)
    new = [name for rows in FAMILY_ROWS for name in rows] + [multi_step_name(2)]
    assert [v.name for v in result.variants][-len(new):] == new
    for name in new:
        row = result[name]
        assert row.unavailable is None and len(row.step_times) == 2 and len(row.ratios) == 2, (name, row.unavailable)
    for all_, peer, norm in FAMILY_ROWS:
        assert result.ratio(all_, peer) is not None and result.ratio(norm, all_) is not None
        assert result[all_].cycle == result[peer].cycle == result[norm].cycle == (2 if "LookSAM" in all_ else 1)
    assert result.ratio(multi_step_name(2), SAM_ON) is not None
    table = result.table()
    assert "| SAM variant | normsam, scope=all: ms (×SGD) | pytorch_optimizer: ms (×SGD) |" in table
    for family in VARIANT_FAMILIES.values():
        line = next(line for line in table.splitlines() if line.startswith(f"| {family} |"))
        assert "| <= 1.00 |" in line and "| < 1.00 |" in line and line.count("PASS") + line.count("FAIL") == 2
    assert "LookSAM (all), pytorch_optimizer.LookSAM, LookSAM (norm): each round times whole cycles of k=2" in table
    assert f"| {multi_step_name(2)} / {SAM_ON} |" in table

    data = json.loads(json.dumps(result.to_dict()))
    rows = {v["name"]: v for v in data["variants"]}
    assert set(rows[SGD]) >= {"name", "unavailable", "median_step_ms", "median_ratio_to_sgd", "extra_peak_bytes",
                              "step_times_s", "cycle", "notes"}
    assert rows["LookSAM (norm)"]["cycle"] == 2 and rows["LookSAM (norm)"]["notes"]
    assert all(rows[name]["median_ratio_to_sgd"] is not None for name in new)
    for all_, peer, norm in FAMILY_ROWS:
        assert data["ratios"][f"{all_} / {peer}"] is not None and data["ratios"][f"{norm} / {all_}"] is not None
    assert [t["ratio"] for t in data["targets"]] == [f"{t.numerator} / {t.denominator}" for t in VARIANT_TARGETS]
    assert {t["verdict"] for t in data["targets"]} <= {"PASS", "FAIL"}
    assert all(set(t) == {"ratio", "value", "limit", "strict", "met", "verdict"} for t in data["targets"])


def _counted_forwards(variants, steps_per_round, rounds=2, warmup=1) -> list[int]:
    """Forward passes each variant's model ran, in the order of ``variants`` (build, warm-up and rounds)."""
    calls: list[int] = []

    class Counted(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _tiny()

        def forward(self, x):
            calls.append(id(self))
            return self.net(x)

    x, y = _data()
    run_benchmark(Counted, x, y, variants=variants, rounds=rounds, steps_per_round=steps_per_round, warmup=warmup,
                  measure_memory=False, progress=False)
    return [calls.count(model) for model in dict.fromkeys(calls)]


def test_looksam_rows_time_whole_cycles_with_the_same_mix_of_steps_on_both_sides():
    # k = 3, 2 steps per round: each round times 3 steps, 1 full SAM step (2 passes) + 2 single-pass steps, for
    # normsam and the peer alike (the peer without the pass at w its first_step() would discard)
    pytest.importorskip("pytorch_optimizer")
    variants = [v for v in default_variants(variants=("looksam",), settings=VariantSettings(looksam_k=3))
                if v.name == SGD or "LookSAM" in v.name]
    assert [v.name for v in variants] == [SGD, "LookSAM (all)", "pytorch_optimizer.LookSAM", "LookSAM (norm)"]
    counts = _counted_forwards(variants, steps_per_round=2)
    assert counts == [1 + 2 * 2] + [2 + 2 * (3 + 1)] * 3  # warm-up: one full step; rounds: 3 steps, 4 passes


def test_the_multi_step_ascent_row_takes_k_plus_one_passes():
    variants = [v for v in default_variants(variants=(MULTI_STEP,)) if v.name in (SGD, multi_step_name(2))]
    assert _counted_forwards(variants, steps_per_round=2) == [1 + 2 * 2, 3 * (1 + 2 * 2)]


def _train_row(name: str, settings: VariantSettings, steps: int) -> list[torch.Tensor]:
    model = _tiny().double()
    x, y = _data(8)
    variant = next(v for v in sam_variants(settings=settings) if v.name == name)
    step = variant.build(model, StepContext())
    for _ in range(steps):
        step(x.double(), y)
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("family", ["GSAM", "WSAM", "LookSAM", "FriendlySAM"])
def test_the_variant_rows_take_the_same_steps_as_pytorch_optimizer(family):
    # same hyperparameters, same arithmetic: the ratio compares equal work (GCSAM's peer divides by the norm before
    # centralization, normsam by the paper's, so there the steps differ a little by definition)
    pytest.importorskip("pytorch_optimizer")
    settings = VariantSettings(looksam_k=2)
    ours = _train_row(variant_name(family, "all"), settings, steps=5)
    theirs = _train_row(peer_name(family), settings, steps=5)
    start = [p.detach().double() for p in _tiny().parameters()]
    assert any(not torch.equal(p, q) for p, q in zip(ours, start))
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-9)


def test_variant_rows_without_the_peer_or_the_settings_say_why(monkeypatch):
    with pytest.raises(ValueError, match="Unknown variant 'sam-x'; the benchmark has gsam, wsam"):
        sam_variants(("sam-x",))
    with pytest.raises(ValueError, match="LookSAM's k must be an int >= 2"):
        VariantSettings(looksam_k=1)
    monkeypatch.setitem(sys.modules, "pytorch_optimizer", None)
    x, y = _data()
    variants = default_variants(False, classic=False, ascent_interval=None, momentum=False, variants=("gsam",))
    result = run_benchmark(_tiny, x, y, variants=variants, rounds=1, steps_per_round=1, warmup=1,
                           measure_memory=False, progress=False)
    assert result["pytorch_optimizer.GSAM"].unavailable.startswith("not installed: pip install 'normsam[bench]'")
    assert result["GSAM (all)"].step_times and result["GSAM (norm)"].step_times
    line = next(line for line in result.table().splitlines() if line.startswith("| GSAM |"))
    assert "| n/a (pytorch_optimizer.GSAM did not run) | <= 1.00 | n/a |" in line and "| < 1.00 | " in line
    assert result.to_dict()["targets"][0]["verdict"] == "n/a"
    monkeypatch.undo()
    pytest.importorskip("pytorch_optimizer")
    fp16 = run_benchmark(_tiny, x, y, variants=variants, context=StepContext(amp="fp16"), rounds=1, steps_per_round=1,
                         warmup=1, measure_memory=False, progress=False)
    assert "no GradScaler path" in fp16["pytorch_optimizer.GSAM"].unavailable and fp16["GSAM (norm)"].step_times


def test_variant_targets_pass_at_or_below_the_peer_and_strictly_below_scope_all():
    def res(name, times):
        return VariantResult(name, step_times=times, ratios=[1.0] * len(times))

    result = BenchResult([res(SGD, [1.0]), res("GSAM (all)", [2.0]), res("pytorch_optimizer.GSAM", [2.0]),
                          res("GSAM (norm)", [2.0])], settings={})
    assert [result.verdict(t) for t in result.variant_targets()] == ["PASS", "FAIL"]  # 1.00 <= 1.00; 1.00 is not < 1
    assert "| 1.000 | <= 1.00 | PASS | 1.000 | < 1.00 | FAIL |" in result.variants_table()
    assert Target("a", "b", 1.0, strict=True).shown == "< 1.00" and Target("a", "b", 1.03).shown == "<= 1.03"


def test_bench_cli_and_step_time_list_and_run_the_variants(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    cli_help = capsys.readouterr().out
    step_time = _script("step_time")
    with pytest.raises(SystemExit):
        step_time.main(["--help"])
    script_help = capsys.readouterr().out
    for text in (cli_help, script_help):
        assert "--variants" in text and "--looksam-k" in text
        flat_text = " ".join(text.split())
        for key in SAM_VARIANT_KEYS:
            assert key in flat_text, key
        assert "pytorch_optimizer.SAM(use_gc=True)" in flat_text

    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--model", "resnet8", "--batch-size", "2", "--image-size", "8", "--rounds", "1",
                     "--steps-per-round", "1", "--warmup", "1", "--threads", "1", "--no-memory", "--no-handwritten",
                     "--variants", "wsam", "--json", str(out)]) == 0
    assert "| WSAM | " in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert [t["ratio"] for t in data["targets"]] == ["WSAM (all) / pytorch_optimizer.WSAM", "WSAM (norm) / WSAM (all)"]
    assert data["settings"]["variant_settings"]["wsam_gamma"] == 0.9

    out = tmp_path / "step_time.json"
    assert step_time.main(["--mode", "host-overhead", "--smoke", "--no-memory", "--variants", "looksam", "multi-step",
                           "--looksam-k", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| LookSAM | " in text and "each round times whole cycles of k=2 steps" in text
    assert f"| {multi_step_name(2)} |" in text
    assert "(all) / peer: outside the passes [95% CI] |" in text  # the CPU splits every step
    case, _resnet20 = json.loads(out.read_text()).values()
    assert case["peer_intervals"]["LookSAM (all) / pytorch_optimizer.LookSAM"]["outside"] is not None
    assert {t["ratio"] for t in case["targets"]} >= {"LookSAM (all) / pytorch_optimizer.LookSAM",
                                                     "LookSAM (norm) / LookSAM (all)", f"{SAM_ALL} / {PEER}"}
    assert case["settings"]["variant_settings"]["looksam_k"] == 2


class _SlowBackward(torch.autograd.Function):
    """Identity whose backward sleeps: a backward pass of known length."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(0.03)
        return grad


class _SlowModel(nn.Module):
    """A forward of at least 20 ms and a backward of at least 30 ms."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3 * 6 * 6, 10)

    def forward(self, x):
        time.sleep(0.02)
        return _SlowBackward.apply(self.linear(x.flatten(1)))


@pytest.mark.parametrize("how", ["backward", "autograd.grad"])
def test_the_pass_clock_times_forward_and_backward_and_leaves_the_optimizer_outside(how):
    """A step = the loss's forward and backward (≥ 50 ms, in the passes) + 40 ms of 'optimizer' work (outside)."""
    from normsam.bench.context import Variant, loss

    def build(model, ctx):
        def step(x, y):
            batch_loss = loss(model, x, y, ctx)
            if how == "backward":
                batch_loss.backward()
            else:
                torch.autograd.grad(batch_loss, list(model.parameters()))
            time.sleep(0.04)
        return step

    x, y = _data()
    result = run_benchmark(_SlowModel, x, y, variants=[Variant("slow", build)], rounds=2, steps_per_round=1,
                           warmup=0, measure_memory=False, progress=False)
    v = result["slow"]
    assert len(v.pass_times) == 2
    assert all(0.05 <= p < 0.09 for p in v.pass_times), v.pass_times
    assert all(0.04 <= o < 0.08 for o in v.outside_times), v.outside_times


def test_the_pass_clock_counts_only_while_running_and_once_at_a_time():
    from normsam.bench.passes import PassClock

    clock = PassClock()
    model = _SlowModel()
    x, _ = _data()
    out = model(x).sum()
    clock.arm_backward(out)  # not running: nothing is armed
    clock.add_forward(1.0)
    out.backward()
    assert clock.seconds == 0.0
    with clock.running():
        out = model(x).sum()
        clock.arm_backward(out)
        out.backward()
        with pytest.raises(RuntimeError, match="already running"):
            with clock.running():
                pass
    assert 0.03 <= clock.seconds < 0.07 and not clock.active


def test_peer_table_gives_the_whole_step_its_passes_and_the_time_outside_them_with_intervals():
    from normsam.analysis.stats import describe

    def res(name, steps, passes=()):
        return VariantResult(name, step_times=steps, pass_times=list(passes), ratios=[1.0] * len(steps))

    mine = res("GSAM (all)", [1.00, 1.10, 0.95], [0.90, 1.00, 0.85])  # outside: 0.10, 0.10, 0.10
    peer = res("pytorch_optimizer.GSAM", [1.02, 1.08, 0.97], [0.90, 0.96, 0.85])  # outside: 0.12 each
    result = BenchResult([res(SGD, [0.5, 0.5, 0.5]), mine, peer], settings={})
    whole = result.ratio_interval("GSAM (all)", "pytorch_optimizer.GSAM")
    logs = describe([math.log(a / b) for a, b in zip(mine.step_times, peer.step_times)])
    assert whole.mean == pytest.approx(math.exp(logs.mean))
    assert (whole.lo, whole.hi) == (pytest.approx(math.exp(logs.lo)), pytest.approx(math.exp(logs.hi)))
    passes = result.ratio_interval("GSAM (all)", "pytorch_optimizer.GSAM", part="passes")
    assert passes.mean == pytest.approx((1.0 * (1.00 / 0.96) * 1.0) ** (1 / 3))
    outside = result.ratio_interval("GSAM (all)", "pytorch_optimizer.GSAM", part="outside")
    assert outside.mean == pytest.approx(0.10 / 0.12) and outside.hi - outside.lo < 1e-6  # the same every round
    with pytest.raises(ValueError, match="Unknown part 'optimizer'; use one of step, passes, outside"):
        result.ratio_interval("GSAM (all)", "pytorch_optimizer.GSAM", part="optimizer")
    table = result.peer_table()
    assert f"| GSAM | {whole.text(3)} | {passes.text(3)} | 100.00 | 120.00 | 0.833 [0.833, 0.833] |" in table
    assert "| SAM | " not in table  # SAM-all and the peer did not run
    found = result.to_dict()["peer_intervals"]["GSAM (all) / pytorch_optimizer.GSAM"]
    assert found["outside"][0] == pytest.approx(0.10 / 0.12) and found["passes"][0] == pytest.approx(passes.mean)

    # a GPU run has no split: the whole step's interval only, and the table says why the rest is missing
    gpu = BenchResult([res(SGD, [0.5, 0.5]), res("GSAM (all)", [1.0, 1.0]), res("pytorch_optimizer.GSAM", [1.0, 1.1])],
                      settings={})
    assert "not split (GPU)" in gpu.peer_table()
    found = gpu.to_dict()["peer_intervals"]["GSAM (all) / pytorch_optimizer.GSAM"]
    assert found["passes"] is None and found["outside"] is None and found["step"] is not None
    assert BenchResult([res(SGD, [0.5])], settings={}).peer_table() == ""
    # SAM-all beside pytorch_optimizer.SAM: SAM's own row, first
    sam = BenchResult([res(SGD, [0.5, 0.5]), res(PEER, [1.0, 1.0], [0.9, 0.9]), res(SAM_ALL, [0.9, 0.9], [0.85, 0.85]),
                       *gpu.variants[1:]], settings={})
    assert sam.peer_table().splitlines()[2].startswith("| SAM | 0.900 [0.900, 0.900] | 0.944 [0.944, 0.944] | 50.00 "
                                                       "| 100.00 | 0.500")
    assert list(sam.to_dict()["peer_intervals"]) == [f"{SAM_ALL} / {PEER}", "GSAM (all) / pytorch_optimizer.GSAM"]


def test_a_saved_run_prints_the_same_tables_again(tmp_path, capsys):
    """--json then --tables: the tables come back as the run printed them (targets, variants, the split)."""
    step_time = _script("step_time")
    out = tmp_path / "run.json"
    assert step_time.main(["--mode", "host-overhead", "--smoke", "--no-memory", "--rounds", "2", "--variants", "wsam",
                           "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert step_time.main(["--tables", str(out)]) == 0
    again = capsys.readouterr().out
    for table in ("| variant | median step (ms)", "| ratio | value | target | verdict |", "| SAM variant | normsam",
                  "| SAM or variant | (all) / peer"):
        def blocks(text):
            return [chunk[chunk.index(table):] for chunk in text.split("\n\n") if table in chunk]

        assert len(blocks(printed)) == 2, table  # one per case (ResNet-56, ResNet-20)
        assert blocks(printed) == blocks(again), table
    assert "<= 1.02 | PASS" in again or "<= 1.02 | FAIL" in again  # the mode's targets, as saved

    assert step_time.main(["--tables", str(out), str(out)]) == 0  # two runs of a case: pooled, round by round
    assert "4 rounds × 1 steps (2 runs pooled" in capsys.readouterr().out

    (tmp_path / "bad.json").write_text("{not json")
    assert step_time.main(["--tables", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert "cannot read it" in err and "pass a file written by --json" in err


def test_pooled_runs_put_their_rounds_in_sequence_and_refuse_different_variants():
    def result(steps, passes):
        return BenchResult([VariantResult(SGD, step_times=[1.0] * len(steps), ratios=[1.0] * len(steps)),
                            VariantResult(SAM_ALL, step_times=steps, pass_times=passes, ratios=steps)],
                           settings={"rounds": len(steps), "device": "CPU"})

    pooled = BenchResult.pooled([result([2.0, 2.2], [1.8, 2.0]), result([2.4], [2.1])])
    assert pooled[SAM_ALL].step_times == [2.0, 2.2, 2.4] and pooled[SAM_ALL].pass_times == [1.8, 2.0, 2.1]
    assert pooled[SAM_ALL].ratios == [2.0, 2.2, 2.4] and pooled.settings == {"rounds": 3, "device": "CPU"}
    other = BenchResult([VariantResult(SGD, step_times=[1.0], ratios=[1.0])], settings={"rounds": 1})
    with pytest.raises(ValueError, match="Only runs of the same variants pool: run them with the same options"):
        BenchResult.pooled([result([2.0], [1.8]), other])
    with pytest.raises(ValueError, match="Nothing to pool"):
        BenchResult.pooled([])
    missing_peer = result([2.0], [1.8])
    missing_peer[SAM_ALL].unavailable, missing_peer[SAM_ALL].step_times = "not installed", []
    with pytest.raises(ValueError, match="SAM-all ran in some of them only"):
        BenchResult.pooled([result([2.0], [1.8]), missing_peer])
