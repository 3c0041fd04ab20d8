"""Shared test set-up: a method on a tiny synthetic benchmark with the embedded backbone."""
from cilbench.backbones.loader import BackboneConfig, load_backbone
from cilbench.benchmark import get_benchmark
from cilbench.data.sources import load_splits
from cilbench.data.stream import ClassIncrementalData
from cilbench.method import BenchmarkInfo, RunContext, Task


def make_method(method_cls, cfg, bench="tiny-3"):
    """(method after setup, its tasks) on ``bench`` (tests/conftest.py defines the tiny benchmarks)."""
    spec = get_benchmark(bench)
    train, test = load_splits(spec.dataset, None)
    data = ClassIncrementalData(train, test, spec.n_classes, spec.splits, spec.order_seed)
    method = method_cls(cfg, RunContext(seed=0))
    method.setup(load_backbone(BackboneConfig()), BenchmarkInfo(bench, spec.n_classes, len(spec.splits),
                                                                tuple(len(s) for s in spec.splits), 32))
    tasks = [Task(i, len(spec.splits), s.start, s.stop, data, seed=0) for i, s in enumerate(spec.splits)]
    return method, tasks
