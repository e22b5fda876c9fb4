"""Triton kernels for the parameter-free variants (AdaNorm, DetachNorm and its ablations,
LayerNorm-simple in the released code's unbiased convention), forward and backward, for float32,
bfloat16 and float16 inputs with float32 statistics.

Imported by :func:`adanorm._kernels.cuda_kernels_ready` only once CUDA was found; the tests
import it directly under ``TRITON_INTERPRET=1`` (triton's CPU interpreter).

Two entry points share the kernels:

* eager calls go through :class:`_TritonNormFunction`, a plain ``autograd.Function`` that
  launches the kernels directly.  A ``torch.library`` custom op costs about 30 µs of Python
  dispatch per call and its generic autograd materializes zero gradients for every extra output,
  which made a small AdaNorm call several times slower than native LayerNorm on the host side;
* under ``torch.compile`` / ``torch.export`` the same kernels run inside the
  ``torch.library.triton_op`` ``adanorm_triton::norm``, which the compiler can trace (and
  inductor can schedule) without a graph break.

One program handles one row held in registers (``BLOCK = next_pow2(H)``).  The forward reads x
once and writes z once.  The backward reads x and g once and writes dx once: it recomputes the
row's statistics from x (arithmetic only, the row is already in registers), so no statistics are
stored for it and σ is never rebuilt from a rounded 1/σ.  DetachNorm with both statistics
detached needs only 1/σ in backward, so its forward stores that (one float per row) and the input
is not kept.

Rows whose magnitude could overflow float32 squares (peak above 1e15) are divided by a power of two
before their statistics are formed: exact, so ordinary rows are bit-for-bit unaffected, and any
finite row normalizes correctly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference import saved_input_grad_ref

__all__ = ["norm", "supports", "max_width", "launch_config", "WARPS"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Whole rows live in registers, held as float32 whatever the input's element size, so the limit
# is the same for 4- and 2-byte inputs: on an H200 the backward (x and g in registers) compiled
# without spills up to BLOCK 16384 and spilled at 32768 for both, falling to 470-1320 GB/s
# (benchmarks/results/gpu_check.json, "tuning").  Wider rows take the pure-PyTorch path.
MAX_WIDTH = {4: 16384, 2: 16384}

# num_warps per (BLOCK, element size, direction): the fastest of the measured candidates on an
# H200 (benchmarks/gpu_check.py, "tuning"; the measurements are in
# benchmarks/results/gpu_check.json).  Blocks above MAX_WIDTH are listed for the tuning run only.
_MEASURED_WARPS = {
    # block: (fp32 fwd, fp32 bwd, 16-bit fwd, 16-bit bwd)
    256: (1, 1, 1, 1),
    512: (2, 2, 1, 1),
    1024: (2, 4, 2, 2),
    2048: (4, 8, 4, 4),
    4096: (4, 4, 4, 4),
    8192: (16, 8, 8, 8),
    16384: (8, 16, 8, 8),
    32768: (16, 32, 32, 16),
    65536: (16, 32, 16, 32),
}
WARPS: dict[tuple[int, int, str], int] = {
    (block, size, direction): warps[index]
    for block, warps in _MEASURED_WARPS.items()
    for index, (size, direction) in enumerate(((4, "fwd"), (4, "bwd"), (2, "fwd"), (2, "bwd")))
}

# Peak magnitude above which a row is rescaled: N * peak^2 stays below float32's 3.4e38 for any
# N <= 65536 when peak <= 1e15.
_RESCALE_ABOVE = 1.0e15


@triton.jit
def _normalize_row(x, mask, N, eps, RESCALE_ABOVE: tl.constexpr, UNBIASED: tl.constexpr):
    """(y, 1/sigma, rho) of one float32 row whose masked lanes hold 0."""
    peak = tl.max(tl.abs(x), axis=0)
    # 2^(10 - E) for peak = m * 2^E, built from the exponent bits: an exact power of two that
    # brings the peak to [2^10, 2^11) and stays a normal float for every finite peak.
    exponent = (peak.to(tl.int32, bitcast=True) >> 23) & 0xFF
    shrink = ((264 - exponent) << 23).to(tl.float32, bitcast=True)
    inv_unit = tl.where(peak > RESCALE_ABOVE, shrink, 1.0)
    xs = x * inv_unit
    # The mean as an unevaluated sum mean + mean_lo: x - mean is exact for x near the mean, and a
    # second pass over the registers recovers the first mean's rounding, which would otherwise
    # dominate the spread of near-constant rows.
    mean = tl.sum(xs, axis=0) / N
    mean_lo = tl.sum(tl.where(mask, xs - mean, 0.0), axis=0) / N
    centered = tl.where(mask, (xs - mean) - mean_lo, 0.0)
    sum_sq = tl.sum(centered * centered, axis=0)
    if UNBIASED:
        std = tl.sqrt(sum_sq / (N - 1))
        sigma = std + eps * inv_unit
        rstd = tl.where(sigma > 0, 1.0 / sigma, 0.0)
        # sigma = s + eps: d sigma / d x_j = y_j sigma / ((H-1) s).  Constant rows: y == 0.
        rho = tl.where(std > 0, sigma / std * N / (N - 1), 0.0)
    else:
        var = sum_sq / N + eps * inv_unit * inv_unit
        rstd = tl.where(var > 0, 1.0 / tl.sqrt(var), 0.0)
        rho = 1.0
    return centered * rstd, rstd * inv_unit, rho


@triton.jit
def _forward_kernel(
    X, OUT, RSTD, stride_x, stride_out, N, eps, c, ck,
    RESCALE_ABOVE: tl.constexpr, UNBIASED: tl.constexpr, ADA: tl.constexpr,
    STORE_RSTD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    y, rstd, _ = _normalize_row(x, mask, N, eps, RESCALE_ABOVE, UNBIASED)
    if ADA:
        y = y * (c - ck * y)
    tl.store(OUT + row * stride_out + cols, y.to(OUT.dtype.element_ty), mask=mask)
    if STORE_RSTD:
        tl.store(RSTD + row, rstd)


@triton.jit
def _backward_kernel(
    G, X, RSTD, DX, stride_g, stride_x, stride_dx, N, eps, c, ck,
    RESCALE_ABOVE: tl.constexpr, UNBIASED: tl.constexpr, ADA: tl.constexpr,
    DETACH_MEAN: tl.constexpr, DETACH_STD: tl.constexpr, NEEDS_X: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    if NEEDS_X:
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        y, rstd, rho = _normalize_row(x, mask, N, eps, RESCALE_ABOVE, UNBIASED)
        gp = g
        if ADA:
            gp = g * (c - ck * y)  # phi(y) = C (1 - k y), a constant in backward
        dx = gp
        if not DETACH_MEAN:
            dx = dx - tl.sum(gp, axis=0) / N
        if not DETACH_STD:
            dx = dx - y * (rho * tl.sum(gp * y, axis=0) / N)
        dx = dx * rstd
    else:
        dx = g * tl.load(RSTD + row)
    tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)


_config_cache: dict[tuple[int, int], tuple[int, int, int]] = {}


def launch_config(width: int, itemsize: int) -> tuple[int, int, int]:
    """``(BLOCK, forward warps, backward warps)`` for rows of ``width`` elements."""
    key = (width, itemsize)
    config = _config_cache.get(key)
    if config is None:
        block = max(triton.next_power_of_2(width), 16)
        table_block = min(max(block, 256), 65536)
        config = (block, WARPS[(table_block, itemsize, "fwd")],
                  WARPS[(table_block, itemsize, "bwd")])
        _config_cache[key] = config
    return config


def max_width(dtype: torch.dtype) -> int:
    """The widest row these kernels take for ``dtype``."""
    return MAX_WIDTH[torch.empty((), dtype=dtype).element_size()] if dtype in _DTYPES else 0


def supports(x2d: Tensor) -> bool:
    """Whether these kernels take this (rows, H) tensor."""
    return x2d.dtype in _DTYPES and 0 < x2d.shape[-1] <= MAX_WIDTH[x2d.element_size()]


def _rows_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _stores_rstd(detach_mean: bool, detach_std: bool, scale: float | None) -> bool:
    # DetachNorm proper needs only 1/sigma in backward: keep that, not the input.
    return detach_mean and detach_std and scale is None


def _forward(
    x: Tensor, eps: float, unbiased: bool, store_rstd: bool, scale: float | None, k: float,
    wrap=None,
) -> tuple[Tensor, Tensor]:
    rows, width = x.shape
    out = torch.empty((rows, width), dtype=x.dtype, device=x.device)
    rstd = torch.empty((rows if store_rstd else 0,), dtype=torch.float32, device=x.device)
    if rows == 0:
        return out, rstd
    block, warps, _ = launch_config(width, x.element_size())
    c = 1.0 if scale is None else scale
    kernel = _forward_kernel if wrap is None else wrap(_forward_kernel)
    kernel[(rows,)](
        x, out, rstd, x.stride(0), out.stride(0), width, eps, c, c * k,
        RESCALE_ABOVE=_RESCALE_ABOVE, UNBIASED=unbiased, ADA=scale is not None,
        STORE_RSTD=store_rstd, BLOCK=block, num_warps=warps,
    )
    return out, rstd


def _backward(
    grad: Tensor, x: Tensor | None, rstd: Tensor, eps: float, unbiased: bool, detach_mean: bool,
    detach_std: bool, scale: float | None, k: float, wrap=None,
) -> Tensor:
    grad = _rows_contiguous(grad)
    rows, width = grad.shape
    dx = torch.empty((rows, width), dtype=grad.dtype, device=grad.device)
    if rows == 0:
        return dx
    needs_x = x is not None
    block, _, warps = launch_config(width, grad.element_size())
    c = 1.0 if scale is None else scale
    kernel = _backward_kernel if wrap is None else wrap(_backward_kernel)
    kernel[(rows,)](
        grad, x if needs_x else grad, rstd, dx,
        grad.stride(0), x.stride(0) if needs_x else 0, dx.stride(0), width, eps, c, c * k,
        RESCALE_ABOVE=_RESCALE_ABOVE, UNBIASED=unbiased, ADA=scale is not None,
        DETACH_MEAN=detach_mean, DETACH_STD=detach_std, NEEDS_X=needs_x, BLOCK=block,
        num_warps=warps,
    )
    return dx


# ---- eager: a plain autograd.Function --------------------------------------------------------


class _TritonNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps, unbiased, detach_mean, detach_std, scale, k):
        store_rstd = _stores_rstd(detach_mean, detach_std, scale)
        out, rstd = _forward(x, eps, unbiased, store_rstd, scale, k)
        ctx.save_for_backward(None if store_rstd else x, rstd)
        ctx.flags = (eps, unbiased, detach_mean, detach_std, scale, k)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # a graph of the backward was asked for
            dx = saved_input_grad_ref(grad_out, x, rstd, *ctx.flags)
        else:
            dx = _backward(grad_out, x, rstd, *ctx.flags)
        return dx, None, None, None, None, None, None


# ---- traced: an operator that torch.compile / torch.export see through ----------------------


def _interpreted() -> bool:
    # Under TRITON_INTERPRET=1 kernels are InterpretedFunctions, which wrap_triton cannot trace.
    return not isinstance(_forward_kernel, triton.runtime.jit.JITFunction)


def _traced_forward(
    x: Tensor, eps: float, unbiased: bool, detach_mean: bool, detach_std: bool,
    scale: float | None, k: float,
) -> tuple[Tensor, Tensor]:
    return _forward(_rows_contiguous(x), eps, unbiased,
                    _stores_rstd(detach_mean, detach_std, scale), scale, k, wrap=_wrap)


def _traced_backward(
    grad: Tensor, x: Tensor | None, rstd: Tensor, eps: float, unbiased: bool,
    detach_mean: bool, detach_std: bool, scale: float | None, k: float,
) -> Tensor:
    return _backward(grad, x, rstd, eps, unbiased, detach_mean, detach_std, scale, k, wrap=_wrap)


if _interpreted():
    # An opaque custom op with shape-only fake kernels (what the interpreter can trace).
    _wrap = None
    _norm_op = torch.library.custom_op("adanorm_triton::norm", mutates_args=())(_traced_forward)
    _norm_backward_op = torch.library.custom_op(
        "adanorm_triton::norm_backward", mutates_args=())(_traced_backward)

    @_norm_op.register_fake
    def _(x, eps, unbiased, detach_mean, detach_std, scale, k):
        rows = x.shape[0] if _stores_rstd(detach_mean, detach_std, scale) else 0
        return x.new_empty(x.shape), x.new_empty((rows,), dtype=torch.float32)

    @_norm_backward_op.register_fake
    def _(grad, x, rstd, eps, unbiased, detach_mean, detach_std, scale, k):
        return grad.new_empty(grad.shape)
else:
    # A triton_op: the compiler sees the kernels themselves, so inductor launches them from its
    # own wrapper with no dispatch through Python.
    _wrap = torch.library.wrap_triton
    _norm_op = torch.library.triton_op("adanorm_triton::norm", mutates_args=())(_traced_forward)
    _norm_backward_op = torch.library.triton_op(
        "adanorm_triton::norm_backward", mutates_args=())(_traced_backward)


def _setup_context(ctx, inputs, output) -> None:
    x, eps, unbiased, detach_mean, detach_std, scale, k = inputs
    _, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.set_materialize_grads(False)  # no zero gradient is ever built for rstd
    keep_x = not _stores_rstd(detach_mean, detach_std, scale)
    ctx.save_for_backward(x if keep_x else None, rstd)
    ctx.flags = (eps, unbiased, detach_mean, detach_std, scale, k)


def _op_backward(ctx, grad_out, _grad_rstd):
    x, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():
        dx = saved_input_grad_ref(grad_out, x, rstd, *ctx.flags)
    else:
        dx = _norm_backward_op(grad_out, x, rstd, *ctx.flags)
    return dx, None, None, None, None, None, None


_norm_op.register_autograd(_op_backward, setup_context=_setup_context)


def norm(
    x2d: Tensor, eps: float, unbiased: bool, detach_mean: bool, detach_std: bool,
    scale: float | None, k: float,
) -> Tensor:
    """The variant selected by the flags on a (rows, H) tensor, differentiable in x."""
    if torch.compiler.is_compiling():
        return _norm_op(x2d, eps, unbiased, detach_mean, detach_std, scale, k)[0]
    x2d = _rows_contiguous(x2d)
    if x2d.requires_grad and torch.is_grad_enabled():
        return _TritonNormFunction.apply(x2d, eps, unbiased, detach_mean, detach_std, scale, k)
    return _forward(x2d, eps, unbiased, False, scale, k)[0]
