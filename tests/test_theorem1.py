"""Theorem 1 of the paper (paper.md §5) as property tests of our backward.

sigma is the biased std with eps inside the square root; every identity below holds for that
sigma exactly, so the tolerances only absorb float64 rounding and the eps in the Var(g)/sigma^2
bound.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import adanorm.functional as AF

EPS = 1e-5


@st.composite
def rows_and_grads(draw):
    width = draw(st.integers(min_value=4, max_value=96))
    rows = draw(st.integers(min_value=1, max_value=6))
    seed = draw(st.integers(min_value=0, max_value=2**31 - 1))
    x_scale = draw(st.floats(min_value=0.05, max_value=50.0))
    x_shift = draw(st.floats(min_value=-100.0, max_value=100.0))
    g_shift = draw(st.floats(min_value=-3.0, max_value=3.0))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=gen, dtype=torch.float64) * x_scale + x_shift
    g = torch.randn(rows, width, generator=gen, dtype=torch.float64) + g_shift
    return x, g


def _input_grad(x, g, **kwargs):
    x = x.clone().requires_grad_(True)
    AF.normalize(x, x.shape[-1], eps=EPS, **kwargs).backward(g)
    return x.grad


def _sigma(x):
    return x.var(-1, unbiased=False, keepdim=True).add(EPS).sqrt()


def _row_var(t):
    return t.var(-1, unbiased=False)


SETTINGS = settings(max_examples=60, deadline=None)


@SETTINGS
@given(rows_and_grads())
def test_layernorm_simple_recenters_and_shrinks_variance(data):
    x, g = data
    b = _input_grad(x, g)
    sigma = _sigma(x).squeeze(-1)
    scale = g.abs().max() / sigma.min()
    assert torch.allclose(b.mean(-1), torch.zeros_like(sigma), atol=1e-10 * scale)
    bound = _row_var(g) / sigma**2
    assert bool((_row_var(b) <= bound * (1 + 1e-9) + 1e-12 * scale**2).all())
    # Closed form D_b = (D_g - m^2) / sigma^2 with m = mean(g * y); eps makes mean(y^2) =
    # var / (var + eps) < 1, which turns it into (D_g - m^2 (2 - mean(y^2))) / sigma^2.
    y = (x - x.mean(-1, keepdim=True)) / _sigma(x)
    m = (g * y).mean(-1)
    mean_y2 = (y * y).mean(-1)
    torch.testing.assert_close(_row_var(b), (_row_var(g) - m**2 * (2 - mean_y2)) / sigma**2)


@SETTINGS
@given(rows_and_grads())
def test_detach_std_recenters_but_keeps_variance(data):
    x, g = data
    d = _input_grad(x, g, detach_std=True)
    sigma = _sigma(x).squeeze(-1)
    scale = g.abs().max() / sigma.min()
    assert torch.allclose(d.mean(-1), torch.zeros_like(sigma), atol=1e-10 * scale)
    torch.testing.assert_close(_row_var(d), _row_var(g) / sigma**2)


@SETTINGS
@given(rows_and_grads())
def test_detach_mean_keeps_mean_and_shrinks_variance(data):
    x, g = data
    c = _input_grad(x, g, detach_mean=True)
    sigma = _sigma(x).squeeze(-1)
    torch.testing.assert_close(c.mean(-1), g.mean(-1) / sigma)
    scale = g.abs().max() / sigma.min()
    assert bool((_row_var(c) <= _row_var(g) / sigma**2 * (1 + 1e-9) + 1e-12 * scale**2).all())


@SETTINGS
@given(rows_and_grads())
def test_detachnorm_gradient_is_g_over_sigma(data):
    x, g = data
    a = _input_grad(x, g, detach_mean=True, detach_std=True)
    torch.testing.assert_close(a, g / _sigma(x))


@SETTINGS
@given(rows_and_grads(), st.sampled_from([0.5, 1.0, 2.0, 3.0]))
def test_adanorm_gradient_is_simple_backward_of_phi_g(data, scale):
    x, g = data
    got = _input_grad(x, g, scale=scale, k=0.1)
    y = AF.layer_norm_simple(x, x.shape[-1], EPS)
    phi = scale * (1 - 0.1 * y)
    want = _input_grad(x, phi * g)
    torch.testing.assert_close(got, want)
    assert torch.allclose(
        got.mean(-1),
        torch.zeros(x.shape[0], dtype=x.dtype),
        atol=1e-9 * float((phi * g).abs().max() / _sigma(x).min()),
    )
