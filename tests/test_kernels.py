"""The fused kernels (adanorm._kernels) against the pure-PyTorch fallback and the float64 reference.

The C++ CPU extension is built once per machine (about 20-50 s on 2 cores) on first use and cached;
if no compiler is available the fast-path tests are skipped and the fallback test still runs.
The Triton kernels are checked with triton's CPU interpreter where triton is installed.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import adanorm
import adanorm.functional as AF
from adanorm import AdaNorm, DetachNorm, LayerNormSimple, _kernels
from adanorm.reference import normalize_ref

# Parameter-free variants, the ones the fused kernels serve.
KERNEL_VARIANTS = {
    "layernorm-simple": {},
    "detachnorm": {"detach_mean": True, "detach_std": True},
    "detach-mean": {"detach_mean": True},
    "detach-std": {"detach_std": True},
    "adanorm": {"scale": 2.0, "k": 0.1},
    "adanorm-c1-detached": {"scale": 1.0, "k": 0.1, "detach_mean": True, "detach_std": True},
}
# float32 / reduced precision tolerances against float64: one fp32 rounding per element, or one
# bf16/fp16 rounding of the output (and of the gradient) after float32 arithmetic.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 4e-2, torch.float16: 5e-3}


@pytest.fixture(scope="module")
def fast_kernels():
    if _kernels.extension_disabled():
        pytest.skip("ADANORM_DISABLE_EXTENSION is set")
    if not _kernels.cpu_kernels_ready():
        pytest.skip("the C++ extension could not be built here (no compiler?)")
    return True


def _run(x: torch.Tensor, grad: torch.Tensor, kwargs: dict, std_mode: str, fallback: bool,
         monkeypatch: pytest.MonkeyPatch):
    if fallback:
        monkeypatch.setenv("ADANORM_DISABLE_EXTENSION", "1")
    else:
        monkeypatch.delenv("ADANORM_DISABLE_EXTENSION", raising=False)
    x = x.detach().clone().requires_grad_()
    if kwargs:
        out = AF.normalize(x, x.shape[-1], std_mode=std_mode, **kwargs)
    else:  # normalize() sends parameter-free LayerNorm to native F.layer_norm on purpose
        out = AF.layer_norm_simple(x, x.shape[-1], std_mode=std_mode)
    (dx,) = torch.autograd.grad(out, x, grad)
    return out, dx


def _reference(x: torch.Tensor, grad: torch.Tensor, kwargs: dict, std_mode: str):
    x64 = x.detach().double().requires_grad_()
    out = normalize_ref(x64, (x.shape[-1],), std_mode=std_mode, **kwargs)
    (dx,) = torch.autograd.grad(out, x64, grad.double())
    return out, dx


def _max_error(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> float:
    # Relative to the magnitude of the reference (|y| reaches sqrt(H)), or to ``scale`` if larger.
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(scale)).item()


def _gradient_scale(x: torch.Tensor, grad: torch.Tensor) -> float:
    """max |g| / sigma: the size of the terms whose difference is dx.  In float32 they cancel to
    a much smaller dx for tiny H (H = 2: y = +-1 exactly), so rounding is relative to this."""
    x64 = x.double()
    sigma = x64.var(-1, unbiased=False).add(1e-5).sqrt()
    return (grad.double().abs().max() / sigma.min()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", [1, 2, 7, 16, 33, 100, 300])
@pytest.mark.parametrize("std_mode", ["biased", "unbiased"])
@pytest.mark.parametrize("variant", list(KERNEL_VARIANTS))
def test_fast_path_matches_fallback_and_float64(
    fast_kernels, variant, std_mode, width, dtype, monkeypatch
):
    if std_mode == "unbiased" and width < 2:
        pytest.skip("unbiased std needs H >= 2")
    kwargs = KERNEL_VARIANTS[variant]
    torch.manual_seed(width)
    # A large mean relative to the spread checks the two-pass variance for cancellation.
    x = (torch.randn(37, width) * 3 + 5).to(dtype)
    grad = torch.randn(37, width).to(dtype)
    fast_out, fast_dx = _run(x, grad, kwargs, std_mode, False, monkeypatch)
    slow_out, slow_dx = _run(x, grad, kwargs, std_mode, True, monkeypatch)
    ref_out, ref_dx = _reference(x, grad, kwargs, std_mode)
    assert fast_out.dtype == dtype and fast_dx.dtype == dtype
    tol = TOLERANCE[dtype]
    gscale = _gradient_scale(x, grad)
    assert _max_error(fast_out, ref_out) <= tol
    assert _max_error(fast_dx, ref_dx, gscale) <= tol
    assert _max_error(slow_out, ref_out) <= tol
    # LayerNorm-simple's fallback is native F.layer_norm, which keeps mean/rstd in bf16/fp16 on
    # CPU; at H = 2 (dx is a near-total cancellation) its gradient is off by ~20 % of scale.
    native_limit = variant == "layernorm-simple" and dtype != torch.float32 and width <= 2
    if not native_limit:
        assert _max_error(slow_dx, ref_dx, gscale) <= tol
        assert _max_error(fast_dx, slow_dx.double(), gscale) <= tol
    # Fast and fallback agree with each other at least as well as each agrees with float64.
    assert _max_error(fast_out, slow_out.double()) <= tol


def test_fast_path_is_the_one_used(fast_kernels, monkeypatch):
    calls = []
    real = torch.ops.adanorm.norm

    class Spy:
        def __call__(self, *args):
            calls.append(args)
            return real(*args)

    monkeypatch.setattr(torch.ops.adanorm, "norm", Spy())
    x = torch.randn(4, 8)
    AF.ada_norm(x, 8)
    AF.detach_norm(x, 8)
    AF.layer_norm_simple(x, 8)
    assert len(calls) == 3
    # LayerNorm without affine stays on native F.layer_norm: bit-identical to nn.LayerNorm.
    AF.layer_norm(x, 8)
    AF.ada_norm(x.double(), 8)  # float64 is the reference path
    assert len(calls) == 3
    monkeypatch.setenv("ADANORM_DISABLE_EXTENSION", "1")
    AF.ada_norm(x, 8)
    assert len(calls) == 3


def test_shapes_layouts_and_modes(fast_kernels):
    # 3-D input, a non-contiguous input, zero rows, inference mode, and 2-D normalized shapes.
    x = torch.randn(6, 4, 20).transpose(0, 1)
    assert not x.is_contiguous()
    out = AF.ada_norm(x, 20)
    ref = normalize_ref(x.double(), (20,), scale=1.0)
    assert _max_error(out, ref) <= 2e-5
    assert AF.detach_norm(torch.randn(0, 5), 5).shape == (0, 5)
    with torch.inference_mode():
        out = AdaNorm((4, 5))(torch.randn(3, 4, 5))
    assert out.shape == (3, 4, 5)
    x = torch.randn(3, 4, 5, requires_grad=True)
    AdaNorm((4, 5), scale=2.0)(x).sum().backward()
    ref_x = x.detach().double().requires_grad_()
    normalize_ref(ref_x, (4, 5), scale=2.0).sum().backward()
    assert _max_error(x.grad, ref_x.grad) <= 2e-5


def test_simple_matches_native_layer_norm(fast_kernels):
    x = torch.randn(64, 96) * 4 - 2
    torch.testing.assert_close(LayerNormSimple(96)(x), F.layer_norm(x, (96,)))


def _saved(fn, x):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_for_backward(fast_kernels, dtype):
    rows, width = 32, 64
    x = torch.randn(rows, width, dtype=dtype, requires_grad=True)
    # DetachNorm: one float per row, not even the input.
    saved = _saved(lambda t: AF.detach_norm(t, width), x)
    assert [(s.shape, s.dtype) for s in saved] == [((rows,), torch.float32)]
    # AdaNorm and the single-flag ablations: the input itself plus two float32 per row.
    ablation = lambda t: AF.detach_norm(t, width, detach_std=False)  # noqa: E731
    for fn in (lambda t: AF.ada_norm(t, width), ablation):
        saved = _saved(fn, x)
        assert len(saved) == 3
        assert saved[0].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
        assert [(s.shape, s.dtype) for s in saved[1:]] == [((rows,), torch.float32)] * 2


@pytest.mark.parametrize("module", [AdaNorm(24, scale=2.0), DetachNorm(24),
                                    DetachNorm(24, detach_std=False), LayerNormSimple(24)])
def test_compile_and_export_see_the_custom_op(fast_kernels, module):
    torch._dynamo.reset()
    x = torch.randn(5, 24, requires_grad=True)
    eager = module(x)
    (eager_dx,) = torch.autograd.grad(eager.square().sum(), x)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    (dx,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(dx, eager_dx)
    exported = torch.export.export(module, (torch.randn(5, 24),))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "adanorm.norm.default" in targets
    torch.testing.assert_close(exported.module()(x.detach()), eager.detach())


def test_cache_holds_the_built_library(fast_kernels):
    name = _kernels._library_name()
    directory = _kernels.build_directory() / name
    assert (directory / f"{name}.so").is_file(), f"no library cached under {directory}"
    assert (directory / f"{name}.complete").is_file()
    assert _kernels.cpu_status()["library"] == str(directory / f"{name}.so")


def test_build_failure_falls_back_with_one_warning(monkeypatch):
    def broken_build():
        raise RuntimeError("simulated compiler error")

    monkeypatch.delenv("ADANORM_DISABLE_EXTENSION", raising=False)
    monkeypatch.setattr(_kernels, "_cpu_state", None)
    monkeypatch.setattr(_kernels, "_load_cpu_library", broken_build)
    x = torch.randn(9, 12, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = AF.ada_norm(x, 12)
        second = AF.detach_norm(x, 12)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "simulated compiler error" in messages[0]
    # ... and the failure stays visible after the fact.
    status = adanorm.backend_info(load=False)["cpu_extension"]
    assert status["status"] == "failed" and "simulated compiler error" in status["detail"]
    assert _max_error(first, normalize_ref(x.double(), (12,), scale=1.0)) <= 2e-5
    assert _max_error(second, normalize_ref(x.double(), (12,))) <= 2e-5


def test_no_compiler_falls_back_with_one_warning(tmp_path):
    script = textwrap.dedent(
        """
        import warnings, torch
        import adanorm.functional as AF
        x = torch.randn(4, 10)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                out = AF.ada_norm(x, 10)
        runtime = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(runtime) == 1 and "no C++ compiler" in runtime[0], runtime
        assert not hasattr(torch.ops.adanorm, "norm_forward")
        print("ok")
        """
    )
    env = {**os.environ, "PATH": str(tmp_path), "CXX": str(tmp_path / "no-such-c++"),
           "ADANORM_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("ADANORM_DISABLE_EXTENSION", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_triton_modules_are_not_imported_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    script = (
        "import sys, torch, adanorm.functional as AF; AF.ada_norm(torch.randn(2, 8), 8); "
        "assert 'triton' not in sys.modules and 'adanorm._kernels.triton_norm' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]


# ---- Triton kernels, through triton's CPU interpreter -----------------------------------------

_TRITON_INTERPRETER_CHECK = textwrap.dedent(
    """
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch
    from adanorm.reference import normalize_ref
    from adanorm._kernels import triton_norm
    variants = {variants!r}
    tolerance = {{torch.float32: 2e-5, torch.bfloat16: 4e-2, torch.float16: 5e-3}}
    failures = []
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for width in (1, 7, 33, 130):
            for std_mode in ("biased", "unbiased"):
                if std_mode == "unbiased" and width < 2:
                    continue
                for name, kwargs in variants.items():
                    x = (torch.randn(6, width) * 3 + 2).to(dtype).requires_grad_()
                    g = torch.randn(6, width).to(dtype)
                    out = triton_norm.norm(
                        x, 1e-5, std_mode == "unbiased", kwargs.get("detach_mean", False),
                        kwargs.get("detach_std", False), kwargs.get("scale"), kwargs.get("k", 0.1))
                    (dx,) = torch.autograd.grad(out, x, g)
                    x64 = x.detach().double().requires_grad_()
                    ref = normalize_ref(x64, (width,), std_mode=std_mode, **kwargs)
                    (ref_dx,) = torch.autograd.grad(ref, x64, g.double())
                    sigma = x64.detach().var(-1, unbiased=False).add(1e-5).sqrt()
                    gscale = max(1.0, (g.double().abs().max() / sigma.min()).item())
                    scale_out = ref.abs().max().clamp_min(1)
                    err_out = ((out.double() - ref).abs().max() / scale_out).item()
                    err_dx = ((dx.double() - ref_dx).abs().max() / gscale).item()
                    if out.dtype != dtype or max(err_out, err_dx) > tolerance[dtype]:
                        failures.append((str(dtype), width, std_mode, name, err_out, err_dx))
    # Fake kernels and the registered autograd formula: traced without a graph break.
    module = lambda t: triton_norm.norm(t, 1e-5, False, False, False, 2.0, 0.1)
    x = torch.randn(4, 16, requires_grad=True)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    (dx_compiled,) = torch.autograd.grad(compiled(x).sum(), x)
    (dx_eager,) = torch.autograd.grad(module(x).sum(), x)
    torch.testing.assert_close(dx_compiled, dx_eager)
    assert not failures, failures

    # Rows of any finite magnitude normalize like the float64 reference (float32 squares of
    # |x| > 1.8e19 overflow without the power-of-two rescaling).
    for magnitude in (1e19, 1e30, 3e38):
        for unbiased in (False, True):
            x = (torch.randn(3, 64) * magnitude / 4).clamp(-3.3e38, 3.3e38).requires_grad_()
            g = torch.randn(3, 64)
            out = triton_norm.norm(x, 1e-5, unbiased, False, False, 1.0, 0.1)
            (dx,) = torch.autograd.grad(out, x, g)
            x64 = x.detach().double().requires_grad_()
            std_mode = "unbiased" if unbiased else "biased"
            ref = normalize_ref(x64, (64,), std_mode=std_mode, scale=1.0)
            (ref_dx,) = torch.autograd.grad(ref, x64, g.double())
            assert (out.double() - ref).abs().max() < 1e-5, (magnitude, unbiased)
            assert ((dx.double() - ref_dx).abs().max() / ref_dx.abs().max()) < 1e-4

    # Near-constant rows in unbiased mode: sigma is computed, never rebuilt from 1/sigma - eps.
    for sigma in (1e-8, 1e-6, 1e-4, 1e-2):
        x = (0.01 + sigma * torch.randn(4, 256)).requires_grad_()
        g = torch.randn(4, 256)
        keep = x.detach().double().std(-1) > 0
        out = triton_norm.norm(x, 1e-5, True, False, False, None, 0.1)
        (dx,) = torch.autograd.grad(out, x, g)
        x64 = x.detach().double()[keep].requires_grad_()
        ref = normalize_ref(x64, (256,), std_mode="unbiased")
        (ref_dx,) = torch.autograd.grad(ref, x64, g[keep].double())
        assert (out[keep].double() - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max()), sigma
        assert (dx[keep].double() - ref_dx).abs().max() <= 1e-4 * ref_dx.abs().max(), sigma

    # Second derivatives (create_graph=True) against float64, detached statistics constant.
    for name, kwargs in variants.items():
        for std_mode in ("biased", "unbiased"):
            x = torch.randn(5, 33, requires_grad=True)
            g = torch.randn(5, 33, requires_grad=True)
            v = torch.randn(5, 33)
            out = triton_norm.norm(
                x, 1e-5, std_mode == "unbiased", kwargs.get("detach_mean", False),
                kwargs.get("detach_std", False), kwargs.get("scale"), kwargs.get("k", 0.1))
            (dx,) = torch.autograd.grad(out, x, g, create_graph=True)
            hx, hg = torch.autograd.grad((dx * v).sum(), (x, g), allow_unused=True)
            x64 = x.detach().double().requires_grad_()
            g64 = g.detach().double().requires_grad_()
            ref = normalize_ref(x64, (33,), std_mode=std_mode, **kwargs)
            (rdx,) = torch.autograd.grad(ref, x64, g64, create_graph=True)
            rhx, rhg = torch.autograd.grad((rdx * v.double()).sum(), (x64, g64),
                                           allow_unused=True)
            hx = torch.zeros_like(x64) if hx is None else hx.double()
            rhx = torch.zeros_like(x64) if rhx is None else rhx
            assert (hx - rhx).abs().max() < 1e-4, (name, std_mode)
            assert (hg.double() - rhg).abs().max() < 1e-4, (name, std_mode)

    # torch.export keeps the operator; the width limit follows the measured register budget.
    class Module(torch.nn.Module):
        def forward(self, t):
            return triton_norm.norm(t, 1e-5, False, True, True, None, 0.1)

    program = torch.export.export(Module(), (torch.randn(4, 16),))
    x = torch.randn(4, 16)
    torch.testing.assert_close(program.module()(x), Module()(x))
    assert triton_norm.supports(torch.empty(2, 16384))
    assert not triton_norm.supports(torch.empty(2, 16385))
    assert not triton_norm.supports(torch.empty(2, 16385, dtype=torch.bfloat16))
    print("ok")
    """
)


def test_triton_kernels_in_the_cpu_interpreter():
    pytest.importorskip("triton", reason="triton is not installed; the GPU kernels go untested")
    script = _TRITON_INTERPRETER_CHECK.format(variants=KERNEL_VARIANTS)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


# ---- issue #15 --------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["fast", "fallback"])
@pytest.mark.parametrize("variant", ["layernorm-simple", "adanorm", "detach-mean"])
@pytest.mark.parametrize("spread", [1e-8, 1e-6, 1e-4, 1e-2])
@pytest.mark.parametrize("aligned", [False, True], ids=["g-random", "g-along-y"])
def test_unbiased_near_constant_rows_match_float64(
    fast_kernels, path, variant, spread, aligned, monkeypatch
):
    # Rows whose std s is far below (or above) eps = 1e-5, in the released code's convention
    # sigma = s + eps: the backward needs sigma / s without rebuilding s as 1/rstd - eps.
    kwargs = KERNEL_VARIANTS[variant]
    gen = torch.Generator().manual_seed(int(-math.log10(spread)))
    x = (torch.randn(16, 256, generator=gen, dtype=torch.float64) * spread).float()
    if aligned:  # the gradient along y, where the std term carries the whole answer
        centered = x.double() - x.double().mean(-1, keepdim=True)
        grad = (centered / centered.abs().amax(-1, keepdim=True)).float()
    else:
        grad = torch.randn(16, 256, generator=gen)
    out, dx = _run(x, grad, kwargs, "unbiased", path == "fallback", monkeypatch)
    ref_out, ref_dx = _reference(x, grad, kwargs, "unbiased")
    sigma = x.double().std(-1) + 1e-5
    gscale = (grad.double().abs().max() / sigma.min()).item()
    assert _max_error(out, ref_out) <= 2e-5
    assert _max_error(dx, ref_dx, gscale) <= 2e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", list(KERNEL_VARIANTS))
@pytest.mark.parametrize("std_mode", ["biased", "unbiased"])
def test_double_backward_through_the_fused_kernel(fast_kernels, variant, std_mode, dtype):
    # create_graph=True through adanorm::norm: a Hessian-vector product and the mixed
    # derivative with respect to the upstream gradient, against float64 autograd.
    kwargs = KERNEL_VARIANTS[variant]
    gen = torch.Generator().manual_seed(11)
    x64 = torch.randn(6, 24, generator=gen, dtype=torch.float64) * 2 + 1
    g64 = torch.randn(6, 24, generator=gen, dtype=torch.float64)
    v64 = torch.randn(6, 24, generator=gen, dtype=torch.float64)

    def second_order(fn, x, g, v):
        x = x.clone().requires_grad_(True)
        g = g.clone().requires_grad_(True)
        (dx,) = torch.autograd.grad(fn(x), x, g, create_graph=True)
        hvp, mixed = torch.autograd.grad((dx * v).sum(), [x, g], allow_unused=True)
        return dx, torch.zeros_like(x) if hvp is None else hvp, mixed

    def ours(t):
        if kwargs:
            return AF.normalize(t, 24, std_mode=std_mode, **kwargs)
        return AF.layer_norm_simple(t, 24, std_mode=std_mode)

    AF._used.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "backward is not differentiable" warning
        got = second_order(ours, x64.to(dtype), g64.to(dtype), v64.to(dtype))
    assert {u["backend"] for u in adanorm.backend_info(load=False)["used"]} == {"cpp"}
    want = second_order(
        lambda t: normalize_ref(t.double(), (24,), std_mode=std_mode, **kwargs), x64, g64, v64
    )
    tol = 2e-4 if dtype == torch.float32 else 5e-2
    for a, b in zip(got, want, strict=True):
        assert a.dtype == dtype
        assert _max_error(a, b) <= tol, (variant, std_mode, _max_error(a, b))


def test_fused_kernel_used_for_the_double_backward_checks(fast_kernels):
    x = torch.randn(4, 8, requires_grad=True)
    AF._used.clear()
    AF.ada_norm(x, 8)
    AF.layer_norm_simple(x, 8, std_mode="unbiased")
    used = adanorm.backend_info(load=False)["used"]
    assert {(u["variant"], u["backend"]) for u in used} == {
        ("adanorm", "cpp"), ("layernorm-simple:unbiased", "cpp")
    }


def _copy_built_library(cache_root: Path) -> tuple[Path, str]:
    """The current library's build directory, copied (with mtimes) under a fresh cache root."""
    name = _kernels._library_name()
    source = _kernels.build_directory() / name
    relative = _kernels.build_directory().relative_to(_kernels.build_directory().parents[1])
    target = cache_root / relative / name
    shutil.copytree(source, target)
    return target, name


_LOAD_SCRIPT = (
    "import warnings; warnings.simplefilter('always')\n"
    "from adanorm import _kernels\n"
    "ok = _kernels.cpu_kernels_ready()\n"
    "print('READY', ok, _kernels.cpu_status()['status'])\n"
)


def test_stale_build_lock_of_a_killed_build_is_recovered(fast_kernels, tmp_path):
    # A build killed midway (Ctrl-C, kill -9, the OOM killer) leaves torch's plain-file baton
    # `lock` behind and no completion marker.  The next process must rebuild, not wait forever.
    directory, name = _copy_built_library(tmp_path)
    (directory / f"{name}.complete").unlink()
    (directory / "lock").touch()
    (directory.parent / "lock").touch()  # where older versions of this library built
    env = {**os.environ, "ADANORM_CACHE_DIR": str(tmp_path), "PYTHONPATH": os.pathsep.join(
        [str(Path(AF.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    env.pop("ADANORM_DISABLE_EXTENSION", None)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0 and "READY True loaded" in done.stdout, done.stderr[-2000:]
    assert not (directory / "lock").exists()
    assert (directory / f"{name}.complete").is_file()
    assert time.monotonic() - started < 600


def test_live_build_lock_is_waited_for_a_bounded_time(fast_kernels, tmp_path, monkeypatch):
    # Another live process is building (it holds the flock): wait at most
    # ADANORM_BUILD_TIMEOUT seconds, then fall back with a warning that names the lock.
    directory, name = _copy_built_library(tmp_path)
    (directory / f"{name}.complete").unlink()
    lock_path = directory / f"{name}.build.lock"
    holder = os.open(lock_path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        monkeypatch.setenv("ADANORM_CACHE_DIR", str(tmp_path))
        monkeypatch.setenv("ADANORM_BUILD_TIMEOUT", "0.5")
        monkeypatch.setattr(_kernels, "_cpu_state", None)
        monkeypatch.setattr(_kernels, "_cpu_failure", None)
        started = time.monotonic()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert _kernels.cpu_kernels_ready() is False
        assert time.monotonic() - started < 10
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1 and str(lock_path) in messages[0]
        assert "ADANORM_BUILD_TIMEOUT" in messages[0]
        status = _kernels.cpu_status()
        assert status["status"] == "timed-out" and str(lock_path) in status["detail"]
    finally:
        os.close(holder)


def test_bad_build_timeout_is_refused(monkeypatch):
    monkeypatch.setenv("ADANORM_BUILD_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="ADANORM_BUILD_TIMEOUT .* got 'soon'"):
        _kernels._build_timeout()


def test_backend_info_agrees_with_the_selector(fast_kernels, monkeypatch):
    info = adanorm.backend_info()
    assert info["cpu_extension"]["status"] == "loaded"
    cpu32 = info["backends"]["cpu"]["float32"]
    assert cpu32["layernorm"] == "native"
    assert cpu32["layernorm(elementwise_affine=False)"] == "native"
    assert cpu32["layernorm:unbiased"] == "fallback"
    for name in ("layernorm-simple", "detachnorm", "detach-mean", "detach-std", "adanorm"):
        assert cpu32[name] == "cpp" and cpu32[name + ":unbiased"] == "cpp"
    cpu64 = info["backends"]["cpu"]["float64"]
    assert cpu64["adanorm"] == "fallback" and cpu64["layernorm-simple"] == "native"
    assert "float32/bfloat16/float16" in info["reasons"]["cpu"]["float64"]["adanorm"]
    # Every variant's recorded backend is the one that actually ran.
    AF._used.clear()
    x = torch.randn(3, 8)
    AF.ada_norm(x, 8)
    AF.ada_norm(x.double(), 8)
    AF.layer_norm(x, 8, torch.ones(8), std_mode="unbiased")
    used = {(u["variant"], u["dtype"], u["backend"]) for u in adanorm.backend_info()["used"]}
    assert used == {("adanorm", "float32", "cpp"), ("adanorm", "float64", "fallback"),
                    ("layernorm:unbiased", "float32", "fallback")}
    monkeypatch.setenv("ADANORM_DISABLE_EXTENSION", "1")
    info = adanorm.backend_info()
    assert info["cpu_extension"]["status"] == "disabled"
    assert info["backends"]["cpu"]["float32"]["adanorm"] == "fallback"
    assert info["backends"]["cpu"]["float32"]["layernorm-simple"] == "native"
    json.dumps(info)  # JSON-ready, for run.json


def test_run_json_environment_records_the_backends(fast_kernels):
    from adanorm.lab.runinfo import environment

    info = environment(torch.device("cpu"))
    backends = info["adanorm_backends"]
    assert backends["cpu_extension"]["status"] == "loaded"
    assert backends["backends"]["cpu"]["float32"]["adanorm"] == "cpp"
    json.dumps(info)


@pytest.mark.parametrize("std_mode", ["biased", "unbiased"])
@pytest.mark.parametrize("variant", list(KERNEL_VARIANTS))
def test_bfloat16_rows_near_the_float32_limit(fast_kernels, variant, std_mode, monkeypatch):
    # bfloat16 has float32's range: its rows overflow float32 squares just the same.
    kwargs = KERNEL_VARIANTS[variant]
    gen = torch.Generator().manual_seed(5)
    x = ((torch.rand(8, 48, generator=gen) * 2 - 1) * 3e38).to(torch.bfloat16)
    grad = torch.randn(8, 48, generator=gen).to(torch.bfloat16)
    out, dx = _run(x, grad, kwargs, std_mode, False, monkeypatch)
    ref_out, ref_dx = _reference(x, grad, kwargs, std_mode)
    assert torch.isfinite(out).all() and torch.isfinite(dx.float()).all()
    assert _max_error(out, ref_out) <= TOLERANCE[torch.bfloat16]
    scale = ref_dx.abs().max().item()
    assert ((dx.double() - ref_dx).abs().max() / scale).item() <= TOLERANCE[torch.bfloat16]


# ---- which CUDA kernel takes a call (the policy is plain Python: testable without a GPU) --------


def test_cuda_backend_policy(monkeypatch):
    from adanorm import _kernels

    class FakeTriton:
        MAX_WIDTH = {4: 16384, 2: 16384}

    monkeypatch.setattr(_kernels, "_triton_module", FakeTriton)
    monkeypatch.setattr(_kernels, "_cuda_cpp_state", True)
    # The C++ kernels take every width up to 16384 (element by element where the width is not a
    # multiple of the 16-byte vector), and every tensor size: no size routes to Triton.
    assert _kernels.cuda_backend(1024, 4, 2048 * 1024) == "cuda-cpp"
    assert _kernels.cuda_backend(4099, 4, 4099) == "cuda-cpp"
    assert _kernels.cuda_backend(16383, 2, 16383) == "cuda-cpp"
    assert _kernels.cuda_cpp_takes(16384, 2) and not _kernels.cuda_cpp_takes(16392, 4)
    assert _kernels.cuda_backend(8192, 4, 2**28) == "cuda-cpp"
    assert _kernels.cuda_backend(4096, 2, 2**26) == "cuda-cpp"
    assert _kernels.cuda_cpp_takes_all(4096, 2) and not _kernels.cuda_cpp_takes_all(16385, 4)
    # A size threshold, where one is set, sends large tensors to Triton.
    monkeypatch.setattr(_kernels, "_TRITON_FROM_NUMEL", {2: 2**26})
    assert _kernels.cuda_backend(4096, 2, 2**26) == "triton"
    assert _kernels.cuda_backend(4096, 2, 2**26 - 4096) == "cuda-cpp"
    assert not _kernels.cuda_cpp_takes_all(4096, 2) and _kernels.cuda_cpp_takes_all(4096, 4)
    monkeypatch.setattr(_kernels, "_TRITON_FROM_NUMEL", {})
    # Without Triton everything the C++ kernels take stays there; wider rows have no kernel.
    monkeypatch.setattr(_kernels, "_triton_module", None)
    assert _kernels.cuda_backend(4096, 2, 2**30) == "cuda-cpp"
    assert _kernels.cuda_backend(20000, 4, 20000) is None
    # Without the C++ kernels, Triton takes what fits it.
    monkeypatch.setattr(_kernels, "_triton_module", FakeTriton)
    monkeypatch.setattr(_kernels, "_cuda_cpp_state", False)
    assert _kernels.cuda_backend(512, 4, 512) == "triton"
    assert _kernels.cuda_backend(16385, 4, 16385) is None


def test_cuda_backend_choice_is_validated(monkeypatch):
    from adanorm import _kernels

    monkeypatch.setenv("ADANORM_CUDA_BACKEND", "cuda")
    with pytest.raises(ValueError, match="ADANORM_CUDA_BACKEND must be auto, cuda-cpp or triton"):
        _kernels._cuda_backend_choice()
    monkeypatch.setenv("ADANORM_CUDA_BACKEND", "Triton")
    assert _kernels._cuda_backend_choice() == "triton"


@pytest.mark.slow
def test_first_build_killed_midway_does_not_hang_later_processes(fast_kernels, tmp_path):
    # The real thing: a first build in a fresh cache, killed with SIGKILL (with its compiler)
    # while it holds torch's build baton; then a new process must build and load, not hang.
    if _kernels._find_compiler() is None:
        pytest.skip("no C++ compiler")
    import signal

    env = {**os.environ, "ADANORM_CACHE_DIR": str(tmp_path), "PYTHONPATH": os.pathsep.join(
        [str(Path(AF.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    env.pop("ADANORM_DISABLE_EXTENSION", None)
    directory = (tmp_path / _kernels.build_directory().relative_to(
        _kernels.build_directory().parents[1]) / _kernels._library_name())
    first = subprocess.Popen([sys.executable, "-c", _LOAD_SCRIPT], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (directory / "lock").exists():
            assert first.poll() is None, "the first build ended before it could be killed"
            assert time.monotonic() < deadline, "the first build never took its lock"
            time.sleep(0.05)
        time.sleep(1.0)  # let the compiler start
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert (directory / "lock").exists() and not (directory / f"{_kernels._library_name()}"
                                                   ".complete").exists()
    done = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=900, check=False)
    assert done.returncode == 0 and "READY True loaded" in done.stdout, done.stderr[-2000:]
    assert not (directory / "lock").exists()


def test_detachnorm_double_backward_from_saved_rstd_takes_any_leading_shape():
    """The CUDA C++ path passes N-d inputs straight to the kernel, so the rstd it saves has one
    value per row of an N-d tensor; the create_graph backward must broadcast it per row."""
    from adanorm.reference import saved_input_grad_ref

    g = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    rstd = torch.rand(6, dtype=torch.float64) + 0.5
    dx = saved_input_grad_ref(g, None, rstd, 1e-5, False, True, True, None, 0.1)
    torch.testing.assert_close(dx, g * rstd.view(2, 3, 1))
    (dg,) = torch.autograd.grad(dx.sum(), g)
    torch.testing.assert_close(dg, rstd.view(2, 3, 1).expand(2, 3, 8))


def test_cuda_launch_shapes_cover_every_width(tmp_path):
    # norm_cuda.cu's host-side launch_for, compiled alone with the host compiler (no GPU, no
    # nvcc): for every width up to the limit, both element sizes, aligned or not, the chosen
    # shape has a kernel instance in dispatch_launch's lists, a thread for every element, at most
    # 32 elements per thread, 16-byte vectors exactly where width and alignment allow, and one
    # warp per row up to 1024 elements.
    import re

    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    source = _kernels.CUDA_SOURCE_PATH.read_text()
    constants = source[source.index("constexpr int kMaxThreads"):
                       source.index("constexpr float kRescaleAbove")]
    launch = source[source.index("struct Launch {"):
                    source.index("template <int... KVs, typename Body>")]
    dispatch = source[source.index("void dispatch_launch("):source.index("struct Grid {")]
    lists = [sorted(int(v) for v in group.split(","))
             for group in re.findall(r"with_kv<([\d, ]+)>", dispatch)]
    # Order in dispatch_launch: scalar warp/block, float32 vector warp/block, 16-bit warp/block.
    assert len(lists) == 6, lists

    def cxx_set(values):
        return "std::set<int>{" + ",".join(map(str, values)) + "}"

    program = textwrap.dedent("""
        #include <algorithm>
        #include <cstdint>
        #include <cstdio>
        #include <set>
        #include <stdexcept>
        #define TORCH_CHECK(cond, ...) \\
          do { if (!(cond)) throw std::runtime_error("check"); } while (0)
        """) + constants + launch + textwrap.dedent(f"""
        int main() {{
          const std::set<int> lists[6] = {{{", ".join(cxx_set(v) for v in lists)}}};
          long bad = 0;
          for (int es : {{4, 2}})
            for (int aligned = 0; aligned < 2; ++aligned)
              for (int64_t n = 1; n <= {_kernels.CUDA_MAX_WIDTH}; ++n) {{
                const Launch l = launch_for(n, es, aligned);
                const int vector = 16 / es;
                const bool may_vector = aligned && n % vector == 0;
                const int list = (l.vec == 1 ? 0 : es == 4 ? 2 : 4) + (l.warp_row ? 0 : 1);
                const bool ok = lists[list].count(l.kv) == 1
                    && int64_t(l.threads) * l.kv * l.vec >= n && l.kv * l.vec <= 32
                    && l.vec == (may_vector ? vector : 1)
                    && (l.warp_row ? l.threads == 32
                                   : l.threads >= 64 && l.threads <= 512 && l.threads % 32 == 0)
                    && l.warp_row == (n <= 1024);
                if (!ok && bad++ < 5)
                  std::printf("es %d aligned %d n %ld: vec %d warp %d threads %d kv %d\\n", es,
                              aligned, long(n), l.vec, l.warp_row, l.threads, l.kv);
              }}
          bool rejected = false;
          try {{ launch_for({_kernels.CUDA_MAX_WIDTH + 1}, 4, true); }}
          catch (...) {{ rejected = true; }}
          std::printf("bad %ld rejected %d\\n", bad, rejected);
          return bad != 0 || !rejected;
        }}
        """)
    (tmp_path / "launch.cpp").write_text(program)
    binary = tmp_path / "launch"
    subprocess.run([compiler, "-std=c++17", "-O1", "-o", str(binary), str(tmp_path / "launch.cpp")],
                   check=True, capture_output=True, text=True)
    result = subprocess.run([str(binary)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "bad 0 rejected 1" in result.stdout


@pytest.mark.parametrize(
    ("choice", "verified", "expect_cpp"),
    [
        ("auto", False, False),
        ("auto", True, True),
        ("cuda-cpp", False, True),
        ("triton", True, False),
    ],
)
def test_unverified_cuda_cpp_kernels_run_only_when_asked_for(
    monkeypatch, choice: str, verified: bool, expect_cpp: bool
) -> None:
    # norm_cuda.cu is compiled and its launch logic tested here, but only a GPU run can show its
    # device code correct; until then `auto` must not route real training through it.
    tried = []
    monkeypatch.setenv("ADANORM_CUDA_BACKEND", choice)
    monkeypatch.setattr(_kernels, "CUDA_CPP_VERIFIED", verified)
    monkeypatch.setattr(_kernels, "_cuda_state", None)
    monkeypatch.setattr(_kernels, "extension_disabled", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_kernels, "_cuda_cpp_ready", lambda: tried.append("cpp") or True)
    monkeypatch.setattr(_kernels, "_triton_ready", lambda: True)
    assert _kernels.cuda_kernels_ready()
    assert (tried == ["cpp"]) is expect_cpp
    assert _kernels.cuda_status()["cuda_cpp_verified_on_gpu"] is verified
