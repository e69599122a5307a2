"""``SAM.counters``: how many SAM steps, fresh ascents, skipped (non-finite) ascents and mask updates ran."""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping

import torch
from torch import Tensor

__all__ = ["StepCounters"]


class StepCounters(MutableMapping):
    """``SAM.counters``, a dict of step counts. ``nonfinite_ascent_steps`` is counted on the device, so that a
    step never waits for it; reading it waits (syncs) once."""

    _DEVICE_KEY = "nonfinite_ascent_steps"

    def __init__(self) -> None:
        self._host: dict[str, int] = {"sam_steps": 0, "ascent_steps": 0, "mask_updates": 0}
        self._base = 0  # nonfinite steps already read back to the host
        self._device: Tensor | None = None

    def count_nonfinite(self, finite: Tensor) -> None:
        if self._device is not None and self._device.device != finite.device:
            self._base += int(self._device)  # the flag moved device (model.to): fold the old count in once
            self._device = None
        if self._device is None:
            self._device = torch.zeros((), dtype=torch.int64, device=finite.device)
        self._device.add_(finite.logical_not())

    def __getitem__(self, key: str) -> int:
        if key == self._DEVICE_KEY:
            return self._base + (int(self._device) if self._device is not None else 0)
        return self._host[key]

    def __setitem__(self, key: str, value: int) -> None:
        if key == self._DEVICE_KEY:
            self._base, self._device = int(value), None
        else:
            self._host[key] = int(value)

    def __delitem__(self, key: str) -> None:
        raise TypeError("SAM.counters keeps all its keys; set a count to 0 instead.")

    def __iter__(self) -> Iterator[str]:
        yield from ("sam_steps", "ascent_steps", self._DEVICE_KEY, "mask_updates")
        yield from (k for k in self._host if k not in ("sam_steps", "ascent_steps", "mask_updates"))

    def __len__(self) -> int:
        return len(self._host) + 1

    def __repr__(self) -> str:
        return repr(dict(self))
