"""The variants' names, in one place because several readers match on them: the tables, the targets
(``Target(SAM_ON, FLOOR, 1.03)``), ``benchmarks/step_time.py``, ``docs/results/headline.py`` and the tests.
A name changed here changes everywhere, so a row cannot silently stop matching its target."""

from __future__ import annotations

__all__ = [
    "SGD", "PEER", "SAM_ALL", "SAM_ON", "SAM_ON_CLASSIC", "FLOOR", "FLOOR_ALL", "MOMENTUM",
    "interval_name", "is_interval_name", "fraction_name",
]

SGD = "SGD"
PEER = "pytorch_optimizer.SAM"
SAM_ALL = "SAM-all"
SAM_ON_CLASSIC = "SAM-ON (classic first pass)"
SAM_ON = "SAM-ON (cheap ascent)"
FLOOR = "hand-written SAM-ON"
FLOOR_ALL = "hand-written SAM-all"
MOMENTUM = "SAM-ON, ascent=momentum"

_INTERVAL_PREFIX = "SAM-ON, ascent_interval="


def interval_name(k: int) -> str:
    return f"{_INTERVAL_PREFIX}{k}"


def is_interval_name(name: str) -> bool:
    """Whether ``name`` is an ``ascent_interval`` row (the ratio table lists each one against SGD, whatever k)."""
    return name.startswith(_INTERVAL_PREFIX)


def fraction_name(f: float) -> str:
    return f"SAM-ON, ascent_fraction={f:g}"
