"""Similarity-aware MoE (re-implementation; Mclaughlin, Lee, Su, "Similarity-Aware Mixture-of-Experts
for Data-Efficient Continual Learning", 2026).

Only the abstract is public (spec methods.md §3); this is the reading of §3.2, every assumption an
option (S# labels, listed in the README too):

- S1: experts are prompts with keys over a frozen ViT (L2P-style input prompts: [CLS; P(x); patches],
  the mean of the prompt positions' outputs feeds the head).
- S2 incremental global pooling: one pool for all tasks that starts empty and gains
  ``prompts_per_task`` experts at each task (instead of a large pool of untrained keys up front).
  New keys start at the queries of the task's first batch that the pool covers worst
  (``key_init = "farthest"``; ``"uniform"`` = L2P's uniform(-1, 1)); prompts start uniform(-1, 1).
- S3 routing: cosine between the frozen CLS query and every key of the pool; the sample's prompt is
  the softmax(cos/``temperature``)-weighted sum of its ``top_k`` experts (soft top-k, per sample).
- S4 instance-wise masking: while learning task t, a sample whose best cosine to the experts that
  existed before t is >= ``tau`` is in-distribution and routes over the whole pool (old experts learn
  from it: transfer across overlapping tasks); otherwise it is out-of-distribution and the old
  experts are masked for it (weight exactly 0, no gradient), so only task t's new experts learn from
  it. At test time every sample routes over the whole pool. The share of in-distribution samples is
  logged per task.
- S5 loss: cross-entropy over a shared global label space (a class that recurs in a later task keeps
  its output), with the logits outside the task's classes masked (``train_mask = "task"``, as L2P)
  or not (``"seen"``), minus ``pull_coeff``·Σ_j w_j cos(q, k_j) (L2P's pull constraint, weighted).
- S6 recipe (unknown in the paper): L2P's PyTorch-port schedule -- Adam lr 1.875e-3, batch 16,
  5 epochs, gradient clip 1, a fresh optimizer per task. Online protocol: one pass, ``run.online_iters``
  steps per batch.
Cost per image: one query pass plus one prompted pass, whatever the pool size (like L2P).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from cilbench.config import bounded
from cilbench.data.base import Batch
from cilbench.engine import fit
from cilbench.method import Task
from cilbench.methods.common.global_pool import GlobalPromptPool, farthest_queries
from cilbench.methods.common.prompts import PromptMethod, prompted_tokens
from cilbench.registry import register_method


@dataclass(frozen=True)
class SAMoEConfig:
    prompts_per_task: int = bounded(2, 1)          # S2
    prompt_length: int = bounded(5, 1)
    key_init: Literal["farthest", "uniform"] = "farthest"
    top_k: int = bounded(3, 1)                     # S3
    temperature: float = bounded(0.1, 1e-06)
    tau: float = bounded(0.5, -1.0, 1.0)                   # S4: in-distribution if max cos(q, old keys) >= tau
    train_mask: Literal["task", "seen"] = "task"   # S5
    pull_coeff: float = bounded(0.1, 0.0)
    lr: float = bounded(0.001875, 0.0)               # S6
    batch_size: int = bounded(16, 1)
    epochs: int = bounded(5, 1)
    clip_grad: float = bounded(1.0, 0.0)



@register_method("samoe")
class SAMoE(PromptMethod):
    """Similarity-aware MoE: a growing global prompt pool with soft routing and per-sample masking."""

    Config = SAMoEConfig
    label: ClassVar[str] = "similarity-aware MoE (re-implementation)"
    state_attrs: ClassVar[tuple] = ("n_old", "id_share")

    streams_online: ClassVar[bool] = True   # one pass with run.online_iters steps per batch (epochs: offline)

    def build(self, backbone, info) -> None:
        self.pool = GlobalPromptPool(self.cfg.prompt_length, backbone.embed_dim).to(self.ctx.device)
        self.n_old = 0                         # experts that existed before the current task
        self.id_share: list[float] = []        # share of in-distribution training samples per task

    # ---- routing ----------------------------------------------------------------------------
    def in_distribution(self, query: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the sample's best cosine to the old experts' keys reaches tau."""
        if self.n_old == 0:
            return torch.zeros(len(query), dtype=torch.bool, device=query.device)
        return self.pool.similarity(query)[:, : self.n_old].max(1).values >= self.cfg.tau

    def allowed(self, in_dist: torch.Tensor) -> torch.Tensor:
        """(B, M): in-distribution samples may use every expert, the others only the new ones."""
        allowed = torch.ones(len(in_dist), self.pool.size, dtype=torch.bool, device=in_dist.device)
        allowed[:, : self.n_old] = in_dist[:, None]
        return allowed

    def forward(self, batch: Batch, task: Task | None, query: torch.Tensor | None = None,
                allowed: torch.Tensor | None = None):
        query = self.queries(batch) if query is None else query
        mix = self.pool.mix(query, self.cfg.top_k, self.cfg.temperature, allowed)
        feats = prompted_tokens(self.backbone, batch.images, mix.prompt).mean(1)
        pull = self.cfg.pull_coeff * ((mix.weight * mix.sim).sum() / len(query)) if task is not None else None
        return self.head(feats), pull

    def loss(self, batch: Batch, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
        query = self.queries(batch)        # recomputed for augmented images, cached otherwise
        in_dist = self.in_distribution(query)
        logits, pull = self.forward(batch, task, query, self.allowed(in_dist))
        return self.task_loss(logits, batch.labels, task) - pull, in_dist

    # ---- learning ---------------------------------------------------------------------------
    def _add_experts(self, batch: Batch, task: Task) -> None:
        c = self.cfg
        gen = torch.Generator().manual_seed(self.ctx.seed * 1000 + task.index)
        if c.key_init == "farthest":
            keys = farthest_queries(self.queries(batch), self.pool.keys.detach(), c.prompts_per_task)
            if len(keys) < c.prompts_per_task:                    # a first batch smaller than the count
                keys = torch.cat([keys, keys[torch.arange(c.prompts_per_task - len(keys)) % len(keys)]])
        else:
            keys = torch.empty(c.prompts_per_task, self.pool.dim).uniform_(-1, 1, generator=gen)
        self.pool.grow(keys, gen)

    def learn(self, task: Task) -> None:
        """As the base, except that the new experts' keys need the task's first queries, and the share
        of in-distribution samples (first pass) is logged."""
        self.head.grow(task.total)
        self.n_old = self.pool.size
        counts = dict.fromkeys(("id", "all", "id_old", "old"), 0)   # overall and on recurring classes

        def first_batch(batch: Batch) -> list[torch.nn.Parameter]:
            self._add_experts(batch, task)
            return self.trained()

        def tally(epoch: int, batch: Batch, in_dist: torch.Tensor) -> None:
            if epoch == 0:
                recurring = batch.labels < task.start
                counts["id"] += int(in_dist.sum())
                counts["all"] += len(in_dist)
                counts["id_old"] += int((in_dist & recurring).sum())
                counts["old"] += int(recurring.sum())

        fit(first_batch, task.train_loader(self.cfg.batch_size), lambda b: self.loss(b, task), self.schedule(),
            self.ctx, on_batch=tally)
        self.id_share.append(counts["id"] / max(1, counts["all"]))
        on_recurring = f", {100 * counts['id_old'] / counts['old']:.1f}% of recurring-class ones" if counts["old"] else ""
        self.ctx.reporter.log(f"samoe task {task.index}: {self.pool.size} experts, {100 * self.id_share[-1]:.1f}% "
                              f"of training samples in-distribution{on_recurring} (tau {self.cfg.tau})")
        self.n_old = self.pool.size
