"""Sharpness measures: adaptive worst-case (APGD) and average-case m-sharpness of a trained model."""

from normsam.sharpness.measure import KINDS, NORMS, SharpnessResult, apgd_checkpoints, measure_sharpness

__all__ = ["measure_sharpness", "SharpnessResult", "apgd_checkpoints", "KINDS", "NORMS"]
