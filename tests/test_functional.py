"""The functional forms against the float64 reference: forward, backward, memory, dtypes, edges."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.gradcheck import GradcheckError

import adanorm
import adanorm.functional as AF
from adanorm.reference import normalize_ref

VARIANTS = {
    # name: (keyword arguments of AF.normalize and normalize_ref, has affine parameters)
    "layernorm": ({}, True),
    "layernorm-simple": ({}, False),
    "detachnorm": ({"detach_mean": True, "detach_std": True}, False),
    "detach-mean": ({"detach_mean": True}, False),
    "detach-std": ({"detach_std": True}, False),
    "adanorm": ({"scale": 2.0, "k": 0.1}, False),
}

SHAPES = [
    # (input shape, normalized_shape)
    ((4, 37), (37,)),
    ((3, 1023), (1023,)),
    ((2, 3, 16), (16,)),
    ((2, 5, 6, 7), (6, 7)),
    ((3, 4, 2, 5), (4, 2, 5)),
]
STD_MODES = ["biased", "unbiased"]


def _inputs(shape, normalized_shape, affine, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 1).to(dtype)
    w = b = None
    if affine:
        w = (torch.rand(normalized_shape, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
        b = torch.randn(normalized_shape, generator=gen, dtype=torch.float64).to(dtype)
    g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return x, w, b, g


def _run(fn, x, w, b, g):
    x = x.detach().clone().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) if p is not None else None for p in (w, b)]
    out = fn(x, *params)
    grads = torch.autograd.grad(
        out, [t for t in (x, *params) if t is not None], grad_outputs=g.to(out.dtype)
    )
    return out, grads


@pytest.mark.parametrize("std_mode", STD_MODES)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape,normalized_shape", SHAPES)
def test_matches_reference(variant, std_mode, shape, normalized_shape):
    kwargs, affine = VARIANTS[variant]
    x, w, b, g = _inputs(shape, normalized_shape, affine)

    def ours(x, w, b):
        return AF.normalize(x, normalized_shape, w, b, 1e-5, std_mode=std_mode, **kwargs)

    def ref(x, w, b):
        return normalize_ref(x.double(), normalized_shape, w, b, 1e-5, std_mode=std_mode, **kwargs)

    out, grads = _run(ours, x, w, b, g)
    ref_out, ref_grads = _run(ref, x.double(), w, b, g.double())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("std_mode", STD_MODES)
def test_non_contiguous_input(variant, std_mode):
    kwargs, _ = VARIANTS[variant]
    base = torch.randn(37, 6, 5, dtype=torch.float64)
    x = base.transpose(0, 2)  # (5, 6, 37), not contiguous
    assert not x.is_contiguous()
    g = torch.randn(x.shape, dtype=torch.float64)
    out, (gx,) = _run(
        lambda t, w, b: AF.normalize(t, 37, std_mode=std_mode, **kwargs), x, None, None, g
    )
    ref, (rgx,) = _run(
        lambda t, w, b: normalize_ref(t.double(), (37,), std_mode=std_mode, **kwargs),
        x, None, None, g,
    )
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, rgx)


def test_public_wrappers_match_normalize():
    x = torch.randn(6, 32)
    torch.testing.assert_close(AF.layer_norm_simple(x, 32), F.layer_norm(x, (32,)))
    torch.testing.assert_close(
        AF.detach_norm(x, (32,), detach_mean=False, detach_std=False), F.layer_norm(x, (32,))
    )
    y = F.layer_norm(x, (32,))
    torch.testing.assert_close(AF.ada_norm(x, 32, scale=2.0, k=0.1), 2.0 * (1 - 0.1 * y) * y)
    w, b = torch.rand(32), torch.randn(32)
    torch.testing.assert_close(
        AF.layer_norm(x, [32], w, b, 1e-6), F.layer_norm(x, [32], w, b, 1e-6)
    )


def test_unbiased_forward_matches_released_code():
    # The authors' nowb/adanorm modes: (x - mean) / (x.std() + eps), unbiased std.
    x = torch.randn(5, 512, dtype=torch.float64)
    mean, std = x.mean(-1, keepdim=True), x.std(-1, keepdim=True)
    y = (x - mean) / (std + 1e-5)
    torch.testing.assert_close(AF.layer_norm_simple(x, 512, std_mode="unbiased"), y)
    released = (x - mean) * (1 - (0.1 * (x - mean) / (std + 1e-5)).detach()) / (std + 1e-5) * 2.0
    torch.testing.assert_close(AF.ada_norm(x, 512, scale=2.0, std_mode="unbiased"), released)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("std_mode", STD_MODES)
def test_half_precision(dtype, variant, std_mode):
    kwargs, affine = VARIANTS[variant]
    x, w, b, g = _inputs((8, 96), (96,), affine, dtype=dtype)
    out, grads = _run(
        lambda x, w, b: AF.normalize(x, 96, w, b, std_mode=std_mode, **kwargs), x, w, b, g
    )
    assert out.dtype == dtype and all(gr.dtype == dtype for gr in grads)
    ref, ref_grads = _run(
        lambda x, w, b: normalize_ref(x.double(), (96,), w, b, std_mode=std_mode, **kwargs),
        x.double(),
        w.double() if w is not None else None,
        b.double() if b is not None else None,
        g.double(),
    )
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 2e-3, "atol": 2e-3}
    torch.testing.assert_close(out.double(), ref, **tol)
    # Row-sum gradients of weight/bias accumulate rounding of the half-precision g: scale tol.
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=tol["rtol"], atol=tol["atol"] * 8)


def test_half_statistics_are_fp32():
    # 1 + 1e-3 * noise: bf16 statistics would lose the variance entirely.
    x = (1000 + torch.randn(4, 256, dtype=torch.float64)).to(torch.bfloat16)
    out = AF.ada_norm(x, 256)
    ref = normalize_ref(x.double(), (256,), scale=1.0)
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=3e-2)


class _SavedTensors:
    def __init__(self):
        self.saved: list[torch.Tensor] = []

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def _pack(self, t):
        self.saved.append(t)
        return t

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


@pytest.mark.parametrize("std_mode", STD_MODES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_saves_only_input_and_row_statistics(variant, std_mode):
    kwargs, affine = VARIANTS[variant]
    rows, width = 64, 128
    x = torch.randn(rows, width, requires_grad=True)
    w = torch.ones(width, requires_grad=True) if affine else None
    b = torch.zeros(width, requires_grad=True) if affine else None
    with _SavedTensors() as hook:
        out = AF.normalize(x, width, w, b, std_mode=std_mode, **kwargs)
    activation_sized = [t for t in hook.saved if t.numel() >= rows * width]
    for t in activation_sized:
        assert t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr(), (
            f"{variant} saved an activation-sized tensor that is not the input"
        )
    others = [t for t in hook.saved if t.numel() < rows * width]
    for t in others:
        assert t.numel() in (rows, width), f"unexpected saved tensor of shape {tuple(t.shape)}"
    row_stats = [t for t in others if t.numel() == rows]
    if variant == "detachnorm":
        assert activation_sized == [], "DetachNorm must not keep the input for backward"
        assert len(row_stats) == 1
    else:
        assert len(row_stats) <= 3
    out.sum().backward()


def test_bad_inputs():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"trailing shape \[16\].*\[3, 8\]"):
        AF.ada_norm(x, 16)
    with pytest.raises(ValueError, match=r"\[4, 2\]"):
        AF.layer_norm_simple(x, (4, 2))
    with pytest.raises(TypeError, match="int64"):
        AF.detach_norm(torch.ones(3, 8, dtype=torch.int64), 8)
    with pytest.raises(TypeError, match="bool"):
        AF.layer_norm(torch.ones(3, 8, dtype=torch.bool), 8)
    with pytest.raises(ValueError, match="std_mode"):
        AF.layer_norm(x, 8, std_mode="population")
    with pytest.raises(ValueError, match="at least 2"):
        AF.layer_norm_simple(torch.randn(3, 1), 1, std_mode="unbiased")


@pytest.mark.parametrize("std_mode", STD_MODES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_empty_batch(variant, std_mode):
    kwargs, _ = VARIANTS[variant]
    x = torch.randn(0, 5, 16, requires_grad=True)
    out = AF.normalize(x, 16, std_mode=std_mode, **kwargs)
    assert out.shape == (0, 5, 16)
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("std_mode", STD_MODES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_constant_rows_are_finite(variant, std_mode):
    kwargs, affine = VARIANTS[variant]
    x = torch.full((4, 32), 3.25, requires_grad=True)
    w = torch.ones(32, requires_grad=True) if affine else None
    out = AF.normalize(x, 32, w, std_mode=std_mode, **kwargs)
    out.backward(torch.randn_like(out))
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(out, torch.zeros_like(out))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_nan_and_inf_propagate(variant):
    kwargs, _ = VARIANTS[variant]
    x = torch.randn(3, 16)
    x[1, 4] = float("nan")
    x[2, 7] = float("inf")
    x.requires_grad_(True)
    out = AF.normalize(x, 16, **kwargs)
    out.sum().backward()
    assert torch.isfinite(out[0]).all() and torch.isfinite(x.grad[0]).all()
    assert torch.isnan(out[1]).any() and torch.isnan(out[2]).any()


def test_adanorm_row_mean_is_minus_ck():
    x = torch.randn(16, 512, dtype=torch.float64) * 5 + 3
    for scale in (0.5, 1.0, 2.0):
        z = AF.ada_norm(x, 512, eps=0.0, scale=scale, k=0.1)
        torch.testing.assert_close(z.mean(-1), torch.full((16,), -scale * 0.1, dtype=torch.float64))
        y = AF.layer_norm_simple(x, 512, eps=0.0)
        torch.testing.assert_close(
            (scale * (1 - 0.1 * y)).mean(-1), torch.full((16,), scale, dtype=torch.float64)
        )
    # Released-code convention: -C k (H-1)/H.
    z = AF.ada_norm(x, 512, eps=0.0, scale=2.0, std_mode="unbiased")
    torch.testing.assert_close(z.mean(-1), torch.full((16,), -0.2 * 511 / 512, dtype=torch.float64))


@pytest.mark.parametrize("std_mode", STD_MODES)
def test_gradcheck_full_derivative_variants(std_mode):
    x = torch.randn(3, 2, 7, dtype=torch.float64, requires_grad=True)
    w = torch.rand(7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: AF.layer_norm(x, 7, w, b, 1e-3, std_mode=std_mode), (x, w, b)
    )
    assert torch.autograd.gradcheck(
        lambda x: AF.layer_norm_simple(x, (2, 7), 1e-3, std_mode=std_mode), (x,)
    )
    assert torch.autograd.gradgradcheck(lambda x: AF.layer_norm_simple(x, 7, 1e-3), (x,))


def _surrogate(variant: str, x0: torch.Tensor, std_mode: str, eps: float):
    """The function whose Jacobian at ``x0`` our backward must equal: the paper's forward with the
    detached quantities frozen at their values at ``x0``."""
    kwargs, _ = VARIANTS[variant]

    def stats(x):
        mu = x.mean(-1, keepdim=True)
        if std_mode == "biased":
            sigma = ((x - mu) ** 2).mean(-1, keepdim=True).add(eps).sqrt()
        else:
            sigma = x.std(-1, keepdim=True) + eps
        return mu, sigma

    mu0, sigma0 = (t.detach() for t in stats(x0))
    y0 = ((x0 - mu0) / sigma0).detach()

    def frozen(x):
        mu, sigma = stats(x)
        if kwargs.get("detach_mean"):
            mu = mu0
        if kwargs.get("detach_std"):
            sigma = sigma0
        y = (x - mu) / sigma
        if "scale" in kwargs:
            return kwargs["scale"] * (1 - kwargs["k"] * y0) * y
        return y

    return frozen


@pytest.mark.parametrize("std_mode", STD_MODES)
@pytest.mark.parametrize("variant", ["detachnorm", "detach-mean", "detach-std", "adanorm"])
def test_surrogate_gradcheck_detached_variants(variant, std_mode):
    kwargs, _ = VARIANTS[variant]
    eps = 1e-3
    x0 = torch.randn(4, 9, dtype=torch.float64)
    frozen = _surrogate(variant, x0, std_mode, eps)

    def analytic_ours_numeric_frozen(x):
        # Value: the frozen forward (finite differences see it); gradient: ours alone.
        ours = AF.normalize(x, 9, None, None, eps, std_mode=std_mode, **kwargs)
        return frozen(x).detach() + ours - ours.detach()

    x = x0.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(analytic_ours_numeric_frozen, (x,))
    # And plain gradcheck on the variant fails, by design (finite differences see mu/sigma/phi).
    with pytest.raises(GradcheckError):
        torch.autograd.gradcheck(
            lambda t: AF.normalize(t, 9, None, None, eps, std_mode=std_mode, **kwargs), (x,)
        )


def test_float64_is_computed_in_float64():
    x = torch.randn(4, 33, dtype=torch.float64) * 1e-3 + 1e3
    torch.testing.assert_close(
        AF.ada_norm(x, 33, eps=0.0),
        normalize_ref(x.double(), (33,), eps=0.0, scale=1.0),
        rtol=1e-6,
        atol=1e-6,
    )
    assert math.isfinite(AF.ada_norm(x, 33).sum().item())


# ---- issue #15: one validation for modules and functional forms ------------------------------

_X8 = torch.randn(3, 8)

BAD_CALLS = [
    # (description, functional call, module constructor or None, error type, message pattern)
    ("eps=-1", lambda: AF.layer_norm_simple(_X8, 8, eps=-1.0),
     lambda: adanorm.LayerNormSimple(8, eps=-1.0), ValueError, r"eps must be >= 0, got -1\.0"),
    ("eps=-1 ada", lambda: AF.ada_norm(_X8, 8, eps=-1),
     lambda: adanorm.AdaNorm(8, eps=-1), ValueError, r"eps must be >= 0, got -1"),
    ("eps=-1 affine", lambda: AF.layer_norm(_X8, 8, torch.ones(8), torch.zeros(8), -1.0),
     lambda: adanorm.LayerNorm(8, eps=-1.0), ValueError, r"eps must be >= 0"),
    ("eps=nan", lambda: AF.detach_norm(_X8, 8, eps=float("nan")),
     lambda: adanorm.DetachNorm(8, eps=float("nan")), ValueError, r"eps must be >= 0, got nan"),
    ("eps=inf", lambda: AF.normalize(_X8, 8, eps=math.inf),
     lambda: adanorm.LayerNormSimple(8, eps=math.inf), ValueError, r"eps .* got inf"),
    ("eps='1e-5'", lambda: AF.layer_norm(_X8, 8, eps="1e-5"),
     lambda: adanorm.LayerNorm(8, eps="1e-5"), TypeError, r"eps must be a real number"),
    ("scale=0", lambda: AF.ada_norm(_X8, 8, scale=0),
     lambda: adanorm.AdaNorm(8, scale=0), ValueError, r"scale \(C\) must be > 0, got 0"),
    ("scale=-1", lambda: AF.ada_norm(_X8, 8, scale=-1.0),
     lambda: adanorm.AdaNorm(8, scale=-1.0), ValueError, r"scale \(C\) must be > 0, got -1"),
    ("scale=inf", lambda: AF.ada_norm(_X8, 8, scale=math.inf),
     lambda: adanorm.AdaNorm(8, scale=math.inf), ValueError, r"scale \(C\) must be > 0, got inf"),
    ("scale='2'", lambda: AF.ada_norm(_X8, 8, scale="2"),
     lambda: adanorm.AdaNorm(8, scale="2"), TypeError, r"scale \(C\) must be a real number.*'2'"),
    ("scale=None", lambda: AF.ada_norm(_X8, 8, scale=None),
     lambda: adanorm.AdaNorm(8, scale=None), ValueError, r"scale \(C\) > 0, got None"),
    ("k<0", lambda: AF.ada_norm(_X8, 8, k=-0.1),
     lambda: adanorm.AdaNorm(8, k=-0.1), ValueError, r"k must be > 0, got -0\.1"),
    ("k=nan", lambda: AF.normalize(_X8, 8, scale=1.0, k=float("nan")),
     lambda: adanorm.AdaNorm(8, k=float("nan")), ValueError, r"k must be > 0, got nan"),
    ("normalized_shape=()", lambda: AF.normalize(_X8, ()),
     lambda: adanorm.LayerNormSimple(()), ValueError, r"normalized_shape .* got \(\)"),
    ("normalized_shape=2.5", lambda: AF.ada_norm(_X8, 2.5),
     lambda: adanorm.AdaNorm(2.5), ValueError, r"normalized_shape .* got 2\.5"),
    ("width 0", lambda: AF.ada_norm(torch.randn(3, 0), 0),
     lambda: adanorm.AdaNorm(0), ValueError, r"normalized_shape .* got 0"),
    ("width 0 tuple", lambda: AF.detach_norm(torch.randn(3, 4, 0), (4, 0)),
     lambda: adanorm.DetachNorm((4, 0)), ValueError, r"normalized_shape .* got \(4, 0\)"),
    ("std_mode", lambda: AF.ada_norm(_X8, 8, std_mode="Bessel"),
     lambda: adanorm.AdaNorm(8, std_mode="Bessel"), ValueError, r"std_mode .* 'Bessel'"),
    ("unbiased H=1", lambda: AF.layer_norm(torch.randn(3, 1), 1, std_mode="unbiased"),
     lambda: adanorm.LayerNorm(1, std_mode="unbiased"), ValueError, r"at least 2"),
    ("weight shape", lambda: AF.layer_norm(torch.randn(3, 4, 2), (4, 2), torch.ones(2, 4),
                                           std_mode="unbiased"),
     None, ValueError, r"weight must have shape \[4, 2\].*\[2, 4\]"),
]


@pytest.mark.parametrize("case", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_functional_and_modules_share_one_validation(case):
    _, functional_call, module_call, error, pattern = case
    with pytest.raises(error, match=pattern):
        functional_call()
    if module_call is not None:
        with pytest.raises(error, match=pattern):
            module_call()


def test_valid_edge_arguments_are_accepted():
    x = torch.randn(3, 8)
    assert AF.layer_norm_simple(x, 8, eps=0).shape == x.shape  # an int eps, and eps = 0
    assert AF.ada_norm(x, torch.Size([8]), scale=2, k=1).shape == x.shape
    assert AF.normalize(x, [8], eps=1e-5).shape == x.shape
    import numpy as np

    assert AF.detach_norm(x, np.int64(8), eps=np.float32(1e-5)).shape == x.shape


# ---- issue #15: inference mode must not poison later training -------------------------------

@pytest.mark.parametrize("path", ["fast", "fallback"])
def test_inference_mode_then_training(path, monkeypatch):
    if path == "fallback":
        monkeypatch.setenv("ADANORM_DISABLE_EXTENSION", "1")
    AF._constant_cache.clear()
    norms = [
        (adanorm.LayerNorm(16, elementwise_affine=False), torch.float32),
        (adanorm.LayerNormSimple(16), torch.float64),
        (adanorm.DetachNorm(16, detach_std=False), torch.float64),
        (adanorm.AdaNorm(16), torch.float32),
        (adanorm.LayerNormSimple(16), torch.float32),
    ]
    with torch.inference_mode():
        for norm, dtype in norms:
            norm(torch.randn(4, 16, dtype=dtype))
    for norm, dtype in norms:
        x = torch.randn(4, 16, dtype=dtype, requires_grad=True)
        norm(x).square().sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()


# ---- issue #15: second derivatives, exact with the detached statistics held constant ---------

def _second_order(fn, x, w, b, g, v):
    """First-order grads of ``fn`` and the gradient of <first-order grads, v> with respect to x,
    the parameters and g: a Hessian-vector product and the mixed derivative."""
    leaves = [t for t in (x, w, b) if t is not None]
    g = g.clone().requires_grad_(True)
    out = fn(x, w, b)
    first = torch.autograd.grad(out, leaves, g, create_graph=True)
    dot = sum((f * vi).sum() for f, vi in zip(first, v, strict=True))
    second = torch.autograd.grad(dot, [*leaves, g], allow_unused=True)
    return first, [torch.zeros_like(t) if s is None else s for s, t in zip(second, [*leaves, g],
                                                                         strict=True)]


@pytest.mark.parametrize("std_mode", STD_MODES)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("path", ["float64", "float32", "float32-fallback"])
def test_second_derivatives_match_float64_reference(variant, std_mode, path, monkeypatch):
    kwargs, affine = VARIANTS[variant]
    if path == "float32-fallback":
        monkeypatch.setenv("ADANORM_DISABLE_EXTENSION", "1")
    dtype = torch.float64 if path == "float64" else torch.float32
    gen = torch.Generator().manual_seed(7)
    x64 = torch.randn(5, 12, generator=gen, dtype=torch.float64) * 2 + 0.5
    g64 = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    w64 = torch.rand(12, generator=gen, dtype=torch.float64) + 0.5 if affine else None
    b64 = torch.randn(12, generator=gen, dtype=torch.float64) if affine else None
    v64 = [torch.randn(t.shape, generator=gen, dtype=torch.float64)
           for t in (x64, w64, b64) if t is not None]

    def leaf(t, dt):
        return None if t is None else t.to(dt).requires_grad_(True)

    def ours(x, w, b):
        return AF.normalize(x, 12, w, b, 1e-3, std_mode=std_mode, **kwargs)

    def ref(x, w, b):
        return normalize_ref(x.double(), (12,), w, b, 1e-3, std_mode=std_mode, **kwargs)

    first, second = _second_order(
        ours, leaf(x64, dtype), leaf(w64, dtype), leaf(b64, dtype), g64.to(dtype),
        [t.to(dtype) for t in v64],
    )
    ref_first, ref_second = _second_order(ref, leaf(x64, torch.float64),
                                          leaf(w64, torch.float64), leaf(b64, torch.float64),
                                          g64, v64)
    tol = {"rtol": 1e-9, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 2e-4, "atol": 2e-4}
    for got, want in zip([*first, *second], [*ref_first, *ref_second], strict=True):
        assert got.dtype == dtype
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.double() / scale, want / scale, **tol)


@pytest.mark.parametrize("std_mode", STD_MODES)
def test_gradgradcheck_full_derivative_variants_float64(std_mode):
    x = torch.randn(3, 2, 7, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(7, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda x, w, b: AF.layer_norm(x, 7, w, b, 1e-3, std_mode=std_mode), (x, w, b)
    )
    assert torch.autograd.gradgradcheck(
        lambda x: AF.layer_norm_simple(x, (2, 7), 1e-3, std_mode=std_mode), (x,)
    )
    assert torch.autograd.gradgradcheck(
        lambda x: AF.ada_norm(x, 7, 1e-3, scale=2.0, std_mode=std_mode)
        - 2.0 * (1 - 0.1 * AF.layer_norm_simple(x, 7, 1e-3, std_mode=std_mode)).detach()
        * AF.layer_norm_simple(x, 7, 1e-3, std_mode=std_mode),
        (x,),
    )


@pytest.mark.parametrize("std_mode", STD_MODES)
@pytest.mark.parametrize("variant", ["detachnorm", "detach-mean", "detach-std", "adanorm"])
def test_gradgradcheck_frozen_surrogate_equals_our_double_backward(variant, std_mode):
    # Finite differences cannot hold mu/sigma/phi constant, so gradgradcheck runs on the frozen
    # surrogate (the forward with the detached quantities fixed at x0), and ours must equal its
    # exact second derivatives at x0.
    kwargs, _ = VARIANTS[variant]
    eps = 1e-3
    x0 = torch.randn(4, 9, dtype=torch.float64)
    frozen = _surrogate(variant, x0, std_mode, eps)
    x = x0.clone().requires_grad_(True)
    assert torch.autograd.gradgradcheck(frozen, (x,))
    g = torch.randn(4, 9, dtype=torch.float64)
    v = [torch.randn(4, 9, dtype=torch.float64)]
    ours = lambda t, w, b: AF.normalize(t, 9, None, None, eps, std_mode=std_mode, **kwargs)  # noqa: E731
    first, second = _second_order(ours, x, None, None, g, v)
    ref_first, ref_second = _second_order(lambda t, w, b: frozen(t), x, None, None, g, v)
    for got, want in zip([*first, *second], [*ref_first, *ref_second], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# ---- issue #15: any finite row normalizes, on the fused and the fallback paths ---------------

_LARGE_ROWS = [
    ("2e19", lambda gen: torch.randn(6, 64, generator=gen) * 2e19),
    ("1e30-offset", lambda gen: torch.randn(6, 64, generator=gen) * 1e29 + 1e30),
    ("1e38", lambda gen: torch.randn(6, 64, generator=gen) * 1e38),
    ("near-max", lambda gen: (torch.rand(6, 64, generator=gen) * 2 - 1) * 3.4e38),
    ("same-sign-sum-overflows", lambda gen: torch.rand(6, 64, generator=gen) * 1e37 + 1e38),
]


@pytest.mark.parametrize("std_mode", STD_MODES)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("rows", _LARGE_ROWS, ids=[r[0] for r in _LARGE_ROWS])
@pytest.mark.parametrize("path", ["fast", "fallback"])
def test_large_magnitudes_match_float64(variant, std_mode, rows, path, monkeypatch):
    kwargs, affine = VARIANTS[variant]
    if affine and std_mode == "biased":
        pytest.skip("affine biased LayerNorm is native F.layer_norm (nn.LayerNorm's range)")
    if path == "fallback":
        monkeypatch.setenv("ADANORM_DISABLE_EXTENSION", "1")
    gen = torch.Generator().manual_seed(3)
    x = rows[1](gen).float()
    assert torch.isfinite(x).all()
    g = torch.randn(6, 64, generator=gen)
    w = torch.rand(64, generator=gen) + 0.5 if affine else None
    b = torch.randn(64, generator=gen) if affine else None
    if variant == "layernorm-simple":
        fn = lambda t: AF.layer_norm_simple(t, 64, std_mode=std_mode)  # noqa: E731
    else:
        fn = lambda t: AF.normalize(t, 64, w, b, std_mode=std_mode, **kwargs)  # noqa: E731
    if variant == "layernorm-simple" and std_mode == "biased" and path == "fallback":
        pytest.skip("LayerNorm-simple without the extension is native F.layer_norm")
    xs = x.clone().requires_grad_(True)
    out = fn(xs)
    (dx,) = torch.autograd.grad(out, xs, g)
    x64 = x.double().requires_grad_(True)
    ref = normalize_ref(x64, (64,), None if w is None else w.double(),
                         None if b is None else b.double(), std_mode=std_mode, **kwargs)
    (ref_dx,) = torch.autograd.grad(ref, x64, g.double())
    assert torch.isfinite(out).all() and torch.isfinite(dx).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    # dx ~ g / sigma is tiny (subnormal in float32 near 3e38): compare relative to its scale.
    scale = ref_dx.abs().max()
    torch.testing.assert_close(dx.double() / scale, ref_dx / scale, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("std_mode", STD_MODES)
@pytest.mark.parametrize("path", ["fast", "fallback"])
def test_tiny_rows_with_zero_eps(std_mode, path, monkeypatch):
    # Squares of 1e-25 underflow float32: with eps = 0 the variance must still be right.
    if path == "fallback":
        monkeypatch.setenv("ADANORM_DISABLE_EXTENSION", "1")
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0)) * 1e-25
    out = AF.ada_norm(x, 32, eps=0.0, scale=2.0, std_mode=std_mode)
    ref = normalize_ref(x.double(), (32,), eps=0.0, std_mode=std_mode, scale=2.0)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_shape_cache_never_lends_an_entry_to_an_equal_but_invalid_shape():
    x = torch.randn(3, 1)
    AF.layer_norm_simple(x, 1)
    AF.layer_norm_simple(x, (1,))
    for bad in (True, (True,), 1.0, (1.0,)):
        with pytest.raises(ValueError, match="normalized_shape"):
            AF.layer_norm_simple(x, bad)


def test_cuda_route_normalizes_every_trailing_dimension(monkeypatch):
    # The CUDA kernels normalize the last dimension: a multi-dimensional normalized_shape must
    # reach them as rows of its full width.  Exercised on CPU by routing the "CUDA" branch to the
    # C++ CPU op, which takes 2-D rows only.
    from adanorm import _kernels

    if not _kernels.cpu_kernels_ready():
        pytest.skip("the C++ CPU kernels are unavailable")
    monkeypatch.setattr(AF, "select_backend", lambda *a, **k: (AF.CUDA_CPP, "test"))
    monkeypatch.setattr(_kernels, "cuda_backend", lambda *a, **k: "cuda-cpp")

    def rows_only(x, flags, kernel=None):
        return torch.ops.adanorm.norm.default(x, *flags)

    monkeypatch.setattr(_kernels, "cuda_norm", rows_only)
    x = torch.randn(3, 4, 6)
    out = AF.ada_norm(x, (4, 6), scale=2.0)
    monkeypatch.undo()
    expected = AF.ada_norm(x.reshape(3, 24), 24, scale=2.0).view(3, 4, 6)
    assert out.shape == x.shape and torch.equal(out, expected)
