"""SimpleCIL: frozen pre-trained backbone, class-mean prototypes, cosine classifier.

Zhou et al., "Revisiting Class-Incremental Learning with Pre-Trained Models" (the APER paper's
SimpleCIL baseline). No training at all: each task adds the mean CLS feature of its classes' training
images (test-time transform); prediction is the cosine similarity to every prototype. Features are
cached per sample because the backbone never changes.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch

from cilbench.config import bounded
from cilbench.data.base import Batch
from cilbench.features import FeatureCache
from cilbench.method import Method, Task
from cilbench.registry import register_method
from cilbench.methods.common.classifiers import CosinePrototypes, add_task_prototypes


@dataclass(frozen=True)
class SimpleCILConfig:
    batch_size: int = bounded(128, 1)



@register_method("simplecil")
class SimpleCIL(Method):
    """Frozen backbone + class-mean prototypes + cosine classifier (no training)."""

    Config = SimpleCILConfig
    takes_gradient_steps = False
    caches_test_features = True   # frozen backbone: FeatureCache
    mixed_precision = False     # features are extracted in fp32

    def setup(self, backbone, info) -> None:
        super().setup(backbone, info)
        self.backbone.eval().requires_grad_(False)
        self.head = CosinePrototypes(backbone.embed_dim).to(self.ctx.device)
        self.features = FeatureCache(self.backbone)

    def learn(self, task: Task) -> None:
        add_task_prototypes(self.head, task, self.features, self.cfg.batch_size, self.ctx.device)

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        return self.head(self.features(batch))
