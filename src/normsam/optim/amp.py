"""Mixed precision: the autocast context of an ``amp`` mode, shared by the training loop and the benchmark.

It lives beside the optimizer (which handles the GradScaler) rather than in the run config, so that code
below the runner (``normsam.bench``) can use it without importing the runner's layer.

``bf16_kernels="upcast"`` keeps bf16 autocast's numerics but computes its matrix products (convolutions and
matrix multiplications, forward and backward) with the fp32 kernels. Widening bf16 to fp32 is exact and the
product of two bf16 numbers is exact in fp32, so such a kernel sees the same operands, accumulates in fp32 and
its result is rounded to bf16 as autocast's is: the arithmetic of a GPU's bf16 tensor-core kernels (fp32
accumulation). It exists because CPUs without bf16 instructions (AVX2) have no fast bf16 convolution: PyTorch
falls back to ``_slow_conv2d``, about 11× slower than fp32 on this project's CPU machine.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

__all__ = ["AMP_MODES", "BF16_KERNELS", "autocast", "upcast_bf16_matmuls"]

AMP_MODES = ("off", "bf16", "fp16")
BF16_KERNELS = ("native", "upcast")


def autocast(amp: str, device_type: str):
    """The autocast context of an ``amp`` mode: nothing for ``off``, bf16 or fp16 autocast otherwise."""
    if amp not in AMP_MODES:
        raise ValueError(f"Invalid amp: {amp!r}; valid values are {', '.join(map(str, AMP_MODES))}.")
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _check_value(bf16_kernels: str) -> None:
    if bf16_kernels not in BF16_KERNELS:
        raise ValueError(f"Invalid bf16_kernels: {bf16_kernels!r}; valid values are {', '.join(BF16_KERNELS)}.")


def check_bf16_kernels(bf16_kernels: str, *, amp: str, device_type: str) -> None:
    """Refuse ``bf16_kernels`` where it would do nothing or was never tested (a ``ValueError`` naming the fix)."""
    _check_value(bf16_kernels)
    if bf16_kernels == "upcast" and amp != "bf16":
        raise ValueError(f"bf16_kernels=upcast changes bf16 autocast's kernels only, but amp={amp}: "
                         "set amp=bf16 or drop bf16_kernels.")
    if bf16_kernels == "upcast" and device_type != "cpu":
        raise ValueError(f"bf16_kernels=upcast is for CPUs without bf16 kernels; {device_type} has its own bf16 "
                         "kernels: drop bf16_kernels (or use device=cpu).")


def upcast_bf16_matmuls(bf16_kernels: str = "upcast"):
    """A context in which bf16 convolutions and matrix products run on the fp32 kernels (see the module's
    docstring); ``bf16_kernels="native"`` gives a context that changes nothing. Enter it around forward *and*
    backward: the backward's kernels are dispatched when ``.backward()`` runs."""
    _check_value(bf16_kernels)
    return contextlib.nullcontext() if bf16_kernels == "native" else _UpcastBf16Matmuls()


_aten = torch.ops.aten
# the ops autocast runs in bf16 whose kernels are matrix products (the rest are elementwise or reductions, which
# have fast bf16 kernels and are left alone)
_UPCAST_OPS = frozenset({_aten.convolution.default, _aten.convolution_backward.default, _aten.mm.default,
                         _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default})


def _is_bf16(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16


def _widen(t):
    return t.float() if _is_bf16(t) else t


def _narrow(t):
    return t.to(torch.bfloat16) if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else t


class _UpcastBf16Matmuls(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _UPCAST_OPS and any(_is_bf16(a) for a in args):
            # the op's tensors are all bf16 under autocast; its results go back to bf16 (one rounding)
            return tree_map(_narrow, func(*tree_map(_widen, args), **tree_map(_widen, kwargs)))
        return func(*args, **kwargs)
