"""The class-incremental stream: class order, per-task train views, seen-class test views."""
from __future__ import annotations

import numpy as np

from cilbench.data.base import ImageSplit, SampleView
from cilbench.protocol import TaskSplit, class_order, label_map, sample_owners


class TrainingData:
    """The training side of a class-incremental stream: what a method's ``Task`` can reach. It holds
    no reference to the test split, so a method cannot read test images through it."""

    def __init__(self, train: ImageSplit, splits: list[TaskSplit], label_of: np.ndarray, index: "_LabelIndex",
                 owner_sorted: np.ndarray):
        self.train, self.splits, self.label_of = train, splits, label_of
        self._train_index, self._owner_sorted = index, owner_sorted

    @property
    def overlapping(self) -> bool:
        return any(s.recurring for s in self.splits)

    def task_view(self, task: int, batch_size: int, shuffle: bool, augment: bool, seed: int) -> SampleView:
        """Task ``task``'s training samples: its new classes' and its share of any recurring class's."""
        if not self.overlapping:
            s = self.splits[task]
            return self.train_view(s.start, s.stop, batch_size, shuffle, augment, seed)
        index = self._train_index.sorted[self._owner_sorted == task]
        return SampleView(self.train, index, self.label_of, batch_size, shuffle, augment, seed)

    def seen_view(self, task: int, batch_size: int, shuffle: bool, augment: bool, seed: int) -> SampleView:
        """Every training sample of tasks 0..``task`` (the reference upper bounds' data)."""
        if not self.overlapping:
            return self.train_view(0, self.splits[task].stop, batch_size, shuffle, augment, seed)
        owners = self._owner_sorted
        index = self._train_index.sorted[(owners >= 0) & (owners <= task)]
        return SampleView(self.train, index, self.label_of, batch_size, shuffle, augment, seed)

    def train_view(self, start: int, stop: int, batch_size: int, shuffle: bool, augment: bool,
                   seed: int) -> SampleView:
        return SampleView(self.train, self._train_index.between(start, stop), self.label_of, batch_size,
                          shuffle, augment, seed)


class ClassIncrementalData:
    def __init__(self, train: ImageSplit, test: ImageSplit, n_classes: int, splits: list[TaskSplit],
                 order_seed: int, shots: int = 0, test_shuffle_seed: int = 1993, natural_order: bool = False):
        """``shots`` > 0: the few-shot protocol, N training images per class (the same N for every
        method: a fixed draw seeded by ``order_seed``). ``test_shuffle_seed`` fixes the order in which
        the test images are scored (see ``test_view``)."""
        self.train, self.test, self.splits = train, test, splits
        self.test_shuffle_seed = test_shuffle_seed
        self.order = class_order(n_classes, order_seed, shuffle=not natural_order)
        self.label_of = label_map(self.order)
        train_labels = self.label_of[train.targets]
        keep = few_shot(train_labels, shots, order_seed) if shots else None
        train_index = _LabelIndex(train_labels, n_classes, keep)
        self._test_index = _LabelIndex(self.label_of[test.targets], n_classes)
        kept = train_labels.copy()
        if keep is not None:
            dropped = np.ones(len(kept), dtype=bool)
            dropped[keep] = False
            kept[dropped] = -1
        # the task that trains on each sample, in label-sorted order (so a task's view is label-sorted)
        owner_sorted = sample_owners(kept, splits, order_seed)[train_index.sorted]
        self.training = TrainingData(train, splits, self.label_of, train_index, owner_sorted)

    def test_view(self, n_seen: int, batch_size: int) -> SampleView:
        """The test images of labels 0..n_seen-1 in a seeded shuffled order (the same for every method
        and every run of the benchmark), so a test batch mixes the seen tasks: a method whose
        prediction depended on its batch-mates could not infer the task from them (PILOT's class-sorted
        test loader lets L2P/DualPrompt's batch vote do exactly that)."""
        index = self._test_index.between(0, n_seen)
        index = index[np.random.RandomState(self.test_shuffle_seed).permutation(len(index))]
        return SampleView(self.test, index, self.label_of, batch_size,
                          shuffle=False, augment=False, seed=0, role="test")


def few_shot(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Indices of ``shots`` samples per class (all of a class that has fewer), drawn at random."""
    perm = np.random.RandomState(seed).permutation(len(labels))
    by_class = perm[np.argsort(labels[perm], kind="stable")]
    sorted_labels = labels[by_class]
    first = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.arange(len(labels)) - first
    return np.sort(by_class[rank < shots])


class _LabelIndex:
    """Sample indices sorted by remapped label, so any label range is one slice."""

    def __init__(self, labels: np.ndarray, n_classes: int, keep: np.ndarray | None = None):
        if keep is not None:  # a subset (few-shot): index only those samples
            masked = np.full(len(labels), n_classes)
            masked[keep] = labels[keep]
            labels = masked
        self.sorted = np.argsort(labels, kind="stable")
        self.bounds = np.searchsorted(labels[self.sorted], np.arange(n_classes + 1))

    def between(self, start: int, stop: int) -> np.ndarray:
        return self.sorted[self.bounds[start]:self.bounds[stop]]
