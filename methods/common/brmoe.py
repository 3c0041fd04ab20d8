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
Two dispatch paths compute the same function (spec §5.2):
- ``dense`` (the released code): every expert runs on every token; the (B, E, N, d) stack is kept.
- ``sparse``: every expert's r-dim hidden state on the CLS row only (one matmul over stacked,
  LayerNorm-folded expert weights); perceptron entropies and router logits computed from those
  hidden states with the frozen experts folded into their perceptrons and routers
  (``folded_experts.py``), so the (B, E, d) stack of CLS outputs is never formed; then only the
  <= M·K experts with weight run on all tokens. Experts outside the selected top-K get weight
  e^-100 ≈ 3.7e-44 in the released code; the sparse path drops them (the -inf semantics), which is
  below float32 resolution unless the top router logit is < ≈ -78. Frozen experts' folded stacks
  are cached, so cost no longer grows with the number of tasks beyond B·T·r hidden numbers, and the
  activations saved for backward beyond the selected routers' rows (B·M·T). The block input's
  gradient is the released one: it flows through the chosen routers and experts (``CLSHidden``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cilbench.methods.common.adapters import Adapter, average_into
from cilbench.methods.common.folded_experts import (CLSHidden, FoldedExperts, entropy, fold, fold_adapters,
                                           perceptron_logits_entropy, router_logits, stacked_rows)


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
    dispatch: Literal["sparse", "dense"] = "sparse"


class BRMoE(nn.Module):
    def __init__(self, dim: int, cfg: BRMoEConfig):
        super().__init__()
        self.dim, self.cfg = dim, cfg
        self.shared = Adapter(dim, cfg.shared_dim, cfg.dropout)
        self.experts = nn.ModuleList()
        self.routers = nn.ModuleList()
        self.perceptrons = nn.ModuleList()
        self._anchor: list[torch.Tensor] | None = None
        self._version = 0            # bumped when experts or perceptrons change structure/values
        self._cache: dict = {}
        # the last forward's routing decisions (sparse path), for diagnostics and tests
        self.last_selected: torch.Tensor | None = None
        self.last_experts: torch.Tensor | None = None

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
        self._version += 1

    def _load_from_state_dict(self, *args, **kwargs):
        self._version += 1
        return super()._load_from_state_dict(*args, **kwargs)

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
        cols = [entropy(self.perceptrons[e](cls_rows[:, e])) for e in range(upto)]
        return self._normalise(torch.stack(cols, 1), upto)

    def _normalise(self, h: torch.Tensor, upto: int) -> torch.Tensor:
        if not self.cfg.entropy_norm:
            return h
        sizes = torch.tensor([float(max(2, p[1].out_features)) for p in self.perceptrons[:upto]], device=h.device)
        return h / sizes.log()

    def select_routers(self, cls_rows: torch.Tensor, task: int | None) -> torch.Tensor:
        """(B, |S|) indices of the routers used per sample, from the experts' CLS rows (B, E, d)."""
        return self._select(lambda upto: self.entropies(cls_rows, upto), cls_rows.shape[1], task,
                            cls_rows.shape[0], cls_rows.device)

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
        if self.cfg.dispatch == "sparse":
            return self._forward_sparse(x, task)
        n_exp = self.n_tasks if task is None else task + 1
        outs = torch.stack([self.experts[e](x) for e in range(n_exp)], 1)          # (B, E, N, d)
        cls_rows = outs[:, :, 0]
        weights = self.expert_weights(cls_rows, self.select_routers(cls_rows, task))
        mixed = torch.einsum("be,bend->bnd", weights.to(outs.dtype), outs)
        latent = self.perceptrons[task](cls_rows[:, task]) if task is not None else None
        return mixed + self.shared(x), latent

    # ---- sparse dispatch --------------------------------------------------------------------
    def _folded(self) -> FoldedExperts | None:
        """The folded stacks of the frozen experts (all but a trainable newest one), rebuilt only
        when the structure or the weights change (``add_task``, ``load_state_dict``, freezing)."""
        n_frozen = self.n_tasks
        if n_frozen and any(p.requires_grad for p in self.experts[-1].parameters()):
            n_frozen -= 1
        key = (self._version, n_frozen, self.shared.scale.device)
        if self._cache.get("key") != key:
            self._cache = {"key": key, "folded": fold(list(self.experts[:n_frozen]), list(self.routers[:n_frozen]),
                                                       list(self.perceptrons[:n_frozen])) if n_frozen else None}
        return self._cache["folded"]

    def cached_tensors(self) -> list[torch.Tensor]:
        """Tensors held by the frozen-expert cache (parameter-like: they do not grow with the batch)."""
        folded = self._cache.get("folded")
        return folded.tensors() if folded is not None else []

    def _forward_sparse(self, x: torch.Tensor, task: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        n_exp = self.n_tasks if task is None else task + 1
        folded = self._folded()
        n_fz = min(folded.n, n_exp) if folded is not None else 0
        has_live = n_exp > n_fz                         # then the live expert is index n_fz = n_exp - 1
        p = self.cfg.dropout if self.training else 0.0
        normed = F.layer_norm(x, (x.shape[-1],), eps=self.experts[0].ln.eps)
        b = x.shape[0]
        # 1) every frozen expert's hidden state on the CLS row, one matmul over the frozen stack. The
        #    states of the experts and routers the output uses stay in the autograd graph: the frozen
        #    weights need no gradient, but the block input does, and in the released code it flows back
        #    through them into the trainable parts of earlier blocks (``CLSHidden``)
        cls_h = h_fz = None
        if n_fz:
            cls_h = CLSHidden(normed[:, 0], folded.w1[:n_fz], folded.b1[:n_fz], p, self.training)
            h_fz = cls_h.values()                                                                  # (B, F, r)
        out_live = live_row = None
        if has_live:  # the trainable expert runs on all tokens with autograd; its CLS row routes
            w1, b1, w2t, b2 = (t[0] for t in fold_adapters([self.experts[n_fz]]))
            out_live = F.dropout(torch.relu(normed @ w1.T + b1), p, self.training) @ w2t + b2        # (B, N, d)
            live_row = out_live[:, :1]

        # 2) routing: the choice of routers and experts (integers) from entropies computed without
        #    gradient; the chosen routers' logits are differentiable, as in the released code
        def entropies(upto: int) -> torch.Tensor:
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                cols = [perceptron_logits_entropy(folded, h_fz, min(upto, n_fz))] if n_fz and upto else []
                if upto > n_fz:
                    cols.append(entropy(self.perceptrons[n_fz](live_row[:, 0]))[:, None])
                return self._normalise(torch.cat(cols, 1), upto)

        selected = self._select(entropies, n_exp, task, b, x.device)
        self.last_selected = selected
        rows = x.new_full((b, selected.shape[1], n_exp), float("-inf"), dtype=torch.float32)
        if n_fz:
            rows = router_logits(folded, cls_h.rows(selected.clamp(max=n_fz - 1)), selected, n_exp).float()
        if has_live:
            is_live = (selected == n_fz)[:, :, None]
            live_logits = self.routers[n_fz](live_row[:, 0]).float()                                  # (B, n_exp)
            rows = torch.where(is_live, live_logits[:, None, :], rows)
        k = self.cfg.topk_experts
        if k < n_exp:
            keep = torch.zeros_like(rows, dtype=torch.bool).scatter_(2, rows.detach().topk(k, dim=2).indices, True)
            rows = rows.masked_fill(~keep, float("-inf"))
        weights = rows.softmax(-1).sum(1)                                                           # (B, E)
        wt, idx = weights.topk(min(n_exp, self.cfg.topk_routers * k), dim=1)                       # (B, U)
        self.last_experts = idx

        # 3) mixture: only the <= M·K selected experts; the CLS row reuses the routing hidden states
        mixed = self._frozen_mixture(folded, normed, cls_h, wt, idx, n_fz, p) if n_fz else 0
        if has_live:  # weighted by its (differentiable) mixture weight
            wt_live = (wt * (idx == n_fz)).sum(1)[:, None, None]                                       # (B, 1, 1)
            mixed = mixed + wt_live * out_live
        latent = None
        if task is not None:
            if task == n_fz and has_live:
                own = live_row[:, 0]
            else:
                own = cls_h.rows(torch.full((b, 1), task, device=x.device))[:, 0] @ folded.w2t[task] + folded.b2[task]
            latent = self.perceptrons[task](own)
        return mixed + self.shared(x), latent

    def _frozen_mixture(self, f: FoldedExperts, normed: torch.Tensor, cls_h: CLSHidden, wt: torch.Tensor,
                        idx: torch.Tensor, n_fz: int, p: float) -> torch.Tensor:
        """Σ_u wt_u · E_idx_u(x) over the selected frozen experts (slots holding the live expert get
        weight 0). Down-projection: the selected experts' W1 rows gathered per sample, one batched
        matmul (the CLS row reuses the routing hidden states). Up-projection: per token a sum of
        U·r rows of the stacked W2ᵀ weighted by wt·h, one ``embedding_bag`` that reads the rows in
        place instead of gathering a (B, U·r, d) copy (2.5x faster on the tiny ViT at T = 301)."""
        b, u = idx.shape
        n = normed.shape[1]
        r, d = f.w1.shape[1:]
        wt = wt.masked_fill(idx >= n_fz, 0)
        experts = idx.clamp(max=n_fz - 1)
        flat = experts.flatten()
        w1 = f.w1.index_select(0, flat).view(b, u * r, d)
        b1 = f.b1.index_select(0, flat).view(b, 1, u * r)
        h = F.dropout(torch.relu(torch.baddbmm(b1, normed[:, 1:], w1.transpose(1, 2))), p, self.training)
        h_cls = cls_h.rows(experts).reshape(b, 1, u * r)
        h = torch.cat([h_cls.to(h.dtype), h], 1) * wt.to(h.dtype).repeat_interleave(r, 1)[:, None]   # (B, N, U·r)
        rows = stacked_rows(experts, r).view(b, 1, u * r)
        table = f.w2t.view(-1, d)
        out = F.embedding_bag(rows.expand(b, n, u * r).reshape(b * n, u * r), table,
                              per_sample_weights=h.reshape(b * n, u * r).to(table.dtype), mode="sum")
        bias = F.embedding_bag(experts, f.b2, per_sample_weights=wt.to(f.b2.dtype), mode="sum")     # (B, d)
        return (out.view(b, n, d) + bias[:, None]).to(normed.dtype)

    def _select(self, entropies, n_exp: int, task: int | None, b: int, device) -> torch.Tensor:
        """(B, |S|) routers per sample: the M lowest entropies, or the current task's router plus
        the M-1 lowest among earlier tasks in training (the same rule as ``select_routers``)."""
        m = self.cfg.topk_routers
        if task is None:
            return torch.topk(-entropies(n_exp), min(m, n_exp), dim=1).indices
        forced = torch.full((b, 1), task, dtype=torch.long, device=device)
        k = min(m - 1, task)
        if k <= 0:
            return forced
        return torch.cat([forced, torch.topk(-entropies(task), k, dim=1).indices], 1)
