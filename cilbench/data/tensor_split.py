"""In-memory uint8 image tensors (synthetic data, CIFAR-100): batched reads and augmentation."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from cilbench.data.base import ImageSplit
from cilbench.data.transforms import AugmentConfig, random_resized_crop, resize_batch, to_float


class TensorSplit(ImageSplit):
    def __init__(self, name: str, images: torch.Tensor, targets: np.ndarray, image_size: int,
                 augment: AugmentConfig):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("TensorSplit wants uint8 images of shape (N, 3, H, W)")
        self.name, self.images, self.targets = name, images, np.asarray(targets)
        self.image_size, self.augment = image_size, augment

    def read(self, indices: np.ndarray, batch_size: int, augment: bool,
             gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        native = self.images.shape[-1] == self.image_size and self.images.shape[-2] == self.image_size
        for chunk in idx.split(batch_size):
            pixels = self.images[chunk]
            if augment:
                yield random_resized_crop(to_float(pixels), self.augment, gen), chunk
            else:   # at the native size the uint8 pixels go as they are (converted where used)
                yield (pixels if native else resize_batch(to_float(pixels), self.image_size)), chunk
