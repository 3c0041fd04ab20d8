"""Bi-level routing mixture of experts (CaRE's BR-MoE), one module per ViT block.

Per task t the module appends a triplet: an expert adapter E_t, a router R_t = Linear(d, t+1) over
experts 0..t, and a perceptron C_t = LayerNorm + Linear(d, |G_t|). Routers and perceptrons read the
CLS row of *their own expert's output* ("After Adapter", the released default).

Forward (spec methods.md §1.3), with x the block input z_a:
  out_e = E_e(x), c_e = out_e[:, 0];  H_e = entropy(softmax(C_e(c_e)))   (unscaled logits)
  router set S: training / semi-dynamic with task id t -> R_t forced + the M-1 lowest-entropy routers
  among 0..t-1; inference (task unknown) -> the M lowest-entropy routers among all T.
  Each selected router row keeps its top-K logits and fills the rest with -100 (not -inf, as
  released); w = softmax(row); z_r = Σ_{r∈S} Σ_e w_{r,e} out_e  (a sum over routers);
  BRMoE(x) = z_r + shared(x).
The shared adapter is pinned to a snapshot by the released code's anchored "EMA": on every
training-mode forward θ ← μ·θ̂ + (1-μ)·θ, with θ̂ taken at the start of each training stage and
dropped when the module enters eval mode.
This is the dense reference path: every expert runs on every token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from methods.common.adapters import Adapter, average_into


@dataclass(frozen=True)
class BRMoEConfig:
    expert_dim: int = 16
    shared_dim: int = 64
    topk_experts: int = 3        # K
    topk_routers: int = 2        # M
    dropout: float = 0.1
    ema_mu: float = 0.999
    fill: float = -100.0         # value for router logits outside the top-K (released: -100)
    expert_init: Literal["released", "all"] = "released"
    entropy_norm: bool = False   # divide perceptron entropies by log(|G_e|)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """H = -Σ p log(p + 1e-10), p = softmax(logits) (the released formula)."""
    p = logits.float().softmax(-1)
    return -(p * torch.log(p + 1e-10)).sum(-1)


class BRMoE(nn.Module):
    def __init__(self, dim: int, cfg: BRMoEConfig):
        super().__init__()
        self.dim, self.cfg = dim, cfg
        self.shared = Adapter(dim, cfg.shared_dim, cfg.dropout)
        self.experts = nn.ModuleList()
        self.routers = nn.ModuleList()
        self.perceptrons = nn.ModuleList()
        self._anchor: list[torch.Tensor] | None = None

    @property
    def n_tasks(self) -> int:
        return len(self.experts)

    def add_task(self, n_classes: int) -> None:
        """Append (E_t, R_t, C_t); freeze everything but the shared adapter and the new triplet."""
        t = self.n_tasks
        expert = Adapter(self.dim, self.cfg.expert_dim, self.cfg.dropout)
        # Released: task t >= 2 starts from the mean of experts 0..t-2 (the newest is left out);
        # "all": task t >= 1 starts from the mean of experts 0..t-1.
        sources = list(self.experts[: t - 1]) if self.cfg.expert_init == "released" else list(self.experts)
        if sources and (t >= 2 or self.cfg.expert_init == "all"):
            average_into(expert, sources)
        router = nn.Linear(self.dim, t + 1)
        nn.init.trunc_normal_(router.weight, std=0.02)
        nn.init.zeros_(router.bias)
        perceptron = nn.Sequential(nn.LayerNorm(self.dim), nn.Linear(self.dim, n_classes))
        nn.init.trunc_normal_(perceptron[0].weight, std=0.02)  # released quirk: LN gain starts ≈ 0
        device = self.shared.scale.device
        self.experts.append(expert.to(device))
        self.routers.append(router.to(device))
        self.perceptrons.append(perceptron.to(device))
        self.requires_grad_(False)
        for m in (self.shared, expert, router, perceptron):
            m.requires_grad_(True)

    # ---- the anchored "EMA" of the shared adapter -----------------------------------------
    def snapshot_shared(self) -> None:
        self._anchor = [p.detach().clone() for p in self.shared.parameters()]

    def train(self, mode: bool = True) -> "BRMoE":
        super().train(mode)
        if not mode:
            self._anchor = None
        return self

    @torch.no_grad()
    def _pull_shared(self) -> None:
        if self.training and self._anchor is not None:
            mu = self.cfg.ema_mu
            for p, a in zip(self.shared.parameters(), self._anchor):
                p.mul_(1 - mu).add_(a, alpha=mu)

    # ---- forward --------------------------------------------------------------------------
    def entropies(self, cls_rows: torch.Tensor, upto: int) -> torch.Tensor:
        """(B, upto) perceptron entropies of tasks 0..upto-1 from their experts' CLS rows."""
        cols = []
        for e in range(upto):
            h = entropy(self.perceptrons[e](cls_rows[:, e]))
            if self.cfg.entropy_norm:
                h = h / torch.log(torch.tensor(float(max(2, self.perceptrons[e][1].out_features))))
            cols.append(h)
        return torch.stack(cols, 1)

    def select_routers(self, cls_rows: torch.Tensor, task: int | None) -> torch.Tensor:
        """(B, |S|) indices of the routers used per sample."""
        b = cls_rows.shape[0]
        m = self.cfg.topk_routers
        if task is None:
            n = cls_rows.shape[1]
            k = min(m, n)
            return torch.topk(-self.entropies(cls_rows, n), k, dim=1).indices
        forced = torch.full((b, 1), task, dtype=torch.long, device=cls_rows.device)
        k = min(m - 1, task)
        if k <= 0:
            return forced
        prev = torch.topk(-self.entropies(cls_rows, task), k, dim=1).indices
        return torch.cat([forced, prev], 1)

    def expert_weights(self, cls_rows: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """(B, E) mixture weights: per selected router top-K softmax, summed over routers."""
        b, n_exp = cls_rows.shape[:2]
        logits = torch.full((b, n_exp, n_exp), float("-inf"), device=cls_rows.device, dtype=torch.float32)
        for r in range(n_exp):  # router r scores experts 0..r from its own expert's CLS row
            logits[:, r, : r + 1] = self.routers[r](cls_rows[:, r]).float()
        rows = logits.gather(1, selected[:, :, None].expand(-1, -1, n_exp))       # (B, |S|, E)
        k = self.cfg.topk_experts
        if k < n_exp:
            keep = torch.zeros_like(rows, dtype=torch.bool).scatter_(2, rows.topk(k, dim=2).indices, True)
            rows = torch.where(keep, rows, torch.full_like(rows, self.cfg.fill))
        return rows.softmax(-1).sum(1)

    def forward(self, x: torch.Tensor, task: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(BRMoE(x), current perceptron logits when ``task`` is given, else None)."""
        self._pull_shared()
        n_exp = self.n_tasks if task is None else task + 1
        outs = torch.stack([self.experts[e](x) for e in range(n_exp)], 1)          # (B, E, N, d)
        cls_rows = outs[:, :, 0]
        weights = self.expert_weights(cls_rows, self.select_routers(cls_rows, task))
        mixed = torch.einsum("be,bend->bnd", weights.to(outs.dtype), outs)
        latent = self.perceptrons[task](cls_rows[:, task]) if task is not None else None
        return mixed + self.shared(x), latent
