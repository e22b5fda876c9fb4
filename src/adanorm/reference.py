r"""Plain-autograd twins of the fast paths (flash-attention's ``*_ref`` convention).

:func:`normalize_ref` computes every variant of :func:`adanorm.functional.normalize` with ordinary
differentiable tensor operations and explicit ``.detach()`` where the paper holds a quantity
constant in backward.  It is slow and memory-hungry, and it is the definition the fused kernels
are compared against.

:func:`input_grad_ref` is the input gradient of :func:`normalize_ref`, itself differentiable: the
fast paths call it from their ``backward`` when a graph of the backward is asked for
(``create_graph=True``), so second derivatives (gradient penalties, Hessian-vector products) are
exact on every path, with the detached statistics still constant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["normalize_ref", "input_grad_ref", "saved_input_grad_ref"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _dims(normalized_shape: int | Sequence[int]) -> tuple[tuple[int, ...], int]:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    return tuple(range(-len(shape), 0)), math.prod(shape)


def normalize_ref(
    x: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    std_mode: str = "biased",
    detach_mean: bool = False,
    detach_std: bool = False,
    scale: float | None = None,
    k: float = 0.1,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    r"""Reference forward of every variant, returned in ``x.dtype``.

    Computes in ``compute_dtype`` (default: float32 for half inputs, else the input's dtype).  The
    row is divided by its largest magnitude before the statistics are formed, so any finite row
    normalizes without overflow; in exact arithmetic that changes nothing.
    """
    dims, width = _dims(normalized_shape)
    if compute_dtype is None:
        compute_dtype = torch.float32 if x.dtype in _LOW_PRECISION else x.dtype
    xc = x.to(compute_dtype)
    # A power of two, so the rescaling is exact; detached because it is a constant of the row.
    peak = xc.detach().abs().amax(dim=dims, keepdim=True)
    peak = torch.where(torch.isfinite(peak) & (peak > 0), peak, torch.ones_like(peak))
    unit = torch.exp2(torch.floor(torch.log2(peak)))
    xs = xc / unit
    mu_s = xs.mean(dim=dims, keepdim=True)
    centered_s = xs - mu_s
    if std_mode == "biased":
        var_s = centered_s.square().mean(dim=dims, keepdim=True)
        sigma_s = (var_s + eps / unit.square()).sqrt()
    elif std_mode == "unbiased":
        var_s = centered_s.square().sum(dim=dims, keepdim=True) / (width - 1)
        sigma_s = var_s.sqrt() + eps / unit
    else:
        raise ValueError(f"std_mode must be 'biased' or 'unbiased', got {std_mode!r}")
    # (x - mu) / sigma == (xs - mu_s) / sigma_s: the unit cancels.
    mu = mu_s.detach() if detach_mean else mu_s
    sigma = sigma_s.detach() if detach_std else sigma_s
    y = (xs - mu) / sigma
    if scale is not None:
        phi = (scale * (1 - k * y)).detach()
        out = phi * y
    else:
        out = y
        if weight is not None:
            out = out * weight.to(compute_dtype)
        if bias is not None:
            out = out + bias.to(compute_dtype)
    return out.to(x.dtype)


def input_grad_ref(
    grad_out: Tensor,
    x: Tensor,
    normalized_shape: int | Sequence[int],
    eps: float = 1e-5,
    *,
    std_mode: str = "biased",
    detach_mean: bool = False,
    detach_std: bool = False,
    scale: float | None = None,
    k: float = 0.1,
) -> Tensor:
    """``d normalize_ref / d x`` applied to ``grad_out`` (parameter-free variants), as a
    differentiable function of both ``grad_out`` and ``x``.

    Call it with the very ``x`` the forward saw (its saved tensor) so that the result's graph
    reaches it; the result has ``grad_out``'s dtype.
    """
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        source = x if x.requires_grad else x.detach().requires_grad_()
        out = normalize_ref(
            source, normalized_shape, None, None, eps, std_mode=std_mode,
            detach_mean=detach_mean, detach_std=detach_std, scale=scale, k=k,
            compute_dtype=torch.float64 if x.dtype != torch.float64 else None,
        )
        (grad_x,) = torch.autograd.grad(
            out, source, grad_out.to(out.dtype), create_graph=create_graph
        )
    return grad_x.to(grad_out.dtype)


def saved_input_grad_ref(
    grad_out: Tensor,
    x: Tensor | None,
    rstd: Tensor,
    eps: float,
    unbiased: bool,
    detach_mean: bool,
    detach_std: bool,
    scale: float | None,
    k: float,
) -> Tensor:
    """:func:`input_grad_ref` from what a fused kernel saved for backward: the input, or (DetachNorm
    with both statistics detached) only its per-row 1/sigma, when dx = g / sigma is linear in g.

    The fused paths call this from their backward under ``create_graph=True``."""
    if x is None:
        row_rstd = rstd.reshape(*grad_out.shape[:-1], 1)  # one value per row, any leading shape
        return (grad_out.to(rstd.dtype) * row_rstd).to(grad_out.dtype)
    return input_grad_ref(
        grad_out, x, x.shape[-1], eps, std_mode="unbiased" if unbiased else "biased",
        detach_mean=detach_mean, detach_std=detach_std, scale=scale, k=k,
    )
