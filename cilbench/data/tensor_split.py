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

    def read(self, indices: np.ndarray, batch_size: int, augment: bool, gen: torch.Generator,
             num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        for chunk in idx.split(batch_size):
            images = to_float(self.images[chunk])
            if augment:
                images = random_resized_crop(images, self.augment, gen)
            else:
                images = resize_batch(images, self.image_size)
            yield images, chunk
