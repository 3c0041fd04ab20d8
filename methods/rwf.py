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
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from cilbench.backbones.vit import BlockHooks
from cilbench.config import check_range
from cilbench.data.base import Batch
from cilbench.errors import ConfigError
from cilbench.method import Method, Task
from cilbench.registry import register_method
from methods.common.classifiers import SigmaCosine
from methods.common.hopfield import HopfieldPrompts


@dataclass(frozen=True)
class RwFConfig:
    blocks: int = 5                       # A2: Hopfield layers in blocks 0..blocks-1
    prompt_length: int = 10               # A3
    beta: float = 0.0                     # 0 = 1/sqrt(d)
    train_proj: tuple[str, ...] = ("q", "o")  # A5: of q, k, v, o
    classifier: Literal["linear", "cosine"] = "linear"
    loss_mask: Literal["seen", "batch"] = "seen"  # A6: CE over seen classes, or over the batch's classes
    lr: float = 0.001                     # A9
    batch_size: int = 16                  # stream batch unless run.online_batch_size is set
    epochs: int = 1                       # offline variant only

    def __post_init__(self):
        check_range("method.blocks", self.blocks, 1)
        check_range("method.prompt_length", self.prompt_length, 1)
        check_range("method.beta", self.beta, 0.0)
        check_range("method.lr", self.lr, 0.0)
        check_range("method.batch_size", self.batch_size, 1)
        check_range("method.epochs", self.epochs, 1)
        bad = set(self.train_proj) - set(HopfieldPrompts.PROJECTIONS)
        if bad:
            raise ConfigError(f"method.train_proj has unknown projections {sorted(bad)}",
                              f"choose from {list(HopfieldPrompts.PROJECTIONS)}")


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
    synthetic_defaults: ClassVar[dict] = {"blocks": 3}  # the tiny ViT has 4 blocks
    label: ClassVar[str] = "RwF-style (re-implementation)"

    @classmethod
    def online_passes(cls, cfg) -> int:
        return 1  # online: one pass with run.online_iters steps per batch (epochs applies offline only)

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
        self.opt = torch.optim.Adam(self.trainable(), lr=c.lr)

    def trainable(self) -> list[nn.Parameter]:
        return [p for m in (self.hooks, self.head) for p in m.parameters() if p.requires_grad]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits over the classes seen so far (A6: later classes are masked out)."""
        return self.head(self.backbone(images, self.hooks))[:, : self.n_seen]

    def learn(self, task: Task) -> None:
        self.n_seen = task.total
        loader = task.train_loader(self.cfg.batch_size)
        steps = task.online.iters if task.online.enabled else 1
        passes = 1 if task.online.enabled else self.cfg.epochs
        self.hooks.train()
        for epoch in range(passes):
            total, seen = 0.0, 0
            for batch in loader:
                batch = batch.to(self.ctx.device)
                for _ in range(steps):
                    with self.ctx.autocast():
                        loss = self.loss(self.logits(batch.images).float(), batch.labels)
                    self.opt.zero_grad(set_to_none=True)
                    loss.backward()
                    self.opt.step()
                total += loss.item() * len(batch.labels)
                seen += len(batch.labels)
            self.ctx.reporter.epoch(epoch + 1, passes, total / max(1, seen))
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

    def modules(self):
        return [self.backbone, self.hooks, self.head]

    def state_dict(self) -> dict[str, Any]:
        return {"hooks": self.hooks.state_dict(), "head": self.head.state_dict(), "opt": self.opt.state_dict(),
                "n_seen": self.n_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.hooks.load_state_dict(state["hooks"])
        self.head.load_state_dict(state["head"])
        self.opt.load_state_dict(state["opt"])
        self.n_seen = state["n_seen"]
