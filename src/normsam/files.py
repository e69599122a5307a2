"""Reading and writing the files normsam keeps: standard JSON, YAML that names its file, a write preflight.

Standard JSON only
------------------
Python's ``json`` writes ``NaN`` and ``Infinity`` by default, which is not JSON: ``jq``, JavaScript, pandas'
strict readers and most other tools refuse such a file. Every JSON file normsam writes goes through
:func:`json_dumps`, which encodes a non-finite float (NaN, +inf, -inf; also numpy's and 0-d tensors') as
``null`` and then serializes with ``allow_nan=False``, so a stray non-finite value can never slip through
unencoded. ``null`` means "no finite value" wherever a number is expected: a diverged run's loss, an
undefined standard deviation. A run whose loss became non-finite is marked ``"status": "diverged"`` in its
``summary.json`` (see :mod:`normsam.train.divergence`), so the reason is not lost with the value.

YAML
----
:func:`read_yaml` reads a YAML file and turns a parser error into a one-line ``ValueError`` that names the file,
the line and the column, instead of a parser stack trace.

Can I write here?
-----------------
:func:`check_writable` creates (and removes) a temporary file in a folder, so a command that will write there
(train, resume, sharpness, report, sweeps) fails at once with a one-line message instead of after minutes of
work. It tries a real write because permission bits do not tell (root ignores them; a read-only mount or a
full disk does not show in them).
"""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

__all__ = ["json_dumps", "finite_or_none", "read_json", "read_jsonl", "read_yaml", "check_writable",
           "NotWritableError"]


class NotWritableError(ValueError):
    """A folder that a command must write into cannot be written (or is not a folder)."""


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (nested in dicts, lists, tuples) replaced by ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    # numpy scalars and 0-d tensors: as Python numbers
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return finite_or_none(item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return value


def json_dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that writes standard JSON: non-finite numbers become ``null`` (see the module docstring)."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)


def _damaged(path: Path, err: json.JSONDecodeError, line: int | None = None) -> ValueError:
    where = f"line {line}" if line is not None else f"line {err.lineno}, column {err.colno}"
    return ValueError(
        f"{path} is not valid JSON ({where}: {err.msg}); it was damaged or edited by hand: restore it, or delete "
        "it and recreate it (a run's summary.json: `normsam train --resume`; metrics: from the checkpoint)."
    )


def read_json(path: str | Path) -> Any:
    """The content of a JSON file, with a one-line error naming the file when it is not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise _damaged(path, err) from None


def read_jsonl(path: str | Path) -> list[Any]:
    """The objects of a JSON-lines file (blank lines skipped); a damaged line is a one-line error naming it."""
    path = Path(path)
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise _damaged(path, err, number) from None
    return rows


def read_yaml(path: str | Path, text: str | None = None) -> Any:
    """The content of a YAML file (``text`` if given, else the file's), with a one-line error naming the file."""
    path = Path(path)
    if text is None:
        text = path.read_text()
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{path} is not valid YAML{where}: {problem}; fix the file and run again.") from None


def check_writable(
    folder: str | Path, *, what: str = "folder", hint: str = "choose another out=", create: bool = True
) -> Path:
    """Make ``folder`` (and its parents) if needed and check that a file can be written in it.

    With ``create=False`` nothing is made: a missing ``folder`` is checked through its nearest existing
    ancestor (where it would be created), so a command can check early, before it knows that it will write.

    Raises :class:`NotWritableError` (a ``ValueError``) with a one-line message naming the folder and the fix:
    ``folder`` is an existing file, or it cannot be created or written (read-only, no permission, disk full).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotWritableError(f"{what} {folder} is an existing file, not a folder; {hint}.")
    target = folder
    if not create:
        while not target.exists() and target != target.parent:
            target = target.parent
        if not target.is_dir():
            raise NotWritableError(f"{what} {folder} cannot be created: {target} is a file; {hint}.")
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target, prefix=".normsam-write-check.", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except (FileExistsError, NotADirectoryError):
        raise NotWritableError(f"{what} {folder} cannot be created: a part of its path is a file; {hint}.") from None
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else str(err)
        fix = ("free disk space or " + hint) if err.errno in (errno.ENOSPC, errno.EDQUOT) else (
            f"make it writable or {hint}")
        raise NotWritableError(f"cannot write to {what} {folder} ({reason}); {fix}.") from None
    return folder
