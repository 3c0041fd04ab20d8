"""The prompt methods' toolkit: a base class, key-query pools, the batch vote, prefix hooks.

``PromptMethod`` is the skeleton L2P, DualPrompt, CODA-Prompt and samoe share over a frozen ViT:
a cached query pass, a growing linear head, the class-masked cross-entropy minus a pull term,
Adam through the training engine, and autocast prediction; a subclass builds its prompts and maps a
batch to (logits, pull).

A pool holds M prompts P_j ∈ R^{L×d} with keys k_j ∈ R^d (both uniform(−1, 1), as in the PyTorch
port). A query q (the frozen model's CLS feature) picks the top-N keys by cosine similarity; with
``vote`` every sample of the batch uses the batch's N most frequent picks (majority vote). Both
reference codes vote at train and test time; at test time the vote makes a sample's prediction depend
on its batch-mates, so the methods vote at training only unless asked (``test_batch_vote``). Ties in
the vote go to the lower prompt id (``ties = "lowest"``, deterministic) or, as in PILOT, to whatever
``torch.topk`` over the ``torch.unique`` counts returns (``"pilot"``).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cilbench.backbones.vit import BlockHooks
from cilbench.data.base import Batch
from cilbench.engine import Schedule, fit
from cilbench.features import FeatureCache
from cilbench.method import BenchmarkInfo, Method, Task
from cilbench.methods.common.classifiers import GrowingLinear
from cilbench.methods.common.losses import cross_entropy, current_task_ce


class PromptMethod(Method):
    """Frozen ViT + prompts + growing linear head (spec methods.md §§4, 6, 7).

    Config fields read: ``epochs``, ``lr``, ``batch_size``, and when present ``clip_grad`` (0 = none),
    ``head_init`` and ``train_mask`` (True / "task": only the task's classes compete in training).
    """

    def setup(self, backbone, info: BenchmarkInfo) -> None:
        super().setup(backbone, info)
        self.backbone.eval().requires_grad_(False)
        self.build(backbone, info)         # prompts first: the optimizer lists them before the head
        self.head = GrowingLinear(backbone.embed_dim, getattr(self.cfg, "head_init", "linear")).to(self.ctx.device)
        self.queries = FeatureCache(self.backbone)

    @abc.abstractmethod
    def build(self, backbone, info: BenchmarkInfo) -> None:
        """Create the method's prompts (and check the config against the backbone)."""

    @abc.abstractmethod
    def forward(self, batch: Batch, task: Task | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits over the head's classes, the term subtracted from the loss or None); ``task`` is
        None at prediction."""

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor, task: Task) -> torch.Tensor:
        masked = getattr(self.cfg, "train_mask", True) in (True, "task")
        return current_task_ce(logits, labels, task) if masked else cross_entropy(logits, labels)

    def loss(self, batch: Batch, task: Task) -> torch.Tensor:
        logits, pull = self.forward(batch, task)
        ce = self.task_loss(logits, batch.labels, task)
        return ce if pull is None else ce - pull

    def schedule(self) -> Schedule:
        """Adam(0.9, 0.999), constant lr, a fresh optimizer per task (the reference codes)."""
        c = self.cfg
        return Schedule(c.epochs, c.lr, "adam", clip_grad=getattr(c, "clip_grad", 0.0) or 0.0)

    def before_task(self, task: Task) -> None:
        pass

    def after_task(self, task: Task) -> None:
        pass

    def learn(self, task: Task) -> None:
        self.head.grow(task.total)
        self.before_task(task)
        fit(self.trained(), task.train_loader(self.cfg.batch_size), lambda b: self.loss(b, task), self.schedule(),
            self.ctx)
        self.after_task(task)

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        with self.ctx.autocast():
            return self.forward(batch, None)[0].float()


class PrefixHooks(BlockHooks):
    """Per-block (key, value) prefixes for one forward, given at construction (block -> (B, 2, P, d))."""

    def __init__(self, prefixes: dict[int, torch.Tensor]):
        self.prefixes = prefixes

    def attn_prefix(self, i: int, x: torch.Tensor):
        p = self.prefixes.get(i)
        return None if p is None else (p[:, 0], p[:, 1])


@dataclass
class Selection:
    idx: torch.Tensor        # (B, N) selected prompt ids per sample
    sim: torch.Tensor        # (B, N) cosine(q, k) of the selected keys (differentiable in the keys)
    prompts: torch.Tensor    # (B, N·L, d) selected prompts, concatenated


class PromptPool(nn.Module):
    def __init__(self, size: int, length: int, dim: int, top_k: int):
        super().__init__()
        if top_k > size:
            raise ValueError(f"top_k={top_k} exceeds the pool size {size}")
        self.top_k = top_k
        self.prompts = nn.Parameter(torch.empty(size, length, dim).uniform_(-1, 1))
        self.keys = nn.Parameter(torch.empty(size, dim).uniform_(-1, 1))

    @property
    def size(self) -> int:
        return self.prompts.shape[0]

    def similarity(self, query: torch.Tensor) -> torch.Tensor:
        """(B, M) cosine similarity between queries and keys."""
        return F.normalize(query, dim=1) @ F.normalize(self.keys, dim=1).T

    def select(self, query: torch.Tensor, vote: bool, ties: str = "lowest") -> Selection:
        """Top-N keys per sample, or (``vote``) the batch's N most frequent picks for every sample."""
        sim = self.similarity(query)
        idx = sim.detach().topk(self.top_k, dim=1).indices
        if vote:
            idx = majority(idx, self.size, self.top_k, ties).expand(len(idx), -1)
        b, n = idx.shape
        prompts = self.prompts[idx].reshape(b, n * self.prompts.shape[1], -1)
        return Selection(idx, sim.gather(1, idx), prompts)


def majority(idx: torch.Tensor, size: int, k: int, ties: str = "lowest") -> torch.Tensor:
    """The k ids picked most often across the batch, shape (1, k). Ties: ``lowest`` id first
    (deterministic), or ``pilot``: the reference codes' ``torch.unique`` + ``torch.topk`` over the
    counts, whose order among equal counts is whatever ``topk`` returns."""
    if ties == "pilot":
        ids, counts = torch.unique(idx, return_counts=True, sorted=True)
        if len(ids) < size:  # jnp.unique's fill, as ported: the smallest id, with count 0
            ids = torch.cat([ids, ids.new_full((size - len(ids),), int(idx.min()))])
            counts = torch.cat([counts, counts.new_zeros(size - len(counts))])
        return ids[torch.topk(counts, k=k).indices].unsqueeze(0)
    counts = torch.bincount(idx.flatten(), minlength=size)
    order = torch.sort(counts, descending=True, stable=True).indices
    return order[:k].unsqueeze(0)


def prompted_tokens(backbone, images: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """Run the ViT on [CLS; prompts; patches] and return the prompt positions' final-normed outputs.

    Prompts enter after the position embedding and receive the CLS position's embedding (the PyTorch
    port's resized position table), so the prompt positions all see the same position code.
    """
    vit, n = backbone.vit, backbone.num_prefix_tokens
    x = backbone.embed(images)
    if vit.cls_token is not None and not vit.no_embed_class:
        prompts = prompts + vit.pos_embed[:, :1]
    x = torch.cat([x[:, :n], prompts.to(x.dtype), x[:, n:]], dim=1)
    x = vit.norm(backbone.run_blocks(x))
    return x[:, n:n + prompts.shape[1]]
