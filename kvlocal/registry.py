"""Name -> factory registries, for what users pick by name: compaction methods (``am-omp``), query
sources (``repeat``) and head-budget policies (``uniform``).  A factory is a class or a function
that builds the object; ``create`` calls it."""

from __future__ import annotations

from collections.abc import Callable

from .errors import KvlocalError


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._factories: dict[str, Callable] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *aliases: str):
        """Decorator: register a factory under ``name`` (and ``aliases``); classes get ``name``."""
        def deco(factory):
            if name in self._factories or name in self._aliases:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._factories[name] = factory
            if isinstance(factory, type):
                factory.name = name
            for a in aliases:
                self._aliases[a] = name
            return factory

        return deco

    def names(self) -> list[str]:
        return sorted(self._factories)

    def get(self, name: str) -> Callable:
        """The factory registered under ``name`` or an alias; unknown names raise with the list."""
        key = self._aliases.get(name, name)
        if key not in self._factories:
            raise KvlocalError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}")
        return self._factories[key]

    def create(self, name: str, **kwargs):
        return self.get(name)(**kwargs)
