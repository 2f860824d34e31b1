"""Name -> builder registries with did-you-mean errors (methods, attentions, VFMs)."""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from ._deps import require
from .errors import InvalidInputError, InvalidTypeError

__all__ = ["Registry", "Entry", "suggest"]


def suggest(name: str, choices: Iterable[str]) -> str:
    """Return ``" did you mean 'x'?"`` for the closest choice, or an empty string."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(str(name).lower(), list(lowered), n=1, cutoff=0.5)
    return f" did you mean '{lowered[close[0]]}'?" if close else ""


@dataclass(frozen=True)
class Entry:
    """One registered item: a builder (or object), its defaults and its one-line description."""

    name: str
    obj: Any
    doc: str = ""
    requires: Tuple[Tuple[str, str], ...] = ()
    defaults: Dict[str, Any] = field(default_factory=dict)


class Registry:
    """A small registry. ``kind`` names the things it holds, for error messages."""

    def __init__(self, kind: str, lister: str):
        self.kind = kind
        self.lister = lister
        self._entries: Dict[str, Entry] = {}

    def register(
        self,
        name: str,
        obj: Any = None,
        *,
        doc: str = "",
        requires: Sequence[Tuple[str, str]] = (),
        overwrite: bool = False,
        **defaults: Any,
    ) -> Any:
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted."""
        if not isinstance(name, str) or not name:
            raise InvalidTypeError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def _add(o: Any) -> Any:
            if name in self._entries and not overwrite:
                raise InvalidInputError(
                    f"{self.kind} '{name}' is already registered; pass overwrite=True to replace it"
                )
            self._entries[name] = Entry(name, o, doc, tuple(requires), dict(defaults))
            return o

        return _add if obj is None else _add(obj)

    def get(self, name: str) -> Entry:
        if not isinstance(name, str):
            raise InvalidTypeError(f"{self.kind} name must be a string, got {type(name).__name__} {name!r}")
        if name not in self._entries:
            raise InvalidInputError(
                f"unknown {self.kind} '{name}';{suggest(name, self._entries)} "
                f"known: {', '.join(sorted(self._entries))} (see ovseg.{self.lister}())"
            )
        return self._entries[name]

    def create(self, name: str, **overrides: Any) -> Any:
        """Check the entry's optional dependencies, then call its builder with defaults + overrides."""
        entry = self.get(name)
        for module, extra in entry.requires:
            require(module, extra, what=f"{self.kind} '{name}'")
        kwargs = dict(entry.defaults)
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        return entry.obj(**kwargs)

    def names(self, pattern: str = "*") -> List[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self.names())

    def describe(self) -> Dict[str, str]:
        return {n: self._entries[n].doc for n in self.names()}

    def unregister(self, name: str) -> Optional[Entry]:
        return self._entries.pop(name, None)
