"""Joint training: the upper bound. A model trained on all classes seen so far, starting each time
from the pre-trained weights -- it reads past tasks' data, which no continual method may do.

``schedule = "final"`` (default) trains once, after the last task, and is evaluated only then (its
Ā therefore equals its last accuracy); ``"every"`` retrains after every task (T trainings on growing
data; affordable for short sequences) and fills the whole accuracy matrix.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from cilbench.config import check_range
from cilbench.data.base import Batch
from cilbench.method import Method, Task
from cilbench.registry import register_method
from methods.common.classifiers import GrowingLinear
from methods.common.training import SGDSchedule, cross_entropy, train_epochs


@dataclass(frozen=True)
class JointConfig:
    schedule: Literal["final", "every"] = "final"
    epochs: int = 20
    lr: float = 0.01
    batch_size: int = 48
    momentum: float = 0.9
    weight_decay: float = 5e-4

    def __post_init__(self):
        check_range("method.epochs", self.epochs, 0)
        check_range("method.lr", self.lr, 0.0)
        check_range("method.batch_size", self.batch_size, 1)


@register_method("joint")
class Joint(Method):
    """Upper bound: one model trained on all seen classes (final task by default)."""

    Config = JointConfig
    uses_past_data = True
    synthetic_defaults: ClassVar[dict] = {"epochs": 10, "batch_size": 64}

    def setup(self, backbone, info) -> None:
        super().setup(backbone, info)
        self.initial = copy.deepcopy(backbone.state_dict())
        self.head = GrowingLinear(backbone.embed_dim).to(self.ctx.device)
        self.trained_upto = 0

    def wants_eval(self, task_index: int, n_tasks: int) -> bool:
        return self.cfg.schedule == "every"

    def learn(self, task: Task) -> None:
        if self.cfg.schedule == "final" and task.index < task.n_tasks - 1:
            return
        self.backbone.load_state_dict(self.initial)
        self.head = GrowingLinear(self.backbone.embed_dim).to(self.ctx.device)
        self.head.grow(task.total)
        self.backbone.train().requires_grad_(True)
        c = self.cfg
        loss = lambda b: cross_entropy(self.head(self.backbone(b.images)), b.labels)  # noqa: E731
        train_epochs(list(self.backbone.parameters()) + list(self.head.parameters()),
                     task.seen_train_loader(c.batch_size), loss,
                     SGDSchedule(c.epochs, c.lr, c.momentum, c.weight_decay), self.ctx)
        self.backbone.eval()
        self.trained_upto = task.total

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        return self.head(self.backbone(batch.images))

    def modules(self):
        return [self.backbone, self.head]

    def state_dict(self) -> dict[str, Any]:
        return {"backbone": self.backbone.state_dict(), "head": self.head.state_dict(),
                "trained_upto": self.trained_upto}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.backbone.load_state_dict(state["backbone"])
        self.head = GrowingLinear(self.backbone.embed_dim).to(self.ctx.device)
        self.head.grow(state["head"]["weight"].shape[0])
        self.head.load_state_dict(state["head"])
        self.trained_upto = state["trained_upto"]
