"""Batched, per-sample image transforms for in-memory tensors.

torchvision's v2 transforms draw one set of random parameters per call, so applying them to a
batch would crop every image alike. Here crop boxes are drawn per sample and applied in a single
``torchvision.ops.roi_align`` call (bilinear crop-and-resize), which keeps augmentation vectorised.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.ops import roi_align


@dataclass(frozen=True)
class AugmentConfig:
    """RandomResizedCrop(scale, ratio) + horizontal flip, at output size ``size``."""

    size: int
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0,255] -> float [0,1]."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images


def resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """Deterministic test-time resize of a float batch (no-op at the native size)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return torch.nn.functional.interpolate(images, size=(size, size), mode="bicubic",
                                           align_corners=False, antialias=True).clamp_(0, 1)


def random_resized_crop(images: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator,
                        source_sizes: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample RandomResizedCrop + flip of a float batch (B, C, H, W) in [0, 1].

    Boxes that would leave the image are clipped (torchvision instead retries up to ten times);
    the difference is a slightly narrower aspect-ratio range at the largest scales.
    ``source_sizes`` (B, 2): each image's original (height, width) when the batch holds copies resized
    to H x W (the training cache): boxes are drawn in the original's pixels, as torchvision draws them,
    and mapped onto the copy, so area and aspect ratio follow the original image. The random draws
    are made on the CPU generator ``gen``; the crop runs on the images' device.
    """
    b, _, height, width = images.shape
    if source_sizes is None:
        h, w = torch.full((b,), float(height)), torch.full((b,), float(width))
    else:
        h, w = source_sizes[:, 0].float(), source_sizes[:, 1].float()
    area = h * w * (cfg.scale[0] + (cfg.scale[1] - cfg.scale[0]) * torch.rand(b, generator=gen))
    log_r = math.log(cfg.ratio[0]) + (math.log(cfg.ratio[1]) - math.log(cfg.ratio[0])) * torch.rand(b, generator=gen)
    r = log_r.exp()
    cw = torch.minimum((area * r).sqrt(), w)
    ch = torch.minimum((area / r).sqrt(), h)
    x0 = (w - cw) * torch.rand(b, generator=gen)
    y0 = (h - ch) * torch.rand(b, generator=gen)
    sx, sy = width / w, height / h      # 1 unless the batch holds resized copies
    boxes = torch.stack([torch.arange(b, dtype=torch.float32), x0 * sx, y0 * sy, (x0 + cw) * sx, (y0 + ch) * sy], 1)
    out = roi_align(images, boxes.to(images), output_size=cfg.size, spatial_scale=1.0,
                    sampling_ratio=2, aligned=True)
    if cfg.flip:   # draws on the CPU generator, whatever the images' device
        flip = (torch.rand(b, generator=gen) < 0.5).to(out.device)
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return out
