r"""Functional forms of the LayerNorm family of Xu et al. (NeurIPS 2019).

Every function normalizes the trailing ``len(normalized_shape)`` dimensions of ``input``, the way
:func:`torch.nn.functional.layer_norm` does, and takes its arguments in the same order.

Statistics conventions (``std_mode``):

* ``"biased"`` (default): :math:`\sigma = \sqrt{\mathrm{mean}((x-\mu)^2) + \epsilon}`, as in PyTorch
  and in the paper's formulas.
* ``"unbiased"``: :math:`\sigma = s + \epsilon` with :math:`s` the Bessel-corrected standard
  deviation (divides by :math:`H-1`), exactly as the authors' released code computes it.

All variants share one analytic backward.  With :math:`y = (x-\mu)/\sigma` and an effective
upstream gradient :math:`g'` (``g`` itself, ``w * g`` for the affine LayerNorm, or
:math:`\varphi \odot g` with :math:`\varphi = C(1-ky)` for AdaNorm), the input gradient is

.. math::
    \frac{\partial \ell}{\partial x} = \frac{1}{\sigma}\Big(g' - [\text{mean}(g')]
        - [\rho\, y\, \text{mean}(g' \odot y)]\Big)

where the first bracket is dropped when the mean is detached, the second when the standard
deviation is detached, and :math:`\rho = 1` in biased mode
(:math:`\rho = \frac{H}{H-1}\frac{\sigma}{s}`
in unbiased mode).  Only the input (not even that for DetachNorm) and per-row statistics are kept
for backward; no activation-sized temporary is saved.

NaN and inf in the input propagate to the output of the rows that contain them, and to their
gradients: normalization does not hide them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _kernels

__all__ = [
    "layer_norm",
    "layer_norm_simple",
    "detach_norm",
    "ada_norm",
    "normalize",
    "StdMode",
]

StdMode = Literal["biased", "unbiased"]
_STD_MODES = ("biased", "unbiased")
_LOW_PRECISION = (torch.float16, torch.bfloat16)

ShapeLike = int | Sequence[int] | torch.Size


def _as_shape(normalized_shape: ShapeLike) -> tuple[int, ...]:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(int(d) for d in normalized_shape)


def check_std_mode(std_mode: str) -> None:
    if std_mode not in _STD_MODES:
        raise ValueError(f"std_mode must be one of {_STD_MODES}, got {std_mode!r}")


def check_input(x: Tensor, shape: tuple[int, ...]) -> None:
    if not (x.is_floating_point()):
        raise TypeError(
            f"adanorm normalizes floating-point tensors, got a tensor of dtype {x.dtype}"
        )
    n = len(shape)
    if x.dim() < n or tuple(x.shape[x.dim() - n :]) != shape:
        raise ValueError(
            f"expected input with trailing shape {list(shape)} (normalized_shape), "
            f"got input of shape {list(x.shape)}"
        )


# ------------------------------------------------------------------------------------------------
# The shared autograd path.  ``_NormFunction`` works on a 2-D (rows, H) view; the public functions
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
        cached = (
            torch.ones(width, dtype=dtype, device=device),
            torch.zeros(width, dtype=dtype, device=device),
        )
        _constant_cache[key] = cached
    return cached


def _row_statistics(
    x2d: Tensor, eps: float, unbiased: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Return (y, mean, rstd, rho) for a float32/float64 (rows, H) tensor.

    ``rho`` is the per-row factor of the std derivative in unbiased mode (None in biased mode).
    """
    width = x2d.shape[-1]
    ones, zeros = _ones_zeros(width, x2d.dtype, x2d.device)
    if not unbiased:
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


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


class _NormFunction(torch.autograd.Function):
    """One forward/backward for every variant, on a (rows, H) tensor."""

    @staticmethod
    def forward(
        ctx,
        x2d: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        unbiased: bool,
        detach_mean: bool,
        detach_std: bool,
        scale: float | None,
        k: float,
    ) -> Tensor:
        out_dtype = x2d.dtype
        xc = x2d.to(_compute_dtype(out_dtype))
        y, mean, rstd, rho = _row_statistics(xc, eps, unbiased)
        if scale is not None:
            # z = C (1 - k y) y, computed as C*y - C*k*y^2 without extra passes over memory.
            out = torch.addcmul(y * scale, y, y, value=-scale * k)
        else:
            out = y
            if weight is not None:
                out = out * weight.to(out.dtype)
            if bias is not None:
                out = out + bias.to(out.dtype)
        # AdaNorm's phi(y) multiplies g even with both statistics detached, so it keeps x.
        full_backward = not (detach_mean and detach_std) or scale is not None
        ctx.save_for_backward(
            x2d if full_backward else None,
            mean if full_backward else None,
            rstd,
            None if detach_std else rho,
            weight,
        )
        ctx.flags = (detach_mean, detach_std, scale, k, bias is not None)
        return out.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x2d, mean, rstd, rho, weight = ctx.saved_tensors
        detach_mean, detach_std, scale, k, has_bias = ctx.flags
        compute_dtype = rstd.dtype
        g = grad_out.to(compute_dtype)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]

        if x2d is None:  # DetachNorm: both statistics constant, dx = g / sigma.
            return (g * rstd).to(grad_out.dtype), None, None, None, None, None, None, None, None

        y = (x2d.to(compute_dtype) - mean) * rstd
        grad_weight = (g * y).sum(0).to(weight.dtype) if need_w else None
        grad_bias = g.sum(0).to(weight.dtype if weight is not None else g.dtype) if need_b else None
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
            grad_x = (grad_x * rstd).to(grad_out.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None


_FAST_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _fast_kernel_norm(
    x2d: Tensor,
    eps: float,
    unbiased: bool,
    detach_mean: bool,
    detach_std: bool,
    scale: float | None,
    k: float,
) -> Tensor | None:
    """The parameter-free variants through the fused kernels of :mod:`adanorm._kernels`, or None
    where they do not apply (float64, affine, other devices, extension disabled or unavailable):
    then ``_NormFunction`` below, the pure-PyTorch reference path, runs instead."""
    if x2d.dtype not in _FAST_KERNEL_DTYPES:
        return None
    if x2d.device.type == "cpu":
        # While tracing (torch.compile / export) only look at whether the library is loaded: a
        # first-use build must not happen inside a graph.
        if torch.compiler.is_compiling():
            ready = _kernels.cpu_kernels_loaded()
        else:
            ready = _kernels.cpu_kernels_ready()
        if ready:
            return torch.ops.adanorm.norm(x2d, eps, unbiased, detach_mean, detach_std, scale, k)
    elif x2d.device.type == "cuda" and _kernels.cuda_kernels_ready():
        return _kernels.cuda_norm(x2d, eps, unbiased, detach_mean, detach_std, scale, k)
    return None


def normalize(
    input: Tensor,
    normalized_shape: ShapeLike,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    std_mode: StdMode = "biased",
    detach_mean: bool = False,
    detach_std: bool = False,
    scale: float | None = None,
    k: float = 0.1,
) -> Tensor:
    """The general form behind every variant.

    ``scale`` not None selects AdaNorm's output :math:`C(1-ky)y` (with :math:`\\varphi` constant in
    backward); otherwise the output is :math:`w \\odot y + b` with absent ``weight``/``bias``
    skipped.  ``detach_mean``/``detach_std`` hold :math:`\\mu`/:math:`\\sigma` constant in backward.
    """
    shape = _as_shape(normalized_shape)
    check_input(input, shape)
    check_std_mode(std_mode)
    if scale is not None and (weight is not None or bias is not None):
        raise ValueError("AdaNorm (scale is not None) takes no weight or bias")
    unbiased = std_mode == "unbiased"
    width = math.prod(shape)
    if unbiased and width < 2:
        raise ValueError(
            f"std_mode='unbiased' needs at least 2 normalized elements, got normalized_shape "
            f"{list(shape)}"
        )
    simple_native = not unbiased and not detach_mean and not detach_std and scale is None
    if simple_native:
        # The native kernel is exact, fast and already computes statistics in fp32 for half
        # inputs: LayerNorm and LayerNorm-simple in the default convention are just F.layer_norm.
        if weight is None and bias is None and input.dtype not in _LOW_PRECISION:
            weight, bias = _ones_zeros(width, input.dtype, input.device)
            weight, bias = weight.view(shape), bias.view(shape)
        return F.layer_norm(input, shape, weight, bias, eps)

    x2d = input.reshape(-1, width)
    if weight is None and bias is None:
        fast = _fast_kernel_norm(
            x2d, float(eps), unbiased, bool(detach_mean), bool(detach_std),
            None if scale is None else float(scale), float(k),
        )
        if fast is not None:
            return fast.view(input.shape)
    w = weight.reshape(width) if weight is not None else None
    b = bias.reshape(width) if bias is not None else None
    out = _NormFunction.apply(
        x2d,
        w,
        b,
        float(eps),
        unbiased,
        bool(detach_mean),
        bool(detach_std),
        None if scale is None else float(scale),
        float(k),
    )
    return out.view(input.shape)


def layer_norm(
    input: Tensor,
    normalized_shape: ShapeLike,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    std_mode: StdMode = "biased",
) -> Tensor:
    r"""LayerNorm: :math:`w \odot (x-\mu)/\sigma + b`. Equals ``F.layer_norm`` in biased mode."""
    return normalize(input, normalized_shape, weight, bias, eps, std_mode=std_mode)


def layer_norm_simple(
    input: Tensor,
    normalized_shape: ShapeLike,
    eps: float = 1e-5,
    *,
    std_mode: StdMode = "biased",
) -> Tensor:
    r"""LayerNorm-simple: :math:`(x-\mu)/\sigma`, no gain or bias."""
    if std_mode == "biased" and input.device.type == "cpu":
        # On CPU the fused kernel beats native F.layer_norm for the parameter-free case
        # (docs/performance.md); normalize() keeps LayerNorm(elementwise_affine=False) on the
        # native kernel so that it stays bit-identical to nn.LayerNorm.
        shape = _as_shape(normalized_shape)
        check_input(input, shape)
        fast = _fast_kernel_norm(
            input.reshape(-1, math.prod(shape)), float(eps), False, False, False, None, 0.1
        )
        if fast is not None:
            return fast.view(input.shape)
    return normalize(input, normalized_shape, None, None, eps, std_mode=std_mode)


def detach_norm(
    input: Tensor,
    normalized_shape: ShapeLike,
    eps: float = 1e-5,
    *,
    std_mode: StdMode = "biased",
    detach_mean: bool = True,
    detach_std: bool = True,
) -> Tensor:
    r"""DetachNorm: the forward of LayerNorm-simple with :math:`\mu` and/or :math:`\sigma` held
    constant in backward.  With both detached, :math:`\partial\ell/\partial x = g/\sigma`."""
    return normalize(
        input,
        normalized_shape,
        None,
        None,
        eps,
        std_mode=std_mode,
        detach_mean=detach_mean,
        detach_std=detach_std,
    )


def ada_norm(
    input: Tensor,
    normalized_shape: ShapeLike,
    eps: float = 1e-5,
    *,
    scale: float = 1.0,
    k: float = 0.1,
    std_mode: StdMode = "biased",
) -> Tensor:
    r"""AdaNorm: :math:`z = C(1-ky)\odot y` with :math:`y=(x-\mu)/\sigma`.

    :math:`\varphi = C(1-ky)` is a constant in backward; :math:`\mu` and :math:`\sigma` are not.
    """
    return normalize(input, normalized_shape, None, None, eps, std_mode=std_mode, scale=scale, k=k)
