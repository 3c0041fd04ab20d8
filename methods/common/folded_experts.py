"""CaRE's routing computed in the experts' bottleneck space (the sparse dispatch's maths).

An expert's CLS output is y = W2·h + b2 with h = Dropout(ReLU(W1·n + b1)) its r-dim hidden state,
n the affine-free LayerNorm of the block input's CLS row (LayerNorm affine folded into W1, b1; the
scale folded into W2, b2). Everything routing needs from y is linear or quadratic in h, so the
(B, T, d) stack of CLS outputs never has to exist:

- a perceptron LN(y)·g + β → Linear(P, q): with W̃ = W2 − 1·mean_d(W2) and b̃ = b2 − mean(b2)
  (y centred over channels), var(y) = (hᵀ W̃ᵀW̃ h + 2 b̃ᵀW̃ h + ‖b̃‖²)/d and
  logits = (P·diag(g)·W̃ h + P·diag(g)·b̃) / √(var + ε) + (P β + q);
- router r reads y_r: logits = (R_r W2_r) h_r + (R_r b2_r + c_r), an (r+1)×r' matrix per router.

Per sample and block that costs T·r·(d + r) instead of 2·T·r·d multiply-adds, and touches T·r
numbers instead of T·d. Only frozen experts are folded (their weights never change); the trainable
newest expert is computed directly so its gradients are exact.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def entropy(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy of softmax(logits) over ``dim`` (released: +1e-10 inside the log).
    The softmax is spelled out: for CaRE's 3-class perceptrons it is twice as fast as ``softmax``."""
    z = logits.float()
    e = (z - z.amax(dim, keepdim=True)).exp()
    p = e / e.sum(dim, keepdim=True)
    return -(p * torch.log(p + 1e-10)).sum(dim)


def fold_adapters(experts: list[nn.Module]) -> tuple[torch.Tensor, ...]:
    """(W1 (E,r,d), b1 (E,r), W2ᵀ (E,r,d), b2 (E,d)) with LayerNorm affine and scale folded in;
    both weights row-major in d so per-sample gathers are contiguous rows.
    Differentiable: used under no_grad for frozen experts and with grad for the live one."""
    w1 = torch.stack([e.down.weight * e.ln.weight[None, :] for e in experts])
    b1 = torch.stack([e.down.weight @ e.ln.bias + e.down.bias for e in experts])
    w2t = torch.stack([(e.up.weight * e.scale[:, None]).T for e in experts])
    b2 = torch.stack([e.up.bias * e.scale for e in experts])
    return w1, b1, w2t, b2


class CLSHidden:
    """The bottleneck states h = Dropout(ReLU(W1·n + b1)) of E frozen experts on the CLS row: one
    matmul for all of them. ``values()`` (no gradient) serves the routing choices; ``rows(experts)``
    gives the chosen experts' states in the autograd graph, so the block input's gradient flows
    through exactly the experts and routers that the output uses, as in the released code. Autograd
    then saves only the CLS row, the gathered rows and their masks: nothing that grows with E."""

    def __init__(self, normed_cls: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, p: float, training: bool):
        e, r, d = w1.shape
        self.pre = (normed_cls @ w1.reshape(e * r, d).T).view(-1, e, r) + b1                  # (B, E, r)
        self.mask = None                                                                      # dropout keep / (1-p)
        if training and p > 0:
            self.mask = torch.empty_like(self.pre, dtype=torch.float32).bernoulli_(1 - p).div_(1 - p)

    def values(self) -> torch.Tensor:
        """(B, E, r) states of every expert, without gradient."""
        with torch.no_grad():
            h = torch.relu(self.pre)
            return h * self.mask.to(h.dtype) if self.mask is not None else h

    def rows(self, experts: torch.Tensor) -> torch.Tensor:
        """(B, K, r) states of experts (B, K) per sample, differentiable in the block input. Indexing,
        not ``gather``: autograd keeps only the indices for it (``gather`` would keep all of ``pre``)."""
        batch = torch.arange(len(experts), device=experts.device)[:, None]
        h = torch.relu(self.pre[batch, experts])
        return h * self.mask[batch, experts].to(h.dtype) if self.mask is not None else h


@dataclass
class PerceptronGroup:
    """Perceptrons with the same number of classes, folded onto their experts' hidden states."""
    members: list[int]       # task indices, ascending
    index: torch.Tensor      # the same on the device
    weight: torch.Tensor     # (n, c, r)  P·diag(g)·W̃
    offset: torch.Tensor     # (n, c)     P·diag(g)·b̃
    bias: torch.Tensor       # (n, c)     P·β + q


@dataclass
class FoldedExperts:
    """Frozen experts 0..n-1 of one block with their routers and perceptrons, folded."""
    w1: torch.Tensor
    b1: torch.Tensor
    w2t: torch.Tensor
    b2: torch.Tensor
    gram: torch.Tensor        # (n, r, r)  W̃ᵀW̃ / d
    cross: torch.Tensor       # (n, r)     2·W̃ᵀb̃ / d
    const: torch.Tensor       # (n,)       ‖b̃‖² / d
    router_w: torch.Tensor    # (n·r, n)   row s·r+j: column j of router s composed with expert s, zero-padded
    router_b: torch.Tensor    # (n, n)     -inf beyond router s's s+1 outputs
    groups: list[PerceptronGroup]
    eps: float

    @property
    def n(self) -> int:
        return self.w1.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        out = [self.w1, self.b1, self.w2t, self.b2, self.gram, self.cross, self.const, self.router_w, self.router_b]
        return out + [t for g in self.groups for t in (g.weight, g.offset, g.bias)]


@torch.no_grad()
def fold(experts: list[nn.Module], routers: list[nn.Linear], perceptrons: list[nn.Sequential]) -> FoldedExperts:
    w1, b1, w2t, b2 = fold_adapters(experts)
    n, r, d = w2t.shape
    w_c = w2t - w2t.mean(2, keepdim=True)                                         # centred over channels
    b_c = b2 - b2.mean(1, keepdim=True)
    gram = w_c @ w_c.transpose(1, 2) / d
    cross = 2 * torch.einsum("nrd,nd->nr", w_c, b_c) / d
    const = b_c.square().sum(1) / d
    router_w = w2t.new_zeros(n, r, n)
    router_b = w2t.new_full((n, n), float("-inf"))
    for s, router in enumerate(routers):
        router_w[s, :, : s + 1] = w2t[s] @ router.weight.T
        router_b[s, : s + 1] = router.weight @ b2[s] + router.bias
    router_w = router_w.view(n * r, n)
    sizes = torch.tensor([p[1].out_features for p in perceptrons])
    groups = []
    for size in sizes.unique().tolist():
        index = (sizes == size).nonzero().flatten()
        ln_w = torch.stack([perceptrons[i][0].weight for i in index])             # (k, d)
        ln_b = torch.stack([perceptrons[i][0].bias for i in index])
        fc_w = torch.stack([perceptrons[i][1].weight for i in index])             # (k, c, d)
        fc_b = torch.stack([perceptrons[i][1].bias for i in index])
        scaled = fc_w * ln_w[:, None, :]
        groups.append(PerceptronGroup(index.tolist(), index.to(w2t.device), scaled @ w_c[index].transpose(1, 2),
                                      torch.einsum("kcd,kd->kc", scaled, b_c[index]),
                                      torch.einsum("kcd,kd->kc", fc_w, ln_b) + fc_b))
    return FoldedExperts(w1, b1, w2t, b2, gram, cross, const, router_w, router_b, groups, perceptrons[0][0].eps)


def perceptron_logits_entropy(f: FoldedExperts, h: torch.Tensor, upto: int) -> torch.Tensor:
    """(B, upto) entropies of perceptrons 0..upto-1 (all folded) from the hidden states h (B, >=upto, r).
    Computed expert-major, h as (upto, r, B): every step is then a plain batched matmul over experts
    with the batch as the wide dimension, and a group of perceptrons is a slice along experts (3x
    faster than batch-major einsums on the tiny ViT at T = 301)."""
    h_t = h[:, :upto].float().permute(1, 2, 0).contiguous()                        # (upto, r, B)
    quad = torch.baddbmm(f.cross[:upto, :, None], f.gram[:upto], h_t)              # (upto, r, B)
    var = (quad * h_t).sum(1) + f.const[:upto, None]                              # (upto, B)
    inv_std = torch.rsqrt(var.clamp_min(0) + f.eps)
    out = h_t.new_empty(upto, h_t.shape[2])
    for g in f.groups:
        k = bisect.bisect_left(g.members, upto)                                       # members below upto
        if k == 0:
            continue
        idx = g.index[:k]
        span = g.members[0] + k == g.members[k - 1] + 1                               # consecutive tasks
        pick = (lambda t: t[g.members[0]: g.members[0] + k]) if span else (lambda t: t.index_select(0, idx))
        logits = torch.baddbmm(g.offset[:k, :, None], g.weight[:k], pick(h_t))       # (k, c, B)
        logits = logits * pick(inv_std)[:, None] + g.bias[:k, :, None]
        if span:
            out[g.members[0]: g.members[0] + k] = entropy(logits, 1)
        else:
            out.index_copy_(0, idx, entropy(logits, 1))
    return out.T


def stacked_rows(experts: torch.Tensor, r: int) -> torch.Tensor:
    """(..., r) row numbers of the given experts' r bottleneck rows in an (E·r, ·) stacked table."""
    return experts[..., None] * r + torch.arange(r, device=experts.device)


def router_logits(f: FoldedExperts, h_sel: torch.Tensor, selected: torch.Tensor, n_cols: int) -> torch.Tensor:
    """(B, S, n_cols) logits of the selected folded routers (indices < f.n) on their experts' hidden
    states ``h_sel`` (B, S, r), gathered for ``selected.clamp(max=f.n - 1)``; columns beyond a
    router's outputs are -inf. Each logit row is a sum of r table rows weighted by the hidden state,
    so one ``embedding_bag`` reads the selected routers' weights in place (gathering them into a
    (B·S, n, r) copy first was 10x slower at n = 301)."""
    b, s = selected.shape
    r = h_sel.shape[2]
    sel = selected.clamp(max=f.n - 1).flatten()
    cols = min(n_cols, f.n)
    h_sel = h_sel.reshape(b * s, r)
    rows = stacked_rows(sel, r)                                                                 # (B·S, r)
    logits = F.embedding_bag(rows, f.router_w, per_sample_weights=h_sel.to(f.router_w.dtype), mode="sum")
    logits = (logits + f.router_b.index_select(0, sel))[:, :cols].view(b, s, cols)
    if n_cols > cols:
        logits = F.pad(logits, (0, n_cols - cols), value=float("-inf"))
    return logits
