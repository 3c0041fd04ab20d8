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
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cilbench.config import check_range
from cilbench.data.base import Batch
from cilbench.errors import ConfigError
from cilbench.features import FeatureCache
from cilbench.method import Method, Task
from cilbench.registry import register_method
from methods.common.classifiers import GrowingLinear
from methods.common.training import adam_epochs, current_task_ce
from methods.dualprompt import PrefixHooks


@dataclass(frozen=True)
class CODAPromptConfig:
    pool_size: int = 100
    length: int = 8
    layers: tuple[int, ...] = (0, 1, 2, 3, 4)
    ortho_mu: float = 0.0
    lr: float = 0.001
    min_lr: float = 1e-5
    batch_size: int = 128
    epochs: int = 20

    def __post_init__(self):
        check_range("method.pool_size", self.pool_size, 1)
        check_range("method.length", self.length, 2)
        if self.length % 2:
            raise ConfigError(f"method.length = {self.length} is odd", "use an even length (half keys, half values)")
        check_range("method.ortho_mu", self.ortho_mu, 0.0)
        check_range("method.lr", self.lr, 0.0)
        check_range("method.batch_size", self.batch_size, 1)
        check_range("method.epochs", self.epochs, 0)


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
class CODAPrompt(Method):
    """CODA-Prompt: attention-weighted prompt components as attention prefixes of a frozen ViT."""

    Config = CODAPromptConfig
    # tiny ViT: 4 blocks; 20 epochs of batch 128 is already CPU-sized, so only the layers change
    synthetic_defaults: ClassVar[dict] = {"layers": (0, 1, 2, 3)}

    def setup(self, backbone, info) -> None:
        super().setup(backbone, info)
        c, d = self.cfg, backbone.embed_dim
        bad = [i for i in c.layers if not 0 <= i < backbone.depth]
        if bad:
            raise ConfigError(f"prompt layers {bad} do not exist in a {backbone.depth}-block ViT",
                              f"use blocks 0..{backbone.depth - 1} in method.layers")
        self.backbone.eval().requires_grad_(False)
        self.per_task = max(1, c.pool_size // info.n_tasks)
        m, n_l, dev = self.per_task * info.n_tasks, len(c.layers), self.ctx.device
        self.P = nn.Parameter(torch.zeros(n_l, m, c.length, d, device=dev))
        self.K = nn.Parameter(torch.zeros(n_l, m, d, device=dev))
        self.A = nn.Parameter(torch.zeros(n_l, m, d, device=dev))
        self.head = GrowingLinear(d).to(dev)
        self.hooks = PrefixHooks()
        self.queries = FeatureCache(self.backbone)
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

    def forward(self, batch: Batch, training: bool) -> torch.Tensor:
        P, K, A = self.components(training)
        prompts = torch.einsum("lbm,lmtd->lbtd", self.weights(self.queries(batch), K, A), P)  # (n_l, B, L, d)
        half = self.cfg.length // 2
        self.hooks.prefixes = {i: torch.stack([prompts[j, :, :half], prompts[j, :, half:]], 1)
                               for j, i in enumerate(self.cfg.layers)}
        try:
            feats = self.backbone(batch.images, self.hooks)
        finally:
            self.hooks.prefixes = {}
        return self.head(feats)

    def ortho_penalty(self) -> torch.Tensor:
        stop = self.n_learned + self.per_task
        total = self.P.new_zeros(())
        for t in (self.P, self.K, self.A):
            flat = t[:, :stop].flatten(2)
            gram = flat @ flat.transpose(1, 2)
            total = total + (gram - torch.eye(stop, device=gram.device)).square().mean()
        return total

    def loss(self, batch: Batch, task: Task) -> torch.Tensor:
        loss = current_task_ce(self.forward(batch, training=True), batch.labels, task)
        if self.cfg.ortho_mu > 0:
            loss = loss + self.cfg.ortho_mu * self.ortho_penalty()
        return loss

    def learn(self, task: Task) -> None:
        c = self.cfg
        self.head.grow(task.total)
        self._init_components(self.n_learned, self.n_learned + self.per_task)
        adam_epochs([self.P, self.K, self.A, self.head.weight, self.head.bias], task.train_loader(c.batch_size),
                    lambda b: self.loss(b, task), c.epochs, c.lr, self.ctx, cosine_min_lr=c.min_lr)
        self.n_learned += self.per_task

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        with self.ctx.autocast():
            return self.forward(batch, training=False).float()

    def modules(self):
        return [self.backbone, nn.ParameterList([self.P, self.K, self.A]), self.head]

    def state_dict(self) -> dict[str, Any]:
        return {"P": self.P.detach().cpu(), "K": self.K.detach().cpu(), "A": self.A.detach().cpu(),
                "n_learned": self.n_learned, "head": self.head.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for name in ("P", "K", "A"):
                getattr(self, name).copy_(state[name])
        self.n_learned = state["n_learned"]
        self.head.grow(state["head"]["weight"].shape[0])
        self.head.load_state_dict(state["head"])
