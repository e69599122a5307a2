"""Moved to :mod:`normsam.train.run_sharpness` (the runner's ``sharpness_at_end`` uses it); re-exported here
for ``normsam sharpness`` and the reports."""

from normsam.train.run_sharpness import (
    SETTINGS,
    SHARPNESS_FILE,
    latest_measurement,
    measure_run_sharpness,
    read_measurements,
)

__all__ = ["SHARPNESS_FILE", "SETTINGS", "measure_run_sharpness", "read_measurements", "latest_measurement"]
