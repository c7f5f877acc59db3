"""Name -> class registries: methods are small classes, picked by name (``am-omp``, ``repeat``...)."""

from __future__ import annotations

from .errors import KvlocalError


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._classes: dict[str, type] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *aliases: str):
        def deco(cls):
            if name in self._classes or name in self._aliases:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._classes[name] = cls
            cls.name = name
            for a in aliases:
                self._aliases[a] = name
            return cls

        return deco

    def names(self) -> list[str]:
        return sorted(self._classes)

    def get(self, name: str) -> type:
        key = self._aliases.get(name, name)
        if key not in self._classes:
            raise KvlocalError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}")
        return self._classes[key]

    def create(self, name: str, **kwargs):
        return self.get(name)(**kwargs)
