"""Vectorized helpers shared by the optimizer's pieces: tensors grouped by (device, dtype) for the
``torch._foreach_*`` kernels, the float64 global norm, and in-place list operations.

A private module of the package: its names are public *within* normsam, and nothing here is user API.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["grouped", "total_norm", "global_norm", "add_", "copy_", "zero_unless", "unscale", "norm_device"]


def grouped(tensors: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), as foreach kernels need."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[(t.device, t.dtype)].append(i)
    return groups


def norm_device(tensors: Sequence[Tensor]) -> torch.device:
    return tensors[0].device if tensors else torch.device("cpu")


def total_norm(parts: Sequence[Sequence[Tensor]], device: torch.device) -> Tensor:
    """‖·‖₂ over every tensor in ``parts`` (lists of one (device, dtype) each) as a 0-d float64 tensor on
    ``device``: one ``_foreach_norm`` per part in the tensors' own dtype, their squares summed in float64.

    It is finite exactly when every per-tensor norm is (float64 cannot overflow on squares of float32 norms),
    so a finiteness flag can be read off it."""
    norms = [torch.linalg.vector_norm(torch.stack(torch._foreach_norm(part)), dtype=torch.float64)
             for part in parts if part]
    if not norms:
        return torch.zeros((), dtype=torch.float64, device=device)
    if len(norms) == 1:
        return norms[0]
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """:func:`total_norm` of any tensors (grouped here), on the first tensor's device."""
    tensors = list(tensors)
    return total_norm([[tensors[i] for i in idx] for idx in grouped(tensors).values()], norm_device(tensors))


_NARROW = (torch.float16, torch.bfloat16)


def dot_terms(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> list[Tensor]:
    """``x·y`` of each pair as a 0-d float64 tensor: products in the tensors' precision (float32 at least),
    summed in float64 — as :func:`total_norm` takes norms — two kernels a tensor and no full-size copy."""
    out = []
    for x, y in zip(xs, ys):
        if x.dtype in _NARROW or y.dtype in _NARROW:
            x, y = x.float(), y.float()
        out.append(torch.sum(x * y, dtype=torch.float64))
    return out


def squared_norms(xs: Sequence[Tensor]) -> Tensor:
    """``‖x‖²`` of each tensor, a float64 vector on the first tensor's device: one ``_foreach_norm`` per
    (device, dtype), in the tensors' own dtype as :func:`total_norm` takes them, squared in float64."""
    xs = list(xs)
    device = norm_device(xs)
    groups = grouped(xs)
    if len(groups) == 1:
        return torch.stack(torch._foreach_norm(xs)).to(device=device, dtype=torch.float64).square()
    out = torch.empty(len(xs), dtype=torch.float64, device=device)
    for idx in groups.values():
        out[idx] = torch.stack(torch._foreach_norm([xs[i] for i in idx])).to(device=device, dtype=torch.float64)
    return out.square()


def add_(params: list[Tensor], eps: list[Tensor], foreach: bool) -> None:
    """``params += eps`` for tensors of one (device, dtype) group."""
    if foreach:
        torch._foreach_add_(params, eps)
    else:
        for p, e in zip(params, eps):
            p.add_(e)


def copy_(dst: list[Tensor], src: list[Tensor], foreach: bool) -> None:
    """``dst ← src`` for tensors of one (device, dtype) group."""
    if foreach:
        torch._foreach_copy_(dst, src)
    else:
        for d, t in zip(dst, src):
            d.copy_(t)


_SAME_WIDTH_INT = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
                   torch.bfloat16: torch.int16}


def zero_unless(tensors: list[Tensor], flag: Tensor, groups: list[list[int]], foreach: bool) -> None:
    """Set ``tensors`` (fresh, contiguous) to +0 where the 0-d device bool ``flag`` is False; no host sync.

    Multiplying by the flag would not do: ε is non-finite exactly when the flag is False, and 0·inf = NaN.
    So the bits are multiplied, read as integers of the same width: ×1 keeps every bit, ×0 gives +0.0."""
    for idx in groups:
        first = tensors[idx[0]]
        int_dtype = _SAME_WIDTH_INT.get(first.dtype)
        if int_dtype is None:  # no same-width integer type: a plain where, one kernel per tensor
            for i in idx:
                tensors[i].copy_(torch.where(flag.to(first.device), tensors[i], torch.zeros_like(tensors[i])))
            continue
        bits = [tensors[i].view(int_dtype) for i in idx]
        keep = flag.to(device=first.device, dtype=int_dtype)
        if foreach:
            torch._foreach_mul_(bits, keep)
        else:
            for b in bits:
                b.mul_(keep)


def unscale(grads: list[Tensor | None], grad_scaler: Any) -> list[Tensor | None]:
    """``g / scale`` as new tensors. A ``GradScaler``'s scale is read as its device tensor: ``get_scale()``
    would copy it to the host and wait for the device."""
    if isinstance(grad_scaler, (int, float, Tensor)):
        scale = grad_scaler
    elif not grad_scaler.is_enabled():
        return grads
    else:
        scale = grad_scaler._get_scale_async() if hasattr(grad_scaler, "_get_scale_async") else None
        if scale is None:  # nothing scaled yet (get_scale() then returns the initial scale, no sync)
            scale = float(grad_scaler.get_scale())
    out = list(grads)
    live = [i for i, g in enumerate(grads) if g is not None]
    for idx in grouped([grads[i] for i in live]).values():
        pick = [live[j] for j in idx]
        first = grads[pick[0]]
        s = scale.to(device=first.device, dtype=first.dtype) if isinstance(scale, Tensor) else float(scale)
        for i, g in zip(pick, torch._foreach_div([grads[i] for i in pick], s)):
            out[i] = g
    return out
