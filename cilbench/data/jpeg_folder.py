"""Write a JPEG ImageFolder dataset (the PILOT layout) from the synthetic renderer: real files to
test and measure the ImageFolder path (decoding, caches, `cilbench data`) on any machine.

Images are rendered at ``render`` px, resized to a random height and width in ``sizes`` (as photos
vary) with mild noise, so a decode costs what a photo of that size costs, and saved as JPEG.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cilbench.data.synthetic import render_split


def write_jpeg_folder(folder: Path, n_classes: int, train_per_class: int, test_per_class: int,
                      sizes: tuple[int, int] = (40, 64), render: int = 32, noise: float = 6.0,
                      quality: int = 90, seed: int = 0) -> Path:
    """``folder/{train,test}/c<k>/<i>.jpg``; class folders ``c000``.. sort in label order."""
    rng = np.random.RandomState(seed)
    width = len(str(n_classes - 1))
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        images, labels = render_split("bench", split, n_classes, per_class, size=render, seed=seed)
        pixels = images.permute(0, 2, 3, 1).numpy()
        for i, (image, label) in enumerate(zip(pixels, labels)):
            h, w = rng.randint(sizes[0], sizes[1] + 1, size=2)
            im = np.asarray(Image.fromarray(image).resize((int(w), int(h)), Image.BICUBIC), dtype=np.float32)
            im = np.clip(im + rng.normal(0, noise, im.shape), 0, 255).astype(np.uint8)
            d = folder / split / f"c{label:0{width}d}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(im).save(d / f"{i:06d}.jpg", quality=quality)
    return folder
