import numpy as np
import pytest

from cilbench.benchmark import get_benchmark
from cilbench.protocol import class_order, label_map, make_splits, task_sizes

# name -> (classes, first task size, later task size, number of tasks) from the design spec table
EXPECTED = {
    "ob1k-100": (1000, 10, 10, 100), "ob1k-151": (1000, 100, 6, 151), "ob1k-200": (1000, 5, 5, 200),
    "ob1k-301": (1000, 100, 3, 301), "inr-5": (200, 40, 40, 5), "inr-10": (200, 20, 20, 10),
    "inr-20": (200, 10, 10, 20), "inr-50": (200, 4, 4, 50), "cifar-10": (100, 10, 10, 10),
    "cifar-20": (100, 5, 5, 20), "ina-10": (200, 20, 20, 10), "obj-10": (200, 20, 20, 10),
    "ob-10": (300, 30, 30, 10), "vtab-5": (50, 10, 10, 5), "cub-10": (200, 20, 20, 10),
    "synth-10": (100, 10, 10, 10), "synth-100": (1000, 10, 10, 100), "synth-151": (1000, 100, 6, 151),
    "synth-200": (1000, 5, 5, 200), "synth-301": (1000, 100, 3, 301),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_benchmark_splits(name):
    n, first, inc, n_tasks = EXPECTED[name]
    spec = get_benchmark(name)
    splits = spec.splits
    assert spec.n_classes == n
    assert len(splits) == n_tasks
    assert len(splits[0]) == first
    assert all(len(s) == inc for s in splits[1:])
    assert splits[0].start == 0 and splits[-1].stop == n
    assert all(a.stop == b.start for a, b in zip(splits, splits[1:]))
    assert spec.order_seed == 1993


def test_ob1k_301_is_one_base_task_and_300_of_three():
    sizes = [len(s) for s in get_benchmark("ob1k-301").splits]
    assert sizes == [100] + [3] * 300


def test_class_order_is_the_papers_permutation_and_reproducible():
    np.random.seed(1993)
    expected = np.random.permutation(1000)
    assert np.array_equal(class_order(1000, 1993), expected)
    assert np.array_equal(class_order(1000, 1993), class_order(1000, 1993))
    assert not np.array_equal(class_order(1000, 1993), class_order(1000, 1994))


def test_ragged_last_task():
    assert task_sizes(10, 0, 3) == [3, 3, 3, 1]
    assert task_sizes(10, 4, 4) == [4, 4, 2]
    assert [len(s) for s in make_splits(12, 0, 5)] == [5, 5, 2]
    assert [len(s) for s in get_benchmark("tiny-ragged").splits] == [5, 5, 2]


def test_label_map_inverts_the_order():
    order = class_order(50, 1993)
    lm = label_map(order)
    assert np.array_equal(lm[order], np.arange(50))


@pytest.mark.parametrize("init,inc", [(0, 0), (-1, 3), (20, 3)])
def test_bad_splits_are_rejected(init, inc):
    with pytest.raises(ValueError):
        task_sizes(10, init, inc)
