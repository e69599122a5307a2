"""Moved to :mod:`normsam.train.norm_stats` (the runner records them each epoch); re-exported here."""

from normsam.train.norm_stats import BINS, QUANTILES, norm_parameter_stats, summarize

__all__ = ["QUANTILES", "BINS", "norm_parameter_stats", "summarize"]
