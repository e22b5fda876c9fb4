"""A name -> norm-constructor registry, in the style of timm's ``get_norm_layer``.

Every model in adanorm's lab takes its norms from :func:`make_norm`, so a variant registered once
with :func:`register_norm` is available in every task.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from .functional import ShapeLike
from .modules import AdaNorm, DetachNorm, LayerNorm, LayerNormSimple, NoNorm

__all__ = ["register_norm", "get_norm", "make_norm", "available_norms", "NormSpec"]

NormFactory = Callable[..., nn.Module]
NormSpec = str | type | functools.partial

_REGISTRY: dict[str, NormFactory] = {}


def register_norm(name: str, factory: NormFactory, *, overwrite: bool = False) -> None:
    """Register ``factory(normalized_shape, **kwargs) -> nn.Module`` under ``name``."""
    key = name.lower()
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"a norm named {name!r} is already registered")
    _REGISTRY[key] = factory


def available_norms() -> list[str]:
    """The registered norm names, in registration order."""
    return list(_REGISTRY)


register_norm("layernorm", LayerNorm)
register_norm("layernorm-simple", LayerNormSimple)
register_norm("detachnorm", DetachNorm)
register_norm("detach-mean", functools.partial(DetachNorm, detach_mean=True, detach_std=False))
register_norm("detach-std", functools.partial(DetachNorm, detach_mean=False, detach_std=True))
register_norm("adanorm", AdaNorm)
register_norm("none", NoNorm)

_ALIASES = {
    "ln": "layernorm",
    "layer_norm": "layernorm",
    "layernorm_simple": "layernorm-simple",
    "ln-simple": "layernorm-simple",
    "detach_norm": "detachnorm",
    "detach_mean": "detach-mean",
    "detach_std": "detach-std",
    "ada_norm": "adanorm",
    "no_norm": "none",
    "identity": "none",
}


def get_norm(spec: NormSpec, **kwargs: Any) -> NormFactory:
    """Resolve ``spec`` (a registered name, a class or a ``functools.partial``) to a constructor.

    Extra ``kwargs`` are bound on top of those of a partial, so they win.
    """
    if isinstance(spec, str):
        key = spec.lower()
        key = _ALIASES.get(key, key)
        if key not in _REGISTRY:
            raise ValueError(f"unknown norm {spec!r}; known norms: {', '.join(available_norms())}")
        factory: NormFactory = _REGISTRY[key]
    elif isinstance(spec, functools.partial) or inspect.isclass(spec) or callable(spec):
        factory = spec
    else:
        raise TypeError(
            f"a norm spec must be a name, a class or a functools.partial, got {type(spec).__name__}"
        )
    if kwargs:
        if isinstance(factory, functools.partial):
            factory = functools.partial(
                factory.func, *factory.args, **{**factory.keywords, **kwargs}
            )
        else:
            factory = functools.partial(factory, **kwargs)
    return factory


def make_norm(spec: NormSpec, normalized_shape: ShapeLike, **kwargs: Any) -> nn.Module:
    """Build the norm ``spec`` over ``normalized_shape``.

    Example: ``make_norm("adanorm", 512, scale=2.0)``.
    """
    return get_norm(spec, **kwargs)(normalized_shape)
