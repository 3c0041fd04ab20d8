"""Parameter-efficient tuning attachments for a ``ViTBackbone`` (APER's first-task adaptation).

Each tuner leaves the pre-trained weights untouched and owns only its new parameters, so a
checkpoint stores the tuner, not another copy of the ViT:
- ``AdapterHooks``: AdaptFormer bottleneck adapters parallel to every block's MLP (PILOT ``vit_adapter``:
  no LayerNorm, fixed scalar 0.1, LoRA init so a fresh adapter outputs 0);
- ``PromptHooks``: VPT prompt tokens, ``deep`` (fresh tokens before every block, dropped after it) or
  ``shallow`` (one set before block 0, dropped after the last block); appended after the patches as in
  PILOT's ``VPT_ViT`` (token order is irrelevant to attention once position embeddings are added);
- ``SSF``: scale-and-shift after the patch embedding, every LayerNorm, qkv, proj, fc1, fc2 and the final
  norm (Lian et al. 2022; PILOT ``vit_ssf``), as forward hooks on the shared ViT that act only inside
  ``with ssf.active():``, so the pre-trained branch and the SSF branch share one copy of the weights.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from cilbench.backbones.vit import BlockHooks, ViTBackbone


class ParallelAdapter(nn.Module):
    """AdaptFormer: s · up(Dropout(ReLU(down(x)))), s a fixed scalar; down kaiming(a=√5), up and biases 0."""

    def __init__(self, dim: int, bottleneck: int, scale: float = 0.1, dropout: float = 0.1):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.drop = nn.Dropout(dropout)
        self.scale = scale
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.drop(torch.relu(self.down(x))))


class AdapterHooks(BlockHooks, nn.Module):
    def __init__(self, dim: int, depth: int, bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.1):
        nn.Module.__init__(self)
        self.adapters = nn.ModuleList(ParallelAdapter(dim, bottleneck, scale, dropout) for _ in range(depth))

    def parallel(self, i: int, z_a: torch.Tensor) -> torch.Tensor:
        return self.adapters[i](z_a)


class PromptHooks(BlockHooks, nn.Module):
    """VPT. Init uniform(±√(6/(3·p² + d))) as in the VPT paper (xavier over the patch projection)."""

    def __init__(self, dim: int, depth: int, n_tokens: int = 5, deep: bool = True, patch: int = 16):
        nn.Module.__init__(self)
        self.deep, self.depth, self.n_tokens = deep, depth, n_tokens
        bound = math.sqrt(6.0 / (3 * patch * patch + dim))
        self.prompts = nn.Parameter(torch.empty(depth if deep else 1, n_tokens, dim).uniform_(-bound, bound))

    def before_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.deep or i == 0:
            p = self.prompts[i if self.deep else 0]
            x = torch.cat([x, p.to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
        return x

    def after_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.deep or i == self.depth - 1:
            x = x[:, : x.shape[1] - self.n_tokens]
        return x


class SSF(nn.Module):
    """Per-channel scale (init N(1, 0.02)) and shift (init N(0, 0.02)) after each listed op of ``vit``."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.scales, self.shifts = nn.ParameterDict(), nn.ParameterDict()
        self._handles = []
        self._on = False
        for name, module in ssf_targets(vit):
            dim = _out_dim(module)
            key = name.replace(".", "_")
            self.scales[key] = nn.Parameter(torch.empty(dim).normal_(1.0, 0.02))
            self.shifts[key] = nn.Parameter(torch.empty(dim).normal_(0.0, 0.02))
            self._handles.append(module.register_forward_hook(self._hook(key)))

    def _hook(self, key: str):
        def apply(_module, _inputs, out):
            return out * self.scales[key] + self.shifts[key] if self._on else None
        return apply

    @contextlib.contextmanager
    def active(self):
        self._on = True
        try:
            yield
        finally:
            self._on = False

    def detach_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def ssf_targets(vit: nn.Module) -> list[tuple[str, nn.Module]]:
    """Where SSF acts: patch embedding, then per block norm1, qkv, proj, norm2, fc1, fc2; final norm."""
    out = [("patch_embed", vit.patch_embed)]
    for i, blk in enumerate(vit.blocks):
        out += [(f"blocks.{i}.{n}", blk.get_submodule(n))
                for n in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")]
    out.append(("norm", vit.norm))
    return out


def _out_dim(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[0]
    return module.proj.out_channels  # timm PatchEmbed (flattened to (B, N, C))


def patch_size(backbone: ViTBackbone) -> int:
    return backbone.vit.patch_embed.patch_size[0]
