"""Mixed precision: the autocast context of an ``amp`` mode, shared by the training loop and the benchmark.

It lives beside the optimizer (which handles the GradScaler) rather than in the run config, so that code
below the runner (``normsam.bench``) can use it without importing the runner's layer.
"""

from __future__ import annotations

__all__ = ["AMP_MODES", "autocast"]

AMP_MODES = ("off", "bf16", "fp16")


def autocast(amp: str, device_type: str):
    """The autocast context of an ``amp`` mode: nothing for ``off``, bf16 or fp16 autocast otherwise."""
    import contextlib

    import torch

    if amp not in AMP_MODES:
        raise ValueError(f"Invalid amp: {amp!r}; valid values are {', '.join(map(str, AMP_MODES))}.")
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
