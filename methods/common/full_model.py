"""Backbone + growing linear head trained end to end: the shared core of the finetune and joint baselines."""
from __future__ import annotations

from dataclasses import dataclass
import torch

from cilbench.config import bounded
from cilbench.data.base import Batch, SampleView
from cilbench.method import Method
from cilbench.methods.common.classifiers import GrowingLinear
from cilbench.engine import Schedule, fit
from cilbench.methods.common.losses import cross_entropy


@dataclass(frozen=True)
class SGDConfig:
    epochs: int = bounded(20, 0)
    lr: float = bounded(0.01, 0.0)
    batch_size: int = bounded(48, 1)
    momentum: float = 0.9
    weight_decay: float = 5e-4


    def sgd_schedule(self) -> Schedule:
        """SGD with a cosine to 0 stepped per batch."""
        return Schedule(self.epochs, self.lr, "sgd", self.momentum, self.weight_decay, cosine_to=0.0,
                        step_every="batch")


class FullModelMethod(Method):
    """Every backbone parameter and the head train; cross-entropy over all classes seen so far."""

    mixed_precision = False     # prediction runs in fp32

    def setup(self, backbone, info) -> None:
        super().setup(backbone, info)
        self.head = GrowingLinear(backbone.embed_dim).to(self.ctx.device)

    def train_on(self, loader: SampleView) -> None:
        self.backbone.train().requires_grad_(True)
        loss = lambda b: cross_entropy(self.head(self.backbone(b.images)), b.labels)  # noqa: E731
        fit(list(self.backbone.parameters()) + list(self.head.parameters()), loader, loss, self.cfg.sgd_schedule(), self.ctx)
        self.backbone.eval()

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        return self.head(self.backbone(batch.images))
