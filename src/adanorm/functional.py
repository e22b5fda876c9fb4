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
import numbers
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _kernels
from .reference import normalize_ref

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

StdMode = Literal["biased", "unbiased"]
_STD_MODES = ("biased", "unbiased")
_LOW_PRECISION = (torch.float16, torch.bfloat16)

ShapeLike = int | Sequence[int] | torch.Size

# ------------------------------------------------------------------------------------------------
# Argument validation, shared by the modules and the functional forms.  Plain Python comparisons
# only (no tensor ops); the parsed normalized_shape is cached by value.
# ------------------------------------------------------------------------------------------------

# Parsed shapes: plain ints by value, tuples (immutable) by identity, so that True, 4.0 or (True,)
# never borrow the entry of 1, 4 or (1,).
_int_shapes: dict[int, tuple[tuple[int, ...], int]] = {}
_tuple_shapes: dict[int, tuple[Any, tuple[tuple[int, ...], int]]] = {}


def _parse_shape(normalized_shape: Any) -> tuple[tuple[int, ...], int]:
    if isinstance(normalized_shape, numbers.Integral) and not isinstance(normalized_shape, bool):
        dims: tuple[Any, ...] = (normalized_shape,)
    elif isinstance(normalized_shape, (Sequence, torch.Size)) and not isinstance(
        normalized_shape, str
    ):
        dims = tuple(normalized_shape)
    else:
        dims = ()
    if not dims or not all(
        isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in dims
    ):
        raise ValueError(
            f"normalized_shape must be a positive int or a non-empty sequence of positive ints, "
            f"got {normalized_shape!r}"
        )
    shape = tuple(int(d) for d in dims)
    return shape, math.prod(shape)


def _shape_and_width(normalized_shape: ShapeLike) -> tuple[tuple[int, ...], int]:
    if type(normalized_shape) is int:
        parsed = _int_shapes.get(normalized_shape)
        if parsed is None:
            parsed = _parse_shape(normalized_shape)
            if len(_int_shapes) > 256:
                _int_shapes.clear()
            _int_shapes[normalized_shape] = parsed
        return parsed
    entry = _tuple_shapes.get(id(normalized_shape))
    if entry is not None and entry[0] is normalized_shape:
        return entry[1]
    parsed = _parse_shape(normalized_shape)
    if isinstance(normalized_shape, tuple):
        if len(_tuple_shapes) > 256:
            _tuple_shapes.clear()
        # The entry holds the tuple itself, so its id cannot be reused while it is cached.
        _tuple_shapes[id(normalized_shape)] = (normalized_shape, parsed)
    return parsed


def _real(value: Any, name: str, expected: str, *, positive: bool) -> float:
    if type(value) is not float and (
        not isinstance(value, numbers.Real) or isinstance(value, bool)
    ):
        raise TypeError(f"{name} must be a real number {expected}, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
        raise ValueError(f"{name} must be {expected}, got {value!r} (a finite real number)")
    return value


def check_std_mode(std_mode: str) -> None:
    if std_mode not in _STD_MODES:
        raise ValueError(f"std_mode must be one of {_STD_MODES}, got {std_mode!r}")


def check_arguments(
    normalized_shape: ShapeLike,
    eps: float,
    std_mode: str,
    scale: float | None = None,
    k: float | None = None,
    *,
    ada: bool = False,
) -> tuple[tuple[int, ...], int, float, bool, float | None, float]:
    """Validate the arguments every norm of the family takes; the one check behind both the
    modules' constructors and the functional forms.

    Returns ``(shape, width, eps, unbiased, scale, k)`` normalized to Python types; raises
    ``ValueError``/``TypeError`` naming the bad value and what was expected.  ``ada=True``
    (AdaNorm) requires ``scale`` (C) and ``k`` to be finite and > 0.
    """
    shape, width = _shape_and_width(normalized_shape)
    eps = eps if type(eps) is float and 0.0 <= eps < math.inf else _real(
        eps, "eps", ">= 0", positive=False
    )
    if std_mode == "biased":
        unbiased = False
    elif std_mode == "unbiased":
        unbiased = True
        if width < 2:
            raise ValueError(
                f"std_mode='unbiased' needs at least 2 normalized elements, got normalized_shape "
                f"{list(shape)}"
            )
    else:
        raise ValueError(f"std_mode must be one of {_STD_MODES}, got {std_mode!r}")
    if ada:
        if scale is None:
            raise ValueError(
                "AdaNorm needs scale (C) > 0, got None; for (x - mean) / std without AdaNorm's "
                "phi use layer_norm_simple"
            )
        scale = _real(scale, "AdaNorm scale (C)", "> 0", positive=True)
        k = _real(k, "AdaNorm k", "> 0", positive=True)
    else:
        scale, k = None, 0.1
    return shape, width, eps, unbiased, scale, k


def check_input(x: Tensor, shape: tuple[int, ...]) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"adanorm normalizes tensors, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"adanorm normalizes floating-point tensors, got a tensor of dtype {x.dtype}"
        )
    n = len(shape)
    size = x.shape
    if len(size) < n or (size[-1] != shape[0] if n == 1 else size[len(size) - n :] != shape):
        raise ValueError(
            f"expected input with trailing shape {list(shape)} (normalized_shape), "
            f"got input of shape {list(x.shape)}"
        )


def _check_affine(weight: Tensor | None, bias: Tensor | None, shape: tuple[int, ...]) -> None:
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != shape:
            raise ValueError(
                f"{name} must have shape {list(shape)} (normalized_shape), got {list(t.shape)}"
            )


# ------------------------------------------------------------------------------------------------
# Backend selection: the one place that decides which implementation computes a call.
# ------------------------------------------------------------------------------------------------

NATIVE = "native"  # torch's own F.layer_norm
CPP = "cpp"  # the fused C++ CPU kernels, adanorm::norm
TRITON = "triton"  # the Triton CUDA kernels
CUDA_CPP = "cuda-cpp"  # the fused CUDA C++ kernels, adanorm::norm on CUDA
FALLBACK = "fallback"  # the pure-PyTorch _NormFunction below

_FAST_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_WHY_NATIVE = "biased LayerNorm(-simple) with both statistics differentiated is F.layer_norm"
_WHY_AFFINE = "a gain/bias with unbiased std or detached statistics: only this path has it"
_WHY_DTYPE = "the fused kernels take float32/bfloat16/float16 only"
_WHY_CPP = "the fused C++ kernel"
_WHY_CPP_MISSING = "the C++ extension is disabled or failed to build (see cpu_extension)"
_WHY_CPP_UNTRACED = "the C++ extension was not loaded before torch.compile traced this call"
_WHY_TRITON = "the Triton kernel"
_WHY_CUDA_CPP = "the fused CUDA C++ kernel"
_WHY_TRITON_MISSING = "no fused CUDA kernel is available (see cuda)"
_WHY_TRITON_WIDTH = "the row is wider than the fused CUDA kernels take"
_WHY_DEVICE = "no fused kernel for this device"


def select_backend(
    device_type: str,
    dtype: torch.dtype,
    *,
    affine: bool,
    plain: bool,
    prefer_fused: bool = False,
    compiling: bool = False,
    load: bool = True,
) -> tuple[str, str]:
    """Which backend computes a call, and why: ``(backend, reason)``.

    Args:
        device_type: the input's ``device.type``.
        dtype: the input's dtype.
        affine: a weight or bias is given.
        plain: biased std, neither statistic detached, not AdaNorm (what ``F.layer_norm`` does).
        prefer_fused: ``layer_norm_simple``: the fused C++ kernel beats native on CPU; plain
            ``layer_norm`` without affine stays native, bit-identical to ``nn.LayerNorm``.
        compiling: inside ``torch.compile`` tracing: never build the extension there.
        load: build/load the kernels if not yet tried (False: report from the state only).
    """
    fusable = not affine and dtype in _FAST_KERNEL_DTYPES
    if plain and not (prefer_fused and fusable and device_type == "cpu"):
        return NATIVE, _WHY_NATIVE
    if not fusable:
        return (NATIVE, _WHY_NATIVE) if plain else (FALLBACK, _WHY_AFFINE if affine else _WHY_DTYPE)
    if device_type == "cpu":
        if compiling or not load:
            if _kernels.cpu_kernels_loaded():
                return CPP, _WHY_CPP
            reason = _WHY_CPP_UNTRACED if compiling else _WHY_CPP_MISSING
        elif _kernels.cpu_kernels_ready():
            return CPP, _WHY_CPP
        else:
            reason = _WHY_CPP_MISSING
    elif device_type == "cuda":
        ready = _kernels.cuda_kernels_ready() if load else _kernels._cuda_state is True
        if ready:
            if _kernels._cuda_cpp_state:
                return CUDA_CPP, _WHY_CUDA_CPP
            return TRITON, _WHY_TRITON
        reason = _WHY_TRITON_MISSING
    else:
        reason = _WHY_DEVICE
    return (NATIVE if plain else FALLBACK), reason


# (device type, dtype, backend, affine, unbiased, detach_mean, detach_std, ada) -> reason, for
# the calls this process made (eager calls; a compiled graph records its trace).
_used: dict[tuple, str] = {}


def _record(key: tuple, reason: str) -> None:
    if key not in _used:
        _used[key] = reason


def _variant_name(affine: bool, detach_mean: bool, detach_std: bool, ada: bool) -> str:
    if ada:
        return "adanorm" if not (detach_mean or detach_std) else "adanorm(detached)"
    if detach_mean and detach_std:
        return "detachnorm"
    if detach_mean:
        return "detach-mean"
    if detach_std:
        return "detach-std"
    return "layernorm" if affine else "layernorm-simple"


_INFO_VARIANTS = (
    # label, affine, detach_mean, detach_std, ada, prefer_fused
    ("layernorm", True, False, False, False, False),
    ("layernorm(elementwise_affine=False)", False, False, False, False, False),
    ("layernorm-simple", False, False, False, False, True),
    ("detachnorm", False, True, True, False, False),
    ("detach-mean", False, True, False, False, False),
    ("detach-std", False, False, True, False, False),
    ("adanorm", False, False, False, True, False),
)
_INFO_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def backend_info(*, load: bool = True) -> dict[str, Any]:
    """Which backend computes each variant on each available device and dtype, and why.

    Returns a JSON-ready dict:

    * ``cpu_extension``: the C++ kernels' state (``loaded``, ``failed``, ``no-compiler``,
      ``timed-out``, ``disabled``, ``not-tried``), the error of a failed build, the library path;
    * ``cuda``: the fused CUDA kernels' state: the C++ kernels (``cuda_cpp``: built and
      loaded, or why not) and the Triton kernels (``triton``);
    * ``triton``: whether CUDA is present and the Triton kernels imported;
    * ``backends``: ``{device: {dtype: {variant: backend}}}`` with variants named as in the
      registry (``":unbiased"`` for the released code's std); backends are ``native``
      (``F.layer_norm``), ``cpp``, ``cuda-cpp``, ``triton`` or ``fallback`` (pure PyTorch);
    * ``reasons``: ``{device: {dtype: {variant: why}}}`` for every entry that is not native;
    * ``used``: the (variant, device, dtype, backend, why) of every distinct eager call so far.

    ``load=True`` builds/loads the kernels first (as the first norm call would), so a failed
    build is reported rather than "not tried".
    """
    import warnings

    cuda = torch.cuda.is_available()
    triton_detail = None
    if load and not _kernels.cpu_kernels_loaded() and not _kernels.extension_disabled():
        _kernels.cpu_kernels_ready()
    if load and cuda and _kernels._cuda_state is None and not _kernels.extension_disabled():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _kernels.cuda_kernels_ready()
        for w in caught:
            triton_detail = str(w.message)
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    devices = ["cpu"] + (["cuda"] if cuda else [])
    backends: dict[str, Any] = {}
    reasons: dict[str, Any] = {}
    for device in devices:
        for dtype in _INFO_DTYPES:
            dname = str(dtype).removeprefix("torch.")
            for label, affine, d_mean, d_std, ada, prefer in _INFO_VARIANTS:
                for std_mode in _STD_MODES:
                    unbiased = std_mode == "unbiased"
                    plain = not (unbiased or d_mean or d_std or ada)
                    backend, why = select_backend(
                        device, dtype, affine=affine, plain=plain, prefer_fused=prefer, load=False
                    )
                    name = label + (":unbiased" if unbiased else "")
                    backends.setdefault(device, {}).setdefault(dname, {})[name] = backend
                    if backend != NATIVE:
                        reasons.setdefault(device, {}).setdefault(dname, {})[name] = why
    used = [
        {
            "variant": _variant_name(affine, d_mean, d_std, ada)
            + (":unbiased" if unbiased else ""),
            "device": device,
            "dtype": str(dtype).removeprefix("torch."),
            "backend": backend,
            "why": why,
        }
        for (device, dtype, backend, affine, unbiased, d_mean, d_std, ada), why in list(
            _used.items()
        )
    ]
    cuda_status = _kernels.cuda_status()
    return {
        "cpu_extension": _kernels.cpu_status(),
        "cuda": {**cuda_status, "warning": triton_detail},
        "triton": {
            "cuda_available": cuda,
            "status": cuda_status["triton"],
            "detail": cuda_status["triton_detail"] or triton_detail,
        },
        "backends": backends,
        "reasons": reasons,
        "used": used,
    }


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
    eps: float,
    unbiased: bool,
    detach_mean: bool,
    detach_std: bool,
    scale: float | None,
    k: float,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Input/weight/bias gradients as differentiable functions of ``grad_out``, ``x2d`` and the
    parameters, through :func:`adanorm.reference.normalize_ref` (float64 arithmetic): what a
    backward asked for with ``create_graph=True`` returns, so second derivatives are exact with
    the detached statistics (and AdaNorm's phi) held constant, as in first order."""
    sources = (x2d, weight, bias)
    wanted = [t for t, need in zip(sources, needs, strict=True) if need and t is not None]
    with torch.enable_grad():
        out = normalize_ref(
            x2d, x2d.shape[-1], weight, bias, eps,
            std_mode="unbiased" if unbiased else "biased",
            detach_mean=detach_mean, detach_std=detach_std, scale=scale, k=k,
            compute_dtype=torch.float64,
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
        eps: float,
        unbiased: bool,
        detach_mean: bool,
        detach_std: bool,
        scale: float | None,
        k: float,
    ) -> Tensor:
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
        ctx.flags = (eps, unbiased, detach_mean, detach_std, scale, k)
        return out.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x2d, mean, rstd, rho, weight, bias, inv_unit = ctx.saved_tensors
        eps, unbiased, detach_mean, detach_std, scale, k = ctx.flags
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        compute_dtype = rstd.dtype
        none6 = (None,) * 6
        # The true 1/sigma; rescaled rows carry their unit separately (see _scaled_statistics).
        true_rstd = rstd if inv_unit is None else rstd * inv_unit

        if x2d is None:  # DetachNorm: both statistics constant, dx = g / sigma, linear in g.
            grad_x = (grad_out.to(compute_dtype) * true_rstd).to(grad_out.dtype)
            return grad_x, None, None, *none6

        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            grads = _reference_grads(
                grad_out, x2d, weight, bias, (need_x, need_w, need_b), eps, unbiased,
                detach_mean, detach_std, scale, k,
            )
            return *grads, *none6

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
        return grad_x, grad_weight, grad_bias, *none6


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

    if backend in (CUDA_CPP, TRITON):
        # The CUDA kernels take any leading shape: no reshape, so no view nodes in the graph,
        # unless several trailing dimensions are normalized (the kernels normalize the last).
        kernel = _kernels.cuda_backend(width, input.element_size(), input.numel())
        rows = input if len(shape) == 1 else input.reshape(-1, width)
        out = _kernels.cuda_norm(rows, eps, unbiased, detach_mean, detach_std, scale, k, kernel)
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
        out = torch.ops.adanorm.norm(x2d, eps, unbiased, detach_mean, detach_std, scale, k)
    if backend == FALLBACK:
        if affine:  # (F.layer_norm checks them itself on the native path)
            _check_affine(weight, bias, shape)
        out = _NormFunction.apply(
            x2d,
            None if weight is None else weight.reshape(width),
            None if bias is None else bias.reshape(width),
            eps,
            unbiased,
            detach_mean,
            detach_std,
            scale,
            k,
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
