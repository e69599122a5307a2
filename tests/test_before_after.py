"""benchmarks/before_after.py: interleaved runs of two checkouts' step_time.py, ratios from their JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("before_after", ROOT / "benchmarks" / "before_after.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree(root: Path, name: str, sam_on_ms: float, *, exit_code: int = 0, write: bool = True) -> Path:
    """A stand-in checkout whose step_time.py writes fixed figures (as the real one's --json) and exits."""
    tree = root / name
    (tree / "benchmarks").mkdir(parents=True)
    record = {"cpu": {"variants": [
        {"name": "SGD", "median_step_ms": 10.0},
        {"name": "SAM-ON (cheap ascent)", "median_step_ms": sam_on_ms},
        {"name": "hand-written SAM-ON", "median_step_ms": 16.0},
        {"name": "SAM-all", "median_step_ms": 21.0},
        {"name": "pytorch_optimizer.SAM", "median_step_ms": 20.0},
    ]}}
    body = [
        "import json, sys",
        "out = sys.argv[sys.argv.index('--json') + 1]",
        f"json.dump({record!r}, open(out, 'w'))" if write else "print('boom', file=sys.stderr)",
        f"sys.exit({exit_code})",
    ]
    (tree / "benchmarks" / "step_time.py").write_text("\n".join(body) + "\n")
    return tree


def test_ratios_of_both_trees_even_when_a_target_of_step_time_fails(tmp_path, capsys):
    before = _tree(tmp_path, "before", 18.0)
    after = _tree(tmp_path, "after", 16.0, exit_code=1)  # a failed target: exit 1, figures written
    out = tmp_path / "ratios.json"
    assert _script().main([str(before), str(after), "--repeats", "2", "--json", str(out), "--", "--mode", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "| SAM-ON / hand-written SAM-ON | 1.125 (1.125, 1.125) | 1.000 (1.000, 1.000) |" in printed
    assert "| SAM-all / pytorch_optimizer.SAM | 1.050 (1.050, 1.050) | 1.050 (1.050, 1.050) |" in printed
    runs = json.loads(out.read_text())
    assert len(runs["before"]) == len(runs["after"]) == 2
    assert runs["after"][0]["cpu"]["SAM-ON / SGD"] == pytest.approx(1.6)


def test_a_run_that_writes_no_figures_is_named_with_its_error(tmp_path):
    before = _tree(tmp_path, "before", 18.0)
    after = _tree(tmp_path, "after", 16.0, exit_code=2, write=False)
    with pytest.raises(SystemExit, match=r"(?s)after/benchmarks/step_time.py --mode cpu failed \(exit 2\).*boom"):
        _script().main([str(before), str(after), "--repeats", "1", "--", "--mode", "cpu"])
