"""`normsam bench` and the benchmark library on a tiny model (behaviour, not speed)."""

from __future__ import annotations

import json

import torch
from torch import nn

from normsam import cli
from normsam.bench import StepContext, default_variants, run_benchmark


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 10))


def test_run_benchmark_measures_every_variant_and_memory():
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 10, (4,))
    result = run_benchmark(_tiny, x, y, rounds=2, steps_per_round=1, warmup=1, progress=False)
    names = [v.name for v in result.variants]
    assert names[0] == "SGD" and "SAM-ON (cheap ascent)" in names and "hand-written SAM-ON (cheap ascent)" in names
    for v in result.variants:
        assert len(v.step_times) == 2 and all(t > 0 for t in v.step_times)
    assert result["SGD"].median_ratio == 1.0
    n_params = sum(p.numel() for p in _tiny().parameters())
    # SAM-all backs up every weight; SAM-ON only the 16 norm parameters (plus their ε)
    assert result["SAM-all"].extra_bytes >= 4 * n_params
    assert 0 < result["SAM-ON (cheap ascent)"].extra_bytes <= 4 * 16 * 4
    assert "| SAM-ON (cheap ascent) |" in result.table()


def test_bf16_context_and_variant_list():
    assert [v.name for v in default_variants(handwritten=False)] == [
        "SGD", "SAM-all", "SAM-ON (classic first pass)", "SAM-ON (cheap ascent)"]
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 10, (4,))
    result = run_benchmark(_tiny, x, y, context=StepContext(amp="bf16"), variants=default_variants(False),
                           rounds=1, steps_per_round=1, warmup=1, measure_memory=False, progress=False)
    assert result.settings["amp"] == "bf16" and result["SGD"].extra_bytes is None


def test_bench_cli_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = cli.main(["bench", "--model", "resnet20", "--batch-size", "4", "--image-size", "8", "--rounds", "1",
                     "--steps-per-round", "1", "--warmup", "1", "--threads", "1", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "resnet20, batch 4" in text and "1,568 of 272,474 parameters in norm layers" in text
    data = json.loads(out.read_text())
    assert {v["name"] for v in data["variants"]} >= {"SGD", "SAM-all", "SAM-ON (cheap ascent)"}
    assert cli.main(["bench", "--device", "cuda"] if not torch.cuda.is_available() else ["bench", "--rounds", "0"]) == 2
