"""The README is a front door: short, its links resolve, its numbers are the records' (its code blocks run in
tests/test_docs.py with the rest of the documentation)."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEXT = README.read_text()
LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


def _section(title: str, text: str = TEXT) -> str:
    start = text.index(title)
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def _rows(table: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()
            if line.startswith("|") and not line.startswith("|---")]


def _anchors(page: Path) -> set[str]:
    """Heading ids of a docs page: explicit {#id} and the slugs mkdocs' toc makes."""
    ids = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            explicit = re.search(r"\{#([\w-]+)\}\s*$", line)
            if explicit:
                ids.add(explicit.group(1))
            else:
                title = line.lstrip("#").strip().lower()
                ids.add(re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", title.encode("ascii", "ignore").decode())))
    return ids


def test_readme_is_short():
    assert len(TEXT.splitlines()) <= 250


def test_readme_links_resolve():
    for text, target in LINK.findall(TEXT):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = ROOT / path
        assert file.exists(), f"README links to {target}, which does not exist"
        if anchor:
            assert anchor in _anchors(file), f"README links to {target}: no such heading"


def test_readme_leads_into_every_guide_page():
    linked = {target.partition("#")[0] for _, target in LINK.findall(TEXT)}
    for page in sorted((ROOT / "docs" / "guide").glob("*.md")):
        assert f"docs/guide/{page.name}" in linked, f"the README does not link to {page.name}"
    for page in ("docs/getting-started.md", "docs/deviations.md", "docs/architecture.md", "docs/reference/api.md",
                 "docs/reference/cli.md", "docs/reference/config.md", "docs/results/README.md", "docs/benchmarks.md"):
        assert page in linked


def test_the_comparison_table_is_the_docs_one():
    """Nothing in the README that the docs do not also have."""
    docs = (ROOT / "docs" / "index.md").read_text()
    readme_table = _rows(_section("## How it compares").replace("](docs/", "]("))  # links relative to docs/
    assert readme_table == _rows(_section("## How it compares with other SAM code", docs))
    assert len(readme_table) >= 10 and len(readme_table[0]) == 6


def test_results_come_from_the_records():
    rows = _rows(_section("## Results"))[1:]
    checked = 0
    for row in rows:
        links = LINK.findall(row[0])
        record = (ROOT / links[0][1]).read_text() if links else None
        if record is None and "bf16" in row[0]:
            record = (ROOT / "docs/results/study-regime/README.md").read_text()
        if record is None:
            continue
        for cell in row[1:]:
            for number in re.findall(r"[+-]?\d+\.\d+ ± \d+\.\d+|\[[+-]?\d+\.\d+, [+-]?\d+\.\d+\]", cell):
                assert number in record, f"README's {number} is not in its record"
                checked += 1
    assert checked >= 12


def test_every_results_row_links_its_record_and_nothing_is_a_placeholder():
    rows = _rows(_section("## Results"))[1:]
    assert rows and all(LINK.search(r[0]) or r[0].startswith("the same") for r in rows), rows
    assert "placeholder" not in README.read_text().lower()


def test_step_costs_are_the_benchmark_json():
    bench = json.loads((ROOT / "docs/results/study-regime/step_time.json").read_text())
    variants = {v["name"]: v for v in next(iter(bench.values()))["variants"]}
    names = {"pytorch_optimizer's SAM (all weights)": "pytorch_optimizer.SAM", "normsam SAM-all": "SAM-all",
             "normsam SAM-ON, cheap ascent": "SAM-ON (cheap ascent)",
             "normsam SAM-ON, `ascent_interval=4`": "SAM-ON, ascent_interval=4",
             "normsam SAM-ON, momentum ascent": "SAM-ON, ascent=momentum"}
    rows = _rows(_section("## What a step costs"))[1:]
    assert [r[0] for r in rows] == list(names)
    for label, ratio, memory in rows:
        v = variants[names[label]]
        assert ratio.strip("*") == f"{v['median_ratio_to_sgd']:.2f}×"
        size = v["extra_peak_bytes"]
        assert memory == (f"+{size / 2**20:.1f} MiB" if size >= 2**20 else f"+{size / 1024:.1f} KiB")


def test_quick_start_is_ten_lines_on_a_torchvision_model():
    code = re.search(r"## Quick start.*?```python\n(.*?)```", TEXT, re.S).group(1)
    lines = [line for line in code.splitlines() if line.strip()]
    assert len(lines) <= 10 and "torchvision.models" in code and "normsam.SAM(model" in code
