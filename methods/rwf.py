"""RwF-style Hopfield routing (re-implementation; Masano et al., "Routing without Forgetting", 2026).

No code or hyper-parameters of RwF are public (spec methods.md §2); this is the reading of §2.4,
with every assumption an option (A# = the spec's labels):

- A1: frozen pre-trained ViT (whatever backbone the benchmark uses).
- A2: a Hopfield retrieval layer in each of the first ``blocks`` blocks (paper's k unknown).
- A3: ``prompt_length`` L learnable state patterns per layer (default 10).
- In block l: P_l = softmax(β·LN(Q_l)W_Q (LN(X_l)W_K)ᵀ)·LN(X_l)W_V·W_O (``methods/common/hopfield.py``
  derives why this one step is the closed-form minimiser of the convex free energy), inserted after
  CLS -- [x_CLS; P_l; x_patches] -> frozen block l -> the L prompt rows are dropped again.
  β = 1/√d unless ``beta`` is set.
- A4: W_V starts as (and by default stays) the identity: retrieval returns convex combinations of the
  token embeddings. A5: ``train_proj`` lists the projections that learn (default W_Q and W_O; the
  queries and LayerNorms always learn).
- A6: cross-entropy over the classes seen so far (unseen classes' logits masked); no replay, no
  distillation, no task identity at train or test time. ``loss_mask = "batch"`` restricts it to the
  classes present in the batch (the OCL codebases' remedy for the head's bias to new classes; v1 of
  the paper does not say which it uses). ``classifier``: ``linear`` or ``cosine``
  (σ-scaled, learnable σ).
- A7: online by default: each streamed batch gets ``run.online_iters`` Adam steps (1 = faithful).
  ``--set run.online=false`` is the offline variant: ``epochs`` passes per task.
- A9 (ours): Adam, lr 1e-3, one optimizer for the whole stream (there are no task boundaries to reset
  it at), kept in the checkpoint; the head is allocated for every class of the benchmark up front so
  the optimizer never changes shape.
Cost per image is constant in the number of tasks: k·L extra tokens and k small retrievals.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from cilbench.backbones.vit import BlockHooks
from cilbench.config import bounded
from cilbench.data.base import Batch
from cilbench.engine import Schedule, fit
from cilbench.errors import ConfigError
from cilbench.method import Method, Task
from cilbench.registry import register_method
from cilbench.methods.common.classifiers import SigmaCosine
from cilbench.methods.common.hopfield import HopfieldPrompts


@dataclass(frozen=True)
class RwFConfig:
    blocks: int = bounded(5, 1)                       # A2: Hopfield layers in blocks 0..blocks-1
    prompt_length: int = bounded(10, 1)               # A3
    beta: float = bounded(0.0, 0.0)                     # 0 = 1/sqrt(d)
    train_proj: tuple[Literal["q", "k", "v", "o"], ...] = ("q", "o")  # A5: the projections that learn
    classifier: Literal["linear", "cosine"] = "linear"
    loss_mask: Literal["seen", "batch"] = "seen"  # A6: CE over seen classes, or over the batch's classes
    lr: float = bounded(0.001, 0.0)                     # A9
    batch_size: int = bounded(16, 1)                  # stream batch unless run.online_batch_size is set
    epochs: int = bounded(1, 1)                       # offline variant only


class HopfieldHooks(BlockHooks, nn.Module):
    """Insert each layer's retrieved prompts after CLS before its block; drop them after it."""

    def __init__(self, layers: nn.ModuleList, n_prefix: int):
        nn.Module.__init__(self)
        self.layers, self.n_prefix = layers, n_prefix

    def before_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if i >= len(self.layers):
            return x
        p = self.layers[i](x).to(x.dtype)
        return torch.cat([x[:, : self.n_prefix], p, x[:, self.n_prefix:]], dim=1)

    def after_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if i >= len(self.layers):
            return x
        length = self.layers[i].queries.shape[0]
        return torch.cat([x[:, : self.n_prefix], x[:, self.n_prefix + length:]], dim=1)


@register_method("rwf")
class RwF(Method):
    """RwF-style: Hopfield-retrieved prompts in the first blocks of a frozen ViT, online by default."""

    Config = RwFConfig
    online: ClassVar[bool] = True
    state_attrs: ClassVar[tuple] = ("opt", "n_seen")
    label: ClassVar[str] = "RwF-style (re-implementation)"

    streams_online: ClassVar[bool] = True   # one pass with run.online_iters steps per batch (epochs: offline)

    def setup(self, backbone, info) -> None:
        super().setup(backbone, info)
        c, d = self.cfg, backbone.embed_dim
        if c.blocks > backbone.depth:
            raise ConfigError(f"method.blocks = {c.blocks} but {backbone.name} has {backbone.depth} blocks",
                              f"use at most {backbone.depth}")
        self.backbone.eval().requires_grad_(False)
        layers = nn.ModuleList(HopfieldPrompts(d, c.prompt_length, c.beta, c.train_proj) for _ in range(c.blocks))
        self.hooks = HopfieldHooks(layers, backbone.num_prefix_tokens).to(self.ctx.device)
        self.head = (SigmaCosine(d, info.n_classes) if c.classifier == "cosine"
                     else nn.Linear(d, info.n_classes)).to(self.ctx.device)
        self.n_seen = 0
        self.opt = self.schedule().optimizer_for(self.trained())   # one optimizer for the whole stream

    def schedule(self) -> Schedule:
        """A9: Adam, constant lr."""
        return Schedule(self.cfg.epochs, self.cfg.lr, "adam")

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits over the classes seen so far (A6: later classes are masked out)."""
        return self.head(self.backbone(images, self.hooks))[:, : self.n_seen]

    def learn(self, task: Task) -> None:
        self.n_seen = task.total
        self.hooks.train()
        fit(self.trained(), task.train_loader(self.cfg.batch_size),
            lambda b: self.loss(self.logits(b.images).float(), b.labels), self.schedule(), self.ctx, optimizer=self.opt)
        self.hooks.eval()

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.cfg.loss_mask == "batch":
            absent = torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device)
            absent[labels] = False
            logits = logits.masked_fill(absent, float("-inf"))
        return F.cross_entropy(logits, labels)

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        with self.ctx.autocast():
            return self.logits(batch.images).float()
