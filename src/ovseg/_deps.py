"""Optional-dependency checks that fail before any download, with the exact pip line."""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from .errors import MissingDependencyError

__all__ = ["require", "is_available"]


def is_available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def require(module: str, extra: str, what: str = "this feature") -> ModuleType:
    """Import ``module`` or raise ImportError naming the extra that provides it."""
    if not is_available(module):
        raise MissingDependencyError(
            f"{what} needs the optional package '{module}', which is not installed. "
            f'Install it with: pip install "ovseg[{extra}]"'
        )
    return importlib.import_module(module)
