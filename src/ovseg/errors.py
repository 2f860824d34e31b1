"""Exceptions with a user-facing meaning."""
from __future__ import annotations

__all__ = ["PathNotFoundError", "WeightsUnavailableError"]


class PathNotFoundError(FileNotFoundError, ValueError):
    """A path given by the user does not exist (catchable as FileNotFoundError or ValueError)."""


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be obtained (no network, offline mode, missing cache)."""
