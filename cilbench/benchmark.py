"""Benchmark specs, loaded from ``benchmarks/*.toml`` into the benchmark registry.

A file holds ``[dataset.<key>]`` tables (where the data lives and how it looks) and
``[benchmark.<name>]`` tables (dataset + split + class-order seed + backbone + optional per-method
hyper-parameters taken from the papers' configs, under ``[benchmark.<name>.methods.<method>]``).
A top-level ``[methods.<method>]`` table applies to every benchmark of the file, below each
benchmark's own (e.g. the CPU-sized schedules and block choices of the embedded ViT in synth.toml).
Extra benchmark folders can be added with ``CILBENCH_BENCHMARKS`` (os.pathsep-separated).
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cilbench.errors import ConfigError
from cilbench.protocol import TaskSplit, make_splits, with_recurring
from cilbench.registry import BENCHMARKS

SOURCES = ("imagefolder", "cifar100", "synthetic")
REPO_BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@dataclass(frozen=True)
class DatasetSpec:
    key: str
    display: str
    source: str
    n_classes: int
    image_size: int
    folder: str = ""                 # under the data root (imagefolder / cifar100)
    published: str = ""              # where to get it
    normalize: bool = True           # False: inputs stay in [0,1] (CaRE's ImageNet-R / OB-1K transforms)
    train_scale: tuple[float, float] = (0.05, 1.0)
    train_per_class: int = 0         # synthetic only
    test_per_class: int = 0          # synthetic only
    domain: str = "bench"            # synthetic only
    train_images: int = 0            # published split size (cilbench data check); 0 = none recorded
    test_images: int = 0
    counts_source: str = ""          # where train_images / test_images come from
    archive: str = ""                # the file users download (cilbench data prepare)
    archive_md5: str = ""            # its published md5, or the published prefix of it


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    description: str
    dataset: DatasetSpec
    init: int
    increment: int
    order_seed: int = 1993
    test_shuffle_seed: int = 1993  # the order test images are scored in (ClassIncrementalData.test_view)
    backbone: str = "embedded-tiny"
    method_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    online: bool = False          # every method streams each training sample once (run.online overrides)
    overlap: float = 0.0          # recurring classes per later task, as a fraction of its new classes
    class_order: str = "seeded"   # "seeded": permutation by order_seed (PILOT's shuffle) | "natural": folder order

    @property
    def n_classes(self) -> int:
        return self.dataset.n_classes

    @property
    def splits(self) -> list[TaskSplit]:
        return with_recurring(make_splits(self.n_classes, self.init, self.increment), self.overlap, self.order_seed)

    def overrides_for(self, method: str) -> dict[str, Any]:
        return dict(self.method_overrides.get(method, {}))


def benchmark_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("CILBENCH_BENCHMARKS", "").split(os.pathsep) if p]
    return extra + [REPO_BENCHMARKS]


_DATASET_KEYS = set(DatasetSpec.__dataclass_fields__) - {"key"}
_DATASET_REQUIRED = {"display", "source", "n_classes", "image_size"}
_BENCH_KEYS = {"description", "dataset", "init", "increment", "order_seed", "test_shuffle_seed", "backbone",
               "methods", "online", "overlap", "class_order"}
CLASS_ORDERS = ("seeded", "natural")


def parse_benchmark_file(path: Path) -> list[BenchmarkSpec]:
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"benchmark file {path} is not valid TOML: {e}", "fix the file") from e
    datasets = {}
    for key, raw in doc.get("dataset", {}).items():
        unknown = set(raw) - _DATASET_KEYS
        if unknown:
            raise ConfigError(f"{path}: dataset {key!r} has unknown keys {sorted(unknown)}",
                              f"allowed: {sorted(_DATASET_KEYS)}")
        missing = _DATASET_REQUIRED - set(raw)
        if missing:
            raise ConfigError(f"{path}: dataset {key!r} lacks {sorted(missing)}",
                              f"every [dataset.X] needs {sorted(_DATASET_REQUIRED)}")
        if raw.get("source") not in SOURCES:
            raise ConfigError(f"{path}: dataset {key!r} source must be one of {SOURCES}", "fix the file")
        if "train_scale" in raw:
            raw = {**raw, "train_scale": tuple(raw["train_scale"])}
        datasets[key] = DatasetSpec(key=key, **raw)
    unknown_tables = set(doc) - {"dataset", "benchmark", "methods"}
    if unknown_tables:
        raise ConfigError(f"{path}: unknown tables {sorted(unknown_tables)}",
                          "a benchmark file holds [dataset.X], [benchmark.X] and [methods.M] tables")
    file_methods = {k: dict(v) for k, v in doc.get("methods", {}).items()}
    specs = []
    for name, raw in doc.get("benchmark", {}).items():
        unknown = set(raw) - _BENCH_KEYS
        if unknown:
            raise ConfigError(f"{path}: benchmark {name!r} has unknown keys {sorted(unknown)}",
                              f"allowed: {sorted(_BENCH_KEYS)}")
        ds = raw.get("dataset")
        if "increment" not in raw:
            raise ConfigError(f"{path}: benchmark {name!r} has no increment", "add increment = <classes per task>")
        if raw.get("class_order", "seeded") not in CLASS_ORDERS:
            raise ConfigError(f"{path}: benchmark {name!r} has class_order = {raw['class_order']!r}",
                              f"choose one of {CLASS_ORDERS}")
        if ds not in datasets:
            raise ConfigError(f"{path}: benchmark {name!r} names unknown dataset {ds!r}",
                              f"define [dataset.{ds}] in the same file")
        specs.append(BenchmarkSpec(
            name=name, description=raw.get("description", ""), dataset=datasets[ds],
            init=int(raw.get("init", 0)), increment=int(raw["increment"]),
            order_seed=int(raw.get("order_seed", 1993)),
            test_shuffle_seed=int(raw.get("test_shuffle_seed", 1993)),
            backbone=raw.get("backbone", "embedded-tiny"),
            method_overrides={m: {**file_methods.get(m, {}), **raw.get("methods", {}).get(m, {})}
                              for m in {*file_methods, *raw.get("methods", {})}},
            online=bool(raw.get("online", False)), overlap=_fraction(path, name, raw.get("overlap", 0.0)),
            class_order=raw.get("class_order", "seeded")))
    return specs


def _fraction(path: Path, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigError(f"{path}: benchmark {name!r} has overlap = {value!r}",
                          "use a fraction in [0, 1] (recurring classes per task / new classes per task)")
    return float(value)


def load_benchmark_files() -> None:
    for folder in benchmark_dirs():
        for path in sorted(folder.glob("*.toml")):
            for spec in parse_benchmark_file(path):
                desc = spec.description or (
                    f"{spec.dataset.display}, {spec.n_classes} classes, B{spec.init}Inc{spec.increment}, "
                    f"{len(spec.splits)} tasks")
                BENCHMARKS.register(spec.name, _Fixed(spec), desc)


@dataclass(frozen=True)
class _Fixed:
    """A benchmark factory returning a parsed spec; equal specs may be registered again (reloads)."""

    spec: BenchmarkSpec

    def __call__(self) -> BenchmarkSpec:
        return self.spec


def get_benchmark(name: str) -> BenchmarkSpec:
    return BENCHMARKS.get(name)()
