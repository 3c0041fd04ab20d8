"""Procedural synthetic images: the embedded default dataset (no downloads).

A class is a combination of four compositional factors -- shape (12), hue (12), texture (8) and
layout (4) -- so 4,608 combinations exist. A fixed permutation splits them into two disjoint
*domains*: ``bench`` (the first 2,048 combinations; what the synth benchmarks use) and ``pretrain``
(the rest; what ``cilbench pretrain`` trains the embedded ViT on). The domains also differ in style:
bench images have cluttered, textured backgrounds, distractor blobs, stronger noise and larger pose
jitter, so pre-trained features transfer only partially and adaptation pays off.

Rendering is vectorised over a chunk of images (soft masks from polar radius functions), and every
image is a deterministic function of (domain, split, class id, index): the same class renders the
same pixels whatever the dataset size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

N_SHAPES, N_HUES, N_TEXTURES, N_LAYOUTS = 12, 12, 8, 4
N_COMBOS = N_SHAPES * N_HUES * N_TEXTURES * N_LAYOUTS
BENCH_COMBOS = 2048
_FACTOR_SEED = 20260101
_CLASS_CHUNK = 64  # classes rendered together; fixes the RNG stream per chunk
SHAPE_NAMES = ("circle", "triangle", "square", "pentagon", "hexagon", "flower", "plus", "ring",
               "ellipse", "crescent", "gear", "bar")
TEXTURE_NAMES = ("solid", "h-stripes", "v-stripes", "diag", "anti-diag", "checker", "dots", "rings")
LAYOUT_NAMES = ("single", "pair-h", "pair-v", "triple")


@dataclass(frozen=True)
class SynthStyle:
    """Per-domain nuisance strength."""

    clutter: float      # amplitude of low-frequency background texture
    distractors: int    # max number of distractor blobs
    noise: float        # std of per-pixel Gaussian noise
    rotation_deg: float
    shift: float        # max translation in [-1, 1] image units
    scale: tuple[float, float]


STYLES = {
    "bench": SynthStyle(clutter=0.35, distractors=2, noise=0.05, rotation_deg=30.0, shift=0.22,
                        scale=(0.5, 0.85)),
    "pretrain": SynthStyle(clutter=0.08, distractors=0, noise=0.02, rotation_deg=15.0, shift=0.12,
                           scale=(0.65, 0.85)),
}


def class_factors(domain: str, n_classes: int) -> np.ndarray:
    """(n_classes, 4) factor table [shape, hue, texture, layout] of a domain's first classes."""
    combos = np.random.RandomState(_FACTOR_SEED).permutation(N_COMBOS)
    pool = combos[:BENCH_COMBOS] if domain == "bench" else combos[BENCH_COMBOS:]
    if domain not in STYLES:
        raise ValueError(f"unknown synthetic domain {domain!r}; choose from {sorted(STYLES)}")
    if not 1 <= n_classes <= len(pool):
        raise ValueError(f"synthetic domain {domain!r} has {len(pool)} classes; asked for {n_classes}")
    ids = pool[:n_classes]
    shape, rest = np.divmod(ids, N_HUES * N_TEXTURES * N_LAYOUTS)
    hue, rest = np.divmod(rest, N_TEXTURES * N_LAYOUTS)
    texture, layout = np.divmod(rest, N_LAYOUTS)
    return np.stack([shape, hue, texture, layout], axis=1)


def pool_size(domain: str) -> int:
    return BENCH_COMBOS if domain == "bench" else N_COMBOS - BENCH_COMBOS


def render_split(domain: str, split: str, n_classes: int, per_class: int, size: int = 32,
                 seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Images (n_classes*per_class, 3, size, size) uint8 and labels, class-major order."""
    style = STYLES[domain]
    split_code = {"train": 1, "test": 2}[split]
    padded = min(-(-n_classes // _CLASS_CHUNK) * _CLASS_CHUNK, pool_size(domain))
    factors = torch.as_tensor(class_factors(domain, padded))
    images = torch.empty(n_classes * per_class, 3, size, size, dtype=torch.uint8)
    for start in range(0, n_classes, _CLASS_CHUNK):
        gen = torch.Generator().manual_seed(_chunk_seed(seed, domain, split_code, start // _CLASS_CHUNK))
        # Render the whole chunk so a class's pixels do not depend on n_classes.
        chunk = factors[start:start + _CLASS_CHUNK]
        pix = _render(chunk.repeat_interleave(per_class, dim=0), style, size, gen)
        stop = min(start + _CLASS_CHUNK, n_classes)
        images[start * per_class: stop * per_class] = pix[: (stop - start) * per_class]
    labels = np.repeat(np.arange(n_classes), per_class)
    return images, labels


def _chunk_seed(seed: int, domain: str, split_code: int, chunk: int) -> int:
    domain_code = 1 if domain == "bench" else 2
    return int(np.random.SeedSequence([seed, domain_code, split_code, chunk]).generate_state(1)[0])


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Vectorised HSV->RGB; inputs (...,) in [0,1]; output (..., 3)."""
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=-1)
    return v[..., None] - v[..., None] * s[..., None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def _shape_radius(shape: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """Boundary radius r(phi) of the star-shaped shapes (ring/crescent handled separately)."""
    c, s = phi.cos().abs(), phi.sin().abs()
    def polygon(n: int) -> torch.Tensor:
        sector = 2 * math.pi / n
        a = torch.remainder(phi + math.pi / 2, sector) - sector / 2
        return math.cos(math.pi / n) / a.cos()
    radii = torch.stack([
        torch.ones_like(phi),                                        # circle
        0.85 * polygon(3) * 1.15,                                    # triangle
        0.8 * polygon(4) / math.cos(math.pi / 4) * 0.78,             # square
        0.9 * polygon(5),                                            # pentagon
        0.9 * polygon(6),                                            # hexagon
        0.72 + 0.28 * torch.cos(5 * phi),                            # flower
        torch.minimum(1 / torch.maximum(c, s).clamp_min(1e-6),
                      0.38 / torch.minimum(c, s).clamp_min(1e-6)),   # plus
        torch.ones_like(phi),                                        # ring (outer)
        1 / torch.sqrt(phi.cos() ** 2 + (phi.sin() / 0.5) ** 2),     # ellipse
        torch.ones_like(phi),                                        # crescent (outer)
        0.8 + 0.2 * torch.sign(torch.cos(8 * phi)),                  # gear
        torch.minimum(1 / c.clamp_min(1e-6), 0.4 / s.clamp_min(1e-6)),  # bar
    ], dim=0)
    return radii.gather(0, shape[None].expand_as(phi[None]))[0]


def _render(factors: torch.Tensor, style: SynthStyle, size: int, gen: torch.Generator) -> torch.Tensor:
    """Render one image per row of ``factors`` (B, 4) -> uint8 (B, 3, size, size)."""
    b = factors.shape[0]
    shape, hue, texture, layout = factors.unbind(1)
    u = lambda *shp: torch.rand(*shp, generator=gen)  # noqa: E731
    lin = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    gy, gx = torch.meshgrid(lin, lin, indexing="ij")
    gx, gy = gx.expand(b, size, size), gy.expand(b, size, size)

    # Background: base colour + gradient + low-frequency clutter + distractor blobs.
    bg_rgb = _hsv_to_rgb(u(b), 0.35 * u(b), 0.25 + 0.55 * u(b))
    grad = (u(b, 2) - 0.5) * 0.3
    background = bg_rgb[:, :, None, None] + (grad[:, 0, None, None] * gx + grad[:, 1, None, None] * gy)[:, None]
    low = torch.nn.functional.interpolate(u(b, 3, 4, 4) - 0.5, size=(size, size), mode="bicubic",
                                          align_corners=False)
    background = background + style.clutter * low
    for _ in range(style.distractors):
        present = (u(b) < 0.7).float()
        cx, cy, rad = u(b) * 2 - 1, u(b) * 2 - 1, 0.08 + 0.12 * u(b)
        blob = torch.sigmoid((rad[:, None, None] - ((gx - cx[:, None, None]) ** 2 + (gy - cy[:, None, None]) ** 2).sqrt()) * 40)
        colour = _hsv_to_rgb(u(b), 0.3 + 0.5 * u(b), 0.3 + 0.6 * u(b))
        a = (blob * present[:, None, None])[:, None]
        background = background * (1 - a) + colour[:, :, None, None] * a

    # Object pose (shared by all copies in the layout) and colours.
    scale = style.scale[0] + (style.scale[1] - style.scale[0]) * u(b)
    theta = (u(b) * 2 - 1) * math.radians(style.rotation_deg)
    shift = (u(b, 2) * 2 - 1) * style.shift
    h = (hue.float() / N_HUES + (u(b) - 0.5) * 0.03) % 1.0
    fg = _hsv_to_rgb(h, 0.75 + 0.2 * u(b), 0.8 + 0.2 * u(b))
    fg2 = fg * 0.3

    offsets = torch.tensor([  # layout -> up to 3 object centres, object size factor
        [[0.0, 0.0], [9, 9], [9, 9]],
        [[-0.45, 0.0], [0.45, 0.0], [9, 9]],
        [[0.0, -0.45], [0.0, 0.45], [9, 9]],
        [[-0.45, 0.35], [0.45, 0.35], [0.0, -0.4]],
    ])
    obj_size = torch.tensor([0.75, 0.42, 0.42, 0.36])[layout] * scale
    mask = torch.zeros(b, size, size)
    pattern = torch.zeros(b, size, size)
    cos_t, sin_t = theta.cos()[:, None, None], theta.sin()[:, None, None]
    for k in range(3):
        off = offsets[layout, k]
        active = (off[:, 0] < 5).float()[:, None, None]
        cx = (off[:, 0] * scale + shift[:, 0])[:, None, None]
        cy = (off[:, 1] * scale + shift[:, 1])[:, None, None]
        dx, dy = (gx - cx) / obj_size[:, None, None], (gy - cy) / obj_size[:, None, None]
        lx, ly = cos_t * dx + sin_t * dy, -sin_t * dx + cos_t * dy
        rho, phi = (lx ** 2 + ly ** 2).sqrt(), torch.atan2(ly, lx)
        sharp = 6.0 / (obj_size[:, None, None] * 2 / size * 8)
        m = torch.sigmoid((_shape_radius(shape[:, None, None].expand_as(phi), phi) - rho) * sharp)
        ring = torch.sigmoid((rho - 0.55) * sharp)
        cres = torch.sigmoid((((lx - 0.45) ** 2 + ly ** 2).sqrt() - 0.8) * sharp)
        m = torch.where((shape == 7)[:, None, None], m * ring, m)
        m = torch.where((shape == 9)[:, None, None], m * cres, m)
        m = m * active
        pat = torch.stack([
            torch.zeros_like(lx),
            (torch.sin(2 * math.pi * 2.0 * ly) > 0).float(),
            (torch.sin(2 * math.pi * 2.0 * lx) > 0).float(),
            (torch.sin(2 * math.pi * 1.6 * (lx + ly)) > 0).float(),
            (torch.sin(2 * math.pi * 1.6 * (lx - ly)) > 0).float(),
            ((torch.sin(math.pi * 2.5 * lx) * torch.sin(math.pi * 2.5 * ly)) > 0).float(),
            ((torch.cos(math.pi * 3 * lx) * torch.cos(math.pi * 3 * ly)) > 0.35).float(),
            (torch.sin(2 * math.pi * 2.2 * rho) > 0).float(),
        ], 0).gather(0, texture[None, :, None, None].expand(1, b, size, size))[0]
        take = m > mask
        pattern = torch.where(take, pat, pattern)
        mask = torch.maximum(mask, m)

    fg_img = fg[:, :, None, None] * (1 - pattern[:, None]) + fg2[:, :, None, None] * pattern[:, None]
    img = background * (1 - mask[:, None]) + fg_img * mask[:, None]
    img = img + style.noise * torch.randn(img.shape, generator=gen)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)
