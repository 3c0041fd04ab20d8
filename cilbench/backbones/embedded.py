"""The embedded tiny ViT: architecture, shipped weights, and the ``cilbench pretrain`` routine.

It is a timm ``VisionTransformer`` (32 px input, 8 px patches, width 128, 4 blocks, 0.8 M
parameters) pre-trained by the project on the *pretrain* synthetic domain, whose classes never
appear in the synth benchmarks. The weights ship in ``cilbench/assets`` so a fresh CPU machine
needs no download; ``cilbench pretrain`` regenerates them reproducibly.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from timm.models.vision_transformer import VisionTransformer

from cilbench.data.synthetic import render_split
from cilbench.data.transforms import AugmentConfig, random_resized_crop, to_float

TINY_VIT_ARGS = dict(img_size=32, patch_size=8, embed_dim=128, depth=4, num_heads=4, mlp_ratio=4.0,
                     num_classes=0, global_pool="token", class_token=True)
TINY_VIT_MEAN = (0.5, 0.5, 0.5)
TINY_VIT_STD = (0.5, 0.5, 0.5)
EMBEDDED_WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "tiny_vit_synth.safetensors"


def build_tiny_vit() -> VisionTransformer:
    return VisionTransformer(**TINY_VIT_ARGS)


@dataclass(frozen=True)
class PretrainConfig:
    """Supervised pre-training of the tiny ViT on the disjoint ``pretrain`` synthetic domain."""

    n_classes: int = 1000
    per_class: int = 60
    epochs: int = 12
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    label_smoothing: float = 0.1
    seed: int = 0
    threads: int = 0  # 0 = torch default


def pretrain_tiny_vit(cfg: PretrainConfig, out: Path,
                      log: Callable[[str], None] = print) -> dict:
    """Train from scratch with AdamW + warmup/cosine; save safetensors with provenance metadata."""
    from safetensors.torch import save_file

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()
    images, labels = render_split("pretrain", "train", cfg.n_classes, cfg.per_class, seed=cfg.seed)
    val_images, val_labels = render_split("pretrain", "test", cfg.n_classes, 5, seed=cfg.seed)
    labels, val_labels = torch.as_tensor(labels), torch.as_tensor(val_labels)
    log(f"rendered {len(images)} pre-training images in {time.time() - t0:.1f}s")

    model = build_tiny_vit()
    head = torch.nn.Linear(model.embed_dim, cfg.n_classes)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-len(images) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    warm = cfg.warmup_epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + torch.cos(torch.tensor((s - warm) / max(1, total - warm) * torch.pi)).item()))
    aug = AugmentConfig(size=32, scale=(0.35, 1.0))
    mean = torch.tensor(TINY_VIT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(TINY_VIT_STD).view(1, 3, 1, 1)
    crit = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    history = []
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(images), generator=gen)
        seen, loss_sum = 0, 0.0
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            x = (random_resized_crop(to_float(images[idx]), aug, gen) - mean) / std
            loss = crit(head(model(x)), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
        acc = _accuracy(model, head, val_images, val_labels, mean, std)
        history.append({"epoch": epoch + 1, "loss": loss_sum / seen, "val_acc": acc})
        log(f"epoch {epoch + 1}/{cfg.epochs} loss {loss_sum / seen:.3f} val acc {acc:.2f}% "
            f"({time.time() - t0:.0f}s)")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"arch": json.dumps(TINY_VIT_ARGS), "pretrain": json.dumps(asdict(cfg)),
            "history": json.dumps(history)}
    tmp = out.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=meta)
    tmp.replace(out)
    return {"history": history, "seconds": time.time() - t0}


@torch.no_grad()
def _accuracy(model, head, images, labels, mean, std) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), 512):
        x = (to_float(images[i:i + 512]) - mean) / std
        correct += (head(model(x)).argmax(1) == labels[i:i + 512]).sum().item()
    return 100.0 * correct / len(images)
