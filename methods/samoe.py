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
from typing import Any, ClassVar, Literal

import torch

from cilbench.config import check_range
from cilbench.data.base import Batch
from cilbench.features import FeatureCache
from cilbench.method import Method, Task
from cilbench.registry import register_method
from methods.common.classifiers import GrowingLinear
from methods.common.global_pool import GlobalPromptPool, Mixture, farthest_queries
from methods.common.prompts import prompted_tokens
from methods.common.training import cross_entropy, current_task_ce


@dataclass(frozen=True)
class SAMoEConfig:
    prompts_per_task: int = 2          # S2
    prompt_length: int = 5
    key_init: Literal["farthest", "uniform"] = "farthest"
    top_k: int = 3                     # S3
    temperature: float = 0.1
    tau: float = 0.5                   # S4: in-distribution if max cos(q, old keys) >= tau
    train_mask: Literal["task", "seen"] = "task"   # S5
    pull_coeff: float = 0.1
    lr: float = 0.001875               # S6
    batch_size: int = 16
    epochs: int = 5
    clip_grad: float = 1.0

    def __post_init__(self):
        for key in ("prompts_per_task", "prompt_length", "top_k", "batch_size", "epochs"):
            check_range(f"method.{key}", getattr(self, key), 1)
        check_range("method.temperature", self.temperature, 1e-6)
        check_range("method.tau", self.tau, -1.0, 1.0)
        for key in ("pull_coeff", "lr", "clip_grad"):
            check_range(f"method.{key}", getattr(self, key), 0.0)


@register_method("samoe")
class SAMoE(Method):
    """Similarity-aware MoE: a growing global prompt pool with soft routing and per-sample masking."""

    Config = SAMoEConfig
    label: ClassVar[str] = "similarity-aware MoE (re-implementation)"

    @classmethod
    def online_passes(cls, cfg) -> int:
        return 1  # online: one pass with run.online_iters steps per batch (epochs applies offline only)

    def setup(self, backbone, info) -> None:
        super().setup(backbone, info)
        self.backbone.eval().requires_grad_(False)
        d = backbone.embed_dim
        self.pool = GlobalPromptPool(self.cfg.prompt_length, d).to(self.ctx.device)
        self.head = GrowingLinear(d).to(self.ctx.device)
        self.queries = FeatureCache(self.backbone)
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

    def forward(self, batch: Batch, query: torch.Tensor | None = None,
                allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, Mixture]:
        query = self.queries(batch) if query is None else query
        mix = self.pool.mix(query, self.cfg.top_k, self.cfg.temperature, allowed)
        feats = prompted_tokens(self.backbone, batch.images, mix.prompt).mean(1)
        return self.head(feats), mix

    def loss(self, batch: Batch, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
        query = self.queries(batch)        # recomputed for augmented images, cached otherwise
        in_dist = self.in_distribution(query)
        logits, mix = self.forward(batch, query, self.allowed(in_dist))
        y = batch.labels
        ce = current_task_ce(logits, y, task) if self.cfg.train_mask == "task" else cross_entropy(logits, y)
        pull = (mix.weight * mix.sim).sum() / len(y)
        return ce - self.cfg.pull_coeff * pull, in_dist

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
        c = self.cfg
        self.head.grow(task.total)
        self.n_old = self.pool.size
        loader = task.train_loader(c.batch_size)
        steps = task.online.iters if task.online.enabled else 1
        passes = 1 if task.online.enabled else c.epochs
        opt, params = None, []
        n_id = n_all = n_id_old = n_old_class = 0     # in-distribution counts, overall and on recurring classes
        for epoch in range(passes):
            total, seen = 0.0, 0
            for batch in loader:
                batch = batch.to(self.ctx.device)
                if opt is None:      # the new experts' keys need the task's first queries
                    self._add_experts(batch, task)
                    params = [self.pool.prompts, self.pool.keys, self.head.weight, self.head.bias]
                    opt = torch.optim.Adam(params, lr=c.lr, betas=(0.9, 0.999))
                for _ in range(steps):
                    with self.ctx.autocast():
                        loss, in_dist = self.loss(batch, task)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if c.clip_grad > 0:
                        torch.nn.utils.clip_grad_norm_(params, c.clip_grad)
                    opt.step()
                if epoch == 0:
                    recurring = batch.labels < task.start
                    n_id, n_all = n_id + int(in_dist.sum()), n_all + len(in_dist)
                    n_id_old += int((in_dist & recurring).sum())
                    n_old_class += int(recurring.sum())
                total += loss.item() * len(batch.labels)
                seen += len(batch.labels)
            self.ctx.reporter.epoch(epoch + 1, passes, total / max(1, seen))
        self.id_share.append(n_id / max(1, n_all))
        on_recurring = f", {100 * n_id_old / n_old_class:.1f}% of recurring-class ones" if n_old_class else ""
        self.ctx.reporter.log(f"samoe task {task.index}: {self.pool.size} experts, {100 * self.id_share[-1]:.1f}% "
                              f"of training samples in-distribution{on_recurring} (tau {c.tau})")
        self.n_old = self.pool.size

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        with self.ctx.autocast():
            return self.forward(batch)[0].float()

    # ---- bookkeeping ------------------------------------------------------------------------
    def modules(self):
        return [self.backbone, self.pool, self.head]

    def state_dict(self) -> dict[str, Any]:
        return {"prompts": self.pool.prompts.detach().cpu(), "keys": self.pool.keys.detach().cpu(),
                "head": self.head.state_dict(), "id_share": list(self.id_share)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        dev = self.ctx.device
        self.pool.prompts = torch.nn.Parameter(state["prompts"].to(dev))
        self.pool.keys = torch.nn.Parameter(state["keys"].to(dev))
        self.head.grow(state["head"]["weight"].shape[0])
        self.head.load_state_dict(state["head"])
        self.id_share = list(state["id_share"])
        self.n_old = self.pool.size
