from __future__ import annotations

import functools

import pytest
import torch

import adanorm
from adanorm import AdaNorm, DetachNorm, LayerNorm, LayerNormSimple, NoNorm

EXPECTED = {
    "layernorm": (LayerNorm, {}),
    "layernorm-simple": (LayerNormSimple, {}),
    "detachnorm": (DetachNorm, {"detach_mean": True, "detach_std": True}),
    "detach-mean": (DetachNorm, {"detach_mean": True, "detach_std": False}),
    "detach-std": (DetachNorm, {"detach_mean": False, "detach_std": True}),
    "adanorm": (AdaNorm, {}),
    "none": (NoNorm, {}),
}


def test_names():
    assert set(EXPECTED) <= set(adanorm.available_norms())


@pytest.mark.parametrize("name", list(EXPECTED))
def test_make_norm_builds_the_right_module(name):
    cls, attrs = EXPECTED[name]
    m = adanorm.make_norm(name, (3, 4), eps=1e-6)
    assert type(m) is cls and m.normalized_shape == (3, 4)
    for key, value in attrs.items():
        assert getattr(m, key) == value
    assert m(torch.randn(2, 3, 4)).shape == (2, 3, 4)


def test_kwargs_reach_the_constructor():
    m = adanorm.make_norm("adanorm", 8, scale=2.0, k=0.05, std_mode="unbiased")
    assert (m.scale, m.k, m.std_mode) == (2.0, 0.05, "unbiased")
    assert adanorm.make_norm("ADANORM", 8).scale == 1.0


def test_class_and_partial_specs():
    assert type(adanorm.make_norm(LayerNormSimple, 8)) is LayerNormSimple
    spec = functools.partial(AdaNorm, scale=3.0)
    assert adanorm.make_norm(spec, 8).scale == 3.0
    # kwargs given at the call win over the partial's.
    assert adanorm.make_norm(spec, 8, scale=0.5).scale == 0.5
    assert adanorm.get_norm("detach-std", detach_mean=True)(8).detach_mean is True
    assert type(adanorm.make_norm(torch.nn.LayerNorm, 8)) is torch.nn.LayerNorm


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown norm 'batchnorm'.*layernorm-simple.*adanorm"):
        adanorm.make_norm("batchnorm", 8)
    with pytest.raises(TypeError, match="norm spec"):
        adanorm.get_norm(3)


def test_register_a_new_variant_once():
    name = "test-adanorm-c3"
    adanorm.register_norm(name, functools.partial(AdaNorm, scale=3.0))
    assert name in adanorm.available_norms()
    assert adanorm.make_norm(name, 4).scale == 3.0
    with pytest.raises(ValueError, match="already registered"):
        adanorm.register_norm(name, AdaNorm)
