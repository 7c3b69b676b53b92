"""One small registry class, used once per extension point (methods, layer maps, text sources, model loaders, evaluators)."""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A name no registry entry has; the message lists those that exist (str() without KeyError's quotes)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Maps a name to an object; unknown names raise an error that lists what exists."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._prefixes: dict[str, Callable[[str], T]] = {}  # "file:" -> factory of the object for "file:<rest>"

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> T:
        return self.register(name)(obj)

    def add_prefix(self, prefix: str, factory: Callable[[str], T]) -> None:
        """Names `<prefix><rest>` resolve to `factory(rest)` (e.g. `file:<path>`), made on each `get`."""
        self._prefixes[prefix] = factory

    def get(self, name: str) -> T:
        if name in self._items:
            return self._items[name]
        for prefix, factory in self._prefixes.items():
            if isinstance(name, str) and name.startswith(prefix):
                return factory(name[len(prefix):])
        also = "".join(f", {p}..." for p in self._prefixes)
        raise UnknownNameError(f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self._items)) or '(none)'}{also}")

    def __contains__(self, name: str) -> bool:
        return name in self._items or any(isinstance(name, str) and name.startswith(p) for p in self._prefixes)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)
