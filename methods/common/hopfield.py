"""Modern-Hopfield retrieval as a one-step, closed-form energy minimisation (Ramsauer et al., 2021).

For a state pattern ξ ∈ R^d and stored patterns k_1..k_N, take the free energy on the simplex Δ_N

    F(p; ξ) = −β Σ_i p_i ⟨ξ, k_i⟩ + Σ_i p_i log p_i,      β > 0.

F is strictly convex on Δ_N (a linear term plus the negative entropy, whose Hessian diag(1/p_i) is
positive definite in the interior) and tends to its boundary values with infinite slope, so its
minimiser is interior and unique. Stationarity of the Lagrangian F + λ(Σ p_i − 1) gives
−β⟨ξ, k_i⟩ + log p_i + 1 + λ = 0, i.e. p_i ∝ exp(β⟨ξ, k_i⟩): the minimiser is p* = softmax(β Kξ),
and the retrieved pattern Σ_i p*_i v_i is one softmax-attention read. No iterations are needed:
one update step is the exact minimiser, which is why "single-step associative retrieval" and
"closed-form minimisation of a strictly convex free energy" (RwF's abstract) describe the same thing.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def retrieve(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, beta: float) -> torch.Tensor:
    """softmax(β Q Kᵀ) V over the last two dimensions: (…, L, d), (…, N, d), (…, N, d_v) -> (…, L, d_v)."""
    return torch.softmax(beta * queries @ keys.transpose(-1, -2), dim=-1) @ values


def free_energy(p: torch.Tensor, query: torch.Tensor, keys: torch.Tensor, beta: float) -> torch.Tensor:
    """F(p; ξ) for a distribution ``p`` (N,) over the stored patterns ``keys`` (N, d)."""
    return -beta * (p * (keys @ query)).sum() + (p * torch.log(p.clamp_min(1e-30))).sum()


class HopfieldPrompts(nn.Module):
    """L learnable state patterns retrieving from one block's tokens: P = softmax(β·q Kᵀ)·V·W_O.

    q = LN(Q)W_Q, K = LN(X)W_K, V = LN(X)W_V (hflayers' ``HopfieldPooling`` layout: LayerNorm on state
    and stored patterns, queries N(0, 0.02)). The projections start as the identity, so untrained
    they retrieve convex combinations of the (normed) token embeddings themselves (spec A4).
    ``trainable``: which of "q", "k", "v", "o" learn; the queries and LayerNorms always do.
    """

    PROJECTIONS = ("q", "k", "v", "o")

    def __init__(self, dim: int, length: int, beta: float = 0.0, trainable: tuple[str, ...] = ("q", "o")):
        super().__init__()
        self.beta = beta or 1.0 / math.sqrt(dim)
        self.queries = nn.Parameter(torch.randn(length, dim) * 0.02)
        self.norm_state, self.norm_stored = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.proj = nn.ModuleDict({name: nn.Linear(dim, dim, bias=False) for name in self.PROJECTIONS})
        for name, linear in self.proj.items():
            nn.init.eye_(linear.weight)
            linear.weight.requires_grad_(name in trainable)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, d) tokens -> (B, L, d) prompts."""
        q = self.proj["q"](self.norm_state(self.queries))
        stored = self.norm_stored(tokens)
        out = retrieve(q, self.proj["k"](stored), self.proj["v"](stored), self.beta)
        return self.proj["o"](out)
