"""Class order and B{init}Inc{inc} task splits.

Labels are remapped to positions in the class order, so task t owns the contiguous label range
[known_t, known_t + |G_t|) -- the convention of PILOT and CaRE (``DataManager``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def class_order(n_classes: int, seed: int = 1993, shuffle: bool = True) -> np.ndarray:
    """The papers' order: ``numpy.random.seed(seed); numpy.random.permutation(n_classes)``."""
    if not shuffle:
        return np.arange(n_classes)
    np.random.seed(seed)
    return np.random.permutation(n_classes)


def task_sizes(n_classes: int, init: int, increment: int) -> list[int]:
    """[init, inc, inc, ..., remainder]; init = 0 means the first task has ``increment`` classes."""
    if increment <= 0 or init < 0 or init > n_classes:
        raise ValueError(f"bad split B{init}Inc{increment} for {n_classes} classes")
    sizes = [init] if init > 0 else []
    rest = n_classes - init
    sizes += [increment] * (rest // increment)
    if rest % increment:
        sizes.append(rest % increment)
    return sizes


@dataclass(frozen=True)
class TaskSplit:
    """One task's remapped label range."""

    index: int
    start: int
    stop: int

    @property
    def classes(self) -> range:
        return range(self.start, self.stop)

    def __len__(self) -> int:
        return self.stop - self.start


def make_splits(n_classes: int, init: int, increment: int) -> list[TaskSplit]:
    splits, start = [], 0
    for i, size in enumerate(task_sizes(n_classes, init, increment)):
        splits.append(TaskSplit(i, start, start + size))
        start += size
    return splits


def label_map(order: np.ndarray) -> np.ndarray:
    """original class id -> remapped label (its position in ``order``)."""
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return inverse
