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
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from cilbench.backbones.loader import BackboneConfig
from cilbench.errors import ConfigError, suggest

DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")
BAD_IMAGES = ("fail", "skip")


@dataclass(frozen=True)
class RunSettings:
    seed: int = 1993
    order_seed: int | None = None  # class-order seed; unset = the benchmark's (1993, the papers' order)
    device: str = "cpu"
    precision: str = "fp32"
    eval_every: int = 1          # evaluate after every K-th task (the last task always)
    eval_batch_size: int = 256
    num_workers: int = 0         # DataLoader workers for ImageFolder data
    threads: int = 0             # torch CPU threads (0 = torch default)
    data_root: str = ""
    out_root: str = "results"
    bad_images: str = "fail"     # an unreadable image file: "fail" naming it, or "skip" it and list it in the run
    shots: int = 0               # few-shot protocol: N training images per class (0 = all)
    online: bool | None = None   # online protocol; unset = the benchmark's or the method's default
    online_batch_size: int = 0   # online stream batch size (0 = the method's batch size)
    online_iters: int = 1        # online: gradient steps allowed on each streamed batch

    def __post_init__(self):
        check_choice("run.device", self.device, DEVICES)
        check_choice("run.precision", self.precision, PRECISIONS)
        check_choice("run.bad_images", self.bad_images, BAD_IMAGES)
        check_range("run.eval_every", self.eval_every, 1)
        check_range("run.eval_batch_size", self.eval_batch_size, 1)
        check_range("run.num_workers", self.num_workers, 0)
        check_range("run.threads", self.threads, 0)
        check_range("run.shots", self.shots, 0)
        check_range("run.online_batch_size", self.online_batch_size, 0)
        check_range("run.online_iters", self.online_iters, 1)
        if self.order_seed is not None and (isinstance(self.order_seed, bool) or not isinstance(self.order_seed, int)
                                            or self.order_seed < 0):
            raise ConfigError(f"run.order_seed = {self.order_seed!r} is not allowed", "use a non-negative integer")
        if self.online not in (None, True, False):
            raise ConfigError(f"run.online = {self.online!r} is not allowed", "use true or false")


# Settings added after 0.1, with the value that reproduces the behaviour before them: a run folder
# written before a setting existed resumes when the setting has that value (see RunDir.prepare).
ADDED_SETTINGS: dict[str, dict[str, Any]] = {
    "run": {"bad_images": "fail", "shots": 0, "online": False, "online_batch_size": 0, "online_iters": 1,
            "order_seed": 1993},
}


def check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key} = {value!r} is not allowed", f"choose one of {', '.join(map(str, choices))}")


def check_range(key: str, value: float, lo: float | None = None, hi: float | None = None) -> None:
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ConfigError(f"{key} = {value!r} is out of range", f"use a value in {bounds}")


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
    for section in ("data", "output"):
        extra = set(doc.get(section, {})) - {"root"}
        if extra:
            raise ConfigError(f"{candidate}: unknown keys {sorted(extra)} in [{section}]", f"[{section}] takes only root")
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


def build(cls: type, layers: list[tuple[str, dict[str, Any]]]) -> Any:
    """Instantiate dataclass ``cls`` from layered dicts, checking names and types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    values: dict[str, Any] = {}
    for origin, layer in layers:
        for key, value in layer.items():
            if key not in names:
                raise ConfigError(f"unknown key {key!r} in {origin}", suggest(key, names))
            values[key] = _coerce(f"{origin}: {key}", value, hints[key])
    try:
        return cls(**values)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"bad value in {cls.__name__}: {e}", "check the values you set") from e


def _coerce(where: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
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
                                  ("--set backbone.*", cli)])
