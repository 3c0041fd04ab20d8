"""ImageFolder trees (``<root>/<dataset>/train/<class>/*.jpg`` and ``test/``), the PILOT/CaRE layout."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms as T
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from cilbench.data.base import ImageSplit
from cilbench.data.transforms import AugmentConfig
from cilbench.errors import DataError


def train_transform(cfg: AugmentConfig) -> T.Compose:
    return T.Compose([T.RandomResizedCrop(cfg.size, scale=cfg.scale, ratio=cfg.ratio),
                      T.RandomHorizontalFlip(), T.ToTensor()])


def test_transform(size: int) -> T.Compose:
    """PILOT/CaRE test transform: Resize(size*256/224, bicubic) + CenterCrop(size)."""
    return T.Compose([T.Resize(int(round(size * 256 / 224)), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(size), T.ToTensor()])


class _Files(torch.utils.data.Dataset):
    """Decoded images by sample key. An unreadable file yields a blank image and its error text,
    so the decision (fail or skip) is taken in the main process even with DataLoader workers."""

    def __init__(self, paths: list[str], indices: np.ndarray, transform, size: int):
        self.paths, self.indices, self.transform, self.size = paths, indices, transform, size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        key = int(self.indices[i])
        try:
            with Image.open(self.paths[key]) as im:
                image = im.convert("RGB")
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            return torch.zeros(3, self.size, self.size), key, f"{type(e).__name__}: {e}"
        return self.transform(image), key, ""


class FolderSplit(ImageSplit):
    def __init__(self, name: str, folder: Path, classes: list[str], image_size: int, augment: AugmentConfig,
                 bad_images: str = "fail"):
        self.bad_images = bad_images  # "fail": stop naming the file | "skip": drop it and record it
        self.skipped: dict[str, str] = {}  # path -> error, for the run's report
        class_to_idx = {c: i for i, c in enumerate(classes)}
        samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        if not samples:
            raise DataError(f"no images found under {folder}",
                            f"put images in {folder}/<class>/ (extensions {', '.join(IMG_EXTENSIONS[:4])}, ...)")
        self.name, self.image_size, self.augment = name, image_size, augment
        self.paths = [p for p, _ in samples]
        self.targets = np.array([t for _, t in samples])

    def read(self, indices: np.ndarray, batch_size: int, augment: bool, gen: torch.Generator,
             num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        transform = train_transform(self.augment) if augment else test_transform(self.image_size)
        ds = _Files(self.paths, np.asarray(indices), transform, self.image_size)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                             generator=gen, persistent_workers=False)
        for images, keys, errors in loader:
            bad = [i for i, e in enumerate(errors) if e]
            if bad:
                images, keys = self._drop_bad(images, keys, errors, bad)
                if len(keys) == 0:
                    continue
            yield images, keys

    def _drop_bad(self, images, keys, errors, bad):
        for i in bad:
            path = self.paths[int(keys[i])]
            if self.bad_images == "fail":
                raise DataError(f"cannot read image {path}: {errors[i]}",
                                "replace or delete the file, or set run.bad_images = \"skip\" to skip such files")
            self.skipped[path] = errors[i]
        keep = torch.ones(len(keys), dtype=torch.bool)
        keep[bad] = False
        return images[keep], keys[keep]


def list_classes(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir())
