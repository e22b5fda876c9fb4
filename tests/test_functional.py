"""The functional forms against the float64 reference: forward, backward, memory, dtypes, edges."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.gradcheck import GradcheckError

import adanorm.functional as AF
from reference import VARIANTS, reference_norm

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
        return reference_norm(x, normalized_shape, w, b, 1e-5, std_mode=std_mode, **kwargs)

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
        lambda t, w, b: reference_norm(t, (37,), std_mode=std_mode, **kwargs), x, None, None, g
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
        lambda x, w, b: reference_norm(x, (96,), w, b, std_mode=std_mode, **kwargs),
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
    ref = reference_norm(x.double(), (256,), scale=1.0)
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
        reference_norm(x, (33,), eps=0.0, scale=1.0),
        rtol=1e-6,
        atol=1e-6,
    )
    assert math.isfinite(AF.ada_norm(x, 33).sum().item())
