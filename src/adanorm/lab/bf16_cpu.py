"""bf16 autocast on a CPU without bf16 matrix hardware, at the speed of fp32.

Under ``torch.autocast("cpu", torch.bfloat16)`` every matrix product runs on bf16 operands.  A CPU
with AVX-512-BF16 or AMX has oneDNN kernels for that; one with only AVX2 (e.g. an AMD EPYC of this
project's machines) falls back to torch's scalar reference GEMM, single-threaded and about 100
times slower than fp32 (a 2048×512×2048 product: 9.2 s against 0.085 s on 1 thread), which turns a
one-hour run into days.

Every bf16 GEMM kernel, the reference one included, multiplies bf16 operands exactly in fp32,
accumulates in fp32 and rounds the result to bf16 once.  So on such a CPU this module replaces the
autocast kernels of the matrix products with the same computation on fp32 GEMM: round the operands
to bf16 (what autocast does), widen them to fp32 (exact), multiply with MKL, round the result to
bf16.  Autograd sees the casts, so the backward products round where bf16 kernels round too.
Results equal the native bf16 kernels' up to fp32 summation order, the same freedom a change of
thread count or GEMM library takes (``tests/lab/test_bf16_cpu.py`` compares the two).

:func:`bf16_matmul` says which path a process uses; the trainer records it in ``run.json``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["bf16_matmul", "native_bf16_matmul_available", "fp32_bf16_matmul"]

# The matrix products of CPU autocast's bf16 list (torch/csrc/autograd/autocast_mode.cpp).  The
# attention kernels on that list are fast in bf16 on AVX2 already, and keep their own kernels;
# so do addbmm, whose bf16 kernel rounds each batch's product before summing them (one rounding
# here would not be the same computation), and the convolutions.
_PRODUCTS = ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear")
_AUTOCAST_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

_library: torch.library.Library | None = None
_depth = 0


def native_bf16_matmul_available() -> bool:
    """Whether this CPU has oneDNN's bf16 GEMM (AVX-512-BF16 or AMX), not the scalar fallback."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bf16_matmul() -> str:
    """How bf16 autocast multiplies matrices on this CPU: ``"native"`` (oneDNN bf16 kernels) or
    ``"fp32-gemm"`` (this module: bf16-rounded operands on fp32 GEMM, result rounded to bf16)."""
    return "native" if native_bf16_matmul_available() else "fp32-gemm"


def _round_to_bf16_then_widen(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(torch.bfloat16).float()
    return value


def _product_kernel(op: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def kernel(*args: Any, **kwargs: Any) -> torch.Tensor:
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_CPU):
            args = tuple(_round_to_bf16_then_widen(a) for a in args)
            kwargs = {name: _round_to_bf16_then_widen(a) for name, a in kwargs.items()}
            return op(*args, **kwargs).to(torch.bfloat16)

    return kernel


@contextlib.contextmanager
def fp32_bf16_matmul() -> Iterator[None]:
    """Within this context, CPU bf16 autocast runs its matrix products on fp32 GEMM (see the
    module docstring).  Re-entrant; the kernels are restored when the outermost context exits."""
    global _library, _depth
    if _depth == 0:
        library = torch.library.Library("aten", "IMPL")
        with warnings.catch_warnings():
            # Replacing autocast's own kernels is the point; torch warns that it happens.
            warnings.filterwarnings("ignore", message=".*(overrid|previously registered).*")
            for name in _PRODUCTS:
                # Only the overloads autocast casts; out= and out_dtype= variants keep theirs.
                library.impl(name, _product_kernel(getattr(torch.ops.aten, name).default),
                             "AutocastCPU")
        _library = library
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _library is not None:
            _library._destroy()
            _library = None
