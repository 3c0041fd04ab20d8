"""AdaptFormer-style bottleneck adapter (the expert unit of CaRE and APER's adapter variant)."""
from __future__ import annotations

import torch
from torch import nn


class Adapter(nn.Module):
    """A(x) = s ⊙ (W_up · Dropout(ReLU(W_down · LN(x) + b_down)) + b_up), per token.

    Weights keep nn.Linear's kaiming-uniform(a=√5) init, biases start at zero, and the per-channel
    scale ``s`` starts at zero, so a fresh adapter outputs exactly 0 (CaRE ``vit_brmoe.py``).
    """

    def __init__(self, dim: int, bottleneck: int, dropout: float = 0.1):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.scale = nn.Parameter(torch.zeros(dim))
        self.drop = nn.Dropout(dropout)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.drop(torch.relu(self.down(self.ln(x)))))


@torch.no_grad()
def average_into(target: nn.Module, sources: list[nn.Module]) -> None:
    """target ← element-wise mean of ``sources`` (all parameters, LayerNorm and scale included)."""
    for name, p in target.named_parameters():
        p.copy_(torch.stack([dict(s.named_parameters())[name] for s in sources]).mean(0))
