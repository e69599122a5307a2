"""Sharpness measures: adaptive worst-case (APGD) and average-case m-sharpness of a trained model."""

from normsam.sharpness.measure import (
    CONVENTIONS,
    KINDS,
    NORMS,
    SharpnessResult,
    apgd_checkpoints,
    apgd_halves_step,
    measure_sharpness,
)

__all__ = [
    "measure_sharpness",
    "SharpnessResult",
    "apgd_checkpoints",
    "apgd_halves_step",
    "KINDS",
    "NORMS",
    "CONVENTIONS",
]
