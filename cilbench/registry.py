"""Decorator registries for methods and benchmarks (in the spirit of timm's model registry).

The core never imports ``methods`` directly: the first lookup imports the ``methods`` package (whose
modules register themselves) and any ``cilbench.methods`` entry points, so third-party methods plug
in the same way as the built-in ones.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Callable, Generic, TypeVar

from cilbench.errors import ConfigError, suggest

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    description: str


class Registry(Generic[T]):
    def __init__(self, kind: str, plugin_loader: Callable[[], None]):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        self._plugin_loader = plugin_loader
        self._loaded = False

    def register(self, name: str, obj: T, description: str = "") -> T:
        if name in self._entries and self._entries[name].obj != obj:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = Entry(name, obj, description)
        return obj

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self._loaded = True
            self._plugin_loader()

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def entry(self, name: str) -> Entry[T]:
        self._ensure_loaded()
        if name not in self._entries:
            raise ConfigError(f"unknown {self.kind} {name!r}",
                              f"{suggest(name, list(self._entries))} (see `cilbench list`)")
        return self._entries[name]

    def entries(self) -> list[Entry[T]]:
        self._ensure_loaded()
        return [self._entries[k] for k in sorted(self._entries)]

    def names(self) -> list[str]:
        return [e.name for e in self.entries()]


def _load_methods() -> None:
    importlib.import_module("methods")
    for ep in entry_points(group="cilbench.methods"):
        ep.load()


def _load_benchmarks() -> None:
    from cilbench.benchmark import load_benchmark_files

    load_benchmark_files()


METHODS: Registry[type] = Registry("method", _load_methods)
BENCHMARKS: Registry = Registry("benchmark", _load_benchmarks)


def register_method(name: str) -> Callable[[type], type]:
    """Class decorator: ``@register_method("care")``; the first docstring line is the description."""

    def deco(cls: type) -> type:
        cls.name = name
        doc = (cls.__doc__ or "").strip().splitlines()
        return METHODS.register(name, cls, doc[0] if doc else "")

    return deco


def register_benchmark(name: str, description: str = "") -> Callable:
    """Decorator for a zero-argument factory returning a ``BenchmarkSpec`` (TOML files use the same)."""

    def deco(factory: Callable):
        BENCHMARKS.register(name, factory, description or (factory.__doc__ or "").strip())
        return factory

    return deco
