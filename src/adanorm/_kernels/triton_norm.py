"""Triton kernels for the parameter-free variants (AdaNorm, DetachNorm and its ablations,
LayerNorm-simple in the released code's unbiased convention), forward and backward, for float32,
bfloat16 and float16 inputs with float32 statistics.

Imported by :func:`adanorm._kernels.cuda_kernels_ready` only once CUDA was found; the tests
import it directly under ``TRITON_INTERPRET=1`` (triton's CPU interpreter).

The operators are ``torch.library`` custom ops with fake kernels and a registered autograd
formula, so ``torch.compile(fullgraph=True)`` and ``torch.export`` trace them without a graph
break:

* ``adanorm_triton::norm(x, eps, unbiased, detach_mean, detach_std, scale, k) -> (out, mean,
  rstd)``: the differentiable forward (mean and rstd are float32, non-differentiable);
* ``adanorm_triton::norm_backward(...) -> grad_input``.

One program handles one row held in registers (``BLOCK = next_pow2(H)``): the forward reads x
once and writes z once; the backward reads x and g once and writes dx once.  With no gain or bias
there is no cross-row dW/dB reduction, so both kernels are single-pass and bandwidth-bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["norm", "supports", "MAX_WIDTH"]

# Whole rows live in registers; beyond this the pure-PyTorch path is used.
MAX_WIDTH = 65536
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _norm_forward_kernel(
    X, OUT, MEAN, RSTD, stride_x, stride_out, N, eps, c, ck,
    UNBIASED: tl.constexpr, ADA: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / N
    centered = tl.where(mask, x - mean, 0.0)
    sum_sq = tl.sum(centered * centered, axis=0)
    if UNBIASED:  # noqa: SIM108  (a compile-time branch of the triton kernel)
        rstd = 1.0 / (tl.sqrt(sum_sq / (N - 1)) + eps)
    else:
        rstd = 1.0 / tl.sqrt(sum_sq / N + eps)
    y = centered * rstd
    if ADA:
        y = y * (c - ck * y)
    tl.store(OUT + row * stride_out + cols, y.to(OUT.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _norm_backward_kernel(
    G, X, MEAN, RSTD, DX, stride_g, stride_x, stride_dx, N, eps, c, ck,
    UNBIASED: tl.constexpr, ADA: tl.constexpr, DETACH_MEAN: tl.constexpr,
    DETACH_STD: tl.constexpr, NEEDS_X: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + row)
    if NEEDS_X:
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        y = tl.where(mask, (x - mean) * rstd, 0.0)
        gp = g
        if ADA:
            gp = g * (c - ck * y)  # phi(y) = C (1 - k y), a constant in backward
        dx = gp
        if not DETACH_MEAN:
            dx = dx - tl.sum(gp, axis=0) / N
        if not DETACH_STD:
            rho = 1.0
            if UNBIASED:
                # sigma = s + eps: d sigma / d x_j = y_j sigma / ((H-1) s).
                sigma = 1.0 / rstd
                std_dev = sigma - eps
                rho = tl.where(std_dev > 0, sigma / std_dev * N / (N - 1), 0.0)
            dx = dx - y * (rho * tl.sum(gp * y, axis=0) / N)
        dx = dx * rstd
    else:
        dx = g * rstd
    tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)


def _launch_config(width: int) -> tuple[int, int]:
    block = triton.next_power_of_2(width)
    return block, min(max(block // 256, 1), 8)


def supports(x2d: Tensor) -> bool:
    """Whether these kernels take this (rows, H) tensor."""
    return x2d.dtype in _DTYPES and 0 < x2d.shape[-1] <= MAX_WIDTH


def _rows_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("adanorm_triton::norm", mutates_args=())
def _norm_op(
    x: Tensor, eps: float, unbiased: bool, detach_mean: bool, detach_std: bool,
    scale: float | None, k: float,
) -> tuple[Tensor, Tensor, Tensor]:
    x = _rows_contiguous(x)
    rows, width = x.shape
    out = torch.empty((rows, width), dtype=x.dtype, device=x.device)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows == 0:
        return out, mean, rstd
    block, warps = _launch_config(width)
    c = 1.0 if scale is None else scale
    _norm_forward_kernel[(rows,)](
        x, out, mean, rstd, x.stride(0), out.stride(0), width, eps, c, c * k,
        UNBIASED=unbiased, ADA=scale is not None, BLOCK=block, num_warps=warps,
    )
    return out, mean, rstd


@_norm_op.register_fake
def _(x, eps, unbiased, detach_mean, detach_std, scale, k):
    rows = x.shape[0]
    return (
        x.new_empty(x.shape),
        x.new_empty((rows,), dtype=torch.float32),
        x.new_empty((rows,), dtype=torch.float32),
    )


@torch.library.custom_op("adanorm_triton::norm_backward", mutates_args=())
def _norm_backward_op(
    grad: Tensor, x: Tensor | None, mean: Tensor | None, rstd: Tensor, eps: float,
    unbiased: bool, detach_mean: bool, detach_std: bool, scale: float | None, k: float,
) -> Tensor:
    grad = _rows_contiguous(grad)
    rows, width = grad.shape
    dx = torch.empty((rows, width), dtype=grad.dtype, device=grad.device)
    if rows == 0:
        return dx
    needs_x = x is not None
    if needs_x:
        x = _rows_contiguous(x)
    block, warps = _launch_config(width)
    c = 1.0 if scale is None else scale
    _norm_backward_kernel[(rows,)](
        grad, x if needs_x else grad, mean if needs_x else rstd, rstd, dx,
        grad.stride(0), x.stride(0) if needs_x else 0, dx.stride(0), width, eps, c, c * k,
        UNBIASED=unbiased, ADA=scale is not None, DETACH_MEAN=detach_mean,
        DETACH_STD=detach_std, NEEDS_X=needs_x, BLOCK=block, num_warps=warps,
    )
    return dx


@_norm_backward_op.register_fake
def _(grad, x, mean, rstd, eps, unbiased, detach_mean, detach_std, scale, k):
    return grad.new_empty(grad.shape)


def _setup_context(ctx, inputs, output) -> None:
    x, eps, unbiased, detach_mean, detach_std, scale, k = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    # DetachNorm (both detached, no phi) needs rstd only; everything else x + two floats/row.
    if detach_mean and detach_std and scale is None:
        ctx.save_for_backward(rstd)
    else:
        ctx.save_for_backward(x, mean, rstd)
    ctx.flags = (eps, unbiased, detach_mean, detach_std, scale, k)


def _backward(ctx, grad_out, grad_mean, grad_rstd):
    saved = ctx.saved_tensors
    x, mean, rstd = saved if len(saved) == 3 else (None, None, saved[0])
    eps, unbiased, detach_mean, detach_std, scale, k = ctx.flags
    dx = _norm_backward_op(grad_out, x, mean, rstd, eps, unbiased, detach_mean, detach_std,
                           scale, k)
    return dx, None, None, None, None, None, None


_norm_op.register_autograd(_backward, setup_context=_setup_context)


def norm(
    x2d: Tensor, eps: float, unbiased: bool, detach_mean: bool, detach_std: bool,
    scale: float | None, k: float,
) -> Tensor:
    """The variant selected by the flags on a (rows, H) tensor, differentiable in x."""
    return _norm_op(x2d, eps, unbiased, detach_mean, detach_std, scale, k)[0]
