"""Declared config schemas: every key a config may hold, with its type, range and default.

The generic engine declares its sections (:data:`ENGINE_SCHEMA`); every task declares the keys
of its ``data`` and ``model`` sections (and ``generation``, if it decodes) as a
:class:`TaskSchema` in its class attribute ``config_schema``.  :func:`check_section` fills in the
defaults and rejects an unknown key, a wrong type, NaN or an out-of-range value with one line
that names the key, so a typo (``model: {nrom: adanorm}``) can never train something else.
"""

from __future__ import annotations

import copy
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ConfigError",
    "Field",
    "TaskSchema",
    "NO_DEFAULT",
    "Int",
    "Float",
    "Bool",
    "Str",
    "IntList",
    "FloatList",
    "StrList",
    "StrMap",
    "Kwargs",
    "EpochOrInt",
    "DropoutRate",
    "check_section",
]


class ConfigError(ValueError):
    """A preset, an override or a config value is wrong; the message names it."""


class _NoDefault:
    def __repr__(self) -> str:
        return "NO_DEFAULT"


#: A field whose absence means "the code decides from other keys" (e.g. an MT recipe's own BPE
#: size): it is accepted and checked when given, and left out when not.
NO_DEFAULT: Any = _NoDefault()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        lo, hi = _number(low), _number(high)
        return f" in {'(' if low_open else '['}{lo}, {hi}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {_number(low)}"
    if high is not None:
        return f" {'<' if high_open else '<='} {_number(high)}"
    return ""


@dataclass(frozen=True)
class Field:
    """One config key.  ``kind`` is the type (see the constructors :func:`Int`, :func:`Float`,
    ...); ``low``/``high`` bound numbers (and the items of number lists); ``choices`` lists the
    allowed strings; ``nullable`` accepts YAML ``null``."""

    kind: str
    default: Any
    help: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    nullable: bool = False
    length: int | None = None
    keys: tuple[str, ...] | None = None

    def describe(self) -> str:
        bounds = _range_text(self.low, self.high, self.low_open, self.high_open)
        text = {
            "int": f"an int{bounds}",
            "float": f"a finite number{bounds}",
            "bool": "true or false",
            "str": "a string" if not self.choices else f"one of {', '.join(self.choices)}",
            "int_list": f"a non-empty list of ints{bounds}",
            "float_list": f"a list of {self.length} finite numbers{bounds}",
            "str_list": "a list of strings",
            "str_map": f"a mapping of {', '.join(self.keys or ())} to strings",
            "kwargs": "a mapping of keyword arguments",
            "epoch_or_int": "'epoch' or an int >= 1",
        }[self.kind]
        return f"{text} (or null)" if self.nullable else text

    def _in_range(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (
            self.high is not None and (value >= self.high if self.high_open else value > self.high)
        )

    def _valid(self, value: Any) -> bool:
        kind = self.kind
        if kind == "int":
            return _is_int(value) and self._in_range(value)
        if kind == "float":
            return _is_number(value) and self._in_range(value)
        if kind == "bool":
            return isinstance(value, bool)
        if kind == "str":
            return isinstance(value, str) and (self.choices is None or value in self.choices)
        if kind == "int_list":
            return (
                isinstance(value, list)
                and len(value) > 0
                and all(_is_int(v) and self._in_range(v) for v in value)
            )
        if kind == "float_list":
            return (
                isinstance(value, list)
                and (self.length is None or len(value) == self.length)
                and all(_is_number(v) and self._in_range(v) for v in value)
            )
        if kind == "str_list":
            return isinstance(value, list) and all(isinstance(v, str) for v in value)
        if kind == "str_map":
            return (
                isinstance(value, Mapping)
                and set(value) <= set(self.keys or ())
                and all(isinstance(v, str) for v in value.values())
            )
        if kind == "kwargs":
            return isinstance(value, Mapping) and all(isinstance(k, str) for k in value)
        if kind == "epoch_or_int":
            return value == "epoch" or (_is_int(value) and value >= 1)
        raise AssertionError(f"unknown field kind {kind!r}")

    def check(self, path: str, value: Any) -> Any:
        """``value`` if it is valid for this field, else a :class:`ConfigError` naming ``path``."""
        if value is None and self.nullable:
            return None
        if not self._valid(value):
            raise ConfigError(f"{path} must be {self.describe()}, got {value!r}")
        if self.kind == "kwargs":
            _check_finite(path, value)
        return copy.deepcopy(value)


def _check_finite(path: str, value: Any) -> None:
    """Free-form values (a norm's keyword arguments) may be anything but NaN or infinite."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path} must be finite, got {value!r}")
    if isinstance(value, Mapping):
        for key, item in value.items():
            _check_finite(f"{path}.{key}", item)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_finite(f"{path}[{i}]", item)


def Int(  # noqa: N802 (a constructor, named like the type it declares)
    default: Any, help: str = "", *, low: int | None = None, high: int | None = None,
    nullable: bool = False,
) -> Field:
    return Field("int", default, help, low=low, high=high, nullable=nullable)


def Float(  # noqa: N802
    default: Any, help: str = "", *, low: float | None = None, high: float | None = None,
    low_open: bool = False, high_open: bool = False, nullable: bool = False,
) -> Field:
    return Field("float", default, help, low=low, high=high, low_open=low_open,
                 high_open=high_open, nullable=nullable)


def Bool(default: Any, help: str = "", *, nullable: bool = False) -> Field:  # noqa: N802
    return Field("bool", default, help, nullable=nullable)


def Str(  # noqa: N802
    default: Any, help: str = "", *, choices: tuple[str, ...] | None = None,
    nullable: bool = False,
) -> Field:
    return Field("str", default, help, choices=choices, nullable=nullable)


def IntList(default: Any, help: str = "", *, low: int | None = None) -> Field:  # noqa: N802
    return Field("int_list", default, help, low=low)


def FloatList(  # noqa: N802
    default: Any, help: str = "", *, length: int, low: float | None = None,
    high: float | None = None, high_open: bool = False,
) -> Field:
    return Field("float_list", default, help, low=low, high=high, high_open=high_open,
                 length=length)


def StrList(default: Any, help: str = "") -> Field:  # noqa: N802
    return Field("str_list", default, help)


def StrMap(default: Any, help: str = "", *, keys: tuple[str, ...]) -> Field:  # noqa: N802
    return Field("str_map", default, help, keys=keys)


def Kwargs(help: str = "") -> Field:  # noqa: N802
    return Field("kwargs", {}, help)


def EpochOrInt(default: Any, help: str = "") -> Field:  # noqa: N802
    return Field("epoch_or_int", default, help)


def Sizes(**defaults: int) -> dict[str, Field]:  # noqa: N802
    """Integer keys that must be >= 1 (widths, depths, head counts), each with its default: the
    model sections declare runs of these."""
    return {name: Int(default, low=1) for name, default in defaults.items()}


def DropoutRate(default: float, help: str = "") -> Field:  # noqa: N802
    """A dropout probability: in [0, 1)."""
    return Float(default, help, low=0.0, high=1.0, high_open=True)


@dataclass(frozen=True)
class TaskSchema:
    """The keys a task adds to the engine's ``data`` and ``model`` sections, and its
    ``generation`` section (decoding settings; empty for tasks that do not decode)."""

    data: Mapping[str, Field] = field(default_factory=dict)
    model: Mapping[str, Field] = field(default_factory=dict)
    generation: Mapping[str, Field] = field(default_factory=dict)
    #: Engine keys (dotted, e.g. ``"data.batch_size"``) this task does not take, each with the
    #: one-line reason and replacement a config that sets it is refused with.
    refused: Mapping[str, str] = field(default_factory=dict)


def check_section(where: str, fields: Mapping[str, Field], values: Any) -> dict[str, Any]:
    """``values`` (a config section) checked against ``fields``, defaults filled in, in the
    declared order."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where} must be a mapping of keys, got {values!r}")
    for key in values:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(
                f"unknown config key {where}.{key}; {hint}known keys in {where}: "
                f"{', '.join(fields) or 'none'}"
            )
    out: dict[str, Any] = {}
    for key, spec in fields.items():
        if key in values:
            out[key] = spec.check(f"{where}.{key}", values[key])
        elif spec.default is not NO_DEFAULT:
            out[key] = copy.deepcopy(spec.default)
    return out
