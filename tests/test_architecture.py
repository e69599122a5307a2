"""The package's shape (issue 23): modules talk through public names, tests through the pieces and the public
API, and the optimizer's files stay small enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "normsam"


def _private_imports(path: Path) -> list[str]:
    """``from normsam.x import _name`` and ``module._name`` on an imported normsam module or name."""
    tree = ast.parse(path.read_text())
    hits, aliases = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("normsam"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    hits.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}.{alias.name}")
                aliases.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            aliases |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("normsam")}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            hits.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {node.value.id}.{node.attr}")
    return hits


def test_no_module_imports_another_modules_private_name():
    """A name another module needs is part of the interface: a public name, or a private module's (``_x.py``)."""
    hits = [hit for path in sorted(SRC.rglob("*.py")) for hit in _private_imports(path)]
    assert hits == []


def test_the_checker_sees_a_private_import():
    probe = ROOT / "tests" / "_probe_private_import.py"
    probe.write_text("from normsam.optim.sam import _hidden\nimport normsam\nnormsam._secret\n")
    try:
        assert len(_private_imports(probe)) == 2
    finally:
        probe.unlink()


def _sam_names(function: ast.AST) -> set[str]:
    """Names a test binds to a SAM (``sam = normsam.SAM(...)``, ``a, b = SAM(...), ...``)."""
    names = set()
    for node in ast.walk(function):
        if isinstance(node, ast.Assign) and isinstance(node.value, (ast.Call, ast.Tuple)):
            calls = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
            targets = node.targets[0].elts if isinstance(node.targets[0], ast.Tuple) else node.targets
            for target, call in zip(targets, calls):
                func = getattr(call, "func", None)
                called = getattr(func, "attr", None) or getattr(func, "id", None)
                if called == "SAM" and isinstance(target, ast.Name):
                    names.add(target.id)
    return names


def _private_sam_reads(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    hits = []
    for function in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.Module))]:
        names = _sam_names(function) | {"sam"}
        for node in ast.walk(function):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and ((isinstance(node.value, ast.Name) and node.value.id in names)
                         or (isinstance(node.value, ast.Attribute) and node.value.attr == "sam"))):
                hits.append(f"{path.name}:{node.lineno} reads .{node.attr} of a SAM")
    return sorted(set(hits))


def test_no_test_reads_a_private_attribute_of_a_sam():
    """Tests check behaviour through the pieces and the public API: a test that needs to see inside shows a
    missing seam."""
    hits = [hit for path in sorted((ROOT / "tests").glob("*.py")) for hit in _private_sam_reads(path)]
    assert hits == []


def test_the_sam_reader_sees_a_private_read(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def test_x():\n    opt = normsam.SAM(m, SGD)\n    opt._plan\n    trainer.sam._eps\n")
    assert len(_private_sam_reads(probe)) == 2


@pytest.mark.parametrize("path", sorted((SRC / "optim").glob("*.py")), ids=lambda p: p.name)
def test_the_optimizers_files_stay_readable(path):
    """SAM is a thin class over small pieces: no file of the optimizer over 450 lines (sam.py under)."""
    lines = len(path.read_text().splitlines())
    assert lines < 450 if path.name == "sam.py" else lines <= 450, f"{path.name}: {lines} lines"
