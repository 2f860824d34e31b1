"""Declared parameters: a strategy names its options, their defaults and how to check them, in one place.

A :class:`Param` is what a strategy (an attention function or a dense strategy) accepts as an option. Method
presets only override what differs from these defaults; the Segmenter validates user options against the chosen
method's declared parameters (an option the method does not use is an error, with a did-you-mean suggestion).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Mapping, Sequence, Tuple

from ._registry import suggest
from .errors import InvalidInputError, InvalidTypeError

__all__ = [
    "Param", "check_options", "positive", "non_negative", "unit_interval", "boolean", "non_negative_int",
    "positive_int", "layer_range", "one_of", "int_tuple", "number", "optional", "as_float", "describe_params",
]

Check = Callable[[str, Any], Any]


def _scalar(value: Any) -> Any:
    """numpy scalars/0-d arrays and 0-d torch tensors -> their Python value; anything else unchanged."""
    if isinstance(value, numbers.Real):
        return value
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        return value.item()
    return value


def as_float(name: str, value: Any) -> float:
    """A real number (Python, numpy or 0-d torch scalar; not bool, not NaN) as a float."""
    value = _scalar(value)
    if isinstance(value, bool):
        raise InvalidTypeError(f"{name} must be a number, not a boolean ({value!r})")
    if not isinstance(value, numbers.Real):
        raise InvalidTypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    out = float(value)
    if math.isnan(out):
        raise InvalidInputError(f"{name} must be a number, got NaN")
    return out


def number(name: str, value: Any) -> float:
    """Any finite real number."""
    out = as_float(name, value)
    if math.isinf(out):
        raise InvalidInputError(f"{name} must be finite, got {value!r}")
    return out


def positive(name: str, value: Any) -> float:
    out = number(name, value)
    if not out > 0:
        raise InvalidInputError(f"{name} must be > 0, got {value!r}")
    return out


def non_negative(name: str, value: Any) -> float:
    out = number(name, value)
    if out < 0:
        raise InvalidInputError(f"{name} must be >= 0, got {value!r}")
    return out


def unit_interval(name: str, value: Any) -> float:
    out = number(name, value)
    if not 0.0 <= out <= 1.0:
        raise InvalidInputError(f"{name} must be a number in [0, 1], got {value!r}")
    return out


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidTypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def _int(name: str, value: Any) -> int:
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidTypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def non_negative_int(name: str, value: Any) -> int:
    out = _int(name, value)
    if out < 0:
        raise InvalidInputError(f"{name} must be an int >= 0, got {value!r}")
    return out


def positive_int(name: str, value: Any) -> int:
    out = _int(name, value)
    if out < 1:
        raise InvalidInputError(f"{name} must be an int >= 1, got {value!r}")
    return out


def layer_range(name: str, value: Any) -> Tuple[int, int]:
    """A ``(first, last)`` pair of 1-indexed transformer blocks with first <= last."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise InvalidInputError(f"{name} must be a (first, last) pair of 1-indexed blocks, got {value!r}")
    a, b = (positive_int(name, v) for v in value)
    if a > b:
        raise InvalidInputError(f"{name} must have first <= last, got {value!r}")
    return a, b


def int_tuple(name: str, value: Any) -> Tuple[int, ...]:
    """A non-empty sequence of ints (negative indices allowed, e.g. block indices)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise InvalidTypeError(f"{name} must be a non-empty sequence of ints, got {value!r}")
    return tuple(_int(name, v) for v in value)


def one_of(*choices: Any) -> Check:
    """A checker accepting exactly the given values."""

    def check(name: str, value: Any) -> Any:
        if value not in choices:
            hint = suggest(str(value), [str(c) for c in choices]) if isinstance(value, str) else ""
            raise InvalidInputError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r};{hint}"
                                    .rstrip(";"))
        return value

    return check


def optional(check: Check) -> Check:
    """``None`` or what ``check`` accepts."""

    def wrapped(name: str, value: Any) -> Any:
        return None if value is None else check(name, value)

    return wrapped


def _anything(name: str, value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Param:
    """One declared option: its name, default, one-line description and checker ``check(name, value) -> value``."""

    name: str
    default: Any
    doc: str = ""
    check: Check = _anything

    def validate(self, value: Any) -> Any:
        return self.check(self.name, value)


def check_options(
    owner: str,
    params: Iterable[Param],
    options: Mapping[str, Any],
    *,
    other_names: Iterable[str] = (),
) -> Dict[str, Any]:
    """Validate ``options`` against ``params``; return every declared value (defaults filled in).

    Args:
        owner: what the options belong to, for messages (e.g. ``"method 'naclip'"``).
        params: the declared parameters.
        options: given values; an unknown key raises :class:`InvalidTypeError` with a did-you-mean suggestion.
        other_names: further valid names (e.g. the pipeline's options), offered in suggestions only.
    """
    declared = {p.name: p for p in params}
    out: Dict[str, Any] = {}
    for key, value in options.items():
        if key not in declared:
            names = sorted(set(declared) | set(other_names))
            raise InvalidTypeError(f"{owner} has no option '{key}';{suggest(key, names)} "
                                   f"its options: {', '.join(names)}")
        out[key] = declared[key].validate(value)
    for name, p in declared.items():
        out.setdefault(name, p.default)
    return out


def describe_params(params: Iterable[Param]) -> Dict[str, Tuple[Any, str]]:
    """``{name: (default, doc)}`` for listings."""
    return {p.name: (p.default, p.doc) for p in params}

