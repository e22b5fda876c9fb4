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

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backends, _fallback, _kernels
from ._backends import (
    _WHY_CUDA_CPP,
    _WHY_TRITON,
    _WHY_TRITON_WIDTH,
    CPP,
    CUDA_CPP,
    FALLBACK,
    NATIVE,
    TRITON,
    _record,
    backend_info,
    select_backend,
)
from ._checks import (
    _LOW_PRECISION,
    ShapeLike,
    StdMode,
    _check_affine,
    check_arguments,
    check_input,
    check_std_mode,  # noqa: F401  (re-exported: part of this module's API before the split)
)
from ._fallback import _NormFunction, _ones_zeros

# The process-wide caches live in their modules; these names keep them reachable from here.
_used = _backends._used
_constant_cache = _fallback._constant_cache

__all__ = [
    "layer_norm",
    "layer_norm_simple",
    "detach_norm",
    "ada_norm",
    "normalize",
    "select_backend",
    "backend_info",
    "check_arguments",
    "StdMode",
    "NATIVE",
    "CPP",
    "TRITON",
    "FALLBACK",
]

# ------------------------------------------------------------------------------------------------
# The public functions.
# ------------------------------------------------------------------------------------------------


def _normalize(
    input: Tensor,
    normalized_shape: ShapeLike,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    std_mode: str,
    detach_mean: bool,
    detach_std: bool,
    scale: float | None,
    k: float,
    ada: bool,
    prefer_fused: bool,
) -> Tensor:
    shape, width, eps, unbiased, scale, k = check_arguments(
        normalized_shape, eps, std_mode, scale, k, ada=ada
    )
    check_input(input, shape)
    affine = weight is not None or bias is not None
    if affine and ada:
        raise ValueError("AdaNorm (scale is not None) takes no weight or bias")
    detach_mean, detach_std = bool(detach_mean), bool(detach_std)
    plain = not (unbiased or detach_mean or detach_std or ada)
    compiling = torch.compiler.is_compiling()
    # (input.device builds a device object: ~0.4 µs a call on the hot path)
    device_type = "cpu" if input.is_cpu else "cuda" if input.is_cuda else input.device.type
    backend, why = select_backend(
        device_type, input.dtype, affine=affine, plain=plain, prefer_fused=prefer_fused,
        compiling=compiling,
    )

    if backend == NATIVE:
        if not compiling:
            _record((device_type, input.dtype, NATIVE, affine, False, False, False, False), why)
        # The native kernel is exact, fast and already computes statistics in fp32 for half
        # inputs: LayerNorm and LayerNorm-simple in the default convention are just F.layer_norm.
        if not affine and input.dtype not in _LOW_PRECISION:
            weight, bias = _ones_zeros(width, input.dtype, input.device)
            weight, bias = weight.view(shape), bias.view(shape)
        return F.layer_norm(input, shape, weight, bias, eps)

    flags = _kernels.NormFlags(eps, unbiased, detach_mean, detach_std, scale, k)
    if backend in (CUDA_CPP, TRITON):
        # The CUDA kernels take any leading shape: no reshape, so no view nodes in the graph,
        # unless several trailing dimensions are normalized (the kernels normalize the last).
        kernel = _kernels.cuda_backend(width, input.element_size(), input.numel())
        rows = input if len(shape) == 1 else input.reshape(-1, width)
        out = _kernels.cuda_norm(rows, flags, kernel)
        if out is not None:
            if len(shape) > 1:
                out = out.view_as(input)
            if not compiling:
                _record((device_type, input.dtype, kernel, affine, unbiased, detach_mean,
                         detach_std, ada), _WHY_CUDA_CPP if kernel == CUDA_CPP else _WHY_TRITON)
            return out
        backend, why = FALLBACK, _WHY_TRITON_WIDTH
    two_d = input.dim() == 2  # (reshape and view cost microseconds of Python each)
    x2d = input if two_d else input.reshape(-1, width)
    if backend == CPP:
        out = torch.ops.adanorm.norm(x2d, *flags)
    if backend == FALLBACK:
        if affine:  # (F.layer_norm checks them itself on the native path)
            _check_affine(weight, bias, shape)
        out = _NormFunction.apply(
            x2d,
            None if weight is None else weight.reshape(width),
            None if bias is None else bias.reshape(width),
            flags,
        )
    if not compiling:
        _record(
            (device_type, input.dtype, backend, affine, unbiased, detach_mean, detach_std, ada),
            why,
        )
    return out if two_d else out.view_as(input)


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
    backward; ``scale`` and ``k`` must then be > 0); otherwise the output is
    :math:`w \\odot y + b` with absent ``weight``/``bias`` skipped.  ``detach_mean``/``detach_std``
    hold :math:`\\mu`/:math:`\\sigma` constant in backward.
    """
    return _normalize(
        input, normalized_shape, weight, bias, eps, std_mode, detach_mean, detach_std, scale, k,
        scale is not None, False,
    )


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
    return _normalize(
        input, normalized_shape, weight, bias, eps, std_mode, False, False, None, 0.1, False,
        False,
    )


def layer_norm_simple(
    input: Tensor,
    normalized_shape: ShapeLike,
    eps: float = 1e-5,
    *,
    std_mode: StdMode = "biased",
) -> Tensor:
    r"""LayerNorm-simple: :math:`(x-\mu)/\sigma`, no gain or bias.

    On CPU it runs the fused C++ kernel, which beats native ``F.layer_norm`` for the
    parameter-free case (docs/performance.md); ``layer_norm`` without affine stays on the native
    kernel, bit-identical to ``nn.LayerNorm``."""
    return _normalize(
        input, normalized_shape, None, None, eps, std_mode, False, False, None, 0.1, False, True
    )


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
    return _normalize(
        input, normalized_shape, None, None, eps, std_mode, detach_mean, detach_std, None, 0.1,
        False, False,
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
    ``scale`` (:math:`C`) and ``k`` must be finite and > 0.
    """
    return _normalize(
        input, normalized_shape, None, None, eps, std_mode, False, False, scale, k, True, False
    )
