"""Which implementation computes a call: :func:`select_backend`, the one place that decides, and
:func:`backend_info`, which reports its choices and the kernels' build state."""

from __future__ import annotations

from typing import Any

import torch

from . import _kernels
from ._checks import _STD_MODES

# ------------------------------------------------------------------------------------------------
# Backend selection: the one place that decides which implementation computes a call.
# ------------------------------------------------------------------------------------------------

NATIVE = "native"  # torch's own F.layer_norm
CPP = "cpp"  # the fused C++ CPU kernels, adanorm::norm
TRITON = "triton"  # the Triton CUDA kernels
CUDA_CPP = "cuda-cpp"  # the fused CUDA C++ kernels, adanorm::norm on CUDA
FALLBACK = "fallback"  # the pure-PyTorch _NormFunction (_fallback.py)

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
