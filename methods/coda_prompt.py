"""CODA-Prompt (Smith et al., CVPR 2023), with LAMDA-PILOT's ``exps/coda_prompt.json`` settings.

- Frozen ViT; query q(x) = CLS feature of a frozen pass (cached for un-augmented images).
- In each block of ``layers`` (0–4): M = 100 prompt components P_m ∈ R^{L×d} (L = 8), keys K_m and
  attention vectors A_m ∈ R^d. The prompt is a weighted sum P = Σ_m α_m P_m with
  α_m = cos(q ⊙ A_m, K_m) (no softmax), computed as (q·(A_m ⊙ K̂_m)) / ‖q ⊙ A_m‖ without building the
  (B, M, d) product. P's first L/2 rows prefix the attention keys, the last L/2 the values.
- The pool is split over tasks: task t trains components [t·p, (t+1)·p) with p = M // T; earlier
  ones enter detached. At the start of each task the new components are re-drawn orthonormal to all
  earlier ones (Gram-Schmidt via QR, as the reference does when the dimension allows). With T > M
  the reference's p would be 0; cilbench then gives every task one component (the pool grows to T),
  and documents it.
- Head: linear on the final CLS token; cross-entropy with old classes' logits masked; optional
  orthogonality penalty ``ortho_mu`` (0 in the released configs). Adam, lr 0.001 with a cosine
  schedule, batch 128, 20 epochs, optimizer re-initialised every task.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cilbench.config import bounded
from cilbench.data.base import Batch
from cilbench.engine import Schedule
from cilbench.errors import ConfigError
from cilbench.method import Task
from cilbench.methods.common.losses import current_task_ce
from cilbench.methods.common.prompts import PrefixHooks, PromptMethod
from cilbench.registry import register_method


@dataclass(frozen=True)
class CODAPromptConfig:
    pool_size: int = bounded(100, 1)
    length: int = bounded(8, 2)
    layers: tuple[int, ...] = (0, 1, 2, 3, 4)
    ortho_mu: float = bounded(0.0, 0.0)
    lr: float = bounded(0.001, 0.0)
    min_lr: float = 1e-5
    batch_size: int = bounded(128, 1)
    epochs: int = bounded(20, 0)

    def __post_init__(self):
        if self.length % 2:
            raise ConfigError(f"method.length = {self.length} is odd", "use an even length (half keys, half values)")


@torch.no_grad()
def orthonormal_rows(existing: torch.Tensor, n_new: int) -> torch.Tensor:
    """``n_new`` random unit rows orthogonal to the span of ``existing`` (k, D) when k + n_new ≤ D;
    otherwise plain random unit rows (no room left for orthogonality)."""
    k, dim = existing.shape
    fresh = torch.randn(n_new, dim, device=existing.device)
    if k + n_new > dim:
        return F.normalize(fresh, dim=1)
    q, _ = torch.linalg.qr(torch.cat([existing, fresh]).T)   # columns: orthonormal basis, in order
    return q[:, k:].T.contiguous()


@register_method("coda-prompt")
class CODAPrompt(PromptMethod):
    """CODA-Prompt: attention-weighted prompt components as attention prefixes of a frozen ViT."""

    Config = CODAPromptConfig
    state_attrs: ClassVar[tuple] = ("n_learned",)

    def build(self, backbone, info) -> None:
        c, d = self.cfg, backbone.embed_dim
        bad = [i for i in c.layers if not 0 <= i < backbone.depth]
        if bad:
            raise ConfigError(f"prompt layers {bad} do not exist in a {backbone.depth}-block ViT",
                              f"use blocks 0..{backbone.depth - 1} in method.layers")
        self.per_task = max(1, c.pool_size // info.n_tasks)
        m, n_l, dev = self.per_task * info.n_tasks, len(c.layers), self.ctx.device
        self.P = nn.Parameter(torch.zeros(n_l, m, c.length, d, device=dev))
        self.K = nn.Parameter(torch.zeros(n_l, m, d, device=dev))
        self.A = nn.Parameter(torch.zeros(n_l, m, d, device=dev))
        self.n_learned = 0  # components of finished tasks

    def _init_components(self, start: int, stop: int) -> None:
        """Draw components [start, stop) orthonormal to [0, start) in every layer and tensor."""
        for t in (self.P, self.K, self.A):
            flat = t.data.flatten(2)                               # (n_l, M, D)
            for layer in range(flat.shape[0]):
                flat[layer, start:stop] = orthonormal_rows(flat[layer, :start], stop - start)

    def components(self, training: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(P, K, A) in use: the finished tasks' components, plus the current task's when training
        (the finished ones then enter detached, so only the current slice learns)."""
        s = self.n_learned
        if not training:
            return self.P[:, :s], self.K[:, :s], self.A[:, :s]
        f = s + self.per_task
        return tuple(torch.cat([t[:, :s].detach(), t[:, s:f]], 1) for t in (self.P, self.K, self.A))

    @staticmethod
    def weights(query: torch.Tensor, K: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """α (n_l, B, m) = cos(q ⊙ A_m, K_m) = q·(A_m ⊙ K̂_m) / ‖q ⊙ A_m‖."""
        num = torch.einsum("bd,lmd->lbm", query, A * F.normalize(K, dim=2))
        den = torch.einsum("bd,lmd->lbm", query.square(), A.square()).clamp_min(1e-24).sqrt()
        return num / den

    def forward(self, batch: Batch, task: Task | None):
        P, K, A = self.components(task is not None)
        prompts = torch.einsum("lbm,lmtd->lbtd", self.weights(self.queries(batch), K, A), P)  # (n_l, B, L, d)
        half = self.cfg.length // 2
        hooks = PrefixHooks({i: torch.stack([prompts[j, :, :half], prompts[j, :, half:]], 1)
                             for j, i in enumerate(self.cfg.layers)})
        penalty = None  # subtracted: minus the orthogonality penalty adds it
        if task is not None and self.cfg.ortho_mu > 0:
            penalty = -(self.cfg.ortho_mu * self.ortho_penalty())
        return self.head(self.backbone(batch.images, hooks)), penalty

    def ortho_penalty(self) -> torch.Tensor:
        stop = self.n_learned + self.per_task
        total = self.P.new_zeros(())
        for t in (self.P, self.K, self.A):
            flat = t[:, :stop].flatten(2)
            gram = flat @ flat.transpose(1, 2)
            total = total + (gram - torch.eye(stop, device=gram.device)).square().mean()
        return total

    def task_loss(self, logits, labels, task) -> torch.Tensor:
        return current_task_ce(logits, labels, task)   # always masked

    def schedule(self) -> Schedule:
        """Adam with a per-epoch cosine to ``min_lr`` (PILOT's coda_prompt)."""
        c = self.cfg
        return Schedule(c.epochs, c.lr, "adam", cosine_to=c.min_lr, step_every="epoch")

    def before_task(self, task: Task) -> None:
        self._init_components(self.n_learned, self.n_learned + self.per_task)

    def after_task(self, task: Task) -> None:
        self.n_learned += self.per_task
