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
- ``sparse``: all experts on the CLS row only (one batched matmul over stacked, LayerNorm-folded
  expert weights), routing from those rows, then only the <= M·K experts with weight on the other
  tokens. The CLS rows used for routing are also the CLS row of the mixture. Experts outside the
  selected top-K get weight e^-100 ≈ 3.7e-44 in the released code; the sparse path drops them
  (the -inf semantics), which is below float32 resolution unless the top router logit is < ≈ -78.
  Old experts' stacked weights are cached (they are frozen), so cost and activations no longer
  grow with the number of tasks beyond the CLS rows and the selected routers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
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
    dispatch: Literal["sparse", "dense"] = "sparse"


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
        self._version = 0            # bumped when experts or perceptrons change structure/values
        self._cache: dict = {}

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
        if self.cfg.dispatch == "sparse":
            return self._grouped_entropies(cls_rows, upto)
        cols = [entropy(self.perceptrons[e](cls_rows[:, e])) for e in range(upto)]
        return self._normalise(torch.stack(cols, 1), upto)

    def _normalise(self, h: torch.Tensor, upto: int) -> torch.Tensor:
        if not self.cfg.entropy_norm:
            return h
        sizes = torch.tensor([float(max(2, p[1].out_features)) for p in self.perceptrons[:upto]], device=h.device)
        return h / sizes.log()

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
    def _stacks(self, kind: str, modules: list[nn.Module], n: int, build) -> tuple[list | None, list | None]:
        """(frozen, live) stacked tensors of modules[:n]. Frozen modules come from a cache, rebuilt only
        when the structure changes; the trainable one (only the newest can be: ``add_task`` freezes
        the rest) is built live so gradients reach it."""
        n_frozen = len(modules)
        if modules and any(p.requires_grad for p in modules[-1].parameters()):
            n_frozen -= 1
        key = (self._version, n_frozen, self.shared.scale.device)
        cached = self._cache.get(kind)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, build(modules[:n_frozen]) if n_frozen else None)
            self._cache[kind] = cached
        frozen = [t[:n] for t in cached[1]] if cached[1] is not None and n > 0 else None
        live = build(modules[n_frozen:n]) if n > n_frozen else None
        return frozen, live

    @staticmethod
    def _fold_experts(experts: list[Adapter]) -> list[torch.Tensor]:
        """Fold each expert's LayerNorm affine into W_down and its scale into W_up:
        A(x) = W2 · Dropout(ReLU(W1 · norm(x) + b1)) + b2, with norm(x) the affine-free LayerNorm."""
        w1 = torch.stack([e.down.weight * e.ln.weight[None, :] for e in experts])          # (E, r, d)
        b1 = torch.stack([e.down.weight @ e.ln.bias + e.down.bias for e in experts])       # (E, r)
        w2 = torch.stack([e.up.weight * e.scale[:, None] for e in experts])                # (E, d, r)
        b2 = torch.stack([e.up.bias * e.scale for e in experts])                           # (E, d)
        return [w1, b1, w2, b2]

    @staticmethod
    def _stack_perceptrons(perceptrons: list[nn.Module]) -> list[torch.Tensor]:
        return [torch.stack([p[0].weight for p in perceptrons]), torch.stack([p[0].bias for p in perceptrons])]

    @staticmethod
    def _stack_linears(linears: list[nn.Linear]) -> list[torch.Tensor]:
        return [torch.stack([m.weight for m in linears]), torch.stack([m.bias for m in linears])]

    @staticmethod
    def _joined(frozen: list | None, live: list | None) -> list[torch.Tensor]:
        if frozen is None or live is None:
            return frozen if live is None else live
        return [torch.cat([f, l]) for f, l in zip(frozen, live)]

    @torch.no_grad()
    def _grouped_entropies(self, cls_rows: torch.Tensor, upto: int) -> torch.Tensor:
        """Entropies of perceptrons 0..upto-1, one batched matmul per distinct output size.
        Routing is not differentiable, so this runs without autograd."""
        b, d = cls_rows.shape[0], cls_rows.shape[2]
        out = cls_rows.new_empty(b, upto, dtype=torch.float32)
        ln_w, ln_b = self._joined(*self._stacks("perceptron_ln", list(self.perceptrons), upto, self._stack_perceptrons))
        normed = F.layer_norm(cls_rows[:, :upto], (d,), eps=self.perceptrons[0][0].eps) * ln_w + ln_b
        sizes = [p[1].out_features for p in self.perceptrons]
        for size in sorted(set(sizes[:upto])):
            group = [e for e, g in enumerate(sizes) if g == size]      # over all tasks: a stable cache
            idx = [e for e in group if e < upto]                        # a prefix of the group
            w, bias = self._joined(*self._stacks(f"perceptron_fc{size}", [self.perceptrons[e][1] for e in group],
                                                 len(idx), self._stack_linears))
            out[:, idx] = entropy(torch.einsum("bnd,ngd->bng", normed[:, idx], w) + bias)
        return self._normalise(out, upto)

    def _sparse_router_logits(self, cls_rows: torch.Tensor, live_row: torch.Tensor | None,
                              selected: torch.Tensor) -> torch.Tensor:
        """(B, |S|, E) logits of the selected routers only; a loop over the distinct routers
        selected in the batch (at most B·M, independent of the number of tasks). ``cls_rows`` is
        detached; the trainable router reads the live expert's row so its gradient flows."""
        b, n_exp = cls_rows.shape[:2]
        logits = torch.full((b, selected.shape[1], n_exp), float("-inf"), device=cls_rows.device)
        for r in torch.unique(selected).tolist():
            bi, si = (selected == r).nonzero(as_tuple=True)
            src = live_row[bi, 0] if live_row is not None and r == n_exp - 1 else cls_rows[bi, r]
            logits[bi, si, : r + 1] = self.routers[r](src).float()
        return logits

    @staticmethod
    def _expert_rows(normed_cls: torch.Tensor, w1, b1, w2, b2, p: float, training: bool) -> torch.Tensor:
        """(B, E, d) outputs of the stacked experts on one (normalised) token per sample."""
        h = F.dropout(torch.relu(torch.einsum("bd,erd->ber", normed_cls, w1) + b1), p, training)
        return torch.einsum("ber,edr->bed", h, w2) + b2

    @staticmethod
    def _pick(frozen: torch.Tensor | None, live: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor:
        """Per-sample gather of expert tensors; the live expert (index = #frozen) is substituted with
        ``torch.where`` so no stack of all experts ever enters the autograd graph."""
        if live is None:
            return frozen[idx]
        if frozen is None:
            return live[idx.clamp(max=0)]
        n_frozen = frozen.shape[0]
        picked = frozen[idx.clamp(max=n_frozen - 1)]
        is_live = (idx == n_frozen).view(*idx.shape, *([1] * (picked.dim() - idx.dim())))
        return torch.where(is_live, live[0], picked)

    def _forward_sparse(self, x: torch.Tensor, task: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        n_exp = self.n_tasks if task is None else task + 1
        frozen, live = self._stacks("experts", list(self.experts), n_exp, self._fold_experts)
        p = self.cfg.dropout if self.training else 0.0
        normed = F.layer_norm(x, (x.shape[-1],), eps=self.experts[0].ln.eps)
        # 1) every expert on the CLS row only; old (frozen) experts without autograd
        parts, live_row = [], None
        if frozen is not None:
            with torch.no_grad():
                parts.append(self._expert_rows(normed[:, 0], *frozen, p, self.training))
        if live is not None:
            live_row = self._expert_rows(normed[:, 0], *live, p, self.training)             # (B, 1, d)
            parts.append(live_row.detach())
        cls_rows = torch.cat(parts, 1) if len(parts) > 1 else parts[0]                     # (B, E, d), no grad
        # 2) routing from the CLS rows (selection itself is not differentiable)
        selected = self.select_routers(cls_rows, task)
        rows = self._sparse_router_logits(cls_rows, live_row, selected)
        k = self.cfg.topk_experts
        if k < n_exp:
            keep = torch.zeros_like(rows, dtype=torch.bool).scatter_(2, rows.detach().topk(k, dim=2).indices, True)
            rows = rows.masked_fill(~keep, float("-inf"))
        weights = rows.softmax(-1).sum(1)                                                    # (B, E)
        used = min(n_exp, self.cfg.topk_routers * k)
        wt, idx = weights.topk(used, dim=1)                                                  # (B, U)
        # 3) mixture: CLS row from the routing rows, other tokens from the selected experts only
        picked_rows = cls_rows.gather(1, idx[:, :, None].expand(-1, -1, cls_rows.shape[2]))  # (B, U, d)
        if live_row is not None:
            picked_rows = torch.where((idx == n_exp - 1)[:, :, None], live_row, picked_rows)
        first = torch.einsum("bu,bud->bd", wt.to(picked_rows.dtype), picked_rows)[:, None]
        f = frozen if frozen is not None else [None] * 4
        l_ = live if live is not None else [None] * 4
        w1, b1, w2, b2 = (self._pick(fr, lv, idx) for fr, lv in zip(f, l_))
        h = torch.einsum("bnd,burd->bunr", normed[:, 1:], w1) + b1[:, :, None]
        h = F.dropout(torch.relu(h), p, self.training) * wt[:, :, None, None].to(h.dtype)
        rest = torch.einsum("bunr,budr->bnd", h, w2) + torch.einsum("bu,bud->bd", wt.to(b2.dtype), b2)[:, None]
        latent = None
        if task is not None:
            own = live_row[:, 0] if live_row is not None and task == n_exp - 1 else cls_rows[:, task]
            latent = self.perceptrons[task](own)
        return torch.cat([first, rest], 1) + self.shared(x), latent
