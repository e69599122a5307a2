"""Step time and extra peak memory of SGD, SAM-all and SAM-ON (and, when asked for, SAM's variants), measured
side by side with two yardsticks.

Every variant trains its own copy of the same model on the same batch. Rounds are interleaved
(A B C D, A B C D, …) so that a slow spell of the machine hits every variant alike; the figures are the
median step time over rounds and the median over rounds of the per-round ratio to SGD (or to any other
variant, :meth:`BenchResult.ratio`).

The yardsticks: the *peer*, ``pytorch_optimizer.SAM`` (SAM-all, used through its own two-step API; an
optional dependency, ``pip install 'normsam[bench]'``), and the *floor*, the shortest SAM-ON a user would
write by hand. A variant that cannot run here (the peer not installed, fp16 for a yardstick without a
GradScaler path) is listed with the reason instead of figures.

On the CPU each step is also split into its passes and the rest: in a compute-bound step the passes are nearly
all the time and the same code for every variant, so the whole step's ratio of two optimizers is 1.00 within the
machine's noise, and the time outside the passes (:meth:`BenchResult.peer_table`, each with its 95% interval) is
what tells them apart.

Extra peak memory is the variant's peak memory in training above SGD's: what it keeps between steps (its
model copy, optimizer state, saved copies, a stored ε; measured over build and warm-up) plus the peak it
allocates during one step. On CUDA from ``torch.cuda.memory_allocated``/``max_memory_allocated``, on the CPU
from the allocation events of ``torch.profiler``.
Used by ``normsam bench``, ``benchmarks/step_time.py`` and the cost column of ``normsam compare``.

The modules, by concern:

- :mod:`~normsam.bench.names`: the variants' names, shared by tables, targets and tests;
- :mod:`~normsam.bench.context`: what a variant is and the settings all variants share (:class:`StepContext`);
- :mod:`~normsam.bench.variants`: normsam's own variants and :func:`default_variants`;
- :mod:`~normsam.bench.sam_variants`: GSAM, WSAM, LookSAM, Friendly-SAM, GCSAM (normsam at scope="all" and
  "norm", pytorch_optimizer's class of the same name) and the multi-step ascent;
- :mod:`~normsam.bench.yardsticks`: the peers (pytorch_optimizer's SAM and its variants' classes) and the
  hand-written floor;
- :mod:`~normsam.bench.timing`: :func:`run_benchmark`, the interleaved rounds;
- :mod:`~normsam.bench.passes`: on the CPU, the part of each step spent in the forward and backward passes, so
  that what the optimizers do differently (the time outside the passes) is compared on its own;
- :mod:`~normsam.bench.memory`: memory kept between steps and the peak during one;
- :mod:`~normsam.bench.report`: the results, ratios, targets, tables and JSON.
"""

from normsam.bench.context import StepContext, StepFn, Variant, VariantUnavailable
from normsam.bench.names import (
    FLOOR, FLOOR_ALL, MOMENTUM, MULTI_STEP, PEER, SAM_ALL, SAM_ON, SAM_ON_CLASSIC, SGD, VARIANT_FAMILIES,
    fraction_name, interval_name, is_interval_name, is_multi_step_name, multi_step_name, peer_name, variant_name,
)
from normsam.bench.report import KEY_RATIOS, VARIANT_TARGETS, BenchResult, Target, VariantResult, format_bytes
from normsam.bench.sam_variants import SAM_VARIANT_KEYS, add_variant_arguments, chosen_variants, sam_variants
from normsam.bench.settings import VariantSettings
from normsam.bench.timing import run_benchmark
from normsam.bench.variants import default_variants

__all__ = [
    "Variant", "VariantUnavailable", "StepContext", "StepFn", "BenchResult", "VariantResult", "Target",
    "KEY_RATIOS", "VARIANT_TARGETS", "default_variants", "run_benchmark", "format_bytes",
    "SGD", "PEER", "SAM_ALL", "SAM_ON", "SAM_ON_CLASSIC", "FLOOR", "FLOOR_ALL", "MOMENTUM",
    "interval_name", "is_interval_name", "fraction_name",
    "VARIANT_FAMILIES", "MULTI_STEP", "SAM_VARIANT_KEYS", "VariantSettings", "sam_variants", "add_variant_arguments",
    "chosen_variants", "variant_name", "peer_name", "multi_step_name", "is_multi_step_name",
]
