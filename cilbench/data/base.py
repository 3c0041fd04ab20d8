"""What every data source provides, and the label-remapped views the evaluator hands to methods.

A batch's images are float tensors in [0, 1] (``Batch.images``); normalisation belongs to the backbone.
A source may hand over uint8 pixels instead (``Batch.pixels``, e.g. from the decoded-image cache):
they are converted where they are used, after ``Batch.to(device)``, so on a GPU the host moves a
quarter of the bytes and the conversion runs on the device. The conversion (``x.float() / 255``) is
torchvision's ``ToTensor``, so both routes give the same numbers.
Each batch carries stable sample keys (index within its split) and the split's name, so methods
with frozen parts can cache features per sample instead of recomputing them every task.
"""
from __future__ import annotations

import abc
import functools
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from cilbench import faults
from cilbench.data.transforms import AugmentConfig, to_float


@dataclass
class Batch:
    pixels: torch.Tensor  # (B, 3, H, W) uint8 in [0, 255] or float in [0, 1]
    labels: torch.Tensor  # (B,) remapped labels (positions in the class order)
    keys: torch.Tensor    # (B,) sample indices within the split
    split: str            # cache namespace, e.g. "synth1k/train"
    augmented: bool = False

    @functools.cached_property
    def images(self) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1], on the pixels' device."""
        return to_float(self.pixels)

    def to(self, device: torch.device | str) -> "Batch":
        """On ``device``; on CUDA the copy is asynchronous (from pinned memory) and channels-last."""
        pixels = self.pixels.to(device, non_blocking=True)
        if pixels.device.type == "cuda":
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        return Batch(pixels, self.labels.to(device, non_blocking=True), self.keys, self.split, self.augmented)


class ImageSplit(abc.ABC):
    """One split (train or test) of a dataset: original class ids per sample + a batch reader."""

    name: str
    targets: np.ndarray  # original class id of every sample
    image_size: int
    augment: AugmentConfig

    def __len__(self) -> int:
        return len(self.targets)

    @abc.abstractmethod
    def read(self, indices: np.ndarray, batch_size: int, augment: bool,
             gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (pixels: uint8 [0, 255] or float [0, 1], keys) for ``indices`` in the given order."""


class SampleView:
    """A re-iterable loader over some samples of a split, with remapped labels."""

    def __init__(self, split: ImageSplit, indices: np.ndarray, label_of: np.ndarray, batch_size: int,
                 shuffle: bool, augment: bool, seed: int, role: str = "train"):
        self.role = role  # "train" | "test": names the crash-injection point (cilbench.faults)
        self.split, self.indices, self.label_of = split, np.asarray(indices), label_of
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.seed = seed
        self._epoch = 0

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    @property
    def n_samples(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[Batch]:
        # Each pass draws from its own generator: (seed, pass number) -> reproducible and resumable.
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self._epoch)
        self._epoch += 1
        order = self.indices
        if self.shuffle:
            order = order[torch.randperm(len(order), generator=gen).numpy()]
        for images, keys in self.split.read(order, self.batch_size, self.augment, gen):
            faults.point(self.role)
            labels = torch.as_tensor(self.label_of[self.split.targets[keys.numpy()]], dtype=torch.long)
            yield Batch(images, labels, keys, self.split.name, self.augment)


class SinglePass:
    """The online protocol's view of a task: one pass, each sample exactly once, then exhausted.

    A method that reads the task again (a second epoch, a prototype pass) gets an error, not
    silently re-used data: such a method needs the offline protocol. ``steps_per_batch`` is the
    protocol's ``run.online_iters``; the shared training loop takes that many steps on each batch.
    """

    def __init__(self, view: SampleView, task_index: int, steps_per_batch: int = 1):
        self.view, self.task_index = view, task_index
        self.steps_per_batch = steps_per_batch  # run.online_iters: gradient steps allowed on each batch
        self.used = False

    def __len__(self) -> int:
        return len(self.view)

    @property
    def n_samples(self) -> int:
        return self.view.n_samples

    def __iter__(self) -> Iterator[Batch]:
        if self.used:
            raise stream_reused(self.task_index)
        self.used = True
        yield from self.view


def stream_reused(task_index: int) -> Exception:
    from cilbench.errors import CilbenchError

    return CilbenchError(f"online protocol: the method read task {task_index + 1}'s stream twice",
                         "run it offline (--set run.online=false), or set its epochs to 1 if it has them")
