"""Small checks of user-given values shared by the Python API and the command line."""
from __future__ import annotations

import math
import numbers
from typing import Any

from .errors import InvalidInputError, InvalidTypeError

__all__ = ["as_probability"]


def as_probability(value: Any, name: str) -> float:
    """A number in [0, 1] as a Python float.

    Accepts Python, numpy and torch scalars (0-d arrays and tensors included); refuses booleans, NaN and values
    outside [0, 1] with an error naming ``name`` and the value.
    """
    x = value
    if hasattr(x, "ndim") and getattr(x, "ndim", None) == 0 and hasattr(x, "item"):  # numpy/torch 0-d
        dtype = str(getattr(x, "dtype", ""))
        if "bool" in dtype:
            raise InvalidTypeError(f"{name} must be a number in [0, 1], got the boolean {value!r}")
        x = x.item()
    if isinstance(x, bool) or type(x).__name__ == "bool_" or not isinstance(x, numbers.Real):
        raise InvalidTypeError(f"{name} must be a number in [0, 1], got {type(value).__name__} {value!r}")
    x = float(x)
    if math.isnan(x) or not 0.0 <= x <= 1.0:
        raise InvalidInputError(f"{name} must be a number in [0, 1], got {value!r}")
    return x
