"""Fine-tune: the lower bound. Backbone and a growing linear head are trained on each task in turn,
with cross-entropy over all classes seen so far and no protection against forgetting."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from cilbench.config import check_range
from cilbench.data.base import Batch
from cilbench.method import Method, Task
from cilbench.registry import register_method
from methods.common.classifiers import GrowingLinear
from methods.common.training import SGDSchedule, cross_entropy, train_epochs


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 20
    lr: float = 0.01
    batch_size: int = 48
    momentum: float = 0.9
    weight_decay: float = 5e-4

    def __post_init__(self):
        check_range("method.epochs", self.epochs, 0)
        check_range("method.lr", self.lr, 0.0)
        check_range("method.batch_size", self.batch_size, 1)


@register_method("finetune")
class Finetune(Method):
    """Lower bound: sequential fine-tuning of backbone + head, no protection."""

    Config = FinetuneConfig
    synthetic_defaults: ClassVar[dict] = {"epochs": 5, "batch_size": 64}

    def setup(self, backbone, info) -> None:
        super().setup(backbone, info)
        self.head = GrowingLinear(backbone.embed_dim).to(self.ctx.device)

    def learn(self, task: Task) -> None:
        self.head.grow(task.total)
        self.backbone.train().requires_grad_(True)
        loss = lambda b: cross_entropy(self.head(self.backbone(b.images)), b.labels)  # noqa: E731
        c = self.cfg
        train_epochs(list(self.backbone.parameters()) + list(self.head.parameters()),
                     task.train_loader(c.batch_size), loss,
                     SGDSchedule(c.epochs, c.lr, c.momentum, c.weight_decay), self.ctx)
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
        self.head.grow(state["head"]["weight"].shape[0])
        self.head.load_state_dict(state["head"])
