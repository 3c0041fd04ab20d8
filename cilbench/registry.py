"""Decorator registries for methods and benchmarks (in the spirit of timm's model registry).

The core never imports a method: the first lookup loads the ``cilbench.methods`` entry points, the
built-in ones (the ``builtin`` entry point: the ``cilbench.methods`` package, whose modules register
themselves) and third-party ones alike. In a checkout that is not installed (``PYTHONPATH=.``) there
is no entry-point metadata, so the built-in package is imported directly.
"""
from __future__ import annotations

import importlib
import threading
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
        self._lock = threading.Lock()   # a second thread must not see a half-loaded registry

    def register(self, name: str, obj: T, description: str = "") -> T:
        if name in self._entries and self._entries[name].obj != obj:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = Entry(name, obj, description)
        return obj

    def _ensure_loaded(self) -> None:
        with self._lock:
            if not self._loaded:
                self._plugin_loader()
                self._loaded = True

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
    found = entry_points(group="cilbench.methods")
    if "builtin" not in found.names:
        importlib.import_module("cilbench.methods")
    for ep in found:
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
