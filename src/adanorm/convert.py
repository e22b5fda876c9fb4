"""Swap every LayerNorm of an existing model for a variant of the family.

The authors' released translation code reaches only 2 of the 32 LayerNorms of its Transformer;
:func:`convert_norms` reaches all of them, in any ``nn.Module``.  Convert before wrapping the model
in DDP/FSDP, before ``torch.compile`` and before building the optimizer: replaced modules hold new
parameter tensors.

PyTorch's ``nn.TransformerEncoderLayer`` has a fused inference fast path (``eval()`` with grad off)
that computes ``nn.LayerNorm`` itself from ``norm1.weight``/``norm1.eps``: with any other norm it
would crash or silently compute LayerNorm.  :func:`convert_norms` turns that fast path off for
every encoder layer whose norms are no longer plain biased affine LayerNorms (the layer's
``activation_relu_or_gelu`` flag, which only gates the fast path, is set False, and the owning
``nn.TransformerEncoder``'s ``use_nested_tensor``), so eval runs the ordinary forward and gives
the same output as training mode without dropout.
"""

from __future__ import annotations

import fnmatch
import inspect
import warnings
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import nn

from .modules import LayerNorm, NoNorm, NormBase
from .registry import NormSpec, get_norm

__all__ = ["convert_norms", "ConvertedNorm"]

NameFilter = str | Iterable[str] | Callable[[str, nn.Module], bool] | None

# Hook dictionaries are moved, not copied, so that handles the user holds keep working.
_HOOK_ATTRIBUTES = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


class ConvertedNorm(NamedTuple):
    """One converted (or, with ``dry_run``, convertible) module."""

    name: str
    old_type: str
    new_type: str
    action: str  # "replaced", "unchanged" or "dry-run"


def _type_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, NormBase, NoNorm))


def _matches(name: str, module: nn.Module, pattern: NameFilter) -> bool:
    if pattern is None:
        return False
    if callable(pattern):
        return bool(pattern(name, module))
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _factory_kwargs(module: nn.Module) -> dict[str, Any]:
    tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    if not tensors:
        return {}
    return {"device": tensors[0].device, "dtype": tensors[0].dtype}


def _accepted_keywords(factory: Callable[..., nn.Module]) -> set[str]:
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a callable without a signature
        return set()
    return {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _build_replacement(
    old: nn.Module, factory: Callable[..., nn.Module], kwargs: dict
) -> nn.Module:
    build_kwargs = dict(_factory_kwargs(old))
    if "eps" not in kwargs and hasattr(old, "eps"):
        build_kwargs["eps"] = old.eps
    accepted = _accepted_keywords(factory)
    # A target with optional gain/bias (LayerNorm) gets exactly the source's parameter set, so
    # the original state_dict still loads strictly.
    if {"elementwise_affine", "bias"} <= accepted and not {"elementwise_affine", "bias"} & set(
        kwargs
    ):
        has_weight = isinstance(getattr(old, "weight", None), torch.Tensor)
        has_bias = isinstance(getattr(old, "bias", None), torch.Tensor)
        build_kwargs["elementwise_affine"] = has_weight or has_bias
        build_kwargs["bias"] = has_bias
    build_kwargs.update(kwargs)
    new = factory(tuple(old.normalized_shape), **build_kwargs)
    with torch.no_grad():
        for attr in ("weight", "bias"):
            old_p = getattr(old, attr, None)
            new_p = getattr(new, attr, None)
            if isinstance(new_p, nn.Parameter) and isinstance(old_p, torch.Tensor):
                if not new_p.is_meta:
                    new_p.copy_(old_p)
                new_p.requires_grad_(old_p.requires_grad)
    return new


def _dropped_affine(old: nn.Module, new: nn.Module) -> list[str]:
    """Names of non-identity gain/bias tensors of ``old`` that ``new`` has no place for."""
    dropped = []
    for attr, identity in (("weight", 1.0), ("bias", 0.0)):
        old_p = getattr(old, attr, None)
        if not isinstance(old_p, torch.Tensor) or isinstance(
            getattr(new, attr, None), nn.Parameter
        ):
            continue
        if old_p.is_meta or not bool(torch.all(old_p == identity)):
            dropped.append("gain" if attr == "weight" else "bias")
    return dropped


def _layernorm_equivalent(norm: nn.Module) -> bool:
    """True when ``norm`` computes exactly what PyTorch's fused Transformer fast path assumes."""
    if type(norm) is nn.LayerNorm:
        return True
    return (
        type(norm) is LayerNorm
        and norm.std_mode == "biased"
        and norm.weight is not None
        and norm.bias is not None
    )


def _disable_transformer_fast_paths(model: nn.Module) -> None:
    for module in model.modules():
        if not isinstance(module, nn.TransformerEncoder):
            continue
        if not all(
            _layernorm_equivalent(layer.norm1) and _layernorm_equivalent(layer.norm2)
            for layer in module.layers
            if isinstance(layer, nn.TransformerEncoderLayer)
        ):
            module.use_nested_tensor = False
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer) and not (
            _layernorm_equivalent(module.norm1) and _layernorm_equivalent(module.norm2)
        ):
            module.activation_relu_or_gelu = False


def _same_config(old: nn.Module, new: nn.Module) -> bool:
    return type(old) is type(new) and old.extra_repr() == new.extra_repr()


def convert_norms(
    model: nn.Module,
    to: NormSpec,
    *,
    include: NameFilter = None,
    exclude: NameFilter = None,
    dry_run: bool = False,
    **kwargs: Any,
) -> list[ConvertedNorm]:
    """Replace, in place, every ``nn.LayerNorm`` (subclasses included) and every adanorm norm of
    ``model`` by the norm ``to`` (a registered name, a class or a ``functools.partial``).

    The replacement keeps the full ``normalized_shape``, ``eps`` (unless given in ``kwargs``),
    device, dtype, the gain/bias values and ``requires_grad`` when the target has them, the
    ``training`` flag and all hooks.  A target with optional gain/bias (``"layernorm"``) gets the
    source's parameter set (``LayerNorm(bias=False)`` stays without bias, a parameter-free norm
    stays parameter-free) unless ``elementwise_affine``/``bias`` are given in ``kwargs``.  A
    module shared by several parents stays one shared module.
    Modules already equal to the target are left alone, so converting twice changes nothing.

    Args:
        model: the model to convert (its root may not itself be a norm).
        to: the target norm.
        include: glob pattern(s) on qualified module names, or ``fn(name, module) -> bool``; when
            given, only matching norms are converted.
        exclude: the same, for norms to keep.
        dry_run: report what would change without changing anything.
        **kwargs: constructor arguments of the target, e.g. ``scale=2`` for AdaNorm.

    Returns:
        one :class:`ConvertedNorm` row per converted module (a shared module once, under its
        first qualified name).

    Warns:
        UserWarning when a non-identity gain or bias is dropped (the function changes), and when
        a subclass with its own ``forward`` (e.g. a channels-first LayerNorm2d) is replaced.
    """
    if _is_norm(model):
        raise ValueError(
            f"convert_norms replaces norms inside a model; the model itself is a "
            f"{type(model).__name__}: build the target with adanorm.make_norm instead"
        )
    factory = get_norm(to)

    # Every (parent, attribute) slot a norm occupies, shared instances included.
    slots: dict[int, list[tuple[nn.Module, str, str]]] = {}
    first_seen: dict[int, nn.Module] = {}
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in parent.named_children():
            if not _is_norm(child):
                continue
            qualified = f"{parent_name}.{child_name}" if parent_name else child_name
            slots.setdefault(id(child), []).append((parent, child_name, qualified))
            first_seen.setdefault(id(child), child)

    # Report in the model's own (depth-first) order rather than by parent.
    order = {name: i for i, (name, _) in enumerate(model.named_modules(remove_duplicate=False))}
    keys = sorted(first_seen, key=lambda key: min(order[q] for _, _, q in slots[key]))

    rows: list[ConvertedNorm] = []
    for key in keys:
        old = first_seen[key]
        places = slots[key]
        name = min((q for _, _, q in places), key=order.__getitem__)
        if include is not None and not any(_matches(q, old, include) for _, _, q in places):
            continue
        if any(_matches(q, old, exclude) for _, _, q in places):
            continue
        new = _build_replacement(old, factory, kwargs)
        if _same_config(old, new):
            rows.append(ConvertedNorm(name, _type_name(old), _type_name(new), "unchanged"))
            continue
        rows.append(
            ConvertedNorm(
                name, _type_name(old), _type_name(new), "dry-run" if dry_run else "replaced"
            )
        )
        if dry_run:
            continue
        dropped = _dropped_affine(old, new)
        if dropped:
            warnings.warn(
                f"convert_norms: {name} has a trained {' and '.join(dropped)} that "
                f"{type(new).__name__} has no place for; they are dropped, which changes the "
                f"model's function (fine-tune after converting)",
                stacklevel=2,
            )
        if isinstance(old, nn.LayerNorm) and type(old).forward is not nn.LayerNorm.forward:
            warnings.warn(
                f"convert_norms: {name} is a {type(old).__name__}, a LayerNorm subclass with its "
                f"own forward; the replacement normalizes the trailing {old.normalized_shape} "
                f"dimensions of its input and does not repeat that forward's extra steps",
                stacklevel=2,
            )
        new.train(old.training)
        for attr in _HOOK_ATTRIBUTES:
            if hasattr(old, attr) and hasattr(new, attr):
                setattr(new, attr, getattr(old, attr))
        for parent, child_name, _ in places:
            setattr(parent, child_name, new)
    if not dry_run:
        _disable_transformer_fast_paths(model)
    return rows
