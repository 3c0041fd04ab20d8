"""Class order and B{init}Inc{inc} task splits.

Labels are remapped to positions in the class order, so task t introduces the contiguous label
range [known_t, known_t + |G_t|) -- the convention of PILOT and CaRE (``DataManager``). Overlapping
protocols add *recurring* classes to later tasks: labels introduced earlier that come back with
fresh training images (``with_recurring``); the label space stays the union of the introduced ranges.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

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
    """One task's remapped label range (the classes it introduces) and the earlier labels it revisits."""

    index: int
    start: int
    stop: int
    recurring: tuple[int, ...] = ()

    @property
    def classes(self) -> range:
        """The classes this task introduces."""
        return range(self.start, self.stop)

    @property
    def labels(self) -> list[int]:
        """Every label with training data in this task: recurring ones first, then the new range."""
        return [*self.recurring, *self.classes]

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


def with_recurring(splits: list[TaskSplit], fraction: float, seed: int) -> list[TaskSplit]:
    """Overlap: task t >= 1 also revisits round(fraction * |G_t|) classes drawn uniformly (seeded)
    from the labels introduced before it. ``fraction = 0`` returns the splits unchanged."""
    if fraction <= 0:
        return splits
    rng = np.random.RandomState(seed)
    out = [splits[0]]
    for s in splits[1:]:
        k = min(s.start, int(round(fraction * len(s))))
        out.append(replace(s, recurring=tuple(sorted(rng.choice(s.start, k, replace=False).tolist()))))
    return out


def sample_owners(labels: np.ndarray, splits: list[TaskSplit], seed: int) -> np.ndarray:
    """The task that trains on each sample (-1: none). A class seen in k tasks has its samples split
    into k disjoint, nearly equal random shares, one per appearance, so every sample still arrives
    once; without recurring classes each sample belongs to the task that introduces its label."""
    first = np.full(max((s.stop for s in splits), default=0) + 1, -1)
    for s in splits:
        first[s.start:s.stop] = s.index
    owners = first[np.clip(labels, 0, len(first) - 1)]
    owners[(labels < 0) | (labels >= len(first) - 1)] = -1
    visits: dict[int, list[int]] = {}
    for s in splits:
        for c in s.recurring:
            visits.setdefault(c, [int(first[c])]).append(s.index)
    rng = np.random.RandomState(seed)
    for c in sorted(visits):
        members = rng.permutation(np.flatnonzero(labels == c))
        for share, t in zip(np.array_split(members, len(visits[c])), visits[c]):
            owners[share] = t
    return owners
