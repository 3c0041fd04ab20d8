"""Shared test set-up: a method on a tiny synthetic benchmark with the embedded backbone."""
from cilbench.backbones.loader import BackboneConfig, load_backbone
from cilbench.benchmark import get_benchmark
from cilbench.data.sources import load_splits
from cilbench.data.stream import ClassIncrementalData
from cilbench.method import BenchmarkInfo, OnlineProtocol, RunContext, Task


def tiny_data(bench="tiny-3", order_seed=None) -> ClassIncrementalData:
    """The class-incremental data of ``bench`` (tests/conftest.py defines the tiny benchmarks)."""
    spec = get_benchmark(bench)
    train, test = load_splits(spec.dataset, None)
    return ClassIncrementalData(train, test, spec.n_classes, spec.splits, order_seed or spec.order_seed)


def make_method(method_cls, cfg, bench="tiny-3", backbone=None, online=OnlineProtocol()):
    """(method after setup, its tasks) on ``bench``; ``backbone`` a BackboneConfig (default: embedded)."""
    spec = get_benchmark(bench)
    data = tiny_data(bench)
    method = method_cls(cfg, RunContext(seed=0))
    method.setup(load_backbone(backbone or BackboneConfig()),
                 BenchmarkInfo(bench, spec.n_classes, len(spec.splits), tuple(len(s) for s in spec.splits), 32))
    tasks = [Task(i, len(spec.splits), s.start, s.stop, data.training, seed=0, allow_past_data=method.uses_past_data,
                  online=online) for i, s in enumerate(spec.splits)]
    return method, tasks
