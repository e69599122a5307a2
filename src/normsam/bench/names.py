"""The variants' names, in one place because several readers match on them: the tables, the targets
(``Target(SAM_ON, FLOOR, 1.03)``), ``benchmarks/step_time.py``, ``docs/results/headline.py`` and the tests.
A name changed here changes everywhere, so a row cannot silently stop matching its target."""

from __future__ import annotations

__all__ = [
    "SGD", "PEER", "SAM_ALL", "SAM_ON", "SAM_ON_CLASSIC", "FLOOR", "FLOOR_ALL", "MOMENTUM",
    "interval_name", "is_interval_name", "fraction_name",
    "VARIANT_FAMILIES", "MULTI_STEP", "variant_name", "peer_name", "multi_step_name", "is_multi_step_name",
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


#: SAM's variants timed beside pytorch_optimizer's class of the same name (``--variants``), and their
#: command-line keys: each has a row at scope="all", the peer's row, and a row at scope="norm" (cheap ascent).
VARIANT_FAMILIES: dict[str, str] = {
    "gsam": "GSAM", "wsam": "WSAM", "looksam": "LookSAM", "friendly-sam": "FriendlySAM", "gcsam": "GCSAM",
}
#: The command-line key of the multi-step ascent's row (SAM-ON with ``ascent_steps=2``).
MULTI_STEP = "multi-step"


def variant_name(family: str, scope: str) -> str:
    """normsam's row of a variant: ``"GSAM (all)"``, ``"GSAM (norm)"`` (``family`` as in VARIANT_FAMILIES' values)."""
    return f"{family} ({scope})"


def peer_name(family: str) -> str:
    """pytorch_optimizer's row of a variant: its class of the same name (GCSAM is its SAM with use_gc=True)."""
    return "pytorch_optimizer.SAM(use_gc=True)" if family == "GCSAM" else f"pytorch_optimizer.{family}"


_MULTI_STEP_PREFIX = "SAM-ON, ascent_steps="


def multi_step_name(k: int) -> str:
    return f"{_MULTI_STEP_PREFIX}{k}"


def is_multi_step_name(name: str) -> bool:
    return name.startswith(_MULTI_STEP_PREFIX)
