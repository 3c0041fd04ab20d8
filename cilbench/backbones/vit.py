"""A ViT wrapper whose blocks can host adapters, experts and prompts.

The forward is timm's (patch embed -> position embedding -> blocks -> norm) with three optional
per-block hooks, so methods never patch timm modules:
- ``before_block(i, x)``: e.g. insert prompt tokens;
- ``parallel(i, z_a)``: a branch added beside the MLP (AdaptFormer "parallel" placement:
  ``z' = z_a + MLP(LN(z_a)) + branch(z_a)`` with ``z_a = z + MHSA(LN(z))``);
- ``after_block(i, x)``: e.g. remove the prompt tokens again.
Blocks without a parallel branch run timm's fused ``Block.forward``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from timm.models.vision_transformer import VisionTransformer


class BlockHooks:
    """Override the hooks you need; the defaults leave the ViT unchanged."""

    def before_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return x

    def parallel(self, i: int, z_a: torch.Tensor) -> torch.Tensor | None:
        return None

    def after_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return x

    def has_parallel(self, i: int) -> bool:
        return type(self).parallel is not BlockHooks.parallel


class ViTBackbone(nn.Module):
    def __init__(self, vit: VisionTransformer, mean: Sequence[float], std: Sequence[float], name: str,
                 normalize: bool = True):
        super().__init__()
        self.vit, self.name, self.normalize = vit, name, normalize
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    @property
    def img_size(self) -> int:
        return self.vit.patch_embed.img_size[0]

    @property
    def num_prefix_tokens(self) -> int:
        return self.vit.num_prefix_tokens

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[0,1] images -> token sequence entering block 0 (CLS first)."""
        if self.normalize:
            images = (images - self.mean) / self.std
        v = self.vit
        x = v.patch_embed(images)
        x = v._pos_embed(x)
        x = v.patch_drop(x)
        return v.norm_pre(x)

    def run_blocks(self, x: torch.Tensor, hooks: BlockHooks | None = None, start: int = 0,
                   stop: int | None = None) -> torch.Tensor:
        blocks = self.vit.blocks
        for i in range(start, len(blocks) if stop is None else stop):
            blk = blocks[i]
            if hooks is None:
                x = blk(x)
                continue
            x = hooks.before_block(i, x)
            if hooks.has_parallel(i):
                z_a = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))
                x = z_a + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(z_a))))
                branch = hooks.parallel(i, z_a)
                if branch is not None:
                    x = x + branch
            else:
                x = blk(x)
            x = hooks.after_block(i, x)
        return x

    def forward_tokens(self, images: torch.Tensor, hooks: BlockHooks | None = None) -> torch.Tensor:
        """Final-normed tokens (B, N, d)."""
        return self.vit.norm(self.run_blocks(self.embed(images), hooks))

    def forward(self, images: torch.Tensor, hooks: BlockHooks | None = None) -> torch.Tensor:
        """CLS feature after the final LayerNorm (B, d) -- PILOT's ``global_pool=False`` feature."""
        return self.forward_tokens(images, hooks)[:, 0]
