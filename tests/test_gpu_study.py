"""benchmarks/gpu_study.sh in its CPU smoke mode: the whole GPU study pipeline on tiny synthetic data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_study_smoke_mode_runs_both_regimes_end_to_end(tmp_path):
    env = {**os.environ, "NORMSAM_GPU_SMOKE": "1", "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
           "STUDY_RUNS": str(tmp_path / "runs")}
    done = subprocess.run(["bash", "benchmarks/gpu_study.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for regime, arms in (("noise", 8), ("clean", 3)):
        folder = tmp_path / "out" / f"gpu-study-{regime}"
        choice = json.loads((folder / "choice.json").read_text())
        assert {"@rho:all", "@rho:norm"} <= set(choice["values"])
        summaries = list((folder / "main").rglob("summary.json"))
        assert len(summaries) == arms * 3
        assert not list(folder.rglob("*.pt")), "checkpoints must not be brought back"
