"""Backbone + growing linear head trained end to end: the shared core of the finetune and joint baselines."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cilbench.config import check_range
from cilbench.data.base import Batch, SampleView
from cilbench.method import Method
from methods.common.classifiers import GrowingLinear
from methods.common.training import SGDSchedule, cross_entropy, train_epochs


@dataclass(frozen=True)
class SGDConfig:
    epochs: int = 20
    lr: float = 0.01
    batch_size: int = 48
    momentum: float = 0.9
    weight_decay: float = 5e-4

    def __post_init__(self):
        check_range("method.epochs", self.epochs, 0)
        check_range("method.lr", self.lr, 0.0)
        check_range("method.batch_size", self.batch_size, 1)

    def sgd(self) -> SGDSchedule:
        return SGDSchedule(self.epochs, self.lr, self.momentum, self.weight_decay)


class FullModelMethod(Method):
    """Every backbone parameter and the head train; cross-entropy over all classes seen so far."""

    mixed_precision = False     # prediction runs in fp32

    def setup(self, backbone, info) -> None:
        super().setup(backbone, info)
        self.head = GrowingLinear(backbone.embed_dim).to(self.ctx.device)

    def train_on(self, loader: SampleView) -> None:
        self.backbone.train().requires_grad_(True)
        loss = lambda b: cross_entropy(self.head(self.backbone(b.images)), b.labels)  # noqa: E731
        train_epochs(list(self.backbone.parameters()) + list(self.head.parameters()), loader, loss,
                     self.cfg.sgd(), self.ctx)
        self.backbone.eval()

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        return self.head(self.backbone(batch.images))

    def modules(self):
        return [self.backbone, self.head]

    def state_dict(self) -> dict[str, Any]:
        return {"backbone": self.backbone.state_dict(), "head": self.head.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.backbone.load_state_dict(state["backbone"])
        self.head = GrowingLinear(self.backbone.embed_dim).to(self.ctx.device)
        self.head.grow(state["head"]["weight"].shape[0])
        self.head.load_state_dict(state["head"])
