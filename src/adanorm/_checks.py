"""Argument validation shared by the modules and the functional forms (one error per bad value,
naming it and what was expected)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

StdMode = Literal["biased", "unbiased"]
_STD_MODES = ("biased", "unbiased")
_LOW_PRECISION = (torch.float16, torch.bfloat16)

ShapeLike = int | Sequence[int] | torch.Size

# ------------------------------------------------------------------------------------------------
# Argument validation.  Plain Python comparisons
# only (no tensor ops); the parsed normalized_shape is cached by value.
# ------------------------------------------------------------------------------------------------

# Parsed shapes: plain ints by value, tuples (immutable) by identity, so that True, 4.0 or (True,)
# never borrow the entry of 1, 4 or (1,).
_int_shapes: dict[int, tuple[tuple[int, ...], int]] = {}
_tuple_shapes: dict[int, tuple[Any, tuple[tuple[int, ...], int]]] = {}


def _parse_shape(normalized_shape: Any) -> tuple[tuple[int, ...], int]:
    if isinstance(normalized_shape, numbers.Integral) and not isinstance(normalized_shape, bool):
        dims: tuple[Any, ...] = (normalized_shape,)
    elif isinstance(normalized_shape, (Sequence, torch.Size)) and not isinstance(
        normalized_shape, str
    ):
        dims = tuple(normalized_shape)
    else:
        dims = ()
    if not dims or not all(
        isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in dims
    ):
        raise ValueError(
            f"normalized_shape must be a positive int or a non-empty sequence of positive ints, "
            f"got {normalized_shape!r}"
        )
    shape = tuple(int(d) for d in dims)
    return shape, math.prod(shape)


def _shape_and_width(normalized_shape: ShapeLike) -> tuple[tuple[int, ...], int]:
    if type(normalized_shape) is int:
        parsed = _int_shapes.get(normalized_shape)
        if parsed is None:
            parsed = _parse_shape(normalized_shape)
            if len(_int_shapes) > 256:
                _int_shapes.clear()
            _int_shapes[normalized_shape] = parsed
        return parsed
    entry = _tuple_shapes.get(id(normalized_shape))
    if entry is not None and entry[0] is normalized_shape:
        return entry[1]
    parsed = _parse_shape(normalized_shape)
    if isinstance(normalized_shape, tuple):
        if len(_tuple_shapes) > 256:
            _tuple_shapes.clear()
        # The entry holds the tuple itself, so its id cannot be reused while it is cached.
        _tuple_shapes[id(normalized_shape)] = (normalized_shape, parsed)
    return parsed


def _real(value: Any, name: str, expected: str, *, positive: bool) -> float:
    if type(value) is not float and (
        not isinstance(value, numbers.Real) or isinstance(value, bool)
    ):
        raise TypeError(f"{name} must be a real number {expected}, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
        raise ValueError(f"{name} must be {expected}, got {value!r} (a finite real number)")
    return value


def check_std_mode(std_mode: str) -> None:
    if std_mode not in _STD_MODES:
        raise ValueError(f"std_mode must be one of {_STD_MODES}, got {std_mode!r}")


def check_arguments(
    normalized_shape: ShapeLike,
    eps: float,
    std_mode: str,
    scale: float | None = None,
    k: float | None = None,
    *,
    ada: bool = False,
) -> tuple[tuple[int, ...], int, float, bool, float | None, float]:
    """Validate the arguments every norm of the family takes; the one check behind both the
    modules' constructors and the functional forms.

    Returns ``(shape, width, eps, unbiased, scale, k)`` normalized to Python types; raises
    ``ValueError``/``TypeError`` naming the bad value and what was expected.  ``ada=True``
    (AdaNorm) requires ``scale`` (C) and ``k`` to be finite and > 0.
    """
    shape, width = _shape_and_width(normalized_shape)
    eps = eps if type(eps) is float and 0.0 <= eps < math.inf else _real(
        eps, "eps", ">= 0", positive=False
    )
    if std_mode == "biased":
        unbiased = False
    elif std_mode == "unbiased":
        unbiased = True
        if width < 2:
            raise ValueError(
                f"std_mode='unbiased' needs at least 2 normalized elements, got normalized_shape "
                f"{list(shape)}"
            )
    else:
        raise ValueError(f"std_mode must be one of {_STD_MODES}, got {std_mode!r}")
    if ada:
        if scale is None:
            raise ValueError(
                "AdaNorm needs scale (C) > 0, got None; for (x - mean) / std without AdaNorm's "
                "phi use layer_norm_simple"
            )
        scale = _real(scale, "AdaNorm scale (C)", "> 0", positive=True)
        k = _real(k, "AdaNorm k", "> 0", positive=True)
    else:
        scale, k = None, 0.1
    return shape, width, eps, unbiased, scale, k


def check_input(x: Tensor, shape: tuple[int, ...]) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"adanorm normalizes tensors, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"adanorm normalizes floating-point tensors, got a tensor of dtype {x.dtype}"
        )
    n = len(shape)
    size = x.shape
    if len(size) < n or (size[-1] != shape[0] if n == 1 else size[len(size) - n :] != shape):
        raise ValueError(
            f"expected input with trailing shape {list(shape)} (normalized_shape), "
            f"got input of shape {list(x.shape)}"
        )


def _check_affine(weight: Tensor | None, bias: Tensor | None, shape: tuple[int, ...]) -> None:
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != shape:
            raise ValueError(
                f"{name} must have shape {list(shape)} (normalized_shape), got {list(t.shape)}"
            )
