"""Open a benchmark's dataset: ImageFolder trees, CIFAR-100 via torchvision, or synthetic images.

A missing or malformed dataset is an error naming the path, the expected layout and where the data
is published -- never a silent fallback to synthetic data.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from cilbench.benchmark import DatasetSpec
from cilbench.data.base import ImageSplit
from cilbench.data.folder_split import FolderLoading, FolderSplit, list_classes
from cilbench.data.synthetic import render_split
from cilbench.data.tensor_split import TensorSplit
from cilbench.data.transforms import AugmentConfig
from cilbench.errors import DataError
from cilbench.ioutil import atomic_torch_save

SYNTH_VERSION = 1  # bump when the renderer changes, so stale caches are not reused


def cache_dir(configured: str = "") -> Path:
    """Where rendered and decoded images are cached: run.cache_dir / [data] cache, else
    $CILBENCH_CACHE, else ~/.cache/cilbench."""
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("CILBENCH_CACHE", Path.home() / ".cache" / "cilbench"))


def loader_defaults(device: str, workers: int | None, pin_memory: bool | None,
                    persistent: bool | None, cores: int | None = None) -> tuple[int, bool, bool]:
    """(workers, pin_memory, persistent_workers) for ImageFolder data, each unset one chosen from the
    device and the cores this process may use: on CUDA, decoding must keep a GPU fed, so up to 8
    workers (one core left to the main process) and pinned memory for asynchronous copies; on CPU the
    model needs the cores too, so half of them (at most 4) decode. Workers persist between passes
    (no fork per pass) whenever there are any."""
    cores = cores or len(os.sched_getaffinity(0))
    if workers is None:
        workers = min(8, cores - 1) if device == "cuda" else min(4, cores // 2)
    pin_memory = device == "cuda" if pin_memory is None else pin_memory
    persistent = workers > 0 if persistent is None else persistent
    return max(workers, 0), pin_memory, persistent


def load_splits(spec: DatasetSpec, data_root: Path | None, bad_images: str = "fail",
                loading: FolderLoading = FolderLoading()) -> tuple[ImageSplit, ImageSplit]:
    """``bad_images``: what an unreadable image file does -- "fail" (name it) or "skip" (record it).
    ``loading``: how ImageFolder images are decoded and cached (other sources are in memory)."""
    aug = AugmentConfig(size=spec.image_size, scale=tuple(spec.train_scale))
    loading = dataclasses.replace(loading, cache_dir=loading.cache_dir or cache_dir())
    if spec.source == "synthetic":
        return tuple(_synthetic(spec, split, aug, loading.cache_dir) for split in ("train", "test"))  # type: ignore[return-value]
    if data_root is None:
        raise DataError(f"dataset {spec.display} needs a data root",
                        "set [data] root in cilbench.toml, CILBENCH_DATA, or --data-root")
    folder = Path(data_root).expanduser() / spec.folder
    if spec.source == "cifar100":
        return _cifar100(spec, folder, aug)
    return _image_folder(spec, folder, aug, bad_images, loading)


def _layout_hint(spec: DatasetSpec, folder: Path) -> str:
    return (f"expected {folder}/train/<class>/<image> and {folder}/test/<class>/<image> "
            f"with {spec.n_classes} class folders each; data: {spec.published or 'see the benchmark file'}")


def _image_folder(spec: DatasetSpec, folder: Path, aug: AugmentConfig, bad_images: str,
                  loading: FolderLoading) -> tuple[ImageSplit, ImageSplit]:
    if not folder.is_dir():
        raise DataError(f"dataset {spec.display} not found at {folder}", _layout_hint(spec, folder))
    for part in ("train", "test"):
        if not (folder / part).is_dir():
            raise DataError(f"{folder} has no {part}/ folder (wrong layout)", _layout_hint(spec, folder))
    train_classes, test_classes = list_classes(folder / "train"), list_classes(folder / "test")
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))[:5]
        only_test = sorted(set(test_classes) - set(train_classes))[:5]
        raise DataError(
            f"{folder}: train/ has {len(train_classes)} classes, test/ has {len(test_classes)} "
            f"(only in train: {only_train}, only in test: {only_test})",
            "train/ and test/ must hold the same class folders")
    if len(train_classes) != spec.n_classes:
        raise DataError(f"{folder} has {len(train_classes)} classes; {spec.display} has {spec.n_classes}",
                        _layout_hint(spec, folder))
    return tuple(FolderSplit(f"{spec.key}/{part}", folder / part, train_classes, spec.image_size, aug, bad_images,
                             loading) for part in ("train", "test"))  # type: ignore[return-value]


def _cifar100(spec: DatasetSpec, folder: Path, aug: AugmentConfig) -> tuple[ImageSplit, ImageSplit]:
    from torchvision.datasets import CIFAR100

    splits = []
    for train in (True, False):
        try:
            ds = CIFAR100(str(folder), train=train, download=False)
        except RuntimeError as e:
            raise DataError(f"CIFAR-100 not found at {folder} ({e})",
                            f"place the python version (cifar-100-python/) in {folder}; data: {spec.published}") from e
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        name = f"{spec.key}/{'train' if train else 'test'}"
        splits.append(TensorSplit(name, images, ds.targets, spec.image_size, aug))
    return splits[0], splits[1]


def _synthetic(spec: DatasetSpec, split: str, aug: AugmentConfig, cache: Path) -> ImageSplit:
    per_class = spec.train_per_class if split == "train" else spec.test_per_class
    path = cache / "synthetic" / (
        f"v{SYNTH_VERSION}_{spec.domain}_{split}_{spec.n_classes}x{per_class}_{spec.image_size}px.pt")
    if path.exists():
        images, targets = torch.load(path, weights_only=True)
    else:
        images, labels = render_split(spec.domain, split, spec.n_classes, per_class, size=spec.image_size)
        targets = torch.as_tensor(labels)
        try:
            atomic_torch_save((images, targets), path)
        except OSError:
            pass  # a read-only cache only costs re-rendering
    return TensorSplit(f"{spec.key}/{split}", images, targets.numpy(), spec.image_size, aug)
