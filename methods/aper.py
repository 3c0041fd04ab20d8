"""APER (Zhou et al., "Revisiting Class-Incremental Learning with Pre-Trained Models: Generalizability
and Adaptivity are All You Need", IJCV 2024; the ADAM method of its arXiv v1), as in LAMDA-PILOT.

- Task 0 only: adapt a copy of the pre-trained model with one parameter-efficient tuner
  (``variant``: ``adapter`` AdaptFormer, ``ssf``, ``vpt`` deep/shallow, or ``finetune`` of all weights;
  ``methods/common/peft.py``), trained with cross-entropy through a σ-cosine head on the first task's
  classes (SGD, momentum 0.9, cosine schedule init_lr → min_lr). Then everything is frozen.
- Every task: class prototypes = mean of the training images' features (test transform), where the
  feature is the concatenation [pre-trained CLS ; adapted CLS] (``dual_branch``, PILOT's
  ``MultiBranchCosineIncrementalNet``); prediction is the cosine to every prototype.
- Both halves are frozen after task 0, so features are cached per sample (``FeatureCache``).

Hyper-parameter defaults are PILOT's ``exps/aper_*.json``: adapter/ssf/vpt use 20 epochs, batch 48,
weight decay 5e-4; finetune uses 6 epochs, batch 128, weight decay 0.05; all lr 0.01, min_lr 0,
bottleneck 64, 5 VPT tokens. Leaving ``tuned_epoch``/``batch_size``/``weight_decay``/``init_lr`` unset
picks the variant's default. The cosine schedule steps per batch here (PILOT steps per epoch).

``schedule = "pilot-inr"`` (set on the ImageNet-R benchmarks) takes PILOT's ``aper_*_inr.json`` values
instead (adapter: 10 epochs, lr 0.05, batch 16, weight decay 5e-3; vpt: lr 0.05, batch 24; finetune: 5
epochs, batch 144, weight decay 5e-3; ssf as CIFAR). Deviation: PILOT's INR VPT uses 30 tokens, here
``prompt_token_num`` stays 5 unless set.

``schedule = "synthetic"`` (set on the synthetic benchmarks) changes one of them: the adapter
variant's lr is 0.2. At PILOT's 0.01 the AdaptFormer adapter (zero-initialised up-projection, scale
0.1) barely moves on the embedded ViT: after the first task its CLS feature has cosine 0.99997 to the
pre-trained one, so APER-adapter equals SimpleCIL; at 0.2 the cosine is 0.958 and the adapted
features separate the first task's test images better (nearest-class-mean 91 % vs 86 %)
(``python benchmarks/aper_adaptation.py``). SSF already adapts at 0.01 (cosine 0.83) and keeps it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from cilbench.backbones.vit import ViTBackbone
from cilbench.config import bounded
from cilbench.data.base import Batch
from cilbench.features import FeatureCache
from cilbench.method import Method, Task, resize_to
from cilbench.registry import register_method
from cilbench.methods.common.classifiers import CosinePrototypes, SigmaCosine, add_task_prototypes
from cilbench.methods.common.peft import SSF, AdapterHooks, PromptHooks, patch_size
from cilbench.engine import Schedule, fit

Variant = Literal["adapter", "ssf", "vpt", "finetune"]
VARIANT_DEFAULTS: dict[str, dict[str, Any]] = {
    "adapter": {"tuned_epoch": 20, "batch_size": 48, "weight_decay": 5e-4, "init_lr": 0.01},
    "ssf": {"tuned_epoch": 20, "batch_size": 48, "weight_decay": 5e-4, "init_lr": 0.01},
    "vpt": {"tuned_epoch": 20, "batch_size": 48, "weight_decay": 5e-4, "init_lr": 0.01},
    "finetune": {"tuned_epoch": 6, "batch_size": 128, "weight_decay": 0.05, "init_lr": 0.01},
}
SYNTHETIC_SCHEDULE: dict[str, dict[str, Any]] = {"adapter": {"init_lr": 0.2}}   # see the module docstring
PILOT_INR_SCHEDULE: dict[str, dict[str, Any]] = {   # PILOT exps/aper_*_inr.json (ssf: as CIFAR)
    "adapter": {"tuned_epoch": 10, "batch_size": 16, "weight_decay": 5e-3, "init_lr": 0.05},
    "vpt": {"batch_size": 24, "init_lr": 0.05},
    "finetune": {"tuned_epoch": 5, "batch_size": 144, "weight_decay": 5e-3},
}
SCHEDULES = {"pilot": {}, "synthetic": SYNTHETIC_SCHEDULE, "pilot-inr": PILOT_INR_SCHEDULE}


@dataclass(frozen=True)
class APERConfig:
    variant: Variant = "adapter"
    schedule: Literal["pilot", "pilot-inr", "synthetic"] = "pilot"   # per-benchmark presets (docstring)
    tuned_epoch: int | None = bounded(None, 0)        # None = the variant's default under ``schedule``
    batch_size: int | None = bounded(None, 1)
    weight_decay: float | None = bounded(None, 0.0)
    init_lr: float | None = bounded(None, 0.0)
    min_lr: float = 0.0
    momentum: float = 0.9
    ffn_num: int = bounded(64, 1)                     # adapter bottleneck
    adapter_scale: float = 0.1
    adapter_dropout: float = bounded(0.1, 0.0, 1.0)
    vpt_type: Literal["deep", "shallow"] = "deep"
    prompt_token_num: int = bounded(5, 1)
    dual_branch: bool = True              # prototypes on [pre-trained ; adapted]; False = adapted only
    proto_batch_size: int = 128

    def __post_init__(self):
        defaults = {**VARIANT_DEFAULTS[self.variant], **SCHEDULES[self.schedule].get(self.variant, {})}
        for key, value in defaults.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)


class AdaptedViT(nn.Module):
    """The first-task-adapted model: the ViT plus one tuner. Adapter, VPT and SSF share the frozen
    ViT (block hooks, or SSF's switchable forward hooks); finetune trains a private copy."""

    def __init__(self, backbone: ViTBackbone, cfg: APERConfig):
        super().__init__()
        self.variant = cfg.variant
        d, depth = backbone.embed_dim, backbone.depth
        self.vit = copy.deepcopy(backbone) if cfg.variant == "finetune" else backbone
        self.tuner: nn.Module | None = None
        self.hooks = None
        if cfg.variant == "adapter":
            self.tuner = self.hooks = AdapterHooks(d, depth, cfg.ffn_num, cfg.adapter_scale, cfg.adapter_dropout)
        elif cfg.variant == "vpt":
            self.tuner = self.hooks = PromptHooks(d, depth, cfg.prompt_token_num, cfg.vpt_type == "deep",
                                                  patch_size(backbone))
        elif cfg.variant == "ssf":
            self.tuner = SSF(self.vit.vit)
        self.to(next(backbone.parameters()).device)

    def trainable(self) -> list[nn.Parameter]:
        return list((self.vit if self.tuner is None else self.tuner).parameters())

    def set_trainable(self, on: bool) -> None:
        self.vit.requires_grad_(on and self.tuner is None)
        if self.tuner is not None:
            self.tuner.requires_grad_(on)
        self.train(on)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if isinstance(self.tuner, SSF):
            with self.tuner.active():
                return self.vit(images)
        return self.vit(images, self.hooks)

    def tuned_state(self) -> dict[str, torch.Tensor]:
        """Only what training changed (not another copy of a frozen ViT)."""
        return (self.vit if self.tuner is None else self.tuner).state_dict()

    def load_tuned_state(self, state: dict[str, torch.Tensor]) -> None:
        (self.vit if self.tuner is None else self.tuner).load_state_dict(state)


@register_method("aper")
class APER(Method):
    """APER: first-task PEFT adaptation, then frozen dual-branch prototypes with a cosine classifier."""

    Config = APERConfig
    mixed_precision = False     # prototypes and prediction run in fp32
    added_settings: ClassVar[dict] = {"schedule": "pilot"}     # runs before the synthetic schedule

    caches_test_features = True   # both halves frozen after task 0 (FeatureCache)

    @classmethod
    def training_image_epochs(cls, cfg: APERConfig, images_per_task: list[float]) -> float:
        """Task 0 trains for ``tuned_epoch``; every image then passes once for its prototype."""
        return images_per_task[0] * cfg.tuned_epoch + sum(images_per_task) / 3

    @classmethod
    def online_passes(cls, cfg) -> int:
        return cfg.tuned_epoch + 1  # first-task adaptation, then the prototype pass

    def setup(self, backbone, info) -> None:
        super().setup(backbone, info)
        self.backbone.eval().requires_grad_(False)
        self.adapted = AdaptedViT(self.backbone, self.cfg)
        self.adapted.set_trainable(False)
        self.head = CosinePrototypes(self._feature_dim()).to(self.ctx.device)
        self.features = FeatureCache(self._extract)

    def _feature_dim(self) -> int:
        return self.backbone.embed_dim * (2 if self.cfg.dual_branch else 1)

    @torch.no_grad()
    def _extract(self, images: torch.Tensor) -> torch.Tensor:
        adapted = self.adapted(images)
        return torch.cat([self.backbone(images), adapted], 1) if self.cfg.dual_branch else adapted

    def learn(self, task: Task) -> None:
        if task.index == 0:
            self._adapt(task)
        add_task_prototypes(self.head, task, self.features, self.cfg.proto_batch_size, self.ctx.device)

    def _adapt(self, task: Task) -> None:
        c = self.cfg
        head = SigmaCosine(self.backbone.embed_dim, len(task.classes)).to(self.ctx.device)
        self.adapted.set_trainable(True)
        loss = lambda b: F.cross_entropy(head(self.adapted(b.images)).float(), b.labels - task.start)  # noqa: E731
        schedule = Schedule(c.tuned_epoch, c.init_lr, "sgd", c.momentum, c.weight_decay, cosine_to=c.min_lr,
                            step_every="batch")
        fit(self.adapted.trainable() + list(head.parameters()), task.train_loader(c.batch_size), loss, schedule,
            self.ctx)
        self.adapted.set_trainable(False)
        self.features.clear()

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        return self.head(self.features(batch))

    def state_dict(self) -> dict[str, Any]:
        """The prototypes and only what training changed (not a copy of the frozen ViT)."""
        return {"head": self.head.state_dict(), "tuned": self.adapted.tuned_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        resize_to(self.head, state["head"])
        self.head.load_state_dict(state["head"])
        self.adapted.load_tuned_state(state["tuned"])
        self.adapted.set_trainable(False)
        self.features.clear()
