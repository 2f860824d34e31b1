"""Exceptions with a user-facing meaning.

Every error that a user can fix (a bad option, a missing file, unavailable weights, a missing optional package)
is an :class:`OvsegError`. Each class also derives from the built-in exception a Python user would expect
(``ValueError``, ``TypeError``, ``FileNotFoundError``, ``RuntimeError``, ``ImportError``), so existing
``except ValueError`` code keeps working. The command line prints an ``OvsegError`` as one line and exits with
code 2; any other exception is a bug in ovseg or below it and keeps its traceback.
"""
from __future__ import annotations

__all__ = [
    "OvsegError", "InvalidInputError", "InvalidTypeError", "PathNotFoundError", "WeightsUnavailableError",
    "MissingDependencyError",
]


class OvsegError(Exception):
    """Base class of the errors a user can fix; the message says what was wrong and what is allowed."""


class InvalidInputError(OvsegError, ValueError):
    """A value given by the user is not allowed (the message names it and the allowed values)."""


class InvalidTypeError(OvsegError, TypeError):
    """A value given by the user has the wrong type (the message names it and the accepted types)."""


class PathNotFoundError(OvsegError, FileNotFoundError, ValueError):
    """A path given by the user does not exist (catchable as FileNotFoundError or ValueError)."""


class WeightsUnavailableError(OvsegError, RuntimeError):
    """Pretrained weights could not be obtained (no network, offline mode, missing cache)."""


class MissingDependencyError(OvsegError, ImportError):
    """An optional package is not installed; the message gives the ``pip install`` line."""
