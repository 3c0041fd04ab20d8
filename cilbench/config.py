"""Configuration: cilbench.toml + benchmark file + method defaults + CLI overrides -> frozen dataclasses.

Precedence for a method's hyper-parameters (later wins):
  method dataclass defaults < benchmark file ``[benchmark.X.methods.M]`` (the papers' settings)
  < cilbench.toml ``[methods.M]`` (the user's preferences) < ``--set method.key=value``.
Run settings: RunSettings defaults < cilbench.toml ``[run]``/``[data]``/``[output]`` < CLI flags/--set.
Every key is checked: unknown keys and wrong types are errors that list the valid choices.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from cilbench.backbones.loader import BackboneConfig
from cilbench.errors import ConfigError, suggest

def bounded(default: Any, lo: float | None = None, hi: float | str | None = None) -> Any:
    """A dataclass field whose value ``build`` checks against [lo, hi] (``hi`` may name another field,
    e.g. ``top_k <= pool_size``). None values (a preset not yet applied) are not checked."""
    return dataclasses.field(default=default, metadata={"bounds": (lo, hi)})


@dataclass(frozen=True)
class RunSettings:
    seed: int = 1993
    order_seed: int | None = bounded(None, 0)  # class-order seed; unset = the benchmark's (1993, the papers')
    device: Literal["cpu", "cuda"] = "cpu"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    eval_every: int = bounded(1, 1)          # evaluate after every K-th task (the last task always)
    eval_batch_size: int = bounded(256, 1)
    # how ImageFolder files are read (in-memory sources, synthetic and CIFAR, have nothing to decode)
    num_workers: int | None = bounded(None, 0)  # ImageFolder decode workers; unset = from device and cores
    pin_memory: bool | None = None           # pinned host batches; unset = on for CUDA
    persistent_workers: bool | None = None   # keep decode workers between passes; unset = on with workers
    decode_cache: bool = True                # ImageFolder test images decoded once into a uint8 memmap
    train_cache: int = bounded(0, 0)         # >0: training images cached at SxS, crop+flip on tensors
    cache_dir: str = ""                      # decoded caches; "" = $CILBENCH_CACHE or ~/.cache/cilbench
    threads: int = bounded(0, 0)             # torch CPU threads (0 = torch default)
    data_root: str = ""
    out_root: str = "runs"      # the user's runs; results/ holds the reference runs shipped with the repo
    bad_images: Literal["fail", "skip"] = "fail"   # an unreadable image: "fail" naming it, or "skip" and list it
    shots: int = bounded(0, 0)               # few-shot protocol: N training images per class (0 = all)
    online: bool | None = None   # online protocol; unset = the benchmark's or the method's default
    online_batch_size: int = bounded(0, 0)   # online stream batch size (0 = the method's batch size)
    online_iters: int = bounded(1, 1)        # online: gradient steps allowed on each streamed batch
    deterministic: bool = False   # torch.use_deterministic_algorithms (+ cuBLAS workspace): bitwise repeatable on CUDA


# Settings added after 0.1, with the value that reproduces the behaviour before them: a run folder
# written before a setting existed resumes when the setting has that value (see RunDir.prepare).
ADDED_SETTINGS: dict[str, dict[str, Any]] = {
    "run": {"bad_images": "fail", "shots": 0, "online": False, "online_batch_size": 0, "online_iters": 1,
            "order_seed": 1993, "train_cache": 0, "deterministic": False},
    "backbone": {"normalize": "dataset"},
}


# run settings that cannot change a number: where files live, and how images are loaded (the decoded
# cache holds the very pixels a decode gives; training crops are seeded per sample, not per worker)
NOT_RESULT_SETTINGS = ("out_root", "data_root", "num_workers", "pin_memory", "persistent_workers",
                       "decode_cache", "cache_dir")


def check_bounds(cfg: Any, section: str) -> None:
    """Every ``bounded`` field of dataclass ``cfg`` within its bounds (one line of cause and remedy)."""
    for f in fields(cfg):
        if "bounds" not in f.metadata:
            continue
        value = getattr(cfg, f.name)
        if value is None:
            continue
        lo, hi = f.metadata["bounds"]
        hi = getattr(cfg, hi) if isinstance(hi, str) else hi
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise ConfigError(f"{section}.{f.name} = {value!r} is out of range", f"use a value in {bounds}")


def load_user_config(path: str | Path | None = None) -> dict[str, Any]:
    """cilbench.toml from ``path``, $CILBENCH_CONFIG, or the current folder (absent file = {})."""
    candidate = Path(path or os.environ.get("CILBENCH_CONFIG", "cilbench.toml"))
    if not candidate.exists():
        if path:
            raise ConfigError(f"config file {candidate} does not exist", "pass an existing --config file")
        return {}
    try:
        doc = tomllib.loads(candidate.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{candidate} is not valid TOML: {e}", "fix the syntax (see cilbench.toml in the repo)") from e
    unknown = set(doc) - {"run", "data", "output", "backbone", "methods"}
    if unknown:
        raise ConfigError(f"{candidate}: unknown sections {sorted(unknown)}",
                          "allowed: [run], [data], [output], [backbone], [methods.<name>]")
    for section, keys in (("data", {"root", "cache"}), ("output", {"root"})):
        extra = set(doc.get(section, {})) - keys
        if extra:
            raise ConfigError(f"{candidate}: unknown keys {sorted(extra)} in [{section}]",
                              f"[{section}] takes {', '.join(sorted(keys))}")
    return doc


def parse_set(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["method.lr=0.1", "run.seed=3"]`` -> {"method": {"lr": 0.1}, "run": {"seed": 3}}."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r} is not section.key=value",
                              "e.g. --set method.lr=0.01 --set run.eval_every=5 --set backbone.weights=none")
        key, raw = item.split("=", 1)
        section, name = key.split(".", 1)
        if section not in ("method", "run", "backbone", "data"):
            raise ConfigError(f"--set {item!r}: unknown section {section!r}",
                              "sections: method, run, backbone, data")
        out.setdefault(section, {})[name] = _parse_value(raw)
    return out


def _parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # bare strings need no quotes on the command line


def build(cls: type, layers: list[tuple[str, dict[str, Any]]], section: str = "method") -> Any:
    """Instantiate dataclass ``cls`` from layered dicts, checking names, types (``Literal`` choices
    included) and the ``bounded`` fields' ranges; ``section`` prefixes the keys in messages."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    values: dict[str, Any] = {}
    for origin, layer in layers:
        for key, value in layer.items():
            if key not in names:
                raise ConfigError(f"unknown key {key!r} in {origin}", suggest(key, names))
            values[key] = _coerce(f"{origin}: {key}", value, hints[key])
    try:
        cfg = cls(**values)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"bad value in {cls.__name__}: {e}", "check the values you set") from e
    check_bounds(cfg, section)
    return cfg


def _coerce(where: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:   # X | None
        inner = [a for a in args if a is not type(None)]
        return None if value is None else _coerce(where, value, inner[0] if len(inner) == 1 else Any)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            args = typing.get_args(hint)
            inner = args[0] if args else Any
            return tuple(_coerce(where, v, inner) for v in value) if inner is not Any else tuple(value)
    elif origin is typing.Literal:
        if value in typing.get_args(hint):
            return value
        raise ConfigError(f"{where} = {value!r} is not allowed", f"choose one of {typing.get_args(hint)}")
    else:
        return value
    raise ConfigError(f"{where} = {value!r} has the wrong type",
                      f"expected {getattr(hint, '__name__', hint)}")


def as_dict(cfg: Any) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def build_backbone_config(default_name: str, user: dict, cli: dict) -> BackboneConfig:
    return build(BackboneConfig, [("benchmark", {"name": default_name}), ("cilbench.toml [backbone]", user),
                                  ("--set backbone.*", cli)], "backbone")
