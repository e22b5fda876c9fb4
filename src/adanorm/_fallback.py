"""The pure-PyTorch path: ``_NormFunction``, an autograd function with the analytic backward of
every variant, for devices and dtypes the fused kernels do not take."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import _LOW_PRECISION
from ._kernels import NormFlags
from .reference import normalize_ref

# ------------------------------------------------------------------------------------------------
# The pure-PyTorch path.  ``_NormFunction`` works on a 2-D (rows, H) view; the public functions
# reshape to it and back.
# ------------------------------------------------------------------------------------------------

_constant_cache: dict[tuple, tuple[Tensor, Tensor]] = {}


def _ones_zeros(width: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    # The native fp32 CPU kernel takes a scalar (1.8-3.2x slower) path when weight or bias is
    # None, so the parameter-free variants pass cached constant ones/zeros instead.
    if torch.compiler.is_compiling():
        return (
            torch.ones(width, dtype=dtype, device=device),
            torch.zeros(width, dtype=dtype, device=device),
        )
    key = (width, dtype, device)
    cached = _constant_cache.get(key)
    if cached is None:
        if len(_constant_cache) > 64:
            _constant_cache.clear()
        # Never inference tensors, even when first made under torch.inference_mode(): a later
        # training forward saves them for backward, which inference tensors forbid.
        with torch.inference_mode(False):
            cached = (
                torch.ones(width, dtype=dtype, device=device),
                torch.zeros(width, dtype=dtype, device=device),
            )
        _constant_cache[key] = cached
    return cached


def _plain_statistics(
    x2d: Tensor, eps: float, unbiased: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(y, mean, rstd, rho) of a float32/float64 (rows, H) tensor, statistics of shape (rows, 1).

    ``rho`` is the per-row factor of the std derivative in unbiased mode (None in biased mode).
    """
    width = x2d.shape[-1]
    if not unbiased:
        ones, zeros = _ones_zeros(width, x2d.dtype, x2d.device)
        y, mean, rstd = torch.native_layer_norm(x2d, (width,), ones, zeros, eps)
        return y, mean, rstd, None
    mean = x2d.mean(dim=-1, keepdim=True)
    centered = x2d - mean
    var_unbiased = centered.square().sum(dim=-1, keepdim=True) / (width - 1)
    std = var_unbiased.sqrt()
    sigma = std + eps
    rstd = sigma.reciprocal()
    y = centered * rstd
    # d sigma / d x_j = (x_j - mu) / ((H-1) s): written in terms of y it carries sigma/s.  Rows of
    # constant value have y == 0, so the factor may be anything finite there; use 0.
    rho = torch.where(std > 0, sigma / std, torch.zeros_like(std)) * (width / (width - 1))
    return y, mean, rstd, rho


def _scaled_statistics(
    x2d: Tensor, eps: float, unbiased: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor]:
    """(y, mean_s, rstd_s, rho, inv_unit) with every row first multiplied by ``inv_unit``, a power
    of two near 1/max|x|: exact, and no square can overflow or underflow, so any finite row
    normalizes correctly.  ``mean_s``/``rstd_s`` are in the rescaled units:
    ``y = (x * inv_unit - mean_s) * rstd_s`` and the true 1/sigma is ``rstd_s * inv_unit``."""
    width = x2d.shape[-1]
    peak = x2d.abs().amax(dim=-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak) & (peak > 0), peak, torch.ones_like(peak))
    inv_unit = torch.exp2(-torch.floor(torch.log2(peak)))
    xs = x2d * inv_unit
    mean = xs.mean(dim=-1, keepdim=True)
    centered = xs - mean
    sum_sq = centered.square().sum(dim=-1, keepdim=True)
    # eps in rescaled units, as eps * inv_unit^k written so that eps = 0 stays 0 (no 0 * inf).
    if unbiased:
        std = (sum_sq / (width - 1)).sqrt()
        sigma = std + eps * inv_unit
        rho = torch.where(std > 0, sigma / std, torch.zeros_like(std)) * (width / (width - 1))
    else:
        sigma = (sum_sq / width + eps * inv_unit * inv_unit).sqrt()
        rho = None
    rstd = sigma.reciprocal()
    return centered * rstd, mean, rstd, rho, inv_unit


def _row_statistics(
    x2d: Tensor, eps: float, unbiased: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """(y, mean, rstd, rho, inv_unit); ``inv_unit`` None means unscaled statistics."""
    if x2d.device.type != "cpu" or torch.compiler.is_compiling():
        # No host sync on accelerators and no data-dependent branch in a traced graph: always
        # take the rescaled statistics (two more passes over the row).
        return _scaled_statistics(x2d, eps, unbiased)
    y, mean, rstd, rho = _plain_statistics(x2d, eps, unbiased)
    # A finite row whose squares overflow (|x| >~ 1e19 in float32) gets rstd = 0 or NaN; one
    # whose squares underflow with eps = 0 gets rstd = inf.  Redo those rows rescaled (rows that
    # hold NaN/inf come out NaN either way).
    bad = ~((rstd > 0) & (rstd < math.inf))
    if not bool(bad.any()):
        return y, mean, rstd, rho, None
    rows = bad.view(-1).nonzero().view(-1)
    y_s, mean_s, rstd_s, rho_s, inv_unit_s = _scaled_statistics(x2d[rows], eps, unbiased)
    inv_unit = torch.ones_like(rstd)
    y, mean, rstd = y.clone(), mean.clone(), rstd.clone()
    y[rows], mean[rows], rstd[rows], inv_unit[rows] = y_s, mean_s, rstd_s, inv_unit_s
    if rho is not None:
        rho = rho.clone()
        rho[rows] = rho_s
    return y, mean, rstd, rho, inv_unit


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _reference_grads(
    grad_out: Tensor,
    x2d: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    needs: tuple[bool, bool, bool],
    flags: NormFlags,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Input/weight/bias gradients as differentiable functions of ``grad_out``, ``x2d`` and the
    parameters, through :func:`adanorm.reference.normalize_ref` (float64 arithmetic): what a
    backward asked for with ``create_graph=True`` returns, so second derivatives are exact with
    the detached statistics (and AdaNorm's phi) held constant, as in first order."""
    sources = (x2d, weight, bias)
    wanted = [t for t, need in zip(sources, needs, strict=True) if need and t is not None]
    with torch.enable_grad():
        out = normalize_ref(
            x2d, x2d.shape[-1], weight, bias, flags.eps,
            std_mode="unbiased" if flags.unbiased else "biased",
            detach_mean=flags.detach_mean, detach_std=flags.detach_std, scale=flags.scale,
            k=flags.k, compute_dtype=torch.float64,
        )
        grads = iter(
            torch.autograd.grad(
                out, wanted, grad_out.to(out.dtype), create_graph=True, allow_unused=True
            )
        )
    result = []
    for t, need in zip(sources, needs, strict=True):
        if need and t is not None:
            grad = next(grads)
            result.append(torch.zeros_like(t) if grad is None else grad.to(t.dtype))
        else:
            result.append(None)
    return result[0], result[1], result[2]


class _NormFunction(torch.autograd.Function):
    """One forward/backward for every variant, on a (rows, H) tensor."""

    @staticmethod
    def forward(
        ctx,
        x2d: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        flags: NormFlags,
    ) -> Tensor:
        eps, unbiased, detach_mean, detach_std, scale, k = flags
        out_dtype = x2d.dtype
        xc = x2d.to(_compute_dtype(out_dtype))
        y, mean, rstd, rho, inv_unit = _row_statistics(xc, eps, unbiased)
        if scale is not None:
            # z = C (1 - k y) y, computed as C*y - C*k*y^2 without extra passes over memory.
            out = torch.addcmul(y * scale, y, y, value=-scale * k)
        else:
            out = y
            if weight is not None:
                out = out * weight.to(out.dtype)
            if bias is not None:
                out = out + bias.to(out.dtype)
        # AdaNorm's phi(y) multiplies g even with both statistics detached, so it keeps x; so
        # does the gain, whose gradient is sum(g * y).
        full_backward = not (detach_mean and detach_std) or scale is not None or weight is not None
        ctx.save_for_backward(
            x2d if full_backward else None,
            mean if full_backward else None,
            rstd,
            None if detach_std else rho,
            weight,
            bias,
            inv_unit,
        )
        ctx.flags = flags
        return out.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x2d, mean, rstd, rho, weight, bias, inv_unit = ctx.saved_tensors
        eps, unbiased, detach_mean, detach_std, scale, k = ctx.flags
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        compute_dtype = rstd.dtype
        # The true 1/sigma; rescaled rows carry their unit separately (see _scaled_statistics).
        true_rstd = rstd if inv_unit is None else rstd * inv_unit

        if x2d is None:  # DetachNorm: both statistics constant, dx = g / sigma, linear in g.
            grad_x = (grad_out.to(compute_dtype) * true_rstd).to(grad_out.dtype)
            return grad_x, None, None, None

        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            grads = _reference_grads(
                grad_out, x2d, weight, bias, (need_x, need_w, need_b), ctx.flags
            )
            return *grads, None

        g = grad_out.to(compute_dtype)
        xc = x2d.to(compute_dtype)
        y = (xc - mean if inv_unit is None else xc * inv_unit - mean) * rstd
        grad_weight = (g * y).sum(0).to(weight.dtype) if need_w else None
        grad_bias = g.sum(0).to(bias.dtype) if need_b else None
        grad_x = None
        if need_x:
            if scale is not None:
                g_eff = g * torch.addcmul(torch.full_like(y, scale), y, y.new_tensor(-scale * k))
            elif weight is not None:
                g_eff = g * weight.to(compute_dtype)
            else:
                g_eff = g
            grad_x = g_eff
            if not detach_mean:
                grad_x = grad_x - g_eff.mean(dim=-1, keepdim=True)
            if not detach_std:
                proj = (g_eff * y).mean(dim=-1, keepdim=True)
                if rho is not None:
                    proj = proj * rho
                grad_x = grad_x - y * proj
            grad_x = (grad_x * true_rstd).to(grad_out.dtype)
        return grad_x, grad_weight, grad_bias, None
