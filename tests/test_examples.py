"""The integration examples under examples/ run as a user would run them, from the repository root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("script, expect", [
    ("examples/hf_trainer.py", "sam_steps"),
    ("examples/lightning_sam_on.py", "global_step="),
])
def test_example_runs(script, expect):
    done = subprocess.run([sys.executable, script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert expect in done.stdout
