"""A prompt pool that grows per task, with similarity-weighted (soft top-k) aggregation and per-sample
masking of prompts (the similarity-aware MoE reading, spec methods.md §3.2).

Experts are prompts P_j ∈ R^{L×d} with keys k_j ∈ R^d. For a query q (the frozen model's CLS feature)
the sample's prompt is Σ_{j ∈ top-k} w_j P_j with w = softmax(cos(q, k_j)/T) over its top-k keys;
prompts a sample may not use get similarity -inf, so their weight is exactly 0 and no gradient
reaches them or their keys through that sample.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Mixture:
    prompt: torch.Tensor     # (B, L, d) aggregated prompt per sample
    weight: torch.Tensor     # (B, k) aggregation weights (0 for masked experts)
    sim: torch.Tensor        # (B, k) cos(q, k_j) of the picked experts (0 where masked)
    idx: torch.Tensor        # (B, k) picked expert ids


class GlobalPromptPool(nn.Module):
    def __init__(self, length: int, dim: int):
        super().__init__()
        self.length, self.dim = length, dim
        self.prompts = nn.Parameter(torch.zeros(0, length, dim))
        self.keys = nn.Parameter(torch.zeros(0, dim))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    def grow(self, keys: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Append len(keys) experts with the given keys and uniform(-1, 1) prompts (L2P's init)."""
        n = len(keys)
        new = torch.empty(n, self.length, self.dim).uniform_(-1, 1, generator=generator).to(self.prompts)
        self.prompts = nn.Parameter(torch.cat([self.prompts.data, new]))
        self.keys = nn.Parameter(torch.cat([self.keys.data, keys.to(self.keys)]))

    def similarity(self, query: torch.Tensor) -> torch.Tensor:
        return F.normalize(query, dim=1) @ F.normalize(self.keys, dim=1).T

    def mix(self, query: torch.Tensor, top_k: int, temperature: float,
            allowed: torch.Tensor | None = None) -> Mixture:
        """Soft top-k aggregation; ``allowed`` (B, M) bool marks the experts each sample may use."""
        sim = self.similarity(query)
        if allowed is not None:
            sim = sim.masked_fill(~allowed, float("-inf"))
        k = min(top_k, self.size)
        top, idx = sim.topk(k, dim=1)
        weight = torch.softmax(top / temperature, dim=1)
        prompt = torch.einsum("bk,bkld->bld", weight, self.prompts[idx])
        return Mixture(prompt, weight, top.masked_fill(weight == 0, 0.0), idx)


def farthest_queries(queries: torch.Tensor, existing_keys: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` of the queries, picked greedily as the least similar (cosine) to the existing keys and to
    the picks so far: new experts start where the pool covers the data worst (deterministic)."""
    q = F.normalize(queries, dim=1)
    anchors = F.normalize(existing_keys, dim=1) if len(existing_keys) else q.mean(0, keepdim=True)
    nearest = (q @ anchors.T).max(1).values
    picks = []
    for _ in range(min(n, len(q))):
        i = int(nearest.argmin())
        picks.append(i)
        nearest = torch.maximum(nearest, q @ q[i])
        nearest[i] = float("inf")
    return queries[picks]
