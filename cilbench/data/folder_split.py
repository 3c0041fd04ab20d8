"""ImageFolder trees (``<root>/<dataset>/train/<class>/*.jpg`` and ``test/``), the PILOT/CaRE layout.

Three ways to read an image, all to uint8 pixels:
- *test*: PILOT/CaRE's ``Resize(size*256/224, bicubic) + CenterCrop(size)``. With ``decode_cache``
  the whole split is decoded once into a memory-mapped cache (``decoded_cache``) and read from it:
  the same pixels, so the same numbers.
- *train*: ``RandomResizedCrop(size, scale, ratio) + RandomHorizontalFlip`` on the decoded image,
  torchvision's own code, with its random draws seeded per sample from the pass's generator: the
  crops depend on (seed, pass, position), not on the worker count or on a resume.
- *train from cache* (``train_cache = S``): every training image is cached squeezed to S x S (with
  its original size), and the crop is drawn in the original's pixels and cut from the S x S copy by
  one batched ``roi_align`` (``transforms.random_resized_crop``). Deviation, hence opt-in: crops are
  resampled from an S x S copy (bilinear) instead of from the full-resolution file.

Decoding runs in DataLoader workers that persist between passes (``FolderLoading``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms as T
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from cilbench.data import decoded_cache
from cilbench.data.base import ImageSplit
from cilbench.data.transforms import AugmentConfig, random_resized_crop, to_float
from cilbench.errors import DataError

TEST, TRAIN, SQUEEZE = 0, 1, 2   # how an item is decoded (see the module docstring)


@dataclass(frozen=True)
class FolderLoading:
    """How an ImageFolder split is read: run.num_workers, pin_memory, persistent_workers,
    decode_cache, train_cache and cache_dir, resolved (see ``sources.loader_defaults``)."""

    workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False
    decode_cache: bool = False
    train_cache: int = 0
    cache_dir: Path | None = None      # decoded caches go to cache_dir/decoded/ (load_splits sets it)
    device: str = "cpu"                # where training-cache crops are cut
    log: Callable[[str], None] | None = None   # where cache builds and sizes are reported


def test_transform(size: int) -> T.Compose:
    """PILOT/CaRE test transform: Resize(size*256/224, bicubic) + CenterCrop(size)."""
    return T.Compose([T.Resize(int(round(size * 256 / 224)), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(size)])


def train_transform(cfg: AugmentConfig) -> T.Compose:
    return T.Compose([T.RandomResizedCrop(cfg.size, scale=cfg.scale, ratio=cfg.ratio), T.RandomHorizontalFlip()])


def _as_pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


class _Decoder(torch.utils.data.Dataset):
    """Item (key, mode, seed) -> (uint8 pixels, key, (height, width) of the file, error text). An
    unreadable file gives zeros and its error, so the main process decides (fail or skip)."""

    def __init__(self, paths: list[str], size: int, augment: AugmentConfig, squeeze: int):
        self.paths, self.size, self.squeeze = paths, size, squeeze
        self.transforms = {TEST: test_transform(size), TRAIN: train_transform(augment),
                           SQUEEZE: T.Resize((squeeze, squeeze), interpolation=T.InterpolationMode.BICUBIC)}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int, int]):
        key, mode, seed = item
        out = self.squeeze if mode == SQUEEZE else self.size
        try:
            with Image.open(self.paths[key]) as im:
                image = im.convert("RGB")
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            return torch.zeros(3, out, out, dtype=torch.uint8), key, torch.zeros(2, dtype=torch.int32), \
                f"{type(e).__name__}: {e}"
        hw = torch.tensor([image.height, image.width], dtype=torch.int32)
        if mode == TRAIN:   # torchvision's draws, from a per-sample seed instead of the global RNG
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return _as_pixels(self.transforms[TRAIN](image)), key, hw, ""
        return _as_pixels(self.transforms[mode](image)), key, hw, ""


class _Plan:
    """The batch sampler of the persistent loader: yields the batches of the read in progress."""

    def __init__(self):
        self.batches: list[list[tuple[int, int, int]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class FolderSplit(ImageSplit):
    def __init__(self, name: str, folder: Path, classes: list[str], image_size: int, augment: AugmentConfig,
                 bad_images: str = "fail", loading: FolderLoading = FolderLoading()):
        self.bad_images = bad_images  # "fail": stop naming the file | "skip": drop it and record it
        self.skipped: dict[str, str] = {}  # path -> error, for the run's report
        samples = image_files(folder, classes)
        if not samples:
            raise DataError(f"no images found under {folder}",
                            f"put images in {folder}/<class>/ (extensions {', '.join(IMG_EXTENSIONS[:4])}, ...)")
        self.name, self.folder, self.image_size, self.augment = name, folder, image_size, augment
        self.loading = loading
        self.paths = [p for p, _ in samples]
        self.targets = np.array([t for _, t in samples])
        self._decoder = _Decoder(self.paths, image_size, augment, loading.train_cache)
        self._cached: dict[int, decoded_cache.Decoded] = {}   # mode -> opened cache
        self._plan, self._loader, self._busy = _Plan(), None, False

    def read(self, indices: np.ndarray, batch_size: int, augment: bool,
             gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = np.asarray(indices)
        if augment and self.loading.train_cache:
            yield from self._read_cache(SQUEEZE, indices, batch_size, gen)
        elif not augment and self.loading.decode_cache:
            yield from self._read_cache(TEST, indices, batch_size, None)
        else:
            seeds = torch.randint(0, 2 ** 62, (len(indices),), generator=gen).tolist() if augment else [0] * len(indices)
            mode = TRAIN if augment else TEST
            items = [(int(k), mode, s) for k, s in zip(indices, seeds)]
            for pixels, keys, _, errors in self._decode([items[i:i + batch_size] for i in range(0, len(items), batch_size)]):
                yield from self._without_bad(pixels, keys, errors)

    def _read_cache(self, mode: int, indices: np.ndarray, batch_size: int, gen: torch.Generator | None):
        cache = self._cache(mode)
        for start in range(0, len(indices), batch_size):
            keys = indices[start:start + batch_size]
            pixels = torch.from_numpy(cache.pixels[keys])
            if self.loading.pin_memory:
                pixels = pixels.pin_memory()
            if mode == SQUEEZE:   # cut on the run's device: on a GPU the crop costs next to nothing
                pixels = pixels.to(self.loading.device, non_blocking=True)
                pixels = random_resized_crop(to_float(pixels), self.augment, gen,
                                             torch.from_numpy(cache.source_sizes[keys]))
            errors = [cache.errors.get(int(k), "") for k in keys] if cache.bad[keys].any() else ()
            yield from self._without_bad(pixels, torch.from_numpy(keys), errors)

    def _cache(self, mode: int) -> decoded_cache.Decoded:
        if mode not in self._cached:
            size = self.loading.train_cache if mode == SQUEEZE else self.image_size
            transform = repr(self._decoder.transforms[mode])   # the key follows the very transform
            what = "train cache" if mode == SQUEEZE else "test transform"
            key = decoded_cache.cache_key(self.paths, self.folder, transform)
            n = len(self.paths)

            def fill():
                items = [(k, mode, 0) for k in range(n)]
                start = 0
                for pixels, keys, hw, errors in self._decode([items[i:i + 256] for i in range(0, n, 256)]):
                    yield start, pixels.numpy(), hw.numpy(), {int(k): e for k, e in zip(keys, errors) if e}
                    start += len(keys)

            cache = decoded_cache.open_or_build(self.loading.cache_dir / "decoded", key, n, size, fill,
                                                f"{self.folder}: {transform}")
            self._cached[mode] = cache
            if self.loading.log:
                how = (f"built in {cache.built_s:.1f} s" if cache.built_s is not None else "reused")
                self.loading.log(f"decoded-image cache for {self.name} ({what}): {n:,} images, "
                                 f"{cache.nbytes / 2 ** 20:,.1f} MiB, {how}: {cache.path}")
        return self._cached[mode]

    def _decode(self, batches: list[list[tuple[int, int, int]]]):
        """Decode ``batches`` of items in the workers. The persistent loader serves one read at a
        time; a read started while another is unfinished gets a loader of its own."""
        if self.loading.workers == 0 or self._busy:
            loader = self._new_loader(batches, persistent=False)
            yield from loader
            return
        if self._loader is None:
            self._loader = self._new_loader(self._plan, persistent=self.loading.persistent_workers)
        self._busy = True
        try:
            self._plan.batches = batches
            yield from self._loader
        finally:
            self._busy = False
            if not self.loading.persistent_workers:
                self._loader = None

    def _new_loader(self, batch_sampler, persistent: bool) -> torch.utils.data.DataLoader:
        """A loader with a generator of its own: iterating one draws a seed, and from torch's global
        generator that draw would shift every later global draw (a head's initialisation) by whether
        a cache was built in this process. Crops are seeded per sample, so its value is unused."""
        workers = self.loading.workers
        return torch.utils.data.DataLoader(self._decoder, batch_sampler=batch_sampler, num_workers=workers,
                                           pin_memory=self.loading.pin_memory, generator=torch.Generator(),
                                           persistent_workers=persistent and workers > 0)

    def _without_bad(self, pixels: torch.Tensor, keys: torch.Tensor, errors) -> Iterator:
        bad = [i for i, e in enumerate(errors) if e]
        if bad:
            for i in bad:
                path = self.paths[int(keys[i])]
                if self.bad_images == "fail":
                    raise DataError(f"cannot read image {path}: {errors[i]}",
                                    "replace or delete the file, or set run.bad_images = \"skip\" to skip such files")
                self.skipped[path] = errors[i]
            keep = torch.ones(len(keys), dtype=torch.bool)
            keep[bad] = False
            pixels, keys = pixels[keep], keys[keep]
        if len(keys):
            yield pixels, keys


def list_classes(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def image_files(folder: Path, classes: list[str]) -> list[tuple[str, int]]:
    """(path, class index) of every image a run reads under ``folder/<class>/`` (torchvision's
    ImageFolder listing: image extensions, sub-folders walked, sorted)."""
    class_to_idx = {c: i for i, c in enumerate(classes)}
    return make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
