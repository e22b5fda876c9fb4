"""Fast kernels behind :mod:`adanorm.functional`.

CPU: ``norm_ops.cpp`` (the operators and their autograd kernel) and ``norm_cpu.cpp`` (the CPU
kernels) are compiled into one library once, on first use, with
:func:`torch.utils.cpp_extension.load` into a per-user cache (``$ADANORM_CACHE_DIR``, else
``$TORCH_EXTENSIONS_DIR/adanorm``, else ``~/.cache/adanorm``), keyed by torch version and the
CPU's vector capability.  Later processes
load the cached library in well under a second.  It defines the operators ``adanorm::norm``,
``adanorm::norm_forward`` and ``adanorm::norm_backward`` (CPU kernels plus a C++ autograd kernel);
this module adds their fake kernels so ``torch.compile`` and ``torch.export`` can trace them.

If no C++ compiler is found or the build fails, the pure-PyTorch path in
:mod:`adanorm.functional` is used and one warning says why; :func:`cpu_status` (and
``adanorm.backend_info()``) keep the reason.  ``ADANORM_DISABLE_EXTENSION=1`` forces that fallback
silently (tests and benchmarks compare both paths).

Each library is built in its own directory, ``<cache>/<library name>/``, while holding an OS file
lock (``flock``) on ``<library name>.build.lock`` there: the kernel drops that lock when its holder
dies, however it dies.  torch's own build lock (``lock``, a plain file that a killed build leaves
behind and that makes every later ``cpp_extension.load`` wait forever) is therefore stale whenever
it is found under the flock, and is removed.  A build finished by another process is loaded
directly (marker file ``<library name>.complete``).  Waiting for another live build is bounded by
``$ADANORM_BUILD_TIMEOUT`` seconds (default 900); then the fallback is used, with a warning that
names the lock.

GPU: ``norm_cuda.cu`` registers CUDA implementations of the same operators, so the C++ autograd
kernel runs AdaNorm and DetachNorm on CUDA with no Python on the hot path.  It is compiled with
nvcc on first use (about a minute, once per machine and GPU architecture) under the same lock
protocol.  Where there is no nvcc or the build fails, :mod:`adanorm._kernels.triton_norm`'s Triton
kernels run instead (``ADANORM_CUDA_BACKEND=triton`` forces them, ``cuda-cpp`` insists on C++);
triton is imported only when CUDA is available, so CPU-only machines never import it.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch

__all__ = [
    "NormFlags",
    "cpu_kernels_ready",
    "cpu_kernels_loaded",
    "cpu_status",
    "BuildLockTimeout",
    "extension_disabled",
    "cuda_kernels_ready",
    "cuda_norm",
    "cuda_backend",
    "cuda_cpp_takes",
    "cuda_cpp_takes_all",
    "cuda_status",
    "CUDA_MAX_WIDTH",
    "CUDA_SOURCE_PATH",
    "build_directory",
    "SOURCE_PATH",
    "OPS_SOURCE_PATH",
    "CPU_SOURCES",
]



class NormFlags(NamedTuple):
    """The non-tensor arguments of the ``adanorm::norm`` operators, in their schema's order: every
    variant is one of these (LayerNorm-simple: no detach, ``scale`` None; AdaNorm: ``scale`` C)."""

    eps: float
    unbiased: bool
    detach_mean: bool
    detach_std: bool
    scale: float | None
    k: float


SOURCE_PATH = Path(__file__).with_name("norm_cpu.cpp")
OPS_SOURCE_PATH = Path(__file__).with_name("norm_ops.cpp")
CPU_SOURCES = (OPS_SOURCE_PATH, SOURCE_PATH)  # the CPU library; norm_cuda.cu builds on its ops
_DISABLE_ENV = "ADANORM_DISABLE_EXTENSION"

# None: not tried yet; True/False: the outcome of the one attempt this process makes.
_cpu_state: bool | None = None
# Why the CPU kernels are not in use ("no-compiler", "failed", "timed-out") and the error text.
_cpu_failure: tuple[str, str] | None = None
_cpu_library: str | None = None
_python_kernels_registered = False
_BUILD_TIMEOUT_ENV = "ADANORM_BUILD_TIMEOUT"
_DEFAULT_BUILD_TIMEOUT_S = 900.0
_cuda_state: bool | None = None  # any fused CUDA kernel loaded
_triton_module = None  # adanorm._kernels.triton_norm once imported (CUDA machines only)
_triton_failure: str | None = None
_cuda_cpp_state: bool | None = None
_cuda_cpp_failure: str | None = None
_cuda_library: str | None = None
_CUDA_BACKEND_ENV = "ADANORM_CUDA_BACKEND"
CUDA_SOURCE_PATH = Path(__file__).with_name("norm_cuda.cu")
CUDA_MAX_WIDTH = 16384  # norm_cuda.cu: up to 512 threads x 32 elements in registers, any width
# Whether this norm_cuda.cu has passed benchmarks/gpu_check.py's correctness and cuda-cpp sweep on
# a real GPU.  The vectorized, warp-per-row rewrite has only been compiled (sm_90, 0 spills) and
# its host-side launch logic tested; until a GPU record shows it correct, ADANORM_CUDA_BACKEND=auto
# takes the Triton kernels (correct on an H200: benchmarks/results/gpu_check.json), and the C++
# kernels run only when asked for with ADANORM_CUDA_BACKEND=cuda-cpp (as gpu_check.sh does).
CUDA_CPP_VERIFIED = False
# From this many elements on, the Triton kernels would take a call (see cuda_backend), keyed by
# element size.  Empty: norm_cuda.cu's kernels take every tensor they can.  An H200 run of the
# first C++ kernels (element-wise 16-bit loads) had Triton ahead from 2^28 fp32 / 2^26 16-bit
# elements; the vectorized kernels are meant to close that gap, and
# benchmarks/gpu_check.py's "adanorm (triton)" row against "adanorm" says whether they do.
_TRITON_FROM_NUMEL: dict[int, int] = {}


# Read on every norm call (tests toggle it within one process), and os.environ.get costs about a
# microsecond: look the key up in os.environ's own mapping where CPython exposes it.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
try:
    _DISABLE_KEY = os.environ.encodekey(_DISABLE_ENV)  # type: ignore[attr-defined]
except AttributeError:
    _ENVIRON_DATA = None
_disable_values: dict[Any, bool] = {}


def extension_disabled() -> bool:
    """True when ``ADANORM_DISABLE_EXTENSION`` asks for the pure-PyTorch path."""
    if _ENVIRON_DATA is not None:
        raw = _ENVIRON_DATA.get(_DISABLE_KEY)
    else:
        raw = os.environ.get(_DISABLE_ENV)
    if raw is None:
        return False
    disabled = _disable_values.get(raw)
    if disabled is None:
        text = raw.decode() if isinstance(raw, bytes) else raw
        disabled = text.strip().lower() not in ("", "0", "false", "no")
        _disable_values[raw] = disabled
    return disabled


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
        rows = math.prod(x.shape[:-1])  # any leading shape (the CUDA kernels take N-d input)
        return (
            x.new_empty(x.shape),
            x.new_empty((rows,), dtype=torch.float32),
            x.new_empty((rows,), dtype=torch.float32),
        )

    @torch.library.register_fake("adanorm::norm_backward")
    def _backward_fake(grad, x, mean, rstd, eps, unbiased, detach_mean, detach_std, scale, k):
        return grad.new_empty(grad.shape)


def _register_double_backward() -> None:
    # The C++ autograd kernel calls adanorm::norm_input_grad from its backward when a graph of
    # the backward is being recorded (create_graph=True).  Registered as CompositeImplicitAutograd,
    # so autograd records the plain tensor operations of the reference gradient: second
    # derivatives are exact, with the detached statistics constant.
    from ..reference import saved_input_grad_ref

    torch.library.impl("adanorm::norm_input_grad", "CompositeImplicitAutograd")(
        saved_input_grad_ref
    )


class BuildLockTimeout(RuntimeError):
    """Another live process held the build lock for longer than ``$ADANORM_BUILD_TIMEOUT``."""


def _build_timeout() -> float:
    raw = os.environ.get(_BUILD_TIMEOUT_ENV, "").strip()
    if not raw:
        return _DEFAULT_BUILD_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= 0:
        raise ValueError(f"{_BUILD_TIMEOUT_ENV} must be a number of seconds >= 0, got {raw!r}")
    return value


def _acquire_build_lock(path: Path, timeout: float) -> int:
    """An exclusive flock on ``path`` (released by the kernel if this process dies), waiting at
    most ``timeout`` seconds."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise BuildLockTimeout(
                    f"another process has been building the C++ kernels for more than "
                    f"{timeout:g} s (it holds {path}); wait for it, or raise "
                    f"{_BUILD_TIMEOUT_ENV}, or set ADANORM_DISABLE_EXTENSION=1"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def _library_name() -> str:
    flags = _compile_flags(_vector_capability())
    # The name carries a digest of source and flags so a stale cache is never loaded by name.
    text = b"".join(source.read_bytes() for source in CPU_SOURCES) + " ".join(flags).encode()
    digest = hashlib.sha256(text).hexdigest()[:12]
    return f"adanorm_cpu_{digest}"


def _build_library(name: str, sources: list[Path], **load_kwargs: Any) -> Path:
    """Build (once per machine, under the flock protocol above) and load a torch extension that
    registers operators; return the path of its shared library."""
    from torch.utils import cpp_extension

    directory = build_directory() / name
    directory.mkdir(parents=True, exist_ok=True)
    library = directory / f"{name}.so"
    complete = directory / f"{name}.complete"

    def built() -> bool:
        return complete.exists() and library.exists()

    if not built():
        fd = _acquire_build_lock(directory / f"{name}.build.lock", _build_timeout())
        try:
            if not built():
                # Every builder holds the flock while torch's plain-file baton exists, so a
                # baton found now was left by a build that died: without this, load() below
                # would wait on it forever.
                (directory / "lock").unlink(missing_ok=True)
                cpp_extension.load(
                    name=name,
                    sources=[str(source) for source in sources],
                    build_directory=str(directory),
                    is_python_module=False,
                    verbose=os.environ.get("ADANORM_VERBOSE_BUILD", "") == "1",
                    **load_kwargs,
                )
                temporary = complete.with_name(complete.name + f".{os.getpid()}.tmp")
                temporary.write_text(str(library) + "\n")
                os.replace(temporary, complete)
        finally:
            os.close(fd)
    return library


def _load_cpu_library() -> None:
    global _cpu_library
    library = _build_library(
        _library_name(), list(CPU_SOURCES), extra_cflags=_compile_flags(_vector_capability()),
        extra_ldflags=["-fopenmp"],
    )
    if not hasattr(torch.ops.adanorm, "norm_forward"):
        torch.ops.load_library(str(library))
    if not hasattr(torch.ops.adanorm, "norm_forward"):
        raise RuntimeError("the compiled library did not register adanorm::norm_forward")
    global _python_kernels_registered
    if not _python_kernels_registered:  # once per process, even if a test reloads
        _register_fake_kernels()
        _register_double_backward()
        _python_kernels_registered = True
    _cpu_library = str(library)


def cpu_status() -> dict[str, Any]:
    """The C++ kernels' state in this process: ``status`` is ``loaded``, ``not-tried``,
    ``disabled`` (``ADANORM_DISABLE_EXTENSION``), ``no-compiler``, ``failed`` or ``timed-out``;
    ``detail`` holds the error of a failed attempt."""
    if extension_disabled():
        status, detail = "disabled", f"{_DISABLE_ENV} is set"
    elif _cpu_state is None:
        status, detail = "not-tried", None
    elif _cpu_state:
        status, detail = "loaded", None
    else:
        status, detail = _cpu_failure or ("failed", None)
    return {
        "status": status,
        "detail": detail,
        "library": _cpu_library,
        "build_directory": str(build_directory()),
        "capability": _vector_capability(),
    }


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
    global _cpu_failure
    if _find_compiler() is None:
        _cpu_state = False
        _cpu_failure = ("no-compiler", "no C++ compiler found (set CXX or install g++)")
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
        detail = f"{type(error).__name__}: {str(error)[-400:]}"
        _cpu_failure = ("timed-out" if isinstance(error, BuildLockTimeout) else "failed", detail)
        warnings.warn(
            f"adanorm: building the C++ kernels failed ({detail}); using the pure-PyTorch "
            f"kernels.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    _cpu_state = True
    return True


def _cuda_backend_choice() -> str:
    choice = os.environ.get(_CUDA_BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "cuda-cpp", "triton"):
        raise ValueError(
            f"{_CUDA_BACKEND_ENV} must be auto, cuda-cpp or triton, got {choice!r}"
        )
    return choice


def _find_nvcc() -> str | None:
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    nvcc = Path(home, "bin", "nvcc") if home else None
    return str(nvcc) if nvcc is not None and nvcc.exists() else shutil.which("nvcc")


def _cuda_library_name() -> str:
    major, minor = torch.cuda.get_device_capability()
    tag = f"{CUDA_SOURCE_PATH.read_bytes()!r}{torch.version.cuda}{major}{minor}".encode()
    return f"adanorm_cuda_{hashlib.sha256(tag).hexdigest()[:12]}_sm{major}{minor}"


def build_cuda_library() -> Path:
    """Compile ``norm_cuda.cu`` for this machine's GPU (once; cached like the CPU library) and
    return the library's path without loading it."""
    major, minor = torch.cuda.get_device_capability()
    return _build_library(
        _cuda_library_name(), [CUDA_SOURCE_PATH],
        extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"],
    )


def _load_cuda_library() -> None:
    global _cuda_library
    library = build_cuda_library()
    torch.ops.load_library(str(library))
    probe = torch.ones(2, 8, device="cuda")
    if torch.ops.adanorm.norm(probe, 1e-5, False, False, False, None, 0.1).abs().max() > 1e-3:
        raise RuntimeError("the CUDA kernels normalize a constant row to non-zeros")
    _cuda_library = str(library)


def _cuda_cpp_ready() -> bool:
    """Build (once per machine) and load the CUDA C++ kernels; False (and the reason in
    :func:`cuda_status`) when there is no nvcc, no C++ CPU library or the build fails."""
    global _cuda_cpp_state, _cuda_cpp_failure
    if _cuda_cpp_state is not None:
        return _cuda_cpp_state
    _cuda_cpp_state = False
    if not cpu_kernels_ready():
        _cuda_cpp_failure = "the C++ CPU library (which defines the operators) is unavailable"
    elif _find_nvcc() is None:
        _cuda_cpp_failure = "no nvcc found (set CUDA_HOME)"
    else:
        if _find_compiled(_cuda_library_name()) is None:
            print("adanorm: compiling the CUDA kernels once for this machine (about a minute)...",
                  flush=True)
        try:
            _load_cuda_library()
        except Exception as error:  # any build or load failure: Triton (or the fallback) runs
            _cuda_cpp_failure = f"{type(error).__name__}: {str(error)[-400:]}"
            warnings.warn(
                f"adanorm: building the CUDA C++ kernels failed ({_cuda_cpp_failure}); using the "
                f"Triton kernels if available, else the pure-PyTorch ones.",
                RuntimeWarning,
                stacklevel=4,
            )
        else:
            _cuda_cpp_state = True
    return _cuda_cpp_state


def _find_compiled(name: str) -> Path | None:
    complete = build_directory() / name / f"{name}.complete"
    return complete if complete.exists() else None


def _triton_ready() -> bool:
    global _triton_module, _triton_failure
    if _triton_module is not None:
        return True
    if _triton_failure is not None:
        return False
    try:
        from . import triton_norm  # registers the adanorm_triton ops
    except Exception as error:
        _triton_failure = f"{type(error).__name__}: {error}"
        return False
    _triton_module = triton_norm
    return True


def cuda_kernels_ready() -> bool:
    """Load the fused CUDA kernels once: the C++ kernels (built with nvcc on first use) with
    ``ADANORM_CUDA_BACKEND=cuda-cpp``, or with ``auto`` once :data:`CUDA_CPP_VERIFIED`; the Triton
    kernels otherwise; False means the pure-PyTorch path.

    triton is imported here and only here, and only after CUDA was found."""
    global _cuda_state
    if _cuda_state is not None:
        return _cuda_state
    if extension_disabled() or not torch.cuda.is_available():
        return False
    choice = _cuda_backend_choice()
    cpp = (choice == "cuda-cpp" or (choice == "auto" and CUDA_CPP_VERIFIED)) and _cuda_cpp_ready()
    triton = _triton_ready()
    _cuda_state = cpp or triton
    if choice == "cuda-cpp" and not cpp:
        warnings.warn(f"adanorm: {_CUDA_BACKEND_ENV}=cuda-cpp but the CUDA C++ kernels are "
                      f"unavailable ({_cuda_cpp_failure}); using "
                      f"{'Triton' if triton else 'the pure-PyTorch kernels'}.",
                      RuntimeWarning, stacklevel=3)
    elif not _cuda_state:
        warnings.warn(
            f"adanorm: no fused CUDA kernels (C++: {_cuda_cpp_failure}; Triton: "
            f"{_triton_failure}); using the pure-PyTorch kernels on CUDA.",
            RuntimeWarning, stacklevel=3,
        )
    return _cuda_state


def cuda_status() -> dict[str, Any]:
    """The CUDA kernels' state in this process (for ``adanorm.backend_info()``)."""
    return {
        "cuda_available": torch.cuda.is_available(),
        "choice": os.environ.get(_CUDA_BACKEND_ENV, "auto"),
        "cuda_cpp_verified_on_gpu": CUDA_CPP_VERIFIED,
        "cuda_cpp": "not-tried" if _cuda_cpp_state is None else (
            "loaded" if _cuda_cpp_state else "failed"),
        "cuda_cpp_detail": _cuda_cpp_failure,
        "cuda_cpp_library": _cuda_library,
        "triton": "loaded" if _triton_module is not None else (
            "failed" if _triton_failure is not None else "not-tried"),
        "triton_detail": _triton_failure,
    }


def cuda_cpp_takes(width: int, element_size: int) -> bool:
    """Whether norm_cuda.cu's kernels take rows of ``width`` elements of ``element_size`` bytes
    (16-byte vectors where width and data allow, element by element otherwise)."""
    return 1 <= width <= CUDA_MAX_WIDTH


def cuda_cpp_takes_all(width: int, element_size: int) -> bool:
    """Whether :func:`cuda_backend` picks norm_cuda.cu for rows of ``width`` whatever the
    tensor's size (no size from which Triton takes over for this element size)."""
    return bool(_cuda_cpp_state) and cuda_cpp_takes(width, element_size) and (
        element_size not in _TRITON_FROM_NUMEL
    )


def cuda_backend(width: int, element_size: int = 4, numel: int = 0) -> str | None:
    """Which fused CUDA kernel takes a tensor of ``numel`` elements in rows of ``width``:
    ``"cuda-cpp"``, ``"triton"`` or None.

    The C++ kernels cost about native's host time per call, the Triton kernels 200-270 µs more
    per fwd+bwd (2048 x 256 on an H200); Triton takes a call only from ``_TRITON_FROM_NUMEL``
    elements on (none at present), or where the C++ kernels are unavailable."""
    triton = _triton_module is not None and width <= min(_triton_module.MAX_WIDTH.values())
    if triton and numel >= _TRITON_FROM_NUMEL.get(element_size, 2**62):
        return "triton"
    if _cuda_cpp_state and cuda_cpp_takes(width, element_size):
        return "cuda-cpp"
    return "triton" if triton else None


def cuda_norm(x: torch.Tensor, flags: NormFlags, kernel: str | None = None) -> torch.Tensor | None:
    """The fused CUDA kernels on a CUDA tensor normalized over its last dimension (any leading
    shape), or None where none applies (rows too wide).  ``kernel`` is :func:`cuda_backend`'s
    choice for ``x`` when the caller already made it.  Call only after
    :func:`cuda_kernels_ready` returned True."""
    if kernel is None:
        kernel = cuda_backend(x.shape[-1], x.element_size(), x.numel())
    if kernel == "cuda-cpp":
        return torch.ops.adanorm.norm.default(x, *flags)
    if kernel == "triton":
        rows = x.reshape(-1, x.shape[-1])
        return _triton_module.norm(rows, *flags).view(x.shape)
    return None
