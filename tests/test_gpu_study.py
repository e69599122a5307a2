"""benchmarks/gpu_study.sh in its CPU smoke mode: the whole GPU regime study pipeline on tiny synthetic data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_study_smoke_mode_runs_the_gate_pilot_and_phases_end_to_end(tmp_path):
    env = {**os.environ, "NORMSAM_GPU_SMOKE": "1", "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
           "STUDY_RUNS": str(tmp_path / "runs")}
    done = subprocess.run(["bash", "benchmarks/gpu_study.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    folder = tmp_path / "out" / "gpu-study-regime"
    gate = json.loads((folder / "gate.json").read_text())
    assert gate["passed"] and gate["margin"] == 0 and gate["seeds"] == [200, 201]
    choice = json.loads((folder / "choice.json").read_text())
    assert {"@rho:all", "@rho:norm", "@rho:norm/momentum", "@sparsity:norm"} <= set(choice["values"])
    assert len(list((folder / "main").rglob("summary.json"))) == 3 * 2 * 5  # 3 arms × 2 precisions × 5 seeds
    assert len(list((folder / "extra").rglob("summary.json"))) == 6 * 3
    momentum = list((folder / "extra").glob("*ascent=momentum*/seed=0/summary.json"))
    assert len(momentum) == 1
    record = json.loads((folder / "study.json").read_text())
    assert set(record["phases"]) == {"gate", "pilot", "main", "extra"}
    assert all(p["wall_clock_s"] > 0 for p in record["phases"].values())
    assert not list(folder.rglob("*.pt")), "checkpoints must not be brought back"
    assert "gate: noise cost" in done.stdout
