"""Decoded images on disk: one uint8 (N, 3, S, S) memory-mapped array per (file list, transform).

Decoding and resizing a JPEG costs milliseconds of CPU; reading the decoded pixels back costs
microseconds. A long benchmark evaluates the same test images hundreds of times (OB-1K 301 tasks:
≈ 3.3 M reads of 19,849 images), so the first evaluation decodes each image once into this cache and
every later one reads it.

The cache is keyed by a hash of the file list (relative path, size and mtime of every file) and of
the transform, so a changed file or another transform never reads stale pixels. It is built once per
machine: concurrent runs (a sweep) take a file lock, and the first builds while the others wait and
then read its result. A build writes ``<key>.npy.partial`` and only then renames it (``<key>.pixels.npy``; the source sizes
are ``<key>.sizes.npy``) and writes ``<key>.json``, the index that marks it complete; a build cut short leaves no index, and the next
run builds again.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from cilbench import faults
from cilbench.ioutil import atomic_write_text

CACHE_VERSION = 1   # bump when what a cache holds changes meaning


@dataclass(frozen=True)
class Decoded:
    """An opened cache: pixels (memory-mapped), the source size of every image, and unreadable files."""

    pixels: np.ndarray            # (N, 3, S, S) uint8, read-only memmap
    source_sizes: np.ndarray      # (N, 2) original (height, width); the training crop is drawn in it
    errors: dict[int, str]        # sample key -> why its file could not be read (pixels are zero)
    path: Path
    built_s: float | None         # seconds this process spent building it; None: read an existing one

    @functools.cached_property
    def bad(self) -> np.ndarray:
        """(N,) bool: which keys have an error (one vectorised lookup per batch)."""
        mask = np.zeros(len(self.pixels), dtype=bool)
        mask[list(self.errors)] = True
        return mask

    @property
    def nbytes(self) -> int:
        return int(self.pixels.nbytes)


def cache_key(paths: list[str], root: Path, transform: str) -> str:
    """Hash of the transform and of each file's path below ``root``, size and mtime."""
    h = hashlib.sha256(f"v{CACHE_VERSION}|{transform}|{len(paths)}".encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"\n{os.path.relpath(p, root)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


# A batch of decoded images for keys [start, start + n): (uint8 (n, 3, S, S), (n, 2) source sizes, errors)
Fill = Callable[[], Iterator[tuple[int, np.ndarray, np.ndarray, dict[int, str]]]]


def open_or_build(folder: Path, key: str, n: int, size: int, fill: Fill, describe: str) -> Decoded:
    """Open the cache ``folder/key``; build it first with ``fill`` when absent (under a file lock)."""
    folder.mkdir(parents=True, exist_ok=True)
    index = folder / f"{key}.json"
    if index.exists():
        return _open(folder, key)
    with _locked(folder / f"{key}.lock"):
        if index.exists():     # another process built it while this one waited
            return _open(folder, key)
        started = time.time()
        partial = folder / f"{key}.pixels.npy.partial"
        pixels = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=(n, 3, size, size))
        sizes = np.zeros((n, 2), dtype=np.int32)
        errors: dict[int, str] = {}
        for start, batch, batch_sizes, batch_errors in fill():
            pixels[start:start + len(batch)] = batch
            sizes[start:start + len(batch)] = batch_sizes
            errors.update(batch_errors)
            faults.point("cache")
        pixels.flush()
        del pixels
        np.save(folder / f"{key}.sizes.npy", sizes)
        os.replace(partial, folder / f"{key}.pixels.npy")
        built_s = time.time() - started
        atomic_write_text(index, json.dumps({
            "version": CACHE_VERSION, "describe": describe, "n": n, "size": size,
            "bytes": n * 3 * size * size, "errors": {str(k): v for k, v in errors.items()},
            "built_s": round(built_s, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
    return _open(folder, key, built_s)


def _open(folder: Path, key: str, built_s: float | None = None) -> Decoded:
    meta = json.loads((folder / f"{key}.json").read_text())
    pixels = np.load(folder / f"{key}.pixels.npy", mmap_mode="r")
    sizes = np.load(folder / f"{key}.sizes.npy")
    return Decoded(pixels, sizes, {int(k): v for k, v in meta["errors"].items()}, folder / f"{key}.pixels.npy", built_s)


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
