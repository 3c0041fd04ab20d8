"""Fine-tune: the lower bound. Backbone and a growing linear head are trained on each task in turn,
with cross-entropy over all classes seen so far and no protection against forgetting."""
from __future__ import annotations

from dataclasses import dataclass

from cilbench.method import Task
from cilbench.registry import register_method
from cilbench.methods.common.full_model import FullModelMethod, SGDConfig


@dataclass(frozen=True)
class FinetuneConfig(SGDConfig):
    pass


@register_method("finetune")
class Finetune(FullModelMethod):
    """Lower bound: sequential fine-tuning of backbone + head, no protection."""

    Config = FinetuneConfig

    def learn(self, task: Task) -> None:
        self.head.grow(task.total)
        self.train_on(task.train_loader(self.cfg.batch_size))
