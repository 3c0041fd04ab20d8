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

    @property
    def n_classes(self) -> int:
        return self.protos.shape[0]

    def set_classes(self, start: int, means: torch.Tensor) -> None:
        """Write prototypes of classes start..start+len(means)-1 (appending as needed)."""
        stop = start + len(means)
        if stop > self.n_classes:
            grown = torch.zeros(stop, self.protos.shape[1], device=self.protos.device, dtype=self.protos.dtype)
            grown[: self.n_classes] = self.protos
            self.protos = grown
        self.protos[start:stop] = means.to(self.protos)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(feats, dim=1) @ F.normalize(self.protos, dim=1).T


class GrowingLinear(nn.Module):
    """A linear head whose output grows per task; old rows are kept (and stay trainable)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.zeros(0, dim))
        self.bias = nn.Parameter(torch.zeros(0))

    @property
    def n_classes(self) -> int:
        return self.weight.shape[0]

    def grow(self, n_total: int) -> None:
        if n_total <= self.n_classes:
            return
        new = nn.Linear(self.dim, n_total - self.n_classes).to(self.weight.device)
        self.weight = nn.Parameter(torch.cat([self.weight.data, new.weight.data]))
        self.bias = nn.Parameter(torch.cat([self.bias.data, new.bias.data]))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return F.linear(feats, self.weight, self.bias)


@torch.no_grad()
def class_means(feats: torch.Tensor, labels: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Mean feature per class in [start, stop) via one scatter-add (no per-class loop)."""
    n = stop - start
    sums = torch.zeros(n, feats.shape[1], dtype=torch.float64, device=feats.device)
    sums.index_add_(0, labels - start, feats.double())
    counts = torch.bincount(labels - start, minlength=n).clamp_min(1).to(sums)
    return (sums / counts[:, None]).float()


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
def task_class_means(task, features, batch_size: int, device: torch.device) -> torch.Tensor:
    """Class means of ``features(batch)`` over the task's un-augmented training images: the prototypes
    of SimpleCIL and APER."""
    feats, labels = [], []
    for batch in task.train_loader(batch_size, shuffle=False, augment=False):
        batch = batch.to(device)
        feats.append(features(batch))
        labels.append(batch.labels)
    return class_means(torch.cat(feats), torch.cat(labels), task.start, task.stop)
