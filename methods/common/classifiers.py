"""Classifier heads that grow with the classes seen so far."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CosinePrototypes(nn.Module):
    """Cosine similarity to class prototypes (SimpleCIL / APER): logits_c = cos(f, p_c)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("protos", torch.zeros(0, dim))
        self.register_buffer("counts", torch.zeros(0, dtype=torch.long))   # images behind each prototype

    @property
    def n_classes(self) -> int:
        return self.protos.shape[0]

    def add_samples(self, classes: list[int], sums: torch.Tensor, counts: torch.Tensor) -> None:
        """Fold feature sums of ``classes`` into their running means (appending classes as needed), so
        a class that recurs in a later task averages all its images, as if seen at once."""
        stop = max(classes) + 1
        if stop > self.n_classes:
            grown = torch.zeros(stop, self.protos.shape[1], device=self.protos.device, dtype=self.protos.dtype)
            grown[: self.n_classes] = self.protos
            self.protos = grown
            self.counts = torch.cat([self.counts, self.counts.new_zeros(stop - len(self.counts))])
        idx = torch.as_tensor(classes, device=self.protos.device)
        old_n = self.counts[idx].to(sums)
        total = (old_n + counts.to(sums)).clamp_min(1)
        self.protos[idx] = ((self.protos[idx].to(sums) * old_n[:, None] + sums) / total[:, None]).to(self.protos)
        self.counts[idx] += counts.to(self.counts)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(feats, dim=1) @ F.normalize(self.protos, dim=1).T


class GrowingLinear(nn.Module):
    """A linear head whose output grows per task; old rows are kept (and stay trainable). New rows
    start as ``nn.Linear``'s (``init = "linear"``) or as timm's ViT head, trunc-normal(std 0.02) with
    zero bias (``"trunc_normal"``: PILOT's L2P/DualPrompt heads)."""

    def __init__(self, dim: int, init: str = "linear"):
        super().__init__()
        if init not in ("linear", "trunc_normal"):
            raise ValueError(f"unknown head init {init!r}")
        self.dim, self.init = dim, init
        self.weight = nn.Parameter(torch.zeros(0, dim))
        self.bias = nn.Parameter(torch.zeros(0))

    @property
    def n_classes(self) -> int:
        return self.weight.shape[0]

    def grow(self, n_total: int) -> None:
        if n_total <= self.n_classes:
            return
        new = nn.Linear(self.dim, n_total - self.n_classes).to(self.weight.device)
        if self.init == "trunc_normal":
            nn.init.trunc_normal_(new.weight, std=0.02)
            nn.init.zeros_(new.bias)
        self.weight = nn.Parameter(torch.cat([self.weight.data, new.weight.data]))
        self.bias = nn.Parameter(torch.cat([self.bias.data, new.bias.data]))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return F.linear(feats, self.weight, self.bias)


@torch.no_grad()
def class_sums(feats: torch.Tensor, labels: torch.Tensor, classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 feature sums, image counts) per class of ``classes`` via one scatter-add (no per-class
    loop)."""
    local = torch.full((max(classes) + 1,), -1, dtype=torch.long, device=labels.device)
    local[torch.as_tensor(classes, device=labels.device)] = torch.arange(len(classes), device=labels.device)
    y = local[labels]
    sums = torch.zeros(len(classes), feats.shape[1], dtype=torch.float64, device=feats.device)
    sums.index_add_(0, y, feats.double())
    return sums, torch.bincount(y, minlength=len(classes))


class SigmaCosine(nn.Module):
    """σ·cos(f, w_c) with a learnable σ (init 1) and uniform(±1/√d) weights: PILOT's ``CosineLinear``,
    the head APER trains its first-task adaptation with (it is discarded afterwards)."""

    def __init__(self, dim: int, n_classes: int):
        super().__init__()
        bound = 1.0 / dim ** 0.5
        self.weight = nn.Parameter(torch.empty(n_classes, dim).uniform_(-bound, bound))
        self.sigma = nn.Parameter(torch.ones(()))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.sigma * (F.normalize(feats, dim=1) @ F.normalize(self.weight, dim=1).T)


@torch.no_grad()
def add_task_prototypes(head: CosinePrototypes, task, features, batch_size: int, device: torch.device) -> None:
    """Fold ``features(batch)`` of the task's un-augmented training images into the class-mean
    prototypes of SimpleCIL and APER (new classes and any recurring ones)."""
    feats, labels = [], []
    for batch in task.train_loader(batch_size, shuffle=False, augment=False):
        batch = batch.to(device)
        feats.append(features(batch))
        labels.append(batch.labels)
    head.add_samples(task.labels, *class_sums(torch.cat(feats), torch.cat(labels), task.labels))
