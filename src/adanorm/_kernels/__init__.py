"""Fast kernels behind :mod:`adanorm.functional`.

CPU: ``norm_cpu.cpp`` is compiled once, on first use, with :func:`torch.utils.cpp_extension.load`
into a per-user cache (``$ADANORM_CACHE_DIR``, else ``$TORCH_EXTENSIONS_DIR/adanorm``, else
``~/.cache/adanorm``), keyed by torch version and the CPU's vector capability.  Later processes
load the cached library in well under a second.  It defines the operators ``adanorm::norm``,
``adanorm::norm_forward`` and ``adanorm::norm_backward`` (CPU kernels plus a C++ autograd kernel);
this module adds their fake kernels so ``torch.compile`` and ``torch.export`` can trace them.

If no C++ compiler is found or the build fails, the pure-PyTorch path in
:mod:`adanorm.functional` is used and one warning says why.  ``ADANORM_DISABLE_EXTENSION=1``
forces that fallback silently (tests and benchmarks compare both paths).

GPU: :mod:`adanorm._kernels.triton_norm` holds Triton kernels; it is imported only when CUDA is
available, so CPU-only machines never import triton.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from pathlib import Path

import torch

__all__ = [
    "cpu_kernels_ready",
    "cpu_kernels_loaded",
    "extension_disabled",
    "cuda_kernels_ready",
    "cuda_norm",
    "build_directory",
    "SOURCE_PATH",
]

SOURCE_PATH = Path(__file__).with_name("norm_cpu.cpp")
_DISABLE_ENV = "ADANORM_DISABLE_EXTENSION"

# None: not tried yet; True/False: the outcome of the one attempt this process makes.
_cpu_state: bool | None = None
_cuda_state: bool | None = None
_triton_module = None  # adanorm._kernels.triton_norm once imported (CUDA machines only)


def extension_disabled() -> bool:
    """True when ``ADANORM_DISABLE_EXTENSION`` asks for the pure-PyTorch path."""
    return os.environ.get(_DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _vector_capability() -> str:
    """The instruction set torch itself dispatches to on this CPU (AVX512, AVX2 or DEFAULT)."""
    forced = os.environ.get("ATEN_CPU_CAPABILITY", "").upper()
    capability = forced or torch.backends.cpu.get_cpu_capability().upper()
    if capability.startswith("AVX512"):
        return "AVX512"
    if capability.startswith("AVX2"):
        return "AVX2"
    return "DEFAULT"


# The same per-capability flags torch's own build uses for its AVX2 / AVX512 kernels; the chosen
# capability is the one torch detected at runtime on this CPU, and the cache is keyed by it, so a
# cache never serves a library built for another instruction set.
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "DEFAULT": [],
}


def _compile_flags(capability: str) -> list[str]:
    return [
        "-O3",
        "-fopenmp",  # at::parallel_for is OpenMP-inline; links torch's own libgomp.so.1
        f"-DCPU_CAPABILITY={capability}",
        f"-DCPU_CAPABILITY_{capability}",
        *_CAPABILITY_FLAGS[capability],
    ]


def build_directory() -> Path:
    """Where the compiled CPU library is cached."""
    root = os.environ.get("ADANORM_CACHE_DIR")
    if root:
        base = Path(root)
    elif os.environ.get("TORCH_EXTENSIONS_DIR"):
        base = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "adanorm"
    else:
        base = Path.home() / ".cache" / "adanorm"
    torch_version = torch.__version__.replace("+", "_")
    return base / f"torch-{torch_version}" / _vector_capability().lower()


def _find_compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def _register_fake_kernels() -> None:
    # Shapes only; these let FakeTensor tracing (torch.compile, torch.export) see through the ops.
    @torch.library.register_fake("adanorm::norm")
    def _norm_fake(x, eps, unbiased, detach_mean, detach_std, scale, k):
        return x.new_empty(x.shape)

    @torch.library.register_fake("adanorm::norm_forward")
    def _forward_fake(x, eps, unbiased, scale, k):
        rows = x.shape[0]
        return (
            x.new_empty(x.shape),
            x.new_empty((rows,), dtype=torch.float32),
            x.new_empty((rows,), dtype=torch.float32),
        )

    @torch.library.register_fake("adanorm::norm_backward")
    def _backward_fake(grad, x, mean, rstd, eps, unbiased, detach_mean, detach_std, scale, k):
        return grad.new_empty(grad.shape)


def _load_cpu_library() -> None:
    from torch.utils import cpp_extension

    capability = _vector_capability()
    flags = _compile_flags(capability)
    # The name carries a digest of source and flags so a stale cache is never loaded by name.
    digest = hashlib.sha256(SOURCE_PATH.read_bytes() + " ".join(flags).encode()).hexdigest()[:12]
    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=f"adanorm_cpu_{digest}",
        sources=[str(SOURCE_PATH)],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        is_python_module=False,
        verbose=os.environ.get("ADANORM_VERBOSE_BUILD", "") == "1",
    )
    if not hasattr(torch.ops.adanorm, "norm_forward"):
        raise RuntimeError("the compiled library did not register adanorm::norm_forward")
    _register_fake_kernels()


def cpu_kernels_loaded() -> bool:
    """True once the C++ operators are loaded in this process; never builds anything.

    Safe to call while ``torch.compile`` traces (it only reads module state)."""
    return _cpu_state is True and not extension_disabled()


def cpu_kernels_ready() -> bool:
    """Load (building on first use, once per machine) the C++ CPU kernels; False means fall back.

    The first failure emits a single warning; later calls return False without retrying."""
    global _cpu_state
    if extension_disabled():
        return False  # checked first and not cached: tests toggle it within one process
    if _cpu_state is not None:
        return _cpu_state
    if _find_compiler() is None:
        _cpu_state = False
        warnings.warn(
            "adanorm: no C++ compiler found (set CXX or install g++); using the pure-PyTorch "
            "kernels, which are several times slower for AdaNorm and DetachNorm.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    if not any(build_directory().glob("adanorm_cpu_*.so")):  # a first build takes 20-40 s
        import sys

        print(
            f"adanorm: building the C++ CPU kernels in {build_directory()} (once per machine "
            f"and torch version, 20-40 s)",
            file=sys.stderr,
            flush=True,
        )
    try:
        _load_cpu_library()
    except Exception as error:  # any build or load failure means: use the fallback
        _cpu_state = False
        warnings.warn(
            f"adanorm: building the C++ kernels failed ({type(error).__name__}: "
            f"{str(error)[-400:]}); using the pure-PyTorch kernels.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    _cpu_state = True
    return True


def cuda_kernels_ready() -> bool:
    """True when the Triton kernels are importable: CUDA present and triton installed.

    triton is imported here and only here, and only after CUDA was found."""
    global _cuda_state
    if _cuda_state is not None:
        return _cuda_state
    if extension_disabled() or not torch.cuda.is_available():
        return False
    global _triton_module
    try:
        from . import triton_norm  # registers the adanorm_triton ops
    except Exception as error:
        _cuda_state = False
        warnings.warn(
            f"adanorm: Triton kernels unavailable ({type(error).__name__}: {error}); using "
            "the pure-PyTorch kernels on CUDA.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    _triton_module = triton_norm
    _cuda_state = True
    return True


def cuda_norm(
    x2d: torch.Tensor,
    eps: float,
    unbiased: bool,
    detach_mean: bool,
    detach_std: bool,
    scale: float | None,
    k: float,
) -> torch.Tensor | None:
    """The Triton kernels on a CUDA (rows, H) tensor, or None where they do not apply (rows wider
    than triton_norm.MAX_WIDTH).  Call only after :func:`cuda_kernels_ready` returned True."""
    if _triton_module is None or not _triton_module.supports(x2d):
        return None
    return _triton_module.norm(x2d, eps, unbiased, detach_mean, detach_std, scale, k)
