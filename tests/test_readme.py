"""The README's quick start runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _block_after(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quick_start_runs(capsys):
    code = _block_after("## Quick start")
    namespace: dict = {}
    exec(compile(code, "README quick start", "exec"), namespace)
    out = capsys.readouterr().out
    assert "'norm':" in out and "BatchNorm2d" in out
    assert [line.split()[0] for line in out.splitlines()[-3:]] == ["0", "1", "2"]
    assert namespace["optimizer"].scope == "norm"
