"""Module conventions (nn.LayerNorm's), construction checks, and where users put the modules."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import adanorm
from adanorm import AdaNorm, DetachNorm, LayerNorm, LayerNormSimple, NoNorm
from adanorm.reference import normalize_ref

ALL_CLASSES = [LayerNorm, LayerNormSimple, DetachNorm, AdaNorm, NoNorm]
PARAMETER_FREE = [LayerNormSimple, DetachNorm, AdaNorm, NoNorm]


@pytest.mark.parametrize("elementwise_affine,bias", [(True, True), (True, False), (False, False)])
def test_layernorm_equals_torch_and_loads_its_state_dict(elementwise_affine, bias):
    torch.manual_seed(0)
    ref = nn.LayerNorm((6, 10), eps=1e-6, elementwise_affine=elementwise_affine, bias=bias)
    if elementwise_affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            if bias:
                ref.bias.normal_()
    ours = LayerNorm((6, 10), eps=1e-6, elementwise_affine=elementwise_affine, bias=bias)
    ours.load_state_dict(ref.state_dict())
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(3, 4, 6, 10, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    torch.testing.assert_close(ours(x), ref(x2), rtol=0, atol=0)
    ours(x).square().sum().backward()
    ref(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)
    for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    assert repr(ours).endswith(repr(ref).split("(", 1)[1])


def test_signatures_follow_torch():
    assert LayerNorm(8).normalized_shape == (8,)
    assert LayerNorm([2, 3]).normalized_shape == (2, 3)
    assert LayerNorm(torch.Size([4])).normalized_shape == (4,)
    assert LayerNorm(8).eps == 1e-5
    m = LayerNorm(8, device="cpu", dtype=torch.float64)
    assert m.weight.dtype == torch.float64 and m.bias.dtype == torch.float64
    assert LayerNorm(8, bias=False).bias is None
    assert LayerNorm(8, elementwise_affine=False).weight is None
    for cls in ALL_CLASSES:
        cls(8, 1e-6, device="cpu", dtype=torch.float16)


@pytest.mark.parametrize("cls", PARAMETER_FREE)
def test_parameter_free_variants_have_empty_state_dict(cls):
    m = cls((4, 5))
    assert m.state_dict() == {} and list(m.parameters()) == []
    m.load_state_dict({})


def test_extra_repr_shows_constants():
    assert repr(AdaNorm(16, scale=2.0, k=0.05)) == "AdaNorm((16,), eps=1e-05, scale=2.0, k=0.05)"
    assert "detach_mean=True, detach_std=False" in repr(DetachNorm(8, detach_std=False))
    assert "std_mode='unbiased'" in repr(LayerNormSimple(8, std_mode="unbiased"))
    assert repr(NoNorm(8)) == "NoNorm((8,))"


def test_construction_errors():
    with pytest.raises(ValueError, match="scale.*-1"):
        AdaNorm(8, scale=-1)
    with pytest.raises(ValueError, match="scale.*0"):
        AdaNorm(8, scale=0)
    with pytest.raises(ValueError, match="k must be > 0, got 0.0"):
        AdaNorm(8, k=0)
    with pytest.raises(ValueError, match="k must be > 0"):
        AdaNorm(8, k=-0.1)
    for cls in ALL_CLASSES:
        with pytest.raises(ValueError, match="eps must be >= 0, got -1"):
            cls(8, eps=-1e-5 * 1e5)
        with pytest.raises(ValueError, match="normalized_shape"):
            cls(0)
        with pytest.raises(ValueError, match="std_mode"):
            cls(8, std_mode="bessel")
    with pytest.raises(ValueError, match="at least 2"):
        LayerNormSimple(1, std_mode="unbiased")


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_input_errors_name_the_shapes(cls):
    m = cls(16)
    with pytest.raises(ValueError, match=r"\[16\].*\[2, 8\]"):
        m(torch.randn(2, 8))
    with pytest.raises(TypeError, match="int32"):
        m(torch.ones(2, 16, dtype=torch.int32))


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_train_eval_identical_and_pickle_roundtrip(cls):
    m = cls(12)
    x = torch.randn(3, 12)
    out = m.train()(x)
    torch.testing.assert_close(m.eval()(x), out)
    clone = pickle.loads(pickle.dumps(m))
    torch.testing.assert_close(clone(x), out)
    torch.testing.assert_close(copy.deepcopy(m)(x), out)


def test_modules_match_reference():
    x = torch.randn(5, 3, 24, dtype=torch.float64)
    cases = [
        (LayerNormSimple(24, std_mode="unbiased"), {"std_mode": "unbiased"}),
        (DetachNorm(24), {"detach_mean": True, "detach_std": True}),
        (DetachNorm(24, detach_mean=False), {"detach_std": True}),
        (AdaNorm(24, scale=2.0), {"scale": 2.0}),
    ]
    for module, kwargs in cases:
        xa = x.clone().requires_grad_(True)
        xb = x.clone().requires_grad_(True)
        g = torch.randn_like(x)
        module(xa).backward(g)
        normalize_ref(xb.double(), (24,), **kwargs).backward(g)
        torch.testing.assert_close(xa.grad, xb.grad)


# ------------------------------------------------------------------------------------------------
# Where users put it: torch.compile, torch.export, autocast, DDP.
# ------------------------------------------------------------------------------------------------


def _block(norm: str, **kwargs) -> nn.Module:
    return nn.Sequential(nn.Linear(32, 32), adanorm.make_norm(norm, 32, **kwargs), nn.GELU())


@pytest.mark.parametrize(
    "norm,kwargs",
    [
        ("layernorm", {}),
        ("layernorm-simple", {"std_mode": "unbiased"}),
        ("detachnorm", {}),
        ("detach-mean", {}),
        ("adanorm", {"scale": 2.0}),
    ],
)
def test_torch_compile_fullgraph(norm, kwargs):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _block(norm, **kwargs)
    x = torch.randn(4, 32, requires_grad=True)
    eager = model(x)
    eager.sum().backward()
    eager_grad = x.grad.clone()
    x.grad = None
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(x.grad, eager_grad)


@pytest.mark.slow
def test_torch_compile_inductor_adanorm():
    torch._dynamo.reset()
    m = AdaNorm(64, scale=2.0)
    x = torch.randn(8, 64, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, m(x))


@pytest.mark.parametrize("norm", ["layernorm", "layernorm-simple", "detachnorm", "adanorm", "none"])
def test_torch_export(norm):
    model = _block(norm).eval()
    x = torch.randn(4, 32)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


@pytest.mark.parametrize("norm", ["layernorm", "layernorm-simple", "detachnorm", "adanorm"])
def test_cpu_autocast_bf16(norm):
    torch.manual_seed(0)
    model = _block(norm)
    x = torch.randn(6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    ref = model(x)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("norm,kwargs", [("adanorm", {"scale": 2.0}),
                                         ("layernorm", {"std_mode": "unbiased"}),
                                         ("detach-std", {"std_mode": "unbiased"})])
def test_torch_compile_fullgraph_on_the_fallback_path(norm, kwargs, dtype, monkeypatch):
    # The pure-PyTorch path (float64, affine unbiased, or the extension disabled) traced without
    # a graph break: it takes the rescaled statistics there (no data-dependent branch), so huge
    # rows stay right in compiled code too.
    monkeypatch.setenv("ADANORM_DISABLE_EXTENSION", "1")
    torch._dynamo.reset()
    m = adanorm.make_norm(norm, 32, **kwargs).to(dtype)
    x = (torch.randn(4, 32, dtype=dtype) * torch.tensor([[1.0], [1e3], [1e20], [3e37]],
                                                         dtype=dtype)).requires_grad_()
    eager = m(x)
    (eager_dx,) = torch.autograd.grad(eager.square().sum(), x)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    (dx,) = torch.autograd.grad(out.square().sum(), x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, eager)
    scale = eager_dx.abs().amax(-1, keepdim=True)
    torch.testing.assert_close(dx / scale, eager_dx / scale)


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_docstrings_in_pytorch_form(cls):
    doc = cls.__doc__ or ""
    for section in ("Args:", "Shape:", "Examples::", ":math:"):
        assert section in doc, f"{cls.__name__} docstring lacks {section}"
    # The examples run.
    import doctest

    examples = doctest.DocTestParser().get_examples(doc)
    assert examples
    globs = {"torch": torch, "adanorm": adanorm}
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(doctest.DocTest(examples, globs, cls.__name__, None, 0, doc))
    assert runner.failures == 0, f"{cls.__name__} docstring examples failed"


# ---- the modules' direct route to the fused op ---------------------------------------------------

FUSED_MODULES = [
    (LayerNormSimple, {}),
    (LayerNormSimple, {"std_mode": "unbiased"}),
    (DetachNorm, {}),
    (DetachNorm, {"detach_std": False}),
    (AdaNorm, {"scale": 2.0, "k": 0.2}),
    (AdaNorm, {"std_mode": "unbiased"}),
]


def _fused_kernels_or_skip():
    from adanorm import _kernels

    if not _kernels.cpu_kernels_ready():
        pytest.skip("the C++ CPU kernels are unavailable")


def _functional(m, x):
    """What the module computes, through the public functional forms."""
    F = adanorm.functional
    if isinstance(m, AdaNorm):
        return F.ada_norm(x, m.normalized_shape, m.eps, scale=m.scale, k=m.k,
                          std_mode=m.std_mode)
    if isinstance(m, DetachNorm):
        return F.detach_norm(x, m.normalized_shape, m.eps, std_mode=m.std_mode,
                             detach_mean=m.detach_mean, detach_std=m.detach_std)
    return F.layer_norm_simple(x, m.normalized_shape, m.eps, std_mode=m.std_mode)


@pytest.mark.parametrize("cls,kwargs", FUSED_MODULES)
@pytest.mark.parametrize("shape,normalized", [((5, 24), 24), ((2, 3, 24), 24), ((24,), 24),
                                              ((3, 4, 6), (4, 6))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_direct_route_equals_functional(cls, kwargs, shape, normalized, dtype):
    _fused_kernels_or_skip()
    m = cls(normalized, **kwargs)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 3 + 1).to(dtype).requires_grad_()
    g = torch.randn(shape, generator=gen).to(dtype)
    expected = _functional(m, x)
    (expected_dx,) = torch.autograd.grad(expected, x, g)
    for _ in range(3):  # the first call routes through the functional form, later ones directly
        out = m(x)
        (dx,) = torch.autograd.grad(out, x, g)
        assert out.shape == x.shape and out.dtype == dtype
        assert torch.equal(out, expected) and torch.equal(dx, expected_dx)
    assert m._routes[(False, dtype)] is not None


def test_module_direct_route_skips_the_functional_form(monkeypatch):
    _fused_kernels_or_skip()
    m = AdaNorm(16, scale=2.0)
    x = torch.randn(4, 16)
    expected = m(x)

    def not_called(*args, **kwargs):
        raise AssertionError("the functional form ran on the direct route")

    monkeypatch.setattr(adanorm.functional, "ada_norm", not_called)
    assert torch.equal(m(x), expected)
    # A wrong shape or dtype still gets the functional form's error, and float64 its path.
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"trailing shape \[16\]"):
        m(torch.randn(4, 15))
    with pytest.raises(TypeError, match="int32"):
        m(torch.ones(4, 16, dtype=torch.int32))
    assert m(x.double()).dtype == torch.float64 and m._routes[(False, torch.float64)] is None


@pytest.mark.parametrize("name,value", [("eps", 0.5), ("std_mode", "unbiased"), ("scale", 3.0),
                                        ("k", 0.3)])
def test_module_direct_route_follows_attribute_changes(name, value):
    _fused_kernels_or_skip()
    m = AdaNorm(8, scale=1.0)
    x = torch.randn(3, 8) * 0.5
    m(x), m(x)  # the route is cached
    setattr(m, name, value)
    assert torch.equal(m(x), _functional(m, x)) and torch.equal(m(x), _functional(m, x))
    d = DetachNorm(8)
    d(x), d(x)
    d.detach_std = False
    x = x.requires_grad_()
    g = torch.randn(3, 8)
    (dx,) = torch.autograd.grad(d(x), x, g)
    (expected,) = torch.autograd.grad(_functional(d, x), x, g)
    assert torch.equal(dx, expected)


def test_module_direct_route_respects_disable_extension(monkeypatch):
    _fused_kernels_or_skip()
    m = AdaNorm(8)
    x = torch.randn(3, 8, requires_grad=True)
    m(x), m(x)
    monkeypatch.setenv("ADANORM_DISABLE_EXTENSION", "1")
    out = m(x)
    assert "Cpp" not in type(out.grad_fn).__name__  # the pure-PyTorch autograd Function
    monkeypatch.delenv("ADANORM_DISABLE_EXTENSION")
    assert "Cpp" in type(m(x).grad_fn).__name__
