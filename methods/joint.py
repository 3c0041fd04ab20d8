"""Joint training: the upper bound. A model trained on all classes seen so far, starting each time
from the pre-trained weights -- it reads past tasks' data, which no continual method may do.

``schedule = "final"`` (default) trains once, after the last task, and is evaluated only then (its
Ā therefore equals its last accuracy); ``"every"`` retrains after every task (T trainings on growing
data; affordable for short sequences) and fills the whole accuracy matrix.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

from cilbench.method import Task
from cilbench.registry import register_method
from cilbench.methods.common.classifiers import GrowingLinear
from cilbench.methods.common.full_model import FullModelMethod, SGDConfig


@dataclass(frozen=True)
class JointConfig(SGDConfig):
    schedule: Literal["final", "every"] = "final"


@register_method("joint")
class Joint(FullModelMethod):
    """Upper bound: one model trained on all seen classes (final task by default)."""

    Config = JointConfig
    uses_past_data = True

    @classmethod
    def training_image_epochs(cls, cfg: JointConfig, images_per_task: list[float]) -> float:
        """"final": once on every image; "every": after each task on every image seen so far."""
        if cfg.schedule == "final":
            return sum(images_per_task) * cfg.epochs
        seen = [sum(images_per_task[:t + 1]) for t in range(len(images_per_task))]
        return sum(seen) * cfg.epochs

    def setup(self, backbone, info) -> None:
        super().setup(backbone, info)
        self.initial = copy.deepcopy(backbone.state_dict())

    def wants_eval(self, task_index: int, n_tasks: int) -> bool:
        return self.cfg.schedule == "every"

    def learn(self, task: Task) -> None:
        if self.cfg.schedule == "final" and task.index < task.n_tasks - 1:
            return
        self.backbone.load_state_dict(self.initial)
        self.head = GrowingLinear(self.backbone.embed_dim).to(self.ctx.device)
        self.head.grow(task.total)
        self.train_on(task.seen_train_loader(self.cfg.batch_size))
